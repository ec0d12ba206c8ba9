"""SwAV's Sinkhorn-Knopp and swapped prediction, SimSiam's loss, DAE's CMCL, NT-Xent (MONAI's
ContrastiveLoss): NumPy / PyTorch transcriptions of the reference code, known values,
stop-gradients, and global sums under a sharded jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmed.losses import negative_cosine, simsiam_loss, sinkhorn_knopp, swav_loss
from jaxmed.losses.contrastive import cmcl_loss, global_average_pool, nt_xent_loss
from jaxmed.train import sharding


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _scores(b, k, d=8, seed=0):
  """Cosines of unit embeddings and unit prototypes, as SwAV's scores."""
  rng = np.random.default_rng(seed)
  return (_unit(rng.normal(size=(b, d))) @ _unit(rng.normal(size=(k, d))).T).astype(np.float32)


def numpy_distributed_sinkhorn(out, epsilon, iterations, world_size=1):
  """swav main_swav.py ``distributed_sinkhorn`` on one process, in float64."""
  q = np.exp(out.astype(np.float64) / epsilon).T
  b = q.shape[1] * world_size
  k = q.shape[0]
  q /= np.sum(q)
  for _ in range(iterations):
    q /= np.sum(q, axis=1, keepdims=True)
    q /= k
    q /= np.sum(q, axis=0, keepdims=True)
    q /= b
  q *= b
  return q.T


def numpy_swav_loss(output, q, crops_for_assign, nmb_crops, temperature):
  """swav main_swav.py ``train``'s loss, ``output`` (V * B, K) crop-major."""
  bs = output.shape[0] // nmb_crops
  loss = 0.0
  for i, crop_id in enumerate(crops_for_assign):
    subloss = 0.0
    for v in np.delete(np.arange(nmb_crops), crop_id):
      x = output[bs * v: bs * (v + 1)] / temperature
      log_p = x - x.max(axis=1, keepdims=True)
      log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
      subloss -= np.mean(np.sum(q[i] * log_p, axis=1))
    loss += subloss / (nmb_crops - 1)
  return loss / len(crops_for_assign)


@pytest.mark.parametrize("b, k, iterations", [(12, 5, 3), (7, 20, 1), (32, 10, 3)])
def test_sinkhorn_equals_swav_distributed_sinkhorn(b, k, iterations):
  scores = _scores(b, k, seed=b)
  q = np.asarray(sinkhorn_knopp(scores, epsilon=0.05, iterations=iterations))
  ref = numpy_distributed_sinkhorn(scores, 0.05, iterations)
  assert q.shape == (b, k) and q.dtype == np.float32
  np.testing.assert_allclose(q, ref, rtol=2e-5, atol=1e-7)
  # The last normalisation is over samples: each code sums to 1.
  np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)
  assert np.all(q >= 0)


def test_sinkhorn_converges_to_an_equipartition():
  scores = _scores(24, 6, seed=3)
  q = np.asarray(sinkhorn_knopp(scores, epsilon=0.05, iterations=200))
  np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)        # samples: 1 each
  np.testing.assert_allclose(q.sum(axis=0), 24 / 6, rtol=1e-3)     # prototypes: B / K each
  # Sharper than a softmax of the scores, and the argmax follows the scores where confident.
  q3 = np.asarray(sinkhorn_knopp(scores, epsilon=0.05, iterations=3))
  assert not np.allclose(q3.sum(axis=0), 24 / 6, rtol=1e-3)        # 3 iterations: approximate


def test_sinkhorn_is_stable_for_large_scores_and_has_no_gradient():
  scores = _scores(8, 4) * 100.0  # exp(s / 0.05) overflows even float64 (SwAV: nan)
  q = np.asarray(sinkhorn_knopp(scores))
  assert np.all(np.isfinite(q))
  np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)
  grad = jax.grad(lambda s: jnp.sum(sinkhorn_knopp(s) * jnp.arange(4.0)))(_scores(8, 4))
  np.testing.assert_array_equal(grad, 0.0)


def test_sinkhorn_under_jit_on_4_devices_equals_1_device():
  assert jax.device_count() == 4
  scores = _scores(32, 10, seed=7)
  one = jax.jit(sinkhorn_knopp)(jax.device_put(scores, jax.devices()[0]))
  mesh = sharding.make_mesh({"data": 4})
  sharded = jax.device_put(scores, NamedSharding(mesh, P(("data", "fsdp"))))
  assert len(sharded.sharding.device_set) == 4
  four = jax.jit(sinkhorn_knopp)(sharded)
  np.testing.assert_allclose(np.asarray(four), np.asarray(one), rtol=1e-6, atol=1e-8)
  # Per-device (local) sums would give other codes: the equality above needs global sums.
  local = np.concatenate([numpy_distributed_sinkhorn(s, 0.05, 3) for s in np.split(scores, 4)])
  assert not np.allclose(local, np.asarray(one), rtol=1e-3)
  np.testing.assert_allclose(np.asarray(one), numpy_distributed_sinkhorn(scores, 0.05, 3),
                             rtol=2e-5, atol=1e-7)


def test_sinkhorn_input_errors():
  with pytest.raises(ValueError, match=r"scores must be a non-empty \(B, D\).*\(6,\)"):
    sinkhorn_knopp(np.zeros(6, np.float32))
  with pytest.raises(TypeError, match="scores must be a float array"):
    sinkhorn_knopp(np.zeros((2, 3), np.int32))
  with pytest.raises(ValueError, match="epsilon must be > 0"):
    sinkhorn_knopp(np.zeros((2, 3), np.float32), epsilon=0.0)
  with pytest.raises(ValueError, match="iterations must be an int >= 1"):
    sinkhorn_knopp(np.zeros((2, 3), np.float32), iterations=0)


def test_swav_loss_equals_main_swav_py():
  rng = np.random.default_rng(1)
  v, b, k = 5, 6, 7
  scores = np.stack([_scores(b, k, seed=i) for i in range(v)])
  codes = np.stack([numpy_distributed_sinkhorn(scores[c], 0.05, 3) for c in (0, 1)])
  ours = swav_loss(scores, codes.astype(np.float32), crops_for_assign=(0, 1), temperature=0.1)
  ref = numpy_swav_loss(scores.reshape(v * b, k).astype(np.float64), codes, (0, 1), v, 0.1)
  np.testing.assert_allclose(float(ours), ref, rtol=1e-5)
  # Other assigned crops and temperature; sequences of (B, K) arrays work too.
  codes3 = rng.dirichlet(np.ones(k), size=(3, b)).astype(np.float32)
  ours = swav_loss(list(scores), list(codes3), crops_for_assign=(4, 0, 2), temperature=0.5)
  ref = numpy_swav_loss(scores.reshape(v * b, k).astype(np.float64), codes3, (4, 0, 2), v, 0.5)
  np.testing.assert_allclose(float(ours), ref, rtol=1e-5)


def test_swav_loss_known_value_and_stop_gradient():
  # Equal scores: every prediction is uniform, so each cross-entropy is ln K.
  k = 9
  codes = np.random.default_rng(0).dirichlet(np.ones(k), size=(2, 4)).astype(np.float32)
  np.testing.assert_allclose(float(swav_loss(np.zeros((3, 4, k), np.float32), codes)),
                             np.log(k), rtol=1e-6)
  scores = np.stack([_scores(4, k, seed=i) for i in range(3)])
  g_codes = jax.grad(lambda q: swav_loss(scores, q))(codes)
  np.testing.assert_array_equal(g_codes, 0.0)
  g_scores = jax.grad(lambda s: swav_loss(s, codes))(scores)
  assert np.all(np.isfinite(g_scores)) and np.abs(g_scores).sum() > 0


def test_swav_loss_errors():
  scores = np.zeros((3, 4, 5), np.float32)
  with pytest.raises(ValueError, match=r"scores must be \(V, B, K\).*\(4, 5\)"):
    swav_loss(scores[0], np.zeros((2, 4, 5), np.float32))
  with pytest.raises(ValueError, match=r"assignments must have shape \(2, 4, 5\).*\(2, 4, 6\)"):
    swav_loss(scores, np.zeros((2, 4, 6), np.float32))
  with pytest.raises(ValueError, match="crops_for_assign must be distinct crop indices"):
    swav_loss(scores, np.zeros((2, 4, 5), np.float32), crops_for_assign=(0, 3))
  with pytest.raises(ValueError, match="temperature must be > 0"):
    swav_loss(scores, np.zeros((2, 4, 5), np.float32), temperature=0.0)


def test_simsiam_known_values():
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(2, 6, 16)).astype(np.float32)
  # p parallel to the other view's z (any positive scale): -1.
  np.testing.assert_allclose(float(simsiam_loss(z2, 3.0 * z1, z1, z2)), -1.0, rtol=1e-6)
  np.testing.assert_allclose(float(simsiam_loss(-z2, -z1, z1, z2)), 1.0, rtol=1e-6)
  e = np.eye(4, dtype=np.float32)
  np.testing.assert_allclose(float(simsiam_loss(e[:2], e[:2], e[2:], e[2:])), 0.0, atol=1e-7)
  np.testing.assert_allclose(float(negative_cosine(z1, z1)), -1.0, rtol=1e-6)


def test_simsiam_matches_the_reference_with_its_gradients():
  rng = np.random.default_rng(1)
  p1, p2, z1, z2 = rng.normal(size=(4, 5, 8)).astype(np.float32)
  tp1, tp2 = (torch.tensor(x, requires_grad=True) for x in (p1, p2))
  tz1, tz2 = (torch.tensor(x, requires_grad=True) for x in (z1, z2))
  criterion = torch.nn.CosineSimilarity(dim=1)
  # simsiam main_simsiam.py; the model returns z1.detach(), z2.detach().
  ref = -(criterion(tp1, tz2.detach()).mean() + criterion(tp2, tz1.detach()).mean()) * 0.5
  ref.backward()
  loss, grads = jax.value_and_grad(simsiam_loss, argnums=(0, 1, 2, 3))(p1, p2, z1, z2)
  np.testing.assert_allclose(float(loss), float(ref.detach()), rtol=1e-6)
  np.testing.assert_allclose(grads[0], tp1.grad.numpy(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grads[1], tp2.grad.numpy(), rtol=1e-5, atol=1e-7)
  # No gradient through the stop-gradient branch.
  assert tz1.grad is None and tz2.grad is None
  np.testing.assert_array_equal(grads[2], 0.0)
  np.testing.assert_array_equal(grads[3], 0.0)


def test_simsiam_errors():
  a = np.zeros((4, 8), np.float32)
  with pytest.raises(ValueError, match=r"p1, p2, z1, z2 must have the same.*z2 \(4, 7\)"):
    simsiam_loss(a, a, a, np.zeros((4, 7), np.float32))
  with pytest.raises(ValueError, match=r"p1 must be a non-empty \(B, D\) array; got shape \(8,\)"):
    simsiam_loss(a[0], a, a, a)
  with pytest.raises(ValueError, match="p and z must have the same shape"):
    negative_cosine(a, a[:2])


# --------------------------------------------------------------------------------------------
# DAE's cross-modal contrastive loss (Eqs. 3-4).


def numpy_cmcl(z, ids, temperature):
  """The recommended form in float64: cosine / T, soft targets Y / sum(Y) on rows and columns."""
  z = z.astype(np.float64)
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  logits = z @ z.T / temperature
  y = (ids[:, None] == ids[None, :]).astype(np.float64)

  def log_softmax(a, axis):
    a = a - a.max(axis=axis, keepdims=True)
    return a - np.log(np.exp(a).sum(axis=axis, keepdims=True))

  rows = -(y / y.sum(1, keepdims=True) * log_softmax(logits, 1)).sum(1).mean()
  cols = -(y / y.sum(0, keepdims=True) * log_softmax(logits, 0)).sum(0).mean()
  return (rows + cols) / 2


def torch_reference_cmcl(z, ids, temperature):
  """DAE simmim_advanced.py SimMIMSkip.forward's "MM Cont Loss", on CPU."""
  _, b = np.unique(np.array(ids), return_inverse=True)
  label_tmp = torch.tensor(b)
  z = torch.tensor(z, dtype=torch.float64)
  bsz = z.shape[0]
  logits_con = torch.einsum("i d, j d -> i j", z.reshape(bsz, -1), z.reshape(bsz, -1)) * \
      torch.exp(torch.tensor(temperature, dtype=torch.float64))
  loss_t = torch.nn.functional.cross_entropy(logits_con, label_tmp)
  loss_i = torch.nn.functional.cross_entropy(logits_con.T, label_tmp)
  return float((loss_t + loss_i) / 2)


IDS = np.array([3, 0, 3, 4, 0, 3, 1], np.int32)  # repeated, non-contiguous modality codes
Z = np.random.default_rng(5).normal(size=(7, 6)).astype(np.float32)


def test_cmcl_known_values_both_forms():
  for t in (0.07, 0.5):
    np.testing.assert_allclose(float(cmcl_loss(Z, IDS, temperature=t)), numpy_cmcl(Z, IDS, t),
                               rtol=1e-5)
    ours = cmcl_loss(Z * 0.3, IDS, temperature=t, form="reference")
    np.testing.assert_allclose(float(ours), torch_reference_cmcl(Z * 0.3, IDS, t), rtol=1e-5)
  # One sample: its own positive, loss 0.
  np.testing.assert_allclose(float(cmcl_loss(Z[:1], IDS[:1])), 0.0, atol=1e-7)


def test_cmcl_minimum_closed_form():
  # One modality, identical embeddings: uniform softmax and uniform targets, log N (both forms).
  same = np.tile(Z[:1], (5, 1))
  ones = np.zeros(5, np.int32)
  np.testing.assert_allclose(float(cmcl_loss(same, ones)), np.log(5), rtol=1e-6)
  np.testing.assert_allclose(float(cmcl_loss(same, ones, form="reference")), np.log(5), rtol=1e-6)
  assert float(cmcl_loss(Z[:5], ones)) > np.log(5) + 0.01
  # Two modalities collapsed onto opposite directions (cos +1 within, -1 across): a row of a
  # modality with a members against b others scores log(a + b exp(-2 / T)).
  t = 0.1
  ids = np.array([0, 1, 0, 0, 1], np.int32)
  z = np.where(ids[:, None] == 0, Z[:1], -Z[:1])
  closed = np.mean([np.log(3 + 2 * np.exp(-2 / t)) if i == 0 else np.log(2 + 3 * np.exp(-2 / t))
                    for i in ids])
  np.testing.assert_allclose(float(cmcl_loss(z, ids, temperature=t)), closed, rtol=1e-5)
  # The infimum mean_i log(m_i) is the bound every batch respects.
  bound = np.mean([np.log(np.sum(ids == i)) for i in ids])
  assert bound < closed < float(cmcl_loss(Z[:5], ids, temperature=t))


def test_cmcl_is_permutation_invariant_but_the_reference_form_is_not():
  perm = np.array([4, 6, 0, 2, 5, 1, 3])
  np.testing.assert_allclose(float(cmcl_loss(Z[perm], IDS[perm])), float(cmcl_loss(Z, IDS)),
                             rtol=1e-6)
  # The reference's targets are column positions (np.unique inverse indices): a bug kept
  # literally, so shuffling the batch changes its value.
  ref, shuffled = (float(cmcl_loss(Z[p] * 0.3, IDS[p], form="reference"))
                   for p in (np.arange(7), perm))
  assert abs(ref - shuffled) > 1e-3
  np.testing.assert_allclose(shuffled, torch_reference_cmcl(Z[perm] * 0.3, IDS[perm], 0.07),
                             rtol=1e-5)


def test_cmcl_bfloat16_gradients_are_finite_and_the_loss_is_float32():
  z = jnp.asarray(Z, jnp.bfloat16)
  loss, grad = jax.jit(jax.value_and_grad(cmcl_loss))(z, jnp.asarray(IDS))
  assert loss.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(grad, np.float32))) and float(jnp.abs(grad).sum()) > 0
  np.testing.assert_allclose(float(loss), numpy_cmcl(np.asarray(z, np.float32), IDS, 0.07),
                             rtol=1e-5)
  # Pooled feature maps: global_average_pool(N, *S, C) -> (N, C) in float32.
  feats = np.random.default_rng(1).normal(size=(3, 2, 4, 2, 5)).astype(np.float32)
  pooled = global_average_pool(jnp.asarray(feats, jnp.bfloat16))
  assert pooled.shape == (3, 5) and pooled.dtype == jnp.float32
  np.testing.assert_allclose(pooled, feats.mean(axis=(1, 2, 3)), atol=2e-2)


def test_cmcl_errors():
  with pytest.raises(ValueError, match=r"embeddings must be a non-empty \(B, D\) array; got shape "
                                       r"\(2, 3, 4\)"):
    cmcl_loss(np.zeros((2, 3, 4), np.float32), np.zeros(2, np.int32))
  with pytest.raises(TypeError, match="embeddings must be a float array; got dtype int32"):
    cmcl_loss(np.zeros((2, 3), np.int32), np.zeros(2, np.int32))
  with pytest.raises(ValueError, match=r"modality_ids must have shape \(N,\) = \(2,\) for "
                                       r"embeddings of shape \(2, 3\); got \(3,\)"):
    cmcl_loss(np.zeros((2, 3), np.float32), np.zeros(3, np.int32))
  with pytest.raises(TypeError, match="modality_ids must be an integer array; got dtype float32"):
    cmcl_loss(np.zeros((2, 3), np.float32), np.zeros(2, np.float32))
  with pytest.raises(ValueError, match="form must be one of .*got form='clip'"):
    cmcl_loss(np.zeros((2, 3), np.float32), np.zeros(2, np.int32), form="clip")
  with pytest.raises(ValueError, match="temperature must be > 0 for form='normalized'; got 0.0"):
    cmcl_loss(np.zeros((2, 3), np.float32), np.zeros(2, np.int32), temperature=0.0)
  with pytest.raises(ValueError, match=r"global_average_pool: features must be .*\(4, 5\)"):
    global_average_pool(np.zeros((4, 5), np.float32))


# --- NT-Xent ----------------------------------------------------------------------------------


@pytest.mark.parametrize("b, d, temperature, scale", [
    (4, 8, 0.5, 1.0), (1, 3, 0.5, 1.0), (6, 16, 0.1, 1.0), (3, 5, 2.0, 1.0), (8, 512, 0.5, 30.0),
    (5, 4, 0.05, 1.0)])
def test_nt_xent_equals_monai_contrastive_loss_with_its_gradients(b, d, temperature, scale):
  from monai.losses import ContrastiveLoss  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(b * d)
  z1, z2 = (scale * rng.normal(size=(2, b, d))).astype(np.float32)
  t1, t2 = (torch.tensor(z, requires_grad=True) for z in (z1, z2))
  expected = ContrastiveLoss(temperature=temperature)(t1, t2)
  expected.backward()
  loss, (g1, g2) = jax.jit(jax.value_and_grad(
      lambda a, c: nt_xent_loss(a, c, temperature=temperature), argnums=(0, 1)))(z1, z2)
  np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g1, t1.grad.numpy(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g2, t2.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_nt_xent_known_values_and_float32():
  # Every embedding parallel: every similarity 1, so each row is log(2B - 1).
  z = np.tile(np.array([[1.0, 2.0, 0.5]], np.float32), (4, 1))
  np.testing.assert_allclose(float(nt_xent_loss(z, 3 * z)), np.log(7), rtol=1e-6)
  # Orthonormal views, positives identical: l = log(e^(1/t) + (2B - 2)) - 1/t.
  e = np.eye(3, dtype=np.float32)
  t = 0.1
  np.testing.assert_allclose(float(nt_xent_loss(e, e, temperature=t)),
                             np.log(np.exp(1 / t) + 4) - 1 / t, atol=1e-6)
  # bfloat16 inputs, float32 loss, finite gradients even at tau = 0.01 (exp(100) overflows).
  zb = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8)), jnp.bfloat16)
  loss, grad = jax.value_and_grad(lambda a: nt_xent_loss(a, a[::-1], temperature=0.01))(zb)
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  assert np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_nt_xent_under_jit_on_4_devices_equals_1_device():
  z1, z2 = np.random.default_rng(3).normal(size=(2, 8, 6)).astype(np.float32)
  mesh = sharding.make_mesh({"data": 4})
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
  np.testing.assert_allclose(float(jax.jit(nt_xent_loss)(put(z1), put(z2))),
                             float(nt_xent_loss(z1, z2)), rtol=1e-6)


def test_nt_xent_errors():
  z = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError, match=r"z1 and z2 must have the same \(B, D\) shape; got "
                                       r"\(2, 3\) and \(3, 3\)"):
    nt_xent_loss(z, np.zeros((3, 3), np.float32))
  with pytest.raises(ValueError, match=r"z2 must be a non-empty \(B, D\) array"):
    nt_xent_loss(z, np.zeros((2, 3, 1), np.float32))
  for bad in (0.0, -1.0, float("inf"), float("nan")):
    with pytest.raises(ValueError, match="temperature must be a finite float > 0"):
      nt_xent_loss(z, z, temperature=bad)
  with pytest.raises(ValueError, match="eps must be a finite float > 0"):
    nt_xent_loss(z, z, eps=0.0)

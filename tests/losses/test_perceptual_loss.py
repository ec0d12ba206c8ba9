"""The CoPer loss (Eqs. 3-4 of coper_contrastive_perceptual_metric), its frozen loss network, and
its slice-wise use on volumes (Eq. 1 of vit_ae_plus_plus)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import numpy_filled

from jaxmed.losses import coper_loss, network_features, volume_perceptual_loss
from jaxmed.losses.perceptual import preprocess_image, slice_indices
from jaxmed.models import VGG16, resnet18

RNG = np.random.default_rng(0)
PRED = RNG.uniform(-1, 1, size=(2, 8, 8, 2)).astype(np.float32)
TARGET = RNG.uniform(-1, 1, size=(2, 8, 8, 2)).astype(np.float32)
# A tiny two-tap "network": relu(conv3x3) at full size (4 channels), then relu(1x1 conv) of its
# 2x2 average pool (3 channels): taps of different sizes check the per-tap 1 / (C H W).
W1 = RNG.normal(size=(3, 3, 3, 4)).astype(np.float32)
W2 = RNG.normal(size=(4, 3)).astype(np.float32)


def tiny_features(x, w1=W1, w2=W2):
  h = jax.nn.relu(jax.lax.conv_general_dilated(x, w1, (1, 1), "SAME",
                                               dimension_numbers=("NHWC", "HWIO", "NHWC")))
  pooled = h.reshape(h.shape[0], h.shape[1] // 2, 2, h.shape[2] // 2, 2, 4).mean(axis=(2, 4))
  return {"a": h, "b": jax.nn.relu(pooled @ w2)}


def _numpy_coper(pred, target):
  """Eqs. 3-4 by hand: per target channel j and tap i, every image's ||phi(y) - phi(yhat)||^2 /
  (C H W), averaged over images, then over the taps and channels."""
  per_channel = []
  for j in range(pred.shape[-1]):
    grey = lambda x: np.repeat(x[..., j:j + 1], 3, axis=-1)
    fp = {k: np.asarray(v, np.float64) for k, v in tiny_features(grey(pred)).items()}
    ft = {k: np.asarray(v, np.float64) for k, v in tiny_features(grey(target)).items()}
    taps = []
    for k in fp:
      c, h, w = fp[k].shape[3], fp[k].shape[1], fp[k].shape[2]
      per_image = [np.sum((fp[k][n] - ft[k][n]) ** 2) / (c * h * w) for n in range(len(pred))]
      taps.append(np.mean(per_image))
    per_channel.append(np.mean(taps))
  return np.mean(per_channel), per_channel


def test_zero_for_identical_images():
  assert float(coper_loss(PRED, PRED, tiny_features)) == 0.0


def test_equals_the_hand_computed_feature_mse_averaged_over_channels_and_taps():
  expected, per_channel = _numpy_coper(PRED, TARGET)
  np.testing.assert_allclose(coper_loss(PRED, TARGET, tiny_features), expected, rtol=1e-5)
  # Averaged (not summed) over target channels: each channel alone gives its own term.
  for j in range(2):
    np.testing.assert_allclose(coper_loss(PRED[..., j:j + 1], TARGET[..., j:j + 1],
                                          tiny_features), per_channel[j], rtol=1e-5)
  # Averaged over taps: a tap sequence works as a dict, and one tap alone is its own term.
  as_list = lambda x: list(tiny_features(x).values())
  np.testing.assert_allclose(coper_loss(PRED, TARGET, as_list), expected, rtol=1e-6)
  tap_a = coper_loss(PRED, TARGET, lambda x: [tiny_features(x)["a"]])
  tap_b = coper_loss(PRED, TARGET, lambda x: [tiny_features(x)["b"]])
  np.testing.assert_allclose(0.5 * (tap_a + tap_b), expected, rtol=1e-5)
  assert not np.isclose(tap_a, tap_b)


def test_gradient_reaches_pred_and_not_the_target():
  g_pred, g_target = jax.jit(jax.grad(lambda p, t: coper_loss(p, t, tiny_features),
                                      argnums=(0, 1)))(PRED, TARGET)
  assert np.all(np.isfinite(g_pred)) and np.abs(g_pred).sum() > 0
  assert np.all(np.asarray(g_target) == 0.0)  # the ground truth's features are constants


@pytest.fixture(scope="module")
def vgg():
  """A VGG-16 with batch norm (narrow when the model has a width field) and non-trivial
  running statistics."""
  fields = {"width": 1 / 16} if "width" in VGG16.__dataclass_fields__ else {}
  module = VGG16(batch_norm=True, **fields)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  variables = numpy_filled(shapes, seed=3, scale=0.3)
  variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])  # variances > 0
  return module, variables


def test_network_features_runs_the_frozen_network_in_eval_mode(vgg):
  module, variables = vgg
  taps = ("relu1_2", "relu2_2")
  # Jitted: a compile per shape instead of one per operation.
  features_fn = jax.jit(network_features(module, variables, taps=taps, preprocess="unit"))
  x = RNG.uniform(-1, 1, size=(3, 16, 16, 3)).astype(np.float32)
  feats = features_fn(x)
  assert list(feats) == list(taps)
  expected = jax.jit(lambda x: module.apply(variables, x, train=False, taps=taps))((x + 1) / 2)
  for t in taps:
    np.testing.assert_allclose(feats[t], expected[t], rtol=1e-5, atol=1e-6)
  # Running statistics, not the batch's: an image's features do not depend on its batch.
  np.testing.assert_allclose(features_fn(x[:1])["relu2_2"], feats["relu2_2"][:1], rtol=1e-5,
                             atol=1e-6)
  # coper_loss through it: the hand-computed per-channel feature MSE.
  pred, target = x[:2, ..., :2], x[1:, ..., :2]
  terms = []
  for j in range(2):
    fp = features_fn(np.repeat(pred[..., j:j + 1], 3, -1))
    ft = features_fn(np.repeat(target[..., j:j + 1], 3, -1))
    terms += [np.mean(np.square(np.asarray(fp[t]) - np.asarray(ft[t]))) for t in taps]
  np.testing.assert_allclose(coper_loss(pred, target, features_fn), np.mean(terms), rtol=1e-5)


def test_no_gradient_reaches_the_loss_network(vgg):
  module, variables = vgg

  def loss(pred, variables):
    return coper_loss(pred, jnp.asarray(TARGET[..., :1]),
                      network_features(module, variables, taps=("relu1_1", "relu2_2")))
  pred = jnp.asarray(PRED[..., :1])
  g_pred, g_vars = jax.jit(jax.grad(loss, argnums=(0, 1)))(pred, variables)
  assert np.abs(np.asarray(g_pred)).sum() > 0 and np.all(np.isfinite(g_pred))
  for leaf in jax.tree.leaves(g_vars):
    assert np.all(np.asarray(leaf) == 0.0)


def test_resnet_default_taps_are_the_lpips_relu_taps():
  module = resnet18(widen_factor=1 / 16)
  variables = numpy_filled(jax.eval_shape(module.init, jax.random.PRNGKey(0),
                                          jnp.zeros((1, 32, 32, 3))), seed=1, scale=0.2)
  variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])
  features_fn = network_features(module, variables)
  x = RNG.uniform(-1, 1, size=(2, 32, 32, 3)).astype(np.float32)
  feats = features_fn(x)
  assert list(feats) == ["stem", "layer1", "layer2", "layer3", "layer4"]
  _, expected = module.apply(variables, x, train=False, return_features=True)
  np.testing.assert_allclose(feats["layer3"], expected["layer3"], rtol=1e-5, atol=1e-6)
  assert float(coper_loss(x[..., :1], x[..., 1:2], features_fn)) > 0


def test_preprocess_and_errors():
  x = np.array([-1.0, 0.0, 1.0], np.float32).reshape(1, 1, 1, 3)
  np.testing.assert_allclose(preprocess_image(x, "unit").ravel(), [0.0, 0.5, 1.0])
  np.testing.assert_allclose(preprocess_image(x, "imagenet").ravel(),
                             [-0.485 / 0.229, (0.5 - 0.456) / 0.224, (1 - 0.406) / 0.225],
                             rtol=1e-6)
  np.testing.assert_allclose(preprocess_image(x, "swav").ravel()[0], -0.485 / 0.228, rtol=1e-6)
  with pytest.raises(ValueError, match="preprocess must be one of"):
    preprocess_image(x, "caffe")
  with pytest.raises(ValueError, match="target shape"):
    coper_loss(PRED, TARGET[..., :1], tiny_features)
  with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
    coper_loss(PRED[0], TARGET[0], tiny_features)
  with pytest.raises(ValueError, match="no tap"):
    coper_loss(PRED, TARGET, lambda x: {})
  with pytest.raises(TypeError, match="callable"):
    coper_loss(PRED, TARGET, None)
  with pytest.raises(ValueError, match="no default taps"):
    network_features(object(), {"params": {}})


# Volumes (N, D, H, W, C) for the slice-wise loss of ViT-AE++.
VOL_PRED = RNG.uniform(-1, 1, size=(2, 5, 8, 8, 2)).astype(np.float32)
VOL_TARGET = RNG.uniform(-1, 1, size=(2, 5, 8, 8, 2)).astype(np.float32)


def _slices(x, idx=None):
  """(N, D, H, W, C) -> the (N d, H, W, C) batch of its first-axis slices, by hand."""
  x = x if idx is None else x[:, np.asarray(idx)]
  return np.concatenate([x[n] for n in range(x.shape[0])], axis=0)


def test_volume_loss_is_coper_loss_on_the_first_axis_slices():
  assert float(volume_perceptual_loss(VOL_PRED, VOL_PRED, tiny_features)) == 0.0
  loss = volume_perceptual_loss(VOL_PRED, VOL_TARGET, tiny_features)
  assert loss.shape == () and loss.dtype == jnp.float32 and float(loss) > 0
  np.testing.assert_allclose(
      loss, coper_loss(_slices(VOL_PRED), _slices(VOL_TARGET), tiny_features), rtol=1e-6)
  # A subset of slices: those of the same draw, for pred, target and every example.
  key = jax.random.PRNGKey(4)
  idx = np.asarray(slice_indices(key, 5, 3))
  assert idx.shape == (3,) and len(set(idx.tolist())) == 3 and set(idx.tolist()) <= set(range(5))
  loss3 = volume_perceptual_loss(VOL_PRED, VOL_TARGET, tiny_features, num_slices=3, key=key)
  np.testing.assert_allclose(
      loss3, coper_loss(_slices(VOL_PRED, idx), _slices(VOL_TARGET, idx), tiny_features),
      rtol=1e-6)
  assert not np.isclose(loss3, loss)
  # All D drawn: a permutation of the slices, the full loss; another key, another subset.
  np.testing.assert_allclose(
      volume_perceptual_loss(VOL_PRED, VOL_TARGET, tiny_features, num_slices=5, key=key), loss,
      rtol=1e-6)
  draws = {tuple(np.asarray(slice_indices(jax.random.PRNGKey(s), 5, 3)).tolist())
           for s in range(6)}
  assert len(draws) > 1


def test_volume_loss_gradient_reaches_pred_not_the_vgg_unless_stopped(vgg):
  module, variables = vgg
  pred = jnp.asarray(RNG.uniform(-1, 1, size=(1, 3, 32, 32, 2)), jnp.float32)
  target = jnp.asarray(RNG.uniform(-1, 1, size=(1, 3, 32, 32, 2)), jnp.float32)
  key = jax.random.PRNGKey(0)

  @jax.jit
  def value_and_grads(pred, variables):
    def loss(pred, variables, stop):
      features_fn = network_features(module, variables,
                                     taps=("relu1_2", "relu2_2", "relu3_3", "relu4_3"))
      return volume_perceptual_loss(pred, target, features_fn, num_slices=2, key=key,
                                    stop_gradient=stop)
    return (jax.value_and_grad(loss, argnums=(0, 1))(pred, variables, False),
            jax.value_and_grad(loss, argnums=(0, 1))(pred, variables, True))

  (value, (g_pred, g_vars)), (value_stopped, (g_pred_stopped, g_vars_stopped)) = (
      value_and_grads(pred, variables))
  assert float(value) > 0
  assert np.abs(np.asarray(g_pred)).sum() > 0 and np.all(np.isfinite(g_pred))
  # The reference code's logged-only loss: the same value, no gradient to anything.
  np.testing.assert_allclose(value_stopped, value, rtol=1e-6)
  assert np.all(np.asarray(g_pred_stopped) == 0.0)
  for leaf in jax.tree.leaves((g_vars, g_vars_stopped)):
    assert np.all(np.asarray(leaf) == 0.0)


def test_volume_loss_errors():
  with pytest.raises(ValueError, match=r"volume_perceptual_loss: pred must be \(N, D, H, W, C\) "
                                       r"\(ndim 5\); got shape \(5, 8, 8, 2\)"):
    volume_perceptual_loss(VOL_PRED[0], VOL_TARGET[0], tiny_features)
  with pytest.raises(ValueError, match=r"target shape \(2, 4, 8, 8, 2\) must equal pred shape"):
    volume_perceptual_loss(VOL_PRED, VOL_TARGET[:, :4], tiny_features)
  with pytest.raises(ValueError, match=r"num_slices must be an int in \[0, D=5\]; got 6"):
    volume_perceptual_loss(VOL_PRED, VOL_TARGET, tiny_features, num_slices=6,
                           key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"num_slices must be .*; got -1"):
    volume_perceptual_loss(VOL_PRED, VOL_TARGET, tiny_features, num_slices=-1)
  with pytest.raises(ValueError, match="key is required when num_slices > 0"):
    volume_perceptual_loss(VOL_PRED, VOL_TARGET, tiny_features, num_slices=2)
  with pytest.raises(ValueError, match="pred must be real; got complex"):
    volume_perceptual_loss(VOL_PRED.astype(np.complex64), VOL_TARGET, tiny_features)
  with pytest.raises(TypeError, match="features_fn must be callable"):
    volume_perceptual_loss(VOL_PRED, VOL_TARGET, None)

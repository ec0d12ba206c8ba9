"""ViT-AE++ (vit_ae_plus_plus Eq. 4): every loss switch, the masked-patch L_rec, the lambda2
schedule, the frozen VGG, the SimSiam term, the views, the 2D variant, features and
reconstructions, a trainer run, and the config file."""

import functools
import os

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import numpy_filled

from jaxmed.config import load_config
from jaxmed.data.transforms import gaussian_smooth
from jaxmed.losses import edge_loss, negative_cosine
from jaxmed.methods import METHODS, ViTAEPlusPlusMethod, get_method
from jaxmed.methods.vit_ae_pp import reconstruction_loss, zscore
from jaxmed.models.blocks import patchify, unpatchify
from jaxmed.pretext.masking import random_masking
from jaxmed.train import trainer
from jaxmed.train.logging import read_metrics

# Encoder and decoder 1 x 24 (2 heads) on 16^3 crops (patch 8: 8 tokens, 2 visible), a 1/16-width
# VGG read at relu1_2 and relu2_2 on 2 slices; no augmentation unless a test asks (it only adds
# compile time).
TINY = {
    "model.embed_dim": 24, "model.depth": 1, "model.num_heads": 2,
    "model.decoder_embed_dim": 24, "model.decoder_depth": 1, "model.decoder_num_heads": 2,
    "loss_net.model.width": 1 / 16, "loss_net.taps": ("relu1_2", "relu2_2"),
    "loss.num_slices": 2, "pretext.augment": False,
    "data.shape": (16, 16, 16), "data.crop_size": (16, 16, 16), "data.num_subjects": 4,
    "data.num_val": 1, "data.num_test": 1, "batch_size": 4, "total_steps": 2, "log_every": 1,
    "checkpoint.every": 0, "optim.warmup_steps": 0, "tensorboard": False,
}
RNG = np.random.default_rng(0)
IMAGE = RNG.uniform(size=(2, 16, 16, 16, 4)).astype(np.float32)
KEY = jax.random.PRNGKey(1)
FLAT = lambda tree: flax.traverse_util.flatten_dict(jax.device_get(tree), sep="/")
# Everything here runs once: compiled with the trainer's fast (unoptimised) CPU options, which
# about halves the compile time of these graphs.
JIT = functools.partial(jax.jit, compiler_options=trainer.init_compiler_options())


def _config(arg: str = "", **overrides):
  return load_config(f"vit_ae_pp:{arg}", {**TINY, **overrides})


def _variables(method, image):
  """Seeded stand-in variables of ``method`` (shapes only, nothing compiled); positive batch-norm
  variances."""
  shapes = jax.eval_shape(method.init, jax.random.PRNGKey(0), {"image": image})
  variables = numpy_filled(shapes, seed=1, scale=0.3)
  if "batch_stats" in variables:
    variables["batch_stats"] = jax.tree_util.tree_map_with_path(
        lambda path, x: np.abs(x) + 1.0 if path[-1].key == "var" else x,
        variables["batch_stats"])
  return variables


def _loss_fn(method):
  return JIT(lambda v, key, step: method.loss(v, {"image": IMAGE}, key, train=True,
                                                  step=step)[:2])


@pytest.fixture(scope="module")
def method():
  return get_method(_config())


@pytest.fixture(scope="module")
def variables(method):
  return _variables(method, IMAGE)


@pytest.fixture(scope="module")
def all_terms(method, variables):
  """The jitted loss of every term and its result at step 1."""
  fn = _loss_fn(method)
  return fn, fn(variables, KEY, 1)


def test_variables_and_registration(method, variables):
  assert METHODS["vit_ae_pp"] is ViTAEPlusPlusMethod and isinstance(method, ViTAEPlusPlusMethod)
  assert set(variables["params"]) == {"encoder", "decoder", "predictor", "loss_net"}
  assert set(variables["batch_stats"]) == {"predictor"}  # VGG-16 without batch norm
  pred = FLAT(variables["params"]["predictor"])
  # The reference's predictor: Linear(D, D, no bias)-BN-ReLU-Linear(D, D).
  assert {k: v.shape for k, v in pred.items()} == {
      "linear1/kernel": (24, 24), "bn1/scale": (24,), "bn1/bias": (24,),
      "linear2/kernel": (24, 24), "linear2/bias": (24,)}
  assert variables["params"]["decoder"]["pred"]["kernel"].shape == (24, 8**3 * 4)


def test_every_loss_switch_changes_exactly_its_term(method, variables, all_terms):
  _, (loss, metrics) = all_terms
  assert set(metrics) == {"rec", "per", "edge", "lambda2", "cl", "cl_z_std"}
  m = {k: float(v) for k, v in metrics.items()}
  assert m["rec"] > 0 and m["per"] > 0 and m["edge"] > 0 and -1 <= m["cl"] <= 1
  np.testing.assert_allclose(m["lambda2"], 0.01 * (1 - 1 / 2), rtol=1e-6)  # step 1 of 2
  np.testing.assert_allclose(
      float(loss), m["rec"] + 0.01 * m["per"] + m["lambda2"] * m["edge"] + m["cl"], rtol=1e-5)
  # Each term switched off (rec+per: edge and cl off; cl: rec, per and edge off, the "ViT +
  # L_CL" row, which never runs the decoder): its metric is absent, the others are unchanged
  # and the loss is the weighted sum of the rest.
  for arg, expected in (("rec+per", m["rec"] + 0.01 * m["per"]), ("cl", m["cl"])):
    other = get_method(_config(f"losses={arg}"))
    loss_off, metrics_off = _loss_fn(other)(variables, KEY, 1)
    kept = set(arg.split("+")) | ({"cl_z_std"} if "cl" in arg else set())
    assert set(metrics_off) == kept
    for k in kept:
      np.testing.assert_allclose(float(metrics_off[k]), m[k], rtol=1e-5, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(float(loss_off), expected, rtol=1e-5)


def test_loss_is_deterministic_per_key(variables, all_terms):
  fn, (loss, metrics) = all_terms
  again, metrics_again = fn(variables, KEY, 1)
  assert float(again) == float(loss)
  assert all(float(metrics_again[k]) == float(metrics[k]) for k in metrics)
  other, _ = fn(variables, jax.random.PRNGKey(2), 1)  # other masks and slices
  assert float(other) != float(loss)


def test_reconstruction_loss_counts_only_masked_patches():
  target = RNG.normal(size=(2, 16, 16, 16, 4)).astype(np.float32)
  pred = RNG.normal(size=(2, 8, 8**3 * 4)).astype(np.float32)

  @JIT
  def run(pred):
    _, _, mask = random_masking(KEY, 2, 8, 0.75)
    loss = lambda p: reconstruction_loss(p, target, mask, 8)
    return mask, patchify(target, 8), [loss(pred), loss(pred + 5.0 * (1 - mask)[..., None]),
                                       loss(pred + 5.0 * mask[..., None])]

  mask, patches, (base, visible_changed, masked_changed) = jax.device_get(run(pred))
  assert 0 < mask.sum() < mask.size
  per_patch = np.mean((pred - patches)**2, axis=-1)
  np.testing.assert_allclose(base, (per_patch * mask).sum() / mask.sum(), rtol=1e-5)
  assert visible_changed == pytest.approx(base)  # the visible patches do not count
  assert masked_changed > base + 1


def test_lambda2_decays_linearly_to_zero_or_stays_constant(method):
  assert method.config.total_steps == 2
  decay = get_method(_config(total_steps=100))
  values = [float(decay.lambda2_at(s)) for s in (0, 25, 50, 100, 150)]
  np.testing.assert_allclose(values, [0.01, 0.0075, 0.005, 0.0, 0.0], atol=1e-9)
  constant = get_method(_config("lambda2=constant", total_steps=100))
  assert [float(constant.lambda2_at(s)) for s in (0, 50, 100)] == pytest.approx([0.01] * 3)


def test_vgg_gets_no_gradient_and_the_perceptual_term_can_be_logged_only(variables):
  per_only = get_method(_config("losses=per"))
  logged = get_method(_config("losses=per", **{"loss.per_gradient": False}))
  target = zscore(IMAGE)
  pred = jnp.asarray(RNG.normal(size=(2, 8, 8**3 * 4)), jnp.float32)
  _, _, mask = random_masking(KEY, 2, 8, 0.75)

  @JIT
  def run(variables, pred):
    def terms(method, variables, pred):
      return method.reconstruction_terms(variables, pred, target, mask, step=0, key=KEY)
    (value, metrics), grads = jax.value_and_grad(
        lambda v, p: terms(per_only, v, p), argnums=(0, 1), has_aux=True)(variables, pred)
    (logged_value, logged_metrics), logged_grad = jax.value_and_grad(
        lambda p: terms(logged, variables, p), has_aux=True)(pred)
    return value, metrics, grads, logged_value, logged_metrics, logged_grad

  value, metrics, (g_vars, g_pred), logged_value, logged_metrics, logged_grad = run(variables,
                                                                                     pred)
  assert set(metrics) == {"per"} and float(metrics["per"]) > 0
  np.testing.assert_allclose(float(value), 0.01 * float(metrics["per"]), rtol=1e-6)
  assert all(np.all(g == 0) for g in FLAT(g_vars["params"]["loss_net"]).values())
  assert float(jnp.abs(g_pred).sum()) > 0  # through the VGG to the prediction
  # The reference's no-gradient variant: the same value, logged only (not in the loss).
  assert float(logged_value) == 0.0 and not np.any(np.asarray(logged_grad))
  np.testing.assert_allclose(float(logged_metrics["per"]), float(metrics["per"]), rtol=1e-6)


def _identity_predictor(dim):
  eye, zeros, ones = np.eye(dim, dtype=np.float32), np.zeros(dim, np.float32), np.ones(
      dim, np.float32)
  return {"params": {"predictor": {"linear1": {"kernel": eye}, "bn1": {"scale": ones,
                                                                       "bias": zeros},
                                   "linear2": {"kernel": eye, "bias": zeros}}},
          "batch_stats": {"predictor": {"bn1": {"mean": zeros, "var": ones}}}}


@pytest.mark.parametrize("arg, weight", [("", 1.0), ("cl=token", 0.001)])
def test_simsiam_term_is_minus_one_for_identical_embeddings(arg, weight):
  method = get_method(_config(arg))
  assert method.cl_weight == weight and method.config.loss.cl_mode == (arg[3:] or "pooled")
  latent = jnp.asarray(RNG.uniform(0.1, 1, size=(2, 3, 24)), jnp.float32)  # cls + 2 tokens
  loss, metrics, _ = JIT(lambda l1, l2: method.contrastive_loss(
      _identity_predictor(24), l1, l2, train=False))(latent, latent)
  np.testing.assert_allclose(float(loss), -1.0, atol=1e-6)
  np.testing.assert_allclose(weight * float(metrics["cl"]), -weight, atol=1e-6)


def test_simsiam_stop_gradient_branch_passes_no_gradient(method, variables):
  latent1, latent2 = (jnp.asarray(RNG.normal(size=(2, 3, 24)), jnp.float32) for _ in range(2))

  def full(l2):
    return method.contrastive_loss(variables, latent1, l2, train=False)[0]

  def predicted_branch_only(l2):  # D(p2, sg(z1)) / 2: the only path from view 2 allowed
    p2, _ = method.predict(variables, method.embedding(l2), train=False)
    return 0.5 * negative_cosine(p2, method.embedding(latent1))

  g_full, g_branch = JIT(lambda l2: (jax.grad(full)(l2), jax.grad(predicted_branch_only)(
      l2)))(latent2)
  assert float(jnp.abs(g_full).sum()) > 0
  np.testing.assert_allclose(g_full, g_branch, rtol=1e-5, atol=1e-8)
  # Pooled mode contrasts the visible patch tokens: the cls token gets no gradient.
  np.testing.assert_array_equal(g_full[:, 0], 0.0)


def test_2d_variant_runs_every_term_on_augmented_views():
  config = _config("dims=2", **{"pretext.augment": True, "model.patch_size": 8})
  assert config.data.view == "slice" and config.model.spatial_dims == 2
  method = get_method(config)
  image = RNG.uniform(size=(2, 16, 16, 4)).astype(np.float32)
  variables = _variables(method, image)
  (loss, metrics, _), (view1, view2) = JIT(lambda v: (
      method.loss(v, {"image": image}, KEY, train=True, step=0),
      method.views(KEY, image)))(variables)
  # View 2 is z-scored with one mean / variance over all channels; view 1 is augmented, z-scored
  # then noised (std <= 0.1); evaluation does not augment.
  np.testing.assert_allclose(view2, zscore(image), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.mean(view1, axis=(1, 2, 3)), 0.0, atol=0.05)
  np.testing.assert_allclose(np.std(view1, axis=(1, 2, 3)), 1.0, atol=0.05)
  assert not np.allclose(view1, view2, atol=0.1)
  np.testing.assert_allclose(method.views(KEY, image, train=False)[0], view2, rtol=1e-5,
                             atol=1e-5)
  assert set(metrics) == {"rec", "per", "edge", "lambda2", "cl", "cl_z_std"}
  assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in metrics.values())
  assert float(metrics["lambda2"]) == pytest.approx(0.01)
  with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
    method.loss(variables, {"image": IMAGE}, KEY, train=True)


def test_features_and_reconstruction_hooks(method, variables):
  @JIT
  def run(v, x):
    feats = {p: method.features(v, x, pool=p) for p in ("mean", "cls", "mean_prenorm")}
    return feats, method.pretext_example(KEY, {"image": x}), method.reconstruct(
        v, {"image": x}, KEY)

  feats, (visible, target), (visible_again, recon) = run(variables, IMAGE)
  assert all(f.shape == (2, 24) for f in feats.values())
  assert not np.allclose(feats["mean"], feats["cls"])
  np.testing.assert_allclose(np.mean(feats["mean_prenorm"], axis=-1), 0.0, atol=1e-5)
  with pytest.raises(ValueError, match="pool must be one of"):
    method.features(variables, IMAGE, pool="max")
  # Reconstruction from 25% visible (Fig. 3): 2 of the 8 patches kept, the rest zero-filled.
  np.testing.assert_allclose(target, zscore(IMAGE), atol=1e-6)
  np.testing.assert_array_equal(visible, visible_again)
  kept = np.any(np.asarray(patchify(visible, 8)) != 0, axis=-1)
  assert kept.sum(axis=1).tolist() == [2, 2]
  np.testing.assert_array_equal(np.asarray(patchify(visible, 8))[kept],
                                np.asarray(patchify(target, 8))[kept])
  assert recon.shape == IMAGE.shape and np.all(np.isfinite(recon))


def test_a_pretrained_loss_network_is_read_by_the_trainer():
  method = get_method(_config("loss_net=/weights/vgg16.pth"))
  (spec, shapes), = method.frozen_networks().values()
  assert (spec["path"], spec["converter"]) == ("/weights/vgg16.pth", "vgg16")
  with pytest.raises(ValueError, match="loaded by the trainer"):
    method.loss_net_variables()
  weights = numpy_filled(shapes)
  method.set_frozen_network("loss_net", weights)
  jax.tree.map(np.testing.assert_array_equal, method.loss_net_variables(), weights)
  assert get_method(_config()).frozen_networks() == {}  # random: seeded, nothing to read
  with pytest.raises(ValueError, match="no frozen network 'vgg'"):
    method.set_frozen_network("vgg", weights)


def test_trainer_run_trains_through_the_frozen_vgg_and_writes_a_checkpoint(tmp_path):
  """L_per alone: the autoencoder moves (its only gradient comes through the VGG), the VGG does
  not."""
  config = _config("losses=per", **{"checkpoint.async_save": False})
  workdir = str(tmp_path / "run")
  initial = {}
  result = trainer.train(config, workdir, progress=False,
                         init_variables=lambda v: initial.update(v) or v)
  assert int(result.state.step) == 2
  records = read_metrics(workdir)
  assert [r["step"] for r in records] == [1, 2]
  assert all(np.isfinite(r["loss"]) and r["per"] > 0 and r["grad_norm"] > 0 for r in records)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  assert set(result.state.opt_state) == {"default"}  # the loss network has no optimizer state
  final = jax.device_get(result.state.params)
  for net in ("encoder", "decoder"):
    before, after = FLAT(initial["params"][net]), FLAT(final[net])
    assert any(not np.array_equal(before[k], after[k]) for k in before), net
  before, after = FLAT(initial["params"]["loss_net"]), FLAT(final["loss_net"])
  assert before.keys() == after.keys()
  for k in before:
    np.testing.assert_array_equal(before[k], after[k], err_msg=k)


def test_config_file_sizes_rows_and_options():
  full = load_config("vit_ae_pp")
  assert (full.model.embed_dim, full.model.depth, full.model.num_heads) == (768, 12, 12)
  assert (full.model.decoder_embed_dim, full.model.decoder_depth) == (512, 8)
  assert (full.model.patch_size, full.model.mask_ratio, full.data.crop_size) == (
      8, 0.75, (96, 96, 96))
  assert full.data.modalities == ("flair", "t1", "t2", "t1ce") and full.data.view == "crop"
  assert (full.optim.name, full.optim.b1, full.optim.b2, full.optim.weight_decay) == (
      "adamw", 0.9, 0.95, 0.05)
  assert full.optim.lr == pytest.approx(1e-3 * full.batch_size / 256)
  assert (full.total_steps, full.optim.warmup_steps, full.optim.schedule) == (
      81500, 3260, "cosine")
  assert (full.loss.lambda1, full.loss.lambda2, full.loss.lambda2_schedule) == (
      0.01, 0.01, "linear")
  assert full.loss_net.taps == ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
  small = load_config("vit_ae_pp:size=small")
  assert (small.data.crop_size, small.model.embed_dim, small.model.decoder_embed_dim,
          small.loss_net.model.width, small.batch_size) == ((32, 32, 32), 192, 128, 0.25, 8)
  cl_only = load_config("vit_ae_pp:losses=cl")
  assert [cl_only.loss[t] for t in ("rec", "per", "edge", "cl")] == [False, False, False, True]
  assert cl_only.loss_net.source == "none" and "loss_net" not in cl_only.param_groups
  token = load_config("vit_ae_pp:cl=token,lambda2=constant,mask_ratio=0.55")
  assert (token.loss.cl_mode, token.loss.cl_weight, token.loss.lambda2_schedule,
          token.model.mask_ratio) == ("token", 0.001, "constant", 0.55)
  two_d = load_config("vit_ae_pp:dims=2")
  assert (two_d.model.spatial_dims, two_d.model.patch_size, two_d.data.view) == (2, 16, "slice")
  torch = load_config("vit_ae_pp:loss_net=/weights/vgg16.pth")
  assert (torch.loss_net.source, torch.loss_net.converter, torch.loss_net.path) == (
      "pretrained", "vgg16", "/weights/vgg16.pth")
  run = load_config("vit_ae_pp:loss_net=runs/vgg")
  assert (run.loss_net.source, run.loss_net.converter) == ("pretrained", "")
  assert load_config("vit_ae_pp:losses=rec+edge+per").loss.cl is False


@pytest.mark.parametrize("arg, match", [
    ("losses=rec+foo", "losses must be"), ("losses=", "losses must be"),
    ("losses=rec+rec", "losses must be"), ("dims=4", "dims must be one of"),
    ("lambda2=linear", "lambda2 must be one of"), ("cl=mean", "cl must be one of"),
    ("mask_ratio=1.0", "mask_ratio must be in"), ("mask_ratio=high", "mask_ratio must be a"),
    ("size=tiny", "size must be"), ("depth=2", "key=value with key in"),
    ("losses=rec,loss_net=vgg16.pth", "needs the perceptual term"),
])
def test_bad_config_args(arg, match):
  with pytest.raises(ValueError, match=match):
    load_config(f"vit_ae_pp:{arg}")


@pytest.mark.parametrize("arg, overrides, match", [
    ("", {"loss_net.source": "none"}, "loss.per=True needs a loss network"),
    ("losses=rec", {"loss_net.source": "random"}, "loss.per=False needs no loss network"),
    ("losses=rec", {"loss.rec": False}, "every loss term is off"),
    ("", {"data.view": "slice"}, "data.view in"),
    ("dims=2", {"data.view": "crop"}, "data.view in"),
    ("", {"loss.lambda2": -1.0}, "loss.lambda2 must be"),
    ("", {"loss.lambda2_schedule": "cosine"}, "lambda2_schedule"),
    ("", {"loss.cl_mode": "cls"}, "cl_mode"),
    ("", {"loss.num_slices": -1}, "num_slices"),
    ("", {"model.name": "vit"}, "model.name must be 'mae'"),
    ("", {"loss_net.source": "pretrained"}, "needs loss_net.path"),
    ("", {"features.pool": "max"}, "features.pool"),
    ("", {"pretext.scale": (1.1, 0.9)}, "pretext needs"),
])
def test_bad_method_config(arg, overrides, match):
  with pytest.raises(ValueError, match=match):
    get_method(_config(arg, **overrides))


def test_edge_term_blurs_its_target_when_asked():
  """``loss.edge_blur_sigma`` (the reference code's form) compares the prediction's edges with
  those of the Gaussian-blurred target; 0 (the paper's) with the target's own."""
  target = zscore(IMAGE)
  pred = jnp.asarray(RNG.normal(size=(2, 8, 8**3 * 4)), jnp.float32)
  _, _, mask = random_masking(KEY, 2, 8, 0.75)
  full = unpatchify(pred, 8, target.shape[1:-1])
  for sigma in (0.0, 1.5):
    method = get_method(_config("losses=edge", **{"loss.edge_blur_sigma": sigma}))
    _, metrics = method.reconstruction_terms({}, pred, target, mask, step=0, key=KEY)
    blurred = gaussian_smooth(target, sigma, axes=(1, 2, 3)) if sigma else target
    np.testing.assert_allclose(float(metrics["edge"]), float(edge_loss(full, blurred)),
                               rtol=1e-5)

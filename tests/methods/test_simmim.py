"""SimMIM on Swin-UNETR (DAE's "MAE" baseline): the cube masks (ratio, token mask), the L1 on
masked voxels only (no gradient on the others), no target leak through the skip path, a
trainer run (twice: deterministic) training the mask token, the transfer for fine-tuning, and
the config file."""

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import config_for
from swin_pretraining import SWIN_TINY, SwinStandIn, segmentation_from, train_twice

from jaxmed.config import load_config
from jaxmed.methods import METHODS, SimMIMMethod, get_method
from jaxmed.train import init as init_lib
from jaxmed.train import trainer
from jaxmed.train.logging import read_metrics

# The shared tiny run with 8^3-voxel mask cubes: 64 per 32^3 crop, ceil(0.6 x 64) = 39 masked,
# each covering 4^3 tokens of patch 2.
TINY = {**SWIN_TINY, "pretext.mask_patch": 8}
IMAGE = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.0, (4, 32, 32, 32, 1)), jnp.float32)
KEY = jax.random.PRNGKey(5)
MASKED = 39
FLAT = lambda tree: flax.traverse_util.flatten_dict(jax.device_get(tree), sep="/")
# The fast (unoptimised) CPU compile of the trainer's initialisation, for this file's one
# network forward.
JIT = lambda f: jax.jit(f, compiler_options=trainer.init_compiler_options())


def _config(**overrides):
  return config_for("simmim", {**TINY, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Two trainer runs of 2 steps from the same seed (`train_twice`)."""
  return train_twice(_config(), tmp_path_factory, "simmim")


def test_masks_cover_the_ratio_of_cubes_at_voxel_and_token_resolution():
  method = get_method(_config())
  voxels, tokens = jax.device_get(method.masks(KEY, IMAGE.shape))
  assert voxels.shape == (4, 32, 32, 32) and tokens.shape == (4, 16, 16, 16)
  assert tokens.dtype == bool
  cubes = voxels[:, ::8, ::8, ::8]
  assert cubes.sum(axis=(1, 2, 3)).tolist() == [MASKED] * 4  # SimMIM's ceil(0.6 T)
  # Constant on every 8^3 cube; the token mask is the voxel mask at patch resolution.
  np.testing.assert_array_equal(
      voxels, np.repeat(np.repeat(np.repeat(cubes, 8, 1), 8, 2), 8, 3))
  np.testing.assert_array_equal(tokens, voxels[:, ::2, ::2, ::2] > 0)
  assert len({c.tobytes() for c in cubes}) == 4  # one mask per sample
  again, _ = method.masks(KEY, IMAGE.shape)
  np.testing.assert_array_equal(voxels, again)


def test_network_input_is_the_masked_image_and_the_loss_counts_masked_voxels_only():
  method = get_method(_config())
  voxels, _ = method.masks(jax.random.split(KEY)[0], IMAGE.shape)
  m = np.asarray(voxels)[..., None]
  # An identity network reconstructs what it is fed, x (1 - m): zero on the masked voxels, so
  # its loss is the mean |x| there, and nothing of the masked voxels reaches the network.
  method.model = SwinStandIn(mode="identity")
  loss, metrics, _ = method.loss({}, {"image": IMAGE}, KEY, train=True)
  np.testing.assert_allclose(float(loss), np.sum(np.abs(IMAGE) * m) / m.sum(), rtol=1e-5)
  assert set(metrics) == {"l1_masked", "masked_fraction"}
  np.testing.assert_allclose(float(metrics["masked_fraction"]), MASKED / 64)
  x, target = method.pretext_example(KEY, {"image": IMAGE})
  np.testing.assert_array_equal(x, IMAGE * (1 - m))
  np.testing.assert_array_equal(target, IMAGE)
  # The gradient w.r.t. the prediction: sign(pred - x) / (number of masked voxels) on the masked
  # voxels, exactly zero on the others.
  method.model = SwinStandIn(mode="param")
  variables = method.model.init(KEY, IMAGE)
  grad = jax.grad(lambda v: method.loss(v, {"image": IMAGE}, KEY, train=True)[0])(variables)
  grad = np.asarray(grad["params"]["pred"])
  assert np.all(grad[m == 0] == 0)
  np.testing.assert_allclose(grad[m == 1], -1.0 / m.sum(), rtol=1e-6)  # pred 0 < x


def test_no_target_leak_the_prediction_ignores_the_masked_voxels(trained):
  """The real network, encoder1's full-resolution skip included: changing the image on masked
  voxels leaves the reconstruction unchanged; changing one visible voxel does not."""
  result = trained[0][1]
  method, variables = result.method, jax.device_get(result.state.variables)  # one device
  voxels, _ = method.masks(jax.random.split(KEY)[0], IMAGE.shape)
  m = np.asarray(voxels)[..., None]
  noise = np.random.default_rng(1).normal(size=IMAGE.shape).astype(np.float32)
  run = JIT(lambda v, x: method.reconstruct(v, {"image": x}, KEY))
  x, pred = run(variables, IMAGE)
  x_other, pred_other = run(variables, IMAGE + 5.0 * noise * m)
  np.testing.assert_array_equal(x, x_other)
  np.testing.assert_array_equal(pred, pred_other)
  visible = np.argwhere(m[0, ..., 0] == 0)[0]
  changed = np.asarray(IMAGE).copy()
  changed[(0, *visible, 0)] += 1.0
  assert not np.allclose(run(variables, changed)[1][0], pred[0])
  assert pred.shape == IMAGE.shape and np.all(np.isfinite(pred))


def test_trainer_runs_are_deterministic_and_train_the_mask_token(trained):
  (initial, first, workdir), (_, second, _) = trained
  assert int(first.state.step) == 2
  records = read_metrics(workdir)
  assert [r["step"] for r in records] == [1, 2]
  for r in records:
    assert np.isfinite(r["loss"]) and r["loss"] == r["l1_masked"] > 0 and r["grad_norm"] > 0
    np.testing.assert_allclose(r["masked_fraction"], MASKED / 64)
  before, after = FLAT(initial["params"]), FLAT(first.state.params)
  assert after["swinViT/mask_token"].shape == (12,)
  for module in ("swinViT/mask_token", "swinViT/patch_embed", "encoder1", "decoder1", "out"):
    assert any(not np.array_equal(before[k], after[k]) for k in before
               if k.startswith(module)), module
  again = FLAT(second.state.params)
  for k in after:
    np.testing.assert_array_equal(after[k], again[k], err_msg=k)


@pytest.mark.parametrize("part", ["both", "encoder", "decoder"])
def test_pretrained_network_transfers_without_its_mask_token(trained, part):
  """In memory (`swin_unetr_variables`, the mask token left out) or from the run's workdir
  (``config.init.path``; the mask token dropped by ``init.drop`` unless the encoder starts
  fresh): every part into a 4-modality segmentation Swin-UNETR with tiled input kernels."""
  result, workdir = trained[0][1], trained[0][2]
  pretrained = result.method.swin_unetr_variables(result.state.variables)
  assert "mask_token" not in pretrained["params"]["swinViT"]
  assert "mask_token" in result.state.variables["params"]["swinViT"]
  config, fresh = segmentation_from(result, part)
  in_memory = init_lib.initializer(config.init, pretrained=pretrained)(fresh)
  config.init.path = workdir
  if part != "decoder":
    with pytest.raises(ValueError, match="params/swinViT/mask_token"):
      init_lib.initializer(config.init)(fresh)
    config.init.drop = ("params/swinViT/mask_token",)
  from_run = init_lib.initializer(config.init)(fresh)
  got, pre = FLAT(in_memory["params"]), FLAT(pretrained["params"])
  assert FLAT(from_run["params"]).keys() == got.keys()
  for k, v in FLAT(from_run["params"]).items():
    np.testing.assert_array_equal(v, got[k], err_msg=k)
  kernel = {"both": "swinViT/patch_embed/proj/kernel", "encoder": "swinViT/patch_embed/proj/kernel",
            "decoder": "encoder1/layer/conv3/kernel"}[part]  # tiled x 1/4 over the modalities
  np.testing.assert_allclose(got[kernel], np.repeat(pre[kernel], 4, axis=-2) / 4, rtol=1e-6)


def test_config_file_sizes():
  full = load_config("simmim")
  assert METHODS["simmim"] is SimMIMMethod and isinstance(get_method(full), SimMIMMethod)
  assert (full.pretext.mask_patch, full.pretext.mask_ratio) == (16, 0.6)
  assert (full.model.feature_size, full.data.crop_size, full.data.per_modality) == (
      48, (96, 96, 96), True)
  assert "use_mask_token" not in full.model  # set by the method
  assert get_method(full).model.use_mask_token
  assert (full.optim.lr, full.optim.weight_decay, full.total_steps) == (4e-4, 1e-5, 20_000)
  small = load_config("simmim:size=small")
  assert (small.pretext.mask_patch, small.model.feature_size, small.model.window_size,
          small.data.crop_size, small.batch_size) == (8, 12, 4, (32, 32, 32), 8)
  with pytest.raises(ValueError, match="key=value with key in"):
    load_config("simmim:mask_ratio=0.5")


@pytest.mark.parametrize("overrides, match", [
    ({"pretext.mask_patch": 5}, "multiple of model.patch_size"),
    ({"pretext.mask_patch": 0}, "mask_patch must be an int"),
    ({"pretext.mask_patch": 64}, "divisible by pretext.mask_patch=64"),
    ({"pretext.mask_ratio": 1.0}, r"mask_ratio must be in \(0, 1\)"),
    ({"pretext.mask_ratio": 0.0}, r"mask_ratio must be in \(0, 1\)"),
    ({"data.per_modality": False}, "per_modality"),
])
def test_bad_method_config(overrides, match):
  with pytest.raises(ValueError, match=match):
    get_method(_config(**overrides))

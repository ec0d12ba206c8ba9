"""SSFD context prediction: loss, z-scoring, masked input, encoder hand-off, config, training."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed import metrics
from helpers import REPO, config_for

from jaxmed.losses import l2_loss
from jaxmed.methods.context_prediction import (ContextPredictionMethod, encoder_params,
                                               standardize)
from jaxmed.models import SSFDEncoder, SSFDUNet
from jaxmed.train import trainer
from jaxmed.config import base_config
from jaxmed.train.logging import read_metrics

# Dropout 0 so that the training loss equals the eval-mode loss (one compiled loss for both).
TINY = {"model.chans": 4, "model.num_groups": 2, "model.num_pool_layers": 2,
        "model.dropout": 0.0, "pretext.patch": 8, "pretext.coverage": 0.25,
        "data.modalities": ("t2", "flair")}


def _config(**overrides):
  return config_for("context_prediction", {**TINY, **overrides})


def _images(n=4, channels=2, seed=0):
  """Images with very different offsets and scales per image and channel."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 32, 32, channels)).astype(np.float32)
  x += np.linspace(0, 1, 32, dtype=np.float32)[None, :, None, None]  # some structure
  scale = rng.uniform(0.1, 50.0, size=(n, 1, 1, channels)).astype(np.float32)
  shift = rng.uniform(-100, 100, size=(n, 1, 1, channels)).astype(np.float32)
  return x * scale + shift


@pytest.fixture(scope="module")
def setup():
  method = ContextPredictionMethod(_config())
  batch = {"image": jnp.asarray(_images())}
  variables = trainer.jit_init(method.init)(jax.random.key(0), batch)

  @jax.jit
  def value_and_grad(params, image, key):
    def loss_fn(p):
      loss, m, _ = method.loss({"params": p}, {"image": image}, key, train=True)
      return loss, m
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  return method, batch, variables, value_and_grad


def test_model_is_the_configured_ssfd_unet(setup):
  method, _, variables, _ = setup
  assert method.name == "context_prediction"
  m = ContextPredictionMethod(_config(**{"model.dropout": 0.1, "model.dtype": "bfloat16"})).model
  assert isinstance(m, SSFDUNet)
  assert (m.out_channels, m.chans, m.num_pool_layers, m.num_groups, m.dropout, m.dtype) == (
      2, 4, 2, 2, 0.1, jnp.bfloat16)
  assert set(variables) == {"params"}
  assert set(variables["params"]) == {"encoder", "decoder1", "decoder2", "output_conv"}


def test_loss_is_finite_with_a_gradient(setup):
  _, batch, variables, value_and_grad = setup
  (loss, m), grads = value_and_grad(variables["params"], batch["image"], jax.random.key(1))
  assert np.isfinite(loss) and loss > 0
  assert set(m) == {"l2", "masked_l2", "masked_fraction"}
  assert m["l2"] == loss and np.isfinite(m["masked_l2"])
  # round(0.25 * 32 * 32 / 8**2) = 4 patches of 64 pixels in every image: exactly 25%.
  assert m["masked_fraction"] == 0.25
  norms = np.array([float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)])
  assert np.isfinite(norms).all() and (norms > 0).all()
  # Another key places other patches.
  (loss2, _), _ = value_and_grad(variables["params"], batch["image"], jax.random.key(2))
  assert loss2 != loss


def test_standardize_is_a_per_image_per_channel_z_score():
  x = _images(n=3, channels=2)
  z = np.asarray(standardize(jnp.asarray(x)))
  mean = x.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
  std = x.std(axis=(1, 2), ddof=1, keepdims=True, dtype=np.float64)
  np.testing.assert_allclose(z, (x - mean) / std, atol=1e-4)
  np.testing.assert_allclose(z.mean(axis=(1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(z.std(axis=(1, 2), ddof=1), 1.0, atol=1e-5)
  # A constant channel becomes zeros, not NaN.
  const = np.asarray(standardize(jnp.full((1, 4, 4, 1), 7.0)))
  np.testing.assert_array_equal(const, 0.0)
  with pytest.raises(ValueError, match=r"images must be \(N, H, W, C\); got shape \(4, 4\)"):
    standardize(jnp.zeros((4, 4)))


def test_model_input_is_the_z_scored_image_zero_filled_in_the_patches(setup):
  method, batch, variables, value_and_grad = setup
  key = jax.random.key(3)
  mask_key, _ = jax.random.split(key)
  corrupted, mask = jax.jit(method.corrupt)(mask_key, batch["image"])
  corrupted, mask = np.asarray(corrupted), np.asarray(mask)
  z = np.asarray(standardize(batch["image"]))
  assert mask.shape == (4, 32, 32) and (mask.sum((1, 2)) == 4 * 64).all()
  assert (corrupted[mask] == 0).all()
  np.testing.assert_array_equal(corrupted[~mask], z[~mask])
  # reconstruct shows exactly this input; the loss (no dropout here) is the L2 between its
  # prediction and the whole z-scored image, masked_l2 the same inside the patches.
  shown, pred = jax.jit(method.reconstruct)(variables, batch, mask_key)
  np.testing.assert_array_equal(shown, corrupted)
  assert pred.shape == z.shape and pred.dtype == jnp.float32
  (loss, m), _ = value_and_grad(variables["params"], batch["image"], key)
  np.testing.assert_allclose(loss, l2_loss(pred, z), rtol=1e-5)
  np.testing.assert_allclose(m["masked_l2"], l2_loss(pred, z, mask[..., None]), rtol=1e-5)


def test_loss_is_invariant_to_per_image_channel_affine_intensity(setup):
  _, batch, variables, value_and_grad = setup
  key = jax.random.key(4)
  rng = np.random.default_rng(1)
  scale = rng.uniform(0.01, 100.0, size=(4, 1, 1, 2)).astype(np.float32)
  shift = rng.uniform(-1e3, 1e3, size=(4, 1, 1, 2)).astype(np.float32)
  (l1, _), _ = value_and_grad(variables["params"], batch["image"], key)
  (l2, _), _ = value_and_grad(variables["params"], batch["image"] * scale + shift, key)
  np.testing.assert_allclose(l1, l2, rtol=2e-3)


def test_encoder_params_feed_ssfd_encoder_and_the_metric(setup):
  _, batch, variables, _ = setup
  params = encoder_params(variables)
  assert params is variables["params"]["encoder"]
  with pytest.raises(ValueError, match="variables must be SSFDUNet variables"):
    encoder_params({"encoder": params})
  # A one-modality model (the SSFD setting).
  method = ContextPredictionMethod(_config(**{"data.modalities": ("t2",)}))
  v1 = trainer.jit_init(method.init)(jax.random.key(5), {"image": batch["image"][..., :1]})
  a = batch["image"][..., 0]
  b = a + 5.0 * jnp.sin(jnp.arange(32.0))
  z = standardize(jnp.concatenate([a, b])[..., None])
  # SSFDEncoder with encoder_params computes exactly the UNet's encoder features.
  encoder = SSFDEncoder(chans=4, num_pool_layers=2, num_groups=2)
  out, feats = jax.jit(lambda p, x: encoder.apply({"params": p}, x, return_features=True))(
      encoder_params(v1), z)
  _, ref = jax.jit(lambda v, x: method.model.apply(v, x, return_features=True))(v1, z)
  np.testing.assert_allclose(out, ref["block3"], atol=1e-6)
  for name in ("block1_relu2", "block2_relu2", "block3_relu2"):
    np.testing.assert_allclose(feats[name], ref[name], atol=1e-6)
  # jaxmed.metrics.ssfd takes them: the tap's mean squared difference of the z-scored inputs,
  # zero for identical images.
  score, _ = metrics.ssfd(a, b, encoder_params=encoder_params(v1), layers="block3_relu2",
                          num_groups=2)
  tap = feats["block3_relu2"]
  np.testing.assert_allclose(score, jnp.mean(jnp.square(tap[:4] - tap[4:]), axis=(1, 2, 3)),
                             rtol=1e-4)
  assert (np.asarray(score) > 0).all()
  same, _ = metrics.ssfd(a, a, encoder_params=encoder_params(v1), layers="block3_relu2",
                         num_groups=2)
  np.testing.assert_allclose(same, 0.0, atol=1e-10)


def _config_module():
  spec = importlib.util.spec_from_file_location(
      "context_prediction_config", os.path.join(REPO, "jaxmed/configs/context_prediction.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_config_file():
  module = _config_module()
  c = module.get_config("")
  assert c.method == "context_prediction" and tuple(c.data.modalities) == ("t2",)
  assert (c.model.chans, c.model.num_pool_layers, c.model.num_groups, c.model.dropout) == (
      20, 4, 10, 0.1)
  assert (c.optim.name, c.optim.schedule, c.optim.lr, c.optim.weight_decay) == (
      "adam", "constant", 1e-3, 0.0)
  assert c.optim.grad_clip == base_config().optim.grad_clip
  assert (c.pretext.patch, c.pretext.coverage) == (16, 0.25)
  for size in ("", "size=small"):
    c = module.get_config(size)
    h, w = c.data.shape[1:]
    factor = 2**c.model.num_pool_layers
    assert min(h, w) >= 64 and h % factor == 0 and w % factor == 0
    assert c.model.chans % c.model.num_groups == 0
  assert tuple(module.get_config("").data.shape) == (32, 128, 128)
  for bad in ("sise=small", "size=large"):
    with pytest.raises(ValueError, match="key in \\['size'\\]|size must be 'small' or absent"):
      module.get_config(bad)


def test_trains_with_the_generic_trainer(tmp_path):
  config = _config(**{"data.modalities": ("t2",), "total_steps": 3, "batch_size": 4,
                      "log_every": 1, "tensorboard": False, "checkpoint.every": 0,
                      "optim.name": "adam", "optim.lr": 1e-3, "optim.schedule": "constant",
                      "optim.weight_decay": 0.0, "method": "context_prediction"})
  arrays = {"image": _images(n=8, channels=1, seed=2)}
  result = trainer.train(config, str(tmp_path), method=ContextPredictionMethod(config),
                         train_data=arrays, progress=False)
  rows = read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) and r["masked_fraction"] == 0.25 for r in rows)
  assert int(result.state.step) == 3

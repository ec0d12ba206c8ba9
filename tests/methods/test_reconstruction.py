"""ReconstructionMethod: undersampled-MRI reconstruction with a UNet (ssfd_feature_distance
Sec. 2.1) and its config."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, config_for

from jaxmed.config import apply_overrides
from jaxmed.data import mri
from jaxmed.methods.reconstruction import ReconstructionMethod, zero_filled_channels
from jaxmed.train import trainer
from jaxmed.train.logging import read_metrics


def _config(modalities=("t2",), **mri_fields):
  return config_for("reconstruction", {"model.features": (4, 8), "data.modalities": modalities,
                                       **{f"mri.{k}": v for k, v in mri_fields.items()}})


def _image(n=4, channels=1):
  """Non-negative (magnitude) 16x16 images."""
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.uniform(size=(n, 16, 16, channels)).astype(np.float32))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Two Adam steps of a tiny UNet (features (4, 8), one channel, 16x16) through the generic
  trainer on 4 devices: ``(method, TrainResult, workdir)``."""
  config = apply_overrides(_config(), {"total_steps": 2, "batch_size": 4, "log_every": 1,
                                       "tensorboard": False, "checkpoint.every": 0,
                                       "optim.name": "adam", "optim.lr": 1e-3,
                                       "optim.schedule": "constant"})
  workdir = str(tmp_path_factory.mktemp("recon"))
  method = ReconstructionMethod(config)
  result = trainer.train(config, workdir, method=method,
                         train_data={"image": np.asarray(_image(n=8))}, progress=False)
  return method, result, workdir


def test_loss_is_finite_with_a_gradient_in_the_trainer(trained):
  """The trainer's jitted step differentiates `ReconstructionMethod.loss` (4x random masks)."""
  method, result, workdir = trained
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert {"l1", "psnr", "psnr_zero_filled", "acceleration", "sampled_fraction"} <= set(r)
    assert np.isfinite(r["loss"]) and r["loss"] > 0 and r["l1"] == r["loss"]
    assert np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
    assert r["acceleration"] == 4.0 and r["nonfinite_total"] == 0
    # 16 columns, cf 0.08: 1 centre column, the others with prob (4 - 1) / 15.
    assert 0.0 < r["sampled_fraction"] < 1.0
    assert np.isfinite(r["psnr"]) and np.isfinite(r["psnr_zero_filled"])
  assert int(result.state.step) == 2
  params = jax.tree.leaves(result.state.params)
  assert params and all(np.isfinite(np.asarray(p)).all() for p in params)


def test_reconstruct_is_eval_mode_on_the_zero_filled_input(trained):
  method, result, _ = trained
  variables = jax.device_get(result.state.variables)
  image, key = _image(), jax.random.key(4)
  zf, pred = jax.jit(method.reconstruct)(variables, {"image": image}, key)
  np.testing.assert_allclose(zf, method.undersample(key, image)[0], atol=1e-6)
  assert pred.shape == image.shape and pred.dtype == jnp.float32
  forward = jax.jit(lambda v, x: method.model.apply(v, x, train=False))
  np.testing.assert_allclose(pred, forward(variables, zf), atol=1e-6)


@pytest.mark.parametrize("kind", mri.MASK_KINDS)
def test_zero_filled_input_differs_at_4x_and_equals_at_1x(kind):
  image = _image(channels=2)
  key = jax.random.key(2)
  two = ("t1", "t2")
  zf4, masks, acc = ReconstructionMethod(_config(two, mask=kind)).undersample(key, image)
  assert zf4.shape == image.shape and zf4.dtype == jnp.float32
  np.testing.assert_array_equal(acc, np.full(4, 4.0, np.float32))
  assert float(jnp.mean(jnp.abs(zf4 - image))) > 0.05
  # Each channel is undersampled with its example's mask.
  for c in range(2):
    np.testing.assert_allclose(zf4[..., c], mri.zero_filled(image[..., c], masks), atol=1e-6)

  method1 = ReconstructionMethod(_config(two, mask=kind, accelerations=(1,),
                                         center_fractions=(0.08,)))
  zf1, masks1, _ = method1.undersample(key, image)
  assert bool(jnp.all(masks1))
  np.testing.assert_allclose(zf1, image, atol=1e-5)


def test_zero_filled_channels_layout():
  """Channels-last in, channels-last out; one mask per example shared by its channels."""
  image = _image(n=2, channels=3)
  masks = mri.random_mask(jax.random.key(3), 2, 16, acceleration=4, center_fraction=0.125)
  out = zero_filled_channels(image, masks)
  assert out.shape == image.shape
  for c in range(3):
    np.testing.assert_allclose(out[..., c], mri.zero_filled(image[..., c], masks), atol=1e-6)
  # Example 1's mask applied to example 0 gives something else: masks are per example.
  swapped = mri.zero_filled(image[..., 0], masks[::-1])
  assert not np.allclose(out[..., 0], swapped, atol=1e-3)


def test_config_and_sweep():
  spec = importlib.util.spec_from_file_location("recon_config",
                                                os.path.join(REPO, "jaxmed/configs/reconstruction.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("")
  assert c.method == "reconstruction" and tuple(c.data.modalities) == ("t2",)
  assert tuple(c.model.features) == (32, 64, 128, 256)
  assert (c.optim.name, c.optim.lr, c.optim.schedule, c.optim.weight_decay) == (
      "adam", 1e-3, "constant", 0.0)
  assert tuple(c.mri.accelerations) == (4,) and tuple(c.mri.center_fractions) == (0.08,)
  assert tuple(module.get_config("size=small").model.features) == (16, 32, 64, 128)
  sweep = module.get_sweep("")
  assert [tuple(s["mri.accelerations"]) for s in sweep] == [(2,), (4,), (6,), (8,)]
  for overrides in sweep:
    method = ReconstructionMethod(apply_overrides(c, overrides))
    assert method.center_fractions[0] * method.accelerations[0] == pytest.approx(0.32, abs=1e-3)
  with pytest.raises(ValueError, match="key in"):
    module.get_config("sise=small")
  with pytest.raises(ValueError, match="size must be 'small'"):
    module.get_config("size=large")


def test_config_errors():
  with pytest.raises(ValueError, match=r"config.mri.*kind must be one of"):
    ReconstructionMethod(_config(mask="spiral"))
  with pytest.raises(ValueError, match=r"config.mri.*equal length"):
    ReconstructionMethod(_config(accelerations=(4, 8)))
  with pytest.raises(ValueError, match="acceleration must be >= 1"):
    ReconstructionMethod(_config(accelerations=(0.5,)))
  method = ReconstructionMethod(_config())
  with pytest.raises(ValueError, match=r"image must be \(N, H, W, C=1\)"):
    method.undersample(jax.random.key(0), jnp.zeros((2, 16, 16)))
  with pytest.raises(ValueError, match=r"C=1.*got shape \(2, 16, 16, 2\)"):
    method.undersample(jax.random.key(0), jnp.zeros((2, 16, 16, 2)))

import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, config_for, numpy_filled

from jaxmed.config import load_sweep
from jaxmed.methods import METHODS, RestorationMethod, get_method
from jaxmed.methods.restoration import CORRUPTIONS
from jaxmed.pretext import grid_inpaint


def _config(**pretext):
  return config_for("restoration", {"model.features": (4, 8),
                                    **{f"pretext.{k}": v for k, v in pretext.items()}})


IMAGE = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 16, 16, 4)).astype(np.float32))


@pytest.fixture(scope="module")
def variables():
  """Random UNet variables of the right shapes, the same for every corruption (numpy-filled:
  compiling the Flax initialisers would cost more than the tests below)."""
  shapes = jax.eval_shape(RestorationMethod(_config()).init, jax.random.PRNGKey(0),
                          {"image": IMAGE})
  return numpy_filled(shapes, seed=1, scale=0.3)


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_loss_is_finite_differentiable_and_eq4_under_jit(corruption, variables):
  # The cell corruptions restore their corrupted cells only ("masked"), the others everything.
  has_cells = CORRUPTIONS[corruption][1] is not None
  config = _config(corruption=corruption, grid=4, keep_prob=0.5,
                   loss_region="masked" if has_cells else "all")
  method = get_method(config)
  assert isinstance(method, RestorationMethod)
  batch = {"image": IMAGE}
  key = jax.random.PRNGKey(2)
  corrupt_key, _ = jax.random.split(key)

  def loss_fn(params):
    loss, metrics, _ = method.loss({**variables, "params": params}, batch, key, train=True)
    return loss, (metrics, method.corrupt(corrupt_key, IMAGE),
                  method.reconstruct({**variables, "params": params}, batch, corrupt_key))

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, (metrics, (corrupted, mask), (shown, pred))), grads = grad_fn(variables["params"])
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert np.isfinite(loss) and all(np.isfinite(norms)) and sum(norms) > 0
  assert set(metrics) == {"l1", CORRUPTIONS[corruption][1]} - {None}
  np.testing.assert_array_equal(shown, corrupted)
  assert not np.allclose(corrupted, IMAGE)
  # Eq. 4: L1 + L2 to the original image, over the corrupted cells for "masked".
  region = np.broadcast_to(np.asarray(mask)[..., None] if has_cells else True, IMAGE.shape)
  err = (np.asarray(pred) - np.asarray(IMAGE))[region]
  np.testing.assert_allclose(metrics["l1"], np.abs(err).mean(), rtol=1e-5)
  np.testing.assert_allclose(loss, np.abs(err).mean() + np.square(err).mean(), rtol=1e-5)
  if corruption == "inpaint":  # the in-painting method's mask and metric
    expected, keep = grid_inpaint(corrupt_key, IMAGE, grid=4, keep_prob=0.5)
    np.testing.assert_array_equal(corrupted, expected)
    np.testing.assert_array_equal(mask, ~keep)
    np.testing.assert_allclose(metrics["masked_fraction"], 1.0 - np.mean(keep), rtol=1e-6)
  elif has_cells:
    np.testing.assert_allclose(metrics["shuffled_fraction"], np.mean(mask), rtol=1e-6)


def test_bad_config_is_an_error_at_construction():
  assert "inpainting" not in METHODS and METHODS["restoration"] is RestorationMethod
  with pytest.raises(ValueError, match=r"pretext.corruption must be one of \['inpaint', "
                                       r"'intensity', 'local_shuffle', 'super_resolution'\]"):
    RestorationMethod(_config(corruption="blur"))
  with pytest.raises(ValueError, match="pretext.loss_region='masked' needs"):
    RestorationMethod(_config(corruption="intensity", loss_region="masked"))
  with pytest.raises(ValueError, match="pretext.loss_region must be one of"):
    RestorationMethod(_config(loss_region="some"))
  with pytest.raises(ValueError, match="prob must be in"):
    RestorationMethod(_config(corruption="local_shuffle", shuffle_prob=2.0))
  with pytest.raises(ValueError, match="grid must be"):
    RestorationMethod(_config(corruption="super_resolution", grid=0))


def test_config_file_and_sweeps():
  path = os.path.join(REPO, "jaxmed", "configs", "restoration.py")
  module = runpy.run_path(path)
  c = module["get_config"]("corruption=local_shuffle,size=small")
  assert (c.method, c.pretext.corruption, c.total_steps) == ("restoration", "local_shuffle", 200)
  assert (c.optim.name, c.optim.momentum, c.optim.lr, c.optim.schedule,
          c.optim.weight_decay) == ("sgd", 0.99, 1e-2, "poly", 3e-5)
  assert module["get_config"]("").pretext.corruption == "inpaint"
  sizes = {name: len(load_sweep(f"{path}:corruption={name}")) for name in CORRUPTIONS}
  assert sizes == {"inpaint": 18, "local_shuffle": 6, "super_resolution": 6, "intensity": 1}
  grids = {run["pretext.grid"] for run in load_sweep(f"{path}:corruption=super_resolution")}
  assert grids == {2, 4, 8, 16, 32, 64}
  with pytest.raises(ValueError, match="pretext.corruption must be one of"):
    module["get_config"]("corruption=blur")
  with pytest.raises(ValueError, match="key=value"):
    module["get_config"]("corruptoin=intensity")

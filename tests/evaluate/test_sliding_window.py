"""Sliding-window inference: parity with MONAI's ``sliding_window_inference``, meshes, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference as monai_sliding_window_inference
from monai.inferers.utils import _get_scan_interval

from jaxmed.evaluate import sliding_window
from jaxmed.evaluate.sliding_window import sliding_window_inference
from jaxmed.train import sharding


class ToyPredict:
  """A fixed random 1x1 conv whose output is scaled by ``1 + ramp``, ``ramp`` rising along
  every window axis at its own rate: not translation invariant, so a window placed
  differently (or weighted differently) changes the blended output."""

  def __init__(self, roi, c_in, c_out, seed=0):
    rng = np.random.default_rng(seed)
    self.kernel = rng.normal(size=(c_in, c_out)).astype(np.float32)
    self.bias = rng.normal(size=(c_out,)).astype(np.float32)
    grids = np.meshgrid(*[np.linspace(0.0, 1.0, r) for r in roi], indexing="ij")
    self.ramp = sum((axis + 1) * g for axis, g in enumerate(grids)).astype(np.float32)
    self.shapes = []

  def jax(self, x):
    """Channels last: ``(B, *roi, C_in) -> (B, *roi, C_out)``."""
    self.shapes.append(tuple(x.shape))
    y = jnp.tanh(jnp.einsum("n...c,co->n...o", x, self.kernel) + self.bias)
    return y * (1.0 + jnp.asarray(self.ramp)[..., None])

  def torch(self, x):
    """Channels first, for MONAI: ``(B, C_in, *roi) -> (B, C_out, *roi)``."""
    ndim = x.ndim - 2
    y = torch.einsum("nc...,co->no...", x, torch.from_numpy(self.kernel))
    y = torch.tanh(y + torch.from_numpy(self.bias).reshape(-1, *(1,) * ndim))
    return y * (1.0 + torch.from_numpy(self.ramp))


def _monai(toy, volume, roi, batch_size, **kwargs):
  """MONAI's result on the channels-last ``volume``, channels last."""
  inputs = torch.from_numpy(np.moveaxis(volume, -1, 1).copy())
  with torch.no_grad():
    out = monai_sliding_window_inference(inputs, roi, batch_size, toy.torch, **kwargs)
  return np.moveaxis(np.asarray(out), 1, -1)


def _volume(shape, seed=1):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# (volume shape, roi_size, overlap, mode, batch_size, extra kwargs); the batch size mostly
# does not divide the number of windows over the N = 2 volumes (18, 24, 10, 12, 2, 8, 6, 36,
# 70, 12, 12), so batches cross volumes and the last one is filled up with repeats.
CASES = {
    "2d-constant-overlap0": ((2, 13, 10, 2), (5, 4), 0.0, "constant", 4, {}),
    "2d-gaussian-overlap0.25": ((2, 13, 10, 2), (5, 4), 0.25, "gaussian", 5, {}),
    "2d-gaussian-overlap0.5-roi-is-W": ((2, 11, 7, 1), (4, 7), 0.5, "gaussian", 4, {}),
    "2d-constant-overlap0.6-pad-H": ((2, 3, 9, 2), (6, 4), 0.6, "constant", 5, {}),
    "2d-gaussian-pad-both-cval": ((2, 3, 2, 1), (6, 5), 0.25, "gaussian", 2,
                                  {"cval": 1.5, "sigma_scale": 0.3}),
    "2d-gaussian-pad-reflect": ((2, 3, 9, 1), (5, 4), 0.5, "gaussian", 3,
                                {"padding_mode": "reflect"}),
    "2d-constant-pad-circular": ((2, 3, 9, 1), (5, 4), 0.25, "constant", 4,
                                 {"padding_mode": "circular"}),
    "3d-gaussian-overlap0.25": ((2, 9, 7, 6, 2), (4, 5, 3), 0.25, "gaussian", 7, {}),
    "3d-constant-overlap0.5-roi-is-W": ((2, 9, 7, 6, 1), (3, 3, 6), 0.5, "constant", 4, {}),
    "3d-gaussian-overlap0.6-pad-D": ((2, 4, 8, 5, 1), (6, 3, 5), 0.6, "gaussian", 7,
                                     {"sigma_scale": (0.2, 0.1, 0.3)}),
    "3d-constant-overlap0-pad-replicate": ((2, 3, 7, 5, 2), (4, 3, 4), 0.0, "constant", 5,
                                           {"padding_mode": "replicate"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_monai(case):
  shape, roi, overlap, mode, batch_size, kwargs = CASES[case]
  toy = ToyPredict(roi, shape[-1], 3)
  volume = _volume(shape)
  infer = jax.jit(functools.partial(sliding_window_inference, toy.jax, roi_size=roi,
                                    overlap=overlap, mode=mode, batch_size=batch_size, **kwargs))
  out = np.asarray(infer(volume))
  expected = _monai(toy, volume, roi, batch_size, overlap=overlap, mode=mode, **kwargs)
  assert out.dtype == np.float32 and out.shape == (*shape[:-1], 3)
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
  # One compiled window-batch shape, the batch size capped at the number of windows.
  image_size = tuple(max(s, r) for s, r in zip(shape[1:-1], roi))
  windows = shape[0] * len(sliding_window.window_starts(image_size, roi, (overlap,) * len(roi)))
  assert set(toy.shapes) == {(min(batch_size, windows), *roi, shape[-1])}


def test_eager_equals_jit_and_roi_falls_back_to_the_volume_size():
  toy = ToyPredict((13, 4), 2, 3)
  volume = _volume((2, 13, 10, 2))
  eager = np.asarray(sliding_window_inference(toy.jax, volume, (None, 4), overlap=0.25,
                                              mode="gaussian", batch_size=3))
  jitted = np.asarray(jax.jit(functools.partial(
      sliding_window_inference, toy.jax, roi_size=(-1, 4), overlap=0.25, mode="gaussian",
      batch_size=3))(volume))
  np.testing.assert_array_equal(eager, jitted)
  expected = _monai(toy, volume, (None, 4), 3, overlap=0.25, mode="gaussian")
  np.testing.assert_allclose(eager, expected, rtol=0, atol=1e-5)


def test_scalar_roi_size_and_window_batch_capped_at_the_number_of_windows():
  toy = ToyPredict((4, 4), 1, 2)
  volume = _volume((1, 6, 4, 1))  # windows at H = 0, 2: 2 windows
  out = np.asarray(sliding_window_inference(toy.jax, volume, 4, overlap=0.5, batch_size=16))
  assert set(toy.shapes) == {(2, 4, 4, 1)}
  np.testing.assert_allclose(out, _monai(toy, volume, 4, 16, overlap=0.5), rtol=0, atol=1e-5)


@pytest.mark.parametrize("image_size,roi,overlap", [
    ((13, 10), (5, 4), (0.25, 0.25)), ((11, 7), (4, 7), (0.5, 0.0)), ((6, 9), (6, 4), (0.6, 0.6)),
    ((9, 7, 6), (4, 5, 3), (0.25, 0.5, 0.0)), ((20, 8, 5), (7, 3, 5), (0.9, 0.1, 0.6)),
    ((5,), (1,), (0.0,)),
])
def test_window_starts_match_monai(image_size, roi, overlap):
  steps = sliding_window.scan_interval(image_size, roi, overlap)
  assert steps == _get_scan_interval(image_size, roi, len(roi), overlap)
  slices = dense_patch_slices(image_size, roi, steps)
  expected = np.array([[s.start for s in window] for window in slices])
  np.testing.assert_array_equal(sliding_window.window_starts(image_size, roi, overlap), expected)


@pytest.mark.parametrize("roi,mode,sigma_scale", [
    ((5, 4), "gaussian", 0.125), ((6, 7, 3), "gaussian", 0.3), ((9, 2), "gaussian", (0.5, 0.05)),
    ((4, 3, 2), "constant", 0.125),
])
def test_importance_map_matches_monai(roi, mode, sigma_scale):
  expected = compute_importance_map(roi, mode=mode, sigma_scale=sigma_scale).numpy()
  weights = sliding_window.importance_map(roi, mode, sigma_scale)
  assert weights.dtype == np.float32 and weights.shape == roi
  np.testing.assert_allclose(weights, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("shape,roi,batch_size", [
    ((2, 13, 10, 2), (5, 4), 3), ((2, 4, 8, 5, 1), (6, 3, 5), 5),
])
def test_four_device_mesh_equals_one_device(shape, roi, batch_size):
  mesh = sharding.make_mesh({"data": 4})
  assert mesh.shape["data"] == 4
  ramp = ToyPredict(roi, 1, 1).ramp
  volume = _volume(shape)
  shapes, seen = [], []

  def predict(x):
    # Exact elementwise products: XLA rounds them alike whatever the per-device batch, so the
    # sharded result must equal the one-device result bit for bit (a matmul compiled for
    # another per-device shape can differ by an ulp).
    shapes.append(tuple(x.shape))
    jax.debug.inspect_array_sharding(x, callback=seen.append)
    return x * (1.0 + jnp.asarray(ramp)[..., None])

  infer = functools.partial(sliding_window_inference, predict, roi_size=roi, overlap=0.5,
                            mode="gaussian", batch_size=batch_size)
  single = np.asarray(jax.jit(infer)(volume))
  seen.clear()
  sharded = np.asarray(jax.jit(functools.partial(infer, mesh=mesh))(volume))
  np.testing.assert_array_equal(sharded, single)
  # The window batch, rounded up to a multiple of 4, is split over the 4 devices.
  rounded = -(-batch_size // 4) * 4
  assert shapes[-1] == (rounded, *roi, shape[-1])
  assert seen and all(len(s.device_set) == 4 for s in seen)
  assert all(s.shard_shape((rounded, *roi, shape[-1]))[0] == rounded // 4 for s in seen)
  # Without jit too (the loops compile on their own).
  np.testing.assert_array_equal(np.asarray(infer(volume, mesh=mesh)), single)


@pytest.mark.parametrize("kwargs,match", [
    ({"roi_size": (4, 4, 4)}, r"roi_size \(4, 4, 4\) has 3 axes but volume shape \(2, 8, 6, 1\)"),
    ({"roi_size": (4.0, 4)}, "roi_size must be ints"),
    ({"overlap": 1.0}, r"overlap must be in \[0, 1\)"),
    ({"overlap": -0.1}, r"overlap must be in \[0, 1\)"),
    ({"overlap": (0.1, 0.2, 0.3)}, "overlap must be a number or 2 numbers"),
    ({"mode": "linear"}, "mode must be one of"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"batch_size": 2.0}, "batch_size must be an int >= 1"),
    ({"sigma_scale": 0.0}, "sigma_scale must be > 0"),
    ({"padding_mode": "edge"}, "padding_mode must be one of"),
    ({"cval": "zero"}, "cval must be a number"),
    ({"volume": np.zeros((8, 6), np.float32)}, r"volume must be \(N, \*spatial, C\)"),
    ({"predict": lambda x: x[:, :2]}, r"predict must map \(2, 4, 4, 1\)"),
])
def test_errors(kwargs, match):
  args = {"predict": lambda x: x, "volume": np.zeros((2, 8, 6, 1), np.float32),
          "roi_size": (4, 4), "batch_size": 2, **kwargs}
  predict, volume = args.pop("predict"), args.pop("volume")
  with pytest.raises(ValueError, match=match):
    sliding_window_inference(predict, volume, **args)


def test_mesh_without_data_axis_is_an_error():
  mesh = jax.make_mesh((4,), ("model",))
  with pytest.raises(ValueError, match="mesh must have a 'data' axis"):
    sliding_window_inference(lambda x: x, np.zeros((1, 8, 8, 1), np.float32), (4, 4), mesh=mesh)

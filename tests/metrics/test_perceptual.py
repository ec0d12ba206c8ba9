"""Tests for jaxmed.metrics.perceptual: SSFD and the VGG-16 perceptual distance.

The pure-JAX forwards are checked against the Flax modules they mirror (``SSFDEncoder``,
``VGG16``) on random parameters; the preprocessing against NumPy written from the paper's text.
Tiny shapes: an SSFD encoder with 10 channels at 32x32, VGG-16 at 32x32.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.metrics import ssfd, vgg_perceptual_distance
from jaxmed.metrics.perceptual import VGG_LAYERS
from jaxmed.models import SSFDEncoder, VGG16
from jaxmed.models.vgg import LAYER_NAMES

SIZE = 32
ENCODER = SSFDEncoder(chans=10, num_groups=5)
ALL_SSFD = tuple(f"block{k}_relu{r}" for k in range(1, 6) for r in (1, 2))


def _random_params(model, shape, seed):
  """``model``'s params with random leaves (biases and norm affines too), built without XLA."""
  rng = np.random.default_rng(seed)
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))["params"]

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    centre = 1.0 if name == "scale" else 0.0
    return (centre + 0.1 * rng.normal(size=leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, template)


@pytest.fixture(scope="module")
def enc_params():
  return _random_params(ENCODER, (1, SIZE, SIZE, 1), 0)


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, SIZE, SIZE)).astype(np.float32)
  x[:, 8:24, 8:24] += 2.0  # some structure
  y = (x + 0.3 * rng.normal(size=x.shape)).astype(np.float32)
  return x, y


def _zscore(x):
  flat = x.reshape(x.shape[0], -1).astype(np.float64)
  flat = (flat - flat.mean(1, keepdims=True)) / flat.std(1, ddof=1, keepdims=True)
  return flat.reshape(x.shape + (1,)).astype(np.float32)


@functools.lru_cache
def _flax_encoder():
  return jax.jit(functools.partial(ENCODER.apply, return_features=True))


def _flax_taps(params, x):
  """Every SSFD tap of ``x`` (N, H, W) through the Flax encoder; relu1 via Flax's Conv."""
  _, feats = _flax_encoder()({"params": params}, jnp.asarray(_zscore(x)))
  feats = dict(feats)
  inp = _zscore(x)
  for k in range(1, 6):
    if k > 1:
      inp = nn.max_pool(feats[f"block{k - 1}"], (2, 2), strides=(2, 2))
    conv = nn.Conv(ENCODER.chans * 2**(k - 1), (3, 3), padding=1)
    feats[f"block{k}_relu1"] = nn.relu(conv.apply({"params": params[f"block{k}"]["conv1"]}, inp))
  return feats


def _mean_sq(a, b):
  return np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64))**2, axis=(1, 2, 3))


def test_ssfd_matches_flax_encoder(enc_params, images):
  x, y = images
  fx, fy = _flax_taps(enc_params, x), _flax_taps(enc_params, y)
  weights = np.linspace(0.5, 2.0, len(ALL_SSFD)).astype(np.float32)
  scores, per_layer = ssfd(x, y, encoder_params=enc_params, layers=ALL_SSFD, weights=weights,
                           num_groups=5)
  assert set(per_layer) == set(ALL_SSFD)
  assert scores.shape == (3,) and scores.dtype == np.float32
  for name in ALL_SSFD:
    expected = _mean_sq(fx[name], fy[name])
    assert per_layer[name].shape == (3,) and per_layer[name].dtype == np.float32
    assert np.all(expected > 1e-3), name
    np.testing.assert_allclose(per_layer[name], expected, rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(scores, sum(w * per_layer[n] for w, n in zip(weights, ALL_SSFD)),
                             rtol=1e-6)
  # The default layer (meddlr's block4_relu2, weight 1) runs blocks 1..4 only.
  default, only = ssfd(x, y, encoder_params=enc_params, num_groups=5)
  assert list(only) == ["block4_relu2"]
  np.testing.assert_allclose(default, _mean_sq(fx["block4_relu2"], fy["block4_relu2"]),
                             rtol=1e-5)


def test_ssfd_invariances_and_input_forms(enc_params, images):
  x, y = images
  run = functools.partial(ssfd, encoder_params=enc_params, num_groups=5)
  base = np.asarray(run(x, y)[0])
  assert np.all(base > 0)
  np.testing.assert_array_equal(run(x, x)[0], 0.0)
  # z-scoring: invariant to a * x + b (a > 0) of either input.
  np.testing.assert_allclose(run(3.5 * x - 40.0, y)[0], base, rtol=1e-4)
  np.testing.assert_allclose(run(x, 0.02 * y + 7.0)[0], base, rtol=1e-4)
  # (N, H, W) == (N, H, W, 1); complex input is compared by magnitude.
  np.testing.assert_array_equal(run(x[..., None], y[..., None])[0], base)
  phase = np.exp(1j * np.random.default_rng(2).uniform(0, 2 * np.pi, x.shape))
  mx, my = np.abs(x), np.abs(y)
  np.testing.assert_allclose(run((mx * phase).astype(np.complex64), my.astype(np.complex64))[0],
                             run(mx, my)[0], rtol=1e-5)
  # Params of an SSFDUNet (encoder subtree) and whole variables give the same result.
  unet = {"params": {"encoder": enc_params, "output_conv": {"kernel": np.zeros((1, 1, 10, 1))}}}
  np.testing.assert_array_equal(ssfd(x, y, encoder_params=unet, num_groups=5)[0], base)
  # A constant image is z-scored to zeros instead of dividing by 0.
  assert np.all(np.isfinite(run(np.full_like(x, 3.0), y)[0]))


def test_ssfd_weights_and_jit(enc_params, images):
  x, y = images
  layers = ("block2_relu2", "block3_relu1")
  run = functools.partial(ssfd, encoder_params=enc_params, layers=layers, num_groups=5)
  ones, per = run(x, y)
  np.testing.assert_allclose(ones, per[layers[0]] + per[layers[1]], rtol=1e-6)
  weighted, _ = run(x, y, weights=[2.0, 0.0])
  np.testing.assert_allclose(weighted, 2 * per[layers[0]], rtol=1e-6)
  # Inside the user's jit, with the images and the parameters traced.
  jitted = jax.jit(lambda p, a, b: ssfd(a, b, encoder_params=p, layers=layers, num_groups=5,
                                        weights=jnp.array([2.0, 0.0])))
  np.testing.assert_allclose(jitted(enc_params, x, y)[0], weighted, rtol=1e-6)


def test_ssfd_errors(enc_params, images):
  x, y = images
  run = functools.partial(ssfd, encoder_params=enc_params, num_groups=5)
  with pytest.raises(ValueError, match=r"ssfd: pred shape \(3, 32, 32\) != target shape"):
    run(x, y[:2])
  with pytest.raises(ValueError, match=r"ssfd: pred must be \(N, H, W\) or \(N, H, W, 1\)"):
    run(x[0], y[0])
  with pytest.raises(ValueError, match=r"must have C = 1 .* got shape \(3, 32, 32, 2\)"):
    run(np.stack([x, x], -1), np.stack([y, y], -1))
  with pytest.raises(ValueError, match="target contains NaN or Inf"):
    run(x, np.where(y > 2, np.nan, y))
  with pytest.raises(ValueError, match=r"layers \['block6_relu2'\] are not available.*"
                                       r"'block5_relu1', 'block5_relu2'\)"):
    run(x, y, layers="block6_relu2")
  truncated = {f"block{k}": enc_params[f"block{k}"] for k in (1, 2, 3)}
  with pytest.raises(ValueError, match=r"\['block4_relu2'\] are not available.*'block3_relu2'\)"):
    ssfd(x, y, encoder_params=truncated, num_groups=5)
  with pytest.raises(ValueError, match=r"layers \['relu3_3'\] are not available"):
    run(x, y, layers=("relu3_3",))
  with pytest.raises(ValueError, match="layers must be distinct"):
    run(x, y, layers=("block1_relu2", "block1_relu2"))
  with pytest.raises(ValueError, match=r"weights must have shape \(2,\).*got shape \(3,\)"):
    run(x, y, layers=("block1_relu2", "block2_relu2"), weights=[1.0, 1.0, 1.0])
  with pytest.raises(ValueError, match=r"H and W must be >= 8 = 2\*\*3 to reach block4"):
    run(x[:, :7, :7], y[:, :7, :7])
  with pytest.raises(ValueError, match="num_groups=4 must divide the 10 channels of block1/norm"):
    ssfd(x, y, encoder_params=enc_params, num_groups=4)
  with pytest.raises(ValueError, match=r"encoder_params must be the params of .*SSFDEncoder"):
    ssfd(x, y, encoder_params={"conv1_1": {}})
  broken = {**enc_params, "block1": {**enc_params["block1"], "conv1": {
      "kernel": np.zeros((3, 3, 2, 10), np.float32), "bias": np.zeros(10, np.float32)}}}
  with pytest.raises(ValueError, match=r"block1/conv1/kernel must have shape \(3, 3, 1, C\)"):
    ssfd(x, y, encoder_params=broken, num_groups=5)


# ---------------------------------------------------------------------------------------------
# VGG-16 perceptual distance.


@pytest.fixture(scope="module")
def vgg_params():
  return _random_params(VGG16(), (1, SIZE, SIZE, 3), 3)


def _vgg_input(x, preprocess):
  """Appendix 5.2 in NumPy: 3 channels, [0, 255] per image, then the weights' normalisation."""
  x = x.astype(np.float64)  # real: no abs (min-max scaling keeps the sign information)
  lo, hi = x.min(axis=(1, 2), keepdims=True), x.max(axis=(1, 2), keepdims=True)
  rgb = np.repeat(((x - lo) / (hi - lo) * 255.0)[..., None], 3, axis=-1)
  if preprocess == "caffe":  # keras.applications.vgg16.preprocess_input
    return (rgb[..., ::-1] - np.array([103.939, 116.779, 123.68])).astype(np.float32)
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  return ((rgb / 255.0 - mean) / std).astype(np.float32)


@pytest.mark.parametrize("layer, preprocess", [("relu3_3", "caffe"), ("pool3", "torch")])
def test_vgg_distance_matches_flax_vgg16(vgg_params, images, layer, preprocess):
  x, y = images
  apply = jax.jit(functools.partial(VGG16().apply, taps=(layer,)))
  fx = apply({"params": vgg_params}, _vgg_input(x, preprocess))[layer]
  fy = apply({"params": vgg_params}, _vgg_input(y, preprocess))[layer]
  ours = vgg_perceptual_distance(x, y, vgg_params={"params": vgg_params}, layer=layer,
                                 preprocess=preprocess)
  assert ours.shape == (3,) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, _mean_sq(fx, fy), rtol=2e-5)


def test_vgg_distance_invariances(vgg_params, images):
  x, y = images
  run = functools.partial(vgg_perceptual_distance, vgg_params=vgg_params)
  base = np.asarray(run(x, y))
  assert np.all(base > 0)
  np.testing.assert_array_equal(run(x, x), 0.0)
  # Min-max scaling: invariant to a * x + b (a > 0) of either input; 2D == (N, H, W, 1).
  np.testing.assert_allclose(run(2.0 * x[..., None] + 5.0, y[..., None]), base, rtol=1e-4)
  phase = np.exp(1j * np.random.default_rng(4).uniform(0, 2 * np.pi, x.shape))
  np.testing.assert_allclose(run((np.abs(x) * phase).astype(np.complex64), np.abs(y)),
                             run(np.abs(x), np.abs(y)), rtol=1e-5)
  assert np.all(np.isfinite(run(np.zeros_like(x), y)))  # constant image -> 0, not 0 / 0
  jitted = jax.jit(lambda a, b: vgg_perceptual_distance(a, b, vgg_params=vgg_params))
  np.testing.assert_allclose(jitted(x, y), base, rtol=1e-6)


def test_vgg_distance_errors(vgg_params, images):
  x, y = images
  assert VGG_LAYERS == LAYER_NAMES  # the flax-free copy of the tap names
  run = functools.partial(vgg_perceptual_distance, vgg_params=vgg_params)
  with pytest.raises(ValueError, match=r"unknown layer 'relu3_4'; valid layers: \('relu1_1'"):
    run(x, y, layer="relu3_4")
  with pytest.raises(ValueError, match=r"preprocess must be one of \('caffe', 'torch'\)"):
    run(x, y, preprocess="keras")
  with pytest.raises(ValueError, match=r"H and W must be >= 16 for the 4 max-pool\(s\)"):
    run(x[:, :8, :8], y[:, :8, :8], layer="relu5_1")
  with pytest.raises(ValueError, match=r"must have C = 1 .* got shape \(3, 32, 32, 3\)"):
    run(np.repeat(x[..., None], 3, -1), np.repeat(y[..., None], 3, -1))
  with pytest.raises(ValueError, match=r"BatchNorm layers \['bn1_1'\]"):
    run(x, y, vgg_params={**vgg_params, "bn1_1": {"scale": np.ones(64), "bias": np.zeros(64)}})
  with pytest.raises(ValueError, match="batch_stats: only plain VGG16"):
    run(x, y, vgg_params={"params": vgg_params, "batch_stats": {}})
  with pytest.raises(ValueError, match="vgg_params lack conv3_3/kernel"):
    run(x, y, vgg_params={k: v for k, v in vgg_params.items() if k != "conv3_3"})
  gray = {**vgg_params, "conv1_1": {"kernel": np.zeros((3, 3, 1, 64), np.float32),
                                    "bias": np.zeros(64, np.float32)}}
  with pytest.raises(ValueError, match=r"conv1_1/kernel must have shape \(3, 3, 3, C\)"):
    run(x, y, vgg_params=gray)

"""Tests for jaxmed.metrics.coper: the CoPer / LPIPS-form perceptual distance.

Parity: with a random torchvision-ordered VGG-16 (converted by ``vgg16_from_torch``) and LPIPS's
lin weights, ``coper_distance`` equals LPIPS v0.1's forward rebuilt from torch layers
(ScalingLayer, ``normalize_tensor``, the lin 1x1 convs, spatial average, sum over taps), as
lpips 0.1.4's ``LPIPS(net="vgg")`` computes it. The shipped lin weights come from the installed
``lpips`` package's ``weights/v0.1/vgg.pth`` (install it with ``pip install --no-deps
lpips==0.1.4``: its dependencies would pull torchvision and a CUDA torch; the package is never
imported, since it imports torchvision). Random non-negative lin weights run the same comparison
without the package. ResNet and ViT: the pure-JAX taps equal the Flax modules' own features on
random weights. Tiny widths and 32-70 px images.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxmed.interop import load_lpips_lin, vgg16_from_torch
from jaxmed.metrics import coper_distance, squared_tap_differences
from jaxmed.metrics.coper import LPIPS_SCALE, LPIPS_SHIFT, RESNET_TAPS, VGG16_TAPS
from jaxmed.models import VGG16
from jaxmed.models.resnet import ResNet
from jaxmed.models.vgg import CFG
from jaxmed.models.vit import ViT

LPIPS_TOL = 1e-5
# Squared differences of unit-normalised features, two jitted programs (batched x and y vs one
# image at a time): float32 rounding of the group norms' sums differs between them by up to ~2e-5.
FEATURE_TOL = 3e-5


def _random_variables(model, shape, seed, **init_kwargs):
  """``model``'s variables with random leaves (biases, norm affines and statistics too)."""
  rng = np.random.default_rng(seed)
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape), **init_kwargs)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = np.prod(leaf.shape[:-1])
      return rng.normal(0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
    if name == "var":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    centre = 1.0 if name == "scale" else 0.0
    return (centre + 0.1 * rng.normal(size=leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, template)


def _images(shape, seed=0):
  """Two correlated random image batches in [-1, 1]."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, size=shape).astype(np.float32)
  y = np.clip(x + 0.4 * rng.normal(size=shape), -1, 1).astype(np.float32)
  return x, y


def _unit(f):
  f = np.asarray(f, np.float64)
  return f / (np.sqrt(np.sum(f**2, axis=-1, keepdims=True)) + 1e-10)


def _reference_distance(fx, fy, taps, weights=None):
  """The LPIPS formula in NumPy from two dicts of features ``(N, h, w, C)``."""
  total = 0.0
  for i, tap in enumerate(taps):
    d = (_unit(fx[tap]) - _unit(fy[tap]))**2
    w = np.ones(d.shape[-1]) if weights is None else np.asarray(weights[i], np.float64)
    total = total + np.mean(d @ w, axis=(1, 2))
  return total


# ---------------------------------------------------------------------------------------------
# LPIPS parity (VGG-16).


def _lpips_package_dir():
  """The installed ``lpips`` package directory, found without importing it (or None)."""
  spec = importlib.util.find_spec("lpips")
  if spec is None or not spec.submodule_search_locations:
    return None
  return list(spec.submodule_search_locations)[0]


@functools.lru_cache(maxsize=None)
def _torch_vgg_features():
  """A random torchvision-ordered VGG-16 ``features`` stack (O(1) activations)."""
  torch.manual_seed(0)
  layers, cin = [], 3
  for v in CFG:
    if v == "M":
      layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      layers += [torch.nn.Conv2d(cin, v, kernel_size=3, padding=1), torch.nn.ReLU(False)]
      cin = v
  features = torch.nn.Sequential(*layers).eval()
  with torch.no_grad():
    for m in features:
      if isinstance(m, torch.nn.Conv2d):
        torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        m.bias.normal_(0.0, 0.1)
  holder = torch.nn.Module()
  holder.features = features
  template = jax.eval_shape(VGG16().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  params = vgg16_from_torch(holder.state_dict(), template).variables["params"]
  return features, params


class TorchLPIPSVGG(torch.nn.Module):
  """lpips 0.1.4 ``LPIPS(net="vgg", version="0.1")``'s forward, rebuilt from torch layers.

  ``lpips.pretrained_networks.vgg16`` slices torchvision's ``features`` at 4, 9, 16, 23, 30
  (relu1_2 .. relu5_3); ``lpips.normalize_tensor``; ``NetLinLayer`` = a 1x1 conv without bias
  (dropout is inactive in eval mode); ``spatial_average``; the sum over the five layers.
  """

  def __init__(self, features, lin_state_dict):
    super().__init__()
    bounds = (0, 4, 9, 16, 23, 30)
    self.slices = torch.nn.ModuleList(features[a:b] for a, b in zip(bounds, bounds[1:]))
    self.lins = torch.nn.ModuleList()
    for k in range(5):
      w = lin_state_dict[f"lin{k}.model.1.weight"]
      conv = torch.nn.Conv2d(w.shape[1], 1, 1, stride=1, padding=0, bias=False)
      with torch.no_grad():
        conv.weight.copy_(w)
      self.lins.append(conv)
    self.register_buffer("shift", torch.Tensor([-.030, -.088, -.188])[None, :, None, None])
    self.register_buffer("scale", torch.Tensor([.458, .448, .450])[None, :, None, None])

  @staticmethod
  def normalize_tensor(in_feat, eps=1e-10):
    norm_factor = torch.sqrt(torch.sum(in_feat**2, dim=1, keepdim=True))
    return in_feat / (norm_factor + eps)

  def forward(self, in0, in1):
    h0, h1 = (in0 - self.shift) / self.scale, (in1 - self.shift) / self.scale
    val = 0
    for sl, lin in zip(self.slices, self.lins):
      h0, h1 = sl(h0), sl(h1)
      diff = (self.normalize_tensor(h0) - self.normalize_tensor(h1))**2
      val = val + lin(diff).mean([2, 3], keepdim=True)
    return val


def _random_lin_state_dict():
  rng = np.random.default_rng(3)
  return {f"lin{k}.model.1.weight": torch.from_numpy(
      rng.uniform(0, 0.2, size=(1, c, 1, 1)).astype(np.float32))
          for k, c in enumerate((64, 128, 256, 512, 512))}


def _to_torch(x):
  return torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy())


@pytest.mark.parametrize("lin_source", ["shipped", "random"])
def test_vgg16_with_lin_weights_matches_lpips_forward(lin_source, tmp_path):
  if lin_source == "shipped":
    package = _lpips_package_dir()
    assert package is not None, (
        "LPIPS's shipped lin weights need the lpips package files: pip install --no-deps "
        "lpips==0.1.4 (the README's test command does; not in the test extra, whose resolver "
        "would pull torchvision and a CUDA torch)")
    path = os.path.join(package, "weights", "v0.1", "vgg.pth")
    assert os.path.isfile(path), f"lpips is installed but {path} is missing"
    lin_sd = torch.load(path, map_location="cpu")
    weights = load_lpips_lin(path)
    # The ScalingLayer constants here are lpips's own (read from its source, not imported).
    with open(os.path.join(package, "lpips.py"), encoding="utf-8") as f:
      source = f.read()
    found = [tuple(float(v) for v in m.split(","))
             for m in re.findall(r"torch\.Tensor\(\[([-.0-9, ]+)\]\)", source)]
    assert found[:2] == [LPIPS_SHIFT, LPIPS_SCALE], found
  else:
    lin_sd = _random_lin_state_dict()
    path = tmp_path / "lin.pth"
    torch.save(lin_sd, path)
    weights = load_lpips_lin(path)
  features, params = _torch_vgg_features()
  reference = TorchLPIPSVGG(features, lin_sd).eval()

  rng = np.random.default_rng(7)
  # RGB 64x64, and grey at an odd size (pools floor 25 -> 12 -> 6 -> 3); the random case runs
  # only the second (the same compiled kernel).
  cases = [rng.uniform(-1, 1, size=(2, 64, 64, 3)), rng.uniform(-1, 1, size=(2, 50, 70, 1))]
  for x in cases[1:] if lin_source == "random" else cases:
    x = x.astype(np.float32)
    y = np.clip(x + 0.3 * rng.normal(size=x.shape), -1, 1).astype(np.float32)
    rgb = 3 // x.shape[-1]  # grey: LPIPS sees the channel repeated
    with torch.no_grad():
      ref = reference(_to_torch(np.repeat(x, rgb, -1)), _to_torch(np.repeat(y, rgb, -1)))
    ref = ref.numpy().reshape(-1)
    ours = np.asarray(coper_distance(x, y, params=params, weights=weights))
    print(lin_source, x.shape, ours, ref, np.max(np.abs(ours - ref)))
    assert ours.shape == (2,) and ours.dtype == np.float32
    assert np.all(ref > 0.01)  # a real comparison
    np.testing.assert_allclose(ours, ref, rtol=LPIPS_TOL, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Features of every network against the Flax modules.

SMALL_RESNETS = {
    "bottleneck_bn": (ResNet(block="bottleneck", layers=(1, 1, 1, 1),
                             block_inplanes=(4, 8, 8, 16)), {}),
    "basic_shortcut_a_widen2": (ResNet(block="basic", layers=(2, 1, 1, 1),
                                       block_inplanes=(4, 8, 8, 16), shortcut_type="A",
                                       widen_factor=2), {}),
    "basic_group_norm_stem1_no_pool": (
        ResNet(block="basic", layers=(1, 1, 1, 1), block_inplanes=(8, 8, 16, 16), norm="group",
               num_groups=4, bias_downsample=True, conv1_t_stride=1, no_max_pool=True),
        dict(num_groups=4, stem_stride=1, max_pool=False)),
}
SMALL_VITS = {
    "learned_cls": (ViT(patch_size=8, embed_dim=16, depth=3, num_heads=2), dict(num_heads=2)),
    "sincos_eps5": (ViT(patch_size=(8, 4), embed_dim=16, depth=2, num_heads=4, pos_embed="sincos",
                        layer_norm_eps=1e-5, qkv_bias=False),
                    dict(num_heads=4, pos_embed="sincos", layer_norm_eps=1e-5)),
    "no_pos_no_cls": (ViT(patch_size=8, embed_dim=12, depth=2, num_heads=3, pos_embed="none",
                          class_token=False), dict(num_heads=3, pos_embed="none")),
}


def _check_against_flax(variables, feats_x, feats_y, x, y, taps, network, options):
  """squared_tap_differences equal the unit-normalised squared differences of Flax features."""
  diffs = squared_tap_differences(x, y, params=variables, network=network, taps=taps,
                                  preprocess="none", **options)
  assert isinstance(diffs, tuple) and len(diffs) == len(taps)
  for tap, d in zip(taps, diffs):
    expected = (_unit(feats_x[tap]) - _unit(feats_y[tap]))**2
    assert d.shape == expected.shape and d.dtype == jnp.float32, tap
    assert np.std(feats_x[tap]) > 0.05, tap  # a real comparison
    np.testing.assert_allclose(d, expected, rtol=0, atol=FEATURE_TOL, err_msg=tap)


@pytest.mark.parametrize("name", list(SMALL_RESNETS))
def test_resnet_taps_match_flax_features(name):
  model, options = SMALL_RESNETS[name]
  x, y = _images((2, 32, 40, 3), seed=1)
  variables = _random_variables(model, x.shape, 2)
  apply = jax.jit(functools.partial(model.apply, return_features=True))
  fx, fy = apply(variables, x)[1], apply(variables, y)[1]
  _check_against_flax(variables, fx, fy, x, y, RESNET_TAPS, "resnet", options)


@pytest.mark.parametrize("name", list(SMALL_VITS))
def test_vit_taps_match_flax_block_features(name):
  model, options = SMALL_VITS[name]
  x, y = _images((2, 32, 32, 3), seed=2)
  variables = _random_variables(model, x.shape, 3)
  grid = model.grid_shape(x.shape[1:3])

  apply = jax.jit(functools.partial(model.apply, return_features=True))

  def block_features(img):
    _, feats = apply(variables, img)
    # The cls token dropped, the tokens on the patch grid (App. A: the "patch reshaping layer").
    return {k: np.asarray(v)[:, v.shape[1] - grid[0] * grid[1]:].reshape(
        (img.shape[0],) + grid + (v.shape[-1],)) for k, v in feats.items()
            if k.startswith("block_")}

  fx, fy = block_features(x), block_features(y)
  taps = tuple(f"block_{i}" for i in range(model.depth))
  _check_against_flax(variables, fx, fy, x, y, taps, "vit", options)
  if name == "learned_cls":  # the distance, with the default taps: every block (depth < 12)
    default = coper_distance(x, y, params=variables, network="vit", preprocess="none",
                             **options)
    np.testing.assert_allclose(default, _reference_distance(fx, fy, taps), rtol=1e-5)


def test_vit_default_taps_are_blocks_3_to_11():
  model = ViT(patch_size=16, embed_dim=8, depth=12, num_heads=2)
  x, y = _images((1, 32, 32, 3), seed=4)
  variables = _random_variables(model, x.shape, 5)
  taps = ("block_3", "block_5", "block_7", "block_9", "block_11")
  diffs = squared_tap_differences(x, y, params=variables, network="vit", num_heads=2)
  explicit = squared_tap_differences(x, y, params=variables, network="vit", num_heads=2,
                                     taps=taps)
  assert len(diffs) == 5 and all(d.shape == (1, 2, 2, 8) for d in diffs)
  for a, b in zip(diffs, explicit):
    np.testing.assert_array_equal(a, b)


def test_vgg16_bn_taps_match_flax_and_take_variables_or_batch_stats():
  model = VGG16(batch_norm=True)
  x, y = _images((2, 32, 32, 3), seed=6)
  variables = _random_variables(model, x.shape, 7)
  taps = VGG16_TAPS[:3]  # the BatchNorm path; fewer layers to compile
  apply = jax.jit(functools.partial(model.apply, taps=taps))
  fx, fy = apply(variables, x), apply(variables, y)
  _check_against_flax(variables, fx, fy, x, y, taps, "vgg16", {})
  split = coper_distance(x, y, params=variables["params"], batch_stats=variables["batch_stats"],
                         preprocess="none", taps=taps)
  np.testing.assert_allclose(split, _reference_distance(fx, fy, taps), rtol=1e-5)
  np.testing.assert_array_equal(
      split, coper_distance(x, y, params=variables, preprocess="none", taps=taps))


# ---------------------------------------------------------------------------------------------
# Properties.


PROPERTY_RESNET = ResNet(block="basic", layers=(1, 1, 1, 1), block_inplanes=(4, 4, 8, 8))
PROPERTY_CHANNELS = (4, 4, 4, 8, 8)  # stem, layer1 .. layer4


@pytest.fixture(scope="module")
def resnet_variables():
  return _random_variables(PROPERTY_RESNET, (1, 32, 32, 3), 8)


def test_identity_symmetry_nonnegativity_grey(resnet_variables):
  run = functools.partial(coper_distance, params=resnet_variables, network="resnet")
  x, y = _images((2, 32, 32, 1), seed=9)
  d_xy, d_yx, d_xx = run(x, y), run(y, x), run(x, x)
  assert d_xy.shape == (2,) and d_xy.dtype == jnp.float32
  np.testing.assert_array_equal(d_xx, 0.0)
  np.testing.assert_allclose(d_xy, d_yx, rtol=1e-6)
  assert np.all(np.asarray(d_xy) > 0)
  # Grey = the image repeated to 3 channels.
  np.testing.assert_array_equal(d_xy, run(np.repeat(x, 3, -1), np.repeat(y, 3, -1)))
  # Larger distortions are farther.
  z = np.clip(x + 1.0 * (y - x), -1, 1)
  w = np.clip(x + 0.2 * (y - x), -1, 1)
  assert np.all(np.asarray(run(x, w)) < np.asarray(run(x, z)))


def test_reduce_mean_weights_and_differences(resnet_variables):
  x, y = _images((2, 32, 32, 3), seed=10)
  common = dict(params=resnet_variables, network="resnet")
  total = coper_distance(x, y, **common)
  np.testing.assert_allclose(coper_distance(x, y, reduce="mean", **common), total / 5, rtol=1e-6)
  diffs = squared_tap_differences(x, y, **common)
  assert tuple(d.shape[-1] for d in diffs) == PROPERTY_CHANNELS
  np.testing.assert_allclose(total, sum(np.mean(np.sum(d, -1), (1, 2)) for d in diffs),
                             rtol=1e-6)
  rng = np.random.default_rng(11)
  weights = [rng.uniform(0, 2, d.shape[-1]).astype(np.float32) for d in diffs]
  weighted = coper_distance(x, y, weights=weights, **common)
  np.testing.assert_allclose(weighted, sum(np.mean(np.asarray(d) @ w, (1, 2))
                                           for d, w in zip(diffs, weights)), rtol=1e-5)
  as_dict = coper_distance(x, y, weights=dict(zip(reversed(RESNET_TAPS), weights[::-1])),
                           **common)
  np.testing.assert_array_equal(weighted, as_dict)
  # A tap subset, in the requested order.
  sub = squared_tap_differences(x, y, taps=("layer2", "stem"), **common)
  np.testing.assert_array_equal(sub[0], diffs[2])
  np.testing.assert_array_equal(sub[1], diffs[0])


def test_volume_is_the_mean_of_per_axis_slice_metrics(resnet_variables):
  rng = np.random.default_rng(12)
  x = rng.uniform(-1, 1, size=(2, 6, 8, 10, 1)).astype(np.float32)
  y = np.clip(x + 0.3 * rng.normal(size=x.shape), -1, 1).astype(np.float32)
  # Two taps keep the four compilations (three slice shapes and the volume) small.
  run = functools.partial(coper_distance, params=resnet_variables, network="resnet",
                          taps=("stem", "layer1"))
  per_axis = []
  for axis in (1, 2, 3):
    slices = []
    for i in range(x.shape[axis]):
      take = functools.partial(np.take, indices=i, axis=axis)
      slices.append(np.asarray(run(take(x), take(y))))  # (N, other two axes in order, C)
    per_axis.append(np.mean(slices, axis=0))
  expected = np.mean(per_axis, axis=0)
  got = run(x, y)
  assert got.shape == (2,)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert len({round(float(a[0]), 6) for a in per_axis}) == 3  # the three axes differ


def test_jit_and_gradient(resnet_variables):
  x, y = _images((2, 32, 32, 3), seed=13)
  run = functools.partial(coper_distance, params=resnet_variables, network="resnet",
                          taps=("stem", "layer2"))
  np.testing.assert_allclose(jax.jit(run)(x, y), run(x, y), rtol=1e-6)
  # Traced weights (as when they are learned): finite gradients, zero at x == y (the minimum).
  weights = [jnp.ones(PROPERTY_CHANNELS[0]), jnp.ones(PROPERTY_CHANNELS[2])]
  grad = jax.jit(jax.grad(lambda w, a, b: jnp.sum(run(a, b, weights=w)), argnums=(0, 1)))
  for b, nonzero in ((y, True), (x, False)):
    gw, gx = grad(weights, jnp.asarray(x), jnp.asarray(b))
    for g in list(gw) + [gx]:
      assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0) == nonzero
  # All-zero feature vectors (a zero image through a ViT without biases): the unit
  # normalisation's root must not turn the gradient into NaN.
  model, options = SMALL_VITS["no_pos_no_cls"]
  variables = jax.tree_util.tree_map_with_path(
      lambda path, v: np.zeros_like(v) if path[-1].key == "bias" else v,
      _random_variables(model, x.shape, 16))
  g = jax.grad(lambda a: jnp.sum(coper_distance(a, y, params=variables, network="vit",
                                                preprocess="none", **options)))(
                                                    jnp.zeros_like(x))
  assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0)


# ---------------------------------------------------------------------------------------------
# Errors (raised on the host, before tracing).


def test_errors(resnet_variables):
  model, _ = SMALL_VITS["learned_cls"]
  vit_vars = _random_variables(model, (1, 32, 32, 3), 14)
  vgg_params = _torch_vgg_features()[1]
  x, y = _images((2, 32, 32, 3), seed=15)
  res = functools.partial(coper_distance, params=resnet_variables, network="resnet")
  cases = [
      (lambda: res(x, y[:, :16]), r"x shape \(2, 32, 32, 3\) != y shape \(2, 16, 32, 3\)"),
      (lambda: res(x[0], y[0]), r"x must be \(N, H, W, C\) images or \(N, D, H, W, C\)"),
      (lambda: res(x[..., :2], y[..., :2]), r"1 \(grey, repeated\) or 3 channels"),
      (lambda: res(x + 1j, y), r"x must be real"),
      (lambda: res(np.where(x > 0.9, np.nan, x), y), r"x contains NaN or Inf"),
      (lambda: res(x, y, reduce="max"), r"reduce must be one of \('sum', 'mean'\)"),
      (lambda: res(x, y, preprocess="imagenet"), r"preprocess must be one of"),
      (lambda: coper_distance(x, y, params=resnet_variables, network="alexnet"),
       r"network must be one of \('vgg16', 'resnet', 'vit'\)"),
      (lambda: res(x, y, taps=("layer5",)), r"unknown resnet taps \['layer5'\]"),
      (lambda: res(x, y, taps=("stem", "stem")), r"taps must be distinct"),
      (lambda: res(x, y, weights=[np.ones(4)] * 4), r"one \(C_l,\) array per tap \(5"),
      (lambda: res(x, y, weights=[np.ones(4), np.ones(15), np.ones(4), np.ones(8),
                                  np.ones(8)]),
       r"weights\['layer1'\] must have shape \(4,\)"),
      (lambda: res(x, y, weights=[-np.ones(4), np.ones(4), np.ones(4), np.ones(8),
                                  np.ones(8)]), r"weights\['stem'\] must be non-negative"),
      (lambda: res(x, y, weights={"stem": np.ones(4)}), r"exactly the taps"),
      (lambda: res(x, y, weights=np.ones(5)), r"weights must be None, a sequence"),
      (lambda: coper_distance(x, y, params=resnet_variables["params"], network="resnet"),
       r"no batch_stats were given.*num_groups"),
      (lambda: res(x, y, num_heads=2), r"\['num_heads'\] do not apply to network='resnet'"),
      (lambda: coper_distance(x, y, params=resnet_variables, network="vit", num_heads=2),
       r"params are not a ViT's"),
      (lambda: coper_distance(x, y, params=vit_vars, network="vit"), r"needs num_heads"),
      (lambda: coper_distance(x, y, params=vit_vars, network="vit", num_heads=3),
       r"num_heads must be a positive integer dividing the embedding dim 16"),
      (lambda: coper_distance(x[:, :24, :24], y[:, :24, :24], params=vit_vars, network="vit",
                              num_heads=2), r"patch grid \(3, 3\).*learned pos_embedding"),
      (lambda: coper_distance(x[:, :20], y[:, :20], params=vit_vars, network="vit",
                              num_heads=2), r"multiples of the ViT patch size \(8, 8\)"),
      (lambda: coper_distance(x[:, :8, :12], y[:, :8, :12], params=vgg_params),
       r"H and W must be >= 16"),
      (lambda: coper_distance(x, y, params=vgg_params, taps=("relu6_1",)),
       r"unknown vgg16 taps"),
      (lambda: coper_distance(x, y, params={"conv1_1": {}}), r"lack conv1_1/kernel"),
      (lambda: squared_tap_differences(x[:, None], y[:, None], params=vgg_params),
       r"x must be \(N, H, W, C\) images"),
      (lambda: coper_distance(np.stack([x] * 4, 1)[:, :, :, :, :1],
                              np.stack([y] * 4, 1)[:, :, :, :, :1], params=vgg_params),
       r"\(H, W\) of the D-slices|\(D, W\) of the H-slices"),
  ]
  for call, match in cases:
    with pytest.raises(ValueError, match=match):
      call()
  # Abstract parameter trees suffice: these errors come before any computation.
  def template(model, shape):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))

  vgg_bn = template(VGG16(batch_norm=True), (1, 32, 32, 3))
  with pytest.raises(ValueError, match=r"hold norm layers \(bn1_1, ...\) but no batch_stats"):
    coper_distance(x, y, params=vgg_bn["params"])
  with pytest.raises(ValueError, match=r"batch_stats given twice"):
    coper_distance(x, y, params=vgg_bn, batch_stats=vgg_bn["batch_stats"])
  with pytest.raises(ValueError, match=r"batch_stats given but the vgg16 params hold no"):
    coper_distance(x, y, params=vgg_params, batch_stats=vgg_bn["batch_stats"])
  grey_resnet = template(PROPERTY_RESNET, (1, 32, 32, 1))
  with pytest.raises(ValueError, match=r"preprocess='lpips'.*takes 1: use preprocess='none'"):
    coper_distance(x[..., :1], y[..., :1], params=grey_resnet, network="resnet")
  with pytest.raises(ValueError, match=r"1 \(grey, repeated\) or 1 channels"):
    coper_distance(x, y, params=grey_resnet, network="resnet", preprocess="none")
  group = template(SMALL_RESNETS["basic_group_norm_stem1_no_pool"][0], (1, 32, 32, 3))
  with pytest.raises(ValueError, match=r"num_groups=3 must divide the 8 channels of bn1"):
    coper_distance(x, y, params=group, network="resnet", num_groups=3)
  # A missing leaf is named by its path.
  broken = jax.tree_util.tree_map(lambda a: a, resnet_variables)
  del broken["params"]["layer2_0"]["conv2"]
  with pytest.raises(ValueError, match=r"lack layer2_0/conv2/kernel"):
    res(x, y, params=broken)
  three_d = ResNet(block="basic", layers=(1, 1, 1, 1), block_inplanes=(4, 4, 4, 4),
                   spatial_dims=3)
  v3 = jax.eval_shape(three_d.init, jax.random.key(0), jnp.zeros((1, 8, 8, 8, 1)))
  with pytest.raises(ValueError, match=r"3D ResNet's"):
    coper_distance(x, y, params=v3, network="resnet")

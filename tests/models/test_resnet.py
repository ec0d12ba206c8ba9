"""Tests for jaxmed.models.resnet (parity with MONAI is in tests/interop/test_resnet.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.models.resnet import (ResNet, ResNetBlock, conv_init, dense_init, resnet, resnet18,
                                  resnet34, resnet50)


def _init(model, x, seed=0):
  """Variables from numpy into the ``jax.eval_shape`` template (no per-shape init compiles)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, size=leaf.shape)
    else:
      value = 0.1 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _random(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


# --------------------------------------------------------------------------------------------
# Architecture (shapes only: jax.eval_shape, nothing compiled).


@pytest.mark.parametrize("depth, params, stats", [(18, 11_689_512, 9_600),
                                                  (50, 25_557_032, 53_120)])
def test_parameter_counts_match_torchvision(depth, params, stats):
  # torchvision's resnet18/34/50(num_classes=1000): parameters and BatchNorm running statistics.
  model = {18: resnet18, 34: resnet34, 50: resnet50}[depth](num_classes=1000)
  v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  assert _count(v["params"]) == params
  assert _count(v["batch_stats"]) == stats
  assert resnet(depth).layers == model.layers
  assert resnet34().layers == (3, 4, 6, 3) and resnet34().block == "basic"


def test_feature_shapes_and_names_3d():
  model = resnet50(spatial_dims=3, num_classes=2)
  x = jnp.zeros((2, 32, 24, 16, 1))
  v = jax.eval_shape(model.init, jax.random.key(0), x)
  out, feats = jax.eval_shape(functools.partial(model.apply, return_features=True), v, x)
  assert out.shape == (2, 2)
  shapes = {k: f.shape for k, f in feats.items()}
  assert shapes == {
      "stem": (2, 16, 12, 8, 64),  # before the max-pool
      "layer1": (2, 8, 6, 4, 256),
      "layer2": (2, 4, 3, 2, 512),
      "layer3": (2, 2, 2, 1, 1024),
      "layer4": (2, 1, 1, 1, 2048),
      "pooled": (2, 2048),
  }
  p = v["params"]
  assert p["conv1"]["kernel"].shape == (7, 7, 7, 1, 64)
  assert "bias" not in p["conv1"]
  assert p["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 3, 128, 128)  # stride on the 3x3
  assert p["layer1_0"]["downsample_conv"]["kernel"].shape == (1, 1, 1, 64, 256)
  assert "bias" not in p["layer1_0"]["downsample_conv"]
  assert "downsample_conv" not in p["layer1_1"]
  assert set(v["batch_stats"]["layer3_5"]) == {"bn1", "bn2", "bn3"}


def test_no_head_returns_pooled_and_stem_options():
  model = resnet18(num_classes=0, conv1_t_stride=1, no_max_pool=True, widen_factor=0.5)
  x = jnp.zeros((1, 16, 16, 2))
  v = jax.eval_shape(model.init, jax.random.key(0), x)
  assert "fc" not in v["params"]
  out, feats = jax.eval_shape(functools.partial(model.apply, return_features=True), v, x)
  assert out.shape == (1, 256)
  assert feats["stem"].shape == (1, 16, 16, 32)
  assert feats["layer1"].shape == (1, 16, 16, 32)
  assert feats["layer4"].shape == (1, 2, 2, 256)


def test_bfloat16_compute_float32_outputs_and_params():
  model = resnet18(num_classes=3, dtype=jnp.bfloat16)
  x = jnp.zeros((1, 32, 32, 3), jnp.bfloat16)
  v = jax.eval_shape(model.init, jax.random.key(0), x)
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(v))
  out, feats = jax.eval_shape(functools.partial(model.apply, return_features=True), v, x)
  assert out.dtype == jnp.float32
  assert all(f.dtype == jnp.float32 for f in feats.values())


# --------------------------------------------------------------------------------------------
# Behaviour (compiled, tiny widths).


def _center_tap_stem(v, d, cin):
  """Sets the stem kernel to its centre tap only, so that ``conv1(x)`` is ``x`` subsampled by
  the stride times a per-channel weight (known without running a conv). Returns the weights
  ``(cin, cout)``."""
  kernel = np.zeros(v["params"]["conv1"]["kernel"].shape, np.float32)
  w = np.random.default_rng(7).normal(size=kernel.shape[-2:]).astype(np.float32)
  kernel[(3,) * d] = w
  v["params"]["conv1"]["kernel"] = jnp.asarray(kernel)
  return w


def test_group_norm_resnet():
  model = ResNet(layers=(1, 1, 1, 1), block_inplanes=(8, 8, 16, 16), spatial_dims=3,
                 norm="group", num_groups=4, num_classes=3)
  x = _random((3, 8, 8, 8, 2)) * 2.0 + 1.0
  v = _init(model, x)
  assert set(v) == {"params"}  # no running statistics
  assert set(v["params"]["layer3_0"]["bn2"]) == {"scale", "bias"}
  assert v["params"]["layer3_0"]["downsample_norm"]["scale"].shape == (16,)
  w = _center_tap_stem(v, 3, 2)
  apply = jax.jit(functools.partial(model.apply, return_features=True))
  out, feats = apply(v, x)
  assert out.shape == (3, 3) and feats["layer4"].shape == (3, 1, 1, 1, 16)
  assert np.all(np.isfinite(np.asarray(out)))
  # The stem is relu(GroupNorm(conv(x))) with 4 groups of 2 channels, per example.
  p = v["params"]
  conv = np.asarray(x)[:, ::2, ::2, ::2] @ w
  g = conv.reshape(3, -1, 4, 2)
  normed = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(
      g.var(axis=(1, 3), keepdims=True) + 1e-5)
  expected = np.maximum(normed.reshape(conv.shape) * p["bn1"]["scale"] + p["bn1"]["bias"], 0)
  np.testing.assert_allclose(feats["stem"], expected, atol=1e-4)
  # Per-example normalisation: permuting the batch permutes the outputs.
  perm = np.array([2, 0, 1])
  out_perm, _ = apply(v, x[perm])
  np.testing.assert_allclose(out_perm, np.asarray(out)[perm], atol=1e-5)


def test_batch_norm_train_updates_running_stats():
  model = ResNet(layers=(1, 1, 1, 1), block_inplanes=(4, 8, 8, 8), num_classes=2)
  x = _random((4, 16, 16, 1)) * 3.0 + 2.0
  v = _init(model, x)
  w = _center_tap_stem(v, 2, 1)
  y, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(v, x)
  stats = updates["batch_stats"]
  assert jax.tree_util.tree_structure(stats) == jax.tree_util.tree_structure(v["batch_stats"])
  conv = np.asarray(x)[:, ::2, ::2] @ w
  # torch momentum 0.1: new = 0.9 * old + 0.1 * batch mean.
  np.testing.assert_allclose(
      stats["bn1"]["mean"],
      0.9 * v["batch_stats"]["bn1"]["mean"] + 0.1 * conv.mean(axis=(0, 1, 2)),
      rtol=1e-4, atol=1e-5)
  old = v["batch_stats"]["layer4_0"]["bn2"]["var"]
  assert not np.allclose(stats["layer4_0"]["bn2"]["var"], old)
  assert y.shape == (4, 2) and np.all(np.isfinite(np.asarray(y)))


def test_initialisers_are_torchs():
  # kaiming_normal_(mode="fan_out", nonlinearity="relu") for convs; torch Linear's default
  # U(+-1/sqrt(fan_in)) for the head (the initialisers alone: a full init is slow on CPU).
  key = functools.partial(jax.random.key, impl="rbg")
  kernel = np.asarray(conv_init(key(0), (3, 3, 16, 64)))
  np.testing.assert_allclose(np.std(kernel), np.sqrt(2.0 / (9 * 64)), rtol=0.05)
  fc = np.asarray(dense_init(key(1), (64, 1000)))
  assert 0.95 / 8 < np.max(np.abs(fc)) <= 1 / 8
  v = jax.eval_shape(ResNetBlock(32, strides=2).init, key(0), jnp.zeros((1, 8, 8, 16)))
  assert set(v["params"]["conv1"]) == {"kernel"} and set(v["params"]["downsample_conv"]) == {
      "kernel"}


# --------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize("kwargs, shape, match", [
    (dict(spatial_dims=1), (1, 16, 1), "spatial_dims"),
    (dict(spatial_dims=3), (1, 16, 16, 1), r"ndim 5.*\(1, 16, 16, 1\)"),
    (dict(), (1, 16, 16, 16, 1), r"\(N, H, W, C\).*\(1, 16, 16, 16, 1\)"),
    (dict(block="wide"), (1, 16, 16, 1), "block"),
    (dict(norm="instance"), (1, 16, 16, 1), "norm"),
    (dict(shortcut_type="C"), (1, 16, 16, 1), "shortcut_type"),
    (dict(layers=(2, 2, 2)), (1, 16, 16, 1), "layers"),
    (dict(layers=(2, 0, 2, 2)), (1, 16, 16, 1), "layers"),
    (dict(block_inplanes=(64, 128)), (1, 16, 16, 1), "block_inplanes"),
    (dict(widen_factor=0.001), (1, 16, 16, 1), "widen_factor"),
    (dict(norm="group", num_groups=48), (1, 16, 16, 1), r"num_groups=48.*\(64, 128"),
    (dict(norm="group", num_groups=0), (1, 16, 16, 1), "num_groups"),
    (dict(shortcut_type="A", block_inplanes=(64, 32, 32, 32)), (1, 16, 16, 1), "shortcut_type"),
    (dict(conv1_t_size=(7, 7, 7)), (1, 16, 16, 1), "conv1_t_size"),
    (dict(conv1_t_stride=0), (1, 16, 16, 1), "conv1_t_stride"),
    (dict(num_classes=-1), (1, 16, 16, 1), "num_classes"),
    (dict(), (1, 0, 16, 1), r"\(1, 0, 16, 1\)"),
])
def test_validation_errors(kwargs, shape, match):
  model = ResNet(**kwargs)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


def test_helper_errors():
  with pytest.raises(ValueError, match="depth"):
    resnet(101)
  with pytest.raises(ValueError, match="layers"):
    resnet18(layers=(1, 1, 1, 1))

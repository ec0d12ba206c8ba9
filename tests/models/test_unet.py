"""Tests for jaxmed.models.unet."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.models.blocks import UpConv
from jaxmed.models.unet import ConvNormAct, UNet


def _init(model, x, seed=0):
  """Variables of ``model`` for input ``x``, filled from numpy.

  Shapes come from ``jax.eval_shape(model.init, ...)`` (which also runs the input validation);
  kernels are He-normal, biases small, norm scales and running variances one. This avoids
  compiling a random-normal kernel per parameter shape, which dominates the test time on CPU;
  the real initialisers are checked in ``test_init_kaiming_and_zero_bias``.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    elif name in ("scale", "var"):
      value = np.ones(leaf.shape)
    elif name == "bias":
      value = 0.1 * rng.normal(size=leaf.shape)
    else:
      value = np.zeros(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _apply(model, variables, x, rngs=None, **kwargs):
  """``model.apply`` under jit: one compile per call is much cheaper on CPU than op-by-op."""
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, x, rngs=rngs)


def _shapes(tree):
  return jax.tree_util.tree_map(lambda a: a.shape, tree)


def _random(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# --------------------------------------------------------------------------------------------
# Shapes and names.


@pytest.mark.parametrize("spatial_dims, spatial, features, in_ch, out_ch", [
    (2, (16, 32), (2, 4, 6, 8, 10), 7, 2),
    (3, (4, 8, 12), (3, 5, 7), 3, 5),
    (3, (2, 4, 2), (4, 8), 1, 1),
])
def test_output_shape(spatial_dims, spatial, features, in_ch, out_ch):
  model = UNet(out_channels=out_ch, features=features, spatial_dims=spatial_dims)
  x = _random((2, *spatial, in_ch))
  variables = _init(model, x)
  y = _apply(model, variables, x)
  assert y.shape == (2, *spatial, out_ch)
  assert y.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(y)))


@pytest.mark.parametrize("spatial_dims, spatial, features", [
    (2, (16, 8), (4, 6, 8, 10)),
    (3, (4, 8, 8), (4, 6, 8)),
])
def test_feature_names_and_shapes(spatial_dims, spatial, features):
  model = UNet(out_channels=2, features=features, spatial_dims=spatial_dims)
  x = _random((2, *spatial, 3))
  variables = _init(model, x)
  both = jax.jit(lambda v, x: (model.apply(v, x, return_features=True), model.apply(v, x)))
  (logits, feats), plain = both(variables, x)
  assert logits.shape == (2, *spatial, 2)
  expected = {}
  for k in range(len(features) - 1):
    shape = (2, *(s // 2**k for s in spatial), features[k])
    expected[f"encoder_{k}"] = shape
    expected[f"decoder_{k}"] = shape
  factor = 2**(len(features) - 1)
  expected["bottleneck"] = (2, *(s // factor for s in spatial), features[-1])
  assert {k: v.shape for k, v in feats.items()} == expected
  assert all(v.dtype == jnp.float32 for v in feats.values())
  np.testing.assert_allclose(logits, plain, rtol=1e-6, atol=1e-6)


def test_layer_names():
  model = UNet(out_channels=2, features=(4, 6, 8))
  params = _init(model, jnp.zeros((1, 8, 8, 3)))["params"]
  assert set(params) == {"input_conv", "encoder_0", "encoder_1", "bottleneck", "upsample_1",
                         "upsample_0", "decoder_1", "decoder_0", "output_conv"}
  assert params["input_conv"]["conv"]["kernel"].shape == (3, 3, 3, 4)
  assert "bias" not in params["input_conv"]["conv"]  # followed by a norm with a bias
  assert params["output_conv"]["kernel"].shape == (1, 1, 4, 2)
  assert params["output_conv"]["bias"].shape == (2,)
  assert params["upsample_0"]["kernel"].shape == (2, 2, 6, 4)
  assert params["upsample_1"]["kernel"].shape == (2, 2, 8, 6)
  assert params["decoder_0"]["conv_0"]["conv"]["kernel"].shape == (3, 3, 8, 4)
  leaves = jax.tree_util.tree_leaves(params)
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)


def test_init_kaiming_and_zero_bias():
  # Real initialisers, on single layers: a full UNet init compiles one random-normal kernel per
  # parameter shape, which is slow on CPU (as is threefry itself, hence the "rbg" keys).
  params = ConvNormAct(64, norm="none").init(jax.random.key(0, impl="rbg"),
                                             jnp.zeros((1, 4, 4, 32)))
  kernel = params["params"]["conv"]["kernel"]  # fan_in = 9 * 32
  np.testing.assert_allclose(np.std(kernel), np.sqrt(2.0 / (9 * 32)), rtol=0.05)
  assert abs(float(np.mean(kernel))) < 0.01
  assert np.all(params["params"]["conv"]["bias"] == 0)
  params = UpConv(64).init(jax.random.key(1, impl="rbg"), jnp.zeros((1, 2, 2, 32)))["params"]
  np.testing.assert_allclose(np.std(params["kernel"]), np.sqrt(2.0 / (4 * 32)), rtol=0.05)
  assert np.all(params["bias"] == 0)
  params = jax.eval_shape(UNet(2, features=(4, 8)).init, jax.random.key(0),
                          jnp.zeros((1, 4, 4, 1)))["params"]
  assert "bias" in params["output_conv"]


def test_convs_per_level_one():
  model = UNet(out_channels=2, features=(4, 8, 16), convs_per_level=1)
  x = _random((1, 8, 8, 3))
  variables = _init(model, x)
  assert "encoder_0" not in variables["params"]  # input_conv is level 0's only conv
  logits, feats = _apply(model, variables, x, return_features=True)
  assert logits.shape == (1, 8, 8, 2)
  assert feats["encoder_0"].shape == (1, 8, 8, 4)


def test_bfloat16_compute_float32_output():
  model = UNet(out_channels=3, features=(4, 8), dtype=jnp.bfloat16)
  x = _random((2, 8, 8, 1))
  variables = _init(model, x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
  logits, feats = _apply(model, variables, x, return_features=True)
  assert logits.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in feats.values())
  reference = _apply(UNet(out_channels=3, features=(4, 8)), variables, x)
  err = np.abs(np.asarray(logits) - np.asarray(reference))
  scale = np.max(np.abs(np.asarray(reference)))
  assert np.max(err) < 0.3 * scale and np.mean(err) < 0.05 * scale


# --------------------------------------------------------------------------------------------
# Transfer learning.


@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_transfer_compatibility(norm, spatial_dims):
  features = (4, 8, 16)
  spatial = (8,) * spatial_dims
  pre = UNet(out_channels=3, features=features, spatial_dims=spatial_dims, norm=norm)
  new = UNet(out_channels=2, features=features, spatial_dims=spatial_dims, norm=norm)
  v_pre = jax.eval_shape(pre.init, jax.random.key(0), jnp.zeros((1, *spatial, 8)))
  v_new = jax.eval_shape(new.init, jax.random.key(0), jnp.zeros((1, *spatial, 4)))
  swapped = ("input_conv", "output_conv")
  assert set(v_pre) == set(v_new)
  for col in v_pre:
    keep_pre = {k: v for k, v in v_pre[col].items() if k not in swapped}
    keep_new = {k: v for k, v in v_new[col].items() if k not in swapped}
    assert (jax.tree_util.tree_structure(keep_pre) == jax.tree_util.tree_structure(keep_new))
    assert _shapes(keep_pre) == _shapes(keep_new)
  assert v_pre["params"]["input_conv"]["conv"]["kernel"].shape[-2] == 8
  assert v_new["params"]["input_conv"]["conv"]["kernel"].shape[-2] == 4
  assert v_pre["params"]["output_conv"]["kernel"].shape[-1] == 3
  assert v_new["params"]["output_conv"]["kernel"].shape[-1] == 2


def test_transfer_graft_runs():
  features = (4, 8, 16)
  pre = UNet(out_channels=3, features=features)
  new = UNet(out_channels=2, features=features)
  v_pre = _init(pre, jnp.zeros((1, 8, 8, 8)), seed=1)
  v_new = _init(new, jnp.zeros((1, 8, 8, 4)), seed=2)
  grafted = {"params": {k: v_pre["params"][k] if k not in ("input_conv", "output_conv") else v
                        for k, v in v_new["params"].items()}}
  y = _apply(new, grafted, _random((1, 8, 8, 4)))
  assert y.shape == (1, 8, 8, 2)


def test_maxpool_same_param_shapes_as_conv():
  x = _random((1, 16, 16, 2))
  conv = UNet(out_channels=2, features=(4, 8, 16))
  pool = UNet(out_channels=2, features=(4, 8, 16), downsample="maxpool")
  v_pool = _init(pool, x)
  assert _shapes(jax.eval_shape(conv.init, jax.random.key(0), x)) == _shapes(v_pool)
  y_pool, feats = _apply(pool, v_pool, x, return_features=True)
  assert y_pool.shape == (1, 16, 16, 2)
  assert feats["encoder_1"].shape == (1, 8, 8, 8)
  assert feats["bottleneck"].shape == (1, 4, 4, 16)
  assert np.all(np.isfinite(np.asarray(y_pool)))


def test_maxpool_3d():
  model = UNet(out_channels=3, features=(4, 8, 8), spatial_dims=3, downsample="maxpool",
               norm="group", num_groups=4)
  x = _random((1, 8, 4, 8, 1))
  y = _apply(model, _init(model, x), x)
  assert y.shape == (1, 8, 4, 8, 3)


# --------------------------------------------------------------------------------------------
# Norms and dropout.


def test_batch_norm_updates_stats_only_in_train():
  model = UNet(out_channels=2, features=(4, 8), norm="batch")
  x = _random((4, 8, 8, 3)) * 3.0 + 1.0
  variables = _init(model, x)
  assert "batch_stats" in variables
  params, stats = variables["params"], variables["batch_stats"]
  y, updates = _apply(model, variables, x, train=True, mutable=["batch_stats"])
  assert y.shape == (4, 8, 8, 2)
  changed = jax.tree_util.tree_map(lambda a, b: not np.allclose(a, b), stats,
                                   updates["batch_stats"])
  assert all(jax.tree_util.tree_leaves(changed))
  # Running mean follows momentum 0.9: new = 0.9 * old + 0.1 * batch mean.
  conv_out = jax.lax.conv_general_dilated(
      x, params["input_conv"]["conv"]["kernel"], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(updates["batch_stats"]["input_conv"]["norm"]["mean"],
                             0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
  _, eval_updates = _apply(model, variables, x, train=False, mutable=["batch_stats"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, stats, eval_updates["batch_stats"])


def test_instance_norm_per_example_per_channel():
  layer = ConvNormAct(6, norm="instance", negative_slope=1.0)  # identity activation
  x = _random((3, 8, 8, 2)) * 5.0 + 7.0
  variables = _init(layer, x)
  norm = variables["params"]["norm"]
  y = _apply(layer, variables, x)
  np.testing.assert_allclose(y.mean(axis=(1, 2)), np.broadcast_to(norm["bias"], (3, 6)),
                             atol=1e-5)
  np.testing.assert_allclose(y.var(axis=(1, 2)), np.broadcast_to(norm["scale"]**2, (3, 6)),
                             rtol=1e-3)


def test_norm_none_has_conv_bias():
  model = UNet(out_channels=2, features=(4, 8), norm="none")
  params = _init(model, jnp.zeros((1, 4, 4, 1)))["params"]
  assert params["input_conv"]["conv"]["bias"].shape == (4,)
  assert "norm" not in params["input_conv"]


def test_dropout_train_vs_eval():
  model = UNet(out_channels=2, features=(4, 8), dropout=0.3, convs_per_level=1)
  x = _random((2, 4, 4, 1))
  variables = _init(model, x)
  # "rbg" keys: XLA:CPU compiles threefry bit generation very slowly.
  key = functools.partial(jax.random.key, impl="rbg")
  train_fn = jax.jit(functools.partial(model.apply, train=True))
  eval_fn = jax.jit(model.apply)
  y1 = train_fn(variables, x, rngs={"dropout": key(1)})
  y2 = train_fn(variables, x, rngs={"dropout": key(2)})
  y1_again = train_fn(variables, x, rngs={"dropout": key(1)})
  assert not np.allclose(y1, y2)
  np.testing.assert_array_equal(y1, y1_again)
  e1 = eval_fn(variables, x)
  e2 = eval_fn(variables, x, rngs={"dropout": key(3)})
  np.testing.assert_array_equal(e1, e2)


# --------------------------------------------------------------------------------------------
# Validation.


def test_group_norm_divisibility_error():
  model = UNet(out_channels=2, features=(8, 12), norm="group", num_groups=8)
  with pytest.raises(ValueError, match=r"num_groups=8.*\(12,\)"):
    _init(model, jnp.zeros((1, 8, 8, 1)))


def test_group_norm_works():
  model = UNet(out_channels=2, features=(8, 16), norm="group", num_groups=4)
  x = _random((2, 8, 8, 3))
  assert _apply(model, _init(model, x), x).shape == (2, 8, 8, 2)


def test_non_divisible_spatial_error_names_shape():
  model = UNet(out_channels=2, features=(4, 8, 16))
  with pytest.raises(ValueError, match=r"\(1, 18, 16, 1\).*divisible by 4"):
    _init(model, jnp.zeros((1, 18, 16, 1)))


@pytest.mark.parametrize("kwargs, shape, match", [
    (dict(spatial_dims=3), (1, 8, 8, 1), "ndim 5"),
    (dict(spatial_dims=2), (1, 8, 8, 8, 1), r"\(1, 8, 8, 8, 1\)"),
    (dict(spatial_dims=1), (1, 8, 1), "spatial_dims"),
    (dict(norm="layer"), (1, 8, 8, 1), "norm"),
    (dict(features=(8,)), (1, 8, 8, 1), "features"),
    (dict(downsample="stride"), (1, 8, 8, 1), "downsample"),
    (dict(convs_per_level=0), (1, 8, 8, 1), "convs_per_level"),
])
def test_validation_errors(kwargs, shape, match):
  model = UNet(out_channels=2, **{"features": (4, 8), **kwargs})
  with pytest.raises(ValueError, match=match):
    _init(model, jnp.zeros(shape))


# UpConv's parity with torch is tested in test_blocks.py.


# --------------------------------------------------------------------------------------------
# jit.


def test_jit_compatible():
  model = UNet(out_channels=2, features=(4, 8), norm="batch", convs_per_level=1)
  x = _random((2, 4, 6, 1))
  variables = _init(model, x)
  eval_fn = jax.jit(functools.partial(model.apply, return_features=True))
  logits, feats = eval_fn(variables, x)
  assert logits.shape == (2, 4, 6, 2)
  assert feats["bottleneck"].shape == (2, 2, 3, 8)

  @jax.jit
  def train_step(variables, x):
    def loss_fn(params):
      y, updates = model.apply({**variables, "params": params}, x, train=True,
                               mutable=["batch_stats"])
      return jnp.mean(y**2), updates
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    return loss, grads, updates

  loss, grads, updates = train_step(variables, x)
  assert np.isfinite(loss)
  assert _shapes(grads) == _shapes(variables["params"])
  assert _shapes(updates["batch_stats"]) == _shapes(variables["batch_stats"])

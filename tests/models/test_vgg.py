"""Tests for jaxmed.models.vgg (parity with torch is in tests/interop/test_vgg_lpips.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxmed.models.vgg import LAYER_NAMES, LPIPS_TAPS, VGG16, adaptive_avg_pool_2d


def _count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


def _template(model, shape=(1, 32, 32, 3)):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


def _num_convs(model, variables, x, **kwargs):
  """Convolutions in the traced forward pass (nothing is compiled)."""
  jaxpr = jax.make_jaxpr(functools.partial(model.apply, **kwargs))(variables, x)
  return str(jaxpr).count("conv_general_dilated")


def test_layer_names():
  assert LAYER_NAMES == (
      "relu1_1", "relu1_2", "pool1", "relu2_1", "relu2_2", "pool2",
      "relu3_1", "relu3_2", "relu3_3", "pool3", "relu4_1", "relu4_2", "relu4_3", "pool4",
      "relu5_1", "relu5_2", "relu5_3", "pool5")
  assert LPIPS_TAPS == ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")


@pytest.mark.parametrize("batch_norm, params", [(False, 138_357_544), (True, 138_365_992)])
def test_parameter_counts_match_torchvision(batch_norm, params):
  # torchvision vgg16 / vgg16_bn with the 1000-class classifier.
  v = _template(VGG16(batch_norm=batch_norm, include_top=True), (1, 224, 224, 3))
  assert _count(v["params"]) == params
  assert ("batch_stats" in v) == batch_norm
  v = _template(VGG16(batch_norm=batch_norm))
  assert _count(v["params"]) == params - 123_642_856  # the classifier's share
  assert "fc1" not in v["params"]


def test_tap_shapes_and_output():
  model = VGG16()
  x = jnp.zeros((2, 64, 48, 1))
  v = _template(model, x.shape)
  assert v["params"]["conv1_1"]["kernel"].shape == (3, 3, 1, 64)
  assert v["params"]["conv5_3"]["bias"].shape == (512,)
  out, feats = jax.eval_shape(functools.partial(model.apply, return_features=True), v, x)
  assert out.shape == (2, 2, 1, 512)
  widths = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}
  for name in LAYER_NAMES:
    b = int(name[4] if name.startswith("relu") else name[-1])
    scale = 2 ** (b - 1) if name.startswith("relu") else 2**b
    assert feats[name].shape == (2, 64 // scale, 48 // scale, widths[b]), name
    assert feats[name].dtype == jnp.float32


def test_classifier_output_shape_and_dtype():
  model = VGG16(include_top=True, num_classes=3, head_width=8, dtype=jnp.bfloat16)
  x = jnp.zeros((2, 40, 36, 3))
  v = _template(model, x.shape)
  assert v["params"]["fc1"]["kernel"].shape == (512 * 7 * 7, 8)
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(v))
  out, feats = jax.eval_shape(functools.partial(model.apply, return_features=True), v, x)
  assert out.shape == (2, 3) and out.dtype == jnp.float32
  assert feats["relu3_3"].dtype == jnp.float32


def test_taps_stop_early():
  model = VGG16(batch_norm=True, include_top=True, num_classes=2, head_width=4)
  x = jnp.zeros((1, 32, 32, 3))
  v = _template(model, x.shape)
  assert _num_convs(model, v, x) == 13
  assert _num_convs(model, v, x, taps=("relu3_3", "relu1_2")) == 7
  assert _num_convs(model, v, x, taps="pool1") == 2
  feats = jax.eval_shape(functools.partial(model.apply, taps=("relu3_3", "relu1_2")), v, x)
  assert set(feats) == {"relu3_3", "relu1_2"}
  assert feats["relu3_3"].shape == (1, 8, 8, 256)
  # No pool is run before relu1_2, so any size works; relu2_1 needs 2 x 2.
  tiny = jax.eval_shape(functools.partial(model.apply, taps=("relu1_2",)), v,
                        jnp.zeros((1, 1, 1, 3)))
  assert tiny["relu1_2"].shape == (1, 1, 1, 64)
  with pytest.raises(ValueError, match=r"H and W must be >= 2.*relu2_1"):
    jax.eval_shape(functools.partial(model.apply, taps=("relu2_1",)), v, jnp.zeros((1, 1, 4, 3)))


def test_adaptive_avg_pool_matches_torch():
  x = np.random.default_rng(0).normal(size=(2, 10, 13, 3)).astype(np.float32)
  for size in [(7, 7), (3, 5), (10, 13)]:
    expected = torch.nn.functional.adaptive_avg_pool2d(
        torch.from_numpy(np.moveaxis(x, -1, 1).copy()), size).numpy()
    np.testing.assert_allclose(adaptive_avg_pool_2d(jnp.asarray(x), size),
                               np.moveaxis(expected, 1, -1), atol=1e-6)
  up = adaptive_avg_pool_2d(jnp.asarray(x[:, :1, :2]), (7, 7))  # 1 x 2 -> 7 x 7 replicates
  np.testing.assert_allclose(up[:, :, 0], np.repeat(x[:, :1, 0], 7, axis=1), atol=1e-6)


def test_classifier_dropout_only_in_train():
  # Traced, not run (running the head compiles the whole conv stack): train mode draws one
  # random mask per dropout layer, eval mode none (and needs no rng; the parity tests run it).
  model = VGG16(include_top=True, num_classes=2, head_width=8)
  x = jnp.zeros((1, 32, 32, 3))
  v = _template(model, x.shape)

  def jaxpr(module, train):
    fn = functools.partial(module.apply, train=train,
                           rngs={"dropout": jax.random.key(0, impl="rbg")})
    return str(jax.make_jaxpr(fn)(v, x))

  train, evaluation = jaxpr(model, True), jaxpr(model, False)
  assert train.count("random_fold_in") == 2 and "random_bits" in train  # one key per layer
  assert "random_bits" not in evaluation and "random_fold_in" not in evaluation
  assert "random_bits" not in jaxpr(model.clone(dropout=0.0), True)


@pytest.mark.parametrize("kwargs, call, shape, match", [
    (dict(), dict(), (1, 32, 32), r"ndim 4.*\(1, 32, 32\)"),
    (dict(), dict(), (1, 32, 32, 32, 1), r"\(N, H, W, C\)"),
    (dict(), dict(), (1, 16, 32, 3), r"\(1, 16, 32, 3\).*>= 32.*pool5"),
    (dict(), dict(taps=("relu6_1",)), (1, 32, 32, 3), r"relu6_1.*valid taps"),
    (dict(), dict(taps=()), (1, 32, 32, 3), "at least one"),
    (dict(), dict(taps=("relu1_1",), return_features=True), (1, 32, 32, 3), "not both"),
    (dict(dropout=1.0), dict(), (1, 32, 32, 3), "dropout"),
    (dict(include_top=True, num_classes=0), dict(), (1, 32, 32, 3), "num_classes"),
    (dict(include_top=True, head_width=0), dict(), (1, 32, 32, 3), "head_width"),
    (dict(), dict(), (1, 32, 32, 0), r"C >= 1"),
])
def test_validation_errors(kwargs, call, shape, match):
  model = VGG16(**kwargs)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(functools.partial(model.init, **call), jax.random.key(0), jnp.zeros(shape))

"""Tests for jaxmed.models.blocks: parity with PyTorch / MONAI layers, invariants, errors."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxmed.interop.state_dict import conv_kernel, conv_transpose_kernel
from jaxmed.models import blocks
from jaxmed.models._utils import check_group_channels, check_input, check_rate
from jaxmed.models.blocks import (MLP, DropPath, PatchConv, PatchEmbed, SameConv, UnetrBasicBlock,
                                  UnetrUpBlock, UpConv, conv3x3, make_norm, parse_norm,
                                  patch_conv)


def _random(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _torch(x):
  """Channels-last array -> channels-first torch tensor."""
  return torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy())


def _channels_last(t):
  return np.moveaxis(t.detach().numpy(), 1, -1)


def _torch_conv(x, kernel, **kwargs):
  """torch conv{2,3}d of a channels-last ``x`` with a Flax ``(*k, Cin, Cout)`` kernel."""
  d = x.ndim - 2
  w = torch.from_numpy(np.transpose(np.asarray(kernel), (d + 1, d) + tuple(range(d))).copy())
  fn = F.conv2d if d == 2 else F.conv3d
  return _channels_last(fn(_torch(x), w, **kwargs))


# --------------------------------------------------------------------------------------------
# Kernel == stride layers.


@pytest.mark.parametrize("shape, patch", [((2, 8, 12, 3), (4, 4)), ((1, 6, 4, 8, 2), (3, 2, 4)),
                                          ((1, 7, 9, 5, 1), (2, 2, 2)), ((2, 5, 6, 2), (2, 4))])
def test_patch_conv_matches_torch_strided_conv_with_end_padding(shape, patch):
  d = len(patch)
  x = _random(shape)
  kernel = _random(patch + (shape[-1], 5), seed=1)
  y = jax.jit(patch_conv)(x, kernel)
  grid = tuple(-(-s // p) for s, p in zip(shape[1:-1], patch))
  assert y.shape == (shape[0],) + grid + (5,)
  # MONAI's PatchEmbed: zero-pad the end of each axis to a multiple of the patch, then the conv.
  pad = []
  for s, p in reversed(list(zip(shape[1:-1], patch))):
    pad += [0, (-s) % p]
  w = torch.from_numpy(np.transpose(np.asarray(kernel), (d + 1, d) + tuple(range(d))).copy())
  conv = F.conv2d if d == 2 else F.conv3d
  expected = _channels_last(conv(F.pad(_torch(x), pad), w, stride=patch))
  np.testing.assert_allclose(y, expected, atol=1e-5)


def test_patch_conv_module_params_and_init():
  x = jnp.zeros((1, 8, 8, 4, 3))
  variables = PatchConv(16, (2, 2, 2)).init(jax.random.key(0, impl="rbg"), x)["params"]
  assert variables["kernel"].shape == (2, 2, 2, 3, 16) and variables["bias"].shape == (16,)
  np.testing.assert_allclose(np.std(variables["kernel"]), np.sqrt(2.0 / (8 * 3)), rtol=0.15)
  assert np.all(variables["bias"] == 0)
  no_bias = jax.eval_shape(PatchConv(16, (2, 2, 2), use_bias=False).init, jax.random.key(0), x)
  assert set(no_bias["params"]) == {"kernel"}
  embed = jax.eval_shape(PatchEmbed(16, (2, 2, 2), patch_norm=True).init, jax.random.key(0), x)
  assert set(embed["params"]) == {"proj", "norm"}
  with pytest.raises(ValueError, match=r"patch_size=\(2, 2\).*\(1, 8, 8, 4, 3\)"):
    jax.eval_shape(PatchConv(16, (2, 2)).init, jax.random.key(0), x)


def _torch_conv_transpose(x, kernel, bias):
  d = x.ndim - 2
  # (2,)*d + (Cin, Cout) -> (Cin, Cout, *k); no spatial flip.
  w_t = torch.from_numpy(np.transpose(np.asarray(kernel), (d, d + 1, *range(d))).copy())
  b_t = torch.from_numpy(np.asarray(bias).copy())
  fn = F.conv_transpose2d if d == 2 else F.conv_transpose3d
  return _channels_last(fn(_torch(x), w_t, b_t, stride=2))


@pytest.mark.parametrize("d", [2, 3])
def test_upconv_matches_torch(d):
  rng = np.random.default_rng(d)
  for trial in range(3):
    n = int(rng.integers(1, 3))
    spatial = tuple(int(s) for s in rng.integers(1, 6, size=d))
    cin, cout = (int(c) for c in rng.integers(1, 7, size=2))
    x = jnp.asarray(rng.normal(size=(n, *spatial, cin)), jnp.float32)
    layer = UpConv(cout)
    variables = jax.eval_shape(layer.init, jax.random.key(trial), x)
    kernel = jnp.asarray(rng.normal(size=(2,) * d + (cin, cout)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(cout,)), jnp.float32)
    assert variables["params"]["kernel"].shape == kernel.shape
    assert variables["params"]["bias"].shape == bias.shape
    y = layer.apply({"params": {"kernel": kernel, "bias": bias}}, x)
    assert y.shape == (n, *(2 * s for s in spatial), cout)
    expected = _torch_conv_transpose(x, kernel, bias)
    assert np.max(np.abs(np.asarray(y) - expected)) <= 1e-5
    # A spatially flipped kernel would not match (guards the layout convention).
    flipped = jnp.flip(kernel, axis=tuple(range(d)))
    assert np.max(np.abs(_torch_conv_transpose(x, flipped, bias) - expected)) > 1e-3


def test_upconv_explicit_formula():
  x = _random((1, 2, 3, 2), seed=5)
  kernel = _random((2, 2, 2, 3), seed=6)
  bias = _random((3,), seed=7)
  y = UpConv(3).apply({"params": {"kernel": kernel, "bias": bias}}, x)
  for i in range(2):
    for j in range(3):
      for a in range(2):
        for b in range(2):
          np.testing.assert_allclose(y[0, 2 * i + a, 2 * j + b],
                                     x[0, i, j] @ kernel[a, b] + bias, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Fast 'same' convolution.


@pytest.mark.parametrize("x_shape, k_shape", [
    ((2, 5, 6, 4, 3), (3, 3, 3, 3, 7)),  # Cin * kd <= 16: depth taps stacked on channels
    ((1, 4, 5, 6, 12), (3, 3, 3, 12, 5)),  # Cin > Cout: depth taps as output channels
    ((1, 4, 5, 6, 6), (3, 3, 3, 6, 8)),  # one 2D conv per depth tap
    ((1, 4, 5, 6, 6), (5, 3, 1, 6, 4)),  # an anisotropic odd kernel
    ((2, 3, 5, 4, 2), (1, 3, 3, 2, 3)),  # kd == 1
    ((2, 7, 6, 5), (3, 3, 5, 4)),  # 2D
])
def test_conv3x3_matches_torch(x_shape, k_shape):
  x, kernel = _random(x_shape), _random(k_shape, seed=1)
  y = jax.jit(conv3x3)(x, kernel)
  expected = _torch_conv(x, kernel, padding=tuple(k // 2 for k in k_shape[:-2]))
  assert y.shape == expected.shape
  np.testing.assert_allclose(y, expected, atol=2e-5)


def test_same_conv_module():
  x = _random((1, 3, 4, 5, 6))
  for k in (1, 3):
    layer = SameConv(4, kernel_size=k)
    variables = layer.init(jax.random.key(0, impl="rbg"), x)
    kernel = variables["params"]["kernel"]
    assert set(variables["params"]) == {"kernel"} and kernel.shape == (k, k, k, 6, 4)
    np.testing.assert_allclose(layer.apply(variables, x), _torch_conv(x, kernel, padding=k // 2),
                               atol=2e-5)
  with pytest.raises(ValueError, match="2D or 3D"):
    conv3x3(jnp.zeros((1, 4, 2)), jnp.zeros((3, 2, 2)))


# --------------------------------------------------------------------------------------------
# Norms.


def _norm_variables(module, x, seed=0):
  """Variables of a norm with random scale / bias (and running statistics)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  return jax.tree_util.tree_map_with_path(
      lambda p, leaf: jnp.asarray((1.0 if p[-1].key in ("scale", "var") else 0.0)
                                  + 0.3 * np.abs(rng.normal(size=leaf.shape)), leaf.dtype), shapes)


@pytest.mark.parametrize("kind, kwargs, torch_norm", [
    ("instance", dict(affine=False), lambda c: torch.nn.InstanceNorm3d(c)),
    ("instance", dict(), lambda c: torch.nn.InstanceNorm3d(c, affine=True)),
    ("group", dict(num_groups=2), lambda c: torch.nn.GroupNorm(2, c)),
    ("batch", dict(), lambda c: torch.nn.BatchNorm3d(c)),
    ("layer", dict(epsilon=1e-6), lambda c: torch.nn.LayerNorm(c, eps=1e-6)),
])
def test_make_norm_matches_torch(kind, kwargs, torch_norm):
  x = _random((2, 3, 4, 5, 6)) * 3.0 + 1.0
  module = make_norm(kind, name="norm", **kwargs)
  variables = _norm_variables(module, x)
  y = module.apply(variables, x)
  ref = torch_norm(6).eval()
  params = variables.get("params", {})
  with torch.no_grad():
    if "scale" in params:
      ref.weight.copy_(torch.tensor(np.asarray(params["scale"])))
      ref.bias.copy_(torch.tensor(np.asarray(params["bias"])))
    if kind == "batch":
      ref.running_mean.copy_(torch.tensor(np.asarray(variables["batch_stats"]["mean"])))
      ref.running_var.copy_(torch.tensor(np.asarray(variables["batch_stats"]["var"])))
    if kind == "layer":
      expected = ref(torch.tensor(np.asarray(x))).numpy()
    else:
      expected = _channels_last(ref(_torch(x)))
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, expected, atol=1e-5)
  assert ("scale" in params) == kwargs.get("affine", True)


def test_make_norm_batch_train_and_none():
  x = _random((4, 3, 5))
  bn = make_norm("batch", train=True, momentum=0.5)
  variables = bn.init(jax.random.key(0), x)
  y, updates = bn.apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_allclose(np.mean(np.asarray(y), axis=(0, 1)), 0.0, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["mean"],
                             0.5 * np.mean(np.asarray(x), axis=(0, 1)), atol=1e-6)
  assert make_norm("none")(x) is x
  with pytest.raises(ValueError, match=r"norm must be one of .*got norm='rms'"):
    make_norm("rms")


def test_parse_norm_specs_and_errors():
  assert parse_norm("instance") == blocks.INSTANCE_NORM
  assert parse_norm(["group", {"num_groups": 4}]) == (
      "group", (("affine", True), ("eps", 1e-5), ("num_groups", 4)))
  assert parse_norm(("syncbatch", {"momentum": 0.2}))[0] == "batch"
  assert parse_norm(parse_norm("batch")) == parse_norm("batch")  # idempotent
  for bad, match in [("layer", "norm_name must be one of"), (("group", {}), "num_groups >= 1"),
                     (("instance", {"foo": 1}), r"does not support option\(s\) \['foo'\]"),
                     (3, "a name or")]:
    with pytest.raises(ValueError, match=match):
      parse_norm(bad)
  with pytest.raises(ValueError, match=r"num_groups=4.*\(6,\)"):
    blocks.check_norm_channels(parse_norm(("group", {"num_groups": 4})), (8, 6))


# --------------------------------------------------------------------------------------------
# DropPath and MLP.


def test_drop_path_per_sample():
  x = jnp.ones((64, 3, 5))
  layer = DropPath(0.25)
  np.testing.assert_array_equal(layer.apply({}, x), x)  # eval: identity, no rng needed
  y = np.asarray(layer.apply({}, x, train=True, rngs={"dropout": jax.random.key(0)}))
  per_sample = y.reshape(64, -1)
  # Every sample is either dropped entirely or kept and scaled by 1 / (1 - rate).
  assert set(np.unique(per_sample)) <= {0.0, np.float32(1.0 / 0.75)}
  assert np.all(per_sample.min(axis=1) == per_sample.max(axis=1))
  assert 0 < np.sum(per_sample[:, 0] == 0) < 64
  assert np.all(DropPath(1.0).apply({}, x, train=True, rngs={"dropout": jax.random.key(0)}) == 0)


@pytest.mark.parametrize("names", [("linear1", "linear2"), ("fc1", "fc2")])
def test_mlp_names_and_formula(names):
  x = _random((2, 5, 6))
  layer = MLP(10, dropout_rate=0.5, names=names)
  variables = layer.init(jax.random.key(0), x)
  p = variables["params"]
  assert set(p) == set(names) and p[names[0]]["kernel"].shape == (6, 10)
  h = jax.nn.gelu(x @ p[names[0]]["kernel"] + p[names[0]]["bias"], approximate=False)
  np.testing.assert_allclose(layer.apply(variables, x),
                             h @ p[names[1]]["kernel"] + p[names[1]]["bias"], atol=1e-5)
  train = layer.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(train, layer.apply(variables, x))


# --------------------------------------------------------------------------------------------
# UNETR blocks against MONAI.


def _from_monai(state, template):
  """MONAI block state dict -> Flax variables of the same structure (template)."""

  def leaf(path, shape):
    names = [p.key for p in path[1:]]
    *mods, last = names
    if last == "kernel":
      w = state[".".join(mods) + ".conv.weight"].numpy()
      w = conv_transpose_kernel(w) if mods[-1] == "transp_conv" else conv_kernel(w)
    else:
      w = state[".".join(mods) + (".weight" if last == "scale" else ".bias")].numpy()
    assert w.shape == shape.shape, (names, w.shape, shape.shape)
    return jnp.asarray(w)

  return jax.tree_util.tree_map_with_path(leaf, template)


def _randomize(module, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim == 1 else 0.2)
              + (1.0 if p.ndim == 1 else 0.0))
  return module.eval()


@pytest.mark.parametrize("norm_name, d", [("instance", 3), (("group", {"num_groups": 2}), 3),
                                          (("instance", {"affine": True}), 2)])
def test_unetr_blocks_match_monai(norm_name, d):
  from monai.networks.blocks import UnetrBasicBlock as MonaiBasic
  from monai.networks.blocks import UnetrUpBlock as MonaiUp
  x = _random((2, 5, 6, 4, 3)[:d + 1] + (3,))
  skip = _random((2,) + tuple(2 * s for s in x.shape[1:-1]) + (4,), seed=1)
  norm = parse_norm(norm_name)
  cases = [
      (MonaiBasic(d, 3, 4, 3, 1, norm_name, res_block=True), UnetrBasicBlock(4, norm), (x,)),
      (MonaiUp(d, 3, 4, 3, 2, norm_name, res_block=True), UnetrUpBlock(4, norm), (x, skip)),
  ]
  for seed, (ref, ours, inputs) in enumerate(cases):
    ref = _randomize(ref, seed)
    template = jax.eval_shape(functools.partial(ours.init, jax.random.key(0)), *inputs)
    variables = _from_monai(ref.state_dict(), template)
    with torch.no_grad():
      expected = _channels_last(ref(*map(_torch, inputs)))
    np.testing.assert_allclose(jax.jit(ours.apply)(variables, *inputs), expected, atol=2e-5)


# --------------------------------------------------------------------------------------------
# Argument helpers.


def test_argument_helpers():
  with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\); got dropout=1.0"):
    check_rate(1.0, "dropout")
  check_rate(1.0, "drop_rate", inclusive=True)
  with pytest.raises(ValueError, match=r"drop_rate must be in \[0, 1\]"):
    check_rate(1.5, "drop_rate", inclusive=True)
  with pytest.raises(ValueError, match=r"Net with spatial_dims=3 .*\(N, D, H, W, C\).*\(1, 4, 1\)"):
    check_input(jnp.zeros((1, 4, 1)), 3, "Net")
  with pytest.raises(ValueError, match=r"num_groups=4; \(6, 10\) are not"):
    check_group_channels(4, (8, 10, 6, 8))
  with pytest.raises(ValueError, match="num_groups must be an int >= 1"):
    check_group_channels(0, (8,))
  assert make_norm("group", num_groups=2).num_groups == 2
  assert make_norm("instance").num_groups is None


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("shape, kind, groups", [
    ((2, 5, 7, 12), "instance", None), ((1, 3, 4, 5, 8), "group", 4), ((3, 9, 6), "instance", None),
    ((2, 6, 6, 20), "group", 10), ((2, 4, 4, 4, 3), "group", 1),
    ((2, 1031, 3), "instance", None),       # a prime extent: zero-padded to blocks of 1024
    ((1, 16, 20, 15, 4), "group", 2)])      # 4800 voxels: blocks of 960
def test_group_stats_norm_equals_flax_norms_values_and_gradients(shape, kind, groups, backend,
                                                                 monkeypatch):
  # Same variable tree and numbers as Flax's two-pass norms, on both summation paths (CPU's
  # matrix-vector products and the plain reductions of other backends).
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  x = _random(shape) * 3.0 + 1.0
  module = make_norm(kind, num_groups=groups or 32)
  ref = (nn.InstanceNorm(epsilon=1e-5, use_fast_variance=False) if kind == "instance"
         else nn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=False))
  variables = _norm_variables(module, x)
  assert (jax.tree.structure(variables)
          == jax.tree.structure(jax.eval_shape(ref.init, jax.random.key(0), x)))
  # Jitted: one compile per function instead of one per operation (14.4 -> 5 s for the cases).
  np.testing.assert_allclose(jax.jit(module.apply)(variables, x),
                             jax.jit(ref.apply)(variables, x), atol=3e-6)
  loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)) * x)
  got = jax.jit(jax.grad(loss(module), (0, 1)))(variables, x)
  want = jax.jit(jax.grad(loss(ref), (0, 1)))(variables, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    # A gradient entry is a sum over many voxels: its float32 error scales with the leaf's
    # largest entries (~100 here), and depends on how XLA fuses the sums.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5 * max(1.0, float(np.abs(b).max())))
  with pytest.raises(ValueError, match=r"num_groups=4; \(6,\) are not"):
    make_norm("group", num_groups=4).init(jax.random.key(0), _random((1, 3, 3, 6)))
  with pytest.raises(ValueError, match=r"GroupStatsNorm input must be \(N, \*spatial, C\)"):
    make_norm("instance").init(jax.random.key(0), _random((2, 6)))


@pytest.mark.parametrize("rows, cin, cout, use_bias", [
    ((2, 5), 3, 4, True), ((4096,), 6, 5, True), ((1031,), 4, 3, False), ((3, 16, 20, 15), 1, 7, True)])
def test_linear_gradient_equals_xla_derivative(rows, cin, cout, use_bias):
  # The hand-written CPU gradient (blocked sums over rows) against XLA's derivative of x @ k + b;
  # 1031 rows (a prime) take the zero-padded path, 14400 rows blocks of 960.
  x = _random(rows + (cin,))
  kernel, bias = _random((cin, cout), seed=1), _random((cout,), seed=2) if use_bias else None
  weight = _random(rows + (cout,), seed=3)
  ref = lambda x, k, b: jnp.einsum("...c,co->...o", x, k) + (0.0 if b is None else b)
  loss = lambda f: lambda x, k, b: jnp.sum(jnp.sin(f(x, k, b)) * weight)
  np.testing.assert_allclose(blocks.linear(x, kernel, bias), ref(x, kernel, bias), atol=1e-6)
  got = jax.jit(jax.grad(loss(blocks.linear), (0, 1, 2)))(x, kernel, bias)
  want = jax.jit(jax.grad(loss(ref), (0, 1, 2)))(x, kernel, bias)
  assert (got[2] is None) == (bias is None)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_has_flax_dense_variables_and_numbers(dtype):
  x = _random((2, 3, 5))
  for kwargs in ({}, {"use_bias": False}, {"kernel_init": nn.initializers.ones}):
    ours, ref = blocks.Dense(4, dtype=dtype, **kwargs), nn.Dense(4, dtype=dtype, **kwargs)
    variables = ours.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, ref.init(jax.random.key(0), x))
    jax.tree.map(np.testing.assert_array_equal, variables, ref.init(jax.random.key(0), x))
    got, want = ours.apply(variables, x), ref.apply(variables, x)
    assert got.dtype == want.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=1e-6 if dtype == jnp.float32 else 2e-2)
    grads = [jax.grad(lambda v, m=m: jnp.sum(m.apply(v, x).astype(jnp.float32) ** 2))(variables)
             for m in (ours, ref)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
      assert a.dtype == b.dtype
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                 rtol=1e-5 if dtype == jnp.float32 else 5e-2, atol=1e-5)


@pytest.mark.parametrize("shape, bias_shape, with_mask", [
    ((2, 3, 2, 27, 4), (2, 27, 27), True),    # Swin: (B, windows, heads, n, d), bias per head
    ((2, 4, 17, 8), None, False),              # ViT: (B, heads, tokens, d)
    ((3, 9, 5), (9, 9), False)])
def test_attention_gradient_equals_xla_derivative(shape, bias_shape, with_mask):
  # The hand-written CPU gradient against XLA's derivative of the same softmax attention.
  rng = np.random.default_rng(0)
  q, k, v, g = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(4))
  bias = None if bias_shape is None else jnp.asarray(rng.normal(size=bias_shape), jnp.float32)
  mask = None
  if with_mask:  # Swin's -100 across shifted-window regions, one per window
    mask = jnp.asarray(np.where(rng.random((shape[1], 1) + shape[-2:-1] * 2) < 0.3, -100.0, 0.0),
                       jnp.float32)
  ours = lambda q, k, v, b: jnp.sum(blocks.attention(q, k, v, b, mask) * g)
  ref = lambda q, k, v, b: jnp.sum(blocks._attend(q, k, v, b, mask)[0] * g)  # pylint: disable=protected-access
  np.testing.assert_allclose(jax.jit(ours)(q, k, v, bias), jax.jit(ref)(q, k, v, bias), rtol=1e-6)
  got = jax.jit(jax.grad(ours, (0, 1, 2, 3)))(q, k, v, bias)
  want = jax.jit(jax.grad(ref, (0, 1, 2, 3)))(q, k, v, bias)
  assert (got[3] is None) == (bias is None)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=5e-6)
  # dropout (any function of the probabilities) applies before the product with v.
  np.testing.assert_allclose(blocks.attention(q, k, v, bias, mask, dropout=lambda p: 2 * p),
                             2 * blocks.attention(q, k, v, bias, mask), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"attention bias must have the trailing shape"):
    blocks.attention(q, k, v, jnp.zeros((3, 3)))

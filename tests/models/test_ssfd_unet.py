"""Tests for jaxmed.models.ssfd_unet against a PyTorch rebuild of meddlr's SSFD network.

The encoder below follows ``SSFD_Encoder`` / ``DoubleConv`` / ``EncoderBlock`` of
``meddlr/metrics/ssfd.py`` layer for layer (meddlr is not installable here), generalised to any
``chans`` / number of levels and to 3D; the decoder is the layout documented in
``jaxmed/interop/ssfd.py`` (the published checkpoint has none).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxmed.interop.ssfd import ssfd_unet_from_torch
from jaxmed.models.ssfd_unet import SSFDEncoder, SSFDUNet, tap_names

TOL = 1e-4


# --------------------------------------------------------------------------------------------
# The PyTorch reference.


def _layers(d):
  nn = torch.nn
  return ((nn.Conv2d, nn.MaxPool2d, nn.ConvTranspose2d) if d == 2 else
          (nn.Conv3d, nn.MaxPool3d, nn.ConvTranspose3d))


class _DoubleConv(torch.nn.Module):
  """meddlr DoubleConv: conv1 -> ReLU -> conv2 -> ReLU (tap) -> GN; its dropout is never used."""

  def __init__(self, in_ch, out_ch, d=2):
    super().__init__()
    conv = _layers(d)[0]
    self.conv1 = conv(in_ch, out_ch, kernel_size=3, padding=1)
    self.conv2 = conv(out_ch, out_ch, kernel_size=3, padding=1)
    self.GN = torch.nn.GroupNorm(num_groups=10, num_channels=out_ch)
    self.ReLu = torch.nn.ReLU(inplace=True)
    self.droupout = torch.nn.Dropout(p=0.1)

  def forward(self, x):
    x = self.ReLu(self.conv2(self.ReLu(self.conv1(x))))
    return self.GN(x), x


class _EncoderBlock(torch.nn.Module):

  def __init__(self, in_ch, out_ch, d=2):
    super().__init__()
    self.MP = _layers(d)[1](2)
    self.conv_block = _DoubleConv(in_ch, out_ch, d)

  def forward(self, x):
    return self.conv_block(self.MP(x))


class _Decoder(torch.nn.Module):

  def __init__(self, in_ch, out_ch, d=2):
    super().__init__()
    self.up = _layers(d)[2](in_ch, out_ch, kernel_size=2, stride=2)
    self.conv_block = _DoubleConv(2 * out_ch, out_ch, d)

  def forward(self, x, skip):
    return self.conv_block(torch.cat([self.up(x), skip], 1))


class _TorchSSFD(torch.nn.Module):
  """SSFD_Encoder (``firstblock``, ``encoder{j}``) plus, optionally, the UNet decoder."""

  def __init__(self, in_ch=1, chans=20, levels=4, out_ch=None, d=2):
    super().__init__()
    self.levels = levels
    self.firstblock = _DoubleConv(in_ch, chans, d)
    for j in range(1, levels + 1):
      setattr(self, f"encoder{j}", _EncoderBlock(chans * 2**(j - 1), chans * 2**j, d))
    self.decoder = out_ch is not None
    if self.decoder:
      for k in range(levels, 0, -1):
        setattr(self, f"decoder{k}", _Decoder(chans * 2**k, chans * 2**(k - 1), d))
      self.outconv = _layers(d)[0](chans, out_ch, kernel_size=1)

  def forward(self, x):
    feats = {}
    x, feats["block1_relu2"] = self.firstblock(x)
    feats["block1"] = x
    for j in range(1, self.levels + 1):
      x, feats[f"block{j + 1}_relu2"] = getattr(self, f"encoder{j}")(x)
      feats[f"block{j + 1}"] = x
    if not self.decoder:
      return x, feats
    for k in range(self.levels, 0, -1):
      x, feats[f"decoder{k}_relu2"] = getattr(self, f"decoder{k}")(x, feats[f"block{k}"])
      feats[f"decoder{k}"] = x
    return self.outconv(x), feats


def _reference(seed, **kwargs):
  torch.manual_seed(seed)
  model = _TorchSSFD(**kwargs)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.GroupNorm):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.3)
  return model.eval()


def _channels_last(t):
  return np.moveaxis(t.detach().numpy(), 1, -1)


def _run_torch(model, x):
  with torch.no_grad():
    y, feats = model(torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))))
  return _channels_last(y), {k: _channels_last(v) for k, v in feats.items()}


def _max_diff(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def _convert(model, ref, x):
  template = jax.eval_shape(model.init, jax.random.key(0), x)
  converted = ssfd_unet_from_torch(ref.state_dict(), template)
  assert converted.missing == () and converted.unused == ()
  return converted.variables


def _apply_features(model, variables, x, **kwargs):
  return jax.jit(functools.partial(model.apply, return_features=True, **kwargs))(variables, x)


# --------------------------------------------------------------------------------------------
# Parity.


def test_encoder_matches_meddlr_odd_sizes():
  # 3 pools on 26 x 34: MaxPool2d floors 13 -> 6 -> 3 and 17 -> 8 -> 4.
  ref = _reference(0, chans=20, levels=3)
  model = SSFDEncoder(chans=20, num_pool_layers=3)
  x = np.random.default_rng(0).normal(size=(2, 26, 34, 1)).astype(np.float32)
  expected, expected_feats = _run_torch(ref, x)
  y, feats = _apply_features(model, _convert(model, ref, x), x)
  assert y.shape == (2, 3, 4, 160) and y.dtype == jnp.float32
  assert _max_diff(y, expected) <= TOL
  assert set(feats) == set(expected_feats)
  assert tap_names(3) == ("block1_relu2", "block2_relu2", "block3_relu2", "block4_relu2")
  for name, value in expected_feats.items():
    assert _max_diff(feats[name], value) <= TOL, name
    assert feats[name].dtype == jnp.float32
  assert np.all(np.asarray(feats["block3_relu2"]) >= 0)  # a ReLU output, before the norm


@functools.lru_cache(maxsize=None)
def _unet_case():
  ref = _reference(1, chans=20, levels=2, out_ch=2)
  model = SSFDUNet(out_channels=2, chans=20, num_pool_layers=2)
  x = np.random.default_rng(1).normal(size=(2, 16, 12, 1)).astype(np.float32)
  return ref, model, _convert(model, ref, x), x


def test_unet_matches_torch():
  ref, model, variables, x = _unet_case()
  expected, expected_feats = _run_torch(ref, x)
  y, feats = _apply_features(model, variables, x)
  assert y.shape == (2, 16, 12, 2) and y.dtype == jnp.float32
  assert _max_diff(y, expected) <= TOL
  assert set(feats) == set(expected_feats)
  for name, value in expected_feats.items():
    assert _max_diff(feats[name], value) <= TOL, name
  assert feats["decoder1_relu2"].shape == (2, 16, 12, 20)
  assert feats["decoder2"].shape == (2, 8, 6, 40)


def test_unet_encoder_variables_run_with_ssfd_encoder():
  ref, unet, variables, x = _unet_case()
  params = variables["params"]
  assert set(params) == {"encoder", "decoder2", "decoder1", "output_conv"}
  encoder = SSFDEncoder(chans=20, num_pool_layers=2)
  template = jax.eval_shape(encoder.init, jax.random.key(0), x)
  assert (jax.tree_util.tree_map(lambda a: a.shape, template["params"]) ==
          jax.tree_util.tree_map(lambda a: a.shape, params["encoder"]))
  y, feats = _apply_features(encoder, {"params": params["encoder"]}, x)
  _, expected = _run_torch(ref, x)
  assert _max_diff(y, expected["block3"]) <= TOL
  for name in tap_names(2):
    assert _max_diff(feats[name], expected[name]) <= TOL, name


def test_dropout_only_in_train_and_after_the_taps():
  ref, unet, variables, x = _unet_case()
  assert unet.dropout == 0.1  # the paper's rate is the default
  # The first block of the UNet's encoder alone (one dropout layer: a small compile).
  model = SSFDEncoder(chans=20, num_pool_layers=0, dropout=0.1)
  block1 = {"params": {"block1": variables["params"]["encoder"]["block1"]}}
  key = functools.partial(jax.random.key, impl="rbg")
  run = jax.jit(functools.partial(model.apply, return_features=True), static_argnames="train")
  (y1, f1), (y2, f2) = (run(block1, x, train=True, rngs={"dropout": key(s)}) for s in (1, 2))
  y_eval, f_eval = run(block1, x, train=False, rngs={"dropout": key(3)})
  _, expected = _run_torch(ref, x)
  # The tap precedes the dropout; the block output (GroupNorm, then dropout) does not.
  for f in (f1, f2, f_eval):
    assert _max_diff(f["block1_relu2"], expected["block1_relu2"]) <= TOL
  assert _max_diff(y_eval, expected["block1"]) <= TOL  # eval: no dropout, rng or not
  assert not np.allclose(y1, y2)
  dropped = np.asarray(y1) == 0
  assert 0.05 < dropped.mean() < 0.15
  kept = ~dropped
  np.testing.assert_allclose(np.asarray(y1)[kept], expected["block1"][kept] / 0.9, rtol=1e-4,
                             atol=1e-4)


def test_unet_3d_matches_torch():
  ref = _reference(2, chans=20, levels=1, out_ch=1, in_ch=2, d=3)
  model = SSFDUNet(out_channels=1, chans=20, num_pool_layers=1, spatial_dims=3)
  x = np.random.default_rng(2).normal(size=(1, 4, 6, 8, 2)).astype(np.float32)
  expected, expected_feats = _run_torch(ref, x)
  y, feats = _apply_features(model, _convert(model, ref, x), x)
  assert y.shape == (1, 4, 6, 8, 1)
  assert _max_diff(y, expected) <= TOL
  for name in ("block1_relu2", "block2_relu2", "decoder1_relu2", "decoder1"):
    assert _max_diff(feats[name], expected_feats[name]) <= TOL, name


# --------------------------------------------------------------------------------------------
# Shapes, names, truncation (abstract evaluation only).


def test_published_configuration_shapes_and_parameter_count():
  model = SSFDUNet()  # chans 20, 4 pools: 20-40-80-160-320, dropout 0.1
  x = jax.ShapeDtypeStruct((1, 320, 320, 1), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  y, feats = jax.eval_shape(functools.partial(model.apply, return_features=True), variables, x)
  assert y.shape == (1, 320, 320, 1)
  for k, c in enumerate((20, 40, 80, 160, 320), start=1):
    assert feats[f"block{k}_relu2"].shape == (1, 320 // 2**(k - 1), 320 // 2**(k - 1), c)
  for k, c in enumerate((20, 40, 80, 160), start=1):
    assert feats[f"decoder{k}_relu2"].shape == (1, 320 // 2**(k - 1), 320 // 2**(k - 1), c)
  assert set(variables) == {"params"}  # GroupNorm only: no batch statistics
  def count(tree):
    return sum(np.size(a) for a in jax.tree_util.tree_leaves(tree))

  assert count(variables["params"]["encoder"]) == sum(p.numel() for p in _TorchSSFD().parameters())
  assert count(variables["params"]) == sum(p.numel() for p in _TorchSSFD(out_ch=1).parameters())
  # The encoder alone, as meddlr's SSFD metric uses it.
  enc = SSFDEncoder()
  enc_vars = jax.eval_shape(enc.init, jax.random.key(0), x)
  assert (jax.tree_util.tree_map(lambda a: a.shape, enc_vars["params"]) ==
          jax.tree_util.tree_map(lambda a: a.shape, variables["params"]["encoder"]))


def test_last_tap_truncates():
  x = jax.ShapeDtypeStruct((2, 320, 320, 1), jnp.float32)
  model = SSFDEncoder(last_tap="block4_relu2")  # meddlr's default SSFD layer
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert set(variables["params"]) == {"block1", "block2", "block3", "block4"}
  y, feats = jax.eval_shape(functools.partial(model.apply, return_features=True), variables, x)
  assert y.shape == (2, 40, 40, 160)
  assert feats["block4_relu2"].shape == (2, 40, 40, 160)
  assert "block5_relu2" not in feats
  first = SSFDEncoder(last_tap="block1_relu2")
  assert set(jax.eval_shape(first.init, jax.random.key(0), x)["params"]) == {"block1"}


def test_bfloat16_compute_float32_outputs():
  model = SSFDUNet(chans=20, num_pool_layers=2, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(variables))
  y, feats = jax.eval_shape(functools.partial(model.apply, return_features=True), variables, x)
  assert y.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in feats.values())


@pytest.mark.parametrize("cls, kwargs, shape, match", [
    (SSFDEncoder, dict(chans=16), (1, 32, 32, 1), r"chans=16, num_groups=10"),
    (SSFDEncoder, dict(num_groups=0), (1, 32, 32, 1), "num_groups"),
    (SSFDEncoder, dict(spatial_dims=1), (1, 32, 1), "spatial_dims"),
    (SSFDEncoder, dict(), (1, 32, 32, 32, 1), r"\(N, H, W, C\).*\(1, 32, 32, 32, 1\)"),
    (SSFDEncoder, dict(spatial_dims=3), (1, 32, 32, 1), r"ndim 5.*\(1, 32, 32, 1\)"),
    (SSFDEncoder, dict(), (1, 8, 32, 1), r"\(1, 8, 32, 1\).*>= 16"),
    (SSFDEncoder, dict(last_tap="block6_relu2"), (1, 32, 32, 1), "last_tap"),
    (SSFDEncoder, dict(last_tap="conv2"), (1, 32, 32, 1), "last_tap"),
    (SSFDEncoder, dict(num_pool_layers=-1), (1, 32, 32, 1), "num_pool_layers"),
    (SSFDEncoder, dict(dropout=1.0), (1, 32, 32, 1), "dropout"),
    (SSFDUNet, dict(), (1, 40, 24, 1), r"\(1, 40, 24, 1\).*divisible by 16"),
    (SSFDUNet, dict(out_channels=0), (1, 32, 32, 1), "out_channels"),
    (SSFDUNet, dict(chans=0), (1, 32, 32, 1), "chans"),
])
def test_validation_errors(cls, kwargs, shape, match):
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(cls(**kwargs).init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))

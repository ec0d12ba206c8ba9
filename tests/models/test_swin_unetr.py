"""Tests for jaxmed.models.swin_unetr: parity with MONAI 1.6 SwinUNETR, shapes, errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetBasicBlock
from monai.networks.nets import SwinUNETR as MonaiSwinUNETR
from monai.networks.nets.swin_unetr import PatchMergingV2
from monai.networks.nets.swin_unetr import SwinTransformer as MonaiSwinTransformer

from jaxmed.interop.swin_unetr import swin_unetr_from_torch
from jaxmed.models.swin_unetr import (SwinTransformer, SwinUNETR, relative_position_index,
                                      shift_mask)

# LLVM optimisation level 0: compiles these large graphs about twice as fast on CPU; the
# arithmetic (and so every compared number) is the same, the run time barely changes.
_COMPILE = {"xla_backend_optimization_level": 0}
_TAPS = ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10", "decoder5", "decoder4",
         "decoder3", "decoder2", "decoder1")


def _jit(fn):
  return jax.jit(fn, compiler_options=_COMPILE)


class LegacyPatchMerging(PatchMergingV2):
  """MONAI's 3D ``PatchMerging.forward`` before PR #8285 (MONAI < 1.5), rewritten for the test.

  The old code concatenated x0..x7 with x4 = (1, 0, 1), x5 = (0, 1, 0), x6 = (0, 0, 1): two
  octants twice and (1, 1, 0), (0, 1, 1) never.
  """

  def forward(self, x):
    if x.ndim == 4:
      return super().forward(x)
    _, d, h, w, _ = x.shape
    if d % 2 or h % 2 or w % 2:
      x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
    offsets = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1),
               (1, 1, 1)]
    x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in offsets], -1)
    return self.reduction(self.norm(x))


def _randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Random weights everywhere that matters: norms' affine params and running statistics too,
  and a relative position bias large enough to change the attention."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in net.named_parameters():
      if name.endswith("relative_position_bias_table"):
        p.copy_(torch.randn(p.shape, generator=g))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
    for name, b in net.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.2 * torch.randn(b.shape, generator=g))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand(b.shape, generator=g))
  return net.eval()


def _monai_taps(net: MonaiSwinUNETR, x: np.ndarray) -> tuple[np.ndarray, dict]:
  """MONAI logits and the outputs of swinViT / encoder* / decoder* (one forward, via hooks),
  all channels-last."""
  taps = {}
  hooks = [getattr(net, name).register_forward_hook(
      lambda m, i, o, name=name: taps.__setitem__(name, o)) for name in ("swinViT",) + _TAPS]
  try:
    with torch.no_grad():
      y = net(torch.from_numpy(x))
  finally:
    for h in hooks:
      h.remove()
  last = lambda t: np.moveaxis(t.numpy(), 1, -1)
  feats = {f"hidden_states_{i}": last(h) for i, h in enumerate(taps.pop("swinViT"))}
  feats.update({k: last(v) for k, v in taps.items()})
  return last(y), feats


def _check_parity(net, model, x, tol=1e-4):
  """Converts ``net``'s weights, runs both, compares the logits and every named feature."""
  y_ref, feats_ref = _monai_taps(net, x)
  x_j = np.moveaxis(x, 1, -1)
  template = jax.eval_shape(model.init, jax.random.key(0), x_j)
  variables = swin_unetr_from_torch(net.state_dict(), template).variables
  y, feats = _jit(functools.partial(model.apply, return_features=True))(variables, x_j)
  assert y.shape == y_ref.shape and y.dtype == jnp.float32
  errors = {k: float(np.max(np.abs(np.asarray(feats[k]) - v))) for k, v in feats_ref.items()}
  errors["logits"] = float(np.max(np.abs(np.asarray(y) - y_ref)))
  assert set(feats) == set(feats_ref)
  assert max(errors.values()) <= tol, errors
  return variables, np.asarray(y)


def _input(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Parity with MONAI.


@pytest.mark.parametrize("downsample, use_v2, norm_name, in_channels", [
    ("merging", False, "instance", 1),
    ("mergingv2", True, "batch", 2),
])
def test_parity_3d(downsample, use_v2, norm_name, in_channels):
  torch.manual_seed(0)
  kwargs = dict(feature_size=12, downsample=downsample, use_v2=use_v2, norm_name=norm_name)
  net = _randomize(MonaiSwinUNETR(in_channels, 3, **kwargs))
  _check_parity(net, SwinUNETR(3, **kwargs), _input((1, in_channels, 64, 64, 64)))


def test_parity_2d_group_norm_non_square():
  torch.manual_seed(2)
  kwargs = dict(feature_size=12, spatial_dims=2, norm_name=("group", {"num_groups": 3}),
                num_heads=(2, 4, 4, 8))
  net = _randomize(MonaiSwinUNETR(2, 4, **kwargs), seed=2)
  _check_parity(net, SwinUNETR(4, **kwargs), _input((2, 2, 64, 96), seed=2))


def _monai_encoder(downsample, seed):
  torch.manual_seed(seed)
  net = MonaiSwinTransformer(in_chans=2, embed_dim=12, window_size=(7, 7, 7),
                             patch_size=(2, 2, 2), depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24),
                             spatial_dims=3, patch_norm=True, downsample=downsample)
  return _randomize(net, seed=seed)


def test_encoder_parity_3d_merging_legacy_odd_sizes():
  # MONAI's encoder with the pre-2025 PatchMerging (reimplemented above) vs "merging_legacy".
  # Odd sizes exercise the padded patch embedding, padded merging, padded shifted windows and
  # windows shrunk to the map (with MONAI's sliced relative position index).
  net = _monai_encoder(LegacyPatchMerging, seed=3)
  x = _input((1, 2, 41, 26, 34), seed=3)
  with torch.no_grad():
    ref = [np.moveaxis(h.numpy(), 1, -1) for h in net(torch.from_numpy(x), normalize=True)]
  model = SwinTransformer(embed_dim=12, downsample="merging_legacy", patch_norm=True)
  x_j = np.moveaxis(x, 1, -1)
  template = jax.eval_shape(model.init, jax.random.key(0), x_j)
  variables = swin_unetr_from_torch(net.state_dict(), template).variables
  out = _jit(model.apply)(variables, x_j)
  assert [h.shape[1:4] for h in ref] == [(21, 13, 17), (11, 7, 9), (6, 4, 5), (3, 2, 3),
                                         (2, 1, 2)]
  assert [h.shape for h in out] == [h.shape for h in ref]
  errors = [float(np.max(np.abs(np.asarray(h) - r))) for h, r in zip(out, ref)]
  assert max(errors) <= 1e-4, errors
  # The order matters: the same weights with the current PatchMerging give other features.
  current = _monai_encoder("merging", seed=3)
  current.load_state_dict(net.state_dict())
  with torch.no_grad():
    other = current(torch.from_numpy(x), normalize=True)[-1].numpy()
  assert np.max(np.abs(np.moveaxis(other, 1, -1) - ref[-1])) > 1e-2


def test_masks_and_indices_match_monai():
  from monai.networks.nets.swin_unetr import WindowAttention, compute_mask
  for padded, window, shift in [((35, 35, 35), (7, 7, 7), (3, 3, 3)),
                                ((14, 4, 14), (7, 4, 7), (3, 0, 3)), ((21, 14), (7, 7), (3, 3))]:
    expected = compute_mask(list(padded), window, shift, "cpu").numpy()
    np.testing.assert_array_equal(shift_mask(padded, window, shift), expected)
  for window in [(7, 7, 7), (2, 3, 4), (7, 5)]:
    attn = WindowAttention(12, 3, window)
    np.testing.assert_array_equal(relative_position_index(window),
                                  attn.relative_position_index.numpy())


# --------------------------------------------------------------------------------------------
# Pre-training hooks: the DAE conv patch embedding, channel / token masks with a mask token.


def _dae_block(spatial_dims, in_channels, embed_dim):
  """The DAE checkpoints' patch embedding ``proj`` (research-contributions DAE/, PatchEmbed3D)."""
  return UnetBasicBlock(spatial_dims, in_channels, embed_dim, kernel_size=3, stride=2,
                        norm_name=("instance", {"affine": True}))


def _masking_hook(channel_mask, token_mask, mask_token):
  """A forward hook on MONAI's ``patch_embed`` doing what the reference code does to the
  embedding (channels-first): SimMIM's ``x (1 - w) + token w``, then DAE's channel zeroing."""
  def hook(module, inputs, out):
    shape = (*out.shape[:2],) + (1,) * (out.ndim - 2)
    w = torch.from_numpy(token_mask.astype(np.float32))[:, None]
    out = out * (1.0 - w) + mask_token.reshape(1, -1, *shape[2:]) * w
    return out * (1.0 - torch.from_numpy((channel_mask != 0).astype(np.float32)).reshape(shape))
  return hook


def _channel_mask(n, channels, ratio=0.6, seed=0):
  """``(n, channels)`` float32, ``int(ratio * channels)`` ones per row (local_channel_mask's
  convention: 1 = zero that channel), a different subset per sample."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((n, channels), np.float32)
  for row in mask:
    row[rng.permutation(channels)[:int(ratio * channels)]] = 1.0
  return mask


def test_dae_network_with_masks_parity_3d():
  # The DAE network: conv patch embedding, legacy merging, mask token; masks as in the reference.
  # (Batch norm in the decoder: PyTorch refuses instance norm of the 1^3 bottleneck of 32^3.)
  torch.manual_seed(5)
  kwargs = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3), norm_name="batch")
  net = MonaiSwinUNETR(1, 1, downsample=LegacyPatchMerging, **kwargs)
  net.swinViT.patch_embed.proj = _dae_block(3, 1, 12)
  net = _randomize(net, seed=5)
  mask_token = torch.randn(1, 1, 12)
  model = SwinUNETR(1, patch_embedding="conv", downsample="merging_legacy", use_mask_token=True,
                    **kwargs)
  x = _input((2, 1, 32, 32, 32), seed=5)
  x_j = np.moveaxis(x, 1, -1)
  template = jax.eval_shape(model.init, jax.random.key(0), x_j)
  state = {**net.state_dict(), "swinViT.mask_token": mask_token}
  variables = swin_unetr_from_torch(state, template).variables
  np.testing.assert_array_equal(variables["params"]["swinViT"]["mask_token"],
                                mask_token.numpy().reshape(12))
  channel = _channel_mask(2, 12, seed=5)
  token = np.random.default_rng(5).random((2, 16, 16, 16)) < 0.6
  hook = net.swinViT.patch_embed.register_forward_hook(_masking_hook(channel, token, mask_token))
  try:
    y_ref, feats_ref = _monai_taps(net, x)
  finally:
    hook.remove()
  masked = _jit(functools.partial(model.apply, return_features=True))
  y, feats = masked(variables, x_j, channel_mask=channel, token_mask=token)
  errors = {k: float(np.max(np.abs(np.asarray(feats[k]) - v))) for k, v in feats_ref.items()}
  errors["logits"] = float(np.max(np.abs(np.asarray(y) - y_ref)))
  # Relative to each output's largest value: the conv patch embedding's two instance norms (over
  # 4096 voxels, float32 on both sides) leave up to ~3e-5 of the feature scale.
  scales = {k: float(np.max(np.abs(v))) for k, v in feats_ref.items()}
  scales["logits"] = float(np.max(np.abs(y_ref)))
  relative = {k: e / max(scales[k], 1.0) for k, e in errors.items()}
  assert max(relative.values()) <= 1e-4, (errors, scales)


def test_unused_hooks_change_nothing_bit_for_bit():
  # A mask token that is not used, and empty masks, leave every hidden state as it was.
  kwargs = dict(embed_dim=12, depths=(1, 1), num_heads=(3, 3), spatial_dims=2)
  x = jnp.asarray(_input((2, 32, 32, 2), seed=7))
  with_token = SwinTransformer(use_mask_token=True, **kwargs)
  variables = _random_variables(with_token, x, seed=7)
  plain = {"params": {k: v for k, v in variables["params"].items() if k != "mask_token"}}
  expected = _jit(SwinTransformer(**kwargs).apply)(plain, x)
  empty = dict(channel_mask=np.zeros((2, 12), np.float32), token_mask=np.zeros((2, 16, 16), bool))
  for out in (_jit(with_token.apply)(variables, x),
              _jit(functools.partial(with_token.apply, **empty))(variables, x)):
    for h, e in zip(out, expected):
      np.testing.assert_array_equal(np.asarray(h), np.asarray(e))


def test_conv_patch_embedding_encoder_parity_3d_odd_sizes():
  # Odd sizes: the stride-2 conv gives ceil(S / 2) as the reference does; raw hidden states.
  torch.manual_seed(6)
  net = MonaiSwinTransformer(in_chans=2, embed_dim=12, window_size=(7, 7, 7),
                             patch_size=(2, 2, 2), depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3),
                             spatial_dims=3)
  net.patch_embed.proj = _dae_block(3, 2, 12)
  net = _randomize(net, seed=6)
  x = _input((1, 2, 19, 14, 9), seed=6)
  with torch.no_grad():
    ref = [np.moveaxis(h.numpy(), 1, -1) for h in net(torch.from_numpy(x), normalize=False)]
  model = SwinTransformer(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3),
                          patch_embedding="conv")
  x_j = np.moveaxis(x, 1, -1)
  template = jax.eval_shape(model.init, jax.random.key(0), x_j)
  variables = swin_unetr_from_torch(net.state_dict(), template).variables
  out = _jit(functools.partial(model.apply, normalize=False))(variables, x_j)
  assert [h.shape for h in out] == [h.shape for h in ref]
  assert out[0].shape == (1, 10, 7, 5, 12)
  errors = [float(np.max(np.abs(np.asarray(h) - r))) for h, r in zip(out, ref)]
  assert max(errors) <= 1e-4, errors


def test_hooks_keep_monai_variables_unless_asked():
  x = jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32)
  shapes = lambda **kw: jax.tree.map(lambda s: s.shape, jax.eval_shape(
      SwinUNETR(2, **_TINY, **kw).init, jax.random.key(0), x))
  base = shapes()
  assert shapes(patch_embedding="linear", use_mask_token=False) == base
  with_token = shapes(use_mask_token=True)
  assert with_token["params"]["swinViT"].pop("mask_token") == (12,)
  assert with_token == base
  conv = shapes(patch_embedding="conv")
  norm = {"scale": (12,), "bias": (12,)}
  assert conv["params"]["swinViT"].pop("patch_embed") == {"proj": {
      "conv1": {"kernel": (3, 3, 1, 12)}, "norm1": norm, "conv2": {"kernel": (3, 3, 12, 12)},
      "norm2": norm}}
  del base["params"]["swinViT"]["patch_embed"]
  assert conv == base


@pytest.mark.parametrize("kwargs, masks, match", [
    (dict(), dict(channel_mask=np.zeros((1, 11))),
     r"channel_mask must have shape \(B, embedding channels\) = \(1, 12\).*\(1, 11\)"),
    (dict(), dict(channel_mask=np.zeros((1, 12), np.complex64)), "channel_mask.*complex64"),
    (dict(use_mask_token=True), dict(token_mask=np.zeros((1, 16, 8), bool)),
     r"token_mask must have shape \(B, \*patch grid\) = \(1, 16, 16\).*\(1, 16, 8\)"),
    (dict(use_mask_token=True), dict(token_mask=np.zeros((1, 16, 16), np.float32)),
     "token_mask must be bool.*float32"),
    (dict(), dict(token_mask=np.zeros((1, 16, 16), bool)), "token_mask needs use_mask_token"),
    (dict(patch_embedding="pixel"), dict(), "patch_embedding must be one of"),
    (dict(patch_embedding="conv", patch_norm=True), dict(), "patch_norm"),
])
def test_hook_errors(kwargs, masks, match):
  model = SwinUNETR(2, **_TINY, **kwargs)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(functools.partial(model.init, **masks), jax.random.key(0),
                   jnp.zeros((1, 32, 32, 1)))
  encoder = SwinTransformer(embed_dim=12, patch_size=4, patch_embedding="conv")
  with pytest.raises(ValueError, match="patch_size=2"):
    jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 16, 16, 16, 1)))


# --------------------------------------------------------------------------------------------
# Parameter counts, shapes and names (jax.eval_shape: no compile).


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def test_parameter_count_paper_config():
  model = SwinUNETR(14, feature_size=48)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 32, 1)))
  assert _count(variables["params"]) == 62_187_296


@pytest.mark.parametrize("kwargs, in_channels", [
    (dict(spatial_dims=2, feature_size=24), 3),
    (dict(use_v2=True, feature_size=24, depths=(2, 4, 2, 2)), 4),
])
def test_parameter_count_matches_monai(kwargs, in_channels):
  net = MonaiSwinUNETR(in_channels, 5, **kwargs)
  d = kwargs.get("spatial_dims", 3)
  variables = jax.eval_shape(SwinUNETR(5, **kwargs).init, jax.random.key(0),
                             jnp.zeros((1,) + (32,) * d + (in_channels,)))
  assert _count(variables["params"]) == sum(p.numel() for p in net.parameters())


def _shapes(model, shape):
  """Output shapes of ``model.init_with_output(..., return_features=True)``, traced only."""
  fn = lambda x: model.init_with_output(jax.random.key(0), x, return_features=True)
  (logits, feats), variables = jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, jnp.float32))
  return logits, feats, variables


@pytest.mark.parametrize("spatial, depths, heads, fs, in_ch, out_ch, v2", [
    ((64, 32, 96), (1, 1, 1, 1), (3, 6, 12, 24), 12, 1, 2, False),
    ((32, 32, 32), (2, 2, 2, 2), (1, 2, 4, 8), 24, 2, 3, True),
    ((64, 96), (2, 2, 2, 2), (3, 6, 12, 24), 24, 3, 4, False),
    ((32, 64), (1, 1, 1, 1), (4, 4, 4, 4), 12, 1, 1, True),
])
def test_output_and_feature_shapes(spatial, depths, heads, fs, in_ch, out_ch, v2):
  model = SwinUNETR(out_ch, feature_size=fs, depths=depths, num_heads=heads,
                    spatial_dims=len(spatial), use_v2=v2)
  logits, feats, variables = _shapes(model, (2, *spatial, in_ch))
  assert logits.shape == (2, *spatial, out_ch) and logits.dtype == jnp.float32
  s = lambda k: tuple(v // 2**k for v in spatial)
  expected = {f"hidden_states_{i}": (2, *s(i + 1), fs * 2**i) for i in range(5)}
  expected.update(encoder1=(2, *s(0), fs), encoder2=(2, *s(1), fs), encoder3=(2, *s(2), 2 * fs),
                  encoder4=(2, *s(3), 4 * fs), encoder10=(2, *s(5), 16 * fs),
                  decoder5=(2, *s(4), 8 * fs), decoder4=(2, *s(3), 4 * fs),
                  decoder3=(2, *s(2), 2 * fs), decoder2=(2, *s(1), fs), decoder1=(2, *s(0), fs))
  assert {k: v.shape for k, v in feats.items()} == expected
  assert all(v.dtype == jnp.float32 for v in feats.values())
  params = variables["params"]
  assert set(params) == {"swinViT", "out", *_TAPS}
  layers = {f"layers{i}" for i in range(1, 5)}
  assert set(params["swinViT"]) == {"patch_embed"} | layers | (
      {f"{k}c" for k in layers} if v2 else set())
  assert set(params["swinViT"]["layers1"]) == {f"blocks_{j}" for j in range(depths[0])} | {
      "downsample"}
  table = params["swinViT"]["layers2"]["blocks_0"]["attn"]["relative_position_bias_table"]
  assert table.shape == (13**len(spatial), heads[1])


def test_bare_encoder_shapes():
  model = SwinTransformer(embed_dim=12, depths=(1, 1), num_heads=(3, 3), spatial_dims=3,
                          downsample="mergingv2")
  x = jax.ShapeDtypeStruct((1, 20, 12, 9, 2), jnp.float32)
  out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), x)
  assert [h.shape for h in out] == [(1, 10, 6, 5, 12), (1, 5, 3, 3, 24), (1, 3, 2, 2, 48)]
  assert set(variables["params"]) == {"patch_embed", "layers1", "layers2"}


# --------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize("kwargs, shape, match", [
    (dict(), (1, 64, 48, 64, 1), r"\(1, 64, 48, 64, 1\).*divisible by 32"),
    (dict(spatial_dims=2), (1, 32, 40, 1), r"\(1, 32, 40, 1\).*divisible by 32"),
    (dict(feature_size=16), (1, 32, 32, 32, 1), "feature_size"),
    (dict(downsample="pool"), (1, 32, 32, 32, 1), "downsample"),
    (dict(spatial_dims=4), (1, 32, 32, 32, 32, 1), "spatial_dims"),
    (dict(spatial_dims=2), (1, 32, 32, 32, 1), r"spatial_dims=2.*\(1, 32, 32, 32, 1\)"),
    (dict(patch_size=4), (1, 64, 64, 64, 1), "patch_size"),
    (dict(num_heads=(5, 6, 12, 24)), (1, 32, 32, 32, 1), "num_heads"),
    (dict(depths=(2, 2, 2)), (1, 32, 32, 32, 1), "4 stages"),
    (dict(num_heads=(3, 6, 12)), (1, 32, 32, 32, 1), "one entry per stage"),
    (dict(norm_name="layer"), (1, 32, 32, 32, 1), "norm_name"),
    (dict(norm_name=("group", {"num_groups": 5})), (1, 32, 32, 32, 1), "num_groups=5"),
    (dict(window_size=(7, 7)), (1, 32, 32, 32, 1), "window_size"),
    (dict(drop_rate=1.5), (1, 32, 32, 32, 1), "drop_rate"),
])
def test_validation_errors(kwargs, shape, match):
  model = SwinUNETR(2, **{"feature_size": 24, **kwargs})
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


# --------------------------------------------------------------------------------------------
# remat, bfloat16, training mode (one tiny 2D config).

_TINY = dict(feature_size=12, spatial_dims=2, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3))


def _random_variables(model, x, seed=0):
  """Variables filled from NumPy: kernels ~ N(0, 1 / fan_in), norm scales ~ 1, small biases."""
  template = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    elif name in ("scale", "var"):
      value = 1.0 + 0.1 * np.abs(rng.normal(size=s.shape))
    else:
      value = 0.2 * rng.normal(size=s.shape)
    return jnp.asarray(value, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, template)


@pytest.fixture(scope="module")
def tiny():
  """A tiny 2D model with batch norm and every dropout, its input and random variables."""
  kwargs = dict(norm_name="batch", drop_rate=0.1, attn_drop_rate=0.1, dropout_path_rate=0.2,
                **_TINY)
  x = jnp.asarray(_input((2, 32, 32, 2), seed=4))
  model = SwinUNETR(3, **kwargs)
  return kwargs, x, _random_variables(model, x)


def _key(seed):
  return jax.random.key(seed, impl="rbg")  # threefry compiles slowly on CPU


def test_remat_same_output_and_eval_ignores_dropout_rng(tiny):
  kwargs, x, variables = tiny
  plain = _jit(SwinUNETR(3, **kwargs).apply)
  y = plain(variables, x, rngs={"dropout": _key(1)})
  np.testing.assert_array_equal(plain(variables, x, rngs={"dropout": _key(2)}), y)
  y_remat = _jit(SwinUNETR(3, remat=True, **kwargs).apply)(variables, x,
                                                           rngs={"dropout": _key(3)})
  np.testing.assert_array_equal(np.asarray(y_remat), np.asarray(y))


def test_bfloat16_compute_float32_outputs(tiny):
  kwargs, x, variables = tiny
  y = _jit(SwinUNETR(3, **kwargs).apply)(variables, x, rngs={"dropout": _key(1)})
  bf16 = SwinUNETR(3, dtype=jnp.bfloat16, **kwargs)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(
      jax.eval_shape(bf16.init, jax.random.key(0), x)))
  y_bf16, feats = _jit(functools.partial(bf16.apply, return_features=True))(variables, x)
  assert y_bf16.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in feats.values())
  err = np.abs(np.asarray(y_bf16) - np.asarray(y))
  scale = float(np.max(np.abs(np.asarray(y))))
  assert np.max(err) < 0.1 * scale and np.mean(err) < 0.02 * scale
  assert np.max(err) > 0  # it did compute in bfloat16


def test_train_mode_dropout_and_batch_stats_with_remat(tiny):
  kwargs, x, variables = tiny
  model = SwinUNETR(3, remat=True, **kwargs)
  train = _jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
  (y1, s1), (y2, _), (y1b, _) = (train(variables, x, rngs={"dropout": _key(k)}) for k in (1, 2, 1))
  assert not np.allclose(y1, y2)
  np.testing.assert_array_equal(y1, y1b)
  changed = jax.tree_util.tree_map(lambda a, b: not np.allclose(a, b), variables["batch_stats"],
                                   s1["batch_stats"])
  assert all(jax.tree_util.tree_leaves(changed))


def test_cpu_gradients_as_accurate_as_xla_derivatives(monkeypatch):
  # The hand-written CPU gradients (window attention, Dense, instance norm) and XLA's own
  # derivatives (which the model takes on other backends), each against float64: shifted windows
  # (with their mask), padded windows (a 16 x 32 token grid against 7) and shrunk ones included.
  # Some leaves are ill-conditioned sums (a 1 -> 12 channel 1x1 conv's kernel: both paths ~1e-3
  # from float64), so each path's error is compared, leaf by leaf, with the other's. (2D: the
  # hand-written gradients do not depend on the number of spatial axes.)
  spatial = (32, 64)
  kwargs = dict(feature_size=12, depths=(2, 1, 1, 1), num_heads=(1, 2, 1, 1), window_size=7,
                spatial_dims=2)
  model = SwinUNETR(2, **kwargs)
  x = jnp.asarray(_input((1,) + spatial + (1,), seed=5))
  variables = _random_variables(model, x)
  grad = lambda m, v, x: jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(m.apply(v, x)) * x)))(v)
  got = grad(model, variables, x)
  with jax.enable_x64(True):
    wide = SwinUNETR(2, dtype=jnp.float64, param_dtype=jnp.float64, **kwargs)
    ref = grad(wide, jax.tree.map(lambda a: a.astype(jnp.float64), variables),
               x.astype(jnp.float64))
    ref = jax.tree.map(np.asarray, ref)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  want = grad(model, variables, x)
  # A wrong formula is off by O(1); float32 orders by 1e-6 to 1e-4 (a norm over one or two
  # voxels, as at the bottleneck, is ill-conditioned; over one its gradient is zero).
  error = lambda a, r: float(np.linalg.norm(np.asarray(a, np.float64) - r)
                             / max(np.linalg.norm(r), 1e-30))
  leaves = zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want),
               jax.tree_util.tree_leaves(ref))
  for (path, a), b, r in leaves:
    assert error(a, r) <= max(3 * error(b, r), 1e-4), (jax.tree_util.keystr(path), error(a, r),
                                                       error(b, r))

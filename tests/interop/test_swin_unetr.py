"""Tests for jaxmed.interop.swin_unetr: MONAI SwinUNETR / Swin encoder checkpoints -> Flax."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import numpy_filled
from monai.networks.blocks import UnetBasicBlock
from monai.networks.nets import SwinUNETR as MonaiSwinUNETR
from safetensors.torch import save_file

from jaxmed.interop.swin_unetr import canonical_key, load_swin_unetr, swin_unetr_from_torch
from jaxmed.models.swin_unetr import SwinTransformer, SwinUNETR

_CONFIG = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3), spatial_dims=2)
_SHAPE = (1, 64, 64, 2)  # channels-last input of the tiny 2D model
_DAE = dict(patch_embedding="conv", use_mask_token=True, **_CONFIG)  # 1 channel in, 1 out
_DAE_SHAPE = (1, 64, 64, 1)
_COMPILE = {"xla_backend_optimization_level": 0}


def _randomize(net, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in net.named_parameters():
      if name.endswith("relative_position_bias_table"):
        p.copy_(torch.randn(p.shape, generator=g))
      elif name.endswith("bias") or "norm" in name:
        p.add_(0.2 * torch.randn(p.shape, generator=g))
  return net.eval()


@pytest.fixture(scope="module")
def net():
  torch.manual_seed(0)
  return _randomize(MonaiSwinUNETR(2, 3, **_CONFIG))


@pytest.fixture(scope="module")
def state(net):
  return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def template():
  return jax.eval_shape(SwinUNETR(3, **_CONFIG).init, jax.random.key(0), jnp.zeros(_SHAPE))


@pytest.fixture(scope="module")
def encoder_template():
  model = SwinTransformer(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3),
                          spatial_dims=2)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(_SHAPE))


@pytest.fixture(scope="module")
def reference(state, template):
  return swin_unetr_from_torch(state, template)


def _assert_same(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _dae_layout(state, mask_token=None):
  """A DAE pre-training checkpoint (research-contributions DAE/, ``SimMIMSkip``) of a MONAI
  state dict: the encoder as ``encoder.*`` (``layers{i}.0.0.``, MLP ``fc1``/``fc2``) with
  ``mask_token`` and the final ``norm``; the UNETR decoder under MONAI's names."""
  out = {}
  for k, v in state.items():
    k = re.sub(r"^swinViT\.(layers\d)\.0\.", r"encoder.\1.0.0.", k)
    out[k.replace("swinViT.", "encoder.").replace(".mlp.linear", ".mlp.fc")] = v
  token = torch.zeros(1, 1, 12) if mask_token is None else mask_token
  return {**out, "encoder.mask_token": token, "encoder.norm.weight": torch.ones(192),
          "encoder.norm.bias": torch.zeros(192)}


def _ssl_layout(state, prefix="module."):
  """The self-supervised Swin UNETR release ``model_swinvit.pt``: the bare encoder under
  ``module.`` (``module.patch_embed.proj.weight``, ``module.layers1.0...``, MLP ``fc1``/``fc2``)."""
  return {prefix + k[len("swinViT."):].replace(".mlp.linear", ".mlp.fc"): v
          for k, v in state.items() if k.startswith("swinViT.")}


@pytest.fixture(scope="module")
def dae_net():
  """A MONAI SwinUNETR (1 channel in and out) with the DAE conv patch embedding."""
  torch.manual_seed(1)
  net = MonaiSwinUNETR(1, 1, **_CONFIG)
  net.swinViT.patch_embed.proj = UnetBasicBlock(2, 1, 12, kernel_size=3, stride=2,
                                                norm_name=("instance", {"affine": True}))
  return _randomize(net, seed=1)


@pytest.fixture(scope="module")
def dae_token():
  return torch.randn(1, 1, 12, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def dae_template():
  return jax.eval_shape(SwinUNETR(1, **_DAE).init, jax.random.key(0), jnp.zeros(_DAE_SHAPE))


@pytest.fixture(scope="module")
def dae_reference(dae_net, dae_token, dae_template):
  """The DAE network's variables converted from MONAI's own names."""
  state = {**dae_net.state_dict(), "swinViT.mask_token": dae_token}
  return swin_unetr_from_torch(state, dae_template).variables


@pytest.fixture(scope="module")
def dae_checkpoint(dae_net, dae_token):
  return _dae_layout(dae_net.state_dict(), dae_token)


# --------------------------------------------------------------------------------------------
# Round trips.


def test_files_roundtrip_and_outputs_match_monai(net, state, template, reference, tmp_path):
  torch.save({"state_dict": state, "epoch": 3}, tmp_path / "model.pth")
  save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
  model = SwinUNETR(3, **_CONFIG)
  for name in ("model.pth", "model.safetensors"):
    converted = load_swin_unetr(tmp_path / name, model, template)
    _assert_same(converted.variables, reference.variables)
    assert converted.missing == ()
    assert all(k.endswith("num_batches_tracked") for k in converted.unused)
  x = np.random.default_rng(0).normal(size=_SHAPE).astype(np.float32)
  with torch.no_grad():
    expected = np.moveaxis(net(torch.from_numpy(np.moveaxis(x, -1, 1))).numpy(), 1, -1)
  y = jax.jit(model.apply, compiler_options={"xla_backend_optimization_level": 0})(
      reference.variables, x)
  assert np.max(np.abs(np.asarray(y) - expected)) <= 1e-4


def test_layout_of_every_leaf(reference, state):
  params = reference.variables["params"]
  block = params["swinViT"]["layers1"]["blocks_0"]
  np.testing.assert_array_equal(block["attn"]["qkv"]["kernel"],
                                state["swinViT.layers1.0.blocks.0.attn.qkv.weight"].numpy().T)
  np.testing.assert_array_equal(block["mlp"]["linear1"]["bias"],
                                state["swinViT.layers1.0.blocks.0.mlp.linear1.bias"].numpy())
  np.testing.assert_array_equal(
      params["decoder5"]["transp_conv"]["kernel"],
      np.transpose(state["decoder5.transp_conv.conv.weight"].numpy(), (2, 3, 0, 1)))
  np.testing.assert_array_equal(
      params["encoder1"]["layer"]["conv3"]["kernel"],
      np.transpose(state["encoder1.layer.conv3.conv.weight"].numpy(), (2, 3, 1, 0)))
  np.testing.assert_array_equal(params["out"]["bias"], state["out.conv.conv.bias"].numpy())


def test_module_prefix(state, template, reference):
  converted = swin_unetr_from_torch({"module." + k: v for k, v in state.items()}, template)
  _assert_same(converted.variables, reference.variables)


# --------------------------------------------------------------------------------------------
# Pre-training checkpoints: DAE (whole network, conv patch embedding), self-supervised Swin
# UNETR (encoder only).


def test_dae_checkpoint_outputs_match_torch(dae_net, dae_checkpoint, dae_template,
                                            dae_reference, tmp_path):
  torch.save({"model": dae_checkpoint, "epoch": 3}, tmp_path / "ckpt_best.pth")
  model = SwinUNETR(1, **_DAE)
  converted = load_swin_unetr(tmp_path / "ckpt_best.pth", model, dae_template)
  assert converted.missing == ()
  assert set(converted.unused) == {"encoder.norm.weight", "encoder.norm.bias"}
  _assert_same(converted.variables, dae_reference)
  np.testing.assert_array_equal(converted.variables["params"]["swinViT"]["mask_token"],
                                dae_checkpoint["encoder.mask_token"].numpy().reshape(12))
  x = np.random.default_rng(1).normal(size=_DAE_SHAPE).astype(np.float32)
  with torch.no_grad():
    expected = np.moveaxis(dae_net(torch.from_numpy(np.moveaxis(x, -1, 1))).numpy(), 1, -1)
  y = jax.jit(model.apply, compiler_options=_COMPILE)(converted.variables, x)
  assert np.max(np.abs(np.asarray(y) - expected)) <= 1e-4


def test_dae_checkpoint_parts(dae_checkpoint, dae_template, dae_reference):
  variables = numpy_filled(dae_template, seed=3, scale=1.0)
  encoder_keys = {k for k in dae_checkpoint if k.startswith("encoder.")}
  extras = {"encoder.norm.weight", "encoder.norm.bias"}
  # Encoder only: swinViT (with the mask token) from the checkpoint, the rest kept.
  enc = swin_unetr_from_torch(dae_checkpoint, variables, part="encoder")
  got = enc.variables["params"]
  _assert_same(got["swinViT"], dae_reference["params"]["swinViT"])
  _assert_same({k: v for k, v in got.items() if k != "swinViT"},
               {k: v for k, v in variables["params"].items() if k != "swinViT"})
  assert enc.missing and all(m.endswith("(part='encoder')") and "swinViT" not in m
                             for m in enc.missing)
  assert set(enc.unused) == set(dae_checkpoint) - encoder_keys | extras
  # Decoder only (encoder1..4, encoder10, decoder5..1, out): the encoder kept.
  dec = swin_unetr_from_torch(dae_checkpoint, variables, part="decoder")
  got = dec.variables["params"]
  _assert_same(got["swinViT"], variables["params"]["swinViT"])
  _assert_same({k: v for k, v in got.items() if k != "swinViT"},
               {k: v for k, v in dae_reference["params"].items() if k != "swinViT"})
  assert all(m.startswith("params/swinViT/") for m in dec.missing)
  assert set(dec.unused) == encoder_keys  # relative_position_index buffers included
  with pytest.raises(ValueError, match="only their shapes"):
    swin_unetr_from_torch(dae_checkpoint, dae_template, part="encoder")
  with pytest.raises(ValueError, match="part must be one of"):
    swin_unetr_from_torch(dae_checkpoint, variables, part="all")


def test_dae_checkpoint_into_bare_encoder_strict(dae_checkpoint, dae_reference):
  x = jnp.zeros(_DAE_SHAPE)
  kwargs = dict(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3), spatial_dims=2,
                patch_embedding="conv")
  template = jax.eval_shape(SwinTransformer(use_mask_token=True, **kwargs).init,
                            jax.random.key(0), x)
  converted = swin_unetr_from_torch(dae_checkpoint, template)
  _assert_same(converted.variables["params"], dae_reference["params"]["swinViT"])
  decoder = {k for k in dae_checkpoint if not k.startswith("encoder.")}
  assert set(converted.unused) == decoder | {"encoder.norm.weight", "encoder.norm.bias"}
  # A model without a mask token reports the checkpoint's; so is a classification head.
  template = jax.eval_shape(SwinTransformer(**kwargs).init, jax.random.key(0), x)
  with_head = {**dae_checkpoint, "encoder.head.weight": torch.zeros(2, 192)}
  assert {"encoder.mask_token", "encoder.head.weight"} <= set(
      swin_unetr_from_torch(with_head, template).unused)
  with pytest.raises(ValueError, match="no decoder"):
    swin_unetr_from_torch(dae_checkpoint, template, part="decoder")


def test_stray_key_is_reported(dae_checkpoint, dae_template, state, template):
  stray = "encoder.layers1.0.0.blocks.0.attn.extra_scale"
  ckpt = {**dae_checkpoint, stray: torch.zeros(3)}
  with pytest.raises(ValueError, match=re.escape(stray)):
    swin_unetr_from_torch(ckpt, dae_template)
  assert stray in swin_unetr_from_torch(ckpt, dae_template, strict=False).unused
  with pytest.raises(ValueError, match="head.weight"):  # even with the decoder not taken
    swin_unetr_from_torch({**state, "head.weight": torch.zeros(2)},
                          numpy_filled(template), part="encoder")


def test_patch_embedding_mismatch_is_named(dae_checkpoint, dae_template, state, template):
  with pytest.raises(ValueError, match="patch_embedding='conv'"):
    swin_unetr_from_torch(dae_checkpoint, template)
  with pytest.raises(ValueError, match="patch_embedding='linear'"):
    swin_unetr_from_torch(state, dae_template)


def test_ssl_checkpoint_into_swin_unetr(state, template, reference):
  ckpt = _ssl_layout(state)
  # part="both" (default) needs the decoder: missing when strict, kept when not.
  with pytest.raises(ValueError, match=r"missing.*encoder1"):
    swin_unetr_from_torch(ckpt, template)
  with pytest.raises(ValueError, match="only their shapes"):
    swin_unetr_from_torch(ckpt, template, strict=False)
  variables = numpy_filled(template, seed=0, scale=1.0)
  loose = swin_unetr_from_torch(ckpt, variables, strict=False)
  assert {m.split("/")[1] for m in loose.missing} == {
      "encoder1", "encoder2", "encoder3", "encoder4", "encoder10", "decoder5", "decoder4",
      "decoder3", "decoder2", "decoder1", "out"}
  # part="encoder" is strict about the encoder only; with the decoder of the MONAI network in
  # the template, the result is that network's variables (whose outputs match MONAI's above).
  start = {"params": {**reference.variables["params"],
                      "swinViT": variables["params"]["swinViT"]}}
  converted = swin_unetr_from_torch(ckpt, start, part="encoder")
  _assert_same(converted.variables, reference.variables)
  _assert_same(loose.variables["params"]["swinViT"], reference.variables["params"]["swinViT"])
  assert converted.unused == ()


@pytest.mark.parametrize("prefix", ["module.", "module.swin_vit.", "swinViT."])
def test_ssl_release_layouts(state, encoder_template, reference, prefix):
  # model_swinvit.pt (module.layers1.0..., fc1/fc2) and the SSLHead (swin_vit.) with heads.
  ckpt = _ssl_layout(state, prefix)
  heads = {"rotation_head.weight": torch.zeros(4, 192), "contrastive_head.bias": torch.zeros(512)}
  if prefix != "swinViT.":
    ckpt.update({"module." + k: v for k, v in heads.items()})
  converted = swin_unetr_from_torch(ckpt, encoder_template)
  _assert_same(converted.variables["params"], reference.variables["params"]["swinViT"])
  assert set(converted.unused) == ({"module." + k for k in heads} if prefix != "swinViT."
                                   else set())


def test_canonical_keys():
  assert canonical_key("module.layers2.0.blocks.1.mlp.fc2.weight") == (
      "swinViT.layers2.0.blocks.1.mlp.linear2.weight", True)
  assert canonical_key("encoder.layers3c.0.0.layer.conv1.conv.weight") == (
      "swinViT.layers3c.0.layer.conv1.conv.weight", True)
  assert canonical_key("module.encoder10.layer.norm1.weight") == (
      "encoder10.layer.norm1.weight", False)
  assert canonical_key("encoder.patch_embed.proj.conv1.conv.weight") == (
      "swinViT.patch_embed.proj.conv1.conv.weight", True)


# --------------------------------------------------------------------------------------------
# Errors.


def test_shape_mismatch_lists_every_key(state, template):
  bad = dict(state)
  bad["encoder2.layer.conv1.conv.weight"] = torch.zeros(12, 12, 3, 1)
  bad["swinViT.layers1.0.blocks.0.attn.qkv.weight"] = torch.zeros(36, 11)
  with pytest.raises(ValueError, match="2 shape mismatch") as info:
    swin_unetr_from_torch(bad, template)
  assert "encoder2.layer.conv1.conv.weight" in str(info.value)
  assert "swinViT.layers1.0.blocks.0.attn.qkv.weight" in str(info.value)


def test_unexpected_key_strict_and_ignore(state, template):
  extra = {**state, "head.weight": torch.zeros(2, 2)}
  with pytest.raises(ValueError, match="head.weight"):
    swin_unetr_from_torch(extra, template)
  converted = swin_unetr_from_torch(extra, template, ignore=("head.*",))
  assert "head.weight" in converted.unused
  assert "head.weight" in swin_unetr_from_torch(extra, template, strict=False).unused


def test_buffers_index_checked_mask_reported(state, template, reference):
  bad = dict(state)
  key = "swinViT.layers1.0.blocks.0.attn.relative_position_index"
  bad[key] = state[key].flip(0)
  with pytest.raises(ValueError, match="relative_position_index"):
    swin_unetr_from_torch(bad, template)
  without = {k: v for k, v in state.items() if not k.endswith("relative_position_index")}
  _assert_same(swin_unetr_from_torch(without, template).variables, reference.variables)
  # Attention-mask buffers (Microsoft Swin style) depend on the input size: reported, not used.
  mask_key = "swinViT.layers1.0.blocks.0.attn_mask"
  converted = swin_unetr_from_torch({**state, mask_key: torch.zeros(4, 49, 49)}, template)
  assert mask_key in converted.unused


def test_legacy_merging_check(tmp_path):
  config = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3))
  torch.save(MonaiSwinUNETR(1, 2, **config).state_dict(), tmp_path / "ssl.pth")
  x = jnp.zeros((1, 32, 32, 32, 1))
  legacy = SwinUNETR(2, downsample="merging_legacy", **config)
  template = jax.eval_shape(legacy.init, jax.random.key(0), x)
  assert load_swin_unetr(tmp_path / "ssl.pth", legacy, template, legacy=True).missing == ()
  with pytest.raises(ValueError, match="merging_legacy"):
    load_swin_unetr(tmp_path / "ssl.pth", SwinUNETR(2, **config), template, legacy=True)
  with pytest.raises(ValueError, match="legacy=False"):
    load_swin_unetr(tmp_path / "ssl.pth", legacy, template, legacy=False)


def test_unreadable_file_is_named(tmp_path, template):
  path = tmp_path / "broken.pth"
  path.write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="broken.pth"):
    load_swin_unetr(path, SwinUNETR(3, **_CONFIG), template)

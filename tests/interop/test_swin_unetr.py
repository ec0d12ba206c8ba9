"""Tests for jaxmed.interop.swin_unetr: MONAI SwinUNETR / Swin encoder checkpoints -> Flax."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import numpy_filled
from monai.networks.nets import SwinUNETR as MonaiSwinUNETR
from safetensors.torch import save_file

from jaxmed.interop.swin_unetr import canonical_key, load_swin_unetr, swin_unetr_from_torch
from jaxmed.models.swin_unetr import SwinTransformer, SwinUNETR

_CONFIG = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3), spatial_dims=2)
_SHAPE = (1, 64, 64, 2)  # channels-last input of the tiny 2D model


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


def _dae_layout(state):
  """The DAE pre-training layout: ``encoder.layers1.0.0...``, MLP ``fc1``/``fc2``, extras."""
  out = {}
  for k, v in state.items():
    if not k.startswith("swinViT."):
      continue
    k = re.sub(r"^swinViT\.(layers\d)\.0\.", r"encoder.\1.0.0.", k)
    k = k.replace("swinViT.", "encoder.").replace(".mlp.linear", ".mlp.fc")
    out[k] = v
  out["encoder.mask_token"] = torch.zeros(1, 1, 12)
  out["encoder.norm.weight"] = torch.ones(192)
  out["encoder.norm.bias"] = torch.zeros(192)
  out["out.conv.conv.weight"] = torch.zeros(1, 24, 1, 1)  # a reconstruction head
  out["decoder.0.weight"] = torch.zeros(8, 192, 3, 3)
  return out


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
# Pre-training checkpoints (encoder only).


def test_dae_checkpoint_into_bare_encoder_strict(state, encoder_template, reference):
  converted = swin_unetr_from_torch(_dae_layout(state), encoder_template)
  _assert_same(converted.variables["params"], reference.variables["params"]["swinViT"])
  assert set(converted.unused) == {"encoder.mask_token", "encoder.norm.weight",
                                   "encoder.norm.bias", "out.conv.conv.weight",
                                   "decoder.0.weight"}


def test_dae_checkpoint_into_swin_unetr_non_strict(state, template, reference):
  variables = numpy_filled(template, seed=0, scale=1.0)
  converted = swin_unetr_from_torch(_dae_layout(state), variables, strict=False)
  got = converted.variables["params"]
  _assert_same(got["swinViT"], reference.variables["params"]["swinViT"])
  _assert_same(got["decoder1"], variables["params"]["decoder1"])  # kept from the template
  missing_roots = {m.split("/")[1] for m in converted.missing}
  assert missing_roots == {"encoder1", "encoder2", "encoder3", "encoder4", "encoder10",
                           "decoder5", "decoder4", "decoder3", "decoder2", "decoder1", "out"}
  assert "encoder.mask_token" in converted.unused
  assert "out.conv.conv.weight" in converted.unused  # a pre-training head never feeds `out`
  with pytest.raises(ValueError, match=r"missing.*encoder1"):
    swin_unetr_from_torch(_dae_layout(state), variables)
  with pytest.raises(ValueError, match="only their shapes"):
    swin_unetr_from_torch(_dae_layout(state), template, strict=False)


@pytest.mark.parametrize("prefix", ["module.", "module.swin_vit.", "swinViT."])
def test_ssl_release_layouts(state, encoder_template, reference, prefix):
  # model_swinvit.pt (module.layers1.0..., fc1/fc2) and the SSLHead (swin_vit.) with heads.
  ckpt = {prefix + k[len("swinViT."):].replace(".mlp.linear", ".mlp.fc"): v
          for k, v in state.items() if k.startswith("swinViT.")}
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

"""Parity of jaxmed.models.vit with MONAI ViT / MaskedAutoEncoderViT and timm-structured models,
through jaxmed.interop.vit."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.networks.nets import MaskedAutoEncoderViT as MonaiMAE
from monai.networks.nets import ViT as MonaiViT
from torch import nn

from jaxmed.interop.state_dict import load_state_dict
from jaxmed.interop.vit import mae_from_torch, resize_position_embedding, vit_from_torch
from jaxmed.models.vit import MaskedAutoencoderViT, ViT
from jaxmed.pretext.masking import restore_ids

TOL = 1e-4

pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning")


def _randomise(module: nn.Module, seed: int) -> nn.Module:
  """Random LayerNorm affine params, biases and tokens (MONAI / timm initialise them to 0 / 1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if not p.requires_grad:  # fixed sin-cos tables
        continue
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim == 1:
        p.copy_(1.0 + 0.3 * noise if name.endswith("weight") else 0.3 * noise)
      elif "token" in name or "position" in name or "pos_embed" in name:
        p.copy_(0.5 * noise)
  return module.eval()


def _to_channels_last(x: np.ndarray) -> jnp.ndarray:
  return jnp.asarray(np.moveaxis(x, 1, -1))


def _diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _template(model, *args, **kwargs):
  return jax.eval_shape(functools.partial(model.init, **kwargs), jax.random.key(0), *args)


def _assert_same_tree(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


# --------------------------------------------------------------------------------------------
# MONAI ViT.


def test_monai_vit_3d_parity_and_file_round_trip(tmp_path):
  torch.manual_seed(0)
  ref = _randomise(MonaiViT(2, (16, 16, 8), (8, 8, 4), hidden_size=48, mlp_dim=96, num_layers=2,
                            num_heads=4, classification=True, num_classes=3, qkv_bias=True,
                            spatial_dims=3), 0)
  x = np.random.default_rng(0).normal(size=(2, 2, 16, 16, 8)).astype(np.float32)
  with torch.no_grad():
    logits, hidden = ref(torch.from_numpy(x))
  model = ViT(patch_size=(8, 8, 4), embed_dim=48, depth=2, num_heads=4, mlp_dim=96,
              spatial_dims=3, cls_pos_embed=False, layer_norm_eps=1e-5, num_classes=3,
              head_activation="tanh")
  xj = _to_channels_last(x)
  template = _template(model, xj)
  state = ref.state_dict()
  converted = vit_from_torch(state, template)
  assert converted.missing == ()
  assert set(converted.unused) == {f"blocks.{i}.norm_cross_attn.{n}" for i in range(2)
                                   for n in ("weight", "bias")}
  out, feats = jax.jit(functools.partial(model.apply, return_features=True))(
      converted.variables, xj)
  assert _diff(out, logits) <= TOL
  for i in range(2):
    assert feats[f"block_{i}"].shape == tuple(hidden[i].shape)  # cls token first, as MONAI
    assert _diff(feats[f"block_{i}"], hidden[i]) <= TOL

  # The same variables through a .pth and a .safetensors file.
  torch.save(state, tmp_path / "vit.pth")
  safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()},
                              str(tmp_path / "vit.safetensors"))
  for name in ("vit.pth", "vit.safetensors"):
    again = vit_from_torch(load_state_dict(tmp_path / name), template)
    _assert_same_tree(again.variables, converted.variables)

  # Old MONAI checkpoints carry stale cross_attn keys: ignored, reported.
  old = {**state, "blocks.0.cross_attn.to_q.weight": torch.zeros(48, 48)}
  assert "blocks.0.cross_attn.to_q.weight" in vit_from_torch(old, template).unused


def test_monai_vit_2d_perceptron_sincos_parity():
  torch.manual_seed(1)
  ref = _randomise(MonaiViT(3, (12, 16), 4, hidden_size=32, mlp_dim=48, num_layers=2,
                            num_heads=4, proj_type="perceptron", pos_embed_type="sincos",
                            spatial_dims=2), 1)
  x = np.random.default_rng(1).normal(size=(2, 3, 12, 16)).astype(np.float32)
  with torch.no_grad():
    tokens, hidden = ref(torch.from_numpy(x))
  model = ViT(patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_dim=48, spatial_dims=2,
              pos_embed="sincos", class_token=False, qkv_bias=False, layer_norm_eps=1e-5)
  xj = _to_channels_last(x)
  converted = vit_from_torch(ref.state_dict(), _template(model, xj))
  # The fixed table is checked against the model's own and reported unused.
  assert "patch_embedding.position_embeddings" in converted.unused
  out, feats = jax.jit(functools.partial(model.apply, return_features=True))(
      converted.variables, xj)
  assert out.shape == (2, 12, 32)
  assert _diff(out, tokens) <= TOL
  for i in range(2):
    assert _diff(feats[f"block_{i}"], hidden[i]) <= TOL


# --------------------------------------------------------------------------------------------
# timm / DINO layout, against a reference built from torch.nn layers as timm's VisionTransformer.


class _Attention(nn.Module):

  def __init__(self, dim, heads, qkv_bias):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q * (c // self.heads)**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):

  def __init__(self, dim, heads, qkv_bias=True):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = _Attention(dim, heads, qkv_bias)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = _Mlp(dim, 4 * dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):

  def __init__(self, in_ch, dim, patch):
    super().__init__()
    self.proj = nn.Conv2d(in_ch, dim, patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class _TimmViT(nn.Module):
  """timm ``VisionTransformer`` (class token, ``pos_embed`` with a cls row, token pooling)."""

  def __init__(self, in_ch, num_tokens, patch, dim, depth, heads, num_classes):
    super().__init__()
    self.patch_embed = _PatchEmbed(in_ch, dim, patch)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_tokens, dim))
    self.blocks = nn.ModuleList([_Block(dim, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.head = nn.Linear(dim, num_classes)

  def forward(self, x):
    x = self.patch_embed(x)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    hidden = []
    for blk in self.blocks:
      x = blk(x)
      hidden.append(x)
    x = self.norm(x)
    return self.head(x[:, 0]), hidden, x


def test_timm_parity_and_dino_checkpoint(tmp_path):
  torch.manual_seed(2)
  ref = _randomise(_TimmViT(3, 12, 4, dim=32, depth=2, heads=4, num_classes=5), 2)
  x = np.random.default_rng(2).normal(size=(2, 3, 12, 16)).astype(np.float32)
  with torch.no_grad():
    logits, hidden, tokens = ref(torch.from_numpy(x))
  model = ViT(patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=5)
  xj = _to_channels_last(x)
  state = {f"module.{k}": v for k, v in ref.state_dict().items()}  # a DDP-saved checkpoint
  converted = vit_from_torch(state, _template(model, xj), layout="timm")
  assert converted.unused == ()
  out, feats = jax.jit(functools.partial(model.apply, return_features=True))(
      converted.variables, xj)
  assert _diff(out, logits) <= TOL
  assert _diff(feats["tokens"], tokens) <= TOL
  for i in range(2):
    assert _diff(feats[f"block_{i}"], hidden[i]) <= TOL

  # DINO: a dict with "teacher" / "student" of "backbone." keys plus the projection head.
  head = {"head.mlp.0.weight": torch.ones(8, 32), "head.mlp.0.bias": torch.ones(8),
          "head.last_layer.weight_g": torch.ones(16, 1),
          "head.last_layer.weight_v": torch.ones(16, 8)}
  backbone = {f"backbone.{k}": v for k, v in ref.state_dict().items() if not k.startswith("head.")}
  torch.save({"teacher": {**backbone, **head}, "student": {**backbone, **head}, "epoch": 3},
             tmp_path / "dino.pth")
  dino = load_state_dict(tmp_path / "dino.pth")
  backbone_model = ViT(patch_size=4, embed_dim=32, depth=2, num_heads=4)
  loaded = vit_from_torch(dino, _template(backbone_model, xj), layout="timm")
  assert set(loaded.unused) == set(head)
  expected = {k: v for k, v in converted.variables["params"].items() if k != "head"}
  _assert_same_tree(loaded.variables["params"], expected)


# --------------------------------------------------------------------------------------------
# Masked autoencoders.


def test_monai_mae_parity_with_the_same_mask():
  torch.manual_seed(3)
  ref = _randomise(MonaiMAE(2, (16, 16, 16), 8, hidden_size=48, mlp_dim=64, num_layers=2,
                            num_heads=4, masking_ratio=0.5, decoder_hidden_size=36,
                            decoder_mlp_dim=40, decoder_num_layers=1, decoder_num_heads=4,
                            spatial_dims=3), 3)
  ids_keep = np.array([[5, 0, 3, 6], [1, 2, 7, 4]])

  def masking(x, masking_ratio=None):  # MONAI's _masking, with our indices
    rows = torch.arange(x.shape[0])[:, None]
    selected = torch.from_numpy(ids_keep)
    mask = torch.ones(x.shape[:2], dtype=torch.int)
    mask[rows, selected] = 0
    return x[rows, selected], selected, mask

  ref._masking = masking
  x = np.random.default_rng(3).normal(size=(2, 2, 16, 16, 16)).astype(np.float32)
  with torch.no_grad():
    pred_ref, mask_ref = ref(torch.from_numpy(x))
  model = MaskedAutoencoderViT(patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_dim=64,
                               decoder_embed_dim=36, decoder_depth=1, decoder_num_heads=4,
                               decoder_mlp_dim=40, qkv_bias=False, layer_norm_eps=1e-5,
                               cls_pos_embed=False)
  xj, ids = _to_channels_last(x), jnp.asarray(ids_keep, jnp.int32)
  ids_restore, mask = restore_ids(ids, 8)
  converted = mae_from_torch(ref.state_dict(), _template(model, xj, ids, ids_restore))
  assert {"patch_embedding.position_embeddings", "decoder_pos_embedding"} <= set(converted.unused)
  pred, _ = jax.jit(model.apply)(converted.variables, xj, ids, ids_restore)
  assert _diff(pred, pred_ref) <= TOL
  np.testing.assert_array_equal(mask, mask_ref.numpy())


class _TimmMAE(nn.Module):
  """MAE / ViT-AE++ ``MaskedAutoencoderViT`` (2D): fixed sin-cos tables with a zero cls row."""

  def __init__(self, in_ch, grid, patch, dim, depth, heads, dec_dim, dec_depth, dec_heads):
    super().__init__()
    self.patch_embed = _PatchEmbed(in_ch, dim, patch)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))

    def table(d):
      t = build_sincos_position_embedding(list(grid), d, 2).detach()
      return nn.Parameter(torch.cat([torch.zeros(1, 1, d), t], dim=1), requires_grad=False)

    self.pos_embed = table(dim)
    self.blocks = nn.ModuleList([_Block(dim, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.decoder_embed = nn.Linear(dim, dec_dim)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
    self.decoder_pos_embed = table(dec_dim)
    self.decoder_blocks = nn.ModuleList([_Block(dec_dim, dec_heads) for _ in range(dec_depth)])
    self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
    self.decoder_pred = nn.Linear(dec_dim, patch * patch * in_ch)

  def forward(self, x, ids_keep):
    x = self.patch_embed(x) + self.pos_embed[:, 1:]
    n, t, d = x.shape
    x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, d))
    x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1), x], dim=1)
    for blk in self.blocks:
      x = blk(x)
    latent = self.norm(x)
    x = self.decoder_embed(latent)
    keep = torch.zeros(n, t, dtype=torch.long).scatter(1, ids_keep, 1)
    masked = torch.argsort(keep, dim=1, stable=True)[:, :t - ids_keep.shape[1]]
    ids_shuffle = torch.cat([ids_keep, masked], dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x_ = torch.cat([x[:, 1:], self.mask_token.expand(n, t - ids_keep.shape[1], -1)], dim=1)
    x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
    x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:], latent


def test_timm_mae_parity():
  torch.manual_seed(4)
  ref = _randomise(_TimmMAE(2, (2, 3), 4, dim=16, depth=1, heads=2, dec_dim=8, dec_depth=1,
                            dec_heads=2), 4)
  x = np.random.default_rng(4).normal(size=(2, 2, 8, 12)).astype(np.float32)
  ids_keep = np.array([[4, 1, 3], [0, 5, 2]])
  with torch.no_grad():
    pred_ref, latent_ref = ref(torch.from_numpy(x), torch.from_numpy(ids_keep))
  model = MaskedAutoencoderViT(patch_size=4, spatial_dims=2, embed_dim=16, depth=1, num_heads=2,
                               decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)
  xj, ids = _to_channels_last(x), jnp.asarray(ids_keep, jnp.int32)
  ids_restore, mask = restore_ids(ids, 6)
  converted = mae_from_torch(ref.state_dict(), _template(model, xj, ids, ids_restore),
                             layout="timm")
  assert set(converted.unused) == {"pos_embed", "decoder_pos_embed"}  # verified sin-cos tables
  pred, feats = jax.jit(model.apply)(converted.variables, xj, ids, ids_restore)
  assert _diff(feats["latent"], latent_ref) <= TOL
  assert _diff(pred, pred_ref) <= TOL
  np.testing.assert_array_equal(np.asarray(mask).sum(axis=1), 3)


# --------------------------------------------------------------------------------------------
# Position-embedding resizing.


@pytest.mark.parametrize("old, new, mode", [
    ((5, 7), (8, 4), "bicubic"),
    ((3, 4, 5), (6, 2, 7), "trilinear"),
    ((4, 4), (9, 6), "bilinear"),
])
def test_resize_matches_torch_interpolate(old, new, mode):
  pos = np.random.default_rng(0).normal(size=(1, *old, 6)).astype(np.float32)
  expected = torch.nn.functional.interpolate(
      torch.from_numpy(np.moveaxis(pos, -1, 1)), size=new, mode=mode, align_corners=False)
  ours = resize_position_embedding(pos, new, method=mode)
  assert ours.shape == (1, *new, 6)
  np.testing.assert_allclose(ours, np.moveaxis(expected.numpy(), 1, -1), atol=1e-5)
  if mode != "bilinear":  # the default: bicubic in 2D, trilinear in 3D
    np.testing.assert_array_equal(resize_position_embedding(pos, new), ours)


def test_resize_pos_embed_option():
  model = ViT(patch_size=4, embed_dim=8, depth=1, num_heads=2)
  template = _template(model, jnp.zeros((1, 12, 16, 1)))  # grid (3, 4)
  rng = np.random.default_rng(0)
  state = {k: rng.normal(size=s).astype(np.float32) for k, s in {
      "patch_embed.proj.weight": (8, 1, 4, 4), "patch_embed.proj.bias": (8,),
      "cls_token": (1, 1, 8), "pos_embed": (1, 1 + 25, 8), "norm.weight": (8,),
      "norm.bias": (8,), "blocks.0.norm1.weight": (8,), "blocks.0.norm1.bias": (8,),
      "blocks.0.attn.qkv.weight": (24, 8), "blocks.0.attn.qkv.bias": (24,),
      "blocks.0.attn.proj.weight": (8, 8), "blocks.0.attn.proj.bias": (8,),
      "blocks.0.norm2.weight": (8,), "blocks.0.norm2.bias": (8,),
      "blocks.0.mlp.fc1.weight": (32, 8), "blocks.0.mlp.fc1.bias": (32,),
      "blocks.0.mlp.fc2.weight": (8, 32), "blocks.0.mlp.fc2.bias": (8,)}.items()}
  with pytest.raises(ValueError, match=r"'pos_embed' \(1, 26, 8\) holds 25 patch positions.*"
                     r"resize_pos_embed=True"):
    vit_from_torch(state, template, layout="timm")
  params = vit_from_torch(state, template, layout="timm", resize_pos_embed=True).variables["params"]
  grid = state["pos_embed"][:, 1:].reshape(1, 5, 5, 8)
  np.testing.assert_allclose(params["pos_embedding"], resize_position_embedding(grid, (3, 4)),
                             atol=1e-6)
  np.testing.assert_array_equal(params["cls_pos_embedding"], state["pos_embed"][:, :1])
  # A grid that is not square needs source_grid_shape.
  odd = {**state, "pos_embed": state["pos_embed"][:, :21]}
  with pytest.raises(ValueError, match="source_grid_shape"):
    vit_from_torch(odd, template, layout="timm", resize_pos_embed=True)
  params = vit_from_torch(odd, template, layout="timm", resize_pos_embed=True,
                          source_grid_shape=(4, 5)).variables["params"]
  assert params["pos_embedding"].shape == (1, 3, 4, 8)


# --------------------------------------------------------------------------------------------
# Errors.


def _small_monai(**kwargs):
  torch.manual_seed(0)
  return MonaiViT(1, (8, 8), 4, hidden_size=12, mlp_dim=16, num_layers=1, num_heads=2,
                  spatial_dims=2, **kwargs)


def _small_template(**kwargs):
  model = ViT(**{"patch_size": 4, "embed_dim": 12, "depth": 1, "num_heads": 2, "mlp_dim": 16,
                 "class_token": False, "qkv_bias": False, "layer_norm_eps": 1e-5, **kwargs})
  return _template(model, jnp.zeros((1, 8, 8, 1)))


def test_mismatch_errors():
  state = _small_monai().state_dict()
  template = _small_template()
  vit_from_torch(state, template)  # fits
  missing = {k: v for k, v in state.items() if k != "norm.weight"}
  with pytest.raises(ValueError, match=r"missing.*params/norm/scale \(<- norm.weight\)"):
    vit_from_torch(missing, template)
  with pytest.raises(ValueError, match=r"not used by the model: extra.weight"):
    vit_from_torch({**state, "extra.weight": torch.zeros(2)}, template)
  with pytest.raises(ValueError, match=r"shape mismatch.*blocks.0.mlp.linear1.weight \(16, 12\)"):
    vit_from_torch(state, _small_template(mlp_dim=8))
  # Not strict: unused keys are reported, not errors.
  assert vit_from_torch({**state, "extra.weight": torch.zeros(2)}, template,
                        strict=False).unused[-1] == "extra.weight"


def test_learned_table_into_sincos_model_is_an_error():
  state = _small_monai().state_dict()  # learnable positions
  with pytest.raises(ValueError, match=r"position_embeddings.*not a fixed 2D sin-cos table"):
    vit_from_torch(state, _small_template(pos_embed="sincos"))
  sincos = _small_monai(pos_embed_type="sincos").state_dict()
  assert "patch_embedding.position_embeddings" in vit_from_torch(
      sincos, _small_template(pos_embed="sincos")).unused


def test_argument_errors():
  state = _small_monai().state_dict()
  with pytest.raises(ValueError, match="layout must be one of"):
    vit_from_torch(state, _small_template(), layout="keras")
  with pytest.raises(ValueError, match="template must be Flax variables"):
    vit_from_torch(state, _small_template()["params"])
  with pytest.raises(ValueError, match="cls_pos_embed=False"):
    vit_from_torch(state, _small_template(class_token=True, cls_pos_embed=True))
  with pytest.raises(ValueError, match="'encoder' and 'decoder'"):
    mae_from_torch(state, _small_template())
  with pytest.raises(ValueError, match="method must be one of"):
    resize_position_embedding(np.zeros((1, 2, 2, 4)), (3, 3), method="nearest")
  with pytest.raises(ValueError, match=r"pos \(1, \*grid, D\)"):
    resize_position_embedding(np.zeros((2, 2, 4)), (3, 3))

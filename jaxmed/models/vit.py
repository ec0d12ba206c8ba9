"""Vision Transformer for 2D ``(N, H, W, C)`` or 3D ``(N, D, H, W, C)`` images, and its MAE split.

:class:`ViT` is the classic pre-norm ViT (Dosovitskiy et al., 2021) with a per-axis patch size,
"learned" or fixed "sincos" position embeddings and an optional cls token; it covers the MONAI
``ViT`` and the timm / DINO ``VisionTransformer`` (weights load with
:mod:`jaxmed.interop.vit`). :class:`MAEEncoder`, :class:`MAEDecoder` and
:class:`MaskedAutoencoderViT` are the masked autoencoder of He et al. (2022) in the 3D form of
ViT-AE++ (``vit_ae_plus_plus``): the encoder sees only the visible tokens, the decoder fills in a
shared learned ``mask_token``, unshuffles with ``ids_restore`` and predicts every patch. The models
take the mask as input (``ids_keep``, ``ids_restore``); drawing it is a pretext transform
(:mod:`jaxmed.pretext.masking`: ``random_masking``, ``restore_ids``, ``mae_forward``). The patch
embedding, MLP and DropPath come from :mod:`jaxmed.models.blocks`.

Layer names are part of the API (the encoder's names equal the ViT's, so pre-trained
``MAEEncoder`` params load into a ``ViT`` for fine-tuning):

  patch_embed               kernel == stride patch projection: kernel (*patch, C, D), bias (D,)
  cls_token                 (1, 1, D), when ``class_token``
  pos_embedding             (1, *grid, D), when ``pos_embed == "learned"``
  cls_pos_embedding         (1, 1, D), learned position of the cls token (timm); absent for
                            ``cls_pos_embed=False`` (MONAI: the cls token gets no position)
  block_{i}                 norm1, attn/qkv, attn/proj, norm2, mlp/fc1, mlp/fc2
  norm                      final LayerNorm
  head                      Dense classifier, when ``num_classes > 0``

Token order: patches are numbered row-major over the patch grid (the last spatial axis fastest),
as a strided conv followed by ``flatten`` in PyTorch; the cls token, when present, comes first.
Patch vectors (:func:`patchify`) follow the MAE convention: ``(p_0, ..., p_{d-1}, C)`` flattened
with the channel fastest.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.models._utils import (check_choice, check_input, check_rate, check_spatial_dims,
                                  spatial_tuple)
from jaxmed.models.blocks import (MLP, Dense, DropPath, PatchConv, attention, grid_shape_of,
                                  make_norm, patchify, unpatchify)

POS_EMBEDS = ("learned", "sincos", "none")
POOLS = ("cls", "mean")
HEAD_ACTIVATIONS = ("tanh",)

# ViT paper widths / depths / heads (Dosovitskiy et al., 2021, Table 1), plus Ti and S (DeiT).
VIT_VARIANTS: dict[str, dict[str, int]] = {
    "Ti/16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "S/16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "S/8": dict(patch_size=8, embed_dim=384, depth=12, num_heads=6),
    "B/32": dict(patch_size=32, embed_dim=768, depth=12, num_heads=12),
    "B/16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "B/8": dict(patch_size=8, embed_dim=768, depth=12, num_heads=12),
    "L/32": dict(patch_size=32, embed_dim=1024, depth=24, num_heads=16),
    "L/16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "H/14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}

dense_init = nn.initializers.xavier_uniform()
token_init = nn.initializers.normal(stddev=0.02)


# --------------------------------------------------------------------------------------------
# Array helpers.


def tokens_to_grid(tokens: jax.Array, grid_shape: Sequence[int]) -> jax.Array:
  """Tokens ``(N, T, D)`` -> ``(N, *grid_shape, D)``; a leading cls token (T = prod + 1) is dropped.
  """
  grid_shape = tuple(int(g) for g in grid_shape)
  t = math.prod(grid_shape)
  if tokens.ndim != 3 or tokens.shape[1] not in (t, t + 1):
    raise ValueError(f"tokens_to_grid expects tokens (N, {t} or {t + 1}, D) for "
                     f"grid_shape={grid_shape}; got shape {tokens.shape}")
  if tokens.shape[1] == t + 1:
    tokens = tokens[:, 1:]
  return tokens.reshape((tokens.shape[0],) + grid_shape + (tokens.shape[-1],))


def grid_to_tokens(grid: jax.Array) -> jax.Array:
  """``(N, *grid, D)`` -> tokens ``(N, prod(grid), D)`` (row-major); inverse of tokens_to_grid."""
  if grid.ndim < 3:
    raise ValueError(f"grid_to_tokens expects (N, *grid, D); got shape {grid.shape}")
  return grid.reshape(grid.shape[0], -1, grid.shape[-1])


def sincos_block_dims(dim: int, spatial_dims: int) -> tuple[int, ...]:
  """Channels per axis block of the sin-cos table (see :func:`sincos_pos_embedding`).

  2D: ``(dim / 2, dim / 2)``, needs ``dim % 4 == 0`` (MAE). 3D: ViT-AE++'s split
  ``(r, r, dim - 2r)`` with ``r = dim // 3`` rounded up to even: equal thirds when
  ``dim % 6 == 0`` (then also MONAI's ``build_sincos_position_embedding``, which accepts only that
  case); ``dim = 512`` (the ViT-AE++ decoder) gives ``(170, 170, 172)``. Every block must be even
  and non-empty.

  Raises:
    ValueError: naming ``dim`` when no such split exists.
  """
  if spatial_dims == 2:
    if dim % 4 or dim < 4:
      raise ValueError(f"2D sin-cos position embedding needs the embedding dim divisible by 4; "
                       f"got dim={dim}")
    return (dim // 2, dim // 2)
  if spatial_dims != 3:
    raise ValueError(f"sin-cos position embedding needs 2 or 3 spatial dims; got {spatial_dims}")
  r = dim // 3 + (dim // 3) % 2
  last = dim - 2 * r
  if dim % 2 or last < 2:
    raise ValueError(f"3D sin-cos position embedding needs an even embedding dim >= 6 (equal "
                     f"thirds, as MONAI, when divisible by 6); got dim={dim}")
  return (r, r, last)


def sincos_pos_embedding(grid_shape: Sequence[int], dim: int, *, temperature: float = 10000.0,
                         cls_token: bool = False) -> np.ndarray:
  """Fixed 2D / 3D sin-cos position table ``(T, dim)`` (``(1 + T, dim)`` with a zero cls row).

  The channels are split into one block per axis (:func:`sincos_block_dims`), in the order
  (axis 1, axis 0, axis 2) -- the ``meshgrid(w, h)`` order of MAE's 2D table and of ViT-AE++'s
  and MONAI's 3D tables. A block of ``2n`` channels is ``[sin(pos * omega), cos(pos * omega)]``
  with ``omega_k = temperature ** (-k / n)``, ``k = 0..n-1``; rows are tokens in row-major grid
  order. The cls row (MAE, ViT-AE++) is zero: the cls token gets no position.

  Raises:
    ValueError: a grid that is not 2D / 3D, or a ``dim`` with no valid split.
  """
  grid_shape = tuple(int(g) for g in grid_shape)
  d = len(grid_shape)
  if d not in (2, 3):
    raise ValueError(
        f"sin-cos position embedding needs a 2D or 3D grid; got grid_shape={grid_shape}")
  sizes = sincos_block_dims(dim, d)
  coords = np.meshgrid(*[np.arange(g, dtype=np.float64) for g in grid_shape], indexing="ij")
  blocks = []
  for axis, size in zip((1, 0, 2), sizes):
    n = size // 2
    omega = 1.0 / temperature**(np.arange(n, dtype=np.float64) / n)
    angle = coords[axis].reshape(-1, 1) * omega[None, :]
    blocks += [np.sin(angle), np.cos(angle)]
  table = np.concatenate(blocks, axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
  return table.astype(np.float32)


def _check_ids_keep(ids_keep, n: int, num_tokens: int) -> None:
  if ids_keep.ndim != 2 or ids_keep.shape[0] != n or not 1 <= ids_keep.shape[1] <= num_tokens:
    raise ValueError(f"ids_keep must have shape (N={n}, K) with 1 <= K <= T={num_tokens}; "
                     f"got shape {ids_keep.shape}")
  if not jnp.issubdtype(ids_keep.dtype, jnp.integer):
    raise ValueError(f"ids_keep must be integer; got dtype {ids_keep.dtype}")


# --------------------------------------------------------------------------------------------
# Layers.


def _layer_norm(eps: float, name: str, param_dtype: Any) -> nn.Module:
  """LayerNorm in float32 with the two-pass variance (as PyTorch)."""
  return make_norm("layer", epsilon=eps, param_dtype=param_dtype, name=name)


class Attention(nn.Module):
  """Multi-head self-attention: a ``qkv`` Dense D -> 3D, scaled dot-product attention, ``proj``.

  The qkv features are ordered (3, heads, D / heads), as timm's and MONAI's. Logits and softmax
  are float32: on CPU :func:`jaxmed.models.blocks.attention` (its hand-written gradient), else
  ``jax.nn.dot_product_attention`` (which may pick a fused kernel on GPU); attention dropout
  runs only when ``deterministic`` is False. Input / output ``(N, T, D)``.
  """

  num_heads: int
  qkv_bias: bool = True
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    n, t, dim = x.shape
    h = self.num_heads
    hd = dim // h
    dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=dense_init)
    qkv = Dense(3 * dim, use_bias=self.qkv_bias, name="qkv", **dense)(x)
    qkv = qkv.reshape(n, t, 3, h, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.attention_dropout_rate > 0.0 and not deterministic:
      logits = jnp.einsum("nthd,nshd->nhts", q, k, preferred_element_type=jnp.float32)
      weights = jax.nn.softmax(logits * hd**-0.5, axis=-1)
      weights = nn.Dropout(self.attention_dropout_rate)(weights, deterministic=False)
      out = jnp.einsum("nhts,nshd->nthd", weights.astype(v.dtype), v)
    elif jax.default_backend() == "cpu":  # head-major, with the CPU-fast gradient
      head_major = lambda a: a.transpose(0, 2, 1, 3)
      out = attention(head_major(q) * jnp.asarray(hd**-0.5, q.dtype), head_major(k),
                      head_major(v)).transpose(0, 2, 1, 3)
    else:
      out = jax.nn.dot_product_attention(q, k, v, scale=hd**-0.5)
    return Dense(dim, name="proj", **dense)(out.reshape(n, t, dim))


class Block(nn.Module):
  """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

  The residual stream ``x`` is float32; attention and MLP compute in ``dtype``. ``drop_path_rate``
  drops each branch per sample (stochastic depth) in training.
  """

  num_heads: int
  mlp_dim: int
  qkv_bias: bool = True
  layer_norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    train = not deterministic
    y = _layer_norm(self.layer_norm_eps, "norm1", self.param_dtype)(x).astype(self.dtype)
    y = Attention(self.num_heads, qkv_bias=self.qkv_bias,
                  attention_dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="attn")(y, deterministic)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    x = x + DropPath(self.drop_path_rate)(y, train=train).astype(jnp.float32)
    y = _layer_norm(self.layer_norm_eps, "norm2", self.param_dtype)(x).astype(self.dtype)
    y = MLP(self.mlp_dim, dropout_rate=self.dropout_rate, names=("fc1", "fc2"),
            kernel_init=dense_init, dtype=self.dtype, param_dtype=self.param_dtype,
            name="mlp")(y, train=train)
    return x + DropPath(self.drop_path_rate)(y, train=train).astype(jnp.float32)


def _run_blocks(module: nn.Module, x: jax.Array, *, feature_prefix: str, depth: int,
                mlp_dim: int, train: bool, feats: dict) -> jax.Array:
  """``depth`` blocks ``block_{i}`` of ``module`` (the caller); outputs in ``feats``.

  ``module`` supplies the block settings (num_heads, qkv_bias, layer_norm_eps, dropout rates,
  remat, dtypes); ``feats[f"{feature_prefix}{i}"]`` receives block i's output. Stochastic-depth
  rates grow linearly from 0 to ``drop_path_rate`` over the blocks (timm); a single block gets
  ``drop_path_rate``.
  """
  block_cls = nn.remat(Block, static_argnums=(2,)) if module.remat else Block
  for i in range(depth):
    rate = module.drop_path_rate * i / (depth - 1) if depth > 1 else module.drop_path_rate
    x = block_cls(num_heads=module.num_heads, mlp_dim=mlp_dim, qkv_bias=module.qkv_bias,
                  layer_norm_eps=module.layer_norm_eps, dropout_rate=module.dropout_rate,
                  attention_dropout_rate=module.attention_dropout_rate, drop_path_rate=rate,
                  dtype=module.dtype, param_dtype=module.param_dtype,
                  name=f"block_{i}")(x, not train)
    feats[f"{feature_prefix}{i}"] = x
  return x


def _check_transformer(embed_dim: int, depth: int, num_heads: int, mlp_dim: int, prefix: str = ""):
  if embed_dim < 1 or depth < 0 or num_heads < 1:
    raise ValueError(f"{prefix}embed_dim, {prefix}depth, {prefix}num_heads must be positive "
                     f"(depth >= 0); got {embed_dim}, {depth}, {num_heads}")
  if embed_dim % num_heads:
    raise ValueError(f"{prefix}embed_dim must be divisible by {prefix}num_heads; got "
                     f"{prefix}embed_dim={embed_dim}, {prefix}num_heads={num_heads}")
  if mlp_dim < 1:
    raise ValueError(f"{prefix}mlp_dim must be >= 1; got {mlp_dim}")


def _check_pos_embed(pos_embed: str, spatial_dims: int, dim: int, name: str = "pos_embed") -> None:
  check_choice(pos_embed, POS_EMBEDS, name)
  if pos_embed == "sincos":
    try:
      sincos_block_dims(dim, spatial_dims)
    except ValueError as e:
      raise ValueError(f"{name}='sincos': {e} (use {name}='learned' or another width)") from None


# --------------------------------------------------------------------------------------------
# Models.


class _Transformer(nn.Module):
  """Fields shared by every transformer here (:class:`ViT`, the MAE encoder and decoder, and
  :class:`MaskedAutoencoderViT`, which hands them to both halves)."""

  patch_size: int | Sequence[int] = 8
  spatial_dims: int = 3
  mlp_ratio: float = 4.0
  class_token: bool = True
  qkv_bias: bool = True
  layer_norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  sincos_temperature: float = 10000.0
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _shared(self) -> dict[str, Any]:
    """The :class:`_Transformer` fields of this module, by name."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(_Transformer)
            if f.name not in ("parent", "name")}


class _Encoder(_Transformer):
  """Fields and the token encoder shared by :class:`ViT` and :class:`MAEEncoder`."""

  patch_size: int | Sequence[int] = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int | None = None
  spatial_dims: int = 2
  pos_embed: str = "learned"
  cls_pos_embed: bool = True

  @property
  def hidden_dim(self) -> int:
    """The MLP width: ``mlp_dim`` or ``int(embed_dim * mlp_ratio)``."""
    return int(self.mlp_dim) if self.mlp_dim is not None else int(self.embed_dim * self.mlp_ratio)

  def patch_shape(self) -> tuple[int, ...]:
    """The patch size as a tuple of ``spatial_dims`` ints."""
    return spatial_tuple(self.patch_size, self.spatial_dims, "patch_size")

  def grid_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
    """The patch grid ``spatial_shape // patch_size`` of an input."""
    return grid_shape_of(spatial_shape, self.patch_shape())

  def _validate(self, x: jax.Array) -> tuple[int, ...]:
    check_spatial_dims(self.spatial_dims)
    check_input(x, self.spatial_dims, type(self).__name__)
    p = self.patch_shape()
    if any(s % q for s, q in zip(x.shape[1:-1], p)):
      raise ValueError(f"{type(self).__name__} input shape {x.shape}: every spatial size must be "
                       f"divisible by patch_size={p}")
    _check_transformer(self.embed_dim, self.depth, self.num_heads, self.hidden_dim)
    _check_pos_embed(self.pos_embed, self.spatial_dims, self.embed_dim)
    for name in ("dropout_rate", "attention_dropout_rate", "drop_path_rate"):
      check_rate(getattr(self, name), name)
    return tuple(s // q for s, q in zip(x.shape[1:-1], p))

  def _encode(self, x: jax.Array, ids_keep: jax.Array | None, train: bool):
    """Patch embed, position, keep ``ids_keep``, cls token, blocks, final norm.

    Returns ``(tokens (N, [1 +] K, D) float32 after the final norm, {block_i: ...})``.
    """
    grid = self._validate(x)
    num_tokens = math.prod(grid)
    if ids_keep is not None:
      _check_ids_keep(ids_keep, x.shape[0], num_tokens)
    dim = self.embed_dim
    # Kernel == stride conv; xavier_uniform over the whole (*patch, C) fan-in, as timm / MAE.
    patch_init = nn.initializers.xavier_uniform(in_axis=tuple(range(len(grid) + 1)), out_axis=-1)
    tokens = PatchConv(dim, self.patch_shape(), kernel_init=patch_init, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="patch_embed")(x)
    tokens = grid_to_tokens(tokens).astype(jnp.float32)
    if self.pos_embed == "learned":
      shape = (1,) + grid + (dim,)
      if self.has_variable("params", "pos_embedding"):
        have = self.get_variable("params", "pos_embedding").shape
        if tuple(have) != shape:
          raise ValueError(
              f"input shape {x.shape} gives the patch grid {grid}, but the learned pos_embedding "
              f"has shape {tuple(have)}; resize it (jaxmed.interop.vit.resize_position_embedding)")
      pos = self.param("pos_embedding", token_init, shape, self.param_dtype)
      tokens = tokens + pos.reshape(1, num_tokens, dim).astype(jnp.float32)
    elif self.pos_embed == "sincos":
      table = sincos_pos_embedding(grid, dim, temperature=self.sincos_temperature)
      tokens = tokens + jnp.asarray(table)[None]
    if ids_keep is not None:
      tokens = jnp.take_along_axis(tokens, ids_keep[..., None].astype(jnp.int32), axis=1)
    if self.class_token:
      cls = self.param("cls_token", token_init, (1, 1, dim), self.param_dtype).astype(jnp.float32)
      if self.pos_embed == "learned" and self.cls_pos_embed:
        cls = cls + self.param("cls_pos_embedding", token_init, (1, 1, dim),
                               self.param_dtype).astype(jnp.float32)
      tokens = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, dim)), tokens], axis=1)
    tokens = nn.Dropout(self.dropout_rate)(tokens, deterministic=not train)
    feats: dict[str, jax.Array] = {}
    tokens = _run_blocks(self, tokens, feature_prefix="block_", depth=self.depth,
                         mlp_dim=self.hidden_dim, train=train, feats=feats)
    tokens = _layer_norm(self.layer_norm_eps, "norm", self.param_dtype)(tokens)
    return tokens, feats

  def _summaries(self, tokens: jax.Array, pool: str) -> dict[str, jax.Array]:
    out = {"tokens": tokens}
    patches = tokens[:, 1:] if self.class_token else tokens
    if self.class_token:
      out["cls"] = tokens[:, 0]
    out["pooled"] = tokens[:, 0] if pool == "cls" else jnp.mean(patches, axis=1)
    return out


class ViT(_Encoder):
  """Vision Transformer (2D or 3D), channels-last; pre-norm blocks, final LayerNorm.

  Attributes:
    patch_size: patch size, an int or one int per spatial axis.
    embed_dim, depth, num_heads: width D, number of blocks, attention heads.
    mlp_ratio: MLP width ``int(D * mlp_ratio)``, unless ``mlp_dim`` is given.
    spatial_dims: 2 or 3.
    pos_embed: "learned" (a ``(1, *grid, D)`` parameter: the grid is fixed at init), "sincos"
      (fixed, :func:`sincos_pos_embedding`, any grid) or "none".
    class_token: prepend a learned cls token.
    cls_pos_embed: with "learned", the cls token has its own learned position
      ``cls_pos_embedding`` (timm); False: it gets none (MONAI). Sin-cos gives it a zero row.
    qkv_bias: bias of the qkv projection (timm / MAE True, MONAI False).
    layer_norm_eps: 1e-6 (timm, MAE, DINO) or 1e-5 (MONAI, PyTorch default).
    dropout_rate: dropout after the position embedding, inside the MLP and after the attention
      projection; attention_dropout_rate: on the attention weights; drop_path_rate: stochastic
      depth, growing linearly to this value over the blocks. All off unless ``train``.
    num_classes: a Dense ``head`` on the pooled token when > 0 (zero-initialised).
    pool: "cls" or "mean" (over patch tokens after the final norm); default "cls" when
      ``class_token`` else "mean".
    head_activation: None or "tanh" (MONAI's classification head).
    remat: rematerialise every block (saves activation memory for large 3D inputs).
    dtype: compute dtype; LayerNorms, softmax, the residual stream and the outputs are float32.

  ``__call__(x (N, *S, C), *, ids_keep=None, train=False, return_features=False)``: the logits
  ``(N, num_classes)`` when ``num_classes > 0``, else the tokens after the final norm
  ``(N, [1 +] T, D)``. ``ids_keep`` (N, K) keeps only those patch tokens (the MAE encoder). With
  ``return_features`` also a dict: ``block_{i}`` (N, [1 +] T, D) the output of block i,
  ``tokens`` (after the final norm), ``cls`` (N, D) when ``class_token``, ``pooled`` (N, D);
  all float32. Spatial sizes must be divisible by the patch size.
  """

  num_classes: int = 0
  pool: str | None = None
  head_activation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, ids_keep: jax.Array | None = None, train: bool = False,
               return_features: bool = False):
    pool = self.pool or ("cls" if self.class_token else "mean")
    if pool not in POOLS:
      raise ValueError(f"pool must be one of {POOLS}; got pool={self.pool!r}")
    if pool == "cls" and not self.class_token:
      raise ValueError("pool='cls' needs class_token=True")
    if self.head_activation not in (None,) + HEAD_ACTIVATIONS:
      raise ValueError(f"head_activation must be None or one of {HEAD_ACTIVATIONS}; "
                       f"got {self.head_activation!r}")
    if self.num_classes < 0:
      raise ValueError(f"num_classes must be >= 0; got num_classes={self.num_classes}")
    tokens, feats = self._encode(x, ids_keep, train)
    feats.update(self._summaries(tokens, pool))
    if self.num_classes > 0:
      out = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=nn.initializers.zeros, name="head")(
                         feats["pooled"].astype(self.dtype)).astype(jnp.float32)
      if self.head_activation == "tanh":
        out = jnp.tanh(out)
    else:
      out = tokens
    return (out, feats) if return_features else out


def vit(name: str, **kwargs) -> ViT:
  """A :class:`ViT` of a named size (``"B/16"``, keys of :data:`VIT_VARIANTS`); kwargs override.

  ``vit("B/16", num_classes=1000)`` is ViT-B/16 (86,567,656 parameters at 224^2, 3 channels);
  ``vit("B/8", spatial_dims=3, pos_embed="sincos")`` the ViT-AE++ encoder shape.
  """
  if name not in VIT_VARIANTS:
    raise ValueError(f"unknown ViT variant {name!r}; known: {sorted(VIT_VARIANTS)}")
  return ViT(**{**VIT_VARIANTS[name], **kwargs})


class MAEEncoder(_Encoder):
  """The MAE / ViT-AE++ encoder: a :class:`ViT` trunk run only over the visible tokens.

  Defaults are ViT-AE++'s 3D encoder: patch 8, 12 blocks x 768 x 12 heads, fixed 3D sin-cos
  position (zero row for the cls token), qkv bias, LayerNorm eps 1e-6. Its parameters are a
  :class:`ViT`'s with the same fields (no head), so it is usable on its own, e.g. with the
  ``encoder`` params of a trained :class:`MaskedAutoencoderViT` (see
  :meth:`MaskedAutoencoderViT.make_encoder`)::

    encoder = model.make_encoder()
    latent = encoder.apply({"params": variables["params"]["encoder"]}, x)            # all tokens
    latent = encoder.apply({"params": variables["params"]["encoder"]}, x, ids_keep)  # visible

  ``__call__(x (N, *S, C), ids_keep=None, *, train=False, return_features=False)`` -> latent
  ``(N, [1 +] K, D)`` float32 after the final norm (cls first), or ``(latent, features)`` with
  ``block_{i}``, ``tokens``, ``cls``, ``pooled`` (mean of the visible tokens without a cls token).
  ``ids_keep`` (N, K) int are the kept token indices (``jaxmed.pretext.masking.random_masking``);
  None keeps all ``T`` tokens in grid order (``K = T``).
  """

  patch_size: int | Sequence[int] = 8
  spatial_dims: int = 3
  pos_embed: str = "sincos"

  @nn.compact
  def __call__(self, x: jax.Array, ids_keep: jax.Array | None = None, *, train: bool = False,
               return_features: bool = False):
    tokens, feats = self._encode(x, ids_keep, train)
    feats.update(self._summaries(tokens, "cls" if self.class_token else "mean"))
    return (tokens, feats) if return_features else tokens


class MAEDecoder(_Transformer):
  """The MAE / ViT-AE++ decoder: latent -> every patch's pixels ``(N, T, prod(p) * C)``.

  ``embed`` (Dense to the decoder width), a shared learned ``mask_token`` for the masked
  positions, unshuffle with ``ids_restore``, its own position embedding (fixed sin-cos by
  default; "learned" is ``pos_embedding`` (1, *grid, D_dec); the cls token gets none), blocks
  ``block_{i}``, ``norm``, ``pred`` (Dense to ``prod(patch) * out_channels``); the cls token's
  prediction is dropped. Defaults: ViT-AE++'s 8 blocks x 512 x 16 heads, eps 1e-6.

  ``__call__(latent (N, [1 +] K, D), ids_restore (N, T), grid_shape, *, train=False,
  return_features=False)`` -> pred (N, T, prod(p) * C) float32, or ``(pred, features)`` with
  ``decoder_block_{i}`` (N, [1 +] T, D_dec) and ``decoder_tokens`` (after ``norm``).
  """

  out_channels: int = 1
  embed_dim: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_dim: int | None = None
  pos_embed: str = "sincos"

  @nn.compact
  def __call__(self, latent: jax.Array, ids_restore: jax.Array, grid_shape: Sequence[int], *,
               train: bool = False, return_features: bool = False):
    grid = tuple(int(g) for g in grid_shape)
    if len(grid) != self.spatial_dims or self.spatial_dims not in (2, 3):
      raise ValueError(f"grid_shape must have spatial_dims={self.spatial_dims} (2 or 3) entries; "
                       f"got grid_shape={grid}")
    num_tokens = math.prod(grid)
    p = spatial_tuple(self.patch_size, self.spatial_dims, "patch_size")
    mlp_dim = (int(self.mlp_dim) if self.mlp_dim is not None
               else int(self.embed_dim * self.mlp_ratio))
    _check_transformer(self.embed_dim, self.depth, self.num_heads, mlp_dim, "decoder ")
    _check_pos_embed(self.pos_embed, self.spatial_dims, self.embed_dim, "decoder pos_embed")
    for name in ("dropout_rate", "attention_dropout_rate", "drop_path_rate"):
      check_rate(getattr(self, name), name)
    if self.out_channels < 1:
      raise ValueError(f"out_channels must be >= 1; got out_channels={self.out_channels}")
    extra = 1 if self.class_token else 0
    n = latent.shape[0]
    if ids_restore.shape != (n, num_tokens):
      raise ValueError(f"ids_restore must have shape (N, T) = {(n, num_tokens)} for grid_shape="
                       f"{grid}; got shape {ids_restore.shape}")
    if latent.ndim != 3 or not 1 + extra <= latent.shape[1] <= num_tokens + extra:
      raise ValueError(f"latent must be (N, {'1 + ' if extra else ''}K, D) with 1 <= K <= "
                       f"T={num_tokens}; got shape {latent.shape}")
    dim = self.embed_dim
    dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=dense_init)
    x = Dense(dim, name="embed", **dense)(latent).astype(jnp.float32)
    mask_token = self.param("mask_token", token_init, (1, 1, dim), self.param_dtype)
    visible = x[:, extra:]
    fill = jnp.broadcast_to(mask_token.astype(jnp.float32),
                            (n, num_tokens - visible.shape[1], dim))
    x_ = jnp.concatenate([visible, fill], axis=1)
    x_ = jnp.take_along_axis(x_, ids_restore[..., None].astype(jnp.int32), axis=1)
    if self.pos_embed == "sincos":
      x_ = x_ + jnp.asarray(sincos_pos_embedding(grid, dim, temperature=self.sincos_temperature))
    elif self.pos_embed == "learned":
      pos = self.param("pos_embedding", token_init, (1,) + grid + (dim,), self.param_dtype)
      x_ = x_ + pos.reshape(1, num_tokens, dim).astype(jnp.float32)
    x = jnp.concatenate([x[:, :extra], x_], axis=1)
    feats: dict[str, jax.Array] = {}
    x = _run_blocks(self, x, feature_prefix="decoder_block_", depth=self.depth, mlp_dim=mlp_dim,
                    train=train, feats=feats)
    x = _layer_norm(self.layer_norm_eps, "norm", self.param_dtype)(x)
    feats["decoder_tokens"] = x
    pred = Dense(math.prod(p) * self.out_channels, name="pred", **dense)(
        x.astype(self.dtype)).astype(jnp.float32)[:, extra:]
    return (pred, feats) if return_features else pred


class MaskedAutoencoderViT(_Transformer):
  """MAE / ViT-AE++: :class:`MAEEncoder` (``encoder``) on the visible tokens + :class:`MAEDecoder`.

  Defaults are ViT-AE++'s: 3D, patch 8, encoder 12 x 768 x 12 heads, decoder 8 x 512 x 16 heads,
  fixed 3D sin-cos positions, qkv bias, LayerNorm eps 1e-6, mask ratio 0.75 (on 96^3: 1728
  tokens, 432 visible).

  The model does not draw the mask: the caller passes the masking result, so that the masking
  (a pretext transform, :mod:`jaxmed.pretext.masking`) stays out of the model::

    from jaxmed.pretext.masking import random_masking, mae_forward
    ids_keep, ids_restore, mask = random_masking(key, n, model.num_tokens(x.shape[1:-1]),
                                                 model.mask_ratio)
    pred, features = model.apply(variables, x, ids_keep, ids_restore)
    # or, in one call: pred, mask, features = mae_forward(model, variables, x, key)

  Attributes:
    mask_ratio: the fraction of masked tokens a caller should draw (read by
      ``jaxmed.pretext.masking.mae_forward``); the forward pass itself does not use it.
    patch_size, spatial_dims, embed_dim, depth, num_heads, mlp_ratio, mlp_dim, pos_embed,
      class_token, cls_pos_embed, qkv_bias, layer_norm_eps: the encoder's (see :class:`ViT`).
    decoder_embed_dim, decoder_depth, decoder_num_heads, decoder_mlp_dim, decoder_pos_embed:
      the decoder's (``decoder_mlp_dim`` defaults to ``decoder_embed_dim * mlp_ratio``).
    dropout_rate, attention_dropout_rate, drop_path_rate, remat, dtype: as :class:`ViT`, both
      halves.

  ``__call__(x (N, *S, C), ids_keep (N, K), ids_restore (N, T), *, train=False,
  return_features=False)`` -> ``(pred, features)``: ``ids_keep`` are the visible token indices
  and ``ids_restore`` the inverse of the shuffle ``concat(ids_keep, masked ids)``, as returned by
  ``random_masking`` / ``restore_ids`` of :mod:`jaxmed.pretext.masking`. ``pred`` (N, T,
  prod(p) * C) float32 are the patches of every token in :func:`patchify` order (compare with
  ``patchify(x, patch_size)`` on the masked tokens); ``features`` holds ``latent``
  (N, [1 +] K, D), the encoder output, ``pooled`` (N, D) and ``cls`` (N, D) when
  ``class_token``. With ``return_features`` also the encoder's ``block_{i}`` and the decoder's
  ``decoder_block_{i}`` and ``decoder_tokens``.
  """

  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int | None = None
  decoder_embed_dim: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  decoder_mlp_dim: int | None = None
  mask_ratio: float = 0.75
  pos_embed: str = "sincos"
  decoder_pos_embed: str = "sincos"
  cls_pos_embed: bool = True

  def _encoder_fields(self) -> dict[str, Any]:
    return dict(embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                mlp_dim=self.mlp_dim, pos_embed=self.pos_embed, cls_pos_embed=self.cls_pos_embed,
                **self._shared())

  def make_encoder(self) -> MAEEncoder:
    """The (unbound) :class:`MAEEncoder` of this model: apply it with ``params["encoder"]``."""
    return MAEEncoder(parent=None, **self._encoder_fields())

  def num_tokens(self, spatial_shape: Sequence[int]) -> int:
    """T, the patch tokens of an input of spatial shape ``spatial_shape`` (no cls token)."""
    return math.prod(grid_shape_of(spatial_shape, self.patch_size))

  @nn.compact
  def __call__(self, x: jax.Array, ids_keep: jax.Array, ids_restore: jax.Array, *,
               train: bool = False, return_features: bool = False):
    encoder = MAEEncoder(name="encoder", **self._encoder_fields())
    grid = encoder._validate(x)  # pylint: disable=protected-access
    latent, enc_feats = encoder(x, ids_keep, train=train, return_features=True)
    decoder = MAEDecoder(
        out_channels=x.shape[-1], embed_dim=self.decoder_embed_dim, depth=self.decoder_depth,
        num_heads=self.decoder_num_heads, mlp_dim=self.decoder_mlp_dim,
        pos_embed=self.decoder_pos_embed, name="decoder",
        **self._shared())
    pred, dec_feats = decoder(latent, ids_restore, grid, train=train, return_features=True)
    features = {"latent": latent, "pooled": enc_feats["pooled"]}
    if self.class_token:
      features["cls"] = enc_feats["cls"]
    if return_features:
      features.update({k: v for k, v in enc_feats.items() if k.startswith("block_")})
      features.update(dec_feats)
    return pred, features

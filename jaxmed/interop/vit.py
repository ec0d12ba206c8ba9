"""PyTorch ViT / MAE checkpoints -> :mod:`jaxmed.models.vit` variables.

Two key layouts:

``layout="monai"`` -- MONAI ``ViT`` / ``MaskedAutoEncoderViT``:

=========================================  =============================================
jaxmed                                     MONAI
=========================================  =============================================
``patch_embed``                            ``patch_embedding.patch_embeddings`` (conv) or
                                           ``patch_embedding.patch_embeddings.1``
                                           (``proj_type="perceptron"``)
``pos_embedding``                          ``patch_embedding.position_embeddings`` (1, T, D)
``cls_token``                              ``cls_token`` (no position: ``cls_pos_embed=False``)
``block_{i}/norm1, norm2``                 ``blocks.{i}.norm1, norm2``
``block_{i}/attn/qkv, proj``               ``blocks.{i}.attn.qkv, out_proj``
``block_{i}/mlp/fc1, fc2``                 ``blocks.{i}.mlp.linear1, linear2``
``norm``                                   ``norm`` (MAE: ``blocks.{depth}``)
``head``                                   ``classification_head.0`` (Tanh) or
                                           ``classification_head``
MAE ``decoder/embed, mask_token``          ``decoder_embed``, ``mask_tokens``
MAE ``decoder/pos_embedding``              ``decoder_pos_embedding``
MAE ``decoder/block_{i}, norm, pred``      ``decoder_blocks.{i}``, ``decoder_blocks.{depth}``,
                                           ``decoder_pred``
=========================================  =============================================

``blocks.*.norm_cross_attn.*`` (always created by MONAI's TransformerBlock, never used without
cross-attention) and the stale ``blocks.*.cross_attn.*`` of old MONAI checkpoints are ignored.

``layout="timm"`` -- timm ``VisionTransformer``, DINO, MAE and ViT-AE++: ``patch_embed.proj``,
``cls_token``, ``pos_embed`` (1, 1 + T, D) whose first row is the cls token's position,
``blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2``, ``norm``, ``head``;
MAE adds ``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.{i}``,
``decoder_norm``, ``decoder_pred``. The prefixes ``module.`` and ``backbone.`` are stripped (DINO
saves ``teacher`` / ``student`` dicts with ``backbone.`` keys: read the ``teacher`` with
:func:`~jaxmed.interop.state_dict.load_state_dict`); DINO's projection head (``head.mlp.*``,
``head.last_layer.*``) is left in ``unused``.

Fixed sin-cos tables: a model with ``pos_embed="sincos"`` computes its table, so it has no
position variable; the checkpoint's table is then checked to be the sin-cos table
(:func:`~jaxmed.models.vit.sincos_pos_embedding` for the grid it encodes) and left in ``unused``
-- a learned table loaded into a sin-cos model is an error, not a silent loss.

A learned table for a different grid is a shape error unless ``resize_pos_embed=True``, which
resamples it (:func:`resize_position_embedding`: bicubic in 2D, trilinear in 3D, as
``torch.nn.functional.interpolate`` with ``align_corners=False``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from jaxmed.interop.state_dict import (Converted, convert, default_torch_name, strip_prefix,
                                       to_numpy)
from jaxmed.models.vit import sincos_block_dims, sincos_pos_embedding

LAYOUTS = ("monai", "timm")
DEFAULT_PREFIXES = ("module.", "backbone.")
RESIZE_METHODS = ("linear", "cubic")
_METHOD_ALIASES = {"bilinear": "linear", "trilinear": "linear", "linear": "linear",
                   "bicubic": "cubic", "tricubic": "cubic", "cubic": "cubic"}

_MONAI_BLOCK = {"attn/proj": "attn.out_proj", "mlp/fc1": "mlp.linear1", "mlp/fc2": "mlp.linear2"}
_MONAI_IGNORE = ("blocks.*.norm_cross_attn.*", "blocks.*.cross_attn.*",
                 "decoder_blocks.*.norm_cross_attn.*", "decoder_blocks.*.cross_attn.*")
_TIMM_IGNORE = ("head.mlp.*", "head.last_layer.*")  # DINO projection head


# --------------------------------------------------------------------------------------------
# Position-embedding resampling (NumPy, same numbers as torch's interpolate).


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic convolution weights for taps at offsets -1, 0, 1, 2 (torch uses a = -0.75)."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _interp_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
  """``(n_out, n_in)`` resampling matrix of ``interpolate(align_corners=False)`` along one axis."""
  scale = n_in / n_out
  src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
  m = np.zeros((n_out, n_in))
  rows = np.arange(n_out)
  if method == "linear":
    src = np.maximum(src, 0.0)
    i0 = np.floor(src).astype(int)
    w = src - i0
    i0 = np.minimum(i0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    np.add.at(m, (rows, i0), 1.0 - w)
    np.add.at(m, (rows, i1), w)
  else:
    i0 = np.floor(src).astype(int)
    weights = _cubic_weights(src - i0)
    for tap in range(4):
      np.add.at(m, (rows, np.clip(i0 - 1 + tap, 0, n_in - 1)), weights[:, tap])
  return m


def resize_position_embedding(pos: np.ndarray, new_grid: Sequence[int], *,
                              method: str | None = None) -> np.ndarray:
  """Resamples a position table ``(1, *grid, D)`` to ``(1, *new_grid, D)``.

  Separable interpolation with the numbers of ``torch.nn.functional.interpolate(...,
  align_corners=False, antialias=False)``: ``method`` "cubic" (= torch "bicubic", a = -0.75,
  border replicated) or "linear" (= "bilinear" / "trilinear"); default bicubic in 2D (timm,
  DeiT) and trilinear in 3D (torch has no tricubic).
  """
  pos = np.asarray(pos)
  new_grid = tuple(int(g) for g in new_grid)
  if pos.ndim != len(new_grid) + 2 or pos.shape[0] != 1 or min(new_grid, default=0) < 1:
    raise ValueError(f"resize_position_embedding expects pos (1, *grid, D) with a grid of "
                     f"{len(new_grid)} axes and new_grid sizes >= 1; got pos shape {pos.shape}, "
                     f"new_grid={new_grid}")
  if method is None:
    method = "cubic" if len(new_grid) == 2 else "linear"
  if method not in _METHOD_ALIASES:
    raise ValueError(f"method must be one of {sorted(_METHOD_ALIASES)}; got method={method!r}")
  method = _METHOD_ALIASES[method]
  out = pos[0].astype(np.float64)
  for axis, n_out in enumerate(new_grid):
    m = _interp_matrix(out.shape[axis], n_out, method)
    out = np.moveaxis(np.tensordot(m, out, axes=([1], [axis])), 0, axis)
  return out[None].astype(pos.dtype)


# --------------------------------------------------------------------------------------------
# Sin-cos tables in a checkpoint.


def _sincos_grid(table: np.ndarray, spatial_dims: int) -> tuple[int, ...] | None:
  """The grid a sin-cos table ``(T, D)`` encodes (from its lowest frequencies), or None."""
  dim = table.shape[1]
  try:
    sizes = sincos_block_dims(dim, spatial_dims)
  except ValueError:
    return None
  coords = {}
  start = 0
  for axis, size in zip((1, 0, 2), sizes):
    n = size // 2
    omega = 10000.0**(-(n - 1) / n) if n > 1 else 1.0
    s, c = table[:, start + n - 1], table[:, start + size - 1]
    coords[axis] = np.mod(np.arctan2(s, c), 2 * np.pi) / omega
    start += size
  grid = []
  for axis in range(spatial_dims):
    p = coords[axis]
    if not np.all(np.isfinite(p)):
      return None
    grid.append(int(np.round(p.max())) + 1)
  if math.prod(grid) != table.shape[0]:
    return None
  return tuple(grid)


def _check_sincos(key: str, value: np.ndarray, spatial_dims: int, has_cls_row: bool) -> None:
  """Raises unless ``value`` ((1,) [1 +] T, D) is a fixed sin-cos table this model would compute."""
  table = np.asarray(value, np.float64).reshape(-1, value.shape[-1])
  if has_cls_row:
    if np.max(np.abs(table[0])) > 1e-6:
      raise ValueError(f"checkpoint key {key!r}: the cls row of a sin-cos table must be zero "
                       f"(the model has no position parameter); build it with "
                       f"pos_embed='learned'")
    table = table[1:]
  grid = _sincos_grid(table, spatial_dims)
  ok = grid is not None and np.allclose(
      table, sincos_pos_embedding(grid, table.shape[1]), atol=1e-4, rtol=0)
  if not ok:
    raise ValueError(
        f"checkpoint key {key!r} {tuple(value.shape)} is not a fixed {spatial_dims}D sin-cos "
        f"table, but the model has no position parameter (pos_embed 'sincos' or 'none'); it "
        f"looks learned: build the model with pos_embed='learned' (or drop the key to discard "
        f"it)")


# --------------------------------------------------------------------------------------------
# Converters.


def _params(template: Any) -> Mapping:
  if not isinstance(template, Mapping) or "params" not in template:
    raise ValueError("template must be Flax variables {'params': ...} (e.g. "
                     "jax.eval_shape(model.init, key, x))")
  return template["params"]


class _Part:
  """One transformer (encoder or MAE decoder) of the template and its checkpoint names."""

  def __init__(self, params: Mapping, path: tuple[str, ...], *, layout: str, block_prefix: str,
               norm_key: str, pos_key: str, extra_rows: int, state: Mapping[str, np.ndarray],
               resize: bool, source_grid: Sequence[int] | None, resize_method: str | None,
               spatial_dims: int):
    self.path, self.layout = path, layout
    self.block_prefix, self.norm_key, self.pos_key = block_prefix, norm_key, pos_key
    self.extra_rows = extra_rows
    self.pos_shape = tuple(params["pos_embedding"].shape) if "pos_embedding" in params else None
    self.ignore: list[str] = []
    if self.pos_shape is None:
      if pos_key in state:
        _check_sincos(pos_key, to_numpy(state[pos_key]), spatial_dims, extra_rows > 0)
        self.ignore.append(pos_key)
      self.pos_transform = None
    else:
      self.pos_transform = self._make_pos_transform(state, resize, source_grid, resize_method)

  def _make_pos_transform(self, state, resize, source_grid, resize_method):
    grid = self.pos_shape[1:-1]
    extra = self.extra_rows
    if self.pos_key not in state:
      return None
    value = to_numpy(state[self.pos_key])
    rows = value.reshape(-1, value.shape[-1]).shape[0] - extra
    if rows == math.prod(grid):
      old_grid = grid
    elif not resize:
      raise ValueError(
          f"checkpoint key {self.pos_key!r} {tuple(value.shape)} holds {rows} patch positions, "
          f"the model's {'/'.join(self.path + ('pos_embedding',))} {self.pos_shape} needs "
          f"{math.prod(grid)}; pass resize_pos_embed=True to interpolate it")
    elif source_grid is not None:
      old_grid = tuple(int(g) for g in source_grid)
      if math.prod(old_grid) != rows:
        raise ValueError(f"source_grid_shape={old_grid} has {math.prod(old_grid)} positions, "
                         f"checkpoint key {self.pos_key!r} has {rows}")
    else:
      side = round(rows**(1 / len(grid)))
      if side**len(grid) != rows:
        raise ValueError(f"checkpoint key {self.pos_key!r} holds {rows} positions, not a square / "
                         f"cube grid; pass source_grid_shape=...")
      old_grid = (side,) * len(grid)

    def transform(w: np.ndarray) -> np.ndarray:
      w = np.asarray(w).reshape(-1, w.shape[-1])
      cls_row, w = w[:extra], w[extra:]
      if extra and not self.has_cls_pos and np.max(np.abs(cls_row)) > 1e-6:
        raise ValueError(
            f"checkpoint key {self.pos_key!r} has a non-zero cls-token position row, but the "
            f"model has no cls_pos_embedding; build it with cls_pos_embed=True")
      w = w.reshape((1,) + old_grid + (w.shape[-1],))
      if old_grid != grid:
        w = resize_position_embedding(w, grid, method=resize_method)
      return w

    return transform

  has_cls_pos = False

  def key(self, sub: tuple[str, ...], leaf: str):
    """Checkpoint key (and transform) of the leaf ``sub + (leaf,)`` inside this part."""
    if not sub:
      if leaf == "pos_embedding":
        return (self.pos_key, self.pos_transform) if self.pos_transform else self.pos_key
      if leaf == "cls_pos_embedding":
        return (self.pos_key, lambda w: np.asarray(w).reshape(-1, w.shape[-1])[None, :1])
      return None
    head = sub[0]
    name = default_torch_name(leaf)
    if head == "norm":
      return f"{self.norm_key}.{name}"
    m = re.fullmatch(r"block_(\d+)", head)
    if m:
      rest = "/".join(sub[1:])
      if self.layout == "monai":
        rest = _MONAI_BLOCK.get(rest, rest)
      return f"{self.block_prefix}.{m.group(1)}.{rest.replace('/', '.')}.{name}"
    return None


def _patch_rule(layout: str, state: Mapping, kernel_shape: tuple[int, ...]):
  """Key and transform of ``patch_embed`` kernel / bias."""
  if layout == "timm":
    return "patch_embed.proj", None
  conv = "patch_embedding.patch_embeddings"
  if f"{conv}.1.weight" in state and f"{conv}.weight" not in state:
    # proj_type="perceptron": Rearrange to (p_0 ... p_{d-1} c), then Linear(prod(p) * C, D).
    return f"{conv}.1", lambda w: np.asarray(w).T.reshape(kernel_shape)
  return conv, None


def _common_kwargs(layout, prefixes):
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}; got layout={layout!r}")
  return DEFAULT_PREFIXES if prefixes is None else tuple(prefixes)


def vit_from_torch(state_dict: Mapping[str, Any], template: Any, *, layout: str = "monai",
                   strict: bool = True, resize_pos_embed: bool = False,
                   source_grid_shape: Sequence[int] | None = None,
                   resize_method: str | None = None, ignore: Iterable[str] = (),
                   prefixes: Iterable[str] | None = None) -> Converted:
  """Converts a MONAI ``ViT`` or timm / DINO ``VisionTransformer`` state dict for a :class:`ViT`.

  Args:
    state_dict: ``{key: tensor}`` (e.g. from :func:`~jaxmed.interop.state_dict.load_state_dict`).
    template: the ViT's variables or ``jax.eval_shape(model.init, key, x)``; build the model to
      match the checkpoint: MONAI ``ViT`` is ``layer_norm_eps=1e-5, qkv_bias=False`` (its
      default), ``cls_pos_embed=False``, ``head_activation="tanh"`` (its default
      ``post_activation``), ``mlp_dim=`` its ``mlp_dim``; timm / DINO is eps 1e-6, qkv bias,
      ``cls_pos_embed=True``.
    layout: "monai" or "timm" (see the module docstring).
    strict: missing leaves and unused keys are errors (the ignored patterns aside).
    resize_pos_embed: resample a learned position table made for another grid.
    source_grid_shape: the checkpoint's grid when resizing a table that is not a square / cube.
    resize_method: see :func:`resize_position_embedding` (default bicubic 2D, trilinear 3D).
    ignore: further ``fnmatch`` patterns of keys that may stay unused.
    prefixes: stripped from the keys first (default ``("module.", "backbone.")``).

  Returns:
    :class:`~jaxmed.interop.state_dict.Converted`; ``unused`` lists the ignored keys (MONAI's
    ``norm_cross_attn``, DINO's head, a verified sin-cos table).

  Raises:
    ValueError: a key or shape mismatch (listing the keys), a learned table for another grid
    without ``resize_pos_embed``, a learned table for a sin-cos model.
  """
  prefixes = _common_kwargs(layout, prefixes)
  state = strip_prefix(state_dict, prefixes)
  params = _params(template)
  spatial_dims = len(params["patch_embed"]["kernel"].shape) - 2
  extra = 1 if layout == "timm" and "cls_token" in params else 0
  pos_key = "pos_embed" if layout == "timm" else "patch_embedding.position_embeddings"
  part = _Part(params, (), layout=layout, block_prefix="blocks", norm_key="norm",
               pos_key=pos_key, extra_rows=extra, state=state, resize=resize_pos_embed,
               source_grid=source_grid_shape, resize_method=resize_method,
               spatial_dims=spatial_dims)
  part.has_cls_pos = "cls_pos_embedding" in params
  if layout == "monai" and part.has_cls_pos:
    raise ValueError("MONAI's ViT gives the cls token no position embedding: build the model "
                     "with cls_pos_embed=False (the template has params/cls_pos_embedding)")
  patch_prefix, patch_transform = _patch_rule(layout, state,
                                              tuple(params["patch_embed"]["kernel"].shape))
  head_key = "head"
  if layout == "monai":
    head_key = ("classification_head.0" if "classification_head.0.weight" in state
                else "classification_head")

  def rule(path: tuple[str, ...]):
    _, *mods, leaf = path
    if mods == ["patch_embed"]:
      key = f"{patch_prefix}.{default_torch_name(leaf)}"
      return (key, patch_transform) if leaf == "kernel" and patch_transform else key
    if not mods and leaf == "cls_token":
      return "cls_token"
    if mods == ["head"]:
      return f"{head_key}.{default_torch_name(leaf)}"
    return part.key(tuple(mods), leaf)

  ignored = list(_MONAI_IGNORE if layout == "monai" else _TIMM_IGNORE) + part.ignore
  return convert(state, template, rule, strict=strict, ignore=ignored + list(ignore),
                 name=f"{layout} ViT checkpoint")


def mae_from_torch(state_dict: Mapping[str, Any], template: Any, *, layout: str = "monai",
                   strict: bool = True, resize_pos_embed: bool = False,
                   source_grid_shape: Sequence[int] | None = None,
                   resize_method: str | None = None, ignore: Iterable[str] = (),
                   prefixes: Iterable[str] | None = None) -> Converted:
  """Converts a masked-autoencoder state dict for a :class:`MaskedAutoencoderViT`.

  ``layout="monai"``: MONAI ``MaskedAutoEncoderViT`` (build the model with its settings:
  ``layer_norm_eps=1e-5``, ``qkv_bias=False``, ``mlp_dim`` / ``decoder_mlp_dim`` = its
  ``mlp_dim`` / ``decoder_mlp_dim`` (512 by default), ``cls_pos_embed=False`` for learned
  positions). ``layout="timm"``: MAE / ViT-AE++ checkpoints (``decoder_embed``, ``mask_token``,
  ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``). Arguments as :func:`vit_from_torch`;
  the resize options apply to the learned tables of both halves. The model takes the masking
  result, so a template is ``jax.eval_shape(model.init, key, x, ids_keep, ids_restore)`` (any
  ``ids_keep`` (N, K) and ``ids_restore`` (N, T) int32 arrays or ``jax.ShapeDtypeStruct`` s).
  """
  prefixes = _common_kwargs(layout, prefixes)
  state = strip_prefix(state_dict, prefixes)
  params = _params(template)
  if "encoder" not in params or "decoder" not in params:
    raise ValueError("template must be MaskedAutoencoderViT variables with 'encoder' and "
                     f"'decoder'; got params keys {sorted(params)}")
  enc, dec = params["encoder"], params["decoder"]
  spatial_dims = len(enc["patch_embed"]["kernel"].shape) - 2
  has_cls = "cls_token" in enc
  common = dict(layout=layout, state=state, resize=resize_pos_embed,
                source_grid=source_grid_shape, resize_method=resize_method,
                spatial_dims=spatial_dims)
  enc_depth = sum(1 for k in enc if re.fullmatch(r"block_\d+", str(k)))
  dec_depth = sum(1 for k in dec if re.fullmatch(r"block_\d+", str(k)))
  if layout == "monai":
    encoder = _Part(enc, ("encoder",), block_prefix="blocks", norm_key=f"blocks.{enc_depth}",
                    pos_key="patch_embedding.position_embeddings", extra_rows=0, **common)
    decoder = _Part(dec, ("decoder",), block_prefix="decoder_blocks",
                    norm_key=f"decoder_blocks.{dec_depth}", pos_key="decoder_pos_embedding",
                    extra_rows=0, **common)
    names = {"embed": "decoder_embed", "pred": "decoder_pred", "mask_token": "mask_tokens"}
  else:
    extra = 1 if has_cls else 0
    encoder = _Part(enc, ("encoder",), block_prefix="blocks", norm_key="norm",
                    pos_key="pos_embed", extra_rows=extra, **common)
    decoder = _Part(dec, ("decoder",), block_prefix="decoder_blocks", norm_key="decoder_norm",
                    pos_key="decoder_pos_embed", extra_rows=extra, **common)
    names = {"embed": "decoder_embed", "pred": "decoder_pred", "mask_token": "mask_token"}
  encoder.has_cls_pos = "cls_pos_embedding" in enc
  if layout == "monai" and encoder.has_cls_pos:
    raise ValueError("MONAI's MaskedAutoEncoderViT gives the cls token no position embedding: "
                     "build the model with cls_pos_embed=False (the template has "
                     "params/encoder/cls_pos_embedding)")
  patch_prefix, patch_transform = _patch_rule(layout, state,
                                              tuple(enc["patch_embed"]["kernel"].shape))

  def rule(path: tuple[str, ...]):
    _, half, *mods, leaf = path
    if half == "encoder":
      if mods == ["patch_embed"]:
        key = f"{patch_prefix}.{default_torch_name(leaf)}"
        return (key, patch_transform) if leaf == "kernel" and patch_transform else key
      if not mods and leaf == "cls_token":
        return "cls_token"
      return encoder.key(tuple(mods), leaf)
    if half == "decoder":
      if not mods and leaf == "mask_token":
        return names["mask_token"]
      if mods in (["embed"], ["pred"]):
        return f"{names[mods[0]]}.{default_torch_name(leaf)}"
      return decoder.key(tuple(mods), leaf)
    return None

  ignored = list(_MONAI_IGNORE if layout == "monai" else _TIMM_IGNORE)
  ignored += encoder.ignore + decoder.ignore + list(ignore)
  return convert(state, template, rule, strict=strict, ignore=ignored,
                 name=f"{layout} MAE checkpoint")

"""MONAI Swin UNETR checkpoints -> :mod:`jaxmed.models.swin_unetr` variables.

Accepted key layouts (all mapped to MONAI 1.6 ``SwinUNETR`` names first):

* MONAI ``SwinUNETR``: ``swinViT.layers1.0.blocks.0.norm1.weight``,
  ``encoder1.layer.conv1.conv.weight``, ``decoder5.transp_conv.conv.weight``,
  ``out.conv.conv.weight``, ... (optionally under ``module.``);
* a bare MONAI ``SwinTransformer`` (``patch_embed.proj.weight``, ``layers1.0...``), e.g. the
  self-supervised Swin UNETR release ``model_swinvit.pt`` (``module.patch_embed.proj.weight``,
  ``module.layers1.0.blocks.0.attn.qkv.weight``, ``module.layers1.0.downsample.reduction.weight``,
  MLP ``fc1`` / ``fc2``; research-contributions ``SwinUNETR/BTCV``), or the ``SSLHead`` of
  research-contributions (``swin_vit.`` / ``swinViT.``, with rotation / contrastive heads);
* the DAE pre-training checkpoints (research-contributions ``DAE/``, ``SimMIMSkip``, weights
  under ``"model"``): the encoder as ``encoder.patch_embed.proj.{conv1,conv2}.conv.weight``,
  ``encoder.patch_embed.proj.{norm1,norm2}.{weight,bias}`` (the conv patch embedding: build the
  model with ``patch_embedding="conv"``), ``encoder.layers1.0.0.blocks...`` (MLP ``fc1`` /
  ``fc2``), ``encoder.mask_token`` ``(1, 1, E)``, ``encoder.norm.*``; the UNETR decoder under
  MONAI's names (``encoder1..4``, ``encoder10``, ``decoder5..1``, ``out``).

``part`` picks what is transferred: "encoder" (``swinViT``, with ``mask_token`` when the model
has one), "decoder" (``encoder1..4``, ``encoder10``, ``decoder5..1``, ``out``: the DAE
fine-tuning scripts' ``--finetune_choice decoder``) or "both" (the default). The leaves of the
other part keep the template's values (pass real variables then) and are listed in
:attr:`Converted.missing`; the checkpoint keys of the other part are reported in
:attr:`Converted.unused`.

Nothing is dropped silently: every key is used or reported. Reported and allowed even when
``strict``: keys of the part not transferred; for pre-training layouts (second and third kind)
everything outside the network (``mask_token`` when the model has none, the final
``norm.*`` and classification ``head.*`` of DAE's encoder, rotation / contrastive /
reconstruction heads, duplicated ``layers.*`` lists);
``num_batches_tracked`` counters and ``attn_mask`` buffers (the latter depend on the input size
and are recomputed by the model); with a bare encoder template, every key outside the encoder.
``relative_position_index`` buffers are checked to equal the index the model computes for its
window and are then consumed (a mismatch is an error); they are not parameters.

The published self-supervised Swin UNETR and DAE weights were trained with MONAI's pre-2025
``PatchMerging`` octant order: build the model with ``downsample="merging_legacy"`` (3D) to run
them exactly; ``legacy=True`` checks that.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np

from jaxmed.interop.state_dict import (Converted, _path_names, conv_transpose_kernel, convert,
                                       default_torch_name, load_state_dict)
from jaxmed.models._utils import check_choice
from jaxmed.models.swin_unetr import relative_position_index

PARTS = ("encoder", "decoder", "both")
_ENCODER_ROOT = re.compile(r"^(patch_embed|layers\d*c?|norm|mask_token)(\.|$)")
_DECODER_ROOT = re.compile(r"^(encoder(1|2|3|4|10)|decoder[1-5]|out)\.")
_ALWAYS_EXTRA = re.compile(r"(^|\.)(num_batches_tracked|attn_mask)$")
_ENCODER_EXTRA = re.compile(r"^swinViT\.(mask_token|norm\.|layers\.|head\.)")


def canonical_key(key: str) -> tuple[str, bool]:
  """A checkpoint key in MONAI ``SwinUNETR`` naming, and whether it came from a pre-training layout.

  Strips ``module.``; ``swin_vit.`` / ``encoder.`` / bare encoder roots become ``swinViT.``;
  DAE's ``layers1.0.0.`` becomes ``layers1.0.``; MLP ``fc1`` / ``fc2`` become ``linear1`` /
  ``linear2``. Other keys are returned as they are (``encoder1.layer...``, heads, ...).
  """
  k = key
  while k.startswith("module."):
    k = k[len("module."):]
  pretraining = False
  if k.startswith("swinViT."):
    enc = k[len("swinViT."):]
  elif k.startswith("swin_vit."):
    enc, pretraining = k[len("swin_vit."):], True
  elif k.startswith("encoder."):
    enc, pretraining = k[len("encoder."):], True
  elif _ENCODER_ROOT.match(k):
    enc, pretraining = k, True
  else:
    return k, False
  enc = re.sub(r"^(layers\d+c?)\.0\.0\.", r"\1.0.", enc)
  enc = re.sub(r"\.mlp\.fc([12])\.", r".mlp.linear\1.", enc)
  return "swinViT." + enc, pretraining


def _module_key(modules: Sequence[str]) -> tuple[str, bool]:
  """Flax module path (inside SwinUNETR) -> MONAI module prefix, and whether it is an UpConv."""
  parts, transposed = [], False
  for i, name in enumerate(modules):
    if re.fullmatch(r"layers\d+c?", name):
      parts += [name, "0"]
    elif name.startswith("blocks_"):
      parts += ["blocks", name[len("blocks_"):]]
    elif name in ("conv1", "conv2", "conv3"):
      parts += [name, "conv"]
    elif name == "transp_conv":
      parts += [name, "conv"]
      transposed = True
    elif name == "out" and i == 0:
      parts += ["out", "conv", "conv"]
    else:
      parts.append(name)
  return ".".join(parts), transposed


def _template_info(template: Any) -> tuple[bool, int, list[int], Mapping]:
  """(is the bare encoder, spatial dims, bias-table row counts, encoder params) of a
  SwinUNETR / SwinTransformer template."""
  params = template.get("params", {}) if isinstance(template, Mapping) else {}
  if "swinViT" in params:
    encoder, bare = params["swinViT"], False
  elif "patch_embed" in params:
    encoder, bare = params, True
  else:
    raise ValueError("template must hold the variables of a SwinUNETR (params/swinViT/...) or a "
                     f"SwinTransformer (params/patch_embed/...); got params keys {sorted(params)}")
  proj = encoder["patch_embed"]["proj"]
  dims = len((proj["conv1"] if "conv1" in proj else proj)["kernel"].shape) - 2
  rows = [leaf.shape[0] for path, leaf in jax.tree_util.tree_flatten_with_path(encoder)[0]
          if str(getattr(path[-1], "key", "")) == "relative_position_bias_table"]
  return bare, dims, rows, encoder


def _check_patch_embedding(canon: Mapping[str, str], encoder: Mapping, name: str) -> None:
  """The checkpoint's patch embedding (linear or DAE conv block) must be the model's."""
  conv_model = "conv1" in encoder["patch_embed"]["proj"]
  conv_ckpt = [k for c, k in canon.items() if c.startswith("swinViT.patch_embed.proj.conv1.")]
  linear_ckpt = [k for c, k in canon.items() if c == "swinViT.patch_embed.proj.weight"]
  if conv_ckpt and not conv_model:
    raise ValueError(f"{name} has the DAE convolutional patch embedding ({conv_ckpt[0]!r}, ...) "
                     "but the model the linear one; build it with patch_embedding='conv'")
  if linear_ckpt and conv_model:
    raise ValueError(f"{name} has the linear patch embedding ({linear_ckpt[0]!r}) but the model "
                     "the DAE conv block; build it with patch_embedding='linear'")


def _token_vector(w: np.ndarray) -> np.ndarray:
  """A mask token ``(1, 1, E)`` (PyTorch) -> ``(E,)``."""
  return np.reshape(w, np.shape(w)[-1:])


def _split_by_part(template: Any, bare: bool, parts: tuple[str, ...]):
  """Template leaves as (names, leaf) lists: in the transferred parts and outside them."""
  chosen, kept = [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(template)[0]:
    names = _path_names(path)
    which = "encoder" if bare or (len(names) > 1 and names[1] == "swinViT") else "decoder"
    (chosen if which in parts else kept).append((names, leaf))
  return chosen, kept


def _nest(items) -> dict:
  out: dict = {}
  for names, leaf in items:
    node = out
    for n in names[:-1]:
      node = node.setdefault(n, {})
    node[names[-1]] = leaf
  return out


def _window_of(rows: list[int], dims: int, window_size) -> tuple[int, ...] | None:
  if window_size is not None:
    window = ((int(window_size),) * dims if isinstance(window_size, (int, np.integer))
              else tuple(int(w) for w in window_size))
    if len(window) != dims:
      raise ValueError(f"window_size must have {dims} entries; got window_size={window_size}")
    return window
  if not rows:
    return None
  r = rows[0]
  w = int(round((r ** (1.0 / dims) + 1) / 2))
  if (2 * w - 1) ** dims != r:
    raise ValueError(f"cannot infer the window from a bias table of {r} rows (not (2w-1)**{dims});"
                     " pass window_size=")
  return (w,) * dims


def swin_unetr_from_torch(state_dict: Mapping[str, Any], template: Any, *, part: str = "both",
                          strict: bool = True, legacy: bool | None = None,
                          downsample: str | None = None,
                          window_size: int | Sequence[int] | None = None,
                          ignore: Iterable[str] = (), name: str = "checkpoint") -> Converted:
  """Converts a MONAI Swin UNETR / Swin encoder / DAE state dict into Flax variables.

  Args:
    state_dict: ``{key: tensor}`` in any layout of the module docstring.
    template: variables (or ``jax.eval_shape`` of ``init``) of
      :class:`~jaxmed.models.swin_unetr.SwinUNETR` or of the bare
      :class:`~jaxmed.models.swin_unetr.SwinTransformer`.
    part: "encoder", "decoder" or "both": what is transferred (module docstring). The leaves of
      the other part keep the template's values, so ``template`` must then hold real variables
      for them (``model.init``); "decoder" needs a SwinUNETR template.
    strict: every Flax leaf of the transferred part must be present and every key used, apart
      from the allowed extras of the module docstring. With ``strict=False`` missing leaves keep
      the template's values (pass real variables then), e.g. the decoder when loading an
      encoder-only checkpoint.
    legacy: whether the checkpoint was trained with the pre-2025 MONAI ``PatchMerging`` order
      (True for the published self-supervised Swin UNETR and DAE weights). Checked against
      ``downsample`` when both are given (3D only; in 2D all orders agree). None: not checked.
    downsample: the ``downsample`` of the model the template belongs to.
    window_size: the model's window, to check ``relative_position_index`` buffers against;
      inferred from the bias table (cubic window) when None.
    ignore: extra ``fnmatch`` patterns of checkpoint keys that may stay unused when strict.
    name: how errors refer to the checkpoint.

  Returns:
    :class:`~jaxmed.interop.state_dict.Converted`: ``missing`` lists the leaves kept from the
    template (with ``(part=...)`` for those outside ``part``), ``unused`` the checkpoint keys
    no leaf took, in the checkpoint's own names.

  Raises:
    ValueError: an unknown ``part``; shape mismatches (listing every key); missing /
    unexpected keys when strict; a patch embedding (linear / DAE conv) other than the model's;
    a ``relative_position_index`` that differs from the model's; two keys that name the same
    parameter; ``legacy`` contradicting ``downsample``; leaves outside ``part`` that the
    template holds only as shapes.
  """
  check_choice(part, PARTS, "part")
  parts = ("encoder", "decoder") if part == "both" else (part,)
  bare, dims, rows, encoder = _template_info(template)
  if bare and part == "decoder":
    raise ValueError(f"part={part!r} needs a SwinUNETR template; the template is a bare "
                     "SwinTransformer, which has no decoder")
  enc, dec = "encoder" in parts, "decoder" in parts and not bare
  if legacy is not None and downsample is not None and dims == 3:
    if legacy and downsample != "merging_legacy":
      raise ValueError(f"{name} was trained with the pre-2025 PatchMerging order (legacy=True) "
                       f"but the model uses downsample={downsample!r}; build it with "
                       "downsample='merging_legacy'")
    if not legacy and downsample == "merging_legacy":
      raise ValueError(f"{name} uses the current PatchMerging order (legacy=False) but the model "
                       "uses downsample='merging_legacy'; build it with 'merging' or 'mergingv2'")

  canon: dict[str, str] = {}
  pretraining = False
  state: dict[str, Any] = {}
  index_keys = []
  for key, value in state_dict.items():
    key = str(key)
    c, pre = canonical_key(key)
    pretraining |= pre
    if c in canon:
      raise ValueError(f"{name}: keys {canon[c]!r} and {key!r} both name {c!r}")
    canon[c] = key
    if c.endswith(".relative_position_index") and enc:
      index_keys.append((key, value))
    else:
      state[key] = value
  if enc:
    _check_patch_embedding(canon, encoder, name)

  bad_index = []
  if index_keys:
    window = _window_of(rows, dims, window_size)
    if window is None:
      raise ValueError(f"{name} has relative_position_index buffers but the template has no "
                       "attention layers")
    expected = relative_position_index(window)
    for key, value in index_keys:
      value = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
      if value.shape != expected.shape or not np.array_equal(value, expected):
        bad_index.append(f"{key} {tuple(value.shape)}")
  if bad_index:
    raise ValueError(f"{name}: relative_position_index buffer(s) differ from the index of the "
                     f"model's window {window} (expected shape {expected.shape}): "
                     + ", ".join(bad_index[:30]))

  ignore = tuple(ignore)
  has_token = "mask_token" in encoder
  feeding: dict[str, str] = {}  # canonical key -> checkpoint key, for keys the model may use
  extras, unexpected = [], []
  for c, key in canon.items():
    if key not in state:
      continue
    if _ALWAYS_EXTRA.search(c):
      extras.append(key)
    elif c.startswith("swinViT.") or (_DECODER_ROOT.match(c) and not bare):
      if c.startswith("swinViT."):
        takes = enc and (has_token if c == "swinViT.mask_token" else not _ENCODER_EXTRA.match(c))
      else:
        takes = dec
      if takes:
        feeding[c] = key
      else:
        extras.append(key)  # outside `part`, or a pre-training extra (mask_token, norm.*)
    elif pretraining or bare:
      extras.append(key)  # a pre-training head, or a decoder the encoder template lacks
    else:
      unexpected.append(key)  # unknown to SwinUNETR: convert reports it (strict: an error)

  def rule(path: tuple[str, ...]):
    modules = ("swinViT",) + path[1:-1] if bare else path[1:-1]
    prefix, transposed = _module_key(modules)
    c = f"{prefix}.{default_torch_name(path[-1])}"
    key = feeding.get(c, c)
    if transposed and path[-1] == "kernel":
      return key, conv_transpose_kernel
    if path[-1] == "mask_token":
      return key, _token_vector
    return key

  fed = {k: state[k] for k in (*feeding.values(), *unexpected)}
  if part == "both":
    result = convert(fed, template, rule, strict=strict, ignore=ignore, name=name)
    return Converted(variables=result.variables, missing=result.missing,
                     unused=tuple(result.unused) + tuple(extras))

  chosen, kept = _split_by_part(template, bare, parts)
  abstract = ["/".join(n) for n, leaf in kept if isinstance(leaf, jax.ShapeDtypeStruct)]
  if abstract:
    raise ValueError(f"cannot load {name} with part={part!r}: the {len(abstract)} Flax "
                     "variable(s) outside it keep the template's values, but the template has "
                     "only their shapes (pass real variables from model.init): "
                     + ", ".join(abstract[:30]) + (" ..." if len(abstract) > 30 else ""))
  result = convert(fed, _nest(chosen), rule, strict=strict, ignore=ignore, name=name)
  loaded = {_path_names(p): v for p, v in
            jax.tree_util.tree_flatten_with_path(result.variables)[0]}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  values = [loaded[n] if n in loaded else np.asarray(leaf)
            for n, leaf in ((_path_names(p), leaf) for p, leaf in leaves)]
  missing = tuple(result.missing) + tuple(f"{'/'.join(n)} (part={part!r})" for n, _ in kept)
  return Converted(variables=jax.tree_util.tree_unflatten(treedef, values), missing=missing,
                   unused=tuple(result.unused) + tuple(extras))


def load_swin_unetr(path: str | os.PathLike, model: Any, template_or_variables: Any, *,
                    part: str = "both", key: str | None = None, strict: bool = True,
                    legacy: bool | None = None, ignore: Iterable[str] = ()) -> Converted:
  """Reads a checkpoint file (``.pth`` / ``.pt`` / ``.safetensors``) and converts it for ``model``.

  Args:
    path: the checkpoint; a dict wrapping the weights (``state_dict``, ``model``, ...) is
      unwrapped as by :func:`~jaxmed.interop.state_dict.load_state_dict`.
    model: the :class:`~jaxmed.models.swin_unetr.SwinUNETR` or
      :class:`~jaxmed.models.swin_unetr.SwinTransformer` the variables are for (its window and
      downsample mode are used for the checks).
    template_or_variables: ``jax.eval_shape(model.init, ...)`` or real variables (needed when
      ``strict=False`` leaves leaves missing).
    part: "encoder", "decoder" or "both", as in :func:`swin_unetr_from_torch`.
    key: the entry of the file holding the weights, when not found automatically (the DAE
      checkpoints keep them under ``"model"``, found automatically).
    strict, legacy, ignore: as in :func:`swin_unetr_from_torch`.

  Returns:
    :class:`~jaxmed.interop.state_dict.Converted`.
  """
  state = load_state_dict(path, key=key)
  return swin_unetr_from_torch(state, template_or_variables, part=part, strict=strict,
                               legacy=legacy,
                               downsample=getattr(model, "downsample", None),
                               window_size=getattr(model, "window_size", None), ignore=ignore,
                               name=os.fspath(path))

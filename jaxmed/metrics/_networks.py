"""Pure-JAX forwards of jaxmed's VGG-16, ResNet and ViT (2D, eval mode) for perceptual metrics.

The CoPer metric (:mod:`jaxmed.metrics.coper`) reads intermediate features of a frozen network.
The Flax modules (:class:`jaxmed.models.VGG16`, :class:`jaxmed.models.resnet.ResNet`,
:class:`jaxmed.models.vit.ViT`) import flax, which a metric must not; this module re-runs them
over their plain nested-dict ``variables["params"]`` (and ``variables["batch_stats"]``) trees with
``lax`` and ``jax.numpy`` only, in inference mode (BatchNorm with the running statistics, no
dropout), and returns the same named features as the modules' ``return_features``:

  vgg16   ``relu{b}_{i}`` / ``pool{b}`` (every ReLU and max-pool), with or without BatchNorm
  resnet  ``stem`` (ReLU after conv1 / bn1, before the max-pool), ``layer1`` .. ``layer4``
  vit     ``block_{i}``: the output of block ``i`` without the cls token, on the patch grid

Everything here is private: :func:`resolve` checks the parameters on the host (before tracing)
and prunes them to what the requested taps need; :func:`features` is the traced forward.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmed.metrics.perceptual import (VGG_LAYERS, _conv3x3, _group_norm, _leaf_shape,
                                       _max_pool2, _vgg_params)

NETWORKS = ("vgg16", "resnet", "vit")
VGG16_TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")  # LPIPS's, = models.vgg
RESNET_TAPS = ("stem", "layer1", "layer2", "layer3", "layer4")  # LPIPS's resnet taps
VIT_DEFAULT_BLOCKS = (3, 5, 7, 9, 11)  # 0-based; App. A of the CoPer paper leaves them open
VIT_POS_EMBEDS = ("learned", "sincos", "none")
_BN_EPS = 1e-5  # VGG16(batch_norm=True), ResNet: BatchNorm / GroupNorm eps (torch's default)
_VIT_BLOCK = re.compile(r"^block_([0-9]+)$")


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the traced forward needs beyond the arrays (hashable: a static jit argument).

  ``taps`` are the requested feature names in output order. ResNet: ``stem_stride`` (the stem
  conv's stride, not recorded in the parameters), ``max_pool`` (False for ``no_max_pool``),
  ``num_groups`` (0 for BatchNorm). ViT: ``num_heads``, ``layer_norm_eps``, ``pos_embed``.
  """

  network: str
  taps: tuple[str, ...]
  stem_stride: tuple[int, int] = (2, 2)
  max_pool: bool = True
  num_groups: int = 0
  num_heads: int = 0
  layer_norm_eps: float = 1e-6
  pos_embed: str = "learned"


@dataclasses.dataclass(frozen=True)
class Network:
  """A checked network: its :class:`Spec`, the pruned ``params`` / ``stats`` trees, facts."""

  spec: Spec
  params: dict
  stats: dict
  in_channels: int
  min_size: int = 1  # every spatial size must be >= this (VGG: 2**pools, ViT: the patch)
  patch: tuple[int, int] | None = None  # ViT: sizes must be multiples of the patch
  grid: tuple[int, int] | None = None  # ViT with a learned position table: the fixed grid

  def check_plane(self, fn: str, arg: str, shape: tuple[int, ...], plane: tuple[int, int],
                  what: str = "H and W") -> None:
    """Raise unless the 2D plane ``plane`` (of an input of shape ``shape``) suits the taps."""
    if min(plane) < self.min_size:
      raise ValueError(f"{fn}: {arg} shape {shape}: {what} must be >= {self.min_size} for "
                       f"the taps {self.spec.taps} of {self.spec.network}; got {plane}")
    if self.patch is not None and any(s % p for s, p in zip(plane, self.patch)):
      raise ValueError(f"{fn}: {arg} shape {shape}: {what} {plane} must be multiples of the "
                       f"ViT patch size {self.patch}")
    if self.grid is not None:
      grid = tuple(s // p for s, p in zip(plane, self.patch))
      if grid != self.grid:
        raise ValueError(
            f"{fn}: {arg} shape {shape}: {what} {plane} give the patch grid {grid}, but the "
            f"learned pos_embedding is for the grid {self.grid} (input "
            f"{tuple(g * p for g, p in zip(self.grid, self.patch))}); resize it with "
            "jaxmed.interop.vit.resize_position_embedding or use inputs of that size")


# ---------------------------------------------------------------------------------------------
# Host-side checks.


def split_variables(fn: str, params, batch_stats):
  """``(params, batch_stats)`` from ``params`` given as ``variables`` or as ``variables["params"]``.
  """
  if isinstance(params, Mapping) and "params" in params:
    variables = params
    params = variables["params"]
    if "batch_stats" in variables:
      if batch_stats is not None:
        raise ValueError(f"{fn}: batch_stats given twice: params is a variables dict holding "
                         "'batch_stats' and batch_stats=... is set too; pass one of them")
      batch_stats = variables["batch_stats"]
  if not isinstance(params, Mapping):
    raise ValueError(f"{fn}: params must be a model's variables['params'] (a nested mapping) "
                     f"or its variables; got {type(params).__name__}")
  if batch_stats is not None and not isinstance(batch_stats, Mapping):
    raise ValueError(f"{fn}: batch_stats must be variables['batch_stats'] (a nested mapping); "
                     f"got {type(batch_stats).__name__}")
  return params, batch_stats


def _tap_tuple(fn: str, taps) -> tuple[str, ...]:
  taps = (taps,) if isinstance(taps, str) else tuple(taps)
  if not taps:
    raise ValueError(f"{fn}: taps must name at least one feature; got taps={taps}")
  if not all(isinstance(t, str) for t in taps):
    raise ValueError(f"{fn}: taps must be feature names (strings); got taps={taps!r}")
  if len(set(taps)) != len(taps):
    raise ValueError(f"{fn}: taps must be distinct; got taps={taps}")
  return taps


def _check_taps(fn: str, network: str, taps, available: Sequence[str], default):
  taps = tuple(default) if taps is None else _tap_tuple(fn, taps)
  unknown = [t for t in taps if t not in available]
  if unknown:
    raise ValueError(f"{fn}: unknown {network} taps {unknown}; available taps for these params: "
                     f"{tuple(available)}")
  return taps


def _shape_error(fn: str, what: str, path: tuple[str, ...], expected, got) -> ValueError:
  return ValueError(f"{fn}: {what} {'/'.join(path)} must have shape {expected}; got {got}")


def _take(fn: str, tree: Mapping, path: tuple[str, ...], what: str, hint: str,
          shape=None):
  """``tree[path]`` (checked against ``shape`` when given; ``None`` entries match any size)."""
  got = _leaf_shape(tree, path)
  if got is None:
    raise ValueError(f"{fn}: {what} lack {'/'.join(path)}; expected {hint}")
  if shape is not None and (len(got) != len(shape) or
                            any(s is not None and s != g for s, g in zip(shape, got))):
    expected = tuple("*" if s is None else s for s in shape)
    raise _shape_error(fn, what, path, expected, got)
  node = tree
  for key in path:
    node = node[key]
  return node


def _norm(fn: str, params: Mapping, stats: Mapping | None, path: tuple[str, ...], channels: int,
          num_groups: int, hint: str, out_params: dict, out_stats: dict) -> None:
  """Check and copy a BatchNorm (params + stats) or GroupNorm (params) of ``channels``."""
  leaf = {k: _take(fn, params, path + (k,), "params", hint, (channels,)) for k in ("scale", "bias")}
  _put(out_params, path, leaf)
  if num_groups:
    if channels % num_groups:
      raise ValueError(f"{fn}: num_groups={num_groups} must divide the {channels} channels of "
                       f"{'/'.join(path)} (pass the GroupNorm model's num_groups)")
    return
  _put(out_stats, path, {k: _take(fn, stats, path + (k,), "batch_stats", hint, (channels,))
                         for k in ("mean", "var")})


def _put(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _norm_kind(fn: str, network: str, params: Mapping, stats, num_groups, norm_key: str) -> int:
  """0 for BatchNorm (needs batch_stats), ``num_groups`` for GroupNorm; errors explain."""
  has_norm = norm_key in params
  if num_groups is not None:
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) \
        or num_groups < 1:
      raise ValueError(f"{fn}: num_groups must be a positive integer; got {num_groups!r}")
    if stats is not None:
      raise ValueError(f"{fn}: num_groups={num_groups} (GroupNorm) given together with "
                       "batch_stats (BatchNorm); pass one of them")
    if not has_norm:
      raise ValueError(f"{fn}: num_groups={num_groups} given but params hold no {norm_key} norm")
    return int(num_groups)
  if has_norm and stats is None:
    raise ValueError(f"{fn}: the {network} params hold norm layers ({norm_key}, ...) but no "
                     "batch_stats were given: pass the whole variables (with 'batch_stats') or "
                     "batch_stats=variables['batch_stats'] for BatchNorm"
                     + (", or num_groups=... for a GroupNorm ResNet" if network == "resnet"
                        else ""))
  if stats is not None and not has_norm:
    raise ValueError(f"{fn}: batch_stats given but the {network} params hold no BatchNorm "
                     f"layer ({norm_key})")
  return 0


def _check_unused(fn: str, network: str, **options) -> None:
  given = [k for k, v in options.items() if v is not None]
  if given:
    raise ValueError(f"{fn}: {given} do not apply to network={network!r}")


def _vgg(fn: str, params: Mapping, stats, taps) -> Network:
  hint = "the params of jaxmed.models.VGG16"
  if "conv1_1" not in params:
    raise ValueError(f"{fn}: params are not a VGG16's (no conv1_1; got keys "
                     f"{sorted(params)[:6]}); network='vgg16' expects {hint}")
  taps = _check_taps(fn, "vgg16", taps, VGG_LAYERS, VGG16_TAPS)
  names = VGG_LAYERS[:1 + max(VGG_LAYERS.index(t) for t in taps)]
  batch = _norm_kind(fn, "vgg16", params, stats, None, "bn1_1") == 0 and "bn1_1" in params
  convs = {k: v for k, v in params.items() if str(k).startswith("conv")}
  needed = _vgg_params(fn, convs, names, arg="params")
  needed_stats: dict = {}
  if batch:
    for conv, leaves in list(needed.items()):
      bn = "bn" + conv[len("conv"):]
      _norm(fn, params, stats, (bn,), leaves["bias"].shape[0], 0, hint, needed, needed_stats)
  pools = sum(name.startswith("pool") for name in names)
  return Network(Spec("vgg16", taps), needed, needed_stats, in_channels=3, min_size=2**pools)


def _resnet(fn: str, params: Mapping, stats, taps, *, stem_stride, max_pool,
            num_groups) -> Network:
  hint = "the params of a 2D jaxmed.models.resnet.ResNet"
  if "conv1" not in params or not any(str(k).startswith("layer1_") for k in params):
    raise ValueError(f"{fn}: params are not a ResNet's (need conv1, bn1, layer1_0, ...; got "
                     f"keys {sorted(params)[:6]}); network='resnet' expects {hint}")
  kernel = _leaf_shape(params, ("conv1", "kernel"))
  if kernel is not None and len(kernel) == 5:
    raise ValueError(f"{fn}: params are a 3D ResNet's (conv1/kernel {kernel}); CoPer runs a 2D "
                     "network (volumes are compared slice by slice): pass a 2D ResNet")
  stem = _take(fn, params, ("conv1", "kernel"), "params", hint, (None, None, None, None))
  taps = _check_taps(fn, "resnet", taps, RESNET_TAPS, RESNET_TAPS)
  if stem_stride is None:
    stem_stride = (2, 2)
  stride = np.atleast_1d(np.asarray(stem_stride))
  if (stride.ndim != 1 or stride.size not in (1, 2) or not np.issubdtype(stride.dtype, np.integer)
      or np.any(stride < 1)):
    raise ValueError(f"{fn}: stem_stride must be a positive int or two (the ResNet's "
                     f"conv1_t_stride); got {stem_stride!r}")
  stem_stride = tuple(int(s) for s in np.broadcast_to(stride, (2,)))
  if max_pool is None:
    max_pool = True
  if not isinstance(max_pool, (bool, np.bool_)):
    raise ValueError(f"{fn}: max_pool must be a bool (False for a ResNet with no_max_pool); "
                     f"got {max_pool!r}")
  groups = _norm_kind(fn, "resnet", params, stats, num_groups, "bn1")
  needed: dict = {"conv1": {"kernel": stem}}
  needed_stats: dict = {}
  channels = stem.shape[3]
  _norm(fn, params, stats, ("bn1",), channels, groups, hint, needed, needed_stats)
  deepest = max(RESNET_TAPS.index(t) for t in taps)
  for i in range(1, deepest + 1):
    j = 0
    while f"layer{i}_{j}" in params:
      name = f"layer{i}_{j}"
      block = params[name]
      stride = 2 if (i > 1 and j == 0) else 1
      bottleneck = _leaf_shape(params, (name, "conv3", "kernel")) is not None
      convs = (("conv1", 1), ("conv2", 3), ("conv3", 1)) if bottleneck else (("conv1", 3),
                                                                             ("conv2", 3))
      cin = channels
      for conv, k in convs:
        w = _take(fn, params, (name, conv, "kernel"), "params", hint, (k, k, cin, None))
        _put(needed, (name, conv, "kernel"), w)
        cin = w.shape[3]
        _norm(fn, params, stats, (name, "bn" + conv[-1]), cin, groups, hint, needed,
              needed_stats)
      if stride != 1 or cin != channels:
        if "downsample_conv" in block:  # shortcut "B"
          w = _take(fn, params, (name, "downsample_conv", "kernel"), "params", hint,
                    (1, 1, channels, cin))
          _put(needed, (name, "downsample_conv", "kernel"), w)
          if _leaf_shape(params, (name, "downsample_conv", "bias")) is not None:
            _put(needed, (name, "downsample_conv", "bias"),
                 _take(fn, params, (name, "downsample_conv", "bias"), "params", hint, (cin,)))
          _norm(fn, params, stats, (name, "downsample_norm"), cin, groups, hint, needed,
                needed_stats)
        elif cin < channels:
          raise ValueError(f"{fn}: params {name} narrows {channels} -> {cin} channels without "
                           "a downsample_conv (shortcut 'A' cannot narrow)")
      channels = cin
      j += 1
    if j == 0:
      raise ValueError(f"{fn}: params lack layer{i}_0 (needed for the tap layer{deepest}); "
                       f"expected {hint}")
  spec = Spec("resnet", taps, stem_stride=stem_stride, max_pool=bool(max_pool), num_groups=groups)
  return Network(spec, needed, needed_stats, in_channels=int(stem.shape[2]))


def vit_default_taps(depth: int) -> tuple[str, ...]:
  """``block_3, 5, 7, 9, 11`` (0-based) for a ViT of >= 12 blocks, else every block."""
  blocks = VIT_DEFAULT_BLOCKS if depth > max(VIT_DEFAULT_BLOCKS) else range(depth)
  return tuple(f"block_{i}" for i in blocks)


def _vit(fn: str, params: Mapping, stats, taps, *, num_heads, layer_norm_eps,
         pos_embed) -> Network:
  hint = "the params of a 2D jaxmed.models.vit.ViT"
  if "patch_embed" not in params or "block_0" not in params:
    raise ValueError(f"{fn}: params are not a ViT's (need patch_embed, block_0, ...; got keys "
                     f"{sorted(params)[:6]}); network='vit' expects {hint}")
  if stats is not None:
    raise ValueError(f"{fn}: batch_stats given, but a ViT has no BatchNorm")
  kernel = _leaf_shape(params, ("patch_embed", "kernel"))
  if kernel is not None and len(kernel) == 5:
    raise ValueError(f"{fn}: params are a 3D ViT's (patch_embed/kernel {kernel}); CoPer runs a "
                     "2D network (volumes are compared slice by slice): pass a 2D ViT")
  patch = _take(fn, params, ("patch_embed", "kernel"), "params", hint, (None, None, None, None))
  dim = patch.shape[3]
  depth = 0
  while f"block_{depth}" in params:
    depth += 1
  taps = _check_taps(fn, "vit", taps, tuple(f"block_{i}" for i in range(depth)),
                     vit_default_taps(depth))
  if num_heads is None:
    raise ValueError(f"{fn}: network='vit' needs num_heads (the ViT's attention heads; 6 for "
                     "ViT-S/16): the parameters do not record it")
  if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)) \
      or num_heads < 1 or dim % num_heads:
    raise ValueError(f"{fn}: num_heads must be a positive integer dividing the embedding "
                     f"dim {dim}; got {num_heads!r}")
  eps = 1e-6 if layer_norm_eps is None else layer_norm_eps
  if not isinstance(eps, (float, int, np.floating)) or not np.isfinite(eps) or eps <= 0:
    raise ValueError(f"{fn}: layer_norm_eps must be a positive number (1e-6 for timm / DINO, "
                     f"1e-5 for MONAI); got {layer_norm_eps!r}")
  has_table = "pos_embedding" in params
  if pos_embed is None:
    if not has_table:
      raise ValueError(f"{fn}: params hold no learned pos_embedding: pass pos_embed='sincos' or "
                       "'none' (as the ViT was built)")
    pos_embed = "learned"
  if pos_embed not in VIT_POS_EMBEDS:
    raise ValueError(f"{fn}: pos_embed must be one of {VIT_POS_EMBEDS}; got {pos_embed!r}")
  if (pos_embed == "learned") != has_table:
    raise ValueError(f"{fn}: pos_embed={pos_embed!r} but the params "
                     f"{'hold' if has_table else 'lack'} a learned pos_embedding")
  if pos_embed == "sincos" and dim % 4:
    raise ValueError(f"{fn}: pos_embed='sincos' needs the embedding dim divisible by 4; "
                     f"got {dim}")
  needed: dict = {"patch_embed": {"kernel": patch}}
  if _leaf_shape(params, ("patch_embed", "bias")) is not None:
    needed["patch_embed"]["bias"] = _take(fn, params, ("patch_embed", "bias"), "params", hint,
                                          (dim,))
  grid = None
  if pos_embed == "learned":
    table = _take(fn, params, ("pos_embedding",), "params", hint, (1, None, None, dim))
    needed["pos_embedding"] = table
    grid = tuple(int(g) for g in table.shape[1:3])
  if "cls_token" in params:
    needed["cls_token"] = _take(fn, params, ("cls_token",), "params", hint, (1, 1, dim))
    if pos_embed == "learned" and "cls_pos_embedding" in params:
      needed["cls_pos_embedding"] = _take(fn, params, ("cls_pos_embedding",), "params", hint,
                                          (1, 1, dim))
  deepest = max(int(_VIT_BLOCK.match(t).group(1)) for t in taps)
  for i in range(deepest + 1):
    b = f"block_{i}"
    hidden = _take(fn, params, (b, "mlp", "fc1", "kernel"), "params", hint, (dim, None)).shape[1]
    shapes = {("norm1", "scale"): (dim,), ("norm1", "bias"): (dim,),
              ("attn", "qkv", "kernel"): (dim, 3 * dim), ("attn", "proj", "kernel"): (dim, dim),
              ("attn", "proj", "bias"): (dim,), ("norm2", "scale"): (dim,),
              ("norm2", "bias"): (dim,), ("mlp", "fc1", "kernel"): (dim, hidden),
              ("mlp", "fc1", "bias"): (hidden,), ("mlp", "fc2", "kernel"): (hidden, dim),
              ("mlp", "fc2", "bias"): (dim,)}
    if _leaf_shape(params, (b, "attn", "qkv", "bias")) is not None:  # qkv_bias
      shapes[("attn", "qkv", "bias")] = (3 * dim,)
    for path, shape in shapes.items():
      _put(needed, (b,) + path, _take(fn, params, (b,) + path, "params", hint, shape))
  p = (int(patch.shape[0]), int(patch.shape[1]))
  spec = Spec("vit", taps, num_heads=int(num_heads), layer_norm_eps=float(eps),
              pos_embed=pos_embed)
  return Network(spec, needed, {}, in_channels=int(patch.shape[2]), min_size=min(p), patch=p,
                 grid=grid)


def resolve(fn: str, network: str, params, batch_stats, taps, *, stem_stride=None,
            max_pool=None, num_groups=None, num_heads=None, layer_norm_eps=None,
            pos_embed=None) -> Network:
  """Check ``params`` (and ``batch_stats``) as ``network``'s and keep what ``taps`` need.

  Raises:
    ValueError: an unknown network or tap, parameters of another network or missing /
      mis-shaped leaves (named by path), BatchNorm parameters without statistics, options that
      do not apply to ``network``.
  """
  if network not in NETWORKS:
    raise ValueError(f"{fn}: network must be one of {NETWORKS}; got {network!r}")
  params, stats = split_variables(fn, params, batch_stats)
  if network == "vgg16":
    _check_unused(fn, network, stem_stride=stem_stride, max_pool=max_pool, num_groups=num_groups,
                  num_heads=num_heads, layer_norm_eps=layer_norm_eps, pos_embed=pos_embed)
    return _vgg(fn, params, stats, taps)
  if network == "resnet":
    _check_unused(fn, network, num_heads=num_heads, layer_norm_eps=layer_norm_eps,
                  pos_embed=pos_embed)
    return _resnet(fn, params, stats, taps, stem_stride=stem_stride, max_pool=max_pool,
                   num_groups=num_groups)
  _check_unused(fn, network, stem_stride=stem_stride, max_pool=max_pool, num_groups=num_groups)
  return _vit(fn, params, stats, taps, num_heads=num_heads, layer_norm_eps=layer_norm_eps,
              pos_embed=pos_embed)


# ---------------------------------------------------------------------------------------------
# Traced forwards. Inputs (N, H, W, C) float32; features float32 (N, h, w, C_l).


def _batch_norm(x, p, s, eps: float = _BN_EPS):
  """BatchNorm with the running statistics (Flax's order of operations), in float32."""
  mul = lax.rsqrt(jnp.asarray(s["var"], jnp.float32) + eps) * jnp.asarray(p["scale"], jnp.float32)
  return (x - jnp.asarray(s["mean"], jnp.float32)) * mul + jnp.asarray(p["bias"], jnp.float32)


def _vgg_features(x, params, stats, taps):
  last = max(VGG_LAYERS.index(t) for t in taps)
  feats = {}
  for name in VGG_LAYERS[:last + 1]:
    if name.startswith("pool"):
      x = _max_pool2(x)
    else:
      suffix = name[len("relu"):]
      x = _conv3x3(x, params["conv" + suffix])
      if "bn" + suffix in params:
        x = _batch_norm(x, params["bn" + suffix], stats["bn" + suffix])
      x = jax.nn.relu(x)
    feats[name] = x
  return feats


def _conv(x, p, strides):
  """torch-style conv: padding ``kernel // 2`` on each side, optional bias."""
  kernel = jnp.asarray(p["kernel"], jnp.float32)
  pad = tuple((k // 2, k // 2) for k in kernel.shape[:2])
  y = lax.conv_general_dilated(x, kernel, tuple(strides), pad,
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + jnp.asarray(p["bias"], jnp.float32) if "bias" in p else y


def _resnet_norm(x, params, stats, name: str, num_groups: int):
  if num_groups:
    return _group_norm(x, params[name], num_groups)
  return _batch_norm(x, params[name], stats[name])


def _resnet_block(x, p, s, stride: int, num_groups: int):
  """A BasicBlock or v1.5 Bottleneck (``conv3`` present), eval mode; see models/resnet.py."""
  relu = jax.nn.relu
  bottleneck = "conv3" in p
  if bottleneck:
    y = relu(_resnet_norm(_conv(x, p["conv1"], (1, 1)), p, s, "bn1", num_groups))
    y = relu(_resnet_norm(_conv(y, p["conv2"], (stride, stride)), p, s, "bn2", num_groups))
    y = _resnet_norm(_conv(y, p["conv3"], (1, 1)), p, s, "bn3", num_groups)
  else:
    y = relu(_resnet_norm(_conv(x, p["conv1"], (stride, stride)), p, s, "bn1", num_groups))
    y = _resnet_norm(_conv(y, p["conv2"], (1, 1)), p, s, "bn2", num_groups)
  residual = x
  out = y.shape[-1]
  if stride != 1 or x.shape[-1] != out:
    if "downsample_conv" in p:  # shortcut "B"
      residual = _resnet_norm(_conv(x, p["downsample_conv"], (stride, stride)), p, s,
                              "downsample_norm", num_groups)
    else:  # shortcut "A": subsample, zero-pad the channels (MONAI)
      residual = x[:, ::stride, ::stride]
      residual = jnp.pad(residual, ((0, 0), (0, 0), (0, 0), (0, out - x.shape[-1])))
  return relu(y + residual)


def _resnet_features(x, params, stats, spec: Spec):
  deepest = max(RESNET_TAPS.index(t) for t in spec.taps)
  x = _conv(x, params["conv1"], spec.stem_stride)
  x = jax.nn.relu(_resnet_norm(x, params, stats, "bn1", spec.num_groups))
  feats = {"stem": x}
  if spec.max_pool:
    x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                          ((0, 0), (1, 1), (1, 1), (0, 0)))
  for i in range(1, deepest + 1):
    j = 0
    while f"layer{i}_{j}" in params:
      name = f"layer{i}_{j}"
      x = _resnet_block(x, params[name], stats.get(name, {}), 2 if (i > 1 and j == 0) else 1,
                        spec.num_groups)
      j += 1
    feats[f"layer{i}"] = x
  return feats


def sincos_table_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> np.ndarray:
  """The fixed 2D sin-cos table ``(gh * gw, dim)`` of ``jaxmed.models.vit.sincos_pos_embedding``.

  Channel blocks ``[sin(w omega), cos(w omega), sin(h omega), cos(h omega)]`` of ``dim / 4`` each
  (MAE's order: the column coordinate first), ``omega_k = temperature ** (-k / (dim / 4))``;
  rows in row-major grid order.
  """
  h, w = np.meshgrid(np.arange(grid[0], dtype=np.float64), np.arange(grid[1], dtype=np.float64),
                     indexing="ij")
  n = dim // 4
  omega = 1.0 / temperature**(np.arange(n, dtype=np.float64) / n)
  blocks = []
  for coord in (w, h):
    angle = coord.reshape(-1, 1) * omega[None, :]
    blocks += [np.sin(angle), np.cos(angle)]
  return np.concatenate(blocks, axis=1).astype(np.float32)


def _layer_norm(x, p, eps: float):
  """LayerNorm over the last axis, two-pass variance, Flax's order of operations."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  mul = lax.rsqrt(var + eps) * jnp.asarray(p["scale"], jnp.float32)
  return (x - mean) * mul + jnp.asarray(p["bias"], jnp.float32)


def _dense(x, p):
  y = x @ jnp.asarray(p["kernel"], jnp.float32)
  return y + jnp.asarray(p["bias"], jnp.float32) if "bias" in p else y


def _vit_block(x, p, num_heads: int, eps: float):
  """Pre-norm block ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` (models/vit.py ``Block``)."""
  n, t, dim = x.shape
  hd = dim // num_heads
  y = _layer_norm(x, p["norm1"], eps)
  qkv = _dense(y, p["attn"]["qkv"]).reshape(n, t, 3, num_heads, hd)
  out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale=hd**-0.5)
  x = x + _dense(out.reshape(n, t, dim), p["attn"]["proj"])
  y = _layer_norm(x, p["norm2"], eps)
  y = _dense(jax.nn.gelu(_dense(y, p["mlp"]["fc1"]), approximate=False), p["mlp"]["fc2"])
  return x + y


def _vit_features(x, params, spec: Spec):
  n, h, w, c = x.shape
  kernel = jnp.asarray(params["patch_embed"]["kernel"], jnp.float32)
  ph, pw, _, dim = kernel.shape
  gh, gw = h // ph, w // pw
  # Kernel == stride conv as patchify + matmul (models.blocks.patch_conv).
  patches = x.reshape(n, gh, ph, gw, pw, c).transpose(0, 1, 3, 2, 4, 5)
  tokens = patches.reshape(n, gh * gw, ph * pw * c) @ kernel.reshape(-1, dim)
  if "bias" in params["patch_embed"]:
    tokens = tokens + jnp.asarray(params["patch_embed"]["bias"], jnp.float32)
  if spec.pos_embed == "learned":
    tokens = tokens + jnp.asarray(params["pos_embedding"], jnp.float32).reshape(1, gh * gw, dim)
  elif spec.pos_embed == "sincos":
    tokens = tokens + jnp.asarray(sincos_table_2d((gh, gw), dim))[None]
  extra = 0
  if "cls_token" in params:
    cls = jnp.asarray(params["cls_token"], jnp.float32)
    if "cls_pos_embedding" in params:
      cls = cls + jnp.asarray(params["cls_pos_embedding"], jnp.float32)
    tokens = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, dim)), tokens], axis=1)
    extra = 1
  deepest = max(int(_VIT_BLOCK.match(t).group(1)) for t in spec.taps)
  feats = {}
  for i in range(deepest + 1):
    tokens = _vit_block(tokens, params[f"block_{i}"], spec.num_heads, spec.layer_norm_eps)
    feats[f"block_{i}"] = tokens[:, extra:].reshape(n, gh, gw, dim)  # cls dropped, on the grid
  return feats


def features(x, params, stats, spec: Spec) -> dict:
  """The taps ``spec.taps`` of ``x`` ``(N, H, W, C_in)`` float32: ``{tap: (N, h, w, C_l)}``."""
  if spec.network == "vgg16":
    feats = _vgg_features(x, params, stats, spec.taps)
  elif spec.network == "resnet":
    feats = _resnet_features(x, params, stats, spec)
  else:
    feats = _vit_features(x, params, spec)
  return {t: feats[t] for t in spec.taps}


def tap_channels(net: Network, plane: tuple[int, int]) -> tuple[int, ...]:
  """``C_l`` of every tap (abstract evaluation, no compute)."""
  x = jax.ShapeDtypeStruct((1,) + tuple(plane) + (net.in_channels,), jnp.float32)
  shapes = jax.eval_shape(lambda a: features(a, net.params, net.stats, net.spec), x)
  return tuple(int(shapes[t].shape[-1]) for t in net.spec.taps)


"""Initialising a model from another run or a PyTorch file, leaf by leaf, by path pattern.

    pretrained = load_pretrained({"path": "runs/inpaint"})            # an orbax run
    variables = transfer(pretrained, fresh, replace=(r"input_conv/.*", r"output_conv/.*"))
    # = evaluate.finetune.transfer_variables(pretrained, fresh) for a model without batch_stats;
    # r"[^/]+/input_conv/.*" names the layer in every collection.

    init = initializer({"path": "resnet18.pth", "converter": "resnet", "replace": [r"fc/.*"]},
                       template=jax.eval_shape(resnet18(num_classes=1000).init, key, x))
    trainer.train(config, workdir, init_variables=init)      # a new head, the rest converted

    # A 4-channel model from a 1-channel one: the input kernel (3, 3, 3, 1, C) is tiled to
    # (3, 3, 3, 4, C) and scaled by 1 / 4, so equal input channels give the same activations.
    variables = transfer(pretrained, fresh, tile=(r"input_conv/conv/kernel",))

Paths. Every leaf of a Flax variables dict (``{collection: nested dict}``) is named by its path
``"collection/module/.../leaf"``, e.g. ``"params/encoder_0/conv1/kernel"`` or
``"batch_stats/input_conv/norm/mean"``. A pattern is a regular expression that must match a
whole path (``re.fullmatch``). For leaves of the ``params`` collection it may also be written
without the ``params/`` prefix: ``r"input_conv/.*"`` matches ``params/input_conv/kernel`` (but
not ``batch_stats/input_conv/...``); ``r"[^/]+/input_conv/.*"`` matches a module in every
collection. Patterns are plain strings, so they fit in configs.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from jaxmed.train import checkpoint

PARAMS = "params"
# Converter names of `load_pretrained` -> converter functions of `jaxmed.interop`.
CONVERTERS = {
    "mae": "mae_from_torch",
    "patchgan": "patchgan_from_torch",
    "pix2pix": "unet_generator_from_torch",
    "resnet": "resnet_from_torch",
    "ssfd": "ssfd_unet_from_torch",
    "swin_unetr": "swin_unetr_from_torch",
    "vgg16": "vgg16_from_torch",
    "vit": "vit_from_torch",
}
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
LOAD_KEYS = ("path", "step", "prefix", "converter", "converter_kwargs", "key", "strip")
TRANSFER_KEYS = ("replace", "tile", "drop", "rename", "strict")


# --------------------------------------------------------------------------------------------
# Paths.


def flatten(variables: Mapping[str, Any], *, name: str = "variables") -> dict[str, Any]:
  """``{"collection/a/b/leaf": leaf}`` of a Flax variables dict (nested mappings).

  Args:
    variables: ``{collection: nested dict of arrays}`` (FrozenDicts too).
    name: how errors refer to ``variables``.
  """
  if not isinstance(variables, Mapping):
    raise TypeError(f"{name} must be a mapping of Flax collections; got "
                    f"{type(variables).__name__}")
  out = {}

  def walk(prefix: str, node):
    if isinstance(node, Mapping):
      for k, v in node.items():
        walk(f"{prefix}/{k}", v)
    else:
      out[prefix] = node

  for collection, tree in variables.items():
    if not isinstance(tree, Mapping):
      raise TypeError(f"{name}[{collection!r}] must be a nested dict of arrays (a Flax "
                      f"collection); got {type(tree).__name__}")
    walk(str(collection), tree)
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  """Inverse of :func:`flatten`: nested dicts from ``{"collection/a/b/leaf": leaf}``."""
  out: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def _short(path: str) -> str | None:
  """``path`` without its ``params/`` prefix (None for other collections)."""
  return path[len(PARAMS) + 1:] if path.startswith(PARAMS + "/") else None


def _fullmatch(pattern: re.Pattern, path: str) -> re.Match | None:
  """The match of ``pattern`` on the whole ``path`` or, for a params leaf, on its short form."""
  m = pattern.fullmatch(path)
  if m is None and (short := _short(path)) is not None:
    m = pattern.fullmatch(short)
  return m


def _patterns(patterns, argument: str) -> list[re.Pattern]:
  if isinstance(patterns, str):
    patterns = (patterns,)
  out = []
  for i, p in enumerate(patterns or ()):
    if not isinstance(p, str):
      raise TypeError(f"{argument}[{i}] must be a regular expression string; got {p!r}")
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"{argument}[{i}] = {p!r} is not a valid regular expression: {e}") from e
  return out


def _rules(rename) -> list[tuple[re.Pattern, str]]:
  if isinstance(rename, Mapping):
    rename = list(rename.items())
  out = []
  for i, rule in enumerate(rename or ()):
    if (isinstance(rule, str) or not isinstance(rule, Sequence) or len(rule) != 2
        or not all(isinstance(r, str) for r in rule)):
      raise TypeError(f"rename[{i}] must be a (regex, replacement) pair of strings; "
                      f"got {rule!r}")
    pattern = _patterns([rule[0]], f"rename[{i}]")[0]
    out.append((pattern, rule[1]))
  return out


def _source(path: str, rules: list[tuple[re.Pattern, str]]) -> tuple[str, int | None]:
  """The pretrained path a fresh ``path`` is read from, and the index of the rule used."""
  for i, (pattern, replacement) in enumerate(rules):
    m = pattern.fullmatch(path)
    if m is not None:
      return m.expand(replacement), i
    short = _short(path)
    if short is not None and (m := pattern.fullmatch(short)) is not None:
      return f"{PARAMS}/{m.expand(replacement)}", i
  return path, None


# --------------------------------------------------------------------------------------------
# Transfer.


@dataclasses.dataclass(frozen=True)
class TransferPlan:
  """Where every variable of the fresh model comes from.

  Attributes:
    sources: ``{fresh path: pretrained path it is copied (or tiled) from, or None if kept
      fresh}``, in the fresh variables' order.
    dropped: pretrained paths left unused on purpose (matching ``drop`` or ``replace``).
    unused: pretrained paths left unused and not dropped (empty unless ``strict=False``).
    tiled: fresh paths whose value is the pretrained kernel tiled over its input channels
      (``tile`` patterns whose shapes differ), in the fresh variables' order.
  """

  sources: dict[str, str | None]
  dropped: tuple[str, ...] = ()
  unused: tuple[str, ...] = ()
  tiled: tuple[str, ...] = ()

  @property
  def kinds(self) -> dict[str, str]:
    """``{fresh path: "pretrained" | "tiled" | "fresh"}``."""
    tiled = set(self.tiled)
    return {p: "fresh" if s is None else "tiled" if p in tiled else "pretrained"
            for p, s in self.sources.items()}

  @property
  def copied(self) -> dict[str, str]:
    """``{fresh path: pretrained path}`` of the leaves copied as they are (not tiled)."""
    tiled = set(self.tiled)
    return {p: s for p, s in self.sources.items() if s is not None and p not in tiled}

  @property
  def fresh(self) -> tuple[str, ...]:
    """Paths kept from the fresh variables."""
    return tuple(p for p, s in self.sources.items() if s is None)

  def summary(self) -> str:
    """One line of counts, e.g. ``"33 copied, 1 tiled, 4 kept fresh, 2 dropped, 0 unused"``."""
    return (f"{len(self.copied)} copied, {len(self.tiled)} tiled, {len(self.fresh)} kept fresh, "
            f"{len(self.dropped)} dropped, {len(self.unused)} unused")


def _shape(x) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _tile_problem(pre_shape: tuple[int, ...], shape: tuple[int, ...]) -> str | None:
  """Why a pretrained kernel of ``pre_shape`` cannot be tiled to ``shape`` (None if it can)."""
  if (len(pre_shape) < 2 or len(pre_shape) != len(shape)
      or pre_shape[:-2] + pre_shape[-1:] != shape[:-2] + shape[-1:]):
    return ("tile adapts only the input-channel axis (-2) of a kernel (*k, C_in, C_out), and "
            "the shapes differ elsewhere")
  if shape[-2] < pre_shape[-2]:
    return (f"tile only adds input channels (axis -2), and the model has fewer ({shape[-2]} < "
            f"{pre_shape[-2]})")
  return None


def tile_input_channels(kernel, channels: int) -> np.ndarray:
  """``kernel`` ``(*k, C, C_out)`` tiled along axis -2 to ``channels`` input channels.

  Channel ``c`` of the result is the pretrained channel ``c % C``, and the result is scaled by
  ``C / channels``. When ``channels`` is a multiple of ``C``, an input whose channels all equal
  ``x`` then gives the same activation as the pretrained kernel on ``C`` channels equal to
  ``x`` (for ``C = 1``: on ``x`` itself).

  Args:
    kernel: a convolution (or dense) kernel with the input channels on axis -2.
    channels: the number of input channels wanted, at least ``C``.

  Returns:
    A numpy array ``(*k, channels, C_out)`` (float32 or wider for floating kernels).
  """
  kernel = np.asarray(jax.device_get(kernel))
  if kernel.ndim < 2:
    raise ValueError(f"kernel must have an input-channel axis (-2); got shape {kernel.shape}")
  c = kernel.shape[-2]
  if channels < c:
    raise ValueError(f"tile only adds input channels: {channels} < {c} (shape {kernel.shape})")
  tiled = np.take(kernel, np.arange(channels) % c, axis=-2)
  return tiled.astype(np.promote_types(kernel.dtype, np.float32)) * (c / channels)


def _plan(flat_pre: dict, flat_fresh: dict, *, replace, tile, drop, rename, strict: bool):
  """`TransferPlan` and the list of problems (empty when the transfer is possible)."""
  replace_p = _patterns(replace, "replace")
  tile_p = _patterns(tile, "tile")
  drop_p = _patterns(drop, "drop")
  rules = _rules(rename)
  sources, used, problems, tiled = {}, set(), [], []
  replace_hits = [0] * len(replace_p)
  tile_hits = [0] * len(tile_p)
  rename_hits = [0] * len(rules)
  for path, value in flat_fresh.items():
    hits = [i for i, p in enumerate(replace_p) if _fullmatch(p, path)]
    for i in hits:
      replace_hits[i] += 1
    tile_hit = [i for i, p in enumerate(tile_p) if _fullmatch(p, path)]
    for i in tile_hit:
      tile_hits[i] += 1
    if hits and tile_hit:
      problems.append(f"{path}: matched by both replace ({replace_p[hits[0]].pattern!r}) and "
                      f"tile ({tile_p[tile_hit[0]].pattern!r}); keep it fresh or tile it, "
                      "not both")
      used.add(_source(path, rules)[0])  # reported here, not again as unused
      continue
    if hits:
      sources[path] = None
      if isinstance(value, jax.ShapeDtypeStruct):
        problems.append(f"{path}: kept fresh (replace), but the fresh variables hold only its "
                        "shape; pass initialised variables")
      continue
    source, rule = _source(path, rules)
    if rule is not None:
      rename_hits[rule] += 1
    via = f" (renamed to {source})" if source != path else ""
    if source not in flat_pre:
      problems.append(f"{path}: missing from the pre-trained variables{via}")
      continue
    pre_shape, shape = _shape(flat_pre[source]), _shape(value)
    if pre_shape != shape:
      used.add(source)  # reported here, not again as unused
      if not tile_hit:
        problems.append(f"{path}: pre-trained shape {pre_shape}{via} != model shape {shape}")
        continue
      why = _tile_problem(pre_shape, shape)
      if why is not None:
        problems.append(f"{path}: pre-trained shape {pre_shape}{via} != model shape {shape}; "
                        f"{why}")
        continue
      tiled.append(path)
    sources[path] = source
    used.add(source)
  dropped, unused = [], []
  for path in flat_pre:
    if path in used:
      continue
    if any(_fullmatch(p, path) for p in drop_p + replace_p):
      dropped.append(path)
    else:
      unused.append(path)
  if strict and unused:
    problems.append(f"{len(unused)} pre-trained variable(s) used by no model variable (allow "
                    "them with drop=... or strict=False): " + ", ".join(unused))
  for argument, patterns, counts in (("replace", replace_p, replace_hits),
                                     ("tile", tile_p, tile_hits),
                                     ("rename", [r[0] for r in rules], rename_hits)):
    for p, n in zip(patterns, counts):
      if not n:
        logging.warning("%s pattern %r matches no model variable (paths look like %s)",
                        argument, p.pattern, list(flat_fresh)[:3])
  for p in drop_p:
    if not any(_fullmatch(p, path) for path in flat_pre):
      logging.warning("drop pattern %r matches no pre-trained variable (paths look like %s)",
                      p.pattern, list(flat_pre)[:3])
  plan = TransferPlan(sources=sources, dropped=tuple(dropped),
                      unused=tuple(unused) if not strict else (), tiled=tuple(tiled))
  return plan, problems


def plan_transfer(pretrained: Mapping[str, Any], fresh: Mapping[str, Any], *,
                  replace: Iterable[str] = (), tile: Iterable[str] = (),
                  drop: Iterable[str] = (), rename: Iterable[tuple[str, str]] = (),
                  strict: bool = True) -> TransferPlan:
  """What :func:`transfer` would do, without copying anything; same arguments and errors."""
  plan, problems = _plan(flatten(pretrained, name="pretrained"), flatten(fresh, name="fresh"),
                         replace=replace, tile=tile, drop=drop, rename=rename, strict=strict)
  if problems:
    raise ValueError(f"cannot initialise from the pre-trained variables, {len(problems)} "
                     "problem(s):\n  " + "\n  ".join(problems))
  return plan


def transfer(pretrained: Mapping[str, Any], fresh: Mapping[str, Any], *,
             replace: Iterable[str] = (), tile: Iterable[str] = (), drop: Iterable[str] = (),
             rename: Iterable[tuple[str, str]] = (), strict: bool = True,
             return_plan: bool = False):
  """``fresh`` variables with every leaf not matched by ``replace`` copied from ``pretrained``.

  Paths and patterns: see the module docstring (``re.fullmatch`` on
  ``"collection/module/.../leaf"``; for ``params`` the prefix may be left out).

  Args:
    pretrained: Flax variables to copy from (``{collection: nested dict}``, any array type).
    fresh: the target model's freshly initialised variables; they define the result's
      structure, shapes and dtypes. Leaves that are copied may be ``jax.ShapeDtypeStruct`` s.
    replace: patterns of fresh leaves kept fresh (new input / output layers, a new head). A
      pretrained leaf matching one of them is dropped (the layer it fed is being replaced).
    tile: patterns of kernels ``(*k, C_in, C_out)`` whose number of input channels (axis -2)
      may differ, e.g. the input convolution of a model for more modalities. Where the
      pretrained kernel has ``C`` input channels and the fresh one ``C_in >= C`` (all other axes
      equal), the value is the pretrained kernel tiled over axis -2 (channel ``c`` takes channel
      ``c % C``) times ``C / C_in`` (:func:`tile_input_channels`), so an input whose channels
      are all equal gives the pretrained activation (exactly when ``C_in`` is a multiple of
      ``C``). Leaves of equal shapes are copied. A leaf may not match both ``replace`` and
      ``tile``.
    drop: patterns of pretrained leaves that may stay unused (a projection head, a
      discriminator).
    rename: ``(regex, replacement)`` pairs mapping a fresh path to the pretrained path it is
      read from (``re.Match.expand`` syntax, ``\\1`` or ``\\g<name>``); the first rule that fully
      matches is used; without one the path is the same. E.g.
      ``(r"params/encoder/(.*)", r"params/backbone/\\1")``. A rule that matches the short form
      of a params path gives a short path (``params/`` is put back).
    strict: pretrained leaves neither used nor dropped are an error; with False they are only
      reported in the plan's ``unused``.
    return_plan: also return the :class:`TransferPlan`.

  Returns:
    New variables (nested dicts of numpy arrays in the fresh dtypes): replaced leaves are the
    fresh values, tiled leaves the tiled pretrained kernels, all others the pretrained values;
    with ``return_plan`` ``(variables, plan)``.

  Raises:
    ValueError: listing every problem at once: fresh leaves missing from ``pretrained`` or of
    another shape (for ``tile`` leaves: differing in another axis than -2, or with fewer input
    channels), leaves matching both ``replace`` and ``tile``, kept-fresh leaves given only as
    shapes, and (strict) unused pretrained leaves. TypeError / ValueError: malformed variables
    or patterns (naming the argument).
  """
  flat_pre = flatten(pretrained, name="pretrained")
  flat_fresh = flatten(fresh, name="fresh")
  plan, problems = _plan(flat_pre, flat_fresh, replace=replace, tile=tile, drop=drop,
                         rename=rename, strict=strict)
  if problems:
    raise ValueError(f"cannot initialise from the pre-trained variables, {len(problems)} "
                     "problem(s):\n  " + "\n  ".join(problems))
  out = {}
  tiled = set(plan.tiled)
  for path, value in flat_fresh.items():
    source = plan.sources[path]
    dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
    if source is None:
      out[path] = np.asarray(value)
    elif path in tiled:
      out[path] = tile_input_channels(flat_pre[source], _shape(value)[-2]).astype(dtype)
    else:
      out[path] = np.asarray(jax.device_get(flat_pre[source])).astype(dtype, copy=False)
  variables = unflatten(out)
  for collection in fresh:  # keep empty collections and the fresh collection order
    variables.setdefault(str(collection), {})
  variables = {str(c): variables[str(c)] for c in fresh}
  return (variables, plan) if return_plan else variables


# --------------------------------------------------------------------------------------------
# Loading.


def _spec_dict(spec) -> dict:
  if isinstance(spec, (str, os.PathLike)):
    return {"path": os.fspath(spec)}
  if hasattr(spec, "to_dict"):  # ml_collections.ConfigDict
    spec = spec.to_dict()
  if not isinstance(spec, Mapping):
    raise TypeError(f"spec must be a mapping with a 'path' (or a path); got "
                    f"{type(spec).__name__}")
  return dict(spec)


def _given(value) -> bool:
  """Whether a spec field is set (None and "" mean unset, the values the base config holds)."""
  return value is not None and not (isinstance(value, str) and not value)


def _converter(name) -> Callable:
  if callable(name):
    return name
  if name not in CONVERTERS:
    raise ValueError(f"unknown converter {name!r}; known: {sorted(CONVERTERS)}")
  from jaxmed import interop  # pylint: disable=g-import-not-at-top  (imports every model)
  return getattr(interop, CONVERTERS[name])


def subtree(variables: Mapping[str, Any], prefix: str) -> dict:
  """The variables of the module at ``prefix`` (``"generator"``, ``"encoder/stage1"``), in
  every collection that has it.

  Raises:
    ValueError: no collection has ``prefix`` (naming the modules there are).
  """
  names = [p for p in prefix.strip("/").split("/") if p]
  out = {}
  for collection, tree in variables.items():
    node = tree
    for n in names:
      node = node.get(n) if isinstance(node, Mapping) else None
    if isinstance(node, Mapping):
      out[collection] = dict(node)
  if not out:
    tops = {c: sorted(t) for c, t in variables.items() if isinstance(t, Mapping)}
    raise ValueError(f"prefix {prefix!r} names no module of the loaded variables; their "
                     f"top-level modules: {tops}")
  return out


def load_pretrained(spec, *, template: Any = None, adapted: Iterable[str] = ()) -> dict:
  """Flax variables of a pre-trained model: an orbax run or a converted PyTorch file.

  Args:
    spec: a path, or a mapping (a dict or ``ConfigDict``) with
      ``path``: a run's workdir or ``checkpoints`` folder (read with
      :func:`jaxmed.train.checkpoint.load_variables`, falling back past unreadable
      checkpoints), or a ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` / ``.safetensors`` file
      (read with :func:`jaxmed.interop.load_state_dict`);
      ``step`` (runs): the checkpoint step, default the latest readable;
      ``converter`` (files, required): one of :data:`CONVERTERS` (``"resnet"``, ``"vgg16"``,
      ``"vit"``, ``"mae"``, ``"swin_unetr"``, ``"ssfd"``, ``"pix2pix"`` (the U-Net
      generator), ``"patchgan"``) or a function ``(state_dict, template, **kwargs) ->
      Converted``;
      ``converter_kwargs`` (files): keyword arguments of the converter (``drop_fc``,
      ``layout``, ``strict``, ``ignore``, ...);
      ``key`` (files): the entry holding the weights in a file that stores several things;
      ``strip`` (files): key prefixes removed first (``["module."]``);
      ``prefix``: keep only the module at this path (``"generator"``) of every collection.
      None or "" leave a field unset.
    template: for files: the variables, or ``jax.eval_shape`` shapes, of the jaxmed model the
      file's weights belong to (the converter fills its structure).
    adapted: for files: patterns of template paths whose shapes may differ from the file's
      (the layers :func:`transfer` replaces or tiles next); they keep the file's shapes
      (`jaxmed.interop.state_dict.keep_checkpoint_shapes`).

  Returns:
    ``{collection: nested dict of numpy arrays}``.

  Raises:
    FileNotFoundError: ``path`` does not exist. ValueError: unknown or misplaced fields, an
    unknown converter (listing the known ones), a file type not supported, a missing
    template, or a conversion error (naming the file).
  """
  spec = _spec_dict(spec)
  unknown = sorted(set(spec) - set(LOAD_KEYS))
  if unknown:
    raise ValueError(f"unknown pre-trained spec field(s) {unknown}; known: {list(LOAD_KEYS)}")
  if not _given(spec.get("path")):
    raise ValueError(f"the pre-trained spec needs a 'path'; got {spec}")
  path = os.fspath(spec["path"])
  step = spec.get("step")
  step = int(step) if _given(step) else None
  if os.path.isdir(path):
    misplaced = [k for k in ("converter", "converter_kwargs", "key", "strip") if spec.get(k)]
    if misplaced:
      raise ValueError(f"{path!r} is a folder (an orbax run); {misplaced} apply only to "
                       "PyTorch files")
    variables = checkpoint.load_variables(path, step=step)
  elif os.path.isfile(path):
    if not path.endswith(TORCH_SUFFIXES):
      raise ValueError(f"cannot read pre-trained weights from {path!r}: expected an orbax run "
                       f"folder or a file ending in {TORCH_SUFFIXES}")
    if step is not None:
      raise ValueError(f"step={step} applies only to orbax runs, not to the file {path!r}")
    if not _given(spec.get("converter")):
      raise ValueError(f"reading the PyTorch file {path!r} needs a 'converter'; known: "
                       f"{sorted(CONVERTERS)}")
    convert = _converter(spec["converter"])
    if template is None:
      raise ValueError(f"converting {path!r} needs template=: the variables (or their "
                       "jax.eval_shape shapes) of the model its weights belong to")
    from jaxmed.interop import state_dict as sd_lib  # pylint: disable=g-import-not-at-top
    state_dict = sd_lib.load_state_dict(path, key=spec.get("key") or None)
    strip = spec.get("strip") or ()
    if isinstance(strip, str):
      strip = (strip,)
    if strip:
      state_dict = sd_lib.strip_prefix(state_dict, strip)
    kwargs = dict(spec.get("converter_kwargs") or {})
    if "name" in inspect.signature(convert).parameters and "name" not in kwargs:
      kwargs["name"] = f"checkpoint {path!r}"
    with sd_lib.keep_checkpoint_shapes(adapted):
      converted = convert(state_dict, template, **kwargs)
    variables = getattr(converted, "variables", converted)
    variables = jax.tree.map(np.asarray, dict(variables))
  elif os.path.exists(path):
    raise ValueError(f"pre-trained path {path!r} is neither a folder nor a file")
  else:
    raise FileNotFoundError(f"pre-trained weights not found: {path!r}")
  if _given(spec.get("prefix")):
    variables = subtree(variables, spec["prefix"])
  return variables


def load_frozen_networks(method) -> dict[str, Any]:
  """Loads the frozen networks a method reads from files (``method.frozen_networks()``: name ->
  (load spec, variable shapes), e.g. CoPer synthesis's loss network), hands each to
  ``method.set_frozen_network(name, variables)`` and returns them (name -> variables). The
  trainer calls it before initialising; methods do not read weights themselves.

  A jaxmed run's variables: the module ``spec["prefix"]`` names, or, with no prefix, the one
  module whose leaves match the shapes (`find_prefix`). A PyTorch file: converted into the
  shapes (``converter``). Leaves the network lacks (a head, a classifier) are left out; a
  missing or mis-shaped leaf is an error.
  """
  loaded_networks = {}
  for name, (spec, shapes) in getattr(method, "frozen_networks", dict)().items():
    spec = _spec_dict(spec)
    path = os.fspath(spec["path"])
    loaded = load_pretrained(spec, template=shapes)
    if not _given(spec.get("prefix")) and not os.path.isfile(path):
      loaded = subtree(loaded, find_prefix(loaded, shapes, path))
    variables, plan = transfer(loaded, shapes, strict=False, return_plan=True)
    logging.info("frozen network %s from %s: %s", name, path, plan.summary())
    method.set_frozen_network(name, variables)
    loaded_networks[name] = variables
  return loaded_networks


def find_prefix(loaded: Mapping[str, Any], template: Mapping[str, Any], path: str) -> str:
  """The module path of ``loaded`` whose variables hold every leaf of ``template`` (same
  shapes): where a run keeps a network under an unknown prefix (a SwAV run's ``backbone``)."""
  def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
      if isinstance(v, Mapping):
        out.update(flat(v, f"{prefix}{k}/"))
      else:
        out[f"{prefix}{k}"] = tuple(np.shape(v))
    return out

  want = {c: flat(t) for c, t in template.items()}
  have = {c: flat(t) for c, t in loaded.items() if isinstance(t, Mapping)}
  first = next(iter(want["params"]))
  candidates = sorted({p[:-len(first)] for p in have.get("params", {})
                       if p == first or p.endswith("/" + first)})
  found = [q for q in candidates
           if all(have.get(c, {}).get(q + leaf) == s for c, leaves in want.items()
                  for leaf, s in leaves.items())]
  if not found:
    raise ValueError(f"{path!r}: no module holds the network "
                     f"with matching shapes; its top-level modules: "
                     f"{sorted(loaded.get('params', {}))}; set its prefix and check "
                     "its model fields")
  if len(found) > 1:
    raise ValueError(f"{path!r}: several modules hold the network: "
                     f"{[q.rstrip('/') for q in found]}; set its prefix")
  return found[0].rstrip("/")


def initializer(spec, *, template: Any = None, pretrained: Mapping[str, Any] | None = None,
                **transfer_kwargs) -> Callable[[dict], dict]:
  """``init(fresh) -> variables`` for `jaxmed.train.trainer.train(init_variables=...)`.

  Loads the pre-trained variables when called (:func:`load_pretrained`) and transfers them
  into the fresh ones (:func:`transfer`), logging the plan's counts.

  Args:
    spec: as :func:`load_pretrained`; may also hold the transfer fields ``replace``,
      ``tile``, ``drop``, ``rename`` and ``strict`` (so one config section describes the whole
      initialisation).
    template: for PyTorch files, the template of the converted model; default the fresh
      variables themselves (right for a file of the same architecture, without ``prefix``).
    pretrained: variables already in memory (e.g. a run of the same process): used instead of
      loading ``spec``'s path; the spec's transfer fields still apply.
    **transfer_kwargs: more :func:`transfer` arguments (override the spec's).
  """
  spec = _spec_dict(spec)
  load_spec = {k: v for k, v in spec.items() if k not in TRANSFER_KEYS}
  kwargs = {k: spec[k] for k in TRANSFER_KEYS if k in spec and spec[k] is not None}
  kwargs.update(transfer_kwargs)
  bad = sorted(set(kwargs) - set(TRANSFER_KEYS))
  if bad:
    raise TypeError(f"unknown transfer argument(s) {bad}; known: {list(TRANSFER_KEYS)}")

  def init(fresh: dict) -> dict:
    source = pretrained
    if source is None:
      adapted = tuple(kwargs.get("replace", ())) + tuple(kwargs.get("tile", ()))
      source = load_pretrained(load_spec, template=fresh if template is None else template,
                               adapted=adapted if template is None else ())
    variables, plan = transfer(source, fresh, return_plan=True, **kwargs)
    logging.info("initialised from %s: %s", load_spec.get("path"), plan.summary())
    return variables

  return init

"""PyTorch state dicts -> Flax variables: reading checkpoints and checked, rule-driven conversion.

A converter for one architecture is a *rule*: a function from a Flax variable path
``(collection, module, ..., leaf)`` to the PyTorch key that holds it (optionally with a
transform). :func:`convert` walks the Flax template (``jax.eval_shape(model.init, ...)`` or real
variables), looks every leaf up, transposes it to the Flax layout, checks every shape and
reports what is missing or left over. Nothing is dropped silently:

* a Flax leaf whose key is absent is *missing* (an error when ``strict``; otherwise the
  template's value is kept, which then must be a real array, e.g. from ``model.init``);
* a checkpoint key that no leaf asked for is *unused* (an error when ``strict``, unless it
  matches one of the ``ignore`` patterns; always reported in :class:`Converted`);
* a shape mismatch is an error, listing every offending key, except for the leaves a caller
  is about to adapt (:func:`keep_checkpoint_shapes`: e.g. a new output layer, an input kernel
  tiled over more channels), which keep the checkpoint's shape.

Default transforms by Flax leaf name (override them in the rule for anything else):

=================  =====================  =============================================
Flax leaf          PyTorch                transform
=================  =====================  =============================================
``kernel`` (2D)    Linear ``weight``      ``(out, in)`` -> ``(in, out)``
``kernel`` (>=3D)  Conv ``weight``        ``(out, in, *k)`` -> ``(*k, in, out)``
``scale``          norm ``weight``        none
``bias``           ``bias``               none
``mean`` / ``var`` ``running_mean/var``   none (BatchNorm statistics)
``embedding``      Embedding ``weight``   none
anything else      same name              none
=================  =====================  =============================================
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fnmatch
import os
import re
import zipfile
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]
Rule = Callable[[tuple[str, ...]], "str | tuple[str, Transform] | None"]

# Keys under which training scripts commonly wrap the weights in a saved dict.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "network", "teacher",
                "student", "params")


def linear_kernel(w: np.ndarray) -> np.ndarray:
  """torch ``Linear.weight (out, in)`` -> Flax ``Dense.kernel (in, out)``."""
  return np.transpose(w)


def conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch ``ConvNd.weight (out, in, *k)`` -> Flax ``Conv.kernel (*k, in, out)``."""
  return np.transpose(w, tuple(range(2, w.ndim)) + (1, 0))


def conv_transpose_kernel(w: np.ndarray) -> np.ndarray:
  """torch ``ConvTransposeNd.weight (in, out, *k)`` -> ``(*k, in, out)`` with no spatial flip.

  This is the layout of :class:`jaxmed.models.unet.UpConv` (kernel == stride, written as an
  einsum). For ``flax.linen.ConvTranspose`` with ``transpose_kernel=True`` use
  :func:`flax_conv_transpose_kernel`.
  """
  return np.transpose(w, tuple(range(2, w.ndim)) + (0, 1))


def flax_conv_transpose_kernel(w: np.ndarray) -> np.ndarray:
  """torch ``ConvTransposeNd.weight (in, out, *k)`` -> ``nn.ConvTranspose`` kernel ``(*k, in, out)``.

  For Flax's default ``transpose_kernel=False`` (a dilated forward conv): the spatial axes are
  flipped, since torch's transposed conv is the gradient of a conv.
  """
  w = w[(slice(None), slice(None)) + (slice(None, None, -1),) * (w.ndim - 2)]
  return np.transpose(w, tuple(range(2, w.ndim)) + (0, 1))


def default_transform(leaf: str, ndim: int) -> Transform | None:
  """The transform :func:`convert` applies when a rule gives only a key."""
  if leaf == "kernel":
    return linear_kernel if ndim == 2 else conv_kernel
  return None


def default_torch_name(leaf: str) -> str:
  """PyTorch parameter / buffer name of a Flax leaf name (``scale`` -> ``weight``, ...)."""
  return {"kernel": "weight", "scale": "weight", "mean": "running_mean",
          "var": "running_var", "embedding": "weight"}.get(leaf, leaf)


def module_rule(prefix_of: Callable[[tuple[str, ...]], str | None]) -> Rule:
  """A rule from a function of the *module* path only (the default leaf names are appended).

  ``prefix_of(("layer1_0", "conv1"))`` returns the torch module prefix (``"layer1.0.conv1"``)
  or None for "no checkpoint key" (the leaf is then missing).
  """

  def rule(path: tuple[str, ...]) -> str | None:
    prefix = prefix_of(path[1:-1])
    if prefix is None:
      return None
    name = default_torch_name(path[-1])
    return f"{prefix}.{name}" if prefix else name

  return rule


# --------------------------------------------------------------------------------------------
# Reading.


def to_numpy(value: Any) -> np.ndarray:
  """A NumPy array of a torch tensor (bfloat16 widened to float32) or any array-like."""
  if isinstance(value, np.ndarray):
    return value
  detach = getattr(value, "detach", None)
  if detach is not None:  # a torch tensor
    value = detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _is_tensor(value: Any) -> bool:
  return isinstance(value, np.ndarray) or hasattr(value, "detach")


def _unwrap(obj: Any, path: str, key: str | None) -> Mapping[str, Any]:
  """The tensor mapping inside a loaded checkpoint object."""
  if not isinstance(obj, Mapping):
    raise ValueError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state dict")
  if key is not None:
    if key not in obj:
      raise ValueError(f"checkpoint {path!r} has no entry {key!r}; top-level keys: "
                       f"{sorted(map(str, obj))[:20]}")
    obj = obj[key]
    if not isinstance(obj, Mapping):
      raise ValueError(f"checkpoint {path!r} entry {key!r} is a {type(obj).__name__}, "
                       "not a state dict")
  elif obj and not all(_is_tensor(v) for v in obj.values()):
    wrappers = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
    if not wrappers:
      raise ValueError(
          f"checkpoint {path!r} mixes tensors with other entries and has none of the usual "
          f"wrapper keys {WRAPPER_KEYS}; pass key=... (top-level keys: "
          f"{sorted(map(str, obj))[:20]})")
    obj = obj[wrappers[0]]
  return obj


def load_state_dict(path: str | os.PathLike, *, key: str | None = None) -> dict[str, np.ndarray]:
  """Reads a PyTorch checkpoint into ``{name: np.ndarray}``.

  Args:
    path: a ``.safetensors`` file (read with ``safetensors``, no torch needed) or a
      ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` file (read with ``torch.load(weights_only=True)``;
      needs torch).
    key: the entry holding the weights when the file stores a dict of several things
      (``"state_dict"``, ``"model"``, ``"teacher"``, ...). When None, a plain state dict is
      used as is and otherwise the first present of :data:`WRAPPER_KEYS`.

  Returns:
    Tensors as NumPy arrays (bfloat16 widened to float32); non-tensor entries are dropped.

  Raises:
    FileNotFoundError: no such file. ValueError: the file cannot be read (the path is named)
    or holds no state dict.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint not found: {path!r}")
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file
      tensors = load_file(path)
    except ImportError as e:
      raise ImportError(f"reading {path!r} needs the 'safetensors' package") from e
    except Exception as e:  # safetensors raises its own error types
      raise ValueError(f"cannot read safetensors checkpoint {path!r}: {e}") from e
    obj: Any = tensors
  else:
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"reading {path!r} needs PyTorch; convert it to .safetensors "
                        "elsewhere or `pip install torch`") from e
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
      raise ValueError(f"cannot read PyTorch checkpoint {path!r}: {e}") from e
    except Exception as e:  # unpickling errors of every kind
      raise ValueError(f"cannot read PyTorch checkpoint {path!r}: {type(e).__name__}: {e}") from e
  mapping = _unwrap(obj, path, key)
  return {str(k): to_numpy(v) for k, v in mapping.items() if _is_tensor(v)}


def strip_prefix(state_dict: Mapping[str, Any], prefixes: Iterable[str]) -> dict[str, Any]:
  """Removes the first matching prefix of ``prefixes`` from every key (repeatedly, in order).

  ``strip_prefix(sd, ("module.", "encoder."))`` turns ``module.encoder.layers1.0...`` into
  ``layers1.0...``. Keys that match no prefix are kept as they are. Two keys that collide
  after stripping are an error.
  """
  prefixes = tuple(prefixes)
  out: dict[str, Any] = {}
  for k, v in state_dict.items():
    new = k
    changed = True
    while changed:
      changed = False
      for p in prefixes:
        if p and new.startswith(p):
          new = new[len(p):]
          changed = True
    if new in out:
      raise ValueError(f"strip_prefix{prefixes}: two checkpoint keys map to {new!r}")
    out[new] = v
  return out


# --------------------------------------------------------------------------------------------
# Conversion.


@dataclasses.dataclass(frozen=True)
class Converted:
  """The result of :func:`convert`.

  Attributes:
    variables: Flax variables (NumPy arrays), the template's structure.
    missing: Flax paths (``"params/layer1_0/conv1/kernel"``) the checkpoint did not provide
      (kept from the template; empty when strict).
    unused: checkpoint keys no Flax leaf used (``mask_token`` of a self-supervised Swin
      checkpoint, a projection head, ...).
  """

  variables: dict
  missing: tuple[str, ...]
  unused: tuple[str, ...]


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def _limited(items: Sequence[str], n: int = 30) -> str:
  items = list(items)
  more = f" ... and {len(items) - n} more" if len(items) > n else ""
  return ", ".join(items[:n]) + more


_KEEP_SHAPES: contextvars.ContextVar[tuple[re.Pattern, ...]] = contextvars.ContextVar(
    "keep_checkpoint_shapes", default=())


@contextlib.contextmanager
def keep_checkpoint_shapes(patterns: Iterable[str]):
  """Within the block, :func:`convert` gives the Flax leaves whose path (``params/out/kernel``)
  fully matches one of the regular expressions ``patterns`` the checkpoint's own shape (after
  the layout transform, same rank) instead of reporting a shape mismatch.

  For loading into a model that adapts those leaves next (`jaxmed.train.init.transfer`'s
  ``replace`` and ``tile``): a 14-class output layer converted for a 3-class model, a 1-channel
  input kernel for a 4-channel one. Every other leaf is checked as usual.
  """
  token = _KEEP_SHAPES.set(tuple(re.compile(p) for p in patterns))
  try:
    yield
  finally:
    _KEEP_SHAPES.reset(token)


def convert(state_dict: Mapping[str, Any], template: Any, rule: Rule, *, strict: bool = True,
            ignore: Iterable[str] = (), name: str = "checkpoint") -> Converted:
  """Fills a Flax variable template from a PyTorch state dict, checking every key and shape.

  Args:
    state_dict: ``{torch key: array}`` (NumPy or torch tensors).
    template: Flax variables or their ``jax.ShapeDtypeStruct`` s (``jax.eval_shape`` of
      ``model.init``); defines the structure, shapes and dtypes of the result.
    rule: Flax path ``(collection, *modules, leaf)`` -> torch key, or ``(key, transform)``, or
      None when the leaf has no counterpart in the checkpoint.
    strict: missing leaves and unused keys (outside ``ignore``) are errors.
    ignore: ``fnmatch`` patterns of checkpoint keys that may stay unused even when strict
      (e.g. ``"num_batches_tracked"`` counters, heads of a pre-training model).
    name: how errors refer to the checkpoint (e.g. its path).

  Returns:
    :class:`Converted`.

  Raises:
    ValueError: listing every shape mismatch (outside :func:`keep_checkpoint_shapes`); when
    ``strict``, every missing leaf and unused key; when not strict, a missing leaf whose
    template value is only a shape.
  """
  state = {str(k): v for k, v in state_dict.items()}
  ignore = tuple(ignore)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  values, used, missing, mismatched, abstract = [], set(), [], [], []
  for path, leaf in leaves:
    names = _path_names(path)
    flax_name = "/".join(names)
    target = rule(names)
    transform = None
    if isinstance(target, tuple):
      target, transform = target
    if target is None or target not in state:
      missing.append(f"{flax_name} (<- {target})" if target else flax_name)
      if isinstance(leaf, jax.ShapeDtypeStruct):
        abstract.append(flax_name)
        values.append(None)
      else:
        values.append(np.asarray(leaf))
      continue
    used.add(target)
    value = to_numpy(state[target])
    if transform is None:
      transform = default_transform(names[-1], value.ndim)
    if transform is not None:
      try:
        value = transform(value)
      except ValueError:  # e.g. a conv-kernel transpose of a 1D norm weight
        mismatched.append(f"{target} {tuple(value.shape)} -> {flax_name}: cannot be "
                          f"transposed to the Flax layout, expected {tuple(leaf.shape)}")
        values.append(None)
        continue
    if tuple(value.shape) != tuple(leaf.shape) and not (
        value.ndim == len(leaf.shape)
        and any(p.fullmatch(flax_name) for p in _KEEP_SHAPES.get())):
      mismatched.append(f"{target} {tuple(np.shape(state[target]))} -> {flax_name} "
                        f"{tuple(value.shape)}, expected {tuple(leaf.shape)}")
      values.append(None)
      continue
    values.append(np.asarray(value, dtype=leaf.dtype))

  unused = tuple(k for k in state if k not in used)
  unexpected = [k for k in unused if not any(fnmatch.fnmatchcase(k, p) for p in ignore)]
  problems = []
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatch(es): {_limited(mismatched)}")
  if strict and missing:
    problems.append(f"{len(missing)} Flax variable(s) missing from the {name}: "
                    f"{_limited(missing)}")
  if strict and unexpected:
    problems.append(f"{len(unexpected)} {name} key(s) not used by the model: "
                    f"{_limited(unexpected)}")
  if not strict and abstract:
    problems.append(f"{len(abstract)} Flax variable(s) missing from the {name} and the "
                    f"template has only their shapes (pass real variables from model.init to "
                    f"keep them): {_limited(abstract)}")
  if problems:
    raise ValueError(f"cannot load {name}: " + "; ".join(problems))
  return Converted(variables=jax.tree_util.tree_unflatten(treedef, values),
                   missing=tuple(missing), unused=unused)

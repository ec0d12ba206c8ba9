"""Methods and compiled train programs shared by the runs of one process whose configs are equal.

An experiment trains many runs with one config (the rows of a fine-tuning table differ only in
their initial weights; a run repeated to check determinism), and each new `jax.jit` traces,
lowers and compiles again: 5-10 s per run for a tiny Swin-UNETR on CPU, of which a persistent
compilation cache hit saves only the compile. Here the second run with an equal config reuses
the first one's method and its jitted initialisation and train step, so JAX's own cache serves
them without tracing.

A method is a function of its config, except for the frozen networks it reads from files
(`jaxmed.train.init.load_frozen_networks`), which its initialisation takes as an argument. So
programs are shared when the config (all of it, as JSON), the batch shapes and dtypes, the mesh
and the frozen networks' names, leaf paths, shapes and dtypes are equal, and only for a method
built here (`shared_method`): a method the caller built, and may have changed (another network,
a replaced function), always gets programs of its own. Do not modify a shared method.

As with `jax.jit`, a program is traced once: what its functions read from elsewhere while
tracing (a module function replaced in a test, `jax.default_backend`) is not part of the key;
call `clear` after changing it. The last `MAX_CONFIGS` configs are kept, with their compiled
programs; `clear` drops them.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jaxmed import methods as methods_lib

MAX_CONFIGS = 4


@dataclasses.dataclass(frozen=True)
class Programs:
  """A method's jitted programs for one batch shape and mesh.

  Attributes:
    init: ``(rng, frozen) -> TrainState`` at step 0, in ``state_shardings``; ``frozen``: the
      method's frozen networks (name -> variables; `jaxmed.train.init.load_frozen_networks`).
    step: ``(state, batch) -> (state, metrics)``; donates ``state``.
    state_shardings: the train state's shardings.
  """

  init: Callable
  step: Callable
  state_shardings: Any


@dataclasses.dataclass
class _Entry:
  method: methods_lib.Method
  programs: dict = dataclasses.field(default_factory=dict)


_entries: collections.OrderedDict[tuple, _Entry] = collections.OrderedDict()
_lock = threading.Lock()


def _config_key(config) -> tuple:
  """The method class ``config.method`` names now (a test may register another) and the
  whole config as JSON."""
  return (methods_lib.METHODS.get(config.get("method")),
          config.to_json_best_effort(sort_keys=True))


def shared_method(config) -> methods_lib.Method:
  """``config.method``'s `Method`, the same object for every equal ``config`` of this process
  (among the last `MAX_CONFIGS`), so that its runs share compiled programs (`programs`)."""
  key = _config_key(config)
  with _lock:
    entry = _entries.get(key)
    if entry is None:
      entry = _entries[key] = _Entry(methods_lib.get_method(config))
      while len(_entries) > MAX_CONFIGS:
        _entries.popitem(last=False)
    _entries.move_to_end(key)
    return entry.method


def frozen_signature(frozen: Mapping[str, Any]) -> tuple:
  """Frozen networks' names, leaf paths, shapes and dtypes (their values are arguments of the
  programs, not part of them)."""
  return tuple((name, jax.tree_util.keystr(path), tuple(np.shape(leaf)), np.dtype(leaf.dtype))
               for name in sorted(frozen)
               for path, leaf in jax.tree_util.tree_flatten_with_path(frozen[name])[0])


def programs(config, method, example_batch: Mapping[str, Any], mesh,
             frozen: Mapping[str, Any], build: Callable[[], Programs]) -> Programs:
  """``build()``, or the `Programs` it returned for an earlier run of this process with an
  equal ``config``, the same shared ``method`` (`shared_method`), equal batch shapes and
  dtypes, an equal ``mesh`` and ``frozen`` networks (name -> variables loaded from files) of
  equal shapes. A method that is not shared for ``config`` always gets ``build()``."""
  config_key = _config_key(config)
  with _lock:
    entry = _entries.get(config_key)
  if entry is None or entry.method is not method:
    return build()
  shapes = tuple(sorted((k, tuple(v.shape), np.dtype(v.dtype)) for k, v in example_batch.items()))
  key = (shapes, mesh, frozen_signature(frozen))
  found = entry.programs.get(key)
  if found is None:
    found = entry.programs[key] = build()
  return found


def clear() -> None:
  """Forgets every shared method and its compiled programs."""
  with _lock:
    _entries.clear()

"""One threefry hash for many independent random draws: the same bits, a fraction of the compile.

A Flax initialisation draws each parameter with its own key: for every parameter a
``fold_in`` (the module path), a ``split`` and a ``random_bits``, each a threefry2x32 hash
that XLA emits as its own loop (on CPU a 5-iteration while loop of 20 rounds). A tiny
Swin-UNETR (99 parameters) compiles 156 such loops, and its initialisation compiled in
3.2-3.8 s, almost all of it the random draws (with every draw replaced by zeros: 0.1 s).

`merge_threefry_calls(fn)` traces ``fn`` to a jaxpr and evaluates it with

* the parts that do not reach an output removed (a Flax initialisation traces the forward
  pass only for its shapes),
* nested ``jax.jit`` calls inlined, and the random primitives on threefry keys
  (``random_bits``, ``random_split``, ``random_fold_in``) expanded into the threefry2x32
  calls their lowering makes (`_expansion`: the same implementation, ``jax.vmap``-ed over key
  dimensions as JAX's lowering does),
* the threefry2x32 calls evaluated in waves: each wave is every call whose inputs are known,
  hashed as one call on the concatenation of their flattened, broadcast inputs and split
  back. The hash is element-wise in (key, counter) pairs, so every output bit is the one the
  separate calls give.

The tiny Swin-UNETR's initialisation: 156 calls -> 2, 3.2-3.8 -> 1.2-1.4 s to compile, every
parameter equal to the bit. A wave merges at most `MERGED_ELEMENTS` outputs per call (a larger draw, e.g. a
big kernel of a full-size model, keeps its own call), so the extra memory is bounded and large
draws stay partitionable.

Only integer hashing is merged. Merging the float element-wise work after it (e.g. the
``erf_inv`` of ``truncated_normal``) compiled faster still, but changed values by one ulp: XLA
fuses, and contracts multiply-adds, differently across the new boundaries.

A function with effects (callbacks, prints) runs as it is: reordering would move them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core
from jax.extend import random as extend_random
from jax.extend import source_info_util
from jax.extend.core import primitives
from jax.interpreters import partial_eval

MERGED_ELEMENTS = 1 << 22  # outputs per merged call (16 MiB per uint32 operand)

_THREEFRY = extend_random.threefry_prng_impl


def _vmapped(ndim: int, fn: Callable) -> Callable:
  for _ in range(ndim):
    fn = jax.vmap(fn)
  return fn


# The random primitives on threefry keys as their lowering computes them (JAX's prng module:
# the implementation's function, vmapped over the key array's dimensions), on the key data.


def _random_bits(keys, *, bit_width, shape):
  bits = lambda k: _THREEFRY.random_bits(k, bit_width, shape)
  return _vmapped(keys.ndim, bits)(jax.random.key_data(keys))


def _random_split(keys, *, shape):
  data = _vmapped(keys.ndim, lambda k: _THREEFRY.split(k, shape))(jax.random.key_data(keys))
  return jax.random.wrap_key_data(data, impl="threefry2x32")


def _random_fold_in(keys, msgs):
  shape = jnp.broadcast_shapes(keys.shape, jnp.shape(msgs))
  keys, msgs = jnp.broadcast_to(keys, shape), jnp.broadcast_to(msgs, shape)
  data = _vmapped(len(shape), _THREEFRY.fold_in)(jax.random.key_data(keys), msgs)
  return jax.random.wrap_key_data(data, impl="threefry2x32")


_EXPANSIONS = {primitives.random_bits_p: _random_bits,
               primitives.random_split_p: _random_split,
               primitives.random_fold_in_p: _random_fold_in}


class _Value:
  """A value the caller gives (an argument, a constant, a literal)."""
  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value


class _Node:
  """One equation of the flattened program and its operands: `_Value` or another node's output,
  ``(node, index)``."""
  __slots__ = ("eqn", "operands")

  def __init__(self, eqn, operands):
    self.eqn, self.operands = eqn, operands


@functools.cache
def _threefry_key_dtype():
  return jax.eval_shape(lambda: jax.random.key(0, impl="threefry2x32")).dtype


def _inlinable(eqn) -> bool:
  """A nested ``jax.jit`` with no shardings, layouts or compiler options of its own."""
  if eqn.primitive is not primitives.jit_p:
    return False
  p = eqn.params
  return (not any(isinstance(s, jax.sharding.Sharding)
                  for s in (*p["in_shardings"], *p["out_shardings"]))
          and all(layout is None for layout in (*p["in_layouts"], *p["out_layouts"]))
          and not p["compiler_options_kvs"])


def _expandable(eqn) -> bool:
  return (eqn.primitive in _EXPANSIONS
          and eqn.invars[0].aval.dtype == _threefry_key_dtype())


@functools.lru_cache(maxsize=1024)
def _expansion(primitive, params: tuple, avals: tuple):
  """The threefry2x32 program of a random primitive (what its lowering emits), as a jaxpr."""
  fn = functools.partial(_EXPANSIONS[primitive], **dict(params))
  return jax.make_jaxpr(fn)(*(jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type)
                              for a in avals))


def _flatten(jaxpr, consts: Sequence[Any], operands: Sequence[Any], nodes: list) -> list:
  """Appends ``jaxpr``'s equations to ``nodes`` (nested jits inlined, threefry key primitives
  expanded into threefry2x32 calls), its inputs bound to ``operands``; its outputs."""
  env = dict(zip(jaxpr.constvars, map(_Value, consts)))
  env.update(zip(jaxpr.invars, operands))
  read = lambda a: _Value(a.val) if isinstance(a, core.Literal) else env[a]
  for eqn in jaxpr.eqns:
    ins = [read(a) for a in eqn.invars]
    if _inlinable(eqn):
      inner = eqn.params["jaxpr"]
      outs = _flatten(inner.jaxpr, inner.consts, ins, nodes)
    elif _expandable(eqn):
      closed = _expansion(eqn.primitive, tuple(sorted(eqn.params.items())),
                          tuple(a.aval for a in eqn.invars))
      outs = _flatten(closed.jaxpr, closed.consts, ins, nodes)
    else:
      node = _Node(eqn, ins)
      nodes.append(node)
      outs = [(node, i) for i in range(len(eqn.outvars))]
    env.update(zip(eqn.outvars, outs))
  return [read(a) for a in jaxpr.outvars]


def _bind(eqn, values: Sequence[Any]) -> list[Any]:
  """``eqn`` applied to ``values`` in the current trace, with its source information."""
  params = eqn.primitive.get_bind_params(eqn.params)
  names = source_info_util.current_name_stack() + eqn.source_info.name_stack
  with source_info_util.user_context(eqn.source_info.traceback, name_stack=names), \
      eqn.ctx.manager:
    out = eqn.primitive.bind(*values, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _groups(wave: list[_Node]) -> list[list[_Node]]:
  """``wave``'s threefry2x32 nodes in groups of at most `MERGED_ELEMENTS` outputs (a larger
  one alone), in order."""
  groups, total = [[]], 0
  for node in wave:
    n = math.prod(node.eqn.outvars[0].aval.shape)
    if groups[-1] and total + n > MERGED_ELEMENTS:
      groups.append([])
      total = 0
    groups[-1].append(node)
    total += n
  return [g for g in groups if g]


def _merged_threefry(eqn, calls: list[list[Any]]) -> list[list[Any]]:
  """``calls`` (each threefry2x32's four operands) hashed as one call; each call's two
  outputs."""
  if len(calls) == 1:
    return [_bind(eqn, calls[0])]
  shapes = [jnp.broadcast_shapes(*(jnp.shape(x) for x in operands)) for operands in calls]
  flat = [[jnp.broadcast_to(x, shape).reshape(-1) for x in operands]
          for operands, shape in zip(calls, shapes)]
  bits = _bind(eqn, [jnp.concatenate([f[i] for f in flat]) for i in range(4)])
  out, start = [], 0
  for shape in shapes:
    stop = start + math.prod(shape)
    out.append([b[start:stop].reshape(shape) for b in bits])
    start = stop
  return out


def _evaluate_in_waves(nodes: list[_Node], results: Sequence[Any]) -> list[Any]:
  """``nodes`` (in order) evaluated into the current trace, their threefry2x32 calls merged
  wave by wave; the values of ``results``."""
  done: dict[_Node, list[Any]] = {}
  value = lambda ref: ref.value if isinstance(ref, _Value) else done[ref[0]][ref[1]]
  known = lambda node: all(isinstance(r, _Value) or r[0] in done for r in node.operands)
  pending = nodes
  while pending:
    wave, later = [], []
    for node in pending:  # in order: what an evaluated node makes known follows it
      if not known(node):
        later.append(node)
      elif node.eqn.primitive is primitives.threefry2x32_p:
        wave.append(node)
      else:
        done[node] = _bind(node.eqn, [value(r) for r in node.operands])
    for group in _groups(wave):
      calls = [[value(r) for r in node.operands] for node in group]
      done.update(zip(group, _merged_threefry(group[0].eqn, calls)))
    pending = later
  return [value(r) for r in results]


def merge_threefry_calls(fn: Callable) -> Callable:
  """``fn`` with its independent threefry hashes merged, for ``jax.jit`` to compile: the same
  outputs, bit for bit, in a program with fewer, larger random-number loops (module
  docstring). ``fn`` takes and returns pytrees of arrays; it is traced at every call (jit
  the result, as with any function)."""
  @functools.wraps(fn)
  def merged(*args):
    closed, out_shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    if closed.effects:
      return fn(*args)
    used, _ = partial_eval.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars),
                                     instantiate=True)
    nodes = []
    results = _flatten(used, closed.consts, list(map(_Value, jax.tree.leaves(args))), nodes)
    out = _evaluate_in_waves(nodes, results)
    return jax.tree.unflatten(jax.tree.structure(out_shapes), out)
  return merged

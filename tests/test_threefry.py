"""merge_threefry_calls: the same bits as the function it wraps, from fewer threefry2x32 calls."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import jax.extend.core
import pytest

from jaxmed import threefry
from jaxmed.threefry import merge_threefry_calls


class _Net(nn.Module):
  """Parameters drawn by several initialisers (truncated normal, uniform, normal, zeros), one
  of them under a nested module, and a dropout draw."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(5, kernel_init=nn.initializers.truncated_normal(0.02))(x)
    x = nn.Dense(3, kernel_init=nn.initializers.variance_scaling(1.0, "fan_in", "uniform"),
                 bias_init=nn.initializers.normal(0.1))(x)
    x = nn.LayerNorm()(x)
    x = x + self.param("offset", nn.initializers.uniform(0.5), (2, 3))
    return nn.Dropout(0.5, deterministic=False)(x)


def _draws(key, x):
  """Every random primitive the expansion handles: bits of several widths and shapes, key
  splits with a batch of keys, fold_in with broadcasting, legacy uint32 keys, a nested jit."""
  a, b, c = jax.random.split(key, 3)
  keys = jax.random.split(a, (2, 3))
  fold = jax.vmap(jax.vmap(jax.random.fold_in), in_axes=(0, None))  # broadcasts (3,) to (2, 3)
  folded = fold(keys, jnp.arange(3, dtype=jnp.uint32))
  legacy = jax.random.PRNGKey(7)
  inner = jax.jit(lambda k: jax.random.normal(k, (4,)) + jax.random.uniform(k, ()))
  return {
      "bits8": jax.random.bits(b, (5,), jnp.uint8),
      "bits16": jax.random.bits(b, (2, 3), jnp.uint16),
      "randint": jax.random.randint(c, (7,), 0, 100),
      "folded": jax.random.key_data(folded),
      "per_key": jax.vmap(jax.vmap(lambda k: jax.random.normal(k, (2,))))(folded),
      "legacy": jax.random.uniform(jax.random.fold_in(legacy, 3), (3,)),
      "inner": inner(c) * x.sum(),
      "perm": jax.random.permutation(a, 6),
  }


def _net_init(key, x):
  return _Net().init({"params": key, "dropout": jax.random.fold_in(key, 1)}, x)


def _threefry_calls(fn, *args) -> int:
  """threefry2x32 calls in ``fn``'s jaxpr (nested jaxprs included)."""
  def count(jaxpr):
    return sum((eqn.primitive.name == "threefry2x32")
               + sum(count(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
               for eqn in jaxpr.eqns)
  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def _expanded_calls(fn, *args) -> int:
  """threefry2x32 calls ``fn`` makes when lowered: its random primitives expanded (what
  `merge_threefry_calls` does without merging)."""
  closed = jax.make_jaxpr(fn)(*args)
  nodes = []
  threefry._flatten(closed.jaxpr, closed.consts,
                    [threefry._Value(a) for a in jax.tree.leaves(args)], nodes)
  return sum(n.eqn.primitive.name == "threefry2x32" for n in nodes)


@pytest.mark.parametrize("fn", [_draws, _net_init], ids=["draws", "flax_init"])
def test_merged_draws_are_the_same_bits(fn):
  key, x = jax.random.key(3), jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
  want = jax.jit(fn)(key, x)
  got = jax.jit(merge_threefry_calls(fn))(key, x)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, w), g in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    assert g.dtype == w.dtype and g.shape == w.shape, path
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=str(path))
  # Fewer calls: the separate calls are merged into one per wave of independent draws.
  separate = _expanded_calls(fn, key, x)
  merged = _threefry_calls(merge_threefry_calls(fn), key, x)
  assert separate >= 8 and merged < separate / 2, (separate, merged)


def test_a_limit_on_merged_outputs_keeps_large_draws_apart(monkeypatch):
  key, x = jax.random.key(0), jnp.ones((2, 4))
  want = jax.jit(_net_init)(key, x)
  unlimited = _threefry_calls(merge_threefry_calls(_net_init), key, x)
  monkeypatch.setattr(threefry, "MERGED_ELEMENTS", 4)
  got = jax.jit(merge_threefry_calls(_net_init))(key, x)
  jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)),
               got, want)
  assert _threefry_calls(merge_threefry_calls(_net_init), key, x) > unlimited


def test_the_unused_part_is_removed_and_other_keys_pass_through():
  """The forward pass a Flax init traces does not reach its outputs; rbg keys are not
  threefry keys and keep their own primitives."""
  def init_and_forward(key, x):
    variables = _net_init(key, x)
    _ = _Net().apply(variables, x, rngs={"dropout": key})  # unused
    return variables
  key, x = jax.random.key(1), jnp.ones((2, 4))
  merged = jax.make_jaxpr(merge_threefry_calls(init_and_forward))(key, x)
  assert not any(e.primitive.name == "dot_general" for e in merged.jaxpr.eqns)

  rbg = lambda k: jax.random.normal(jax.random.fold_in(k, 2), (3,))
  key = jax.random.key(5, impl="rbg")
  np.testing.assert_array_equal(jax.jit(merge_threefry_calls(rbg))(key), jax.jit(rbg)(key))


def test_a_function_with_effects_runs_as_it_is():
  seen = []
  def noisy(key):
    jax.debug.callback(lambda: seen.append(1))
    return jax.random.normal(key, (3,)) + jax.random.normal(jax.random.fold_in(key, 1), (3,))
  key = jax.random.key(2)
  np.testing.assert_array_equal(jax.jit(merge_threefry_calls(noisy))(key), jax.jit(noisy)(key))
  assert seen == [1, 1]

"""Exact, fast counting of True entries (XLA:CPU widens bool to int or float slowly)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def count_true(mask):
  """Number of True entries along the last axis, ``(..., V) bool -> (...) int32``; traceable.

  Four bools are read as one uint32 word and counted with ``population_count``: at 4 x 128^3 x 3
  this took 40 ms where ``jnp.sum(mask, dtype=int32)`` took 350 ms on a 2-core CPU.
  """
  pad = -mask.shape[-1] % 4
  if pad:
    mask = jnp.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, pad)])
  words = jax.lax.bitcast_convert_type(
      mask.astype(jnp.uint8).reshape(mask.shape[:-1] + (-1, 4)), jnp.uint32)
  return jnp.sum(jax.lax.population_count(words), axis=-1, dtype=jnp.int32)

"""The train state: parameters, optimizer state, RNG and the non-finite-step counters."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
  """Everything a resumed run needs, as one pytree (the data iterator is checkpointed beside it).

  Attributes:
    step: int32 scalar, number of completed optimizer steps (skipped steps included).
    params: float32 parameters (the ``params`` collection).
    model_state: other mutable Flax collections, e.g. ``{"batch_stats": ...}``.
    opt_state: optax state.
    rng: base PRNG key (uint32[2]); step ``t`` uses ``jax.random.fold_in(rng, t)``.
    nonfinite_streak: int32, consecutive steps skipped for a non-finite loss or gradient.
    nonfinite_total: int32, all skipped steps so far.
  """

  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_streak: jax.Array
  nonfinite_total: jax.Array
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, variables, tx, rng) -> "TrainState":
    """State at step 0 from Flax ``variables`` (``params`` + other collections)."""
    variables = dict(variables)
    params = variables.pop("params")
    return cls(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
               opt_state=tx.init(params), rng=rng, nonfinite_streak=jnp.zeros((), jnp.int32),
               nonfinite_total=jnp.zeros((), jnp.int32), tx=tx)

  @property
  def variables(self) -> dict:
    """Flax variables ``{"params": ..., **model_state}`` for ``model.apply``."""
    return {"params": self.params, **self.model_state}

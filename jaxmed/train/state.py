"""The train state: parameters, optimizer states, method state, RNG and the non-finite counters."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxmed.train.optim import GroupedOptimizer


class TrainState(struct.PyTreeNode):
  """Everything a resumed run needs, as one pytree (the data iterator is checkpointed beside it).

  Attributes:
    step: int32 scalar, number of completed optimizer steps (skipped steps included).
    params: float32 parameters (the ``params`` collection), every network of the method.
    model_state: other mutable Flax collections, e.g. ``{"batch_stats": ...}``.
    opt_state: ``{parameter group: optax state}``; frozen groups have none.
    method_state: non-parameter state the method owns (a queue of embeddings, counters).
    rng: base PRNG key (uint32[2]); step ``t`` uses ``jax.random.fold_in(rng, t)``.
    nonfinite_streak: int32, consecutive steps skipped for a non-finite loss or gradient.
    nonfinite_total: int32, all skipped steps so far.
    optimizer: the parameter groups' optimizers (static).
  """

  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  method_state: Any
  rng: jax.Array
  nonfinite_streak: jax.Array
  nonfinite_total: jax.Array
  optimizer: GroupedOptimizer = struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, variables, optimizer: GroupedOptimizer, rng,
             method_state=None) -> "TrainState":
    """State at step 0 from Flax ``variables`` (``params`` + other collections)."""
    variables = dict(variables)
    params = variables.pop("params")
    return cls(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
               opt_state=optimizer.init(params), method_state=method_state or {}, rng=rng,
               nonfinite_streak=jnp.zeros((), jnp.int32),
               nonfinite_total=jnp.zeros((), jnp.int32), optimizer=optimizer)

  @property
  def variables(self) -> dict:
    """Flax variables ``{"params": ..., **model_state}`` for ``model.apply``."""
    return {"params": self.params, **self.model_state}

  def apply_gradients(self, grads, *, groups=None) -> "TrainState":
    """The state after one optimizer update of ``groups`` (default all trainable groups)."""
    params, opt_state = self.optimizer.update(grads, self.opt_state, self.params, self.step,
                                              groups=groups)
    return self.replace(params=params, opt_state=opt_state)

"""The interface a training method implements; the trainer knows nothing else about it.

A method owns its model and its objective. Given a batch of data (a dict of arrays with at least
``image``; ``label`` when the data has labels), it builds the model's inputs (a pretext task's
corruption, or the image itself), applies the model and returns a scalar loss with metrics:

    method = RestorationMethod(config)
    variables = method.init(key, batch)                      # Flax variables
    loss, metrics, model_state = method.loss(variables, batch, key, train=True)

Everything in `loss` runs inside the trainer's jitted, sharded step: pure, static shapes.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str):
  """``config.model.dtype`` string -> jnp dtype."""
  if name not in _DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}; got {name!r}")
  return _DTYPES[name]


class Method(abc.ABC):
  """Base class: a model plus a loss on (pretext-transformed) batches.

  Subclasses set ``name`` and implement `build_model`, `model_inputs` and `loss`.
  """

  name: str = ""

  def __init__(self, config):
    self.config = config
    self.model = self.build_model()

  @abc.abstractmethod
  def build_model(self) -> nn.Module:
    """The Flax module trained by this method."""

  @abc.abstractmethod
  def model_inputs(self, batch) -> jax.Array:
    """An example model input for ``batch`` (shapes only matter); used by `init`."""

  @abc.abstractmethod
  def loss(self, variables, batch, key, *, train: bool) -> tuple[jax.Array, dict, dict]:
    """``(scalar float32 loss, metrics dict of scalars, updated non-param collections)``."""

  def example_transform(self, arrays) -> Callable[[dict, np.random.Generator], dict] | None:
    """An optional host-side transform of every training example, given all training ``arrays``
    (`jaxmed.data.pipeline.train_iterator`); None (the default) leaves examples as they are."""
    del arrays
    return None

  def init(self, key, batch) -> dict[str, Any]:
    """Flax variables for the model, shaped by ``batch``."""
    params_key, dropout_key = jax.random.split(key)
    return self.model.init({"params": params_key, "dropout": dropout_key},
                           self.model_inputs(batch), train=False)

  def apply(self, variables, x, key, *, train: bool, **kwargs):
    """``model.apply`` that returns ``(output, updated non-param collections)``."""
    model_state = {k: v for k, v in variables.items() if k != "params"}
    rngs = {"dropout": key} if key is not None else {}
    if train and model_state:
      out, updates = self.model.apply(variables, x, train=True, rngs=rngs,
                                      mutable=list(model_state), **kwargs)
      return out, {**model_state, **updates}
    return self.model.apply(variables, x, train=train, rngs=rngs, **kwargs), model_state

"""The interface a training method implements; the trainer knows nothing else about it.

A method owns its networks, its views of the data and its objective. Given a batch (a dict of
arrays with at least ``image``; ``label`` when the data has labels) it builds the networks'
inputs (augmented views, a pretext task's corruption, or the image itself), applies them and
returns a scalar loss with metrics:

    method = RestorationMethod(config)
    variables = method.init(key, batch)                      # Flax variables
    loss, metrics, model_state = method.loss(variables, batch, key, train=True, step=step)

One training step is `Method.update`: by default augment (`augment`), then one gradient of
`loss` over every parameter and one update of every parameter group (`config.param_groups`,
`jaxmed.train.optim`). A method with several networks updated in turn (pix2pix: the
discriminator, then the generator against the updated discriminator), or with state of its own
(`init_method_state`: a queue of embeddings), overrides `update`; `after_update` runs after
every update (e.g. re-normalising prototypes). Everything here runs inside the trainer's
jitted, sharded step: pure, static shapes.

A method also declares its config sections (`default_config`: ``model``, ``pretext``, loss
weights, parameter groups ...), merged over the base config by `jaxmed.config.method_config`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmed.data.transforms import Augment
from jaxmed.models.registry import build_model

def make_augment(cfg) -> Augment | None:
  """`Augment` from ``config.data.augment`` (None when absent or ``enabled=False``)."""
  if not cfg or not cfg.get("enabled", True):
    return None
  return Augment.from_config({k: v for k, v in cfg.items() if k != "enabled"})


class Method(abc.ABC):
  """Base class: networks plus a loss on (pretext-transformed) batches.

  Subclasses set ``name`` and implement `loss` (and usually `model_inputs`, `build_model`).
  """

  name: str = ""
  # Model arguments `model_arguments` sets (left out of the ``model`` section by
  # `jaxmed.config.set_model`).
  derived_model_fields: tuple[str, ...] = ()

  def __init__(self, config):
    self.config = config
    self.model = self.build_model()
    self._augment = make_augment(config.data.get("augment"))

  # --- Config -----------------------------------------------------------------------------

  @classmethod
  def default_config(cls) -> dict[str, Any]:
    """The config sections this method owns, ``{section: {field: default}}`` (e.g. ``model``,
    ``pretext``, ``param_groups``); `jaxmed.config.method_config` merges them over the base
    config and locks the result. Sections of the base config (``optim``, ``data``) may be
    given too: their fields override the base defaults."""
    return {}

  # --- Networks ---------------------------------------------------------------------------

  def build_model(self) -> nn.Module:
    """The Flax module trained by this method: by default ``config.model`` through the model
    registry (``model.name`` picks the architecture), with `model_arguments` added."""
    return build_model(**{**self.config.model, **self.model_arguments()})

  def model_arguments(self) -> dict[str, Any]:
    """Model arguments the method derives (output channels from the data, ...)."""
    return {}

  def model_inputs(self, batch) -> jax.Array:
    """An example model input for ``batch`` (shapes only matter); used by `init`."""
    return batch["image"]

  def init(self, key, batch) -> dict[str, Any]:
    """Flax variables for the model, shaped by ``batch``."""
    params_key, dropout_key = jax.random.split(key)
    return self.model.init({"params": params_key, "dropout": dropout_key},
                           self.model_inputs(batch), train=False)

  def init_method_state(self, batch) -> Any:
    """Non-parameter state the method owns (checkpointed with the train state); {} by
    default. ``batch`` gives the shapes."""
    del batch
    return {}

  def apply(self, variables, x, key, *, train: bool, **kwargs):
    """``model.apply`` that returns ``(output, updated non-param collections)``."""
    model_state = {k: v for k, v in variables.items() if k != "params"}
    rngs = {"dropout": key} if key is not None else {}
    if train and model_state:
      out, updates = self.model.apply(variables, x, train=True, rngs=rngs,
                                      mutable=list(model_state), **kwargs)
      return out, {**model_state, **updates}
    return self.model.apply(variables, x, train=train, rngs=rngs, **kwargs), model_state

  # --- Data -------------------------------------------------------------------------------

  def example_transform(self, source) -> Callable[[dict, np.random.Generator], dict] | None:
    """An optional host-side transform of every training example, given the training rows
    (``source``: `jaxmed.data.sources`, random access with per-row ``columns``; read other rows
    from it on demand); None (the default) leaves examples as they are."""
    del source
    return None

  def augment(self, key, batch) -> dict:
    """On-device augmentation of a training batch (``config.data.augment``; spatial transforms
    applied to ``image`` and ``label`` alike). Methods that need several views of an example
    (`jaxmed.pretext.views`) build them here or in `loss`."""
    if self._augment is None:
      return batch
    image, label = self._augment.batch(key, batch["image"], batch.get("label"))
    return {**batch, "image": image, **({"label": label} if label is not None else {})}

  # --- Objective and update ---------------------------------------------------------------

  @abc.abstractmethod
  def loss(self, variables, batch, key, *, train: bool,
           step: jax.Array | int = 0) -> tuple[jax.Array, dict, dict]:
    """``(scalar float32 loss, metrics dict of scalars, updated non-param collections)``;
    ``step`` is the number of completed steps (for a loss weight that changes with it)."""

  def update(self, state, batch, key):
    """One training step: ``(new state, metrics)``; metrics hold ``loss`` and ``grad_norm``
    (the trainer skips the step when either is not finite).

    ``state`` is a `jaxmed.train.state.TrainState`; ``state.apply_gradients(grads,
    groups=...)`` updates parameter groups. The default: augment, gradient of `loss` over
    every parameter (accumulated over ``optim.accum_steps`` micro-batches), one update.
    """
    aug_key, loss_key = jax.random.split(key)
    batch = self.augment(aug_key, batch)

    def loss_and_grad(model_state, micro_batch, micro_key):
      def loss_fn(params):
        loss, metrics, new_state = self.loss({"params": params, **model_state}, micro_batch,
                                             micro_key, train=True, step=state.step)
        return loss.astype(jnp.float32), (metrics, new_state)
      return jax.value_and_grad(loss_fn, has_aux=True)(state.params)

    accum = int(self.config.optim.get("accum_steps", 1))
    (loss, (metrics, model_state)), grads = accumulate_gradients(
        loss_and_grad, state.model_state, batch, loss_key, accum)
    state = state.replace(model_state=model_state).apply_gradients(grads)
    return state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}

  def after_update(self, state):
    """Runs after every applied update (e.g. SwAV re-normalises its prototypes); identity by
    default. Returns the state."""
    return state

  # --- Evaluation hooks (optional) ------------------------------------------------------

  def pretext_example(self, key, batch) -> tuple[jax.Array, jax.Array]:
    """``(network input, target)`` of the method's pretext task for ``batch``."""
    raise TypeError(f"method {self.name!r} has no pretext task (pretext_example)")

  def reconstruct(self, variables, batch, key) -> tuple[jax.Array, jax.Array]:
    """``(network input, prediction)`` for ``batch`` in eval mode: the input of
    `pretext_example` with the same key, and the network's output."""
    inputs, _ = self.pretext_example(key, batch)
    pred, _ = self.apply(variables, inputs, None, train=False)
    return inputs, pred


def accumulate_gradients(loss_and_grad, model_state, batch, key, accum_steps: int):
  """``((loss, (metrics, model_state)), grads)`` of ``loss_and_grad(model_state, batch, key)``,
  averaged over ``accum_steps`` equal micro-batches of ``batch`` (scanned, so memory is that of
  one micro-batch); model state is threaded through the micro-batches."""
  if accum_steps == 1:
    return loss_and_grad(model_state, batch, key)
  micro = jax.tree.map(
      lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)
  first = jax.tree.map(lambda x: x[0], micro)
  (_, (metrics_shape, _)), grads_shape = jax.eval_shape(
      lambda: loss_and_grad(model_state, first, key))
  zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)

  def body(carry, inputs):
    grads_sum, loss_sum, metrics_sum, state = carry
    i, mb = inputs
    (loss, (metrics, state)), grads = loss_and_grad(state, mb, jax.random.fold_in(key, i))
    return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss,
            jax.tree.map(jnp.add, metrics_sum, metrics), state), None

  (grads, loss, metrics, model_state), _ = jax.lax.scan(
      body, (zeros(grads_shape), jnp.zeros((), jnp.float32), zeros(metrics_shape), model_state),
      (jnp.arange(accum_steps), micro))
  mean = lambda tree: jax.tree.map(lambda x: x / accum_steps, tree)
  return (loss / accum_steps, (mean(metrics), model_state)), mean(grads)

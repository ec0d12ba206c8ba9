"""Toy methods that exercise the trainer's general paths (several networks and optimizers,
frozen networks, method state and hooks) at a size that trains in milliseconds.

Run as a script to train one into a workdir (the SIGKILL/resume tests start it in a
subprocess):  python tests/toys.py gan WORKDIR TOTAL_STEPS
"""

from __future__ import annotations

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jaxmed import methods  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxmed.methods.base import Method  # noqa: E402  pylint: disable=g-import-not-at-top


def toy_arrays(n: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
  """``n`` random 8 x 8 two-channel 'images'."""
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, 8, 8, 2)).astype(np.float32)}


def _bce(logits, target: float):
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)))


class _GANModel(nn.Module):
  """A generator and a discriminator (1x1 convolutions) in one module tree."""

  def setup(self):
    self.generator = nn.Dense(2)
    self.discriminator = nn.Dense(1)

  def __call__(self, x, train: bool = False):
    return self.discriminate(self.generate(x))

  def generate(self, x, train: bool = False):
    return self.generator(x)

  def discriminate(self, y, train: bool = False):
    return self.discriminator(y)


class ToyGAN(Method):
  """pix2pix's order in one step: the discriminator on the detached fake, then the generator
  (adversarial + L1 to a fixed target map) against the updated discriminator."""

  name = "toy_gan"

  @classmethod
  def default_config(cls):
    return {"param_groups": {
        "generator": dict(pattern="generator/.*", frozen=False, freeze_steps=0,
                          optim=dict(name="adam", lr=2e-3, b1=0.5)),
        "discriminator": dict(pattern="discriminator/.*", frozen=False, freeze_steps=0,
                              optim=dict(name="sgd", lr=1e-2, momentum=0.9))},
        "optim": dict(schedule="constant", weight_decay=0.0, grad_clip=0.0)}

  def build_model(self):
    return _GANModel()

  def target(self, x):
    return 0.5 * x[..., ::-1] + 0.1

  def generate(self, params, x):
    return self.model.apply({"params": params}, x, method=_GANModel.generate)

  def discriminate(self, params, y):
    return self.model.apply({"params": params}, y, method=_GANModel.discriminate)

  def d_loss(self, params, x, fake):
    return 0.5 * (_bce(self.discriminate(params, self.target(x)), 1.0)
                  + _bce(self.discriminate(params, fake), 0.0))

  def g_loss(self, params, x):
    fake = self.generate(params, x)
    return _bce(self.discriminate(params, fake), 1.0) + jnp.mean(jnp.abs(fake - self.target(x)))

  def loss(self, variables, batch, key, *, train, step=0):
    x = batch["image"]
    fake = self.generate(variables["params"], x)
    loss = self.g_loss(variables["params"], x) + self.d_loss(variables["params"], x, fake)
    return loss, {}, {}

  def update(self, state, batch, key):
    x = batch["image"]
    fake = jax.lax.stop_gradient(self.generate(state.params, x))
    loss_d, grads_d = jax.value_and_grad(self.d_loss)(state.params, x, fake)
    state = state.apply_gradients(grads_d, groups=("discriminator",))
    loss_g, grads_g = jax.value_and_grad(self.g_loss)(state.params, x)
    state = state.apply_gradients(grads_g, groups=("generator",))
    return state, {"loss": loss_d + loss_g, "loss_d": loss_d, "loss_g": loss_g,
                   "grad_norm": optax.tree.norm((grads_d, grads_g))}


class _PerceptualModel(nn.Module):
  def setup(self):
    self.net = nn.Dense(2)
    self.perceptual = nn.Dense(3)

  def __call__(self, x, train: bool = False):
    return self.perceptual(self.net(x))


class ToyPerceptual(Method):
  """A network trained under a loss through a frozen second network (a loss network)."""

  name = "toy_perceptual"

  @classmethod
  def default_config(cls):
    return {"param_groups": {"perceptual": dict(pattern="perceptual/.*", frozen=True)},
            "optim": dict(name="adam", lr=1e-2, schedule="constant", weight_decay=0.0)}

  def build_model(self):
    return _PerceptualModel()

  def loss(self, variables, batch, key, *, train, step=0):
    x = batch["image"]
    out = self.model.apply(variables, x, method=lambda m, x: m.net(x))
    feats = lambda y: self.model.apply(variables, y, method=lambda m, y: m.perceptual(y))
    loss = jnp.mean(jnp.square(out - x)) + jnp.mean(jnp.square(feats(out) - feats(x)))
    return loss, {}, {}


class _QueueModel(nn.Module):
  def setup(self):
    self.encoder = nn.Dense(4)
    self.prototypes = nn.Dense(3, use_bias=False)

  def __call__(self, x, train: bool = False):
    z = jnp.mean(self.encoder(x), axis=(1, 2))
    return z, self.prototypes(z)


class ToyQueue(Method):
  """State of its own (a queue of past embeddings and a counter), a hook after each update
  (prototype columns re-normalised, as SwAV), prototypes frozen for the first steps, and a
  loss weight that decays with the step."""

  name = "toy_queue"
  queue_length = 8

  @classmethod
  def default_config(cls):
    return {"param_groups": {"prototypes": dict(pattern="prototypes/.*", freeze_steps=3)},
            "optim": dict(name="sgd", lr=1e-2, momentum=0.9, schedule="constant",
                          weight_decay=0.0)}

  def build_model(self):
    return _QueueModel()

  def init_method_state(self, batch):
    return {"queue": jnp.zeros((self.queue_length, 4), jnp.float32),
            "seen": jnp.zeros((), jnp.int32)}

  def loss(self, variables, batch, key, *, train, step=0, queue=None):
    z, scores = self.model.apply(variables, batch["image"])
    weight = 1.0 / (1.0 + jnp.asarray(step, jnp.float32))  # decays with the step
    pull = jnp.mean(jnp.square(z[:, None] - queue[None])) if queue is not None else 0.0
    loss = jnp.mean(jnp.square(jax.nn.log_softmax(scores))) + weight * pull
    return loss, {"weight": weight}, {}

  def update(self, state, batch, key):
    queue = state.method_state["queue"]

    def loss_fn(params):
      loss, metrics, _ = self.loss({"params": params}, batch, key, train=True,
                                   step=state.step, queue=queue)
      return loss, metrics
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    z, _ = self.model.apply({"params": state.params}, batch["image"])
    new_queue = jnp.concatenate([jax.lax.stop_gradient(z), queue])[:self.queue_length]
    state = state.apply_gradients(grads).replace(method_state={
        "queue": new_queue, "seen": state.method_state["seen"] + z.shape[0]})
    return state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}

  def after_update(self, state):
    kernel = state.params["prototypes"]["kernel"]
    kernel = kernel / jnp.linalg.norm(kernel, axis=0, keepdims=True)
    return state.replace(params={**state.params, "prototypes": {"kernel": kernel}})


TOYS = {m.name: m for m in (ToyGAN, ToyPerceptual, ToyQueue)}


def register():
  """Adds the toy methods to the method registry (idempotent)."""
  methods.METHODS.update(TOYS)


def toy_config(name: str, **overrides):
  """The toy method's config: tiny data shapes, checkpoints every 4 steps, no TensorBoard."""
  from jaxmed.config import apply_overrides, method_config  # pylint: disable=g-import-not-at-top
  register()
  return apply_overrides(method_config(name), {
      "batch_size": 8, "total_steps": 12, "log_every": 1, "checkpoint.every": 4,
      "tensorboard": False, **overrides})


def main(argv):
  from jaxmed.train import trainer  # pylint: disable=g-import-not-at-top
  name, workdir, total_steps = argv[1], argv[2], int(argv[3])
  config = toy_config(name, total_steps=total_steps, **{"checkpoint.every": 20})
  trainer.train(config, workdir, train_data=toy_arrays(), progress=False)


if __name__ == "__main__":
  main(sys.argv)

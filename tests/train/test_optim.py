import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxmed.train import optim


def _cfg(**kw):
  base = dict(name="sgd", lr=0.01, schedule="poly", poly_power=0.9, warmup_steps=0, momentum=0.99,
              nesterov=True, weight_decay=3e-5, grad_clip=0.0)
  return ml_collections.ConfigDict({**base, **kw})


def test_poly_schedule_is_nnunet_formula():
  sched = optim.make_schedule(_cfg(), 1000)
  for step in (0, 1, 500, 999, 1000):
    np.testing.assert_allclose(sched(step), 0.01 * (1 - step / 1000) ** 0.9, rtol=1e-6, atol=1e-9)


def test_warmup_then_cosine():
  sched = optim.make_schedule(_cfg(schedule="cosine", warmup_steps=10, end_lr=1e-4), 110)
  np.testing.assert_allclose(sched(5), 0.005, rtol=1e-6)
  np.testing.assert_allclose(sched(10), 0.01, rtol=1e-6)
  np.testing.assert_allclose(sched(60), 1e-4 + (0.01 - 1e-4) * 0.5, rtol=1e-5)
  np.testing.assert_allclose(sched(110), 1e-4, rtol=1e-5)


def test_sgd_matches_hand_written_update():
  tx, _ = optim.make_optimizer(_cfg(schedule="constant", nesterov=False, momentum=0.9), 10)
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.array([0.5, 0.25])}
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  g = np.array([0.5, 0.25]) + 3e-5 * np.array([1.0, -2.0])
  np.testing.assert_allclose(updates["w"], -0.01 * g, rtol=1e-6)


def test_adamw_decays_kernels_not_biases():
  tx, _ = optim.make_optimizer(_cfg(name="adamw", schedule="constant", weight_decay=0.5), 10)
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  zeros = {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros((2,))}
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.01 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(updates["bias"], 0.0)


def test_grad_clip():
  tx, _ = optim.make_optimizer(_cfg(schedule="constant", momentum=0.0, weight_decay=0.0,
                                    grad_clip=1.0), 10)
  params = {"w": jnp.zeros(2)}
  updates, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), 0.01, rtol=1e-6)


def test_bad_config():
  with pytest.raises(ValueError, match="optim.name"):
    optim.make_optimizer(_cfg(name="lamb"), 10)
  with pytest.raises(ValueError, match="optim.schedule"):
    optim.make_schedule(_cfg(schedule="step"), 10)
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.make_schedule(_cfg(warmup_steps=10), 10)

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


def _larc_sgd_steps(params, grads_per_step, *, lr, wd, momentum=0.9, trust=1e-3, eps=1e-8):
  """apex ``LARC(SGD(lr, momentum, weight_decay=wd), trust_coefficient, clip=False)`` (SwAV's
  optimizer), transcribed with torch tensors and ``torch.optim.SGD``."""
  import torch  # pylint: disable=g-import-not-at-top
  ps = {k: torch.tensor(np.asarray(v), dtype=torch.float64, requires_grad=True)
        for k, v in params.items()}
  opt = torch.optim.SGD(list(ps.values()), lr=lr, momentum=momentum, weight_decay=0.0)
  for grads in grads_per_step:
    with torch.no_grad():
      for k, p in ps.items():
        p.grad = torch.tensor(np.asarray(grads[k]), dtype=torch.float64)
        param_norm, grad_norm = torch.norm(p.data), torch.norm(p.grad.data)
        if param_norm != 0 and grad_norm != 0:
          adaptive_lr = trust * param_norm / (grad_norm + param_norm * wd + eps)
          p.grad.data += wd * p.data
          p.grad.data *= adaptive_lr
    opt.step()
  return {k: p.detach().numpy() for k, p in ps.items()}


@pytest.mark.parametrize("wd, rtol", [(0.0, 1e-5), (1e-6, 1e-4)])
def test_lars_matches_swav_larc_under_a_constant_lr(wd, rtol):
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
            "bias": np.zeros(3, np.float32)}  # zero norm: a plain SGD step first
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(4)]
  tx, _ = optim.make_optimizer(_cfg(name="lars", lr=0.6, schedule="constant", momentum=0.9,
                                    nesterov=False, weight_decay=wd), 10)
  state, p = tx.init(params), {k: jnp.asarray(v) for k, v in params.items()}
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  ref = _larc_sgd_steps(params, grads, lr=0.6, wd=wd)
  for k in params:
    np.testing.assert_allclose(p[k], ref[k], rtol=rtol, atol=1e-7, err_msg=k)
  # The first step of the zero bias was plain SGD (lr x gradient), later ones trust-scaled.
  assert np.abs(p["bias"]).max() > 0.1
  assert np.abs(p["kernel"] - params["kernel"]).max() < 0.05


def test_lars_in_a_parameter_group():
  config = ml_collections.ConfigDict({
      "optim": dict(_cfg(name="sgd", schedule="constant")),
      "param_groups": {"head": dict(pattern="head/.*", optim=dict(
          name="lars", lr=0.5, nesterov=False, weight_decay=0.0))}})
  grouped = optim.make_grouped_optimizer(config, 10)
  params = {"head": {"w": jnp.ones((2, 2))}, "body": {"w": jnp.ones(2)}}
  state = grouped.init(params)
  grads = {"head": {"w": jnp.full((2, 2), 0.5)}, "body": {"w": jnp.zeros(2)}}
  new, _ = grouped.update(grads, state, params, 0)
  # Trust ratio 0.001 * ||w|| / ||g + wd w|| scales the step: lr * 0.001 * ||w|| in norm.
  step = np.asarray(params["head"]["w"] - new["head"]["w"])
  np.testing.assert_allclose(np.linalg.norm(step), 0.5 * 1e-3 * 2.0, rtol=1e-4)


def test_a_group_frozen_for_k_steps_follows_the_global_schedule_after():
  """The frozen group's state (its update count too) does not move while frozen; its schedule
  is offset so that the first unfrozen step uses the global step's learning rate (SwAV's
  prototypes), not the warm-up's 0."""
  config = ml_collections.ConfigDict({
      "optim": dict(_cfg(name="sgd", momentum=0.0, nesterov=False, weight_decay=0.0,
                         grad_clip=0.0, schedule="cosine", warmup_steps=4, lr=1.0)),
      "param_groups": {"protos": dict(pattern="protos/.*", freeze_steps=3)}})
  grouped = optim.make_grouped_optimizer(config, 20)
  params = {"protos": {"w": jnp.zeros(1)}, "body": {"w": jnp.zeros(1)}}
  state = grouped.init(params)
  grads = {"protos": {"w": jnp.ones(1)}, "body": {"w": jnp.ones(1)}}
  schedule = optim.make_schedule(config.optim, 20)
  for step in range(6):
    new, state = grouped.update(grads, state, params, step)
    body = float(params["body"]["w"][0] - new["body"]["w"][0])
    protos = float(params["protos"]["w"][0] - new["protos"]["w"][0])
    np.testing.assert_allclose(body, schedule(step), rtol=1e-6)
    np.testing.assert_allclose(protos, 0.0 if step < 3 else schedule(step), rtol=1e-6)
    params = new

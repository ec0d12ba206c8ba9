"""The trainer's general paths: several networks with their own optimizers in a method-owned
order, frozen networks, parameter groups frozen for the first steps, method state, hooks after
each update, and exact resume of all of it."""

import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import toys
from helpers import REPO, final_record, run_steps, wait_for

from jaxmed.train import optim, sharding, trainer
from jaxmed.train.logging import read_metrics


def _setup(config, batch):
  mesh = sharding.make_mesh({"num_devices": 1})
  method = toys.TOYS[config.method](config)
  state, step, _ = trainer.setup(config, method, batch, mesh)
  return method, state, step, mesh


def test_gan_updates_discriminator_then_generator_against_it():
  config = toys.toy_config("toy_gan")
  batch = {k: v[:8] for k, v in toys.toy_arrays().items()}
  method, state, step, mesh = _setup(config, batch)
  assert set(state.opt_state) == {"generator", "discriminator"}  # default group owns nothing
  p0 = jax.device_get(state.params)
  new, metrics = step(state, sharding.global_batch(batch, mesh))
  new = jax.device_get(new.params)

  # By hand: D takes one SGD(momentum) step on the detached fake; G one Adam step on the
  # gradient taken through the *updated* D.
  x = jnp.asarray(batch["image"])
  fake = method.generate(p0, x)
  d_grads = jax.jit(jax.grad(method.d_loss))(p0, x, fake)
  d_tx = optax.sgd(1e-2, momentum=0.9, nesterov=True)  # the base optim is nesterov
  d_up, _ = d_tx.update(d_grads["discriminator"], d_tx.init(p0["discriminator"]))
  d_new = optax.apply_updates(p0["discriminator"], d_up)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               new["discriminator"], d_new)
  g_grads = jax.jit(jax.grad(method.g_loss))({**p0, "discriminator": d_new}, x)
  g_tx = optax.adam(2e-3, b1=0.5)
  g_up, _ = g_tx.update(g_grads["generator"], g_tx.init(p0["generator"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               new["generator"], optax.apply_updates(p0["generator"], g_up))
  # Against the *old* discriminator the generator's step would differ.
  stale = jax.jit(jax.grad(method.g_loss))(p0, x)["generator"]
  assert not np.allclose(stale["kernel"], g_grads["generator"]["kernel"])
  assert {"loss_d", "loss_g", "lr/generator", "lr/discriminator"} <= set(metrics)
  np.testing.assert_allclose(metrics["lr/generator"], 2e-3)


def test_frozen_network_has_no_optimizer_state_and_never_changes(tmp_path):
  config = toys.toy_config("toy_perceptual")
  result = trainer.train(config, str(tmp_path), train_data=toys.toy_arrays(), progress=False)
  state = jax.device_get(result.state)
  leaves = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in path)
                         for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
  assert set(state.opt_state) == {"default"}
  assert not any("perceptual" in p for p in leaves(state.opt_state))
  method = toys.ToyPerceptual(config)
  fresh = jax.device_get(method.init(jax.random.split(jax.random.PRNGKey(0))[0],
                                     {"image": toys.toy_arrays()["image"][:8]}))
  jax.tree.map(np.testing.assert_array_equal, state.params["perceptual"],
               fresh["params"]["perceptual"])  # bit-identical after 12 steps
  assert not np.allclose(state.params["net"]["kernel"], fresh["params"]["net"]["kernel"])


def test_queue_hook_freeze_and_step_in_the_loss():
  config = toys.toy_config("toy_queue")
  batch = {k: v[:8] for k, v in toys.toy_arrays().items()}
  _, state, step, mesh = _setup(config, batch)
  protos = [np.asarray(state.params["prototypes"]["kernel"])]
  weights = []
  for _ in range(5):
    state, metrics = step(state, sharding.global_batch(batch, mesh))
    protos.append(np.asarray(jax.device_get(state.params["prototypes"]["kernel"])))
    weights.append(float(metrics["weight"]))
  # Frozen for 3 steps: only the hook's re-normalisation touches them (once, then a no-op).
  for k in (2, 3):
    np.testing.assert_allclose(protos[k], protos[1], rtol=1e-6)
  assert not np.allclose(protos[4], protos[3])
  np.testing.assert_allclose(np.linalg.norm(protos[5], axis=0), 1.0, rtol=1e-5)
  np.testing.assert_allclose(weights, [1 / (1 + s) for s in range(5)], rtol=1e-6)
  assert int(state.method_state["seen"]) == 40
  assert np.abs(np.asarray(state.method_state["queue"])).sum() > 0


def test_queue_method_resumes_exactly(tmp_path):
  config = toys.toy_config("toy_queue", eval_every=4)
  arrays = toys.toy_arrays()
  straight = trainer.train(config, str(tmp_path / "a"), train_data=arrays, progress=False,
                           hooks=[lambda step, state: {}])
  first = trainer.train(config, str(tmp_path / "b"), train_data=arrays, progress=False,
                        hooks=[lambda step, state: {}], stop=lambda step, m: step == 8)
  assert first.stopped_early and int(first.state.step) == 8
  resumed = trainer.train(config, str(tmp_path / "b"), train_data=arrays, progress=False,
                          hooks=[lambda step, state: {}])
  a, b = jax.device_get(straight.state), jax.device_get(resumed.state)
  for field in ("params", "opt_state", "method_state"):
    jax.tree.map(np.testing.assert_array_equal, getattr(a, field), getattr(b, field))
  assert final_record(tmp_path / "a") == final_record(tmp_path / "b")


def test_param_group_config_errors():
  config = toys.toy_config("toy_gan")
  config.param_groups.generator.pattern = "generatr/.*"
  with pytest.raises(ValueError, match=r"param_groups \['generator'\] match no parameter"):
    _setup(config, {k: v[:8] for k, v in toys.toy_arrays().items()})
  config = toys.toy_config("toy_gan")
  config.param_groups.generator.optim.lr = 0.1
  with pytest.raises(ValueError, match="unknown parameter groups"):
    optim.make_grouped_optimizer(config, 10).update({}, {}, {}, 0, groups=("gen",))


def _gan_cmd(workdir, total_steps=160):
  return [sys.executable, "tests/toys.py", "toy_gan", str(workdir), str(total_steps)]


def test_two_network_method_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  subprocess.run(_gan_cmd(straight), cwd=REPO, check=True, capture_output=True)
  proc = subprocess.Popen(_gan_cmd(killed), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  wait_for(lambda: any(s >= 40 for s in run_steps(killed)), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert read_metrics(str(killed))[-1]["step"] < 160, "the run finished before it was killed"
  subprocess.run(_gan_cmd(killed), cwd=REPO, check=True, capture_output=True)
  steps = [r["step"] for r in read_metrics(str(killed))]
  assert steps == sorted(set(steps)) and steps[-1] == 160
  assert final_record(killed) == final_record(straight)
  np.testing.assert_array_equal(  # every logged step after the resume, not only the last
      [r["loss_d"] for r in read_metrics(str(killed))][-100:],
      [r["loss_d"] for r in read_metrics(str(straight))][-100:])

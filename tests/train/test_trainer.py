"""Trainer: sharding invariance, accumulation, non-finite guard, checkpoint/resume, SIGTERM."""

import json
import os
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed import methods as methods_lib
from jaxmed.methods import RestorationMethod, get_method
from jaxmed.train import checkpoint, optim, sharding, trainer
from jaxmed.train.logging import read_metrics
from jaxmed.train.state import TrainState

from helpers import (REPO, final_record, nifti_phantoms, run_steps,
                     tiny_config as make_tiny_config, tiny_flags, wait_for)


def _one_step(config, arrays, mesh, accum=1):
  config.optim.accum_steps = accum
  batch = {k: v[:8] for k, v in arrays.items()}
  state, step, _ = trainer.setup(config, get_method(config), batch, mesh)
  new_state, metrics = step(state, sharding.global_batch(batch, mesh))
  return jax.device_get(new_state.params), jax.device_get(metrics)


@pytest.mark.parametrize("method", ["restoration", "segmentation"])
def test_same_loss_on_1_and_4_devices(tiny_arrays, method):
  assert jax.device_count() == 4
  # Batch norm: the one norm whose statistics cross the batch.
  tiny_config = make_tiny_config(method, model__norm="batch")
  p1, m1 = _one_step(tiny_config, tiny_arrays, sharding.make_mesh({"num_devices": 1}))
  p4, m4 = _one_step(tiny_config, tiny_arrays, sharding.make_mesh({"data": 4}))
  p22, m22 = _one_step(tiny_config, tiny_arrays, sharding.make_mesh({"data": 2, "fsdp": 2}))
  for m in (m4, m22):
    np.testing.assert_allclose(m["loss"], m1["loss"], rtol=1e-5)
  for p in (p4, p22):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p, p1)


def test_fsdp_shards_large_parameters():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2})
  tree = {"big": jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.float32),
          "small": jax.ShapeDtypeStruct((7,), jnp.float32)}
  specs = sharding.state_shardings(tree, mesh)
  assert specs["big"].spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
  assert specs["small"].spec == jax.sharding.PartitionSpec()


def test_initial_state_is_the_same_computed_once_or_partitioned(tiny_arrays):
  # Replicated states are computed on one device and copied; FSDP-sharded ones partitioned.
  config = make_tiny_config("restoration", model__features=(16, 32))  # 3x3x32x32 kernels
  batch = {k: v[:8] for k, v in tiny_arrays.items()}
  method = get_method(config)
  states = []
  for axes in ({"data": 4}, {"data": 2, "fsdp": 2}):
    state, _, state_sh = trainer.setup(config, method, batch, sharding.make_mesh(axes))
    jax.tree.map(lambda a, sh: assert_sharding(a, sh), state, state_sh)
    states.append(jax.device_get(state))
  assert any(not s.is_fully_replicated for s in jax.tree.leaves(state_sh))
  for a, b in zip(*map(jax.tree.leaves, states), strict=True):
    np.testing.assert_array_equal(a, b)


def assert_sharding(array, sharding_):
  assert array.sharding.is_equivalent_to(sharding_, array.ndim), (array.sharding, sharding_)


def test_mesh_errors():
  with pytest.raises(ValueError, match="must equal the number of devices"):
    sharding.make_mesh({"data": 3, "fsdp": 1})
  with pytest.raises(ValueError, match="num_devices=8"):
    sharding.make_mesh({"num_devices": 8})


class _Autoencoder(RestorationMethod):
  """A per-example, deterministic loss (identity regression), so that accumulating gradients
  over micro-batches is exactly the full-batch gradient."""

  name = "autoencoder"

  def loss(self, variables, batch, key, *, train, step=0):
    pred, model_state = self.apply(variables, batch["image"], key, train=train)
    return jnp.mean(jnp.square(pred - batch["image"])), {}, model_state


def test_gradient_accumulation_matches_full_batch(tiny_config, tiny_arrays, monkeypatch):
  monkeypatch.setitem(methods_lib.METHODS, "autoencoder", _Autoencoder)
  tiny_config.method = "autoencoder"
  mesh = sharding.make_mesh({"num_devices": 1})
  p1, m1 = _one_step(tiny_config, tiny_arrays, mesh, accum=1)
  p2, m2 = _one_step(tiny_config, tiny_arrays, mesh, accum=2)
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p2, p1)


def test_train_writes_metrics_and_checkpoints(tiny_config, tiny_arrays, tmp_path, caplog):
  with caplog.at_level("INFO", logger="absl"):
    result = trainer.train(tiny_config, str(tmp_path), train_data=tiny_arrays, progress=False)
  # Read by experiments/benchmarks/compile_time.py: logged once, after the first step.
  done = [r.getMessage() for r in caplog.records if "first step done" in r.getMessage()]
  assert len(done) == 1 and re.fullmatch(
      r"first step done [\d.]+ s after train\(\) began \(data, init, compile\)", done[0]), done
  records = read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [5, 10, 12]
  assert all(np.isfinite(r["loss"]) and "lr" in r for r in records)
  assert int(result.state.step) == 12
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  assert ckpt.all_steps() == [4, 8, 12]
  ckpt.close()
  variables = checkpoint.load_variables(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, variables["params"],
               jax.device_get(result.state.params))


def test_nan_batches_are_skipped_and_never_checkpointed(tiny_config, tiny_arrays, tmp_path):
  arrays = dict(tiny_arrays)
  arrays["image"] = arrays["image"].copy()
  arrays["image"][[3, 11]] = np.nan  # some batches hold a NaN example
  result = trainer.train(tiny_config, str(tmp_path), train_data=arrays, progress=False)
  last = read_metrics(str(tmp_path))[-1]
  assert 0 < last["nonfinite_total"] < 12
  for step in checkpoint.Checkpointer(str(tmp_path / "checkpoints")).all_steps():
    variables = checkpoint.load_variables(str(tmp_path), step=step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(result.state.params)))


def test_run_aborts_after_consecutive_nonfinite_steps(tiny_config, tiny_arrays, tmp_path):
  arrays = {**tiny_arrays, "image": np.full_like(tiny_arrays["image"], np.nan)}
  tiny_config.max_nonfinite = 3
  with pytest.raises(trainer.NonFiniteLossError, match="consecutive steps"):
    trainer.train(tiny_config, str(tmp_path), train_data=arrays, progress=False)


def _sgd_state(w):
  """A train state of one parameter ``w`` under SGD."""
  import optax
  return TrainState.create(variables={"params": {"w": w}},
                           optimizer=optim.GroupedOptimizer((optim.ParamGroup(
                               "default", ".*", optax.sgd(0.1), optax.constant_schedule(0.1)),)),
                           rng=jax.random.PRNGKey(0))


def test_checkpointer_refuses_nonfinite_state(tmp_path):
  state = _sgd_state(jnp.array([1.0, jnp.nan]))
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  with pytest.raises(checkpoint.NonFiniteCheckpointError, match="step 3"):
    ckpt.save(3, state)
  ckpt.close()
  assert not [p for p in os.listdir(tmp_path) if p.isdigit()]


def test_single_process_saves_replicated_arrays_whole(tmp_path):
  """One process writes every replica slice anyway: orbax's jax.Array handler then writes each
  array whole (no jitted slice per shape and local device), with its array metadata; a
  replicated array on 4 devices saves and restores."""
  import orbax.checkpoint as ocp
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  assert handler._use_replica_parallel is False and handler._array_metadata_store is not None
  mesh = sharding.make_mesh({"num_devices": 4})
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = jax.device_put(_sgd_state(jnp.arange(12.0).reshape(4, 3)), replicated)
  ckpt.save(1, state, force=True)
  ckpt.wait()
  restored = ckpt.restore(jax.tree.map(jnp.zeros_like, state))
  np.testing.assert_array_equal(restored.params["w"], np.arange(12.0).reshape(4, 3))
  assert restored.params["w"].sharding.is_equivalent_to(replicated, 2)
  ckpt.close()


@pytest.mark.parametrize("processes", [1, 2])  # host check; on-device reduction (several)
def test_finiteness_check_sees_every_state_part(processes, monkeypatch):
  import optax
  monkeypatch.setattr(jax, "process_count", lambda: processes)
  make = lambda model, method: TrainState.create(
      variables={"params": {"w": jnp.ones(3, jnp.bfloat16), "step": jnp.array(2)},
                 "batch_stats": model},
      optimizer=optim.GroupedOptimizer((optim.ParamGroup(
          "default", ".*", optax.adam(0.1), optax.constant_schedule(0.1)),)),
      rng=jax.random.PRNGKey(0), method_state=method)
  assert checkpoint._all_finite(make({"v": jnp.zeros(2)}, {"q": jnp.zeros((2, 2))}))
  assert not checkpoint._all_finite(make({"v": jnp.array([0.0, jnp.inf])}, {}))
  assert not checkpoint._all_finite(make({}, {"q": jnp.array([[0.0], [jnp.nan]])}))


def _train_cmd(workdir, *flags):
  return [sys.executable, "-m", "jaxmed.cli", "train", "--config", "restoration",
          "--workdir", str(workdir), "--noprogress", *tiny_flags(), "--config.tensorboard=False",
          *flags]


def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
  """On file-backed data (a NIfTI folder, preprocessed into a cache by the first run)."""
  flags = ["--config.total_steps=160", "--config.checkpoint.every=20",
           "--config.data.augment.enabled=True", *nifti_phantoms(tmp_path / "nifti")]
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  subprocess.run(_train_cmd(straight, *flags), cwd=REPO, check=True, capture_output=True)

  proc = subprocess.Popen(_train_cmd(killed, *flags), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  wait_for(lambda: any(s >= 40 for s in run_steps(killed)), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = read_metrics(str(killed))[-1]["step"]
  assert killed_at < 160, "the run finished before it could be killed"
  subprocess.run(_train_cmd(killed, *flags), cwd=REPO, check=True, capture_output=True)

  steps = [r["step"] for r in read_metrics(str(killed))]
  assert steps == sorted(set(steps)) and steps[-1] == 160  # no duplicated records after resume
  assert final_record(killed) == final_record(straight)


def test_sigterm_leaves_a_restorable_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(_train_cmd(workdir, "--config.total_steps=100000",
                                     "--config.checkpoint.every=0"),
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  wait_for(lambda: os.path.exists(workdir / "metrics.jsonl")
            and any(r["step"] >= 10 for r in read_metrics(str(workdir))), proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  steps = run_steps(workdir)
  assert len(steps) == 1 and 10 <= steps[0] < 100000
  variables = checkpoint.load_variables(str(workdir))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))
  # A restart resumes from there.
  subprocess.run(_train_cmd(workdir, f"--config.total_steps={steps[0] + 5}"), cwd=REPO,
                 check=True, capture_output=True)
  records = read_metrics(str(workdir))
  assert records[-1]["step"] == steps[0] + 5
  with open(workdir / "metrics.jsonl") as f:
    assert all(json.loads(line)["step"] <= steps[0] + 5 for line in f)


def test_bfloat16_compute_keeps_float32_params(tiny_config, tiny_arrays):
  tiny_config.model.dtype = "bfloat16"
  params, metrics = _one_step(tiny_config, tiny_arrays, sharding.make_mesh({"num_devices": 1}))
  assert np.isfinite(metrics["loss"]) and metrics["loss"].dtype == np.float32
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))


def test_tensorboard_events_are_written(tiny_config, tiny_arrays, tmp_path):
  import tensorboardX  # noqa: F401  (a test dependency; optional for users)  pylint: disable=g-import-not-at-top,unused-import
  tiny_config.tensorboard = True
  tiny_config.total_steps = 5
  trainer.train(tiny_config, str(tmp_path), train_data=tiny_arrays, progress=False)
  events = os.listdir(tmp_path / "tensorboard")
  assert any(name.startswith("events.out.tfevents") for name in events)


def test_resume_falls_back_past_a_truncated_latest_checkpoint(tiny_config, tiny_arrays, tmp_path):
  tiny_config.checkpoint.async_save = False
  trainer.train(tiny_config, str(tmp_path), train_data=tiny_arrays, progress=False)
  metadata = tmp_path / "checkpoints" / "12" / "state" / "_METADATA"
  metadata.write_bytes(metadata.read_bytes()[:20])  # e.g. a disk that filled up
  tiny_config.total_steps = 16
  result = trainer.train(tiny_config, str(tmp_path), train_data=tiny_arrays, progress=False)
  assert int(result.state.step) == 16
  steps = [r["step"] for r in read_metrics(str(tmp_path))]
  assert steps == [5, 10, 15, 16]  # resumed from step 8: the records after it were rewritten
  assert any(p.startswith("12.corrupt") for p in os.listdir(tmp_path / "checkpoints"))

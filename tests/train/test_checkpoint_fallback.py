"""Resuming past unreadable checkpoints: Checkpointer.restore and load_variables fall back to the
newest checkpoint that restores, name what they skipped, and move broken step folders aside."""

import dataclasses
import gc
import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from xla_test_flags import xla_flags

from jaxmed.data import pipeline
from jaxmed.train import checkpoint
from jaxmed.train.state import TrainState

STEPS = (1, 2, 3)

# A failed orbax restore closes its event loop while tensorstore reads it started may still
# finish; their callbacks then report "Event loop is closed" as an unraisable exception (harmless,
# orbax's own teardown race). Only that message is silenced.
pytestmark = [
    pytest.mark.filterwarnings(r"ignore:(?s)Exception ignored in.*Event loop is closed"
                               r":pytest.PytestUnraisableExceptionWarning"),
    # The same abandoned reads, finalized by the collector in a later test of this module
    # (their cancellation re-raised as orbax's "Encountered error while reading array index").
    pytest.mark.filterwarnings(r"ignore:(?s)Exception ignored in.*coroutine object "
                               r"_read_array_index_and_device_put"
                               r":pytest.PytestUnraisableExceptionWarning"),
    # And collected at the module's end (`_collect_abandoned_reads`).
    pytest.mark.filterwarnings(r"ignore:coroutine '_read_array_index_and_device_put' was never"
                               r" awaited:RuntimeWarning")]


@pytest.fixture(scope="module", autouse=True)
def _collect_abandoned_reads():
  """Collects the failed restores' abandoned reads before this module's last test ends (under
  its filter), not in whichever test the worker runs next: one full collection per module."""
  yield
  gc.collect()


def _state(value: float) -> TrainState:
  """A tiny train state whose every float leaf depends on ``value`` (static fields None)."""
  params = {"dense": {"kernel": jnp.full((3, 4), value, jnp.float32),
                      "bias": jnp.arange(4, dtype=jnp.float32) + value}}
  values = dict(step=jnp.int32(value), params=params,
                model_state={"batch_stats": {"dense": {"mean": jnp.full((4,), -value)}}},
                opt_state={"mu": jax.tree.map(lambda x: 2 * x, params)},
                rng=jax.random.PRNGKey(int(value)), nonfinite_streak=jnp.int32(0),
                nonfinite_total=jnp.int32(int(value)))
  kwargs = {}
  for field in dataclasses.fields(TrainState):  # whatever other fields the state grows
    if field.name in values:
      kwargs[field.name] = values[field.name]
    else:
      kwargs[field.name] = {} if field.metadata.get("pytree_node", True) else None
  return TrainState(**kwargs)


def _iterator():
  return pipeline.train_iterator({"x": np.arange(24, dtype=np.float32)}, global_batch_size=2,
                                 seed=3)


def _assert_state(restored, value):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(checkpoint._savable(restored)),
               jax.device_get(checkpoint._savable(_state(value))))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  """A run folder ``<root>/checkpoints/{1,2,3}`` (state + data iterator, sync saves), and per
  step the iterator state saved and the batch that follows it."""
  root = tmp_path_factory.mktemp("pristine")
  it = _iterator()
  ckpt = checkpoint.Checkpointer(str(root / "checkpoints"), async_save=False)
  saved = {}
  for step in STEPS:
    next(it)
    ckpt.save(step, _state(float(step)), it)
    position = it.get_state()
    saved[step] = (position, next(_restored_iterator(position))["x"])
  ckpt.close()
  return root, saved


def _restored_iterator(state):
  it = _iterator()
  it.set_state(state)
  return it


@pytest.fixture
def run(pristine, tmp_path):
  root, saved = pristine
  shutil.copytree(root, tmp_path / "run")
  return tmp_path / "run", saved


def _break(step_dir, how):
  """Damages checkpoint folder ``step_dir`` the way a full disk or a cut copy does."""
  step_dir = str(step_dir)
  if how == "state folder missing":
    shutil.rmtree(os.path.join(step_dir, "state"))
    return
  pattern, action = {
      "metadata json truncated": ("state/_METADATA", "half"),
      "metadata json emptied": ("state/_METADATA", "empty"),
      "array data emptied": ("state/d/*", "empty"),
      "ocdbt manifest emptied": ("state/manifest.ocdbt", "empty"),
      "array metadata truncated": ("state/array_metadatas/*", "half"),
      "iterator json truncated": ("data/*.json", "half"),
  }[how]
  files = glob.glob(os.path.join(step_dir, pattern))
  assert files, f"nothing matches {pattern} in {step_dir}: {os.listdir(step_dir)}"
  for f in files:
    with open(f, "rb") as fh:
      data = fh.read()
    with open(f, "wb") as fh:
      fh.write(data[:len(data) // 2] if action == "half" else b"")


BREAKS = ["metadata json truncated", "array data emptied", "ocdbt manifest emptied",
          "array metadata truncated", "iterator json truncated", "state folder missing"]
# What the skipped record's reason names for each damage.
NAMED = {"metadata json truncated": "state/_METADATA (not valid JSON)",
         "metadata json emptied": "state/_METADATA (empty)",
         "array data emptied": "(empty)", "ocdbt manifest emptied": "manifest.ocdbt",
         "array metadata truncated": "state/array_metadatas/process_0 (not valid JSON)",
         "iterator json truncated": "data/process_0-of-1.json (not valid JSON)",
         "state folder missing": 'Item "state" was not found'}


@pytest.mark.parametrize("how", BREAKS)
def test_restore_falls_back_to_previous_checkpoint(run, how, caplog):
  root, saved = run
  directory = root / "checkpoints"
  _break(directory / "3", how)
  it = _iterator()
  ckpt = checkpoint.Checkpointer(str(directory), async_save=False)
  assert ckpt.latest_step == 3  # the broken step is listed ...
  with caplog.at_level(logging.WARNING):
    restored = ckpt.restore(_state(0.0), it)
  _assert_state(restored, 2.0)  # ... and skipped
  assert it.get_state() == saved[2][0]
  np.testing.assert_array_equal(next(it)["x"], saved[2][1])
  [skipped] = ckpt.skipped
  assert skipped.step == 3 and skipped.path == str(directory / "3")
  assert NAMED[how] in skipped.reason, skipped.reason
  assert skipped.moved_to == str(directory / "3.corrupt-1")
  warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  assert f"cannot restore checkpoint {directory / '3'} (" in warnings
  assert f"moved to {directory / '3.corrupt-1'}" in warnings
  # Moved aside: the folder is kept for inspection, orbax no longer lists it, and the next
  # restart restores step 2 without skipping anything.
  assert sorted(os.listdir(directory)) == ["1", "2", "3.corrupt-1"]
  assert ckpt.latest_step == 2 and ckpt.all_steps() == [1, 2]
  again = checkpoint.Checkpointer(str(directory), async_save=False)
  _assert_state(again.restore(_state(0.0)), 2.0)
  assert again.skipped == []
  ckpt.close()
  again.close()


def test_save_after_fallback_then_restore_gets_it(run):
  root, _ = run
  directory = root / "checkpoints"
  _break(directory / "3", "metadata json truncated")
  ckpt = checkpoint.Checkpointer(str(directory), async_save=False)
  it = _iterator()
  _assert_state(ckpt.restore(_state(0.0), it), 2.0)
  assert ckpt.save(3, _state(30.0), it)  # the step number of the broken checkpoint
  ckpt.save(4, _state(40.0), it)
  ckpt.close()
  assert ckpt.all_steps() == [2, 3, 4]  # keep=3
  later = checkpoint.Checkpointer(str(directory), async_save=False)
  _assert_state(later.restore(_state(0.0)), 40.0)
  _assert_state(later.restore(_state(0.0), step=3), 30.0)
  assert later.skipped == []
  assert "3.corrupt-1" in os.listdir(directory)
  later.close()


def test_two_broken_newest_fall_back_two_steps(run):
  root, saved = run
  directory = root / "checkpoints"
  _break(directory / "3", "array data emptied")
  _break(directory / "2", "iterator json truncated")
  os.makedirs(directory / "3.corrupt-1")  # an earlier casualty keeps its name
  it = _iterator()
  ckpt = checkpoint.Checkpointer(str(directory), async_save=False)
  _assert_state(ckpt.restore(_state(0.0), it), 1.0)
  assert it.get_state() == saved[1][0]
  assert [(s.step, os.path.basename(s.moved_to)) for s in ckpt.skipped] == [
      (3, "3.corrupt-2"), (2, "2.corrupt-1")]
  assert ckpt.latest_step == 1
  ckpt.close()


def test_all_broken_raises_naming_every_checkpoint_and_leaves_them(run):
  root, _ = run
  directory = root / "checkpoints"
  for step in STEPS:  # the data items stay readable: a half-succeeded restore is possible
    _break(directory / str(step), "metadata json truncated")
  it = _iterator()
  for _ in range(5):  # a position no checkpoint holds
    next(it)
  before = it.get_state()
  ckpt = checkpoint.Checkpointer(str(directory), async_save=False)
  with pytest.raises(checkpoint.CheckpointRestoreError) as info:
    ckpt.restore(_state(0.0), it)
  message = str(info.value)
  assert f"none of the 3 checkpoints in {directory} can be restored" in message
  for step in STEPS:
    assert f"step {step} ({directory / str(step)}): JSONDecodeError" in message
  assert [f.step for f in info.value.failures] == [3, 2, 1]
  assert info.value.directory == str(directory)
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]  # nothing moved: no silent restart
  assert it.get_state() == before  # not left at a broken checkpoint's position
  ckpt.close()


def test_explicit_step_errors_name_the_checkpoint(run):
  root, saved = run
  directory = root / "checkpoints"
  _break(directory / "3", "metadata json truncated")
  ckpt = checkpoint.Checkpointer(str(directory), async_save=False)
  it = _iterator()
  with pytest.raises(checkpoint.CheckpointRestoreError,
                     match=f"cannot restore checkpoint {directory / '3'}: JSONDecodeError"
                     ) as info:
    ckpt.restore(_state(0.0), it, step=3)
  assert isinstance(info.value.__cause__, json.JSONDecodeError)
  assert it.get_state() == _iterator().get_state()
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]
  _assert_state(ckpt.restore(_state(0.0), it, step=1), 1.0)
  assert it.get_state() == saved[1][0]
  with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 7 .*steps: \[1, 2, 3\]"):
    ckpt.restore(_state(0.0), step=7)
  ckpt.close()
  empty = checkpoint.Checkpointer(str(root / "empty"), async_save=False)
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    empty.restore(_state(0.0))
  empty.close()


def test_damaged_checkpoint_metadata_alone_still_restores(run):
  """Orbax does not need ``<step>/_CHECKPOINT_METADATA`` to restore: no fallback for it."""
  root, _ = run
  directory = root / "checkpoints"
  with open(directory / "3" / "_CHECKPOINT_METADATA", "w") as f:
    f.write('{"item_handlers": {"sta')
  ckpt = checkpoint.Checkpointer(str(directory), async_save=False)
  _assert_state(ckpt.restore(_state(0.0)), 3.0)
  assert ckpt.skipped == []
  ckpt.close()


def test_load_variables_falls_back_and_leaves_folders(run, caplog):
  root, _ = run
  directory = root / "checkpoints"
  _break(directory / "3", "ocdbt manifest emptied")
  with caplog.at_level(logging.WARNING):
    variables = checkpoint.load_variables(str(root))
  expected = jax.device_get(_state(2.0))
  jax.tree.map(np.testing.assert_array_equal, variables,
               {"params": expected.params, **expected.model_state})
  assert f"cannot restore checkpoint {directory / '3'}" in caplog.text
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]  # a reader moves nothing
  # The iterator json is not read by load_variables: a broken one is no reason to skip.
  _break(directory / "2", "iterator json truncated")
  jax.tree.map(np.testing.assert_array_equal,
               checkpoint.load_variables(str(directory), step=2)["params"], expected.params)
  with pytest.raises(checkpoint.CheckpointRestoreError,
                     match=f"cannot restore checkpoint {directory / '3'}: ValueError"):
    checkpoint.load_variables(str(root), step=3)
  for step in (1, 2):
    _break(directory / str(step), "array data emptied")
  with pytest.raises(checkpoint.CheckpointRestoreError,
                     match=f"none of the 3 checkpoints in {directory} can be restored"):
    checkpoint.load_variables(str(root))


def test_checkpoint_that_cannot_be_moved_is_skipped_again(run, monkeypatch, caplog):
  root, _ = run
  directory = root / "checkpoints"
  _break(directory / "3", "metadata json emptied")

  def refuse(src, dst):
    raise PermissionError(13, "Permission denied", src)

  monkeypatch.setattr(os, "rename", refuse)
  ckpt = checkpoint.Checkpointer(str(directory), async_save=False)
  with caplog.at_level(logging.WARNING):
    _assert_state(ckpt.restore(_state(0.0)), 2.0)
  assert [(s.step, s.moved_to) for s in ckpt.skipped] == [(3, None)]
  assert f"could not move the unreadable checkpoint {directory / '3'} aside" in caplog.text
  assert "left in place" in caplog.text
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]
  ckpt.close()
  monkeypatch.undo()
  again = checkpoint.Checkpointer(str(directory), async_save=False)  # the next restart
  _assert_state(again.restore(_state(0.0)), 2.0)
  assert [s.moved_to for s in again.skipped] == [str(directory / "3.corrupt-1")]
  again.close()


_WORKER = """
import json, os, sys
port, pid, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
import jax
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=pid)
import dataclasses
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxmed.data import pipeline
from jaxmed.train import checkpoint
from jaxmed.train.state import TrainState

mesh = jax.make_mesh((2,), ("data",), devices=jax.devices())

def replicated(x):
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda i: x[i])

def state(v):
  values = dict(step=np.int32(v), params={"w": np.full((3, 4), v, np.float32)}, model_state={},
                opt_state={"mu": {"w": np.full((3, 4), 2 * v, np.float32)}},
                rng=np.array([0, int(v)], np.uint32), nonfinite_streak=np.int32(0),
                nonfinite_total=np.int32(0))
  values = jax.tree.map(replicated, values)
  return TrainState(**{f.name: values.get(f.name, {} if f.metadata.get("pytree_node", True)
                                          else None) for f in dataclasses.fields(TrainState)})

def iterator():  # each process reads its own shard: two different iterator files per step
  return pipeline.train_iterator({"x": np.arange(40, dtype=np.float32)}, global_batch_size=4,
                                 seed=0)

it = iterator()
ckpt = checkpoint.Checkpointer(directory, async_save=False)
saved = {}
for step in (1, 2, 3):
  next(it)
  ckpt.save(step, state(float(step)), it)
  saved[step] = it.get_state()
ckpt.close()
if pid == 1:  # only this process's iterator file of the newest checkpoint is damaged
  with open(os.path.join(directory, "3", "data", "process_1-of-2.json"), "w") as f:
    f.write('{"next_in')
multihost_utils.sync_global_devices("damaged")
it = iterator()
ckpt = checkpoint.Checkpointer(directory, async_save=False)
restored = ckpt.restore(state(0.0), it)
print("RESULT " + json.dumps({
    "step": int(np.asarray(restored.step.addressable_data(0))),
    "w": float(np.asarray(restored.params["w"].addressable_data(0))[0, 0]),
    "iterator_at_step_2": it.get_state() == saved[2],
    "skipped": [[s.step, s.reason, s.moved_to] for s in ckpt.skipped],
    "latest": ckpt.latest_step}), flush=True)
ckpt.close()
"""


def test_two_processes_agree_when_one_cannot_read_its_iterator_file(tmp_path):
  """Process 1 alone fails on the newest checkpoint (its iterator file); both processes must
  still restore the same older step, and it is moved aside once."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  (tmp_path / "worker.py").write_text(_WORKER)
  directory = tmp_path / "checkpoints"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
  procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(port), str(i),
                             str(directory)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=180)[0].decode() for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  results = []
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
    [line] = [l for l in out.splitlines() if l.startswith("RESULT ")]
    results.append(json.loads(line[len("RESULT "):]))
  moved = str(directory / "3.corrupt-1")
  for result in results:
    assert result["step"] == 2 and result["w"] == 2.0 and result["iterator_at_step_2"]
    assert result["latest"] == 2
    assert [(s[0], s[2]) for s in result["skipped"]] == [(3, moved)]
  assert results[0]["skipped"][0][1] == "restored here but failed on another process"
  assert results[1]["skipped"][0][1].startswith("JSONDecodeError: ")
  assert "data/process_1-of-2.json (not valid JSON)" in results[1]["skipped"][0][1]
  assert sorted(os.listdir(directory)) == ["1", "2", "3.corrupt-1"]

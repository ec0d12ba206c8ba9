"""Orbax checkpointing of the train state and the data iterator, and save-on-SIGTERM.

Layout: ``<workdir>/checkpoints/<step>/{state,data}``. ``state`` is the `TrainState` pytree
(restored with the shardings of the running job); ``data`` is the grain iterator state, one
file per process, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import gc
import json
import logging as pylogging
import os
import signal
import sys
import threading
import traceback
import warnings
from typing import Callable, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


class NonFiniteCheckpointError(RuntimeError):
  """Raised instead of writing a checkpoint that holds a NaN or Inf."""


class SkippedCheckpoint(NamedTuple):
  """A checkpoint that could not be restored.

  Attributes:
    step: its step.
    path: its folder.
    reason: the error, ``"<ExceptionType>: <message>"`` shortened.
    moved_to: where it was moved aside (``<step>.corrupt-<n>``), or None if it was not.
  """

  step: int
  path: str
  reason: str
  moved_to: str | None = None


class CheckpointRestoreError(RuntimeError):
  """No checkpoint of a folder could be restored, or the requested one could not.

  Attributes:
    directory: the checkpoint folder.
    failures: a `SkippedCheckpoint` per step tried, newest first.
  """

  def __init__(self, message: str, *, directory: str, failures=()):
    super().__init__(message)
    self.directory = directory
    self.failures = tuple(failures)


@functools.cache
def _write_replicated_arrays_whole() -> None:
  """In a single-process job, orbax writes each replicated array whole, not in replica slices.

  orbax's default (off only when ``JAX_PLATFORMS`` names a GPU) splits a replicated array into
  one slice per replica so that several hosts share its writing. With one process, that process
  writes every slice anyway, and each slice of each array on each local device is a small jitted
  ``slice`` (compiled once per shape and device, dispatched at every save). A tiny Swin-UNETR
  train state (303 arrays) on 4 CPU devices: first save 5.6 -> 1.8 s, later saves 1.1-1.3 ->
  0.6 s. Multi-process jobs keep orbax's default. This sets orbax's process-wide handler for
  ``jax.Array`` (the same handler otherwise: its array metadata store included), once per
  process.
  """
  if jax.process_count() > 1:
    return
  try:
    from orbax.checkpoint._src.metadata import array_metadata_store  # pylint: disable=g-import-not-at-top
    handler = ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                             use_replica_parallel=False)
  except (ImportError, AttributeError, TypeError):  # private API of orbax: keep its default
    return
  absl_logger = pylogging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(pylogging.ERROR)  # orbax warns that it overrides a handler
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    absl_logger.setLevel(level)


class Checkpointer:
  """Keeps the last ``keep`` checkpoints of a run; asynchronous saves; restores the latest."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    _write_replicated_arrays_whole()
    self.skipped: list[SkippedCheckpoint] = []  # filled by `restore`
    # Processes reach this point up to minutes apart (one builds a shared data cache, another
    # compiles under load), but the first collective (orbax's directory sync) opens the gloo
    # context, which XLA gives a fixed 30 s: line them up at a coordination-service barrier first.
    _sync("jaxmed_checkpointer_start")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    """Saves ``state`` (and the iterator state) at ``step``; refuses non-finite values."""
    if not _all_finite(state):
      raise NonFiniteCheckpointError(
          f"refusing to checkpoint step {step}: the train state holds a NaN or Inf")
    items = {"state": ocp.args.StandardSave(_savable(state))}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, state, data_iterator=None, *, step: int | None = None):
    """Restores into the structure and shardings of ``state`` (a concrete template state).

    With ``step=None`` the checkpoints are tried newest first and the newest one that restores
    is used: a checkpoint that cannot be read (a file truncated by a full disk or a cut copy) is
    skipped with a warning naming its folder and the error. The skipped checkpoints are then
    moved aside to ``<step>.corrupt-<n>`` (a name outside orbax's step naming, kept for
    inspection) so that the next restart does not have to skip them again and the run can save
    at those steps again. They are recorded in ``self.skipped``. With several processes, a step
    counts as restored only when it restored on every process (they agree after each try), so
    all of them resume from the same step; process 0 moves the folders.

    Args:
      state: a concrete template `TrainState` (its structure, dtypes and shardings are used).
      data_iterator: a grain iterator, restored in place from the same step (if given). When a
        restore fails its pre-restore position is put back first, so an iterator half-restored
        from a broken checkpoint never leaks into a fallback or an error.
      step: restore exactly this step (no fallback; nothing is moved).

    Returns:
      The restored state.

    Raises:
      FileNotFoundError: no checkpoint in the folder, or no checkpoint at ``step``.
      CheckpointRestoreError: ``step`` given and it cannot be restored (chained from the
        original error), or no checkpoint of the folder can be restored (nothing is moved).
    """
    self.skipped = []
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _savable(state))
    before = data_iterator.get_state() if data_iterator is not None else None

    def attempt(s: int):
      restored = self._manager.restore(
          s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
      if data_iterator is not None:
        # The item orbax's Composite would restore, read by its own (grain's) handler, in
        # place, but without orbax's end-of-restore barrier: each process reads its own file,
        # and one process failing on it must not leave the others waiting at that barrier.
        try:
          grain.checkpoint.CheckpointHandler().restore(
              epath.Path(self._step_path(s)) / "data", item=data_iterator)
        except BaseException:
          data_iterator.set_state(before)
          raise
      return restored

    steps = sorted(self._manager.all_steps(), reverse=True)
    if step is not None and step not in steps:
      raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory}; "
                              f"steps: {sorted(steps)}")
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    try:
      if step is not None:
        return _unsavable(state, _restore_exact(attempt, step, self._step_path(step)))
      good, restored, failures = _restore_newest(attempt, steps, self._step_path,
                                                 self.directory)
    except CheckpointRestoreError:
      if data_iterator is not None:  # a step that worked here but failed on another process
        data_iterator.set_state(before)
      raise
    if failures:
      failures = self._move_aside(failures)
      logging.warning("restored step %d from %s after skipping %d unreadable newer "
                      "checkpoint(s): %s", good, self._step_path(good), len(failures),
                      "; ".join(_describe_move(f) for f in failures))
    self.skipped = failures
    return _unsavable(state, restored)

  def _step_path(self, step: int) -> str:
    """The folder of checkpoint ``step``."""
    find = getattr(self._manager, "_get_read_step_directory", None)
    if find is not None:
      try:
        return os.fspath(find(step, self._manager.directory))
      except Exception:  # pylint: disable=broad-except  (private API of orbax; fall back)
        pass
    return os.path.join(self.directory, str(step))

  def _move_aside(self, failures: list[SkippedCheckpoint]) -> list[SkippedCheckpoint]:
    """Renames broken step folders to ``<step>.corrupt-<n>`` (process 0, on the shared
    folder); returns the records with ``moved_to`` set where that worked."""
    self._manager.wait_until_finished()
    targets = [_aside_name(f.path) for f in failures]
    _sync("jaxmed_checkpoint_move_aside_start")  # every process has chosen the same names
    if jax.process_index() == 0:
      for failure, target in zip(failures, targets):
        try:
          os.rename(failure.path, target)
        except OSError as e:
          logging.warning("could not move the unreadable checkpoint %s aside (%s); the next "
                          "restore will skip it again", failure.path, _reason(e))
    _sync("jaxmed_checkpoint_move_aside_done")
    self._manager.reload()
    return [f._replace(moved_to=t if os.path.isdir(t) and not os.path.exists(f.path) else None)
            for f, t in zip(failures, targets)]

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def _savable(state):
  """The train state minus its static parts, as a plain dict pytree."""
  return {"step": state.step, "params": state.params, "model_state": state.model_state,
          "opt_state": state.opt_state, "method_state": state.method_state, "rng": state.rng,
          "nonfinite_streak": state.nonfinite_streak, "nonfinite_total": state.nonfinite_total}


def _unsavable(template, tree):
  return template.replace(**tree)


@jax.jit
def _finite_tree(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _all_finite(state) -> bool:
  """Whether every float leaf of the state is finite. One process reads the values on the host
  (a device copy the save makes anyway): one compiled reduction per leaf took seconds to
  compile (6-10 s for 600 leaves on CPU), every time a run's state had a new structure.
  Several processes hold different shards, so they reduce on device and agree on the answer."""
  leaves = [x for x in jax.tree.leaves({"params": state.params, "opt_state": state.opt_state,
                                        "model_state": state.model_state,
                                        "method_state": state.method_state})
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return True
  if jax.process_count() == 1:
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in leaves)
  return bool(np.asarray(_finite_tree(leaves)))


class PreemptionFlag:
  """Turns SIGTERM into a flag the train loop polls, so it can save and exit cleanly.

  One process: a Python SIGTERM handler sets the flag. Several processes: every process must
  stop at the same step, so the flag is JAX's preemption sync point, fed by the notifier that
  ``jax.distributed.initialize`` installs for SIGTERM (no Python handler, which would replace it).
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handle(self, signum, frame):
    del frame
    logging.warning("received signal %d: saving a checkpoint and stopping", signum)
    self._event.set()

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()


def load_variables(workdir: str, *, step: int | None = None) -> dict:
  """Flax variables (``params`` + model state) of a training run, without its optimizer.

  With ``step=None`` the newest checkpoint that can be read is used: unreadable newer ones are
  skipped with a warning naming them (they are left in place: this reads another run's folder).

  Args:
    workdir: a run's workdir (holding ``checkpoints/``) or its ``checkpoints`` folder.
    step: checkpoint step, default the latest readable one.

  Returns:
    ``{"params": ..., **model_state}`` as numpy arrays.

  Raises:
    FileNotFoundError: no checkpoint, or none at ``step``.
    CheckpointRestoreError: ``step`` given and unreadable, or no checkpoint readable.
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    directory = workdir
  directory = os.path.abspath(directory)
  manager = ocp.CheckpointManager(directory, item_names=("state", "data"))

  def attempt(s: int):
    restored = manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.tree.map(np.asarray, restored["state"])

  def path_of(s: int) -> str:
    return os.path.join(directory, str(s))

  try:
    steps = sorted(manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f"no checkpoint at step {step} in {directory}; steps: "
                                f"{sorted(steps)}")
      state = _restore_exact(attempt, step, path_of(step))
    elif not steps:
      raise FileNotFoundError(f"no checkpoint found in {directory}")
    else:
      good, state, failures = _restore_newest(attempt, steps, path_of, directory)
      if failures:
        logging.warning("loaded step %d from %s after skipping %d unreadable newer "
                        "checkpoint(s) (left in place): %s", good, path_of(good), len(failures),
                        ", ".join(f.path for f in failures))
  finally:
    manager.close()
  return {"params": state["params"], **(state.get("model_state") or {})}


# --------------------------------------------------------------------------------------------
# Fallback over unreadable checkpoints.


def _reason(error: BaseException, limit: int = 300) -> str:
  """``"<Type>: <message>"`` on one line, at most ``limit`` characters."""
  message = " ".join(str(error).split())
  text = f"{type(error).__name__}: {message}" if message else type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


_JSON_NAMES = ("_METADATA", "_CHECKPOINT_METADATA", "_ROOT_METADATA", "_sharding")


def _suspect_files(path: str, limit: int = 5) -> list[str]:
  """Files of checkpoint folder ``path`` that look damaged: empty, or JSON that does not parse.

  Orbax's errors for a truncated metadata file (a bare JSONDecodeError) do not name the file;
  this names it. Relative paths, at most ``limit``.
  """
  found = []
  for root, _, files in os.walk(path):
    for name in sorted(files):
      full = os.path.join(root, name)
      rel = os.path.relpath(full, path)
      is_json = (name in _JSON_NAMES or name.endswith(".json")
                 or os.path.basename(root) == "array_metadatas")
      try:
        size = os.path.getsize(full)
        if size == 0:
          if name != "commit_success.txt":
            found.append(f"{rel} (empty)")
          continue
        if is_json and size < (16 << 20):
          with open(full, "rb") as f:
            json.loads(f.read())
      except (OSError, ValueError):
        found.append(f"{rel} (not valid JSON)" if is_json else f"{rel} (unreadable)")
      if len(found) >= limit:
        return found
  return found


def _failure_reason(error: BaseException, path: str) -> str:
  """`_reason` of ``error`` plus the damaged-looking files of checkpoint folder ``path``."""
  suspects = _suspect_files(path) if os.path.isdir(path) else ["(folder missing)"]
  reason = _reason(error)
  return f"{reason} [damaged: {', '.join(suspects)}]" if suspects else reason


def _release(error: BaseException) -> None:
  """Frees what a failed orbax restore left behind, now, while orbax's event loop is open.

  The finished frames of ``error``'s traceback keep (in cycles) the coroutines and futures of
  the aborted reads; collected later, each prints "Exception ignored in: <coroutine ...>" with
  the TensorStore spec, or "Event loop is closed". Their local variables are dropped (the
  traceback's lines are kept) and the young generations collected, the reads' reports going to
  the debug log. Not a full collection: in a large process (the test suite's) that took about
  2 s per failed restore; the reads are young (a full collection in between would leave some
  of them for later, and their messages with them).
  """
  seen, todo = set(), [error]
  while todo:  # the error and the errors it was raised from / during
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    traceback.clear_frames(e.__traceback__)
    todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
  previous = sys.unraisablehook
  # Reads the failed restore abandoned report their cancellation as they are collected.
  sys.unraisablehook = lambda u: logging.debug("after a failed restore: %r", u.exc_value)
  try:
    with warnings.catch_warnings():  # "coroutine ... was never awaited"
      warnings.simplefilter("ignore", RuntimeWarning)
      gc.collect(1)
  finally:
    sys.unraisablehook = previous


def _all_processes_ok(ok: bool) -> bool:
  """Whether ``ok`` holds on every process (so all processes restore the same step)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _sync(name: str, timeout_s: int = 1800) -> None:
  """Waits until every process reaches ``name``: a barrier of the coordination service
  (``jax.distributed``), whose timeout we choose, not a gloo collective (fixed 30 s on CPU)."""
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(name, timeout=timeout_s,
                                        processes=set(range(jax.process_count())))


def _restore_exact(attempt: Callable[[int], object], step: int, path: str):
  """``attempt(step)``, its failure (on any process) raised as a `CheckpointRestoreError`
  naming ``path``, chained from the original error."""
  try:
    result = attempt(step)
  except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
    _all_processes_ok(False)
    failure = SkippedCheckpoint(step, path, _failure_reason(e, path))
    _release(e)
    raise CheckpointRestoreError(f"cannot restore checkpoint {path}: {failure.reason}",
                                 directory=os.path.dirname(path), failures=[failure]) from e
  if not _all_processes_ok(True):
    failure = SkippedCheckpoint(step, path, "restored here but failed on another process")
    raise CheckpointRestoreError(f"cannot restore checkpoint {path}: {failure.reason}",
                                 directory=os.path.dirname(path), failures=[failure])
  return result


def _restore_newest(attempt: Callable[[int], object], steps: list[int],
                    path_of: Callable[[int], str], directory: str):
  """Tries ``attempt(step)`` over ``steps`` (newest first) until one works on every process.

  Returns:
    ``(step, result, failures)`` with a `SkippedCheckpoint` per step skipped.

  Raises:
    CheckpointRestoreError: every step failed; lists each one's reason.
  """
  failures = []
  for step in steps:
    path = path_of(step)
    try:
      result, error = attempt(step), None
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
      result, error = None, e
    if _all_processes_ok(error is None):
      return step, result, failures
    reason = (_failure_reason(error, path) if error is not None
              else "restored here but failed on another process")
    if error is not None:
      _release(error)
    result = error = None
    failures.append(SkippedCheckpoint(step, path, reason))
    logging.warning("cannot restore checkpoint %s (%s); trying an older one", path, reason)
  details = "\n  ".join(f"step {f.step} ({f.path}): {f.reason}" for f in failures)
  raise CheckpointRestoreError(
      f"none of the {len(failures)} checkpoints in {directory} can be restored:\n  {details}",
      directory=directory, failures=failures)


def _aside_name(path: str) -> str:
  """``<path>.corrupt-<n>`` with the first ``n >= 1`` not taken."""
  n = 1
  while os.path.exists(f"{path}.corrupt-{n}"):
    n += 1
  return f"{path}.corrupt-{n}"


def _describe_move(failure: SkippedCheckpoint) -> str:
  where = (f"moved to {failure.moved_to}" if failure.moved_to else "left in place")
  return f"{failure.path} ({failure.reason}; {where})"

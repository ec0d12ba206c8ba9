"""Orbax checkpointing of the train state and the data iterator, and save-on-SIGTERM.

Layout: ``<workdir>/checkpoints/<step>/{state,data}``. ``state`` is the `TrainState` pytree
(restored with the shardings of the running job); ``data`` is the grain iterator state, one
file per process, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import os
import signal
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class NonFiniteCheckpointError(RuntimeError):
  """Raised instead of writing a checkpoint that holds a NaN or Inf."""


class Checkpointer:
  """Keeps the last ``keep`` checkpoints of a run; asynchronous saves; restores the latest."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
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

    Returns the restored state; ``data_iterator`` (if given) is restored in place.
    """
    step = self.latest_step if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _savable(state))
    items = {"state": ocp.args.StandardRestore(abstract)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return _unsavable(state, restored["state"])

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def _savable(state):
  """The train state minus its static parts, as a plain dict pytree."""
  return {"step": state.step, "params": state.params, "model_state": state.model_state,
          "opt_state": state.opt_state, "rng": state.rng,
          "nonfinite_streak": state.nonfinite_streak, "nonfinite_total": state.nonfinite_total}


def _unsavable(template, tree):
  return template.replace(**tree)


@jax.jit
def _finite_tree(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _all_finite(state) -> bool:
  return bool(np.asarray(_finite_tree({"params": state.params, "opt_state": state.opt_state,
                                       "model_state": state.model_state})))


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

  Args:
    workdir: a run's workdir (holding ``checkpoints/``) or its ``checkpoints`` folder.
    step: checkpoint step, default the latest.

  Returns:
    ``{"params": ..., **model_state}`` as numpy arrays.
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    directory = workdir
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "data"))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint found in {directory}")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    manager.close()
  state = jax.tree.map(np.asarray, restored["state"])
  return {"params": state["params"], **(state.get("model_state") or {})}

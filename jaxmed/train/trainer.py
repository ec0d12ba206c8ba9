"""The generic trainer: one jitted, sharded train step and a flat loop (big_vision style).

    state = train(config, workdir)            # method, data, optimizer, mesh all from config

The step: per-step key ``fold_in(rng, step)`` -> the method's update (by default: its
augmentation, loss and gradients, optionally accumulated over micro-batches, and one update of
every parameter group) -> its after-update hook; skipped (and counted) when the loss or
gradient norm is not finite. The loop: restore the latest checkpoint (state +
data iterator) if any, log every ``log_every`` steps to ``metrics.jsonl`` / TensorBoard / the
console, run evaluation hooks every ``eval_every`` steps, checkpoint every ``checkpoint.every``
steps and on SIGTERM, abort after ``max_nonfinite`` skipped steps in a row.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxmed import methods as methods_lib
from jaxmed import threefry
from jaxmed.data import datasets, pipeline, sources, views
from jaxmed.train import checkpoint as ckpt_lib
from jaxmed.train import init as init_lib
from jaxmed.train import logging as log_lib
from jaxmed.train import optim, sharding
from jaxmed.train import programs as programs_lib
from jaxmed.train.state import TrainState

EvalHook = Callable[[int, TrainState], Mapping[str, float]]
StopRule = Callable[[int, Mapping[str, float]], bool]


class NonFiniteLossError(RuntimeError):
  """Raised when ``max_nonfinite`` consecutive steps had a non-finite loss or gradient."""


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  method: methods_lib.Method
  last_metrics: dict
  preempted: bool = False
  stopped_early: bool = False


def enable_compilation_cache(directory: str) -> str:
  """Turns on JAX's persistent compilation cache in ``directory`` (unless
  ``JAX_COMPILATION_CACHE_DIR`` already names one), so that runs of one process that compile the
  same program (e.g. the rows of an experiment table, all fine-tuned with one config) compile it
  once. Returns the cache directory in use."""
  existing = os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir
  if existing:
    return existing
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


def init_compiler_options():
  """Initialisation runs once: on CPU, skip LLVM's expensive passes (~4x faster compile of the
  per-parameter threefry draws, e.g. 13 s -> 3 s for a 4-level UNet) and use XLA's older
  element-wise emitters, which compile faster than its fusion emitters (4.6 -> 3.6 s for a tiny
  Swin-UNETR; the same values)."""
  if jax.default_backend() != "cpu":
    return None
  return {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
          "xla_cpu_use_fusion_emitters": False}


def jit_init(fn: Callable, **jit_kwargs) -> Callable:
  """``jax.jit`` of an initialisation (a program that runs once): its independent random draws
  hashed together (`jaxmed.threefry`: the same values, a tiny Swin-UNETR's initialisation
  3.2-3.8 -> 1.2-1.4 s to compile on CPU) and compiled with `init_compiler_options`."""
  return jax.jit(threefry.merge_threefry_calls(fn), compiler_options=init_compiler_options(),
                 **jit_kwargs)


def make_train_step(method):
  """``step(state, batch) -> (state, metrics)``, pure; jit it with shardings.

  The per-step key is ``fold_in(state.rng, state.step)``; `Method.update` does the work, then
  `Method.after_update`. A step whose ``loss`` or ``grad_norm`` is not finite leaves
  parameters, optimizer, model and method state unchanged and is counted.
  """
  def step(state: TrainState, batch):
    key = jax.random.fold_in(state.rng, state.step)
    new_state, metrics = method.update(state, batch, key)
    new_state = method.after_update(new_state)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_state.params, state.params),
        opt_state=keep(new_state.opt_state, state.opt_state),
        model_state=keep(new_state.model_state, state.model_state),
        method_state=keep(new_state.method_state, state.method_state),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    out = {**metrics, **state.optimizer.learning_rates(state.step),
           "nonfinite_streak": new_state.nonfinite_streak,
           "nonfinite_total": new_state.nonfinite_total}
    return new_state, out

  return step


def _holding_frozen_networks(method, fn):
  """``fn(rng, frozen)`` (an initialisation, traced with ``frozen`` as tracers the method holds
  while it runs), after which the method holds the concrete ``frozen`` networks again."""
  def call(rng, frozen):
    try:
      return fn(rng, frozen)
    finally:
      for name, variables in frozen.items():
        method.set_frozen_network(name, variables)
  return call


def make_programs(config, method, example_batch, mesh,
                  frozen: Mapping[str, Any] | None = None) -> programs_lib.Programs:
  """The jitted initialisation ``(rng, frozen) -> state`` (step 0, in its shardings) and the
  jitted, sharded train step of ``method`` for ``example_batch``'s shapes on ``mesh``.

  ``frozen``: the frozen networks the method holds (`jaxmed.train.init.load_frozen_networks`,
  name -> variables). The initialisation takes them as an argument, not as constants: runs that
  differ only in their loss network's weights (CoPer's Table III rows) share one program, and a
  full-size VGG-16 is not lowered and compiled into it as 59 MB of constants."""
  optimizer = optim.make_grouped_optimizer(config, int(config.total_steps))

  def init_fn(rng, frozen_values):
    init_key, step_key = jax.random.split(rng)
    for name, variables in frozen_values.items():  # tracers while this traces
      method.set_frozen_network(name, variables)
    return TrainState.create(variables=method.init(init_key, example_batch),
                             optimizer=optimizer, rng=step_key,
                             method_state=method.init_method_state(example_batch))

  # Traced once for its shapes; the replicated initialisation below reuses that trace.
  init_one = jit_init(init_fn)
  shapes = _holding_frozen_networks(method, init_one.eval_shape)(
      jax.random.PRNGKey(0), dict(frozen or {}))
  state_sh = sharding.state_shardings(shapes, mesh)
  if jax.process_count() == 1 and all(s.is_fully_replicated for s in jax.tree.leaves(state_sh)):
    # Every device would compute the same state: compute it once, on one device, and copy it
    # (the same values; a tiny Swin-UNETR on 4 CPU devices: about 1 s less to compile, no
    # partitioning, and 1.7 -> 0.6 s to run).
    init = lambda rng, frozen_values: jax.device_put(init_one(rng, frozen_values), state_sh)
  else:  # FSDP-sharded leaves: each device computes its shards
    init = jit_init(init_fn, out_shardings=state_sh)
  init = _holding_frozen_networks(method, init)
  step_fn = jax.jit(make_train_step(method),
                    in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                    out_shardings=(state_sh, None), donate_argnums=(0,))
  return programs_lib.Programs(init=init, step=step_fn, state_shardings=state_sh)


def setup(config, method, example_batch, mesh, programs=None, frozen=None):
  """The step-0 train state, placed in its shardings, and the jitted, sharded train step.

  Args:
    config: experiment config (``seed``, ``total_steps``, ``optim``, ``param_groups``).
    method: the `Method` to train.
    example_batch: a global batch (arrays or shapes) that fixes the input shapes.
    mesh: the device mesh.
    programs: `make_programs`'s result for these arguments, if already made.
    frozen: the frozen networks the method holds (`jaxmed.train.init.load_frozen_networks`),
      passed to the initialisation as arguments; None: none (a method that holds one then
      initialises it from its own copy, as a constant of the program).

  Returns:
    ``(state, step_fn, state_shardings)``; ``step_fn(state, batch)`` donates ``state``.
  """
  frozen = dict(frozen or {})
  programs = programs or make_programs(config, method, example_batch, mesh, frozen)
  state = programs.init(jax.random.PRNGKey(int(config.seed)), frozen)
  return state, programs.step, programs.state_shardings


def train(config, workdir: str, *, method: methods_lib.Method | None = None,
          train_data=None, subjects: Sequence | None = None,
          init_variables: Callable[[dict], dict] | None = None,
          hooks: Sequence[EvalHook] = (), evaluators: Sequence = (),
          stop: StopRule | None = None,
          progress: bool = True) -> TrainResult:
  """Trains ``config.method`` on ``config.data`` (or ``train_arrays``) into ``workdir``.

  Args:
    config: the experiment `ml_collections.ConfigDict`.
    workdir: output folder (checkpoints/, metrics.jsonl, tensorboard/).
    method: a prebuilt method (default: ``config.method``'s, shared with this process's runs of
      an equal config, whose compiled programs this run reuses: `jaxmed.train.programs`).
    train_data: training examples, a dict of arrays or a source (`jaxmed.data.sources`), each
      process reading every ``process_count``-th row (default: the ``config.data.view`` of
      this process's share of ``subjects``, `jaxmed.data.views.make_view`).
    subjects: the training subjects, a list or a file-backed sequence (default: the configured
      data's train split); each process reads only subjects ``process_index::process_count``.
    init_variables: maps freshly initialised variables to the starting ones (transfer learning);
      ignored when resuming from a checkpoint.
    hooks: evaluation hooks ``(step, state) -> metrics``, run every ``config.eval_every`` steps
      and at the end; their metrics are logged with that step.
    evaluators: `jaxmed.evaluate.evaluators.Evaluator`-like objects (``should_run(step,
      final)``, ``__call__(step, variables) -> metrics``), each on its own schedule; their
      metrics are logged with the step.
    stop: early stopping: ``stop(step, metrics) -> bool`` is asked after every evaluation with
      the logged metrics; True saves a checkpoint and ends training (``stopped_early``).
    progress: show a console progress bar.
  """
  began = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  method = method or programs_lib.shared_method(config)
  frozen = init_lib.load_frozen_networks(method)  # e.g. a loss network read from a file
  view_transform = None
  process_index, process_count = jax.process_index(), jax.process_count()
  if train_data is None:
    if subjects is None:
      subjects = datasets.load_splits(config.data)["train"]
    shard = sources.shard_subjects(subjects, process_index, process_count)
    train_source, view_transform = views.make_view(config.data, shard)
    process_index, process_count = 0, 1  # the source is already this process's share
  else:
    train_source = sources.as_source(train_data)
  total_steps = int(config.total_steps)
  batch_size = int(config.batch_size)
  accum = int(config.optim.get("accum_steps", 1))
  mesh = sharding.make_mesh(config.get("mesh"))
  if accum > 1 and type(method).update is not methods_lib.Method.update:
    raise ValueError(f"optim.accum_steps={accum}: gradient accumulation is part of the default "
                     f"Method.update, which method {method.name!r} overrides")
  if batch_size % (accum * mesh.size):
    raise ValueError(f"batch_size={batch_size} must be divisible by optim.accum_steps={accum} x "
                     f"{mesh.size} devices")

  transform = views.compose(view_transform, method.example_transform(train_source))
  data_iter = pipeline.train_iterator(
      train_source, global_batch_size=batch_size, seed=int(config.seed), transform=transform,
      process_index=process_index, process_count=process_count,
      read_threads=int(config.data.get("read_threads", 4)),
      prefetch=int(config.data.get("prefetch", 2)))
  first = train_source[0]
  if transform is not None:
    first = transform(first, np.random.default_rng(0))
  example = {k: np.zeros((batch_size, *np.shape(v)), np.asarray(v).dtype)
             for k, v in first.items()}
  # An earlier run of this process with an equal config shares its compiled programs.
  programs = programs_lib.programs(config, method, example, mesh, frozen,
                                   lambda: make_programs(config, method, example, mesh, frozen))
  state, step_fn, state_sh = setup(config, method, example, mesh, programs, frozen)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep=int(config.checkpoint.get("keep", 3)),
                                       async_save=bool(config.checkpoint.get("async_save", True)))
  if checkpointer.latest_step is not None:
    state = checkpointer.restore(state, data_iter)
    logging.info("resumed from step %d", int(state.step))
  elif init_variables is not None:
    variables = init_variables(jax.device_get(state.variables))
    params = variables.pop("params")
    state = jax.device_put(state.replace(params=params, model_state=variables,
                                         opt_state=state.optimizer.init(params)), state_sh)

  start = int(state.step)
  writer = log_lib.MetricWriter(workdir, resume_step=start,
                                tensorboard=bool(config.get("tensorboard", True)))
  bar = log_lib.Progress(total_steps, start, desc=config.method, enabled=progress)
  log_every, eval_every = int(config.log_every), int(config.get("eval_every", 0))
  ckpt_every = int(config.checkpoint.get("every", 0))
  max_nonfinite = int(config.get("max_nonfinite", 10))
  last, preempted, stopped_early = {}, False, False
  try:
    with ckpt_lib.PreemptionFlag() as flag:
      for step in range(start + 1, total_steps + 1):
        batch = sharding.global_batch(next(data_iter), mesh)
        state, metrics = step_fn(state, batch)
        if step == start + 1:  # compile time, read by experiments/benchmarks/compile_time.py
          jax.block_until_ready(metrics)
          logging.info("first step done %.2f s after train() began (data, init, compile)",
                       time.perf_counter() - began)
        bar.update(step)
        final = step == total_steps
        do_eval = bool(hooks) and (final or (eval_every and step % eval_every == 0))
        due = [e for e in evaluators if e.should_run(step, final)]
        if final or step % log_every == 0 or do_eval or due:
          last = {k: float(v) for k, v in jax.device_get(metrics).items()}
          last["steps_per_sec"] = bar.steps_per_sec(step)
          last["images_per_sec"] = last["steps_per_sec"] * batch_size
          if do_eval:
            for hook in hooks:
              last.update(hook(step, state))
          for evaluator in due:
            last.update(evaluator(step, state.variables))
          writer.write(step, last)
          bar.set_loss(last["loss"])
          # Checked at log steps only (no per-step host sync); skipped steps leave the
          # state unchanged, so detecting a streak late is harmless.
          if last["nonfinite_streak"] >= max_nonfinite:
            raise NonFiniteLossError(
                f"{int(last['nonfinite_streak'])} consecutive steps up to step {step} had a "
                f"non-finite loss or gradient (max_nonfinite={max_nonfinite})")
        if do_eval and stop is not None and not final and stop(step, last):
          checkpointer.save(step, state, data_iter, force=True)
          stopped_early = True
          logging.info("early stop at step %d", step)
          break
        if flag.should_stop(step):
          checkpointer.save(step, state, data_iter, force=True)
          checkpointer.wait()
          preempted = True
          logging.warning("stopped at step %d on request; checkpoint saved", step)
          break
        if final or (ckpt_every and step % ckpt_every == 0):
          checkpointer.save(step, state, data_iter, force=final)
  finally:
    checkpointer.close()
    writer.close()
    bar.close()
  return TrainResult(state=state, method=method, last_metrics=last, preempted=preempted,
                     stopped_early=stopped_early)

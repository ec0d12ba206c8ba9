"""Test helpers shared by every test module (import as ``helpers``; conftest puts tests/ on the
path): configs of any method, CLI flags of the tiny overrides, numpy-filled variables."""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from jaxmed.config import apply_overrides, method_config
from jaxmed.train.logging import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Overrides that make any UNet config tiny (also usable as `--config.<k>=<v>` flags).
TINY_OVERRIDES = {
    "model.features": (4, 8),
    "data.num_subjects": 6,
    "data.shape": (16, 16, 16),
    "data.num_val": 1,
    "data.num_test": 1,
    "batch_size": 8,
    "log_every": 5,
}


# For a program whose run time, not its compile time, dominates a test: XLA:CPU's default
# optimisation and emitters instead of the suite's -O0 / older emitters (`xla_test_flags`). The
# block-drop statistics test (256 x 24^3 boxes in a while loop) ran 14.5 s at -O0 and 0.8 s so,
# for 0.4 s more compile: `jax.jit(fn, compiler_options=OPTIMIZED)`.
OPTIMIZED = {"xla_backend_optimization_level": 2, "xla_cpu_use_fusion_emitters": True}

# The end-to-end experiment tests train on one of the suite's four simulated devices
# (`--set mesh.num_devices=1`): what they check is the experiment's tables and files, and the
# trainer and method tests exercise sharding. On four devices every program is partitioned and
# runs as four (the DAE experiment test: 177 -> 151 s of CPU on one).
ONE_DEVICE = ("--set", "mesh.num_devices=1")


def config_for(method: str, overrides: dict | None = None, **kwargs):
  """``method``'s config (base + its sections, locked) with dotted-path overrides."""
  return apply_overrides(method_config(method), {**(overrides or {}), **kwargs})


def tiny_config(method: str = "restoration", **overrides):
  """A tiny config of ``method``: TINY_OVERRIDES, 12 steps, checkpoints every 4, plus
  ``overrides`` (dotted paths given with ``__`` for ``.``)."""
  extra = {k.replace("__", "."): v for k, v in overrides.items()}
  return config_for(method, {**TINY_OVERRIDES, "total_steps": 12, "checkpoint.every": 4,
                             "tensorboard": False, **extra})


def tiny_flags(**extra):
  """TINY_OVERRIDES (+ extra) as jaxmed CLI flags."""
  out = []
  for k, v in {**TINY_OVERRIDES, **extra}.items():
    v = ",".join(map(str, v)) if isinstance(v, tuple) else v
    out.append(f"--config.{k}={v}")
  return out


def nifti_phantoms(root, **data_overrides):
  """Writes the TINY_OVERRIDES phantoms as a BraTS-style NIfTI folder ``root``; returns the CLI
  flags that train on it file-backed (`jaxmed.data.cache`, cache under ``root/../cache``)."""
  from jaxmed.data import nifti, synthetic  # pylint: disable=g-import-not-at-top
  data = {"num_subjects": TINY_OVERRIDES["data.num_subjects"],
          "shape": TINY_OVERRIDES["data.shape"], **data_overrides}
  for subject in synthetic.make_subjects(data["num_subjects"], shape=data["shape"]):
    nifti.write_case(subject, root)
  return [f"--config.data.root={root}",
          f"--config.data.cache_dir={os.path.join(os.path.dirname(str(root)), 'cache')}"]


def numpy_filled(variables, seed: int = 0, scale: float = 0.1):
  """``variables`` (arrays, or the shapes ``jax.eval_shape(model.init, ...)`` gives) with every
  float leaf replaced by seeded ``scale * N(0, 1)`` numbers (no initialiser is compiled): fast,
  deterministic stand-in weights of the right shapes and dtypes."""
  rng = np.random.default_rng(seed)

  def fill(x):
    shape, dtype = tuple(np.shape(x)), np.dtype(x.dtype)
    if not np.issubdtype(dtype, np.floating):
      return np.asarray(x) if hasattr(x, "__array__") else np.zeros(shape, dtype)
    return (scale * rng.standard_normal(shape)).astype(dtype)
  return jax.tree.map(fill, variables)


def final_record(workdir):
  """The last ``metrics.jsonl`` record without its timings."""
  record = read_metrics(str(workdir))[-1]
  return {k: v for k, v in record.items() if not k.endswith("_per_sec")}


def wait_for(predicate, proc, timeout=240):
  """Polls ``predicate`` while the subprocess ``proc`` runs; fails if it exits first."""
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      out = proc.stdout.read().decode() if proc.stdout else ""
      raise AssertionError(f"training exited early with {proc.returncode}:\n{out[-3000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.02)


def run_steps(workdir):
  """The checkpointed steps of a run's workdir."""
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(p) for p in os.listdir(d) if p.isdigit()) if os.path.isdir(d) else []


def eval_mode_variables(method, image, seed: int = 1, scale: float = 0.3):
  """``numpy_filled`` variables of ``method.init`` for ``{"image": image}`` with positive
  batch-norm running variances, so that eval-mode batch norm is well defined."""
  shapes = jax.eval_shape(method.init, jax.random.PRNGKey(0), {"image": image})
  variables = numpy_filled(shapes, seed=seed, scale=scale)
  return {**variables, "batch_stats": jax.tree_util.tree_map_with_path(
      lambda path, x: np.abs(x) + 1.0 if path[-1].key == "var" else x,
      variables["batch_stats"])}

"""Test setup: four simulated CPU devices, so sharding is exercised in every run, and XLA:CPU
flags that cut compile time (`xla_test_flags`: compilation dominates the tiny programs' cost)."""

import atexit
import gc
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from xla_test_flags import xla_flags  # noqa: E402  pylint: disable=g-import-not-at-top

os.environ.setdefault("XLA_FLAGS", xla_flags(4))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _session_folder(variable: str, prefix: str) -> bool:
  """Points ``variable`` at a new temporary folder removed at exit, unless it is set."""
  if variable in os.environ:
    return False
  os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
  atexit.register(shutil.rmtree, os.environ[variable], ignore_errors=True)
  return True


# One fresh persistent compilation cache per test session, shared with the subprocesses the
# tests start: identical train steps (same HLO) compile once instead of once per test. And the
# file-backed data caches (jaxmed.data.cache) of tests that set no data.cache_dir: never
# ~/.cache. The process that makes a folder (pytest-xdist's controller, whose workers inherit
# the variables) deletes it when it exits.
if _session_folder("JAX_COMPILATION_CACHE_DIR", "jaxmed-test-jit-"):
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
_session_folder("JAXMED_CACHE_DIR", "jaxmed-test-data-cache-")

import numpy as np
import pytest
import xdist

from helpers import tiny_config as make_tiny_config  # pylint: disable=g-import-not-at-top


@pytest.fixture
def tiny_config():
  """A tiny in-painting config on 16^3 phantoms with a 2-level UNet."""
  return make_tiny_config("restoration")


@pytest.fixture
def tiny_arrays():
  """16 random 16x16 4-channel 'slices' with BraTS-like labels."""
  rng = np.random.default_rng(0)
  image = rng.normal(size=(16, 16, 16, 4)).astype(np.float32)
  label = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=(16, 16, 16), p=[0.7, 0.1, 0.1, 0.1])
  return {"image": image, "label": label}


# The longest files, longest first (seconds in clean-clone runs on 2 cores, 2026-12-07). With
# `-n 2 --dist loadfile` a worker takes the next file when it finishes one; pytest-xdist's
# default order (most tests first) left these, which have few tests, for last, and the run
# ended with one worker alone on a 45-190 s file. Longest first, the last files are short.
LONGEST_FILES = (
    "experiments/test_dae_experiment.py",      # 160-190
    "experiments/test_coper_experiment.py",    # 135-165
    "experiments/test_vit_ae_pp_experiment.py",  # 80-115
    "metrics/test_surface.py",                 # 93
    "experiments/test_experiments.py",         # 60-85
    "models/test_swin_unetr.py",               # 78
    "train/test_trainer.py",                   # 72
    "methods/test_simmim.py",                  # 50-57
    "train/test_multiprocess.py",              # 45-55
    "methods/test_dae.py",                     # 40-45
    "methods/test_coper_synthesis.py",         # 40-43
)


_missing = [f for f in LONGEST_FILES
            if not os.path.isfile(os.path.join(os.path.dirname(__file__), f))]
if _missing:
  raise FileNotFoundError(f"conftest.LONGEST_FILES names files that do not exist: {_missing}")


# Python's cyclic garbage collector at its default thresholds (700, 10, 10) ran thousands of
# young and tens of full collections per test file while JAX traces (tracing allocates many
# short-lived containers), and a full collection walks every object of a large test process:
# `tests/methods/test_dae.py` + `tests/models/test_swin_unetr.py` spent 5.9 s of 95 s in the
# collector, 4.8 s of it in 19 full collections. With these thresholds and the objects of the
# imports and collection frozen (`gc.freeze`, `pytest_collection_finish`): 1.3-1.7 s.
GC_THRESHOLDS = (10_000, 20, 100)


def pytest_configure(config):
  # Keep the collection order (`pytest_collection_modifyitems`) instead of xdist's.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False
  gc.set_threshold(*GC_THRESHOLDS)


def pytest_collection_finish(session):
  """Moves the objects of every import and of collection out of the collector's reach: full
  collections no longer walk them."""
  del session
  gc.collect()
  gc.freeze()


def _exit_now():
  """Ends the process at once, its output flushed."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)


def pytest_sessionfinish(session):
  """A pytest-xdist worker whose session has ended (its results sent) leaves without the
  teardown no one reads: the heap is frozen, so pytest's closing garbage collections (five full
  passes looking for unraisable exceptions) skip what the tests left, and the process ends
  with `os._exit` once pytest is done (an exit hook registered after JAX's, so it runs first),
  skipping JAX's exit hook (which clears every cache and destroys each compiled program) and
  the interpreter's teardown.

  That teardown took 5-12 s per worker after a long run while pytest-xdist waited for it; after
  5 s execnet interrupted it, which printed the KeyboardInterrupt warning that ended most suite
  runs. tests/models + tests/losses on two workers: 100.8 -> 93.9 s. Under coverage, which
  writes its data at exit, workers exit as usual."""
  if xdist.is_xdist_worker(session) and "coverage" not in sys.modules:
    gc.freeze()
    atexit.register(_exit_now)


def pytest_collection_modifyitems(items):
  """`LONGEST_FILES` first, in that order; the other files after, in collection order."""
  tests = os.path.dirname(os.path.abspath(__file__))
  rank = {os.path.join(tests, f): i for i, f in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(str(item.path), len(rank)))

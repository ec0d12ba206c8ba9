"""glibc ``malloc`` settings jaxmed sets when it is imported: large buffers stay in the heap.

XLA:CPU allocates each executable's temporary buffer with ``malloc`` at every call and frees it
at the end. glibc serves an allocation above ``M_MMAP_THRESHOLD`` (adaptive, at most 32 MiB on
64-bit Linux) with a fresh ``mmap``, so a train step whose temporaries exceed that size gets new
pages every step: the kernel zeroes and maps each 4 KiB page on first touch and unmaps it at
``free``. The demo's UNet step (``experiments/benchmarks/train_step.py``, 33.1 MiB of
temporaries) took about 8,500 page faults per step and spent 19% of its CPU time in the kernel;
with these settings it takes about 500, and the step ran at 1.07-1.15x PyTorch's speed against
0.90-0.92x without (same process, same settings for PyTorch, 2-core CPU). PyTorch gains from
them too where its own buffers are large: MONAI's Swin-UNETR (feature 24, 64^3) forward+backward
3.6-3.7 -> 2.6-2.7 s (``experiments/benchmarks/backbones.py --torch-malloc``); jaxmed's did not
change (3.1-3.5 s either way).

The settings (``mallopt``): ``M_MMAP_MAX = 0`` (no allocation is served by ``mmap``; every one
comes from the heap and its freed space is reused) and ``M_TRIM_THRESHOLD = 1 GiB`` (glibc
returns free memory at the heap's top to the system only beyond 1 GiB). The cost: memory freed
in the middle of the heap is kept for reuse rather than returned to the system at once: peak
resident memory of ``jaxmed train`` over 6 cases (``input_pipeline.py --memory-only``) 0.87 ->
0.91 GiB. Never trimming (``M_TRIM_THRESHOLD = -1``) was no faster for the Swin-UNETR, whose
1.76 GiB of temporaries exceed the 1 GiB (3.4-4.1 against 3.3-3.6 s): its large buffers are
YNNPACK's, allocated on XLA's worker threads, and glibc serves a thread's allocation above 64
MiB (its per-thread heap) with ``mmap`` whatever ``M_MMAP_MAX`` says, about 720,000 page faults
per forward+backward. One arena for every thread (``M_ARENA_MAX = 1``) with no trimming
(``M_TRIM_THRESHOLD = -1``) removed them (about 10 per call): forward 1483 -> 1002 ms,
forward+backward 3506 -> 2944 ms, but its peak resident memory went 2270 -> 4420 MB (freed
buffers fragment the single heap), so it is not the default. For a process that can spare the
memory: ``JAXMED_MALLOC_DEFAULTS=off GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.
mmap_max=0:glibc.malloc.trim_threshold=4294967296`` (a threshold above the heap's free top
between calls: 2 GiB still trimmed here; 4 GiB: 44 faults per call, 2.86 s).

``JAXMED_MALLOC_DEFAULTS=off`` sets nothing. Only on Linux with glibc; elsewhere (macOS, musl)
nothing is set. A preloaded allocator (tcmalloc, jemalloc) replaces ``malloc`` and ignores
these settings.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping
from typing import Any

from jaxmed import _env

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_MAX = -4
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 1 << 30))


def glibc() -> Any | None:
  """The C library as a ctypes handle where it is glibc (Linux), else None."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  try:
    return ctypes.CDLL("libc.so.6")
  except OSError:
    return None


def apply_malloc_defaults(environ: Mapping[str, str] = os.environ,
                          libc: Any | None = None) -> bool:
  """Sets :data:`SETTINGS` with ``mallopt`` unless ``JAXMED_MALLOC_DEFAULTS=off``.

  Args:
    environ: where ``JAXMED_MALLOC_DEFAULTS`` (``on``, the default, or ``off``) is read.
    libc: the C library (default: :func:`glibc`); anything with a ``mallopt(param, value)``.

  Returns:
    True when every setting was accepted, False when nothing was set (switched off, or not
    glibc).
  """
  if not _env.switched_on(environ, "JAXMED_MALLOC_DEFAULTS"):
    return False
  libc = glibc() if libc is None else libc
  if libc is None:
    return False
  return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)

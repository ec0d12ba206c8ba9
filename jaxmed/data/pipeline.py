"""grain input pipelines: seeded shuffling, batching, per-process shards, threaded reading.

Examples come from a random-access source (`jaxmed.data.sources`: in-memory arrays, or rows
read on demand from file-backed subjects). Reading runs in ``read_threads`` grain threads
with ``prefetch`` batches buffered ahead, so a step does not wait on input while memory stays
bounded by the buffer (not by the dataset).

The iterator is a `grain.DatasetIterator`; its state (a few integers) is checkpointed with the
train state, so a resumed run continues with exactly the batches it would have seen.
Augmentations run on device inside the jitted train step (`jaxmed.data.transforms`).
"""

from __future__ import annotations

from collections.abc import Callable

import grain
import jax
import numpy as np

from jaxmed.data import sources

ExampleTransform = Callable[[dict, np.random.Generator], dict]


def _check_count(value, name: str, minimum: int) -> int:
  if isinstance(value, bool) or int(value) != value or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
  return int(value)


def train_iterator(data, *, global_batch_size: int, seed: int,
                   process_index: int | None = None, process_count: int | None = None,
                   transform: ExampleTransform | None = None, read_threads: int = 4,
                   prefetch: int = 4):
  """Endless iterator of this process's share of each global batch.

  Each process reads a disjoint, strided shard of the rows (pass ``process_count=1`` for a
  source that is already this process's share, e.g. built from its subjects), reshuffled every
  epoch from ``seed``, and yields ``global_batch_size / process_count`` examples per step
  (assemble the global array with `jaxmed.train.sharding.global_batch`).

  ``transform(example, rng) -> example``, if given, runs on the host on every example before
  batching (e.g. to cut a crop or to gather the partner slices of source identification); its
  ``np.random.Generator`` is seeded from ``seed`` and the example's position in the endless
  stream, so every epoch draws afresh and a restored iterator draws the same.

  Args:
    data: a dict of equal-length arrays (one row per example) or a source (`sources.as_source`).
    global_batch_size: examples per step over all processes.
    seed: shuffling and transform seed.
    process_index, process_count: this process's shard (default: jax's).
    transform: see above.
    read_threads: grain threads reading and transforming batches in parallel.
    prefetch: batches read ahead, >= ``read_threads`` to keep every thread busy (the input
      memory is about ``prefetch + read_threads`` batches).

  Returns:
    a `grain.DatasetIterator` of dicts of ``(local_batch, ...)`` numpy arrays, with
    ``get_state`` / ``set_state``.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be divisible by the number "
                     f"of processes {process_count}")
  read_threads = _check_count(read_threads, "read_threads", 1)
  prefetch = _check_count(prefetch, "prefetch", 1)
  source = sources.as_source(data)
  if len(source) < process_count:
    raise ValueError(f"{len(source)} examples cannot be sharded over {process_count} processes")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.shuffle(seed=seed).repeat(None)
  if transform is not None:
    ds = ds.random_map(transform, seed=seed + 1)
  ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(options))

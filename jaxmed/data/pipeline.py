"""grain input pipelines over in-memory arrays: seeded shuffling, batching, per-process shards.

The iterator is a `grain.DatasetIterator`; its state (a few integers) is checkpointed with the
train state, so a resumed run continues with exactly the batches it would have seen.
Augmentations run on device inside the jitted train step (`jaxmed.data.transforms`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import grain
import jax
import numpy as np

ExampleTransform = Callable[[dict, np.random.Generator], dict]


class ArraySource(grain.sources.RandomAccessDataSource):
  """A grain data source over a dict of equal-length numpy arrays (one example = one row)."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    lengths = {k: len(v) for k, v in arrays.items()}
    if not lengths:
      raise ValueError("arrays must hold at least one array")
    if len(set(lengths.values())) != 1:
      raise ValueError(f"arrays must have equal lengths; got {lengths}")
    self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
    self._len = next(iter(lengths.values()))
    if not self._len:
      raise ValueError(f"arrays hold no examples ({self!r}); e.g. no slice passed "
                       "data.min_foreground")

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self._arrays.items()}

  def __repr__(self):
    shapes = {k: v.shape for k, v in self._arrays.items()}
    return f"ArraySource({shapes})"


def train_iterator(arrays: Mapping[str, np.ndarray], *, global_batch_size: int, seed: int,
                   process_index: int | None = None, process_count: int | None = None,
                   transform: ExampleTransform | None = None):
  """Endless iterator of this process's share of each global batch.

  Each process reads a disjoint, strided shard of the examples, reshuffled every epoch from
  ``seed``, and yields ``global_batch_size / process_count`` examples per step (assemble the
  global array with `jaxmed.train.sharding.global_batch`).

  ``transform(example, rng) -> example``, if given, runs on the host on every example before
  batching (e.g. to gather the partner slices of source identification); its
  ``np.random.Generator`` is seeded from ``seed`` and the example's position in the endless
  stream, so every epoch draws afresh and a restored iterator draws the same.

  Returns:
    a `grain.DatasetIterator` of dicts of ``(local_batch, ...)`` numpy arrays, with
    ``get_state`` / ``set_state``.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be divisible by the number "
                     f"of processes {process_count}")
  source = ArraySource(arrays)
  if len(source) < process_count:
    raise ValueError(f"{len(source)} examples cannot be sharded over {process_count} processes")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.shuffle(seed=seed).repeat(None)
  if transform is not None:
    ds = ds.random_map(transform, seed=seed + 1)
  ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
  return iter(ds.to_iter_dataset())


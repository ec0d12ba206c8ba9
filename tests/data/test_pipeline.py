import numpy as np
import pytest

from jaxmed.data import datasets, pipeline, sources, synthetic


def _take(it, n):
  return [next(it)["x"].tolist() for _ in range(n)]


def test_deterministic_epochs_and_resume():
  arrays = {"x": np.arange(10)}
  a = pipeline.train_iterator(arrays, global_batch_size=4, seed=0, process_index=0,
                              process_count=1)
  b = pipeline.train_iterator(arrays, global_batch_size=4, seed=0, process_index=0,
                              process_count=1)
  first = _take(a, 5)
  assert first == _take(b, 5)
  # Every epoch is a permutation of all examples.
  flat = sum(first, [])
  assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
  state = a.get_state()
  expected = _take(a, 3)
  c = pipeline.train_iterator(arrays, global_batch_size=4, seed=0, process_index=0,
                              process_count=1)
  c.set_state(state)
  assert _take(c, 3) == expected
  d = pipeline.train_iterator(arrays, global_batch_size=4, seed=1, process_index=0,
                              process_count=1)
  assert _take(d, 5) != first


def test_process_shards_are_disjoint():
  arrays = {"x": np.arange(12)}
  seen = []
  for p in range(3):
    it = pipeline.train_iterator(arrays, global_batch_size=6, seed=0, process_index=p,
                                 process_count=3)
    batch = sum(_take(it, 2), [])
    assert len(batch) == 4
    seen.append(set(batch))
  assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
  with pytest.raises(ValueError, match="divisible"):
    pipeline.train_iterator(arrays, global_batch_size=7, seed=0, process_index=0,
                            process_count=3)


def test_array_source_errors():
  with pytest.raises(ValueError, match="equal lengths"):
    sources.ArraySource({"a": np.zeros(3), "b": np.zeros(4)})


def test_splits_and_labeled_subsets():
  subjects = synthetic.make_subjects(10, seed=0, shape=(16, 16, 16))
  splits = datasets.split_subjects(subjects, num_val=2, num_test=3, seed=0)
  ids = {k: {s.subject_id for s in v} for k, v in splits.items()}
  assert [len(ids[k]) for k in ("train", "val", "test")] == [5, 2, 3]
  assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["val"])
  assert len(datasets.labeled_subset(splits["train"], num_labeled=2)) == 2
  assert len(datasets.labeled_subset(splits["train"], label_fraction=0.4)) == 2
  assert len(datasets.labeled_subset(splits["train"], label_fraction=0.01)) == 1
  with pytest.raises(ValueError, match="num_labeled"):
    datasets.labeled_subset(splits["train"], num_labeled=6)
  with pytest.raises(ValueError, match="training subjects"):
    datasets.split_subjects(subjects, num_val=5, num_test=5, seed=0)


def test_modality_selection():
  s = synthetic.make_subject(0, shape=(16, 16, 16))
  t = datasets.select_modalities(s, ("flair", "t1"))
  np.testing.assert_array_equal(t.image[..., 0], s.image[..., 3])
  with pytest.raises(ValueError, match="dwi"):
    datasets.select_modalities(s, ("dwi",))

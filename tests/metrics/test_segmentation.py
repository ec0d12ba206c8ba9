import jax
import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric

from jaxmed.metrics import dice


def _monai(pred, target):
  to_torch = lambda x: torch.from_numpy(np.moveaxis(x, -1, 1).astype(np.float32).copy())
  return DiceMetric(include_background=True, reduction="none", ignore_empty=True)(
      to_torch(pred), to_torch(target)).numpy()


@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (3, 5, 6, 4, 2), (1, 1, 1, 1)])
def test_binary_channels_match_monai(shape):
  rng = np.random.default_rng(sum(shape))
  for _ in range(3):
    pred = rng.uniform(size=shape) > 0.5
    target = rng.uniform(size=shape) > 0.6
    target[0, ..., 0] = False
    pred[0, ..., 0] = False  # both empty -> nan in both
    ours = np.asarray(dice(pred, target))
    ref = _monai(pred, target)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, equal_nan=True)


def test_label_maps_and_background():
  rng = np.random.default_rng(0)
  pred = rng.integers(0, 3, (2, 6, 5))
  target = rng.integers(0, 3, (2, 6, 5))
  onehot = lambda x: np.eye(3, dtype=bool)[x]
  full = np.asarray(dice(pred, target, num_classes=3))
  np.testing.assert_allclose(full, np.asarray(dice(onehot(pred), onehot(target))))
  no_bg = np.asarray(dice(pred, target, num_classes=3, include_background=False))
  np.testing.assert_allclose(no_bg, full[:, 1:])


def test_empty_conventions():
  empty = np.zeros((1, 4, 4, 1), bool)
  some = empty.copy()
  some[0, 1, 1, 0] = True
  assert np.isnan(dice(empty, empty)[0, 0])
  assert float(dice(empty, empty, empty=1.0)[0, 0]) == 1.0
  assert float(dice(some, empty)[0, 0]) == 0.0
  assert float(dice(some, some)[0, 0]) == 1.0


def test_bad_input():
  with pytest.raises(ValueError, match="pred shape"):
    dice(np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 5, 1)))
  with pytest.raises(ValueError, match="integer label map"):
    dice(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), num_classes=2)
  with pytest.raises(ValueError, match="binary input"):
    dice(np.zeros((4, 4)), np.zeros((4, 4)))


def test_values_outside_the_documented_domain_are_errors():
  """Probabilities are not masks and labels must be below num_classes: both raise before
  tracing (they used to count every nonzero value as foreground / return numbers)."""
  rng = np.random.default_rng(0)
  probs = rng.uniform(size=(2, 5, 6, 3)).astype(np.float32)
  mask = probs > 0.5
  with pytest.raises(ValueError, match=r"dice: pred must be a binary mask \(bool or 0/1\)"):
    dice(probs, mask)
  with pytest.raises(ValueError, match="dice: target must be a binary mask"):
    dice(mask, probs)
  np.testing.assert_array_equal(dice(mask.astype(np.float32), mask.astype(np.uint8)),
                                dice(mask, mask))  # 0/1 of any dtype is a mask
  labels = rng.integers(0, 3, size=(2, 5, 6))
  with pytest.raises(ValueError, match=r"dice: pred labels must be in \[0, num_classes=3\); "
                                       r"found values in \[0, 3\]"):
    dice(np.where(labels == 2, 3, labels), labels, num_classes=3)
  with pytest.raises(ValueError, match=r"dice: target labels .* found values in \[-1, 2\]"):
    dice(labels, np.where(labels == 0, -1, labels), num_classes=3)
  # Inside a user's jit the value checks are skipped (the function still traces).
  traced = jax.jit(lambda p, t: dice(p, t))(probs, mask)
  assert traced.shape == (2, 3)

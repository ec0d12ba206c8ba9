import numpy as np
import pytest
import torch
from monai.losses import DiceLoss

from jaxmed.losses import (l1_l2_loss, l1_loss, l2_loss, sigmoid_dice_ce_loss, soft_dice_loss,
                           softmax_dice_ce_loss)


def test_soft_dice_matches_monai():
  rng = np.random.default_rng(0)
  for shape in [(2, 7, 9, 3), (3, 5, 6, 4, 2)]:
    probs = rng.uniform(size=shape).astype(np.float32)
    target = (rng.uniform(size=shape) > 0.7).astype(np.float32)
    target[0, ..., 0] = 0  # an empty target channel
    ours = float(soft_dice_loss(probs, target))
    to_torch = lambda x: torch.from_numpy(np.moveaxis(x, -1, 1).copy())
    ref = float(DiceLoss(reduction="mean")(to_torch(probs), to_torch(target)))
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_reconstruction_losses():
  a = np.array([[1.0, 2.0], [3.0, 5.0]], np.float32)
  b = np.zeros_like(a)
  np.testing.assert_allclose(l1_loss(a, b), 2.75)
  np.testing.assert_allclose(l2_loss(a, b), 39 / 4)
  np.testing.assert_allclose(l1_l2_loss(a, b), 2.75 + 39 / 4)
  w = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  np.testing.assert_allclose(l1_loss(a, b, w), 3.0)


def test_sigmoid_dice_ce_decreases_toward_the_target():
  target = np.zeros((1, 4, 4, 1), np.float32)
  target[0, :2] = 1
  good = np.where(target > 0, 5.0, -5.0)
  assert float(sigmoid_dice_ce_loss(good, target)) < float(sigmoid_dice_ce_loss(-good, target))


@pytest.mark.parametrize("batch", [False, True])
def test_softmax_dice_ce_matches_monai(batch):
  from monai.losses import DiceCELoss  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  for shape in ((2, 5, 7, 4), (3, 4, 6, 5, 3)):  # 2D with 4 classes, 3D with 3
    logits = rng.normal(size=shape).astype(np.float32)
    labels = rng.integers(0, shape[-1], shape[:-1])
    labels[0] = 0  # an item with one class only
    ref = DiceCELoss(to_onehot_y=True, softmax=True, batch=batch)(
        torch.from_numpy(np.moveaxis(logits, -1, 1)), torch.from_numpy(labels[:, None]))
    got = softmax_dice_ce_loss(logits, labels, batch_dice=batch)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
  with pytest.raises(ValueError, match="without the class axis"):
    softmax_dice_ce_loss(np.zeros((2, 4, 4, 3)), np.zeros((2, 4, 3), int))

import numpy as np
import torch
from monai.losses import DiceLoss

from jaxmed.losses import l1_l2_loss, l1_loss, l2_loss, sigmoid_dice_ce_loss, soft_dice_loss


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

"""Tests for jaxmed.pretext.masking: MAE token masking and DAE channel masking."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.pretext.masking import (channel_masking, mae_forward, num_keep, random_masking,
                                    restore_ids)

# --------------------------------------------------------------------------------------------
# Keep count.


@pytest.mark.parametrize("num_tokens, ratio, keep", [
    (27, 0.75, 6),  # int(6.75): MAE floors (rounding the masked count would keep 7)
    (1728, 0.75, 432),  # ViT-AE++ on 96^3 with patch 8
    (196, 0.75, 49),  # MAE ViT-B/16 at 224^2
    (10, 0.7, 3),  # 10 * (1 - 0.7) = 3.0000000000000004
    (8, 0.0, 8),
    (5, 0.5, 2),
])
def test_num_keep_is_mae_len_keep(num_tokens, ratio, keep):
  assert num_keep(num_tokens, ratio) == keep == int(num_tokens * (1 - ratio))


def test_num_keep_matches_monai_masking():
  import torch
  from monai.networks.nets.masked_autoencoder_vit import MaskedAutoEncoderViT
  for num_tokens in (7, 27, 64, 100):
    for ratio in (0.1, 0.3, 0.6, 0.75, 0.9):
      if int(num_tokens * (1 - ratio)) < 1:
        continue
      owner = types.SimpleNamespace(masking_ratio=ratio)
      kept, _, mask = MaskedAutoEncoderViT._masking(owner, torch.zeros(1, num_tokens, 1))
      assert num_keep(num_tokens, ratio) == kept.shape[1] == num_tokens - int(mask.sum())


@pytest.mark.parametrize("num_tokens, ratio, match", [
    (8, 1.0, "mask_ratio must be in"),
    (8, -0.1, "mask_ratio must be in"),
    (3, 0.9, "keeps int"),
    (0, 0.5, "num_tokens must be an int >= 1"),
])
def test_num_keep_errors(num_tokens, ratio, match):
  with pytest.raises(ValueError, match=match):
    num_keep(num_tokens, ratio)


# --------------------------------------------------------------------------------------------
# Random token masking.


def test_random_masking_ids_and_mask():
  fn = jax.jit(random_masking, static_argnums=(1, 2, 3))
  key = jax.random.key(3)
  ids_keep, ids_restore, mask = fn(key, 4, 27, 0.75)
  keep = 6
  assert ids_keep.shape == (4, keep) and ids_keep.dtype == jnp.int32
  assert ids_restore.shape == (4, 27) and ids_restore.dtype == jnp.int32
  assert mask.shape == (4, 27) and mask.dtype == jnp.float32
  ids_keep, ids_restore, mask = map(np.asarray, (ids_keep, ids_restore, mask))
  np.testing.assert_array_equal(mask.sum(axis=1), 27 - keep)
  for b in range(4):
    np.testing.assert_array_equal(np.sort(ids_restore[b]), np.arange(27))  # a permutation
    assert len(set(ids_keep[b])) == keep
    # The mask is 0 exactly at the kept indices.
    expected = np.ones(27, np.float32)
    expected[ids_keep[b]] = 0.0
    np.testing.assert_array_equal(mask[b], expected)
    # ids_restore inverts the shuffle whose first K entries are ids_keep: unshuffling
    # concat(kept, masked) puts every token back at its index.
    shuffle = np.argsort(ids_restore[b])
    np.testing.assert_array_equal(shuffle[:keep], ids_keep[b])
    np.testing.assert_array_equal(shuffle[ids_restore[b]], np.arange(27))
  assert len({tuple(row) for row in ids_keep}) == 4  # per-sample masks differ


def test_random_masking_deterministic_per_key_and_uniform():
  fn = jax.jit(random_masking, static_argnums=(1, 2, 3))
  first = fn(jax.random.key(0), 2, 16, 0.5)
  again = fn(jax.random.key(0), 2, 16, 0.5)
  other = fn(jax.random.key(1), 2, 16, 0.5)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[0], other[0])
  # Every token is masked with probability 1 - K / T = 0.5 (4000 draws: std 0.008).
  masks = jax.jit(jax.vmap(lambda k: random_masking(k, 1, 16, 0.5)[2][0]))(
      jax.random.split(jax.random.key(2), 4000))
  np.testing.assert_allclose(np.asarray(masks).mean(axis=0), 0.5, atol=0.04)


@pytest.mark.parametrize("args, match", [
    ((2, 8, 1.0), "mask_ratio must be in"),
    ((2, 8, -0.1), "mask_ratio must be in"),
    ((0, 8, 0.5), "n must be an int >= 1"),
])
def test_random_masking_errors(args, match):
  with pytest.raises(ValueError, match=match):
    random_masking(jax.random.key(0), *args)


def test_restore_ids_of_given_indices():
  ids_keep = jnp.asarray([[5, 0, 3], [1, 2, 7]], jnp.int32)
  ids_restore, mask = jax.jit(restore_ids, static_argnums=1)(ids_keep, 8)
  ids_restore, mask = np.asarray(ids_restore), np.asarray(mask)
  np.testing.assert_array_equal(mask, [[0, 1, 1, 0, 1, 0, 1, 1], [1, 0, 0, 1, 1, 1, 1, 0]])
  shuffle = np.argsort(ids_restore, axis=1)
  np.testing.assert_array_equal(shuffle[:, :3], ids_keep)
  # The masked tokens follow in ascending order (the MONAI / reference layout of the tests).
  np.testing.assert_array_equal(shuffle[:, 3:], [[1, 2, 4, 6, 7], [0, 3, 4, 5, 6]])
  # The same mask as random_masking's for its own ids_keep.
  keep, _, drawn = random_masking(jax.random.key(5), 3, 20, 0.6)
  np.testing.assert_array_equal(restore_ids(keep, 20)[1], drawn)


def test_restore_ids_errors():
  with pytest.raises(ValueError, match=r"ids_keep must have shape \(N, K\).*\(2, 9\)"):
    restore_ids(jnp.zeros((2, 9), jnp.int32), 8)
  with pytest.raises(ValueError, match="ids_keep must be integer"):
    restore_ids(jnp.zeros((2, 3)), 8)


def test_mae_forward_plumbing():
  # A stand-in model: mae_forward draws the mask with the model's ratio and token count and
  # passes ids_keep, ids_restore and the apply options through.
  seen = {}

  def apply(variables, x, ids_keep, ids_restore, *, train, return_features, mutable=False):
    seen.update(ids_keep=ids_keep, ids_restore=ids_restore, train=train,
                return_features=return_features)
    out = (x.sum() + variables, {"latent": ids_keep})
    return (out, {"batch_stats": 1}) if mutable else out

  model = types.SimpleNamespace(mask_ratio=0.75, num_tokens=lambda s: s[0] * s[1] // 4,
                                apply=apply)
  x, key = jnp.ones((2, 4, 8, 1)), jax.random.key(0)
  pred, mask, feats = mae_forward(model, 1.0, x, key, train=True)
  ids_keep, ids_restore, expected = random_masking(key, 2, 8, 0.75)
  np.testing.assert_array_equal(mask, expected)
  np.testing.assert_array_equal(seen["ids_keep"], ids_keep)
  np.testing.assert_array_equal(seen["ids_restore"], ids_restore)
  assert seen["train"] and not seen["return_features"] and float(pred) == 65.0
  (_, mask, _), updates = mae_forward(model, 1.0, x, key, 0.5, mutable=["batch_stats"])
  assert updates == {"batch_stats": 1} and int(np.asarray(mask).sum()) == 8
  with pytest.raises(ValueError, match=r"\(N, \*spatial, C\)"):
    mae_forward(model, 1.0, jnp.ones((2, 4)), key)


# --------------------------------------------------------------------------------------------
# DAE channel masking.


@pytest.mark.parametrize("shape, ratio", [((2, 5, 48), 0.6), ((3, 2, 4, 3, 10), 0.6),
                                          ((2, 6, 7), 0.3), ((2, 3, 8), 0.0), ((2, 3, 8), 1.0)])
def test_channel_masking_zeroes_int_ratio_c_shared_channels(shape, ratio):
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32) + 10.0  # no zeros
  c = shape[-1]
  masked, mask = jax.jit(channel_masking, static_argnums=2)(jax.random.key(1), x, ratio)
  masked, mask, x = np.asarray(masked), np.asarray(mask), np.asarray(x)
  assert masked.shape == x.shape and masked.dtype == x.dtype
  assert mask.shape == (c,) and mask.dtype == np.float32
  zeroed = mask == 1
  assert zeroed.sum() == int(ratio * c)
  # One subset for the whole batch: the same channels are zero in every sample and token, and
  # every other value is unchanged.
  flat, original = masked.reshape(-1, c), x.reshape(-1, c)
  np.testing.assert_array_equal(flat[:, zeroed], 0.0)
  np.testing.assert_array_equal(flat[:, ~zeroed], original[:, ~zeroed])
  np.testing.assert_array_equal((flat == 0).all(axis=0), zeroed)


def test_channel_masking_deterministic_per_key_and_uniform():
  x = jnp.ones((2, 3, 20))
  a = channel_masking(jax.random.key(0), x, 0.6)
  b = channel_masking(jax.random.key(0), x, 0.6)
  c = channel_masking(jax.random.key(1), x, 0.6)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], c[1])
  # Each channel is zeroed with probability int(0.6 * 20) / 20 = 0.6 (4000 draws: std 0.008).
  masks = jax.jit(jax.vmap(lambda k: channel_masking(k, x, 0.6)[1]))(
      jax.random.split(jax.random.key(2), 4000))
  np.testing.assert_array_equal(np.asarray(masks).sum(axis=1), 12)
  np.testing.assert_allclose(np.asarray(masks).mean(axis=0), 0.6, atol=0.04)


def test_channel_masking_errors():
  with pytest.raises(ValueError, match="ratio must be in"):
    channel_masking(jax.random.key(0), jnp.ones((2, 4)), 1.5)
  with pytest.raises(ValueError, match=r"channel axis.*\(4,\)"):
    channel_masking(jax.random.key(0), jnp.ones((4,)), 0.5)

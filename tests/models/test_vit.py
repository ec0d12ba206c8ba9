"""Tests for jaxmed.models.vit (parity with MONAI / timm is in tests/interop/test_vit.py)."""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.models.blocks import PatchConv
from jaxmed.models.vit import (VIT_VARIANTS, MAEDecoder, MAEEncoder, MaskedAutoencoderViT, ViT,
                               grid_to_tokens, patchify, sincos_block_dims, sincos_pos_embedding,
                               tokens_to_grid, unpatchify, vit)
from jaxmed.pretext.masking import mae_forward, random_masking, restore_ids


def _fill(shapes, seed=0):
  """Variables from a ``jax.eval_shape`` template, filled from NumPy (no init compile).

  Kernels ~ N(0, 1/fan_in), biases and tokens small, LayerNorm scales around 1 (randomised, so
  that the norms are exercised).
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name == "scale":
      value = 1.0 + 0.3 * rng.normal(size=leaf.shape)
    else:
      value = 0.3 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _init(model, *args, seed=0, **kwargs):
  return _fill(jax.eval_shape(functools.partial(model.init, **kwargs), jax.random.key(0), *args),
               seed)


def _random(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


TINY = dict(embed_dim=24, depth=2, num_heads=4, mlp_dim=40)


# --------------------------------------------------------------------------------------------
# Variants and parameter layout.


@pytest.mark.parametrize("name, count", [
    ("B/16", 86_567_656),  # timm vit_base_patch16_224
    ("Ti/16", 5_717_416),  # timm vit_tiny_patch16_224
])
def test_variant_parameter_counts(name, count):
  model = vit(name, num_classes=1000)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  assert _count(shapes) == count
  params = shapes["params"]
  cfg = VIT_VARIANTS[name]
  assert params["pos_embedding"].shape == (1, 14, 14, cfg["embed_dim"])
  assert params["cls_pos_embedding"].shape == (1, 1, cfg["embed_dim"])
  assert f"block_{cfg['depth'] - 1}" in params and f"block_{cfg['depth']}" not in params


def test_vit_ae_plus_plus_shapes():
  # The MAE defaults are ViT-AE++'s: a ViT-B/8 3D encoder (no head, fixed sin-cos positions)
  # and an 8 x 512 x 16-head decoder. The parameter shapes do not depend on the volume size.
  model = MaskedAutoencoderViT()
  x = jax.ShapeDtypeStruct((1, 96, 96, 96, 1), jnp.float32)
  assert model.num_tokens(x.shape[1:-1]) == 1728
  ids = jax.ShapeDtypeStruct((1, 432), jnp.int32)
  restore = jax.ShapeDtypeStruct((1, 1728), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), x, ids, restore)["params"]
  enc, dec = params["encoder"], params["decoder"]
  d = 768
  block = 12 * d * d + 13 * d  # qkv, proj, fc1, fc2 (ratio 4) with biases, two LayerNorms
  assert _count(enc) == (8**3 * d + d) + d + 12 * block + 2 * d  # patch, cls, blocks, norm
  assert enc["patch_embed"]["kernel"].shape == (8, 8, 8, 1, d)
  assert "pos_embedding" not in enc and "block_11" in enc and "block_12" not in enc
  assert dec["embed"]["kernel"].shape == (d, 512)
  assert dec["mask_token"].shape == (1, 1, 512)
  assert dec["block_7"]["attn"]["qkv"]["kernel"].shape == (512, 1536)
  assert "block_8" not in dec
  assert dec["pred"]["kernel"].shape == (512, 512)  # 8^3 voxels x 1 channel


def test_unknown_variant():
  with pytest.raises(ValueError, match="unknown ViT variant 'X/16'"):
    vit("X/16")


# --------------------------------------------------------------------------------------------
# Patches and token grids.


@pytest.mark.parametrize("shape, patch", [((2, 6, 8, 3), (3, 2)), ((1, 4, 6, 2, 2), 2)])
def test_patchify_unpatchify_round_trip(shape, patch):
  x = _random(shape)
  tokens = patchify(x, patch)
  d = len(shape) - 2
  p = (patch,) * d if isinstance(patch, int) else patch
  grid = tuple(s // q for s, q in zip(shape[1:-1], p))
  assert tokens.shape == (shape[0], math.prod(grid), math.prod(p) * shape[-1])
  np.testing.assert_array_equal(unpatchify(tokens, patch, shape[1:-1]), x)
  # MAE order: token t = row-major grid index, vector = patch flattened as (p_0, ..., C).
  x_np, t_np = np.asarray(x), np.asarray(tokens)
  for t in (0, 1, math.prod(grid) - 1):
    g = np.unravel_index(t, grid)
    patch_block = x_np[(0,) + tuple(slice(gi * q, (gi + 1) * q) for gi, q in zip(g, p))]
    np.testing.assert_array_equal(t_np[0, t], patch_block.reshape(-1))


def test_patch_embed_is_a_strided_conv():
  # The ViT's patch_embed is a blocks.PatchConv (kernel == stride), tokens in grid order.
  x = _random((2, 6, 4, 8, 3))
  layer = PatchConv(5, (3, 2, 4))
  variables = _init(layer, x)
  y = grid_to_tokens(layer.apply(variables, x))
  kernel = variables["params"]["kernel"]
  conv = jax.lax.conv_general_dilated(x, kernel, (3, 2, 4), "VALID",
                                      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  conv = conv + variables["params"]["bias"]
  np.testing.assert_allclose(y, grid_to_tokens(conv), atol=1e-5)


def test_tokens_grid_round_trip():
  grid = _random((2, 3, 4, 5, 6))
  tokens = grid_to_tokens(grid)
  assert tokens.shape == (2, 60, 6)
  np.testing.assert_array_equal(tokens_to_grid(tokens, (3, 4, 5)), grid)
  with_cls = jnp.concatenate([jnp.ones((2, 1, 6)), tokens], axis=1)
  np.testing.assert_array_equal(tokens_to_grid(with_cls, (3, 4, 5)), grid)
  with pytest.raises(ValueError, match=r"\(N, 60 or 61, D\).*\(2, 59, 6\)"):
    tokens_to_grid(tokens[:, 1:], (3, 4, 5))


def test_patchify_errors():
  with pytest.raises(ValueError, match=r"divisible by patch_size=\(4, 4\).*\(6, 8\)"):
    patchify(jnp.zeros((1, 6, 8, 1)), 4)
  with pytest.raises(ValueError, match="sequence of 2 ints"):
    patchify(jnp.zeros((1, 8, 8, 1)), (4, 4, 4))
  with pytest.raises(ValueError, match=r"\(N, 4, prod\(patch_size\) \* C\)"):
    unpatchify(jnp.zeros((1, 5, 16)), 4, (8, 8))


# --------------------------------------------------------------------------------------------
# Sin-cos position tables.


@pytest.mark.parametrize("grid, dim", [((3, 5), 32), ((2, 3, 4), 48), ((4, 2, 3), 36)])
def test_sincos_matches_monai(grid, dim):
  import torch
  from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # torch.meshgrid indexing
    expected = build_sincos_position_embedding(list(grid), dim, len(grid)).detach()
  assert isinstance(expected, torch.Tensor)
  ours = sincos_pos_embedding(grid, dim)
  assert ours.shape == (math.prod(grid), dim) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, expected.numpy()[0], atol=1e-6)
  with_cls = sincos_pos_embedding(grid, dim, cls_token=True)
  np.testing.assert_array_equal(with_cls[0], 0.0)
  np.testing.assert_array_equal(with_cls[1:], ours)


def test_sincos_vit_ae_split_for_dims_not_divisible_by_6():
  # ViT-AE++ splits 3D channels as (r, r, D - 2r), r = D // 3 rounded up to even.
  assert sincos_block_dims(512, 3) == (170, 170, 172)
  assert sincos_block_dims(48, 3) == (16, 16, 16)
  assert sincos_block_dims(8, 3) == (2, 2, 4)
  table = sincos_pos_embedding((2, 3, 4), 8)
  # Token (i, j, k) = (1, 2, 3): blocks [axis 1 | axis 0 | axis 2], each [sin..., cos...].
  t = np.ravel_multi_index((1, 2, 3), (2, 3, 4))
  w = 1.0 / 10000**0.5  # second frequency of the 4-channel block (n = 2)
  expected = [np.sin(2), np.cos(2), np.sin(1), np.cos(1), np.sin(3), np.sin(3 * w), np.cos(3),
              np.cos(3 * w)]
  np.testing.assert_allclose(table[t], expected, atol=1e-6)


@pytest.mark.parametrize("grid, dim, match", [
    ((2, 2, 2), 45, "even embedding dim"),
    ((2, 2, 2), 4, "even embedding dim"),
    ((2, 2), 30, "divisible by 4"),
    ((2,), 8, "2D or 3D grid"),
])
def test_sincos_errors(grid, dim, match):
  with pytest.raises(ValueError, match=match):
    sincos_pos_embedding(grid, dim)


# --------------------------------------------------------------------------------------------
# Forward passes.


def _tiny_vit(**kwargs):
  return ViT(**{"patch_size": (2, 4, 2), "spatial_dims": 3, "pos_embed": "sincos", **TINY,
                **kwargs})


# One jitted apply shared by the tests that use the tiny 3D ViT (one compile). Its dropout rates
# are set: in eval mode they must do nothing (and need no 'dropout' rng).
TINY_3D = _tiny_vit(dropout_rate=0.3, attention_dropout_rate=0.3, drop_path_rate=0.3)
tiny_3d_apply = jax.jit(functools.partial(TINY_3D.apply, return_features=True))


def test_features_and_mae_encoder_equivalence():
  encoder = MAEEncoder(patch_size=(2, 4, 2), spatial_dims=3, dropout_rate=0.3, **TINY)
  x = _random((2, 4, 8, 6, 3))
  variables = _init(TINY_3D, x)
  ids = jnp.asarray(np.stack([np.random.default_rng(s).permutation(12) for s in (0, 1)]),
                    jnp.int32)
  assert jax.tree_util.tree_structure(_init(encoder, x, ids)) == \
      jax.tree_util.tree_structure(variables)
  out, feats = tiny_3d_apply(variables, x)
  assert out.shape == (2, 13, 24)
  assert set(feats) == {"block_0", "block_1", "tokens", "cls", "pooled"}
  assert feats["block_1"].shape == (2, 13, 24)
  np.testing.assert_array_equal(feats["tokens"], out)
  np.testing.assert_array_equal(feats["cls"], out[:, 0])
  np.testing.assert_array_equal(feats["pooled"], out[:, 0])
  grid = tokens_to_grid(feats["block_0"], TINY_3D.grid_shape(x.shape[1:-1]))
  assert grid.shape == (2, 2, 2, 3, 24)

  # With mask ratio 0 (all tokens kept, in any order) the MAE encoder is the ViT, permuted.
  latent, enc_feats = jax.jit(functools.partial(encoder.apply, return_features=True))(
      variables, x, ids)
  idx = np.asarray(ids)[..., None]
  expected = np.concatenate([np.asarray(out)[:, :1],
                             np.take_along_axis(np.asarray(out)[:, 1:], idx, 1)], axis=1)
  np.testing.assert_allclose(latent, expected, atol=1e-5)
  np.testing.assert_allclose(
      enc_feats["block_0"][:, 1:], np.take_along_axis(np.asarray(feats["block_0"])[:, 1:], idx, 1),
      atol=1e-5)
  # Without ids_keep the standalone encoder keeps every token in grid order: it is the ViT.
  all_tokens, all_feats = jax.jit(functools.partial(encoder.apply, return_features=True))(
      variables, x)
  np.testing.assert_allclose(all_tokens, out, atol=1e-6)
  assert set(all_feats) == set(feats)


def test_masked_autoencoder_outputs():
  model = MaskedAutoencoderViT(patch_size=4, spatial_dims=2, mask_ratio=0.5, decoder_embed_dim=16,
                               decoder_depth=1, decoder_num_heads=2, **TINY)
  x = _random((2, 8, 12, 2))
  key = jax.random.key(7, impl="rbg")
  assert model.num_tokens(x.shape[1:-1]) == 6
  ids_keep, ids_restore, mask = random_masking(key, 2, 6, model.mask_ratio)
  variables = _init(model, x, ids_keep, ids_restore)
  assert set(variables["params"]) == {"encoder", "decoder"}
  fn = jax.jit(functools.partial(model.apply, return_features=True))
  pred, feats = fn(variables, x, ids_keep, ids_restore)
  assert pred.shape == (2, 6, 4 * 4 * 2) and pred.dtype == jnp.float32
  mask = np.asarray(mask)
  np.testing.assert_array_equal(mask.sum(axis=1), 3)
  assert feats["latent"].shape == (2, 4, 24)
  assert feats["cls"].shape == (2, 24) and feats["pooled"].shape == (2, 24)
  assert {"block_0", "block_1", "decoder_block_0", "decoder_tokens"} <= set(feats)
  assert feats["decoder_block_0"].shape == (2, 7, 16)
  # The encoder half run on its own, from the model's own config and params, gives the latent.
  encoder = model.make_encoder()
  assert isinstance(encoder, MAEEncoder) and encoder.embed_dim == 24 and encoder.patch_size == 4
  latent = jax.jit(encoder.apply)({"params": variables["params"]["encoder"]}, x, ids_keep)
  np.testing.assert_allclose(latent, feats["latent"], atol=1e-5)
  # mae_forward draws the same mask from the same key and runs the same model.
  forward = jax.jit(functools.partial(mae_forward, model, return_features=True))
  pred_f, mask_f, feats_f = forward(variables, x, key)
  np.testing.assert_array_equal(mask_f, mask)
  np.testing.assert_array_equal(pred_f, pred)
  np.testing.assert_array_equal(feats_f["latent"], feats["latent"])
  # Nothing depends on the content of the masked patches.
  voxel_mask = np.repeat(np.repeat(mask.reshape(2, 2, 3), 4, axis=1), 4, axis=2)  # 4x4 patches
  x_b = jnp.where(voxel_mask[..., None] > 0, 100.0, x)
  pred_b, mask_b, feats_b = forward(variables, x_b, key)
  np.testing.assert_array_equal(mask_b, mask)
  np.testing.assert_allclose(feats_b["latent"], feats["latent"], atol=1e-6)
  np.testing.assert_allclose(pred_b, pred, atol=1e-5)
  pred_c, mask_c, _ = forward(variables, x, jax.random.key(8, impl="rbg"))
  assert not np.array_equal(mask_c, mask)
  # The mask from the indices alone (restore_ids) is the same; so is the prediction.
  restore2, mask2 = restore_ids(ids_keep, 6)
  np.testing.assert_array_equal(mask2, mask)
  np.testing.assert_allclose(fn(variables, x, ids_keep, restore2)[0], pred, atol=1e-6)
  # The model needs the masking result: no key, no mask drawn inside.
  with pytest.raises(TypeError, match="ids_restore"):
    jax.eval_shape(model.apply, variables, x, ids_keep)
  with pytest.raises(ValueError, match=r"ids_restore must have shape \(N, T\) = \(2, 6\)"):
    jax.eval_shape(model.apply, variables, x, ids_keep, ids_restore[:, :5])


def test_bfloat16_compute_float32_outputs():
  model = _tiny_vit(dtype=jnp.bfloat16)
  x = _random((2, 4, 8, 6, 3))
  variables = _init(model, x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
  tokens, feats = jax.jit(functools.partial(model.apply, return_features=True))(variables, x)
  assert tokens.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in feats.values())
  reference = tiny_3d_apply(variables, x)[0]
  err = np.abs(np.asarray(tokens) - np.asarray(reference))
  assert np.max(err) < 0.25 and np.mean(err) < 0.03


def test_dropout_drop_path_and_remat():
  kwargs = dict(dropout_rate=0.2, attention_dropout_rate=0.2, drop_path_rate=0.3,
                pos_embed="learned", class_token=False, num_classes=2)
  tiny = {**TINY, "depth": 1}
  model = ViT(patch_size=4, **tiny, **kwargs)
  rematted = ViT(patch_size=4, remat=True, **tiny, **kwargs)
  x = _random((3, 8, 8, 1))
  variables = _init(model, x)
  assert "cls_token" not in variables["params"] and "cls_pos_embedding" not in variables["params"]
  key = functools.partial(jax.random.key, impl="rbg")
  train = jax.jit(functools.partial(rematted.apply, train=True))
  y1 = train(variables, x, rngs={"dropout": key(1)})
  y2 = train(variables, x, rngs={"dropout": key(2)})
  np.testing.assert_array_equal(y1, train(variables, x, rngs={"dropout": key(1)}))
  assert not np.allclose(y1, y2)
  # Rematerialisation changes nothing, random streams included. (Eval mode ignoring dropout is
  # checked by the tiny 3D model, which has dropout rates set.)
  plain = jax.jit(functools.partial(model.apply, train=True))(variables, x,
                                                              rngs={"dropout": key(1)})
  np.testing.assert_allclose(plain, y1, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize("kwargs, shape, match", [
    (dict(), (1, 10, 8, 1), r"\(1, 10, 8, 1\).*divisible by patch_size=\(4, 4\)"),
    (dict(spatial_dims=3), (1, 8, 8, 1), "ndim 5"),
    (dict(spatial_dims=1), (1, 8, 1), "spatial_dims must be 2 or 3"),
    (dict(spatial_dims=3, pos_embed="sincos", embed_dim=4, num_heads=2), (1, 8, 8, 8, 1),
     "pos_embed='sincos'.*even embedding dim >= 6"),
    (dict(pos_embed="sincos", embed_dim=18, num_heads=3), (1, 8, 8, 1), "divisible by 4"),
    (dict(embed_dim=30), (1, 8, 8, 1), "divisible by num_heads"),
    (dict(pos_embed="rope"), (1, 8, 8, 1), "pos_embed must be one of"),
    (dict(class_token=False, pool="cls"), (1, 8, 8, 1), "pool='cls' needs class_token"),
    (dict(pool="max"), (1, 8, 8, 1), "pool must be one of"),
    (dict(dropout_rate=1.0), (1, 8, 8, 1), "dropout_rate must be in"),
    (dict(patch_size=(4, 4, 4)), (1, 8, 8, 1), "sequence of 2 ints"),
])
def test_validation_errors(kwargs, shape, match):
  model = ViT(**{"patch_size": 4, **TINY, **kwargs})
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


def test_3d_sincos_needs_valid_dim():
  # 3D sin-cos needs an even width (>= 6); MONAI accepts only multiples of 6.
  model = ViT(patch_size=4, embed_dim=15, depth=1, num_heads=3, spatial_dims=3, pos_embed="sincos")
  with pytest.raises(ValueError, match="pos_embed='sincos'.*got dim=15"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 8, 1)))


def test_learned_grid_mismatch_and_ids_keep_errors():
  model = ViT(patch_size=4, **TINY)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match=r"patch grid \(3, 2\).*\(1, 2, 2, 24\)"):
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 12, 8, 1)))
  with pytest.raises(ValueError, match=r"ids_keep must have shape \(N=1, K\).*\(1, 5\)"):
    jax.eval_shape(functools.partial(model.apply, ids_keep=jnp.zeros((1, 5), jnp.int32)),
                   variables, jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="ids_keep must be integer"):
    jax.eval_shape(functools.partial(model.apply, ids_keep=jnp.zeros((1, 2))), variables,
                   jnp.zeros((1, 8, 8, 1)))


def test_decoder_errors():
  decoder = MAEDecoder(patch_size=2, spatial_dims=2, embed_dim=16, depth=1, num_heads=2)

  def init(decoder, latent_shape, restore_shape, grid):
    latent = jnp.zeros(latent_shape)
    restore = jnp.zeros(restore_shape, jnp.int32)
    return jax.eval_shape(lambda k: decoder.init(k, latent, restore, grid), jax.random.key(0))

  assert init(decoder, (1, 3, 8), (1, 4), (2, 2))["params"]["pred"]["kernel"].shape == (16, 4)
  with pytest.raises(ValueError, match=r"ids_restore must have shape \(N, T\) = \(1, 4\)"):
    init(decoder, (1, 3, 8), (1, 5), (2, 2))
  with pytest.raises(ValueError, match="grid_shape must have spatial_dims=2"):
    init(decoder, (1, 3, 8), (1, 4), (4,))
  with pytest.raises(ValueError, match=r"latent must be \(N, 1 \+ K, D\)"):
    init(decoder, (1, 6, 8), (1, 4), (2, 2))
  bad = MAEDecoder(patch_size=2, spatial_dims=3, embed_dim=15, depth=1, num_heads=3)
  with pytest.raises(ValueError, match="decoder pos_embed='sincos'"):
    init(bad, (1, 3, 8), (1, 8), (2, 2, 2))

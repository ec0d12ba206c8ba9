"""Tests for jaxmed.models.registry: every model builds by name; argument errors are helpful."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from jaxmed.models import (MODELS, MaskedAutoencoderViT, PatchGANDiscriminator, ResNet,
                           SwinUNETR, UNet, UNetGenerator, ViT, build_model, model_arguments)

_IDS = (jnp.asarray([[3, 0]], jnp.int32), jnp.asarray([[1, 2, 3, 0]], jnp.int32))
_TINY_VIT = dict(patch_size=4, spatial_dims=2, embed_dim=8, depth=1, num_heads=2, mlp_dim=8)
_SWIN = dict(depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2, spatial_dims=2)

# name -> (kwargs, input shape, extra init arguments, expected class)
CASES = {
    "unet": (dict(out_channels=2, features=[4, 8]), (1, 8, 8, 1), (), UNet),
    "ssfd_unet": (dict(chans=2, num_pool_layers=1, num_groups=2), (1, 8, 8, 1), (), None),
    "ssfd_encoder": (dict(chans=2, num_pool_layers=1, num_groups=1), (1, 8, 8, 1), (), None),
    "resnet": (dict(depth=18, block_inplanes=[2, 2, 4, 4]), (1, 16, 16, 1), (), ResNet),
    "resnet_custom": (dict(block="bottleneck", layers=[1, 1, 1, 1], block_inplanes=[2, 2, 2, 2],
                           spatial_dims=3), (1, 8, 8, 8, 1), (), ResNet),
    "vgg16": (dict(dtype="bfloat16"), (1, 32, 32, 3), (), None),
    "vit": (dict(variant="Ti/16", num_classes=3, **_TINY_VIT), (1, 8, 8, 1), (), ViT),
    "mae": (dict(decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2, **_TINY_VIT),
            (1, 8, 8, 1), _IDS, MaskedAutoencoderViT),
    "mae_encoder": (_TINY_VIT, (1, 8, 8, 1), _IDS[:1], None),
    "swin_unetr": (dict(out_channels=2, feature_size=12, **_SWIN), (1, 32, 32, 1), (), SwinUNETR),
    "swin_transformer": (dict(embed_dim=6, **_SWIN), (1, 16, 16, 1), (), None),
    "pix2pix_generator": (dict(out_channels=1, num_downs=5, ngf=2), (1, 32, 32, 1), (),
                          UNetGenerator),
    "patchgan": (dict(ndf=2, n_layers=1, norm="instance"), (1, 16, 16, 2), (),
                 PatchGANDiscriminator),
}


def test_every_model_has_a_case():
  assert set(CASES) == set(MODELS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_builds_inits_and_applies(name):
  # Abstract evaluation runs the whole init and forward code (argument checks, shapes) without
  # compiling; the built modules' numerics are tested in their own test files.
  kwargs, shape, extra, cls = CASES[name]
  model = build_model(name, **kwargs)
  assert cls is None or isinstance(model, cls)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x, *extra)
  assert jax.tree_util.tree_leaves(variables["params"])
  out = jax.eval_shape(model.apply, variables, x, *extra)
  assert all(leaf.shape[0] == 1 for leaf in jax.tree_util.tree_leaves(out))
  if name == "vgg16":
    assert model.dtype == jnp.bfloat16


def test_built_model_runs():
  model = build_model("unet", out_channels=2, features=[4, 8], norm="group", num_groups=2)
  x = jnp.ones((1, 8, 8, 1))
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)
  y = jax.jit(model.apply)(variables, x)
  assert y.shape == (1, 8, 8, 2) and bool(jnp.all(jnp.isfinite(y)))


def test_conversions():
  model = build_model("unet", out_channels=2, features=[4, 8], dtype="bfloat16",
                      param_dtype="float32")
  assert model.features == (4, 8) and model.dtype == jnp.bfloat16
  assert model.param_dtype == jnp.float32
  swin = build_model("swin_unetr", out_channels=1, norm_name=["group", {"num_groups": 3}],
                     depths=[2, 2, 2, 2])
  assert swin.norm_name == ("group", {"num_groups": 3}) and swin.depths == (2, 2, 2, 2)
  assert build_model("resnet", depth=34).layers == (3, 4, 6, 3)
  assert build_model("resnet", depth=50).block == "bottleneck"
  small = build_model("vit", variant="S/16", depth=2)
  assert (small.embed_dim, small.num_heads, small.depth) == (384, 6, 2)
  assert build_model("vit").embed_dim == 768  # ViT's own defaults without a variant
  # A config section with ``name`` and the model's fields builds directly.
  section = ml_collections.ConfigDict(dict(name="ssfd_unet", chans=10, num_pool_layers=2,
                                           dtype="float16"))
  model = build_model(**section)
  assert (model.chans, model.num_pool_layers, model.dtype) == (10, 2, jnp.float16)


def test_unknown_name_lists_the_known_ones():
  with pytest.raises(ValueError, match="unknown model 'unet3d'") as info:
    build_model("unet3d")
  assert str(sorted(MODELS)) in str(info.value)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match=r"model 'unet' \(UNet\) has no argument\(s\) 'featurs' "
                     r"\(did you mean 'features'\?\); valid arguments: \[") as info:
    build_model("unet", out_channels=2, featurs=(4, 8))
  assert "'out_channels'" in str(info.value) and "'name'" not in str(info.value)
  with pytest.raises(ValueError, match=r"'block'.*valid arguments.*'depth'"):
    build_model("resnet", depth=18, block="basic")  # the factory sets it
  with pytest.raises(ValueError, match=r"model 'unet' \(UNet\) needs argument\(s\) "
                     r"\['out_channels'\]"):
    build_model("unet")
  with pytest.raises(ValueError, match=r"dtype must be one of \['bfloat16', 'float16', "
                     r"'float32'\].*'float64'"):
    build_model("unet", out_channels=1, dtype="float64")
  with pytest.raises(ValueError, match=r"depth must be one of \(18, 34, 50\); got depth=101"):
    build_model("resnet", depth=101)
  with pytest.raises(ValueError, match="unknown variant 'X/16'"):
    build_model("vit", variant="X/16")


def test_model_arguments():
  resnet_args = model_arguments("resnet")
  assert "depth" in resnet_args and "block" not in resnet_args and "layers" not in resnet_args
  assert "variant" in model_arguments("vit") and "patch_size" in model_arguments("vit")
  assert "mask_ratio" in model_arguments("mae")
  assert list(model_arguments("unet")) == sorted(model_arguments("unet"))

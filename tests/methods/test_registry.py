"""Every config file names a registered method that builds, and every pretext method shows its
(input, target) pair through `pretext_example`."""

import re

import flax.traverse_util
import jax
import numpy as np
import pytest

from helpers import config_for

from jaxmed.config import load_config, method_config, set_model
from jaxmed.data import datasets, synthetic
from jaxmed.methods import METHODS, get_method

EXPECTED = {"context_prediction": "context_prediction", "coper_synthesis": "coper_synthesis",
            "dae": "dae", "simmim": "simmim",
            "finetune": "segmentation", "reconstruction": "reconstruction",
            "restoration": "restoration", "seg3d": "segmentation", "si": "si",
            "simsiam": "simsiam", "swav": "swav", "swin_ssl": "swin_ssl",
            "vit_ae_pp": "vit_ae_pp"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_builds_its_method(name):
  config = load_config(f"{name}:size=small")
  assert config.method == EXPECTED[name]
  method = get_method(config)
  assert isinstance(method, METHODS[EXPECTED[name]])


def test_every_config_file_is_covered():
  from jaxmed.config import shipped_configs
  assert shipped_configs() == sorted(EXPECTED)


def test_unknown_method_is_named():
  config = load_config("si")
  config.method = "simclr"
  with pytest.raises(ValueError, match="simclr"):
    get_method(config)


@pytest.fixture(scope="module")
def slices():
  subjects = synthetic.make_subjects(3, seed=0, shape=(16, 32, 32))
  return datasets.slice_view(subjects, min_foreground=0.2)


@pytest.mark.parametrize("method, overrides, inputs_channels, target_is_image", [
    ("restoration", {"pretext.corruption": "inpaint", "pretext.grid": 4}, 4, True),
    ("restoration", {"pretext.corruption": "intensity", "pretext.grid": 4}, 4, True),
    ("si", {"pretext.strategy": "cross"}, 8, True),
    ("si", {"pretext.strategy": "denoise"}, 8, True),
    ("context_prediction", {"data.modalities": ("t2",), "model.num_groups": 10}, 1, False),
])
def test_pretext_example_pairs(slices, method, overrides, inputs_channels, target_is_image):
  config = config_for(method, overrides)
  method = get_method(config)
  channels = len(config.data.modalities)
  index = [0, 1, 2, 3]
  batch = {k: v[index] for k, v in slices.items()}
  batch["image"] = batch["image"][..., :channels] if channels == 1 else batch["image"]
  transform = method.example_transform(slices)
  if transform is not None:
    rng = np.random.default_rng(0)
    examples = [transform({k: v[i] for k, v in batch.items()}, rng) for i in range(4)]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  inputs, target = jax.jit(method.pretext_example)(jax.random.PRNGKey(0), batch)
  assert inputs.shape == (4, 32, 32, inputs_channels)
  assert target.shape == (4, 32, 32, channels)
  assert not np.allclose(inputs[..., :channels], target)  # the input is corrupted
  if target_is_image:
    np.testing.assert_array_equal(target, batch["image"])
  else:  # context prediction restores the z-scored image
    z = np.asarray(target)
    np.testing.assert_allclose(z.mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(1, 2), ddof=1), 1.0, rtol=1e-4)
  # Deterministic per key.
  again, _ = jax.jit(method.pretext_example)(jax.random.PRNGKey(0), batch)
  np.testing.assert_array_equal(inputs, again)


def test_model_name_and_arguments_are_checked_by_the_registry():
  with pytest.raises(ValueError, match=r"unknown model 'unett'; known models: .*'unet'"):
    get_method(config_for("restoration", {"model.name": "unett"}))
  config = config_for("context_prediction", {"model.name": "unet"})  # SSFD fields on a UNet
  with pytest.raises(ValueError, match="chans"):
    get_method(config)


def test_seg3d_config_choices():
  tissues = load_config("seg3d:target=tissues,input=tile")
  assert tissues.data.pathology == "brain_tissues" and tissues.data.modalities == ("t1",)
  assert tissues.init.replace == (r"[^/]+/output_conv/.*",)
  tile = re.compile(tissues.init.tile[0])
  assert tile.fullmatch("params/input_conv/conv/kernel")
  assert not tile.fullmatch("params/input_conv/norm/scale")
  assert not tile.fullmatch("params/encoder_1/conv/kernel")
  assert tissues.data.view == "crop" and tissues.finetune.folds == 5
  for bad in ("target=organs", "input=copy"):
    with pytest.raises(ValueError, match=bad.split("=")[0]):
      load_config(f"seg3d:{bad}")


def test_set_model_switches_the_model_section_and_checks_its_fields():
  config = method_config("segmentation")
  set_model(config, "swin_unetr", feature_size=12)
  assert config.model.name == "swin_unetr" and config.model.feature_size == 12
  assert config.model.window_size == 7 and config.model.dtype == "float32"
  # The method derives these; the section leaves them out.
  assert "out_channels" not in config.model and "spatial_dims" not in config.model
  with pytest.raises(AttributeError):  # locked like the rest: no new fields
    config.model.features = (4, 8)
  with pytest.raises(ValueError, match=r"no field\(s\) \['features'\]"):
    set_model(method_config("segmentation"), "swin_unetr", features=(4, 8))
  with pytest.raises(ValueError, match=r"no field\(s\) \['out_channels'\].*derived"):
    set_model(method_config("segmentation"), "swin_unetr", out_channels=3)
  with pytest.raises(ValueError, match="unknown model 'swin'"):
    set_model(method_config("segmentation"), "swin")


def test_seg3d_swin_unetr_config_builds_a_swin_unetr_with_its_transfer_layers():
  from jaxmed.models import SwinUNETR  # pylint: disable=g-import-not-at-top
  config = load_config("seg3d:model=swin_unetr,input=tile,size=small")
  assert config.model.feature_size == 12
  method = get_method(config)
  assert isinstance(method.model, SwinUNETR) and method.model.out_channels == 3
  assert method.model.spatial_dims == 3
  variables = jax.eval_shape(method.model.init, jax.random.PRNGKey(0),
                             np.zeros((1, 32, 32, 32, 4), np.float32))
  paths = ["/".join(k) for k in flax.traverse_util.flatten_dict(variables)]
  tiled = [p for p in paths if re.fullmatch(config.init.tile[0], p)]
  assert sorted(tiled) == ["params/encoder1/layer/conv1/kernel",
                           "params/encoder1/layer/conv3/kernel",
                           "params/swinViT/patch_embed/proj/kernel"]
  assert sorted(p for p in paths if re.fullmatch(config.init.replace[0], p)) == [
      "params/out/bias", "params/out/kernel"]
  assert load_config("seg3d:model=swin_unetr").model.feature_size == 48
  with pytest.raises(ValueError, match="model"):
    load_config("seg3d:model=vit")

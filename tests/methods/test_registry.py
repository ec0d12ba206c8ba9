"""Every config file names a registered method that builds, and every pretext method shows its
(input, target) pair through `pretext_example`."""

import os
import runpy

import jax
import numpy as np
import pytest

from jaxmed.data import datasets, synthetic
from jaxmed.methods import METHODS, get_method

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
EXPECTED = {"context_prediction.py": "context_prediction", "finetune.py": "segmentation",
            "reconstruction.py": "reconstruction", "restoration.py": "restoration",
            "si.py": "si"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_builds_its_method(name):
  config = runpy.run_path(os.path.join(CONFIGS, name))["get_config"]("size=small")
  assert config.method == EXPECTED[name]
  method = get_method(config)
  assert isinstance(method, METHODS[EXPECTED[name]])


def test_every_config_file_is_covered():
  assert sorted(f for f in os.listdir(CONFIGS) if f.endswith(".py")) == sorted(EXPECTED)


def test_unknown_method_is_named():
  config = runpy.run_path(os.path.join(CONFIGS, "si.py"))["get_config"]("")
  config.method = "simclr"
  with pytest.raises(ValueError, match="simclr"):
    get_method(config)


@pytest.fixture(scope="module")
def slices():
  subjects = synthetic.make_subjects(3, seed=0, shape=(16, 32, 32))
  return datasets.slice_view(subjects, min_foreground=0.2)


@pytest.mark.parametrize("overrides, inputs_channels, target_is_image", [
    ({"method": "restoration", "pretext.corruption": "inpaint"}, 4, True),
    ({"method": "restoration", "pretext.corruption": "intensity"}, 4, True),
    ({"method": "si", "pretext.strategy": "cross"}, 8, True),
    ({"method": "si", "pretext.strategy": "denoise"}, 8, True),
    ({"method": "context_prediction", "data.modalities": ("t2",), "model.num_groups": 10},
     1, False),
])
def test_pretext_example_pairs(slices, overrides, inputs_channels, target_is_image):
  from jaxmed.cli import apply_overrides
  from jaxmed.train.defaults import base_config
  config = apply_overrides(base_config(), {**overrides, "pretext.grid": 4})
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

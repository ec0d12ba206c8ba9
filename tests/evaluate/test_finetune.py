import json

import jax
import numpy as np
import pytest

from helpers import tiny_config as make_tiny_config

from jaxmed.data import datasets
from jaxmed.evaluate import evaluators, finetune
from jaxmed.methods import RestorationMethod, SegmentationMethod
from jaxmed.train import checkpoint, trainer
from jaxmed.train import init as init_lib


def _variables(method, channels):
  batch = {"image": np.zeros((2, 16, 16, channels), np.float32)}
  return jax.device_get(trainer.jit_init(method.init)(jax.random.PRNGKey(0), batch))


def test_transfer_replaces_input_and_output_layers_only(tiny_config):
  pre = _variables(RestorationMethod(tiny_config), 8)  # e.g. 2 mixtures x 4 modalities
  ft_config = make_tiny_config("segmentation")
  fresh = _variables(SegmentationMethod(ft_config), 4)
  out = init_lib.transfer(pre, fresh, replace=ft_config.init.replace)
  for name, value in out["params"].items():
    src = fresh if name in ("input_conv", "output_conv") else pre
    jax.tree.map(np.testing.assert_array_equal, value, src["params"][name])
  assert out["params"]["input_conv"]["conv"]["kernel"].shape[-2] == 4
  assert out["params"]["output_conv"]["kernel"].shape[-1] == 3


def test_transfer_lists_mismatches(tiny_config):
  pre = _variables(RestorationMethod(tiny_config), 4)
  tiny_config.model.features = (4, 16)
  fresh = _variables(RestorationMethod(tiny_config), 4)
  with pytest.raises(ValueError, match=r"(?s)bottleneck.*shape"):
    init_lib.transfer(pre, fresh)


def test_pretrain_then_finetune_end_to_end(tiny_config, tmp_path):
  pre = trainer.train(tiny_config, str(tmp_path / "pre"), progress=False)
  ft_config = make_tiny_config("segmentation", init__path=str(tmp_path / "pre"),
                               finetune__num_labeled=2, total_steps=4, eval_every=2)
  result = finetune.finetune(ft_config, str(tmp_path / "ft"), progress=False)
  # The fine-tuned model started from the pre-trained encoder: its first step moved away from
  # the pre-trained weights, not from a fresh initialisation.
  loaded = checkpoint.load_variables(str(tmp_path / "pre"))
  jax.tree.map(np.testing.assert_array_equal, loaded["params"]["bottleneck"],
               jax.device_get(pre.state.params["bottleneck"]))
  assert len(result.labeled_subjects) == 2
  assert set(result.test["mean"]) == {"WT", "TC", "ET", "All"}
  report = json.load(open(tmp_path / "ft" / "test_dice.json"))
  assert report["regions"] == ["WT", "TC", "ET", "All"] and len(report["dice"]) == 1
  records = [json.loads(line) for line in open(tmp_path / "ft" / "metrics.jsonl")]
  assert "val/dice_WT" in records[-1] and records[-1]["step"] == 4


def test_evaluate_subjects_perfect_prediction(monkeypatch):
  config = make_tiny_config("segmentation")
  method = SegmentationMethod(config)
  subjects = datasets.load_splits(config.data)["test"]
  # A model that predicts the truth: patch predict_volume through the method's predict.
  truth = {id(s.image): s.regions for s in subjects}
  monkeypatch.setattr(evaluators, "predict_volume", lambda m, v, image, **kw: truth[id(image)])
  result = evaluators.evaluate_subjects(method, None, subjects)
  finite = result["dice"][np.isfinite(result["dice"])]
  assert finite.size and np.all(finite == 1.0)

"""3D segmentation: exclusive-class and region heads, sliding-window evaluation with flip TTA,
the phantoms' tissue target, and a 3D fine-tuning run from a 3D pre-training checkpoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from helpers import tiny_config

from jaxmed.data import synthetic
from jaxmed.data.subject import CLASS_NAMES, label_regions
from jaxmed.evaluate import evaluators
from jaxmed.losses import softmax_dice_ce_loss
from jaxmed.methods import get_method
from jaxmed.runner import run_config
from jaxmed.train.logging import read_metrics


class PointwiseMethod:
  """A flip-equivariant toy: per-voxel sigmoid of a channel mix (no spatial context)."""

  regions = ("a", "b")

  def __init__(self, config):
    self.config = config

  def probabilities(self, variables, image):
    return jax.nn.sigmoid(image @ variables["w"])

  def decide(self, probs):
    return probs > 0.5


def test_flip_tta_of_an_equivariant_model_equals_no_tta_and_the_direct_prediction():
  config = tiny_config("segmentation", data__view="crop", data__crop_size=(6, 8, 8))
  method = PointwiseMethod(config)
  rng = np.random.default_rng(0)
  variables = {"w": rng.normal(size=(4, 2)).astype(np.float32)}
  volume = rng.normal(size=(1, 9, 13, 11, 4)).astype(np.float32)
  direct = np.asarray(method.probabilities(variables, volume))
  window = dict(evaluators.window_settings(method), mode="gaussian", overlap=0.5)
  assert window["roi_size"] == (6, 8, 8)  # roi_size () = data.crop_size
  plain = evaluators.window_probabilities(method, **{**window, "tta": False})(variables, volume)
  tta = evaluators.window_probabilities(method, **{**window, "tta": True})(variables, volume)
  np.testing.assert_allclose(plain, direct, atol=1e-6)
  np.testing.assert_allclose(tta, plain, atol=1e-6)
  mode, predict = evaluators.segmentation_predictor(method)  # auto: 3D -> windows
  assert mode == "3d"
  np.testing.assert_array_equal(predict(variables, volume), direct > 0.5)


def test_tta_averages_the_flipped_predictions_of_a_model_that_is_not_equivariant():
  config = tiny_config("segmentation", data__view="crop", data__crop_size=(4, 4, 4))
  method = PointwiseMethod(config)
  ramp = jnp.arange(4, dtype=jnp.float32)
  method.probabilities = lambda v, x: x[..., :1] * ramp[:, None, None, None]  # depth-dependent
  volume = np.ones((1, 4, 4, 4, 1), np.float32)
  probs = evaluators.window_probabilities(method, roi_size=(4, 4, 4), tta=True)({}, volume)
  np.testing.assert_allclose(probs[0, :, 0, 0, 0], np.full(4, 1.5), atol=1e-6)  # (r + 3 - r) / 2


def test_exclusive_classes_use_softmax_and_regions_use_sigmoid():
  tissues = get_method(tiny_config("segmentation", data__pathology="brain_tissues",
                                   data__view="crop", data__crop_size=(8, 8, 8)))
  tumour = get_method(tiny_config("segmentation"))
  assert tissues.exclusive and not tumour.exclusive
  assert tissues.model_arguments() == {"out_channels": 8, "spatial_dims": 3}
  assert tumour.model_arguments() == {"out_channels": 3, "spatial_dims": 2}
  rng = np.random.default_rng(1)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 3, 4, 5, 8))), axis=-1)
  np.testing.assert_array_equal(tissues.decide(probs),
                                label_regions(np.argmax(probs, -1), "brain_tissues"))
  labels = rng.integers(0, 8, (2, 4, 4, 4)).astype(np.uint8)
  batch = {"image": rng.normal(size=(2, 4, 4, 4, 4)).astype(np.float32), "label": labels}

  @jax.jit
  def run(batch):
    variables = tissues.init(jax.random.PRNGKey(0), batch)
    loss, metrics, _ = tissues.loss(variables, batch, jax.random.PRNGKey(1), train=False)
    logits, _ = tissues.apply(variables, batch["image"], None, train=False)
    return loss, metrics, softmax_dice_ce_loss(logits, batch["label"].astype(jnp.int32))

  loss, metrics, expected = run(batch)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert set(metrics) == {f"dice_{n}" for n in CLASS_NAMES["brain_tissues"]}


def test_phantom_tissue_target():
  subject, tissues = synthetic.make_subject(3, shape=(16, 20, 16), pathology="brain_tissues",
                                            return_tissues=True)
  tumour = synthetic.make_subject(3, shape=(16, 20, 16))
  np.testing.assert_array_equal(subject.image, tumour.image)  # same phantom, other target
  for k, name in enumerate(synthetic.TISSUES):
    np.testing.assert_array_equal(subject.label == k, tissues[name])
  np.testing.assert_array_equal(subject.label == 7, tumour.label > 0)  # lesion = tumour
  assert subject.regions.shape == (16, 20, 16, 7)


def test_3d_finetuning_from_a_3d_pretraining_checkpoint(tmp_path):
  """Restoration (a round-one method) pre-trains a 3D UNet on crops; the tissue task fine-tunes
  it (new input / output layers) and is evaluated by sliding windows with flip TTA."""
  shape = dict(data__num_subjects=5, data__shape=(16, 24, 20), data__num_val=1,
               data__num_test=1, data__view="crop", data__crop_size=(16, 16, 16))
  run_config(tiny_config("restoration", total_steps=2, batch_size=4, **shape),
             str(tmp_path / "pre"), progress=False)
  config = tiny_config("segmentation", total_steps=2, batch_size=4, eval_every=2,
                       init__path=str(tmp_path / "pre"), data__pathology="brain_tissues",
                       finetune__tta=True, data__fg_fraction=0.5, **shape)
  result = run_config(config, str(tmp_path / "ft"), progress=False)
  regions = CLASS_NAMES["brain_tissues"]
  assert result.test["dice"].shape == (1, len(regions) + 1)  # one test subject; + All
  assert list(result.test["regions"]) == [*regions, "All"]
  records = [r for r in read_metrics(str(tmp_path / "ft")) if "val/dice_mean" in r]
  assert records and all(np.isfinite(r["val/dice_mean"]) for r in records)

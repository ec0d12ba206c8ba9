"""3D segmentation: exclusive-class and region heads, sliding-window evaluation with flip TTA,
the phantoms' tissue target, and a 3D fine-tuning run from a 3D pre-training checkpoint."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import numpy_filled, tiny_config

from jaxmed.config import set_model
from jaxmed.data import synthetic
from jaxmed.data.subject import CLASS_NAMES, label_regions
from jaxmed.evaluate import crossval, evaluators
from jaxmed.losses import softmax_dice_ce_loss
from jaxmed.methods import get_method
from jaxmed.methods.segmentation import transfer_layers
from jaxmed.runner import run_config
from jaxmed.train import init as init_lib
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
  # Made once per method object and settings: the runs that share a method trace it once.
  assert evaluators.segmentation_predictor(method)[1] is predict
  assert evaluators.segmentation_predictor(method, window={"overlap": 0.25})[1] is not predict
  assert evaluators.segmentation_predictor(PointwiseMethod(config))[1] is not predict


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


def test_kfold_splits_partition_the_subjects_and_keep_validation_apart():
  subjects = [f"s{i}" for i in range(11)]
  splits = crossval.kfold_splits(subjects, folds=3, num_val=2, seed=4)
  tests = [set(s["test"]) for s in splits]
  assert sum(map(len, tests)) == 11 and set.union(*tests) == set(subjects)  # each tested once
  for split in splits:
    assert len(split["val"]) == 2
    parts = [set(split[k]) for k in ("train", "val", "test")]
    assert set.union(*parts) == set(subjects) and sum(map(len, parts)) == 11  # disjoint
  assert [len(t) for t in tests] == [4, 4, 3]
  assert crossval.kfold_splits(subjects, folds=3, num_val=2, seed=4) == splits  # seeded
  for bad, match in (({"folds": 1}, "folds"), ({"folds": 12}, "folds=12"),
                     ({"folds": 3, "num_val": 7}, "num_val=7")):
    with pytest.raises(ValueError, match=match):
      crossval.kfold_splits(subjects, **{"num_val": 0, **bad}, seed=0)


def test_fold_ensemble_is_the_mean_of_the_folds_probabilities():
  config = tiny_config("segmentation", data__view="crop", data__crop_size=(6, 8, 8))
  method = PointwiseMethod(config)
  rng = np.random.default_rng(2)
  folds = [{"w": rng.normal(size=(4, 2)).astype(np.float32)} for _ in range(3)]
  volume = rng.normal(size=(9, 13, 11, 4)).astype(np.float32)
  got = crossval.ensemble_probabilities(method, folds, volume)
  want = np.mean([method.probabilities(v, volume) for v in folds], axis=0)
  np.testing.assert_allclose(got, want, atol=1e-6)
  with pytest.raises(ValueError, match="at least one"):
    crossval.ensemble_probabilities(method, [], volume)


def test_3d_crossval_from_a_3d_pretraining_checkpoint(tmp_path):
  """Restoration (a round-one method) pre-trains a 1-channel 3D UNet on crops; 2-fold
  cross-validation of the 4-modality tumour task fine-tunes it (input kernel tiled over the
  channels, new output layer), evaluates by sliding windows and ensembles the folds on the
  held-out subject."""
  shape = dict(data__num_subjects=6, data__shape=(16, 24, 20), data__num_val=1,
               data__num_test=1, data__view="crop", data__crop_size=(16, 16, 16))
  run_config(tiny_config("restoration", total_steps=2, batch_size=4, data__modalities=("t1",),
                         **shape), str(tmp_path / "pre"), progress=False)
  config = tiny_config("segmentation", total_steps=2, batch_size=4, eval_every=2,
                       init__path=str(tmp_path / "pre"), init__replace=(r"[^/]+/output_conv/.*",),
                       init__tile=(r"[^/]+/input_conv/.*kernel",), finetune__folds=2,
                       finetune__test_best=True, data__fg_fraction=0.5, **shape)
  result = run_config(config, str(tmp_path / "cv"), progress=False)
  regions = ("WT", "TC", "ET")
  assert result.regions == regions and len(result.folds) == 2
  assert len(result.out_of_fold["subjects"]) == 5  # 6 - 1 held out, each tested once
  assert result.out_of_fold["dice"].shape == result.out_of_fold["msd"].shape == (5, 3)
  assert result.ensemble["dice"].shape == (1, 3)
  report = (tmp_path / "cv" / "crossval.md").read_text()
  assert "2-fold cross-validation" in report and "ensemble of the 2 fold models" in report
  assert "| HD95 (mm) |" in report and "| MSD (mm) |" in report
  data = json.loads((tmp_path / "cv" / "crossval.json").read_text())
  assert data["regions"] == list(regions) and len(data["ensemble"]["dice"]) == 1
  # The 1-channel input kernel could only be transferred into the 4-channel model tiled.
  for k in range(2):
    records = [r for r in read_metrics(str(tmp_path / "cv" / f"fold_{k}"))
               if "val/dice_mean" in r]
    assert records and all(np.isfinite(r["val/dice_mean"]) for r in records)


def test_compare_runs_pairs_the_subjects_of_crossval_runs(tmp_path):
  rng = np.random.default_rng(5)
  base = rng.uniform(0.3, 0.6, (6, 2))
  for name, dice in (("scratch", base), ("pretrained", base + 0.2 + rng.normal(0, 0.01, (6, 2)))):
    table = {"subjects": [f"s{i}" for i in range(6)], "dice": dice,
             "hd95": np.full((6, 2), np.inf), "msd": np.ones((6, 2))}
    crossval.write_report(crossval.CrossValResult(("a", "b"), [table], table, None),
                          str(tmp_path / name))
  runs = {"scratch": str(tmp_path / "scratch"), "pretrained": str(tmp_path / "pretrained")}
  out = crossval.compare_runs(runs, baseline="scratch")
  assert out.splitlines()[0] == "| method | a | b |"
  assert "| pretrained | **" in out and ")*" in out  # significantly better than the baseline
  with pytest.raises(ValueError, match="no 'ensemble' results"):
    crossval.compare_runs(runs, baseline="scratch", part="ensemble")


def test_swin_unetr_initialised_from_a_converted_monai_checkpoint(tmp_path):
  """A 4-modality, 3-region Swin-UNETR (`set_model`) initialised by ``config.init`` from a MONAI
  ``SwinUNETR`` file with 1 input channel and 14 outputs (as BTCV's): the converter keeps the
  file's shapes where the transfer adapts them; the patch embedding and encoder1's input
  kernels are the file's tiled over the channels (x 1/4), the output layer stays fresh, and
  every other leaf is the file's."""
  torch = pytest.importorskip("torch")
  from monai.networks.nets import SwinUNETR as MonaiSwinUNETR  # pylint: disable=g-import-not-at-top
  swin = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
  torch.manual_seed(0)
  monai_net = MonaiSwinUNETR(in_channels=1, out_channels=14, **swin)
  torch.save(monai_net.state_dict(), tmp_path / "swin.pt")
  config = tiny_config("segmentation", data__view="crop", data__crop_size=(32, 32, 32),
                       init__path=str(tmp_path / "swin.pt"), init__converter="swin_unetr",
                       **{f"init__{k}": v
                          for k, v in transfer_layers("swin_unetr", "tile").items()})
  set_model(config, "swin_unetr", **swin)
  method = get_method(config)
  shapes = jax.eval_shape(method.init, jax.random.PRNGKey(0),
                          {"image": jnp.zeros((1, 32, 32, 32, 4))})
  fresh = numpy_filled(shapes)
  variables = init_lib.initializer(config.init)(fresh)
  params = variables["params"]
  weight = monai_net.swinViT.patch_embed.proj.weight.detach().numpy()  # (F, 1, 2, 2, 2)
  np.testing.assert_allclose(params["swinViT"]["patch_embed"]["proj"]["kernel"],
                             np.repeat(np.transpose(weight, (2, 3, 4, 1, 0)), 4, axis=3) / 4,
                             rtol=1e-6)
  conv3 = monai_net.encoder1.layer.conv3.conv.weight.detach().numpy()  # (F, 1, 1, 1, 1)
  np.testing.assert_allclose(params["encoder1"]["layer"]["conv3"]["kernel"],
                             np.repeat(np.transpose(conv3, (2, 3, 4, 1, 0)), 4, axis=3) / 4,
                             rtol=1e-6)
  np.testing.assert_array_equal(params["out"]["kernel"], fresh["params"]["out"]["kernel"])
  decoder = monai_net.decoder1.conv_block.conv1.conv.weight.detach().numpy()
  np.testing.assert_allclose(params["decoder1"]["conv_block"]["conv1"]["kernel"],
                             np.transpose(decoder, (2, 3, 4, 1, 0)), rtol=1e-6)
  features = jax.eval_shape(method.features, shapes, jnp.ones((2, 32, 32, 32, 4)))
  assert features.shape == (2, 12 * 16)

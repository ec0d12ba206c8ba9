import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from helpers import numpy_filled, tiny_config
from jaxmed.data import datasets, synthetic
from jaxmed.data.subject import Subject, label_regions, region_names
from jaxmed.evaluate import evaluators
from jaxmed.evaluate.evaluators import make_evaluators
from jaxmed.methods.segmentation import SegmentationMethod

# --- Fake methods and subjects ------------------------------------------------------------------


class LabelReader:
  """A segmentation "method" whose prediction is the label stored in image channel 0 (rounded),
  as region masks, optionally rolled by ``shift`` voxels along region-array axis ``axis``
  (-2: W, in 2D and 3D; -4: D, 3D only). Per voxel, so 2D and 3D prediction agree."""

  def __init__(self, pathology="tumour", shift=0, axis=-2):
    self.pathology, self.shift, self.axis = pathology, shift, axis
    self.regions = region_names(pathology)

  def predict(self, variables, image):
    del variables
    regions = label_regions(jnp.round(image[..., 0]).astype(jnp.int32), self.pathology)
    return jnp.roll(regions, self.shift, axis=self.axis) if self.shift else regions


class Restorer:
  """A reconstruction "method": the target is the image; the prediction is the image plus
  ``variables["noise"] * cos(37 image)`` (exact for noise 0)."""

  def pretext_example(self, key, batch):
    del key
    return jnp.zeros_like(batch["image"]), batch["image"]

  def reconstruct(self, variables, batch, key):
    del key
    x = batch["image"]
    return jnp.zeros_like(x), x + variables["noise"] * jnp.cos(37.0 * x)


class MeanFeatures:
  """Global features: the per-channel mean of each input times ``variables["scale"]``,
  ``(N, ..., C) -> (N, C)``."""

  def features(self, variables, image):
    return variables["scale"] * image.reshape(image.shape[0], -1, image.shape[-1]).mean(axis=1)


def _subject(i, label, *, image=None, spacing=(1.0, 1.0, 1.0), pathology="tumour", grade=0):
  image = label[..., None].astype(np.float32) if image is None else image.astype(np.float32)
  return Subject(f"s{i}", image, label.astype(np.uint8), tuple(f"m{c}" for c in
                                                               range(image.shape[-1])),
                 spacing, np.ones(label.shape, bool), grade, pathology)


def _tumour_label(rng, shape=(8, 12, 12), et=True):
  """A BraTS-like label: edema box around a core box, with an enhancing focus if ``et``."""
  label = np.zeros(shape, np.uint8)
  d, h, w = (rng.integers(1, 3) for _ in range(3))
  label[d:d + 6, h:h + 8, w:w + 8] = 2
  label[d + 2:d + 4, h + 2:h + 6, w + 2:w + 6] = 1
  if et:
    label[d + 2:d + 4, h + 3:h + 5, w + 3:w + 5] = 4
  return label


def _splits(val, train=(), test=()):
  return {"train": list(train), "val": list(val), "test": list(test)}


def _evals(**evals):
  return ml_collections.ConfigDict(evals)


# --- Segmentation -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_segmentation_perfect_prediction(mode):
  rng = np.random.default_rng(0)
  subjects = [_subject(0, _tumour_label(rng)), _subject(1, _tumour_label(rng, et=False))]
  [ev] = make_evaluators(_evals(seg={"type": "segmentation", "every": 5, "mode": mode,
                                     "batch_size": 3}),
                         method=LabelReader(), splits=_splits(subjects))
  out = ev(10, None)
  assert set(out) == {f"seg/{m}_{r}" for m in ("dice", "hd95") for r in ("WT", "TC", "ET")} | {
      "seg/dice_All", "seg/dice_mean", "seg/hd95_mean"}
  for r in ("WT", "TC", "ET", "All", "mean"):
    assert out[f"seg/dice_{r}"] == 1.0
  for r in ("WT", "TC", "ET", "mean"):
    assert out[f"seg/hd95_{r}"] == 0.0  # ET absent from subject 1 (nan) is skipped


def test_segmentation_hd95_of_a_shifted_plate_is_shift_times_spacing():
  spacing = (2.5, 1.0, 0.7)
  # A plate one voxel thick across W (2D, shifted along W) and one across D (3D, along D): every
  # predicted surface voxel lies exactly `shift` voxels from the truth along that axis.
  across_w = np.zeros((8, 12, 12), np.uint8)
  across_w[2:6, 3:9, 5] = 1
  across_d = np.zeros((8, 12, 12), np.uint8)
  across_d[3, 2:9, 3:9] = 1
  cases = [("2d", -2, 3, across_w, 3 * 0.7), ("3d", -4, 2, across_d, 2 * 2.5),
           ("3d", -2, 3, across_w, 3 * 0.7)]
  for mode, axis, shift, label, expected in cases:
    subject = _subject(0, label, spacing=spacing, pathology="wmh")
    [ev] = make_evaluators(_evals(seg={"type": "segmentation", "mode": mode, "split": "test"}),
                           method=LabelReader("wmh", shift=shift, axis=axis),
                           splits=_splits([], test=[subject]))
    out = ev(0, None)
    assert set(out) == {"seg/dice_WMH", "seg/hd95_WMH", "seg/dice_mean", "seg/hd95_mean"}
    assert out["seg/dice_WMH"] == 0.0
    np.testing.assert_allclose(out["seg/hd95_WMH"], expected, rtol=1e-5)


def test_segmentation_2d_and_3d_agree_for_a_per_voxel_predictor():
  rng = np.random.default_rng(1)
  subjects = []
  for i in range(2):
    label = _tumour_label(rng)
    # Noise makes the rounded read-out wrong at some voxels: an imperfect predictor.
    noisy = label + rng.normal(scale=0.4, size=label.shape)
    subjects.append(_subject(i, label, image=noisy[..., None]))
  results = {}
  for mode in ("2d", "3d"):
    [ev] = make_evaluators(_evals(s={"type": "segmentation", "mode": mode, "batch_size": 5}),
                           method=LabelReader(), splits=_splits(subjects))
    results[mode] = ev(0, None)
  assert results["2d"] == results["3d"]
  assert 0.3 < results["2d"]["s/dice_WT"] < 1.0 and results["2d"]["s/hd95_WT"] > 0
  # The means are over the regions, without the All column.
  for metric in ("dice", "hd95"):
    np.testing.assert_allclose(results["2d"][f"s/{metric}_mean"],
                               np.mean([results["2d"][f"s/{metric}_{r}"] for r in
                                        ("WT", "TC", "ET")]), rtol=1e-6)
  # The same numbers as evaluate_subjects on the same predictions.
  direct = evaluators.evaluate_subjects(LabelReader(), None, subjects)
  for name, value in direct["mean"].items():
    np.testing.assert_allclose(results["2d"][f"s/dice_{name}"], value)


def test_segmentation_with_a_real_segmentation_method_matches_evaluate_subjects():
  method = SegmentationMethod(tiny_config("segmentation"))
  subjects = synthetic.make_subjects(2, seed=3, shape=(16, 16, 16))
  # Stand-in weights of the right shapes (eval_shape: no slow eager initialisation).
  shapes = jax.eval_shape(method.init, jax.random.PRNGKey(0),
                          {"image": jax.ShapeDtypeStruct((2, 16, 16, 4), np.float32)})
  variables = numpy_filled(shapes, scale=0.3)
  [ev] = make_evaluators(_evals(val={"type": "segmentation", "batch_size": 8}), method=method,
                         splits=_splits(subjects))
  out = ev(0, variables)
  expected = evaluators.evaluate_subjects(method, variables, subjects, batch_size=8)["mean"]
  assert any(np.isfinite(v) and v > 0 for v in expected.values())
  for name, value in expected.items():
    np.testing.assert_array_equal(out[f"val/dice_{name}"], value)
  assert all(out[f"val/hd95_{r}"] >= 0 for r in ("WT", "TC", "ET"))


# --- Reconstruction -----------------------------------------------------------------------------


def _recon_subjects(num=2, depth=6, seed=0):
  rng = np.random.default_rng(seed)
  return [_subject(i, np.zeros((depth, 16, 16)), image=rng.random((depth, 16, 16, 2)))
          for i in range(num)]


def _skimage_scores(target, pred, data_range=None):
  psnrs, ssims = [], []
  for t, p in zip(target, pred):
    r = float(t.max() - t.min()) if data_range is None else data_range
    psnrs.append(peak_signal_noise_ratio(t, p, data_range=r))
    # jaxmed's default SSIM (11-tap Gaussian, sigma 1.5, population covariance, valid border)
    # is scikit-image's Gaussian SSIM: its crop keeps exactly the positions the window fits.
    ssims.append(structural_similarity(t, p, data_range=r, channel_axis=-1,
                                       gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))
  return np.mean(psnrs), np.mean(ssims)


def test_reconstruction_identity_is_perfect():
  [ev] = make_evaluators(_evals(rec={"type": "reconstruction", "batch_size": 5}),
                         method=Restorer(), splits=_splits(_recon_subjects()))
  out = ev(0, {"noise": np.float32(0.0)})
  assert set(out) == {"rec/psnr", "rec/ssim"}
  assert out["rec/psnr"] == np.inf
  np.testing.assert_allclose(out["rec/ssim"], 1.0, rtol=1e-6)


def test_reconstruction_matches_skimage():
  subjects = _recon_subjects()
  variables = {"noise": np.float32(0.15)}
  [ev] = make_evaluators(_evals(rec={"type": "reconstruction", "batch_size": 5}),
                         method=Restorer(), splits=_splits(subjects))
  target = datasets.slice_view(subjects)["image"]  # all 12 slices (< num_slices), in order
  pred = target + np.float32(0.15) * np.cos(np.float32(37.0) * target)
  out = ev(0, variables)
  expected = _skimage_scores(target, pred)
  np.testing.assert_allclose([out["rec/psnr"], out["rec/ssim"]], expected, rtol=1e-4)
  assert out["rec/ssim"] < 0.95

  # A cap on the slices (a fixed subset) and a configured data range.
  [ev] = make_evaluators(_evals(rec={"type": "reconstruction", "num_slices": 5, "batch_size": 2,
                                     "data_range": 2.0, "split": "test"}),
                         method=Restorer(), splits=_splits([], test=subjects))
  chosen = ev.slices["image"]
  assert chosen.shape == (5, 16, 16, 2)
  out = ev(0, variables)
  assert ev(0, variables) == out  # the same slices and keys every time
  pred = chosen + np.float32(0.15) * np.cos(np.float32(37.0) * chosen)
  np.testing.assert_allclose([out["rec/psnr"], out["rec/ssim"]],
                             _skimage_scores(chosen, pred, 2.0), rtol=1e-4)


def test_reconstruction_needs_a_pretext_task():

  class NoPretext(Restorer):
    def pretext_example(self, key, batch):
      raise TypeError("method 'x' has no pretext task (pretext_example)")

  with pytest.raises(ValueError, match=r"evals\.rec.*reconstruction.*pretext_example"):
    make_evaluators(_evals(rec={"type": "reconstruction"}), method=NoPretext(),
                    splits=_splits(_recon_subjects()))


# --- Linear probe -------------------------------------------------------------------------------


def _graded_subjects(num, seed):
  """Subjects whose mean channel-0 intensity depends (noisily) on their grade."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(num):
    grade = i % 2
    image = rng.normal(size=(4, 6, 6, 3)) + np.array([0.6 * grade, 0.0, 0.0])
    out.append(_subject(f"{seed}-{i}", np.zeros((4, 6, 6)), image=image, grade=grade))
  return out


def test_linear_probe_matches_sklearn_on_subject_features():
  train, val = _graded_subjects(16, 0), _graded_subjects(10, 1)
  # Features of very different scales: standardisation matters.
  scale = np.array([0.02, 30.0, 1.0], np.float32)
  variables = {"scale": scale}
  results = {}
  for mode in ("2d", "3d"):
    [ev] = make_evaluators(_evals(probe={"type": "linear_probe", "mode": mode, "C": 0.05,
                                         "batch_size": 3}),
                           method=MeanFeatures(), splits=_splits(val, train=train))
    results[mode] = ev(0, variables)
  # Mean of the slices' means = the volume's mean: the two modes see the same features.
  assert set(results["2d"]) == {"probe/accuracy", "probe/balanced_accuracy", "probe/roc_auc"}
  for k, v in results["2d"].items():
    np.testing.assert_allclose(results["3d"][k], v, atol=1e-6)

  feats = lambda subjects: np.stack([scale * s.image.mean(axis=(0, 1, 2)) for s in subjects])
  y_train, y_val = [s.grade for s in train], [s.grade for s in val]
  scaler = StandardScaler().fit(feats(train))
  ref = LogisticRegression(C=0.05, tol=1e-10, max_iter=10_000).fit(
      scaler.transform(feats(train)), y_train)
  x_val = scaler.transform(feats(val))
  pred = ref.predict(x_val)
  out = results["2d"]
  np.testing.assert_allclose(out["probe/accuracy"], accuracy_score(y_val, pred), atol=1e-6)
  np.testing.assert_allclose(out["probe/balanced_accuracy"],
                             balanced_accuracy_score(y_val, pred), atol=1e-6)
  np.testing.assert_allclose(out["probe/roc_auc"],
                             roc_auc_score(y_val, ref.decision_function(x_val)), atol=1e-6)
  assert out["probe/accuracy"] > 0.5


def test_linear_probe_needs_two_training_classes_and_a_scalar_label():
  train = [s for s in _graded_subjects(6, 0) if s.grade == 1]
  with pytest.raises(ValueError, match=r"evals\.p.*at least two values of 'grade'"):
    make_evaluators(_evals(p={"type": "linear_probe"}), method=MeanFeatures(),
                    splits=_splits(_graded_subjects(4, 1), train=train))
  with pytest.raises(ValueError, match=r"evals\.p.*label 'label' must name a scalar"):
    make_evaluators(_evals(p={"type": "linear_probe", "label": "label"}), method=MeanFeatures(),
                    splits=_splits(_graded_subjects(4, 1), train=_graded_subjects(4, 0)))


# --- Registry -----------------------------------------------------------------------------------


def test_registry_lists_the_types():
  assert set(evaluators.EVALUATORS) == {"segmentation", "reconstruction", "linear_probe"}
  assert make_evaluators(None, method=LabelReader(), splits=_splits([])) == []


@pytest.mark.parametrize("cfg, method, pattern", [
    ({"type": "segmantation"}, LabelReader(),
     r"evals\.e: unknown type 'segmantation'; known types: \['linear_probe', 'reconstruction', "
     r"'segmentation'\]"),
    ({"every": 3}, LabelReader(), r"evals\.e: missing field 'type'"),
    ({"type": "segmentation", "splt": "val"}, LabelReader(),
     r"evals\.e: unknown field\(s\) \['splt'\] for type 'segmentation'"),
    ({"type": "segmentation", "every": -1}, LabelReader(), r"evals\.e: every must be an int"),
    ({"type": "segmentation", "mode": "4d"}, LabelReader(),
     r"evals\.e \(type 'segmentation'\): mode must be one of \('auto', '2d', '3d', 'window'\); got '4d'"),
    ({"type": "segmentation", "split": "holdout"}, LabelReader(),
     r"evals\.e \(type 'segmentation'\): split must be one of"),
    ({"type": "segmentation", "split": "test"}, LabelReader(),
     r"evals\.e \(type 'segmentation'\): split 'test' \(split\) has no subjects"),
    ({"type": "segmentation"}, Restorer(),
     r"evals\.e: a 'segmentation' evaluator needs method\.predict, which Restorer does not"),
    ({"type": "reconstruction"}, LabelReader(),
     r"evals\.e: a 'reconstruction' evaluator needs method\.pretext_example"),
    ({"type": "linear_probe"}, LabelReader(),
     r"evals\.e: a 'linear_probe' evaluator needs method\.features, which LabelReader"),
])
def test_make_evaluators_errors_name_the_evaluator_and_field(cfg, method, pattern):
  subject = _subject(0, _tumour_label(np.random.default_rng(0)))
  with pytest.raises(ValueError, match=pattern):
    make_evaluators(_evals(e=cfg), method=method, splits=_splits([subject], train=[subject]))


def test_should_run_and_run_evaluators():
  subject = _subject(0, _tumour_label(np.random.default_rng(0)))
  evs = make_evaluators(_evals(a={"type": "segmentation", "every": 4},
                               b={"type": "segmentation", "split": "test"}),
                        method=LabelReader(), splits=_splits([subject], test=[subject]))
  assert [ev.name for ev in evs] == ["a", "b"] and [ev.every for ev in evs] == [4, 0]
  assert [evs[0].should_run(s) for s in (1, 4, 6, 8)] == [False, True, False, True]
  assert not evs[1].should_run(8) and evs[1].should_run(7, final=True)
  assert evs[0].should_run(7, final=True)
  assert set(evaluators.run_evaluators(evs, 4, None)) == {
      f"a/{m}" for m in ("dice_WT", "dice_TC", "dice_ET", "dice_All", "dice_mean", "hd95_WT",
                         "hd95_TC", "hd95_ET", "hd95_mean")}
  final = evaluators.run_evaluators(evs, 5, None, final=True)
  assert {k.split("/")[0] for k in final} == {"a", "b"}

"""Tests for jaxmed.data.synthetic: deterministic multi-modal brain phantoms."""

from __future__ import annotations

import functools

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest
from scipy import ndimage

from jaxmed.data import datasets, synthetic
from jaxmed.data.subject import Subject

SMALL = (32, 32, 32)
T1, T1CE, T2, FLAIR = range(4)


@functools.lru_cache(maxsize=None)
def _subject(seed: int, shape=SMALL, pathology="tumour", noise=0.03):
  """Cached ``(subject, tissues)``; tests must not modify the arrays."""
  return synthetic.make_subject(seed, shape=shape, pathology=pathology, noise=noise,
                                return_tissues=True)


def _means(seed: int, shape=SMALL, pathology="tumour"):
  """``{tissue: (C,) mean intensity}`` of one subject."""
  subject, tissues = _subject(seed, shape, pathology)
  return {name: subject.image[mask].mean(axis=0) for name, mask in tissues.items() if mask.any()}


def _assert_subjects_equal(a: Subject, b: Subject):
  assert a.subject_id == b.subject_id
  assert a.grade == b.grade
  np.testing.assert_array_equal(a.image, b.image)
  np.testing.assert_array_equal(a.label, b.label)
  np.testing.assert_array_equal(a.brain_mask, b.brain_mask)


# Determinism.


@pytest.mark.parametrize("pathology", synthetic.PATHOLOGIES)
def test_same_seed_is_bit_identical(pathology):
  a = synthetic.make_subject(3, shape=SMALL, pathology=pathology)
  b = synthetic.make_subject(3, shape=SMALL, pathology=pathology)
  _assert_subjects_equal(a, b)
  assert a.subject_id == "phantom-3"


def test_different_seeds_differ():
  a, b = _subject(0)[0], _subject(1)[0]
  assert not np.array_equal(a.image, b.image)
  assert not np.array_equal(a.label, b.label)
  assert not np.array_equal(a.brain_mask, b.brain_mask)


def test_make_subjects_is_independent_of_count():
  few = synthetic.make_subjects(2, seed=7, shape=SMALL)
  many = synthetic.make_subjects(4, seed=7, shape=SMALL)
  assert [s.subject_id for s in many] == [f"phantom-7-{i:04d}" for i in range(4)]
  for a, b in zip(few, many):
    _assert_subjects_equal(a, b)
  assert not np.array_equal(many[0].image, many[1].image)
  other = synthetic.make_subjects(1, seed=8, shape=SMALL)[0]
  assert not np.array_equal(other.image, many[0].image)
  assert synthetic.make_subjects(0) == []


def test_anatomy_does_not_depend_on_pathology():
  healthy, healthy_tissues = _subject(4, pathology="none")
  tumour, tumour_tissues = _subject(4)
  lesion = ndimage.binary_dilation(tumour.label > 0, iterations=2)
  assert lesion.any()
  # Equal up to the float summation order of the compositing (it has more layers with a tumour).
  np.testing.assert_allclose(healthy.image[~lesion], tumour.image[~lesion], rtol=1e-6, atol=1e-7)
  for name in ("scalp", "skull", "wm"):
    np.testing.assert_array_equal(healthy_tissues[name][~lesion], tumour_tissues[name][~lesion])


# Shapes, dtypes and values.


@pytest.mark.parametrize("shape", [SMALL, (32, 48, 40), (16, 16, 16), (16, 40, 17)])
@pytest.mark.parametrize("pathology", synthetic.PATHOLOGIES)
def test_shapes_and_dtypes(shape, pathology):
  subject = synthetic.make_subject(1, shape=shape, pathology=pathology)
  assert isinstance(subject, Subject)
  assert subject.image.shape == shape + (4,)
  assert subject.image.dtype == np.float32
  assert subject.image.flags.c_contiguous
  assert subject.label.shape == shape and subject.label.dtype == np.uint8
  assert subject.brain_mask.shape == shape and subject.brain_mask.dtype == bool
  assert subject.modalities == synthetic.MODALITIES == ("t1", "t1ce", "t2", "flair")
  assert subject.spacing == (1.0, 1.0, 1.0)
  assert subject.pathology == pathology
  assert subject.grade in (0, 1)
  assert np.all(np.isfinite(subject.image))
  assert subject.image.min() >= 0.0
  assert subject.image.max() < 1.5
  # The brain is a sizeable, central part of the volume.
  assert 0.04 < subject.brain_mask.mean() < 0.3
  centre = tuple(n // 2 for n in shape)
  assert subject.brain_mask[centre[0] - 2:centre[0] + 3, centre[1], centre[2]].any()
  if pathology == "none":
    assert not subject.label.any() and subject.grade == 0
  else:
    assert subject.label.any()
    np.testing.assert_array_equal(subject.regions.any(axis=-1), subject.label > 0)


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(st.tuples(*[st.integers(16, 28)] * 3), st.integers(0, 2**32 - 1))
def test_any_valid_shape_and_seed(shape, seed):
  subject = synthetic.make_subject(seed, shape=shape)
  assert subject.image.shape == shape + (4,)
  assert np.all(subject.label[~subject.brain_mask] == 0)


def test_tumour_label_values():
  seen = set()
  for seed in range(6):
    subject = _subject(seed)[0]
    values = set(np.unique(subject.label).tolist())
    assert values <= {0, 1, 2, 4}
    assert 2 in values  # Every tumour has edema.
    seen |= values
  assert seen == {0, 1, 2, 4}


def test_wmh_label_values():
  for seed in range(4):
    subject = _subject(seed, pathology="wmh")[0]
    assert set(np.unique(subject.label).tolist()) == {0, 1}
    assert subject.pathology == "wmh"


@pytest.mark.parametrize("pathology", ["tumour", "wmh"])
def test_labels_inside_brain_mask(pathology):
  for seed in range(4):
    subject = _subject(seed, pathology=pathology)[0]
    assert not np.any(subject.label[~subject.brain_mask])


def test_tissues_partition_the_volume_and_define_brain_mask():
  subject, tissues = _subject(2)
  assert tuple(tissues) == synthetic.TISSUES
  counts = sum(mask.astype(int) for mask in tissues.values())
  assert np.all(counts == 1)
  brain = tissues["gm"] | tissues["wm"] | tissues["ventricles"] | tissues["lesion"]
  np.testing.assert_array_equal(subject.brain_mask, brain)
  np.testing.assert_array_equal(tissues["lesion"], subject.label > 0)
  for name in ("scalp", "skull", "csf", "gm", "wm", "ventricles"):
    assert tissues[name].sum() > 20, name
  # Nested shells: scalp outside the skull, the skull outside the brain.
  radius = {name: _mean_radius(tissues[name]) for name in ("scalp", "skull", "csf", "gm", "wm")}
  assert radius["scalp"] > radius["skull"] > radius["csf"] > radius["gm"] > radius["wm"]


def _mean_radius(mask: np.ndarray) -> float:
  """Mean normalised distance of ``mask`` voxels from the volume centre."""
  coords = np.stack(np.nonzero(mask), axis=-1).astype(float)
  centre = (np.array(mask.shape) - 1) / 2
  return float(np.mean(np.linalg.norm((coords - centre) / centre, axis=-1)))


# Contrasts.


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", [SMALL, (32, 48, 40)])
def test_healthy_tissue_contrasts(seed, shape):
  m = _means(seed, shape)
  # T1: WM > GM > CSF; bright scalp fat, dark skull.
  assert m["wm"][T1] > m["gm"][T1] + 0.1
  assert m["gm"][T1] > m["csf"][T1] + 0.1
  assert m["scalp"][T1] > m["gm"][T1]
  assert m["skull"][T1] < m["gm"][T1] - 0.2
  # T2: CSF brightest, GM > WM.
  for tissue in ("scalp", "skull", "gm", "wm"):
    assert m["csf"][T2] > m[tissue][T2], tissue
  assert m["ventricles"][T2] > m["gm"][T2]
  assert m["gm"][T2] > m["wm"][T2] + 0.05
  # FLAIR: CSF suppressed.
  assert m["csf"][FLAIR] < m["wm"][FLAIR] - 0.1
  assert m["ventricles"][FLAIR] < m["wm"][FLAIR]


def _high_grade_seeds(count: int) -> list[int]:
  seeds = []
  for seed in range(40):
    if len(seeds) < count and _subject(seed)[0].grade == 1:
      seeds.append(seed)
  return seeds


def test_tumour_contrasts():
  seeds = _high_grade_seeds(4)
  assert len(seeds) == 4
  for seed in seeds:
    subject, tissues = _subject(seed)
    image, label = subject.image, subject.label
    wm = image[tissues["wm"]].mean(axis=0)
    enhancing = image[label == 4].mean(axis=0)
    edema = image[label == 2].mean(axis=0)
    assert enhancing[T1CE] > wm[T1CE] + 0.1  # ET bright on T1c.
    assert edema[T2] > wm[T2] + 0.2 and edema[FLAIR] > wm[FLAIR] + 0.2
    assert edema[T1] < wm[T1]
    if np.count_nonzero(label == 1) >= 4:
      necrosis = image[label == 1].mean(axis=0)
      assert necrosis[T1CE] < enhancing[T1CE] - 0.2  # Dark necrosis in a bright rim.
      assert necrosis[T2] > wm[T2]


def test_wmh_bright_on_flair():
  for seed in range(4):
    subject, tissues = _subject(seed, pathology="wmh")
    wmh = subject.image[subject.label == 1].mean(axis=0)
    wm = subject.image[tissues["wm"]].mean(axis=0)
    assert wmh[FLAIR] > wm[FLAIR] + 0.15
    assert wmh[T2] > wm[T2]


# Grades.


def test_tumour_grades_are_balanced_and_visible():
  subjects = [_subject(seed)[0] for seed in range(20)]
  grades = np.array([s.grade for s in subjects])
  assert 4 <= grades.sum() <= 16
  enhancing = np.array([np.count_nonzero(s.label == 4) for s in subjects])
  necrosis = np.array([np.count_nonzero(s.label == 1) for s in subjects])
  core = np.array([np.count_nonzero((s.label == 1) | (s.label == 4)) for s in subjects])
  # High grade: an enhancing rim; low grade: mostly a non-enhancing core.
  assert np.all(enhancing[grades == 1] > 0)
  assert enhancing[grades == 1].min() > enhancing[grades == 0].max()
  assert np.all(enhancing[grades == 0] < 0.25 * core[grades == 0])
  assert np.mean(necrosis[grades == 1] > 0) >= 0.75


def test_wmh_grades_follow_lesion_load():
  subjects = [_subject(seed, pathology="wmh")[0] for seed in range(20)]
  grades = np.array([s.grade for s in subjects])
  assert 0 < grades.sum() < 20
  load = np.array([np.count_nonzero(s.label) / s.brain_mask.sum() for s in subjects])
  np.testing.assert_array_equal(grades, (load > synthetic.WMH_HIGH_LOAD).astype(int))
  counts = [len(np.unique(ndimage.label(s.label)[0])) - 1 for s in subjects]
  assert min(counts) >= 1 and max(counts) <= 12


# Noise.


def test_noise_free_background_is_zero_and_rician_background_is_rayleigh():
  clean, tissues = _subject(5, pathology="none", noise=0.0)
  # Background away from the partial-volume edge of the head.
  background = ndimage.binary_erosion(tissues["background"], iterations=2, border_value=1)
  assert background.sum() > 5000
  assert np.all(clean.image[background] == 0)
  noise = 0.05
  noisy = synthetic.make_subject(5, shape=SMALL, pathology="none", noise=noise)
  values = noisy.image[background]
  # |N(0, s^2) + i N(0, s^2)| is Rayleigh: mean s sqrt(pi / 2), mean square 2 s^2.
  np.testing.assert_allclose(values.mean(), noise * np.sqrt(np.pi / 2), rtol=0.03)
  np.testing.assert_allclose(np.mean(values**2), 2 * noise**2, rtol=0.03)
  # In tissue, the noise is ~Gaussian with std `noise` around the clean value.
  wm = tissues["wm"][..., None] & np.ones(4, bool)
  residual = noisy.image[wm] - clean.image[wm]
  np.testing.assert_allclose(residual.std(), noise, rtol=0.1)


# slice_view.


def test_slice_view_keeps_foreground_slices():
  subjects = [_subject(seed)[0] for seed in range(3)]
  view = datasets.slice_view(subjects)
  s = view["image"].shape[0]
  assert view["image"].shape == (s, 32, 32, 4) and view["image"].dtype == np.float32
  assert view["label"].shape == (s, 32, 32) and view["label"].dtype == np.uint8
  assert view["brain_mask"].shape == (s, 32, 32) and view["brain_mask"].dtype == bool
  assert view["subject_index"].dtype == np.int32 and view["slice_index"].dtype == np.int32
  assert 0 < s < 3 * 32  # Some slices dropped, some kept.
  assert np.all(view["brain_mask"].mean(axis=(1, 2)) >= 0.2)
  for i, subject in enumerate(subjects):
    kept = view["slice_index"][view["subject_index"] == i]
    assert kept.size > 0
    dropped = np.setdiff1d(np.arange(32), kept)
    assert np.all(subject.brain_mask[dropped].mean(axis=(1, 2)) < 0.2)
    np.testing.assert_array_equal(view["image"][view["subject_index"] == i], subject.image[kept])
    np.testing.assert_array_equal(view["label"][view["subject_index"] == i], subject.label[kept])
  assert np.array_equal(np.unique(view["subject_index"]), [0, 1, 2])


def test_slice_view_min_foreground():
  subjects = [_subject(0)[0]]
  assert datasets.slice_view(subjects, min_foreground=0.0)["image"].shape[0] == 32
  with pytest.raises(ValueError, match="no slice of the 1 subjects"):
    datasets.slice_view(subjects, min_foreground=1.0)
  loose = datasets.slice_view(subjects, min_foreground=0.1)["image"].shape[0]
  assert loose > datasets.slice_view(subjects, min_foreground=0.2)["image"].shape[0]


def test_slice_view_non_cubic_shape():
  subject = _subject(0, (32, 48, 40))[0]
  view = datasets.slice_view([subject])
  assert view["image"].shape[1:] == (48, 40, 4)


def test_slice_view_rejects_bad_input():
  with pytest.raises(ValueError, match="subjects"):
    datasets.slice_view([])
  with pytest.raises(ValueError, match="share"):
    datasets.slice_view([_subject(0)[0], _subject(0, (32, 48, 40))[0]])
  with pytest.raises(ValueError, match="min_foreground"):
    datasets.slice_view([_subject(0)[0]], min_foreground=1.5)


# Argument validation.


@pytest.mark.parametrize("shape", [(15, 32, 32), (32, 32), (32, 32, 32, 1), (32.0, 32, 32),
                                   (0, 32, 32), "abc", 32, (True, 32, 32)])
def test_invalid_shape(shape):
  with pytest.raises(ValueError, match="shape"):
    synthetic.make_subject(0, shape=shape)
  with pytest.raises(ValueError, match="shape"):
    synthetic.make_subjects(1, shape=shape)


@pytest.mark.parametrize("pathology", ["glioma", "", None, "Tumour"])
def test_invalid_pathology(pathology):
  with pytest.raises(ValueError, match="pathology"):
    synthetic.make_subject(0, shape=SMALL, pathology=pathology)
  with pytest.raises(ValueError, match="pathology"):
    synthetic.make_subjects(1, shape=SMALL, pathology=pathology)


@pytest.mark.parametrize("kwargs, match", [
    (dict(noise=-0.1), "noise"), (dict(noise=float("nan")), "noise"), (dict(noise="x"), "noise"),
])
def test_invalid_noise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    synthetic.make_subject(0, shape=SMALL, **kwargs)


@pytest.mark.parametrize("seed", [-1, 1.5, "0", None, True])
def test_invalid_seed(seed):
  with pytest.raises(ValueError, match="seed"):
    synthetic.make_subject(seed, shape=SMALL)
  with pytest.raises(ValueError, match="seed"):
    synthetic.make_subjects(1, seed=seed, shape=SMALL)


@pytest.mark.parametrize("num_subjects", [-1, 2.0, None])
def test_invalid_num_subjects(num_subjects):
  with pytest.raises(ValueError, match="num_subjects"):
    synthetic.make_subjects(num_subjects, shape=SMALL)


# save_montage.


@pytest.mark.parametrize("pathology", synthetic.PATHOLOGIES)
def test_save_montage_writes_png(tmp_path, pathology):
  subjects = [_subject(seed, pathology=pathology)[0] for seed in range(3)]
  path = tmp_path / "nested" / "dir" / "montage.png"
  synthetic.save_montage(subjects, path, num_subjects=2)
  data = path.read_bytes()
  assert data.startswith(b"\x89PNG\r\n\x1a\n")
  assert len(data) > 1000


def test_save_montage_rejects_bad_input(tmp_path):
  with pytest.raises(ValueError, match="subjects"):
    synthetic.save_montage([], tmp_path / "m.png")
  with pytest.raises(ValueError, match="num_subjects"):
    synthetic.save_montage([_subject(0)[0]], tmp_path / "m.png", num_subjects=0)

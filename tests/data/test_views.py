"""Tests for jaxmed.data.views: volume tables, random 3D crops with foreground oversampling
(MONAI parity), slice oversampling, single-modality views and the config entry point."""

from __future__ import annotations

import functools
import itertools

import ml_collections
import numpy as np
import pytest

from jaxmed.data import datasets, pipeline, sources, synthetic, views
from jaxmed.data.subject import Subject

# Bound of the statistical tests, in binomial standard deviations.
SIGMAS = 5.0


@functools.lru_cache(maxsize=None)
def _subjects():
  """Three cached phantoms; tests must not modify them."""
  return tuple(synthetic.make_subjects(3, seed=0, shape=(16, 24, 24)))


def _within_binomial(hits: int, n: int, p: float) -> bool:
  sigma = np.sqrt(max(p * (1 - p), 1e-12) / n)
  return abs(hits / n - p) <= SIGMAS * sigma + 1e-12


def _reference_crop(array, origin, crop):
  """Independent cut: pad by the crop size on every side, then slice."""
  margin = max(crop)
  pad = [(margin, margin)] * 3 + [(0, 0)] * (array.ndim - 3)
  padded = np.pad(array, pad)
  index = tuple(slice(o + margin, o + margin + s) for o, s in zip(origin, crop))
  return padded[index]


def _hits(label, origin, crop):
  return bool(_reference_crop(label, origin, crop).any())


# ----------------------------------------------------------------------------- volume_view


def test_volume_view_stacks_subjects_and_zero_fills_missing_labels():
  a, b, _ = _subjects()
  unlabelled = Subject("nolabel", b.image, None, b.modalities, b.spacing, b.brain_mask)
  out = views.volume_view([a, unlabelled])
  assert out["image"].shape == (2, 16, 24, 24, 4) and out["image"].dtype == np.float32
  assert out["label"].shape == (2, 16, 24, 24) and out["label"].dtype == np.uint8
  assert out["brain_mask"].dtype == bool and out["subject_index"].dtype == np.int32
  np.testing.assert_array_equal(out["image"][1], b.image)
  np.testing.assert_array_equal(out["label"][0], a.label)
  assert not out["label"][1].any()
  np.testing.assert_array_equal(out["brain_mask"][0], a.brain_mask)
  np.testing.assert_array_equal(out["subject_index"], [0, 1])


def test_volume_view_rejects_mismatched_shapes_naming_the_subject():
  a = _subjects()[0]
  other = synthetic.make_subject(5, shape=(16, 24, 20), subject_id="odd-one")
  with pytest.raises(ValueError, match=r"odd-one.*\(16, 24, 20, 4\).*data\.crop"):
    views.volume_view([a, other])
  with pytest.raises(ValueError, match="non-empty"):
    views.volume_view([])


# ----------------------------------------------------------------------------- MONAI parity


@pytest.mark.parametrize("shape", [(5, 7, 4), (6, 3, 9), (1, 8, 5)])
@pytest.mark.parametrize("crop", [(2, 3, 4), (5, 7, 4), (3, 3, 3), (7, 8, 2), (1, 1, 1),
                                  (6, 2, 9)])
def test_crop_origins_match_monai_correct_crop_centers(shape, crop):
  from monai.transforms import SpatialPad  # pylint: disable=g-import-not-at-top
  from monai.transforms.utils import correct_crop_centers  # pylint: disable=g-import-not-at-top
  # MONAI's pipeline: SpatialPad (symmetric) to at least the crop, then corrected centres.
  pad = np.array(SpatialPad(spatial_size=crop).compute_pad_width(shape)[1:])
  np.testing.assert_array_equal(views.crop_padding(shape, crop), pad)
  padded = tuple(int(n) for n in np.array(shape) + pad.sum(1))
  rng = np.random.default_rng(0)
  grid = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1).reshape(-1, 3)
  outside = rng.integers(-3, np.array(shape) + 3, size=(20, 3))  # centres off the volume too
  centers = np.concatenate([grid, outside])
  ours = views.crop_origins(centers, shape, crop)
  half = np.array(crop) // 2
  for center, origin in zip(centers, ours):
    monai_center = correct_crop_centers((center + pad[:, 0]).tolist(), crop, padded,
                                        allow_smaller=False)
    # SpatialCrop(roi_center, roi_size) starts at center - size // 2.
    np.testing.assert_array_equal(origin, np.array(monai_center) - half - pad[:, 0],
                                  err_msg=f"center {center}")
    # Without padding (allow_smaller=True) MONAI keeps whole axes smaller than the crop: our
    # window covers them, and agrees exactly on the other axes.
    small = correct_crop_centers(center.tolist(), crop, shape, allow_smaller=True)
    for axis, (n, s) in enumerate(zip(shape, crop)):
      if n >= s:
        assert origin[axis] == small[axis] - s // 2
      else:
        assert origin[axis] <= 0 and origin[axis] + s >= n
  low, high = views.origin_range(shape, crop)
  assert (ours >= low).all() and (ours <= high).all()


def _monai_crops(label, image, crop, *, pos, neg, num_samples, seed, image_threshold=None):
  """MONAI SpatialPadd + RandCropByPosNegLabeld on channel-first copies of the arrays."""
  # pylint: disable-next=g-import-not-at-top
  from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd
  keys = ["image", "label"]
  kwargs = {} if image_threshold is None else {"image_key": "image",
                                                "image_threshold": image_threshold}
  transform = Compose([
      SpatialPadd(keys=keys, spatial_size=crop),
      RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=crop, pos=pos, neg=neg,
                             num_samples=num_samples, **kwargs),
  ])
  transform.set_random_state(seed)
  out = transform({"image": np.moveaxis(image, -1, 0).copy(), "label": label[None].copy()})
  pad_before = views.crop_padding(label.shape, crop)[:, 0]
  results = []
  for sample in out:
    center = np.array(sample["label"].meta["crop_center"])
    origin = center - np.array(crop) // 2 - pad_before
    results.append((origin, np.moveaxis(sample["image"].numpy(), 0, -1),
                    sample["label"].numpy()[0]))
  return results


def _origin_set(origins):
  return {tuple(int(v) for v in o) for o in origins}


@pytest.mark.parametrize("shape,crop", [((9, 7, 12), (4, 5, 6)), ((9, 3, 12), (4, 5, 6)),
                                        ((6, 6, 5), (6, 3, 7))])
def test_positive_crops_match_monai_rand_crop_by_pos_neg_labeld(shape, crop):
  label = np.zeros(shape, np.uint8)
  # A small lesion touching a corner (centres need correcting) and one interior voxel.
  label[:2, :2, :2] = 1
  label[shape[0] // 2, shape[1] // 2, shape[2] - 1] = 4
  # Voxel ids (+1, so 0 marks padding) identify where every crop comes from.
  image = (np.arange(np.prod(shape)).reshape(shape + (1,)) + 1).astype(np.float32)
  monai = _monai_crops(label, image, crop, pos=1.0, neg=0.0, num_samples=300, seed=0)
  fg_centers = np.argwhere(label > 0)
  expected = _origin_set(views.crop_origins(fg_centers, shape, crop))
  assert _origin_set(o for o, _, _ in monai) == expected
  for origin, monai_image, monai_label in monai:
    assert monai_label.any()
    np.testing.assert_array_equal(views.extract_crop(image, origin, crop), monai_image)
    np.testing.assert_array_equal(views.extract_crop(label, origin, crop), monai_label)
  # Our sampler, all positive, reaches exactly the same origins and always hits the lesion.
  sampler = views.CropSampler(crop, fg_fraction=1.0)
  rng = np.random.default_rng(1)
  example = {"image": image, "label": label}
  outs = [sampler(example, rng) for _ in range(300)]
  assert _origin_set(o["crop_origin"] for o in outs) == expected
  assert all(o["label"].any() and o["image"].shape == crop + (1,) for o in outs)


@pytest.mark.parametrize("image_threshold", [None, -1.0, 0.5])
def test_background_centres_match_monai_map_binary_to_indices(image_threshold):
  from monai.transforms import SpatialPad  # pylint: disable=g-import-not-at-top
  from monai.transforms.utils import map_binary_to_indices  # pylint: disable=g-import-not-at-top
  shape, crop = (7, 4, 9), (4, 6, 5)
  rng = np.random.default_rng(0)
  label = (rng.random(shape) < 0.1).astype(np.uint8) * 2
  image = np.zeros(shape + (2,), np.float32)
  image[1:4, 1:3, 2:5, 1] = 1.0  # only channel 1 exceeds 0.5, in a small block
  image[..., 0] = rng.random(shape) * 0.4
  pad = SpatialPad(spatial_size=crop)
  label_p = pad(label[None]).numpy()
  image_p = pad(np.moveaxis(image, -1, 0)).numpy()
  fg, bg = map_binary_to_indices(label_p, None if image_threshold is None else image_p,
                                 image_threshold or 0.0)
  np.testing.assert_array_equal(views.center_candidates(label, positive=True, crop=crop), fg)
  np.testing.assert_array_equal(
      views.center_candidates(label, positive=False, crop=crop, image=image,
                              image_threshold=image_threshold), bg)


def test_background_crops_match_monai_with_image_threshold():
  shape, crop = (7, 4, 9), (4, 6, 5)
  label = np.zeros(shape, np.uint8)
  label[2, 1, 3] = 1
  image = np.zeros(shape + (2,), np.float32)
  image[1:4, 1:3, 2:5, 1] = 1.0  # 18 voxels > 0.5, one of them labelled
  monai = _monai_crops(label, image, crop, pos=0.0, neg=1.0, num_samples=600, seed=0,
                       image_threshold=0.5)
  candidates = np.argwhere((label == 0) & (image > 0.5).any(-1))
  expected = _origin_set(views.crop_origins(candidates, shape, crop))
  assert _origin_set(o for o, _, _ in monai) == expected
  sampler = views.CropSampler(crop, negative="background", image_threshold=0.5)
  rng = np.random.default_rng(0)
  ours = [sampler({"image": image, "label": label}, rng)["crop_origin"] for _ in range(600)]
  assert _origin_set(ours) == expected


# ----------------------------------------------------------------------------- crop statistics


def _lesion_volume():
  label = np.zeros((12, 12, 12), np.uint8)
  label[1:3, 1:3, 1:3] = 1
  return label


def test_crop_foreground_rate_is_binomially_consistent():
  label, crop, n = _lesion_volume(), (4, 4, 4), 2000
  # p_random: the fraction of all valid origins whose crop holds a labelled voxel.
  origins = list(itertools.product(*(range(s - c + 1) for s, c in zip(label.shape, crop))))
  p_random = np.mean([_hits(label, o, crop) for o in origins])
  assert 0 < p_random < 0.1
  image = np.zeros(label.shape + (1,), np.float32)
  for fg_fraction in (0.33, 1.0, 0.0):
    sampler = views.CropSampler(crop, fg_fraction=fg_fraction, negative="random")
    rng = np.random.default_rng(int(fg_fraction * 100))
    outs = [sampler({"image": image, "label": label}, rng) for _ in range(n)]
    hits = sum(bool(o["label"].any()) for o in outs)
    expected = fg_fraction + (1 - fg_fraction) * p_random
    if fg_fraction == 1.0:
      assert hits == n
    assert _within_binomial(hits, n, expected), (fg_fraction, hits / n, expected)
    if fg_fraction == 0.0:
      # Uniform origins: every per-axis marginal is uniform over the 9 positions.
      counts = np.stack([np.bincount([o["crop_origin"][a] for o in outs], minlength=9)
                         for a in range(3)])
      assert _within_binomial(counts.min(), n, 1 / 9) and _within_binomial(counts.max(), n, 1 / 9)


def test_background_negatives_follow_the_background_voxels():
  label, crop, n = _lesion_volume(), (4, 4, 4), 2000
  background = np.argwhere(label == 0)
  p_bg = np.mean([_hits(label, o, crop) for o in views.crop_origins(background, label.shape,
                                                                    crop)])
  sampler = views.CropSampler(crop, fg_fraction=0.25, negative="background")
  rng = np.random.default_rng(3)
  image = np.zeros(label.shape + (1,), np.float32)
  hits = sum(bool(sampler({"image": image, "label": label}, rng)["label"].any())
             for _ in range(n))
  assert _within_binomial(hits, n, 0.25 + 0.75 * p_bg)


def test_positive_draw_without_labels_falls_back_to_negative():
  rng = np.random.default_rng(0)
  label = np.zeros((6, 5, 4), np.uint8)
  origins = [views.sample_crop_origin(rng, label, (3, 3, 3), 1.0, "random") for _ in range(200)]
  low, high = views.origin_range(label.shape, (3, 3, 3))
  assert all(((o >= low) & (o <= high)).all() for o in origins)
  assert len(_origin_set(origins)) > 20  # uniform, not stuck at one place
  # Nothing to centre on (no label, image below the threshold): uniform origin, no error.
  origin = views.sample_crop_origin(rng, label, (3, 3, 3), 0.5, "background",
                                    image=np.zeros((6, 5, 4, 1)), image_threshold=0.0)
  assert ((origin >= low) & (origin <= high)).all()


# ----------------------------------------------------------------------------- crop geometry


@pytest.mark.parametrize("negative", views.NEGATIVES)
@pytest.mark.parametrize("shape,crop", [((5, 13, 7), (8, 6, 11)), ((9, 11, 10), (3, 5, 4)),
                                        ((4, 4, 4), (4, 4, 4)), ((2, 3, 1), (5, 5, 5))])
def test_crops_have_the_crop_shape_and_cut_every_array_consistently(shape, crop, negative):
  rng = np.random.default_rng(0)
  label = (rng.random(shape) < 0.05).astype(np.uint8) * 4
  label[0, 0, 0] = 1
  example = {
      "image": rng.normal(size=shape + (2,)).astype(np.float32),
      "label": label,
      "brain_mask": rng.random(shape) < 0.5,
      "subject_index": np.int32(7),
      "grade": np.array([1, 0]),
  }
  sampler = views.CropSampler(crop, fg_fraction=0.5, negative=negative)
  low, high = views.origin_range(shape, crop)
  for _ in range(30):
    out = sampler(example, rng)
    origin = out["crop_origin"]
    assert origin.shape == (3,) and origin.dtype == np.int32
    assert ((origin >= low) & (origin <= high)).all()
    for axis, (n, s) in enumerate(zip(shape, crop)):
      if n < s:  # padded symmetrically: the volume sits in the middle of the crop
        assert origin[axis] == -((s - n) // 2)
    assert out["image"].shape == crop + (2,) and out["image"].dtype == np.float32
    assert out["label"].shape == crop and out["label"].dtype == np.uint8
    assert out["brain_mask"].shape == crop and out["brain_mask"].dtype == bool
    for key in ("image", "label", "brain_mask"):
      np.testing.assert_array_equal(out[key], _reference_crop(example[key], origin, crop))
    assert out["subject_index"] == 7 and out["grade"] is example["grade"]
  assert example["image"].shape == shape + (2,)  # input untouched


def test_crop_sampler_validates_inputs():
  with pytest.raises(ValueError, match="crop"):
    views.CropSampler((4, 4))
  with pytest.raises(ValueError, match="crop"):
    views.CropSampler((4, 0, 4))
  with pytest.raises(ValueError, match="fg_fraction"):
    views.CropSampler((4, 4, 4), fg_fraction=1.5)
  with pytest.raises(ValueError, match="negative"):
    views.CropSampler((4, 4, 4), negative="hard")
  sampler = views.CropSampler((2, 2, 2))
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="brain_mask"):
    sampler({"image": np.zeros((4, 4, 4, 1)), "brain_mask": np.zeros((4, 4, 3), bool)}, rng)
  with pytest.raises(ValueError, match=r"\(D, H, W, C\)"):
    sampler({"image": np.zeros((4, 4, 1))}, rng)
  # No label: every crop is a negative one, and no label key appears.
  out = sampler({"image": np.ones((4, 4, 4, 1), np.float32)}, rng)
  assert out["image"].shape == (2, 2, 2, 1) and "label" not in out


# ----------------------------------------------------------------------------- slices


def _slice_table(num=40, labelled=(3, 17, 30)):
  label = np.zeros((num, 6, 6), np.uint8)
  for i in labelled:
    label[i, 2, 3] = 1
  return {"image": np.arange(num, dtype=np.float32)[:, None, None, None] * np.ones((1, 6, 6, 2)),
          "label": label, "subject_index": np.arange(num, dtype=np.int32) // 10,
          "slice_index": np.arange(num, dtype=np.int32) % 10}


def test_slice_oversampler_draws_labelled_slices_at_the_configured_rate():
  arrays, n, fg_fraction = _slice_table(), 2000, 0.4
  sampler = views.SliceOversampler(arrays, fg_fraction)
  np.testing.assert_array_equal(sampler.labelled_rows, [3, 17, 30])
  rng = np.random.default_rng(0)
  example = {k: v[5] for k, v in arrays.items()}  # an unlabelled slice
  example["partner"] = np.float32(-1)  # keys outside the table pass through
  replaced = []
  for _ in range(n):
    out = sampler(example, rng)
    if out is example:
      continue
    row = int(out["image"][0, 0, 0])
    assert row in (3, 17, 30) and out["label"].any()
    assert out["slice_index"] == row % 10 and out["subject_index"] == row // 10
    assert out["partner"] == -1
    replaced.append(row)
  assert _within_binomial(len(replaced), n, fg_fraction)
  counts = np.bincount(replaced, minlength=40)[[3, 17, 30]]
  assert all(_within_binomial(c, len(replaced), 1 / 3) for c in counts)
  # fg_fraction 0 keeps every example.
  keep = views.SliceOversampler(arrays, 0.0)
  assert all(keep(example, rng) is example for _ in range(50))


def test_slice_oversampler_needs_a_labelled_slice():
  arrays = _slice_table(labelled=())
  with pytest.raises(ValueError, match="labelled voxel"):
    views.SliceOversampler(arrays, 0.2)
  views.SliceOversampler(arrays, 0.0)  # nothing to oversample: fine
  with pytest.raises(ValueError, match="fg_fraction"):
    views.SliceOversampler(_slice_table(), -0.1)


# ----------------------------------------------------------------------------- modalities


def test_modality_source_splits_channels_into_examples():
  subjects = _subjects()
  for source in (sources.SliceSource(subjects), sources.VolumeSource(subjects)):
    arrays = sources.materialize(source)
    s, c = len(arrays["image"]), arrays["image"].shape[-1]
    out_source = sources.ModalitySource(source)
    out = sources.materialize(out_source)
    assert out["image"].shape == (s * c,) + arrays["image"].shape[1:-1] + (1,)
    assert out["modality"].dtype == np.int32
    np.testing.assert_array_equal(out["modality"], np.tile(np.arange(c), s))
    np.testing.assert_array_equal(out_source.columns["modality"], out["modality"])
    np.testing.assert_array_equal(out_source.columns["subject_index"],
                                  np.repeat(source.columns["subject_index"], c))
    for k in (0, 5, s * c - 1):
      np.testing.assert_array_equal(out["image"][k, ..., 0], arrays["image"][k // c, ..., k % c])
    for key in arrays:
      if key != "image":
        assert len(out[key]) == s * c
        np.testing.assert_array_equal(out[key][c + 2], arrays[key][1])
  with pytest.raises(ValueError, match="twice"):
    sources.ModalitySource(out_source)


# ----------------------------------------------------------------------------- make_view


def test_make_view_slice_volume_and_crop():
  subjects = _subjects()
  source, transform = views.make_view({"view": "slice", "min_foreground": 0.2}, subjects)
  arrays = sources.materialize(source)
  expected = datasets.slice_view(subjects, min_foreground=0.2)
  assert transform is None and arrays.keys() == expected.keys()
  np.testing.assert_array_equal(arrays["image"], expected["image"])
  keep = [(i, k) for i, s in enumerate(subjects)
          for k in np.flatnonzero(s.brain_mask.mean(axis=(1, 2)) >= 0.2)]
  assert [tuple(r) for r in zip(arrays["subject_index"], arrays["slice_index"])] == keep
  for key in ("image", "label", "brain_mask"):
    np.testing.assert_array_equal(
        arrays[key], np.stack([getattr(subjects[i], key)[k] for i, k in keep]))

  cfg = ml_collections.ConfigDict({"view": "slice", "min_foreground": 0.2, "fg_fraction": 0.5})
  source, transform = views.make_view(cfg, subjects)
  assert isinstance(transform, views.SliceOversampler) and transform.fg_fraction == 0.5

  source, transform = views.make_view({"view": "volume"}, subjects)
  assert transform is None and sources.materialize(source)["image"].shape == (3, 16, 24, 24, 4)

  cfg = ml_collections.ConfigDict({"view": "crop", "crop_size": (8, 16, 16), "fg_fraction": 1.0,
                                   "negative": "background", "per_modality": True})
  source, transform = views.make_view(cfg, subjects)
  assert len(source) == 12 and source[5]["image"].shape == (16, 24, 24, 1)
  assert source.columns["modality"].shape == (12,)
  assert isinstance(transform, views.CropSampler)
  assert transform.crop == (8, 16, 16) and transform.negative == "background"
  it = pipeline.train_iterator(source, global_batch_size=4, seed=0, process_index=0,
                               process_count=1, transform=transform)
  batch = next(it)
  assert batch["image"].shape == (4, 8, 16, 16, 1) and batch["crop_origin"].shape == (4, 3)
  assert batch["label"].reshape(4, -1).any(axis=1).all()  # fg_fraction=1, all labelled


def test_make_view_validates_the_config():
  subjects = _subjects()
  with pytest.raises(ValueError, match=r"'slice', 'volume', 'crop'.*'patch'"):
    views.make_view({"view": "patch"}, subjects)
  with pytest.raises(ValueError, match="crop_size"):
    views.make_view({"view": "crop"}, subjects)
  with pytest.raises(ValueError, match="crop_size"):
    views.make_view({"view": "crop", "crop_size": (8, 8)}, subjects)
  with pytest.raises(ValueError, match="negative"):
    views.make_view({"view": "crop", "crop_size": (8, 8, 8), "negative": "hard"}, subjects)
  with pytest.raises(ValueError, match="fg_fraction"):
    views.make_view({"view": "slice", "fg_fraction": 2.0}, subjects)
  with pytest.raises(ValueError, match="fg_fraction"):
    views.make_view({"view": "volume", "fg_fraction": 0.5}, subjects)
  with pytest.raises(ValueError, match="per_modality"):
    views.make_view({"view": "volume", "per_modality": "yes"}, subjects)


def test_compose_chains_in_order_and_skips_none():
  assert views.compose(None, None) is None
  add = lambda e, rng: {**e, "x": e["x"] + 1}  # pylint: disable=unnecessary-lambda-assignment
  double = lambda e, rng: {**e, "x": e["x"] * 2}  # pylint: disable=unnecessary-lambda-assignment
  assert views.compose(None, add) is add
  rng = np.random.default_rng(0)
  assert views.compose(add, None, double)({"x": 1}, rng)["x"] == 4
  assert views.compose(double, add)({"x": 1}, rng)["x"] == 3


def test_crops_come_from_volumes_of_different_shapes():
  subjects = [*_subjects()[:2], synthetic.make_subjects(1, seed=4, shape=(18, 20, 16))[0]]
  cfg = ml_collections.ConfigDict({"view": "crop", "crop_size": (8, 16, 16), "fg_fraction": 0.5})
  source, transform = views.make_view(cfg, subjects)
  it = pipeline.train_iterator(source, global_batch_size=6, seed=0, process_index=0,
                               process_count=1, transform=transform)
  batch = next(it)
  assert batch["image"].shape == (6, 8, 16, 16, 4)
  assert set(batch["subject_index"].tolist()) == {0, 1, 2}
  with pytest.raises(ValueError, match="one \\(D, H, W, C\\) shape"):
    views.make_view({"view": "volume"}, subjects)

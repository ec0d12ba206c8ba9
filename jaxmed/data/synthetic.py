"""Deterministic multi-modal 3D brain-like phantoms: jaxmed's embedded default data.

Every subject is drawn from an integer seed, with no download and numpy only. The anatomy is
built from implicit surfaces (ellipsoid-like level sets) in smoothly deformed coordinates:

  scalp (fat) > skull > CSF > folded grey-matter cortex > white matter, with deep grey nuclei,
  two lateral ventricles and an interhemispheric fissure.

Tissues are composited with partial-volume fractions, given per-modality intensities (T1, T1c,
T2, FLAIR) with BraTS-like contrasts and per-subject jitter, a multiplicative bias field and
Rician noise. Pathologies:

  * ``"tumour"``: necrotic / non-enhancing core (1), enhancing tumour (4), edema (2). ``grade``
    1 = high grade (necrosis in an enhancing rim), 0 = low grade (non-enhancing core with no or
    a small enhancing focus).
  * ``"wmh"``: white-matter hyperintensities (1); ``grade`` 1 when the lesion load is high.
  * ``"none"``: healthy anatomy, all-zero label.

The anatomy of a seed does not depend on ``pathology``, and ``shape`` only changes how the same
continuous object is sampled (the head fills the field of view). Volumes are ``(D, H, W, C)``
with axis 0 axial (inferior -> superior), axis 1 posterior -> anterior, axis 2 left-right.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from jaxmed.data.subject import BRATS_LABELS
from jaxmed.data.subject import Subject

MODALITIES = ("t1", "t1ce", "t2", "flair")
PATHOLOGIES = ("tumour", "wmh", "none", "brain_tissues")
# Mutually exclusive tissue classes returned by ``make_subject(..., return_tissues=True)``;
# "csf" is the extra-cerebral and sulcal CSF, "gm" includes the deep grey nuclei.
TISSUES = ("background", "scalp", "skull", "csf", "gm", "wm", "ventricles", "lesion")
# WMH lesion load (fraction of `brain_mask` voxels) above which ``grade`` is 1: about the median
# load, so the two grades are roughly balanced.
WMH_HIGH_LOAD = 0.002
# Overlay colour (RGB) of each label value in `save_montage`: BraTS 1 red, 2 green, 4 yellow.
LABEL_COLOURS = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.8, 0.2), 4: (1.0, 0.9, 0.0)}

# Mean intensity of each appearance class per modality (t1, t1ce, t2, flair); max tissue ~1.
_APPEARANCE_NAMES = ("fat", "skull", "csf", "gm", "deep_gm", "wm", "edema", "necrosis",
                     "enhancing", "non_enhancing", "wmh")
_APPEARANCE = np.array([
    (0.95, 0.95, 0.78, 0.72),  # fat: scalp, bright on T1.
    (0.07, 0.07, 0.07, 0.05),  # skull: dark everywhere.
    (0.15, 0.16, 1.00, 0.07),  # csf: dark on T1, brightest on T2, suppressed on FLAIR.
    (0.55, 0.56, 0.63, 0.62),  # gm.
    (0.66, 0.66, 0.55, 0.56),  # deep_gm: thalami, between GM and WM.
    (0.85, 0.76, 0.42, 0.46),  # wm: brightest brain tissue on T1.
    (0.45, 0.46, 0.88, 0.95),  # edema: hypointense on T1, bright on T2 / FLAIR.
    (0.20, 0.18, 0.95, 0.42),  # necrosis: dark on T1c, bright on T2.
    (0.52, 1.10, 0.62, 0.72),  # enhancing tumour: bright on T1c.
    (0.38, 0.40, 0.80, 0.78),  # non-enhancing tumour core.
    (0.70, 0.68, 0.75, 0.95),  # wmh: bright on FLAIR / T2.
], dtype=np.float32)
_APP = {name: i for i, name in enumerate(_APPEARANCE_NAMES)}
_TISSUE = {name: i for i, name in enumerate(TISSUES)}
_BRAIN_TISSUES = tuple(_TISSUE[t] for t in ("gm", "wm", "ventricles", "lesion"))

# Radii of the nested shells in head-normalised units (head surface at 1).
_SKULL_RADIUS = 0.915
_DURA_RADIUS = 0.835
_PIAL_RADIUS = 0.80


def make_subject(seed: int,
                 *,
                 shape: Sequence[int] = (64, 64, 64),
                 pathology: str = "tumour",
                 noise: float = 0.03,
                 subject_id: str | None = None,
                 return_tissues: bool = False) -> Subject | tuple[Subject, dict[str, np.ndarray]]:
  """Makes one phantom subject from ``seed``.

  Args:
    seed: non-negative int; the same seed gives bit-identical arrays.
    shape: ``(D, H, W)`` volume shape, each >= 16.
    pathology: ``"tumour"``, ``"wmh"``, ``"none"`` or ``"brain_tissues"`` (tumour phantoms
      whose ``label`` is the tissue map: `TISSUES` index 0..7, ``lesion`` = the tumour).
    noise: std of both Gaussian components of the Rician noise (max tissue intensity ~1).
    subject_id: defaults to ``f"phantom-{seed}"``.
    return_tissues: also return ``{name: (D, H, W) bool}`` for every name in `TISSUES`
      (mutually exclusive masks; ``"lesion"`` is every labelled voxel).

  Returns:
    A `Subject` with ``image`` ``(D, H, W, 4)`` float32 (roughly in [0, 1.2]), ``label``
    ``(D, H, W)`` uint8 and ``brain_mask`` ``(D, H, W)`` bool; ``(subject, tissues)`` with
    ``return_tissues``.
  """
  seed = _check_seed(seed)
  shape = _check_shape(shape)
  _check_pathology(pathology)
  noise = _check_noise(noise)

  # Independent streams, so that e.g. the anatomy is the same whatever the pathology.
  anatomy_ss, pathology_ss, contrast_ss, noise_ss = np.random.SeedSequence(seed).spawn(4)
  rng = np.random.default_rng(anatomy_ss)
  geo = _Geometry(rng, shape)
  layers, fields = _anatomy_layers(rng, geo)
  tissue = _hard_map(layers, shape)

  rng = np.random.default_rng(pathology_ss)
  grade = 0
  if pathology in ("tumour", "brain_tissues"):
    lesion_layers, grade = _tumour_layers(rng, geo, fields)
  elif pathology == "wmh":
    lesion_layers = _wmh_layers(rng, geo, fields, tissue == _TISSUE["wm"])
  else:
    lesion_layers = []
  label = np.zeros(shape, np.uint8)
  for alpha, _, value in lesion_layers:
    inside = alpha > 0.5
    tissue[inside] = _TISSUE["lesion"]
    label[inside] = value
  brain_mask = np.isin(tissue, _BRAIN_TISSUES)
  if pathology == "wmh":
    load = np.count_nonzero(label) / max(np.count_nonzero(brain_mask), 1)
    grade = int(load > WMH_HIGH_LOAD)

  appearance = _jitter_contrast(np.random.default_rng(contrast_ss))
  image = _composite([(alpha, _APP[app]) for alpha, app, _ in layers + lesion_layers],
                     appearance)
  rng = np.random.default_rng(noise_ss)
  image *= _bias_field(rng, geo)
  if noise > 0:
    _add_rician_noise(rng, image, noise)

  if pathology == "brain_tissues":
    label = tissue.astype(np.uint8)
  subject = Subject(
      subject_id=f"phantom-{seed}" if subject_id is None else str(subject_id),
      image=np.ascontiguousarray(np.moveaxis(image, 0, -1)),
      label=label,
      modalities=MODALITIES,
      spacing=(1.0, 1.0, 1.0),
      brain_mask=brain_mask,
      grade=int(grade),
      pathology=pathology)
  if return_tissues:
    return subject, {name: tissue == i for i, name in enumerate(TISSUES)}
  return subject


def make_subjects(num_subjects: int,
                  *,
                  seed: int = 0,
                  shape: Sequence[int] = (64, 64, 64),
                  pathology: str = "tumour",
                  noise: float = 0.03) -> list[Subject]:
  """Makes ``num_subjects`` phantoms; subject ``i`` depends only on ``(seed, i)``.

  Per-subject seeds come from ``np.random.SeedSequence([seed, i])``; subject ids are
  ``f"phantom-{seed}-{i:04d}"``.
  """
  if isinstance(num_subjects, bool) or not isinstance(num_subjects, (int, np.integer)) or (
      num_subjects < 0):
    raise ValueError(f"num_subjects must be an int >= 0; got {num_subjects!r}")
  seed = _check_seed(seed)
  shape = _check_shape(shape)
  _check_pathology(pathology)
  noise = _check_noise(noise)
  subjects = []
  for i in range(int(num_subjects)):
    subject_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
    subjects.append(
        make_subject(subject_seed, shape=shape, pathology=pathology, noise=noise,
                     subject_id=f"phantom-{seed}-{i:04d}"))
  return subjects


def save_montage(subjects: Sequence[Subject], path: str | os.PathLike, *,
                 num_subjects: int = 4) -> None:
  """Writes a PNG: a row per subject; a column per modality, then the label over the last one.

  Each row shows the middle axial slice containing label (else the middle brain slice).
  """
  subjects = list(subjects)
  if not subjects:
    raise ValueError("subjects must be a non-empty sequence of Subject")
  if isinstance(num_subjects, bool) or not isinstance(num_subjects, (int, np.integer)) or (
      num_subjects < 1):
    raise ValueError(f"num_subjects must be an int >= 1; got {num_subjects!r}")
  # The Agg canvas directly, not pyplot: leaves the process-wide backend alone.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  subjects = subjects[:num_subjects]
  num_cols = max(s.image.shape[-1] for s in subjects) + 1
  fig = Figure(figsize=(2.0 * num_cols, 2.1 * len(subjects)), dpi=100)
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(subjects), num_cols, squeeze=False)
  for row, subject in enumerate(subjects):
    label = subject.label if subject.label is not None else np.zeros(subject.image.shape[:3])
    k = _montage_slice(label, subject.brain_mask)
    image, label = subject.image[k], label[k]
    for ax in axes[row]:
      ax.set_xticks([])
      ax.set_yticks([])
    for c in range(image.shape[-1]):
      axes[row, c].imshow(_display(image[..., c]), cmap="gray", vmin=0.0, vmax=1.0,
                          origin="lower", interpolation="nearest")
      if row == 0:
        axes[row, c].set_title(subject.modalities[c], fontsize=10)
    for c in range(image.shape[-1], num_cols - 1):
      axes[row, c].axis("off")
    overlay = np.repeat(_display(image[..., -1])[..., None], 3, axis=-1)
    for value, colour in LABEL_COLOURS.items():
      overlay[label == value] = colour
    axes[row, -1].imshow(overlay, origin="lower", interpolation="nearest")
    if row == 0:
      axes[row, -1].set_title("label", fontsize=10)
    axes[row, 0].set_ylabel(f"{subject.subject_id}\ngrade {subject.grade}, slice {k}", fontsize=8)
  fig.tight_layout()
  parent = os.path.dirname(os.fspath(path))
  if parent:
    os.makedirs(parent, exist_ok=True)
  fig.savefig(path, format="png")


def _display(image: np.ndarray) -> np.ndarray:
  """``(H, W)`` -> [0, 1] for display, scaled by the 99.5th percentile."""
  top = max(float(np.percentile(image, 99.5)), 1e-6)
  return np.clip(image / top, 0.0, 1.0)


def _montage_slice(label: np.ndarray, brain_mask: np.ndarray) -> int:
  """Middle axial slice index containing label, else brain, else the middle of the volume."""
  for mask in (label > 0, brain_mask):
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    if slices.size:
      return int(slices[slices.size // 2])
  return label.shape[0] // 2


# --------------------------------------------------------------------------------------------
# Geometry. All float32; numpy float64 scalars are turned into Python floats or np.float32 so
# they do not promote the arrays.


class _Geometry:
  """Deformed, head-normalised coordinates ``u`` of every voxel (head surface at ``|u| = 1``).

  Attributes:
    shape: ``(D, H, W)``.
    axes: three 1D float32 normalised voxel-centre coordinates in (-1, 1), one per axis.
    u: ``(3, D, H, W)`` float32 coordinates (axial, anterior, lateral).
    s: ``(D, H, W)`` float32 ``|u|``.
    vox: ``(3,)`` voxel size along each axis in ``u`` units.
  """

  def __init__(self, rng: np.random.Generator, shape: tuple[int, int, int]):
    self.shape = shape
    self.axes = [((np.arange(n, dtype=np.float32) + 0.5) * np.float32(2.0 / n) - 1.0)
                 for n in shape]
    z, y, x = (_along(a, i, 3) for i, a in enumerate(self.axes))

    # Head size and aspect ratio, position and a small rotation.
    radii = np.array([0.80, 0.86, 0.74]) * rng.uniform(0.88, 1.0) * rng.uniform(
        0.95, 1.05, size=3)
    shift = rng.uniform(-0.03, 0.03, size=3)
    rot = _rotation(rng.uniform(-0.08, 0.08, size=3))
    z, y, x = z - np.float32(shift[0]), y - np.float32(shift[1]), x - np.float32(shift[2])
    q = [float(r[0]) * z + float(r[1]) * y + float(r[2]) * x for r in rot]

    # Smooth analytic deformation: a few low-frequency sinusoidal displacement modes.
    for _ in range(3):
      k = _random_unit(rng) * rng.uniform(1.2, 3.0)
      direction = _random_unit(rng) * rng.uniform(0.015, 0.035)
      wave = np.sin(float(k[0]) * q[0] + float(k[1]) * q[1] + float(k[2]) * q[2]
                    + np.float32(rng.uniform(0, 2 * np.pi)))
      q = [qi + float(d) * wave for qi, d in zip(q, direction)]

    self.u = np.stack([qi * np.float32(1.0 / r) for qi, r in zip(q, radii)])
    self.s = np.sqrt(np.square(self.u[0]) + np.square(self.u[1]) + np.square(self.u[2]))
    self.vox = 2.0 / (np.array(shape) * radii)
    self._ramp_scale = np.float32(1.0 / np.exp(np.mean(np.log(self.vox))))

  def ramp(self, f: np.ndarray) -> np.ndarray:
    """Signed distance ``f`` (``u`` units, < 0 inside) -> partial-volume fraction in [0, 1]."""
    return np.clip(np.float32(0.5) - f * self._ramp_scale, 0.0, 1.0)

  def region(self, centre, extent: float, voxel=None) -> tuple[slice, slice, slice]:
    """Voxel box holding every point within ``extent`` (``u`` units) of ``centre``."""
    if voxel is None:
      d2 = sum(np.square(self.u[i] - np.float32(centre[i])) for i in range(3))
      voxel = np.unravel_index(np.argmin(d2), self.shape)
    # 1.5: margin for the local stretch of the deformation.
    half = np.ceil(1.5 * extent / self.vox).astype(int) + 2
    return tuple(slice(max(v - h, 0), min(v + h + 1, n))
                 for v, h, n in zip(voxel, half, self.shape))

  def crop(self, region) -> np.ndarray:
    """``u`` over a box ``region`` of voxels, ``(3, d, h, w)``."""
    return self.u[(slice(None),) + tuple(region)]


def _waves(rng: np.random.Generator, u: np.ndarray, num: int, freq: tuple[float, float],
           centre=(0.0, 0.0, 0.0)) -> np.ndarray:
  """Random smooth field at points ``u`` ``(3, ...)``: ``num`` plane waves, unit variance.

  The waves' phases are relative to ``centre``; values are clipped to [-2, 2].
  """
  field = np.zeros(u.shape[1:], np.float32)
  for _ in range(num):
    k = _random_unit(rng) * rng.uniform(*freq)
    phase = rng.uniform(0, 2 * np.pi) - float(np.dot(k, centre))
    field += np.sin(float(k[0]) * u[0] + float(k[1]) * u[1] + float(k[2]) * u[2]
                    + np.float32(phase))
  field *= np.float32(np.sqrt(2.0 / num))
  return np.clip(field, -2.0, 2.0, out=field)


def _blob(rng: np.random.Generator, u: np.ndarray, centre, radius: float,
          roughness: float) -> np.ndarray:
  """Approximate signed distance at points ``u`` ``(3, ...)`` to an irregular blob.

  Every point of the blob lies within `_blob_extent` of ``centre``.
  """
  stretch = np.exp(rng.uniform(-0.15, 0.15, size=3))
  d2 = sum(np.square((u[i] - np.float32(centre[i])) * np.float32(1.0 / stretch[i]))
           for i in range(3))
  bumps = _waves(rng, u, 4, (2.0 / radius, 4.0 / radius), centre)
  return np.sqrt(d2) - np.float32(radius) * (1.0 + np.float32(roughness) * bumps)


def _blob_extent(radius: float, roughness: float) -> float:
  return radius * (1.0 + 2.0 * roughness) * np.exp(0.15)


def _along(a: np.ndarray, axis: int, ndim: int) -> np.ndarray:
  return a.reshape([-1 if i == axis else 1 for i in range(ndim)])


def _random_unit(rng: np.random.Generator) -> np.ndarray:
  v = rng.standard_normal(3)
  return v / np.linalg.norm(v)


def _rotation(angles: np.ndarray) -> np.ndarray:
  """Rotation matrix from three small angles about the (z, y, x) axes."""
  a, b, c = angles
  rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
  ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
  rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
  return rz @ ry @ rx


def _paste(region, values: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
  full = np.zeros(shape, np.float32)
  full[region] = values
  return full


# --------------------------------------------------------------------------------------------
# Anatomy and lesions, as layers painted in order: (alpha (D, H, W), appearance, tissue/label).


def _anatomy_layers(rng: np.random.Generator, geo: _Geometry):
  """Healthy head, outer to inner.

  Returns:
    ``[(alpha, appearance name, tissue name)]`` in painting order, and signed distances
    (``u`` units, < 0 inside) of the ``"parenchyma"`` (GM | WM, ventricles included),
    ``"ventricles"``, ``"wm"`` and ``"intracranial"`` space, to place lesions.
  """
  uz, uy, ux = geo.u
  s, ramp = geo.s, geo.ramp
  f32 = np.float32
  skull = _SKULL_RADIUS + rng.uniform(-0.015, 0.015)
  dura = _DURA_RADIUS + rng.uniform(-0.01, 0.01)
  pial = _PIAL_RADIUS + rng.uniform(-0.01, 0.0)
  layers = [(ramp(s - f32(1.0)), "fat", "scalp"),
            (ramp(s - f32(skull)), "skull", "skull"),
            (ramp(s - f32(dura)), "csf", "csf")]

  # Cortex: sulci follow the zero set of a random field g (evaluated in the cortical shell only)
  # and cut into the pial surface; the grey-matter ribbon lines them, the white matter fills
  # the gyri.
  shell = (s > f32(0.4)) & (s < f32(dura))
  g = np.full(geo.shape, 2.0, np.float32)
  g[shell] = np.abs(_waves(rng, geo.u[:, shell], 12, (8.0, 12.0)))
  depth = f32(rng.uniform(0.13, 0.17))
  thickness = f32(rng.uniform(0.09, 0.11))
  brain = s - (f32(pial) - depth * np.maximum(f32(1.0) - g * f32(1 / 0.25), 0.0))
  wm = s - (f32(pial) - thickness - depth * np.maximum(f32(1.0) - g * f32(1 / 0.8), 0.0))
  # Interhemispheric fissure: CSF between the hemispheres, above the deep structures.
  midline = np.abs(ux)
  brain = np.maximum(brain, np.minimum(f32(0.02) - midline, s - f32(0.42)))
  wm = np.maximum(wm, np.minimum(f32(0.02) + thickness - midline, s - f32(0.42) - thickness))
  layers += [(ramp(brain), "gm", "gm"), (ramp(wm), "wm", "wm")]

  # Deep grey nuclei (thalami), then the lateral ventricles: bananas along the AP axis, frontal
  # horns close to the midline, diverging and widening posteriorly; sizes vary between subjects.
  r = np.sqrt(np.square((midline - f32(0.10)) * f32(1 / 0.085)) +
              np.square((uy + f32(0.07)) * f32(1 / 0.16)) +
              np.square((uz + f32(0.03)) * f32(1 / 0.11)))
  layers.append((ramp((r - 1.0) * f32(0.085)), "deep_gm", "gm"))
  size = rng.uniform(0.8, 1.6)
  rx, ry, rz = 0.06 * size, 0.36 + 0.04 * size, 0.09 * np.sqrt(size)
  widen = f32(1.0) - f32(0.5) * np.minimum(uy, f32(0.0))
  r = np.sqrt(
      np.square((midline - f32(0.03 + rx) + f32(0.08) * uy) / (f32(rx) * widen)) +
      np.square(uy * f32(1 / ry)) +
      np.square((uz - f32(0.12) + f32(0.8) * np.square(uy)) * f32(1 / rz)))
  ventricles = (r - 1.0) * f32(min(rx, rz))
  layers.append((ramp(ventricles), "csf", "ventricles"))
  fields = {"parenchyma": brain, "ventricles": ventricles, "wm": wm,
            "intracranial": s - f32(pial)}
  return layers, fields


def _tumour_layers(rng: np.random.Generator, geo: _Geometry, fields):
  """One tumour as ``[(alpha, appearance, label)]`` (edema, core, necrosis / focus), and grade."""
  grade = int(rng.random() < 0.5)
  for _ in range(1000):  # Centre in the cerebral white / grey matter, off the midline.
    centre = rng.uniform(-0.55, 0.55, size=3)
    if 0.22 <= np.linalg.norm(centre) <= 0.55 and abs(centre[2]) >= 0.2:
      break
  # Whole tumour about 5-15% of the brain volume (BraTS ranges over roughly 1-20%).
  edema_radius = rng.uniform(0.32, 0.45) if grade else rng.uniform(0.25, 0.38)
  region = geo.region(centre, _blob_extent(edema_radius, 0.2))
  u = geo.crop(region)
  field = {name: value[region] for name, value in fields.items()}
  vox = np.float32(geo.vox.max())

  edema_raw = _blob(rng, u, centre, edema_radius, 0.2)
  edema = np.maximum(np.maximum(edema_raw, field["parenchyma"]), -field["ventricles"])
  core_radius = edema_radius * (rng.uniform(0.6, 0.75) if grade else rng.uniform(0.35, 0.55))
  core_centre = centre + rng.uniform(-0.3, 0.3, size=3) * (edema_radius - core_radius)
  core = _blob(rng, u, core_centre, core_radius, 0.15)
  core = np.maximum(np.maximum(core, edema_raw + vox), field["intracranial"])
  layers = [(edema, "edema", BRATS_LABELS["edema"])]
  if grade:
    # High grade: a necrotic core in an enhancing rim at least ~1.5 voxels thick.
    necrosis = _blob(rng, u, core_centre, core_radius * rng.uniform(0.55, 0.75), 0.15)
    necrosis = np.maximum(necrosis, core + np.float32(1.5) * vox)
    layers += [(core, "enhancing", BRATS_LABELS["enhancing"]),
               (necrosis, "necrosis", BRATS_LABELS["necrotic_core"])]
  else:
    # Low grade: a non-enhancing core, in half the subjects with a small enhancing focus.
    layers.append((core, "non_enhancing", BRATS_LABELS["necrotic_core"]))
    if rng.random() < 0.5:
      focus_radius = core_radius * rng.uniform(0.3, 0.45)
      focus_centre = core_centre + _random_unit(rng) * (core_radius - focus_radius) * 0.5
      focus = np.maximum(_blob(rng, u, focus_centre, focus_radius, 0.1), core + vox)
      layers.append((focus, "enhancing", BRATS_LABELS["enhancing"]))
  return [(_paste(region, geo.ramp(f), geo.shape), app, value) for f, app, value in layers], grade


def _wmh_layers(rng: np.random.Generator, geo: _Geometry, fields, wm_mask: np.ndarray):
  """3-12 small white-matter hyperintensities as one ``[(alpha, "wmh", 1)]`` layer."""
  candidates = np.flatnonzero(wm_mask)
  if not candidates.size:
    return []
  alpha = np.zeros(geo.shape, np.float32)
  # A per-subject lesion burden scales all the lesions, so the load spreads over both grades.
  burden = rng.uniform(0.6, 1.4)
  for index in rng.choice(candidates, size=int(rng.integers(3, 13))):
    voxel = np.unravel_index(index, geo.shape)
    centre = geo.u[(slice(None),) + voxel]
    radius = burden * rng.uniform(0.03, 0.075)
    region = geo.region(centre, _blob_extent(radius, 0.15), voxel=voxel)
    blob = np.maximum(_blob(rng, geo.crop(region), centre, radius, 0.15), fields["wm"][region])
    np.maximum(alpha[region], geo.ramp(blob), out=alpha[region])
  return [(alpha, "wmh", 1)]


def _hard_map(layers, shape: tuple[int, int, int]) -> np.ndarray:
  """``(D, H, W)`` uint8 index into `TISSUES`: the last layer covering > half of a voxel."""
  tissue = np.zeros(shape, np.uint8)
  for alpha, _, name in layers:
    tissue[alpha > 0.5] = _TISSUE[name]
  return tissue


def _composite(layers, appearance: np.ndarray) -> np.ndarray:
  """Paints ``[(alpha (D, H, W), appearance row)]`` in order over 0 -> ``(C, D, H, W)``."""
  shape = layers[0][0].shape
  weights = np.empty((len(layers),) + shape, np.float32)
  transmit = np.ones(shape, np.float32)
  for k in range(len(layers) - 1, -1, -1):
    np.multiply(layers[k][0], transmit, out=weights[k])
    transmit -= weights[k]
  table = appearance[[row for _, row in layers]]  # (layers, C)
  # einsum's own loops: a BLAS matmul of this thin shape is slower and spins up threads.
  image = np.einsum("kc,kn->cn", table, weights.reshape(len(layers), -1))
  return image.reshape((appearance.shape[1],) + shape)


def _jitter_contrast(rng: np.random.Generator) -> np.ndarray:
  """Per-subject appearance table: per-tissue jitter, then a per-modality gamma and scale."""
  table = _APPEARANCE * rng.uniform(0.95, 1.05, size=_APPEARANCE.shape)
  table = rng.uniform(0.92, 1.05, size=4) * table ** rng.uniform(0.85, 1.15, size=4)
  return table.astype(np.float32)


def _bias_field(rng: np.random.Generator, geo: _Geometry) -> np.ndarray:
  """Smooth multiplicative bias field per modality, ``(C, D, H, W)`` float32, ~1 +- 0.2."""
  log_field = np.zeros((len(MODALITIES),) + geo.shape, np.float32)
  for channel in log_field:
    for _ in range(3):
      freq = rng.uniform(0.3, 1.3, size=3) * (np.pi / 2)
      phase = rng.uniform(0, 2 * np.pi, size=3)
      waves = [_along(np.cos(a * np.float32(f) + np.float32(p)), i, 3)
               for i, (a, f, p) in enumerate(zip(geo.axes, freq, phase))]
      channel += np.float32(rng.uniform(-0.07, 0.07)) * waves[0] * waves[1] * waves[2]
  return np.exp(log_field, out=log_field)


def _add_rician_noise(rng: np.random.Generator, image: np.ndarray, noise: float) -> None:
  """In place ``image <- sqrt((image + n1)^2 + n2^2)``, n1, n2 ~ N(0, noise^2) i.i.d.

  n1, n2 come from Box-Muller: ``rho = noise * sqrt(-2 log U1)``, ``n1 = rho cos(2 pi U2)``,
  ``n2 = rho sin(2 pi U2)``, so ``(image + n1)^2 + n2^2 = image (image + 2 n1) + rho^2``.
  """
  u = rng.random((2,) + image.shape, dtype=np.float32)
  rho2 = np.log(np.subtract(1.0, u[0], out=u[0]), out=u[0])  # U1 = 1 - u in (0, 1], exact.
  rho2 *= np.float32(-2.0 * noise * noise)
  n1 = np.cos(np.float32(2 * np.pi) * u[1], out=u[1])
  n1 *= np.sqrt(rho2)
  n1 *= np.float32(2.0)
  n1 += image
  image *= n1
  image += rho2
  np.sqrt(np.maximum(image, 0.0, out=image), out=image)


def _check_seed(seed) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative int; got {seed!r}")
  return int(seed)


def _check_shape(shape) -> tuple[int, int, int]:
  try:
    dims = tuple(shape)
  except TypeError:
    raise ValueError(f"shape must be 3 ints (D, H, W), each >= 16; got {shape!r}") from None
  if len(dims) != 3 or any(
      isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 16 for d in dims):
    raise ValueError(f"shape must be 3 ints (D, H, W), each >= 16; got {shape!r}")
  return tuple(int(d) for d in dims)


def _check_pathology(pathology) -> None:
  if pathology not in PATHOLOGIES:
    raise ValueError(f"pathology must be one of {PATHOLOGIES}; got {pathology!r}")


def _check_noise(noise) -> float:
  try:
    value = float(noise)
  except (TypeError, ValueError):
    raise ValueError(f"noise must be a finite number >= 0; got {noise!r}") from None
  if not np.isfinite(value) or value < 0:
    raise ValueError(f"noise must be a finite number >= 0; got {noise!r}")
  return value

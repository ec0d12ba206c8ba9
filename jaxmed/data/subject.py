"""The record every data source returns: one subject's multi-modal volume, labels and metadata.

Axis convention: volumes are ``(D, H, W, C)`` with axis 0 the axial (slice) axis, matching the
channels-last layout of jaxmed models. NIfTI data (RAS+ after canonical reorientation, stored
``(x, y, z)``) is transposed to ``(z, y, x)`` on reading, so ``image[k]`` is the k-th axial slice.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# BraTS (2018) label values: 1 necrotic / non-enhancing core, 2 edema, 4 enhancing tumour.
BRATS_LABELS = {"necrotic_core": 1, "edema": 2, "enhancing": 4}
# Evaluation regions of the BraTS challenge, in channel order of `brats_regions`.
BRATS_REGIONS = ("WT", "TC", "ET")
WMH_REGIONS = ("WMH",)
# Multi-class label maps: label value k (1..K) is class CLASS_NAMES[pathology][k - 1].
CLASS_NAMES = {
    # BTCV / Synapse multi-organ CT (13 organs).
    "organs": ("spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver",
               "stomach", "aorta", "inferior_vena_cava", "portal_splenic_vein", "pancreas",
               "right_adrenal", "left_adrenal"),
    # FeTA fetal brain T2w (7 tissues).
    "tissues": ("external_csf", "grey_matter", "white_matter", "ventricles", "cerebellum",
                "deep_grey_matter", "brainstem"),
    # The phantoms' tissue map (jaxmed.data.synthetic.TISSUES without the background): a
    # FeTA-like 8-class target (with the background) on tumour phantoms.
    "brain_tissues": ("scalp", "skull", "csf", "gm", "wm", "ventricles", "lesion"),
}
# Every pathology (what a label map means): "none" = no label.
PATHOLOGIES = ("tumour", "wmh", *CLASS_NAMES, "none")


@dataclasses.dataclass
class Subject:
  """One subject.

  Attributes:
    subject_id: a unique name, e.g. ``"phantom-0003"`` or the BraTS case folder name.
    image: ``(D, H, W, C)`` float32, one channel per modality.
    label: ``(D, H, W)`` uint8 label map (BraTS values 0/1/2/4, WMH values 0/1) or None.
    modalities: channel names, e.g. ``("t1", "t1ce", "t2", "flair")``.
    spacing: voxel size in mm along (D, H, W).
    brain_mask: ``(D, H, W)`` bool foreground (brain) mask.
    grade: binary label for classification tasks (1 = high grade); 0 when unknown.
    pathology: one of `PATHOLOGIES` (``"tumour"``, ``"wmh"``, ``"organs"``, ``"tissues"``,
      ``"none"``); selects the label -> region mapping.
  """

  subject_id: str
  image: np.ndarray
  label: np.ndarray | None
  modalities: tuple[str, ...]
  spacing: tuple[float, float, float]
  brain_mask: np.ndarray
  grade: int = 0
  pathology: str = "tumour"

  def __post_init__(self):
    if self.image.ndim != 4:
      raise ValueError(f"Subject.image must be (D, H, W, C); got shape {self.image.shape}")
    if self.image.shape[-1] != len(self.modalities):
      raise ValueError(
          f"Subject.image has {self.image.shape[-1]} channels but modalities={self.modalities}")
    for name in ("label", "brain_mask"):
      value = getattr(self, name)
      if value is not None and value.shape != self.image.shape[:3]:
        raise ValueError(
            f"Subject.{name} shape {value.shape} != image spatial shape {self.image.shape[:3]}")

  @property
  def regions(self) -> np.ndarray:
    """``(D, H, W, R)`` bool evaluation regions (WT/TC/ET for tumours, WMH for WMH)."""
    if self.label is None:
      raise ValueError(f"subject {self.subject_id} has no label")
    return label_regions(self.label, self.pathology)


def select_modalities(subject: Subject, modalities: tuple[str, ...]) -> Subject:
  """The subject with only the named channels, in the given order."""
  if tuple(subject.modalities) == modalities:
    return subject
  missing = [m for m in modalities if m not in subject.modalities]
  if missing:
    raise ValueError(f"data.modalities {missing} not in subject {subject.subject_id} "
                     f"modalities {subject.modalities}")
  index = [subject.modalities.index(m) for m in modalities]
  return Subject(subject.subject_id, subject.image[..., index], subject.label, modalities,
                 subject.spacing, subject.brain_mask, subject.grade, subject.pathology)


def brats_regions(label):
  """BraTS label map ``(...)`` -> ``(..., 3)`` bool regions WT (1|2|4), TC (1|4), ET (4).

  Works on numpy and jax arrays alike.
  """
  wt = label > 0
  tc = (label == 1) | (label == 4)
  et = label == 4
  stack = np.stack if isinstance(label, np.ndarray) else _jnp().stack
  return stack([wt, tc, et], axis=-1)


def label_regions(label, pathology: str):
  """Label map -> bool region channels for ``pathology``: "tumour" -> WT/TC/ET, "wmh" -> WMH,
  "organs" / "tissues" -> one channel per class ``label == k``, k = 1..K (`CLASS_NAMES`)."""
  if pathology == "tumour":
    return brats_regions(label)
  if pathology == "wmh":
    return (label > 0)[..., None]
  if pathology in CLASS_NAMES:
    stack = np.stack if isinstance(label, np.ndarray) else _jnp().stack
    return stack([label == k for k in range(1, len(CLASS_NAMES[pathology]) + 1)], axis=-1)
  raise ValueError(f"pathology must be one of {PATHOLOGIES[:-1]} to define regions; got "
                   f"{pathology!r}")


def region_names(pathology: str) -> tuple[str, ...]:
  """Names of the channels returned by `label_regions`."""
  names = {"tumour": BRATS_REGIONS, "wmh": WMH_REGIONS, **CLASS_NAMES}
  if pathology not in names:
    raise ValueError(f"pathology must be one of {tuple(names)} to name regions; got "
                     f"{pathology!r}")
  return names[pathology]


def _jnp():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp

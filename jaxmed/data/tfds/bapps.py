"""BAPPS (the LPIPS paper's perceptual-similarity judgements) as a TFDS dataset (manual download).

Official layout in ``manual_dir``, as unpacked by ``scripts/download_dataset.sh`` of
https://github.com/richzhang/PerceptualSimilarity (a ``dataset/`` folder in between is also
accepted: ``<manual_dir>/dataset/2afc/...``)::

  <manual_dir>/2afc/{train,val}/<category>/{ref,p0,p1}/<id>.png
  <manual_dir>/2afc/{train,val}/<category>/judge/<id>.npy     fraction of humans choosing p1
  <manual_dir>/jnd/val/<category>/{p0,p1}/<id>.png
  <manual_dir>/jnd/val/<category>/same/<id>.npy               fraction answering "same"

Categories: 2AFC train ``traditional, cnn, mix``; 2AFC val ``traditional, cnn, superres,
deblur, frameinterp, color``; JND val ``traditional, cnn``. Absent split / category folders are
skipped (e.g. only ``download_dataset_valonly.sh`` was run); at least one category must exist.

Builder configs and records (categories in the order above, ids in sorted order within a
category; the prepared splits keep that order, key ``<category>/<id>``):

  ``2afc`` (splits "train", "val"): ``ref``, ``p0``, ``p1`` uint8 ``(H, W, 3)`` RGB patches
  decoded from the PNGs without resizing (64 x 64 in the releases described by the paper),
  ``judge`` float32 in [0, 1], ``category`` and ``id`` text.

  ``jnd`` (split "val"): ``p0``, ``p1`` uint8 ``(H, W, 3)``, ``same`` float32 in [0, 1],
  ``category`` and ``id`` text.

An id present in one folder of a category but missing from another raises FileNotFoundError
naming the missing file; unreadable PNG / ``.npy`` files raise ValueError naming the file.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterator

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

# config -> split -> categories, in record order.
CATEGORIES = {
    "2afc": {
        "train": ("traditional", "cnn", "mix"),
        "val": ("traditional", "cnn", "superres", "deblur", "frameinterp", "color"),
    },
    "jnd": {
        "val": ("traditional", "cnn"),
    },
}
# config -> (image folders, judgement folder).
FOLDERS = {
    "2afc": (("ref", "p0", "p1"), "judge"),
    "jnd": (("p0", "p1"), "same"),
}

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Run scripts/download_dataset.sh of https://github.com/richzhang/PerceptualSimilarity (or
download twoafc_train.tar.gz, twoafc_val.tar.gz and jnd.tar.gz and unpack them the same way), and
pass the folder holding 2afc/ and jnd/ (or the dataset/ folder above them) as manual_dir.
"""

_CITATION = """\
@inproceedings{zhang2018perceptual,
  title={The Unreasonable Effectiveness of Deep Features as a Perceptual Metric},
  author={Zhang, Richard and Isola, Phillip and Efros, Alexei A and Shechtman, Eli and
          Wang, Oliver},
  booktitle={CVPR},
  year={2018}
}
"""


def read_png(path: pathlib.Path) -> np.ndarray:
  """Decodes a patch as uint8 ``(H, W, 3)`` RGB (converted like the official loader)."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"), dtype=np.uint8)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot read BAPPS image {path.absolute()}: {type(e).__name__}: {e}") from e


def read_judgement(path: pathlib.Path) -> np.float32:
  """Reads a ``judge`` / ``same`` file: one number in [0, 1] as float32."""
  where = path.absolute()
  try:
    value = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f"cannot read BAPPS judgement {where}: {type(e).__name__}: {e}") from e
  value = np.asarray(value)
  if value.size != 1 or not np.issubdtype(value.dtype, np.number):
    raise ValueError(f"BAPPS judgement {where} must hold one number; got {value.dtype} "
                     f"{value.shape}")
  value = np.float32(value.reshape(()))
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"BAPPS judgement {where} must be in [0, 1]; got {value}")
  return value


def _manual_dir(dl_manager: tfds.download.DownloadManager) -> pathlib.Path:
  """``dl_manager.manual_dir``; FileNotFoundError (not TFDS's AssertionError) if empty."""
  try:
    return pathlib.Path(os.fspath(dl_manager.manual_dir))
  except AssertionError as e:
    raise FileNotFoundError(str(e)) from e


def dataset_root(manual_dir: str | os.PathLike, config: str) -> pathlib.Path:
  """``<manual_dir>/<config>`` or ``<manual_dir>/dataset/<config>``, whichever exists.

  Raises:
    FileNotFoundError: neither exists.
  """
  manual_dir = pathlib.Path(os.fspath(manual_dir))
  candidates = (manual_dir / config, manual_dir / "dataset" / config)
  for candidate in candidates:
    if candidate.is_dir():
      return candidate
  raise FileNotFoundError(f"BAPPS {config!r} folder not found in manual_dir "
                          f"{manual_dir.absolute()}: expected "
                          f"{' or '.join(str(c.absolute()) for c in candidates)}")


def _stems(folder: pathlib.Path, suffix: str) -> set[str]:
  if not folder.is_dir():
    raise FileNotFoundError(f"BAPPS folder not found: {folder.absolute()}")
  return {p.stem for p in folder.iterdir() if p.suffix == suffix and not p.name.startswith(".")}


def list_ids(category_dir: pathlib.Path, config: str) -> list[str]:
  """Sorted ids of one category folder; every id must have all its files.

  Raises:
    FileNotFoundError: a folder, or one file of an id, is missing.
  """
  image_folders, judge_folder = FOLDERS[config]
  stems = {name: _stems(category_dir / name, ".png") for name in image_folders}
  stems[judge_folder] = _stems(category_dir / judge_folder, ".npy")
  ids = sorted(set().union(*stems.values()))
  for name, present in stems.items():
    missing = [i for i in ids if i not in present]
    if missing:
      suffix = ".npy" if name == judge_folder else ".png"
      path = category_dir / name / f"{missing[0]}{suffix}"
      raise FileNotFoundError(f"BAPPS file missing: {path.absolute()} ({len(missing)} ids of "
                              f"{category_dir.absolute()} lack their {name}/ file)")
  return ids


def category_dirs(root: pathlib.Path, config: str) -> dict[str, list[tuple[str, pathlib.Path]]]:
  """``{split: [(category, folder), ...]}`` for the split / category folders present.

  Raises:
    FileNotFoundError: no category folder of any split exists under ``root``.
  """
  found = {}
  for split, categories in CATEGORIES[config].items():
    present = [(c, root / split / c) for c in categories if (root / split / c).is_dir()]
    if present:
      found[split] = present
  if not found:
    expected = [f"{s}/{c}" for s, cs in CATEGORIES[config].items() for c in cs]
    raise FileNotFoundError(f"no BAPPS {config!r} category folder in {root.absolute()}: "
                            f"expected at least one of {expected}")
  return found


def _generate(categories: list[tuple[str, pathlib.Path]],
              config: str) -> Iterator[tuple[str, dict[str, Any]]]:
  image_folders, judge_folder = FOLDERS[config]
  for category, folder in categories:
    for patch_id in list_ids(folder, config):
      record = {name: read_png(folder / name / f"{patch_id}.png") for name in image_folders}
      record[judge_folder] = read_judgement(folder / judge_folder / f"{patch_id}.npy")
      record["category"] = category
      record["id"] = patch_id
      yield f"{category}/{patch_id}", record


class Bapps(tfds.core.GeneratorBasedBuilder):
  """BAPPS: 2AFC triplets (ref, p0, p1, judge) or JND pairs (p0, p1, same) of RGB patches."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "2AFC train / val and JND val, patches decoded without resizing."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(
          name="2afc", description="Two-alternative forced choice: which of p0 / p1 is closer "
          "to ref (judge = fraction of humans choosing p1)."),
      tfds.core.BuilderConfig(
          name="jnd", description="Just noticeable differences: are p0 and p1 the same "
          "(same = fraction of humans answering same)."),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    image_folders, judge_folder = FOLDERS[self.builder_config.name]
    patch = tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib")
    features = {name: patch for name in image_folders}
    features[judge_folder] = tfds.features.Scalar(dtype=np.float32)
    features["category"] = tfds.features.Text()
    features["id"] = tfds.features.Text()
    return self.dataset_info_from_configs(
        description="Berkeley-Adobe Perceptual Patch Similarity (BAPPS) human judgements.",
        features=tfds.features.FeaturesDict(features),
        homepage="https://richzhang.github.io/PerceptualSimilarity/",
        citation=_CITATION,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config.name
    root = dataset_root(_manual_dir(dl_manager), config)
    return {split: self._generate_examples(categories, config)
            for split, categories in category_dirs(root, config).items()}

  def _generate_examples(self, categories: list[tuple[str, pathlib.Path]], config: str):
    yield from _generate(categories, config)

"""TFDS builders for the papers' public datasets (manual download), written as array_record.

Each builder reads the dataset's official layout from ``manual_dir`` (the folder the user
downloaded and unpacked), writes array_record files under ``data_dir`` once, and is read back
with `tfds.data_source` (random access, no TensorFlow needed at any point):

  ==========  ===================================  ============================================
  name        module                               one record
  ==========  ===================================  ============================================
  brats       `jaxmed.data.tfds.brats`             one case: 4 modalities + tumour labels
  wmh         `jaxmed.data.tfds.wmh`               one case: T1 + FLAIR + WMH labels
  btcv        `jaxmed.data.tfds.btcv`              one CT case + 13 organ labels
  feta        `jaxmed.data.tfds.feta`              one fetal T2w case + 7 tissue labels
  fastmri     `jaxmed.data.tfds.fastmri`           one knee single-coil slice: k-space + target
  bapps       `jaxmed.data.tfds.bapps`             one 2AFC triplet or JND pair of patches
  ==========  ===================================  ============================================

Volume records are raw (unnormalised) intensities in canonical orientation, ``(D, H, W, C)``
with axis 0 axial (`jaxmed.data.subject`), plus the voxel spacing; preprocessing (resampling,
cropping, z-scoring) happens later, once, in `jaxmed.data.cache`.

Usage::

  from jaxmed.data import tfds as jtfds
  jtfds.prepare("brats", manual_dir="~/data/BraTS2021", data_dir="~/tfds", config="2021")
  source = jtfds.data_source("brats", "train", data_dir="~/tfds", config="2021")
  record = source[0]
"""

from __future__ import annotations

import importlib
import os

# name -> "module:Class" (imported on first use: tensorflow_datasets is only loaded when asked).
BUILDERS = {
    "brats": "jaxmed.data.tfds.brats:Brats",
    "wmh": "jaxmed.data.tfds.wmh:Wmh",
    "btcv": "jaxmed.data.tfds.btcv:Btcv",
    "feta": "jaxmed.data.tfds.feta:Feta",
    "fastmri": "jaxmed.data.tfds.fastmri:Fastmri",
    "bapps": "jaxmed.data.tfds.bapps:Bapps",
}


def builder_class(name: str):
  """The `tfds.core.GeneratorBasedBuilder` subclass registered as ``name``."""
  if name not in BUILDERS:
    raise ValueError(f"unknown TFDS dataset {name!r}; known: {sorted(BUILDERS)}")
  module, cls = BUILDERS[name].split(":")
  return getattr(importlib.import_module(module), cls)


def builder(name: str, *, data_dir: str | os.PathLike, config: str | None = None):
  """The builder of ``name`` (with builder config ``config``, e.g. a BraTS year) writing to /
  reading from ``data_dir``, as array_record."""
  kwargs = {"data_dir": os.path.expanduser(os.fspath(data_dir)), "file_format": "array_record"}
  if config is not None:
    kwargs["config"] = config
  return builder_class(name)(**kwargs)


def prepare(name: str, *, manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
            config: str | None = None):
  """Builds ``name`` from the official layout in ``manual_dir`` into ``data_dir`` (once: a
  prepared dataset is reused). Returns the builder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  manual_dir = os.path.expanduser(os.fspath(manual_dir))
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"manual_dir for {name!r} not found: {os.path.abspath(manual_dir)}")
  b = builder(name, data_dir=data_dir, config=config)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return b


def data_source(name: str, split: str, *, data_dir: str | os.PathLike,
                config: str | None = None):
  """Random-access source over a prepared split (`tfds.data_source`): ``len(source)`` records,
  ``source[i]`` a dict of numpy arrays (text features as bytes)."""
  b = builder(name, data_dir=data_dir, config=config)
  if split not in b.info.splits:
    raise ValueError(f"{name!r} has no split {split!r}; prepared splits: {sorted(b.info.splits)}")
  return b.as_data_source(split=split)

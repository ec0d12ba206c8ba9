"""2AFC evaluation of perceptual metrics: BAPPS, a phantom PROXY set, LPIPS tap weights, ratings.

The two-alternative forced choice (2AFC) test of LPIPS (Zhang et al., 2018), used by the CoPer
paper (Sec. IV-A1, Table II) to rank perceptual metrics: a triplet is a reference patch and two
distortions of it, ``p0`` and ``p1``; ``judge`` is the fraction of observers who found ``p1``
closer to the reference. A distance ``d`` scores ``(d0 < d1)(1 - judge) + (d1 < d0) judge +
(d0 == d1) / 2`` per triplet (`jaxmed.metrics.two_afc_score`), averaged per distortion category;
"Overall" is the plain mean of the category scores, as LPIPS and Table II report it.

This module holds:

* `Triplets` (one category) and `TwoAFCSet` (categories by name, labelled human or PROXY), the
  structure every reader returns and `two_afc_evaluate` scores.
* `read_bapps_2afc`: the BAPPS folder layout ``<root>/<split>/<category>/{ref,p0,p1}/<id>.png``
  and ``judge/<id>.npy`` (file-layout helpers shared with `jaxmed.data.tfds.bapps`);
  `read_bapps_2afc_tfds`: the same triplets from the prepared TFDS ``bapps/2afc`` data source.
* `phantom_proxy_2afc`: a 2AFC set built from jaxmed's synthetic tumour phantoms. No human has
  judged these images: the judge is an ORACLE (tumour preservation, `PROXY_ORACLE`), so its
  scores are a proxy, never comparable with BAPPS's human agreement.
* `two_afc_evaluate` (batched, bounded memory) and `two_afc_table` (markdown, Table II layout).
* `learn_tap_weights`: LPIPS's "lin" calibration of per-channel tap weights ``w_l`` from 2AFC
  judgements with its small ranking network (``Dist2LogitLayer`` + ``BCERankingLoss`` of
  richzhang/PerceptualSimilarity ``lpips/lpips.py``, trained as ``lpips/trainer.py`` does), and
  `tap_weighted_distance`, the CoPer / LPIPS distance for given weights (Sec. III-B, Fig. 2a).
* `rating_agreement`: the normalisation of Sec. IV-A4 (Fig. 3b): ``D' = d_i / max_j d_j`` and
  ``R' = |r^R - r^S| / max``, with their Pearson / Spearman correlation.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import itertools
import math
import numbers
import os
import pathlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmed.data import mri
from jaxmed.data import synthetic
from jaxmed.data import transforms
from jaxmed.metrics import max_normalize, pearson, spearman, two_afc_score

# BAPPS patches are 64 x 64 (LPIPS's loader resizes to ``load_size=64``).
BAPPS_PATCH_SIZE = 64

# Distortions of the phantom proxy set, in category order.
DISTORTIONS = ("blur", "noise", "gamma", "undersampling", "ghosting", "shift")
# Severity drawn per distorted image (reference intensities scaled to [0, 1], see
# `phantom_proxy_2afc`): blur Gaussian sigma (px), uniform; noise std, uniform; gamma exponent,
# log-uniform; undersampling fastMRI random column masks, acceleration drawn from the tuple with
# fastMRI's centre fraction 0.32 / acceleration; ghosting phase error (rad) on every other
# phase-encode (W) line of k-space, uniform; shift translation length (px), uniform, in a
# uniform direction.
SEVERITIES = {
    "blur": (0.5, 2.5),
    "noise": (0.02, 0.15),
    "gamma": (0.6, 1.6),
    "undersampling": (2, 3, 4, 6, 8),
    "ghosting": (0.2, 1.0),
    "shift": (0.5, 3.0),
}
# A local distortion is weighted by a Gaussian bump of this width (px, uniform) centred on a
# random brain pixel: ``p = r + g (D(r) - r)``.
LOCAL_WIDTH = (6.0, 14.0)
_BLUR_RADIUS = 10  # = 4 sigma of the widest blur.

PROXY_ORACLE = (
    "PROXY (no human judgements exist for phantoms): oracle judge = e0 / (e0 + e1) (0.5 when both "
    "are 0), e_k = root-mean-square difference between p_k and the reference inside the tumour "
    "mask (phantom label > 0 on that slice): the share of preference going to p1 grows with p0's "
    "tumour error (Luce's choice rule), so the better-preserved tumour is preferred.")

# LPIPS ``Dist2LogitLayer``: 1x1 convs 5 -> 32 -> 32 -> 1, LeakyReLU(0.2), eps in the ratios.
RANK_HIDDEN = 32
RANK_EPS = 0.1
RANK_LEAKY_SLOPE = 0.2


# ------------------------------------------------------------------------------ containers


def _float_images(name: str, x) -> np.ndarray:
  x = np.asarray(x)
  if not np.issubdtype(x.dtype, np.number):
    raise ValueError(f"Triplets: {name} must be a numeric array; got dtype {x.dtype}")
  if x.ndim != 4:
    raise ValueError(f"Triplets: {name} must be (N, H, W, C) images; got shape {x.shape}")
  return x.astype(np.float32, copy=False)


@dataclasses.dataclass(frozen=True, eq=False)
class Triplets:
  """The 2AFC triplets of one distortion category.

  Attributes:
    ref: ``(N, H, W, C)`` float32 reference patches (the readers return [-1, 1], C = 3).
    p0, p1: ``(N, H, W, C)`` float32 distortions of ``ref``.
    judge: ``(N,)`` float32 in [0, 1]: the fraction of judges preferring ``p1`` (BAPPS: humans;
      proxy sets: an oracle).
    ids: ``N`` names (file stems for BAPPS), or ``()``.
    mask: ``(N, H, W)`` bool region the oracle judged (proxy sets), else None.
    meta: ``{name: (N,) array}`` per-triplet facts (proxy: severities, errors, subject, slice).
  """

  ref: np.ndarray
  p0: np.ndarray
  p1: np.ndarray
  judge: np.ndarray
  ids: tuple[str, ...] = ()
  mask: np.ndarray | None = None
  meta: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    arrays = {name: _float_images(name, getattr(self, name)) for name in ("ref", "p0", "p1")}
    for name in ("p0", "p1"):
      if arrays[name].shape != arrays["ref"].shape:
        raise ValueError(f"Triplets: {name} shape {arrays[name].shape} != ref shape "
                         f"{arrays['ref'].shape}")
    n = arrays["ref"].shape[0]
    judge = np.asarray(self.judge)
    if not np.issubdtype(judge.dtype, np.number) or judge.shape != (n,):
      raise ValueError(f"Triplets: judge must be ({n},) numbers, one per triplet; got "
                       f"{judge.dtype} {judge.shape}")
    judge = judge.astype(np.float32, copy=False)
    if not np.all((judge >= 0) & (judge <= 1)):  # NaN fails too.
      raise ValueError(f"Triplets: judge must lie in [0, 1] (fraction preferring p1); got range "
                       f"[{np.nanmin(judge) if n else 0}, {np.nanmax(judge) if n else 0}] or NaN")
    ids = tuple(str(i) for i in self.ids)
    if ids and len(ids) != n:
      raise ValueError(f"Triplets: ids must name the {n} triplets; got {len(ids)}")
    mask = self.mask
    if mask is not None:
      mask = np.asarray(mask).astype(bool)
      if mask.shape != arrays["ref"].shape[:3]:
        raise ValueError(f"Triplets: mask must be (N, H, W) = {arrays['ref'].shape[:3]}; got "
                         f"{mask.shape}")
    meta = {k: np.asarray(v) for k, v in dict(self.meta).items()}
    for k, v in meta.items():
      if v.shape[:1] != (n,):
        raise ValueError(f"Triplets: meta[{k!r}] must have one entry per triplet ({n}); got "
                         f"shape {v.shape}")
    for name, value in (*arrays.items(), ("judge", judge), ("ids", ids), ("mask", mask),
                        ("meta", meta)):
      object.__setattr__(self, name, value)

  def __len__(self) -> int:
    return self.ref.shape[0]

  def take(self, index) -> Triplets:
    """The triplets at ``index`` (an int array or a slice), same category."""
    index = np.arange(len(self))[index]
    return Triplets(self.ref[index], self.p0[index], self.p1[index], self.judge[index],
                    tuple(self.ids[i] for i in index) if self.ids else (),
                    None if self.mask is None else self.mask[index],
                    {k: v[index] for k, v in self.meta.items()})


def concatenate_triplets(parts: Sequence[Triplets]) -> Triplets:
  """One `Triplets` of all ``parts`` in order (masks and meta kept only where all have them)."""
  parts = list(parts)
  if not parts:
    raise ValueError("concatenate_triplets: parts must hold at least one Triplets")
  cat = lambda name: np.concatenate([getattr(p, name) for p in parts])
  ids = tuple(itertools.chain(*(p.ids for p in parts))) if all(p.ids for p in parts) else ()
  mask = cat("mask") if all(p.mask is not None for p in parts) else None
  keys = set.intersection(*(set(p.meta) for p in parts))
  meta = {k: np.concatenate([p.meta[k] for p in parts]) for k in sorted(keys)}
  return Triplets(cat("ref"), cat("p0"), cat("p1"), cat("judge"), ids, mask, meta)


class TwoAFCSet(collections.abc.Mapping):
  """2AFC triplets by category (``{name: Triplets}`` in category order), labelled by source.

  A category may be given as a zero-argument callable returning its `Triplets` (lazy reading):
  it is called on every access and not cached, so at most one category is held at a time by
  `two_afc_evaluate`.

  Attributes:
    name: e.g. ``"bapps-2afc/val"`` or ``"phantom-proxy-2afc"``.
    is_proxy: True when the judgements come from an oracle, not from people.
    judge_source: how ``judge`` was obtained (for a proxy: the oracle's exact definition).
  """

  def __init__(self, categories: Mapping[str, Triplets | Callable[[], Triplets]], *, name: str,
               is_proxy: bool, judge_source: str):
    if not isinstance(categories, collections.abc.Mapping) or not categories:
      raise ValueError(f"TwoAFCSet: categories must be a non-empty mapping name -> Triplets; "
                       f"got {type(categories).__name__} of length "
                       f"{len(categories) if hasattr(categories, '__len__') else '?'}")
    for key, value in categories.items():
      if not isinstance(key, str):
        raise ValueError(f"TwoAFCSet: category names must be str; got {key!r}")
      if not (isinstance(value, Triplets) or callable(value)):
        raise ValueError(f"TwoAFCSet: category {key!r} must be Triplets or a loader; got "
                         f"{type(value).__name__}")
    self._categories = dict(categories)
    self.name = str(name)
    self.is_proxy = bool(is_proxy)
    self.judge_source = str(judge_source)

  def __getitem__(self, category: str) -> Triplets:
    value = self._categories[category]
    if isinstance(value, Triplets):
      return value
    value = value()
    if not isinstance(value, Triplets):
      raise ValueError(f"TwoAFCSet: the loader of category {category!r} returned "
                       f"{type(value).__name__}, not Triplets")
    return value

  def __iter__(self) -> Iterator[str]:
    return iter(self._categories)

  def __len__(self) -> int:
    return len(self._categories)

  def __repr__(self) -> str:
    label = "PROXY" if self.is_proxy else "human"
    sizes = {k: (len(v) if isinstance(v, Triplets) else "lazy")
             for k, v in self._categories.items()}
    return f"TwoAFCSet(name={self.name!r}, {label} judgements, categories={sizes})"

  def all_triplets(self) -> Triplets:
    """Every category's triplets concatenated in category order (loads them all)."""
    return concatenate_triplets([self[c] for c in self])


def _as_triplets(value, where: str) -> Triplets:
  """``Triplets``, a mapping with keys ref / p0 / p1 / judge, or a 4-tuple, as `Triplets`."""
  if isinstance(value, Triplets):
    return value
  if isinstance(value, collections.abc.Mapping) and {"ref", "p0", "p1", "judge"} <= set(value):
    return Triplets(value["ref"], value["p0"], value["p1"], value["judge"])
  if isinstance(value, (tuple, list)) and len(value) == 4:
    return Triplets(*value)
  raise ValueError(f"{where} must be Triplets, a mapping with keys ref, p0, p1, judge, or a tuple "
                   f"(ref, p0, p1, judge); got {type(value).__name__}")


def _positive_int(fn: str, name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{fn}: {name} must be an int >= 1; got {value!r}")
  return int(value)


def _seed(fn: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
    raise ValueError(f"{fn}: seed must be an int >= 0; got {value!r}")
  return int(value)


# ---------------------------------------------------------------------------------- BAPPS


def _uint8_to_unit(image: np.ndarray, image_size: int | None, where) -> np.ndarray:
  """uint8 ``(H, W, 3)`` -> float32 ``(S, S, 3)`` in [-1, 1] (LPIPS: ``x / 127.5 - 1``).

  A patch of another size is resized to ``image_size`` (bilinear, as LPIPS's loader does).
  """
  if image_size is not None and image.shape[:2] != (image_size, image_size):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    image = np.asarray(Image.fromarray(image).resize((image_size, image_size),
                                                     Image.Resampling.BILINEAR))
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"BAPPS patch {where} must be (H, W, 3) RGB; got shape {image.shape}")
  return image.astype(np.float32) / 127.5 - 1.0


def _stack(patches: list[np.ndarray], where: list) -> np.ndarray:
  shapes = {p.shape for p in patches}
  if len(shapes) > 1:
    first = patches[0].shape
    odd = next(i for i, p in enumerate(patches) if p.shape != first)
    raise ValueError(f"BAPPS patches of one category must share a shape (pass image_size to "
                     f"resize): {where[odd]} is {patches[odd].shape}, {where[0]} is {first}")
  return np.stack(patches)


def _triplets_from_records(records: Iterable[Mapping[str, Any]], image_size: int | None,
                           where: Callable[[Mapping[str, Any], str], str]) -> Triplets:
  images = {"ref": [], "p0": [], "p1": []}
  paths = {"ref": [], "p0": [], "p1": []}
  judge, ids = [], []
  for record in records:
    for name in images:
      location = where(record, name)
      images[name].append(_uint8_to_unit(np.asarray(record[name], np.uint8), image_size,
                                         location))
      paths[name].append(location)
    judge.append(np.float32(record["judge"]))
    ids.append(record["id"] if isinstance(record["id"], str) else record["id"].decode())
  if not ids:
    raise ValueError("no triplets")
  return Triplets(*(_stack(images[n], paths[n]) for n in images), np.asarray(judge, np.float32),
                  tuple(ids))


def _check_categories(fn: str, categories) -> tuple[str, ...] | None:
  if categories is None:
    return None
  if isinstance(categories, str) or not isinstance(categories, collections.abc.Iterable):
    raise ValueError(f"{fn}: categories must be a sequence of category names or None; got "
                     f"{categories!r}")
  categories = tuple(categories)
  if not categories or not all(isinstance(c, str) for c in categories):
    raise ValueError(f"{fn}: categories must be a non-empty sequence of str; got {categories!r}")
  return categories


def _check_image_size(fn: str, image_size) -> int | None:
  return None if image_size is None else _positive_int(fn, "image_size", image_size)


def _check_limit(fn: str, limit) -> int | None:
  return None if limit is None else _positive_int(fn, "limit", limit)


def read_bapps_2afc(root: str | os.PathLike, split: str = "val", *,
                    categories: Sequence[str] | None = None,
                    image_size: int | None = BAPPS_PATCH_SIZE, limit: int | None = None,
                    lazy: bool = False) -> TwoAFCSet:
  """Reads BAPPS 2AFC triplets from the official folder layout, per category.

  Layout (LPIPS ``scripts/download_dataset.sh``; helpers of `jaxmed.data.tfds.bapps`)::

    <root>/<split>/<category>/{ref,p0,p1}/<id>.png, <root>/<split>/<category>/judge/<id>.npy

  where ``root`` is the ``2afc`` folder; a folder holding ``2afc/`` (or ``dataset/2afc/``) is
  accepted too. ``judge`` is the fraction of humans who preferred ``p1``.

  Args:
    root: the ``2afc`` folder, or the folder above it.
    split: ``"train"`` or ``"val"`` (any folder name under ``root``).
    categories: names to read, in this order; default the BAPPS categories present (val:
      traditional, cnn, superres, deblur, frameinterp, color; train: traditional, cnn, mix),
      then any other folder of ``split`` that has a ``ref/`` folder, sorted.
    image_size: patches are resized (bilinear, like LPIPS's loader) to this square size when
      they differ; None keeps them (one size per category required).
    limit: read at most this many triplets per category (the first ids in sorted order).
    lazy: return categories that are read from disk on each access (bounded memory: a category
      of BAPPS val takes up to 1.6 GB as float32), instead of reading all now.

  Returns:
    A `TwoAFCSet` (``is_proxy=False``) of `Triplets` with ``ref, p0, p1`` ``(N, S, S, 3)``
    float32 in [-1, 1] (``x / 127.5 - 1``), ``judge`` ``(N,)`` float32, ``ids`` the file stems.

  Raises:
    FileNotFoundError: no such split / category folder, or an id lacking one of its files.
    ValueError: bad arguments, or an unreadable PNG / ``.npy`` (the file is named).
  """
  fn = "read_bapps_2afc"
  from jaxmed.data.tfds import bapps  # pylint: disable=g-import-not-at-top
  categories = _check_categories(fn, categories)
  image_size = _check_image_size(fn, image_size)
  limit = _check_limit(fn, limit)
  if not isinstance(split, str) or not split:
    raise ValueError(f"{fn}: split must be a folder name such as 'val'; got {split!r}")
  root = pathlib.Path(os.path.expanduser(os.fspath(root)))
  base = root
  if not (root / split).is_dir():
    try:
      base = bapps.dataset_root(root, "2afc")
    except FileNotFoundError:
      pass  # The split folder check below names the missing folder.
  split_dir = base / split
  if not split_dir.is_dir():
    raise FileNotFoundError(f"{fn}: split folder not found: {split_dir.absolute()}")
  if categories is None:
    known = [c for c in bapps.CATEGORIES["2afc"].get(split, ()) if (split_dir / c).is_dir()]
    others = sorted(p.name for p in split_dir.iterdir()
                    if p.is_dir() and p.name not in known and (p / "ref").is_dir())
    categories = tuple(known + others)
    if not categories:
      raise FileNotFoundError(f"{fn}: no category folder (with ref/, p0/, p1/, judge/) in "
                              f"{split_dir.absolute()}")

  def loader(folder: pathlib.Path):
    def load() -> Triplets:
      ids = bapps.list_ids(folder, "2afc")[:limit]
      records = ({"ref": bapps.read_png(folder / "ref" / f"{i}.png"),
                  "p0": bapps.read_png(folder / "p0" / f"{i}.png"),
                  "p1": bapps.read_png(folder / "p1" / f"{i}.png"),
                  "judge": bapps.read_judgement(folder / "judge" / f"{i}.npy"), "id": i}
                 for i in ids)
      if not ids:
        raise FileNotFoundError(f"{fn}: no triplets in {folder.absolute()}")
      return _triplets_from_records(
          records, image_size, lambda r, name: str((folder / name / f"{r['id']}.png").absolute()))
    return load

  loaders = {}
  for category in categories:
    folder = split_dir / category
    if not folder.is_dir():
      raise FileNotFoundError(f"{fn}: category folder not found: {folder.absolute()}")
    loaders[category] = loader(folder)
  if not lazy:
    loaders = {c: load() for c, load in loaders.items()}
  return TwoAFCSet(loaders, name=f"bapps-2afc/{split}", is_proxy=False,
                   judge_source="BAPPS human judgements: fraction of observers preferring p1")


def read_bapps_2afc_tfds(data_dir: str | os.PathLike, split: str = "val", *,
                         categories: Sequence[str] | None = None,
                         image_size: int | None = BAPPS_PATCH_SIZE,
                         limit: int | None = None) -> TwoAFCSet:
  """The BAPPS 2AFC triplets of a prepared TFDS ``bapps/2afc`` split (`jaxmed.data.tfds`).

  Same result as `read_bapps_2afc` on the folder the dataset was prepared from; records are read
  through `tfds.data_source` (random access, no TensorFlow), grouped by their ``category``.

  Args:
    data_dir: the TFDS data directory given to ``jaxmed.data.tfds.prepare("bapps", ...,
      config="2afc")``.
    split, categories, image_size, limit: as in `read_bapps_2afc` (default categories: those in
      the records, in record order).

  Returns:
    A `TwoAFCSet` (``is_proxy=False``), as `read_bapps_2afc`.

  Raises:
    ValueError: bad arguments, a requested category with no record, or a split not prepared.
  """
  fn = "read_bapps_2afc_tfds"
  from jaxmed.data import tfds as jtfds  # pylint: disable=g-import-not-at-top
  categories = _check_categories(fn, categories)
  image_size = _check_image_size(fn, image_size)
  limit = _check_limit(fn, limit)
  source = jtfds.data_source("bapps", split, data_dir=data_dir, config="2afc")
  groups: dict[str, list] = {}
  for index in range(len(source)):
    record = source[index]
    category = record["category"]
    category = category if isinstance(category, str) else category.decode()
    if categories is not None and category not in categories:
      continue
    group = groups.setdefault(category, [])
    if limit is None or len(group) < limit:
      group.append(dict(record, _index=index))
  order = categories if categories is not None else tuple(groups)
  missing = [c for c in order if c not in groups]
  if missing:
    raise ValueError(f"{fn}: no record of categories {missing} in split {split!r} of "
                     f"{os.fspath(data_dir)}; present: {sorted(groups)}")
  where = lambda r, name: f"{os.fspath(data_dir)} bapps/2afc {split}[{r['_index']}].{name}"
  return TwoAFCSet({c: _triplets_from_records(groups[c], image_size, where) for c in order},
                   name=f"bapps-2afc/{split}", is_proxy=False,
                   judge_source="BAPPS human judgements: fraction of observers preferring p1")


# ------------------------------------------------------------------------------ evaluation


def _padded_batches(chunks, batch_size: int):
  """``(x batch, y batch, m)``: the pairs of the ``(x, y)`` array ``chunks``, in order, in
  batches of exactly ``batch_size`` that may span chunks; the last one padded by repeating its
  final pair (``m`` of its rows are real), so a jitted function compiles once. Only one batch
  is assembled at a time (the chunks are never concatenated)."""
  xs, ys, filled = [], [], 0
  for x, y in chunks:
    start = 0
    while start < len(x):
      take = min(batch_size - filled, len(x) - start)
      xs.append(x[start:start + take])
      ys.append(y[start:start + take])
      filled, start = filled + take, start + take
      if filled == batch_size:
        yield np.concatenate(xs), np.concatenate(ys), batch_size
        xs, ys, filled = [], [], 0
  if filled:
    xb, yb = np.concatenate(xs), np.concatenate(ys)
    pad = batch_size - filled
    yield (np.concatenate([xb, np.repeat(xb[-1:], pad, axis=0)]),
           np.concatenate([yb, np.repeat(yb[-1:], pad, axis=0)]), filled)


def _distances(distance_fn, chunks, batch_size: int) -> np.ndarray:
  """``distance_fn`` over the pairs of ``chunks`` (`_padded_batches`); ``(N,)`` float64."""
  out = []
  for xb, yb, m in _padded_batches(chunks, batch_size):
    d = np.asarray(distance_fn(xb, yb))
    if d.ndim < 1 or d.shape[0] != batch_size or d.size != batch_size:
      raise ValueError(f"two_afc_evaluate: distance_fn must return (N,) distances for N = "
                       f"{batch_size} image pairs; got shape {d.shape}")
    if not (np.issubdtype(d.dtype, np.integer) or np.issubdtype(d.dtype, np.floating)):
      raise ValueError(f"two_afc_evaluate: distance_fn must return real numbers; got dtype "
                       f"{d.dtype}")
    out.append(d.reshape(batch_size)[:m].astype(np.float64))
  return np.concatenate(out)


def _pair_distances(distance_fn, triplets: dict, batch_size: int) -> dict:
  """``{category: (d0, d1)}``: every category's ``(ref, p0)`` and ``(ref, p1)`` pairs scored in
  one stream of batches per image shape, so small categories share batches instead of each
  padding its own (a set of 4-triplet categories at batch 64 would otherwise be 94% padding).
  The batch is ``min(batch_size, pairs of the largest stream)``, so it still compiles once."""
  groups: dict = {}
  for category, t in triplets.items():
    groups.setdefault(t.ref.shape[1:], []).append(category)  # p0, p1: ref's shape
  batch_size = min(batch_size, max(2 * sum(len(triplets[c]) for c in cats)
                                   for cats in groups.values()))
  out = {}
  for cats in groups.values():
    chunks = [(triplets[c].ref, p) for c in cats for p in (triplets[c].p0, triplets[c].p1)]
    d = _distances(distance_fn, chunks, batch_size)
    start = 0
    for c in cats:
      n = len(triplets[c])
      d0, d1 = d[start:start + n], d[start + n:start + 2 * n]
      start += 2 * n
      for name, values in (("ref vs p0", d0), ("ref vs p1", d1)):
        if not np.all(np.isfinite(values)):
          raise ValueError(f"two_afc_evaluate: distance_fn returned NaN or Inf "
                           f"(triplets_by_category[{c!r}], {name})")
      out[c] = (d0, d1)
  return out


def two_afc_evaluate(distance_fn: Callable[[Any, Any], Any],
                     triplets_by_category: Mapping[str, Any], *, batch_size: int = 64,
                     return_distances: bool = False) -> dict[str, Any]:
  """Scores a distance on 2AFC triplets, per category and overall (Table II of CoPer).

  Per category: ``d0 = distance_fn(ref, p0)``, ``d1 = distance_fn(ref, p1)`` in batches, then
  `jaxmed.metrics.two_afc_score` (ties count 1/2). "overall" is the plain mean of the category
  scores (LPIPS / Table II), not the mean over triplets.

  Args:
    distance_fn: ``(x, y) -> (N,)`` distances of ``(N, H, W, C)`` image batches (a shape of ``N``
      elements, such as LPIPS's ``(N, 1, 1, 1)``, is flattened). The ``(ref, p0)`` and ``(ref, p1)``
      pairs of every category (of one image shape) are scored in one stream of batches, each of
      exactly ``min(batch_size, number of pairs)`` pairs (the last batch padded), so a jitted
      function compiles once and small categories do not each pay for a padded batch.
    triplets_by_category: ``{category: Triplets}`` in report order, e.g. a `TwoAFCSet`; a value
      may also be a mapping with keys ref, p0, p1, judge or a tuple of them.
    batch_size: pairs per call; bounds the memory of the distance computation.
    return_distances: also return ``distances = {category: (d0, d1)}``.

  Returns:
    ``{"name", "is_proxy", "categories": {category: {"score", "count"}}, "overall", "count"}``
    (plus ``"distances"``): scores float in [0, 1], counts int; ``is_proxy`` and ``name`` come
    from a `TwoAFCSet` (False / None otherwise).

  Raises:
    ValueError: a bad argument, an empty category, or ``distance_fn`` returning a wrong shape or
      non-finite values.
  """
  fn = "two_afc_evaluate"
  if not callable(distance_fn):
    raise ValueError(f"{fn}: distance_fn must be callable (x, y) -> (N,); got "
                     f"{type(distance_fn).__name__}")
  batch_size = _positive_int(fn, "batch_size", batch_size)
  if not isinstance(triplets_by_category, collections.abc.Mapping) or not triplets_by_category:
    raise ValueError(f"{fn}: triplets_by_category must be a non-empty mapping category -> "
                     f"Triplets; got {type(triplets_by_category).__name__}")
  parsed = {}
  for category in triplets_by_category:
    where = f"triplets_by_category[{category!r}]"
    triplets = _as_triplets(triplets_by_category[category], f"{fn}: {where}")
    if not len(triplets):
      raise ValueError(f"{fn}: {where} holds no triplets")
    parsed[category] = triplets
  categories, distances = {}, {}
  pairs = _pair_distances(distance_fn, parsed, batch_size)
  for category, (d0, d1) in ((c, pairs[c]) for c in parsed):
    score = float(two_afc_score(d0, d1, parsed[category].judge))
    categories[str(category)] = {"score": score, "count": len(parsed[category])}
    if return_distances:
      distances[str(category)] = (d0, d1)
  result = {
      "name": getattr(triplets_by_category, "name", None),
      "is_proxy": bool(getattr(triplets_by_category, "is_proxy", False)),
      "categories": categories,
      "overall": float(np.mean([c["score"] for c in categories.values()])),
      "count": int(sum(c["count"] for c in categories.values())),
  }
  if return_distances:
    result["distances"] = distances
  return result


def two_afc_table(results: Mapping[str, Mapping[str, Any]], *, percent: bool = True,
                  digits: int = 2) -> str:
  """A markdown table of `two_afc_evaluate` results: one row per method, Table II's layout.

  Columns are the categories (in first-seen order, with their triplet counts) then "Overall";
  a method lacking a category shows "-". A table with any PROXY result starts with a line
  saying so.

  Args:
    results: ``{method name: two_afc_evaluate(...) result}``.
    percent: scores x 100 (as Table II) instead of fractions.
    digits: decimals.

  Returns:
    The table as a string (lines joined by newlines, no trailing newline).
  """
  fn = "two_afc_table"
  if not isinstance(results, collections.abc.Mapping) or not results:
    raise ValueError(f"{fn}: results must be a non-empty mapping method -> two_afc_evaluate "
                     f"result; got {type(results).__name__}")
  digits = int(digits)
  counts: dict[str, int] = {}
  for method, result in results.items():
    if not isinstance(result, collections.abc.Mapping) or "categories" not in result:
      raise ValueError(f"{fn}: results[{method!r}] is not a two_afc_evaluate result")
    for category, entry in result["categories"].items():
      counts.setdefault(category, entry["count"])
  scale = 100.0 if percent else 1.0
  fmt = lambda v: f"{scale * v:.{digits}f}"
  lines = []
  proxies = sorted({str(r.get("name")) for r in results.values() if r.get("is_proxy")})
  if proxies:
    lines += [f"PROXY 2AFC ({', '.join(proxies)}): oracle judgements, no human ratings; not "
              "comparable with BAPPS human agreement.", ""]
  header = ["Method"] + [f"{c} (n={n})" for c, n in counts.items()] + ["Overall"]
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
  for method, result in results.items():
    cells = [fmt(result["categories"][c]["score"]) if c in result["categories"] else "-"
             for c in counts]
    lines.append("| " + " | ".join([str(method)] + cells + [fmt(result["overall"])]) + " |")
  return "\n".join(lines)


# ------------------------------------------------------------------ phantom proxy 2AFC set


def lesion_error(reference, images, mask) -> np.ndarray:
  """Root-mean-square difference inside ``mask``: the proxy oracle's tumour-preservation error.

  Args:
    reference: ``(N, H, W)`` or ``(N, H, W, C)`` images.
    images: the same shape: the versions to judge.
    mask: ``(N, H, W)`` bool region (tumour), non-empty for every image.

  Returns:
    ``(N,)`` float64 ``sqrt(mean over mask pixels and channels of (images - reference)^2)``.

  Raises:
    ValueError: shape mismatch, a bad rank, or an empty mask.
  """
  fn = "lesion_error"
  reference = np.asarray(reference, np.float64)
  images = np.asarray(images, np.float64)
  mask = np.asarray(mask).astype(bool)
  if reference.ndim not in (3, 4):
    raise ValueError(f"{fn}: reference must be (N, H, W) or (N, H, W, C); got shape "
                     f"{reference.shape}")
  if images.shape != reference.shape:
    raise ValueError(f"{fn}: images shape {images.shape} != reference shape {reference.shape}")
  if mask.shape != reference.shape[:3]:
    raise ValueError(f"{fn}: mask must be (N, H, W) = {reference.shape[:3]}; got {mask.shape}")
  area = mask.sum(axis=(1, 2))
  if np.any(area == 0):
    raise ValueError(f"{fn}: mask is empty for images {np.flatnonzero(area == 0)[:5].tolist()}")
  sq = np.square(images - reference)
  if sq.ndim == 4:
    sq = sq.mean(axis=-1)
  return np.sqrt((sq * mask).sum(axis=(1, 2)) / area)


def _oracle_judge(e0: np.ndarray, e1: np.ndarray) -> np.ndarray:
  """``e0 / (e0 + e1)``, 0.5 where both are 0 (see `PROXY_ORACLE`)."""
  total = e0 + e1
  return np.where(total > 0, e0 / np.where(total > 0, total, 1.0), 0.5).astype(np.float32)


def _blur_along(x, weights, axis):
  """Per-image 1D filter of ``x`` ``(B, H, W)`` along ``axis`` (symmetric padding)."""
  radius = (weights.shape[-1] - 1) // 2
  pad = [(0, 0)] * 3
  pad[axis] = (radius, radius)
  xp = jnp.pad(x, pad, mode="symmetric")
  n = x.shape[axis]
  out = jnp.zeros_like(x)
  for k in range(weights.shape[-1]):
    out = out + weights[:, k, None, None] * jax.lax.slice_in_dim(xp, k, k + n, axis=axis)
  return out


@jax.jit
def _blur(images, sigma):
  """Gaussian blur of ``(B, H, W)`` with per-image ``sigma`` ``(B,)`` (like scipy's
  ``gaussian_filter(mode="reflect")`` truncated at ``_BLUR_RADIUS``; traced sigma)."""
  t = jnp.arange(-_BLUR_RADIUS, _BLUR_RADIUS + 1, dtype=jnp.float32)
  w = jnp.exp(-0.5 * jnp.square(t[None, :] / sigma[:, None]))
  w = w / jnp.sum(w, axis=-1, keepdims=True)
  return _blur_along(_blur_along(images, w, 1), w, 2)


@jax.jit
def _ghost(images, phase):
  """N/2 ghosting: every other phase-encode column of k-space shifted by ``phase`` (rad)."""
  k = mri.fft2c(images)
  odd = (jnp.arange(images.shape[-1]) % 2 == 1)[None, None, :]
  k = jnp.where(odd, k * jnp.exp(1j * phase)[:, None, None].astype(k.dtype), k)
  return jnp.abs(mri.ifft2c(k)).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=2)
def _undersample(key, images, accelerations):
  """Zero-filled reconstruction from fastMRI random column masks (`jaxmed.data.mri`), one
  acceleration of ``accelerations`` drawn per image; returns (images, accelerations)."""
  masks, acceleration = mri.sample_masks(
      key, images.shape[0], images.shape[-1], kind="random", accelerations=accelerations,
      center_fractions=tuple(mri.fastmri_center_fraction(a) for a in accelerations))
  return mri.zero_filled(images, masks), acceleration


@jax.jit
def _shift(images, offsets):
  """Translation of ``(B, H, W)`` by ``offsets`` ``(B, 2)`` px (linear, zero outside)."""
  grid = jnp.stack(jnp.meshgrid(*(jnp.arange(n, dtype=jnp.float32) for n in images.shape[1:]),
                                indexing="ij"))

  def one(image, offset):
    return transforms.resample(image[..., None], coords=grid - offset[:, None, None])[0][..., 0]

  return jax.vmap(one)(images, offsets)


def _distort(kind: str, images: np.ndarray, brains: np.ndarray, rng: np.random.Generator,
             key, local_prob: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``kind`` applied to ``images`` ``(B, H, W)`` in [0, 1]; returns (distorted in [0, 1],
  severity (B,), local (B,) bool). Everything random comes from ``rng`` and ``key``."""
  b, h, w = images.shape
  spec = SEVERITIES[kind]
  x = jnp.asarray(images)
  if kind == "blur":
    severity = rng.uniform(*spec, size=b)
    out = _blur(x, jnp.asarray(severity, jnp.float32))
  elif kind == "noise":
    severity = rng.uniform(*spec, size=b)
    out = x + jnp.asarray(severity[:, None, None] * rng.standard_normal((b, h, w)), jnp.float32)
  elif kind == "gamma":
    severity = np.exp(rng.uniform(np.log(spec[0]), np.log(spec[1]), size=b))
    out = jnp.clip(x, 0.0, 1.0) ** jnp.asarray(severity[:, None, None], jnp.float32)
  elif kind == "undersampling":
    out, acceleration = _undersample(key, x, spec)
    severity = np.asarray(acceleration, np.float64)
  elif kind == "ghosting":
    severity = rng.uniform(*spec, size=b)
    out = _ghost(x, jnp.asarray(severity, jnp.float32))
  elif kind == "shift":
    severity = rng.uniform(*spec, size=b)
    angle = rng.uniform(0.0, 2.0 * np.pi, size=b)
    offsets = severity[:, None] * np.stack([np.sin(angle), np.cos(angle)], axis=1)
    out = _shift(x, jnp.asarray(offsets, jnp.float32))
  else:
    raise ValueError(f"unknown distortion {kind!r}")
  out = np.asarray(out, np.float32)
  # Local versions: weighted by a Gaussian bump centred on a random brain pixel.
  local = rng.uniform(size=b) < local_prob
  widths = rng.uniform(*LOCAL_WIDTH, size=b)
  gain = np.ones((b, h, w), np.float32)
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  for i in range(b):
    candidates = np.argwhere(brains[i]) if brains[i].any() else np.array([[h // 2, w // 2]])
    cy, cx = candidates[rng.integers(len(candidates))]
    if local[i]:
      gain[i] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * widths[i] ** 2))
  out = images + gain * (out - images)
  return np.clip(out, 0.0, 1.0).astype(np.float32), severity.astype(np.float64), local


def _reference_slices(subjects, modality_index: int, slices_per_subject: int,
                      min_lesion_pixels: int):
  """Tumour slices (evenly spaced among those with enough tumour) scaled to [0, 1]."""
  refs, masks, brains, names, zs = [], [], [], [], []
  for subject in subjects:
    area = (subject.label > 0).sum(axis=(1, 2))
    candidates = np.flatnonzero(area >= min_lesion_pixels)
    if not len(candidates):
      continue
    picks = np.unique(np.round(np.linspace(0, len(candidates) - 1,
                                           min(slices_per_subject, len(candidates)))))
    for z in candidates[picks.astype(int)]:
      image = subject.image[z, :, :, modality_index]
      scale = np.percentile(image, 99.5)
      refs.append(np.clip(image / max(scale, 1e-6), 0.0, 1.0).astype(np.float32))
      masks.append(subject.label[z] > 0)
      brains.append(subject.brain_mask[z])
      names.append(subject.subject_id)
      zs.append(int(z))
  return (np.stack(refs), np.stack(masks), np.stack(brains), np.asarray(names),
          np.asarray(zs)) if refs else None


def phantom_proxy_2afc(num_subjects: int = 8, *, seed: int = 0, slices_per_subject: int = 4,
                       triplets_per_slice: int = 1, distortions: Sequence[str] = DISTORTIONS,
                       pairing: str = "same", modality: str = "flair",
                       image_size: int = BAPPS_PATCH_SIZE, depth: int = 32,
                       local_prob: float = 0.5, min_lesion_pixels: int = 16) -> TwoAFCSet:
  """A PROXY 2AFC set from synthetic tumour phantoms, judged by a stated oracle, not people.

  References are axial slices of `jaxmed.data.synthetic.make_subjects` tumour phantoms
  (``(depth, image_size, image_size)`` volumes, one ``modality``), chosen evenly among the slices
  with at least ``min_lesion_pixels`` tumour pixels and scaled to [0, 1] by their 99.5th
  percentile (clipped). Each triplet distorts a reference twice, independently: a distortion of
  `DISTORTIONS` at a severity drawn from `SEVERITIES`, applied to the whole slice or, with
  probability ``local_prob``, weighted by a Gaussian bump (`LOCAL_WIDTH`) centred on a random
  brain pixel; results are clipped to [0, 1]. The judge is the oracle of `PROXY_ORACLE`:
  ``judge = e0 / (e0 + e1)`` with ``e_k`` the tumour-region RMS error of ``p_k`` (`lesion_error`),
  so the version whose tumour is better preserved is preferred, more firmly the larger the gap.
  Images are returned as BAPPS's: ``2 x - 1`` in [-1, 1], grey copied to 3 channels.

  Categories: ``pairing="same"``: one per distortion type (``p0``, ``p1`` of that type, two
  severities); ``pairing="cross"``: one per unordered pair of distinct types, ``"a/b"`` (``p0``
  of type a, ``p1`` of type b). A category's triplets depend only on ``seed``, its types and the
  subject / slice arguments (not on the other categories requested).

  Args:
    num_subjects: phantoms (subject ``i`` depends on ``(seed, i)``).
    seed: int >= 0; the same arguments give identical sets.
    slices_per_subject: reference slices per phantom (fewer if the tumour spans fewer).
    triplets_per_slice: triplets per reference slice and category.
    distortions: names from `DISTORTIONS`, in category order.
    pairing: ``"same"`` or ``"cross"``.
    modality: a phantom channel of `jaxmed.data.synthetic.MODALITIES`.
    image_size: slice size (the phantoms are sampled at it; >= 16).
    depth: phantom slices along the axial axis (>= 16).
    local_prob: probability in [0, 1] that a distortion is local.
    min_lesion_pixels: smallest tumour area (px) of a reference slice, >= 1.

  Returns:
    A `TwoAFCSet` with ``is_proxy=True`` and ``judge_source=PROXY_ORACLE``; its `Triplets` hold
    ``ref, p0, p1`` ``(N, S, S, 3)`` float32 in [-1, 1], ``judge`` ``(N,)`` in [0, 1], ``mask``
    ``(N, S, S)`` the tumour, and ``meta`` with ``subject``, ``slice``, ``severity0/1``,
    ``local0/1``, ``error0/1`` (the oracle's errors, in [0, 1] intensity units).

  Raises:
    ValueError: a bad argument, or no phantom slice with enough tumour.
  """
  fn = "phantom_proxy_2afc"
  num_subjects = _positive_int(fn, "num_subjects", num_subjects)
  seed = _seed(fn, seed)
  slices_per_subject = _positive_int(fn, "slices_per_subject", slices_per_subject)
  triplets_per_slice = _positive_int(fn, "triplets_per_slice", triplets_per_slice)
  min_lesion_pixels = _positive_int(fn, "min_lesion_pixels", min_lesion_pixels)
  image_size = _positive_int(fn, "image_size", image_size)
  depth = _positive_int(fn, "depth", depth)
  if image_size < 16 or depth < 16:
    raise ValueError(f"{fn}: image_size and depth must be >= 16 (phantom sampling); got "
                     f"{image_size} and {depth}")
  if isinstance(distortions, str) or not isinstance(distortions, collections.abc.Iterable):
    raise ValueError(f"{fn}: distortions must be a sequence of names from {DISTORTIONS}; got "
                     f"{distortions!r}")
  distortions = tuple(distortions)
  unknown = [d for d in distortions if d not in DISTORTIONS]
  if not distortions or unknown or len(set(distortions)) != len(distortions):
    raise ValueError(f"{fn}: distortions must be distinct names from {DISTORTIONS}; got "
                     f"{distortions!r}")
  if pairing not in ("same", "cross"):
    raise ValueError(f"{fn}: pairing must be 'same' or 'cross'; got {pairing!r}")
  if pairing == "cross" and len(distortions) < 2:
    raise ValueError(f"{fn}: pairing='cross' needs at least 2 distortions; got {distortions!r}")
  if modality not in synthetic.MODALITIES:
    raise ValueError(f"{fn}: modality must be one of {synthetic.MODALITIES}; got {modality!r}")
  if (isinstance(local_prob, bool) or not isinstance(local_prob, numbers.Real)
      or not 0.0 <= local_prob <= 1.0):
    raise ValueError(f"{fn}: local_prob must be a probability in [0, 1]; got {local_prob!r}")

  subjects = synthetic.make_subjects(num_subjects, seed=seed, shape=(depth, image_size,
                                                                     image_size),
                                     pathology="tumour")
  found = _reference_slices(subjects, synthetic.MODALITIES.index(modality), slices_per_subject,
                            min_lesion_pixels)
  if found is None:
    raise ValueError(f"{fn}: no phantom slice has >= {min_lesion_pixels} tumour pixels "
                     f"(num_subjects={num_subjects}, seed={seed}); lower min_lesion_pixels")
  refs, masks, brains, names, zs = (np.repeat(a, triplets_per_slice, axis=0) for a in found)
  repeat = np.tile(np.arange(triplets_per_slice), len(found[0]))
  ids = tuple(f"{n}/z{z:03d}/{k}" for n, z, k in zip(names, zs, repeat))
  if pairing == "same":
    pairs = [(d, d) for d in distortions]
  else:
    pairs = list(itertools.combinations(distortions, 2))

  to_rgb = lambda x: np.repeat((2.0 * x - 1.0)[..., None], 3, axis=-1)
  categories = {}
  for a, b in pairs:
    ia, ib = DISTORTIONS.index(a), DISTORTIONS.index(b)
    rng = np.random.default_rng(np.random.SeedSequence([seed, ia, ib]))
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), ia), ib)
    p0, s0, l0 = _distort(a, refs, brains, rng, jax.random.fold_in(key, 0), local_prob)
    p1, s1, l1 = _distort(b, refs, brains, rng, jax.random.fold_in(key, 1), local_prob)
    e0, e1 = lesion_error(refs, p0, masks), lesion_error(refs, p1, masks)
    categories[a if pairing == "same" else f"{a}/{b}"] = Triplets(
        to_rgb(refs), to_rgb(p0), to_rgb(p1), _oracle_judge(e0, e1), ids, masks,
        {"subject": names, "slice": zs, "severity0": s0, "severity1": s1, "local0": l0,
         "local1": l1, "error0": e0, "error1": e1})
  return TwoAFCSet(categories, name="phantom-proxy-2afc", is_proxy=True,
                   judge_source=PROXY_ORACLE)


# ------------------------------------------------------- LPIPS "lin" tap-weight calibration


class _TorchLinear(nn.Module):
  """Dense layer with PyTorch's default (1x1 conv / linear) init: U(+-1 / sqrt(fan_in))."""
  features: int

  @nn.compact
  def __call__(self, x):
    bound = 1.0 / math.sqrt(x.shape[-1])
    init = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    kernel = self.param("kernel", init, (x.shape[-1], self.features))
    bias = self.param("bias", init, (self.features,))
    return x @ kernel + bias


class RankingNet(nn.Module):
  """LPIPS's ``Dist2LogitLayer``: two distances -> the logit that people prefer ``p1``.

  The features ``[d0, d1, d0 - d1, d0 / (d1 + eps), d1 / (d0 + eps)]`` (eps 0.1) go through
  1x1 convs (here dense layers) 5 -> 32 -> 32 -> 1 with LeakyReLU(0.2) between; LPIPS applies a
  sigmoid and ``BCELoss``, we return the logit and use the equal, stabler BCE-with-logits
  (torch's ``BCELoss`` clamps its logs at -100, which only matters once saturated).
  """
  hidden: int = RANK_HIDDEN
  eps: float = RANK_EPS

  @nn.compact
  def __call__(self, d0, d1):
    x = jnp.stack([d0, d1, d0 - d1, d0 / (d1 + self.eps), d1 / (d0 + self.eps)], axis=-1)
    for _ in range(2):
      x = nn.leaky_relu(_TorchLinear(self.hidden)(x), RANK_LEAKY_SLOPE)
    return _TorchLinear(1)(x)[..., 0]


def _weighted(weights: Sequence, diffs: Sequence, scales: Sequence | None = None):
  """``sum_l mean_hw sum_c w_lc diff_lc`` ``(N,)``; ``scales`` are dropout multipliers."""
  total = 0.0
  for layer, (w, diff) in enumerate(zip(weights, diffs)):
    diff = diff.astype(jnp.float32)
    if scales is not None:
      diff = diff * scales[layer]
    total = total + jnp.mean(jnp.einsum("nhwc,c->nhw", diff, w), axis=(1, 2))
  return total


def _dropout_scales(key, shapes: Sequence[tuple[int, ...]], rate: float) -> list:
  """Inverted-dropout multipliers (0 w.p. ``rate``, else ``1 / (1 - rate)``, as ``nn.Dropout``)
  for arrays of ``shapes``, from one uniform draw (one threefry, fast to compile)."""
  sizes = [math.prod(s) for s in shapes]
  keep = jax.random.uniform(key, (sum(sizes),)) >= rate
  scales = jnp.where(keep, jnp.float32(1.0 / (1.0 - rate)), jnp.float32(0.0))
  parts = jnp.split(scales, np.cumsum(sizes)[:-1].tolist())
  return [part.reshape(shape) for part, shape in zip(parts, shapes)]


def _check_tap_shapes(fn: str, shapes, n: int) -> list[int]:
  """Channel counts of ``tap_difference_fn``'s output shapes (a tuple of (N, h, w, C))."""
  if isinstance(shapes, jax.ShapeDtypeStruct) or not isinstance(shapes, (tuple, list)) or (
      not shapes):
    raise ValueError(f"{fn}: tap_difference_fn must return a non-empty tuple of (N, h_l, w_l, "
                     f"C_l) arrays, one per tap; got {shapes}")
  channels = []
  for layer, s in enumerate(shapes):
    if len(s.shape) != 4 or s.shape[0] != n:
      raise ValueError(f"{fn}: tap_difference_fn output {layer} must be (N, h, w, C) with N = "
                       f"{n}; got shape {s.shape}")
    channels.append(int(s.shape[-1]))
  return channels


def tap_weighted_distance(tap_difference_fn: Callable, weights: Sequence) -> Callable:
  """The LPIPS / CoPer distance for given tap weights (Sec. III-B, Fig. 2a of CoPer).

  ``d(x, y) = sum_l mean_{h,w} sum_c w_lc diff_lc(x, y)``, with ``diff`` the per-tap
  unit-normalised squared feature differences of ``tap_difference_fn``.

  Args:
    tap_difference_fn: ``(x, y) -> tuple of (N, h_l, w_l, C_l)`` differences (traceable).
    weights: one ``(C_l,)`` array per tap (e.g. from `learn_tap_weights`; ones = LPIPS's
      untuned baseline).

  Returns:
    A jitted ``(x, y) -> (N,)`` float32 distance, for `two_afc_evaluate`.
  """
  fn = "tap_weighted_distance"
  if not callable(tap_difference_fn):
    raise ValueError(f"{fn}: tap_difference_fn must be callable; got "
                     f"{type(tap_difference_fn).__name__}")
  weights = [jnp.asarray(w, jnp.float32) for w in weights]
  if not weights or any(w.ndim != 1 for w in weights):
    raise ValueError(f"{fn}: weights must be one (C_l,) vector per tap; got shapes "
                     f"{[tuple(w.shape) for w in weights]}")

  return functools.partial(_tap_weighted_distance, tap_difference_fn, weights)


@functools.partial(jax.jit, static_argnums=0)
def _tap_weighted_distance(tap_difference_fn, weights, x, y):
  """Jitted once per ``tap_difference_fn`` and shapes (the weights are traced)."""
  diffs = tap_difference_fn(x, y)
  channels = [d.shape[-1] for d in diffs]
  if channels != [int(w.shape[0]) for w in weights]:
    raise ValueError(f"tap_weighted_distance: weights have {[int(w.shape[0]) for w in weights]} "
                     f"channels per tap; tap_difference_fn returned {channels}")
  return _weighted(weights, diffs)


_RANKING_NET = RankingNet()


def _initial_params(seed: int, channels: Sequence[int]):
  """PyTorch's default init, as LPIPS's 1x1 convs get it: tap weights U(+-1 / sqrt(C_l)) and
  the ranking net's kernels and biases U(+-1 / sqrt(fan_in)); drawn on the host from ``seed``
  (a handful of numbers, no compile)."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, 0x11A]))
  weights = [rng.uniform(-1.0, 1.0, c).astype(np.float32) / np.float32(math.sqrt(c))
             for c in channels]
  zeros = jax.ShapeDtypeStruct((1,), jnp.float32)
  shapes = jax.eval_shape(_RANKING_NET.init, jax.random.key(0), zeros, zeros)["params"]
  rank = {}
  for name in sorted(shapes, key=lambda k: int(k.rsplit("_", 1)[-1])):
    bound = 1.0 / math.sqrt(shapes[name]["kernel"].shape[0])
    rank[name] = {k: rng.uniform(-bound, bound, shapes[name][k].shape).astype(np.float32)
                  for k in ("kernel", "bias")}
  return weights, {"params": rank}


def _adam(beta1: float) -> optax.GradientTransformation:
  """Adam's scaling (LPIPS trainer: betas (beta1, 0.999), eps 1e-8); the rate is applied
  separately, so one compiled step serves every learning rate and schedule."""
  return optax.scale_by_adam(b1=beta1, b2=0.999, eps=1e-8)


def _ranking_loss(params, d0, d1, judge):
  """LPIPS ``BCERankingLoss``: BCE of sigmoid(RankingNet(d0, d1)) against the judge."""
  logits = _RANKING_NET.apply(params["rank"], d0, d1)
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, judge))


def _apply(params, opt_state, loss_fn, lr, beta1):
  """One Adam step at rate ``lr``, then LPIPS's ``clamp_weights`` (tap weights >= 0)."""
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = _adam(beta1).update(grads, opt_state, params)
  params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
  params = dict(params, w=[jnp.maximum(w, 0.0) for w in params["w"]])
  return params, opt_state, loss


@functools.partial(jax.jit, static_argnames=("beta1",))
def _cached_step(params, opt_state, m0, m1, index, judge, lr, *, beta1):
  """A step on cached per-channel spatial means ``m0, m1`` ``(N, sum_l C_l)`` (no dropout)."""
  x0, x1 = m0[index], m1[index]

  def loss_fn(p):
    w = jnp.concatenate(p["w"])
    return _ranking_loss(p, x0 @ w, x1 @ w, judge)

  return _apply(params, opt_state, loss_fn, lr, beta1)


@functools.partial(jax.jit, static_argnames=("tap_difference_fn", "dropout", "beta1"))
def _dropout_step(params, opt_state, ref, p0, p1, judge, lr, key, step, *, tap_difference_fn,
                  dropout, beta1):
  """A step that runs the frozen taps on the batch, with LPIPS's dropout on the differences
  (keys ``fold_in(key, step)``)."""
  diffs0 = jax.lax.stop_gradient(tuple(tap_difference_fn(ref, p0)))
  diffs1 = jax.lax.stop_gradient(tuple(tap_difference_fn(ref, p1)))
  scales = _dropout_scales(jax.random.fold_in(key, step),
                           [d.shape for d in diffs0 + diffs1], dropout)
  scales0, scales1 = scales[:len(diffs0)], scales[len(diffs0):]

  def loss_fn(p):
    return _ranking_loss(p, _weighted(p["w"], diffs0, scales0),
                         _weighted(p["w"], diffs1, scales1), judge)

  return _apply(params, opt_state, loss_fn, lr, beta1)


@functools.partial(jax.jit, static_argnums=0)
def _tap_means(tap_difference_fn, x, y):
  """``(N, sum_l C_l)`` per-channel spatial means of the tap differences."""
  return jnp.concatenate([jnp.mean(d.astype(jnp.float32), axis=(1, 2))
                          for d in tap_difference_fn(x, y)], axis=-1)


def learn_tap_weights(tap_difference_fn: Callable, triplets, *, steps: int, seed: int,
                      batch_size: int = 50, learning_rate: float = 1e-4, beta1: float = 0.5,
                      decay_fraction: float = 0.5, dropout: float = 0.5, init="lpips",
                      return_losses: bool = False):
  """Learns non-negative per-channel tap weights ``w_l`` from 2AFC judgements (LPIPS "lin").

  LPIPS's calibration (Zhang et al., 2018; ``lpips/trainer.py`` with ``BCERankingLoss``): the
  distances ``d0 = d(ref, p0)``, ``d1 = d(ref, p1)`` of `tap_weighted_distance` feed the small
  ranking network `RankingNet`, whose sigmoid output is fitted to ``judge`` by binary cross
  entropy; the weights and the ranking network are trained jointly by Adam (lr 1e-4, betas
  (0.5, 0.999)) on batches of 50, with dropout 0.5 on the differences in front of the weights,
  and the weights are clamped at 0 after every step. The learning rate of step ``s`` is
  ``learning_rate * min(1, (steps - s) / round(decay_fraction * steps))``: constant, then a
  linear decay over the last ``decay_fraction`` of the steps (LPIPS: 5 epochs constant, 5
  decaying). Batches walk through per-epoch permutations of all triplets (incomplete last batch
  of an epoch dropped); dropout keys are ``fold_in(key(seed), step)``; the initial parameters
  are drawn on the host from ``seed``.

  A weight clamped at 0 whose gradient keeps pointing below 0 stays at 0 (as in LPIPS); with the
  default random init and few steps an informative channel can be lost that way, so at small
  scale ``init="ones"`` (start from the untuned distance) is the more robust choice.

  With ``dropout=0`` the loss depends on the differences only through their per-channel spatial
  means, which are computed once (batched) and cached: exact, and far cheaper per step. With
  dropout the network runs on every batch, as in LPIPS.

  Args:
    tap_difference_fn: ``(x, y) -> tuple of (N, h_l, w_l, C_l)`` per-tap unit-normalised squared
      feature differences of ``(N, H, W, C)`` images, traceable by `jax.jit` (e.g.
      ``jaxmed.metrics.coper.squared_tap_differences`` with its network bound); frozen.
    triplets: `Triplets`, or ``{category: Triplets}`` (e.g. a `TwoAFCSet`: all categories are
      pooled, as LPIPS pools traditional, cnn and mix). Held in host memory.
    steps: optimisation steps, >= 1.
    seed: int >= 0: initialisation, batch order and dropout.
    batch_size: triplets per step (at most the number of triplets).
    learning_rate: Adam's peak learning rate, > 0.
    beta1: Adam's first-moment decay in [0, 1).
    decay_fraction: share of the steps with linear decay, in [0, 1].
    dropout: drop rate in [0, 1) of the differences in front of the weights.
    init: ``"lpips"`` (PyTorch's default 1x1 conv init, U(+-1 / sqrt(C_l)), negatives clamped
      after the first step), ``"ones"`` (the untuned baseline) or one ``(C_l,)`` array per tap.
    return_losses: also return the ``(steps,)`` training losses.

  Returns:
    A list of ``(C_l,)`` float32 numpy arrays, >= 0, one per tap (and the losses).

  Raises:
    ValueError: a bad argument or a ``tap_difference_fn`` output that is not a tuple of
      ``(N, h, w, C)`` arrays.
  """
  fn = "learn_tap_weights"
  if not callable(tap_difference_fn):
    raise ValueError(f"{fn}: tap_difference_fn must be callable (x, y) -> tuple of per-tap "
                     f"differences; got {type(tap_difference_fn).__name__}")
  if isinstance(triplets, collections.abc.Mapping) and not {"ref", "p0", "p1",
                                                           "judge"} <= set(triplets):
    if not triplets:
      raise ValueError(f"{fn}: triplets holds no category")
    data = concatenate_triplets([_as_triplets(triplets[c], f"{fn}: triplets[{c!r}]") for c in triplets])
  else:
    data = _as_triplets(triplets, f"{fn}: triplets")
  n = len(data)
  if n == 0:
    raise ValueError(f"{fn}: triplets holds no triplet")
  steps = _positive_int(fn, "steps", steps)
  seed = _seed(fn, seed)
  batch_size = min(_positive_int(fn, "batch_size", batch_size), n)
  checks = (("learning_rate", learning_rate, lambda v: v > 0, "> 0"),
            ("beta1", beta1, lambda v: 0 <= v < 1, "in [0, 1)"),
            ("decay_fraction", decay_fraction, lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("dropout", dropout, lambda v: 0 <= v < 1, "in [0, 1)"))
  for name, value, ok, want in checks:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(value):
      raise ValueError(f"{fn}: {name} must be a real number {want}; got {value!r}")
  dropout = float(dropout)

  shapes = jax.eval_shape(tap_difference_fn, data.ref[:1], data.p0[:1])
  channels = _check_tap_shapes(fn, shapes, 1)
  if isinstance(init, str) and init == "ones":
    init = [np.ones((c,), np.float32) for c in channels]
  elif isinstance(init, (list, tuple)):
    init = [np.asarray(w, np.float32) for w in init]
    if [w.shape for w in init] != [(c,) for c in channels]:
      raise ValueError(f"{fn}: init must be one (C_l,) array per tap with C_l = {channels}; got "
                       f"shapes {[w.shape for w in init]}")
  elif not (isinstance(init, str) and init == "lpips"):
    raise ValueError(f"{fn}: init must be 'lpips', 'ones' or a list of (C_l,) arrays; got "
                     f"{init!r}")
  weights, rank_params = _initial_params(seed, channels)
  if not isinstance(init, str):
    weights = init
  params = jax.tree.map(jnp.asarray, {"w": weights, "rank": rank_params})
  dropout_key = jax.random.key(seed)
  beta1 = float(beta1)
  opt_state = _adam(beta1).init(params)
  # LPIPS: constant, then linear decay over the last ``decay_fraction`` of the steps.
  decay_steps = max(int(round(decay_fraction * steps)), 1) if decay_fraction > 0 else 0
  count = np.arange(steps)
  rates = learning_rate * (np.clip((steps - count) / decay_steps, 0.0, 1.0) if decay_steps
                           else np.ones(steps))

  if dropout == 0.0:
    # The loss sees the differences only through their per-channel spatial means: cache them.
    means = functools.partial(_tap_means, tap_difference_fn)
    m0 = jnp.asarray(_batched_features(means, data.ref, data.p0, batch_size))
    m1 = jnp.asarray(_batched_features(means, data.ref, data.p1, batch_size))
    step = lambda params, opt_state, index, judge, lr, s: _cached_step(
        params, opt_state, m0, m1, index, judge, lr, beta1=beta1)
  else:
    step = lambda params, opt_state, index, judge, lr, s: _dropout_step(
        params, opt_state, data.ref[index], data.p0[index], data.p1[index], judge, lr,
        dropout_key, s, tap_difference_fn=tap_difference_fn, dropout=dropout, beta1=beta1)

  losses = []
  for s, index in enumerate(_epoch_batches(n, batch_size, steps, seed)):
    params, opt_state, loss = step(params, opt_state, index.astype(np.int32),
                                   data.judge[index], np.float32(rates[s]), np.int32(s))
    losses.append(loss)
  losses = np.asarray(jnp.stack(losses), np.float32)
  weights = [np.asarray(w, np.float32) for w in params["w"]]
  return (weights, losses) if return_losses else weights


def _batched_features(features_fn, x: np.ndarray, y: np.ndarray, batch_size: int) -> np.ndarray:
  """``features_fn`` over pairs in batches of exactly ``batch_size`` (last padded), stacked."""
  out = []
  for xb, yb, m in _padded_batches([(x, y)], batch_size):
    out.append(np.asarray(features_fn(xb, yb))[:m])
  return np.concatenate(out)


def _epoch_batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
  """``steps`` index batches from per-epoch permutations (seeded), incomplete batches dropped."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, 0x2AFC]))
  produced = 0
  while True:
    order = rng.permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
      if produced == steps:
        return
      yield order[start:start + batch_size]
      produced += 1


# ---------------------------------------------------------------- rating normalisation


def rating_agreement(distances, real_ratings, synthetic_ratings, *, is_proxy: bool
                     ) -> dict[str, Any]:
  """Normalised distances vs normalised rating gaps (Sec. IV-A4 and Fig. 3b of CoPer).

  For ``n`` (real, synthetic) image pairs: ``D' = d_i / max_j d_j``
  (`jaxmed.metrics.max_normalize`) and ``R' = r_abs / max_j r_abs`` with
  ``r_abs = |r^R_i - r^S_i|``, the gap between the ratings of the real and the synthetic image.
  The paper compares the two normalised sets (Fig. 3b: smaller D' where R' is small); we also
  return their correlations (`jaxmed.metrics.pearson`, `spearman`) and mean absolute gap.

  With no expert ratings (phantoms), ratings can only come from an oracle, e.g. a fixed
  segmenter's Dice or `lesion_error` (real image: error 0); pass ``is_proxy=True`` so the result
  says so.

  Args:
    distances: ``(n,)`` non-negative perceptual distances ``d(real_i, synthetic_i)``.
    real_ratings: ``(n,)`` ratings of the real images.
    synthetic_ratings: ``(n,)`` ratings of the synthetic images.
    is_proxy: whether the ratings come from an oracle rather than experts (required).

  Returns:
    ``{"distance": (n,) D', "rating": (n,) R', "pearson", "spearman", "mean_abs_gap",
    "is_proxy"}``: arrays float32 in [0, 1]; correlations float (NaN where a side is constant).

  Raises:
    ValueError: shapes that are not one ``(n,)`` with n >= 2, negative or non-finite values.
  """
  fn = "rating_agreement"
  if not isinstance(is_proxy, bool):
    raise ValueError(f"{fn}: is_proxy must be a bool; got {is_proxy!r}")
  arrays = {}
  for name, value in (("distances", distances), ("real_ratings", real_ratings),
                      ("synthetic_ratings", synthetic_ratings)):
    value = np.asarray(value)
    if not np.issubdtype(value.dtype, np.number) or value.ndim != 1 or len(value) < 2:
      raise ValueError(f"{fn}: {name} must be (n,) numbers with n >= 2; got {value.dtype} "
                       f"{value.shape}")
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{fn}: {name} contains NaN or Inf")
    arrays[name] = value.astype(np.float64)
  n = len(arrays["distances"])
  for name in ("real_ratings", "synthetic_ratings"):
    if len(arrays[name]) != n:
      raise ValueError(f"{fn}: {name} shape {arrays[name].shape} != distances shape ({n},)")
  if arrays["distances"].min() < 0:
    raise ValueError(f"{fn}: distances must be non-negative; got minimum "
                     f"{arrays['distances'].min()}")
  d_norm = np.asarray(max_normalize(arrays["distances"]), np.float32)
  r_norm = np.asarray(max_normalize(np.abs(arrays["real_ratings"] - arrays["synthetic_ratings"])),
                      np.float32)
  return {
      "distance": d_norm,
      "rating": r_norm,
      "pearson": float(pearson(d_norm, r_norm)),
      "spearman": float(spearman(d_norm, r_norm)),
      "mean_abs_gap": float(np.mean(np.abs(d_norm - r_norm))),
      "is_proxy": is_proxy,
  }

"""Evaluators looked up by ``type`` (big_vision style), and the subject-level segmentation metrics.

A config lists its evaluators by name in ``config.evals``::

    config.evals = ml_collections.ConfigDict({
        "val_seg": {"type": "segmentation", "every": 500, "split": "val", "mode": "2d"},
        "val_recon": {"type": "reconstruction", "every": 500, "num_slices": 64},
        "grade": {"type": "linear_probe", "every": 0, "C": 1.0},
    })
    evaluators = make_evaluators(config.evals, method=method, splits=splits)
    for ev in evaluators:
      if ev.should_run(step, final=step == total_steps):
        metrics.update(ev(step, variables))      # {"val_seg/dice_WT": ..., ...}

Every evaluator has ``name``, ``every`` (steps between runs; 0 = only at the end) and
``__call__(step, variables) -> {f"{name}/{metric}": float}``. Its config holds ``type``,
``every`` and the fields of its type (`Evaluator.defaults`); an unknown field, a missing
``type`` or a method without the hook the type calls is a ``ValueError`` at `make_evaluators`
time, naming the evaluator. Types (`EVALUATORS`):

- ``segmentation``: Dice and HD95 per region on held-out subjects (`SegmentationEvaluator`).
- ``reconstruction``: PSNR and SSIM of the pretext reconstruction (`ReconstructionEvaluator`).
- ``linear_probe``: logistic regression on frozen subject features (`LinearProbeEvaluator`).
"""

from __future__ import annotations

import abc
import itertools
import math
import warnings
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.data import datasets, sources
from jaxmed.evaluate import linear_probe
from jaxmed.evaluate.sliding_window import sliding_window_inference
from jaxmed.metrics import dice, hausdorff_distance, psnr, ssim

MODES = ("2d", "3d")
# Segmentation evaluator modes: "auto" = "window" for a 3D model, "2d" otherwise.
SEGMENTATION_MODES = ("auto", "2d", "3d", "window")


def window_probabilities(method, *, roi_size, overlap: float = 0.5, mode: str = "constant",
                         batch_size: int = 4, tta: bool = False, mesh=None):
  """Jitted ``(variables, volumes (N, *spatial, C)) -> (N, *spatial, K)`` float32: sliding
  windows (`sliding_window_inference`) over ``method.probabilities``; with ``tta`` the mean
  over every flip of the spatial axes (8 in 3D), each flipped back."""
  roi_size = tuple(int(r) for r in roi_size)

  def probabilities(variables, volumes):
    def infer(x):
      return sliding_window_inference(lambda w: method.probabilities(variables, w), x,
                                      roi_size, overlap=overlap, mode=mode,
                                      batch_size=batch_size, mesh=mesh)
    if not tta:
      return infer(volumes)
    spatial = range(1, volumes.ndim - 1)
    total = 0.0
    for flips in itertools.product((False, True), repeat=len(spatial)):
      axes = tuple(a for a, f in zip(spatial, flips) if f)
      total = total + (jnp.flip(infer(jnp.flip(volumes, axes)), axes) if axes
                       else infer(volumes))
    return total / 2 ** len(spatial)

  return jax.jit(probabilities)


def window_predictor(method, **window):
  """Jitted ``(variables, volumes) -> (N, *spatial, R)`` bool: `window_probabilities` then
  ``method.decide`` (the ``"3d"`` ``predict`` of `predict_volume`). Made once per method
  object and settings (like ``jitted_predict``), so that the evaluations of runs sharing a
  method (`jaxmed.train.programs`) trace it once."""
  made = method.__dict__.setdefault("_window_predictors", {})
  key = tuple(sorted(window.items()))
  if key not in made:
    probabilities = window_probabilities(method, **window)
    made[key] = jax.jit(lambda variables, volumes: method.decide(probabilities(variables,
                                                                              volumes)))
  return made[key]


def window_settings(method, fields=None) -> dict:
  """The window settings of ``fields`` (an evaluator's), defaulting to the method config's
  ``finetune`` section (``roi_size`` () = ``data.crop_size``)."""
  fields = dict(fields or {})
  ft = method.config.get("finetune", {})
  roi = tuple(fields.get("roi_size") or ft.get("roi_size", ()) or method.config.data.crop_size)
  return {"roi_size": roi,
          "overlap": float(fields.get("overlap", ft.get("overlap", 0.5))),
          "mode": fields.get("window_mode") or ft.get("window_mode", "constant"),
          "batch_size": int(fields.get("window_batch") or ft.get("window_batch", 4)),
          "tta": bool(fields.get("tta", ft.get("tta", False)))}


def is_3d(method) -> bool:
  """Whether the method's network is 3D (``data.view`` "crop" or "volume" in its config; a
  method without a config is taken as 2D)."""
  config = getattr(method, "config", None)
  return config is not None and config.data.get("view", "slice") in ("crop", "volume")

# --- Subject-level segmentation metrics (also used by `jaxmed.evaluate.finetune`) -------------


def predict_volume(method, variables, image: np.ndarray, *, batch_size: int = 32,
                   mode: str = "2d", predict=None) -> np.ndarray:
  """Region prediction of one volume ``(D, H, W, C)`` -> ``(D, H, W, R)`` bool.

  Args:
    method: has ``predict(variables, x) -> bool regions``.
    variables: the model's Flax variables.
    image: ``(D, H, W, C)`` volume.
    batch_size: axial slices per call in ``"2d"`` mode (the last batch is zero-padded, so
      every call has the same shape and compiles once).
    mode: ``"2d"``: ``predict`` maps batches of axial slices ``(N, H, W, C) -> (N, H, W, R)``;
      ``"3d"``: it maps the whole volume ``(1, D, H, W, C) -> (1, D, H, W, R)``.
    predict: the compiled ``predict`` to call; default ``method.jitted_predict`` if the method
      has one (`SegmentationMethod`), else ``jax.jit(method.predict)`` (compiled anew per call:
      pass one to reuse it).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
  image = np.asarray(image)
  if image.ndim != 4:
    raise ValueError(f"image must be a (D, H, W, C) volume; got shape {image.shape}")
  apply = predict or _jitted_predict(method)
  if mode == "3d":
    out = np.asarray(apply(variables, image[None]))
    expected = (1, *image.shape[:3])
    if out.ndim != 5 or out.shape[:4] != expected:
      raise ValueError(f"method.predict in '3d' mode must map (1, D, H, W, C) -> "
                       f"{(*expected, 'R')}; got {out.shape}")
    return out[0].astype(bool, copy=False)
  depth = image.shape[0]
  pad = (-depth) % batch_size
  padded = np.concatenate([image, np.zeros((pad, *image.shape[1:]), image.dtype)])
  out = []
  for i in range(0, len(padded), batch_size):
    batch = np.asarray(apply(variables, padded[i:i + batch_size]))
    expected = (batch_size, *image.shape[1:3])
    if batch.ndim != 4 or batch.shape[:3] != expected:
      raise ValueError(f"method.predict in '2d' mode must map (N, H, W, C) -> "
                       f"{(*expected, 'R')}; got {batch.shape}")
    out.append(batch)
  return np.concatenate(out)[:depth].astype(bool, copy=False)


def evaluate_subjects(method, variables, subjects, *, batch_size: int = 32, mode: str = "2d",
                      hd_percentile: float | None = None, predict=None) -> dict:
  """3D Dice per subject and region, and the mean over subjects (nan-aware: a region absent
  from both prediction and ground truth is skipped).

  With several regions (BraTS WT/TC/ET) a last column ``All`` is the Dice of the regions taken
  together (source_identification Table 1: the region channels concatenated, not merged).

  Args:
    method: has ``regions`` (names) and ``predict`` (see `predict_volume`).
    variables: the model's Flax variables.
    subjects: labelled `jaxmed.data.subject.Subject` s.
    batch_size, mode, predict: as in `predict_volume`.
    hd_percentile: also compute the Hausdorff distance at this percentile (95: HD95) per
      subject and region, in 3D, in the subject's ``spacing`` units (mm).
      `jaxmed.metrics.hausdorff_distance` gives ``inf`` when exactly one of prediction and
      ground truth is empty and ``nan`` when both are; the mean over subjects skips nan and is
      ``inf`` if any subject's value is.

  Returns:
    ``{"subjects": [ids], "regions": names, "dice": (S, R[+1]) array, "mean": {name: float}}``,
    plus ``"hausdorff": (S, R)`` and ``"hausdorff_mean": {region: float}`` with
    ``hd_percentile``.
  """
  names = region_columns(method.regions)
  rows, hd_rows = [], []
  for s in subjects:
    pred = predict_volume(method, variables, s.image, batch_size=batch_size, mode=mode,
                          predict=predict)
    truth = s.regions
    if pred.shape != truth.shape:
      raise ValueError(f"method.predict gives {pred.shape[-1]} region channels for subject "
                       f"{s.subject_id}, whose regions are {truth.shape}")
    row = np.asarray(dice(pred[None], truth[None]))[0]
    if len(names) > len(method.regions):
      row = np.append(row, np.asarray(dice(pred.reshape(1, -1, 1),
                                           truth.reshape(1, -1, 1)))[0])
    rows.append(row)
    if hd_percentile is not None:
      # Regions as the batch axis: (R, D, H, W).
      hd_rows.append(np.asarray(hausdorff_distance(
          np.moveaxis(pred, -1, 0), np.moveaxis(truth, -1, 0), percentile=hd_percentile,
          spacing=tuple(map(float, s.spacing)))))
  table = np.stack(rows)
  mean = _nanmean(table)
  out = {"subjects": [s.subject_id for s in subjects], "regions": names, "dice": table,
         "mean": dict(zip(names, map(float, mean)))}
  if hd_percentile is not None:
    hd = np.stack(hd_rows)
    out["hausdorff"] = hd
    out["hausdorff_mean"] = dict(zip(method.regions, map(float, _nanmean(hd))))
  return out


def region_columns(regions) -> tuple[str, ...]:
  """Result columns for ``regions``: the regions, then ``All`` when there are several."""
  regions = tuple(regions)
  return regions + ("All",) if len(regions) > 1 else regions


def _nanmean(table, reduce=np.nanmean):
  """Per-column nan-aware reduction; a column with no finite value (a region absent from every
  subject) gives nan without a warning."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return reduce(table, axis=0)


def dice_table(results: dict[str, dict]) -> str:
  """Markdown table of `evaluate_subjects` results: a row per run, mean (std) over subjects
  per column, and the mean over the regions (the ``All`` column excluded)."""
  columns = list(next(iter(results.values()))["mean"])
  regions = np.array([c != "All" for c in columns])
  lines = ["| run | " + " | ".join(columns) + " | mean |", "|---" * (len(columns) + 2) + "|"]
  for name, result in results.items():
    mean, std = _nanmean(result["dice"]), _nanmean(result["dice"], np.nanstd)
    cells = [f"{m:.3f} ({s:.3f})" for m, s in zip(mean, std)]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {_nanmean(mean[regions]):.3f} |")
  return "\n".join(lines)


def _jitted_predict(method):
  jitted = getattr(method, "jitted_predict", None)
  return jitted if jitted is not None else jax.jit(method.predict)


# --- Evaluators -------------------------------------------------------------------------------


class Evaluator(abc.ABC):
  """Base class: a named evaluation run every ``every`` steps (0: only at the end).

  Subclasses set ``type`` (the registry key), ``defaults`` (their config fields and default
  values), ``hooks`` (the method attributes they call) and implement `evaluate`. The
  constructor receives the validated fields as keyword arguments.
  """

  type: ClassVar[str] = ""
  defaults: ClassVar[dict[str, Any]] = {}
  hooks: ClassVar[tuple[str, ...]] = ()

  def __init__(self, name: str, *, every: int, method, splits, **fields):
    self.name, self.every, self.method = name, every, method
    self.fields = fields
    self.setup(splits, **fields)

  def setup(self, splits, **fields) -> None:
    """Checks the fields and prepares the data; raise `ValueError` via `error`."""

  @abc.abstractmethod
  def evaluate(self, variables) -> dict[str, float]:
    """Metrics without the name prefix."""

  def should_run(self, step: int, final: bool = False) -> bool:
    """Whether to evaluate at ``step``: at the end (``final``), and every ``every`` steps."""
    return bool(final) or (self.every > 0 and int(step) % self.every == 0)

  def __call__(self, step: int, variables) -> dict[str, float]:
    """``{f"{name}/{metric}": float}`` for ``variables`` (``step`` is for the record only)."""
    del step
    return {f"{self.name}/{k}": float(v) for k, v in self.evaluate(variables).items()}

  def error(self, message: str) -> ValueError:
    return ValueError(f"evals.{self.name} (type {self.type!r}): {message}")

  def subjects(self, splits, field: str, *, labelled: bool):
    """The non-empty subjects ``splits[self.fields[field]]`` (a list, or a file-backed
    sequence that opens one subject at a time)."""
    split = self.fields[field]
    if split not in splits:
      raise self.error(f"{field} must be one of {sorted(splits)}; got {split!r}")
    subjects = splits[split]
    if not len(subjects):
      raise self.error(f"split {split!r} ({field}) has no subjects")
    if labelled:
      infos = sources.subject_infos(subjects)
      missing = [i.subject_id for i in infos if not i.has_label]
      if missing:
        raise self.error(f"needs labelled subjects; {split!r} subjects without a label: "
                         f"{missing}")
    return subjects

  def choice(self, field: str, options) -> Any:
    value = self.fields[field]
    if value not in options:
      raise self.error(f"{field} must be one of {tuple(options)}; got {value!r}")
    return value

  def positive_int(self, field: str) -> int:
    value = self.fields[field]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise self.error(f"{field} must be an int >= 1; got {value!r}")
    return int(value)

  def fraction(self, field: str) -> float:
    value = float(self.fields[field])
    if not 0.0 <= value <= 1.0:
      raise self.error(f"{field} must be in [0, 1]; got {value}")
    return value


EVALUATORS: dict[str, type[Evaluator]] = {}


def register(cls: type[Evaluator]) -> type[Evaluator]:
  """Class decorator adding an `Evaluator` subclass to `EVALUATORS` under ``cls.type``."""
  if not cls.type or cls.type in EVALUATORS:
    raise ValueError(f"evaluator type {cls.type!r} is empty or already registered")
  EVALUATORS[cls.type] = cls
  return cls


def make_evaluators(evals_cfg, *, method, splits) -> list[Evaluator]:
  """The evaluators of ``config.evals``, in config order.

  Args:
    evals_cfg: mapping (``ConfigDict`` or dict) name -> ``{type, every, **fields}``; None or
      empty for no evaluators.
    method: the trained method; each type checks it has the hooks it calls.
    splits: ``{"train": [...], "val": [...], "test": [...]}`` subjects
      (`jaxmed.data.datasets.load_splits`).

  Raises:
    ValueError: naming the evaluator: a missing or unknown ``type`` (listing the known ones),
      an unknown field (listing the type's fields), a bad ``every`` or field value, a method
      without the needed hook, or an empty or unlabelled split.
  """
  if not evals_cfg:
    return []
  out = []
  for name, cfg in evals_cfg.items():
    if not isinstance(name, str) or not name or "/" in name:
      raise ValueError(f"evals: evaluator names must be non-empty strings without '/'; "
                       f"got {name!r}")
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    if "type" not in cfg:
      raise ValueError(f"evals.{name}: missing field 'type' (one of {sorted(EVALUATORS)})")
    kind = cfg.pop("type")
    if kind not in EVALUATORS:
      raise ValueError(f"evals.{name}: unknown type {kind!r}; known types: "
                       f"{sorted(EVALUATORS)}")
    cls = EVALUATORS[kind]
    every = cfg.pop("every", 0)
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 0:
      raise ValueError(f"evals.{name}: every must be an int >= 0 (0: only at the end); "
                       f"got {every!r}")
    unknown = sorted(set(cfg) - set(cls.defaults))
    if unknown:
      raise ValueError(f"evals.{name}: unknown field(s) {unknown} for type {kind!r}; its fields "
                       f"are {['type', 'every', *cls.defaults]}")
    for hook in cls.hooks:
      if not hasattr(method, hook):
        raise ValueError(f"evals.{name}: a {kind!r} evaluator needs method.{hook}, which "
                         f"{type(method).__name__} does not have")
    out.append(cls(name, every=int(every), method=method, splits=splits,
                   **{**cls.defaults, **cfg}))
  return out


def run_evaluators(evaluators, step: int, variables, *, final: bool = False) -> dict[str, float]:
  """The merged metrics of the evaluators that `Evaluator.should_run` at ``step``."""
  out = {}
  for ev in evaluators:
    if ev.should_run(step, final):
      out.update(ev(step, variables))
  return out


@register
class SegmentationEvaluator(Evaluator):
  """Dice and HD95 per region on the subjects of ``split``, in 3D, one value per subject
  (`evaluate_subjects`), averaged over subjects.

  Fields: ``split`` ("val" or "test"), ``mode``: "2d" (the method predicts batches of
  ``batch_size`` axial slices ``(N, H, W, C) -> (N, H, W, R)`` bool, stacked into a volume),
  "3d" (it predicts the whole volume ``(1, D, H, W, C) -> (1, D, H, W, R)``), "window"
  (sliding windows over ``method.probabilities``, `window_predictor`: ``roi_size``,
  ``overlap``, ``window_mode``, ``window_batch``, ``tta``, each defaulting to the method's
  ``finetune`` section) or "auto" (the default: "window" for a 3D network, else "2d").

  Metrics: ``dice_<region>``, ``dice_All`` (several regions: the channels together),
  ``dice_mean`` (mean over the regions, ``All`` excluded), ``hd95_<region>`` and ``hd95_mean``:
  the 95th-percentile symmetric Hausdorff distance in mm (the subject's ``spacing``). Means
  over subjects skip nan (region absent from prediction and ground truth); HD95 is ``inf``
  where exactly one of them is empty (`jaxmed.metrics.hausdorff_distance`; MONAI gives nan
  there), so a mean is ``inf`` when any subject misses or hallucinates a region.
  """

  type = "segmentation"
  defaults = {"split": "val", "mode": "auto", "batch_size": 32, "roi_size": (), "overlap": None,
              "window_mode": "", "window_batch": 0, "tta": None}
  hooks = ("predict", "regions")

  def setup(self, splits, *, split, mode, batch_size, **window):
    self.mode = self.choice("mode", SEGMENTATION_MODES)
    self.batch_size = self.positive_int("batch_size")
    self.subject_list = self.subjects(splits, "split", labelled=True)
    self.regions = tuple(self.method.regions)
    self.mode, self.predict = segmentation_predictor(
        self.method, self.mode, {k: v for k, v in window.items() if v is not None})

  def evaluate(self, variables):
    result = evaluate_subjects(self.method, variables, self.subject_list,
                               batch_size=self.batch_size, mode=self.mode, hd_percentile=95,
                               predict=self.predict)
    out = {f"dice_{k}": v for k, v in result["mean"].items()}
    out.update({f"hd95_{k}": v for k, v in result["hausdorff_mean"].items()})
    out["dice_mean"] = _mean([result["mean"][r] for r in self.regions])
    out["hd95_mean"] = _mean(list(result["hausdorff_mean"].values()))
    return out


def segmentation_predictor(method, mode: str = "auto", window=None):
  """``(predict_volume mode, predict)`` for a segmentation evaluation in ``mode``
  (`SEGMENTATION_MODES`): "window" (or "auto" with a 3D network) is the "3d" mode with
  `window_predictor` (settings from `window_settings`)."""
  if mode not in SEGMENTATION_MODES:
    raise ValueError(f"mode must be one of {SEGMENTATION_MODES}; got {mode!r}")
  if mode == "auto":
    mode = "window" if is_3d(method) else "2d"
  if mode == "window":
    if not hasattr(method, "probabilities"):
      raise ValueError(f"mode='window' needs method.probabilities, which "
                       f"{type(method).__name__} does not have")
    return "3d", window_predictor(method, **window_settings(method, window))
  return mode, _jitted_predict(method)


@register
class ReconstructionEvaluator(Evaluator):
  """PSNR and SSIM of the method's pretext reconstruction against its target, 2D per slice.

  The slices are those of the ``split`` subjects with a brain fraction of at least
  ``min_foreground`` (`jaxmed.data.datasets.slice_view`), at most ``num_slices`` of them (a
  seeded subset, the same at every evaluation), in batches of ``batch_size``:
  ``{"image": (N, H, W, C), "label", "brain_mask", "subject_index", "slice_index"}``, passed
  through the method's ``example_transform`` if it has one (e.g. source identification's
  partners), with a fixed seed. For batch ``i`` with key ``fold_in(PRNGKey(seed), i)``:
  ``method.pretext_example(key, batch) -> (inputs, target)`` and
  ``method.reconstruct(variables, batch, key) -> (inputs, prediction)``, both ``(N, H, W, T)``.

  Data range: ``data_range`` if set (> 0), else per slice ``target.max() - target.min()`` over
  its pixels and channels (the fastMRI convention uses ``max``; the range also suits z-scored
  targets). SSIM: `jaxmed.metrics.ssim` defaults (11-tap Gaussian window, sigma 1.5,
  population covariance, valid border: MONAI / Wang et al.), mean over channels.

  Metrics: ``psnr`` (dB) and ``ssim``, means over slices: ``psnr`` is ``inf`` if any slice is
  reconstructed exactly; both are nan if any prediction is non-finite.
  """

  type = "reconstruction"
  defaults = {"split": "val", "num_slices": 64, "batch_size": 32, "seed": 0,
              "min_foreground": 0.2, "data_range": None}
  hooks = ("pretext_example", "reconstruct")

  def setup(self, splits, *, split, num_slices, batch_size, seed, min_foreground, data_range):
    num_slices, self.batch_size = self.positive_int("num_slices"), self.positive_int("batch_size")
    if data_range is not None and not (math.isfinite(float(data_range)) and data_range > 0):
      raise self.error(f"data_range must be None (per-slice target range) or a positive "
                       f"number; got {data_range!r}")
    self.data_range = None if data_range is None else float(data_range)
    subjects = self.subjects(splits, "split", labelled=False)
    arrays = datasets.slice_view(subjects, min_foreground=self.fraction("min_foreground"))
    rng = np.random.default_rng(int(seed))
    total = len(arrays["image"])
    if total == 0:
      raise self.error(f"no slice of split {split!r} has a brain fraction >= {min_foreground}")
    index = np.sort(rng.choice(total, num_slices, replace=False)) if total > num_slices else (
        np.arange(total))
    transform = getattr(self.method, "example_transform", lambda arrays: None)(arrays)
    examples = [{k: v[i] for k, v in arrays.items()} for i in index]
    if transform is not None:
      examples = [transform(e, rng) for e in examples]
    #: The evaluated slices: dict of ``(num_slices, ...)`` arrays.
    self.slices = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    self.key = jax.random.PRNGKey(int(seed))
    self._run = jax.jit(self._reconstruct)
    # Fails now, not at the first evaluation, for a method without a pretext task.
    try:
      jax.eval_shape(self.method.pretext_example, self.key, self._batch(0))
    except TypeError as e:  # the base Method has no pretext task
      raise self.error(f"needs method.pretext_example to work on slice batches; "
                       f"{type(self.method).__name__}: {e}") from e

  def _batch(self, start):
    return {k: v[start:start + self.batch_size] for k, v in self.slices.items()}

  def _reconstruct(self, variables, batch, key):
    _, target = self.method.pretext_example(key, batch)
    _, pred = self.method.reconstruct(variables, batch, key)
    return target, pred

  def evaluate(self, variables):
    psnrs, ssims = [], []
    for i, start in enumerate(range(0, len(self.slices["image"]), self.batch_size)):
      target, pred = self._run(variables, self._batch(start), jax.random.fold_in(self.key, i))
      target, pred = np.asarray(target, np.float32), np.asarray(pred, np.float32)
      if target.shape != pred.shape or target.ndim != 4:
        raise self.error(f"pretext target {target.shape} and reconstruction {pred.shape} must "
                         f"be equal (N, H, W, C)")
      if not np.all(np.isfinite(pred)):
        return {"psnr": float("nan"), "ssim": float("nan")}
      if self.data_range is None:
        data_range = target.max(axis=(1, 2, 3)) - target.min(axis=(1, 2, 3))
        if np.any(data_range <= 0):
          raise self.error("a slice's target is constant (data range 0): set data_range")
      else:
        data_range = self.data_range
      psnrs.append(np.asarray(psnr(pred, target, data_range=data_range)))
      ssims.append(np.asarray(ssim(pred, target, data_range=data_range)))
    return {"psnr": float(np.mean(np.concatenate(psnrs))),
            "ssim": float(np.mean(np.concatenate(ssims)))}


@register
class LinearProbeEvaluator(Evaluator):
  """Logistic regression on frozen subject features (`jaxmed.evaluate.linear_probe`).

  ``method.features(variables, x) -> (N, F)`` gives one global feature vector per input. A
  subject's features (``level`` "subject"): in ``mode`` "2d" the mean of its axial slices'
  features (slices with a brain fraction >= ``min_foreground``, in batches of ``batch_size``,
  the last zero-padded); in "3d" the features of its volume ``(1, D, H, W, C)``. The classifier
  (``C``, features standardised with the training subjects' statistics) is fitted on the
  ``train_split`` subjects' ``label`` attribute (default ``grade``) and scored on ``split``.

  Metrics: ``accuracy``, ``balanced_accuracy`` and, for two classes, ``roc_auc`` (of the
  decision function; nan when ``split`` holds one class). All nan when a feature is
  non-finite.
  """

  type = "linear_probe"
  defaults = {"split": "val", "train_split": "train", "label": "grade", "level": "subject",
              "mode": "2d", "C": 1.0, "batch_size": 32, "min_foreground": 0.2, "max_iter": 100}
  hooks = ("features",)

  def setup(self, splits, *, split, train_split, label, level, mode, C, batch_size,
            min_foreground, max_iter):
    self.choice("level", ("subject",))
    self.mode = self.choice("mode", MODES)
    self.batch_size, self.max_iter = self.positive_int("batch_size"), self.positive_int(
        "max_iter")
    self.min_foreground = self.fraction("min_foreground")
    if not (math.isfinite(float(C)) and float(C) > 0):
      raise self.error(f"C must be a positive number; got {C!r}")
    self.C = float(C)
    self.train_subjects = self.subjects(splits, "train_split", labelled=False)
    self.test_subjects = self.subjects(splits, "split", labelled=False)
    subjects = self.train_subjects + self.test_subjects
    if not all(np.ndim(getattr(s, label, None)) == 0 and getattr(s, label, None) is not None
               for s in subjects):
      raise self.error(f"label {label!r} must name a scalar subject attribute (e.g. 'grade')")
    self.train_y = np.array([getattr(s, label) for s in self.train_subjects])
    self.test_y = np.array([getattr(s, label) for s in self.test_subjects])
    if len(np.unique(self.train_y)) < 2:
      raise self.error(f"the {train_split!r} subjects need at least two values of {label!r}; "
                       f"got {np.unique(self.train_y)}")
    if self.mode == "2d":
      for s in subjects:
        if not np.any(s.brain_mask.mean(axis=(1, 2)) >= self.min_foreground):
          raise self.error(f"subject {s.subject_id} has no slice with a brain fraction >= "
                           f"{self.min_foreground}")
    self.features = jax.jit(self.method.features)

  def subject_features(self, variables, subject) -> np.ndarray:
    """``(F,)`` features of one subject."""
    image = subject.image
    if self.mode == "3d":
      out = np.asarray(self.features(variables, image[None]))
      self._check(out, 1)
      return out[0]
    image = image[subject.brain_mask.mean(axis=(1, 2)) >= self.min_foreground]  # (n, H, W, C)
    n = len(image)
    padded = np.concatenate([image, np.zeros(((-n) % self.batch_size, *image.shape[1:]),
                                              image.dtype)])
    out = []
    for i in range(0, len(padded), self.batch_size):
      f = np.asarray(self.features(variables, padded[i:i + self.batch_size]))
      self._check(f, self.batch_size)
      out.append(f)
    return np.concatenate(out)[:n].mean(axis=0)

  def _check(self, features, n):
    if features.ndim != 2 or features.shape[0] != n:
      raise self.error(f"method.features must return ({n}, F) features; got {features.shape}")

  def evaluate(self, variables):
    train_x = np.stack([self.subject_features(variables, s) for s in self.train_subjects])
    test_x = np.stack([self.subject_features(variables, s) for s in self.test_subjects])
    if not (np.all(np.isfinite(train_x)) and np.all(np.isfinite(test_x))):
      keys = ["accuracy", "balanced_accuracy"] + (
          ["roc_auc"] if len(np.unique(self.train_y)) == 2 else [])
      return {k: float("nan") for k in keys}
    return linear_probe.linear_probe(train_x, self.train_y, test_x, self.test_y, C=self.C,
                                     max_iter=self.max_iter)


def _mean(values) -> float:
  """nan-aware mean of scalars (nan when none is finite or nan-free)."""
  return float(_nanmean(np.asarray(values, np.float64)))

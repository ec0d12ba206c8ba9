"""k-fold cross-validation of segmentation fine-tuning, fold ensembles and per-class surface
metrics (the DAE protocol, disruptive_autoencoders Sec. 4: 5 folds, best-validation weights per
fold, the fold models ensembled on the test subjects).

``data.num_test`` subjects are held out first (the ensemble's test set). The others are split
into ``finetune.folds`` folds: fold k is tested on its own subjects (so every non-held-out
subject is tested exactly once, by a model that never saw it), validated on ``data.num_val``
subjects drawn from the other folds (never the test fold) and trained on the rest (or the
``finetune.label_fraction`` / ``num_labeled`` subset of it). Each fold keeps its best
validation weights. The ensemble averages the folds' probabilities (sliding windows for 3D
networks) on the held-out subjects and decides once.

Per subject and region: Dice, HD95 and the mean symmetric surface distance in mm (the subject's
spacing; `jaxmed.metrics`). ``crossval.json`` holds every value; ``crossval.md`` the tables.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from jaxmed.data import datasets
from jaxmed.evaluate import compare, evaluators, finetune as finetune_lib
from jaxmed.metrics import average_surface_distance, dice, hausdorff_distance


def kfold_splits(subjects, *, folds: int, num_val: int, seed: int) -> list[dict]:
  """``folds`` splits ``{"train", "val", "test"}`` of ``subjects``: the test folds partition
  the subjects (sizes differ by at most one), validation subjects are drawn (seeded) from the
  other folds, never from the test fold, and the rest train.

  Args:
    subjects: a list or a file-backed sequence (subsets stay file-backed).
    folds: >= 2.
    num_val: validation subjects per fold (>= 0).
    seed: the permutation and the validation draws.
  """
  n = len(subjects)
  if int(folds) != folds or folds < 2:
    raise ValueError(f"folds must be an int >= 2; got {folds!r}")
  if folds > n:
    raise ValueError(f"folds={folds} needs at least that many subjects; got {n}")
  if num_val < 0 or n - -(-n // folds) - num_val < 1:
    raise ValueError(f"num_val={num_val} leaves no training subject in a fold of {n} subjects "
                     f"and {folds} folds")
  rng = np.random.default_rng(seed)
  parts = np.array_split(rng.permutation(n), folds)
  out = []
  for k, test in enumerate(parts):
    rest = np.concatenate([p for j, p in enumerate(parts) if j != k])
    val = rng.choice(rest, size=num_val, replace=False) if num_val else np.zeros(0, int)
    train = np.setdiff1d(rest, val)
    out.append({name: datasets.take(subjects, sorted(int(i) for i in idx))
                for name, idx in (("train", train), ("val", val), ("test", test))})
  return out


def ensemble_probabilities(method, variables_list, volume, *, predict_probabilities=None):
  """Mean over models of ``predict_probabilities(variables, volume[None])[0]``: ``(D, H, W,
  K)`` float32 for one ``(D, H, W, C)`` volume (default: sliding windows of the method's
  ``finetune`` settings for a 3D network, ``method.probabilities`` for a 2D one, slice batch
  by slice batch)."""
  if not variables_list:
    raise ValueError("variables_list must hold at least one model's variables")
  probs = predict_probabilities or _probabilities(method)
  total = 0.0
  for variables in variables_list:
    total = total + np.asarray(probs(variables, np.asarray(volume)[None]))[0]
  return total / len(variables_list)


def _probabilities(method):
  if evaluators.is_3d(method):
    return evaluators.window_probabilities(method, **evaluators.window_settings(method))
  jitted = jax.jit(method.probabilities)

  def slices(variables, volumes):  # (1, D, H, W, C): axial slices as the batch
    return jitted(variables, volumes[0])[None]
  return slices


def surface_metrics(pred, truth, spacing) -> dict[str, np.ndarray]:
  """``{"dice", "hd95", "msd"}``, each ``(R,)``: per region of ``(D, H, W, R)`` bool masks, in
  mm with ``spacing`` (nan where both masks are empty; distances inf where one is)."""
  pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
  per_region = lambda x: np.moveaxis(x, -1, 0)
  spacing = tuple(float(s) for s in spacing)
  return {"dice": np.asarray(dice(pred[None], truth[None]))[0],
          "hd95": np.asarray(hausdorff_distance(per_region(pred), per_region(truth),
                                                percentile=95, spacing=spacing)),
          "msd": np.asarray(average_surface_distance(per_region(pred), per_region(truth),
                                                     spacing=spacing, symmetric=True))}


def surface_scores(method, variables, subjects, *, predict=None) -> dict:
  """One model's ``{"subjects": ids, "dice", "hd95", "msd": (S, R)}`` on ``subjects``
  (`surface_metrics` per subject), predicted as `jaxmed.evaluate.finetune` tests: by
  ``predict`` (default `evaluators.segmentation_predictor`'s: sliding windows of the method's
  ``finetune`` settings for a 3D network, the same program as the validation and test Dice)."""
  mode, default = evaluators.segmentation_predictor(method)
  predict = predict or default
  rows = {"subjects": [], "dice": [], "hd95": [], "msd": []}
  for subject in subjects:
    pred = evaluators.predict_volume(method, variables, subject.image, mode=mode,
                                     predict=predict)
    rows["subjects"].append(subject.subject_id)
    for key, value in surface_metrics(pred, subject.regions, subject.spacing).items():
      rows[key].append(value)
  return {k: (v if k == "subjects" else np.stack(v)) for k, v in rows.items()}


@dataclasses.dataclass
class CrossValResult:
  """``folds``: per fold the test subject ids and metrics ``(S_k, R)``; ``out_of_fold``: every
  cross-validated subject's metrics ``{"dice", "hd95", "msd"}: (S, R)``; ``ensemble``: the
  held-out subjects' metrics of the fold ensemble (None without held-out subjects)."""
  regions: tuple[str, ...]
  folds: list[dict]
  out_of_fold: dict
  ensemble: dict | None


def _score(method, subjects, probabilities) -> dict:
  rows = {"subjects": [], "dice": [], "hd95": [], "msd": []}
  for subject in subjects:
    m = surface_metrics(method.decide(probabilities(subject)), subject.regions, subject.spacing)
    rows["subjects"].append(subject.subject_id)
    for key, value in m.items():
      rows[key].append(value)
  return {k: (v if k == "subjects" else np.stack(v)) for k, v in rows.items()}


def cross_validate(config, workdir: str, *, progress: bool = True) -> CrossValResult:
  """Runs the protocol of the module docstring with ``config`` (a segmentation config with
  ``finetune.folds >= 2``) into ``workdir/fold_<k>``; writes ``crossval.json`` and
  ``crossval.md``."""
  folds = int(config.finetune.folds)
  subjects = datasets.load_subjects(config.data)
  held = datasets.split_subjects(subjects, num_val=0, num_test=int(config.data.num_test),
                                 seed=int(config.seed))
  method = finetune_lib.segmentation_method(config)  # the folds' (shared) method
  probabilities = _probabilities(method)
  fold_results, fold_variables = [], []
  for k, split in enumerate(kfold_splits(held["train"], folds=folds,
                                         num_val=int(config.data.num_val),
                                         seed=int(config.seed))):
    result = finetune_lib.finetune(config, os.path.join(workdir, f"fold_{k}"), splits=split,
                                   progress=progress)
    variables = result.tested_variables  # the fold's best validation weights
    fold_variables.append(variables)
    fold_results.append(_score(result.method, split["test"],
                               lambda s, v=variables: ensemble_probabilities(
                                   method, [v], s.image, predict_probabilities=probabilities)))
  out_of_fold = {key: np.concatenate([f[key] for f in fold_results]) for key in
                 ("dice", "hd95", "msd")}
  out_of_fold["subjects"] = sum((f["subjects"] for f in fold_results), [])
  ensemble = None
  if len(held["test"]):
    ensemble = _score(method, held["test"], lambda s: ensemble_probabilities(
        method, fold_variables, s.image, predict_probabilities=probabilities))
  out = CrossValResult(tuple(method.regions), fold_results, out_of_fold, ensemble)
  if jax.process_index() == 0:
    write_report(out, workdir)
  return out


def _jsonable(table: dict) -> dict:
  return {k: (v if k == "subjects" else np.where(np.isfinite(v), v, None).tolist())
          for k, v in table.items()}


def markdown(table: dict, regions, title: str) -> str:
  """``mean (std)`` over subjects per region of Dice, HD95 and MSD (nan skipped; a region
  with any inf distance shows inf)."""
  lines = [f"**{title}** ({len(table['subjects'])} subjects)", "",
           "| metric | " + " | ".join(regions) + " |", "|---" * (len(regions) + 1) + "|"]
  for key, name in (("dice", "Dice"), ("hd95", "HD95 (mm)"), ("msd", "MSD (mm)")):
    values = np.asarray(table[key], np.float64)
    cells = []
    for r in range(len(regions)):
      column = values[:, r][~np.isnan(values[:, r])]
      if not column.size:
        cells.append("n/a")
      elif np.isinf(column).any():
        cells.append(f"inf ({int(np.isinf(column).sum())} empty)")
      else:
        cells.append(f"{column.mean():.3f} ({column.std():.3f})")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_report(result: CrossValResult, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  data = {"regions": list(result.regions),
          "folds": [_jsonable(f) for f in result.folds],
          "out_of_fold": _jsonable(result.out_of_fold),
          "ensemble": None if result.ensemble is None else _jsonable(result.ensemble)}
  with open(os.path.join(workdir, "crossval.json"), "w") as f:
    json.dump(data, f, indent=1)
  parts = [markdown(result.out_of_fold, result.regions,
                    f"{len(result.folds)}-fold cross-validation, out-of-fold test subjects")]
  if result.ensemble is not None:
    parts.append(markdown(result.ensemble, result.regions,
                          f"ensemble of the {len(result.folds)} fold models, held-out subjects"))
  with open(os.path.join(workdir, "crossval.md"), "w") as f:
    f.write("\n\n".join(parts) + "\n")


def compare_runs(runs: dict[str, str], *, baseline: str, metric: str = "dice",
                 part: str = "out_of_fold", alpha: float = 0.05) -> str:
  """Markdown table comparing cross-validation runs (``{row name: workdir}``, each with a
  ``crossval.json`` of the same subjects): ``mean (std)`` of ``metric`` ("dice", "hd95",
  "msd") per region over the subjects of ``part`` ("out_of_fold" or "ensemble"), with paired
  two-sided t-tests against ``baseline`` (`jaxmed.evaluate.compare.significance_table`; pairs
  with a nan or inf value are dropped)."""
  if metric not in ("dice", "hd95", "msd"):
    raise ValueError(f"metric must be 'dice', 'hd95' or 'msd'; got {metric!r}")
  scores, regions, subjects = {}, None, None
  for name, workdir in runs.items():
    with open(os.path.join(workdir, "crossval.json")) as f:
      data = json.load(f)
    table = data[part]
    if table is None:
      raise ValueError(f"run {name!r} ({workdir}) has no {part!r} results")
    if subjects is not None and (table["subjects"] != subjects or data["regions"] != regions):
      raise ValueError(f"run {name!r} was tested on other subjects or regions than the first "
                       f"run; paired tests need the same ones")
    regions, subjects = data["regions"], table["subjects"]
    values = np.array(table[metric], dtype=np.float64)  # None (nan / inf) -> nan
    scores[name] = np.where(np.isfinite(values), values, np.nan)
  return compare.significance_table(scores, regions, baseline=baseline, alpha=alpha)

"""Segmentation fine-tuning from pre-trained weights (source_identification Sec. 5.4-5.5).

The pre-trained UNet's input layer (``input_conv``, e.g. T x 2 channels for source
identification) and output layer (``output_conv``, T reconstruction channels) are replaced by
freshly initialised layers for T input modalities and one output per region; every other layer
starts from the pre-trained weights. Loss: soft Dice + cross-entropy. Fine-tuning may use only
some training subjects' labels (``finetune.num_labeled`` or ``finetune.label_fraction``);
Dice is evaluated per region on held-out subjects, in 3D, one value per subject.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import flax
import jax
import numpy as np

from jaxmed.data import datasets
from jaxmed.methods.segmentation import SegmentationMethod
from jaxmed.metrics import dice
from jaxmed.train import checkpoint, trainer

REPLACED_LAYERS = ("input_conv", "output_conv")


def transfer_variables(pretrained: dict, fresh: dict, *, replace=REPLACED_LAYERS) -> dict:
  """``fresh`` variables with every layer except ``replace`` copied from ``pretrained``.

  Args:
    pretrained: Flax variables of the pre-trained model (``params``, maybe ``batch_stats``).
    fresh: freshly initialised variables of the target model.
    replace: top-level module names kept from ``fresh`` (new input / output layers).

  Raises:
    ValueError: listing every parameter missing from ``pretrained`` or of a different shape.
  """
  out, problems = {}, []
  for collection, fresh_tree in fresh.items():
    flat_fresh = flax.traverse_util.flatten_dict(fresh_tree, sep="/")
    flat_pre = flax.traverse_util.flatten_dict(pretrained.get(collection, {}), sep="/")
    merged = {}
    for name, value in flat_fresh.items():
      if name.split("/")[0] in replace:
        merged[name] = value
      elif name not in flat_pre:
        problems.append(f"{collection}/{name}: missing from the pre-trained weights")
      elif np.shape(flat_pre[name]) != np.shape(value):
        problems.append(f"{collection}/{name}: pre-trained shape {np.shape(flat_pre[name])} "
                        f"!= model shape {np.shape(value)}")
      else:
        merged[name] = np.asarray(flat_pre[name], dtype=np.asarray(value).dtype)
    out[collection] = flax.traverse_util.unflatten_dict(merged, sep="/")
  if problems:
    raise ValueError("cannot transfer pre-trained weights:\n  " + "\n  ".join(problems))
  return out


def predict_volume(method: SegmentationMethod, variables, image: np.ndarray, *,
                   batch_size: int = 32) -> np.ndarray:
  """Slice-by-slice prediction of a ``(D, H, W, C)`` volume -> ``(D, H, W, R)`` bool."""
  apply = method.jitted_predict
  depth = image.shape[0]
  pad = (-depth) % batch_size
  padded = np.concatenate([image, np.zeros((pad, *image.shape[1:]), image.dtype)])
  out = [np.asarray(apply(variables, padded[i:i + batch_size]))
         for i in range(0, len(padded), batch_size)]
  return np.concatenate(out)[:depth]


def evaluate_subjects(method: SegmentationMethod, variables, subjects, *,
                      batch_size: int = 32) -> dict:
  """3D Dice per subject and region, and the mean over subjects (nan-aware: a region absent
  from both prediction and ground truth is skipped).

  With several regions (BraTS WT/TC/ET) a last column ``All`` is the Dice of the regions taken
  together (source_identification Table 1: the region channels concatenated, not merged).

  Returns:
    ``{"subjects": [ids], "regions": names, "dice": (S, R[+1]) array, "mean": {name: float}}``.
  """
  names = region_columns(method.regions)
  rows = []
  for s in subjects:
    pred = predict_volume(method, variables, s.image, batch_size=batch_size)
    row = np.asarray(dice(pred[None], s.regions[None]))[0]
    if len(names) > len(method.regions):
      row = np.append(row, np.asarray(dice(pred.reshape(1, -1, 1),
                                           s.regions.reshape(1, -1, 1)))[0])
    rows.append(row)
  table = np.stack(rows)
  mean = _nanmean(table)
  return {"subjects": [s.subject_id for s in subjects], "regions": names, "dice": table,
          "mean": dict(zip(names, map(float, mean)))}


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


@dataclasses.dataclass
class FinetuneResult:
  """What `finetune` returns: test results of the tested weights, the final train state, the
  method, the labelled subjects' ids, and the early-stopping record (``best_step`` is the step
  whose weights were tested; ``stopped_early`` whether training ended before total_steps)."""
  test: dict
  state: object
  method: SegmentationMethod
  labeled_subjects: list
  best_step: int
  stopped_early: bool = False


class EarlyStopping:
  """Tracks the mean validation Dice (Sec. 5.5.3): remembers the best weights (a host copy) and
  asks to stop after ``patience`` evaluations without improvement (0: never stops), but never
  before step ``min_steps``: a segmentation network first sits on the all-background plateau
  (validation Dice 0) while its loss still falls, and stopping there tests an untrained model."""

  def __init__(self, patience: int, min_steps: int = 0):
    if patience < 0:
      raise ValueError(f"finetune.patience must be >= 0; got {patience}")
    if min_steps < 0:
      raise ValueError(f"finetune.min_steps must be >= 0; got {min_steps}")
    self.patience, self.min_steps = patience, min_steps
    self.best_score, self.best_step, self.best_variables = -np.inf, 0, None
    self.since_best = 0

  def update(self, step: int, score: float, variables) -> None:
    """Records an evaluation; ``score`` nan (no region present anywhere) counts as no gain."""
    if np.isfinite(score) and score > self.best_score:
      self.best_score, self.best_step, self.since_best = score, step, 0
      self.best_variables = jax.device_get(variables)
    else:
      self.since_best += 1

  def should_stop(self, step, metrics) -> bool:
    del metrics
    return bool(self.patience) and step >= self.min_steps and self.since_best >= self.patience


def finetune(config, workdir: str, *, pretrained: dict | None = None,
             splits: dict | None = None, progress: bool = True) -> FinetuneResult:
  """Fine-tunes (or, without pre-trained weights, trains from scratch) and tests.

  With validation subjects, the mean validation Dice is computed every ``config.eval_every``
  steps (and at the end); with ``finetune.patience > 0`` training stops after that many
  evaluations without improvement and the best validation weights are tested (early stopping,
  source_identification Sec. 5.5.3); otherwise the final weights are.

  Args:
    config: a segmentation config (``configs/finetune.py``).
    workdir: output folder; ``test_dice.json`` is written there.
    pretrained: pre-trained variables; default: loaded from ``config.finetune.init_from`` if set.
    splits: ``{"train", "val", "test"}`` subject lists (default: from ``config.data``).
  """
  splits = splits or datasets.load_splits(config.data)
  ft = config.finetune
  labeled = datasets.labeled_subset(splits["train"], num_labeled=int(ft.num_labeled),
                                    label_fraction=float(ft.label_fraction),
                                    seed=int(config.seed))
  arrays = datasets.slice_view(labeled, min_foreground=float(ft.min_foreground))
  if pretrained is None and ft.init_from:
    pretrained = checkpoint.load_variables(ft.init_from)
  method = SegmentationMethod(config)
  init = None if pretrained is None else (lambda fresh: transfer_variables(pretrained, fresh))
  patience = int(ft.get("patience", 0))
  if patience and not splits["val"]:
    raise ValueError("finetune.patience > 0 (early stopping) needs validation subjects; "
                     "set data.num_val > 0")
  early = EarlyStopping(patience, int(ft.get("min_steps", 0)))
  hooks = []
  if splits["val"]:
    def val_hook(step, state):
      result = evaluate_subjects(method, state.variables, splits["val"],
                                 batch_size=int(ft.eval_batch_size))
      per_region = [result["mean"][r] for r in method.regions]
      early.update(step, float(_nanmean(np.asarray(per_region))), state.variables)
      return {**{f"val/dice_{k}": v for k, v in result["mean"].items()},
              "val/best_step": early.best_step}
    hooks.append(val_hook)
  result = trainer.train(config, workdir, method=method, train_arrays=arrays,
                         init_variables=init, hooks=hooks,
                         stop=early.should_stop if patience else None, progress=progress)
  tested, best_step = result.state.variables, int(result.state.step)
  if patience and early.best_variables is not None:
    tested, best_step = early.best_variables, early.best_step
  test = evaluate_subjects(method, tested, splits["test"], batch_size=int(ft.eval_batch_size))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "test_dice.json"), "w") as f:
      json.dump({"subjects": test["subjects"], "regions": list(test["regions"]),
                 "dice": np.where(np.isnan(test["dice"]), None, test["dice"]).tolist(),
                 "mean": test["mean"], "tested_step": best_step,
                 "stopped_early": result.stopped_early,
                 "labeled_subjects": [s.subject_id for s in labeled]}, f, indent=1)
  return FinetuneResult(test=test, state=result.state, method=method,
                        labeled_subjects=[s.subject_id for s in labeled], best_step=best_step,
                        stopped_early=result.stopped_early)

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

  Returns:
    ``{"subjects": [ids], "dice": (S, R) array, "mean": {region: float}}``.
  """
  rows = []
  for s in subjects:
    pred = predict_volume(method, variables, s.image, batch_size=batch_size)
    rows.append(np.asarray(dice(pred[None], s.regions[None]))[0])
  table = np.stack(rows)
  mean = _nanmean(table)
  return {"subjects": [s.subject_id for s in subjects], "dice": table,
          "mean": dict(zip(method.regions, map(float, mean)))}


def _nanmean(table, reduce=np.nanmean):
  """Per-column nan-aware reduction; a column with no finite value (a region absent from every
  subject) gives nan without a warning."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return reduce(table, axis=0)


def dice_table(results: dict[str, dict]) -> str:
  """Markdown table of `evaluate_subjects` results: a row per run, mean (std) over subjects
  per region, and the mean over regions."""
  regions = list(next(iter(results.values()))["mean"])
  lines = ["| run | " + " | ".join(regions) + " | mean |", "|---" * (len(regions) + 2) + "|"]
  for name, result in results.items():
    mean, std = _nanmean(result["dice"]), _nanmean(result["dice"], np.nanstd)
    cells = [f"{m:.3f} ({s:.3f})" for m, s in zip(mean, std)]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {_nanmean(mean):.3f} |")
  return "\n".join(lines)


@dataclasses.dataclass
class FinetuneResult:
  test: dict
  state: object
  method: SegmentationMethod
  labeled_subjects: list


def finetune(config, workdir: str, *, pretrained: dict | None = None,
             splits: dict | None = None, progress: bool = True) -> FinetuneResult:
  """Fine-tunes (or, without pre-trained weights, trains from scratch) and tests.

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
  hooks = []
  if splits["val"]:
    def val_hook(step, state):
      del step
      result = evaluate_subjects(method, state.variables, splits["val"],
                                 batch_size=int(ft.eval_batch_size))
      return {f"val/dice_{k}": v for k, v in result["mean"].items()}
    hooks.append(val_hook)
  result = trainer.train(config, workdir, method=method, train_arrays=arrays,
                         init_variables=init, hooks=hooks, progress=progress)
  test = evaluate_subjects(method, result.state.variables, splits["test"],
                           batch_size=int(ft.eval_batch_size))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "test_dice.json"), "w") as f:
      json.dump({"subjects": test["subjects"], "regions": list(method.regions),
                 "dice": np.where(np.isnan(test["dice"]), None, test["dice"]).tolist(),
                 "mean": test["mean"],
                 "labeled_subjects": [s.subject_id for s in labeled]}, f, indent=1)
  return FinetuneResult(test=test, state=result.state, method=method,
                        labeled_subjects=[s.subject_id for s in labeled])

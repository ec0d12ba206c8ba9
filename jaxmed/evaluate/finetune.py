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

import jax
import numpy as np

from jaxmed.data import datasets
from jaxmed.evaluate import evaluators
from jaxmed.evaluate.evaluators import evaluate_subjects
from jaxmed.methods.segmentation import SegmentationMethod
from jaxmed.train import init as init_lib
from jaxmed.train import programs as programs_lib
from jaxmed.train import trainer

@dataclasses.dataclass
class FinetuneResult:
  """What `finetune` returns: test results of the tested weights, the final train state, the
  method, the labelled subjects' ids, and the early-stopping record (``best_step`` is the step
  whose weights were tested; ``stopped_early`` whether training ended before total_steps)."""
  test: dict | None
  state: object
  method: SegmentationMethod
  labeled_subjects: list
  best_step: int
  stopped_early: bool = False
  tested_variables: dict | None = None  # the weights that were tested (host arrays)


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


def segmentation_method(config) -> SegmentationMethod:
  """``config``'s `SegmentationMethod`: for a "segmentation" config the one its runs in this
  process share (`jaxmed.train.programs`: the rows of a table, the folds of a cross-validation
  fine-tune one config and so share compiled programs), else a new one."""
  if config.get("method") == SegmentationMethod.name:
    return programs_lib.shared_method(config)
  return SegmentationMethod(config)


def finetune(config, workdir: str, *, pretrained: dict | None = None,
             splits: dict | None = None, progress: bool = True) -> FinetuneResult:
  """Fine-tunes (or, without pre-trained weights, trains from scratch) and tests.

  With validation subjects, the mean validation Dice is computed every ``config.eval_every``
  steps (and at the end); with ``finetune.patience > 0`` training stops after that many
  evaluations without improvement and the best validation weights are tested (early stopping,
  source_identification Sec. 5.5.3); otherwise the final weights are.

  Args:
    config: a segmentation config (the shipped ``finetune``).
    workdir: output folder; ``test_dice.json`` is written there.
    pretrained: pre-trained variables; default: loaded from ``config.init.path`` if set. Either
      way they are transferred by ``config.init`` (``replace``: the new input and output
      layers, `jaxmed.train.init.transfer`).
    splits: ``{"train", "val", "test"}`` subject lists (default: from ``config.data``); with
      no test subjects nothing is tested (``FinetuneResult.test`` None; the caller scores
      ``tested_variables`` itself).
  """
  splits = splits or datasets.load_splits(config.data)
  ft = config.finetune
  labeled = datasets.labeled_subset(splits["train"], num_labeled=int(ft.num_labeled),
                                    label_fraction=float(ft.label_fraction),
                                    seed=int(config.seed))
  method = segmentation_method(config)
  init = None
  if pretrained is not None:
    init = init_lib.initializer(config.init, pretrained=pretrained)
  elif config.init.path:
    init = init_lib.initializer(config.init)
  patience = int(ft.get("patience", 0))
  if patience and not splits["val"]:
    raise ValueError("finetune.patience > 0 (early stopping) needs validation subjects; "
                     "set data.num_val > 0")
  early = EarlyStopping(patience, int(ft.get("min_steps", 0)))
  hooks = []
  if splits["val"]:
    # The "segmentation" evaluator on the validation subjects (Dice and HD95 per region);
    # early stopping follows its mean Dice over the regions.
    val = evaluators.make_evaluators(
        {"val": dict(type="segmentation", every=int(config.eval_every), split="val",
                     batch_size=int(ft.eval_batch_size))}, method=method, splits=splits)[0]

    def val_hook(step, state):
      metrics = val(step, state.variables)
      early.update(step, metrics["val/dice_mean"], state.variables)
      return {**metrics, "val/best_step": early.best_step}
    hooks.append(val_hook)
  result = trainer.train(config, workdir, method=method, subjects=labeled,
                         init_variables=init, hooks=hooks,
                         stop=early.should_stop if patience else None, progress=progress)
  tested, best_step = result.state.variables, int(result.state.step)
  if (patience or ft.get("test_best", False)) and early.best_variables is not None:
    tested, best_step = early.best_variables, early.best_step
  # The test subjects as the validation ones: slice-wise for a 2D network, sliding windows
  # over whole volumes for a 3D one (finetune.roi_size, overlap, window_mode, tta).
  test = None
  if len(splits["test"]):
    mode, predict = evaluators.segmentation_predictor(method)
    test = evaluate_subjects(method, tested, splits["test"],
                             batch_size=int(ft.eval_batch_size), mode=mode, predict=predict)
  if jax.process_index() == 0 and test is not None:
    with open(os.path.join(workdir, "test_dice.json"), "w") as f:
      json.dump({"subjects": test["subjects"], "regions": list(test["regions"]),
                 "dice": np.where(np.isnan(test["dice"]), None, test["dice"]).tolist(),
                 "mean": test["mean"], "tested_step": best_step,
                 "stopped_early": result.stopped_early,
                 "labeled_subjects": [s.subject_id for s in labeled]}, f, indent=1)
  return FinetuneResult(test=test, state=result.state, method=method,
                        labeled_subjects=[s.subject_id for s in labeled], best_step=best_step,
                        stopped_early=result.stopped_early,
                        tested_variables=jax.device_get(tested))

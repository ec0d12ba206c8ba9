"""Runs one experiment config: what ``jaxmed train`` does, callable from Python.

    from jaxmed import config, runner
    runner.run_config(config.load_config("si:size=small"), "runs/si")

A run is training plus, from the config, its starting weights (``config.init``:
`jaxmed.train.init.initializer`) and its evaluators (``config.evals``:
`jaxmed.evaluate.evaluators`). A segmentation config is the fine-tuning protocol
(`jaxmed.evaluate.finetune`: labelled subset, early stopping on validation Dice, test Dice;
with `finetune.folds > 1` the k-fold protocol of `jaxmed.evaluate.crossval`).
"""

from __future__ import annotations

import os


def run_config(config, workdir: str, *, progress: bool = True):
  """Runs ``config`` into ``workdir`` (its ``config.json`` written first); returns the train or
  fine-tune result."""
  # pylint: disable=g-import-not-at-top
  from jaxmed import methods
  from jaxmed.data import datasets
  from jaxmed.evaluate import evaluators as evaluators_lib
  from jaxmed.evaluate import finetune
  from jaxmed.train import init as init_lib
  from jaxmed.train import trainer
  # pylint: enable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  if config.method == "segmentation" and int(config.finetune.get("folds", 0)) > 1:
    from jaxmed.evaluate import crossval  # pylint: disable=g-import-not-at-top
    result = crossval.cross_validate(config, workdir, progress=progress)
    with open(os.path.join(workdir, "crossval.md")) as f:
      print(f.read())
    return result
  if config.method == "segmentation":
    result = finetune.finetune(config, workdir, progress=progress)
    print(evaluators_lib.dice_table({os.path.basename(os.path.normpath(workdir)): result.test}))
    return result
  method = methods.get_method(config)
  splits = datasets.load_splits(config.data)
  evaluators = evaluators_lib.make_evaluators(config.get("evals"), method=method, splits=splits)
  init = init_lib.initializer(config.init) if config.init.path else None
  return trainer.train(config, workdir, method=method, subjects=splits["train"],
                       init_variables=init, evaluators=evaluators, progress=progress)

"""Does 3D self-supervised pre-training help 3D segmentation? Scratch against pre-trained
fine-tuning under the cross-validation protocol of `jaxmed/configs/seg3d.py` (DAE Sec. 4), on
the embedded phantoms, with paired t-tests over subjects and seeds.

    python experiments/seg3d_pretraining.py --out runs/seg3d_pre                 # small, CPU
    python experiments/seg3d_pretraining.py --out runs/seg3d_pre --seeds 0 1 2 --full
    python experiments/seg3d_pretraining.py --out runs/seg3d_pre --model swin_unetr

1. Pre-training: restoration by in-painting (`jaxmed/configs/restoration.py`, a round-one
   method) of a 1-channel 3D network on crops where every modality of the phantoms is its own
   example (``data.per_modality``, as DAE pre-trains on 1-channel samples of any modality).
2. Fine-tuning: `seg3d` (tumour WT/TC/ET from 4 modalities), once from scratch and once from the
   pre-trained weights with the 1-channel input kernel tiled over the 4 modalities
   (``seg3d:input=tile``), with the same folds, held-out subjects and seeds.
3. Per seed, both runs' out-of-fold and ensemble tables (`crossval.md`); pooled over seeds, the
   mean (std) Dice / HD95 / MSD per region with paired t-tests of pre-trained against scratch
   over (seed, subject) pairs.

Writes ``<out>/report.md`` and the runs under ``<out>/{pretrain,scratch_s*,pretrained_s*}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from jaxmed.config import load_config
from jaxmed.evaluate.compare import SURFACE_METRICS, paired_differences, pool_subjects
from jaxmed.runner import run_config


def pretrain_config(seg, args):
  """The restoration (in-painting) config whose network matches ``seg``'s, 1 channel in."""
  c = load_config("restoration", {
      "seed": 100, "total_steps": args.pretrain_steps, "batch_size": 8, "log_every": 25,
      "data.view": "crop", "data.crop_size": seg.data.crop_size, "data.per_modality": True,
      "data.shape": seg.data.shape, "data.num_subjects": seg.data.num_subjects,
      "data.num_test": seg.data.num_test, "data.fg_fraction": 0.0,
      "optim.lr": 1e-3})
  if args.model == "swin_unetr":
    from jaxmed.config import set_model  # pylint: disable=g-import-not-at-top
    set_model(c, "swin_unetr", **seg.model.to_dict())
  else:
    c.model.features = seg.model.features
  return c


def seg_config(args, seed: int, pretrained: str | None):
  spec = "seg3d:" + ",".join(
      a for a in ("size=small" if not args.full else "", f"model={args.model}",
                  "input=tile" if pretrained else "") if a)
  overrides = {"seed": seed, "init.path": pretrained or ""}
  config = load_config(spec, overrides)
  if args.steps:  # shorter runs keep a proportional warm-up and evaluate at least twice
    config.optim.warmup_steps = min(config.optim.warmup_steps, args.steps // 10)
    config.eval_every = min(config.eval_every, max(1, args.steps // 2))
    config.total_steps = args.steps
  return config


def comparison(regions, scratch: list[dict], pretrained: list[dict]) -> str:
  """Pre-trained against scratch per metric and region, over (seed, subject) pairs of the
  seeds' out-of-fold tables (`jaxmed.evaluate.compare.paired_differences`)."""
  scores = {name: {key: pool_subjects(tables, key) for key, _ in SURFACE_METRICS}
            for name, tables in (("scratch", scratch), ("pre-trained", pretrained))}
  return paired_differences(regions, scores, baseline="scratch")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--model", default="unet", choices=("unet", "swin_unetr"))
  parser.add_argument("--pretrain-steps", type=int, default=300)
  parser.add_argument("--steps", type=int, default=0, help="fine-tuning steps (0: the config's)")
  parser.add_argument("--full", action="store_true", help="seg3d's full size, not size=small")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  start = time.time()
  seg = seg_config(args, 0, None)
  pre_dir = os.path.join(args.out, "pretrain")
  run_config(pretrain_config(seg, args), pre_dir, progress=False)
  results = {"scratch": [], "pretrained": []}
  sections = []
  for seed in args.seeds:
    for name, init in (("scratch", None), ("pretrained", pre_dir)):
      workdir = os.path.join(args.out, f"{name}_s{seed}")
      result = run_config(seg_config(args, seed, init), workdir, progress=False)
      results[name].append(result.out_of_fold)
      sections.append(f"### {name}, seed {seed}\n\n"
                      + open(os.path.join(workdir, "crossval.md")).read())
  regions = result.regions
  report = [f"# 3D segmentation: scratch vs pre-trained ({args.model})", "",
            f"seeds {args.seeds}, pre-training {args.pretrain_steps} steps, "
            f"{(time.time() - start) / 60:.1f} min", "",
            "Out-of-fold subjects pooled over seeds; paired t-tests over (seed, subject) pairs "
            "(pairs with an infinite distance on either side left out).", "",
            comparison(regions, results["scratch"], results["pretrained"]), "",
            *sections]
  with open(os.path.join(args.out, "report.md"), "w") as f:
    f.write("\n".join(report) + "\n")
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump({name: [{k: np.asarray(v).tolist() for k, v in t.items()} for t in tables]
               for name, tables in results.items()}, f)
  print("\n".join(report[:8]))


if __name__ == "__main__":
  main()

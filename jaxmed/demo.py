"""The main job: in-painting pre-training, few-label fine-tuning vs from scratch, on phantoms.

    jaxmed demo --workdir jaxmed_demo

1. generates multi-modal brain phantoms with tumours (`jaxmed.data.synthetic`) and splits them
   by subject into train / val / test;
2. pre-trains a 2D UNet by grid in-painting (source_identification Sec. 4.1) on every training
   subject's slices, without labels;
3. fine-tunes it for WT / TC / ET segmentation using the labels of a few training subjects
   (new input and output layers, Sec. 5.4), and trains the same network from scratch on the
   same labels;
4. prints 3D Dice per region on the held-out subjects for both, and writes ``report.md`` with
   PNGs of phantoms, in-painting inputs / reconstructions and segmentations.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from jaxmed.config import load_config
from jaxmed.data import datasets, synthetic
from jaxmed.evaluate import evaluators
from jaxmed.evaluate import finetune as finetune_lib
from jaxmed.train import trainer


def demo_configs(quick: bool = False):
  """``(pretrain_config, finetune_config)`` of the demo: the shipped ``restoration`` and
  ``finetune`` configs with the demo's overrides (``quick`` for smoke tests)."""
  shared = {
      "data.num_subjects": 8 if quick else 24, "data.num_val": 0,
      "data.num_test": 2 if quick else 8, "data.shape": (16, 32, 32) if quick else (40, 64, 64),
      "model.features": (4, 8) if quick else (12, 24, 48, 96), "batch_size": 8,
      "log_every": 3 if quick else 25, "checkpoint.every": 0,
      "optim.name": "adam", "optim.schedule": "cosine", "optim.warmup_steps": 2 if quick else 20,
      "optim.weight_decay": 0.0, "optim.grad_clip": 1.0}
  pre = load_config("restoration", {
      **shared, "total_steps": 6 if quick else 250, "optim.lr": 2e-3,
      "pretext.corruption": "inpaint", "pretext.grid": 8, "pretext.keep_prob": 0.7})
  ft = load_config("finetune", {
      **shared, "total_steps": 6 if quick else 420, "optim.lr": 5e-3,
      # The demo has no validation subjects: no early stopping, no elastic deformation.
      "eval_every": 0, "finetune.patience": 0, "data.augment.elastic_alpha": 0.0,
      "data.augment.rotation": 10.0, "data.augment.scale": (0.9, 1.1),
      "data.augment.affine_p": 0.3, "finetune.num_labeled": 2 if quick else 4})
  return pre, ft


def run_demo(workdir: str, *, quick: bool = False, progress: bool = True) -> dict:
  """Runs the demo into ``workdir``; returns ``{"pretrained": dice, "scratch": dice}``."""
  t0 = time.perf_counter()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  pre_cfg, ft_cfg = demo_configs(quick)
  _log(f"jaxmed demo on {jax.device_count()} {jax.default_backend()} device(s) -> {workdir}")

  t = time.perf_counter()
  splits = datasets.load_splits(pre_cfg.data)
  n = sum(len(v) for v in splits.values())
  _log(f"[1/4] {n} phantoms {tuple(pre_cfg.data.shape)} in {time.perf_counter() - t:.1f}s "
       f"(train {len(splits['train'])}, test {len(splits['test'])})")
  synthetic.save_montage(splits["train"], os.path.join(workdir, "phantoms.png"), num_subjects=3)

  t = time.perf_counter()
  unlabeled = datasets.slice_view(splits["train"],
                                  min_foreground=float(pre_cfg.data.min_foreground))
  pre = trainer.train(pre_cfg, os.path.join(workdir, "pretrain"), train_data=unlabeled,
                      progress=progress)
  _log(f"[2/4] in-painting pre-training: {pre_cfg.total_steps} steps on "
       f"{len(unlabeled['image'])} unlabeled slices, final loss {pre.last_metrics['loss']:.4f} "
       f"({time.perf_counter() - t:.0f}s)")
  _save_inpainting_figure(pre.method, pre.state.variables, splits["test"][0],
                          os.path.join(workdir, "inpainting.png"))

  results = {}
  for name, pretrained in (("pretrained", jax.device_get(pre.state.variables)),
                           ("scratch", None)):
    t = time.perf_counter()
    res = finetune_lib.finetune(ft_cfg, os.path.join(workdir, f"finetune_{name}"),
                                pretrained=pretrained, splits=splits, progress=progress)
    results[name] = res
    _log(f"[3/4] fine-tune ({name}) on {len(res.labeled_subjects)} labelled subjects: "
         f"{_fmt(res.test['mean'])} ({time.perf_counter() - t:.0f}s)")

  table = evaluators.dice_table({_RUN_NAMES[k]: v.test for k, v in results.items()})
  print("\nTest Dice (3D, mean over held-out subjects):\n" + table, flush=True)
  _save_segmentation_figure(results, splits["test"], os.path.join(workdir, "segmentation.png"))
  elapsed = time.perf_counter() - t0
  _write_report(workdir, pre_cfg, ft_cfg, splits, results, table, elapsed)
  _log(f"[4/4] report: {os.path.join(workdir, 'report.md')} (total {elapsed:.0f}s)")
  summary = {k: v.test["mean"] for k, v in results.items()}
  with open(os.path.join(workdir, "dice.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


_RUN_NAMES = {"pretrained": "in-painting pre-trained", "scratch": "from scratch"}


def _log(msg: str):
  print(msg, flush=True)


def _fmt(mean: dict) -> str:
  return ", ".join(f"{k} {v:.3f}" for k, v in mean.items())


def _save_inpainting_figure(method, variables, subject, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  depth = subject.image.shape[0]
  index = np.array([depth // 3, depth // 2, 2 * depth // 3])
  image = subject.image[index]
  corrupted, recon = jax.jit(method.reconstruct)(variables, {"image": image},
                                                 jax.random.PRNGKey(1))
  corrupted, recon = np.asarray(corrupted), np.asarray(recon)
  fig, axes = plt.subplots(len(index), 3, figsize=(7.5, 2.6 * len(index)))
  for r in range(len(index)):
    for c, (title, x) in enumerate((("input (masked)", corrupted), ("reconstruction", recon),
                                    ("original", image))):
      axes[r, c].imshow(x[r, ..., -1], cmap="gray", vmin=0, vmax=1.2)
      axes[r, c].set_axis_off()
      if r == 0:
        axes[r, c].set_title(f"{title} (FLAIR)")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _save_segmentation_figure(results, subjects, path, num_subjects=3):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  subjects = subjects[:num_subjects]
  columns = [("ground truth", None)] + [(k, v) for k, v in results.items()]
  fig, axes = plt.subplots(len(subjects), len(columns), figsize=(2.8 * len(columns),
                                                                  2.8 * len(subjects)),
                           squeeze=False)
  for r, s in enumerate(subjects):
    z = int(np.argmax(s.regions[..., 0].sum(axis=(1, 2))))
    for c, (name, res) in enumerate(columns):
      if res is None:
        regions = s.regions[z]
      else:
        regions = evaluators.predict_volume(res.method, res.state.variables, s.image[z:z + 1],
                                              batch_size=1)[0]
      ax = axes[r, c]
      ax.imshow(s.image[z, ..., 1], cmap="gray", vmin=0, vmax=1.2)
      overlay = np.zeros((*regions.shape[:2], 4))
      for ch, colour in enumerate(((0.1, 0.8, 0.2), (0.9, 0.1, 0.1), (1.0, 0.9, 0.0))):
        overlay[regions[..., ch]] = (*colour, 0.55)
      ax.imshow(overlay)
      ax.set_axis_off()
      if r == 0:
        ax.set_title(name)
  fig.suptitle("WT green, TC red, ET yellow (T1c)")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _write_report(workdir, pre_cfg, ft_cfg, splits, results, table, elapsed):
  labeled = results["pretrained"].labeled_subjects
  text = f"""# jaxmed demo report

Backend: {jax.default_backend()} x {jax.device_count()}; total time {elapsed:.0f} s.

## Data
{sum(len(v) for v in splits.values())} synthetic phantoms of shape {tuple(pre_cfg.data.shape)}
(T1, T1c, T2, FLAIR; BraTS-like tumour labels), split by subject: {len(splits['train'])} train,
{len(splits['val'])} validation, {len(splits['test'])} test.

![phantoms](phantoms.png)

## Pre-training: grid in-painting
UNet features {tuple(pre_cfg.model.features)}, {pre_cfg.total_steps} steps, batch
{pre_cfg.batch_size}, grid {pre_cfg.pretext.grid}, keep probability {pre_cfg.pretext.keep_prob},
L1 + L2 loss, on the axial slices of all {len(splits['train'])} training subjects (no labels).

![in-painting](inpainting.png)

## Fine-tuning with {len(labeled)} labelled subjects
{ft_cfg.total_steps} steps, soft Dice + BCE, augmentation (flips, rotation, scaling); labelled
subjects: {', '.join(labeled)}. The pre-trained run replaces the input and output layers and
keeps every other layer; the scratch run starts from He initialisation.

{table}

Dice per region on the held-out subjects in 3D, mean (std) over subjects.

![segmentation](segmentation.png)
"""
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(text)

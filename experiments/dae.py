"""Disruptive Autoencoders: a whole Swin-UNETR pre-trained to undo noise, down-sampling and
local masking (with the cross-modal contrastive loss), its SimMIM ("MAE") baseline, and 3D
segmentation fine-tuning: Fig. 2 and Tables 3, 5, 6, 7 (and 8-10 behind ``--sweep``) of
``../shared/papers/disruptive_autoencoders.md`` at small scale, on the phantoms.

    python experiments/dae.py --out runs/dae                           # default: <= 30 min, 2 CPUs
    python experiments/dae.py --out runs/dae --seeds 0 1 2 --pretrain-steps 1000 \
        --finetune-steps 600 --subjects 40 --num-test 10 --set model.feature_size=24   # larger
    python experiments/dae.py --out runs/dae --sweep                  # + Tables 8-10
    python experiments/dae.py --out runs/dae --data-root /data/BraTS2021 --shape 128 128 128 \
        --set data.crop_size=[96,96,96] --finetune-set data.crop_size=[96,96,96]  # NIfTI folder

Pre-training: the shipped ``dae`` / ``simmim`` configs at ``size=small`` (`jaxmed/configs/
dae.py`: Swin-UNETR feature 12, depths (2, 2, 2, 2), window 4, 32^3 single-modality crops,
batch 8, AdamW 4e-4, wd 1e-5, 5% warm-up then cosine, clip 1.0), ``--pretrain-steps`` each, on
``--pretrain-subjects`` phantoms from ``--pretrain-seed`` (every modality its own 1-channel
example, tagged for CMCL), never the fine-tuning subjects. The DAE rows differ only in
``pretext.disruption`` (noise: sigma = 0.1 a variance; down-sampling: epsilon = 4, linear; local
masking: 60% of the patch-embedding channels); all keep CMCL (alpha 0.05, t 0.07) but the
Table 6 "w/o CMCL" row. "MAE" is SimMIM on the same network (8^3 mask cubes at 0.6, L1 on
masked voxels, the skip path fed the masked image). ``--swin-ssl`` adds the Swin-UNETR
self-supervised recipe (rotation + contrastive + in-painting) as a Table 3 row, encoder-only
transfer.

Fine-tuning (`jaxmed/configs/seg3d.py` ``model=swin_unetr,size=small``, its encoder fields set
to the pre-training network's): ``--subjects`` phantoms from ``--finetune-seed``, one seeded
split into ``--num-test`` test, ``--num-val`` validation and the rest training subjects (the
same for every row and seed; validation never tests); ``--finetune-steps`` of batch
``--finetune-batch`` on 32^3 crops (a third on labelled voxels), validation Dice every
``--eval-every`` steps, the best validation weights tested (sliding windows, overlap 0.5) on the
test subjects: Dice, HD95 and the mean symmetric surface distance per class
(`jaxmed.evaluate.crossval.surface_scores`). Tasks: "tissues", the FeTA-like 8-class tissue map
of the phantoms (``pathology=brain_tissues``: scalp, skull, CSF, GM, WM, ventricles, lesion and
background; T1 only, the 1-channel pre-trained input layer kept) and "tumour" (WT / TC / ET from
the 4 modalities, the 1-channel input kernels tiled over them). Every pre-trained row transfers
encoder and decoder (as the reference) but the output layer. ``--fractions`` of the training
subjects keep their labels (a seeded subset per seed, the same for every row). Comparisons are
paired t-tests over (seed, test subject) pairs against scratch.

1. Fig. 2: reconstructions of held-out crops (32^3 centred on each test subject's tumour, every
   modality) by each disruption's DAE and by MAE: PSNR, SSIM (data range the crop's max - min)
   and sharpness (the mean 3D Sobel magnitude of the output over the target's, 1 = as sharp,
   below 1 blurrier), also of the disrupted input; MAE also with its visible voxels pasted
   back; paired t-tests against MAE; a montage (``fig2_reconstructions.png``).
2. Table 5: fine-tuning on the tissue task at ``--ablation-fraction`` from scratch, noise,
   down-sampling, MAE, local masking and all three (DAE): mean Dice / HD95 / MSD over classes,
   with the pre-training's final L1 (local masking alone sees the clean image: through the
   full-resolution skip it is close to an identity task, watch its L1).
3. Table 6: DAE with and without CMCL, the same protocol.
4. Table 3: scratch / MAE / DAE (/ Swin-SSL) at every fraction on every ``--targets`` task: mean
   Dice per fraction (the paper's layout), then Dice, HD95 and MSD per class with paired
   t-tests.
5. Table 7: linear CKA per Swin stage (``hidden_states_0..4``) between the pre-trained and the
   fine-tuned encoder (the Table 5 runs), on clean test volumes of the tissue task (32^3 crops
   on a half-overlapping grid; examples = spatial tokens, subsampled to ``--cka-tokens``;
   features = channels), for MAE and DAE, and for scratch (its initialisation against its
   fine-tuned weights) as a reference.
6. Tables 8-10 (``--sweep``, off by default: ten more pre-training runs): sigma, epsilon and
   the masking ratio from the dae config's ``get_sweep``, each disruption alone, pre-trained
   for ``--sweep-steps`` (default half of ``--pretrain-steps``) and fine-tuned as Table 5.

The default size (ONE seed; 64 pre-training steps of 8 crops, 60 fine-tuning steps of 2; 30
phantoms of 32 x 48 x 48 split 18 test / 2 validation / 10 training; 6 pre-trainings, 22
fine-tunings) is sized for 30 minutes on 2 quiet CPU cores: with 70 pre-training steps it took
30 min 39 s (measured; pre-trainings 113-156 s each, fine-tunings 36-41 s, the first of each
task ~95 s with compilation), and 64 steps and the reused test predictor take about a minute
and a half off that. Its effects are small and noisy (the paper's are too); scale up with
``--seeds``, the step counts and ``--set``. Fine-tuning runs keep their tested weights in
memory only (their final checkpoints are deleted); the pre-training runs keep theirs
(``--config.init.path`` of a ``seg3d`` run can load them).
Writes ``<out>/report.md``, ``fig2_reconstructions.png``, ``table7_cka.png`` and
``results.json``; the runs under ``<out>/runs``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import time
import warnings

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from jaxmed import metrics
from jaxmed.config import (apply_overrides, apply_present_overrides, has_field, load_config,
                           parse_overrides, with_total_steps)
from jaxmed.configs.dae import get_sweep
from jaxmed.data import datasets, views
from jaxmed.evaluate import crossval, evaluators
from jaxmed.evaluate import finetune as finetune_lib
from jaxmed.evaluate.compare import (SURFACE_METRICS, format_mean_std, format_p,
                                     paired_differences, paired_p_values, pool_subjects)
from jaxmed.evaluate.sliding_window import window_starts
from jaxmed.losses import sobel_magnitude
from jaxmed.methods._swin_pretrain import DERIVED_MODEL_FIELDS, STAGES
from jaxmed.methods.segmentation import SegmentationMethod
from jaxmed.train import trainer

# Pre-training runs: key -> (config spec, row name).
PRETRAIN = {
    "noise": ("dae:disruption=noise,size=small", "Noise"),
    "downsample": ("dae:disruption=downsample,size=small", "Downsampling"),
    "mask": ("dae:disruption=mask,size=small", "Local masking"),
    "all": ("dae:size=small", "DAE"),
    "all_nocmcl": ("dae:cmcl=off,size=small", "DAE w/o CMCL"),
    "mae": ("simmim:size=small", "MAE"),
    "swin_ssl": ("swin_ssl:size=small", "Swin-SSL"),
}
DISRUPTIONS = ("noise", "downsample", "mask")
# The loss terms a pre-training run logs (DAE, SimMIM, Swin-SSL).
PRETRAIN_TERMS = ("l1", "cmcl", "cmcl_paired", "l1_masked", "rotation", "contrastive",
                  "inpaint")
SCRATCH = "Scratch"
TASKS = ("tissues", "tumour")
# The task of Tables 5-7 (and 8-10): 1 channel, so that the fine-tuned encoder reads what the
# pre-trained one does (Table 7).
ABLATION_TASK = "tissues"
# Table 5's rows in the paper's order (keys of PRETRAIN, None = scratch).
TABLE5 = (None, "noise", "downsample", "mae", "mask", "all")
TABLE6 = (None, "all_nocmcl", "all")
TABLE3 = (None, "mae", "all")
FIG2 = ("noise", "downsample", "mask", "all", "mae")
MAE_PASTED = "MAE (visible pasted)"
# Tables 8-10: the get_sweep field of each disruption and the table it fills.
SWEEP_TABLES = {"pretext.noise_variance": "Table 8: noise variance sigma",
                "pretext.factor": "Table 9: down-sampling factor epsilon",
                "pretext.mask_ratio": "Table 10: local masking ratio"}
# swin_ssl's encoder field names for the Swin-UNETR's (`swin_ssl.swin_unetr_fields` reversed).
SWIN_SSL_NAMES = {"feature_size": "embed_dim", "dropout_path_rate": "drop_path_rate"}


def swin_ssl_available() -> bool:
  """Whether the Swin-UNETR self-supervised method (and its config) can be imported."""
  try:
    importlib.import_module("jaxmed.methods.swin_ssl")
    importlib.import_module("jaxmed.configs.swin_ssl")
    return True
  except ImportError:
    return False


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="runs/dae")
  p.add_argument("--data-root", default="",
                 help="a BraTS-layout NIfTI folder instead of phantoms, for pre-training (every "
                      "non-test subject) and the tumour task; the tissue task stays on phantoms "
                      "unless --tissue-root is given")
  p.add_argument("--tissue-root", default="",
                 help="a FeTA-layout NIfTI folder (pathology 'tissues') for the tissue task")
  p.add_argument("--tissue-modality", default="t2", help="the --tissue-root image's name")
  p.add_argument("--shape", type=int, nargs=3, default=(32, 48, 48), metavar=("D", "H", "W"),
                 help="phantom shape (pre-training and fine-tuning)")
  p.add_argument("--pretrain-subjects", type=int, default=8)
  p.add_argument("--pretrain-seed", type=int, default=1000)
  p.add_argument("--subjects", type=int, default=30, help="fine-tuning pool")
  p.add_argument("--finetune-seed", type=int, default=5000)
  p.add_argument("--num-test", type=int, default=18)
  p.add_argument("--num-val", type=int, default=2)
  p.add_argument("--seeds", type=int, nargs="+", default=(0,))
  p.add_argument("--pretrain-steps", type=int, default=64)
  p.add_argument("--finetune-steps", type=int, default=60)
  p.add_argument("--finetune-batch", type=int, default=2)
  p.add_argument("--eval-every", type=int, default=0,
                 help="validation Dice every this many fine-tuning steps (0: a quarter of them)")
  p.add_argument("--targets", nargs="+", default=TASKS, choices=TASKS, help="Table 3's tasks")
  p.add_argument("--fractions", type=float, nargs="+", default=(1.0, 0.5, 0.2),
                 help="labelled shares of the training subjects (Table 3)")
  p.add_argument("--ablation-fraction", type=float, default=1.0,
                 help="labelled share of the tissue task in Tables 5-7 (and 8-10)")
  p.add_argument("--disruptions", nargs="*", default=DISRUPTIONS, choices=DISRUPTIONS,
                 help="Table 5's single-disruption rows")
  p.add_argument("--cka-tokens", type=int, default=4096)
  p.add_argument("--swin-ssl", action="store_true",
                 help="a Swin-UNETR self-supervised row in Table 3 (encoder-only transfer)")
  p.add_argument("--sweep", action="store_true", help="Tables 8-10 (ten more pre-trainings)")
  p.add_argument("--sweep-steps", type=int, default=0,
                 help="pre-training steps of the sweep's runs (0: half of --pretrain-steps)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="an override for every pre-training config with that field (the "
                      "fine-tuning network takes the model fields), e.g. model.feature_size=24")
  p.add_argument("--finetune-set", action="append", default=[], metavar="FIELD=VALUE",
                 help="an override for every fine-tuning config, e.g. optim.lr=1e-3")
  args = p.parse_args(argv)
  for flag in ("pretrain_steps", "finetune_steps", "finetune_batch", "cka_tokens",
               "pretrain_subjects"):
    if getattr(args, flag) < 1:
      p.error(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}")
  for flag in ("eval_every", "sweep_steps"):
    if getattr(args, flag) < 0:
      p.error(f"--{flag.replace('_', '-')} must be >= 0; got {getattr(args, flag)}")
  for fraction in (*args.fractions, args.ablation_fraction):
    if not 0.0 < fraction <= 1.0:
      p.error(f"--fractions / --ablation-fraction must be in (0, 1]; got {fraction}")
  if args.num_test < 2:
    p.error(f"--num-test must be >= 2 (paired t-tests over test subjects); got {args.num_test}")
  if args.num_val < 1:
    p.error(f"--num-val must be >= 1 (the best validation weights are tested); got "
            f"{args.num_val}")
  if not args.data_root and args.subjects - args.num_test - args.num_val < 1:
    p.error(f"--subjects {args.subjects} leaves no training subject after --num-test "
            f"{args.num_test} and --num-val {args.num_val}")
  if args.swin_ssl and not swin_ssl_available():
    p.error("--swin-ssl: jaxmed.methods.swin_ssl is not importable here")
  try:
    check_overrides(args)
  except ValueError as e:
    p.error(str(e))
  return args


# --- Configs and data ------------------------------------------------------------------------

def run_overrides(seed: int) -> dict:
  """What every run of this script sets: its seed, no TensorBoard, no periodic checkpoints."""
  return {"seed": seed, "tensorboard": False, "checkpoint.every": 0,
          "checkpoint.async_save": False}


def pretrain_config(args, key: str, seed: int, extra: dict | None = None,
                    steps: int | None = None):
  """The config of pre-training run ``key`` (`PRETRAIN`) for ``seed``: the shipped small config,
  the pre-training data, ``extra`` (a sweep point) and ``--set``; swin_ssl takes the DAE
  network's encoder fields."""
  data = {"data.num_val": 0, "data.num_test": 0, "data.shape": tuple(args.shape)}
  if args.data_root:
    data.update({"data.root": args.data_root, "data.num_test": args.num_test,
                 "data.seed": args.finetune_seed})
  else:
    data.update({"data.num_subjects": args.pretrain_subjects, "data.seed": args.pretrain_seed})
  config = load_config(PRETRAIN[key][0], {**run_overrides(seed), **data, **(extra or {})})
  user = parse_overrides(args.set)
  if key == "swin_ssl":
    encoder = pretrain_config(args, "all", seed).model
    for field, value in encoder.items():
      name = SWIN_SSL_NAMES.get(field, field)
      if field != "name" and name in config.model:
        config.model[name] = value
    user = {f: v for f, v in user.items() if not f.startswith("model.")}
  config = apply_present_overrides(config, user)
  return with_total_steps(config, steps or args.pretrain_steps, log_points=20)


def check_overrides(args):
  """Raises unless every ``--set`` field is in some pre-training config and every
  ``--finetune-set`` field in the fine-tuning config."""
  configs = [load_config(PRETRAIN[k][0]) for k in ("all", "mae")]
  for field in parse_overrides(args.set):
    if not any(has_field(c, field) for c in configs):
      raise ValueError(f"--set {field}: no pre-training config has this field")
  seg = load_config("seg3d:model=swin_unetr,size=small")
  for field in parse_overrides(args.finetune_set):
    if not has_field(seg, field):
      raise ValueError(f"--finetune-set {field}: the fine-tuning config has no such field")


def finetune_config(args, task: str, fraction: float, seed: int, part: str = "both"):
  """The seg3d config of one fine-tuning run: Swin-UNETR with the pre-training network's
  fields, the task's data, one split (no folds), ``fraction`` of the labels."""
  spec = f"seg3d:model=swin_unetr,size=small,target={task},input=tile,part={part}"
  data = {"data.shape": tuple(args.shape), "data.num_subjects": args.subjects,
          "data.seed": args.finetune_seed, "data.num_val": args.num_val,
          "data.num_test": args.num_test}
  root = args.tissue_root if task == "tissues" else args.data_root
  if root:
    data["data.root"] = root
    if task == "tissues":
      data.update({"data.pathology": "tissues", "data.modalities": (args.tissue_modality,)})
  config = load_config(spec, {**run_overrides(seed), **data, "batch_size": args.finetune_batch,
                              "finetune.folds": 0, "finetune.label_fraction": fraction})
  for field, value in pretrain_config(args, "all", seed).model.items():
    if field not in DERIVED_MODEL_FIELDS and field in config.model:
      config.model[field] = value
  config = apply_overrides(config, parse_overrides(args.finetune_set))
  config = with_total_steps(config, args.finetune_steps, log_points=10)
  config.eval_every = args.eval_every or max(1, args.finetune_steps // 4)
  return config


def tumour_crops(subjects, crop: int) -> np.ndarray:
  """``(N * C, crop, crop, crop, 1)``: every modality of every subject, cropped around its
  label's centroid (the volume's centre without one; clipped, zero-padded where smaller)."""
  out = []
  for s in subjects:
    image = np.asarray(s.image)
    label = np.asarray(s.label) if s.label is not None else None
    centre = (np.round(np.argwhere(label > 0).mean(axis=0)).astype(int)
              if label is not None and np.any(label > 0) else np.asarray(image.shape[:3]) // 2)
    origin = views.crop_origins(centre, image.shape[:3], (crop,) * 3)
    volume = views.extract_crop(image, origin, (crop,) * 3)
    out += [volume[..., c:c + 1] for c in range(image.shape[-1])]
  return np.stack(out).astype(np.float32)


def grid_crops(subjects, crop: int) -> np.ndarray:
  """``(N * W, crop, crop, crop, C)``: the half-overlapping sliding-window crops of every
  subject's volume (zero-padded where smaller than the crop)."""
  out = []
  for s in subjects:
    image = np.asarray(s.image)
    size = np.maximum(image.shape[:3], crop)
    for origin in window_starts(size, (crop,) * 3, (0.5,) * 3):
      out.append(views.extract_crop(image, origin, (crop,) * 3))
  return np.stack(out).astype(np.float32)


# --- Fig. 2: reconstructions -----------------------------------------------------------------

def reconstruction_scores(method, variables, crops, seed: int, batch: int = 4) -> dict:
  """PSNR, SSIM and sharpness of the method's reconstruction of each crop and of its
  disrupted input (`reconstruct`; the keys of batch ``b`` are ``fold_in(key(seed), b)``, the
  same for every method); for SimMIM also with the visible voxels pasted back."""
  rec = jax.jit(method.reconstruct)
  pad = (-len(crops)) % batch
  padded = np.concatenate([crops, np.zeros((pad, *crops.shape[1:]), crops.dtype)])
  inputs, preds, pasted = [], [], []
  for b in range(0, len(padded), batch):
    key = jax.random.fold_in(jax.random.key(seed), b // batch)
    x, pred = rec(variables, {"image": padded[b:b + batch]}, key)
    inputs.append(np.asarray(x)), preds.append(np.asarray(pred))
    if hasattr(method, "masked_input"):
      _, voxels, _ = method.masked_input(jax.random.split(key)[0], padded[b:b + batch])
      voxels = np.asarray(voxels)[..., None]
      pasted.append(np.where(voxels > 0, np.asarray(pred), padded[b:b + batch]))
  n = len(crops)
  x, pred = np.concatenate(inputs)[:n], np.concatenate(preds)[:n]
  out = {"output": image_scores(pred, crops), "input": image_scores(x, crops),
         "example": {"input": x[0], "output": pred[0]}}
  if pasted:
    out["pasted"] = image_scores(np.concatenate(pasted)[:n], crops)
  return out


def image_scores(pred, target) -> dict:
  """``{"psnr", "ssim", "sharpness"}``: ``(N,)`` lists; data range the target's max - min;
  sharpness the mean Sobel magnitude of ``pred`` over that of ``target``."""
  data_range = (target.max(axis=(1, 2, 3, 4)) - target.min(axis=(1, 2, 3, 4))).astype(np.float32)
  edges = lambda v: np.asarray(sobel_magnitude(v)).mean(axis=(1, 2, 3, 4))
  return {"psnr": np.asarray(metrics.psnr(pred, target, data_range=data_range)).tolist(),
          "ssim": np.asarray(metrics.ssim(pred, target, data_range=data_range)).tolist(),
          "sharpness": (edges(pred) / edges(target)).tolist()}


def pooled(runs: list[dict], key: str) -> np.ndarray:
  return np.concatenate([np.asarray(r[key], np.float64) for r in runs])


def fig2_table(recon: dict, baseline: str = "MAE") -> str:
  lines = ["| Method | PSNR (dB) | SSIM | sharpness | input PSNR (dB) | input SSIM | "
           "p PSNR vs MAE | p SSIM vs MAE |", "|:---|" + "---:|" * 7]
  for name, runs in recon.items():
    out = [r["output"] for r in runs]
    inp = [r["input"] for r in runs]
    cells = [format_mean_std(pooled(out, "psnr"), 2), format_mean_std(pooled(out, "ssim")),
             format_mean_std(pooled(out, "sharpness"))]
    if np.all(np.isinf(pooled(inp, "psnr"))):  # local masking: the input is the clean crop
      cells += ["clean", "clean"]
    else:
      cells += [format_mean_std(pooled(inp, "psnr"), 2), format_mean_std(pooled(inp, "ssim"))]
    for k in ("psnr", "ssim"):
      if name == baseline:
        cells.append("-")
      else:
        base = pooled([r["output"] for r in recon[baseline]], k)
        cells.append(format_p(paired_p_values(pooled(out, k)[:, None], base[:, None])[0]))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_reconstructions(target, examples: dict, path: str):
  """Fig. 2 analogue: the middle axial slice of one crop: the clean target, and per method its
  disrupted input (top) and reconstruction (bottom)."""
  fig, axes = plt.subplots(2, len(examples) + 1, figsize=(2.0 * (len(examples) + 1), 4.2))
  lo, hi = np.percentile(target, (1, 99))
  mid = target.shape[0] // 2
  axes[0, 0].imshow(target[mid, ..., 0], cmap="gray", vmin=lo, vmax=hi)
  axes[0, 0].set_title("clean target", fontsize=7)
  for col, (name, ex) in enumerate(examples.items(), start=1):
    for row, (part, label) in enumerate((("input", "input"), ("output", "reconstruction"))):
      axes[row, col].imshow(ex[part][mid, ..., 0], cmap="gray", vmin=lo, vmax=hi)
      axes[row, col].set_title(f"{name}: {label}", fontsize=7)
  for ax in axes.ravel():
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# --- Fine-tuning -----------------------------------------------------------------------------

def class_mean(table: dict, key: str) -> np.ndarray:
  """``(S,)``: per subject the mean over classes of its finite ``key`` values (nan if none)."""
  values = np.asarray(table[key], np.float64)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # a subject with no finite value: nan
    return np.nanmean(np.where(np.isfinite(values), values, np.nan), axis=1)


def summary_table(rows: dict[str, list[dict]], baseline: str = SCRATCH,
                  pretrain_loss: dict | None = None) -> str:
  """A row per method: the mean over classes of Dice, HD95 and MSD, ``mean (std)`` over
  (seed, test subject), the Dice difference from ``baseline`` and its paired t-test p, the
  count of infinite distances (an empty prediction of a present class), and the pre-training's
  final loss where given."""
  header = "| Method | Dice | Δ Dice | p | HD95 (mm) | MSD (mm) | inf distances |"
  lines = [header + (" pre-training loss |" if pretrain_loss else ""),
           "|:---|" + "---:|" * (6 + bool(pretrain_loss))]
  per = {name: {k: np.concatenate([class_mean(t, k) for t in tables]) for k in
                ("dice", "hd95", "msd")} for name, tables in rows.items()}
  # Paired across rows: every row's tables list the same subjects (one split for all runs).
  for name, tables in rows.items():
    dice = per[name]["dice"]
    if name == baseline:
      diff, p = "-", "-"
    else:
      base = per[baseline]["dice"]
      diff = f"{np.nanmean(dice - base):+.3f}"
      p = format_p(paired_p_values(dice[:, None], base[:, None])[0])
    infs = sum(int(np.isinf(np.asarray(t[k], np.float64)).sum()) for t in tables
               for k in ("hd95", "msd"))
    cells = [format_mean_std(dice), diff, p, format_mean_std(per[name]["hd95"], 2),
             format_mean_std(per[name]["msd"], 2), str(infs)]
    if pretrain_loss:
      cells.append(pretrain_loss.get(name, "-"))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def class_tables(regions, rows: dict[str, list[dict]], baseline: str = SCRATCH) -> str:
  """Dice, HD95 and MSD per class of every row against ``baseline``, over (seed, subject)."""
  scores = {name: {k: pool_subjects(tables, k) for k, _ in SURFACE_METRICS}
            for name, tables in rows.items()}
  return paired_differences(regions, scores, baseline=baseline)


# --- Table 7: CKA ----------------------------------------------------------------------------

def stage_tokens(features_fn, variables, crops, batch: int = 4) -> dict[str, np.ndarray]:
  """``{stage: (N * tokens, channels)}`` of the Swin stages of ``crops`` ``(N, *S, 1)``."""
  pad = (-len(crops)) % batch
  padded = np.concatenate([crops, np.zeros((pad, *crops.shape[1:]), crops.dtype)])
  parts = {k: [] for k in STAGES}
  for b in range(0, len(padded), batch):
    feats = features_fn(variables, padded[b:b + batch])
    for k in STAGES:
      parts[k].append(np.asarray(feats[k]))
  out = {}
  for k in STAGES:
    f = np.concatenate(parts[k])[:len(crops)]
    out[k] = f.reshape(-1, f.shape[-1])
  return out


def cka_per_stage(features_fn, before, after, crops, *, tokens: int, seed: int) -> dict:
  """``{stage: CKA}`` between the stage tokens of two encoders (variables of one Swin-UNETR
  layout) on ``crops``, the same ``tokens`` examples (a seeded subset) for both."""
  a = stage_tokens(features_fn, before, crops)
  b = stage_tokens(features_fn, after, crops)
  rng = np.random.default_rng(seed)
  out = {}
  for k in STAGES:
    n = len(a[k])
    index = np.sort(rng.choice(n, size=min(tokens, n), replace=False))
    out[k] = float(metrics.linear_cka(a[k][index], b[k][index]))
  return out


def with_encoder(template: dict, variables: dict) -> dict:
  """``template`` (a 1-channel Swin-UNETR's variables) with ``variables``' encoder
  (``params/swinViT``): the stage features depend on nothing else."""
  return {**template, "params": {**template["params"], "swinViT": variables["params"]["swinViT"]}}


def scratch_init(config) -> dict:
  """The seeded initialisation a scratch fine-tuning run starts from (the trainer's key)."""
  method = SegmentationMethod(config)
  init_key, _ = jax.random.split(jax.random.PRNGKey(int(config.seed)))
  image = np.zeros((1, *config.data.crop_size, len(config.data.modalities)), np.float32)
  return jax.device_get(trainer.jit_init(method.init)(init_key, {"image": image}))


def plot_cka(cka: dict, path: str):
  fig, ax = plt.subplots(figsize=(4.8, 3.2))
  for name, per_seed in cka.items():
    ax.plot(range(1, len(STAGES) + 1), [np.mean([s[k] for s in per_seed]) for k in STAGES],
            marker="o", label=name)
  ax.set_xticks(range(1, len(STAGES) + 1))
  ax.set_xlabel("Swin stage (hidden_states_0..4)")
  ax.set_ylabel("linear CKA, pre-trained vs fine-tuned")
  ax.set_title("Table 7 analogue", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# --- Runs ----------------------------------------------------------------------------------

def row_name(key) -> str:
  """A table row's name: scratch (None), a `PRETRAIN` key's, or a sweep run's tag."""
  return SCRATCH if key is None else PRETRAIN.get(key, (None, key))[1]


def encoder_source(run) -> dict:
  """A pre-training run's variables in the plain Swin-UNETR layout (SimMIM's mask token left
  out; Swin-SSL's heads and decoder stay, for the encoder-only transfer to drop)."""
  method = run["method"]
  if hasattr(method, "swin_unetr_variables"):
    return method.swin_unetr_variables(run["variables"])
  return run["variables"]


class Study:
  """The data and runs of one invocation: every pre-training and fine-tuning run is made once
  and looked up by its row (pre-training: ``(tag, seed)``, and by config, so that a sweep point
  equal to a table's run is not trained again; fine-tuning: ``(task, tag, fraction, seed)``)."""

  def __init__(self, args):
    self.args, self.lines, self.start = args, [], time.perf_counter()
    self.runs_dir = os.path.join(args.out, "runs")
    self.base = pretrain_config(args, "all", args.seeds[0])
    self.crop = int(self.base.data.crop_size[0])
    self.pretrain_subjects = datasets.load_splits(self.base.data)["train"]
    self.splits = {task: datasets.load_splits(finetune_config(args, task, 1.0, 0).data)
                   for task in dict.fromkeys([ABLATION_TASK, *args.targets, "tumour"])}
    self.keys = [*args.disruptions, "all", "all_nocmcl", "mae"] + (
        ["swin_ssl"] if args.swin_ssl else [])
    self.by_config, self.pretrained, self.finetuned = {}, {}, {}
    split = self.splits[ABLATION_TASK]
    self.log(f"pre-training: {len(self.pretrain_subjects)} subjects {tuple(args.shape)} x "
             f"{len(self.base.data.modalities)} modalities, {self.crop}^3 crops, "
             f"{args.pretrain_steps} steps of {int(self.base.batch_size)}; fine-tuning: "
             f"{len(split['test'])} test, {len(split['val'])} validation, "
             f"{len(split['train'])} training subjects, {args.finetune_steps} steps of "
             f"{args.finetune_batch}; seeds {list(args.seeds)}")

  def log(self, msg: str):
    print(msg, flush=True)
    self.lines.append(msg)

  def pretrain(self, key: str, seed: int, extra=None, steps=None, tag=None) -> dict:
    """``{"method", "variables", "last"}`` of pre-training run ``key`` (`PRETRAIN`)."""
    tag = tag or key
    if (tag, seed) not in self.pretrained:
      config = pretrain_config(self.args, key, seed, extra, steps)
      memo = config.to_json_best_effort()
      if memo not in self.by_config:
        t = time.perf_counter()
        result = trainer.train(config, os.path.join(self.runs_dir, f"pretrain_{tag}_s{seed}"),
                               subjects=self.pretrain_subjects, progress=False)
        last = result.last_metrics
        self.by_config[memo] = {"method": result.method, "last": last,
                                "variables": jax.device_get(result.state.variables)}
        terms = ", ".join(f"{k} {last[k]:.4f}" for k in PRETRAIN_TERMS if k in last)
        self.log(f"pre-train {tag} (seed {seed}): {int(config.total_steps)} steps, loss "
                 f"{last['loss']:.4f} ({terms}), {time.perf_counter() - t:.0f}s")
      self.pretrained[(tag, seed)] = self.by_config[memo]
    return self.pretrained[(tag, seed)]

  def finetune(self, task: str, key, fraction: float, seed: int, run=None) -> dict:
    """``{"scores", "variables", "config", "regions"}`` of fine-tuning ``task`` from ``run``
    (pre-training row ``key``; scratch when None), tested on the task's test subjects."""
    memo = (task, key, fraction, seed)
    if memo not in self.finetuned:
      t = time.perf_counter()
      config = finetune_config(self.args, task, fraction, seed,
                               part="encoder" if key == "swin_ssl" else "both")
      workdir = os.path.join(self.runs_dir,
                             f"finetune_{task}_{key or 'scratch'}_{fraction:g}_s{seed}")
      splits = self.splits[task]
      # No test subjects for `finetune`: they are scored once, with surface distances, below.
      result = finetune_lib.finetune(
          config, workdir, pretrained=None if run is None else encoder_source(run),
          splits={**splits, "test": []}, progress=False)
      # The rows of a task fine-tune one config: they share its method, and so its compiled
      # sliding-window predictor (`jaxmed.train.programs`).
      predict = evaluators.segmentation_predictor(result.method)[1]
      scores = crossval.surface_scores(result.method, result.tested_variables, splits["test"],
                                       predict=predict)
      self.finetuned[memo] = {"scores": scores, "variables": result.tested_variables,
                              "config": config, "regions": tuple(result.method.regions)}
      # The tested (best validation) weights stay in memory; the final checkpoint is not what
      # was tested, and some 30 runs of them would fill the disk.
      shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
      self.log(f"fine-tune {task} {row_name(key)} {fraction:.0%} (seed {seed}): "
               f"{len(result.labeled_subjects)} labelled, best step {result.best_step}, test "
               f"Dice {np.nanmean(scores['dice']):.3f} ({time.perf_counter() - t:.0f}s)")
    return self.finetuned[memo]

  def rows(self, task: str, keys, fraction: float) -> dict[str, list[dict]]:
    """``{row name: [scores per seed]}`` of fine-tuning runs already made."""
    return {row_name(k): [self.finetuned[(task, k, fraction, s)]["scores"]
                          for s in self.args.seeds] for k in keys}

  def last_loss(self, key: str) -> str:
    """The pre-training's final reconstruction loss, mean (std) over seeds."""
    loss_key = "l1_masked" if key == "mae" else "l1"
    return format_mean_std([self.pretrained[(key, s)]["last"][loss_key]
                            for s in self.args.seeds], 4) + f" ({loss_key})"


def run_tables(study: Study) -> tuple[dict, dict]:
  """Pre-trains every row, reconstructs the held-out crops (Fig. 2) and fine-tunes Tables 5, 6
  and 3; returns ``(reconstruction scores per row, first seed's examples)``."""
  args = study.args
  crops = tumour_crops(study.splits["tumour"]["test"], study.crop)
  recon, examples = {}, {"target": crops[0]}
  table3 = (None, "mae", "all") + (("swin_ssl",) if args.swin_ssl else ())
  for seed in args.seeds:
    runs = {key: study.pretrain(key, seed) for key in study.keys}
    for key in (k for k in FIG2 if k in runs):
      scores = reconstruction_scores(runs[key]["method"], runs[key]["variables"], crops, seed)
      recon.setdefault(row_name(key), []).append({k: scores[k] for k in ("output", "input")})
      if "pasted" in scores:
        recon.setdefault(MAE_PASTED, []).append({"output": scores["pasted"],
                                                 "input": scores["input"]})
      if seed == args.seeds[0]:
        examples[row_name(key)] = scores["example"]
    for key in (None, *study.keys):
      study.finetune(ABLATION_TASK, key, args.ablation_fraction, seed, runs.get(key))
    for task in args.targets:
      for fraction in args.fractions:
        for key in table3:
          study.finetune(task, key, fraction, seed, runs.get(key))
  return recon, examples


def run_cka(study: Study) -> tuple[dict, dict]:
  """Table 7: ``({row: [{stage: CKA} per seed]}, {stage: examples})`` between the pre-trained
  and the fine-tuned encoders of the ablation runs (scratch: its initialisation)."""
  args = study.args
  crops = grid_crops(study.splits[ABLATION_TASK]["test"], study.crop)
  features_fn, cka = None, {}
  for seed in args.seeds:
    dae = study.pretrain("all", seed)
    template = encoder_source(dae)
    features_fn = features_fn or jax.jit(dae["method"].stage_features)
    pairs = {}
    for key in ("mae", "all") + (("swin_ssl",) if args.swin_ssl else ()):
      tuned = study.finetune(ABLATION_TASK, key, args.ablation_fraction, seed)
      pairs[row_name(key)] = (encoder_source(study.pretrain(key, seed)), tuned["variables"])
    tuned = study.finetune(ABLATION_TASK, None, args.ablation_fraction, seed)
    pairs[f"{SCRATCH} (initialisation)"] = (scratch_init(tuned["config"]), tuned["variables"])
    for name, (before, after) in pairs.items():
      cka.setdefault(name, []).append(cka_per_stage(
          features_fn, with_encoder(template, before), with_encoder(template, after),
          crops[..., :1], tokens=args.cka_tokens, seed=seed))
  tokens = {k: min(args.cka_tokens, len(crops) * (study.crop // 2**(i + 1))**3)
            for i, k in enumerate(STAGES)}
  return cka, tokens


def run_sweep(study: Study) -> dict:
  """Tables 8-10: ``{field: {value: [scores per seed]}}`` of the dae config's `get_sweep`."""
  args = study.args
  steps = args.sweep_steps or max(1, args.pretrain_steps // 2)
  sweep = {}
  for seed in args.seeds:
    for point in get_sweep(""):
      field = next(f for f in point if f != "pretext.disruption")
      kind, value = point["pretext.disruption"], point[field]
      tag = f"sweep_{kind}_{value:g}"
      run = study.pretrain(kind, seed, {field: value}, steps, tag=tag)
      tuned = study.finetune(ABLATION_TASK, tag, args.ablation_fraction, seed, run)
      sweep.setdefault(field, {}).setdefault(f"{value:g}", []).append(tuned["scores"])
  return sweep


def report(study: Study, recon: dict, cka: dict, tokens: dict, sweep: dict) -> list[str]:
  """The markdown report's lines."""
  args = study.args
  n_seeds, ablation = len(args.seeds), f"{ABLATION_TASK}, {args.ablation_fraction:.0%}"
  table5 = [k for k in TABLE5 if k is None or k in study.keys]
  table3 = TABLE3 + (("swin_ssl",) if args.swin_ssl else ())
  n_crops = len(next(iter(recon.values()))[0]["output"]["psnr"])
  out = [
      "# Disruptive Autoencoders at small scale" + (" (phantoms)" if not args.data_root else ""),
      "", "```", *study.lines, "```", "",
      f"## Fig. 2 analogue: reconstructions of {n_crops} held-out crops x {n_seeds} seeds", "",
      "Sharpness: mean Sobel magnitude of the output over the clean crop's (1 = as sharp). "
      "Local masking's input is the clean crop (the channels are masked inside the network). "
      "p: paired t-test against MAE over (seed, crop).", "",
      fig2_table(recon), "", "![Fig. 2](fig2_reconstructions.png)", "",
      f"## Table 5 analogue: disruptions, fine-tuned on {ablation} labels", "",
      f"Mean over classes, mean (std) over {n_seeds} seeds x {args.num_test} test subjects; "
      f"p: paired t-test against scratch. Every DAE row keeps CMCL.", "",
      summary_table(study.rows(ABLATION_TASK, table5, args.ablation_fraction),
                    pretrain_loss={row_name(k): study.last_loss(k) for k in table5 if k}), "",
      f"## Table 6 analogue: CMCL ({ablation})", "",
      summary_table(study.rows(ABLATION_TASK, TABLE6, args.ablation_fraction),
                    pretrain_loss={row_name(k): study.last_loss(k) for k in TABLE6 if k}), ""]
  for task in args.targets:
    regions = study.finetuned[(task, None, args.fractions[0], args.seeds[0])]["regions"]
    out += [f"## Table 3 analogue: {task} ({', '.join(regions)})", ""]
    for fraction in args.fractions:
      rows = study.rows(task, table3, fraction)
      out += [f"### {fraction:.0%} of the training subjects labelled", "",
              summary_table(rows), "", class_tables(regions, rows), ""]
  out += [f"## Table 7 analogue: CKA between pre-trained and fine-tuned encoders ({ablation})",
          "", f"Clean test crops of the {ABLATION_TASK} task; examples per stage: "
          + ", ".join(f"{k} {n}" for k, n in tokens.items())
          + " (few examples bias linear CKA upwards).", "",
          "| Method | " + " | ".join(f"stage {i + 1}" for i in range(len(STAGES))) + " |",
          "|:---|" + "---:|" * len(STAGES)]
  out += [f"| {name} | " + " | ".join(format_mean_std([s[k] for s in per_seed])
                                      for k in STAGES) + " |" for name, per_seed in cka.items()]
  out += ["", "![Table 7](table7_cka.png)", "", "## Tables 8-10 analogue: disruption strength",
          ""]
  scratch = study.rows(ABLATION_TASK, (None,), args.ablation_fraction)
  for field, points in sweep.items():
    name = field.rsplit(".", 1)[1]
    out += [f"### {SWEEP_TABLES[field]} (that disruption alone, "
            f"{args.sweep_steps or max(1, args.pretrain_steps // 2)} pre-training steps; "
            f"{ablation})", "",
            summary_table({**scratch, **{f"{name} = {v}": t for v, t in points.items()}}), ""]
  if not sweep:
    out += ["Not run (``--sweep``).", ""]
  out.append(f"Total time {time.perf_counter() - study.start:.0f}s.")
  return out


def jsonable(table: dict) -> dict:
  """A scores table with lists for arrays and None for non-finite values."""
  return {k: (v if k == "subjects" else np.where(np.isfinite(v), v, None).tolist())
          for k, v in table.items()}


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  trainer.enable_compilation_cache(os.path.join(args.out, "jit-cache"))
  study = Study(args)
  recon, examples = run_tables(study)
  cka, tokens = run_cka(study)
  sweep = run_sweep(study) if args.sweep else {}

  target = examples.pop("target")
  plot_reconstructions(target, examples, os.path.join(args.out, "fig2_reconstructions.png"))
  plot_cka(cka, os.path.join(args.out, "table7_cka.png"))
  lines = report(study, recon, cka, tokens, sweep)
  with open(os.path.join(args.out, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  table3 = TABLE3 + (("swin_ssl",) if args.swin_ssl else ())
  table5 = [k for k in TABLE5 if k is None or k in study.keys]
  as_json = lambda rows: {name: [jsonable(t) for t in tables] for name, tables in rows.items()}
  summary = {
      "reconstruction": recon,
      "finetune": {task: {f"{f:g}": as_json(study.rows(task, table3, f)) for f in args.fractions}
                   for task in args.targets},
      "table5": as_json(study.rows(ABLATION_TASK, table5, args.ablation_fraction)),
      "table6": as_json(study.rows(ABLATION_TASK, TABLE6, args.ablation_fraction)),
      "cka": cka, "cka_examples": tokens,
      "sweep": {field: as_json(points) for field, points in sweep.items()},
      "pretrain": {f"{tag}_s{seed}": run["last"] for (tag, seed), run in study.pretrained.items()},
      "regions": {task: list(study.finetuned[(task, None, args.fractions[0], args.seeds[0])]
                             ["regions"]) for task in args.targets},
      "seeds": list(args.seeds), "pretrain_steps": args.pretrain_steps,
      "finetune_steps": args.finetune_steps, "seconds": time.perf_counter() - study.start}
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(summary, f, indent=1, default=float)
  print("\n".join(lines[len(study.lines) + 4:]))
  return summary


if __name__ == "__main__":
  main()

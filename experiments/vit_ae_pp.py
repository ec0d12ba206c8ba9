"""ViT-AE++: a 3D masked autoencoder with perceptual, edge and contrastive losses. Table 3,
Fig. 2, Fig. 3 / Table 5 (with Fig. 6's paired t-test) and the 2D variant of
``../shared/papers/vit_ae_plus_plus.md`` at small scale, on the phantoms.

    python experiments/vit_ae_pp.py --out runs/vit_ae_pp              # default: ~30 min, 2 CPUs
    python experiments/vit_ae_pp.py --out runs/vit_ae_pp --seeds 0 1 2 --steps 1000 \
        --set model.embed_dim=384 --set model.depth=8 --set model.num_heads=6  # scaled up
    python experiments/vit_ae_pp.py --out runs/vit_ae_pp --data-root /data/BraTS2018 \
        --shape 128 128 128 --crop 96                                # a BraTS-style folder

Every network is the shipped ``vit_ae_pp`` config at ``size=small`` (`jaxmed/configs/
vit_ae_pp.py`: a 4 x 192 ViT encoder and a 2 x 128 decoder, patch 8, a quarter-width random
VGG-16 for L_per) trained for ``--steps`` on 32^3 crops (centred on tumour voxels, as the
paper's boxes) of ``--pretrain-subjects`` phantoms drawn from ``--pretrain-seed``; the
labelled evaluation pool is ``--eval-subjects`` other phantoms (``--eval-seed``), never seen in
pre-training. Each run is repeated for every ``--seeds`` value (network initialisation, masks,
augmentations and batches change; the data do not).

1. Table 3: the ablation rows ViT + L_CL, ViT-AE (L_rec), + L_edge, + L_per, + L_edge + L_per,
   ViT-AE++ (all four terms), a random (untrained) encoder, and, as a yardstick without a
   network, per-channel intensity statistics of the crop. Features of the frozen encoder
   (mean-pooled tokens after the final norm; the config's ``features.pool``) of one 32^3 crop
   per evaluation subject, centred on its tumour's centroid, clean and unmasked; the phantom's
   grade (high / low) by a linear SVM with stratified nested cross-validation
   (`jaxmed.evaluate.svm.nested_cv_linear_svm`: 5 outer folds, C in {0.1, 1, 5, 10} chosen by
   inner AUC, balanced class weights): AUC, sensitivity and specificity, mean ± std over the
   outer folds and seeds. Rows are compared with ViT-AE by paired t-tests over (seed, outer
   fold) pairs (the folds are the same for every row).
2. Fig. 2 left: AUC against the mask ratio (``--mask-ratios`` plus the table's 0.75) for
   ``--mask-losses`` (default ViT-AE: the sweep is the costliest part). Fig. 2 right: the
   training loss of ``--lambda2-losses`` with lambda2 decaying linearly to 0 (the table's run)
   and held constant, with the loss's step-to-step variability and peak gradient norm.
3. Table 5 / Fig. 3: reconstructions from 25% visible patches (a fixed random mask per
   evaluation subject, the same for every row) by L2 (ViT-AE), + L_edge and + L_edge + L_per:
   PSNR and SSIM of the full predicted crop against the z-scored crop (data range: the crop's
   max - min; SSIM MONAI's Gaussian 11 / 1.5 in 3D), also on the masked patches only, with
   paired t-tests over (seed, subject) pairs (Fig. 6); a montage of one subject.
4. The 2D variant: the same method on 64 x 64 axial slices (``dims=2``), plain MAE (L_rec) vs
   ViT-AE++ (all terms), judged by a linear probe (`jaxmed.evaluate.linear_probe`: standardised
   features + logistic regression) of the grade on ``--slices-2d`` axial slices through each
   evaluation subject's tumour centroid, 5 folds grouped by subject; accuracy and AUC.

Writes ``<out>/report.md``, ``fig2_mask_ratio.png``, ``fig2_lambda2.png``,
``fig3_reconstructions.png`` and ``results.json``; the runs under ``<out>/runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import matplotlib
import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from jaxmed import metrics
from jaxmed.config import load_config, parse_overrides, with_total_steps
from jaxmed.configs.vit_ae_pp import parse_losses
from jaxmed.data import datasets
from jaxmed.evaluate.compare import format_mean_std, format_p, paired_p_values
from jaxmed.evaluate.linear_probe import linear_probe
from jaxmed.evaluate.svm import nested_cv_linear_svm
from jaxmed.methods import get_method
from jaxmed.train import trainer

# Table 3's rows: (name, ``losses=`` of the config).
ROWS = (("ViT + L_CL", "cl"), ("ViT-AE", "rec"), ("ViT-AE + L_edge", "rec+edge"),
        ("ViT-AE + L_per", "rec+per"), ("ViT-AE + L_edge + L_per", "rec+edge+per"),
        ("ViT-AE++", "all"))
RANDOM_ROW = "random encoder"
# No network: per-channel intensity statistics of the z-scored crop, a yardstick for how much
# of the grade a linear SVM can read from intensities alone.
INTENSITY_ROW = "intensity statistics (no network)"
# Table 5's rows: L2, + edge, + edge + perceptual.
RECON_ROWS = (("L2", "rec"), ("L2 + edge", "rec+edge"), ("L2 + edge + perceptual", "rec+edge+per"))
ROWS_2D = (("MAE (L_rec)", "rec"), ("ViT-AE++ 2D", "all"))
SVM_METRICS = ("auc", "sensitivity", "specificity")
PROBE_FOLDS = 5


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="runs/vit_ae_pp")
  p.add_argument("--data-root", default="",
                 help="a NIfTI folder (BraTS layout, grade from HGG/LGG folder names) instead of "
                      "phantoms: pre-training on its train split, evaluation on every subject")
  p.add_argument("--shape", type=int, nargs=3, default=(64, 64, 64), metavar=("D", "H", "W"))
  p.add_argument("--crop", type=int, default=32, help="cube side of the 3D crops")
  p.add_argument("--pretrain-subjects", type=int, default=16)
  p.add_argument("--pretrain-seed", type=int, default=1000)
  p.add_argument("--eval-subjects", type=int, default=60)
  p.add_argument("--eval-seed", type=int, default=5000)
  p.add_argument("--seeds", type=int, nargs="+", default=(0, 1))
  p.add_argument("--steps", type=int, default=200, help="pre-training steps per run")
  p.add_argument("--mask-ratios", type=float, nargs="*", default=(0.55, 0.65, 0.85, 0.95),
                 help="Fig. 2 left, besides the config's 0.75")
  p.add_argument("--mask-losses", default="rec", help="losses= of the mask-ratio sweep")
  p.add_argument("--lambda2-losses", default="rec+edge",
                 help="losses= of the Fig. 2 right runs (must include edge)")
  p.add_argument("--steps-2d", type=int, default=200, help="pre-training steps of the 2D runs")
  p.add_argument("--slices-2d", type=int, default=3,
                 help="axial slices per evaluation subject for the 2D linear probe")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="a config override for every pre-training run, e.g. model.depth=8")
  args = p.parse_args(argv)
  for ratio in args.mask_ratios:
    if not 0.0 <= ratio < 1.0:
      p.error(f"--mask-ratios: each value must be in [0, 1); got {ratio}")
  for flag in ("mask_losses", "lambda2_losses"):
    try:
      parse_losses(getattr(args, flag))
    except ValueError as e:
      p.error(f"--{flag.replace('_', '-')}: {e}")
  if "edge" not in parse_losses(args.lambda2_losses):
    p.error(f"--lambda2-losses must include edge (lambda2 weighs it); got {args.lambda2_losses}")
  if args.crop > min(args.shape):
    p.error(f"--crop {args.crop} exceeds the smallest side of --shape {tuple(args.shape)}")
  return args


# --- Configs and data ------------------------------------------------------------------------

def pretrain_config(args, losses: str, seed: int, *, dims: int = 3, mask_ratio=None,
                    lambda2: str = "decay", steps: int | None = None):
  """The shipped ``vit_ae_pp`` config at ``size=small`` for one run."""
  spec = [f"losses={losses}", f"dims={dims}", f"lambda2={lambda2}", "size=small"]
  if mask_ratio is not None:
    spec.append(f"mask_ratio={mask_ratio}")
  overrides = {"data.num_subjects": args.pretrain_subjects, "data.num_val": 0,
               "data.num_test": 0, "data.seed": args.pretrain_seed,
               "data.shape": tuple(args.shape), "data.crop_size": (args.crop,) * 3,
               "seed": seed, "tensorboard": False, "checkpoint.every": 0,
               "checkpoint.async_save": False}
  if args.data_root:
    overrides["data.root"] = args.data_root
  config = load_config("vit_ae_pp:" + ",".join(spec), {**overrides, **parse_overrides(args.set)})
  return with_total_steps(config, steps or args.steps, log_points=40)


def evaluation_pool(args, base):
  """The labelled evaluation subjects: phantoms from ``--eval-seed`` (preprocessed as the
  pre-training data), or every subject of ``--data-root``."""
  data = base.data.copy_and_resolve_references()
  with data.unlocked():
    data.num_val, data.num_test = 0, 0
    if not args.data_root:
      data.seed, data.num_subjects = args.eval_seed, args.eval_subjects
  return datasets.load_subjects(data)


def tumour_centre(subject) -> np.ndarray:
  """The centroid (voxel indices) of the subject's label, or the volume's centre without one."""
  label = np.asarray(subject.label) if subject.label is not None else None
  if label is None or not np.any(label > 0):
    return np.asarray(subject.image.shape[:3]) // 2
  return np.round(np.argwhere(label > 0).mean(axis=0)).astype(int)


def channels(subject, modalities) -> np.ndarray:
  """The subject's image ``(D, H, W, C)`` with channels in ``modalities`` order."""
  return np.asarray(subject.image)[..., [subject.modalities.index(m) for m in modalities]]


def tumour_crops(subjects, modalities, crop: int) -> np.ndarray:
  """``(N, crop, crop, crop, C)`` float32: a crop per subject centred on its tumour (clipped to
  the volume)."""
  out = []
  for s in subjects:
    image = channels(s, modalities)
    origin = np.clip(tumour_centre(s) - crop // 2, 0, np.asarray(image.shape[:3]) - crop)
    out.append(image[tuple(slice(o, o + crop) for o in origin)])
  return np.stack(out).astype(np.float32)


def tumour_slices(subjects, modalities, count: int) -> tuple[np.ndarray, np.ndarray]:
  """``(N * count, H, W, C)`` axial slices around each subject's tumour centroid and the
  ``(N * count,)`` subject index of each."""
  images, groups = [], []
  for i, s in enumerate(subjects):
    image = channels(s, modalities)
    centre = int(tumour_centre(s)[0])
    for k in range(count):
      index = int(np.clip(centre + k - count // 2, 0, image.shape[0] - 1))
      images.append(image[index])
      groups.append(i)
  return np.stack(images).astype(np.float32), np.asarray(groups)


# --- Training and evaluation -----------------------------------------------------------------

def pretrain(config, workdir: str, subjects):
  """``(method, variables, last metrics)`` of one pre-training run."""
  result = trainer.train(config, workdir, subjects=subjects, progress=False)
  return result.method, jax.device_get(result.state.variables), result.last_metrics


def random_encoder(config):
  """``(method, variables)``: the config's network at its seeded initialisation."""
  method = get_method(config)
  crop = tuple(config.data.crop_size)
  image = np.zeros((2, *crop, len(config.data.modalities)), np.float32)
  return method, jax.device_get(method.init(jax.random.key(int(config.seed)), {"image": image}))


def encoder_features(method, variables, images, batch: int = 16) -> np.ndarray:
  """``(N, F)`` frozen-encoder features of ``images`` in batches."""
  fn = jax.jit(method.features)
  return np.concatenate([np.asarray(fn(variables, images[i:i + batch]))
                         for i in range(0, len(images), batch)])


def intensity_features(crops) -> np.ndarray:
  """``(N, 5 C)``: per channel the mean, std and 10th / 50th / 90th percentiles of each crop
  ``(N, *S, C)`` z-scored with one mean and std over all voxels and channels (as the method)."""
  x = crops.reshape(len(crops), -1, crops.shape[-1]).astype(np.float64)
  z = (x - x.mean(axis=(1, 2), keepdims=True)) / np.maximum(x.std(axis=(1, 2), keepdims=True),
                                                            1e-6)
  stats = [z.mean(axis=1), z.std(axis=1)] + [np.percentile(z, q, axis=1) for q in (10, 50, 90)]
  return np.concatenate(stats, axis=1)


def svm_scores(features, grades) -> dict:
  result = nested_cv_linear_svm(features, grades)
  return {m: [f[m] for f in result["folds"]] for m in SVM_METRICS} | {
      "c": [f["c"] for f in result["folds"]]}


def reconstruction_scores(method, variables, crops, seed: int = 0) -> dict:
  """PSNR / SSIM of the reconstruction from ``1 - mask_ratio`` visible patches of each crop
  (the mask of crop ``i`` drawn from ``(seed, i)``: the same for every run); the full
  prediction, and its masked patches only (visible patches replaced by the target)."""
  rec = jax.jit(method.reconstruct)
  targets, preds, inputs = [], [], []
  for i in range(len(crops)):
    key = jax.random.fold_in(jax.random.key(seed), i)
    visible, pred = rec(variables, {"image": crops[i:i + 1]}, key)
    _, target = method.pretext_example(key, {"image": crops[i:i + 1]})
    targets.append(np.asarray(target)), preds.append(np.asarray(pred))
    inputs.append(np.asarray(visible))
  target, pred, visible = (np.concatenate(v) for v in (targets, preds, inputs))
  data_range = (target.max(axis=(1, 2, 3, 4)) - target.min(axis=(1, 2, 3, 4))).astype(np.float32)
  shown = np.any(visible != 0, axis=-1, keepdims=True)  # visible patches (masked: exact 0)
  masked_only = np.where(shown, target, pred)
  return {"psnr": np.asarray(metrics.psnr(pred, target, data_range=data_range)).tolist(),
          "ssim": np.asarray(metrics.ssim(pred, target, data_range=data_range)).tolist(),
          "psnr_masked": np.asarray(metrics.psnr(masked_only, target,
                                                 data_range=data_range)).tolist(),
          "example": {"visible": visible[0], "pred": pred[0], "target": target[0]}}


def probe_scores(features, grades, groups, seed: int = 0) -> dict:
  """Linear-probe accuracy / AUC over `PROBE_FOLDS` folds grouped by subject."""
  folds = StratifiedGroupKFold(PROBE_FOLDS, shuffle=True, random_state=seed)
  accuracy, auc = [], []
  for train, test in folds.split(features, grades, groups):
    scores = linear_probe(features[train], grades[train], features[test], grades[test])
    accuracy.append(scores["accuracy"])
    auc.append(scores.get("roc_auc", float("nan")))
  return {"accuracy": accuracy, "auc": auc}


def loss_curve(workdir: str, key: str = "loss") -> tuple[list[int], list[float]]:
  steps, values = [], []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if key in row:
        steps.append(int(row["step"]))
        values.append(float(row[key]))
  return steps, values


def stability(workdir: str) -> dict:
  """The logged loss's late level and roughness: the means over the last quarter of the logged
  total loss and of its L_rec and (unweighted) L_edge terms, the std of the total loss's
  log-to-log changes, the peak gradient norm and the count of non-finite steps."""
  out = {}
  for key in ("loss", "rec", "edge"):
    values = np.asarray(loss_curve(workdir, key)[1])
    out[f"final_{key}"] = float(values[-max(2, len(values) // 4):].mean())
    if key == "loss":
      out["loss_jitter"] = float(np.std(np.diff(values)))
  out["max_grad_norm"] = float(np.max(loss_curve(workdir, "grad_norm")[1]))
  out["nonfinite"] = float(loss_curve(workdir, "nonfinite_total")[1][-1])
  return out


# --- Report ----------------------------------------------------------------------------------

def _pm(values, digits=3) -> str:
  return format_mean_std(values, digits, style="pm")


def pooled(runs: list[dict], key: str) -> np.ndarray:
  """``(seeds * n,)`` of a per-fold / per-subject score over a row's seeds."""
  return np.concatenate([np.asarray(r[key], np.float64) for r in runs])


def table_3(svm: dict, baseline: str) -> str:
  lines = ["| Method | AUC | Sensitivity | Specificity | AUC - ViT-AE | p |",
           "|:---|---:|---:|---:|---:|---:|"]
  for name, runs in svm.items():
    auc = pooled(runs, "auc")
    cells = [_pm(pooled(runs, m)) for m in SVM_METRICS]
    if name == baseline:
      diff, p = "-", "-"
    else:
      base = pooled(svm[baseline], "auc")
      diff = f"{np.mean(auc - base):+.3f}"
      p = format_p(paired_p_values(auc[:, None], base[:, None])[0])
    lines.append(f"| {name} | " + " | ".join(cells + [diff, p]) + " |")
  return "\n".join(lines)


def table_5(recon: dict) -> str:
  lines = ["| Method | PSNR (dB) | SSIM | PSNR masked patches (dB) |", "|:---|---:|---:|---:|"]
  for name, runs in recon.items():
    lines.append(f"| {name} | " + " | ".join(
        _pm(pooled(runs, k), 3 if k == "ssim" else 2)
        for k in ("psnr", "ssim", "psnr_masked")) + " |")
  names = list(recon)
  lines += ["", "| Pair | ΔPSNR | p | ΔSSIM | p |", "|:---|---:|---:|---:|---:|"]
  for a, b in zip(names, names[1:]):
    cells = []
    for k in ("psnr", "ssim"):
      x, y = pooled(recon[b], k), pooled(recon[a], k)
      cells += [f"{np.mean(x - y):+.4f}", format_p(paired_p_values(x[:, None], y[:, None])[0])]
    lines.append(f"| {b} vs {a} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def lambda2_table(runs: dict) -> str:
  """Fig. 2 right in numbers: a row per lambda2 schedule, `stability` averaged over seeds."""
  keys = ("final_loss", "final_rec", "final_edge", "loss_jitter", "max_grad_norm", "nonfinite")
  lines = ["| lambda2 | final loss | final L_rec | final L_edge | loss jitter | max grad norm | "
           "non-finite steps |", "|:---|" + "---:|" * len(keys)]
  for name, seeds in runs.items():
    lines.append(f"| {name} | " + " | ".join(f"{np.mean([r[k] for r in seeds]):.4f}"
                                             for k in keys) + " |")
  return "\n".join(lines)


def plot_mask_ratio(sweep: dict, path: str):
  ratios = sorted(sweep)
  means = [np.mean(pooled(sweep[r], "auc")) for r in ratios]
  stds = [np.std([np.mean(run["auc"]) for run in sweep[r]]) for r in ratios]
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  ax.errorbar(ratios, means, yerr=stds, marker="o", capsize=3)
  ax.set_xlabel("mask ratio")
  ax.set_ylabel("grade AUC (linear SVM)")
  ax.set_title("Fig. 2 (left) analogue")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_lambda2(workdirs: dict, path: str):
  """Fig. 2 right: the total training loss and its L_rec term per lambda2 schedule."""
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
  for name, workdir in workdirs.items():
    for ax, key in zip(axes, ("loss", "rec")):
      ax.plot(*loss_curve(workdir, key), label=name)
  for ax, title in zip(axes, ("training loss", "its L_rec term")):
    ax.set_xlabel("step")
    ax.set_title(f"Fig. 2 (right) analogue: {title}", fontsize=8)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_reconstructions(examples: dict, path: str, channel: int = 3):
  """Fig. 3 analogue: the middle axial slice of one crop's ``channel`` (T1c by default)."""
  first = next(iter(examples.values()))
  panels = [("target", first["target"]), ("25% visible", first["visible"])]
  panels += [(name, ex["pred"]) for name, ex in examples.items()]
  fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.4))
  lo, hi = np.percentile(first["target"][..., channel], (1, 99))
  for ax, (name, volume) in zip(np.atleast_1d(axes), panels):
    ax.imshow(volume[volume.shape[0] // 2, ..., channel], cmap="gray", vmin=lo, vmax=hi)
    ax.set_title(name, fontsize=7)
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  runs_dir = os.path.join(args.out, "runs")
  start = time.perf_counter()
  lines = []

  def log(msg):
    print(msg, flush=True)
    lines.append(msg)

  trainer.enable_compilation_cache(os.path.join(args.out, "jit-cache"))
  base = pretrain_config(args, "rec", args.seeds[0])
  modalities = tuple(base.data.modalities)
  pretrain_subjects = datasets.load_splits(base.data)["train"]
  pool = evaluation_pool(args, base)
  grades = np.asarray([s.grade for s in pool], np.int32)
  crops = tumour_crops(pool, modalities, args.crop)
  slices, groups = tumour_slices(pool, modalities, args.slices_2d)
  log(f"pre-training: {len(pretrain_subjects)} subjects {tuple(args.shape)}, {args.crop}^3 "
      f"crops, {args.steps} steps per run; evaluation: {len(pool)} subjects "
      f"({int(grades.sum())} high grade); seeds {list(args.seeds)}")

  svm = {name: [] for name, _ in ROWS}
  svm[RANDOM_ROW] = []
  svm[INTENSITY_ROW] = []
  intensity = svm_scores(intensity_features(crops), grades)  # no seed: the same for each
  recon = {name: [] for name, _ in RECON_ROWS}
  sweep = {0.75: svm["ViT-AE"]} if args.mask_losses == "rec" else {}
  lambda2_runs = {"decay": [], "constant": []}
  probe = {name: [] for name, _ in ROWS_2D}
  examples, curves = {}, {}

  def run(tag, config, seed):
    t = time.perf_counter()
    workdir = os.path.join(runs_dir, f"{tag}_s{seed}")
    method, variables, last = pretrain(config, workdir, pretrain_subjects)
    log(f"{tag} (seed {seed}): {int(config.total_steps)} steps, final loss "
        f"{last['loss']:.4f} ({time.perf_counter() - t:.0f}s)")
    return method, variables, workdir

  for seed in args.seeds:
    # Table 3 (and Table 5 from the same runs).
    for name, losses in ROWS:
      config = pretrain_config(args, losses, seed)
      method, variables, workdir = run(losses, config, seed)
      svm[name].append(svm_scores(encoder_features(method, variables, crops), grades))
      for recon_name, recon_losses in RECON_ROWS:
        if recon_losses == losses:
          scores = reconstruction_scores(method, variables, crops)
          if seed == args.seeds[0]:
            examples[recon_name] = scores["example"]
          recon[recon_name].append({k: v for k, v in scores.items() if k != "example"})
      if losses == args.lambda2_losses:
        lambda2_runs["decay"].append(stability(workdir))
        curves.setdefault("lambda2 decay", workdir)
    method, variables = random_encoder(pretrain_config(args, "rec", seed))
    svm[RANDOM_ROW].append(svm_scores(encoder_features(method, variables, crops), grades))
    svm[INTENSITY_ROW].append(intensity)

    # Fig. 2 left: the mask ratio.
    for ratio in sorted(set(args.mask_ratios) | {0.75}):
      if ratio == 0.75 and args.mask_losses == "rec":
        continue  # the table's ViT-AE run
      config = pretrain_config(args, args.mask_losses, seed, mask_ratio=ratio)
      method, variables, _ = run(f"{args.mask_losses}_mask{ratio:.2f}", config, seed)
      sweep.setdefault(ratio, []).append(
          svm_scores(encoder_features(method, variables, crops), grades))

    # Fig. 2 right: lambda2 held constant.
    if args.lambda2_losses not in dict((l, n) for n, l in ROWS):
      config = pretrain_config(args, args.lambda2_losses, seed)
      _, _, workdir = run(args.lambda2_losses, config, seed)
      lambda2_runs["decay"].append(stability(workdir))
      curves.setdefault("lambda2 decay", workdir)
    config = pretrain_config(args, args.lambda2_losses, seed, lambda2="constant")
    _, _, workdir = run(f"{args.lambda2_losses}_constant", config, seed)
    lambda2_runs["constant"].append(stability(workdir))
    curves.setdefault("lambda2 constant", workdir)

    # The 2D variant.
    for name, losses in ROWS_2D:
      config = pretrain_config(args, losses, seed, dims=2, steps=args.steps_2d)
      method, variables, _ = run(f"2d_{losses}", config, seed)
      feats = encoder_features(method, variables, slices, batch=32)
      probe[name].append(probe_scores(feats, grades[groups], groups))

  plot_mask_ratio(sweep, os.path.join(args.out, "fig2_mask_ratio.png"))
  plot_lambda2(curves, os.path.join(args.out, "fig2_lambda2.png"))
  plot_reconstructions(examples, os.path.join(args.out, "fig3_reconstructions.png"))

  n = len(args.seeds)
  report = [
      "# ViT-AE++ at small scale (phantoms)" if not args.data_root else "# ViT-AE++",
      "", "```", *lines, "```", "",
      f"## Table 3 analogue: grade by linear SVM on frozen features ({n} seeds x 5 outer "
      f"folds; p: paired t-test against ViT-AE over (seed, fold))", "",
      table_3(svm, "ViT-AE"), "",
      f"## Fig. 2 analogue: mask ratio ({args.mask_losses}) and lambda2", "",
      "| mask ratio | AUC |", "|---:|---:|",
      *[f"| {r:.2f} | {_pm(pooled(sweep[r], 'auc'))} |" for r in sorted(sweep)], "",
      f"lambda2 schedules ({args.lambda2_losses}; mean over seeds):", "",
      lambda2_table(lambda2_runs), "",
      f"## Table 5 analogue: reconstruction from 25% visible patches ({len(pool)} held-out "
      f"crops x {n} seeds; p: paired t-test over (seed, subject), Fig. 6)", "",
      table_5(recon), "",
      f"## 2D variant: linear probe of the grade on {args.slices_2d} axial slices per "
      f"subject ({PROBE_FOLDS} folds grouped by subject x {n} seeds)", "",
      "| Method | accuracy | AUC |", "|:---|---:|---:|",
      *[f"| {name} | {_pm(pooled(v, 'accuracy'))} | {_pm(pooled(v, 'auc'))} |"
        for name, v in probe.items()], "",
      f"Total time {time.perf_counter() - start:.0f}s."]
  with open(os.path.join(args.out, "report.md"), "w") as f:
    f.write("\n".join(report) + "\n")
  summary = {"svm": svm, "mask_ratio": {f"{r:.2f}": v for r, v in sorted(sweep.items())},
             "lambda2": lambda2_runs, "reconstruction": recon, "probe_2d": probe,
             "seeds": list(args.seeds), "steps": args.steps,
             "seconds": time.perf_counter() - start}
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(summary, f, indent=1, default=float)
  print("\n".join(report[len(lines) + 4:]))
  return summary


if __name__ == "__main__":
  main()

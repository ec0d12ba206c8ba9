"""SSFD against SSIM, PSNR and the VGG perceptual distance: Figs. 1-3 (and appendix Figs. 5-6)
of ``../shared/papers/ssfd_feature_distance.md`` at small scale, on the embedded phantoms.

    python experiments/ssfd.py --out runs/ssfd                    # default small size
    python experiments/ssfd.py --out runs/ssfd --num-subjects 60 --shape 32 128 128 \
        --ssfd-steps 3000 --recon-steps 3000                     # closer to the paper
    python experiments/ssfd.py --out runs/ssfd --data-root /data/BraTS2018 --modality t2
    python experiments/ssfd.py --out runs/ssfd --ssfd-weights model.ckpt --vgg-weights vgg16.pth

1. SSFD encoder: an SSFD UNet is pre-trained by context prediction (`jaxmed/configs/
   context_prediction.py`: Poisson-disc 16 x 16 patches over 25%, L2, Adam) on the training
   subjects' slices, or loaded from a meddlr checkpoint (``--ssfd-weights``).
2. Fig. 1 (and Fig. 5): every test image, z-scored, is perturbed by a pixel shift along x
   (wrap-around roll with cubic interpolation, 0 to 1.2 px), a Gaussian blur (sigma 0 to 4.5 px)
   and additive Gaussian noise (std 0 to 0.8), as in Sec. 2.3; mean SSFD, SSIM and PSNR with
   95% confidence intervals per level. Linearity is the R^2 of a straight line through the mean
   curve; shift sensitivity is the SSFD increase per unit of SSIM decrease at the largest level.
3. Reconstructions of graded quality: a UNet (`jaxmed/configs/reconstruction.py`) is trained on
   randomly undersampled slices at 2x-8x and reconstructs every test image at each acceleration.
4. Fig. 2: SSFD at the 3rd, 5th, 7th and 9th convolutions (``block2_relu1`` .. ``block5_relu1``)
   against SSIM over the reconstructions (Pearson and Spearman correlations).
5. Fig. 3 (and Fig. 6): SSIM / PSNR against the VGG perceptual distance (relu3_3) and against
   SSFD; the reconstruction SSFD ranks much worse than SSIM does is shown as the outlier,
   beside the one both rank best. The VGG-16 needs ImageNet weights (``--vgg-weights``, a
   torchvision ``vgg16`` state dict); without them it runs with random weights, which the
   report says.

Writes ``<out>/report.md``, ``fig1_perturbations.png``, ``fig2_layers.png``,
``fig3_quality_control.png``, ``fig4_context_prediction.png`` and ``metrics.npz``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import scipy.ndimage
import scipy.stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from jaxmed import metrics
from jaxmed.config import load_config
from jaxmed.data import datasets
from jaxmed.interop import load_ssfd_unet, load_state_dict, vgg16_from_torch
from jaxmed.methods import ContextPredictionMethod, ReconstructionMethod
from jaxmed.data import mri
from jaxmed.methods.context_prediction import encoder_params, standardize
from jaxmed.methods.reconstruction import zero_filled_channels
from jaxmed.models import VGG16
from jaxmed.train import trainer

# The paper's layers: the 3rd, 5th, 7th and 9th convolutions of the 5-level encoder (2 per level).
LAYERS = {"conv3": "block2_relu1", "conv5": "block3_relu1", "conv7": "block4_relu1",
          "conv9": "block5_relu1"}
SSFD_LAYER = "block5_relu1"  # "unless otherwise stated, the 9th convolutional layer"
PERTURBATIONS = ("shift", "blur", "noise")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="runs/ssfd")
  p.add_argument("--data-root", default="", help="a NIfTI folder instead of phantoms")
  p.add_argument("--modality", default="t2")
  p.add_argument("--num-subjects", type=int, default=24)
  p.add_argument("--num-test", type=int, default=6)
  p.add_argument("--shape", type=int, nargs=3, default=(24, 64, 64), metavar=("D", "H", "W"))
  p.add_argument("--slices-per-subject", type=int, default=8,
                 help="test slices per test subject (evenly spaced over the brain)")
  p.add_argument("--ssfd-steps", type=int, default=1500)
  p.add_argument("--ssfd-chans", type=int, default=20, help="first-level filters (20 in SSFD)")
  p.add_argument("--recon-steps", type=int, default=800)
  p.add_argument("--recon-features", type=int, nargs="+", default=(16, 32, 64, 128))
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--accelerations", type=int, nargs="+", default=(2, 4, 6, 8))
  p.add_argument("--levels", type=int, default=9, help="perturbation levels incl. 0")
  p.add_argument("--max-shift", type=float, default=1.2, help="pixels")
  p.add_argument("--max-blur", type=float, default=4.5, help="Gaussian sigma, pixels")
  p.add_argument("--max-noise", type=float, default=0.8, help="std on z-scored images")
  p.add_argument("--ssfd-weights", default="", help="meddlr SSFD checkpoint (skips pre-training)")
  p.add_argument("--vgg-weights", default="", help="torchvision vgg16 state dict")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def train_config(args, name: str):
  """The shipped ``context_prediction`` or ``reconstruction`` config, sized by ``args``."""
  shared = {"data.modalities": (args.modality,), "data.num_subjects": args.num_subjects,
            "data.shape": tuple(args.shape), "data.num_val": 0, "data.num_test": args.num_test,
            "data.seed": args.seed, "batch_size": args.batch_size, "seed": args.seed,
            "tensorboard": False, "checkpoint.every": 0, "checkpoint.async_save": False}
  if args.data_root:
    shared["data.root"] = args.data_root  # data.source "auto": a NIfTI folder
  if name == "context_prediction":
    steps = args.ssfd_steps
    overrides = {"model.chans": args.ssfd_chans}
  else:
    steps = args.recon_steps
    accel = tuple(float(a) for a in args.accelerations)
    overrides = {"model.features": tuple(args.recon_features), "mri.accelerations": accel,
                 "mri.center_fractions": tuple(mri.fastmri_center_fraction(a) for a in accel)}
  return load_config(name, {**shared, **overrides, "total_steps": steps,
                            "log_every": max(1, steps // 4)})


def train(config, method, arrays, workdir):
  result = trainer.train(config, workdir, method=method, train_data=arrays, progress=False)
  return jax.device_get(result.state.variables), result.last_metrics


def test_images(subjects, per_subject: int) -> np.ndarray:
  """``(S, H, W)`` float32: ``per_subject`` evenly spaced slices of every subject, among those
  with at least half the subject's largest brain area."""
  out = []
  for s in subjects:
    area = s.brain_mask.mean(axis=(1, 2))
    if area.max() == 0:
      raise ValueError(f"subject {s.subject_id} has an empty brain mask")
    brain = np.flatnonzero(area >= 0.5 * area.max())
    picks = brain[np.unique(np.linspace(0, brain.size - 1, per_subject).round().astype(int))]
    out.append(s.image[picks, :, :, 0])
  return np.concatenate(out).astype(np.float32)


def perturb(images, kind: str, level: float, rng) -> np.ndarray:
  """Sec. 2.3 perturbations of z-scored ``(S, H, W)`` images."""
  if level == 0:
    return images.copy()
  if kind == "shift":  # roll along x with cubic interpolation
    return np.stack([scipy.ndimage.shift(x, (0.0, level), order=3, mode="grid-wrap")
                     for x in images]).astype(np.float32)
  if kind == "blur":
    return np.stack([scipy.ndimage.gaussian_filter(x, level, mode="reflect")
                     for x in images]).astype(np.float32)
  if kind == "noise":
    return (images + level * rng.standard_normal(images.shape)).astype(np.float32)
  raise ValueError(f"unknown perturbation {kind!r}")


class Scorer:
  """Jitted SSIM, PSNR, SSFD (per layer) and VGG distance of ``(S, H, W)`` pairs, batched."""

  def __init__(self, ssfd_params, vgg_params, batch: int = 32):
    self.ssfd_params, self.vgg_params, self.batch = ssfd_params, vgg_params, batch

  def __call__(self, pred, target, *, vgg: bool = False) -> dict[str, np.ndarray]:
    out = {}
    for start in range(0, len(pred), self.batch):
      p, t = pred[start:start + self.batch], target[start:start + self.batch]
      data_range = t.reshape(len(t), -1).max(1) - t.reshape(len(t), -1).min(1)
      part = {"ssim": metrics.ssim(p[..., None], t[..., None], data_range=data_range),
              "psnr": metrics.psnr(p, t, data_range=data_range)}
      _, per_layer = metrics.ssfd(p, t, encoder_params=self.ssfd_params,
                                  layers=tuple(LAYERS.values()))
      part.update({f"ssfd_{k}": per_layer[v] for k, v in LAYERS.items()})
      if vgg:
        part["vgg"] = metrics.vgg_perceptual_distance(p, t, vgg_params=self.vgg_params)
      for k, v in part.items():
        out.setdefault(k, []).append(np.asarray(v, np.float64))
    out = {k: np.concatenate(v) for k, v in out.items()}
    out["ssfd"] = out["ssfd_conv9"]
    return out


def mean_ci(values: np.ndarray) -> tuple[float, float]:
  """Mean and the half-width of its 95% t confidence interval (finite values)."""
  v = values[np.isfinite(values)]
  if v.size < 2:
    return float(np.mean(v)) if v.size else np.nan, np.nan
  return float(v.mean()), float(scipy.stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1)
                                / np.sqrt(v.size))


def linearity(levels, means) -> float:
  """R^2 of the least-squares line through ``(levels, means)`` (1: exactly linear)."""
  levels, means = np.asarray(levels, float), np.asarray(means, float)
  ok = np.isfinite(means)
  if ok.sum() < 3 or np.ptp(means[ok]) == 0:
    return np.nan
  return float(scipy.stats.pearsonr(levels[ok], means[ok]).statistic ** 2)


def perturbation_study(args, images, scorer):
  """``{kind: {"levels", metric: (L, S)}}`` for the three perturbations."""
  rng = np.random.default_rng(args.seed)
  maxima = {"shift": args.max_shift, "blur": args.max_blur, "noise": args.max_noise}
  out = {}
  for kind in PERTURBATIONS:
    levels = np.linspace(0.0, maxima[kind], args.levels)
    rows = [scorer(perturb(images, kind, lv, rng), images) for lv in levels]
    out[kind] = {"levels": levels, **{m: np.stack([r[m] for r in rows])
                                      for m in ("ssfd", "ssim", "psnr")}}
  return out


def perturbation_summary(study) -> list[dict]:
  rows = []
  for kind, res in study.items():
    mean = {m: np.array([mean_ci(v)[0] for v in res[m]]) for m in ("ssfd", "ssim", "psnr")}
    ssim_drop = mean["ssim"][0] - mean["ssim"][-1]
    rows.append({"perturbation": kind, "max level": res["levels"][-1],
                 "SSIM at max": mean["ssim"][-1], "PSNR at max": mean["psnr"][-1],
                 "SSFD at max": mean["ssfd"][-1],
                 "R2 SSFD": linearity(res["levels"], mean["ssfd"]),
                 "R2 SSIM": linearity(res["levels"], mean["ssim"]),
                 "R2 PSNR": linearity(res["levels"][1:], mean["psnr"][1:]),
                 "SSFD per SSIM drop": (mean["ssfd"][-1] - mean["ssfd"][0]) / ssim_drop
                 if ssim_drop > 0 else np.nan})
  return rows


def plot_fig1(study, images, path: str, seed: int):
  rng = np.random.default_rng(seed)
  fig, axes = plt.subplots(3, 3, figsize=(11, 9.5))
  for col, (kind, res) in enumerate(study.items()):
    mid = res["levels"][len(res["levels"]) // 2]
    shown = perturb(images[:1], kind, mid, rng)[0]
    if kind == "shift":  # the paper shows the difference image for the roll
      shown = shown - images[0]
    axes[0, col].imshow(shown, cmap="gray")
    axes[0, col].set_title(f"{kind} at {mid:.2f}" + (" (difference)" if kind == "shift" else ""))
    axes[0, col].axis("off")
    for row, (metric, other) in enumerate((("ssim", "SSIM"), ("psnr", "PSNR")), start=1):
      ax = axes[row, col]
      for name, color, label in (("ssfd", "tab:red", "SSFD"), (metric, "tab:blue", other)):
        target_ax = ax if name == "ssfd" else ax.twinx()
        stats = np.array([mean_ci(v) for v in res[name]])
        target_ax.plot(res["levels"], stats[:, 0], color=color, marker="o", ms=3, label=label)
        target_ax.fill_between(res["levels"], stats[:, 0] - stats[:, 1],
                               stats[:, 0] + stats[:, 1], color=color, alpha=0.2)
        target_ax.set_ylabel(label, color=color)
      ax.set_xlabel({"shift": "shift (pixels)", "blur": "blur sigma (pixels)",
                     "noise": "noise std"}[kind])
  fig.suptitle("Fig. 1 / 5: SSFD vs SSIM (middle) and PSNR (bottom) under perturbations, "
               "mean and 95% CI")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def correlations(x, y) -> tuple[float, float]:
  ok = np.isfinite(x) & np.isfinite(y)
  if ok.sum() < 3:
    return np.nan, np.nan
  return (float(scipy.stats.pearsonr(x[ok], y[ok]).statistic),
          float(scipy.stats.spearmanr(x[ok], y[ok]).statistic))


def plot_fig2(recon, accel, path: str):
  fig, axes = plt.subplots(1, len(LAYERS), figsize=(4 * len(LAYERS), 3.6))
  for ax, name in zip(axes, LAYERS):
    sc = ax.scatter(recon["ssim"], recon[f"ssfd_{name}"], c=accel, s=10, cmap="viridis")
    r, rho = correlations(recon["ssim"], recon[f"ssfd_{name}"])
    ax.set_title(f"{name} ({LAYERS[name]}): r={r:.2f}, rho={rho:.2f}", fontsize=9)
    ax.set_xlabel("SSIM")
    ax.set_ylabel("SSFD")
  fig.colorbar(sc, ax=axes, label="acceleration")
  fig.suptitle("Fig. 2: SSFD at four encoder layers vs SSIM over reconstructions")
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def rank_outliers(recon) -> tuple[int, int]:
  """``(outlier, good)``: the reconstruction whose SSFD rank is worst relative to its SSIM rank
  (SSIM calls it good, SSFD bad), and the one with the best mean rank of both."""
  n = len(recon["ssim"])
  ssim_bad = scipy.stats.rankdata(-recon["ssim"]) / n  # high = worse by SSIM
  ssfd_bad = scipy.stats.rankdata(recon["ssfd"]) / n   # high = worse by SSFD
  return int(np.argmax(ssfd_bad - ssim_bad)), int(np.argmin(ssfd_bad + ssim_bad))


def plot_fig3(recon, pred, target, picks, vgg_label: str, path: str):
  fig = plt.figure(figsize=(15, 7))
  grid = fig.add_gridspec(2, 5)
  colors = ("tab:blue", "tab:orange")
  for row, (quality, qlabel) in enumerate((("ssim", "SSIM"), ("psnr", "PSNR"))):
    for col, (metric, mlabel) in enumerate((("vgg", vgg_label), ("ssfd", "SSFD"))):
      ax = fig.add_subplot(grid[row, col])
      ax.scatter(recon[quality], recon[metric], s=8, c="0.6")
      for i, color in zip(picks, colors):
        ax.scatter(recon[quality][i], recon[metric][i], s=60, c=color, edgecolors="k")
      ax.set_xlabel(qlabel)
      ax.set_ylabel(mlabel)
  for row, (i, color) in enumerate(zip(picks, colors)):
    for col, (image, title) in enumerate(((target[i], "ground truth"), (pred[i], "reconstruction"),
                                          (pred[i] - target[i], "difference"))):
      ax = fig.add_subplot(grid[row, 2 + col])
      ax.imshow(image, cmap="gray")
      ax.axis("off")
      ax.set_title(title, color=color, fontsize=9)
    fig.text(0.42, 0.93 - 0.48 * row,
             f"SSIM {recon['ssim'][i]:.3f}  PSNR {recon['psnr'][i]:.1f}  SSFD "
             f"{recon['ssfd'][i]:.3f}  VGG {recon['vgg'][i]:.3g}", color=color, fontsize=9)
  fig.suptitle("Fig. 3 / 6: quality control: blue = SSFD's outlier, orange = good by both")
  fig.tight_layout(rect=(0, 0, 1, 0.92))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_fig4(method, variables, images, path: str):
  """Context prediction (paper Fig. 4): original, corrupted, in-painted."""
  batch = {"image": images[:3, ..., None]}
  corrupted, target = method.pretext_example(jax.random.PRNGKey(0), batch)
  pred, _ = method.apply(variables, corrupted, None, train=False)
  fig, axes = plt.subplots(3, 3, figsize=(7, 7))
  for r in range(3):
    for c, (x, title) in enumerate(((target, "original"), (corrupted, "corrupted"),
                                    (pred, "in-painted"))):
      axes[r, c].imshow(np.asarray(x[r, ..., 0]), cmap="gray")
      axes[r, c].axis("off")
      axes[0, c].set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def reconstruct_all(method, variables, images, accelerations, seed: int):
  """Each test image reconstructed at each acceleration: ``(pred, target, accel)``."""
  @jax.jit
  def reconstruct(variables, masks):
    zero_filled = zero_filled_channels(images[..., None], masks)
    return method.apply(variables, zero_filled, None, train=False)[0][..., 0]

  preds = []
  for i, a in enumerate(accelerations):
    masks, _ = mri.sample_masks(jax.random.PRNGKey(seed + i), len(images), images.shape[2],
                                kind=method.mask_kind, accelerations=(float(a),),
                                center_fractions=(mri.fastmri_center_fraction(a),))
    preds.append(np.asarray(reconstruct(variables, masks)))
  accel = np.repeat(np.asarray(accelerations, np.float32), len(images))
  return np.concatenate(preds), np.tile(images, (len(accelerations), 1, 1)), accel


def vgg_params(args, shape):
  model = VGG16()
  template = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *shape, 3)))
  if args.vgg_weights:
    converted = vgg16_from_torch(load_state_dict(args.vgg_weights), template,
                                 drop_classifier=True, name=repr(args.vgg_weights))
    return converted.variables["params"], "VGG-PL (ImageNet)"
  variables = model.init(jax.random.PRNGKey(args.seed + 7), jnp.zeros((1, *shape, 3)))
  return variables["params"], "VGG-PL (random weights)"


def table(rows: list[dict], fmt: str = "{:.3f}") -> str:
  keys = list(rows[0])
  lines = ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(v if isinstance(v, str) else fmt.format(v)
                                   for v in r.values()) + " |")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()
  log_lines = []

  def log(msg):
    print(msg, flush=True)
    log_lines.append(msg)

  work = tempfile.mkdtemp(prefix="jaxmed-ssfd-")
  trainer.enable_compilation_cache(os.path.join(work, "jit-cache"))
  cp_config = train_config(args, "context_prediction")
  subjects = datasets.load_subjects(cp_config.data)
  split = datasets.split_subjects(subjects, num_val=0, num_test=args.num_test, seed=args.seed)
  train_arrays = datasets.slice_view(split["train"], min_foreground=0.2)
  train_arrays = {"image": train_arrays["image"]}
  raw = test_images(split["test"], args.slices_per_subject)
  images = np.asarray(standardize(raw[..., None]))[..., 0]  # per-image z-score, as SSFD
  log(f"{len(subjects)} subjects {tuple(args.shape)}: {len(train_arrays['image'])} training "
      f"slices, {len(images)} test images")

  t = time.perf_counter()
  cp_method = ContextPredictionMethod(cp_config)
  if args.ssfd_weights:
    cp_variables = load_ssfd_unet(args.ssfd_weights, model=cp_method.model).variables
    log(f"SSFD weights from {args.ssfd_weights}")
  else:
    cp_variables, last = train(cp_config, cp_method, train_arrays, os.path.join(work, "ssfd"))
    log(f"context prediction: {args.ssfd_steps} steps, final L2 {last['loss']:.4f}, masked "
        f"L2 {last['masked_l2']:.4f} ({time.perf_counter() - t:.0f}s)")
  plot_fig4(cp_method, cp_variables, images, os.path.join(args.out, "fig4_context_prediction.png"))
  vgg, vgg_label = vgg_params(args, images.shape[1:])
  scorer = Scorer(encoder_params(cp_variables), vgg)

  t = time.perf_counter()
  study = perturbation_study(args, images, scorer)
  summary = perturbation_summary(study)
  plot_fig1(study, images, os.path.join(args.out, "fig1_perturbations.png"), args.seed)
  log(f"perturbation study: {len(PERTURBATIONS)} x {args.levels} levels x {len(images)} images "
      f"({time.perf_counter() - t:.0f}s)")

  t = time.perf_counter()
  rc_config = train_config(args, "reconstruction")
  rc_method = ReconstructionMethod(rc_config)
  rc_variables, last = train(rc_config, rc_method, train_arrays, os.path.join(work, "recon"))
  log(f"reconstruction UNet: {args.recon_steps} steps at {tuple(args.accelerations)}x, final L1 "
      f"{last['loss']:.4f}, PSNR {last['psnr']:.1f} dB (zero-filled "
      f"{last['psnr_zero_filled']:.1f} dB) ({time.perf_counter() - t:.0f}s)")
  pred, target, accel = reconstruct_all(rc_method, rc_variables, raw, args.accelerations,
                                        args.seed)
  # Score in the z-scored frame of the target (SSFD z-scores each image itself).
  mean = target.mean(axis=(1, 2), keepdims=True)
  std = target.std(axis=(1, 2), ddof=1, keepdims=True)
  recon = scorer((pred - mean) / std, (target - mean) / std, vgg=True)
  picks = rank_outliers(recon)
  plot_fig2(recon, accel, os.path.join(args.out, "fig2_layers.png"))
  plot_fig3(recon, pred, target, picks, vgg_label,
            os.path.join(args.out, "fig3_quality_control.png"))
  np.savez(os.path.join(args.out, "metrics.npz"), accel=accel,
           **{f"recon_{k}": v for k, v in recon.items()},
           **{f"{kind}_{k}": v for kind, res in study.items() for k, v in res.items()})

  layer_rows = []
  for name, layer in LAYERS.items():
    r, rho = correlations(recon["ssim"], recon[f"ssfd_{name}"])
    layer_rows.append({"layer": f"{name} ({layer})", "Pearson r with SSIM": r,
                       "Spearman rho with SSIM": rho})
  per_accel = []
  for a in args.accelerations:
    sel = accel == a
    per_accel.append({"acceleration": f"{a}x", "SSIM": recon["ssim"][sel].mean(),
                      "PSNR": recon["psnr"][sel].mean(), "SSFD": recon["ssfd"][sel].mean(),
                      vgg_label: recon["vgg"][sel].mean()})
  pick_rows = [{"example": label, "acceleration": f"{accel[i]:g}x", "SSIM": recon["ssim"][i],
                "PSNR": recon["psnr"][i], "SSFD": recon["ssfd"][i], vgg_label: recon["vgg"][i],
                "SSIM rank": float(scipy.stats.rankdata(-recon["ssim"])[i]),
                "SSFD rank": float(scipy.stats.rankdata(recon["ssfd"])[i])}
               for label, i in zip(("SSFD outlier (blue)", "good (orange)"), picks)]
  elapsed = time.perf_counter() - start
  report = [
      "# SSFD vs SSIM, PSNR and VGG-PL (phantoms, small scale)", "",
      f"{len(subjects)} subjects of shape {tuple(args.shape)} ({args.modality}); "
      f"{len(images)} z-scored test images from {args.num_test} held-out subjects; SSFD "
      f"layer {SSFD_LAYER} (9th convolution) unless stated; total {elapsed / 60:.1f} min.", "",
      "## Fig. 1 / 5: perturbations", "", "![fig1](fig1_perturbations.png)", "",
      table(summary), "",
      "R2: straight-line fit of the mean curve against the perturbation level (1 = linear; "
      "PSNR from the first non-zero level, as it is infinite at 0). SSFD per SSIM drop: SSFD "
      "increase divided by SSIM decrease from level 0 to the largest level.", "",
      "## Fig. 2: SSFD per encoder layer vs SSIM over reconstructions", "",
      "![fig2](fig2_layers.png)", "", table(layer_rows), "",
      "## Fig. 3 / 6: quality control", "", "![fig3](fig3_quality_control.png)", "",
      table(per_accel, "{:.4g}"), "", table(pick_rows, "{:.4g}"), "",
      f"Ranks over {len(pred)} reconstructions, 1 = best. {vgg_label}"
      + ("" if args.vgg_weights else ": no ImageNet weights can be downloaded here; pass "
         "--vgg-weights to use them") + ".", "",
      "![fig4](fig4_context_prediction.png)", "", "## Log", "", "```", *log_lines, "```"]
  with open(os.path.join(args.out, "report.md"), "w") as f:
    f.write("\n".join(report) + "\n")
  shutil.rmtree(work, ignore_errors=True)  # per-run checkpoints and the compilation cache
  print(f"wrote {args.out}/report.md ({elapsed / 60:.1f} min)")


if __name__ == "__main__":
  main()

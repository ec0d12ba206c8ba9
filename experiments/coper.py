"""CoPer: contrastive self-supervised features as a perceptual loss for multi-modal MRI synthesis
and as a perceptual metric. Tables III-IV and Figs. 3b, 6 and 8 of
``../shared/papers/coper_contrastive_perceptual_metric.md`` at small scale, on the phantoms.

    python experiments/coper.py --out runs/coper                  # default: ~30 min on 2 CPUs
    python experiments/coper.py --out runs/coper --resnet --table4 --lambda1 0 0.1 0.2 0.3 \
        0.4 0.5 0.6 0.8 0.9                                      # every row and the full sweep
    python experiments/coper.py --out runs/coper --task ms       # T1 + T2 -> FLAIR (WMH)
    python experiments/coper.py --out runs/coper --data-root /data/BraTS2018 --shape 155 240 240

1. Loss networks (Sec. III-A, IV-B): SwAV and SimSiam on the training subjects' slices of the
   synthesis target's modality (`jaxmed/configs/swav.py`, `simsiam.py`, ``size=small``: a
   quarter-width VGG16-BN), and a second SwAV network from another seed, used only to *score*
   (the CoPer column is never measured with the network that was the loss). Fig. 6: their loss
   curves.
2. Synthesis (Table III): pix2pix with ``L1`` only (the L1 row: ``lambda1 = 1``, no loss
   network), and ``lambda1 L1 + (1 - lambda1) L_CoPer + lambda2 L_adv`` through a random,
   a SimSiam and a SwAV VGG (``--resnet``: the same with ResNet-18 networks), each from
   ``--seeds`` (the loss networks are fixed; the seed changes the generator and discriminator
   initialisation and the batches). Every slice of every test volume is synthesised.
   Scores per test subject, averaged over its slices with at least ``--min-foreground`` brain:
   PSNR and SSIM (images in [0, 1], data range 1, Gaussian 11 / 1.5) and the CoPer distance
   (VGG taps of the scoring network, w = 1, summed over taps). Downstream: a 2D segmenter
   trained on the real training volumes (all modalities) segments every test volume whose
   target channel is replaced by the synthesis; Dice per region, with the real channel as the
   upper bound. Rows are compared by paired t-tests over (seed, test subject) pairs.
3. Table IV (``--table4``): the SwAV loss network trained on the other modality.
4. Fig. 8: the lambda1 sweep (`jaxmed/configs/coper_synthesis.py` ``get_sweep``): the values
   of ``--lambda1`` with the SwAV network, plus the table's SwAV row (the task's lambda1) and
   its L1 row (lambda1 = 1: the CoPer term's weight is 0, the objective is the L1 row's).
5. Fig. 3b analogue: per test slice with tumour, the distance between the real and the
   synthesised slice against the gap between two PROXY ratings (no radiologists here): the
   segmenter's Dice on the slice with the real and with the synthesised channel (Sec. IV-A4's
   normalisation). Correlations for L2, 1 - SSIM and CoPer.
6. A PROXY 2AFC table (`jaxmed.evaluate.two_afc.phantom_proxy_2afc`: distorted tumour phantom
   slices judged by the tumour-region error, not by people): L2, 1 - SSIM, and CoPer with the
   random, SimSiam, SwAV and scoring networks, and with tap weights learned from another proxy
   set (`learn_tap_weights`, LPIPS's ranking loss).

Writes ``<out>/report.md``, ``fig6_ssl_loss.png``, ``fig8_lambda1.png``,
``fig3b_rating_agreement.png``, ``montage.png`` and ``results.json``; the runs under
``<out>/runs``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import scipy.stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from jaxmed import metrics
from jaxmed.config import (apply_present_overrides, has_field, load_config, parse_overrides,
                           with_total_steps)
from jaxmed.configs import coper_synthesis as synthesis_configs
from jaxmed.data import datasets
from jaxmed.data.subject import label_regions, region_names
from jaxmed.evaluate import two_afc
from jaxmed.evaluate.compare import format_mean_std, format_p, paired_p_values
from jaxmed.methods.loss_network import network_variables
from jaxmed.methods.coper_synthesis import TASKS
from jaxmed.train import trainer
from jaxmed.train.init import subtree

IMAGE_METRICS = (("psnr", "PSNR (dB)", True), ("ssim", "SSIM", True),
                 ("coper", "CoPer", False))
ARCHS = {"vgg": ("vgg16_bn", "VGG"), "resnet": ("resnet18", "ResNet")}
OTHER_MODALITY = {"t2": "flair", "flair": "t2"}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="runs/coper")
  p.add_argument("--task", default="tumour", choices=sorted(TASKS))
  p.add_argument("--data-root", default="", help="a NIfTI folder instead of phantoms")
  p.add_argument("--num-subjects", type=int, default=24)
  p.add_argument("--num-test", type=int, default=6)
  p.add_argument("--shape", type=int, nargs=3, default=(40, 64, 64), metavar=("D", "H", "W"))
  p.add_argument("--seeds", type=int, nargs="+", default=(0, 1, 2))
  p.add_argument("--steps", type=int, default=200, help="synthesis steps per run")
  p.add_argument("--ssl-steps", type=int, default=300, help="SwAV / SimSiam steps")
  p.add_argument("--seg-steps", type=int, default=300, help="downstream segmenter steps")
  p.add_argument("--lambda1", type=float, nargs="*", default=(0.0, 0.4, 0.9),
                 help="Fig. 8 values besides the task's and 1.0 (from the config sweep)")
  p.add_argument("--lambda2", default="", help="'paper' (10) or a number; default pix2pix's")
  p.add_argument("--resnet", action="store_true", help="also the ResNet-18 rows")
  p.add_argument("--table4", action="store_true",
                 help="also SwAV trained on the other modality (Table IV)")
  p.add_argument("--min-foreground", type=float, default=0.1,
                 help="brain fraction of the scored slices")
  p.add_argument("--proxy-subjects", type=int, default=8, help="phantoms of each 2AFC set")
  p.add_argument("--tap-steps", type=int, default=300, help="steps of the learned tap weights")
  p.add_argument("--tap-lr", type=float, default=1e-2,
                 help="their Adam lr (LPIPS's 1e-4 suits its small random init; from w = 1 "
                      "it hardly moves them in a few hundred steps)")
  p.add_argument("--data-seed", type=int, default=0)
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="an override for every config (SSL, synthesis, segmenter) with that "
                      "field, e.g. batch_size=4")
  args = p.parse_args(argv)
  kinds = [ssl_config(args, "swav", "vgg", "t2", 0), synthesis_config(args, "random", "vgg", 0),
           segmenter_config(args, ("t1",), "tumour")] if args.set else []
  for field in parse_overrides(args.set):
    if not any(has_field(c, field) for c in kinds):
      raise ValueError(f"--set {field}: no SSL, synthesis or segmenter config has this field")
  return args


# --- Configs ---------------------------------------------------------------------------------

def _data_overrides(args) -> dict:
  out = {"data.num_subjects": args.num_subjects, "data.num_test": args.num_test,
         "data.num_val": 0, "data.shape": tuple(args.shape), "data.seed": args.data_seed}
  if args.data_root:
    out["data.root"] = args.data_root
  return out


def _with_set(config, args):
  """``config`` with the ``--set`` overrides of the fields it has."""
  return apply_present_overrides(config, parse_overrides(args.set))


def _run_overrides(seed: int) -> dict:
  return {"seed": seed, "tensorboard": False, "checkpoint.every": 0,
          "checkpoint.async_save": False}


def ssl_config(args, method: str, arch: str, modality: str, seed: int):
  """The shipped SwAV / SimSiam config at ``size=small`` on ``modality``."""
  config = load_config(f"{method}:backbone={ARCHS[arch][0]},modality={modality},size=small",
                       {**_data_overrides(args), **_run_overrides(seed)})
  return with_total_steps(_with_set(config, args), args.ssl_steps)


def synthesis_config(args, loss_net: str, arch: str, seed: int, lambda1: float | None = None):
  """The shipped ``coper_synthesis`` config at ``size=small``; ``loss_net`` "none", "random"
  or a pre-training run folder."""
  spec = [f"task={args.task}", f"loss_net={loss_net}", f"loss_arch={ARCHS[arch][0]}",
          "size=small"]
  if lambda1 is not None:
    spec.append(f"lambda1={lambda1}")
  if args.lambda2:
    spec.append(f"lambda2={args.lambda2}")
  overrides = {**_data_overrides(args), **_run_overrides(seed),
               "data.min_foreground": args.min_foreground}
  config = load_config("coper_synthesis:" + ",".join(spec), overrides)
  return with_total_steps(_with_set(config, args), args.steps)


def segmenter_config(args, modalities, pathology):
  """A 2D UNet (``finetune:size=small``) trained on every slice of the real training volumes."""
  config = load_config("finetune:size=small", {
      **_data_overrides(args), **_run_overrides(0),
      "data.modalities": tuple(modalities), "data.pathology": pathology})
  return with_total_steps(_with_set(config, args), args.seg_steps)


def sweep_values(args) -> list[float]:
  """``--lambda1`` values, each checked against the config's Fig. 8 sweep."""
  grid = [s["loss.lambda1"] for s in synthesis_configs.get_sweep(f"task={args.task}")]
  for v in args.lambda1:
    if not any(abs(v - g) < 1e-9 for g in grid):
      raise ValueError(f"--lambda1 {v} is not in the config sweep {grid}")
  return sorted(set(round(v, 2) for v in args.lambda1) - {TASKS[args.task]["lambda1"], 1.0})


# --- Training --------------------------------------------------------------------------------

def with_channels(subjects, modalities):
  """The subjects restricted to ``modalities`` (channels in that order)."""
  out = []
  for s in subjects:
    index = [s.modalities.index(m) for m in modalities]
    out.append(dataclasses.replace(s, image=s.image[..., index], modalities=tuple(modalities)))
  return out


def train(config, workdir, subjects):
  result = trainer.train(config, workdir, subjects=subjects, progress=False)
  return result.method, jax.device_get(result.state.variables), result.last_metrics


def read_curve(workdir: str, key: str = "loss") -> tuple[np.ndarray, np.ndarray]:
  """``(steps, values)`` of ``key`` from a run's ``metrics.jsonl``."""
  steps, values = [], []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if key in row:
        steps.append(row["step"])
        values.append(row[key])
  return np.asarray(steps), np.asarray(values)


# --- Evaluation ------------------------------------------------------------------------------

@dataclasses.dataclass
class Scorer:
  """Per-slice metrics of synthesised against real target slices, ``(N, H, W, 1)`` in [-1, 1]."""
  network: dict  # the scoring network's variables (params, batch_stats)

  def __call__(self, real, fake) -> dict[str, np.ndarray]:
    real01, fake01 = (real + 1.0) * 0.5, (fake + 1.0) * 0.5
    return {"psnr": np.asarray(metrics.psnr(fake01, real01, data_range=1.0)),
            "ssim": np.asarray(metrics.ssim(fake01, real01, data_range=1.0)),
            "coper": np.asarray(metrics.coper_distance(fake, real, params=self.network)),
            "l2": np.asarray(jnp.mean((fake01 - real01) ** 2, axis=(1, 2, 3)))}


def synthesize_volumes(method, variables, subjects) -> list[np.ndarray]:
  """Every slice of every subject synthesised: ``(D, H, W, T)`` in [-1, 1] per subject."""
  fn = jax.jit(method.synthesize)
  return [np.asarray(fn(variables, s.image)) for s in subjects]


def real_targets(method, subjects) -> list[np.ndarray]:
  """The subjects' normalised target channels ``(D, H, W, T)`` in [-1, 1]."""
  fn = jax.jit(lambda image: method.prepare({"image": image})[1])
  return [np.asarray(fn(s.image)) for s in subjects]


def scored_slices(subject, min_foreground: float) -> np.ndarray:
  """Indices of the slices with at least ``min_foreground`` brain (the training criterion)."""
  picked = np.flatnonzero(subject.brain_mask.mean(axis=(1, 2)) >= min_foreground)
  if not picked.size:
    raise ValueError(f"subject {subject.subject_id} has no slice with >= {min_foreground} brain")
  return picked


def replaced_target(method, subject, fake) -> np.ndarray:
  """The subject's image with its target channels replaced by ``fake`` (denormalised)."""
  image = subject.image.copy()
  image[..., list(method.target_index)] = np.asarray(method.denormalize(fake))
  return image


class Segmenter:
  """A trained 2D segmenter applied slice by slice to whole volumes."""

  def __init__(self, method, variables):
    self.method, self.variables = method, variables
    self.regions = method.regions

  def predict(self, image: np.ndarray) -> np.ndarray:
    return np.asarray(self.method.jitted_predict(self.variables, jnp.asarray(image)))

  def volume_dice(self, image, label) -> np.ndarray:
    """``(R,)`` Dice of the volume's prediction (nan where prediction and truth are empty)."""
    truth = label_regions(label, self.method.config.data.pathology)
    return np.asarray(metrics.dice(self.predict(image)[None], truth[None]))[0]

  def slice_dice(self, image, label, slices) -> np.ndarray:
    """``(len(slices),)`` Dice of the first region (WT / WMH) on each slice."""
    truth = label_regions(label[slices], self.method.config.data.pathology)[..., :1]
    pred = self.predict(image[slices])[..., :1]
    return np.asarray(metrics.dice(pred, truth, empty=1.0))[:, 0]


def evaluate_run(method, variables, test, segmenter, scorer, min_foreground):
  """Per test subject: mean PSNR / SSIM / CoPer / L2 over its scored slices and the volume
  Dice per region; plus the per-slice records of the tumour slices (Fig. 3b) and the volumes."""
  fakes = synthesize_volumes(method, variables, test)
  reals = real_targets(method, test)
  per_subject = {k: [] for k in ("psnr", "ssim", "coper", "l2", "dice")}
  slices = {k: [] for k in ("l2", "1-ssim", "coper", "dice_real", "dice_fake")}
  for subject, real, fake in zip(test, reals, fakes):
    picked = scored_slices(subject, min_foreground)
    per_target = [scorer(real[picked][..., t:t + 1], fake[picked][..., t:t + 1])
                  for t in range(real.shape[-1])]
    for k in ("psnr", "ssim", "coper", "l2"):
      per_subject[k].append(float(np.mean([s[k] for s in per_target])))
    first = per_target[0]  # per-slice scores of the first target (Fig. 3b)
    image = replaced_target(method, subject, fake)
    per_subject["dice"].append(segmenter.volume_dice(image, subject.label))
    lesion = np.flatnonzero(label_regions(subject.label, method.config.data.pathology)[..., 0]
                            .sum(axis=(1, 2)) > 0)
    lesion = np.intersect1d(lesion, picked)
    if lesion.size:
      at = np.searchsorted(picked, lesion)  # lesion slices are scored slices: reuse their scores
      slices["l2"].append(first["l2"][at])
      slices["1-ssim"].append(1.0 - first["ssim"][at])
      slices["coper"].append(first["coper"][at])
      slices["dice_real"].append(segmenter.slice_dice(subject.image, subject.label, lesion))
      slices["dice_fake"].append(segmenter.slice_dice(image, subject.label, lesion))
  out = {k: np.asarray(v, np.float64) for k, v in per_subject.items()}
  out["slices"] = {k: np.concatenate(v) if v else np.zeros(0) for k, v in slices.items()}
  out["fakes"] = fakes
  return out


# --- Report ----------------------------------------------------------------------------------

def pooled(results: dict, row: str, key: str) -> np.ndarray:
  """``(seeds x subjects, K)`` of a per-subject score over the row's seeds."""
  return np.concatenate([np.asarray(r[key], np.float64).reshape(len(r[key]), -1)
                         for r in results[row]])


def table_iii(results, rows, baseline, regions, upper) -> str:
  head = ["Loss"] + [name for _, name, _ in IMAGE_METRICS] + [f"Dice {r}" for r in regions]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    cells = [row]
    for key, _, _ in IMAGE_METRICS:
      v = pooled(results, row, key)[:, 0]
      cell = format_mean_std(v, 2 if key == "psnr" else 3)
      if row != baseline:
        cell += f" p={format_p(paired_p_values(v[:, None], pooled(results, baseline, key))[0])}"
      cells.append(cell)
    dice = pooled(results, row, "dice")
    base = pooled(results, baseline, "dice")
    p = paired_p_values(dice, base)
    for i in range(len(regions)):
      cell = format_mean_std(dice[:, i])
      if row != baseline:
        cell += f" p={format_p(p[i])}"
      cells.append(cell)
    lines.append("| " + " | ".join(cells) + " |")
  up = np.asarray(upper)
  lines.append("| real channel (upper bound) | - | - | - | "
               + " | ".join(format_mean_std(up[:, i]) for i in range(len(regions))) + " |")
  return "\n".join(lines)


def comparisons(results, pairs, regions) -> str:
  """Mean paired difference (a - b) and its p-value for each pair of rows."""
  keys = [(k, n) for k, n, _ in IMAGE_METRICS] + [("dice", f"Dice {regions[0]}")]
  lines = ["| a vs b | " + " | ".join(n for _, n in keys) + " |", "|" + "---|" * (len(keys) + 1)]
  for a, b in pairs:
    if a not in results or b not in results:
      continue
    cells = []
    for key, _ in keys:
      va, vb = pooled(results, a, key)[:, :1], pooled(results, b, key)[:, :1]
      d = va - vb
      cells.append(f"{np.nanmean(d):+.3f} (p={format_p(paired_p_values(va, vb)[0])})")
    lines.append(f"| {a} vs {b} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def run_means(results, rows, key, column=0) -> np.ndarray:
  """Per-run (row, seed) means of a per-subject score, nan-aware."""
  return np.asarray([np.nanmean(np.asarray(r[key], np.float64).reshape(len(r[key]), -1)[:, column])
                     for row in rows for r in results[row]])


def plot_fig6(curves: dict, path: str):
  fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.2), squeeze=False)
  for ax, (name, (steps, values)) in zip(axes[0], curves.items()):
    ax.plot(steps, values, "-o", ms=3)
    ax.set(xlabel="step", ylabel="loss", title=name)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_fig8(sweep: dict, path: str):
  """``sweep``: lambda1 -> list of per-seed results."""
  lams = sorted(sweep)
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
  for ax, (key, name, _) in zip(axes, IMAGE_METRICS):
    per_seed = np.asarray([[np.mean(r[key]) for r in sweep[l]] for l in lams])
    ax.errorbar(lams, per_seed.mean(1), yerr=per_seed.std(1), fmt="-o", capsize=3)
    ax.set(xlabel="lambda1", ylabel=name)
    ax.grid(alpha=0.3)
  fig.suptitle("Fig. 8 analogue: lambda1 (mean, std over seeds of the test-subject mean)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_fig3b(agreement: dict, path: str):
  fig, axes = plt.subplots(1, len(agreement), figsize=(4 * len(agreement), 3.4), squeeze=False)
  for ax, (name, a) in zip(axes[0], agreement.items()):
    ax.scatter(a["rating"], a["distance"], s=6, alpha=0.5)
    ax.set(xlabel="R' (proxy rating gap)", ylabel="D'",
           title=f"{name}: Spearman {a['spearman']:.2f}")
    ax.grid(alpha=0.3)
  fig.suptitle("Fig. 3b analogue (PROXY ratings: the segmenter's slice Dice, not experts)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_montage(test, method, results, rows, path: str):
  """The test slice with the largest lesion: inputs, the real target and each row's synthesis
  (first seed)."""
  pathology = method.config.data.pathology
  areas = [label_regions(s.label, pathology)[..., 0].sum(axis=(1, 2)) for s in test]
  i = int(np.argmax([a.max() for a in areas]))
  z = int(np.argmax(areas[i]))
  subject = test[i]
  real = np.asarray(method.normalize(subject.image[z][None]))[0]
  panels = [(m, real[..., method.input_index[k]]) for k, m in enumerate(method.inputs)]
  panels.append((f"real {method.targets[0]}", real[..., method.target_index[0]]))
  panels += [(row, results[row][0]["fakes"][i][z, ..., 0]) for row in rows]
  fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.5))
  for ax, (title, img) in zip(axes, panels):
    ax.imshow(img, cmap="gray", vmin=-1, vmax=1)
    ax.set_title(title, fontsize=7)
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


# --- 2AFC proxy ------------------------------------------------------------------------------

def proxy_2afc(args, networks: dict, modality: str) -> tuple[str, dict]:
  """The PROXY 2AFC table: traditional distances and CoPer with each network; CoPer with tap
  weights learned on a second proxy set (another seed) of the scoring network."""
  test = two_afc.phantom_proxy_2afc(args.proxy_subjects, seed=1000 + args.data_seed,
                                    modality=modality)
  fit = two_afc.phantom_proxy_2afc(args.proxy_subjects, seed=2000 + args.data_seed,
                                   modality=modality)
  grey = lambda x: (x[..., :1] + 1.0) * 0.5  # noqa: E731

  @jax.jit
  def l2(x, y):
    return jnp.mean((grey(x) - grey(y)) ** 2, axis=(1, 2, 3))

  @jax.jit
  def one_minus_ssim(x, y):
    return 1.0 - metrics.ssim(grey(x), grey(y), data_range=1.0)

  coper = jax.jit(lambda x, y, v: metrics.coper_distance(x, y, params=v))  # one compile
  distances = {"L2": l2, "1 - SSIM": one_minus_ssim}
  for name, variables in networks.items():
    distances[f"CoPer {name}"] = functools.partial(coper, v=variables)
  scorer_name, scorer_vars = list(networks.items())[-1]
  diffs = functools.partial(metrics.squared_tap_differences, params=scorer_vars)
  weights = two_afc.learn_tap_weights(diffs, fit, steps=args.tap_steps, seed=0, dropout=0.0,
                                      init="ones", learning_rate=args.tap_lr)
  distances[f"CoPer {scorer_name} + learned w"] = two_afc.tap_weighted_distance(diffs, weights)
  results = {name: two_afc.two_afc_evaluate(fn, test) for name, fn in distances.items()}
  summary = {name: {"overall": r["overall"],
                    "categories": {c: v["score"] for c, v in r["categories"].items()}}
             for name, r in results.items()}
  return two_afc.two_afc_table(results), summary


# --- Main ------------------------------------------------------------------------------------

def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  runs = os.path.join(args.out, "runs")
  start = time.perf_counter()
  lines = []

  def log(msg):
    print(msg, flush=True)
    lines.append(msg)

  trainer.enable_compilation_cache(os.path.join(args.out, "jit-cache"))
  task = TASKS[args.task]
  target = task["targets"][0]
  modalities = task["inputs"] + task["targets"]
  lambdas = sweep_values(args)  # checked before any training
  base = synthesis_config(args, "none", "vgg", args.seeds[0])
  splits = datasets.load_splits(base.data)
  train_subjects, test = splits["train"], splits["test"]
  log(f"task {args.task}: {'+'.join(task['inputs'])} -> {target}; {len(train_subjects)} "
      f"training and {len(test)} test subjects {tuple(args.shape)}; seeds {list(args.seeds)}")

  # 1. Loss networks and the scoring network (Fig. 6).
  archs = ["vgg"] + (["resnet"] if args.resnet else [])
  ssl_runs = {}  # (method, arch, modality, seed) -> workdir
  ssl_variables = {}
  curves = {}
  ssl_jobs = [("swav", a, target, 0) for a in archs] + [("simsiam", a, target, 0) for a in archs]
  ssl_jobs.append(("swav", "vgg", target, 1))  # the scorer
  if args.table4:
    ssl_jobs.append(("swav", "vgg", OTHER_MODALITY[target], 0))
  for job in ssl_jobs:
    method_name, arch, modality, seed = job
    t = time.perf_counter()
    workdir = os.path.join(runs, f"{method_name}_{arch}_{modality}_s{seed}")
    config = ssl_config(args, method_name, arch, modality, seed)
    _, variables, last = train(config, workdir, with_channels(train_subjects, (modality,)))
    ssl_runs[job], ssl_variables[job] = workdir, variables
    if arch == "vgg" and seed == 0 and modality == target:
      curves[f"{method_name} {ARCHS[arch][1]} ({modality})"] = read_curve(workdir)
    log(f"{method_name} {ARCHS[arch][1]} on {modality} (seed {seed}): {args.ssl_steps} steps, "
        f"final loss {last['loss']:.4f} ({time.perf_counter() - t:.0f}s)")
  plot_fig6(curves, os.path.join(args.out, "fig6_ssl_loss.png"))
  scorer_net = subtree(ssl_variables[("swav", "vgg", target, 1)], "backbone")
  scorer = Scorer(scorer_net)

  # 2. The downstream segmenter on real volumes.
  t = time.perf_counter()
  seg_cfg = segmenter_config(args, modalities, task["pathology"])
  seg_method, seg_vars, _ = train(seg_cfg, os.path.join(runs, "segmenter"),
                                  with_channels(train_subjects, modalities))
  segmenter = Segmenter(seg_method, seg_vars)
  regions = region_names(task["pathology"])
  upper = [segmenter.volume_dice(s.image, s.label) for s in with_channels(test, modalities)]
  log(f"segmenter: {args.seg_steps} steps; real-channel test Dice "
      + ", ".join(f"{r} {np.nanmean(np.asarray(upper)[:, i]):.3f}" for i, r in enumerate(regions))
      + f" ({time.perf_counter() - t:.0f}s)")

  # 3. Synthesis runs: Table III (+ IV) and the lambda1 sweep.
  rows = {"L1": ("none", "vgg", None)}
  for arch in archs:
    label = ARCHS[arch][1]
    rows[f"L1 + rand. {label}"] = ("random", arch, None)
    rows[f"L1 + SimSiam-{label}"] = (ssl_runs[("simsiam", arch, target, 0)], arch, None)
    rows[f"L1 + SwAV-{label}"] = (ssl_runs[("swav", arch, target, 0)], arch, None)
  swav_row = "L1 + SwAV-VGG"
  if args.table4:
    other = OTHER_MODALITY[target]
    rows[f"L1 + SwAV-VGG ({other})"] = (ssl_runs[("swav", "vgg", other, 0)], "vgg", None)
  for lam in lambdas:
    rows[f"lambda1={lam}"] = (ssl_runs[("swav", "vgg", target, 0)], "vgg", lam)
  test_subjects = with_channels(test, modalities)
  results = {}
  method = None
  for row, (loss_net, arch, lam) in rows.items():
    results[row] = []
    for seed in args.seeds:
      t = time.perf_counter()
      config = synthesis_config(args, loss_net, arch, seed, lam)
      name = row.replace(" ", "").replace("+", "_").replace("=", "").replace(".", "")
      method, variables, last = train(config, os.path.join(runs, f"syn_{name}_s{seed}"),
                                      with_channels(train_subjects, modalities))
      r = evaluate_run(method, variables, test_subjects, segmenter, scorer, args.min_foreground)
      r["lambda1"] = float(config.loss.lambda1)
      if loss_net == "random" and seed == args.seeds[0]:
        ssl_variables[("random", arch)] = network_variables(variables, "loss_net")
      results[row].append(r)
      log(f"{row} seed {seed}: train L1 {last['l1']:.4f} L_CoPer {last['coper']:.4f}; test "
          f"PSNR {np.mean(r['psnr']):.2f} SSIM {np.mean(r['ssim']):.3f} CoPer "
          f"{np.mean(r['coper']):.3f} Dice {regions[0]} "
          f"{np.nanmean(np.asarray(r['dice'])[:, 0]):.3f} ({time.perf_counter() - t:.0f}s)")

  table_rows = [r for r in rows if not r.startswith("lambda1=")]
  table3 = table_iii(results, table_rows, "L1", regions, upper)
  pairs = [(f"L1 + rand. {ARCHS[a][1]}", "L1") for a in archs]
  for a in archs:
    label = ARCHS[a][1]
    pairs += [(f"L1 + SimSiam-{label}", f"L1 + rand. {label}"),
              (f"L1 + SwAV-{label}", f"L1 + rand. {label}"),
              (f"L1 + SwAV-{label}", f"L1 + SimSiam-{label}")]
  if args.resnet:
    pairs += [("L1 + SwAV-VGG", "L1 + SwAV-ResNet"), ("L1 + SimSiam-VGG", "L1 + SimSiam-ResNet")]
  if args.table4:
    pairs.append((swav_row, f"L1 + SwAV-VGG ({OTHER_MODALITY[target]})"))
  table_pairs = comparisons(results, pairs, regions)

  # Does better synthesis give better downstream Dice? Over runs (row, seed).
  run_psnr = run_means(results, table_rows, "psnr")
  run_dice = run_means(results, table_rows, "dice")
  rho, rho_p = scipy.stats.spearmanr(run_psnr, run_dice)

  # Fig. 8.
  sweep = {results[row][0]["lambda1"]: results[row] for row in results
           if row.startswith("lambda1=") or row in ("L1", swav_row)}
  plot_fig8(sweep, os.path.join(args.out, "fig8_lambda1.png"))
  sweep_lines = ["| lambda1 | PSNR (dB) | SSIM | CoPer | Dice " + regions[0] + " |",
                 "|---|---|---|---|---|"]
  for lam in sorted(sweep):
    rs = sweep[lam]
    per_seed = {k: [np.nanmean(np.asarray(r[k], np.float64).reshape(len(r[k]), -1)[:, 0])
                    for r in rs] for k in ("psnr", "ssim", "coper", "dice")}
    sweep_lines.append(f"| {lam:.2f} | " + " | ".join(
        format_mean_std(per_seed[k], 2 if k == "psnr" else 3)
        for k in ("psnr", "ssim", "coper", "dice")) + " |")
  best = {k: max(sweep, key=lambda lam, k=k: np.mean([np.mean(r[k]) for r in sweep[lam]]))
          for k in ("psnr", "ssim")}

  # Fig. 3b analogue: every table row's first seed.
  agree = {}
  for dist in ("l2", "1-ssim", "coper"):
    d = np.concatenate([results[row][0]["slices"][dist] for row in table_rows])
    real = np.concatenate([results[row][0]["slices"]["dice_real"] for row in table_rows])
    fake = np.concatenate([results[row][0]["slices"]["dice_fake"] for row in table_rows])
    agree[{"l2": "L2", "1-ssim": "1 - SSIM", "coper": "CoPer"}[dist]] = \
        two_afc.rating_agreement(np.maximum(d, 0.0), real, fake, is_proxy=True)
  plot_fig3b(agree, os.path.join(args.out, "fig3b_rating_agreement.png"))
  plot_montage(test_subjects, method, results, table_rows, os.path.join(args.out, "montage.png"))

  # 4. The 2AFC proxy table.
  t = time.perf_counter()
  networks = {"rand. VGG": ssl_variables[("random", "vgg")],
              "SimSiam-VGG": subtree(ssl_variables[("simsiam", "vgg", target, 0)], "backbone"),
              "SwAV-VGG": subtree(ssl_variables[("swav", "vgg", target, 0)], "backbone"),
              "SwAV-VGG (scorer)": scorer_net}
  table_2afc, summary_2afc = proxy_2afc(args, networks, target)
  log(f"2AFC proxy: {len(networks) + 3} distances ({time.perf_counter() - t:.0f}s)")

  minutes = (time.perf_counter() - start) / 60
  report = [
      f"# CoPer at small scale ({args.task}: {' + '.join(task['inputs'])} -> {target})", "",
      f"{len(train_subjects)} training / {len(test)} test phantoms {tuple(args.shape)}"
      f"{' from ' + args.data_root if args.data_root else ''}; synthesis {args.steps} steps per "
      f"run, seeds {list(args.seeds)}; SwAV / SimSiam {args.ssl_steps} steps (quarter-width "
      f"networks); segmenter {args.seg_steps} steps on the real training volumes. Total "
      f"{minutes:.1f} min.", "",
      "## Table III analogue", "",
      f"Mean (std) over (seed, test subject) pairs, n = {len(args.seeds) * len(test)}; p: paired "
      "t-test against the L1 row. PSNR / SSIM / CoPer on slices with >= "
      f"{args.min_foreground:.0%} brain, images in [0, 1]; CoPer scored by a SwAV VGG trained "
      "from another seed (not a loss network). Dice: the segmenter on test volumes whose "
      f"{target} channel is synthesised.", "", table3, "",
      "Paired differences (a - b):", "", table_pairs, "",
      f"Better synthesis, better Dice? Spearman over the {len(run_psnr)} runs between mean PSNR "
      f"and mean {regions[0]} Dice: {rho:.2f} (p = {format_p(rho_p)}).", "",
      "## Fig. 8 analogue: lambda1 (SwAV-VGG loss network)", "",
      "Mean (std) over seeds of the per-run test mean; lambda1 = 1 is the L1 row.", "",
      "\n".join(sweep_lines), "",
      f"Best lambda1: PSNR {best['psnr']}, SSIM {best['ssim']} "
      f"({'interior' if 0 < best['psnr'] < 1 else 'at an end'} for PSNR).", "",
      "## Fig. 3b analogue (PROXY ratings)", "",
      "Tumour slices of every table row (first seed): the normalised distance between the real "
      "and the synthesised slice against the normalised gap between the segmenter's slice Dice "
      "with the real and with the synthesised channel (a proxy for expert ratings).", "",
      "| Distance | Pearson | Spearman | mean abs gap |", "|---|---|---|---|",
      *[f"| {n} | {a['pearson']:.3f} | {a['spearman']:.3f} | {a['mean_abs_gap']:.3f} |"
        for n, a in agree.items()], "",
      "## 2AFC on the phantom PROXY set", "", table_2afc, "",
      "## Fig. 6: SSL loss curves", "", "`fig6_ssl_loss.png`; montage: `montage.png`.", "",
      "## Log", "", *[f"    {line}" for line in lines]]
  with open(os.path.join(args.out, "report.md"), "w") as f:
    f.write("\n".join(report) + "\n")
  summary = {"args": vars(args), "minutes": minutes,
             "rows": {row: {k: [np.asarray(r[k]).tolist() for r in results[row]]
                            for k in ("psnr", "ssim", "coper", "dice")} for row in results},
             "upper_dice": np.asarray(upper).tolist(), "regions": list(regions),
             "spearman_psnr_dice": [float(rho), float(rho_p)], "two_afc": summary_2afc}
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(summary, f, indent=1, default=float)
  print("\n".join(report[:30]))
  return summary


if __name__ == "__main__":
  main()

"""Source identification (SI) vs the Models Genesis baselines: Tables 1-2 and Fig. 5 of
``../shared/papers/source_identification.md`` at small scale, on the embedded phantoms.

    python experiments/source_identification.py --out runs/si          # default small size
    python experiments/source_identification.py --out runs/si --repeats 3 --num-subjects 40 \
        --pretrain-steps 2000 --finetune-steps 2000 --shape 64 96 96 \
        --datasets tumour,wmh                                          # closer to the paper
    python experiments/source_identification.py --out runs/si --data-root /data/BraTS2018 \
        --datasets tumour                                              # your own NIfTI files

For every dataset (BraTS-like tumours: WT / TC / ET / All, the default; white matter
hyperintensities: WMH, with ``--datasets tumour,wmh``) and every repeat (a random subject split: train / val / test), each row of the tables is
pre-trained on the training subjects' slices without labels, then fine-tuned on all training
labels (Table 1) and on a few subjects' labels (Table 2) with the protocol of Sec. 5.5 (new
input / output layers, rotation / scaling / flip / elastic augmentation, early stopping on the
validation Dice; ``--optimizer sgd`` for the paper's SGD, momentum 0.99, poly schedule, weight
decay 3e-5, Adam by default at this size), and tested in 3D on the test subjects. Rows: CNN (scratch),
CNN-restart (a second optimisation started from the scratch model), in-painting, local pixel
shuffling, non-linear intensity, super-resolution, and SI with denoising (DSI), within-patient
(WSI) and cross-patient (CSI) sources. Each cell is mean (std) Dice over every test subject of
every repeat; ``*`` / ``◇``: significantly better / worse than CNN (two-sided paired t-test,
p < 0.05, pairs = the same test subject in the same repeat); bold: best and not significantly
different from it. Fig. 5: CSI, WSI and DSI with (N, N~) in (3, 2), (5, 3), (7, 4) on the first
dataset's first split, full labels.

Writes ``<out>/report.md`` (tables, timings, settings), ``<out>/fig5_num_sources.png``,
``<out>/pretext_examples.png`` and ``<out>/scores.npz`` (every Dice value).
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import tempfile
import time

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from jaxmed.config import load_config
from jaxmed.data import datasets
from jaxmed.evaluate import compare
from jaxmed.evaluate import finetune as finetune_lib
from jaxmed.methods import get_method
from jaxmed.train import trainer

# Table rows: name -> pre-training overrides (None: no pre-training).
ROWS = {
    "CNN": None,
    "CNN-restart": "restart",
    "Inpainting": {"method": "restoration", "pretext.corruption": "inpaint"},
    "Pixel shuffle": {"method": "restoration", "pretext.corruption": "local_shuffle"},
    "Intensity": {"method": "restoration", "pretext.corruption": "intensity"},
    "Super-resolve": {"method": "restoration", "pretext.corruption": "super_resolution"},
    "Denoising SI": {"method": "si", "pretext.strategy": "denoise"},
    "Within-patient SI": {"method": "si", "pretext.strategy": "within"},
    "Cross-patients SI": {"method": "si", "pretext.strategy": "cross"},
}
FIG5_SOURCES = ((3, 2), (5, 3), (7, 4))
FIG5_STRATEGIES = {"CSI": "cross", "WSI": "within", "DSI": "denoise"}
SETTINGS = ("full", "few")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="runs/source_identification")
  p.add_argument("--datasets", default="tumour", help="comma-separated: tumour, wmh (the WMH "
                 "phantoms' lesions, 10-60 voxels at the default size, need many more steps)")
  p.add_argument("--data-root", default="", help="a NIfTI folder instead of phantoms "
                 "(use with a single --datasets entry)")
  p.add_argument("--modalities", default="", help="comma-separated channels (default: all "
                 "four for tumour, t1,flair for wmh as in the WMH challenge)")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--num-subjects", type=int, default=14)
  p.add_argument("--num-val", type=int, default=2)
  p.add_argument("--num-test", type=int, default=4)
  p.add_argument("--few-labels", type=int, default=2, help="labelled subjects in Table 2")
  p.add_argument("--shape", type=int, nargs=3, default=(32, 48, 48), metavar=("D", "H", "W"))
  p.add_argument("--features", type=int, nargs="+", default=(8, 16, 32, 64))
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--pretrain-steps", type=int, default=150)
  p.add_argument("--finetune-steps", type=int, default=300)
  p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                 help="sgd: the paper's SGD (momentum 0.99, lr 1e-2, poly, weight decay 3e-5); "
                 "adam (default): Adam with warm-up + cosine, which learns in the few hundred "
                 "steps of the default size (SGD stays at the all-background solution there)")
  p.add_argument("--eval-every", type=int, default=50)
  p.add_argument("--patience", type=int, default=2)
  p.add_argument("--min-steps", type=int, default=None,
                 help="no early stop before this step (default: half of --finetune-steps)")
  p.add_argument("--fg-fraction", type=float, default=0.33,
                 help="fraction of fine-tuning slices drawn among those with a labelled voxel "
                      "(data.fg_fraction; nnU-Net oversamples a third; 0: uniform slices)")
  p.add_argument("--rows", default=",".join(ROWS), help="comma-separated table rows")
  p.add_argument("--no-fig5", action="store_true", help="skip Fig. 5")
  p.add_argument("--fig5-strategies", default=",".join(FIG5_STRATEGIES),
                 help="comma-separated subset of CSI, WSI, DSI for Fig. 5")
  p.add_argument("--fig5-sources", default=" ".join(f"{n},{k}" for n, k in FIG5_SOURCES),
                 help="space-separated N,N~ pairs for Fig. 5")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def make_configs(args, pathology: str):
  """``(pre_config, finetune_config)`` for one dataset: ``pre_config(spec)`` is the shipped
  config named by ``spec["method"]`` with the experiment's and the row's overrides; the
  fine-tuning config is the shipped ``finetune`` (the Sec. 5.5.3 protocol) with the same data."""
  modalities = (tuple(args.modalities.split(",")) if args.modalities else
                ("t1", "t1ce", "t2", "flair") if pathology == "tumour" else ("t1", "flair"))
  shared = {"data.pathology": pathology, "data.modalities": modalities,
            "data.num_subjects": args.num_subjects, "data.shape": tuple(args.shape),
            "data.num_val": args.num_val, "data.num_test": args.num_test,
            "data.seed": args.seed, "seed": args.seed, "model.features": tuple(args.features),
            "batch_size": args.batch_size, "checkpoint.every": 0,
            "checkpoint.async_save": False, "tensorboard": False}
  if args.data_root:
    shared["data.root"] = args.data_root  # data.source "auto": a NIfTI folder
  adam = {"optim.name": "adam", "optim.schedule": "cosine", "optim.weight_decay": 0.0,
          "optim.grad_clip": 1.0} if args.optimizer == "adam" else {}

  def pre_config(spec: dict):
    spec = dict(spec)
    name = spec.pop("method")
    return load_config(name, {
        **shared, "total_steps": args.pretrain_steps,
        "log_every": max(1, args.pretrain_steps // 4),
        **({**adam, "optim.lr": 2e-3, "optim.warmup_steps": min(10, args.pretrain_steps // 10)}
           if adam else {}), **spec})

  ft = load_config("finetune", {
      **shared, "total_steps": args.finetune_steps,
      "log_every": max(1, args.finetune_steps // 4), "eval_every": args.eval_every,
      "data.fg_fraction": args.fg_fraction,
      "finetune.patience": args.patience,
      "finetune.min_steps": args.finetune_steps // 2 if args.min_steps is None else args.min_steps,
      **({**adam, "optim.lr": 5e-3, "optim.warmup_steps": min(20, args.finetune_steps // 10)}
         if adam else {})})
  return pre_config, ft


def pretrain(config, split, workdir) -> dict:
  """Pre-trained variables of ``config.method`` on the split's training slices (no labels)."""
  arrays = datasets.slice_view(split["train"], min_foreground=float(config.data.min_foreground))
  result = trainer.train(config, workdir, train_data=arrays, progress=False)
  return jax.device_get(result.state.variables)


def finetune(config, split, workdir, pretrained, num_labeled: int):
  config = copy.deepcopy(config)
  config.finetune.num_labeled = num_labeled
  return finetune_lib.finetune(config, workdir, pretrained=pretrained, splits=split,
                               progress=False)


def run_dataset(args, pathology, rows, work, log):
  """``{setting: {row: (repeats * num_test, R) Dice}}``, the region names, the first split,
  the two configs, and ``{strategy: mean Dice}`` of the SI rows on the first split with all
  labels (the Fig. 5 point of the tables' own (N, N~), reused there)."""
  pre_config, ft_cfg = make_configs(args, pathology)
  subjects = datasets.load_subjects(ft_cfg.data)
  splits = datasets.repeated_splits(subjects, repeats=args.repeats, num_val=args.num_val,
                                    num_test=args.num_test, seed=args.seed)
  few = {"full": 0, "few": args.few_labels}
  scores = {s: {r: [] for r in rows} for s in SETTINGS}
  regions, first_si = None, {}
  for rep, split in enumerate(splits):
    scratch = {}
    for row in rows:
      spec = ROWS[row]
      pretrained = None
      if isinstance(spec, dict):
        t = time.perf_counter()
        pretrained = pretrain(pre_config(spec), split,
                              os.path.join(work, f"{pathology}-{rep}-{row}-pre"))
        log(f"  [{pathology} split {rep}] pre-trained {row} ({time.perf_counter() - t:.0f}s)")
      for setting in SETTINGS:
        t = time.perf_counter()
        init = scratch.get(setting) if spec == "restart" else pretrained
        if spec == "restart" and init is None:
          raise ValueError("the CNN-restart row needs the CNN row first (--rows)")
        res = finetune(ft_cfg, split, os.path.join(work, f"{pathology}-{rep}-{row}-{setting}"),
                       init, few[setting])
        if row == "CNN":
          scratch[setting] = jax.device_get(res.state.variables)
        regions = res.test["regions"]
        scores[setting][row].append(res.test["dice"])
        if rep == 0 and setting == "full" and isinstance(spec, dict) and spec["method"] == "si":
          first_si[spec["pretext.strategy"]] = mean_dice(res.test)
        mean = ", ".join(f"{k} {v:.3f}" for k, v in res.test["mean"].items())
        log(f"  [{pathology} split {rep}] {row} / {setting}: {mean} (tested step "
            f"{res.best_step}, {time.perf_counter() - t:.0f}s)")
  stacked = {s: {r: np.concatenate(v) for r, v in by_row.items()} for s, by_row in scores.items()}
  return stacked, regions, splits[0], pre_config, ft_cfg, first_si


def mean_dice(test: dict) -> float:
  """Mean test Dice over the regions (``All`` excluded) of `evaluators.evaluate_subjects`."""
  return float(np.nanmean([v for k, v in test["mean"].items() if k != "All"]))


def fig5(args, pathology, split, pre_config, ft_cfg, work, log, known=None):
  """Mean test Dice (over regions, All excluded) for each strategy and (N, N~); ``known``
  ``{strategy: Dice}`` holds results at the configs' own (N, N~), which are not rerun."""
  out, known = {}, known or {}
  si = pre_config({"method": "si"}).pretext
  own = (int(si.num_sources), int(si.num_components))
  for label in args.fig5_strategies.split(","):
    strategy = FIG5_STRATEGIES[label]
    for n, n_tilde in fig5_sources(args):
      if (n, n_tilde) == own and strategy in known:
        out[(label, n, n_tilde)] = known[strategy]
        log(f"  [{pathology} Fig. 5] {label} N={n} N~={n_tilde}: mean Dice "
            f"{known[strategy]:.3f} (the table's run)")
        continue
      t = time.perf_counter()
      cfg = pre_config({"method": "si", "pretext.strategy": strategy,
                        "pretext.num_sources": n, "pretext.num_components": n_tilde})
      name = f"{pathology}-fig5-{label}-{n}-{n_tilde}"
      variables = pretrain(cfg, split, os.path.join(work, name + "-pre"))
      res = finetune(ft_cfg, split, os.path.join(work, name), variables, 0)
      out[(label, n, n_tilde)] = mean_dice(res.test)
      log(f"  [{pathology} Fig. 5] {label} N={n} N~={n_tilde}: mean Dice "
          f"{out[(label, n, n_tilde)]:.3f} ({time.perf_counter() - t:.0f}s)")
  return out


def fig5_sources(args) -> list[tuple[int, int]]:
  """The ``(N, N~)`` pairs of ``--fig5-sources``."""
  try:
    pairs = [tuple(int(v) for v in p.split(",")) for p in args.fig5_sources.split()]
  except ValueError:
    pairs = []
  if not pairs or any(len(p) != 2 or not 2 <= p[1] <= p[0] for p in pairs):
    raise SystemExit(f"--fig5-sources must be 'N,N~' pairs with 2 <= N~ <= N; got "
                     f"{args.fig5_sources!r}")
  return pairs


def fig5_labels(results: dict) -> list[str]:
  """The strategies present in one dataset's Fig. 5 results, in the paper's order."""
  return [label for label in FIG5_STRATEGIES if any(k[0] == label for k in results)]


def fig5_pairs(results: dict) -> list[tuple[int, int]]:
  """The ``(N, N~)`` pairs present in Fig. 5 results ``{(label, N, N~): Dice}``, in run order."""
  return list(dict.fromkeys(k[1:] for k in results))


def plot_fig5(results: dict, path: str):
  pathologies = list(results)
  fig, axes = plt.subplots(1, len(pathologies), figsize=(4.5 * len(pathologies), 3.5),
                           squeeze=False)
  for ax, pathology in zip(axes[0], pathologies):
    pairs = fig5_pairs(results[pathology])
    for label in fig5_labels(results[pathology]):
      ys = [results[pathology][(label, n, nt)] for n, nt in pairs]
      ax.plot(range(len(pairs)), ys, marker="o", label=label)
    ax.set_xticks(range(len(pairs)), [f"N={n}, Ñ={nt}" for n, nt in pairs])
    ax.set_ylabel("mean test Dice")
    ax.set_title({"tumour": "BraTS-like phantoms", "wmh": "WMH phantoms"}[pathology])
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_pretext_examples(pre_config, split, path: str):
  """One slice through every pretext task: input (first modality / first mixture) and target."""
  arrays = datasets.slice_view(split["train"], min_foreground=float(
      pre_config(ROWS["Inpainting"]).data.min_foreground))
  n = min(8, len(arrays["image"]))
  batch = {k: v[:n] for k, v in arrays.items()}
  rows = [(name, spec) for name, spec in ROWS.items() if isinstance(spec, dict)]
  fig, axes = plt.subplots(2, len(rows), figsize=(2 * len(rows), 4.2))
  for col, (name, spec) in enumerate(rows):
    cfg = pre_config(spec)
    method = get_method(cfg)
    example_batch = batch
    transform = method.example_transform(arrays)
    if transform is not None:
      rng = np.random.default_rng(0)
      examples = [transform({k: v[i] for k, v in batch.items()}, rng) for i in range(n)]
      example_batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    inputs, target = method.pretext_example(jax.random.PRNGKey(0), example_batch)
    for row, image in enumerate((inputs, target)):
      axes[row, col].imshow(np.asarray(image[0, ..., 0]), cmap="gray")
      axes[row, col].axis("off")
    axes[0, col].set_title(name, fontsize=8)
  axes[0, 0].text(-5, 24, "input", rotation=90, va="center", ha="right")
  axes[1, 0].text(-5, 24, "target", rotation=90, va="center", ha="right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  rows = [r for r in args.rows.split(",") if r]
  unknown = [r for r in rows if r not in ROWS]
  if unknown or "CNN" not in rows:
    raise SystemExit(f"--rows must include CNN and name rows of {list(ROWS)}; got {unknown}")
  bad = [s for s in args.fig5_strategies.split(",") if s not in FIG5_STRATEGIES]
  if bad:
    raise SystemExit(f"--fig5-strategies must name {list(FIG5_STRATEGIES)}; got {bad}")
  start = time.perf_counter()
  lines = []

  def log(msg):
    print(msg, flush=True)
    lines.append(msg)

  work = tempfile.mkdtemp(prefix="jaxmed-si-")
  trainer.enable_compilation_cache(os.path.join(work, "jit-cache"))
  tables = {s: [] for s in SETTINGS}
  all_scores, fig5_results = {}, {}
  for pathology in args.datasets.split(","):
    scores, regions, split0, pre_config, ft_cfg, first_si = run_dataset(args, pathology, rows,
                                                                     work, log)
    for setting in SETTINGS:
      all_scores.update({f"{pathology}/{setting}/{row}": v for row, v in scores[setting].items()})
      tables[setting].append((pathology, regions, scores[setting]))
    if pathology == args.datasets.split(",")[0]:
      plot_pretext_examples(pre_config, split0, os.path.join(args.out, "pretext_examples.png"))
    if not args.no_fig5 and pathology == args.datasets.split(",")[0]:
      fig5_results[pathology] = fig5(args, pathology, split0, pre_config, ft_cfg, work, log,
                                     known=first_si)
  if fig5_results:
    plot_fig5(fig5_results, os.path.join(args.out, "fig5_num_sources.png"))
  np.savez(os.path.join(args.out, "scores.npz"), **all_scores)
  elapsed = time.perf_counter() - start
  write_report(args, tables, fig5_results, lines, elapsed)
  shutil.rmtree(work, ignore_errors=True)  # per-run checkpoints and the compilation cache
  print(f"wrote {args.out}/report.md ({elapsed / 60:.1f} min)")


PLATEAU_DICE = 0.05


def plateau_runs(tables, num_test: int) -> tuple[int, int]:
  """``(runs whose mean test Dice over the regions is below PLATEAU_DICE, all runs)``: one run
  is a (dataset, setting, row, split), i.e. ``num_test`` consecutive rows of its scores."""
  stuck = total = 0
  for by_dataset in tables.values():
    for _, regions, scores in by_dataset:
      columns = [i for i, r in enumerate(regions) if r != "All"]
      for dice in scores.values():
        for run in np.split(dice, len(dice) // num_test):
          total += 1
          stuck += bool(np.nan_to_num(np.nanmean(run[:, columns])) < PLATEAU_DICE)
  return stuck, total


def write_report(args, tables, fig5_results, lines, elapsed):
  titles = {"full": "Table 1: all training labels",
            "few": f"Table 2: {args.few_labels} labelled training subjects"}
  out = ["# Source identification vs baselines (phantoms, small scale)", "",
         f"{args.repeats} random splits x {args.num_test} test subjects per dataset; "
         f"{args.num_subjects} subjects of shape {tuple(args.shape)}; UNet features "
         f"{tuple(args.features)}; {args.pretrain_steps} pre-training and up to "
         f"{args.finetune_steps} fine-tuning steps (batch {args.batch_size}); "
         f"total {elapsed / 60:.1f} min.", ""]
  for setting in SETTINGS:
    out += [f"## {titles[setting]}", ""]
    for pathology, regions, scores in tables[setting]:
      out += [f"### {pathology}", "",
              compare.significance_table(scores, regions, baseline="CNN"), ""]
  out += ["`*` / `◇`: significantly better / worse than CNN (two-sided paired t-test over "
          "(split, test subject) pairs, p < 0.05); bold: best and not significantly different "
          "from the best.", ""]
  stuck, total = plateau_runs(tables, args.num_test)
  out += [f"Fine-tuning runs that ended on the all-background plateau (mean test Dice over the "
          f"regions < {PLATEAU_DICE}): {stuck} of {total}, with {args.fg_fraction:.2f} of the "
          f"training slices drawn among labelled ones (`--fg-fraction`).", ""]
  if fig5_results:
    pairs = fig5_pairs(next(iter(fig5_results.values())))
    out += ["## Fig. 5: number of sources (first split, all labels)", "",
            "![fig5](fig5_num_sources.png)", "",
            "| dataset | strategy | " + " | ".join(f"N={n}, Ñ={nt}" for n, nt in pairs)
            + " |", "|---|---|" + "---|" * len(pairs)]
    for pathology, res in fig5_results.items():
      for label in fig5_labels(res):
        out.append(f"| {pathology} | {label} | " + " | ".join(
            f"{res[(label, n, nt)]:.3f}" for n, nt in pairs) + " |")
    out.append("")
  out += ["![pretext examples](pretext_examples.png)", "", "## Log", "", "```", *lines, "```"]
  with open(os.path.join(args.out, "report.md"), "w") as f:
    f.write("\n".join(out) + "\n")


if __name__ == "__main__":
  main()

"""Input pipeline at scale: file-backed subjects from a NIfTI folder vs what a train step eats.

    python experiments/benchmarks/input_pipeline.py [--num-cases 200] [--shape 128 128 128]
        [--workdir /tmp/jaxmed_input_bench] [--threads 1 4]

1. Writes ``--num-cases`` phantoms of ``shape x 4`` modalities as a BraTS-style folder of
   ``.nii.gz`` files (kept between runs).
2. Preprocesses them into the cache (`jaxmed.data.cache`, timed), then loads them again (the
   cache is reused: the number of NIfTI reads is printed).
3. Examples per second of the training sources over the cache: random 3D crops (64^3, 1/3
   foreground-centred) and axial slices (all modalities), through `pipeline.train_iterator`
   with 1 and 4 read threads, against the examples per second the train step consumes on this
   machine (3D / 2D UNet of the segmentation config; compilation excluded).
4. Peak resident memory (VmHWM) of a `jaxmed train --config restoration` run over the folder
   (3D crops, a small 3D UNet), in a fresh process, against the size of the dataset.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np

from jaxmed import config as config_lib
from jaxmed.data import cache, datasets, nifti, pipeline, synthetic, views
from jaxmed.methods import get_method
from jaxmed.train import sharding, trainer

CROP = (64, 64, 64)


def write_case(args):
  root, seed, index, shape = args
  subject_id = f"phantom-{seed}-{index:04d}"
  if (root / subject_id / f"{subject_id}_seg.nii.gz").exists():
    return
  subject_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
  subject = synthetic.make_subject(subject_seed, shape=shape, subject_id=subject_id)
  nifti.write_case(subject, root)


def folder_bytes(path) -> int:
  return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def data_config(root, cache_dir, **fields):
  cfg = config_lib.base_config().data
  cfg.root, cfg.cache_dir = str(root), str(cache_dir)
  cfg.update(fields)
  return cfg


def examples_per_second(subjects, view, batch, threads, batches):
  source, transform = views.make_view(view, subjects)
  it = pipeline.train_iterator(source, global_batch_size=batch, seed=0, process_index=0,
                               process_count=1, transform=transform, read_threads=threads,
                               prefetch=max(threads, 2))
  next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch / (time.perf_counter() - t)


def consumed_per_second(view: dict, batch: int, example: dict, steps: int = 3):
  config = config_lib.apply_overrides(config_lib.method_config("segmentation"), {
      "batch_size": batch, "data.view": view["view"], "data.crop_size": CROP})
  method = get_method(config)
  mesh = sharding.make_mesh(config.mesh)
  batch_arrays = {k: np.repeat(np.asarray(v)[None], batch, axis=0) for k, v in example.items()}
  state, step, _ = trainer.setup(config, method, batch_arrays, mesh)
  gbatch = sharding.global_batch(batch_arrays, mesh)
  state, metrics = step(state, gbatch)
  jax.block_until_ready(metrics)
  t = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, gbatch)
  jax.block_until_ready(metrics)
  return steps * batch / (time.perf_counter() - t)


def peak_rss_of_training(root, cache_dir, workdir, steps):
  """Peak resident set (VmHWM, bytes) of the training process itself, polled from /proc."""
  cmd = [sys.executable, "-m", "jaxmed.cli", "train", "--config", "restoration",
         "--workdir", str(workdir), "--noprogress", f"--config.data.root={root}",
         f"--config.data.cache_dir={cache_dir}", "--config.data.view=crop",
         f"--config.data.crop_size={','.join(map(str, CROP))}", "--config.data.fg_fraction=0.33",
         "--config.model.features=8,16,32,64", "--config.batch_size=2",
         f"--config.total_steps={steps}", "--config.log_every=5", "--config.tensorboard=False",
         "--config.checkpoint.every=0", "--config.data.num_val=0", "--config.data.num_test=0"]
  t = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  peak = 0
  while proc.poll() is None:
    try:
      with open(f"/proc/{proc.pid}/status") as f:
        for line in f:
          if line.startswith("VmHWM:"):
            peak = max(peak, int(line.split()[1]) * 1024)
    except (FileNotFoundError, ProcessLookupError):
      break
    time.sleep(0.1)
  _, err = proc.communicate()
  if proc.returncode:
    raise RuntimeError(f"training failed:\n{err.decode()[-3000:]}")
  return peak, time.perf_counter() - t


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num-cases", type=int, default=200)
  parser.add_argument("--shape", type=int, nargs=3, default=(128, 128, 128))
  parser.add_argument("--workdir", default="/tmp/jaxmed_input_bench")
  parser.add_argument("--threads", type=int, nargs="+", default=(1, 4))
  parser.add_argument("--batches", type=int, default=50)
  parser.add_argument("--train-steps", type=int, default=20)
  parser.add_argument("--memory-only", action="store_true",
                      help="only the peak-memory run (the folder and cache exist)")
  args = parser.parse_args()
  work = pathlib.Path(args.workdir)
  root, cache_dir = work / "nifti", work / "cache"
  shape = tuple(args.shape)

  t = time.perf_counter()
  jobs = [(root, 0, i, shape) for i in range(args.num_cases)]
  with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:
    list(pool.map(write_case, jobs, chunksize=4))
  print(f"{args.num_cases} phantoms {shape} x 4 as .nii.gz: {folder_bytes(root) / 2**30:.2f} GiB "
        f"on disk ({time.perf_counter() - t:.0f} s to write or find)")

  cfg = data_config(root, cache_dir)
  reads = []
  original = nifti.read_case
  nifti.read_case = lambda *a, **k: reads.append(1) or original(*a, **k)
  t = time.perf_counter()
  subjects = datasets.load_subjects(cfg)
  build_s = time.perf_counter() - t
  first_reads = len(reads)
  t = time.perf_counter()
  subjects = datasets.load_subjects(cfg)
  reuse_s = time.perf_counter() - t
  nifti.read_case = original
  cache_gib = folder_bytes(subjects.directory) / 2**30
  print(f"cache build: {build_s:.1f} s ({first_reads} cases read); reuse: {reuse_s:.2f} s "
        f"({len(reads) - first_reads} NIfTI reads); cache {cache_gib:.2f} GiB")

  if args.memory_only:
    rss, seconds = peak_rss_of_training(root, cache_dir, work / "run", args.train_steps)
    print(f"peak resident memory of `jaxmed train` ({seconds:.0f} s): {rss / 2**30:.2f} GiB")
    return
  rows = []
  crop_view = {"view": "crop", "crop_size": CROP, "fg_fraction": 0.33}
  slice_view = {"view": "slice", "min_foreground": 0.2}
  for name, view, batch in (("3D crop 64^3 x 4", crop_view, 2),
                            (f"slice {shape[1]}x{shape[2]} x 4", slice_view, 16)):
    source, transform = views.make_view(view, subjects)
    example = source[0] if transform is None else transform(source[0], np.random.default_rng(0))
    example = {k: v for k, v in example.items() if k in ("image", "label", "brain_mask")}
    consumed = consumed_per_second(view, batch, example)
    for threads in args.threads:
      produced = examples_per_second(subjects, view, batch, threads, args.batches)
      rows.append((name, threads, produced, consumed))

  print(f"\n| view | read threads | examples/s read | examples/s consumed by the train step "
        f"(batch {{2, 16}}) | ratio |")
  print("|---|---|---|---|---|")
  for name, threads, produced, consumed in rows:
    print(f"| {name} | {threads} | {produced:.1f} | {consumed:.2f} | {produced / consumed:.0f}x |")

  rss, seconds = peak_rss_of_training(root, cache_dir, work / "run", args.train_steps)
  print(f"\npeak resident memory of `jaxmed train` (3D crops, {args.train_steps} steps, "
        f"{seconds:.0f} s) over {args.num_cases} cases: {rss / 2**30:.2f} GiB "
        f"(dataset: {cache_gib:.2f} GiB cached, {folder_bytes(root) / 2**30:.2f} GiB NIfTI)")


if __name__ == "__main__":
  main()

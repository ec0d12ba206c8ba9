"""Time from `jaxmed train` start to the end of the first training step, for every shipped config.

    python experiments/benchmarks/compile_time.py [--only restoration,si] [--arg size=small]

Each config runs as ``jaxmed train --config NAME:size=small`` in a fresh process, twice in a row:

* cold: an empty persistent compilation cache (as a first run on a new machine);
* warm: the cache the cold run filled (a rerun, a resumed run, a sweep point whose programs did
  not change; ``jaxmed train`` keeps the cache in ``$JAXMED_CACHE_DIR/jit`` by default).

Reported per run: the process's start to the trainer's "first step done" log line (imports, data,
initialisation, compilation and the step itself), and the part of it inside ``train()``. The
process is stopped at that line (the final checkpoint and evaluation are not timed). The data
cache is shared by both runs. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

from jaxmed.config import shipped_configs

_DONE = re.compile(r"first step done ([\d.]+) s after train\(\) began")


def time_first_step(config: str, arg: str, cache_dir: str, work: str, env: dict,
                    timeout: float) -> tuple[float, float]:
  """(process start -> first step, train() -> first step) in seconds."""
  spec = f"{config}:{arg}" if arg else config
  cmd = [sys.executable, "-m", "jaxmed.cli", "train", f"--config={spec}", f"--workdir={work}",
         "--noprogress", "--verbosity=0"]
  env = {**env, "JAX_COMPILATION_CACHE_DIR": cache_dir}
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=env)
  tail = []
  try:
    for line in proc.stderr:  # until the line, or the end of the process's output
      tail = (tail + [line])[-40:]
      match = _DONE.search(line)
      if match:
        return time.perf_counter() - start, float(match.group(1))
      if time.perf_counter() - start > timeout:
        raise RuntimeError(f"{spec}: no first step within {timeout:.0f} s")
  finally:
    proc.kill()
    proc.wait()
  raise RuntimeError(f"{spec}: the process ended (exit {proc.returncode}) before its first "
                     "step:\n" + "".join(tail))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="comma-separated config names (default: all)")
  parser.add_argument("--arg", default="size=small", help="config argument, NAME:<arg>")
  parser.add_argument("--timeout", type=float, default=600.0)
  args = parser.parse_args()
  names = shipped_configs()
  chosen = [n for n in args.only.split(",") if n] or names
  unknown = sorted(set(chosen) - set(names))
  if unknown:
    raise SystemExit(f"--only: unknown configs {unknown}; choose from {names}")
  rows = []
  with tempfile.TemporaryDirectory(prefix="jaxmed-compile-time-") as tmp:
    env = {**os.environ, "JAXMED_CACHE_DIR": os.path.join(tmp, "data")}
    for name in chosen:
      cache = os.path.join(tmp, "jit", name)
      runs = [time_first_step(name, args.arg, cache, os.path.join(tmp, "run", name, kind), env,
                              args.timeout) for kind in ("cold", "warm")]
      rows.append((name, runs))
      print(f"{name}: cold {runs[0][0]:.1f} s ({runs[0][1]:.1f} in train()), warm "
            f"{runs[1][0]:.1f} s ({runs[1][1]:.1f})", flush=True)
  print(f"\n| config (`{args.arg}`) | cold: start -> first step s (in train()) | "
        "warm cache: start -> first step s (in train()) |")
  print("|---|---|---|")
  for name, ((cold, cold_in), (warm, warm_in)) in rows:
    print(f"| {name} | {cold:.1f} ({cold_in:.1f}) | {warm:.1f} ({warm_in:.1f}) |")


if __name__ == "__main__":
  main()

"""Multi-host: two local processes x two CPU devices through ``jaxmed train --distributed``, on
file-backed data (a NIfTI folder that both processes preprocess into one shared cache)."""

import os
import signal
import socket
import subprocess
import sys
import time

from helpers import REPO, nifti_phantoms, tiny_flags
from xla_test_flags import xla_flags

from jaxmed.train.logging import read_metrics


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_two_processes(workdir, total_steps, data_flags):
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": xla_flags(2)}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "jaxmed.cli", "train", "--config", "restoration",
       "--workdir", str(workdir), "--noprogress", "--distributed",
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
       *tiny_flags(), "--config.checkpoint.every=20", "--config.tensorboard=False",
       f"--config.total_steps={total_steps}", *data_flags],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  return procs


def _wait(procs):
  outputs = [p.communicate(timeout=400)[0].decode() for p in procs]
  # Every process's output on failure: one that fails first makes the other time out, and its
  # own log is the one that says why.
  report = "\n".join(f"--- process {i} (return code {p.returncode}):\n{out[-3000:]}"
                      for i, (p, out) in enumerate(zip(procs, outputs)))
  assert all(p.returncode == 0 for p in procs), report


def _final(workdir):
  return {k: v for k, v in read_metrics(str(workdir))[-1].items() if not k.endswith("_per_sec")}


def test_two_processes_sigterm_and_resume_match_a_straight_run(tmp_path):
  total = 80
  data_flags = nifti_phantoms(tmp_path / "nifti")
  _wait(_start_two_processes(tmp_path / "straight", total, data_flags))
  resumed = tmp_path / "resumed"
  procs = _start_two_processes(resumed, total, data_flags)
  while not (os.path.exists(resumed / "metrics.jsonl")
             and read_metrics(str(resumed))[-1]["step"] >= 10):
    assert all(p.poll() is None for p in procs), "a process exited before SIGTERM"
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  _wait(procs)  # both stop at the same step (JAX preemption sync point), save and exit 0
  steps = sorted(int(p) for p in os.listdir(resumed / "checkpoints") if p.isdigit())
  assert steps and steps[-1] < total, "the run finished before it was stopped"
  data = resumed / "checkpoints" / str(steps[-1]) / "data"
  assert sorted(p for p in os.listdir(data) if p.endswith(".json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]  # one data-iterator state per process
  _wait(_start_two_processes(resumed, total, data_flags))
  logged = [r["step"] for r in read_metrics(str(resumed))]
  assert logged == list(range(5, total + 1, 5))
  assert _final(resumed) == _final(tmp_path / "straight")

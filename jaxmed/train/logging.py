"""Run logging: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard, progress bar."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np


class MetricWriter:
  """Writes scalar metrics to ``<workdir>/metrics.jsonl`` and TensorBoard (if tensorboardX).

  Only process 0 writes. On resume, records with ``step > resume_step`` (written after the
  restored checkpoint by a run that was killed) are dropped, so the file reads as one run.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._active = jax.process_index() == 0
    self._tb = None
    if not self._active:
      return
    os.makedirs(workdir, exist_ok=True)
    _truncate_after(self.path, resume_step)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        self._tb = None

  def write(self, step: int, metrics: dict):
    if not self._active:
      return
    record = {"step": int(step)}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """All records of ``<workdir>/metrics.jsonl``."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _truncate_after(path: str, step: int):
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  keep = [line for line in lines if json.loads(line)["step"] <= step]
  if len(keep) != len(lines):
    with open(path, "w") as f:
      f.writelines(keep)


def _to_python(v):
  v = np.asarray(v)
  if v.dtype == bool:
    return bool(v)
  if np.issubdtype(v.dtype, np.integer):
    return int(v)
  x = float(v)
  return x if math.isfinite(x) else None  # JSON has no NaN / Inf: null


class Progress:
  """Console progress bar with steps/s and ETA (tqdm), only on process 0."""

  def __init__(self, total: int, initial: int = 0, desc: str = "train", enabled: bool = True):
    self._bar = None
    self._last_time, self._last_step = time.perf_counter(), initial
    if enabled and jax.process_index() == 0:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                       mininterval=1.0)

  def update(self, step: int):
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def set_loss(self, loss: float):
    if self._bar is not None:
      self._bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

  def steps_per_sec(self, step: int) -> float:
    """Steps per second since the previous call (the first interval includes compilation)."""
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, step
    return rate

  def close(self):
    if self._bar is not None:
      self._bar.close()

"""Comparing fine-tuned models region by region: paired two-sided t-tests against a baseline
and the markdown tables of source_identification Tables 1-3.

Every row's Dice values must be paired: the same (repeat, test subject) in the same order, as
they are when each row is fine-tuned and tested on the same random splits. A pair where either
value is nan (the region absent from both prediction and truth) is dropped from that region's
test.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from jaxmed.metrics import paired_t_test

BETTER, WORSE = "*", "◇"


@dataclasses.dataclass
class RowStats:
  """Per-region statistics of one row: ``mean``, ``std`` (over paired values, nan-aware),
  ``p`` (paired t-test against the baseline; nan for the baseline itself), ``marker``
  (``*`` significantly better, ``◇`` significantly worse than the baseline, else ``""``) and
  ``bold`` (the best mean, or not significantly different from it)."""
  mean: np.ndarray
  std: np.ndarray
  p: np.ndarray
  marker: list[str]
  bold: list[bool]


def format_p(p: float) -> str:
  """A p-value for a table: "-" when nan, "< 1e-30" below that (`paired_p_values` computes in
  float32, which underflows to 0 near 1e-38), ``1.2e-05`` below 1e-3, else ``0.034``."""
  if not np.isfinite(p):
    return "-"
  return "< 1e-30" if p < 1e-30 else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


def format_mean_std(values, digits: int = 3, *, style: str = "paren") -> str:
  """``mean (std)`` (``style="paren"``) or ``mean ± std`` (``"pm"``) of the finite values
  (population std), "-" when there are none."""
  if style not in ("paren", "pm"):
    raise ValueError(f"format_mean_std: style must be 'paren' or 'pm'; got {style!r}")
  v = np.asarray(values, np.float64).ravel()
  v = v[np.isfinite(v)]
  if not v.size:
    return "-"
  mean, std = f"{v.mean():.{digits}f}", f"{v.std():.{digits}f}"
  return f"{mean} ({std})" if style == "paren" else f"{mean} ± {std}"


def paired_p_values(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Two-sided paired t-test p-value per column of ``a`` vs ``b`` (both ``(n, R)``), dropping
  pairs with a nan; nan where fewer than two pairs remain or the differences are constant."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f"paired scores must both be (n, R) of the same shape; got {a.shape} and "
                     f"{b.shape}")
  out = np.full(a.shape[1], np.nan)
  for r in range(a.shape[1]):
    keep = np.isfinite(a[:, r]) & np.isfinite(b[:, r])
    if keep.sum() >= 2:
      out[r] = float(paired_t_test(a[keep, r], b[keep, r])[1])
  return out


def compare_rows(scores: dict[str, np.ndarray], *, baseline: str,
                 alpha: float = 0.05) -> dict[str, RowStats]:
  """Statistics of every row against ``baseline`` (source_identification Table 1 markers).

  Args:
    scores: ``{row name: (n, R) Dice}``, paired across rows.
    baseline: the row the markers refer to (the from-scratch CNN).
    alpha: significance level of the two-sided paired t-tests.
  """
  if baseline not in scores:
    raise ValueError(f"baseline {baseline!r} is not a row; rows: {list(scores)}")
  shapes = {k: np.shape(v) for k, v in scores.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"every row needs the same (n, R) paired scores; got {shapes}")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    means = {k: np.nanmean(v, axis=0) for k, v in scores.items()}
    stds = {k: np.nanstd(v, axis=0) for k, v in scores.items()}
  num_regions = shapes[baseline][1]
  best = [max(scores, key=lambda k: -np.inf if np.isnan(means[k][r]) else means[k][r])
          for r in range(num_regions)]
  out = {}
  for name, values in scores.items():
    p = (np.full(num_regions, np.nan) if name == baseline
         else paired_p_values(values, scores[baseline]))
    diff = means[name] - means[baseline]
    marker = [BETTER if p[r] < alpha and diff[r] > 0 else WORSE if p[r] < alpha and diff[r] < 0
              else "" for r in range(num_regions)]
    bold = []
    for r in range(num_regions):
      if name == best[r]:
        bold.append(True)
        continue
      p_best = paired_p_values(values[:, r:r + 1], scores[best[r]][:, r:r + 1])[0]
      bold.append(bool(np.isfinite(p_best) and p_best >= alpha))
    out[name] = RowStats(mean=means[name], std=stds[name], p=p, marker=marker, bold=bold)
  return out


def significance_table(scores: dict[str, np.ndarray], regions, *, baseline: str,
                       alpha: float = 0.05) -> str:
  """Markdown table: a row per method, ``mean (std)`` per region with ``*`` / ``◇`` markers
  (significantly better / worse than ``baseline``, two-sided paired t-test, p < ``alpha``) and
  bold for the best and those not significantly different from it."""
  regions = list(regions)
  stats = compare_rows(scores, baseline=baseline, alpha=alpha)
  lines = ["| method | " + " | ".join(regions) + " |", "|---" * (len(regions) + 1) + "|"]
  for name, s in stats.items():
    if len(s.mean) != len(regions):
      raise ValueError(f"{len(regions)} region names for {len(s.mean)} score columns")
    cells = []
    for r in range(len(regions)):
      cell = f"{s.mean[r]:.3f} ({s.std[r]:.3f}){s.marker[r]}"
      cells.append(f"**{cell}**" if s.bold[r] else cell)
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# Per-subject segmentation metrics of `jaxmed.evaluate.crossval.surface_metrics`: (key, label).
SURFACE_METRICS = (("dice", "Dice"), ("hd95", "HD95 (mm)"), ("msd", "MSD (mm)"))


def pool_subjects(tables: list[dict], metric: str) -> np.ndarray:
  """``(sum of S, R)``: ``metric`` of several runs' tables (each ``{"subjects": ids, metric:
  (S, R)}``, e.g. one per seed) stacked, each table's rows ordered by subject id, so that row
  ``i`` pairs one (run, subject) across methods that listed their subjects in another order."""
  rows = []
  for t in tables:
    order = np.argsort(t["subjects"])
    rows.append(np.asarray(t[metric], np.float64)[order])
  return np.concatenate(rows)


def format_finite(values, digits: int = 3) -> str:
  """``mean (std)`` (sample std) of the finite values, with ``, k inf`` when ``k`` values are
  infinite (a distance to an empty mask); "inf" when none is finite; nan values are skipped."""
  values = np.asarray(values, np.float64).ravel()
  values = values[~np.isnan(values)]
  finite = values[np.isfinite(values)]
  if not finite.size:
    return "inf" if values.size else "-"
  std = finite.std(ddof=1) if finite.size > 1 else 0.0
  text = f"{finite.mean():.{digits}f} ({std:.{digits}f})"
  return text + (f", {values.size - finite.size} inf" if finite.size < values.size else "")


def paired_differences(regions, scores: dict[str, dict[str, np.ndarray]], *, baseline: str,
                       metrics=SURFACE_METRICS) -> str:
  """Markdown table: per metric and region, ``mean (std)`` of the baseline and of every other
  row (`format_finite`), each row's mean paired difference from the baseline and its two-sided
  paired t-test p-value over the pairs where both values are finite, and the pair count.

  Args:
    regions: the region (class) names, one per score column.
    scores: ``{row name: {metric: (n, R)}}``, rows paired (the same (run, subject) in the same
      order, `pool_subjects`); the baseline first in the table.
    baseline: the row the others are compared with.
    metrics: ``(key, label)`` pairs of the metrics to show (`SURFACE_METRICS`).
  """
  if baseline not in scores:
    raise ValueError(f"baseline {baseline!r} is not a row; rows: {list(scores)}")
  others = [name for name in scores if name != baseline]
  header = ["metric", "region", baseline]
  for name in others:
    header += [name, "difference", "paired t p", "pairs"]
  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  for key, label in metrics:
    base = np.asarray(scores[baseline][key], np.float64)
    p_values = {name: paired_p_values(np.asarray(scores[name][key], np.float64), base)
                for name in others}
    for r, region in enumerate(regions):
      cells = [label, str(region), format_finite(base[:, r])]
      for name in others:
        values = np.asarray(scores[name][key], np.float64)[:, r]
        keep = np.isfinite(values) & np.isfinite(base[:, r])
        diff = f"{np.mean(values[keep] - base[keep, r]):+.3f}" if keep.any() else "n/a"
        cells += [format_finite(values), diff, format_p(p_values[name][r]), str(int(keep.sum()))]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)

"""Speed of jaxmed.metrics against the reference each field trusts, in one run, same inputs.

    python experiments/benchmarks/metrics.py [--repeats 5] [--only hd95,ssim_2d] [--scale 1.0]

Each side gets the same data in its native container, made before timing: NumPy arrays for
scikit-image / scipy / scikit-learn, torch tensors for MONAI, device arrays (``jax.device_put``)
for jaxmed, as in a JAX pipeline. For every case: one warm-up call on each side (JAX
compilation excluded), then the median wall time of ``--repeats`` calls; jaxmed results are
pulled to the host inside the timed call. The
two results are compared (max relative difference) so a fast wrong answer shows up. Prints a
Markdown table with the ratio reference time / jaxmed time (> 1: jaxmed is faster).

References: scikit-image (SSIM, PSNR; looped over images, as users call it), MONAI 1.6 on PyTorch
CPU (Hausdorff, surface distance, surface Dice, Dice, 3D SSIM), scipy (EDT, Spearman, paired
t-test), scikit-learn (ROC AUC). SSFD and the VGG perceptual distance are not here: no peer
library for them is installed (meddlr, torchvision / Keras weights). torch uses as many threads as JAX has cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import jax
import numpy as np
import scipy.ndimage as ndi
import scipy.stats
import skimage.metrics
import sklearn.metrics
import torch
from monai.metrics import (DiceMetric, SSIMMetric, compute_average_surface_distance,
                           compute_hausdorff_distance, compute_surface_dice)

import jaxmed.metrics as jm


def median_seconds(fn, repeats):
  fn()  # warm-up: compilation, caches
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def blobs(rng, shape, sigma=4.0):
  """Random smooth-blob mask, about half the volume, with surface everywhere."""
  return ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma) > 0


def spheres(shape, centre, radius):
  grid = np.indices(shape)
  return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def folded_band(shape, field, low, high):
  """A cortex-like grey-matter mask: a thin shell (``high - low`` of the brain radius, about 3
  voxels) that follows the folded level sets of ``field`` (a smooth random field) inside an
  ellipsoid brain: thin, folded and large, like a 1 mm cortical ribbon."""
  grid = np.indices(shape, dtype=np.float32)
  radius = np.sqrt(sum(((g - (n - 1) / 2) / (0.45 * n)) ** 2 for g, n in zip(grid, shape)))
  depth = radius + 0.12 * field / field.std()
  return (depth > low) & (depth < high)


def monai_masks(pred, target):
  """(N, *spatial) bool -> MONAI's (N, 1, *spatial) float tensors."""
  return (torch.from_numpy(pred[:, None].astype(np.float32)),
          torch.from_numpy(target[:, None].astype(np.float32)))


def cases(scale):
  """(name, input description, reference name, reference fn, jaxmed fn) per benchmark."""
  rng = np.random.default_rng(0)
  size = lambda n: max(8, int(round(n * scale)))
  dev = jax.device_put
  out = []

  # SSIM 2D: 32 images 256^2, scikit-image defaults (uniform 7, sample covariance).
  n2 = size(256)
  x = rng.uniform(size=(32, n2, n2, 1)).astype(np.float32)
  y = np.clip(x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), 0, 1)
  xd, yd = dev(x), dev(y)
  out.append(("ssim_2d", f"32 x {n2}^2, skimage defaults", "skimage",
              lambda: np.array([skimage.metrics.structural_similarity(
                  a[..., 0], b[..., 0], data_range=1.0) for a, b in zip(x, y)]),
              lambda: np.asarray(jm.ssim(xd, yd, data_range=1.0, window="uniform", win_size=7,
                                         sample_covariance=True, border="reflect_crop"))))
  out.append(("ssim_2d_gauss", f"32 x {n2}^2, Gaussian 11/1.5", "skimage",
              lambda: np.array([skimage.metrics.structural_similarity(
                  a[..., 0], b[..., 0], data_range=1.0, gaussian_weights=True,
                  use_sample_covariance=False) for a, b in zip(x, y)]),
              lambda: np.asarray(jm.ssim(xd, yd, data_range=1.0, border="reflect_crop"))))

  # SSIM 3D: one 128^3 volume; scikit-image (defaults) and MONAI (Gaussian 11/1.5, valid).
  n3 = size(128)
  v = rng.uniform(size=(1, n3, n3, n3, 1)).astype(np.float32)
  w = np.clip(v + 0.1 * rng.standard_normal(v.shape).astype(np.float32), 0, 1)
  vd, wd = dev(v), dev(w)
  out.append(("ssim_3d", f"{n3}^3, skimage defaults", "skimage",
              lambda: np.array([skimage.metrics.structural_similarity(
                  v[0, ..., 0], w[0, ..., 0], data_range=1.0)]),
              lambda: np.asarray(jm.ssim(vd, wd, data_range=1.0, window="uniform", win_size=7,
                                         sample_covariance=True, border="reflect_crop"))))
  tv, tw = (torch.from_numpy(np.moveaxis(a, -1, 1).copy()) for a in (v, w))
  monai_ssim = SSIMMetric(spatial_dims=3, data_range=1.0, reduction="none")
  out.append(("ssim_3d_gauss", f"{n3}^3, Gaussian 11/1.5 valid", "MONAI",
              lambda: monai_ssim(tv, tw).numpy().ravel(),
              lambda: np.asarray(jm.ssim(vd, wd, data_range=1.0))))

  out.append(("psnr", f"32 x {n2}^2", "skimage",
              lambda: np.array([skimage.metrics.peak_signal_noise_ratio(a, b, data_range=1.0)
                                for a, b in zip(x, y)]),
              lambda: np.asarray(jm.psnr(xd, yd, data_range=1.0))))

  # Surface distances at 128^3 and at a BraTS volume's 240 x 240 x 155: random blobs (surface
  # everywhere, two independent masks), two offset spheres, and a folded cortex-like ribbon
  # against the same ribbon at another threshold (half a voxel thicker on each side).
  pairs = {}
  for shape in ((n3,) * 3, tuple(size(n) for n in (240, 240, 155))):
    label = "x".join(map(str, shape)) if len(set(shape)) > 1 else f"{shape[0]}^3"
    centre = np.asarray(shape) // 2
    pairs[f"{label} blobs"] = (blobs(rng, shape)[None], blobs(rng, shape)[None])
    pairs[f"{label} spheres"] = (spheres(shape, centre, 0.23 * min(shape))[None],
                                 spheres(shape, centre + (2, -2, 0), 0.22 * min(shape))[None])
    field = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 3.0)
    width = 3.0 / (0.45 * min(shape))  # 3 voxels of the normalised radius
    pairs[f"{label} folded"] = (
        folded_band(shape, field, 0.8 - width / 6, 0.8 + 7 * width / 6)[None],
        folded_band(shape, field, 0.8, 0.8 + width)[None])
  for desc, (p, t) in pairs.items():
    mp, mt = monai_masks(p, t)
    p, t = dev(p), dev(t)
    out.append(("hd95", desc, "MONAI",
                lambda mp=mp, mt=mt: compute_hausdorff_distance(
                    mp, mt, include_background=True, percentile=95).numpy().ravel(),
                lambda p=p, t=t: np.asarray(jm.hausdorff_distance(p, t, percentile=95))))
    out.append(("hausdorff", desc, "MONAI",
                lambda mp=mp, mt=mt: compute_hausdorff_distance(
                    mp, mt, include_background=True).numpy().ravel(),
                lambda p=p, t=t: np.asarray(jm.hausdorff_distance(p, t))))
    out.append(("avg_surface", desc + ", symmetric", "MONAI",
                lambda mp=mp, mt=mt: compute_average_surface_distance(
                    mp, mt, include_background=True, symmetric=True).numpy().ravel(),
                lambda p=p, t=t: np.asarray(jm.average_surface_distance(p, t, symmetric=True))))
    out.append(("surface_dice", desc + ", tol 2", "MONAI",
                lambda mp=mp, mt=mt: compute_surface_dice(
                    mp, mt, class_thresholds=[2.0], include_background=True).numpy().ravel(),
                lambda p=p, t=t: np.asarray(jm.surface_dice(p, t, tolerance=2.0))))
  # Anisotropic voxels: 1 x 1 x 3 mm (a whole multiple: the integer kernel), 0.9 x 0.9 x 1.25 mm
  # (squared ratios of small integers: the integer kernel in units of 0.05 mm), 1 x 0.81 x 1.6 mm
  # (the integer kernel in units of 0.01 mm, its first level in uint32) and 1 x 0.8123 x 1.6 mm
  # (no lattice: the float32 kernel).
  p, t = pairs[f"{label} folded"]
  mp, mt = monai_masks(p, t)
  p, t = dev(p), dev(t)
  for spacing in ((1.0, 1.0, 3.0), (0.9, 0.9, 1.25), (1.0, 0.81, 1.6), (1.0, 0.8123, 1.6)):
    out.append(("hd95", f"{label} folded, {' x '.join(map(str, spacing))} mm", "MONAI",
                lambda mp=mp, mt=mt, s=spacing: compute_hausdorff_distance(
                    mp, mt, include_background=True, percentile=95, spacing=s).numpy().ravel(),
                lambda p=p, t=t, s=spacing: np.asarray(
                    jm.hausdorff_distance(p, t, percentile=95, spacing=s))))

  p, _ = pairs[f"{n3}^3 blobs"]
  pd = dev(p)
  out.append(("edt", f"{n3}^3 blobs", "scipy",
              lambda: ndi.distance_transform_edt(p[0])[None],
              lambda: np.asarray(jm.distance_transform_edt(pd))))

  # Dice: 4 volumes 128^3, 3 overlapping channels.
  d_pred = rng.uniform(size=(4, n3, n3, n3, 3)) > 0.5
  d_target = rng.uniform(size=(4, n3, n3, n3, 3)) > 0.5
  td_pred, td_target = (torch.from_numpy(np.moveaxis(a, -1, 1).astype(np.float32))
                        for a in (d_pred, d_target))
  jd_pred, jd_target = dev(d_pred), dev(d_target)
  monai_dice = DiceMetric(include_background=True, reduction="none")
  out.append(("dice", f"4 x {n3}^3 x 3", "MONAI",
              lambda: monai_dice(td_pred, td_target).numpy(),
              lambda: np.asarray(jm.dice(jd_pred, jd_target))))

  # Classification / statistics: one million scores with ties.
  m = int(1e6 * scale**2) if scale < 1 else int(1e6)
  scores = np.round(rng.standard_normal(m), 3).astype(np.float32)
  labels = rng.uniform(size=m) < 1 / (1 + np.exp(-scores))
  j_scores, j_labels = dev(scores), dev(labels)
  out.append(("roc_auc", f"{m} scores", "sklearn",
              lambda: np.array(sklearn.metrics.roc_auc_score(labels, scores)),
              lambda: np.asarray(jm.roc_auc(j_scores, j_labels))))
  other = (scores + rng.standard_normal(m)).astype(np.float32)
  j_other = dev(other)
  out.append(("spearman", f"{m} pairs", "scipy",
              lambda: np.array(scipy.stats.spearmanr(scores, other).statistic),
              lambda: np.asarray(jm.spearman(j_scores, j_other))))

  # Paired t-test: 10,000 comparisons of two methods on 200 images each (p-values compared).
  rows = max(10, int(1e4 * scale))
  ta = rng.standard_normal((rows, 200)).astype(np.float32)
  tb = (ta + 0.1 + rng.standard_normal(ta.shape)).astype(np.float32)
  j_ta, j_tb = dev(ta), dev(tb)
  out.append(("paired_t_test", f"{rows} x 200 pairs", "scipy",
              lambda: scipy.stats.ttest_rel(ta, tb, axis=-1).pvalue,
              lambda: np.asarray(jm.paired_t_test(j_ta, j_tb)[1])))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--only", default="", help="comma-separated case names")
  parser.add_argument("--inputs", default="",
                      help="only inputs whose description contains this (e.g. 'folded')")
  parser.add_argument("--scale", type=float, default=1.0, help="shrink every size (smoke runs)")
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count() if jax.default_backend() == "cpu" else 1)
  warnings.filterwarnings("ignore")  # MONAI's empty-mask and deprecation warnings
  only = set(filter(None, args.only.split(",")))
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)\n")
  print("| metric | input | reference | reference ms | jaxmed ms | speed-up | max rel diff |")
  print("|---|---|---|---:|---:|---:|---:|")
  for name, desc, ref_name, ref_fn, ours_fn in cases(args.scale):
    if (only and name not in only) or args.inputs not in desc:
      continue
    ref_value, ours_value = np.asarray(ref_fn(), np.float64), np.asarray(ours_fn(), np.float64)
    diff = np.max(np.abs(ours_value - ref_value) / np.maximum(np.abs(ref_value), 1e-12))
    # A pause before each side: torch's OpenMP workers spin for a while after a parallel region
    # and would otherwise steal the cores from whatever runs next.
    time.sleep(0.5)
    ours_s = median_seconds(ours_fn, args.repeats)
    time.sleep(0.5)
    ref_s = median_seconds(ref_fn, args.repeats)
    print(f"| {name} | {desc} | {ref_name} | {1e3 * ref_s:.1f} | {1e3 * ours_s:.1f} | "
          f"{ref_s / ours_s:.1f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
  main()

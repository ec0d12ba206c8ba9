"""`import jaxmed.metrics` stays light: nothing heavier than jax and numpy."""

import subprocess
import sys

import jaxmed.metrics

HEAVY = ("flax", "optax", "orbax", "grain", "tensorflow", "torch", "scipy", "sklearn", "skimage",
         "monai")


def test_import_pulls_in_no_heavy_dependency():
  code = ("import sys, jaxmed.metrics; "
          f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "", f"import jaxmed.metrics imported: {out.stdout.strip()}"


def test_public_api_is_complete():
  names = {"psnr", "nmse", "mse", "mae", "ssim", "dice", "hausdorff_distance",
           "average_surface_distance", "surface_dice", "distance_transform_edt", "roc_auc",
           "sensitivity_specificity", "accuracy", "two_afc_score", "max_normalize", "pearson",
           "spearman", "linear_cka", "ssfd", "vgg_perceptual_distance", "paired_t_test"}
  assert names <= set(jaxmed.metrics.__all__)
  assert all(callable(getattr(jaxmed.metrics, n)) for n in names)

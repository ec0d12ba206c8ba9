"""experiments/vit_ae_pp.py runs end to end at a tiny size (its own file, so pytest-xdist's
per-file scheduling runs it beside the others)."""

import json
import os
import runpy

import numpy as np
import pytest

from helpers import ONE_DEVICE

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments")
TINY = ["--set", "model.embed_dim=24", "--set", "model.depth=1", "--set", "model.num_heads=1",
        "--set", "model.decoder_embed_dim=16", "--set", "model.decoder_depth=1",
        "--set", "model.decoder_num_heads=1", "--set", "loss.num_slices=1",
        "--set", "loss_net.model.width=0.0625", "--set", "batch_size=4", *ONE_DEVICE]


@pytest.fixture(scope="module")
def experiment():
  return runpy.run_path(os.path.join(EXPERIMENTS, "vit_ae_pp.py"), run_name="jaxmed_experiment")


def test_tables_figures_and_results(experiment, tmp_path):
  out = tmp_path / "vit_ae_pp"
  summary = experiment["main"]([
      "--out", str(out), "--steps", "2", "--steps-2d", "2", "--pretrain-subjects", "4",
      "--eval-subjects", "20", "--seeds", "0", "--mask-ratios", "0.55", "--shape", "32", "32",
      "32", "--crop", "16", "--slices-2d", "2", *TINY])
  report = (out / "report.md").read_text()
  for heading in ("## Table 3 analogue", "## Fig. 2 analogue", "## Table 5 analogue",
                  "## 2D variant"):
    assert heading in report
  rows = [name for name, _ in experiment["ROWS"]] + [experiment["RANDOM_ROW"],
                                                     experiment["INTENSITY_ROW"]]
  for row in rows:
    assert f"| {row} |" in report
  for row in ("L2", "L2 + edge", "L2 + edge + perceptual", "MAE (L_rec)", "ViT-AE++ 2D"):
    assert f"| {row} |" in report
  assert "| 0.55 |" in report and "| 0.75 |" in report
  for png in ("fig2_mask_ratio.png", "fig2_lambda2.png", "fig3_reconstructions.png"):
    assert (out / png).stat().st_size > 1000

  saved = json.loads((out / "results.json").read_text())
  assert set(saved["svm"]) == set(rows)
  for row, runs in saved["svm"].items():
    auc = np.asarray(runs[0]["auc"])
    assert auc.shape == (5,) and np.all((auc >= 0) & (auc <= 1)), row  # 5 outer folds
  for row, runs in saved["reconstruction"].items():
    psnr, ssim = np.asarray(runs[0]["psnr"]), np.asarray(runs[0]["ssim"])
    assert psnr.shape == ssim.shape == (20,) and np.all(np.isfinite(psnr)), row
    assert np.all((ssim > -1) & (ssim <= 1)), row
  assert set(saved["lambda2"]) == {"decay", "constant"}
  assert saved["mask_ratio"]["0.75"] == saved["svm"]["ViT-AE"]  # the table's run, not retrained
  assert np.asarray(saved["probe_2d"]["ViT-AE++ 2D"][0]["accuracy"]).shape == (5,)
  assert summary["seeds"] == [0]
  for run in ("cl_s0", "all_s0", "rec_mask0.55_s0", "rec+edge_constant_s0", "2d_all_s0"):
    assert (out / "runs" / run / "metrics.jsonl").exists()


def test_flags_are_checked_before_training(experiment):
  parse = experiment["parse_args"]
  with pytest.raises(SystemExit):
    parse(["--mask-ratios", "1.0"])
  with pytest.raises(SystemExit):
    parse(["--lambda2-losses", "rec+per"])  # no edge term for lambda2 to weigh
  with pytest.raises(SystemExit):
    parse(["--mask-losses", "rec+foo"])
  with pytest.raises(SystemExit):
    parse(["--crop", "96"])  # larger than the 64^3 phantoms


def test_crops_and_slices_centre_on_the_tumour(experiment):
  from jaxmed.data import synthetic  # pylint: disable=g-import-not-at-top
  subject = synthetic.make_subject(3, shape=(32, 32, 32))
  modalities = ("flair", "t1", "t2", "t1ce")
  crops = experiment["tumour_crops"]([subject], modalities, 16)
  assert crops.shape == (1, 16, 16, 16, 4)
  centre = experiment["tumour_centre"](subject)
  origin = np.clip(centre - 8, 0, 16)
  expected = subject.image[tuple(slice(o, o + 16) for o in origin)]
  np.testing.assert_array_equal(
      crops[0], expected[..., [subject.modalities.index(m) for m in modalities]])
  slices, groups = experiment["tumour_slices"]([subject, subject], modalities, 3)
  assert slices.shape == (6, 32, 32, 4) and groups.tolist() == [0, 0, 0, 1, 1, 1]

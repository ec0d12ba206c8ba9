"""experiments/coper.py runs end to end at a tiny size (its own file: the longest experiment
test, so pytest-xdist's per-file scheduling runs it beside the others)."""

import json
import os
import runpy

import numpy as np
import pytest

from helpers import ONE_DEVICE

from jaxmed.config import load_config, with_total_steps

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments")


@pytest.fixture(scope="module")
def coper():
  return runpy.run_path(os.path.join(EXPERIMENTS, "coper.py"), run_name="jaxmed_experiment")


def test_tables_figures_and_results(coper, tmp_path):
  out = tmp_path / "coper"
  summary = coper["main"]([
      "--out", str(out), "--num-subjects", "4", "--num-test", "2", "--shape", "16", "64", "64",
      "--seeds", "0", "--steps", "2", "--ssl-steps", "2", "--seg-steps", "2",
      "--lambda1", "--table4", "--proxy-subjects", "1", "--tap-steps", "2",
      "--set", "batch_size=4", *ONE_DEVICE])
  report = (out / "report.md").read_text()
  for heading in ("## Table III analogue", "## Fig. 8 analogue", "## Fig. 3b analogue",
                  "## 2AFC on the phantom PROXY set", "PROXY 2AFC"):
    assert heading in report
  rows = ("L1", "L1 + rand. VGG", "L1 + SimSiam-VGG", "L1 + SwAV-VGG",
          "L1 + SwAV-VGG (flair)")  # the last: Table IV, the loss network of the other modality
  for row in rows:
    assert f"| {row} |" in report
  assert "| real channel (upper bound) |" in report
  assert "| L1 + SwAV-VGG vs L1 + SimSiam-VGG |" in report
  assert "| L1 + SwAV-VGG vs L1 + SwAV-VGG (flair) |" in report
  # The sweep without extra values: the task's 0.7 (the SwAV row) and 1.0 (the L1 row).
  assert "| 0.70 |" in report and "| 1.00 |" in report
  for distance in ("L2", "1 - SSIM", "CoPer SwAV-VGG (scorer) + learned w"):
    assert f"| {distance} |" in report
  for png in ("fig6_ssl_loss.png", "fig8_lambda1.png", "fig3b_rating_agreement.png",
              "montage.png"):
    assert (out / png).stat().st_size > 1000

  saved = json.loads((out / "results.json").read_text())
  assert set(saved["rows"]) == set(rows)
  for row, scores in saved["rows"].items():
    psnr, ssim, cop = (np.asarray(scores[k]) for k in ("psnr", "ssim", "coper"))
    assert psnr.shape == ssim.shape == cop.shape == (1, 2), row  # one seed x two subjects
    assert np.all(np.isfinite(psnr)) and np.all((ssim > -1) & (ssim <= 1)) and np.all(cop > 0)
    dice = np.asarray(scores["dice"], np.float64)
    assert dice.shape == (1, 2, 3), row  # WT / TC / ET per subject
    assert np.all((dice[np.isfinite(dice)] >= 0) & (dice[np.isfinite(dice)] <= 1))
  assert np.asarray(saved["upper_dice"]).shape == (2, 3)
  assert saved["two_afc"]["L2"]["overall"] == summary["two_afc"]["L2"]["overall"]
  # The loss networks are real runs whose checkpoints the synthesis runs loaded.
  for run in ("swav_vgg_t2_s0", "simsiam_vgg_t2_s0", "swav_vgg_t2_s1", "swav_vgg_flair_s0",
              "segmenter"):
    assert (out / "runs" / run / "metrics.jsonl").exists()


def test_lambda1_values_come_from_the_config_sweep(coper):
  args = coper["parse_args"](["--lambda1", "0.0", "0.7", "1.0", "0.4"])
  # The task's lambda1 (the SwAV row) and 1.0 (the L1 row) are not trained twice.
  assert coper["sweep_values"](args) == [0.0, 0.4]
  with pytest.raises(ValueError, match="not in the config sweep"):
    coper["sweep_values"](coper["parse_args"](["--lambda1", "0.25"]))


def test_set_overrides_every_config_with_the_field(coper):
  args = coper["parse_args"](["--set", "batch_size=4", "--set", "swav.temperature=0.2"])
  configs = [coper["ssl_config"](args, "swav", "vgg", "t2", 0),
             coper["synthesis_config"](args, "random", "vgg", 0),
             coper["segmenter_config"](args, ("t1", "t2"), "tumour")]
  assert [c.batch_size for c in configs] == [4, 4, 4]
  assert configs[0].swav.temperature == 0.2 and "swav" not in configs[1]
  with pytest.raises(ValueError, match="--set model.nope: no SSL, synthesis or segmenter"):
    coper["parse_args"](["--set", "model.nope=1"])


def test_with_total_steps_scales_every_milestone():
  config = load_config("swav:backbone=vgg16_bn,size=small")  # 300 steps
  assert (config.optim.warmup_steps, config.swav.queue_start_step,
          config.param_groups.prototypes.freeze_steps) == (15, 100, 30)
  config = with_total_steps(config, 150)
  assert config.total_steps == 150
  assert (config.optim.warmup_steps, config.swav.queue_start_step,
          config.param_groups.prototypes.freeze_steps) == (7, 50, 15)
  assert config.log_every == 15
  with pytest.raises(ValueError, match="steps"):
    with_total_steps(config, 0)

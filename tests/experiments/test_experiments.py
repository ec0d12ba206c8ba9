"""The paper experiments run end to end at a tiny size and write their tables and figures."""

import os
import runpy

import numpy as np
import pytest

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments")


def _main(name):
  return runpy.run_path(os.path.join(EXPERIMENTS, name), run_name="jaxmed_experiment")["main"]


def test_source_identification_tables_and_figures(tmp_path):
  out = tmp_path / "si"
  _main("source_identification.py")([
      "--out", str(out), "--datasets", "tumour", "--rows", "CNN,Cross-patients SI",
      "--repeats", "2", "--num-subjects", "6", "--num-val", "1", "--num-test", "1",
      "--few-labels", "1", "--shape", "16", "32", "32", "--features", "4", "8",
      "--batch-size", "4", "--pretrain-steps", "2", "--finetune-steps", "2", "--eval-every", "1",
      "--patience", "1", "--fig5-strategies", "CSI", "--fig5-sources", "3,2 5,3"])
  report = (out / "report.md").read_text()
  for heading in ("Table 1: all training labels", "Table 2: 1 labelled training subjects",
                  "Fig. 5"):
    assert heading in report
  assert "| method | WT | TC | ET | All |" in report
  assert "| Cross-patients SI |" in report and "| tumour | CSI |" in report
  assert "| dataset | strategy | N=3, Ñ=2 | N=5, Ñ=3 |" in report
  # The tables' own (N, N~) = (5, 3) is not trained again for Fig. 5.
  assert "CSI N=5 N~=3: mean Dice" in report and "(the table's run)" in report
  for png in ("fig5_num_sources.png", "pretext_examples.png"):
    assert (out / png).stat().st_size > 1000
  scores = np.load(out / "scores.npz")
  # Two repeats x one test subject, four region columns, for every (setting, row).
  assert sorted(scores.files) == sorted(f"tumour/{s}/{r}" for s in ("full", "few")
                                        for r in ("CNN", "Cross-patients SI"))
  assert all(scores[k].shape == (2, 4) for k in scores.files)


def test_source_identification_rejects_unknown_rows(tmp_path):
  with pytest.raises(SystemExit, match="--rows"):
    _main("source_identification.py")(["--out", str(tmp_path), "--rows", "CNN,SimCLR"])


def test_ssfd_figures_and_tables(tmp_path):
  out = tmp_path / "ssfd"
  _main("ssfd.py")([
      "--out", str(out), "--num-subjects", "4", "--num-test", "1", "--shape", "16", "32", "32",
      "--slices-per-subject", "3", "--ssfd-steps", "2", "--ssfd-chans", "10",
      "--recon-steps", "2", "--recon-features", "4", "8", "--batch-size", "4", "--levels", "4",
      "--accelerations", "2", "8"])
  report = (out / "report.md").read_text()
  for heading in ("Fig. 1 / 5: perturbations", "Fig. 2: SSFD per encoder layer",
                  "Fig. 3 / 6: quality control", "VGG-PL (random weights)"):
    assert heading in report
  for kind in ("shift", "blur", "noise"):
    assert f"| {kind} |" in report
  for png in ("fig1_perturbations.png", "fig2_layers.png", "fig3_quality_control.png",
              "fig4_context_prediction.png"):
    assert (out / png).stat().st_size > 1000
  m = np.load(out / "metrics.npz")
  # 3 test images x 2 accelerations; a perturbation of level 0 leaves SSIM at 1, SSFD at 0.
  assert m["recon_ssim"].shape == (6,) and m["accel"].tolist() == [2] * 3 + [8] * 3
  for kind in ("shift", "blur", "noise"):
    assert m[f"{kind}_ssim"].shape == (4, 3)
    np.testing.assert_allclose(m[f"{kind}_ssim"][0], 1.0, atol=1e-5)
    np.testing.assert_allclose(m[f"{kind}_ssfd"][0], 0.0, atol=1e-7)
    # Every perturbation moves both metrics away from identity at its largest level.
    assert np.all(m[f"{kind}_ssim"][-1] < 0.999) and np.all(m[f"{kind}_ssfd"][-1] > 0)


def test_seg3d_pretraining_comparison_pairs_subjects_across_orders():
  """The pooled table pairs a subject with itself even when runs list subjects in another
  order, and leaves out pairs with an infinite distance."""
  module = runpy.run_path(os.path.join(EXPERIMENTS, "seg3d_pretraining.py"),
                          run_name="jaxmed_experiment")
  rng = np.random.default_rng(0)
  dice = rng.uniform(0.2, 0.6, (5, 1))
  hd = rng.uniform(1, 5, (5, 1))
  hd[2] = np.inf
  subjects = [f"s{i}" for i in range(5)]
  scratch = {"subjects": subjects, "dice": dice, "hd95": hd, "msd": hd}
  order = [4, 2, 0, 3, 1]
  pretrained = {"subjects": [subjects[i] for i in order], "dice": dice[order] + 0.1,
                "hd95": hd[order], "msd": hd[order] - 0.5}
  table = module["comparison"](("WT",), [scratch], [pretrained])
  rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.splitlines()[2:]}
  assert rows["Dice"][4] == "+0.100" and rows["Dice"][6] == "5 |"
  assert rows["HD95 (mm)"][4] == "+0.000" and rows["HD95 (mm)"][6] == "4 |"
  assert rows["HD95 (mm)"][2].endswith(", 1 inf") and rows["MSD (mm)"][4] == "-0.500"

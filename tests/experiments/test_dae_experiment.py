"""experiments/dae.py runs end to end at a tiny size (its own file, so pytest-xdist's per-file
scheduling runs it beside the others).

Every distinct Swin-UNETR program compiles for tens of seconds, so the end-to-end run uses the
fewest that fill every table: the DAE, DAE w/o CMCL and SimMIM train steps, one fine-tuning
step (the tissue task; scratch and every pre-trained row share it), no single-disruption rows
of Table 5 (``--disruptions`` with nothing: each is a DAE config that tests/methods/test_dae.py
covers), one label fraction (the ablation's, so Tables 3, 5 and 6 share their runs), one seed,
depth-1 stages of one head, one validation per fine-tuning run.
"""

import json
import os
import runpy

import numpy as np
import pytest

from helpers import ONE_DEVICE

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "dae.py")
TINY = ["--shape", "32", "32", "32", "--pretrain-subjects", "2", "--subjects", "6",
        "--num-test", "2", "--num-val", "1", "--pretrain-steps", "2", "--finetune-steps", "2",
        "--finetune-batch", "4", "--disruptions", "--targets", "tissues", "--fractions", "1.0",
        "--cka-tokens", "512", "--eval-every", "2", "--set", "model.depths=[1,1,1,1]",
        "--set", "model.num_heads=[1,1,1,1]", "--set", "batch_size=4", *ONE_DEVICE,
        "--finetune-set", "mesh.num_devices=1"]
TISSUES = ["scalp", "skull", "csf", "gm", "wm", "ventricles", "lesion"]


@pytest.fixture(scope="module")
def experiment():
  return runpy.run_path(SCRIPT, run_name="jaxmed_experiment")


def test_tables_figures_and_results(experiment, tmp_path):
  out = tmp_path / "dae"
  summary = experiment["main"](["--out", str(out), *TINY])
  report = (out / "report.md").read_text()
  for heading in ("## Fig. 2 analogue", "## Table 5 analogue", "## Table 6 analogue",
                  "## Table 3 analogue: tissues", "### 100% of the training subjects",
                  "## Table 7 analogue", "## Tables 8-10 analogue"):
    assert heading in report, heading
  assert "Not run (``--sweep``)" in report
  for row in ("Scratch", "MAE", "DAE", "DAE w/o CMCL", "MAE (visible pasted)",
              "Scratch (initialisation)"):
    assert f"| {row} |" in report, row
  for metric in ("Dice", "HD95 (mm)", "MSD (mm)"):  # Table 3 per class
    for tissue in TISSUES:
      assert f"| {metric} | {tissue} |" in report, (metric, tissue)
  for png in ("fig2_reconstructions.png", "table7_cka.png"):
    assert (out / png).stat().st_size > 1000

  saved = json.loads((out / "results.json").read_text())
  assert saved["seeds"] == summary["seeds"] == [0]
  assert saved["regions"]["tissues"] == TISSUES
  # Fig. 2: 2 test subjects x 4 modalities = 8 crops per row.
  assert set(saved["reconstruction"]) == {"DAE", "MAE", "MAE (visible pasted)"}
  for row, runs in saved["reconstruction"].items():
    psnr, ssim = np.asarray(runs[0]["output"]["psnr"]), np.asarray(runs[0]["output"]["ssim"])
    assert psnr.shape == ssim.shape == (8,) and np.all(np.isfinite(psnr)), row
    assert np.all((ssim > -1) & (ssim <= 1)), row
  # Fine-tuning: per row and seed, (2 test subjects, 7 classes) of each metric, same subjects.
  rows = saved["finetune"]["tissues"]["1"]
  assert list(saved["finetune"]["tissues"]) == ["1"] and list(rows) == ["Scratch", "MAE", "DAE"]
  for row, tables in rows.items():
    assert tables[0]["subjects"] == rows["Scratch"][0]["subjects"], row
    for metric in ("dice", "hd95", "msd"):
      assert np.asarray(tables[0][metric], dtype=float).shape == (2, 7), (row, metric)
  assert list(saved["table5"]) == ["Scratch", "MAE", "DAE"]
  assert list(saved["table6"]) == ["Scratch", "DAE w/o CMCL", "DAE"]
  assert saved["table5"]["DAE"] == rows["DAE"]  # the same run, not trained again
  assert set(saved["cka"]) == {"MAE", "DAE", "Scratch (initialisation)"}
  for row, per_seed in saved["cka"].items():
    values = np.asarray([per_seed[0][f"hidden_states_{i}"] for i in range(5)])
    assert np.all((values >= -1e-4) & (values <= 1 + 1e-4)), row
  assert saved["cka_examples"]["hidden_states_0"] == 512  # 2 crops x 16^3 tokens, subsampled
  assert saved["sweep"] == {}
  runs = {p.name for p in (out / "runs").iterdir()}
  assert {"pretrain_all_s0", "pretrain_all_nocmcl_s0", "pretrain_mae_s0",
          "finetune_tissues_scratch_1_s0", "finetune_tissues_all_nocmcl_1_s0"} <= runs
  assert (out / "runs" / "pretrain_all_s0" / "checkpoints").exists()
  assert not (out / "runs" / "finetune_tissues_all_1_s0" / "checkpoints").exists()


def test_flags_are_checked_before_training(experiment):
  parse = experiment["parse_args"]
  for bad in (["--fractions", "0"], ["--ablation-fraction", "1.5"], ["--num-test", "1"],
              ["--num-val", "0"], ["--subjects", "5", "--num-test", "4"],
              ["--pretrain-steps", "0"], ["--disruptions", "blur"], ["--targets", "organs"],
              ["--set", "model.feature_size"],           # no "=VALUE"
              ["--set", "model.no_such_field=1"],        # in no pre-training config
              ["--finetune-set", "optim.no_such=1"]):
    with pytest.raises(SystemExit):
      parse(bad)
  args = parse(["--set", "pretext.mask_ratio=0.4", "--set", "model.depths=[1,1,1,1]"])
  dae = experiment["pretrain_config"](args, "all", 0)
  simmim = experiment["pretrain_config"](args, "mae", 0)
  assert dae.pretext.mask_ratio == simmim.pretext.mask_ratio == 0.4  # both have the field
  assert tuple(dae.model.depths) == (1, 1, 1, 1)
  # The fine-tuning Swin-UNETR is the pre-trained one (window 4, depths) with its own head.
  seg = experiment["finetune_config"](args, "tissues", 0.5, 3)
  assert seg.model.window_size == dae.model.window_size == 4
  assert tuple(seg.model.depths) == (1, 1, 1, 1) and seg.finetune.label_fraction == 0.5
  assert seg.data.pathology == "brain_tissues" and tuple(seg.data.modalities) == ("t1",)
  assert seg.data.seed != dae.data.seed  # fine-tuning subjects apart from pre-training ones
  # --swin-ssl: its encoder is the fine-tuning Swin-UNETR's, transferred alone.
  ssl = experiment["pretrain_config"](args, "swin_ssl", 0)
  assert ssl.model.embed_dim == seg.model.feature_size and ssl.model.window_size == 4
  assert tuple(ssl.model.depths) == (1, 1, 1, 1) and ssl.total_steps == dae.total_steps
  encoder_only = experiment["finetune_config"](args, "tissues", 1.0, 0, part="encoder")
  assert len(encoder_only.init.replace) == len(seg.init.replace) + 1  # the fresh decoder


def test_crops_cover_the_volume_and_the_tumour(experiment):
  from jaxmed.data import synthetic  # pylint: disable=g-import-not-at-top
  subject = synthetic.make_subject(3, shape=(32, 48, 48))
  crops = experiment["tumour_crops"]([subject], 32)
  assert crops.shape == (4, 32, 32, 32, 1)  # one per modality
  centre = np.round(np.argwhere(subject.label > 0).mean(axis=0)).astype(int)
  origin = np.clip(centre - 16, 0, np.asarray(subject.image.shape[:3]) - 32)
  np.testing.assert_array_equal(
      crops[1, ..., 0], subject.image[tuple(slice(o, o + 32) for o in origin)][..., 1])
  grid = experiment["grid_crops"]([subject], 32)
  assert grid.shape == (4, 32, 32, 32, 4)  # 1 x 2 x 2 half-overlapping windows
  np.testing.assert_array_equal(grid[-1], subject.image[:, 16:, 16:])


def test_sweep_runs_every_point_of_get_sweep_alone_and_fills_tables_8_to_10(experiment):
  """``--sweep``'s plumbing (the training itself is the Table 5 path the end-to-end test runs):
  every `get_sweep` point pre-trained with its disruption alone at the sweep's step count,
  fine-tuned on the ablation task, tabulated against scratch per field."""
  from jaxmed.configs.dae import get_sweep  # pylint: disable=g-import-not-at-top
  args = experiment["parse_args"](["--sweep", "--pretrain-steps", "10", "--seeds", "0", "1"])
  calls = []

  def table(value):
    return {"subjects": ["a", "b"], "dice": np.full((2, 7), value), "hd95": np.ones((2, 7)),
            "msd": np.ones((2, 7))}

  class FakeStudy:
    def __init__(self):
      self.args = args

    def pretrain(self, key, seed, extra=None, steps=None, tag=None):
      calls.append((key, seed, extra, steps, tag))
      return {"tag": tag}

    def finetune(self, task, key, fraction, seed, run=None):
      assert task == "tissues" and fraction == 1.0 and run == {"tag": key}
      return {"scores": table(0.5)}

  sweep = experiment["run_sweep"](FakeStudy())
  points = get_sweep("")
  assert len(calls) == 2 * len(points)
  for (key, seed, extra, steps, tag), point in zip(calls, points + points):
    field = next(f for f in point if f != "pretext.disruption")
    assert key == point["pretext.disruption"] and extra == {field: point[field]}
    assert steps == 5 and tag == f"sweep_{key}_{point[field]:g}"  # half of --pretrain-steps
  assert set(sweep) == set(experiment["SWEEP_TABLES"])
  for field, values in sweep.items():
    expected = [f"{p[field]:g}" for p in points if field in p]
    assert list(values) == expected and all(len(v) == 2 for v in values.values())  # 2 seeds
  rows = {"Scratch": [table(0.4)] * 2, **{f"noise = {v}": t for v, t in
                                          sweep["pretext.noise_variance"].items()}}
  text = experiment["summary_table"](rows)
  assert "| noise = 0.1 | 0.500 (0.000) | +0.100 |" in text

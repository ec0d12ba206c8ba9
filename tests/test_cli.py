import os
import subprocess
import sys

import pytest

from helpers import REPO, tiny_flags

from jaxmed import cli, config as config_lib


def _run(*args, cwd=REPO, env=None):
  return subprocess.run([sys.executable, "-m", "jaxmed.cli", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_typo_in_a_config_override_is_an_error(tmp_path):
  # A shipped config by its bare name, from a folder that is not the repository.
  proc = _run("train", "--config", "restoration:size=small", "--workdir", str(tmp_path),
              "--config.optim.lrr=0.1", cwd=tmp_path)
  assert proc.returncode != 0
  assert "lrr" in proc.stderr and "Did you mean" in proc.stderr
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_shipped_configs_load_by_name_or_path():
  assert {"si", "restoration", "finetune", "context_prediction",
          "reconstruction"} <= set(config_lib.shipped_configs())
  by_name = config_lib.load_config("si:strategy=within", {"total_steps": 3})
  by_path = config_lib.load_config(os.path.join(REPO, "jaxmed/configs/si.py:strategy=within"))
  assert by_name.pretext.strategy == "within" and by_name.total_steps == 3
  assert by_path.pretext == by_name.pretext
  with pytest.raises(FileNotFoundError, match="shipped: .*restoration"):
    config_lib.resolve_config_path("restorashun")
  with pytest.raises(ValueError, match="unknown method 'nope'.*restoration"):
    config_lib.method_config("nope")


def test_typo_in_a_config_file_is_an_error():
  config = config_lib.method_config("restoration")
  with pytest.raises(AttributeError):
    config.optim.lrr = 0.1
  with pytest.raises(AttributeError):
    config.pretext.gird = 4  # a method's own section is locked too
  with pytest.raises(KeyError, match="no such config field"):
    config_lib.apply_overrides(config, {"pretext.gird": 4})
  with pytest.raises(KeyError, match="no config section"):
    config_lib.apply_overrides(config, {"finetune.num_labeled": 4})  # not this method's


def test_unknown_command_and_help():
  assert cli.main(["jaxmed", "fly"]) == 2
  assert cli.main(["jaxmed", "--help"]) == 0


def test_sweep_runs_locally_and_writes_slurm_script(tmp_path):
  # Without the test session's compilation cache: the CLI's default one, under
  # $JAXMED_CACHE_DIR/jit, shared by the sweep's runs.
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")
         and k != "JAX_COMPILATION_CACHE_DIR"}
  env["JAXMED_CACHE_DIR"] = str(tmp_path / "cache")
  proc = _run("sweep", "--config", "finetune", "--workdir", str(tmp_path / "local"),
              "--noprogress", *tiny_flags(), "--config.total_steps=2", env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.listdir(tmp_path / "cache" / "jit")
  runs = sorted(os.listdir(tmp_path / "local"))
  assert runs == ["000", "001", "002"]
  for run in runs:
    assert os.path.exists(tmp_path / "local" / run / "test_dice.json")
  assert "| 002 |" in proc.stdout  # each run prints its Dice table

  proc = _run("sweep", "--config", "jaxmed/configs/restoration.py:size=small", "--workdir",
              str(tmp_path / "slurm"), "--slurm", "--config.total_steps=7")
  assert proc.returncode == 0, proc.stderr[-3000:]
  script = open(tmp_path / "slurm" / "sweep.sbatch").read()
  assert "#SBATCH --array=0-17" in script
  assert "--config.pretext.grid=64 --config.pretext.keep_prob=0.75" in script
  assert "jaxmed/configs/restoration.py:size=small" in script and "--config.total_steps=7" in script
  subprocess.run(["bash", "-n", str(tmp_path / "slurm" / "sweep.sbatch")], check=True)


def test_prepare_builds_a_tfds_dataset(tmp_path):
  from jaxmed.data import nifti, synthetic, tfds as jtfds  # pylint: disable=g-import-not-at-top
  for subject in synthetic.make_subjects(2, shape=(16, 16, 16)):
    nifti.write_case(subject, tmp_path / "BraTS2021_Training_Data")
  proc = _run("prepare", "--dataset", "brats", "--dataset_config", "2021", "--manual_dir",
              str(tmp_path), "--data_dir", str(tmp_path / "tfds"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "'train': 2" in proc.stdout
  source = jtfds.data_source("brats", "train", data_dir=tmp_path / "tfds", config="2021")
  assert [bytes(source[i]["subject_id"]).decode() for i in range(2)] == [
      "phantom-0-0000", "phantom-0-0001"]
  proc = _run("prepare", "--dataset", "brats", "--data_dir", str(tmp_path))
  assert proc.returncode != 0 and "--manual_dir" in proc.stderr

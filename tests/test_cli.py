import os
import subprocess
import sys

import pytest

from jaxmed import cli
from jaxmed.train.defaults import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from conftest import tiny_flags  # noqa: E402  pylint: disable=g-import-not-at-top


def _run(*args):
  return subprocess.run([sys.executable, "-m", "jaxmed.cli", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def test_typo_in_a_config_override_is_an_error(tmp_path):
  proc = _run("train", "--config", "configs/restoration.py", "--workdir", str(tmp_path),
              "--config.optim.lrr=0.1")
  assert proc.returncode != 0
  assert "lrr" in proc.stderr and "Did you mean" in proc.stderr
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_typo_in_a_config_file_is_an_error():
  config = base_config()
  with pytest.raises(AttributeError):
    config.optim.lrr = 0.1
  with pytest.raises(KeyError, match="no such config field"):
    cli.apply_overrides(config, {"pretext.gird": 4})


def test_unknown_command_and_help():
  assert cli.main(["jaxmed", "fly"]) == 2
  assert cli.main(["jaxmed", "--help"]) == 0


def test_sweep_runs_locally_and_writes_slurm_script(tmp_path):
  proc = _run("sweep", "--config", "configs/finetune.py", "--workdir", str(tmp_path / "local"),
              "--noprogress", *tiny_flags(), "--config.total_steps=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  runs = sorted(os.listdir(tmp_path / "local"))
  assert runs == ["000", "001", "002"]
  for run in runs:
    assert os.path.exists(tmp_path / "local" / run / "test_dice.json")
  assert "| 002 |" in proc.stdout  # each run prints its Dice table

  proc = _run("sweep", "--config", "configs/restoration.py:size=small", "--workdir",
              str(tmp_path / "slurm"), "--slurm", "--config.total_steps=7")
  assert proc.returncode == 0, proc.stderr[-3000:]
  script = open(tmp_path / "slurm" / "sweep.sbatch").read()
  assert "#SBATCH --array=0-17" in script
  assert "--config.pretext.grid=64 --config.pretext.keep_prob=0.75" in script
  assert "configs/restoration.py:size=small" in script and "--config.total_steps=7" in script
  subprocess.run(["bash", "-n", str(tmp_path / "slurm" / "sweep.sbatch")], check=True)

"""`jaxmed.runner.run_config`: training plus the config's evaluators and starting weights."""

import jax
import numpy as np
from helpers import tiny_config

from jaxmed.runner import run_config
from jaxmed.train import checkpoint
from jaxmed.train.logging import read_metrics


def test_run_config_with_an_evaluator_and_init_from_a_run(tmp_path):
  config = tiny_config("restoration", total_steps=4, log_every=2,
                       checkpoint__every=0)
  with config.unlocked():  # a config file adds its evaluators the same way
    config.evals.recon = dict(type="reconstruction", every=2, split="val", num_slices=4)
  first = run_config(config, str(tmp_path / "a"), progress=False)
  records = read_metrics(str(tmp_path / "a"))
  assert [r["step"] for r in records] == [2, 4]
  assert all(np.isfinite(r["recon/psnr"]) and 0 < r["recon/ssim"] <= 1 for r in records)
  assert (tmp_path / "a" / "config.json").exists()

  # A second run starts from the first one's weights, except the replaced output layer.
  second = tiny_config("restoration", total_steps=1, checkpoint__every=0,
                       init__path=str(tmp_path / "a"), init__replace=(r"output_conv/.*",),
                       optim__lr=0.0, optim__weight_decay=0.0)
  result = run_config(second, str(tmp_path / "b"), progress=False)
  before = jax.device_get(first.state.params)
  after = jax.device_get(result.state.params)
  jax.tree.map(np.testing.assert_array_equal, after["bottleneck"], before["bottleneck"])
  assert not np.array_equal(after["output_conv"]["kernel"], before["output_conv"]["kernel"])
  np.testing.assert_array_equal(checkpoint.load_variables(str(tmp_path / "a"))["params"]
                                ["bottleneck"]["conv_0"]["conv"]["kernel"],
                                before["bottleneck"]["conv_0"]["conv"]["kernel"])

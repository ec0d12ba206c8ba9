"""The README's "Adding a method" example works as written: its method file and config file
define a method that the config system, the registry and the trainer accept."""

import os
import re

import numpy as np
from helpers import REPO

from jaxmed import methods
from jaxmed.config import apply_overrides
from jaxmed.train import trainer


def _example() -> tuple[str, str]:
  text = open(os.path.join(REPO, "README.md")).read()
  section = text[text.index("### Adding a method"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  method_src, config_src = code.split("# jaxmed/configs/denoising.py")
  return method_src, config_src


def test_readme_method_example_trains(monkeypatch, tmp_path):
  method_src, config_src = _example()
  namespace = {}
  exec(compile(method_src, "README:denoising method", "exec"), namespace)  # pylint: disable=exec-used
  monkeypatch.setitem(methods.METHODS, "denoising", namespace["DenoisingMethod"])
  config_ns = {}
  exec(compile(config_src, "README:denoising config", "exec"), config_ns)  # pylint: disable=exec-used
  config = apply_overrides(config_ns["get_config"](""), {
      "pretext.sigma": 0.2, "model.features": (4, 8), "batch_size": 4, "total_steps": 3,
      "log_every": 1, "checkpoint.every": 0, "tensorboard": False})
  assert config.method == "denoising" and config.optim.name == "adam"
  arrays = {"image": np.random.default_rng(0).normal(size=(8, 16, 16, 4)).astype(np.float32)}
  result = trainer.train(config, str(tmp_path), train_data=arrays, progress=False)
  assert int(result.state.step) == 3 and np.isfinite(result.last_metrics["loss"])

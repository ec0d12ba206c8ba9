"""Runs of one process with equal configs share the method and its compiled programs
(`jaxmed.train.programs`); anything that changes the program gets its own."""

import jax
import numpy as np
import pytest

from jaxmed import methods as methods_lib
from jaxmed.methods import RestorationMethod, get_method
from jaxmed.train import programs, sharding, trainer

from helpers import tiny_config


class _Counting(RestorationMethod):
  """In-painting whose loss counts the times it is traced."""

  name = "counting"
  traces = 0

  def loss(self, variables, batch, key, *, train, step=0):
    type(self).traces += 1
    return super().loss(variables, batch, key, train=train, step=step)


@pytest.fixture
def counting(monkeypatch):
  monkeypatch.setitem(methods_lib.METHODS, "counting", _Counting)
  monkeypatch.setattr(_Counting, "traces", 0)
  programs.clear()
  yield _Counting
  programs.clear()


def _config(**overrides):
  config = tiny_config("restoration", total_steps=3, checkpoint__every=0, log_every=1,
                       **overrides)
  config.method = "counting"
  return config


def _train(config, tmp_path, name, **kwargs):
  result = trainer.train(config, str(tmp_path / name), progress=False, **kwargs)
  return jax.device_get(result.state.params), result


def test_an_equal_config_reuses_the_traced_step_and_trains_the_same(counting, tmp_path,
                                                                     tiny_arrays):
  params, first = _train(_config(), tmp_path, "a", train_data=tiny_arrays)
  traced = counting.traces
  assert traced >= 1
  again, second = _train(_config(), tmp_path, "b", train_data=tiny_arrays)
  assert counting.traces == traced  # neither traced nor compiled again
  assert second.method is first.method
  jax.tree.map(np.testing.assert_array_equal, again, params)
  assert second.last_metrics["loss"] == first.last_metrics["loss"]

  # Another seed is another config: traced again, other numbers.
  other, _ = _train(_config(seed=7), tmp_path, "c", train_data=tiny_arrays)
  assert counting.traces > traced
  assert not np.array_equal(jax.tree.leaves(other)[0], jax.tree.leaves(params)[0])


def test_a_method_the_caller_built_gets_its_own_programs(counting, tmp_path, tiny_arrays):
  params, _ = _train(_config(), tmp_path, "a", train_data=tiny_arrays)
  traced = counting.traces
  own = get_method(_config())
  again, result = _train(_config(), tmp_path, "b", train_data=tiny_arrays, method=own)
  assert counting.traces > traced and result.method is own
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_batch_shapes_mesh_and_frozen_network_shapes_are_part_of_the_key(counting):
  config = _config()
  method = programs.shared_method(config)
  assert programs.shared_method(_config()) is method
  built = []

  def lookup(batch, mesh, frozen, cfg=config, m=method):
    return programs.programs(cfg, m, batch, mesh, frozen, lambda: built.append(1) or len(built))

  batch = {"image": np.zeros((8, 16, 16, 4), np.float32)}
  one, four = sharding.make_mesh({"num_devices": 1}), sharding.make_mesh({"data": 4})
  net = {"params": {"w": np.ones((3, 3), np.float32)}}
  assert lookup(batch, one, {}) == lookup(dict(batch), one, {}) == 1
  assert lookup({"image": np.zeros((8, 16, 16, 4), np.float64)}, one, {}) == 2  # dtype
  assert lookup({"image": np.zeros((4, 16, 16, 4), np.float32)}, one, {}) == 3  # shape
  assert lookup(batch, four, {}) == 4
  assert lookup(batch, one, {"loss_net": net}) == 5
  # Other values: the same programs (the initialisation takes the network as an argument).
  assert lookup(batch, one, {"loss_net": {"params": {"w": np.full((3, 3), 2.0, np.float32)}}}) == 5
  assert lookup(batch, one, {"loss_net": {"params": {"w": np.ones((3, 4), np.float32)}}}) == 6
  assert lookup(batch, one, {"other": net}) == 7
  # Not the shared method of this config: built every time.
  assert lookup(batch, one, {}, m=get_method(config)) == 8
  assert lookup(batch, one, {}, cfg=_config(seed=1)) == 9
  assert lookup(batch, one, {}, cfg=_config(seed=1)) == 10


def test_the_last_configs_are_kept_and_clear_forgets_them(counting, monkeypatch):
  monkeypatch.setattr(programs, "MAX_CONFIGS", 2)
  first = programs.shared_method(_config(seed=0))
  programs.shared_method(_config(seed=1))
  assert programs.shared_method(_config(seed=0)) is first  # now the most recent
  programs.shared_method(_config(seed=2))  # drops seed 1, the least recent
  assert programs.shared_method(_config(seed=0)) is first
  kept = programs.shared_method(_config(seed=2))
  assert programs.shared_method(_config(seed=2)) is kept
  programs.clear()
  assert programs.shared_method(_config(seed=0)) is not first


def test_another_class_registered_under_the_name_is_another_method(counting, monkeypatch):
  first = programs.shared_method(_config())

  class _Other(_Counting):
    pass

  monkeypatch.setitem(methods_lib.METHODS, "counting", _Other)
  assert type(programs.shared_method(_config())) is _Other

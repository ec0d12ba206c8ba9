"""SimSiam: the networks (projector, predictor), the loss with per-view batch norm, two views
deterministic per key, a few trainer steps, features, and configs for every backbone."""

import flax.traverse_util
import jax
import numpy as np
import pytest

from helpers import config_for, eval_mode_variables

from jaxmed.config import load_config, set_model
from jaxmed.losses import simsiam_loss
from jaxmed.methods import METHODS, SimSiamMethod, get_method
from jaxmed.methods.swav import BACKBONES
from jaxmed.models import VGG16, ResNet
from jaxmed.train import trainer
from jaxmed.train.logging import read_metrics

# A ResNet-18 at 1/8 width (64 features) on 32 x 32 slices, views of 16.
TINY = {
    "model.depth": 18, "model.widen_factor": 0.125,
    "pretext.size": 16, "pretext.blur_sigma": (0.1, 1.0),
    "head.proj_dim": 12, "head.pred_hidden_dim": 4,
    "data.num_subjects": 4, "data.shape": (16, 32, 32), "data.num_val": 0, "data.num_test": 0,
    "data.min_foreground": 0.1,
    "batch_size": 8, "total_steps": 4, "log_every": 1, "checkpoint.every": 0,
    "tensorboard": False,
}
IMAGE = np.random.default_rng(0).uniform(size=(4, 32, 32, 1)).astype(np.float32)


def _config(**overrides):
  return config_for("simsiam", {**TINY, **overrides})


@pytest.fixture(scope="module")
def method():
  return SimSiamMethod(_config())


@pytest.fixture(scope="module")
def variables(method):
  return eval_mode_variables(method, IMAGE)


def test_projector_and_predictor_layers(variables):
  paths = {"/".join(k): v.shape for k, v in flax.traverse_util.flatten_dict(variables).items()}
  head = {p: s for p, s in paths.items() if "backbone" not in p}
  assert head == {
      # Projector: 2 x (Linear no bias - BN - ReLU) at the backbone's width (64), Linear -
      # BN without affine parameters (running statistics only).
      "params/projector/linear1/kernel": (64, 64), "params/projector/bn1/scale": (64,),
      "params/projector/bn1/bias": (64,), "params/projector/linear2/kernel": (64, 64),
      "params/projector/bn2/scale": (64,), "params/projector/bn2/bias": (64,),
      "params/projector/linear3/kernel": (64, 12),
      "batch_stats/projector/bn1/mean": (64,), "batch_stats/projector/bn1/var": (64,),
      "batch_stats/projector/bn2/mean": (64,), "batch_stats/projector/bn2/var": (64,),
      "batch_stats/projector/bn3/mean": (12,), "batch_stats/projector/bn3/var": (12,),
      # Predictor: Linear no bias (12 -> 4) - BN - ReLU - Linear (4 -> 12).
      "params/predictor/linear1/kernel": (12, 4), "params/predictor/bn1/scale": (4,),
      "params/predictor/bn1/bias": (4,), "params/predictor/linear2/kernel": (4, 12),
      "params/predictor/linear2/bias": (12,),
      "batch_stats/predictor/bn1/mean": (4,), "batch_stats/predictor/bn1/var": (4,)}
  assert paths["params/backbone/conv1/kernel"] == (7, 7, 3, 8)  # 3-channel input


def test_loss_is_symmetric_negative_cosine_with_per_view_batch_norm(method, variables):
  key = jax.random.PRNGKey(1)

  @jax.jit
  def run(variables):
    loss, metrics, model_state = method.loss(variables, {"image": IMAGE}, key, train=True)
    views = method.views(key, IMAGE)
    apply = lambda x: method.model.apply(variables, x, train=True, mutable=["batch_stats"])[0]
    (p1, z1), (p2, z2) = apply(views[0]), apply(views[1])
    p, z = apply(views.reshape(8, *views.shape[2:]))  # both views in one batch-norm batch
    joint = simsiam_loss(p[:4], p[4:], z[:4], z[4:])
    return loss, metrics, model_state, simsiam_loss(p1, p2, z1, z2), joint, views

  loss, metrics, model_state, per_view, joint, views = run(variables)
  assert views.shape == (2, 4, 16, 16, 3)
  np.testing.assert_allclose(float(loss), float(per_view), rtol=1e-5)
  assert abs(float(loss) - float(joint)) > 1e-4
  assert -1 <= float(loss) <= 1 and 0 < float(metrics["z_std"]) <= 1
  # Batch-norm running statistics were updated (twice: one per view).
  before = variables["batch_stats"]["projector"]["bn3"]["mean"]
  assert not np.allclose(model_state["batch_stats"]["projector"]["bn3"]["mean"], before)
  # Two views, deterministic per key (to float32 rounding: another program, other fusions).
  again = jax.jit(method.views)(key, IMAGE)
  np.testing.assert_allclose(again, views, rtol=1e-6, atol=1e-6)
  assert not np.allclose(again[0], again[1])
  assert not np.allclose(jax.jit(method.views)(jax.random.PRNGKey(2), IMAGE), views)


def test_features_are_pooled_backbone_features(method, variables):
  assert jax.jit(method.features)(variables, IMAGE).shape == (4, 64)


def test_trainer_steps_with_a_fixed_predictor_lr(tmp_path):
  config = _config(**{"pretext.size": 32})
  set_model(config, "vgg16", width=1 / 16)  # quick to compile; batch norm in the head
  result = trainer.train(config, str(tmp_path), progress=False)
  assert int(result.state.step) == 4
  records = read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) and -1 <= r["loss"] <= 1 for r in records)
  # --fix-pred-lr: the predictor keeps the initial lr, the rest follows the cosine.
  lr0 = 0.05 * 96 / 256
  assert all(abs(r["lr/predictor"] - lr0) < 1e-7 for r in records)
  assert records[0]["lr"] == pytest.approx(lr0) and records[-1]["lr"] < lr0
  init_key = jax.random.split(jax.random.PRNGKey(config.seed))[0]
  init = trainer.jit_init(SimSiamMethod(config).init)(
      init_key, {"image": np.zeros((8, 32, 32, 1), np.float32)})
  jax.tree.map(lambda a, b: np.testing.assert_(not np.allclose(a, b)),
               {"p": result.state.params["predictor"]["linear1"]["kernel"],
                "b": result.state.params["backbone"]["conv1_1"]["kernel"]},
               {"p": init["params"]["predictor"]["linear1"]["kernel"],
                "b": init["params"]["backbone"]["conv1_1"]["kernel"]})
  assert np.all(np.isfinite(jax.device_get(
      result.state.model_state["batch_stats"]["projector"]["bn3"]["var"])))


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_config_builds_every_backbone(backbone):
  config = load_config(f"simsiam:backbone={backbone},size=small")
  method = get_method(config)
  assert isinstance(method, METHODS["simsiam"]) and config.data.modalities == ("t2",)
  net = method.model.backbone
  if backbone.startswith("vgg"):
    assert isinstance(net, VGG16) and net.width == 0.25 and not net.include_top
    assert net.batch_norm == (backbone == "vgg16_bn")
  else:
    assert isinstance(net, ResNet) and net.widen_factor == 0.25 and net.num_classes is None
  full = load_config(f"simsiam:backbone={backbone}")
  assert (full.head.proj_dim, full.head.pred_hidden_dim) == (2048, 512)
  assert full.optim.name == "sgd" and full.optim.weight_decay == 1e-4
  assert full.optim.lr == pytest.approx(0.05 * full.batch_size / 256)
  assert full.pretext.size == 224 and tuple(full.pretext.scale) == (0.2, 1.0)


def test_errors():
  with pytest.raises(ValueError, match="backbone must be one of"):
    load_config("simsiam:backbone=vit")
  with pytest.raises(ValueError, match="VGG-16 needs crops of at least 32"):
    get_method(load_config("simsiam:backbone=vgg16,size=small", {"pretext.size": 16}))
  with pytest.raises(ValueError, match="head.proj_dim must be >= 1"):
    SimSiamMethod(_config(**{"head.proj_dim": 0}))
  with pytest.raises(ValueError, match="one modality"):
    SimSiamMethod(_config(**{"data.modalities": ("t1", "t2")}))
  with pytest.raises(ValueError, match="data.view must be 'slice'"):
    SimSiamMethod(_config(**{"data.view": "volume"}))
  with pytest.raises(ValueError, match="scale"):
    SimSiamMethod(_config(**{"pretext.scale": (0.0, 1.0)}))

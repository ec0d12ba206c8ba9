"""SwAV: multi-crop views, the queue, the prototypes (unit norm, frozen) through the trainer,
determinism, features, configs for every backbone, and the intensity augmentations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from helpers import config_for, eval_mode_variables

from jaxmed.config import load_config, set_model
from jaxmed.losses import sinkhorn_knopp, swav_loss
from jaxmed.methods import METHODS, SwAVMethod, get_method
from jaxmed.methods.swav import BACKBONES, push_queue
from jaxmed.models import VGG16, ResNet
from jaxmed.pretext.views import color_jitter, random_gaussian_blur
from jaxmed.train import trainer

# A ResNet-18 at 1/8 width on 32 x 32 phantom slices: 2 global crops of 16, 2 local of 8.
TINY = {
    "model.depth": 18, "model.widen_factor": 0.125,
    "pretext.global_size": 16, "pretext.local_size": 8, "pretext.num_local": 2,
    "head.hidden_dim": 16, "head.out_dim": 8, "head.num_prototypes": 6,
    "param_groups.prototypes.freeze_steps": 3,
    "swav.queue_length": 16, "swav.queue_start_step": 1,
    "pretext.blur_sigma": (0.1, 1.0), "optim.warmup_steps": 1,
    "data.num_subjects": 4, "data.shape": (16, 32, 32), "data.num_val": 0, "data.num_test": 0,
    "data.min_foreground": 0.1,
    "batch_size": 8, "total_steps": 6, "log_every": 1, "eval_every": 1,
    "checkpoint.every": 0, "tensorboard": False,
}
IMAGE = np.random.default_rng(0).normal(size=(4, 32, 32, 1)).astype(np.float32)


def _config(**overrides):
  return config_for("swav", {**TINY, **overrides})


@pytest.fixture(scope="module")
def method():
  return SwAVMethod(_config())


@pytest.fixture(scope="module")
def variables(method):
  return eval_mode_variables(method, IMAGE)


@pytest.fixture(scope="module")
def views_fn(method):
  return jax.jit(method.views)


def test_views_are_multi_crop_inputs_deterministic_per_key(method, views_fn):
  g, l = views_fn(jax.random.PRNGKey(0), IMAGE)
  assert g.shape == (2, 4, 16, 16, 3) and l.shape == (2, 4, 8, 8, 3)
  # Grey stacked to 3 channels, each normalised with SwAV's ImageNet mean / std.
  grey = g * np.asarray(method.config.pretext.std) + np.asarray(method.config.pretext.mean)
  np.testing.assert_allclose(grey[..., 1], grey[..., 0], atol=1e-5)
  np.testing.assert_allclose(grey[..., 2], grey[..., 0], atol=1e-5)
  assert grey.min() >= -1e-5 and grey.max() <= 1 + 1e-5
  g2, l2 = views_fn(jax.random.PRNGKey(0), IMAGE)
  np.testing.assert_array_equal(g, g2)
  np.testing.assert_array_equal(l, l2)
  g3, _ = views_fn(jax.random.PRNGKey(1), IMAGE)
  assert not np.allclose(g, g3)


def test_loss_is_swapped_prediction_of_sinkhorn_codes_with_the_queue(method, variables,
                                                                     views_fn):
  queue = {"queue": jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 8)),
                                jnp.float32), "count": jnp.asarray(16, jnp.int32)}

  @jax.jit
  def run(variables, views, queue):
    g, l = views
    z, scores = method.model.apply(variables, [g.reshape(8, 16, 16, 3), l.reshape(8, 8, 8, 3)])
    scores = scores.reshape(4, 4, 6)
    protos = variables["params"]["prototypes"]["kernel"]
    # Reference: the batch alone; the queue's scores in front once it is full.
    alone = jnp.stack([sinkhorn_knopp(scores[c]) for c in (0, 1)])
    queued = jnp.stack([sinkhorn_knopp(jnp.concatenate([queue["queue"][i] @ protos,
                                                        scores[c]]))[-4:]
                        for i, c in enumerate((0, 1))])
    return (method.swav_step(variables, views, train=False),
            method.swav_step(variables, views, train=False, queue=queue),
            method.swav_step(variables, views, train=False,
                             queue={**queue, "count": jnp.asarray(8, jnp.int32)}),
            z, swav_loss(scores, alone), swav_loss(scores, queued))

  views = views_fn(jax.random.PRNGKey(3), IMAGE)
  no_queue, full, partial, z, ref_alone, ref_queued = run(variables, views, queue)
  assert z.shape == (16, 8)
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(float(no_queue[0]), float(ref_alone), rtol=1e-5)
  assert set(no_queue[1]) == {"code_entropy"}
  assert float(full[1]["queue_in_use"]) == 1.0 and full[3].shape == (2, 4, 8)
  np.testing.assert_allclose(full[3], z.reshape(4, 4, 8)[:2], rtol=1e-6)  # for the queue
  np.testing.assert_allclose(float(full[0]), float(ref_queued), rtol=1e-5)
  assert abs(float(ref_queued) - float(ref_alone)) > 1e-4
  # Not yet full: the batch alone.
  assert float(partial[1]["queue_in_use"]) == 0.0
  np.testing.assert_allclose(float(partial[0]), float(ref_alone), rtol=1e-5)


def test_push_queue_newest_first_and_inactive_unchanged():
  state = {"queue": jnp.zeros((2, 5, 3)), "count": jnp.asarray(0, jnp.int32)}
  z1 = jnp.ones((2, 2, 3))
  state = push_queue(state, z1, active=True)
  assert int(state["count"]) == 2 and np.all(state["queue"][:, :2] == 1)
  assert np.all(state["queue"][:, 2:] == 0)
  state = push_queue(state, 2 * z1, active=True)
  state = push_queue(state, 3 * z1, active=True)
  assert int(state["count"]) == 5
  np.testing.assert_array_equal(state["queue"][0, :, 0], [3, 3, 2, 2, 1])
  same = push_queue(state, 9 * z1, active=False)
  np.testing.assert_array_equal(same["queue"], state["queue"])


def test_trainer_keeps_prototypes_unit_norm_and_frozen_then_fills_the_queue(tmp_path):
  # VGG16-BN at 1/16 width (the quickest to compile), crops of 32: one backbone pass for the
  # 2 global and the local crop (equal sizes).
  config = _config(**{"pretext.global_size": 32, "pretext.local_size": 32,
                      "pretext.num_local": 1})
  set_model(config, "vgg16", batch_norm=True, width=1 / 16)
  seen = []

  def hook(step, state):
    seen.append((step, np.asarray(state.params["prototypes"]["kernel"]),
                 np.asarray(state.params["backbone"]["conv1_1"]["kernel"]),
                 int(state.method_state["count"])))
    return {}

  result = trainer.train(config, str(tmp_path), hooks=[hook], progress=False)
  assert int(result.state.step) == 6 and np.isfinite(result.last_metrics["loss"])
  assert [s for s, *_ in seen] == list(range(1, 7))
  # Unit-norm prototypes after every step; unchanged during the first 3 (frozen) steps, while
  # the backbone moves; changed after.
  init_key = jax.random.split(jax.random.PRNGKey(config.seed))[0]
  init = trainer.jit_init(SwAVMethod(config).init)(
      init_key, {"image": np.zeros((8, 32, 32, 1), np.float32)})
  protos0 = np.asarray(init["params"]["prototypes"]["kernel"])
  for _, protos, _, _ in seen:
    np.testing.assert_allclose(np.linalg.norm(protos, axis=0), 1.0, rtol=1e-5)
  for step, protos, conv, _ in seen[:3]:
    np.testing.assert_allclose(protos, protos0, atol=1e-6, err_msg=f"step {step}")
  assert not np.allclose(seen[0][2], seen[1][2])
  # The group's schedule starts when it is unfrozen (`GroupedOptimizer` freezes its optax
  # state, step count included): with warm-up from 0 the first unfrozen step has lr 0.
  assert not np.allclose(seen[-1][1], protos0, atol=1e-4)
  # The queue is filled from step 1 (the second step), 8 embeddings per step, up to 16.
  assert [c for *_, c in seen] == [0, 8, 16, 16, 16, 16]
  from jaxmed.train.logging import read_metrics  # pylint: disable=g-import-not-at-top
  records = read_metrics(str(tmp_path))
  assert [r["queue_in_use"] for r in records] == [0, 0, 0, 1, 1, 1]
  assert all("lr/prototypes" in r for r in records)
  # Same seed, same run (1 or N devices: the trainer's sharded step; the codes' sums are
  # global, `tests/losses/test_contrastive.py`).
  again = trainer.train(config, str(tmp_path / "again"), progress=False)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.state.params),
               jax.device_get(result.state.params))


def test_features_are_pooled_backbone_features(method, variables):
  features = jax.jit(method.features)
  feats = features(variables, IMAGE)
  assert feats.shape == (4, 64)  # ResNet-18 at 1/8 width: 512 / 8 channels
  two = features(variables, np.concatenate([IMAGE, IMAGE[::-1]], axis=-1))
  assert two.shape == (4, 128)
  np.testing.assert_allclose(two[:, :64], feats, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_config_builds_every_backbone(backbone):
  config = load_config(f"swav:backbone={backbone},size=small")
  method = get_method(config)
  assert isinstance(method, METHODS["swav"]) and config.data.modalities == ("t2",)
  assert config.param_groups.prototypes.freeze_steps == 30
  net = method.model.backbone
  if backbone.startswith("vgg"):
    assert isinstance(net, VGG16) and net.width == 0.25 and not net.include_top
    assert net.batch_norm == (backbone == "vgg16_bn")
  else:
    assert isinstance(net, ResNet) and net.widen_factor == 0.25 and net.num_classes is None
    assert net.block == ("basic" if backbone == "resnet18" else "bottleneck")
  full = load_config(f"swav:backbone={backbone},width=0.5,modality=flair")
  assert full.head.num_prototypes == 3000 and full.pretext.global_size == 192
  assert full.optim.name == "lars" and full.batch_size == 96
  assert (full.total_steps, full.optim.warmup_steps) == (122100, 1526)
  assert full.data.modalities == ("flair",)
  assert full.model[("width" if backbone.startswith("vgg") else "widen_factor")] == 0.5


def test_config_and_method_errors():
  with pytest.raises(ValueError, match="backbone must be one of"):
    load_config("swav:backbone=alexnet")
  with pytest.raises(ValueError, match="width must be a number > 0"):
    load_config("swav:width=-1")
  with pytest.raises(ValueError, match="modality must be one of"):
    load_config("swav:modality=pd")
  with pytest.raises(ValueError, match="VGG-16 needs crops of at least 32"):
    get_method(load_config("swav:backbone=vgg16_bn,size=small",
                           {"pretext.local_size": 16}))
  with pytest.raises(ValueError, match="one modality"):
    SwAVMethod(_config(**{"data.modalities": ("t1", "t2")}))
  SwAVMethod(_config(**{"data.modalities": ("t1", "t2"), "data.per_modality": True}))
  with pytest.raises(ValueError, match="crops_for_assign"):
    SwAVMethod(_config(**{"swav.crops_for_assign": (0, 4)}))
  with pytest.raises(ValueError, match="model.name must be a backbone"):
    SwAVMethod(_config(**{"model.name": "unet"}))
  with pytest.raises(ValueError, match="global_scale"):
    SwAVMethod(_config(**{"pretext.global_scale": (0.5, 2.0)}))
  with pytest.raises(ValueError, match=r"one-modality slices \(N, H, W, 1\)"):
    SwAVMethod(_config()).grey(np.zeros((2, 8, 8, 2), np.float32))


# --- The intensity augmentations (jaxmed.pretext.views) -----------------------------------


def test_gaussian_blur_matches_scipy_and_its_gate():
  x = np.random.default_rng(0).uniform(size=(3, 12, 10, 2)).astype(np.float32)
  out = np.asarray(random_gaussian_blur(jax.random.PRNGKey(0), x, sigma=(1.3, 1.3), p=1.0))
  for i in range(3):
    ref = scipy.ndimage.gaussian_filter(x[i], (1.3, 1.3, 0), mode="reflect", truncate=4.0)
    np.testing.assert_allclose(out[i], ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(random_gaussian_blur(jax.random.PRNGKey(0), x, p=0.0), x)
  with pytest.raises(ValueError, match="sigma must satisfy"):
    random_gaussian_blur(jax.random.PRNGKey(0), x, sigma=(0.0, 1.0))


def test_color_jitter_brightness_contrast_and_gate():
  x = np.random.default_rng(0).uniform(0.4, 0.6, size=(64, 6, 6, 1)).astype(np.float32)
  key = jax.random.PRNGKey(1)
  np.testing.assert_array_equal(color_jitter(key, x, p=0.0), x)
  np.testing.assert_array_equal(color_jitter(key, x, brightness=0.0, contrast=0.0, p=1.0), x)
  # Brightness: one factor in [0.5, 1.5] per image (no clipping in this range).
  b = np.asarray(color_jitter(key, x, brightness=0.5, contrast=0.0, p=1.0))
  ratio = (b / x).reshape(64, -1)
  np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1], ratio.shape), rtol=1e-5)
  assert 0.5 <= ratio.min() and ratio.max() <= 1.5 and ratio.std() > 0.1
  # Contrast: a blend with the image's mean, which it keeps.
  c = np.asarray(color_jitter(key, x, brightness=0.0, contrast=0.5, p=1.0))
  np.testing.assert_allclose(c.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3)), rtol=1e-5)
  assert not np.allclose(c, x)
  # p = 0.8: about 80% of the images change; clipping to [0, 1].
  j = np.asarray(color_jitter(key, x, p=0.8))
  changed = np.any(j != x, axis=(1, 2, 3)).mean()
  assert 0.6 < changed < 0.95 and j.min() >= 0 and j.max() <= 1
  with pytest.raises(ValueError, match="p must be a probability"):
    color_jitter(key, x, p=1.5)

"""DAE (disruptive_autoencoders Eqs. 1-5): the disruptions and the L1 + alpha CMCL loss on a
stand-in network (known values), modality-tagged batches with repeats, a trainer run (twice:
deterministic), the hooks, the transfer into a 4-modality segmentation Swin-UNETR, and the
config file."""

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import config_for
from swin_pretraining import SWIN_TINY, SwinStandIn, segmentation_from, train_twice

from jaxmed.config import load_config
from jaxmed.configs.dae import get_sweep
from jaxmed.data import datasets, pipeline, views
from jaxmed.losses import cmcl_loss, global_average_pool
from jaxmed.methods import METHODS, DAEMethod, get_method
from jaxmed.pretext.disruptions import downsample_upsample
from jaxmed.train import init as init_lib
from jaxmed.train.logging import read_metrics

RNG = np.random.default_rng(0)
IMAGE = jnp.asarray(RNG.uniform(size=(4, 32, 32, 32, 1)), jnp.float32)
MODALITY = jnp.asarray([0, 1, 0, 2], jnp.int32)
KEY = jax.random.PRNGKey(3)
FLAT = lambda tree: flax.traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def _config(**overrides):
  return config_for("dae", {**SWIN_TINY, **overrides})


def _stand_in(mode="identity", **overrides):
  """The method with `SwinStandIn` as its network, and its variables."""
  method = get_method(_config(**overrides))
  method.model = SwinStandIn(mode=mode, feature_size=12)
  return method, method.model.init(KEY, IMAGE)


def _loss(method, variables, key=KEY):
  loss, metrics, _ = jax.jit(lambda v, k: method.loss(
      v, {"image": IMAGE, "modality": MODALITY}, k, train=True))(variables, key)
  return float(loss), {k: float(v) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Two trainer runs of 2 steps from the same seed (`train_twice`)."""
  return train_twice(_config(), tmp_path_factory, "dae")


def test_identity_network_gives_known_l1_and_cmcl_adds_alpha_times_its_term():
  # Local masking alone feeds the clean image (the masking is inside the network): an identity
  # network reconstructs it exactly.
  method, variables = _stand_in(**{"pretext.disruption": "mask", "loss.cmcl": False})
  loss, metrics = _loss(method, variables)
  assert loss == 0.0 and metrics == {"l1": 0.0}
  # Noise of variance 0.1: E|x + n - x| = sqrt(0.1) sqrt(2 / pi).
  method, variables = _stand_in(**{"pretext.disruption": "noise", "loss.cmcl": False})
  loss, metrics = _loss(method, variables)
  np.testing.assert_allclose(loss, np.sqrt(0.1) * np.sqrt(2 / np.pi), rtol=0.01)
  assert metrics == {"l1": loss}
  # Down- and up-sampling by 4 (linear): the L1 of the identity is that of the resampling.
  method, variables = _stand_in(**{"pretext.disruption": "downsample", "loss.cmcl": False})
  loss, _ = _loss(method, variables)
  np.testing.assert_allclose(
      loss, float(jnp.mean(jnp.abs(downsample_upsample(IMAGE, factor=4) - IMAGE))), rtol=1e-5)
  # CMCL on: loss = L1 + 0.05 CMCL of the pooled hidden_states_4, in the normalized form;
  # cmcl_paired: 2 of the 4 samples (modality 0) have a partner.
  method, variables = _stand_in(**{"pretext.disruption": "mask"})
  loss, metrics = _loss(method, variables)
  _, feats = method.model.apply(variables, IMAGE, return_features=True)
  expected = float(cmcl_loss(global_average_pool(feats["hidden_states_4"]), MODALITY))
  np.testing.assert_allclose(metrics["cmcl"], expected, rtol=1e-5)
  assert metrics["l1"] == 0.0 and metrics["cmcl_paired"] == 0.5
  np.testing.assert_allclose(loss, 0.05 * metrics["cmcl"], rtol=1e-5)
  # The reference form contrasts the flattened bottleneck with exp(t) logits.
  method, variables = _stand_in(**{"pretext.disruption": "mask", "loss.cmcl_form": "reference"})
  _, metrics = _loss(method, variables)
  flat = feats["hidden_states_4"].reshape(4, -1)
  np.testing.assert_allclose(metrics["cmcl"], float(cmcl_loss(flat, MODALITY, form="reference")),
                             rtol=1e-5)
  with pytest.raises(ValueError, match=r"needs batch\['modality'\]"):
    method.loss(variables, {"image": IMAGE}, KEY, train=True)


def test_disruptions_in_the_reference_order_and_local_masking_per_sample_or_shared():
  method = get_method(_config())
  x, channel_mask = method.disrupt(KEY, IMAGE)
  noise_key, _ = jax.random.split(KEY)
  # "all": noise (fresh per voxel), then down- and up-sampling; the target stays clean.
  noisy = IMAGE + np.sqrt(0.1) * jax.random.normal(noise_key, IMAGE.shape)
  np.testing.assert_allclose(x, downsample_upsample(noisy, factor=4), atol=1e-5)
  # int(0.6 x 12) = 7 of the 12 embedding channels per sample, a different subset each.
  assert channel_mask.shape == (4, 12) and set(np.sum(channel_mask, axis=1).tolist()) == {7}
  assert len({tuple(row) for row in np.asarray(channel_mask)}) > 1
  shared = get_method(_config(**{"pretext.mask_shared": True})).disrupt(KEY, IMAGE)[1]
  assert len({tuple(row) for row in np.asarray(shared)}) == 1 and shared.sum() == 4 * 7
  for disruption, masked in (("noise", False), ("downsample", False), ("mask", True)):
    m = get_method(_config(**{"pretext.disruption": disruption}))
    assert (m.disrupt(KEY, IMAGE)[1] is not None) == masked, disruption
  nearest = get_method(_config(**{"pretext.disruption": "downsample",
                                  "pretext.resample": "nearest"})).disrupt(KEY, IMAGE)[0]
  np.testing.assert_array_equal(  # torch's legacy nearest: each 4^3 cell's first voxel
      nearest, np.repeat(np.repeat(np.repeat(IMAGE[:, ::4, ::4, ::4], 4, 1), 4, 2), 4, 3))


def test_batches_hold_tagged_single_modalities_that_repeat():
  """Every (subject, modality) pair is a shuffled 1-channel row tagged with its channel; with
  4 modalities a batch of 8 always repeats one (pigeonhole) and most samples have a partner."""
  config = _config(**{"data.num_subjects": 10, "data.num_val": 1, "data.num_test": 1})
  subjects = datasets.load_splits(config.data)["train"]
  source, transform = views.make_view(config.data, subjects)
  assert len(source) == 8 * 4
  batches = pipeline.train_iterator(source, global_batch_size=8, seed=0, transform=transform,
                                    process_index=0, process_count=1, read_threads=1)
  paired = []
  for _ in range(16):
    batch = next(batches)
    assert batch["image"].shape == (8, 32, 32, 32, 1)
    for image, subject, modality in zip(batch["image"], batch["subject_index"],
                                        batch["modality"]):
      np.testing.assert_array_equal(image[..., 0],
                                    subjects[subject].image[..., modality])
    counts = np.bincount(batch["modality"], minlength=4)
    assert counts.max() >= 2
    paired.append(np.mean(counts[batch["modality"]] > 1))
  # Drawn without replacement from 8 rows per modality: 1 - C(24, 7) / C(31, 7) ~ 0.87.
  assert 0.75 < np.mean(paired) <= 1.0


def test_trainer_runs_are_deterministic_and_train_the_whole_network(trained):
  (initial, first, workdir), (_, second, _) = trained
  assert int(first.state.step) == 2
  records = read_metrics(workdir)
  assert [r["step"] for r in records] == [1, 2]
  for r in records:
    assert np.isfinite(r["loss"]) and r["l1"] > 0 and np.isfinite(r["cmcl"])
    assert 0 <= r["cmcl_paired"] <= 1 and r["grad_norm"] > 0
    np.testing.assert_allclose(r["loss"], r["l1"] + 0.05 * r["cmcl"], rtol=1e-5)
  before, after = FLAT(initial["params"]), FLAT(first.state.params)
  assert "swinViT/mask_token" not in after  # DAE has no mask token
  for module in ("swinViT", "encoder1", "decoder1", "out"):
    assert any(not np.array_equal(before[k], after[k]) for k in before
               if k.startswith(module + "/")), module
  again = FLAT(second.state.params)
  for k in after:
    np.testing.assert_array_equal(after[k], again[k], err_msg=k)
  assert read_metrics(workdir)[-1]["loss"] == second.last_metrics["loss"]


def test_hooks_give_the_disrupted_input_reconstruction_and_stage_features(trained):
  method, variables = trained[0][1].method, trained[0][1].state.variables
  batch = {"image": IMAGE}
  x, target = method.pretext_example(KEY, batch)
  np.testing.assert_array_equal(target, IMAGE)
  shapes = jax.eval_shape(method.reconstruct, variables, batch, KEY)
  assert [s.shape for s in shapes] == [IMAGE.shape, IMAGE.shape]
  # The loss's disruption for the same key: its first split goes to `disrupt`.
  np.testing.assert_array_equal(x, method.disrupt(jax.random.split(KEY)[0], IMAGE)[0])
  feats = jax.eval_shape(method.stage_features, variables, IMAGE)
  assert {k: v.shape for k, v in feats.items()} == {
      f"hidden_states_{i}": (4, *(32 // 2**(i + 1),) * 3, 12 * 2**i) for i in range(5)}


@pytest.mark.parametrize("part, pretrained_modules", [
    ("both", {"swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10",
              "decoder1", "decoder2", "decoder3", "decoder4", "decoder5"}),
    ("encoder", {"swinViT"}),
    ("decoder", {"encoder1", "encoder2", "encoder3", "encoder4", "encoder10", "decoder1",
                 "decoder2", "decoder3", "decoder4", "decoder5"}),
])
def test_pretrained_network_transfers_into_a_4_modality_segmentation_swin_unetr(
    trained, part, pretrained_modules):
  """``part`` picks the transferred modules (the rest and the output layer stay fresh); the
  1-channel input kernels of the transferred part are tiled over the 4 modalities x 1/4."""
  result = trained[0][1]
  pretrained = result.method.swin_unetr_variables(result.state.variables)
  config, fresh = segmentation_from(result, part)
  variables = init_lib.initializer(config.init, pretrained=pretrained)(fresh)
  got, pre, new = FLAT(variables["params"]), FLAT(pretrained["params"]), FLAT(fresh["params"])
  tiled = {"swinViT/patch_embed/proj/kernel", "encoder1/layer/conv1/kernel",
           "encoder1/layer/conv3/kernel"}
  for path, value in got.items():
    module = path.split("/")[0]
    if module not in pretrained_modules:
      np.testing.assert_array_equal(value, new[path], err_msg=path)
    elif path in tiled:
      np.testing.assert_allclose(value, np.repeat(pre[path], 4, axis=-2) / 4, rtol=1e-6,
                                 err_msg=path)
    else:
      np.testing.assert_array_equal(value, pre[path], err_msg=path)
  assert got["out/kernel"].shape[-1] == 3  # the 3 tumour regions: a new output layer


def test_config_file_rows_sizes_and_sweeps():
  full = load_config("dae")
  assert full.method == "dae" and isinstance(get_method(full), DAEMethod)
  assert METHODS["dae"] is DAEMethod
  assert (full.model.feature_size, full.model.window_size, full.model.depths,
          full.model.num_heads) == (48, 7, (2, 2, 2, 2), (3, 6, 12, 24))
  assert (full.data.crop_size, full.data.per_modality, full.data.view) == (
      (96, 96, 96), True, "crop")
  assert (full.pretext.disruption, full.pretext.noise_variance, full.pretext.factor,
          full.pretext.resample, full.pretext.mask_ratio) == ("all", 0.1, 4, "linear", 0.6)
  assert (full.loss.cmcl, full.loss.alpha, full.loss.temperature, full.loss.cmcl_form) == (
      True, 0.05, 0.07, "normalized")
  assert (full.optim.name, full.optim.lr, full.optim.weight_decay, full.optim.warmup_steps,
          full.optim.grad_clip, full.total_steps, full.batch_size) == (
              "adamw", 4e-4, 1e-5, 500, 1.0, 20_000, 16)
  small = load_config("dae:size=small,disruption=mask,cmcl=off")
  assert (small.model.feature_size, small.model.window_size, small.data.crop_size,
          small.batch_size, small.total_steps, small.optim.warmup_steps) == (
              12, 4, (32, 32, 32), 8, 200, 10)
  assert (small.pretext.disruption, small.loss.cmcl) == ("mask", False)
  assert get_sweep("disruption=noise") == [
      {"pretext.disruption": "noise", "pretext.noise_variance": s} for s in (0.05, 0.1, 0.2)]
  assert [r["pretext.factor"] for r in get_sweep("disruption=downsample")] == [2, 4, 8]
  assert len(get_sweep("")) == 3 + 3 + 4
  for row in get_sweep(""):  # every row builds
    get_method(load_config("dae:size=small", row))


@pytest.mark.parametrize("arg, match", [
    ("disruption=blur", "disruption must be one of"), ("cmcl=yes", "cmcl must be"),
    ("size=big", "size must be"), ("alpha=1", "key=value with key in"),
])
def test_bad_config_args(arg, match):
  with pytest.raises(ValueError, match=match):
    load_config(f"dae:{arg}")


@pytest.mark.parametrize("overrides, match", [
    ({"pretext.disruption": "blur"}, "pretext.disruption must be one of"),
    ({"pretext.noise_variance": -0.1}, "noise_variance"),
    ({"pretext.factor": 3}, "divisible by pretext.factor=3"),
    ({"pretext.factor": 0}, "pretext.factor"),
    ({"pretext.resample": "cubic"}, "pretext.resample"),
    ({"pretext.mask_ratio": 1.5}, "mask_ratio"),
    ({"loss.alpha": -1.0}, "loss.alpha"),
    ({"loss.cmcl_form": "clip"}, "cmcl_form"),
    ({"loss.temperature": 0.0}, "temperature"),
    ({"model.name": "unet"}, "model.name must be 'swin_unetr'"),
    ({"data.per_modality": False}, "per_modality"),
    ({"data.per_modality": False, "data.modalities": ("t1",)}, "loss.cmcl=True contrasts"),
    ({"data.view": "slice"}, "data.view"),
    ({"data.crop_size": (48, 48, 48)}, "divisible by 32"),
])
def test_bad_method_config(overrides, match):
  with pytest.raises(ValueError, match=match):
    get_method(_config(**overrides))


def test_images_must_be_single_modality_volumes():
  method = get_method(_config())
  with pytest.raises(ValueError, match=r"1-channel volume batch \(N, D, H, W, 1\)"):
    method.loss({}, {"image": jnp.zeros((1, 32, 32, 32, 2))}, KEY, train=True)
  with pytest.raises(ValueError, match="divisible by 32"):
    method.reconstruct({}, {"image": jnp.zeros((1, 32, 32, 48, 1))}, KEY)

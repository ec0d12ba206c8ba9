"""Swin-UNETR self-supervised pre-training (Tang et al. 2022; research-contributions
``SwinUNETR/Pretrain``): the heads and the reference's in-painting decoder against a PyTorch
build, the two views, every task switch, determinism, a trainer run and the encoder's transfer
into a Swin-UNETR, and the config file."""

import functools
import os
import re

import flax.traverse_util
import jax
import numpy as np
import pytest
import torch

from helpers import numpy_filled

from jaxmed.config import load_config, set_model
from jaxmed.methods import METHODS, SwinSSLMethod, get_method
from jaxmed.methods.swin_ssl import InpaintDecoder, head_inputs, swin_unetr_fields
from jaxmed.train import init as init_lib
from jaxmed.train import trainer
from jaxmed.train.logging import read_metrics

# Feature 12 (the smallest Swin-UNETR), one block and head per stage, window 4, on 32^3 crops of
# 32^3 phantoms: 1 training subject x 4 modalities = 4 one-channel rows.
TINY = {
    "model.depths": (1, 1, 1, 1), "model.num_heads": (1, 1, 1, 1), "heads.contrastive_dim": 16,
    "data.shape": (32, 32, 32), "data.num_subjects": 3, "data.num_val": 1, "data.num_test": 1,
    "batch_size": 4, "total_steps": 2, "log_every": 1, "checkpoint.every": 0,
    "checkpoint.async_save": False, "optim.warmup_steps": 0, "tensorboard": False,
}
IMAGE = np.random.default_rng(0).uniform(size=(2, 32, 32, 32, 1)).astype(np.float32)
KEY = jax.random.PRNGKey(1)
FLAT = lambda tree: flax.traverse_util.flatten_dict(jax.device_get(tree), sep="/")
JIT = functools.partial(jax.jit, compiler_options=trainer.init_compiler_options())


def _config(arg: str = "", **overrides):
  return load_config(f"swin_ssl:size=small{',' + arg if arg else ''}", {**TINY, **overrides})


def _variables(method):
  """Seeded stand-in variables (shapes only, nothing compiled)."""
  return numpy_filled(jax.eval_shape(method.init, KEY, {"image": IMAGE}), seed=1, scale=0.3)


def _loss_fn(method):
  return JIT(lambda v, key: method.loss(v, {"image": IMAGE}, key, train=True)[:2])


@pytest.fixture(scope="module")
def method():
  # No block drops in the unit tests (compile time; the trainer run and test_views have them).
  return get_method(_config(**{"pretext.drop": False}))


@pytest.fixture(scope="module")
def variables(method):
  return _variables(method)


@pytest.fixture(scope="module")
def all_tasks(method, variables):
  fn = _loss_fn(method)
  return fn, fn(variables, KEY)


def test_variables_are_the_encoder_and_the_three_heads(method, variables):
  assert METHODS["swin_ssl"] is SwinSSLMethod and isinstance(method, SwinSSLMethod)
  params = variables["params"]
  assert set(variables) == {"params"}
  assert set(params) == {"swinViT", "rotation_head", "contrastive_head", "decoder"}
  dim = 16 * 12  # hidden_states_4 of feature 12
  assert params["rotation_head"]["kernel"].shape == (dim, 4)
  assert params["contrastive_head"]["kernel"].shape == (dim, 16)
  decoder = {k: v.shape for k, v in FLAT(params["decoder"]).items()}
  widths = (dim // 2, dim // 4, dim // 8, dim // 16, dim // 16)
  assert decoder == {**{f"conv{i}/kernel": (3, 3, 3, c_in, c)
                        for i, (c_in, c) in enumerate(zip((dim,) + widths[:-1], widths))},
                     **{f"conv{i}/bias": (c,) for i, c in enumerate(widths)},
                     "out/kernel": (1, 1, 1, 12, 1), "out/bias": (1,)}


def test_decoder_equals_the_references_vae_head():
  """``SSLHead(upsample="vae")``'s ``conv``, built in PyTorch from the reference's layer list,
  with the same weights."""
  dim, n = 32, 2
  x = np.random.default_rng(1).normal(size=(n, 2, 3, 2, dim)).astype(np.float32)
  decoder = InpaintDecoder(out_channels=1)
  variables = numpy_filled(jax.eval_shape(decoder.init, KEY, x), seed=2, scale=0.2)
  out = jax.jit(decoder.apply)(variables, x)
  assert out.shape == (n, 64, 96, 64, 1)
  widths = (dim // 2, dim // 4, dim // 8, dim // 16, dim // 16)
  layers, c_in = [], dim
  for width in widths:
    layers += [torch.nn.Conv3d(c_in, width, 3, padding=1), torch.nn.InstanceNorm3d(width),
               torch.nn.LeakyReLU(),
               torch.nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)]
    c_in = width
  layers.append(torch.nn.Conv3d(c_in, 1, 1))
  ref = torch.nn.Sequential(*layers)
  convs = [m for m in ref if isinstance(m, torch.nn.Conv3d)]
  params = variables["params"]
  with torch.no_grad():
    for conv, name in zip(convs, [f"conv{i}" for i in range(5)] + ["out"]):
      conv.weight.copy_(torch.tensor(np.transpose(params[name]["kernel"], (4, 3, 0, 1, 2))))
      conv.bias.copy_(torch.tensor(params[name]["bias"]))
    expected = ref(torch.tensor(np.transpose(x, (0, 4, 1, 2, 3)))).numpy()
  np.testing.assert_allclose(out, np.transpose(expected, (0, 2, 3, 4, 1)), rtol=1e-4, atol=1e-5)


def test_head_tokens_are_monai_flat_tokens_0_and_1_or_the_mean():
  """SSLHead: ``x_out.flatten(2).transpose(1, 2)[:, 0]`` (rotation) and ``[:, 1]`` (contrastive)
  of the ``(B, C, x, y, z)`` bottleneck; jaxmed's bottleneck is ``(B, z, y, x, C)``."""
  x_out = torch.tensor(np.random.default_rng(2).normal(size=(2, 5, 3, 3, 3)).astype(np.float32))
  tokens = x_out.flatten(start_dim=2, end_dim=4).transpose(1, 2).numpy()
  bottleneck = np.transpose(x_out.numpy(), (0, 4, 3, 2, 1))
  rot, con = head_inputs(bottleneck, "reference")
  np.testing.assert_array_equal(rot, tokens[:, 0])
  np.testing.assert_array_equal(con, tokens[:, 1])
  rot, con = head_inputs(bottleneck, "mean")
  np.testing.assert_allclose(rot, tokens.mean(axis=1), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(rot, con)
  with pytest.raises(ValueError, match="d >= 2"):
    head_inputs(bottleneck[:, :1], "reference")
  with pytest.raises(ValueError, match="token must be one of"):
    head_inputs(bottleneck, "cls")


def test_views_are_rotated_copies_corrupted_by_block_drops():
  method = get_method(_config())
  views = JIT(method.views)(KEY, IMAGE)
  k = np.asarray(views["rotation"])
  assert views["input"].shape == (4, 32, 32, 32, 1) and k.shape == (4,)
  for i in range(4):  # rows 0-1: view 1, rows 2-3: view 2 of the same two samples
    expected = np.rot90(IMAGE[i % 2], k[i], axes=(1, 0))
    np.testing.assert_array_equal(views["target"][i], expected)
  dropped = np.asarray(views["dropped"])
  assert dropped.any()
  inputs, target = np.asarray(views["input"]), np.asarray(views["target"])
  np.testing.assert_array_equal(inputs[~dropped], target[~dropped])
  pre_input, pre_target = method.pretext_example(KEY, {"image": IMAGE})
  np.testing.assert_allclose(pre_input, inputs[:2], atol=1e-6)  # eager vs jitted rounding
  np.testing.assert_array_equal(pre_target, target[:2])


def test_loss_is_the_sum_of_the_three_tasks(all_tasks):
  _, (loss, metrics) = all_tasks
  m = {k: float(v) for k, v in metrics.items()}
  assert set(m) == {"rotation", "rotation_accuracy", "contrastive", "inpaint"}
  assert m["rotation"] > 0 and m["contrastive"] > 0 and m["inpaint"] > 0
  assert m["rotation_accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)
  np.testing.assert_allclose(float(loss), m["rotation"] + m["contrastive"] + m["inpaint"],
                             rtol=1e-6)


def test_each_task_switch_removes_its_head_and_term(variables, all_tasks):
  _, (_, metrics) = all_tasks
  # Inpainting off (numerically): no decoder, the other two terms unchanged.
  other = get_method(_config("tasks=rotation+contrastive", **{"pretext.drop": False}))
  loss, got = _loss_fn(other)(variables, KEY)
  assert set(got) == {"rotation", "rotation_accuracy", "contrastive"}
  for k in got:
    np.testing.assert_allclose(float(got[k]), float(metrics[k]), rtol=1e-5, err_msg=k)
  np.testing.assert_allclose(float(loss), float(metrics["rotation"] + metrics["contrastive"]),
                             rtol=1e-5)
  # Every single task (shapes only): its head alone and its metric alone.
  heads = {"rotation": "rotation_head", "contrastive": "contrastive_head", "inpaint": "decoder"}
  for task, head in heads.items():
    single = get_method(_config(f"tasks={task}", **{"pretext.drop": False}))
    assert set(_variables(single)["params"]) == {"swinViT", head}
    _, shapes = jax.eval_shape(
        lambda v, s=single: s.loss(v, {"image": IMAGE}, KEY, train=True)[:2], variables)
    assert set(shapes) == {task} | ({"rotation_accuracy"} if task == "rotation" else set())


def test_loss_is_deterministic_per_key(variables, all_tasks):
  fn, (loss, metrics) = all_tasks
  again, metrics_again = fn(variables, KEY)
  assert float(again) == float(loss)
  for k in metrics:
    assert float(metrics_again[k]) == float(metrics[k])
  other, _ = fn(variables, jax.random.PRNGKey(2))
  assert float(other) != float(loss)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Two steps of the whole recipe (block drops on) through the trainer, on one device (the
  step's compile time on 4 simulated devices is a third longer)."""
  config = _config(**{"mesh.num_devices": 1})
  workdir = str(tmp_path_factory.mktemp("swin_ssl") / "run")
  initial = {}
  result = trainer.train(config, workdir, progress=False,
                         init_variables=lambda v: initial.update(v) or v)
  return config, workdir, initial, result


def test_trainer_run_updates_the_encoder_and_every_head(trained):
  _, workdir, initial, result = trained
  assert int(result.state.step) == 2
  records = read_metrics(workdir)
  assert [r["step"] for r in records] == [1, 2]
  for r in records:
    assert all(np.isfinite(r[k]) for k in ("loss", "rotation", "contrastive", "inpaint"))
    assert r["grad_norm"] > 0
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  final = jax.device_get(result.state.params)
  for net in ("swinViT", "rotation_head", "contrastive_head", "decoder"):
    before, after = FLAT(initial["params"][net]), FLAT(final[net])
    assert any(not np.array_equal(before[k], after[k]) for k in before), net


def test_the_encoder_of_a_run_initialises_a_swin_unetr(trained):
  """seg3d with ``part=encoder`` from the run's workdir: every ``swinViT`` leaf is the trained
  one (the 1-channel patch embedding copied, ``input=tile`` with equal channels), every other
  leaf fresh; the heads and the in-painting decoder are dropped."""
  config, workdir, _, result = trained
  ft = load_config("seg3d:model=swin_unetr,target=tissues,input=tile,part=encoder,size=small")
  set_model(ft, "swin_unetr", **swin_unetr_fields(config.model))
  ft.init.path = workdir
  finetune = get_method(ft)
  assert finetune.model.feature_size == 12 and finetune.model.window_size == 4
  fresh = numpy_filled(jax.eval_shape(finetune.init, KEY, {"image": IMAGE}), seed=3)
  variables = init_lib.initializer(ft.init)(fresh)
  trained_enc = FLAT(jax.device_get(result.state.params)["swinViT"])
  got, fresh_flat = FLAT(variables["params"]), FLAT(fresh["params"])
  assert {k[len("swinViT/"):] for k in got if k.startswith("swinViT/")} == set(trained_enc)
  for k, v in got.items():
    if k.startswith("swinViT/"):
      np.testing.assert_array_equal(v, trained_enc[k[len("swinViT/"):]], err_msg=k)
    else:
      np.testing.assert_array_equal(v, fresh_flat[k], err_msg=k)
  # input=new: the patch embedding starts fresh too; the UNet has no encoder part.
  new = load_config("seg3d:model=swin_unetr,part=encoder")
  fresh_paths = [p for p in (f"params/{k}" for k in got)
                 if any(re.fullmatch(r, p) for r in new.init.replace)]
  assert "params/swinViT/patch_embed/proj/kernel" in fresh_paths
  assert not any(p.startswith("params/swinViT/layers") for p in fresh_paths)
  with pytest.raises(ValueError, match="part"):
    load_config("seg3d:part=encoder")


@pytest.mark.parametrize("part", ["encoder", "decoder", "both"])
def test_transfer_parts_split_a_swin_unetr(part):
  """What seg3d's ``part`` keeps fresh (``replace``) and tiles, over a Swin-UNETR's leaves."""
  config = load_config(f"seg3d:model=swin_unetr,input=tile,part={part},size=small")
  shapes = jax.eval_shape(get_method(config).init, KEY, {"image": IMAGE})
  paths = ["params/" + k for k in FLAT(shapes["params"])]
  fresh = {p for p in paths if any(re.fullmatch(r, p) for r in config.init.replace)}
  tiled = {p for p in paths if any(re.fullmatch(r, p) for r in config.init.tile)}
  encoder = {p for p in paths if p.startswith("params/swinViT/")}
  out = {"params/out/kernel", "params/out/bias"}
  expected_fresh = {"encoder": set(paths) - encoder, "decoder": encoder | out, "both": out}
  assert fresh == expected_fresh[part]
  expected_tiled = {"encoder": {"params/swinViT/patch_embed/proj/kernel"},
                    "decoder": {"params/encoder1/layer/conv1/kernel",
                                "params/encoder1/layer/conv3/kernel"}}
  expected_tiled["both"] = expected_tiled["encoder"] | expected_tiled["decoder"]
  assert tiled == expected_tiled[part] and not tiled & fresh


def test_config_file_tasks_tokens_and_sizes():
  full = load_config("swin_ssl")
  assert (full.loss.rotation, full.loss.contrastive, full.loss.inpaint) == (True, True, True)
  assert full.loss.temperature == 0.5 and full.heads.token == "reference"
  assert full.model.embed_dim == 48 and full.data.crop_size == (96, 96, 96)
  assert full.data.per_modality and full.total_steps == 100_000 and full.batch_size == 4
  assert (full.optim.lr, full.optim.weight_decay, full.optim.warmup_steps) == (4e-4, 0.1, 500)
  get_method(full)  # 96^3: two bottleneck tokens along D
  small = load_config("swin_ssl:size=small")
  assert small.heads.token == "mean" and small.model.embed_dim == 12
  assert small.data.crop_size == (32, 32, 32) and small.model.window_size == 4
  rot = load_config("swin_ssl:tasks=rotation")
  assert (rot.loss.rotation, rot.loss.contrastive, rot.loss.inpaint) == (True, False, False)
  both = load_config("swin_ssl:tasks=inpaint+rotation")
  assert (both.loss.rotation, both.loss.contrastive, both.loss.inpaint) == (True, False, True)


@pytest.mark.parametrize("arg, match", [
    ("tasks=jigsaw", "tasks"), ("tasks=rotation+rotation", "tasks"), ("tasks=", "tasks"),
    ("token=cls", "token"), ("size=large", "size"), ("epochs=3", "key=value"),
])
def test_bad_config_args(arg, match):
  with pytest.raises(ValueError, match=match):
    load_config(f"swin_ssl:{arg}")


@pytest.mark.parametrize("arg, overrides, match", [
    ("token=reference", {}, r"heads.token='reference' .* D >= 64"),
    ("", {"model.embed_dim": 16}, "embed_dim a positive multiple of 12"),
    ("", {"model.patch_size": 4}, "patch_size=2"),
    ("", {"model.name": "swin_unetr"}, "model.name must be 'swin_transformer'"),
    ("", {"loss.rotation": False, "loss.contrastive": False, "loss.inpaint": False},
     "every task is off"),
    ("", {"loss.temperature": 0.0}, "loss.temperature"),
    ("", {"loss.inpaint_weight": -1.0}, "loss.inpaint_weight"),
    ("", {"pretext.rotation_axes": (0, 0)}, "rotation_axes"),
    ("", {"data.crop_size": (32, 32, 48)}, "divisible by 32"),
    ("", {"data.crop_size": (64, 32, 32)}, "square in the rotation plane"),
    ("", {"pretext.max_block": 0.01}, "max_block"),
    ("", {"heads.contrastive_dim": 0}, "contrastive_dim"),
])
def test_bad_method_config(arg, overrides, match):
  with pytest.raises(ValueError, match=match):
    get_method(_config(arg, **overrides))


def test_image_and_hooks_are_checked(method, variables):
  with pytest.raises(ValueError, match=r"\(N, D, H, W, C\) with C=1"):
    method.loss(variables, {"image": np.zeros((2, 32, 32, 32, 4), np.float32)}, KEY, train=True)
  with pytest.raises(ValueError, match="divisible by 32"):
    method.views(KEY, np.zeros((2, 16, 16, 16, 1), np.float32))
  rotation_only = get_method(_config("tasks=rotation"))
  with pytest.raises(TypeError, match="loss.inpaint"):
    rotation_only.reconstruct(variables, {"image": IMAGE}, KEY)

"""Tests for jaxmed.models.pix2pix against a PyTorch rebuild of pytorch-CycleGAN-and-pix2pix.

The reference networks below follow ``models/networks.py`` of junyanz/pytorch-CycleGAN-and-pix2pix
layer for layer (``UnetSkipConnectionBlock`` with its in-place LeakyReLU, ``UnetGenerator``,
``NLayerDiscriminator``, ``get_norm_layer``); the package itself is not installable here.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxmed.interop.pix2pix import patchgan_from_torch, unet_generator_from_torch
from jaxmed.models import pix2pix
from jaxmed.models.pix2pix import PatchGANDiscriminator, UNetGenerator

TOL = 1e-4


# --------------------------------------------------------------------------------------------
# The PyTorch reference.


def _norm_layer(norm):
  if norm == "batch":
    return functools.partial(torch.nn.BatchNorm2d, affine=True, track_running_stats=True)
  if norm == "instance":
    return functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
  return lambda channels: torch.nn.Identity()


class _TorchUnetBlock(torch.nn.Module):
  """UnetSkipConnectionBlock: X -> [X, up(submodule(down(X)))], in-place activations kept."""

  def __init__(self, outer_nc, inner_nc, input_nc=None, submodule=None, outermost=False,
               innermost=False, norm="batch", use_dropout=False):
    super().__init__()
    self.outermost = outermost
    norm_layer = _norm_layer(norm)
    use_bias = norm == "instance"
    input_nc = outer_nc if input_nc is None else input_nc
    downconv = torch.nn.Conv2d(input_nc, inner_nc, 4, stride=2, padding=1, bias=use_bias)
    downrelu = torch.nn.LeakyReLU(0.2, True)
    downnorm = norm_layer(inner_nc)
    uprelu = torch.nn.ReLU(True)
    upnorm = norm_layer(outer_nc)
    if outermost:
      upconv = torch.nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1)
      model = [downconv, submodule, uprelu, upconv, torch.nn.Tanh()]
    elif innermost:
      upconv = torch.nn.ConvTranspose2d(inner_nc, outer_nc, 4, stride=2, padding=1,
                                        bias=use_bias)
      model = [downrelu, downconv, uprelu, upconv, upnorm]
    else:
      upconv = torch.nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1,
                                        bias=use_bias)
      model = [downrelu, downconv, downnorm, submodule, uprelu, upconv, upnorm]
      if use_dropout:
        model += [torch.nn.Dropout(0.5)]
    self.model = torch.nn.Sequential(*model)

  def forward(self, x):
    if self.outermost:
      return self.model(x)
    return torch.cat([x, self.model(x)], 1)


class _TorchUnetGenerator(torch.nn.Module):

  def __init__(self, input_nc, output_nc, num_downs, ngf=64, norm="batch", use_dropout=True):
    super().__init__()
    block = _TorchUnetBlock(ngf * 8, ngf * 8, norm=norm, innermost=True)
    for _ in range(num_downs - 5):
      block = _TorchUnetBlock(ngf * 8, ngf * 8, submodule=block, norm=norm,
                              use_dropout=use_dropout)
    block = _TorchUnetBlock(ngf * 4, ngf * 8, submodule=block, norm=norm)
    block = _TorchUnetBlock(ngf * 2, ngf * 4, submodule=block, norm=norm)
    block = _TorchUnetBlock(ngf, ngf * 2, submodule=block, norm=norm)
    self.model = _TorchUnetBlock(output_nc, ngf, input_nc=input_nc, submodule=block,
                                 outermost=True, norm=norm)

  def forward(self, x):
    return self.model(x)


class _TorchNLayerDiscriminator(torch.nn.Module):

  def __init__(self, input_nc, ndf=64, n_layers=3, norm="batch"):
    super().__init__()
    norm_layer = _norm_layer(norm)
    use_bias = norm == "instance"
    seq = [torch.nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), torch.nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers):
      prev, mult = mult, min(2**n, 8)
      seq += [torch.nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=use_bias),
              norm_layer(ndf * mult), torch.nn.LeakyReLU(0.2, True)]
    prev, mult = mult, min(2**n_layers, 8)
    seq += [torch.nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=use_bias),
            norm_layer(ndf * mult), torch.nn.LeakyReLU(0.2, True)]
    seq += [torch.nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
    self.model = torch.nn.Sequential(*seq)

  def forward(self, x):
    return self.model(x)


def _randomize(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) and m.bias is not None:
        m.bias.normal_(0.0, 0.1)
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
  return model.eval()


# --------------------------------------------------------------------------------------------
# Helpers.


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def _nhwc(t):
  return np.moveaxis(t.detach().numpy(), 1, -1)


def _capture(modules):
  """Forward hooks storing a clone of each module's output (before in-place ops change it)."""
  store = {}
  for name, module in modules.items():
    module.register_forward_hook(
        lambda m, i, o, name=name: store.__setitem__(name, o.detach().clone()))
  return store


def _max_diff(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def _generator_case(in_ch, out_ch, num_downs, ngf, norm, size, seed):
  ref = _randomize(_TorchUnetGenerator(in_ch, out_ch, num_downs, ngf, norm), seed)
  model = UNetGenerator(out_channels=out_ch, num_downs=num_downs, ngf=ngf, norm=norm)
  x = np.random.default_rng(seed).normal(size=(2, size, size, in_ch)).astype(np.float32)
  template = jax.eval_shape(model.init, jax.random.key(0), x)
  variables = unet_generator_from_torch(ref.state_dict(), template).variables
  return ref, model, variables, x


GENERATOR_CASES = {
    # in, out, num_downs, ngf, norm, size
    "gray_instance": (1, 1, 5, 8, "instance", 32),
    "rgb_batch_dropout_level": (3, 2, 6, 4, "batch", 64),
}


@functools.lru_cache(maxsize=None)
def _cached_case(name):
  return _generator_case(*GENERATOR_CASES[name], seed=1)


@pytest.fixture(params=list(GENERATOR_CASES))
def generator_case(request):
  return request.param, _cached_case(request.param)


# --------------------------------------------------------------------------------------------
# Generator.


def test_generator_matches_torch(generator_case):
  name, (ref, model, variables, x) = generator_case
  num_downs = GENERATOR_CASES[name][2]
  blocks = [ref.model]
  for _ in range(num_downs - 1):
    blocks.append(blocks[-1].model[1] if blocks[-1] is ref.model else blocks[-1].model[3])
  taps = {"down_0": blocks[0].model[0], f"down_{num_downs - 1}": blocks[-1].model[1],
          f"up_{num_downs - 1}": blocks[-1].model[4]}
  for k in range(1, num_downs - 1):
    taps[f"down_{k}"] = blocks[k].model[2]
    taps[f"up_{k}"] = blocks[k].model[6]
  store = _capture(taps)
  with torch.no_grad():
    expected = _nhwc(ref(_nchw(x)))
  y, feats = jax.jit(functools.partial(model.apply, return_features=True))(variables, x)
  assert y.dtype == jnp.float32 and y.shape == x.shape[:3] + (GENERATOR_CASES[name][1],)
  assert _max_diff(y, expected) <= TOL
  assert set(feats) == set(taps)
  for tap, value in store.items():
    assert _max_diff(feats[tap], _nhwc(value)) <= TOL, tap
  # The skip path carries LeakyReLU(x) (the reference's in-place quirk): not a no-op here.
  assert np.min(np.asarray(feats["down_1"])) < 0.0


def test_generator_variables_follow_reference(generator_case):
  name, (ref, model, variables, x) = generator_case
  in_ch, out_ch, num_downs, ngf, norm, _ = GENERATOR_CASES[name]
  params = variables["params"]
  assert set(params) == {f"{kind}_{k}" for kind in ("down", "up") for k in range(num_downs)}
  has_bias = norm == "instance"
  assert ("bias" in params["down_0"]["conv"]) == has_bias  # no norm after it, still the rule
  assert "bias" in params["up_0"]["conv"]  # the outermost up conv always has one
  assert params["down_0"]["conv"]["kernel"].shape == (4, 4, in_ch, ngf)
  assert params["up_0"]["conv"]["kernel"].shape == (4, 4, 2 * ngf, out_ch)
  assert params[f"up_{num_downs - 1}"]["conv"]["kernel"].shape == (4, 4, 8 * ngf, 8 * ngf)
  assert "norm" not in params["down_0"] and "norm" not in params[f"down_{num_downs - 1}"]
  n_torch = sum(p.numel() for p in ref.parameters())
  assert sum(np.size(a) for a in jax.tree_util.tree_leaves(params)) == n_torch
  assert ("batch_stats" in variables) == (norm == "batch")


def test_generator_train_mode_dropout_and_batch_stats():
  _, model, variables, x = _cached_case("rgb_batch_dropout_level")
  key = functools.partial(jax.random.key, impl="rbg")
  run = jax.jit(functools.partial(model.apply, train=True, return_features=True,
                                  mutable=["batch_stats"]))
  ((y1, f1), up1), ((y2, f2), up2) = (run(variables, x, rngs={"dropout": key(s)}) for s in (1, 2))
  # num_downs = 6: only level 4 (= num_downs - 2) has dropout; deeper and encoder unchanged.
  assert not np.allclose(f1["up_4"], f2["up_4"])
  np.testing.assert_array_equal(f1["up_5"], f2["up_5"])
  for k in range(6):
    np.testing.assert_array_equal(f1[f"down_{k}"], f2[f"down_{k}"])
  kept = np.asarray(f1["up_4"]) != 0
  assert 0.3 < kept.mean() < 0.7  # rate 0.5
  # Batch statistics in train mode: running mean <- 0.9 * old + 0.1 * batch mean (torch's
  # momentum 0.1), for every norm the reference has (none on the outermost / innermost down).
  stats = up1["batch_stats"]
  assert set(stats) == {"down_1", "down_2", "down_3", "down_4", "up_1", "up_2", "up_3", "up_4",
                        "up_5"}
  old = np.asarray(variables["batch_stats"]["down_1"]["norm"]["bn"]["mean"])
  with torch.no_grad():  # the batch mean of down_1's conv output, computed by torch
    down_0 = torch.nn.functional.leaky_relu(_nchw(f1["down_0"]), 0.2)
    kernel = np.asarray(variables["params"]["down_1"]["conv"]["kernel"]).transpose(3, 2, 0, 1)
    batch_mean = torch.nn.functional.conv2d(down_0, torch.from_numpy(kernel.copy()), stride=2,
                                            padding=1).mean((0, 2, 3)).numpy()
  np.testing.assert_allclose(stats["down_1"]["norm"]["bn"]["mean"], 0.9 * old + 0.1 * batch_mean,
                             rtol=1e-4, atol=1e-5)
  for name in ("down_1", "down_2", "down_3", "down_4", "up_5", "up_4"):  # before the dropout
    jax.tree_util.tree_map(np.testing.assert_array_equal, stats[name], up2["batch_stats"][name])
  assert not np.allclose(stats["up_3"]["norm"]["bn"]["mean"],
                         up2["batch_stats"]["up_3"]["norm"]["bn"]["mean"])


def test_generator_256_shapes_and_parameter_count():
  model = UNetGenerator(out_channels=3)  # U-Net-256: num_downs 8, ngf 64, batch norm
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  # pix2pix prints "[Network G] Total number of parameters : 54.414 M" for unet_256; the exact
  # count of the torch rebuild above (3 -> 3 channels) is 54,413,955.
  n = sum(np.size(a) for a in jax.tree_util.tree_leaves(variables["params"]))
  assert n == 54_413_955
  y, feats = jax.eval_shape(functools.partial(model.apply, return_features=True), variables, x)
  assert y.shape == (1, 256, 256, 3) and y.dtype == jnp.float32
  assert feats["down_7"].shape == (1, 1, 1, 512)  # the 1x1 bottleneck
  assert feats["down_0"].shape == (1, 128, 128, 64)
  assert feats["up_1"].shape == (1, 128, 128, 64)
  assert feats["up_7"].shape == (1, 2, 2, 512)
  # Train mode: dropout 0.5 in the three middle up-blocks only (traced, not compiled).
  dropouts = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dropout):
      dropouts.append((context.module.path[0], context.module.rate))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(model.apply, train=True, mutable=["batch_stats"]),
                   variables, x, rngs={"dropout": jax.random.key(0)})
  assert sorted(dropouts) == [("up_4", 0.5), ("up_5", 0.5), ("up_6", 0.5)]


def test_generator_bfloat16_compute_float32_outputs():
  model = UNetGenerator(out_channels=1, num_downs=5, ngf=2, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(variables))
  y, feats = jax.eval_shape(functools.partial(model.apply, return_features=True), variables, x)
  assert y.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in feats.values())


def test_init_statistics():
  # pix2pix init_weights('normal', 0.02), on one down layer of the generator (a whole-model init
  # compiles one random sampler per parameter shape, which is slow on CPU; "rbg" keys too).
  layer = pix2pix._Down(64, activate=True, norm="batch", use_bias=True)
  params = jax.jit(layer.init)(jax.random.key(0, impl="rbg"), np.zeros((1, 4, 4, 32), np.float32))
  params = params["params"]
  kernel = params["conv"]["kernel"]  # 4 * 4 * 32 * 64 samples
  np.testing.assert_allclose(np.std(kernel), 0.02, rtol=0.05)
  assert abs(float(np.mean(kernel))) < 0.002
  scale = params["norm"]["bn"]["scale"]
  np.testing.assert_allclose(np.mean(scale), 1.0, atol=0.02)
  assert 0.005 < np.std(scale) < 0.04
  assert np.all(params["conv"]["bias"] == 0) and np.all(params["norm"]["bn"]["bias"] == 0)


@pytest.mark.parametrize("kwargs, shape, match", [
    (dict(num_downs=4), (1, 32, 32, 1), "num_downs"),
    (dict(num_downs=5), (1, 48, 32, 1), r"\(1, 48, 32, 1\).*divisible by 32"),
    (dict(norm="group"), (1, 32, 32, 1), "norm"),
    (dict(dropout=1.0), (1, 32, 32, 1), "dropout"),
    (dict(out_channels=0), (1, 32, 32, 1), "out_channels"),
    (dict(ngf=0), (1, 32, 32, 1), "ngf"),
    (dict(), (32, 32, 1), r"\(N, H, W, C\).*\(32, 32, 1\)"),
])
def test_generator_validation(kwargs, shape, match):
  model = UNetGenerator(**{"out_channels": 1, "num_downs": 5, "ngf": 2, **kwargs})
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


# --------------------------------------------------------------------------------------------
# Discriminator.


def test_discriminator_matches_torch():
  ref = _randomize(_TorchNLayerDiscriminator(2, ndf=8, n_layers=3, norm="batch"), seed=3)
  model = PatchGANDiscriminator(ndf=8, n_layers=3, norm="batch")
  x = np.random.default_rng(3).normal(size=(2, 64, 64, 2)).astype(np.float32)  # (A, B) pair
  template = jax.eval_shape(model.init, jax.random.key(0), x)
  variables = patchgan_from_torch(ref.state_dict(), template).variables
  seq = ref.model
  store = _capture({"layer0": seq[1], "layer1": seq[4], "layer2": seq[7], "layer3": seq[10],
                    "layer4": seq[11]})
  with torch.no_grad():
    expected = _nhwc(ref(_nchw(x)))
  y, feats = jax.jit(functools.partial(model.apply, return_features=True))(variables, x)
  assert y.shape == (2, 6, 6, 1) and y.dtype == jnp.float32
  assert _max_diff(y, expected) <= TOL
  assert set(feats) == set(store)
  for tap, value in store.items():
    assert _max_diff(feats[tap], _nhwc(value)) <= TOL, tap


@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_discriminator_variables_follow_reference(norm):
  ref = _TorchNLayerDiscriminator(4, ndf=8, n_layers=3, norm=norm)
  model = PatchGANDiscriminator(ndf=8, n_layers=3, norm=norm)
  template = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 64, 64, 4), jnp.float32))
  # Every torch tensor has its Flax leaf of the right shape, and nothing is left over.
  patchgan_from_torch(ref.state_dict(), template)
  params = template["params"]
  assert sum(np.size(a) for a in jax.tree_util.tree_leaves(params)) == sum(
      p.numel() for p in ref.parameters())
  assert "bias" in params["conv_0"] and "bias" in params["conv_4"]
  assert ("bias" in params["conv_1"]) == (norm == "instance")
  assert ("batch_stats" in template) == (norm == "batch")


def test_discriminator_256_patch_map_and_parameter_count():
  model = PatchGANDiscriminator()  # 70x70 PatchGAN, ndf 64, batch norm
  x = jax.ShapeDtypeStruct((2, 256, 256, 6), jnp.float32)  # conditional: (A, B) stacked
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  y, feats = jax.eval_shape(functools.partial(model.apply, return_features=True), variables, x)
  assert y.shape == (2, 30, 30, 1)
  assert model.output_size(256) == 30
  assert {k: v.shape[1:] for k, v in feats.items()} == {
      "layer0": (128, 128, 64), "layer1": (64, 64, 128), "layer2": (32, 32, 256),
      "layer3": (31, 31, 512), "layer4": (30, 30, 1)}
  # pix2pix prints "[Network D] Total number of parameters : 2.769 M" (input_nc 6).
  assert sum(np.size(a) for a in jax.tree_util.tree_leaves(variables["params"])) == 2_768_705


def test_discriminator_receptive_field_is_70():
  model = PatchGANDiscriminator(ndf=2, n_layers=3, norm="batch")
  x = np.random.default_rng(0).normal(size=(1, 128, 128, 1)).astype(np.float32)
  template = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(1)
  # Positive weights (and statistics): no cancellation can hide a dependency.
  variables = jax.tree_util.tree_map(
      lambda s: rng.uniform(0.5, 1.5, size=s.shape).astype(np.float32), template)
  grad = jax.jit(jax.grad(lambda v, x: model.apply(v, x)[0, 7, 7, 0], argnums=1))(variables, x)
  rows, cols = np.nonzero(np.asarray(grad)[0, :, :, 0])
  # Output pixel o sees inputs 8 o - 23 .. 8 o + 46: a 70 x 70 window.
  assert (rows.min(), rows.max(), cols.min(), cols.max()) == (33, 102, 33, 102)
  assert rows.size == 70 * 70


@pytest.mark.parametrize("kwargs, shape, match", [
    (dict(n_layers=0), (1, 64, 64, 1), "n_layers"),
    (dict(norm="layer"), (1, 64, 64, 1), "norm"),
    (dict(ndf=0), (1, 64, 64, 1), "ndf"),
    (dict(), (1, 16, 16, 1), r"\(1, 16, 16, 1\).*too small"),
    (dict(), (1, 64, 64), r"\(N, H, W, C\)"),
])
def test_discriminator_validation(kwargs, shape, match):
  model = PatchGANDiscriminator(**{"ndf": 2, **kwargs})
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


def test_converters_read_saved_checkpoints_and_list_mismatches(tmp_path):
  from safetensors.torch import save_file

  from jaxmed.interop.state_dict import load_state_dict, strip_prefix

  ref = _TorchUnetGenerator(1, 1, 5, 4, "batch")
  model = UNetGenerator(out_channels=1, num_downs=5, ngf=4)
  template = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32))
  torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "G.pth")
  loaded = strip_prefix(load_state_dict(tmp_path / "G.pth"), ["module."])
  converted = unet_generator_from_torch(loaded, template)
  assert converted.missing == () and all("num_batches_tracked" in k for k in converted.unused)
  kernel = converted.variables["params"]["down_0"]["conv"]["kernel"]
  np.testing.assert_array_equal(
      kernel, ref.state_dict()["model.model.0.weight"].numpy().transpose(2, 3, 1, 0))
  with pytest.raises(ValueError, match=r"template has no down_\{k\} modules"):
    unet_generator_from_torch(loaded, {"params": {}})
  # A generator with a different depth: keys missing and left over, all listed.
  deeper = jax.eval_shape(UNetGenerator(out_channels=1, num_downs=6, ngf=4).init,
                          jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 1), jnp.float32))
  with pytest.raises(ValueError, match=r"missing from the pix2pix generator checkpoint"):
    unet_generator_from_torch(loaded, deeper)

  disc = _TorchNLayerDiscriminator(2, ndf=8, n_layers=3, norm="batch")
  save_file({k: v.contiguous() for k, v in disc.state_dict().items()}, str(tmp_path / "D.safetensors"))
  d_template = jax.eval_shape(PatchGANDiscriminator(ndf=8).init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, 64, 64, 2), jnp.float32))
  sd = dict(disc.state_dict())
  sd["model.2.weight"] = sd["model.2.weight"][:, :1]
  with pytest.raises(ValueError, match=r"model\.2\.weight \(16, 1, 4, 4\) -> params/conv_1"):
    patchgan_from_torch(sd, d_template)
  loaded = load_state_dict(tmp_path / "D.safetensors")
  assert patchgan_from_torch(loaded, d_template).missing == ()

"""Initialisation by path pattern (jaxmed.train.init): transfer, load_pretrained, initializer."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import numpy_filled

from jaxmed.train import checkpoint
from jaxmed.train import init as init_lib
from jaxmed.train.state import TrainState


def _random_tree(seed, spec):
  """Nested dicts of random float32 arrays: ``spec`` maps "collection/a/b" -> shape."""
  rng = np.random.default_rng(seed)
  return init_lib.unflatten({p: rng.normal(size=s).astype(np.float32) for p, s in spec.items()})


SPEC = {
    "params/encoder/conv1/kernel": (3, 3, 2, 4),
    "params/encoder/conv1/bias": (4,),
    "params/encoder/norm/scale": (4,),
    "params/head/kernel": (4, 5),
    "params/head/bias": (5,),
    "batch_stats/encoder/norm/mean": (4,),
    "batch_stats/encoder/norm/var": (4,),
}


def _bits(x):
  x = np.asarray(x)
  return x.dtype, x.shape, x.tobytes()


def _check_every_leaf(out, pretrained, fresh, fresh_paths):
  """Every leaf of ``out``: bit-identical to ``fresh`` at ``fresh_paths``, else to
  ``pretrained`` (cast to the fresh dtype); same structure as ``fresh``."""
  flat_out, flat_pre = init_lib.flatten(out), init_lib.flatten(pretrained)
  flat_fresh = init_lib.flatten(fresh)
  assert list(flat_out) == list(flat_fresh)
  for path, value in flat_out.items():
    assert isinstance(value, np.ndarray), path
    if path in fresh_paths:
      assert _bits(value) == _bits(flat_fresh[path]), path
    else:
      expected = np.asarray(flat_pre[path]).astype(np.asarray(flat_fresh[path]).dtype)
      assert _bits(value) == _bits(expected), path


def test_transfer_keeps_exactly_what_it_is_told():
  pretrained = _random_tree(0, SPEC)
  fresh = _random_tree(1, SPEC)
  fresh["params"]["encoder"]["norm"]["scale"] = np.ones(4, np.float16)  # cast to fresh dtype
  out, plan = init_lib.transfer(pretrained, fresh, replace=[r"head/.*"], return_plan=True)
  _check_every_leaf(out, pretrained, fresh, {"params/head/kernel", "params/head/bias"})
  assert out["params"]["encoder"]["norm"]["scale"].dtype == np.float16
  assert plan.fresh == ("params/head/kernel", "params/head/bias")
  assert plan.kinds["params/encoder/conv1/kernel"] == "pretrained"
  assert plan.kinds["params/head/bias"] == "fresh"
  assert plan.dropped == ("params/head/kernel", "params/head/bias")  # replaced -> dropped
  assert plan.summary() == "5 copied, 0 tiled, 2 kept fresh, 2 dropped, 0 unused"
  # Full paths reach other collections; one pattern can span them.
  out = init_lib.transfer(pretrained, fresh,
                          replace=[r"batch_stats/.*", r"params/encoder/conv1/bias"])
  _check_every_leaf(out, pretrained, fresh, {"batch_stats/encoder/norm/mean",
                                             "batch_stats/encoder/norm/var",
                                             "params/encoder/conv1/bias"})
  out = init_lib.transfer(pretrained, fresh, replace=[r"[^/]+/encoder/norm/.*"])
  _check_every_leaf(out, pretrained, fresh, {"params/encoder/norm/scale",
                                             "batch_stats/encoder/norm/mean",
                                             "batch_stats/encoder/norm/var"})
  # The short form of a pattern matches params only.
  out = init_lib.transfer(pretrained, fresh, replace=[r"encoder/norm/.*"])
  _check_every_leaf(out, pretrained, fresh, {"params/encoder/norm/scale"})
  # Nothing replaced: everything copied; the inputs are not modified.
  before = init_lib.flatten(jax.tree.map(np.copy, fresh))
  out = init_lib.transfer(pretrained, fresh)
  _check_every_leaf(out, pretrained, fresh, set())
  assert all(_bits(v) == _bits(before[p]) for p, v in init_lib.flatten(fresh).items())


def test_rename_reads_from_another_prefix():
  pretrained = _random_tree(0, {
      "params/backbone/conv/kernel": (3, 3, 1, 2), "params/backbone/conv/bias": (2,),
      "params/projector/kernel": (2, 8), "batch_stats/backbone/bn/mean": (2,)})
  fresh = _random_tree(1, {
      "params/encoder/conv/kernel": (3, 3, 1, 2), "params/encoder/conv/bias": (2,),
      "params/classifier/kernel": (2, 3), "batch_stats/encoder/bn/mean": (2,)})
  for rules in ([(r"encoder/(.*)", r"backbone/\1"),  # short form: params only ...
                 (r"batch_stats/encoder/(.*)", r"batch_stats/backbone/\1")],
                [(r"(\w+)/encoder/(?P<rest>.*)", r"\1/backbone/\g<rest>")],  # ... or all
                {r"(\w+)/encoder/(.*)": r"\1/backbone/\2"}):
    out, plan = init_lib.transfer(pretrained, fresh, rename=rules, replace=["classifier/.*"],
                                  drop=[r"projector/.*"], return_plan=True)
    assert plan.copied == {"params/encoder/conv/kernel": "params/backbone/conv/kernel",
                           "params/encoder/conv/bias": "params/backbone/conv/bias",
                           "batch_stats/encoder/bn/mean": "batch_stats/backbone/bn/mean"}
    assert plan.dropped == ("params/projector/kernel",)
    for dst, src in plan.copied.items():
      assert _bits(init_lib.flatten(out)[dst]) == _bits(init_lib.flatten(pretrained)[src])
    assert _bits(out["params"]["classifier"]["kernel"]) == _bits(
        fresh["params"]["classifier"]["kernel"])
  # The first matching rule wins.
  plan = init_lib.plan_transfer(pretrained, fresh, replace=["classifier/.*", "batch_stats/.*"],
                                drop=[".*"], rename=[(r"encoder/conv/(.*)",
                                                      r"backbone/conv/\1"),
                                                     (r"encoder/(.*)", r"nowhere/\1")])
  assert plan.copied["params/encoder/conv/bias"] == "params/backbone/conv/bias"


def test_all_problems_listed_at_once():
  pretrained = _random_tree(0, {**SPEC, "params/head/kernel": (4, 7),
                                "params/head/bias": (7,), "params/extra/w": (2,),
                                "batch_stats/extra/m": (3,)})
  del pretrained["params"]["encoder"]["conv1"]
  fresh = _random_tree(1, SPEC)
  with pytest.raises(ValueError) as info:
    init_lib.transfer(pretrained, fresh)
  message = str(info.value)
  assert "5 problem(s)" in message
  for line in ["params/encoder/conv1/kernel: missing from the pre-trained variables",
               "params/encoder/conv1/bias: missing from the pre-trained variables",
               "params/head/kernel: pre-trained shape (4, 7) != model shape (4, 5)",
               "params/head/bias: pre-trained shape (7,) != model shape (5,)",
               "2 pre-trained variable(s) used by no model variable (allow them with drop=... "
               "or strict=False): params/extra/w, batch_stats/extra/m"]:
    assert line in message, (line, message)
  with pytest.raises(ValueError, match=r"params/encoder/conv1/kernel: missing from the "
                                       r"pre-trained variables \(renamed to params/enc/c/kernel\)"):
    init_lib.transfer(pretrained, fresh, rename=[(r"encoder/conv1/(.*)", r"enc/c/\1")],
                      replace=["head/.*"], drop=["extra/.*", "batch_stats/extra/.*"])


def test_unused_pretrained_leaves_reported_dropped_or_allowed():
  pretrained = _random_tree(0, {**SPEC, "params/projector/kernel": (4, 2),
                                "batch_stats/projector/mean": (2,)})
  fresh = _random_tree(1, SPEC)
  with pytest.raises(ValueError, match=r"2 pre-trained variable\(s\) used by no model variable.*"
                                       r"params/projector/kernel, batch_stats/projector/mean"):
    init_lib.transfer(pretrained, fresh)
  out, plan = init_lib.transfer(pretrained, fresh, drop=[r"[^/]+/projector/.*"],
                                return_plan=True)
  _check_every_leaf(out, pretrained, fresh, set())
  assert plan.dropped == ("params/projector/kernel", "batch_stats/projector/mean")
  assert plan.unused == ()
  out, plan = init_lib.transfer(pretrained, fresh, drop=["projector/.*"], strict=False,
                                return_plan=True)
  assert plan.dropped == ("params/projector/kernel",)
  assert plan.unused == ("batch_stats/projector/mean",)
  _check_every_leaf(out, pretrained, fresh, set())


def test_shapes_only_and_argument_errors():
  pretrained = _random_tree(0, SPEC)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), pretrained)
  out = init_lib.transfer(pretrained, shapes)  # every leaf copied: shapes suffice
  assert out["params"]["head"]["kernel"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(out["params"]["head"]["kernel"],
                                pretrained["params"]["head"]["kernel"].astype(jnp.bfloat16))
  with pytest.raises(ValueError, match=r"params/head/kernel: kept fresh \(replace\), but the "
                                       r"fresh variables hold only its shape"):
    init_lib.transfer(pretrained, shapes, replace=["head/.*"])
  with pytest.raises(ValueError, match=r"replace\[1\] = '\(' is not a valid regular expression"):
    init_lib.transfer(pretrained, pretrained, replace=["head/.*", "("])
  with pytest.raises(TypeError, match=r"rename\[0\] must be a \(regex, replacement\) pair"):
    init_lib.transfer(pretrained, pretrained, rename=["head/(.*)"])
  with pytest.raises(TypeError, match=r"fresh\['params'\] must be a nested dict"):
    init_lib.transfer(pretrained, {"params": np.zeros(3)})
  with pytest.raises(TypeError, match="pretrained must be a mapping"):
    init_lib.transfer([1], pretrained)
  # A lone string is one pattern, not a sequence of one-character patterns.
  assert init_lib.plan_transfer(pretrained, pretrained, replace=r"head/.*").fresh == (
      "params/head/kernel", "params/head/bias")


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_replacing_a_unets_input_and_output_layers(norm):
  from jaxmed.models.unet import UNet  # pylint: disable=g-import-not-at-top
  pre_model = UNet(out_channels=4, features=(4, 8), norm=norm)
  new_model = UNet(out_channels=3, features=(4, 8), norm=norm)
  pretrained = numpy_filled(jax.eval_shape(pre_model.init, jax.random.key(0),
                                           jnp.zeros((1, 16, 16, 4))), 0, scale=1.0)
  fresh = numpy_filled(jax.eval_shape(new_model.init, jax.random.key(1),
                                      jnp.zeros((1, 16, 16, 2))), 1, scale=1.0)
  assert set(pretrained) == ({"params", "batch_stats"} if norm == "batch" else {"params"})
  patterns = {
      # Fine-tuning's default (the segmentation method's init.replace): every collection.
      "every collection": [r"[^/]+/input_conv/.*", r"[^/]+/output_conv/.*"],
      "params, full": [r"params/input_conv/.*", r"params/output_conv/.*"],
      "params, short": [r"input_conv/.*", r"output_conv/.*"],
      "params, one pattern": [r"(input|output)_conv/.*"],
  }
  if norm == "batch":  # input_conv's statistics have the same shape in both models
    patterns = {"every collection": patterns["every collection"]}
  kept = {p for p in init_lib.flatten(fresh) if re.search(r"/(input|output)_conv/", p)}
  assert kept and len(kept) < len(init_lib.flatten(fresh)) / 2
  for name, replace in patterns.items():
    out = init_lib.transfer(pretrained, fresh, replace=replace)
    assert jax.tree.structure(out) == jax.tree.structure(fresh), name
    _check_every_leaf(out, pretrained, fresh, kept)
  # The top-level names alone (the old API) match no full path: the shape errors say so.
  with pytest.raises(ValueError, match=r"params/input_conv/conv/kernel: pre-trained shape "
                                       r"\(3, 3, 4, 4\) != model shape \(3, 3, 2, 4\)"):
    init_lib.transfer(pretrained, fresh, replace=["input_conv", "output_conv"])


def _conv_tree(seed, kernel_shape, extra=True):
  """An input convolution ``conv`` (kernel + bias) and, with ``extra``, a block after it."""
  spec = {"params/conv/kernel": kernel_shape, "params/conv/bias": kernel_shape[-1:]}
  if extra:
    spec.update({"params/block/kernel": (3,) * (len(kernel_shape) - 2) + (kernel_shape[-1], 2),
                 "batch_stats/block/mean": (2,)})
  return _random_tree(seed, spec)


@pytest.mark.parametrize("pre_shape,new_shape", [
    ((3, 3, 3, 1, 4), (3, 3, 3, 4, 4)), ((3, 3, 3, 2, 4), (3, 3, 3, 5, 4)),
    ((3, 3, 1, 4), (3, 3, 4, 4)), ((3, 3, 2, 4), (3, 3, 5, 4))],
                         ids=["3d-1to4", "3d-2to5", "2d-1to4", "2d-2to5"])
def test_tile_adapts_the_input_channels(pre_shape, new_shape):
  pretrained, fresh = _conv_tree(0, pre_shape), _conv_tree(1, new_shape)
  fresh["params"]["conv"]["kernel"] = fresh["params"]["conv"]["kernel"].astype(np.float16)
  out, plan = init_lib.transfer(pretrained, fresh, tile=[r"conv/kernel"], return_plan=True)
  old, new = pre_shape[-2], new_shape[-2]
  kernel = out["params"]["conv"]["kernel"]
  assert kernel.shape == new_shape and kernel.dtype == np.float16
  pre_kernel = pretrained["params"]["conv"]["kernel"]
  for c in range(new):
    np.testing.assert_array_equal(
        kernel[..., c, :], (pre_kernel[..., c % old, :] * (old / new)).astype(np.float16))
  np.testing.assert_array_equal(init_lib.tile_input_channels(pre_kernel, new).astype(np.float16),
                                kernel)
  # Every other leaf copied as it is.
  flat_out, flat_pre = init_lib.flatten(out), init_lib.flatten(pretrained)
  assert list(flat_out) == list(init_lib.flatten(fresh))
  for path in plan.copied:
    assert _bits(flat_out[path]) == _bits(flat_pre[path]), path
  assert plan.tiled == ("params/conv/kernel",)
  assert plan.sources["params/conv/kernel"] == "params/conv/kernel"
  assert plan.kinds["params/conv/kernel"] == "tiled"
  assert plan.kinds["params/conv/bias"] == "pretrained"
  assert "params/conv/kernel" not in plan.copied and len(plan.copied) == 3
  assert plan.summary() == "3 copied, 1 tiled, 0 kept fresh, 0 dropped, 0 unused"
  # Shapes suffice for a tiled leaf; equal shapes are copied, not tiled.
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh)
  same = init_lib.transfer(pretrained, shapes, tile=[r"conv/kernel"])
  np.testing.assert_array_equal(same["params"]["conv"]["kernel"], kernel)
  out, plan = init_lib.transfer(pretrained, pretrained, tile=[r"[^/]+/.*kernel"],
                                return_plan=True)
  assert plan.tiled == () and plan.kinds["params/conv/kernel"] == "pretrained"
  _check_every_leaf(out, pretrained, pretrained, set())


@pytest.mark.parametrize("spatial", [(6, 5, 4), (6, 5)], ids=["3d", "2d"])
def test_tiled_kernel_keeps_the_activation_of_equal_channels(spatial):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  k = (3,) * len(spatial)
  pretrained = _conv_tree(0, (*k, 1, 3), extra=False)
  fresh = _conv_tree(1, (*k, 4, 3), extra=False)
  out = init_lib.transfer(pretrained, fresh, tile=[r"conv/kernel"])
  conv = nn.Conv(features=3, kernel_size=k)
  x = np.random.default_rng(2).normal(size=(2, *spatial, 1)).astype(np.float32)
  expected = conv.apply({"params": pretrained["params"]["conv"]}, x)
  got = conv.apply({"params": out["params"]["conv"]}, np.repeat(x, 4, axis=-1))
  assert got.shape == expected.shape == (2, *spatial, 3)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_tile_errors():
  pretrained = _conv_tree(0, (3, 3, 2, 4))
  for new_shape, why in [
      ((3, 3, 4, 8), r"tile adapts only the input-channel axis \(-2\)"),
      ((3, 3, 3, 4, 4), r"tile adapts only the input-channel axis \(-2\)"),
      ((3, 3, 1, 4), r"tile only adds input channels \(axis -2\), and the model has fewer "
                     r"\(1 < 2\)")]:
    fresh = _conv_tree(1, new_shape)
    fresh["params"]["block"] = pretrained["params"]["block"]  # only the conv differs
    shapes = re.escape(f"params/conv/kernel: pre-trained shape (3, 3, 2, 4) != model shape "
                       f"{new_shape}; ")
    with pytest.raises(ValueError, match=r"1 problem\(s\):\n  " + shapes + why):
      init_lib.transfer(pretrained, fresh, tile=[r"conv/kernel"], replace=["conv/bias"])
  fresh = _conv_tree(1, (3, 3, 4, 4))
  with pytest.raises(ValueError, match=r"params/conv/kernel: matched by both replace "
                                       r"\('conv/.\*'\) and tile \('\[\^/\]\+/conv/kernel'\)"):
    init_lib.transfer(pretrained, fresh, replace=[r"conv/.*"], tile=[r"[^/]+/conv/kernel"])
  with pytest.raises(ValueError, match=r"1 problem\(s\)"):  # reported once
    init_lib.plan_transfer(pretrained, _conv_tree(1, (3, 3, 2, 4)), replace=[r"conv/kernel"],
                           tile=[r"conv/kernel"])
  # Without tile a differing kernel stays an error.
  with pytest.raises(ValueError, match=re.escape(
      "params/conv/kernel: pre-trained shape (3, 3, 2, 4) != model shape (3, 3, 4, 4)") + "$"):
    init_lib.transfer(pretrained, fresh, tile=[r"block/kernel"])
  with pytest.raises(ValueError, match=r"tile\[0\] = '\(' is not a valid regular expression"):
    init_lib.transfer(pretrained, fresh, tile=["("])
  with pytest.raises(ValueError, match=r"tile only adds input channels: 1 < 2"):
    init_lib.tile_input_channels(pretrained["params"]["conv"]["kernel"], 1)


def _state(params, model_state) -> TrainState:
  """A train state holding ``params`` / ``model_state`` (other fields tiny or None)."""
  values = dict(step=jnp.int32(1), params=params, model_state=model_state,
                opt_state={"mu": params}, rng=jax.random.PRNGKey(0),
                nonfinite_streak=jnp.int32(0), nonfinite_total=jnp.int32(0))
  return TrainState(**{f.name: values.get(f.name, {} if f.metadata.get("pytree_node", True)
                                          else None)
                       for f in dataclasses.fields(TrainState)})


def test_load_pretrained_from_an_orbax_run(tmp_path):
  variables = {s: _random_tree(s, {"params/generator/conv/kernel": (3, 3, 1, 2),
                                   "params/discriminator/dense/kernel": (4, 1),
                                   "batch_stats/generator/bn/mean": (2,)}) for s in (1, 2)}
  ckpt = checkpoint.Checkpointer(str(tmp_path / "run" / "checkpoints"), async_save=False)
  for step in (1, 2):
    v = variables[step]
    ckpt.save(step, _state(v["params"], {"batch_stats": v["batch_stats"]}))
  ckpt.close()
  same = lambda a, b: jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y, strict=True),
                                   a, b)
  loaded = init_lib.load_pretrained({"path": str(tmp_path / "run")})
  same(loaded, variables[2])
  same(init_lib.load_pretrained(str(tmp_path / "run" / "checkpoints")), variables[2])
  same(init_lib.load_pretrained({"path": str(tmp_path / "run"), "step": 1, "converter": "",
                                 "prefix": None}), variables[1])
  generator = init_lib.load_pretrained({"path": str(tmp_path / "run"), "prefix": "generator"})
  same(generator, {"params": variables[2]["params"]["generator"],
                   "batch_stats": variables[2]["batch_stats"]["generator"]})
  dense = init_lib.load_pretrained({"path": str(tmp_path / "run"),
                                    "prefix": "discriminator/dense"})
  same(dense, {"params": variables[2]["params"]["discriminator"]["dense"]})
  # Through initializer into a model that is the generator with a new conv bias.
  fresh = _random_tree(7, {"params/conv/kernel": (3, 3, 1, 2), "params/conv/bias": (2,),
                           "batch_stats/bn/mean": (2,)})
  out = init_lib.initializer({"path": str(tmp_path / "run"), "prefix": "generator",
                              "replace": ["conv/bias"]})(fresh)
  _check_every_leaf(out, generator, fresh, {"params/conv/bias"})
  with pytest.raises(ValueError, match=r"prefix 'encoder' names no module.*'generator'"):
    init_lib.load_pretrained({"path": str(tmp_path / "run"), "prefix": "encoder"})
  with pytest.raises(ValueError, match=r"is a folder \(an orbax run\); \['converter'\]"):
    init_lib.load_pretrained({"path": str(tmp_path / "run"), "converter": "resnet"})
  with pytest.raises(ValueError, match=r"unknown pre-trained spec field\(s\) \['stpe'\]"):
    init_lib.load_pretrained({"path": str(tmp_path / "run"), "stpe": 1})
  with pytest.raises(FileNotFoundError, match="pre-trained weights not found: .*nowhere"):
    init_lib.load_pretrained({"path": str(tmp_path / "nowhere")})


def test_initializer_tiles_with_a_base_config_spec(tmp_path, caplog):
  from jaxmed.config import base_config  # pylint: disable=g-import-not-at-top
  pretrained = _conv_tree(0, (3, 3, 3, 1, 4))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "run" / "checkpoints"), async_save=False)
  ckpt.save(1, _state(pretrained["params"], {"batch_stats": pretrained["batch_stats"]}))
  ckpt.close()
  spec = base_config().init
  assert tuple(spec.tile) == ()
  spec.path = str(tmp_path / "run")
  spec.tile = (r"[^/]+/conv/kernel",)
  fresh = _conv_tree(1, (3, 3, 3, 4, 4))
  with caplog.at_level("INFO"):
    out = init_lib.initializer(spec)(fresh)
  assert "3 copied, 1 tiled, 0 kept fresh, 0 dropped, 0 unused" in caplog.text
  expected = init_lib.transfer(pretrained, fresh, tile=[r"conv/kernel"])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), out, expected)
  np.testing.assert_allclose(out["params"]["conv"]["kernel"],
                             np.repeat(pretrained["params"]["conv"]["kernel"], 4, -2) / 4)
  # The same spec in memory; the base spec's empty tile makes the channel change an error.
  out = init_lib.initializer(spec, pretrained=pretrained)(fresh)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), out, expected)
  spec.tile = ()
  with pytest.raises(ValueError, match=r"params/conv/kernel: pre-trained shape \(3, 3, 3, 1, "
                                       r"4\) != model shape \(3, 3, 3, 4, 4\)"):
    init_lib.initializer(spec, pretrained=pretrained)(fresh)
  spec.replace = (r"conv/kernel",)
  spec.tile = (r"conv/kernel",)
  with pytest.raises(ValueError, match="matched by both replace"):
    init_lib.initializer(spec, pretrained=pretrained)(fresh)


def test_load_pretrained_converts_a_torch_file(tmp_path):
  # pylint: disable=g-import-not-at-top  (slow imports, only this test needs them)
  import torch
  from monai.networks.nets.resnet import ResNet as MonaiResNet
  from safetensors.torch import save_file

  from jaxmed.interop import resnet_from_torch
  from jaxmed.models.resnet import ResNet

  torch.manual_seed(0)
  ref = MonaiResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[4, 8, 8, 8],
                    spatial_dims=2, n_input_channels=2, conv1_t_size=3, conv1_t_stride=1,
                    no_max_pool=True, shortcut_type="A", num_classes=4)
  state_dict = ref.state_dict()
  with torch.no_grad():  # non-trivial statistics, so copying them is checked
    for k, v in state_dict.items():
      if k.endswith(("running_mean", "running_var")):
        v.copy_(torch.rand(v.shape) + 0.5)
  kwargs = dict(layers=(1, 1, 1, 1), block_inplanes=(4, 8, 8, 8), conv1_t_size=(3, 3),
                conv1_t_stride=1, no_max_pool=True, shortcut_type="A")
  x = jnp.zeros((1, 8, 8, 2))
  template = jax.eval_shape(ResNet(num_classes=4, **kwargs).init, jax.random.key(0), x)
  expected = resnet_from_torch(state_dict, template).variables
  torch.save({"state_dict": {f"module.{k}": v for k, v in state_dict.items()}, "epoch": 3},
             tmp_path / "r.pth")
  save_file(state_dict, str(tmp_path / "r.safetensors"))
  same = lambda a, b: jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y, strict=True),
                                   a, b)
  spec = {"path": str(tmp_path / "r.pth"), "converter": "resnet", "strip": ["module."]}
  loaded = init_lib.load_pretrained(spec, template=template)
  assert jax.tree.structure(loaded) == jax.tree.structure(expected)
  same(loaded, expected)
  same(init_lib.load_pretrained({"path": str(tmp_path / "r.safetensors"), "converter": "resnet"},
                                template=template), expected)
  np.testing.assert_array_equal(loaded["params"]["conv1"]["kernel"],
                                np.transpose(state_dict["conv1.weight"].numpy(), (2, 3, 1, 0)))
  # Into a model with another head: the converted weights everywhere but the head.
  fresh = numpy_filled(jax.eval_shape(ResNet(num_classes=3, **kwargs).init, jax.random.key(1),
                                      x), 1, scale=1.0)
  out, plan = init_lib.transfer(loaded, fresh, replace=["fc/.*"], return_plan=True)
  assert sorted(plan.fresh) == ["params/fc/bias", "params/fc/kernel"]
  _check_every_leaf(out, loaded, fresh, set(plan.fresh))
  same(init_lib.initializer({**spec, "replace": ["fc/.*"]}, template=template)(fresh), out)
  # A headless model: the converter drops the head, the transfer copies everything.
  headless = numpy_filled(jax.eval_shape(ResNet(**kwargs).init, jax.random.key(1), x), 2,
                          scale=1.0)
  out = init_lib.initializer({**spec, "converter_kwargs": {"drop_fc": True}})(headless)
  _check_every_leaf(out, expected, headless, set())
  with pytest.raises(ValueError, match=r"unknown converter 'resnet50'; known: \['mae', "
                                       r"'patchgan', 'pix2pix', 'resnet', 'ssfd', 'swin_unetr', "
                                       r"'vgg16', 'vit'\]"):
    init_lib.load_pretrained({**spec, "converter": "resnet50"}, template=template)
  with pytest.raises(ValueError, match="needs a 'converter'"):
    init_lib.load_pretrained({"path": spec["path"]}, template=template)
  with pytest.raises(ValueError, match="needs template="):
    init_lib.load_pretrained(spec)
  with pytest.raises(ValueError, match=r"step=2 applies only to orbax runs"):
    init_lib.load_pretrained({**spec, "step": 2}, template=template)
  with pytest.raises(ValueError, match=r"missing from the checkpoint '.*r\.pth'"):  # no strip
    init_lib.load_pretrained({**spec, "strip": []}, template=template)

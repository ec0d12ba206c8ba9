"""Tests for jaxmed.interop.state_dict: reading checkpoints and the checked conversion."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from jaxmed.interop.state_dict import (Converted, conv_kernel, conv_transpose_kernel, convert,
                                       flax_conv_transpose_kernel, linear_kernel,
                                       load_state_dict, module_rule, strip_prefix)


class _Torch(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    self.bn = torch.nn.BatchNorm2d(4)
    self.fc = torch.nn.Linear(4, 5)

  def forward(self, x):
    return self.fc(self.bn(self.conv(x)).mean((2, 3)))


class _Flax(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), padding=1, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn")(x)
    return nn.Dense(5, name="fc")(x.mean((1, 2)))


_RULE = module_rule(".".join)


@pytest.fixture(scope="module")
def torch_model():
  torch.manual_seed(0)
  model = _Torch().eval()
  with torch.no_grad():
    model.bn.weight.normal_()
    model.bn.bias.normal_()
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2.0)
  return model


@pytest.fixture(scope="module")
def template():
  return jax.eval_shape(_Flax().init, jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))


def _check_same(torch_model, variables):
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  y = np.asarray(jax.jit(_Flax().apply)(variables, x))
  with torch.no_grad():
    y_ref = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(y, y_ref, atol=1e-5)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "safetensors"])
def test_load_convert_matches_torch(tmp_path, torch_model, template, wrap):
  sd = {f"module.{k}": v for k, v in torch_model.state_dict().items()}
  if wrap == "safetensors":
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
  else:
    path = tmp_path / "w.pth"
    torch.save(sd if wrap == "plain" else {"state_dict": sd, "epoch": 3}, path)
  loaded = strip_prefix(load_state_dict(path), ["module."])
  converted = convert(loaded, template, _RULE, ignore=["*num_batches_tracked"])
  assert isinstance(converted, Converted)
  assert converted.missing == ()
  assert converted.unused == ("bn.num_batches_tracked",)
  _check_same(torch_model, converted.variables)


def test_strict_errors_list_every_key(torch_model, template):
  sd = {k: v for k, v in torch_model.state_dict().items() if not k.startswith("fc.")}
  sd["extra.weight"] = torch.zeros(3)
  with pytest.raises(ValueError) as e:
    convert(sd, template, _RULE, ignore=["*num_batches_tracked"], name="my.pth")
  msg = str(e.value)
  assert "my.pth" in msg
  assert "params/fc/kernel (<- fc.weight)" in msg and "params/fc/bias" in msg
  assert "extra.weight" in msg and "num_batches_tracked" not in msg


def test_shape_mismatch_is_an_error_even_when_not_strict(torch_model, template):
  sd = dict(torch_model.state_dict())
  sd["fc.weight"] = torch.zeros(6, 4)
  with pytest.raises(ValueError, match=r"fc\.weight \(6, 4\) -> params/fc/kernel \(4, 6\), "
                     r"expected \(4, 5\)"):
    convert(sd, template, _RULE, strict=False)


def test_non_strict_keeps_real_template_values(torch_model):
  x = np.zeros((1, 8, 8, 3), np.float32)
  variables = _Flax().init(jax.random.key(1), x)
  sd = {k: v for k, v in torch_model.state_dict().items() if not k.startswith("fc.")}
  converted = convert(sd, variables, _RULE, strict=False)
  assert converted.missing == ("params/fc/bias (<- fc.bias)", "params/fc/kernel (<- fc.weight)")
  np.testing.assert_array_equal(converted.variables["params"]["fc"]["kernel"],
                                variables["params"]["fc"]["kernel"])
  np.testing.assert_allclose(converted.variables["params"]["conv"]["bias"],
                             torch_model.conv.bias.detach().numpy())
  # A shape-only template cannot fill the gap.
  abstract = jax.eval_shape(lambda: variables)
  with pytest.raises(ValueError, match="template has only their shapes"):
    convert(sd, abstract, _RULE, strict=False)


def test_kernel_transforms_match_torch_layers():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 5, 6, 3)).astype(np.float32)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
  lin = torch.nn.Linear(3, 4)
  np.testing.assert_allclose(x @ linear_kernel(lin.weight.detach().numpy())
                             + lin.bias.detach().numpy(),
                             lin(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
  conv = torch.nn.Conv2d(3, 4, (3, 2), bias=False)
  y = jax.lax.conv_general_dilated(x, conv_kernel(conv.weight.detach().numpy()), (1, 1),
                                   "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(y, conv(xt).detach().numpy().transpose(0, 2, 3, 1), atol=1e-5)
  up = torch.nn.ConvTranspose2d(3, 4, 2, stride=2, bias=False)
  k = conv_transpose_kernel(up.weight.detach().numpy())  # (2, 2, Cin, Cout)
  y = np.einsum("nijc,abcd->niajbd", x, k).reshape(1, 10, 12, 4)
  np.testing.assert_allclose(y, up(xt).detach().numpy().transpose(0, 2, 3, 1), atol=1e-5)
  tconv = torch.nn.ConvTranspose2d(3, 4, 4, stride=2, padding=1, bias=False)
  module = nn.ConvTranspose(4, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), use_bias=False)
  y = module.apply({"params": {"kernel": flax_conv_transpose_kernel(
      tconv.weight.detach().numpy())}}, x)
  np.testing.assert_allclose(y, tconv(xt).detach().numpy().transpose(0, 2, 3, 1), atol=1e-5)


def test_strip_prefix_repeats_and_detects_collisions():
  sd = {"module.encoder.a": 1, "encoder.b": 2, "c": 3}
  assert strip_prefix(sd, ("module.", "encoder.")) == {"a": 1, "b": 2, "c": 3}
  with pytest.raises(ValueError, match="two checkpoint keys map to 'a'"):
    strip_prefix({"module.a": 1, "a": 2}, ("module.",))


def test_load_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    load_state_dict(tmp_path / "nope.pth")
  bad = tmp_path / "corrupt.pth"
  bad.write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="corrupt.pth"):
    load_state_dict(bad)
  bad_st = tmp_path / "corrupt.safetensors"
  bad_st.write_bytes(b"\x00" * 16)
  with pytest.raises(ValueError, match="corrupt.safetensors"):
    load_state_dict(bad_st)
  mixed = tmp_path / "mixed.pth"
  torch.save({"weights": {"a": torch.zeros(1)}, "epoch": 1}, mixed)
  with pytest.raises(ValueError, match="pass key="):
    load_state_dict(mixed)
  assert set(load_state_dict(mixed, key="weights")) == {"a"}
  with pytest.raises(ValueError, match="no entry 'model'"):
    load_state_dict(mixed, key="model")
  listed = tmp_path / "list.pth"
  torch.save([torch.zeros(1)], listed)
  with pytest.raises(ValueError, match="holds a list, not a state dict"):
    load_state_dict(listed)


def test_wrong_rank_is_a_listed_mismatch(torch_model, template):
  sd = dict(torch_model.state_dict())
  sd["conv.weight"] = torch.zeros(4)  # a norm weight where a conv kernel belongs
  with pytest.raises(ValueError, match=r"conv\.weight \(4,\) -> params/conv/kernel: cannot be "
                     r"transposed"):
    convert(sd, template, _RULE, ignore=["*num_batches_tracked"])

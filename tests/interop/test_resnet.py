"""Parity of jaxmed's ResNet with MONAI's (= torchvision's layout) through resnet_from_torch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from jaxmed.interop.resnet import resnet_from_torch, resnet_torch_prefix
from jaxmed.interop.state_dict import load_state_dict, strip_prefix
from jaxmed.models.resnet import ResNet, resnet18

from monai.networks.nets.resnet import ResNet as MonaiResNet  # noqa: E402  (slow import)

TOL = 1e-4


def _randomise_norms(model: torch.nn.Module, seed: int) -> None:
  """Random affine parameters and running statistics for every BatchNorm of ``model``."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
        c = m.num_features
        m.weight.copy_(torch.rand(c, generator=gen) * 0.8 + 0.6)
        m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
        m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
        m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
      if isinstance(m, torch.nn.Linear) and m.bias is not None:
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
      if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) and m.bias is not None:
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


def _torch_run(model: MonaiResNet, x: np.ndarray):
  """MONAI output and the taps (stem after ReLU, layer1..4, pooled), channels-last."""
  feats = {}

  def keep(name):
    def hook(module, inputs, output):
      feats[name] = output.detach().clone()
    return hook

  handles = [model.act.register_forward_hook(keep("stem"))]
  handles += [getattr(model, f"layer{i}").register_forward_hook(keep(f"layer{i}"))
              for i in range(1, 5)]
  handles.append(model.avgpool.register_forward_hook(keep("pooled")))
  with torch.no_grad():
    out = model(torch.from_numpy(np.moveaxis(x, -1, 1).copy())).numpy()
  for h in handles:
    h.remove()
  feats = {k: np.moveaxis(v.numpy(), 1, -1) for k, v in feats.items()}
  feats["pooled"] = feats["pooled"].reshape(x.shape[0], -1)
  return out, feats


# (MONAI kwargs, jaxmed ResNet, input shape). Together they cover BasicBlock / Bottleneck,
# 2D / 3D, shortcut A / B with and without bias, stem kernel and stride, max-pool on / off,
# widen_factor, odd spatial sizes, with and without the fc head.
CASES = {
    # torchvision's resnet18 layout, full widths.
    "resnet18_2d_torchvision": (
        dict(block="basic", layers=[2, 2, 2, 2], block_inplanes=[64, 128, 256, 512],
             spatial_dims=2, n_input_channels=3, conv1_t_stride=2, shortcut_type="B",
             bias_downsample=False, num_classes=7),
        resnet18(num_classes=7),
        (2, 32, 32, 3)),
    # resnet50-style Bottleneck, one block per stage, MONAI's defaults, no head.
    "bottleneck_3d_monai": (
        dict(block="bottleneck", layers=[1, 1, 1, 1], block_inplanes=[64, 128, 256, 512],
             spatial_dims=3, n_input_channels=1, widen_factor=0.5, feed_forward=False),
        ResNet(block="bottleneck", layers=(1, 1, 1, 1), spatial_dims=3, widen_factor=0.5,
               conv1_t_stride=1, bias_downsample=True),
        (2, 16, 16, 16, 1)),
    # MONAI's resnet18 helper options (shortcut A) with a custom stem, no max-pool.
    "basic_2d_shortcut_a": (
        dict(block="basic", layers=[1, 2, 1, 1], block_inplanes=[8, 16, 32, 64], spatial_dims=2,
             n_input_channels=2, conv1_t_size=(3, 5), conv1_t_stride=1, no_max_pool=True,
             shortcut_type="A", num_classes=4),
        ResNet(layers=(1, 2, 1, 1), block_inplanes=(8, 16, 32, 64), conv1_t_size=(3, 5),
               conv1_t_stride=1, no_max_pool=True, shortcut_type="A", num_classes=4),
        (2, 12, 10, 2)),
}


@functools.lru_cache(maxsize=None)
def _case(name):
  """(torch model, its state dict, jaxmed model, template, input) for one case, built once."""
  kwargs, model, shape = CASES[name]
  torch.manual_seed(len(name))
  ref = MonaiResNet(**kwargs).eval()
  _randomise_norms(ref, seed=len(name))
  x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(x))
  return ref, ref.state_dict(), model, template, x


@pytest.mark.parametrize("name", list(CASES))
def test_matches_monai_output_and_taps(name):
  ref, state_dict, model, template, x = _case(name)
  converted = resnet_from_torch(state_dict, template)
  assert converted.missing == ()
  assert all(k.endswith("num_batches_tracked") for k in converted.unused)
  out, feats = jax.jit(functools.partial(model.apply, return_features=True))(
      converted.variables, x)
  ref_out, ref_feats = _torch_run(ref, x)
  assert out.shape == ref_out.shape
  diffs = {"output": float(np.max(np.abs(np.asarray(out) - ref_out)))}
  assert set(feats) == set(ref_feats) == {"stem", "layer1", "layer2", "layer3", "layer4",
                                         "pooled"}
  for k in feats:
    assert feats[k].shape == ref_feats[k].shape, k
    diffs[k] = float(np.max(np.abs(np.asarray(feats[k]) - ref_feats[k])))
  print(name, {k: f"{v:.1e}" for k, v in diffs.items()})
  assert max(diffs.values()) <= TOL, diffs
  # The comparison is not trivial: the values are O(1) and vary.
  assert np.std(ref_out) > 0.05 and np.std(ref_feats["layer4"]) > 0.05


def test_shortcut_keys():
  _, sd, _, template, _ = _case("bottleneck_3d_monai")
  assert "layer1.0.downsample.0.bias" in sd  # MONAI's bias_downsample=True
  assert template["params"]["layer1_0"]["downsample_conv"]["bias"].shape == (128,)
  _, sd, _, template, _ = _case("basic_2d_shortcut_a")
  assert not any("downsample" in k for k in sd)
  assert not any("downsample" in k for k in template["params"]["layer2_0"])


def test_file_round_trip_pth_and_safetensors(tmp_path):
  _, state_dict, _, template, _ = _case("basic_2d_shortcut_a")
  expected = resnet_from_torch(state_dict, template).variables
  torch.save({"state_dict": {f"module.{k}": v for k, v in state_dict.items()}, "epoch": 1},
             tmp_path / "r.pth")
  save_file(state_dict, str(tmp_path / "r.safetensors"))
  loaded = {
      "pth": strip_prefix(load_state_dict(tmp_path / "r.pth"), ["module."]),
      "safetensors": load_state_dict(tmp_path / "r.safetensors"),
  }
  for kind, sd in loaded.items():
    got = resnet_from_torch(sd, template).variables
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, expected)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected), kind


def test_drop_fc_for_headless_model():
  _, state_dict, _, _, x = _case("basic_2d_shortcut_a")
  headless = ResNet(layers=(1, 2, 1, 1), block_inplanes=(8, 16, 32, 64), conv1_t_size=(3, 5),
                    conv1_t_stride=1, no_max_pool=True, shortcut_type="A")
  template = jax.eval_shape(headless.init, jax.random.key(0), jnp.asarray(x))
  assert "fc" not in template["params"]
  with pytest.raises(ValueError, match=r"not used by the model: fc\.weight, fc\.bias"):
    resnet_from_torch(state_dict, template)
  converted = resnet_from_torch(state_dict, template, drop_fc=True)
  assert {"fc.weight", "fc.bias"} <= set(converted.unused)


def test_mismatch_errors_list_keys():
  _, state_dict, _, template, _ = _case("basic_2d_shortcut_a")
  # Wrong width: every offending key is named with both shapes.
  bad = dict(state_dict)
  bad["layer3.0.conv1.weight"] = torch.zeros(32, 16, 3, 3)[:31]
  with pytest.raises(ValueError, match=r"layer3\.0\.conv1\.weight \(31, 16, 3, 3\).*"
                                       r"expected \(3, 3, 16, 32\)"):
    resnet_from_torch(bad, template)
  # Missing key and an unknown key.
  bad = {k: v for k, v in state_dict.items() if k != "layer2.1.bn2.running_var"}
  bad["layer5.0.conv1.weight"] = torch.zeros(1)
  with pytest.raises(ValueError, match=r"batch_stats/layer2_1/bn2/var.*layer5\.0\.conv1\.weight"):
    resnet_from_torch(bad, template)
  # Not strict: unknown keys are reported; a missing variable needs a real template value.
  converted = resnet_from_torch(dict(state_dict, extra=torch.zeros(1)), template, strict=False)
  assert "extra" in converted.unused and converted.missing == ()
  partial = {k: v for k, v in state_dict.items() if k != "fc.bias"}
  with pytest.raises(ValueError, match=r"only their shapes.*params/fc/bias"):
    resnet_from_torch(partial, template, strict=False)
  kept = resnet_from_torch(partial, converted.variables, strict=False)
  assert kept.missing == ("params/fc/bias (<- fc.bias)",)
  np.testing.assert_array_equal(kept.variables["params"]["fc"]["bias"],
                                converted.variables["params"]["fc"]["bias"])
  # A 2D checkpoint for the 3D model of the same configuration.
  model_3d = CASES["basic_2d_shortcut_a"][1].clone(spatial_dims=3, conv1_t_size=(3, 5, 1))
  template_3d = jax.eval_shape(model_3d.init, jax.random.key(0), jnp.zeros((1, 12, 10, 4, 2)))
  with pytest.raises(ValueError,
                     match=r"conv1\.weight \(8, 2, 3, 5\).*expected \(3, 5, 1, 2, 8\)"):
    resnet_from_torch(state_dict, template_3d)
  # A shortcut-A checkpoint (no downsample weights) for a shortcut-B model.
  model_b = CASES["basic_2d_shortcut_a"][1].clone(shortcut_type="B")
  template_b = jax.eval_shape(model_b.init, jax.random.key(0), jnp.zeros((1, 12, 10, 2)))
  with pytest.raises(ValueError, match=r"params/layer2_0/downsample_conv/kernel "
                                       r"\(<- layer2\.0\.downsample\.0\.weight\)"):
    resnet_from_torch(state_dict, template_b)


def test_torch_prefix_mapping():
  assert resnet_torch_prefix(("conv1",)) == "conv1"
  assert resnet_torch_prefix(("bn1",)) == "bn1"
  assert resnet_torch_prefix(("fc",)) == "fc"
  assert resnet_torch_prefix(("layer4_2", "bn3")) == "layer4.2.bn3"
  assert resnet_torch_prefix(("layer1_0", "downsample_conv")) == "layer1.0.downsample.0"
  assert resnet_torch_prefix(("layer1_0", "downsample_norm")) == "layer1.0.downsample.1"
  assert resnet_torch_prefix(("layer5_0", "conv1")) is None
  assert resnet_torch_prefix(("head",)) is None
  assert resnet_torch_prefix(()) is None

"""VGG16 parity with a torchvision-ordered torch reference (vgg16_from_torch), and LPIPS lin."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from jaxmed.interop.lpips import LPIPS_CHANNELS, load_lpips_lin, lpips_lin_from_torch
from jaxmed.interop.state_dict import load_state_dict
from jaxmed.interop.vgg import vgg16_from_torch, vgg16_torch_prefixes
from jaxmed.models.vgg import CFG, LAYER_NAMES, LPIPS_TAPS, VGG16

TOL = 1e-4


class TorchVGG16(torch.nn.Module):
  """torchvision's VGG (cfg "D") rebuilt from torch.nn: same module order and key names."""

  def __init__(self, batch_norm: bool, num_classes: int = 1000, head_width: int = 4096):
    super().__init__()
    layers, cin = [], 3
    for v in CFG:
      if v == "M":
        layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
      else:
        layers.append(torch.nn.Conv2d(cin, v, kernel_size=3, padding=1))
        if batch_norm:
          layers.append(torch.nn.BatchNorm2d(v))
        layers.append(torch.nn.ReLU(inplace=False))
        cin = v
    self.features = torch.nn.Sequential(*layers)
    self.avgpool = torch.nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = torch.nn.Sequential(
        torch.nn.Linear(512 * 7 * 7, head_width), torch.nn.ReLU(False), torch.nn.Dropout(),
        torch.nn.Linear(head_width, head_width), torch.nn.ReLU(False), torch.nn.Dropout(),
        torch.nn.Linear(head_width, num_classes))

  def forward(self, x):
    """Logits and every tap (each ReLU and max-pool of ``features``, by jaxmed name)."""
    taps, names = {}, iter(LAYER_NAMES)
    for m in self.features:
      x = m(x)
      if isinstance(m, (torch.nn.ReLU, torch.nn.MaxPool2d)):
        taps[next(names)] = x
    logits = self.classifier(torch.flatten(self.avgpool(x), 1))
    return logits, taps


@functools.lru_cache(maxsize=None)
def _reference(batch_norm: bool):
  """A random torch VGG16 (O(1) activations, random BatchNorm statistics) and its state dict."""
  torch.manual_seed(int(batch_norm))
  model = TorchVGG16(batch_norm, num_classes=5, head_width=16).eval()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
        torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        m.bias.normal_(0.0, 0.1)
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.3, 0.6)  # keeps the activations O(1)
        m.bias.normal_(0.0, 0.2)
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 1.5)
  return model, model.state_dict()


def _torch_run(model, x):
  with torch.no_grad():
    logits, taps = model(torch.from_numpy(np.moveaxis(x, -1, 1).copy()))
  return logits.numpy(), {k: np.moveaxis(v.numpy(), 1, -1) for k, v in taps.items()}


def _max_diffs(feats, ref):
  return {k: float(np.max(np.abs(np.asarray(feats[k]) - ref[k]))) for k in feats}


# --------------------------------------------------------------------------------------------
# Parity.


def test_vgg16_matches_torch_all_taps_and_early_stop():
  ref, state_dict = _reference(False)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  model = VGG16()
  template = jax.eval_shape(model.init, jax.random.key(0), x)
  converted = vgg16_from_torch(state_dict, template, drop_classifier=True)
  assert set(converted.unused) == {f"classifier.{i}.{p}" for i in (0, 3, 6)
                                   for p in ("weight", "bias")}
  out, feats = jax.jit(functools.partial(model.apply, return_features=True))(
      converted.variables, x)
  _, ref_feats = _torch_run(ref, x)
  assert set(feats) == set(LAYER_NAMES)
  for k in LAYER_NAMES:
    assert feats[k].shape == ref_feats[k].shape, k
  diffs = _max_diffs(feats, ref_feats)
  np.testing.assert_array_equal(out, feats["pool5"])
  print("vgg16", {k: f"{diffs[k]:.1e}" for k in LPIPS_TAPS + ("pool5",)})
  assert max(diffs.values()) <= TOL, diffs
  assert min(np.std(ref_feats[k]) for k in LPIPS_TAPS) > 0.05  # a real comparison
  # Early stop: only the requested taps, the same values.
  taps = jax.jit(functools.partial(model.apply, taps=("relu3_3", "relu1_2")))(
      converted.variables, x)
  assert set(taps) == {"relu3_3", "relu1_2"}
  early = _max_diffs(taps, ref_feats)
  print("vgg16 early stop", early)
  assert max(early.values()) <= TOL


def test_vgg16_bn_with_classifier_matches_torch():
  ref, state_dict = _reference(True)
  # 32 x 64: pool5 is 1 x 2, so the 7x7 adaptive pool and the (C, H, W) flatten are exercised.
  x = np.random.default_rng(1).normal(size=(2, 32, 64, 3)).astype(np.float32)
  model = VGG16(batch_norm=True, include_top=True, num_classes=5, head_width=16)
  template = jax.eval_shape(model.init, jax.random.key(0), x)
  converted = vgg16_from_torch(state_dict, template)
  assert converted.missing == ()
  assert all(k.endswith("num_batches_tracked") for k in converted.unused)
  assert len(converted.unused) == 13
  logits, feats = jax.jit(functools.partial(model.apply, return_features=True))(
      converted.variables, x)
  ref_logits, ref_feats = _torch_run(ref, x)
  diffs = _max_diffs(feats, ref_feats)
  diffs["logits"] = float(np.max(np.abs(np.asarray(logits) - ref_logits)))
  print("vgg16_bn", {k: f"{diffs[k]:.1e}" for k in LPIPS_TAPS + ("pool5", "logits")})
  assert logits.shape == (2, 5)
  assert max(diffs.values()) <= TOL, diffs
  assert np.std(ref_logits) > 0.05 and min(np.std(ref_feats[k]) for k in LPIPS_TAPS) > 0.05


# --------------------------------------------------------------------------------------------
# Converter.


@pytest.mark.parametrize("batch_norm", [False, True])
def test_index_table_matches_torchvision_order(batch_norm):
  features = _reference(batch_norm)[0].features
  prefixes = vgg16_torch_prefixes(batch_norm)
  convs = [n for n in prefixes if n.startswith("conv")]
  assert len(convs) == 13
  widths = [v for v in CFG if v != "M"]
  for name, width in zip(convs, widths):
    m = features[int(prefixes[name].split(".")[1])]
    assert isinstance(m, torch.nn.Conv2d) and m.out_channels == width, name
    if batch_norm:
      bn = features[int(prefixes["bn" + name[4:]].split(".")[1])]
      assert isinstance(bn, torch.nn.BatchNorm2d) and bn.num_features == width
  assert prefixes["conv5_3"] == ("features.40" if batch_norm else "features.28")
  assert [prefixes[f"fc{i}"] for i in (1, 2, 3)] == [
      "classifier.0", "classifier.3", "classifier.6"]


def test_file_round_trip_and_errors(tmp_path):
  _, sd_plain = _reference(False)
  _, sd_bn = _reference(True)
  x = jnp.zeros((1, 32, 32, 3))
  template = jax.eval_shape(VGG16().init, jax.random.key(0), x)
  template_bn = jax.eval_shape(VGG16(batch_norm=True).init, jax.random.key(0), x)
  expected = vgg16_from_torch(sd_bn, template_bn, drop_classifier=True).variables
  torch.save(sd_bn, tmp_path / "vgg.pth")
  save_file(sd_bn, str(tmp_path / "vgg.safetensors"))
  for name in ("vgg.pth", "vgg.safetensors"):
    got = vgg16_from_torch(load_state_dict(tmp_path / name), template_bn,
                           drop_classifier=True).variables
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, expected)
  assert set(expected) == {"params", "batch_stats"}

  # The classifier must be dropped explicitly for a headless model.
  with pytest.raises(ValueError, match=r"not used by the model: classifier\.0\.weight"):
    vgg16_from_torch(sd_plain, template)
  # A vgg16_bn checkpoint for a plain VGG16 (and the reverse) names the offending keys.
  with pytest.raises(ValueError) as info:
    vgg16_from_torch(sd_bn, template, drop_classifier=True)
  assert "params/conv1_2/kernel (<- features.2.weight)" in str(info.value)  # a ReLU there
  # conv4_3 is features.21, a BatchNorm weight in vgg16_bn: a mismatch, not a crash.
  assert "features.21.weight (256,) -> params/conv4_3/kernel: cannot be transposed" in str(
      info.value)
  with pytest.raises(ValueError, match=r"bn1_1"):
    vgg16_from_torch(sd_plain, template_bn, drop_classifier=True)
  # A model with a head needs the classifier; a wrong head size is a shape mismatch.
  top = VGG16(include_top=True, num_classes=7, head_width=16)
  template_top = jax.eval_shape(top.init, jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"classifier\.6\.weight \(5, 16\).*expected \(16, 7\)"):
    vgg16_from_torch(sd_plain, template_top)
  no_head = {k: v for k, v in sd_plain.items() if not k.startswith("classifier")}
  with pytest.raises(ValueError, match=r"params/fc1/kernel"):
    vgg16_from_torch(no_head, template_top)


# --------------------------------------------------------------------------------------------
# LPIPS lin weights.


def _lin_state_dict(seed=0, channels=LPIPS_CHANNELS, index=1):
  rng = np.random.default_rng(seed)
  return {f"lin{k}.model.{index}.weight": torch.from_numpy(
      rng.uniform(0, 1, size=(1, c, 1, 1)).astype(np.float32)) for k, c in enumerate(channels)}


def _extra_lin(k):
  return {f"lin{k}.model.1.weight": torch.zeros(1, 8, 1, 1)}


def test_lpips_lin_load_pth_and_safetensors(tmp_path):
  sd = _lin_state_dict()
  torch.save(sd, tmp_path / "vgg.pth")
  save_numpy({k: v.numpy() for k, v in sd.items()}, str(tmp_path / "vgg.safetensors"))
  for name in ("vgg.pth", "vgg.safetensors"):
    lin = load_lpips_lin(tmp_path / name)
    assert list(lin) == list(LPIPS_TAPS)
    for k, tap in enumerate(LPIPS_TAPS):
      assert lin[tap].shape == (LPIPS_CHANNELS[k],) and lin[tap].dtype == np.float32
      np.testing.assert_array_equal(lin[tap], sd[f"lin{k}.model.{1}.weight"].numpy().ravel())
  # A NetLinLayer without dropout stores its conv at model.0.
  lin0 = lpips_lin_from_torch(_lin_state_dict(index=0))
  np.testing.assert_array_equal(lin0["relu5_3"], lin["relu5_3"])


def test_lpips_lin_whole_module_state_dict_needs_strict_false():
  sd = dict(_lin_state_dict(), **{"scaling_layer.shift": torch.zeros(1, 3, 1, 1),
                                  "net.slice1.0.weight": torch.zeros(64, 3, 3, 3)})
  with pytest.raises(ValueError, match=r"unexpected.*net\.slice1\.0\.weight"):
    lpips_lin_from_torch(sd)
  assert set(lpips_lin_from_torch(sd, strict=False)) == set(LPIPS_TAPS)


def test_lpips_lin_errors(tmp_path):
  bad = _lin_state_dict()
  bad["lin2.model.1.weight"] = torch.zeros(1, 128, 1, 1)
  del bad["lin4.model.1.weight"]
  bad["lin0.model.0.weight"] = torch.zeros(1, 64, 1, 1)
  with pytest.raises(ValueError) as info:
    lpips_lin_from_torch(bad)
  msg = str(info.value)
  assert "lin2.model.1.weight has shape (1, 128, 1, 1), expected (1, 256, 1, 1)" in msg
  assert "missing lin4.model.1.weight (relu5_3" in msg
  assert "lin0.model.0.weight and lin0.model.1.weight" in msg
  with pytest.raises(ValueError, match="unexpected.*lin5.model.1.weight"):
    lpips_lin_from_torch(dict(_lin_state_dict(), **_extra_lin(5)))
  with pytest.raises(ValueError, match="'alex'.*only the VGG-16"):
    lpips_lin_from_torch(_lin_state_dict(channels=(64, 192, 384, 256, 256)))
  with pytest.raises(ValueError, match="'squeeze'"):
    lpips_lin_from_torch(_lin_state_dict(channels=(64, 128, 256, 384, 384, 512, 512)))
  # File errors name the path.
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    load_lpips_lin(tmp_path / "nope.pth")
  torch.save({"lin0.model.1.weight": torch.zeros(1, 3, 1, 1)}, tmp_path / "small.pth")
  with pytest.raises(ValueError, match=r"small\.pth.*expected \(1, 64, 1, 1\)"):
    load_lpips_lin(tmp_path / "small.pth")

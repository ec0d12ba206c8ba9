"""Tests for jaxmed.interop.ssfd: meddlr-layout SSFD checkpoints -> SSFDUNet / SSFDEncoder.

Numerical parity of the converted models with PyTorch is in tests/models/test_ssfd_unet.py;
here: files, key layouts, encoder-only use, and errors. No XLA compiles (templates come from
``jax.eval_shape``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from jaxmed.interop.ssfd import load_ssfd_unet, ssfd_unet_from_torch
from jaxmed.models.ssfd_unet import SSFDEncoder, SSFDUNet


def _state_dict(chans=20, levels=2, in_ch=1, out_ch=None, d=2, seed=0):
  """Random weights under meddlr's SSFD_Encoder keys (+ the UNet decoder when ``out_ch``)."""
  rng = np.random.default_rng(seed)
  sd = {}
  k3 = (3,) * d

  def double_conv(prefix, cin, cout):
    sd[f"{prefix}.conv1.weight"] = rng.normal(size=(cout, cin, *k3))
    sd[f"{prefix}.conv1.bias"] = rng.normal(size=(cout,))
    sd[f"{prefix}.conv2.weight"] = rng.normal(size=(cout, cout, *k3))
    sd[f"{prefix}.conv2.bias"] = rng.normal(size=(cout,))
    sd[f"{prefix}.GN.weight"] = rng.normal(size=(cout,))
    sd[f"{prefix}.GN.bias"] = rng.normal(size=(cout,))

  double_conv("firstblock", in_ch, chans)
  for j in range(1, levels + 1):
    double_conv(f"encoder{j}.conv_block", chans * 2**(j - 1), chans * 2**j)
  if out_ch is not None:
    for k in range(levels, 0, -1):
      sd[f"decoder{k}.up.weight"] = rng.normal(size=(chans * 2**k, chans * 2**(k - 1)) + (2,) * d)
      sd[f"decoder{k}.up.bias"] = rng.normal(size=(chans * 2**(k - 1),))
      double_conv(f"decoder{k}.conv_block", chans * 2**k, chans * 2**(k - 1))
    sd["outconv.weight"] = rng.normal(size=(out_ch, chans) + (1,) * d)
    sd["outconv.bias"] = rng.normal(size=(out_ch,))
  return {key: value.astype(np.float32) for key, value in sd.items()}


def _template(model, shape):
  return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


UNET = SSFDUNet(out_channels=1, chans=20, num_pool_layers=2)
UNET_X = (1, 8, 8, 1)


def _check_unet_leaves(params, sd):
  enc = params["encoder"]
  np.testing.assert_array_equal(enc["block1"]["conv1"]["kernel"],
                                sd["firstblock.conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(enc["block1"]["norm"]["scale"], sd["firstblock.GN.weight"])
  np.testing.assert_array_equal(enc["block3"]["conv2"]["kernel"],
                                sd["encoder2.conv_block.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(enc["block3"]["norm"]["bias"], sd["encoder2.conv_block.GN.bias"])
  # Transposed conv (in, out, kh, kw) -> (kh, kw, in, out), no flip (UpConv's einsum layout).
  np.testing.assert_array_equal(params["decoder2"]["up"]["kernel"],
                                sd["decoder2.up.weight"].transpose(2, 3, 0, 1))
  np.testing.assert_array_equal(params["decoder1"]["conv_block"]["conv1"]["kernel"],
                                sd["decoder1.conv_block.conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["output_conv"]["kernel"],
                                sd["outconv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["output_conv"]["bias"], sd["outconv.bias"])


@pytest.mark.parametrize("fmt", ["pth_lightning", "pth_dataparallel", "safetensors"])
def test_round_trip_through_files(tmp_path, fmt):
  sd = _state_dict(out_ch=1)
  template = _template(UNET, UNET_X)
  if fmt == "safetensors":
    path = tmp_path / "ssfd.safetensors"
    save_file(sd, str(path))
  elif fmt == "pth_lightning":  # {"state_dict": {"model.<key>": tensor}, ...}
    path = tmp_path / "ssfd.ckpt"
    torch.save({"state_dict": {f"model.{k}": torch.from_numpy(v) for k, v in sd.items()},
                "epoch": 7}, path)
  else:
    path = tmp_path / "ssfd.pth"
    torch.save({f"module.{k}": torch.from_numpy(v) for k, v in sd.items()}, path)
  loaded = load_ssfd_unet(path, template)
  assert loaded.missing == () and loaded.unused == ()
  _check_unet_leaves(loaded.variables["params"], sd)
  in_memory = ssfd_unet_from_torch(sd, template).variables
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.variables, in_memory)
  assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(loaded.variables))


def test_published_layout_loads_into_the_default_encoder(tmp_path):
  sd = _state_dict(levels=4)  # meddlr SSFD_Encoder(1, 320): 20-40-80-160-320, encoder only
  assert len(sd) == 30
  path = tmp_path / "model.ckpt"
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
  loaded = load_ssfd_unet(path)  # template: SSFDEncoder() for one input channel
  assert loaded.missing == () and loaded.unused == ()
  params = loaded.variables["params"]
  assert set(params) == {f"block{k}" for k in range(1, 6)}
  assert params["block5"]["conv2"]["kernel"].shape == (3, 3, 320, 320)
  np.testing.assert_array_equal(params["block5"]["conv2"]["kernel"],
                                sd["encoder4.conv_block.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["block4"]["norm"]["scale"],
                                sd["encoder3.conv_block.GN.weight"])
  # meddlr's default layer only: truncate at block4; the deeper level is then unused.
  truncated = SSFDEncoder(last_tap="block4_relu2")
  with pytest.raises(ValueError, match=r"6 .*key\(s\) not used.*encoder4\.conv_block\.conv1"):
    load_ssfd_unet(path, model=truncated)
  loaded = load_ssfd_unet(path, model=truncated, encoder_only=True)
  assert set(loaded.variables["params"]) == {"block1", "block2", "block3", "block4"}
  assert sorted(loaded.unused) == sorted(k for k in sd if k.startswith("encoder4."))


def test_encoder_template_from_full_unet_checkpoint():
  sd = _state_dict(out_ch=1)
  template = _template(SSFDEncoder(chans=20, num_pool_layers=2), UNET_X)
  with pytest.raises(ValueError, match=r"not used by the model.*decoder2\.up\.weight"):
    ssfd_unet_from_torch(sd, template)
  converted = ssfd_unet_from_torch(sd, template, encoder_only=True)
  decoder_keys = {k for k in sd if k.startswith(("decoder", "outconv"))}
  assert len(decoder_keys) == 2 * 8 + 2
  assert set(converted.unused) == decoder_keys and converted.missing == ()
  full = ssfd_unet_from_torch(sd, _template(UNET, UNET_X)).variables
  jax.tree_util.tree_map(np.testing.assert_array_equal, converted.variables["params"],
                         full["params"]["encoder"])
  # The same through an explicit ignore list instead of encoder_only.
  ignored = ssfd_unet_from_torch(sd, template, ignore=["decoder*", "outconv.*"])
  assert set(ignored.unused) == decoder_keys


def test_unet_template_from_encoder_only_checkpoint():
  sd = _state_dict()  # no decoder: the published checkpoint's situation
  template = _template(UNET, UNET_X)
  with pytest.raises(ValueError, match=r"missing from the checkpoint.*params/decoder2/up/kernel "
                     r"\(<- decoder2\.up\.weight\)"):
    ssfd_unet_from_torch(sd, template)
  with pytest.raises(ValueError, match="has only their shapes"):
    ssfd_unet_from_torch(sd, template, strict=False)
  # Fine-tuning start: real variables for the decoder, the encoder from the checkpoint.
  real = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, s.dtype), template)
  converted = ssfd_unet_from_torch(sd, real, strict=False)
  assert converted.unused == ()
  assert {m.split("/")[1] for m in converted.missing} == {"decoder1", "decoder2", "output_conv"}
  params = converted.variables["params"]
  assert np.all(params["decoder1"]["up"]["kernel"] == 0.5)
  np.testing.assert_array_equal(params["encoder"]["block2"]["conv1"]["bias"],
                                sd["encoder1.conv_block.conv1.bias"])


def test_3d_checkpoint():
  sd = _state_dict(levels=1, out_ch=2, in_ch=2, d=3)
  model = SSFDUNet(out_channels=2, chans=20, num_pool_layers=1, spatial_dims=3)
  converted = ssfd_unet_from_torch(sd, _template(model, (1, 4, 4, 4, 2)))
  params = converted.variables["params"]
  np.testing.assert_array_equal(params["encoder"]["block2"]["conv1"]["kernel"],
                                sd["encoder1.conv_block.conv1.weight"].transpose(2, 3, 4, 1, 0))
  np.testing.assert_array_equal(params["decoder1"]["up"]["kernel"],
                                sd["decoder1.up.weight"].transpose(2, 3, 4, 0, 1))


def test_shape_mismatch_lists_keys():
  sd = _state_dict(out_ch=1)
  two_channels = _template(UNET, (1, 8, 8, 2))
  with pytest.raises(ValueError, match=r"1 shape mismatch.*firstblock\.conv1\.weight "
                     r"\(20, 1, 3, 3\).*expected \(3, 3, 2, 20\)"):
    ssfd_unet_from_torch(sd, two_channels)
  wider = _template(SSFDUNet(out_channels=1, chans=30, num_pool_layers=2), UNET_X)
  with pytest.raises(ValueError, match=r"35 shape mismatch.*encoder1\.conv_block\.GN\.weight"):
    ssfd_unet_from_torch(sd, wider)
  deeper = _template(SSFDUNet(out_channels=1, chans=20, num_pool_layers=3), UNET_X)
  with pytest.raises(ValueError, match=r"missing.*params/encoder/block4/conv1/kernel"):
    ssfd_unet_from_torch(sd, deeper)


def test_bad_arguments(tmp_path):
  sd = _state_dict(out_ch=1)
  unet_template = _template(UNET, UNET_X)
  with pytest.raises(ValueError, match="encoder_only=True needs an SSFDEncoder template"):
    ssfd_unet_from_torch(sd, unet_template, encoder_only=True)
  with pytest.raises(ValueError, match=r"not an SSFDUNet or SSFDEncoder.*\['head'\]"):
    ssfd_unet_from_torch(sd, {"params": {"head": {}}})
  with pytest.raises(ValueError, match="template must be Flax variables"):
    ssfd_unet_from_torch(sd, [unet_template])
  with pytest.raises(ValueError, match="state_dict must be a mapping"):
    ssfd_unet_from_torch(list(sd.items()), unet_template)
  path = tmp_path / "w.safetensors"
  save_file(sd, str(path))
  with pytest.raises(ValueError, match="either template or model"):
    load_ssfd_unet(path, unet_template, model=UNET)
  with pytest.raises(ValueError, match="model must be an SSFDEncoder or SSFDUNet"):
    load_ssfd_unet(path, model=torch.nn.Linear(2, 2))
  with pytest.raises(ValueError, match="in_channels must be >= 1"):
    load_ssfd_unet(path, model=UNET, in_channels=0)
  with pytest.raises(ValueError, match="strip must be a sequence"):
    load_ssfd_unet(path, unet_template, strip="module.")
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    load_ssfd_unet(tmp_path / "nope.pth", unet_template)
  broken = tmp_path / "broken.pth"
  broken.write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="broken.pth"):
    load_ssfd_unet(broken, unet_template)
  # model= builds the template itself (here the full UNet from the full checkpoint).
  assert load_ssfd_unet(path, model=UNET).unused == ()

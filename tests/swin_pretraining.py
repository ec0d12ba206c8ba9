"""Shared pieces of the Swin-UNETR pre-training tests (DAE, SimMIM): the tiny run, a network
that stands in for Swin-UNETR in a loss, twin trainer runs, and the segmentation model a
pre-trained run transfers into."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from helpers import numpy_filled

from jaxmed.config import load_config, set_model
from jaxmed.methods import get_method
from jaxmed.train import trainer

# Swin-UNETR feature 12, one block per stage, window 4, on 32^3 crops of 32^3 phantoms: 2
# training subjects x 4 modalities = 8 single-modality rows, batch 4, 2 steps; trainer runs on
# one device, as swin_ssl's (the trainer tests exercise sharding; partitioned for 4 simulated
# devices, a Swin-UNETR step compiles a third longer).
SWIN_TINY = {
    "mesh.num_devices": 1,
    "model.feature_size": 12, "model.depths": (1, 1, 1, 1), "model.num_heads": (1, 1, 1, 1),
    "model.window_size": 4, "data.shape": (32, 32, 32), "data.crop_size": (32, 32, 32),
    "data.num_subjects": 4, "data.num_val": 1, "data.num_test": 1, "batch_size": 4,
    "total_steps": 2, "log_every": 1, "checkpoint.every": 0, "optim.warmup_steps": 0,
    "tensorboard": False, "checkpoint.async_save": False,
}


class SwinStandIn(nn.Module):
  """Stands in for `jaxmed.models.SwinUNETR` in a pre-training method (same call), so that a
  loss is checked without compiling the network: the reconstruction is the input itself
  (``mode="identity"``) or a learnable array ``pred`` of the input's shape that ignores the
  input (``"param"``: its gradient is the loss's gradient w.r.t. the prediction). The
  ``hidden_states_4`` feature ``(N, D/32, H/32, W/32, 16 F)`` holds the first voxels of each
  example."""

  mode: str = "identity"
  feature_size: int = 12

  @nn.compact
  def __call__(self, x, *, train=False, return_features=False, channel_mask=None,
               token_mask=None):
    del train, channel_mask, token_mask
    out = x if self.mode == "identity" else self.param("pred", nn.initializers.zeros, x.shape)
    if not return_features:
      return out
    n, *spatial, _ = x.shape
    grid = tuple(s // 32 for s in spatial)
    width = 16 * self.feature_size
    h4 = x.reshape(n, -1)[:, :int(np.prod(grid)) * width].reshape(n, *grid, width)
    return out, {"hidden_states_4": h4}


def train_twice(config, tmp_path_factory, name: str):
  """Two trainer runs of ``config`` from its seed: ``[(initial variables, TrainResult,
  workdir), ...]``; the second compiles from the session's persistent cache."""
  runs = []
  for i in range(2):
    initial = {}
    workdir = str(tmp_path_factory.mktemp(f"{name}{i}"))
    result = trainer.train(config, workdir, progress=False,
                           init_variables=lambda v, store=initial: store.update(v) or v)
    runs.append((initial, result, workdir))
  return runs


def segmentation_from(result, part: str):
  """``(config, fresh variables)`` of the seg3d Swin-UNETR (4 modalities, 3 tumour regions,
  input kernels tiled) shaped like the pre-trained ``result``'s network, transferring
  ``part``; the fresh variables are seeded numbers (nothing compiled)."""
  config = load_config(f"seg3d:model=swin_unetr,input=tile,part={part},size=small")
  set_model(config, "swin_unetr", **{k: v for k, v in result.method.config.model.items()
                                     if k != "name"})
  method = get_method(config)
  fresh = numpy_filled(jax.eval_shape(method.init, jax.random.PRNGKey(0),
                                      {"image": jnp.zeros((1, 32, 32, 32, 4))}))
  return config, fresh

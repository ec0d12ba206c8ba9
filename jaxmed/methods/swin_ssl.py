"""Swin-UNETR self-supervised pre-training: rotation prediction, contrastive coding and masked
volume in-painting on the Swin-UNETR encoder (Tang et al. 2022, "Self-Supervised Pre-Training of
Swin Transformers for 3D Medical Image Analysis", Sec. 3.2; Project-MONAI/research-contributions
``SwinUNETR/Pretrain``: ``main.py``, ``models/ssl_head.py``, ``utils/ops.py``,
``losses/loss.py``). The "Swin-UNETR" baseline of disruptive_autoencoders Table 4, and its
"Rotation Prediction" and "Contrastive Coding" rows (one task alone, ``loss.<task>``).

    L = alpha1 L_rot + alpha2 L_contrast + alpha3 L_inpaint,   alpha = (1, 1, 1)

(``losses/loss.py`` ``Loss``). Per training step, for a batch ``image`` ``(N, D, H, W, C)``
(1-channel samples by default, ``data.per_modality``: each MR modality its own sample, as the
reference's single-channel CT, ``in_channels=1``):

1. Two views (``main.py``): each sample rotated twice, independently, by ``k * 90`` degrees
   with ``k`` uniform in {0, 1, 2, 3} (`jaxmed.pretext.rotation.random_rotation90`; the
   reference's ``rot_rand`` rotates ``(C, x, y, z)`` tensors in the (y, z) plane, from y towards
   z; jaxmed's NIfTI volumes are ``(z, y, x)``, so ``pretext.rotation_axes=(1, 0)``: ``np.rot90``
   over spatial axes (H, D)). Each rotated view is then corrupted by ``aug_rand``
   (`jaxmed.pretext.block_drop.random_block_drop`, ``pretext.drop``): boxes of [0, 1]-scaled
   noise until ``U(0, 0.3)`` of the voxels are dropped, box sides in ``[0.05 s, 0.25 s)``, then,
   when a partner drawn from the same view's batch is another sample, boxes pasted from that
   partner (see that module for the three small differences from the reference).
2. One forward pass of the ``2N`` corrupted views (the network has no batch statistics, so this
   equals the reference's two passes): the encoder ``swinViT`` (`SwinTransformer`, the module
   `jaxmed.models.SwinUNETR` holds under the same name) gives the last hidden state
   ``hidden_states_4`` ``(2N, D/32, H/32, W/32, 16 E)`` after its non-affine LayerNorm (MONAI's
   ``normalize=True``, the reference's default). ``SSLHead`` reads two of its tokens
   (``heads.token="reference"``): the first token (grid position (0, 0, 0)) feeds the rotation
   head Linear(16E, 4), the second (MONAI's flattened index 1, one step along the reference's
   last axis z, i.e. grid position (1, 0, 0) of jaxmed's ``(z, y, x)`` grid) the contrastive head
   Linear(16E, 512). Two tokens need ``D >= 64``; at 32^3 the bottleneck is one token and
   ``heads.token="mean"`` feeds both heads the mean of the bottleneck tokens (at 32^3: that
   single token). The in-painting head is ``SSLHead``'s "vae" decoder on the whole bottleneck
   (`InpaintDecoder`): 5 x (conv3 with bias, InstanceNorm (no affine), LeakyReLU 0.01, trilinear
   x2 up-sampling), widths 16E/2, /4, /8, /16, /16, then a 1x1 conv with bias to C channels.
   The reference hard-codes ``dim=768`` (16 x 48); here it is 16E for any ``embed_dim``.
3. Losses (``losses/loss.py``; each term a switch ``loss.rotation``, ``loss.contrastive``,
   ``loss.inpaint``: a task that is off has no head, no loss term and no metric):
   L_rot: softmax cross-entropy of the ``2N`` rotation logits against their ``k`` (mean);
   L_contrast: NT-Xent (`jaxmed.losses.contrastive.nt_xent_loss`, tau ``loss.temperature``
   0.5) between the two views' head outputs, view 1's ``b`` against view 2's ``b``, the other
   ``2N - 2`` as negatives (the reference: the per-GPU batch; here the global batch);
   L_inpaint: the L1 of the reconstructions against the rotated, un-corrupted views, the mean
   over every voxel of both views (``nn.L1Loss`` over the whole volume, dropped voxels or not).
   Weights ``loss.*_weight`` 1, 1, 1 (the reference's ``alpha1..3``).

Metrics: the unweighted terms ``rotation``, ``contrastive``, ``inpaint`` and
``rotation_accuracy`` (the share of correctly predicted rotations).

Variables: ``{"params": {"swinViT", "rotation_head", "contrastive_head", "decoder"}}`` (the
heads of the tasks that are on). ``params["swinViT"]`` loads into a `SwinUNETR` built with
`swin_unetr_fields` (fine-tuning transfers the encoder only: ``seg3d:model=swin_unetr,
part=encoder``, `jaxmed.methods.segmentation.transfer_layers`; heads and decoder are dropped).

Optimisation (``main.py`` defaults): AdamW lr 4e-4, betas (0.9, 0.999), weight decay 0.1 (here
on kernels only, `jaxmed.train.optim`; torch's AdamW decays every parameter), 500 warm-up steps
then a cosine to 0 (``WarmupCosineSchedule``), no clipping (``--grad_clip`` is off by default),
float32 (the reference trains with AMP). 100k steps of 4 crops of 96^3 (batch 2 x 2 samples).
The reference's MONAI (2022) merged patches in the legacy octant order; ``model.downsample``
is "merging" here to match the fine-tuning Swin-UNETR ("merging_legacy" reproduces it).

Config sections: ``model`` (the registry's ``swin_transformer``: `SwinTransformer` fields;
``embed_dim`` a multiple of 12, ``patch_size`` 2, 4 stages, 3D), ``loss`` (switches, weights,
``temperature``), ``heads`` (``token``, ``contrastive_dim``), ``pretext`` (``rotation_axes``,
``drop``, ``max_drop``, ``max_block``, ``tolerance``).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxmed.losses.contrastive import nt_xent_loss
from jaxmed.methods.base import Method
from jaxmed.methods.swav import _torch_bias_init, linear
from jaxmed.models.blocks import conv3x3, make_norm, torch_default_init
from jaxmed.models.registry import model_defaults
from jaxmed.pretext.block_drop import block_sides, random_block_drop
from jaxmed.pretext.rotation import NUM_ROTATIONS, random_rotation90

TASKS = ("rotation", "contrastive", "inpaint")
TOKENS = ("reference", "mean")
# Encoder fields that SwinUNETR names differently.
_SWIN_UNETR_NAMES = {"embed_dim": "feature_size", "drop_path_rate": "dropout_path_rate"}
# SwinTransformer fields SwinUNETR does not have (fixed there).
_NOT_IN_SWIN_UNETR = ("spatial_dims",)
# The bottleneck is S / 32: patch 2, then 4 patch mergings.
_REDUCTION = 32


def swin_unetr_fields(model_cfg) -> dict[str, Any]:
  """`jaxmed.models.SwinUNETR` fields whose ``swinViT`` has the variables of the encoder that
  ``model_cfg`` (a ``swin_transformer`` config section) builds: for ``set_model(config,
  "swin_unetr", **swin_unetr_fields(config.model))`` in a fine-tuning config."""
  fields = {k: v for k, v in dict(model_cfg).items() if k not in ("name",) + _NOT_IN_SWIN_UNETR}
  return {_SWIN_UNETR_NAMES.get(k, k): v for k, v in fields.items()}


class Conv(nn.Module):
  """A stride-1 'same' conv with bias (``torch.nn.Conv3d(k, padding=k // 2)``, torch's default
  initialisation): ``(N, *S, Cin)`` -> ``(N, *S, features)``."""

  features: int
  kernel_size: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = self.kernel_size**(x.ndim - 2) * x.shape[-1]
    kernel = self.param("kernel", torch_default_init,
                        (self.kernel_size,) * (x.ndim - 2) + (x.shape[-1], self.features))
    bias = self.param("bias", _torch_bias_init(fan_in), (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.kernel_size == 1:
      return jnp.einsum("...c,co->...o", x, kernel.reshape(kernel.shape[-2:])) + bias
    return conv3x3(x, kernel) + bias


def upsample2(x: jax.Array) -> jax.Array:
  """``nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)``, channels-last:
  ``(N, *S, C)`` -> ``(N, *2S, C)`` (half-pixel centres, edges clamped)."""
  shape = (x.shape[0],) + tuple(2 * s for s in x.shape[1:-1]) + (x.shape[-1],)
  return jax.image.resize(x, shape, "linear").astype(x.dtype)


class InpaintDecoder(nn.Module):
  """``SSLHead``'s "vae" reconstruction head: 5 x (conv3 + bias, InstanceNorm without affine
  (eps 1e-5), LeakyReLU 0.01, trilinear x2 up-sampling) with widths ``dim / 2, / 4, / 8, / 16,
  / 16``, then a 1x1 conv with bias to ``out_channels``.

  ``(N, *S/32, dim)`` (``dim`` divisible by 16) -> ``(N, *S, out_channels)`` float32.
  """

  out_channels: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    for i, width in enumerate((dim // 2, dim // 4, dim // 8, dim // 16, dim // 16)):
      x = Conv(width, 3, dtype=self.dtype, name=f"conv{i}")(x)
      x = make_norm("instance", affine=False, name=f"norm{i}")(x).astype(self.dtype)
      x = upsample2(nn.leaky_relu(x, 0.01))
    return Conv(self.out_channels, 1, dtype=self.dtype, name="out")(x).astype(jnp.float32)


def head_inputs(bottleneck: jax.Array, token: str) -> tuple[jax.Array, jax.Array]:
  """``(rotation head input, contrastive head input)``, each ``(N, F)`` float32, of the
  bottleneck ``(N, d, h, w, F)``: tokens (0, 0, 0) and (1, 0, 0) ("reference", ``d >= 2``) or
  the mean of every token, twice ("mean")."""
  if token not in TOKENS or bottleneck.ndim != 5:
    raise ValueError(f"head_inputs: token must be one of {TOKENS} and the bottleneck (N, d, h, "
                     f"w, F); got token={token!r}, shape {tuple(bottleneck.shape)}")
  if token == "mean":
    pooled = jnp.mean(bottleneck, axis=(1, 2, 3))
    return pooled, pooled
  if bottleneck.shape[1] < 2:
    raise ValueError(f"head_inputs: token='reference' needs d >= 2 (tokens (0, 0, 0) and "
                     f"(1, 0, 0)); got a bottleneck of shape {tuple(bottleneck.shape)}")
  return bottleneck[:, 0, 0, 0], bottleneck[:, 1, 0, 0]


class SwinSSLModel(nn.Module):
  """``SSLHead``: the encoder ``swinViT`` and the heads of ``tasks``.

  ``__call__(x (N, D, H, W, C), *, train=False)`` -> dict with ``"rotation"`` ``(N, 4)``,
  ``"contrastive"`` ``(N, contrastive_dim)`` and ``"inpaint"`` ``(N, D, H, W,
  out_channels)``, those of ``tasks``, all float32.
  """

  swinViT: nn.Module  # pylint: disable=invalid-name  (SwinUNETR's name for its encoder)
  tasks: tuple[str, ...] = TASKS
  token: str = "reference"
  contrastive_dim: int = 512
  out_channels: int = 1

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    bottleneck = self.swinViT(x, train=train)[-1]  # hidden_states_4, layer-normalised
    rot_in, con_in = head_inputs(bottleneck, self.token)
    out = {}
    if "rotation" in self.tasks:
      out["rotation"] = linear(NUM_ROTATIONS, rot_in, name="rotation_head")
    if "contrastive" in self.tasks:
      out["contrastive"] = linear(self.contrastive_dim, con_in, name="contrastive_head")
    if "inpaint" in self.tasks:
      out["inpaint"] = InpaintDecoder(self.out_channels, dtype=self.swinViT.dtype,
                                      name="decoder")(bottleneck)
    return out


def _finite(value, name: str, *, positive: bool = False) -> float:
  try:
    value = float(value)
  except (TypeError, ValueError):
    value = math.nan
  if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
    raise ValueError(f"swin_ssl: {name} must be a finite number {'> 0' if positive else '>= 0'}"
                     f"; got {value!r}")
  return value


class SwinSSLMethod(Method):
  """The Swin-UNETR self-supervised recipe (see the module docstring)."""

  name = "swin_ssl"

  def __init__(self, config):
    cfg = config.loss
    bad = {t: cfg[t] for t in TASKS if not isinstance(cfg[t], bool)}
    if bad:
      raise ValueError(f"swin_ssl: loss.{'/'.join(bad)} must be True or False; got {bad}")
    self.tasks = tuple(t for t in TASKS if cfg[t])
    if not self.tasks:
      raise ValueError(f"swin_ssl: every task is off; switch on at least one of "
                       f"loss.{{{', '.join(TASKS)}}}")
    self.weights = {t: _finite(cfg[f"{t}_weight"], f"loss.{t}_weight") for t in TASKS}
    self.temperature = _finite(cfg.temperature, "loss.temperature", positive=True)
    if config.heads.token not in TOKENS:
      raise ValueError(f"swin_ssl: heads.token must be one of {TOKENS}; got "
                       f"{config.heads.token!r}")
    dim = config.heads.contrastive_dim
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
      raise ValueError(f"swin_ssl: heads.contrastive_dim must be an int >= 1; got {dim!r}")
    self._check_model(config.model)
    self._check_pretext(config.pretext)
    self._check_data(config)
    super().__init__(config)

  @staticmethod
  def _check_model(model) -> None:
    if model.name != "swin_transformer":
      raise ValueError(f"swin_ssl: model.name must be 'swin_transformer' (the Swin-UNETR "
                       f"encoder); got {model.name!r}")
    patch = model.patch_size
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch,)
    problems = []
    if model.spatial_dims != 3:
      problems.append(f"spatial_dims=3 (got {model.spatial_dims})")
    if set(patch) != {2}:
      problems.append(f"patch_size=2 (got {model.patch_size})")
    if len(model.depths) != 4:
      problems.append(f"4 stages in depths (got {tuple(model.depths)})")
    if model.embed_dim < 12 or model.embed_dim % 12:
      problems.append(f"embed_dim a positive multiple of 12 (got {model.embed_dim})")
    if problems:
      raise ValueError("swin_ssl: the encoder must fit a SwinUNETR (its swinViT), so model needs "
                       + "; ".join(problems))

  @staticmethod
  def _check_pretext(cfg) -> None:
    try:
      axes = tuple(operator.index(a) for a in cfg.rotation_axes)
    except TypeError:
      axes = ()
    if len(axes) != 2 or axes[0] == axes[1] or not set(axes) <= {0, 1, 2}:
      raise ValueError(f"swin_ssl: pretext.rotation_axes must be two distinct spatial axes of "
                       f"(D, H, W), in 0..2; got {cfg.rotation_axes!r}")
    if not isinstance(cfg.drop, bool):
      raise ValueError(f"swin_ssl: pretext.drop must be True or False; got {cfg.drop!r}")

  def _check_data(self, config) -> None:
    data = config.data
    if data.view not in ("crop", "volume"):
      raise ValueError(f"swin_ssl: trains on 3D crops or volumes, data.view 'crop' or 'volume'; "
                       f"got {data.view!r}")
    spatial = tuple(data.crop_size if data.view == "crop" else data.shape)
    self.check_spatial(spatial, "data.crop_size" if data.view == "crop" else "data.shape",
                       config)
    if not len(data.modalities):
      raise ValueError("swin_ssl: data.modalities must name at least one modality")

  def check_spatial(self, spatial: tuple[int, ...], name: str, config=None) -> None:
    """Raises unless volumes of ``spatial`` size fit the recipe: 3D, divisible by 32, square in
    the rotation plane, two bottleneck tokens along D for ``heads.token="reference"``, block
    sides drawable (`jaxmed.pretext.block_drop.block_sides`)."""
    config = config or self.config
    if len(spatial) != 3 or any(int(s) % _REDUCTION for s in spatial):
      raise ValueError(f"swin_ssl: {name} must be 3 sizes divisible by {_REDUCTION} (patch 2, 4 "
                       f"mergings, and the decoder's 5 x2 up-samplings); got {spatial}")
    a0, a1 = config.pretext.rotation_axes
    if spatial[a0] != spatial[a1]:
      raise ValueError(f"swin_ssl: {name}={spatial} must be square in the rotation plane "
                       f"pretext.rotation_axes={tuple(config.pretext.rotation_axes)}")
    if config.heads.token == "reference" and spatial[0] // _REDUCTION < 2:
      raise ValueError(f"swin_ssl: heads.token='reference' reads bottleneck tokens (0, 0, 0) and "
                       f"(1, 0, 0), which needs D >= {2 * _REDUCTION}; {name}={spatial} gives a "
                       f"bottleneck of {tuple(s // _REDUCTION for s in spatial)} tokens: use "
                       f"heads.token='mean'")
    if config.pretext.drop:
      try:
        block_sides(spatial, max_block=config.pretext.max_block,
                    tolerance=config.pretext.tolerance)
      except ValueError as e:
        raise ValueError(f"swin_ssl: pretext (max_block, tolerance) for {name}={spatial}: {e}"
                         ) from None
      _finite(config.pretext.max_drop, "pretext.max_drop")
      if config.pretext.max_drop > 1:
        raise ValueError(f"swin_ssl: pretext.max_drop must be in [0, 1]; got "
                         f"{config.pretext.max_drop}")

  @classmethod
  def default_config(cls):
    return {
        # SSLHead: feature size 48, depths (2, 2, 2, 2), heads (3, 6, 12, 24), window 7, patch 2.
        "model": {"name": "swin_transformer", **model_defaults("swin_transformer"),
                  "embed_dim": 48},
        # losses/loss.py: alpha1 = alpha2 = alpha3 = 1; Contrast(temperature=0.5).
        "loss": dict(rotation=True, contrastive=True, inpaint=True, rotation_weight=1.0,
                     contrastive_weight=1.0, inpaint_weight=1.0, temperature=0.5),
        # SSLHead: rotation Linear(768, 4) on token 0, contrastive Linear(768, 512) on token 1.
        "heads": dict(token="reference", contrastive_dim=512),
        # ops.py: rot90 dims (2, 3) of (C, x, y, z); patch_rand_drop(max_drop=0.3,
        # max_block_sz=0.25, tolr=0.05).
        "pretext": dict(rotation_axes=(1, 0), drop=True, max_drop=0.3, max_block=0.25,
                        tolerance=0.05),
        # main.py: AdamW lr 4e-4, decay 0.1, WarmupCosineSchedule(500 warm-up steps), no clip.
        "optim": dict(name="adamw", lr=4e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1,
                      schedule="cosine", end_lr=0.0, warmup_steps=500, grad_clip=0.0),
        # data_utils.py: 96^3 random crops (RandSpatialCropSamplesd), one channel.
        "data": dict(view="crop", crop_size=(96, 96, 96), fg_fraction=0.0, per_modality=True),
    }

  # --- Networks -------------------------------------------------------------------------

  @property
  def channels(self) -> int:
    """Image channels: 1 with ``data.per_modality``, else one per modality."""
    return 1 if self.config.data.per_modality else len(self.config.data.modalities)

  def build_model(self):
    """`SwinSSLModel` around the ``model`` section's `SwinTransformer`."""
    heads = self.config.heads
    return SwinSSLModel(swinViT=super().build_model(), tasks=self.tasks, token=heads.token,
                        contrastive_dim=int(heads.contrastive_dim), out_channels=self.channels)

  def init(self, key, batch):
    """Variables of the encoder and the heads of the tasks that are on, for ``batch["image"]``'s
    shape."""
    x = jnp.zeros(self._check_image(batch["image"]).shape, jnp.float32)
    params_key, dropout_key = jax.random.split(key)
    return self.model.init({"params": params_key, "dropout": dropout_key}, x, train=False)

  def _check_image(self, image):
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) != 5 or shape[-1] != self.channels:
      raise ValueError(f"swin_ssl: the image must be (N, D, H, W, C) with C={self.channels} "
                       f"(1 with data.per_modality, else one per data.modalities); got shape "
                       f"{shape}")
    self.check_spatial(shape[1:-1], "the image's spatial shape")
    return image

  # --- Views ----------------------------------------------------------------------------

  def views(self, key, image) -> dict[str, jax.Array]:
    """The two views of ``image`` ``(N, D, H, W, C)``, stacked as ``2N`` rows (view 1 first):
    ``{"input": corrupted (2N, D, H, W, C), "target": rotated (2N, ...), "rotation": k (2N,)
    int32, "dropped": (2N, D, H, W) bool}`` (the boxes written; all False without
    ``pretext.drop``)."""
    image = jnp.asarray(self._check_image(image), jnp.float32)
    cfg = self.config.pretext
    rot_key, drop_key = jax.random.split(key)
    target, k = random_rotation90(rot_key, jnp.concatenate([image, image]),
                                  axes=tuple(cfg.rotation_axes))
    if not cfg.drop:
      return {"input": target, "target": target, "rotation": k,
              "dropped": jnp.zeros(target.shape[:-1], bool)}
    n = image.shape[0]
    per_view = target.reshape((2, n) + target.shape[1:])  # partners come from the same view
    drop = lambda kk, x: random_block_drop(kk, x, max_drop=float(cfg.max_drop),
                                           max_block=float(cfg.max_block),
                                           tolerance=float(cfg.tolerance))
    corrupted, dropped = jax.vmap(drop)(jax.random.split(drop_key), per_view)
    return {"input": corrupted.reshape(target.shape), "target": target, "rotation": k,
            "dropped": dropped.reshape(target.shape[:-1])}

  # --- Objective ------------------------------------------------------------------------

  def task_losses(self, out, views) -> dict[str, jax.Array]:
    """Unweighted ``rotation``, ``contrastive``, ``inpaint`` losses (the tasks that are on) and
    ``rotation_accuracy``, float32, of the model outputs ``out`` on `views`."""
    metrics = {}
    if "rotation" in out:
      logits = out["rotation"].astype(jnp.float32)
      metrics["rotation"] = jnp.mean(
          optax.softmax_cross_entropy_with_integer_labels(logits, views["rotation"]))
      metrics["rotation_accuracy"] = jnp.mean(
          (jnp.argmax(logits, -1) == views["rotation"]).astype(jnp.float32))
    if "contrastive" in out:
      z1, z2 = jnp.split(out["contrastive"], 2)
      metrics["contrastive"] = nt_xent_loss(z1, z2, temperature=self.temperature)
    if "inpaint" in out:
      metrics["inpaint"] = jnp.mean(jnp.abs(out["inpaint"] - views["target"]))
    return metrics

  def loss(self, variables, batch, key, *, train, step=0):
    """``alpha1 L_rot + alpha2 L_contrast + alpha3 L_inpaint`` on ``batch["image"]``'s two
    views drawn from ``key``."""
    del step
    view_key, dropout_key = jax.random.split(key)
    views = self.views(view_key, batch["image"])
    out, model_state = self.apply(variables, views["input"], dropout_key, train=train)
    metrics = self.task_losses(out, views)
    loss = sum(self.weights[t] * metrics[t] for t in self.tasks)
    return jnp.asarray(loss, jnp.float32), metrics, model_state

  # --- Evaluation hooks -----------------------------------------------------------------

  def pretext_example(self, key, batch):
    """``(corrupted view 1, its target)``: the rotated, block-dropped input and the rotated
    volume the in-painting head reconstructs."""
    views = self.views(key, batch["image"])
    n = batch["image"].shape[0]
    return views["input"][:n], views["target"][:n]

  def reconstruct(self, variables, batch, key):
    """``(corrupted view 1, its in-painting)`` in eval mode (needs ``loss.inpaint``)."""
    if "inpaint" not in self.tasks:
      raise TypeError("swin_ssl: reconstruct needs the in-painting task (loss.inpaint=True)")
    inputs, _ = self.pretext_example(key, batch)
    out, _ = self.apply(variables, inputs, None, train=False)
    return inputs, out["inpaint"]

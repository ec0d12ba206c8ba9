"""ViT-AE++: a 3D (or 2D) masked autoencoder ViT with perceptual, edge and contrastive losses
(vit_ae_plus_plus, Sec. 3, Eqs. 1-4; Sec. 4-5; chinmay5/vit_ae_plus_plus).

    L = L_rec + lambda1 L_per + lambda2(step) L_edge + w_cl L_CL                   (Eq. 4)

Per training step, for a batch ``image`` ``(N, D, H, W, C)`` (3D: crops of the 4 modalities
FLAIR, T1, T2, T1c as channels) or ``(N, H, W, C)`` (the 2D variant, ``model.spatial_dims=2``:
axial slices):

1. Views. View 2 is the original, z-scored per example with ONE mean and variance over all
   voxels and channels (the reference code's ``use_z_score``). View 1 is augmented first
   (``pretext``): a random rotation (each angle U(-10, 10) degrees) and isotropic scaling
   U(0.9, 1.1) about the centre (`jaxmed.data.transforms.random_affine`; torchio's
   ``RandomAffine()`` defaults, which scale each axis independently), a gamma ``e^U(-0.3,
   0.3)`` (`random_gamma`, per-channel min-max scaled, torchio's ``RandomGamma(log_gamma=0.3)``
   powers raw intensities), then z-scored the same way, then Gaussian noise with std
   U(``noise_std``) in z-score units (the reference adds std <= 0.1 on the 0-255 scale,
   ~0.002 z units, before z-scoring: negligible; here the sigma is explicit). Only view 1 is
   reconstructed; both are contrasted. ``pretext.augment=False`` (and every evaluation,
   ``train=False``) makes view 1 the z-scored original.
2. Masking: two independent per-example random masks (`jaxmed.pretext.masking.random_masking`,
   argsort of uniform noise, ``int(T (1 - mask_ratio))`` tokens kept); one shared encoder
   (`jaxmed.models.MaskedAutoencoderViT`'s ``encoder``) runs on the visible tokens only.
3. L_rec: MAE's loss on view 1: the MSE per patch (``patchify``, ``norm_pix_loss`` off)
   averaged over the masked patches only (`reconstruction_loss`).
4. L_per (Eq. 1): `jaxmed.losses.volume_perceptual_loss` between the unpatchified prediction of
   every patch (visible ones included, as the reference's Sobel / VGG inputs) and view 1, on 2D
   slices along the first spatial axis (``loss.num_slices`` drawn per step, 0: all; the 2D
   variant's slices are the images themselves), each modality repeated to 3 channels through a
   frozen VGG-16's relu1_2, relu2_2, relu3_3, relu4_3 (the reference's taps; the paper's
   "Johnson" layers), no ImageNet normalisation. The VGG is a frozen parameter group
   ``loss_net`` (`jaxmed.methods.loss_network.FrozenLossNetwork`, shared with
   coper_synthesis): seeded random weights by default (no
   weights download here; the paper's 2D natural-image runs also use a random VGG), or a
   VGG-16 weights file / jaxmed run read by the trainer (`frozen_networks`). The gradient flows
   to the autoencoder (the paper's Eq. 4); ``loss.per_gradient=False`` is the reference code's
   ``torch.no_grad`` term: computed and logged, not added to the loss. ``lambda1`` = 0.01.
5. L_edge (Eq. 2): `jaxmed.losses.edge.edge_loss` between the same full prediction and view 1
   (3D Sobel magnitude per modality, MSE; the reference sums the modalities' magnitudes into
   one map first); the target blur (the reference code's, effective sigma ~1.67 voxels) is
   ``loss.edge_blur_sigma`` (`jaxmed.data.transforms.gaussian_smooth` on view 1 before the
   loss), 0 by default (the paper has none).
   ``lambda2`` = 0.01 (Sec. 5 and the code; Sec. 3's "10" would swamp the other terms) decaying
   linearly to 0 at ``total_steps`` (the code: ``0.01 (1 - epoch / epochs)``, here per step),
   or constant (``loss.lambda2_schedule="constant"``, Fig. 2 right); logged as ``lambda2``.
6. L_CL (Eq. 3): SimSiam between the two masked views, ``D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2``
   (`jaxmed.losses.simsiam_loss`, stop-gradient on the targets) with the predictor
   Linear(D, D, no bias)-BN-ReLU-Linear(D, D) (the reference's; no projector;
   `jaxmed.methods.simsiam.Predictor`, batch statistics per view). ``loss.cl_mode``:
   "pooled" (default; the paper's "feature representations" f1, f2): ``z`` the mean of the
   visible patch tokens after the final norm, weight ``cl_weight`` 1 (Eq. 4); "token" (the
   reference code): token k of view 1 against token k of view 2 (different patches, the masks
   being independent), the whole latent after the final norm with the cls token, weight 0.001
   (the reference's; set by the config's ``cl=token``).

Each term is a switch (``loss.rec``, ``loss.per``, ``loss.edge``, ``loss.cl``): a term that is
off is not computed, contributes nothing and has no metric. Table 3's rows: "ViT + L_CL" (only
``cl``: the decoder exists but is never run, so it gets no gradient), ViT-AE (``rec``), ... ,
ViT-AE++ (all four). Metrics: ``rec``, ``per``, ``edge`` and ``lambda2``, ``cl`` (unweighted)
and ``cl_z_std`` (SimSiam's collapse monitor: the std of the l2-normalised ``z1`` per channel,
``1 / sqrt(D)`` without collapse, 0 when collapsed).

Variables: ``{"params": {"encoder", "decoder", "predictor" (with L_CL), "loss_net" (with
L_per)}, "batch_stats": {"predictor", ["loss_net"]}}``; ``params["encoder"]`` loads into a
`jaxmed.models.MAEEncoder` / ``ViT`` with the same fields (``model.make_encoder()``).

Evaluation: `features` gives frozen-encoder features of clean, unmasked (z-scored) volumes for
the linear SVM / linear probe: the mean of the patch tokens after the final norm by default
(``features.pool="mean"``), the cls token (``"cls"``: the paper's choice), or the reference
code's mean of the last block's patch tokens before the final norm through a fresh (non-affine)
LayerNorm (``"mean_prenorm"``). `pretext_example` / `reconstruct` give the masked input and the
full reconstruction (Fig. 3, Table 5).

Optimisation (config): AdamW, weight decay 0.05 on kernels only (none on biases and 1-D norm
parameters; `jaxmed.train.optim`), betas (0.9, 0.95), lr 1e-3 x batch / 256 with a linear
warm-up then a cosine to 0, no clipping, float32.

Config sections: ``model`` (the registry's ``mae``: `MaskedAutoencoderViT` fields, incl.
``mask_ratio`` and ``spatial_dims``), ``loss``, ``pretext``, ``predictor`` (``hidden_dim``, 0:
the encoder width), ``features`` (``pool``), ``loss_net`` (`jaxmed.methods.loss_network`: ``source``
"random" | "pretrained" | "none", ``model``, ``taps``, ``preprocess``, ``seed``, and the
loading fields ``path``, ``step``, ``prefix``, ``converter``, ``converter_kwargs``, ``key``,
``strip``), ``param_groups.loss_net`` (frozen, exactly when there is a loss network).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxmed.data.transforms import gaussian_noise, gaussian_smooth, random_affine, random_gamma
from jaxmed.losses import l2_loss, simsiam_loss, volume_perceptual_loss
from jaxmed.losses.edge import edge_loss
from jaxmed.methods.base import Method
from jaxmed.methods.loss_network import (FrozenLossNetwork, loss_net_section,
                                         network_variables, with_network_state)
from jaxmed.methods.simsiam import Predictor
from jaxmed.models.blocks import patchify, unpatchify
from jaxmed.models.registry import model_defaults
from jaxmed.pretext.masking import random_masking

TERMS = ("rec", "per", "edge", "cl")
LAMBDA2_SCHEDULES = ("linear", "constant")
CL_MODES = ("pooled", "token")
POOLS = ("mean", "cls", "mean_prenorm")
# The reference code's perceptual taps (model/model_utils/perceptual_loss.py).
VGG_TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
# The reference code's weight of the token-wise contrastive term (Eq. 4 prints 1).
REFERENCE_CL_WEIGHT = 0.001
# Sec. 4: the 4 MR modalities as channels.
MODALITIES = ("flair", "t1", "t2", "t1ce")
ZSCORE_EPS = 1e-6


def zscore(x: jax.Array) -> jax.Array:
  """Per-example z-score with one mean and standard deviation over all voxels and channels
  (the reference code's ``use_z_score``): ``(N, ...)`` -> float32, same shape."""
  x = jnp.asarray(x, jnp.float32)
  axes = tuple(range(1, x.ndim))
  mean = jnp.mean(x, axis=axes, keepdims=True)
  std = jnp.std(x, axis=axes, keepdims=True)
  return (x - mean) / jnp.maximum(std, ZSCORE_EPS)


def reconstruction_loss(pred: jax.Array, target: jax.Array, mask: jax.Array,
                        patch_size) -> jax.Array:
  """MAE's L_rec: the MSE per patch of ``pred`` ``(N, T, prod(p) * C)`` against
  ``patchify(target, patch_size)``, averaged over the masked patches (``mask`` ``(N, T)``, 1 =
  masked) only; ``norm_pix_loss`` off. float32 scalar."""
  return l2_loss(pred, patchify(target, patch_size), mask[..., None])


class ViTAEPlusPlusMethod(FrozenLossNetwork, Method):
  """ViT-AE++ (see the module docstring for the objective and the config)."""

  name = "vit_ae_pp"

  def __init__(self, config):
    cfg = config.loss
    if config.model.name != "mae":
      raise ValueError(f"vit_ae_pp: model.name must be 'mae' (MaskedAutoencoderViT); got "
                       f"{config.model.name!r}")
    self.spatial_dims = int(config.model.spatial_dims)
    if self.spatial_dims not in (2, 3):
      raise ValueError(f"vit_ae_pp: model.spatial_dims must be 2 or 3; got {self.spatial_dims}")
    self.terms = {t: cfg[t] for t in TERMS}
    bad = {t: v for t, v in self.terms.items() if not isinstance(v, bool)}
    if bad:
      raise ValueError(f"vit_ae_pp: loss.{'/'.join(bad)} must be True or False; got {bad}")
    if not any(self.terms.values()):
      raise ValueError(f"vit_ae_pp: every loss term is off; switch on at least one of "
                       f"loss.{{{', '.join(TERMS)}}}")
    self.mask_ratio = float(config.model.mask_ratio)
    if not 0.0 <= self.mask_ratio < 1.0:
      raise ValueError(f"vit_ae_pp: model.mask_ratio must be in [0, 1); got {self.mask_ratio}")
    self.lambda1, self.lambda2 = float(cfg.lambda1), float(cfg.lambda2)
    self.cl_weight = float(cfg.cl_weight)
    for name, value in (("lambda1", self.lambda1), ("lambda2", self.lambda2),
                        ("cl_weight", self.cl_weight), ("edge_blur_sigma", cfg.edge_blur_sigma)):
      if not (math.isfinite(float(value)) and float(value) >= 0):
        raise ValueError(f"vit_ae_pp: loss.{name} must be a finite number >= 0; got {value!r}")
    if cfg.lambda2_schedule not in LAMBDA2_SCHEDULES:
      raise ValueError(f"vit_ae_pp: loss.lambda2_schedule must be one of {LAMBDA2_SCHEDULES}; "
                       f"got {cfg.lambda2_schedule!r}")
    if cfg.cl_mode not in CL_MODES:
      raise ValueError(f"vit_ae_pp: loss.cl_mode must be one of {CL_MODES}; got "
                       f"{cfg.cl_mode!r}")
    self.num_slices = cfg.num_slices
    if isinstance(self.num_slices, bool) or not isinstance(self.num_slices, int) or (
        self.num_slices < 0):
      raise ValueError(f"vit_ae_pp: loss.num_slices must be an int >= 0 (0: every slice); got "
                       f"{self.num_slices!r}")
    if config.features.pool not in POOLS:
      raise ValueError(f"vit_ae_pp: features.pool must be one of {POOLS}; got "
                       f"{config.features.pool!r}")
    if int(config.predictor.hidden_dim) < 0:
      raise ValueError(f"vit_ae_pp: predictor.hidden_dim must be >= 0 (0: the encoder width); "
                       f"got {config.predictor.hidden_dim}")
    self._check_data(config.data)
    self._check_pretext(config.pretext)
    self._check_loss_net(config)
    super().__init__(config)

  def _check_data(self, data) -> None:
    views = ("crop", "volume") if self.spatial_dims == 3 else ("slice",)
    if data.view not in views:
      raise ValueError(f"vit_ae_pp: model.spatial_dims={self.spatial_dims} trains on "
                       f"data.view in {views}; got {data.view!r}")
    if not len(data.modalities):
      raise ValueError("vit_ae_pp: data.modalities must name at least one modality")

  def _check_pretext(self, cfg) -> None:
    lo, hi = (float(v) for v in cfg.scale)
    nlo, nhi = (float(v) for v in cfg.noise_std)
    if not (0 < lo <= hi and float(cfg.rotation) >= 0 and float(cfg.log_gamma) >= 0
            and 0 <= nlo <= nhi):
      raise ValueError(f"vit_ae_pp: pretext needs scale (low, high) with 0 < low <= high, "
                       f"rotation >= 0, log_gamma >= 0 and noise_std (low, high) with 0 <= low <= "
                       f"high; got scale={tuple(cfg.scale)}, rotation={cfg.rotation}, "
                       f"log_gamma={cfg.log_gamma}, noise_std={tuple(cfg.noise_std)}")

  def _check_loss_net(self, config) -> None:
    """The loss network exists exactly when L_per is on, with its frozen parameter group."""
    if self.terms["per"] == (config.loss_net.source == "none"):
      need, source = (("a", "'random' or 'pretrained'") if self.terms["per"] else
                      ("no", "'none'"))
      raise ValueError(f"vit_ae_pp: loss.per={self.terms['per']} needs {need} loss network: set "
                       f"loss_net.source to {source} and param_groups.loss_net accordingly (the "
                       f"config's losses= arg does both); got loss_net.source="
                       f"{config.loss_net.source!r}")
    self.check_loss_net(config)

  @classmethod
  def default_config(cls):
    return {
        # MaskedAutoencoderViT's defaults are ViT-AE++'s: 3D, patch 8, encoder 12 x 768 (12
        # heads), decoder 8 x 512 (16 heads), fixed sin-cos positions, mask ratio 0.75.
        "model": {"name": "mae", **model_defaults("mae")},
        "loss": dict(rec=True, per=True, edge=True, cl=True, lambda1=0.01, lambda2=0.01,
                     lambda2_schedule="linear", cl_weight=1.0, cl_mode="pooled",
                     per_gradient=True, num_slices=16, edge_blur_sigma=0.0),
        "pretext": dict(augment=True, rotation=10.0, scale=(0.9, 1.1), log_gamma=0.3,
                        noise_std=(0.0, 0.1)),
        "predictor": dict(hidden_dim=0),
        "features": dict(pool="mean"),
        "loss_net": loss_net_section(
            {"name": "vgg16", **model_defaults("vgg16"), "batch_norm": False}, taps=VGG_TAPS,
            preprocess="none"),
        "param_groups": {"loss_net": dict(pattern="loss_net/.*", frozen=True)},
        # AdamW (0.9, 0.95), wd 0.05 (kernels only), lr 1e-3 x batch 4 / 256, cosine.
        "optim": dict(name="adamw", lr=1e-3 * 4 / 256, b1=0.9, b2=0.95, eps=1e-8,
                      weight_decay=0.05, schedule="cosine", end_lr=0.0, warmup_steps=0,
                      grad_clip=0.0),
        "data": dict(modalities=MODALITIES, view="crop", crop_size=(96, 96, 96),
                     fg_fraction=1.0),
    }

  # --- Networks -------------------------------------------------------------------------

  def build_model(self):
    """The autoencoder (``method.model``), its encoder alone (``method.encoder``), the SimSiam
    predictor (with L_CL) and the loss network (with L_per)."""
    model = super().build_model()
    self.encoder = model.make_encoder()
    self.predictor = None
    if self.terms["cl"]:
      self.predictor = Predictor(int(self.config.predictor.hidden_dim) or int(model.embed_dim))
    self.build_loss_net()
    return model

  def init(self, key, batch):
    """Variables of the autoencoder (from ``key``), the predictor and the loss network (from
    ``loss_net.seed`` or its file), shaped by ``batch["image"]``."""
    x = jnp.zeros(self._check_image(batch["image"]).shape, jnp.float32)
    model_key, dropout_key, mask_key, pred_key = jax.random.split(key, 4)
    ids_keep, ids_restore, _ = random_masking(mask_key, x.shape[0],
                                              self.model.num_tokens(x.shape[1:-1]),
                                              self.mask_ratio)
    mae = self.model.init({"params": model_key, "dropout": dropout_key}, x, ids_keep,
                          ids_restore, train=False)
    variables = {"params": dict(mae["params"])}
    nets = {}
    if self.predictor is not None:
      nets["predictor"] = self.predictor.init(
          pred_key, jnp.zeros((2, int(self.model.embed_dim)), jnp.float32), train=False)
    if self.loss_module is not None:
      nets["loss_net"] = self.loss_net_variables()
    for name, net in nets.items():
      for collection, tree in net.items():
        variables.setdefault(collection, {})[name] = dict(tree)
    return variables

  def _check_image(self, image):
    image = jnp.asarray(image) if not hasattr(image, "shape") else image
    layout = "(N, D, H, W, C)" if self.spatial_dims == 3 else "(N, H, W, C)"
    channels = len(self.config.data.modalities)
    if image.ndim != self.spatial_dims + 2 or image.shape[-1] != channels:
      raise ValueError(f"vit_ae_pp: with model.spatial_dims={self.spatial_dims} the image must be "
                       f"{layout} with C={channels} (data.modalities); got shape "
                       f"{tuple(image.shape)}")
    return image

  def _mae_params(self, params) -> dict:
    return {"encoder": params["encoder"], "decoder": params["decoder"]}

  # --- Views ----------------------------------------------------------------------------

  def views(self, key, image, *, train: bool = True) -> tuple[jax.Array, jax.Array]:
    """``(view 1, view 2)`` of ``image``, both float32 like it: view 2 z-scored; view 1
    augmented (affine, gamma), z-scored, then noised (``train`` and ``pretext.augment``;
    otherwise equal to view 2). One key per example."""
    image = self._check_image(image)
    view2 = zscore(image)
    cfg = self.config.pretext
    if not (train and cfg.augment):
      return view2, view2
    gamma = float(cfg.log_gamma)

    def augment(k, x):
      k_affine, k_gamma = jax.random.split(k)
      x, _ = random_affine(k_affine, x, max_rotation=float(cfg.rotation),
                           scale_range=tuple(float(s) for s in cfg.scale))
      return random_gamma(k_gamma, x, gamma_range=(math.exp(-gamma), math.exp(gamma)))

    aug_key, noise_key = jax.random.split(key)
    n = image.shape[0]
    view1 = zscore(jax.vmap(augment)(jax.random.split(aug_key, n), image.astype(jnp.float32)))
    noise = lambda k, x: gaussian_noise(k, x, std=tuple(float(s) for s in cfg.noise_std))
    return jax.vmap(noise)(jax.random.split(noise_key, n), view1), view2

  # --- Objective ------------------------------------------------------------------------

  def lambda2_at(self, step) -> jax.Array:
    """lambda2 at ``step`` completed steps: ``lambda2 max(0, 1 - step / total_steps)``
    ("linear") or ``lambda2`` ("constant"). float32 scalar."""
    if self.config.loss.lambda2_schedule == "constant":
      return jnp.asarray(self.lambda2, jnp.float32)
    frac = jnp.asarray(step, jnp.float32) / float(self.config.total_steps)
    return self.lambda2 * jnp.clip(1.0 - frac, 0.0, 1.0)

  def reconstruction_terms(self, variables, pred, target, mask, *, step, key):
    """``(lambda-weighted L_rec + L_per + L_edge, metrics)`` of the decoder output ``pred``
    ``(N, T, prod(p) * C)`` against ``target`` ``(N, *S, C)`` (view 1) with ``mask`` ``(N, T)``;
    ``key`` draws the perceptual slices. Terms that are off are absent."""
    loss, metrics = jnp.zeros((), jnp.float32), {}
    patch = self.model.patch_size
    if self.terms["rec"]:
      metrics["rec"] = reconstruction_loss(pred, target, mask, patch)
      loss = loss + metrics["rec"]
    if not (self.terms["per"] or self.terms["edge"]):
      return loss, metrics
    full = unpatchify(pred, patch, target.shape[1:-1])
    if self.terms["per"]:
      grad = bool(self.config.loss.per_gradient)
      as_volume = (lambda x: x) if self.spatial_dims == 3 else (lambda x: x[:, None])
      metrics["per"] = volume_perceptual_loss(
          as_volume(full), as_volume(target), self.features_fn(variables),
          num_slices=self.num_slices if self.spatial_dims == 3 else 0, key=key,
          stop_gradient=not grad)
      if grad:  # the reference's no-gradient term is only logged
        loss = loss + self.lambda1 * metrics["per"]
    if self.terms["edge"]:
      sigma = float(self.config.loss.edge_blur_sigma)
      edge_target = (gaussian_smooth(target, sigma, axes=tuple(range(1, target.ndim - 1)))
                     if sigma > 0 else target)
      metrics["edge"] = edge_loss(full, edge_target)
      metrics["lambda2"] = self.lambda2_at(step)
      loss = loss + metrics["lambda2"] * metrics["edge"]
    return loss, metrics

  def embedding(self, latent) -> jax.Array:
    """The contrasted representation of encoder output ``latent`` ``(N, [1 +] K, D)``: the
    mean of the visible patch tokens ``(N, D)`` ("pooled") or the whole latent ("token")."""
    if self.config.loss.cl_mode == "token":
      return latent
    return jnp.mean(latent[:, 1:] if self.model.class_token else latent, axis=1)

  def predict(self, variables, z, *, train: bool):
    """``(predictor(z), updated model state)``; batch statistics in ``train`` mode."""
    net = network_variables(variables, "predictor")
    model_state = {k: v for k, v in variables.items() if k != "params"}
    if not train:
      return self.predictor.apply(net, z, train=False), model_state
    p, updates = self.predictor.apply(net, z, train=True, mutable=["batch_stats"])
    return p, with_network_state(model_state, "predictor", updates)

  def contrastive_loss(self, variables, latent1, latent2, *, train: bool):
    """Unweighted L_CL (Eq. 3, SimSiam's symmetric form) of the two views' encoder outputs
    ``(N, [1 +] K, D)``: ``(loss, metrics, model state)``. The predictor runs once per view."""
    z1, z2 = self.embedding(latent1), self.embedding(latent2)
    p1, model_state = self.predict(variables, z1, train=train)
    p2, model_state = self.predict({"params": variables["params"], **model_state}, z2,
                                   train=train)
    flat = lambda x: x.reshape(-1, x.shape[-1])
    loss = simsiam_loss(flat(p1), flat(p2), flat(z1), flat(z2))
    unit = flat(z1) / jnp.maximum(jnp.linalg.norm(flat(z1), axis=-1, keepdims=True), 1e-12)
    return loss, {"cl": loss, "cl_z_std": jnp.mean(jnp.std(unit, axis=0))}, model_state

  def loss(self, variables, batch, key, *, train, step=0):
    """Eq. 4 on ``batch["image"]``'s two masked views from ``key`` at ``step`` (for lambda2)."""
    image = self._check_image(batch["image"])
    view_key, mask1_key, mask2_key, per_key, drop1_key, drop2_key = jax.random.split(key, 6)
    view1, view2 = self.views(view_key, image, train=train)
    n, num_tokens = image.shape[0], self.model.num_tokens(image.shape[1:-1])
    ids_keep, ids_restore, mask = random_masking(mask1_key, n, num_tokens, self.mask_ratio)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    rngs = lambda k: {"dropout": k} if train else {}
    loss, metrics = jnp.zeros((), jnp.float32), {}
    if self.terms["rec"] or self.terms["per"] or self.terms["edge"]:
      pred, feats = self.model.apply({"params": self._mae_params(params)}, view1, ids_keep,
                                     ids_restore, train=train, rngs=rngs(drop1_key))
      latent1 = feats["latent"]
      loss, metrics = self.reconstruction_terms(variables, pred, view1, mask, step=step,
                                                key=per_key)
    else:  # ViT + L_CL: the decoder is never run
      latent1 = self.encoder.apply({"params": params["encoder"]}, view1, ids_keep, train=train,
                                   rngs=rngs(drop1_key))
    if self.terms["cl"]:
      ids_keep2, _, _ = random_masking(mask2_key, n, num_tokens, self.mask_ratio)
      latent2 = self.encoder.apply({"params": params["encoder"]}, view2, ids_keep2, train=train,
                                   rngs=rngs(drop2_key))
      cl, cl_metrics, model_state = self.contrastive_loss(
          {"params": params, **model_state}, latent1, latent2, train=train)
      loss = loss + self.cl_weight * cl
      metrics.update(cl_metrics)
    return loss, metrics, model_state

  # --- Evaluation hooks -----------------------------------------------------------------

  def features(self, variables, image, pool: str | None = None) -> jax.Array:
    """``(N, D)`` float32 frozen-encoder features of clean, unmasked images ``(N, *S, C)``
    (z-scored as in training): ``pool`` (default ``features.pool``) "mean" (patch tokens after
    the final norm), "cls" or "mean_prenorm" (the reference code's SVM features)."""
    pool = pool or self.config.features.pool
    if pool not in POOLS:
      raise ValueError(f"vit_ae_pp: pool must be one of {POOLS}; got {pool!r}")
    if pool == "cls" and not self.model.class_token:
      raise ValueError("vit_ae_pp: pool='cls' needs model.class_token=True")
    if pool == "mean_prenorm" and int(self.model.depth) < 1:
      raise ValueError("vit_ae_pp: pool='mean_prenorm' needs an encoder with depth >= 1")
    x = zscore(self._check_image(image))
    tokens, feats = self.encoder.apply({"params": variables["params"]["encoder"]}, x,
                                       train=False, return_features=True)
    extra = 1 if self.model.class_token else 0
    if pool == "cls":
      return tokens[:, 0]
    if pool == "mean":
      return jnp.mean(tokens[:, extra:], axis=1)
    pooled = jnp.mean(feats[f"block_{int(self.model.depth) - 1}"][:, extra:], axis=1)
    mean = jnp.mean(pooled, axis=-1, keepdims=True)
    var = jnp.var(pooled, axis=-1, keepdims=True)
    return (pooled - mean) * jax.lax.rsqrt(var + float(self.model.layer_norm_eps))

  def _masked(self, key, image):
    x = zscore(self._check_image(image))
    n, num_tokens = x.shape[0], self.model.num_tokens(x.shape[1:-1])
    ids_keep, ids_restore, mask = random_masking(key, n, num_tokens, self.mask_ratio)
    patch = self.model.patch_size
    visible = unpatchify(patchify(x, patch) * (1.0 - mask)[..., None], patch, x.shape[1:-1])
    return x, visible, ids_keep, ids_restore

  def pretext_example(self, key, batch):
    """``(masked input, target)``: the z-scored image with its masked patches (drawn from
    ``key``) zeroed, and the z-scored image."""
    x, visible, _, _ = self._masked(key, batch["image"])
    return visible, x

  def reconstruct(self, variables, batch, key):
    """``(masked input, full reconstruction)`` in eval mode with `pretext_example`'s mask."""
    x, visible, ids_keep, ids_restore = self._masked(key, batch["image"])
    pred, _ = self.model.apply({"params": self._mae_params(variables["params"])}, x, ids_keep,
                               ids_restore, train=False)
    return visible, unpatchify(pred, self.model.patch_size, x.shape[1:-1])

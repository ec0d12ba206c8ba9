"""SwAV pre-training of a ResNet or VGG on grey MR slices: the CoPer loss networks (CoPer
Sec. III-A, IV-B and App. B; Caron et al. 2020, "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments"; facebookresearch/swav ``main_swav.py``,
``src/multicropdataset.py``, ``src/resnet50.py``).

Per training step, for a batch of one-modality slices ``(B, H, W, 1)``:

1. Each slice is min-max scaled to [0, 1] (the paper's slices are [0, 255] images read by
   torchvision's ``ToTensor``), then cut into SwAV's multi-crop views
   (`jaxmed.pretext.views.multi_crop`: ``num_global`` crops of ``global_size`` with area scale
   ``global_scale``, ``num_local`` of ``local_size`` with ``local_scale``, horizontal flips),
   each view jittered in brightness / contrast (p 0.8) and blurred (p 0.5)
   (`jaxmed.pretext.views.color_jitter`, `random_gaussian_blur`), then the grey slice is
   stacked to 3 channels and normalised with SwAV's ImageNet mean / std.
2. The backbone runs once per crop resolution on all crops of that resolution (SwAV's
   ``forward``), its output globally average-pooled (ResNet's ``pooled``; VGG's ``pool5``
   averaged over space); the projection head Linear(C, 2048)-BN-ReLU-Linear(2048, 128) and L2
   normalisation give the embeddings ``z``; the prototypes, a bias-free Linear(128, K), give the
   scores ``z . c_k``.
3. The codes of the crops ``crops_for_assign`` come from `jaxmed.losses.sinkhorn_knopp` on
   their (detached) scores, prefixed, once the queue is full, by the scores of the queued
   embeddings of earlier batches; the loss is `jaxmed.losses.swav_loss` (swapped prediction,
   temperature 0.1). The queue then takes this batch's embeddings of those crops.
4. One update: the prototypes are a parameter group frozen for the first
   ``param_groups.prototypes.freeze_steps`` steps (SwAV's ``freeze_prototypes_niters``), and
   re-normalised to unit norm after every update (`SwAVMethod.after_update`; SwAV normalises
   them before every step: the same sequence, as `init` normalises them too). A frozen group
   keeps its whole optax state, schedule step count included
   (`jaxmed.train.optim.GroupedOptimizer`), so the prototypes' learning-rate schedule runs
   ``freeze_steps`` behind the global one (SwAV: the global iteration's lr).

`SwAVMethod.features` gives the pooled backbone features for linear probes; the trained
backbone's variables are ``variables["params"]["backbone"]`` (and ``batch_stats``).

Shared with `jaxmed.methods.simsiam`: `GreySliceBackbone` (backbone choice, the grey-slice
input, intensity augmentation, features) and `pooled_features`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmed.losses import sinkhorn_knopp, swav_loss
from jaxmed.methods.base import Method
from jaxmed.models.blocks import make_norm, torch_default_init
from jaxmed.models.registry import model_defaults
from jaxmed.pretext.views import color_jitter, multi_crop, random_gaussian_blur

# Backbones a config may name (``get_config(backbone=...)``): ``config.model`` sections.
BACKBONES = {
    "resnet18": dict(name="resnet", depth=18),
    "resnet50": dict(name="resnet", depth=50),
    "vgg16_bn": dict(name="vgg16", batch_norm=True),
    "vgg16": dict(name="vgg16", batch_norm=False),
}
# The registered models a backbone may be, and the field that scales its width.
WIDTH_FIELD = {"resnet": "widen_factor", "vgg16": "width"}
# SwAV's (and SimSiam's) input normalisation, torchvision's ImageNet statistics as written in
# swav/src/multicropdataset.py.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.228, 0.224, 0.225)
# VGG-16 runs 5 max-pools: every crop side must be at least 2 ** 5.
VGG_MIN_SIZE = 32


def backbone_model(name: str, **fields) -> dict[str, Any]:
  """The ``config.model`` section of registered backbone ``name`` ("resnet" or "vgg16"): its
  optional arguments at their defaults, less those `GreySliceBackbone` derives, with
  ``fields`` over them."""
  derived = GreySliceBackbone.derived_model_fields
  section = {k: v for k, v in model_defaults(name).items() if k not in derived}
  return {"name": name, **section, **fields}


def pooled_features(backbone: nn.Module, x: jax.Array, train: bool) -> jax.Array:
  """``(N, C)`` float32 global average of a backbone's last feature map: ResNet's ``pooled``
  output (no ``fc``), or VGG's ``pool5`` ``(N, h, w, C)`` averaged over space (CoPer notes:
  global average pooling on pool5, then the head)."""
  out = backbone(x, train=train)
  out = out.astype(jnp.float32)
  return out if out.ndim == 2 else jnp.mean(out, axis=tuple(range(1, out.ndim - 1)))


def _torch_bias_init(fan_in: int):
  """torch.nn.Linear's bias initialiser, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                   bound)


def linear(features: int, x: jax.Array, *, use_bias: bool = True, name: str) -> nn.Dense:
  """A float32 ``torch.nn.Linear`` (torch's default initialisation) applied to ``x`` (call
  inside a compact module)."""
  return nn.Dense(features, use_bias=use_bias, kernel_init=torch_default_init,
                  bias_init=_torch_bias_init(x.shape[-1]), name=name)(x)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``torch.nn.functional.normalize(x, dim=-1)``: ``x / max(||x||, eps)``."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class ProjectionHead(nn.Module):
  """SwAV's projection head: Linear(C, hidden)-BN-ReLU-Linear(hidden, out) (``hidden_dim`` 0:
  one Linear(C, out), SwAV's ``hidden_mlp=0``). ``(N, C)`` -> ``(N, out)`` float32."""

  hidden_dim: int = 2048
  out_dim: int = 128

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    if self.hidden_dim:
      x = linear(self.hidden_dim, x, name="linear1")
      x = nn.relu(make_norm("batch", train=train, name="bn1")(x))
      return linear(self.out_dim, x, name="linear2")
    return linear(self.out_dim, x, name="linear")


class SwAVModel(nn.Module):
  """Backbone, projection head and prototypes (swav ``src/resnet50.py``, ``normalize=True``).

  ``__call__(crops, train)``: ``crops`` is one ``(n, H, W, 3)`` array or a sequence of them
  (one per crop resolution); the backbone runs once per array (batch norm statistics per
  resolution group, as SwAV's ``forward``), then the head runs on all of them at once.
  Returns ``(z, scores)``: the L2-normalised embeddings ``(sum n, out_dim)`` and the prototype
  scores ``(sum n, num_prototypes)``, float32, in the order of ``crops``.
  """

  backbone: nn.Module
  hidden_dim: int = 2048
  out_dim: int = 128
  num_prototypes: int = 3000

  def setup(self):
    self.projection_head = ProjectionHead(self.hidden_dim, self.out_dim)
    self.prototypes = nn.Dense(self.num_prototypes, use_bias=False,
                               kernel_init=torch_default_init)

  def features(self, x, *, train: bool = False):
    """``(N, C)`` pooled backbone features of ``x`` ``(N, H, W, 3)``."""
    return pooled_features(self.backbone, x, train)

  def __call__(self, crops, *, train: bool = False):
    crops = (crops,) if hasattr(crops, "shape") else tuple(crops)
    feats = jnp.concatenate([self.features(c, train=train) for c in crops if c.shape[0]])
    z = l2_normalize(self.projection_head(feats, train=train))
    return z, self.prototypes(z).astype(jnp.float32)


class GreySliceBackbone:
  """Mixin of the SwAV and SimSiam methods (before `Method` in the bases): a ResNet or VGG-16
  backbone from ``config.model``, on one-modality grey slices stacked to 3 channels.

  Reads ``config.pretext``: ``mean``, ``std`` (input normalisation per channel),
  ``brightness``, ``contrast``, ``jitter_p``, ``blur_sigma``, ``blur_p``; and ``config.data``:
  one modality (``modalities`` of length 1), or several mixed with ``per_modality=True``.
  """

  derived_model_fields = ("num_classes", "include_top", "spatial_dims")
  # A subclass sets head_minimums (config.head field -> smallest allowed value) and defines
  # crop_sizes() -> the sizes of the views the backbone sees (checked against VGG's minimum).
  head_minimums: dict[str, int] = {}

  def __init__(self, config):
    self.config = config
    self.check_head(self.head_minimums)
    self.check_grey_slices(self.crop_sizes())
    super().__init__(config)
    # Checks the view fields now rather than at the first step.
    jax.eval_shape(self.views, jax.random.PRNGKey(0),
                   jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32))

  def model_arguments(self):
    name = self.config.model.name
    if name not in WIDTH_FIELD:
      raise ValueError(f"{self.name}: model.name must be a backbone in {sorted(WIDTH_FIELD)} "
                       f"(config backbones {sorted(BACKBONES)}); got {name!r}")
    return ({"num_classes": None, "spatial_dims": 2} if name == "resnet"
            else {"include_top": False})

  def check_head(self, minimums: dict[str, int]) -> None:
    """Raises unless every ``config.head[field]`` is at least ``minimums[field]``."""
    for field, minimum in minimums.items():
      if int(self.config.head[field]) < minimum:
        raise ValueError(f"{self.name}: head.{field} must be >= {minimum}; got "
                         f"{self.config.head[field]}")

  def check_grey_slices(self, sizes: Sequence[int]) -> None:
    """Checks the data (slices of one modality) and, for VGG, the crop ``sizes``."""
    data = self.config.data
    if data.get("view", "slice") != "slice":
      raise ValueError(f"{self.name}: data.view must be 'slice' (2D slices); got "
                       f"{data.view!r}")
    if len(data.modalities) != 1 and not data.get("per_modality", False):
      raise ValueError(f"{self.name}: pre-trains on one modality (CoPer Sec. IV-B): set "
                       f"data.modalities to one of {tuple(data.modalities)}, or "
                       f"data.per_modality=True to mix them; got {tuple(data.modalities)}")
    if self.config.model.name == "vgg16" and min(sizes) < VGG_MIN_SIZE:
      raise ValueError(f"{self.name}: VGG-16 needs crops of at least {VGG_MIN_SIZE} pixels (5 "
                       f"max-pools); got crop sizes {tuple(sizes)}")
    for field in ("mean", "std"):
      if len(self.config.pretext[field]) != 3:
        raise ValueError(f"{self.name}: pretext.{field} must have 3 entries (one per input "
                         f"channel); got {self.config.pretext[field]!r}")

  def grey(self, image) -> jax.Array:
    """``(N, H, W, 1)`` float32 slices min-max scaled to [0, 1] per slice, from ``image``
    ``(N, H, W, 1)``."""
    if image.ndim != 4 or image.shape[-1] != 1:
      raise ValueError(f"{self.name}: expects one-modality slices (N, H, W, 1); got shape "
                       f"{tuple(image.shape)}")
    x = jnp.asarray(image, jnp.float32)
    lo = jnp.min(x, axis=(1, 2, 3), keepdims=True)
    hi = jnp.max(x, axis=(1, 2, 3), keepdims=True)
    return (x - lo) / jnp.maximum(hi - lo, 1e-6)

  def to_input(self, x) -> jax.Array:
    """Grey views ``(..., H, W, 1)`` in [0, 1] -> network input ``(..., H, W, 3)``: the grey
    channel stacked 3 times and normalised with ``pretext.mean`` / ``pretext.std``."""
    mean = jnp.asarray(self.config.pretext.mean, jnp.float32)
    std = jnp.asarray(self.config.pretext.std, jnp.float32)
    return (jnp.repeat(x, 3, axis=-1) - mean) / std

  def intensity(self, key, views) -> jax.Array:
    """Colour jitter (brightness / contrast, p ``jitter_p``) then Gaussian blur (p
    ``blur_p``) of a view batch ``(N, H, W, 1)`` in [0, 1]."""
    cfg = self.config.pretext
    k_jitter, k_blur = jax.random.split(key)
    views = color_jitter(k_jitter, views, brightness=float(cfg.brightness),
                         contrast=float(cfg.contrast), p=float(cfg.jitter_p))
    return random_gaussian_blur(k_blur, views, sigma=tuple(cfg.blur_sigma),
                                p=float(cfg.blur_p))

  def features(self, variables, image):
    """``(N, C * F)`` pooled backbone features (eval mode) of slices ``image`` ``(N, H, W, C)``:
    each channel min-max scaled, stacked to 3 channels and normalised as in training, the
    features of the C channels concatenated (C = 1 for one modality)."""
    feats = []
    for c in range(image.shape[-1]):
      x = self.to_input(self.grey(image[..., c:c + 1]))
      feats.append(self.model.apply(variables, x, train=False, method="features"))
    return jnp.concatenate(feats, axis=-1)


class SwAVMethod(GreySliceBackbone, Method):
  """Config: ``model`` (the backbone: ``resnet`` with ``depth`` 18 / 50 and ``widen_factor``,
  or ``vgg16`` with ``batch_norm`` and ``width``), ``pretext`` (multi-crop: ``num_global``,
  ``num_local``, ``global_size``, ``local_size``, ``global_scale``, ``local_scale``,
  ``ratio``, ``flip``; intensity: ``brightness``, ``contrast``, ``jitter_p``, ``blur_sigma``,
  ``blur_p``; input ``mean``, ``std``), ``head`` (``hidden_dim``, ``out_dim``,
  ``num_prototypes``), ``swav`` (``temperature``, ``epsilon``, ``sinkhorn_iterations``,
  ``crops_for_assign``, ``queue_length`` (0: no queue), ``queue_start_step``),
  ``param_groups.prototypes.freeze_steps``."""

  name = "swav"
  head_minimums = {"hidden_dim": 0, "out_dim": 1, "num_prototypes": 1}

  def __init__(self, config):
    self.config = config
    cfg = config.pretext
    self.num_crops = int(cfg.num_global) + int(cfg.num_local)
    self.crops_for_assign = tuple(int(c) for c in config.swav.crops_for_assign)
    if (not self.crops_for_assign or len(set(self.crops_for_assign)) != len(self.crops_for_assign)
        or not all(0 <= c < self.num_crops for c in self.crops_for_assign)):
      raise ValueError(f"swav.crops_for_assign must be distinct crop indices in [0, "
                       f"{self.num_crops}) (global crops first); got "
                       f"{tuple(config.swav.crops_for_assign)}")
    if self.num_crops < 2:
      raise ValueError(f"swav: needs at least 2 crops (pretext.num_global + num_local); got "
                       f"{self.num_crops}")
    self.queue_length = int(config.swav.queue_length)
    if self.queue_length < 0 or int(config.swav.queue_start_step) < 0:
      raise ValueError(f"swav.queue_length and swav.queue_start_step must be >= 0; got "
                       f"{self.queue_length} and {config.swav.queue_start_step}")
    if "prototypes" not in config.param_groups:
      raise ValueError("swav: param_groups.prototypes (pattern 'prototypes/.*', freeze_steps) "
                       "is required")
    super().__init__(config)

  def crop_sizes(self) -> list[int]:
    cfg = self.config.pretext
    sizes = [cfg.global_size] + ([cfg.local_size] if int(cfg.num_local) else [])
    return [s for size in sizes for s in np.atleast_1d(size)]

  @classmethod
  def default_config(cls):
    return {
        # CoPer App. B: SwAV on ResNet-50 or VGG (VGG16-BN recommended: trains from scratch).
        "model": backbone_model("resnet", depth=50),
        # CoPer App. B: 2 crops of 192 (scale 0.14-1) and 96 (0.05-0.14); SwAV's nmb_crops 2 6;
        # flip 0.5; colour jitter p 0.8 with brightness / contrast 0.8; blur p 0.5, sigma
        # 0.1-2 (swav src/multicropdataset.py).
        "pretext": dict(num_global=2, num_local=6, global_size=192, local_size=96,
                        global_scale=(0.14, 1.0), local_scale=(0.05, 0.14),
                        ratio=(3 / 4, 4 / 3), flip=True, brightness=0.8, contrast=0.8,
                        jitter_p=0.8, blur_sigma=(0.1, 2.0), blur_p=0.5,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD),
        # swav main_swav.py: hidden_mlp 2048, feat_dim 128, nmb_prototypes 3000.
        "head": dict(hidden_dim=2048, out_dim=128, num_prototypes=3000),
        "swav": dict(temperature=0.1, epsilon=0.05, sinkhorn_iterations=3,
                     crops_for_assign=(0, 1), queue_length=0, queue_start_step=0),
        # freeze_prototypes_niters 313 (SwAV's default; CoPer's "331 iterations").
        "param_groups": {"prototypes": dict(pattern="prototypes/.*", frozen=False,
                                            freeze_steps=313)},
        # CoPer App. B: SGD, base lr 0.6 -> 0.0006 cosine, batch 96 (and 5 warm-up epochs:
        # set with the step count, `jaxmed.configs.swav`); SwAV wraps the SGD (momentum 0.9,
        # wd 1e-6) in LARC (trust 0.001, no clipping).
        "optim": dict(name="lars", lr=0.6, schedule="cosine", end_lr=0.0006, momentum=0.9,
                      nesterov=False, weight_decay=1e-6, grad_clip=0.0),
        # One modality (the synthesis target; T2 for the tumour task), slices >= 20% brain.
        "data": dict(modalities=("t2",), view="slice", min_foreground=0.2),
    }

  def build_model(self):
    head = self.config.head
    backbone = super().build_model()
    return SwAVModel(backbone=backbone, hidden_dim=int(head.hidden_dim),
                     out_dim=int(head.out_dim), num_prototypes=int(head.num_prototypes))

  # --- Views ------------------------------------------------------------------------------

  def views(self, key, image) -> tuple[jax.Array, jax.Array]:
    """SwAV's multi-crop network inputs of one-modality slices ``image`` ``(B, H, W, 1)``:
    ``(global (num_global, B, *global_size, 3), local (num_local, B, *local_size, 3))``."""
    cfg = self.config.pretext
    size = lambda s: tuple(s) if isinstance(s, (tuple, list)) else int(s)
    global_views, local_views = multi_crop(
        key, self.grey(image), global_size=size(cfg.global_size),
        local_size=size(cfg.local_size), num_global=int(cfg.num_global),
        num_local=int(cfg.num_local), global_scale=tuple(cfg.global_scale),
        local_scale=tuple(cfg.local_scale), ratio=tuple(cfg.ratio), flip=bool(cfg.flip),
        augment=self.intensity)
    return self.to_input(global_views), self.to_input(local_views)

  # --- Networks and state -----------------------------------------------------------------

  def init(self, key, batch):
    """Variables for slices shaped like ``batch["image"]``, with unit-norm prototypes."""
    x = self.to_input(self.grey(batch["image"]))
    variables = self.model.init({"params": key}, x, train=False)
    return {**variables, "params": normalize_prototypes(variables["params"])}

  def init_method_state(self, batch):
    """The queue: ``{"queue": (A, queue_length, out_dim) embeddings of the crops
    ``crops_for_assign`` of past batches, newest first; "count": how many are filled}``, or
    {} without a queue (``swav.queue_length`` 0)."""
    del batch
    if not self.queue_length:
      return {}
    return {"queue": jnp.zeros((len(self.crops_for_assign), self.queue_length,
                                int(self.config.head.out_dim)), jnp.float32),
            "count": jnp.zeros((), jnp.int32)}

  # --- Objective --------------------------------------------------------------------------

  def swav_step(self, variables, views, *, train: bool, queue=None):
    """The SwAV loss of multi-crop ``views`` (`views`).

    Args:
      variables: Flax variables.
      views: ``(global, local)`` network inputs.
      train: batch statistics (and their update) in the backbone and head.
      queue: the method state (`init_method_state`) or None (no queue); its embeddings join
        the Sinkhorn assignment once ``count`` reaches ``queue_length``.

    Returns:
      ``(loss, metrics, model_state, z)``: ``z`` ``(A, B, out_dim)`` the detached embeddings
      of the crops ``crops_for_assign``, for the queue.
    """
    cfg = self.config.swav
    global_views, local_views = views
    batch = global_views.shape[1]
    # One backbone pass per crop resolution (SwAV's forward groups equal sizes).
    if global_views.shape[2:] == local_views.shape[2:]:
      crops = [jnp.concatenate([global_views, local_views]).reshape(-1, *global_views.shape[2:])]
    else:
      crops = [v.reshape(-1, *v.shape[2:]) for v in (global_views, local_views) if v.shape[0]]
    (z, scores), model_state = self.apply(variables, crops, None, train=train)
    z = z.reshape(self.num_crops, batch, -1)
    scores = scores.reshape(self.num_crops, batch, -1)
    sinkhorn = lambda s: sinkhorn_knopp(s, epsilon=float(cfg.epsilon),
                                        iterations=int(cfg.sinkhorn_iterations))
    prototypes = jax.lax.stop_gradient(variables["params"]["prototypes"]["kernel"])
    metrics = {}
    codes = []
    for i, crop in enumerate(self.crops_for_assign):
      out = jax.lax.stop_gradient(scores[crop])
      if queue is None or not self.queue_length:
        codes.append(sinkhorn(out))
        continue
      use = queue["count"] >= self.queue_length
      queued = queue["queue"][i] @ prototypes.astype(jnp.float32)  # (L, K)
      codes.append(jax.lax.cond(use, lambda o=out, q=queued: sinkhorn(
          jnp.concatenate([q, o]))[-batch:], lambda o=out: sinkhorn(o)))
      metrics["queue_in_use"] = use.astype(jnp.float32)
    codes = jnp.stack(codes)
    loss = swav_loss(scores, codes, crops_for_assign=self.crops_for_assign,
                     temperature=float(cfg.temperature))
    # Mean over samples of the entropy of their codes (ln K: uniform; 0: one-hot).
    metrics["code_entropy"] = -jnp.mean(jnp.sum(codes * jnp.log(codes + 1e-12), axis=-1))
    assigned = jax.lax.stop_gradient(z[jnp.asarray(self.crops_for_assign)])
    return loss, metrics, model_state, assigned

  def loss(self, variables, batch, key, *, train, step=0):
    """The SwAV loss of ``batch["image"]`` ``(B, H, W, 1)``'s views from ``key``, no queue."""
    del step
    loss, metrics, model_state, _ = self.swav_step(
        variables, self.views(key, batch["image"]), train=train)
    return loss, metrics, model_state

  def update(self, state, batch, key):
    """One SwAV step with the queue (method state) read before and filled after the loss."""
    aug_key, view_key = jax.random.split(key)
    batch = self.augment(aug_key, batch)
    views = self.views(view_key, batch["image"])
    queue = state.method_state if self.queue_length else None

    def loss_fn(params):
      loss, metrics, model_state, z = self.swav_step(
          {"params": params, **state.model_state}, views, train=True, queue=queue)
      return loss, (metrics, model_state, z)

    (loss, (metrics, model_state, z)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    method_state = state.method_state
    if self.queue_length:
      method_state = push_queue(method_state, z, active=state.step >= int(
          self.config.swav.queue_start_step))
    state = state.replace(model_state=model_state, method_state=method_state)
    state = state.apply_gradients(grads)
    return state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}

  def after_update(self, state):
    """Re-normalises the prototypes to unit norm (SwAV, before every step)."""
    return state.replace(params=normalize_prototypes(state.params))


def normalize_prototypes(params):
  """``params`` with ``prototypes/kernel`` ``(D, K)`` scaled to unit-norm columns (each
  prototype; torch's ``prototypes.weight`` rows)."""
  kernel = params["prototypes"]["kernel"]
  kernel = kernel / jnp.maximum(jnp.linalg.norm(kernel, axis=0, keepdims=True), 1e-12)
  return {**params, "prototypes": {**params["prototypes"], "kernel": kernel}}


def push_queue(queue_state, z, *, active):
  """The queue after this batch when ``active``: ``z`` ``(A, B, D)`` in front, the oldest
  entries dropped (SwAV: ``queue[i, bs:] = queue[i, :-bs]; queue[i, :bs] = embedding``);
  unchanged otherwise."""
  queue, count = queue_state["queue"], queue_state["count"]
  length = queue.shape[1]
  pushed = jnp.concatenate([z.astype(queue.dtype), queue], axis=1)[:, :length]
  return {"queue": jnp.where(active, pushed, queue),
          "count": jnp.where(active, jnp.minimum(count + z.shape[1], length), count)}

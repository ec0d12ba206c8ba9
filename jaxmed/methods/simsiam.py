"""SimSiam pre-training of a ResNet or VGG on grey MR slices: the CoPer comparison (CoPer
Sec. IV-B, Table III, cited there as [15]; Chen & He 2021, "Exploring Simple Siamese
Representation Learning"; facebookresearch/simsiam ``simsiam/builder.py``,
``main_simsiam.py``).

CoPer gives no SimSiam settings; these are the reference's. Per training step, for a batch of
one-modality slices ``(B, H, W, 1)``:

1. Each slice is min-max scaled to [0, 1], and two views are drawn (two global views of
   `jaxmed.pretext.views.multi_crop`), each a random resized crop of ``size`` with area scale
   ``scale`` (0.2-1), a horizontal flip, brightness / contrast jitter (0.4, p 0.8) and a
   Gaussian blur (sigma 0.1-2, p 0.5), then stacked to 3 channels and normalised with the
   ImageNet mean / std (the reference's augmentation; `jaxmed.methods.swav.GreySliceBackbone`).
2. Each view runs through the backbone (global average pooled), the projector
   3 x (Linear-BN-ReLU) whose last BN is affine-free and has no ReLU (width ``proj_dim``
   2048; hidden width the backbone's feature width, as the reference's ``prev_dim``), giving
   ``z``, and the predictor Linear(2048, 512)-BN-ReLU-Linear(512, 2048), giving ``p``. The two
   views run separately, so batch-norm statistics are per view, as the reference's two
   encoder calls.
3. Loss `jaxmed.losses.simsiam_loss`: ``D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2`` with D the
   negative cosine; one SGD update of every parameter.

`SimSiamMethod.features` gives the pooled backbone features for linear probes; the trained
backbone's variables are ``variables["params"]["backbone"]`` (and ``batch_stats``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.losses import simsiam_loss
from jaxmed.methods.base import Method
from jaxmed.methods.swav import (IMAGENET_MEAN, IMAGENET_STD, GreySliceBackbone,
                                 backbone_model, linear, pooled_features)
from jaxmed.models.blocks import make_norm
from jaxmed.pretext.views import multi_crop


class Projector(nn.Module):
  """SimSiam's projector (``encoder.fc``): Linear(C, hidden, no bias)-BN-ReLU,
  Linear(hidden, hidden, no bias)-BN-ReLU, Linear(hidden, out)-BN(affine=False).

  The reference's last Linear has a bias that it never trains (``requires_grad = False``,
  "not use bias as it is followed by BN"): it is left out here. ``hidden_dim`` 0 takes the
  input width (the reference's ``prev_dim``). ``(N, C)`` -> ``(N, out_dim)`` float32.
  """

  hidden_dim: int = 0
  out_dim: int = 2048

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    hidden = self.hidden_dim or x.shape[-1]
    for i in (1, 2):
      x = linear(hidden, x, use_bias=False, name=f"linear{i}")
      x = nn.relu(make_norm("batch", train=train, name=f"bn{i}")(x))
    x = linear(self.out_dim, x, use_bias=False, name="linear3")
    return make_norm("batch", train=train, affine=False, name="bn3")(x)


class Predictor(nn.Module):
  """SimSiam's predictor: Linear(D, hidden, no bias)-BN-ReLU-Linear(hidden, D).
  ``(N, D)`` -> ``(N, D)`` float32."""

  hidden_dim: int = 512

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    out_dim = x.shape[-1]
    x = linear(self.hidden_dim, x, use_bias=False, name="linear1")
    x = nn.relu(make_norm("batch", train=train, name="bn1")(x))
    return linear(out_dim, x, name="linear2")


class SimSiamModel(nn.Module):
  """Backbone, projector and predictor (simsiam ``builder.SimSiam``).

  ``__call__(x (N, H, W, 3), train)`` returns ``(p, z)``, each ``(N, proj_dim)`` float32.
  """

  backbone: nn.Module
  proj_hidden_dim: int = 0
  proj_dim: int = 2048
  pred_hidden_dim: int = 512

  def setup(self):
    self.projector = Projector(self.proj_hidden_dim, self.proj_dim)
    self.predictor = Predictor(self.pred_hidden_dim)

  def features(self, x, *, train: bool = False):
    """``(N, C)`` pooled backbone features of ``x`` ``(N, H, W, 3)``."""
    return pooled_features(self.backbone, x, train)

  def __call__(self, x, *, train: bool = False):
    z = self.projector(self.features(x, train=train), train=train)
    return self.predictor(z, train=train), z


class SimSiamMethod(GreySliceBackbone, Method):
  """Config: ``model`` (the backbone: ``resnet`` with ``depth`` 18 / 50 and ``widen_factor``,
  or ``vgg16`` with ``batch_norm`` and ``width``), ``pretext`` (``size``, ``scale``,
  ``ratio``, ``flip``; ``brightness``, ``contrast``, ``jitter_p``, ``blur_sigma``,
  ``blur_p``; input ``mean``, ``std``), ``head`` (``proj_hidden_dim`` (0: the backbone's
  width), ``proj_dim``, ``pred_hidden_dim``), ``param_groups.predictor`` (the reference's
  ``--fix-pred-lr``: a constant learning rate for the predictor)."""

  name = "simsiam"

  head_minimums = {"proj_hidden_dim": 0, "proj_dim": 1, "pred_hidden_dim": 1}

  def crop_sizes(self) -> list[int]:
    return np.atleast_1d(self.config.pretext.size).tolist()

  @classmethod
  def default_config(cls):
    return {
        "model": backbone_model("resnet", depth=50),
        # simsiam main_simsiam.py: RandomResizedCrop(224, scale=(0.2, 1)), ColorJitter(0.4,
        # 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2 (no-op on grey), GaussianBlur([.1, 2]) p 0.5,
        # horizontal flip.
        "pretext": dict(size=224, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip=True,
                        brightness=0.4, contrast=0.4, jitter_p=0.8, blur_sigma=(0.1, 2.0),
                        blur_p=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        # simsiam: --dim 2048 --pred-dim 512; projector hidden = the encoder's width.
        "head": dict(proj_hidden_dim=0, proj_dim=2048, pred_hidden_dim=512),
        # --fix-pred-lr (the reference's ImageNet recipe): the predictor keeps the initial lr.
        "param_groups": {"predictor": dict(pattern="predictor/.*", frozen=False,
                                           freeze_steps=0, optim=dict(schedule="constant"))},
        # SGD lr 0.05 x batch / 256 (batch 96, CoPer's SwAV batch), momentum 0.9, wd 1e-4,
        # cosine to 0 without warm-up; SwAV's step count (CoPer App. B).
        "optim": dict(name="sgd", lr=0.05 * 96 / 256, schedule="cosine", end_lr=0.0,
                      warmup_steps=0, momentum=0.9, nesterov=False, weight_decay=1e-4,
                      grad_clip=0.0),
        "data": dict(modalities=("t2",), view="slice", min_foreground=0.2),
    }

  def build_model(self):
    head = self.config.head
    return SimSiamModel(backbone=super().build_model(),
                        proj_hidden_dim=int(head.proj_hidden_dim), proj_dim=int(head.proj_dim),
                        pred_hidden_dim=int(head.pred_hidden_dim))

  def init(self, key, batch):
    """Variables for slices shaped like ``batch["image"]``."""
    return self.model.init({"params": key}, self.to_input(self.grey(batch["image"])),
                           train=False)

  def views(self, key, image) -> jax.Array:
    """The two augmented network inputs ``(2, B, *size, 3)`` of one-modality slices ``image``
    ``(B, H, W, 1)``.

    SimSiam's ``x1, x2 = aug(x), aug(x)`` as two global views of `multi_crop` (each view its
    own crop, flip, jitter and blur keys; `two_views` over a one-view `multi_crop` draws the
    same distribution but takes twice as long to compile on CPU)."""
    cfg = self.config.pretext
    size = tuple(cfg.size) if isinstance(cfg.size, (tuple, list)) else int(cfg.size)
    views, _ = multi_crop(key, self.grey(image), global_size=size, local_size=size,
                          num_global=2, num_local=0, global_scale=tuple(cfg.scale),
                          ratio=tuple(cfg.ratio), flip=bool(cfg.flip), augment=self.intensity)
    return self.to_input(views)

  def loss(self, variables, batch, key, *, train, step=0):
    """The SimSiam loss of ``batch["image"]`` ``(B, H, W, 1)``'s two views from ``key``."""
    del step
    views = self.views(key, batch["image"])
    (p1, z1), model_state = self.apply(variables, views[0], None, train=train)
    (p2, z2), model_state = self.apply({**variables, **model_state}, views[1], None,
                                       train=train)
    loss = simsiam_loss(p1, p2, z1, z2)
    # The collapse monitor of the paper (Fig. 2): per-channel std of the l2-normalised z
    # (1 / sqrt(dim) without collapse, 0 when collapsed).
    unit = z1 / jnp.maximum(jnp.linalg.norm(z1, axis=-1, keepdims=True), 1e-12)
    return loss, {"z_std": jnp.mean(jnp.std(unit, axis=0))}, model_state

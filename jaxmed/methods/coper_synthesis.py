"""Multi-modal MRI synthesis with the CoPer loss: pix2pix + L1 + CoPer + adversarial
(Sec. III-C, Eqs. 1-6 and App. C of coper_contrastive_perceptual_metric).

A generator ``G`` (pix2pix U-Net, tanh output in [-1, 1]) maps the input modalities ``X`` of an
axial slice to the target modalities ``Y`` (tumour: FLAIR + T1 -> T2; MS: T1 + T2 -> FLAIR); a
conditional PatchGAN ``D`` judges ``concat(X, Y)``; a frozen loss network (VGG-16 or ResNet,
pre-trained by SwAV / SimSiam, random, or converted from PyTorch) gives the CoPer loss:

  L_G = lambda1 L_1 + (1 - lambda1) L_CoPer + lambda2 L_adv          (Eq. 5)
  L_D = 0.5 [BCE(D(X, Y), 1) + BCE(D(X, G(X)), 0)]                    (Eq. 6, pix2pix's form)

with ``L_1 = mean |Y - G(X)|`` (Eq. 1), ``L_CoPer`` of Eqs. 3-4 (`jaxmed.losses.coper_loss`)
and the non-saturating ``L_adv = BCE(D(X, G(X)), 1)`` (pix2pix's ``GANLoss('vanilla')``; Eq. 2
as printed is the saturating, unconditional form). One training step is pix2pix's
``optimize_parameters``: ``G(X)`` once (train mode: batch statistics, dropout), then the
discriminator's step on the detached fake and the real pair, then the generator's step, whose
adversarial term is computed with the *updated* discriminator (both in train mode, as in
pix2pix, whose D updates its batch-norm running statistics in every call). Each network has its
own Adam (parameter groups ``generator`` and ``discriminator``); the loss network is a frozen
parameter group ``loss_net``: it is checkpointed with the run, has no optimizer state, always
runs in eval mode (batch-norm running statistics, nothing updated) and no gradient reaches it.

Variables: ``{"params": {"generator", "discriminator", "loss_net"}, "batch_stats": {... of the
networks with batch norm}}``.

Data: axial slices of ``config.data`` (slice view, ``data.min_foreground``); the channels named
in ``synthesis.inputs`` and ``synthesis.targets`` (names of ``data.modalities``) are normalised
to [-1, 1] (``synthesis.normalize``: ``"fixed"`` maps ``synthesis.intensity_range`` linearly
to [-1, 1] and clips, i.e. per dataset, which for data scaled per volume (the phantoms, max
tissue ~1; NIfTI with ``data.normalize="window"``) is a per-volume normalisation and can be
inverted (`denormalize`); ``"slice"`` maps every slice's and channel's min..max to [-1, 1]).
Training slices are jittered as pix2pix (App. C: resize 286 -> random crop 256, i.e. resized by
``synthesis.load_scale`` then cropped back to ``synthesis.image_size``) and flipped left-right
with probability ``synthesis.flip_p``; evaluation slices are only resized to ``image_size``.

Config sections: ``synthesis``, ``loss`` (``lambda1``, ``lambda2``), ``generator``
(`UNetGenerator` fields), ``discriminator`` (`PatchGANDiscriminator` fields), ``loss_net``
(``source``: "none" | "random" | "pretrained"; ``model``: a registry section (``name``
"vgg16" or "resnet" and its fields); ``taps``; ``preprocess``; ``seed``; and the
`jaxmed.train.init.load_pretrained` fields ``path``, ``step``, ``prefix``, ``converter``,
``converter_kwargs``, ``key``, ``strip``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxmed.losses import coper_loss, l1_loss
from jaxmed.methods.loss_network import (FrozenLossNetwork, loss_net_section,
                                         network_variables, with_network_state)
from jaxmed.methods.base import Method
from jaxmed.models.registry import build_model, model_defaults

NORMALIZATIONS = ("fixed", "slice")
# pix2pix's loss_D = (loss_D_fake + loss_D_real) * 0.5.
D_LOSS_SCALE = 0.5
# App. C: images resized to 286 and randomly cropped to 256.
PIX2PIX_LOAD_SCALE = 286 / 256
# Fig. 8: the best lambda1 on validation per task; the task's modalities (Sec. IV-B, Fig. 7).
TASKS = {
    "tumour": dict(inputs=("flair", "t1"), targets=("t2",), lambda1=0.70, pathology="tumour"),
    "ms": dict(inputs=("t1", "t2"), targets=("flair",), lambda1=0.55, pathology="wmh"),
}
# pix2pix: GAN weight 1 against lambda_L1 = 100 on the L1 term, i.e. 1 : 100. Eq. 5's
# reconstruction part (lambda1 L1 + (1 - lambda1) L_CoPer) has unit total weight, so the same
# ratio is lambda2 = 0.01; the paper's printed "lambda2 = 10 (the default [25])" is 1000x that.
PIX2PIX_LAMBDA2 = 0.01
PAPER_LAMBDA2 = 10.0
_ADAM = dict(name="adam", lr=2e-4, b1=0.5)


def _bce(logits: jax.Array, target: float) -> jax.Array:
  """pix2pix's ``GANLoss('vanilla')``: BCE-with-logits against a constant label, mean."""
  logits = logits.astype(jnp.float32)
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)))


class CoPerSynthesisMethod(FrozenLossNetwork, Method):
  """pix2pix with the CoPer loss (Eq. 5); see the module docstring for the config."""

  name = "coper_synthesis"

  def __init__(self, config):
    syn = config.synthesis
    modalities = tuple(config.data.modalities)
    self.inputs, self.targets = tuple(syn.inputs), tuple(syn.targets)
    if not self.inputs or not self.targets:
      raise ValueError(f"synthesis.inputs and synthesis.targets must name at least one "
                       f"modality each; got inputs={self.inputs}, targets={self.targets}")
    missing = [m for m in self.inputs + self.targets if m not in modalities]
    if missing:
      raise ValueError(f"synthesis modalities {missing} are not in data.modalities "
                       f"{modalities}")
    if set(self.inputs) & set(self.targets) or len(set(self.inputs + self.targets)) != len(
        self.inputs + self.targets):
      raise ValueError(f"synthesis.inputs {self.inputs} and targets {self.targets} must be "
                       "distinct modalities")
    self.input_index = tuple(modalities.index(m) for m in self.inputs)
    self.target_index = tuple(modalities.index(m) for m in self.targets)
    self.normalization = syn.normalize
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(f"synthesis.normalize must be one of {NORMALIZATIONS}; got "
                       f"{self.normalization!r}")
    lo, hi = (float(v) for v in syn.intensity_range)
    if not lo < hi:
      raise ValueError(f"synthesis.intensity_range must be (low, high) with low < high; got "
                       f"{tuple(syn.intensity_range)}")
    self.intensity_range = (lo, hi)
    self.image_size = int(syn.image_size)
    self.load_scale = float(syn.load_scale)
    self.flip_p = float(syn.flip_p)
    if self.image_size < 0 or self.load_scale < 1.0 or not 0.0 <= self.flip_p <= 1.0:
      raise ValueError(f"synthesis needs image_size >= 0 (0: the slice's size), load_scale >= 1 "
                       f"and flip_p in [0, 1]; got image_size={self.image_size}, "
                       f"load_scale={self.load_scale}, flip_p={self.flip_p}")
    self.lambda1, self.lambda2 = float(config.loss.lambda1), float(config.loss.lambda2)
    if not 0.0 <= self.lambda1 <= 1.0 or self.lambda2 < 0.0:
      raise ValueError(f"loss.lambda1 must be in [0, 1] and loss.lambda2 >= 0; got "
                       f"lambda1={self.lambda1}, lambda2={self.lambda2}")
    if config.loss_net.source == "none" and self.lambda1 != 1.0:
      raise ValueError(f"loss_net.source='none' leaves no CoPer term: set loss.lambda1=1 (L1 "
                       f"only); got lambda1={self.lambda1}")
    self.check_loss_net(config)
    groups = dict(config.get("param_groups") or {})
    for name in ("generator", "discriminator"):
      if name not in groups or groups[name].get("frozen", False):
        raise ValueError(f"param_groups needs a trainable {name!r} group (pattern "
                         f"'{name}/.*'); got {sorted(groups)}")
    super().__init__(config)

  @classmethod
  def default_config(cls):
    task = TASKS["tumour"]
    vgg = model_defaults("vgg16")
    return {
        "synthesis": dict(inputs=task["inputs"], targets=task["targets"], normalize="fixed",
                          intensity_range=(0.0, 1.0), image_size=256,
                          load_scale=PIX2PIX_LOAD_SCALE, flip_p=0.5),
        "loss": dict(lambda1=task["lambda1"], lambda2=PIX2PIX_LAMBDA2),
        # pix2pix: U-Net-256, batch norm, dropout 0.5; 70x70 PatchGAN (n_layers 3).
        "generator": dict(num_downs=8, ngf=64, norm="batch", dropout=0.5, dtype="float32"),
        "discriminator": dict(ndf=64, n_layers=3, norm="batch", dtype="float32"),
        "loss_net": loss_net_section({"name": "vgg16", **vgg, "batch_norm": True},
                                     preprocess="swav"),
        "param_groups": {
            "generator": dict(pattern="generator/.*", frozen=False, freeze_steps=0,
                              optim=dict(_ADAM)),
            "discriminator": dict(pattern="discriminator/.*", frozen=False, freeze_steps=0,
                                  optim=dict(_ADAM)),
            "loss_net": dict(pattern="loss_net/.*", frozen=True),
        },
        # Adam lr 2e-4 (App. C), beta1 0.5 (pix2pix), constant; no decay, no clipping.
        "optim": dict(name="adam", lr=2e-4, b1=0.5, b2=0.999, schedule="constant",
                      warmup_steps=0, weight_decay=0.0, grad_clip=0.0),
        "data": dict(modalities=("flair", "t1", "t2"), min_foreground=0.1, view="slice"),
    }

  # --- Networks -------------------------------------------------------------------------

  def build_model(self):
    """Builds the three networks; returns the generator (``method.model``)."""
    cfg = self.config
    self.generator = build_model("pix2pix_generator", out_channels=len(self.targets),
                                 **cfg.generator)
    self.discriminator = build_model("patchgan", **cfg.discriminator)
    self.build_loss_net()
    return self.generator

  def init(self, key, batch):
    """Variables of the three networks, shaped by ``batch`` (see the module docstring).

    The generator and discriminator are initialised from ``key``; the loss network from
    ``loss_net.seed`` ("random": the same network in every run of any seed) or from its
    checkpoint ("pretrained", read once per method and kept in memory; a resumed run reads it
    again before restoring its own copy from the checkpoint).
    """
    inputs, target = self.prepare(batch)
    g_key, dropout_key, d_key = jax.random.split(key, 3)
    nets = {
        "generator": self.generator.init({"params": g_key, "dropout": dropout_key}, inputs,
                                         train=False),
        "discriminator": self.discriminator.init(
            d_key, jnp.concatenate([inputs, target], axis=-1), train=False),
    }
    if self.loss_module is not None:
      nets["loss_net"] = self.loss_net_variables()
    collections = dict.fromkeys(c for v in nets.values() for c in v)
    return {c: {name: dict(v[c]) for name, v in nets.items() if c in v} for c in collections}

  def _generate(self, variables, x, *, train: bool, key=None):
    """``(G(x), generator collection updates)``; train mode uses batch statistics and
    dropout (``key``) and returns the updated ``batch_stats``."""
    net = network_variables(variables, "generator")
    if not train:
      return self.generator.apply(net, x, train=False), {}
    rngs = {"dropout": key} if key is not None else {}
    return self.generator.apply(net, x, train=True, rngs=rngs, mutable=["batch_stats"])

  def _discriminate(self, variables, pair, *, train: bool):
    """``(D(pair) patch logits, discriminator collection updates)``."""
    net = network_variables(variables, "discriminator")
    if not train:
      return self.discriminator.apply(net, pair, train=False), {}
    return self.discriminator.apply(net, pair, train=True, mutable=["batch_stats"])

  def apply(self, variables, x, key, *, train: bool, **kwargs):
    """The generator on normalised inputs ``x`` ``(N, H, W, len(inputs))``: ``(output,
    updated model state)``."""
    del kwargs
    out, updates = self._generate(variables, x, train=train, key=key)
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return out, with_network_state(model_state, "generator", updates)

  def generate(self, variables, inputs):
    """The synthesised targets ``(N, H, W, len(targets))`` in [-1, 1] of normalised inputs
    ``(N, H, W, len(inputs))`` in [-1, 1], in eval mode (running statistics, no dropout)."""
    return self._generate(variables, inputs, train=False)[0]

  def synthesize(self, variables, image):
    """Eval-mode synthesis from raw slices ``(N, H, W, C)`` (channels of ``data.modalities``):
    normalised, resized to ``image_size``, generated and resized back; ``(N, H, W,
    len(targets))`` in [-1, 1] (intensities: `denormalize`)."""
    image = jnp.asarray(image)
    inputs, _ = self.prepare({"image": image})
    out = self.generate(variables, inputs)
    if out.shape[1:3] != image.shape[1:3]:
      out = jnp.clip(jax.image.resize(out, (*image.shape[:3], out.shape[-1]), "cubic"), -1, 1)
    return out

  # --- Data -----------------------------------------------------------------------------

  def normalize(self, image: jax.Array) -> jax.Array:
    """Raw intensities ``(N, H, W, C)`` -> [-1, 1] (``synthesis.normalize``)."""
    image = image.astype(jnp.float32)
    if self.normalization == "fixed":
      lo, hi = self.intensity_range
      return jnp.clip((image - lo) / (hi - lo), 0.0, 1.0) * 2.0 - 1.0
    lo = jnp.min(image, axis=(1, 2), keepdims=True)
    hi = jnp.max(image, axis=(1, 2), keepdims=True)
    return (image - lo) / jnp.maximum(hi - lo, 1e-8) * 2.0 - 1.0

  def denormalize(self, x: jax.Array) -> jax.Array:
    """Inverse of `normalize` for ``normalize="fixed"``: [-1, 1] -> intensities."""
    if self.normalization != "fixed":
      raise ValueError("denormalize needs synthesis.normalize='fixed' (per-slice scaling "
                       "cannot be inverted without the slice's range)")
    lo, hi = self.intensity_range
    return (jnp.asarray(x, jnp.float32) + 1.0) * 0.5 * (hi - lo) + lo

  def output_size(self, height: int, width: int) -> tuple[int, int]:
    """Slice size the networks see: ``(image_size, image_size)``, or the slice's own."""
    return (self.image_size, self.image_size) if self.image_size else (height, width)

  def prepare(self, batch, key=None) -> tuple[jax.Array, jax.Array]:
    """``(inputs, target)`` in [-1, 1] of a batch of raw slices ``batch["image"]`` ``(N, H, W,
    C)``: ``(N, S, S, len(inputs))`` and ``(N, S, S, len(targets))``, ``S`` from
    `output_size`. With a ``key`` (training): pix2pix's jitter (resize by ``load_scale``,
    random crop back to ``S``) and a left-right flip with probability ``flip_p``, the same for
    inputs and target; without one (evaluation) only a resize to ``S``."""
    image = jnp.asarray(batch["image"])
    if image.ndim != 4:
      raise ValueError(f"batch['image'] must be (N, H, W, C) slices; got shape {image.shape}")
    image = self.normalize(image[..., list(self.input_index + self.target_index)])
    n, h, w, c = image.shape
    size = self.output_size(h, w)
    if key is None:
      if size != (h, w):
        image = jnp.clip(jax.image.resize(image, (n, *size, c), "cubic"), -1.0, 1.0)
    else:
      crop_key, flip_key = jax.random.split(key)
      load = tuple(int(round(s * self.load_scale)) for s in size)
      if load != (h, w):
        image = jnp.clip(jax.image.resize(image, (n, *load, c), "cubic"), -1.0, 1.0)
      if load != size:
        ky, kx = jax.random.split(crop_key)
        oy = jax.random.randint(ky, (n,), 0, load[0] - size[0] + 1)
        ox = jax.random.randint(kx, (n,), 0, load[1] - size[1] + 1)
        image = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (*size, c)))(
            image, oy, ox)
      flip = jax.random.bernoulli(flip_key, self.flip_p, (n, 1, 1, 1))
      image = jnp.where(flip, image[:, :, ::-1], image)
    k = len(self.inputs)
    return image[..., :k], image[..., k:]

  def augment(self, key, batch):
    """Unused: `prepare` jitters and flips the normalised slices (``data.augment`` is not
    read)."""
    del key
    return batch

  # --- Objective (Eqs. 1-6) ---------------------------------------------------------------

  def discriminator_loss(self, variables, inputs, target, fake, *, train: bool):
    """pix2pix's ``backward_D``: ``0.5 [BCE(D(X, G(X)), 0) + BCE(D(X, Y), 1)]`` (Eq. 6 with the
    conditional D), D on the fake pair first, then on the real one.

    Args:
      variables: the method's variables (``params`` + model state).
      inputs: ``(N, H, W, len(inputs))``; target, fake: ``(N, H, W, len(targets))`` (pass
        ``fake`` detached for the discriminator's step).
      train: D in train mode (batch statistics; running statistics updated).

    Returns:
      ``(loss, (metrics, model state))``.
    """
    model_state = {k: v for k, v in variables.items() if k != "params"}
    logits_fake, updates = self._discriminate(
        variables, jnp.concatenate([inputs, fake], axis=-1), train=train)
    model_state = with_network_state(model_state, "discriminator", updates)
    logits_real, updates = self._discriminate(
        {"params": variables["params"], **model_state},
        jnp.concatenate([inputs, target], axis=-1), train=train)
    model_state = with_network_state(model_state, "discriminator", updates)
    loss_fake, loss_real = _bce(logits_fake, 0.0), _bce(logits_real, 1.0)
    loss = D_LOSS_SCALE * (loss_fake + loss_real)
    metrics = {"loss_d": loss, "d_real": jnp.mean(jax.nn.sigmoid(logits_real)),
               "d_fake": jnp.mean(jax.nn.sigmoid(logits_fake))}
    return loss, (metrics, model_state)

  def generator_loss(self, variables, inputs, target, fake, *, train: bool):
    """Eq. 5, ``lambda1 L_1 + (1 - lambda1) L_CoPer + lambda2 L_adv``, of the generated
    ``fake`` against the discriminator in ``variables`` (the updated one in a training step).

    ``L_1`` is Eq. 1 (mean absolute error), ``L_CoPer`` Eqs. 3-4 through the frozen loss
    network, ``L_adv`` the non-saturating ``BCE(D(X, G(X)), 1)``. A term of weight 0 is still
    reported but passes no gradient (and, for CoPer, costs no backward pass).

    Returns:
      ``(loss, (metrics, model state))``: ``l1``, ``coper`` (0 without a loss network),
      ``adv`` and ``loss_g``.
    """
    model_state = {k: v for k, v in variables.items() if k != "params"}
    l1 = l1_loss(fake, target)
    coper = jnp.zeros((), jnp.float32)
    if self.loss_module is not None:
      pred = fake if self.lambda1 < 1.0 else jax.lax.stop_gradient(fake)
      coper = coper_loss(pred, target, self.features_fn(variables))
    adv_fake = fake if self.lambda2 > 0.0 else jax.lax.stop_gradient(fake)
    logits, updates = self._discriminate(
        variables, jnp.concatenate([inputs, adv_fake], axis=-1), train=train)
    model_state = with_network_state(model_state, "discriminator", updates)
    adv = _bce(logits, 1.0)
    loss = self.lambda1 * l1 + (1.0 - self.lambda1) * coper + self.lambda2 * adv
    return loss, ({"loss_g": loss, "l1": l1, "coper": coper, "adv": adv}, model_state)

  def loss(self, variables, batch, key, *, train, step=0):
    """``L_G + L_D`` at ``variables`` with no update in between (for logging and evaluation;
    training uses `update`, which steps D before G)."""
    del step
    prep_key, gen_key = jax.random.split(key)
    inputs, target = self.prepare(batch, prep_key if train else None)
    fake, updates = self._generate(variables, inputs, train=train, key=gen_key)
    model_state = with_network_state({k: v for k, v in variables.items() if k != "params"},
                                      "generator", updates)
    loss_d, (metrics_d, model_state) = self.discriminator_loss(
        {"params": variables["params"], **model_state}, inputs, target,
        jax.lax.stop_gradient(fake), train=train)
    loss_g, (metrics_g, model_state) = self.generator_loss(
        {"params": variables["params"], **model_state}, inputs, target, fake, train=train)
    return loss_g + loss_d, {**metrics_d, **metrics_g}, model_state

  def update(self, state, batch, key):
    """pix2pix's ``optimize_parameters``: ``G(X)`` once, D's step, then G's step against the
    updated D.

    ``key`` splits into the jitter/flip key (`prepare`) and the generator's dropout key. The
    generator's gradient is the vector-Jacobian product of its single forward pass with the
    gradient of Eq. 5 with respect to its output.
    """
    prep_key, gen_key = jax.random.split(key)
    inputs, target = self.prepare(batch, prep_key)
    params = state.params

    def generate(g_params):
      variables = {"params": {**params, "generator": g_params}, **state.model_state}
      return self._generate(variables, inputs, train=True, key=gen_key)

    fake, g_vjp, g_updates = jax.vjp(generate, params["generator"], has_aux=True)
    state = state.replace(
        model_state=with_network_state(state.model_state, "generator", g_updates))

    def d_loss(d_params):
      variables = {"params": {**params, "discriminator": d_params}, **state.model_state}
      return self.discriminator_loss(variables, inputs, target, jax.lax.stop_gradient(fake),
                                     train=True)

    (loss_d, (metrics_d, model_state)), d_grads = jax.value_and_grad(d_loss, has_aux=True)(
        params["discriminator"])
    state = state.replace(model_state=model_state).apply_gradients(
        {"discriminator": d_grads}, groups=("discriminator",))

    def g_loss(fake):
      return self.generator_loss(state.variables, inputs, target, fake, train=True)

    (loss_g, (metrics_g, model_state)), fake_grad = jax.value_and_grad(g_loss, has_aux=True)(
        fake)
    (g_grads,) = g_vjp(fake_grad)
    state = state.replace(model_state=model_state).apply_gradients(
        {"generator": g_grads}, groups=("generator",))
    return state, {"loss": loss_g + loss_d, **metrics_d, **metrics_g,
                   "grad_norm": optax.tree.norm({"generator": g_grads,
                                                 "discriminator": d_grads}),
                   "grad_norm_g": optax.tree.norm(g_grads),
                   "grad_norm_d": optax.tree.norm(d_grads)}

  # --- Evaluation hooks -----------------------------------------------------------------

  def pretext_example(self, key, batch):
    """``(inputs, target)`` of a batch of raw slices, normalised and resized for evaluation
    (`prepare` without jitter); ``key`` is unused."""
    del key
    return self.prepare(batch)

  def reconstruct(self, variables, batch, key):
    """``(inputs, synthesised target)`` in eval mode, for `ReconstructionEvaluator` (PSNR /
    SSIM in the [-1, 1] space: set its ``data_range=2``)."""
    inputs, _ = self.pretext_example(key, batch)
    return inputs, self.generate(variables, inputs)



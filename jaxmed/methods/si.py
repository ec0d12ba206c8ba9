"""Source identification pre-training of a 2D UNet (source_identification Sec. 3.3, 5.2).

Every example's slice is the common source ``s1`` of ``M~`` mixtures of ``N~`` sources drawn
from a pool of ``N`` (Eq. 12); the UNet takes the mixtures (``T x M~`` channels, Sec. 5.4) and
reconstructs ``s1`` (``T`` channels) under the L1 + L2 loss of Eq. 4 / Eq. 7. Partners are slices
of other subjects (CSI), other slices of the same subject (WSI), both gathered on the host by
`example_transform`, or Gaussian noise drawn in the step (DSI). Samples whose mixed brain regions
do not overlap are excluded from the loss (Sec. 5.2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.data import sources
from jaxmed.losses import l1_loss, l2_loss
from jaxmed.methods.base import Method
from jaxmed.methods._unet import UNET_MODEL, UNetMethod
from jaxmed.pretext.mixing import PartnerSampler, mix_sources, noise_partners

STRATEGIES = ("cross", "within", "denoise")


def _int_field(cfg, name: str) -> int:
  value = cfg.get(name)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"pretext.{name} must be an int; got {value!r}")
  return int(value)


class SourceIdentificationMethod(UNetMethod, Method):
  """Config: ``model`` (UNet fields), ``pretext.strategy`` ("cross" = CSI, "within" = WSI,
  "denoise" = DSI), ``pretext.num_sources`` (N), ``pretext.num_components`` (N~),
  ``pretext.num_mixtures`` (M~), ``pretext.min_overlap``, ``data.modalities`` (T channels).

  Batches carry ``image`` (B, H, W, T); for "cross" / "within" also ``partners``
  (B, N - 1, H, W, T) from `example_transform`, and optionally ``brain_mask`` (B, H, W) with
  ``partner_mask`` (B, N - 1, H, W) for the overlap exclusion.
  """

  name = "si"

  def __init__(self, config):
    cfg = config.pretext
    self.strategy = cfg.get("strategy")
    if self.strategy not in STRATEGIES:
      raise ValueError(f"pretext.strategy must be one of {STRATEGIES}; got {self.strategy!r}")
    self.num_sources = _int_field(cfg, "num_sources")
    self.num_components = _int_field(cfg, "num_components")
    self.num_mixtures = _int_field(cfg, "num_mixtures")
    self.min_overlap = float(cfg.get("min_overlap", 0.0))
    if self.num_sources < 2:
      raise ValueError(f"pretext.num_sources must be >= 2 (the target and a partner); got "
                       f"{self.num_sources}")
    if not 2 <= self.num_components <= self.num_sources:
      raise ValueError(f"pretext.num_components must be in [2, num_sources={self.num_sources}]; "
                       f"got {self.num_components}")
    if self.num_mixtures < 2:
      raise ValueError(f"pretext.num_mixtures must be >= 2 (Sec. 3.3: the target is in every "
                       f"mixture and needs at least two); got {self.num_mixtures}")
    if not 0.0 <= self.min_overlap < 1.0:
      raise ValueError(f"pretext.min_overlap must be in [0, 1); got {self.min_overlap}")
    self.num_partners = self.num_sources - 1
    super().__init__(config)

  @classmethod
  def default_config(cls):
    # Sec. 5.2, Eq. 12: a pool of N = 5 sources, N~ = 3 per mixture, M~ = 2 mixtures; samples
    # whose mixed brain masks overlap less than min_overlap are excluded.
    return {"model": UNET_MODEL,
            "pretext": dict(strategy="cross", num_sources=5, num_components=3, num_mixtures=2,
                            min_overlap=0.0)}

  def model_inputs(self, batch):
    return jnp.tile(batch["image"], (1, 1, 1, self.num_mixtures))

  def example_transform(self, source):
    """Host-side partner gathering for "cross" / "within" (None for "denoise").

    Args:
      source: the training slice rows (`jaxmed.data.sources.SliceSource`, or a dict of arrays
        as `jaxmed.data.datasets.slice_view` returns): columns ``subject_index`` and
        ``slice_index``, rows with ``image`` (H, W, C) and optionally ``brain_mask`` (H, W).
        Partner rows are read from it on demand.

    Returns:
      ``(example, rng) -> example`` adding ``partners`` (N - 1, H, W, C) float32 and, when the
      rows have brain masks, ``partner_mask`` (N - 1, H, W) bool.
    """
    if self.strategy == "denoise":
      return None
    source = sources.as_source(source)
    missing = [k for k in ("subject_index", "slice_index") if k not in source.columns]
    if missing:
      raise ValueError(f"source identification ({self.strategy!r}) needs slice rows with "
                       f"'subject_index' and 'slice_index' columns to draw partners; missing "
                       f"{missing} (got columns {sorted(source.columns)})")
    sampler = PartnerSampler(source.columns["subject_index"], source.columns["slice_index"],
                             strategy=self.strategy, num_partners=self.num_partners)

    def transform(example, rng):
      partners = [source[int(r)] for r in sampler(rng, example["subject_index"],
                                                  example["slice_index"])]
      out = {**example, "partners": np.stack(
          [np.asarray(p["image"], np.float32) for p in partners])}
      if "brain_mask" in partners[0]:
        out["partner_mask"] = np.stack([np.asarray(p["brain_mask"], bool) for p in partners])
      return out

    return transform

  def mix(self, key, batch):
    """`jaxmed.pretext.mixing.SourceMixture` of ``batch`` (partners from the batch or noise)."""
    image = batch["image"]
    noise_key, mix_key = jax.random.split(key)
    target_mask = partner_masks = None
    if self.strategy == "denoise":
      partners = noise_partners(noise_key, image, self.num_partners)
    else:
      if "partners" not in batch:
        raise ValueError(f"pretext.strategy={self.strategy!r} needs batch['partners'] "
                         f"(B, {self.num_partners}, H, W, C) from this method's "
                         f"example_transform; got batch keys {sorted(batch)}")
      partners = batch["partners"]
      if partners.shape[1] != self.num_partners:
        raise ValueError(f"batch['partners'] must hold num_sources - 1 = {self.num_partners} "
                         f"partners; got shape {tuple(partners.shape)}")
      if "partner_mask" in batch and "brain_mask" in batch:
        target_mask, partner_masks = batch["brain_mask"], batch["partner_mask"]
    return mix_sources(mix_key, image, partners, num_mixtures=self.num_mixtures,
                       num_components=self.num_components, target_mask=target_mask,
                       partner_masks=partner_masks, min_overlap=self.min_overlap)

  def loss(self, variables, batch, key, *, train, step=0):
    del step
    """Eq. 4 / Eq. 7: L1 + L2 between ``s1`` and the UNet output, averaged over valid samples
    (0 when none is valid)."""
    mix_key, dropout_key = jax.random.split(key)
    mixture = self.mix(mix_key, batch)
    pred, model_state = self.apply(variables, mixture.inputs, dropout_key, train=train)
    weights = mixture.valid.astype(jnp.float32)[:, None, None, None]
    l1 = l1_loss(pred, mixture.target, weights)
    l2 = l2_loss(pred, mixture.target, weights)
    metrics = {"l1": l1, "l2": l2,
               "valid_fraction": jnp.mean(mixture.valid.astype(jnp.float32))}
    return l1 + l2, metrics, model_state

  def pretext_example(self, key, batch):
    """``(network input (B, H, W, M~ T), target (B, H, W, T))``: the mixtures and ``s1``."""
    mixture = self.mix(key, batch)
    return mixture.inputs, mixture.target

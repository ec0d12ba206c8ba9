"""Source mixing for source identification (source_identification Sec. 3.1-3.3, 5.2).

A pool of ``N`` sources per example: the common source ``s1`` (the target) and ``N - 1``
partners. ``M~`` mixtures of ``N~`` components each are built so that ``s1`` is a component of
every mixture (Eq. 6, Eq. 12); the network sees the mixtures concatenated along channels and
reconstructs ``s1`` only (Eq. 7):

    x_1 = w_1 s_1 + w_2 s_2 + w_3 s_3,    w_1 + w_2 + w_3 = 1
    x_2 = w_4 s_1 + w_5 s_4 + w_6 s_5,    w_4 + w_5 + w_6 = 1      (Eq. 12: N=5, N~=3, M~=2)

Partners are other patients' slices (CSI, Sec. 5.2.1), other slices of the same patient (WSI,
Sec. 5.2.2; both drawn on the host by `PartnerSampler`) or standard normal noise (DSI, Sec. 5.2.3,
Eq. 5 with lambda = 1; `noise_partners`). Samples whose mixed brain regions do not overlap are
flagged invalid (Sec. 5.2: "combinations without any overlapping between the brain regions are
excluded"); shapes stay static, so callers exclude them by weighting.

The JAX functions are pure and usable inside `jax.jit`; `PartnerSampler` is NumPy, for the host
input pipeline.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ("cross", "within")


def _check_counts(batch, num_mixtures, num_components, num_sources=None):
  """Validates the static counts of a mixing layout (Sec. 3.3: M~ >= 2, 2 <= N~ <= N)."""
  for name, value in (("batch", batch), ("num_mixtures", num_mixtures),
                      ("num_components", num_components), ("num_sources", num_sources)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
      raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
  if batch < 1:
    raise ValueError(f"batch must be >= 1; got {batch}")
  if num_mixtures < 2:
    raise ValueError(f"num_mixtures must be >= 2 (the common source must appear in at least two "
                     f"mixtures, Sec. 3.3 of source_identification); got {num_mixtures}")
  if num_components < 2:
    raise ValueError(f"num_components must be >= 2 (the common source plus at least one "
                     f"partner); got {num_components}")
  if num_sources is not None and num_components > num_sources:
    raise ValueError(f"num_components must be <= num_sources; got num_components="
                     f"{num_components} > num_sources={num_sources}")


def mixing_weights(key, batch: int, *, num_mixtures: int, num_components: int) -> jax.Array:
  """Mixing weights, uniform on the simplex per mixture (Eq. 2, Eq. 6, Eq. 12).

  Each row is Dirichlet(1, ..., 1), drawn as normalised exponentials; for ``num_components = 2``
  the first weight is ``w ~ U[0, 1]`` and the second ``1 - w`` (Eq. 2).

  Args:
    key: PRNG key.
    batch: B, number of examples.
    num_mixtures: M~ (>= 2).
    num_components: N~ (>= 2), sources per mixture.

  Returns:
    ``(B, M~, N~)`` float32, non-negative, each row summing to 1.
  """
  _check_counts(batch, num_mixtures, num_components)
  return _mixing_weights(key, batch, num_mixtures, num_components)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _mixing_weights(key, batch, num_mixtures, num_components):
  tiny = jnp.finfo(jnp.float32).tiny
  u = jax.random.uniform(key, (batch, num_mixtures, num_components), jnp.float32,
                         minval=tiny, maxval=1.0)
  e = -jnp.log(u)  # Exp(1) > 0, so the normaliser never vanishes.
  return e / jnp.sum(e, axis=-1, keepdims=True)


def assign_components(key, batch: int, *, num_sources: int, num_mixtures: int,
                      num_components: int) -> jax.Array:
  """Which sources of the pool make up each mixture (Eq. 12).

  Index 0 is the common source ``s1``, always in column 0; the other ``N~ - 1`` entries of a
  mixture are distinct partner indices in ``1 .. N - 1``. They are read cyclically from one random
  permutation of ``1 .. N - 1`` per example, so every partner is used once when
  ``N - 1 >= M~ (N~ - 1)`` (Eq. 12: s2 .. s5), and otherwise partners are reused across mixtures
  but never within one.

  Args:
    key: PRNG key.
    batch: B.
    num_sources: N, the pool size (common source included).
    num_mixtures: M~ (>= 2).
    num_components: N~ with ``2 <= N~ <= N``.

  Returns:
    ``(B, M~, N~)`` int32 indices into the pool ``(s1, partner_1, ..., partner_{N-1})``.
  """
  _check_counts(batch, num_mixtures, num_components, num_sources)
  return _assign_components(key, batch, num_sources, num_mixtures, num_components)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _assign_components(key, batch, num_sources, num_mixtures, num_components):
  num_partners = num_sources - 1
  perm = jnp.argsort(jax.random.uniform(key, (batch, num_partners)), axis=-1).astype(jnp.int32)
  slots = np.arange(num_mixtures * (num_components - 1)) % num_partners
  partners = (perm[:, slots] + 1).reshape(batch, num_mixtures, num_components - 1)
  common = jnp.zeros((batch, num_mixtures, 1), jnp.int32)
  return jnp.concatenate([common, partners], axis=-1)


class SourceMixture(NamedTuple):
  """The output of `mix_sources`.

  Attributes:
    inputs: ``(B, H, W, M~ * C)`` mixtures concatenated along channels, mixture-major
      (channels ``m * C .. (m + 1) * C - 1`` hold ``x_{m+1}``).
    target: ``(B, H, W, C)`` the common source ``s1``, the only reconstruction target.
    weights: ``(B, M~, N~)`` mixing weights (`mixing_weights`).
    components: ``(B, M~, N~)`` pool indices (`assign_components`).
    valid: ``(B,)`` bool, False for samples to exclude (no brain overlap).
  """

  inputs: jax.Array
  target: jax.Array
  weights: jax.Array
  components: jax.Array
  valid: jax.Array


def _check_images(target, partners):
  target, partners = jnp.asarray(target), jnp.asarray(partners)
  if target.ndim != 4:
    raise ValueError(f"target must be (B, H, W, C); got shape {tuple(target.shape)}")
  if partners.ndim != 5 or partners.shape[0] != target.shape[0] or \
      partners.shape[2:] != target.shape[1:] or partners.shape[1] < 1:
    raise ValueError(f"partners must be (B, N - 1, H, W, C) = ({target.shape[0]}, >= 1, "
                     f"{', '.join(map(str, target.shape[1:]))}) to match target; got shape "
                     f"{tuple(partners.shape)}")
  for name, x in (("target", target), ("partners", partners)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be a floating-point array; got dtype {x.dtype}")
  return target, partners


def overlap_valid(components, target_mask, partner_masks, *, min_overlap: float = 0.0):
  """Whether every partner used by a mixture shares enough brain with the target (Sec. 5.2).

  A partner used in any mixture must overlap the target's brain mask in more than
  ``min_overlap * (target brain area)`` pixels; with ``min_overlap = 0`` at least one common
  pixel. Unused partners do not count.

  Args:
    components: ``(B, M~, N~)`` int pool indices (0 = target).
    target_mask: ``(B, H, W)`` bool brain mask of the target.
    partner_masks: ``(B, N - 1, H, W)`` bool brain masks of the partners.
    min_overlap: fraction of the target brain area in ``[0, 1)``.

  Returns:
    ``(B,)`` bool.
  """
  _check_masks(target_mask, partner_masks, min_overlap)
  return _overlap_valid(components, target_mask, partner_masks, jnp.float32(min_overlap))


def _check_masks(target_mask, partner_masks, min_overlap):
  tm, pm = np.shape(target_mask), np.shape(partner_masks)
  if len(tm) != 3 or len(pm) != 4 or pm[0] != tm[0] or pm[2:] != tm[1:]:
    raise ValueError(f"target_mask must be (B, H, W) and partner_masks (B, N - 1, H, W) with the "
                     f"same B, H, W; got {tm} and {pm}")
  if not 0.0 <= float(min_overlap) < 1.0:
    raise ValueError(f"min_overlap must be in [0, 1); got {min_overlap}")


@jax.jit
def _overlap_valid(components, target_mask, partner_masks, min_overlap):
  target_mask, partner_masks = target_mask.astype(bool), partner_masks.astype(bool)
  num_partners = partner_masks.shape[1]
  area = jnp.sum(target_mask, axis=(1, 2)).astype(jnp.float32)
  common = jnp.sum(target_mask[:, None] & partner_masks, axis=(2, 3)).astype(jnp.float32)
  ok = common > min_overlap * area[:, None]
  # (B, N - 1): partner k is a component of some mixture.
  used = jnp.any(components[..., 1:, None] == jnp.arange(1, num_partners + 1), axis=(1, 2))
  return jnp.all(ok | ~used, axis=-1)


def mix_sources(key, target, partners, *, num_mixtures: int = 2, num_components: int = 3,
                target_mask=None, partner_masks=None, min_overlap: float = 0.0) -> SourceMixture:
  """Mixtures sharing the common source ``s1`` (Eq. 6, Eq. 12 of source_identification).

  ``x_m = sum_j w_mj s_{c_mj}`` with weights uniform on the simplex (`mixing_weights`) and
  ``c_m0 = 0`` (the target) in every mixture (`assign_components`).

  Args:
    key: PRNG key.
    target: ``(B, H, W, C)`` float, the common source ``s1``.
    partners: ``(B, N - 1, H, W, C)`` float, the other sources of the pool.
    num_mixtures: M~ (>= 2).
    num_components: N~, sources per mixture, ``2 <= N~ <= N``.
    target_mask, partner_masks: optional ``(B, H, W)`` / ``(B, N - 1, H, W)`` bool brain masks;
      give both or neither. Without masks every sample is valid.
    min_overlap: see `overlap_valid`.

  Returns:
    a `SourceMixture`; ``inputs`` has ``M~ * C`` channels and the dtype of ``target``.
  """
  target, partners = _check_images(target, partners)
  if (target_mask is None) != (partner_masks is None):
    raise ValueError("target_mask and partner_masks must be given together (or neither); got "
                     f"target_mask={'None' if target_mask is None else 'array'}, "
                     f"partner_masks={'None' if partner_masks is None else 'array'}")
  b = target.shape[0]
  num_sources = partners.shape[1] + 1
  _check_counts(b, num_mixtures, num_components, num_sources)
  if target_mask is not None:
    _check_masks(target_mask, partner_masks, min_overlap)
    if np.shape(target_mask) != target.shape[:3]:
      raise ValueError(f"target_mask must be (B, H, W) = {tuple(target.shape[:3])} like target; "
                       f"got {np.shape(target_mask)}")
  return _mix_sources(key, target, partners, target_mask, partner_masks, int(num_mixtures),
                      int(num_components), jnp.float32(min_overlap))


@functools.partial(jax.jit, static_argnums=(5, 6))
def _mix_sources(key, target, partners, target_mask, partner_masks, num_mixtures,
                 num_components, min_overlap):
  b, h, w, c = target.shape
  num_sources = partners.shape[1] + 1
  weight_key, component_key = jax.random.split(key)
  weights = _mixing_weights(weight_key, b, num_mixtures, num_components)
  components = _assign_components(component_key, b, num_sources, num_mixtures, num_components)
  if target_mask is None:
    valid = jnp.ones((b,), bool)
  else:
    valid = _overlap_valid(components, target_mask, partner_masks, min_overlap)

  pool = jnp.concatenate([target[:, None], partners.astype(target.dtype)], axis=1)
  index = components.reshape(b, num_mixtures * num_components, 1, 1, 1)
  picked = jnp.take_along_axis(pool, index, axis=1)
  picked = picked.reshape(b, num_mixtures, num_components, h, w, c)
  mixtures = jnp.sum(weights[..., None, None, None] * picked.astype(jnp.float32),
                     axis=2)                                            # (B, M~, H, W, C)
  inputs = jnp.moveaxis(mixtures, 1, 3).reshape(b, h, w, num_mixtures * c).astype(target.dtype)
  return SourceMixture(inputs=inputs, target=target, weights=weights, components=components,
                       valid=valid)


def noise_partners(key, target, num_partners: int) -> jax.Array:
  """Standard normal partner sources for denoising SI (Eq. 5 with lambda = 1; Sec. 5.2.3).

  Args:
    key: PRNG key.
    target: ``(B, H, W, C)`` float; fixes shape and dtype.
    num_partners: N - 1 (>= 1).

  Returns:
    ``(B, N - 1, H, W, C)`` i.i.d. N(0, 1) noise.
  """
  target = jnp.asarray(target)
  if target.ndim != 4 or not jnp.issubdtype(target.dtype, jnp.floating):
    raise ValueError(f"target must be a float (B, H, W, C) array; got shape "
                     f"{tuple(target.shape)} dtype {target.dtype}")
  if isinstance(num_partners, bool) or not isinstance(num_partners, (int, np.integer)) or \
      num_partners < 1:
    raise ValueError(f"num_partners must be an int >= 1; got {num_partners!r}")
  b, *rest = target.shape
  return jax.random.normal(key, (b, int(num_partners), *rest), target.dtype)


class PartnerSampler:
  """Host-side choice of the partner slices of each example (CSI / WSI, Sec. 5.2.1-5.2.2).

  ``sampler(rng, subject, slice) -> (num_partners,) int64`` rows of the slice table:

  * ``"cross"`` (CSI): one random slice from each of ``num_partners`` distinct subjects other
    than ``subject``; with fewer other subjects than partners, subjects repeat (each other
    subject once before any twice) but the own subject is never used.
  * ``"within"`` (WSI): other slices of ``subject`` (never the example's own slice), distinct
    when the subject has enough slices, else each other slice once before any twice.

  Args:
    subject_index: ``(S,)`` int subject of every row of the slice table.
    slice_index: ``(S,)`` int slice (position in its volume) of every row; ``(subject, slice)``
      pairs must be unique.
    strategy: "cross" or "within".
    num_partners: N - 1 (>= 1).
  """

  def __init__(self, subject_index, slice_index, *, strategy: str, num_partners: int):
    subject_index = np.asarray(subject_index)
    slice_index = np.asarray(slice_index)
    if strategy not in STRATEGIES:
      raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    if isinstance(num_partners, bool) or not isinstance(num_partners, (int, np.integer)) or \
        num_partners < 1:
      raise ValueError(f"num_partners must be an int >= 1; got {num_partners!r}")
    if subject_index.ndim != 1 or slice_index.shape != subject_index.shape or \
        not subject_index.size:
      raise ValueError(f"subject_index and slice_index must be non-empty (S,) arrays of equal "
                       f"length; got shapes {subject_index.shape} and {slice_index.shape}")
    for name, x in (("subject_index", subject_index), ("slice_index", slice_index)):
      if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must be integer; got dtype {x.dtype}")
    self.strategy = strategy
    self.num_partners = int(num_partners)
    # Rows grouped by subject, then by slice: subject u owns rows order[starts[u]:starts[u+1]].
    order = np.lexsort((slice_index, subject_index))
    subjects, starts, counts = np.unique(subject_index[order], return_index=True,
                                         return_counts=True)
    sorted_slices = slice_index[order]
    for u in range(len(subjects)):
      s = sorted_slices[starts[u]:starts[u] + counts[u]]
      if np.any(s[1:] == s[:-1]):
        raise ValueError(f"slice_index must be unique within a subject; subject "
                         f"{int(subjects[u])} repeats a slice")
    if strategy == "cross" and len(subjects) < 2:
      raise ValueError(f"strategy 'cross' needs at least 2 subjects to draw partners from other "
                       f"subjects; the slice table holds only subject {int(subjects[0])}")
    if strategy == "within":
      single = subjects[counts < 2]
      if single.size:
        raise ValueError(f"strategy 'within' needs at least 2 slices per subject; subject(s) "
                         f"{[int(s) for s in single]} have only one slice")
    self._order = order.astype(np.int64)
    self._subjects = subjects
    self._starts = starts.astype(np.int64)
    self._counts = counts.astype(np.int64)
    self._slices = sorted_slices
    self._position = {int(s): u for u, s in enumerate(subjects)}

  def _subject_position(self, subject) -> int:
    try:
      return self._position[int(subject)]
    except KeyError:
      raise ValueError(f"subject {int(subject)} is not in the slice table (subjects "
                       f"{[int(s) for s in self._subjects[:10]]}"
                       f"{' ...' if len(self._subjects) > 10 else ''})") from None

  def _distinct(self, rng: np.random.Generator, n: int) -> np.ndarray:
    """``num_partners`` values in ``0 .. n - 1``, distinct when ``n`` allows, else cyclic."""
    k = self.num_partners
    if n >= k:
      return rng.choice(n, size=k, replace=False)
    return np.resize(rng.permutation(n), k)

  def __call__(self, rng: np.random.Generator, subject, slice) -> np.ndarray:  # pylint: disable=redefined-builtin
    """``(num_partners,)`` int64 rows of the slice table for the example ``(subject, slice)``."""
    u = self._subject_position(subject)
    if self.strategy == "cross":
      others = self._distinct(rng, len(self._subjects) - 1)
      chosen = others + (others >= u)  # skip the own subject
      offsets = rng.integers(0, self._counts[chosen])
      return self._order[self._starts[chosen] + offsets]
    start, count = self._starts[u], self._counts[u]
    own = int(np.searchsorted(self._slices[start:start + count], int(slice)))
    if own >= count or self._slices[start + own] != int(slice):
      raise ValueError(f"slice {int(slice)} of subject {int(subject)} is not in the slice table")
    others = self._distinct(rng, int(count) - 1)
    return self._order[start + others + (others >= own)]

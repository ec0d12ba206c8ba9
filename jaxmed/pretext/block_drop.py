"""Random block dropping, the corruption of the Swin-UNETR recipe's masked-volume in-painting.

Tang et al. 2022, "Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image
Analysis", Sec. 3.2; research-contributions ``SwinUNETR/Pretrain/utils/ops.py``
(``patch_rand_drop``, ``aug_rand``). Per sample of spatial size ``s = (s_0, ..., s_{d-1})``::

    n_drop = U(0, max_drop) * prod(s)                     # voxels to drop (0.3: up to 30%)
    tol_a = int(tolerance * s_a);  mx_a = int(max_block * s_a)
    total = 0
    while total < n_drop:                                 # blocks until enough are dropped
      start_a = randint(0, s_a - tol_a)                   # numpy randint: high excluded
      end_a = min(start_a + randint(tol_a, mx_a), s_a)    # sides in [tol, max_block * s)
      x[:, start:end] = fill                              # every channel
      total += prod(end - start)                          # overlaps counted again

``fill`` is a block of standard normal noise min-max scaled to [0, 1] (over the block and its
channels), or the same block of another sample (``replacement``). `random_block_drop` is
``aug_rand``: a noise drop, then, when a partner index drawn uniformly from the batch is not
the sample's own, a second drop that pastes the partner's voxels.

The loop is a ``jax.lax.while_loop`` per sample (vmapped: the batch runs until its last sample
is done; ``aug_rand``'s two drops run as two phases of one loop), so the box count is the
reference's, with no cap. Differences from the reference:

* the noise of a drop is one field per sample, each block scaled by its own min and max; a
  block's values are the reference's in distribution, but blocks that overlap share the noise
  on the overlap (the reference draws each block afresh);
* a one-voxel block (possible when ``tolerance * s < 2``) is set to 0, where the reference's
  ``0 / 0`` writes NaN;
* the partner's voxels are its input ``images[partner]``; the reference's in-place loop pastes
  a partner with a lower batch index after its own drops.

Static shapes throughout: blocks are indicator boxes, never slices of traced size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.pretext._grid import check_images, check_prob


def block_sides(spatial, *, max_block: float = 0.25,
                tolerance: float = 0.05) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(tol, mx)``: per spatial axis, a block side is drawn from ``[tol, mx)`` (the reference's
  ``int(tolerance * s)`` and ``int(max_block * s)``) and its start from ``[0, s - tol)``.

  Raises:
    ValueError: ``max_block`` or ``tolerance`` outside [0, 1], or an axis where ``mx <= tol``
      (numpy's ``randint`` would raise; the reference cannot run there either).
  """
  max_block = check_prob("max_block", max_block)
  tolerance = check_prob("tolerance", tolerance)
  tol = tuple(int(tolerance * s) for s in spatial)
  mx = tuple(int(max_block * s) for s in spatial)
  bad = [(s, t, m) for s, t, m in zip(spatial, tol, mx) if m <= t or s - t < 1]
  if bad:
    raise ValueError(f"block sides are drawn from [int(tolerance * s), int(max_block * s)) per "
                     f"axis; for spatial size {tuple(spatial)} with max_block={max_block} and "
                     f"tolerance={tolerance} that range is empty at (s, tol, mx) = {bad}")
  return tol, mx


def _box(starts, ends, spatial) -> jax.Array:
  """``(*spatial)`` bool: True inside ``[starts, ends)`` on every axis."""
  inside = jnp.ones((), bool)
  for a, s in enumerate(spatial):
    r = jnp.arange(s)
    shape = [1] * len(spatial)
    shape[a] = s
    inside = inside & ((r >= starts[a]) & (r < ends[a])).reshape(shape)
  return inside


def _drop_one(key, x, paste, second, noise: tuple[bool, bool], max_drop, tol, mx):
  """One sample ``x`` ``(*S, C)``: ``(dropped, mask (*S) bool)`` after up to two drops run as
  one loop (one loop body to compile): phase 0 boxes until ``U(0, max_drop)`` of the voxels are
  counted, then, when ``second``, phase 1 boxes until another ``U(0, max_drop)``. Phase ``p``
  fills with min-max scaled noise when ``noise[p]``, else with ``paste`` ``(*S, C)``."""
  spatial = x.shape[:-1]
  k_amount, k_noise, k_blocks = jax.random.split(key, 3)
  amounts = jax.random.uniform(k_amount, (2,), jnp.float32) * (max_drop * math.prod(spatial))
  amounts = amounts * jnp.stack([jnp.ones((), jnp.float32), jnp.asarray(second, jnp.float32)])
  if any(noise):
    field = jax.random.normal(k_noise, (x.size,), jnp.float32).reshape(x.shape)
  size = np.asarray(spatial, np.int32)
  # Starts in [0, s - tol), then sides in [tol, mx); drawn flat (1-D threefry compiles fastest).
  low = np.concatenate([np.zeros_like(size), np.asarray(tol, np.int32)])
  high = np.concatenate([size - np.asarray(tol, np.int32), np.asarray(mx, np.int32)])
  # The first phase with something to drop (2: none): the reference's `while total < n` runs
  # no box for n = 0.
  first = lambda p: jnp.where(amounts[p] > 0, p, jnp.where(amounts[1] > 0, 1, 2))

  def fill_of(phase_noise, inside):
    if not phase_noise:
      return paste
    where = inside[..., None]  # min-max scaled noise over the box (all channels)
    lo = jnp.min(jnp.where(where, field, jnp.inf))
    hi = jnp.max(jnp.where(where, field, -jnp.inf))
    return jnp.where(hi > lo, (field - lo) / jnp.where(hi > lo, hi - lo, 1.0), 0.0)

  def body(state):
    j, phase, total, out, mask = state
    starts, sides = jnp.split(
        jax.random.randint(jax.random.fold_in(k_blocks, j), low.shape, low, high), 2)
    ends = jnp.minimum(starts + sides, size)
    inside = _box(starts, ends, spatial)
    fill = fill_of(noise[0], inside)
    if noise[1] != noise[0]:
      fill = jnp.where(phase == 0, fill, fill_of(noise[1], inside))
    out = jnp.where(inside[..., None], fill.astype(out.dtype), out)
    total = total + jnp.prod(ends - starts).astype(jnp.float32)
    done = total >= amounts[jnp.minimum(phase, 1)]
    phase = jnp.where(done, jnp.where(phase == 0, first(1), 2), phase)
    return j + 1, phase, jnp.where(done, 0.0, total), out, mask | inside

  state = (jnp.zeros((), jnp.int32), first(0), jnp.zeros((), jnp.float32), x,
           jnp.zeros(spatial, bool))
  _, _, _, out, mask = jax.lax.while_loop(lambda s: s[1] < 2, body, state)
  return out, mask


def _check(images, replacement, max_drop, max_block, tolerance, fn: str):
  check_images(images, floating=True)
  if replacement is not None and tuple(replacement.shape) != tuple(images.shape):
    raise ValueError(f"{fn}: replacement must have the images' shape {tuple(images.shape)}; "
                     f"got {tuple(replacement.shape)}")
  max_drop = check_prob("max_drop", max_drop)
  tol, mx = block_sides(images.shape[1:-1], max_block=max_block, tolerance=tolerance)
  return max_drop, tol, mx


def drop_blocks(key, images, replacement=None, *, max_drop: float = 0.3,
                max_block: float = 0.25, tolerance: float = 0.05):
  """``patch_rand_drop`` on every image: random boxes until ``U(0, max_drop)`` of the voxels
  are counted as dropped, filled with [0, 1]-scaled noise or ``replacement``.

  Args:
    key: PRNG key (one per image is split from it).
    images: ``(N, *S, C)`` float.
    replacement: None (noise) or ``(N, *S, C)``: the voxels pasted into image ``i``'s boxes
      are ``replacement[i]``'s.
    max_drop: the largest fraction of voxels dropped (the reference's 0.3); the fraction of each
      image is ``U(0, max_drop)``, overlaps counted again, the last box overshooting.
    max_block: a box side is below ``max_block * s`` (0.25).
    tolerance: and at least ``tolerance * s`` (0.05); see `block_sides`.

  Returns:
    ``(dropped (N, *S, C) in images' dtype, mask (N, *S) bool)``: True where a box was written.

  Raises:
    ValueError: ``images`` not ``(N, *S, C)``, a ``replacement`` of another shape, fractions
      outside [0, 1], empty side ranges (`block_sides`). TypeError: integer ``images``.
  """
  max_drop, tol, mx = _check(images, replacement, max_drop, max_block, tolerance,
                             "drop_blocks")
  images = jnp.asarray(images)
  noise = (replacement is None, False)
  paste = images if replacement is None else jnp.asarray(replacement)
  one = lambda k, x, r: _drop_one(k, x, r, False, noise, max_drop, tol, mx)
  return jax.vmap(one)(jax.random.split(key, images.shape[0]), images, paste)


def random_block_drop(key, images, *, max_drop: float = 0.3, max_block: float = 0.25,
                      tolerance: float = 0.05):
  """``aug_rand``: a noise `drop_blocks`, then, for each image whose partner (drawn uniformly
  from the batch, itself included) is another image, a `drop_blocks` pasting the partner's
  voxels (``images[partner]``).

  Args:
    key: PRNG key.
    images: ``(N, *S, C)`` float.
    max_drop, max_block, tolerance: see `drop_blocks`, for each of the two drops.

  Returns:
    ``(dropped (N, *S, C), mask (N, *S) bool)``; the in-painting target is ``images``.

  Raises:
    ValueError / TypeError: as `drop_blocks`.
  """
  max_drop, tol, mx = _check(images, None, max_drop, max_block, tolerance, "random_block_drop")
  key, k_partner = jax.random.split(key)
  images = jnp.asarray(images)
  n = images.shape[0]
  partner = jax.random.randint(k_partner, (n,), 0, n)
  one = lambda k, x, r, other: _drop_one(k, x, r, other, (True, False), max_drop, tol, mx)
  return jax.vmap(one)(jax.random.split(key, n), images, images[partner],
                       partner != jnp.arange(n))

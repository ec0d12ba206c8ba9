"""Token and channel masking: MAE / ViT-AE++ random token masking and DAE local (channel) masking.

Static shapes inside ``jit``: a mask is a permutation plus a static count, never a boolean
gather. Models take the masking result as input (``ids_keep``, ``ids_restore``); they never draw
it, so that the same mask can be shared (e.g. by two views) and logged.

MAE's masked autoencoder, with a :class:`jaxmed.models.MaskedAutoencoderViT` ``model``::

  ids_keep, ids_restore, mask = random_masking(key, n, num_tokens, mask_ratio)
  pred, features = model.apply(variables, x, ids_keep, ids_restore)

or the same in one call, ``pred, mask, features = mae_forward(model, variables, x, key)``.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.pretext._grid import concrete_values


def num_keep(num_tokens: int, mask_ratio: float) -> int:
  """Tokens MAE keeps visible: ``int(num_tokens * (1 - mask_ratio))`` (MAE's ``len_keep``).

  Raises:
    ValueError: ``mask_ratio`` outside [0, 1), ``num_tokens < 1``, or a ratio that keeps no token.
  """
  if not isinstance(num_tokens, numbers.Integral) or num_tokens < 1:
    raise ValueError(f"num_tokens must be an int >= 1; got num_tokens={num_tokens!r}")
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must be in [0, 1); got mask_ratio={mask_ratio}")
  keep = int(num_tokens * (1 - mask_ratio))
  if keep < 1:
    raise ValueError(f"mask_ratio={mask_ratio} keeps int({num_tokens} * (1 - {mask_ratio})) = 0 "
                     f"of num_tokens={num_tokens} tokens; lower the ratio")
  return keep


def random_masking(key: jax.Array, n: int, num_tokens: int, mask_ratio: float):
  """Per-sample random token masking by argsort of uniform noise (MAE), with static shapes.

  ``K = int(num_tokens * (1 - mask_ratio))`` tokens are kept per sample (:func:`num_keep`), as in
  MAE and ViT-AE++. Each sample gets its own random subset.

  Args:
    key: a ``jax.random`` key.
    n: batch size N.
    num_tokens: T, patch tokens per sample (no cls token).
    mask_ratio: fraction of tokens to mask, in [0, 1).

  Returns:
    ``ids_keep`` (N, K) int32: kept token indices (a random order); ``ids_restore`` (N, T) int32:
    the inverse of the shuffle ``concat(ids_keep, ids_masked)``; ``mask`` (N, T) float32: 1 for a
    masked token, 0 for a kept one.
  """
  if not isinstance(n, numbers.Integral) or n < 1:
    raise ValueError(f"n must be an int >= 1; got n={n!r}")
  keep = num_keep(num_tokens, mask_ratio)
  noise = jax.random.uniform(key, (n, num_tokens))
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  ids_keep = ids_shuffle[:, :keep]
  mask = (ids_restore >= keep).astype(jnp.float32)
  return ids_keep, ids_restore, mask


def restore_ids(ids_keep: jax.Array, num_tokens: int):
  """``ids_restore`` (N, T) int32 and ``mask`` (N, T) float32 of given kept indices ``ids_keep``.

  For a mask chosen elsewhere (a fixed mask, the same mask for two views, a reference's
  indices). The shuffle is ``concat(ids_keep, masked indices in ascending order)``; ``ids_keep``
  (N, K) must hold distinct indices in ``[0, num_tokens)`` per row.

  Raises:
    ValueError: (before tracing) ``num_tokens`` not an int >= 1, ``ids_keep`` not an integer
      ``(N, K)`` array with ``1 <= K <= num_tokens``; for concrete ``ids_keep`` also an index
      outside ``[0, num_tokens)`` or one repeated within a row (either would give a wrong
      ``ids_restore`` without an error). Inside ``jit`` the value checks are skipped.
  """
  if not isinstance(num_tokens, numbers.Integral) or num_tokens < 1:
    raise ValueError(f"restore_ids: num_tokens must be an int >= 1; got {num_tokens!r}")
  if getattr(ids_keep, "ndim", None) != 2 or not 1 <= ids_keep.shape[1] <= num_tokens:
    raise ValueError(f"ids_keep must have shape (N, K) with 1 <= K <= num_tokens={num_tokens}; "
                     f"got shape {getattr(ids_keep, 'shape', None)}")
  if not jnp.issubdtype(ids_keep.dtype, jnp.integer):
    raise ValueError(f"ids_keep must be integer; got dtype {ids_keep.dtype}")
  _check_token_ids(ids_keep, num_tokens)
  n, k = ids_keep.shape
  keep = jnp.zeros((n, num_tokens), jnp.int32).at[jnp.arange(n)[:, None], ids_keep].set(1)
  masked_first = jnp.argsort(keep, axis=1, stable=True)  # the masked ones (0) first, ascending
  ids_shuffle = jnp.concatenate([ids_keep.astype(jnp.int32),
                                 masked_first[:, :num_tokens - k].astype(jnp.int32)], axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  return ids_restore, (1 - keep).astype(jnp.float32)


def _check_token_ids(ids_keep, num_tokens: int) -> None:
  """Concrete ``ids_keep`` (N, K): indices in ``[0, num_tokens)``, distinct within each row."""
  values = concrete_values(ids_keep)
  if values is None or not values.size:
    return
  what = f"(shape {values.shape}, dtype {values.dtype})"
  lo, hi = values.min(), values.max()
  if lo < 0 or hi >= num_tokens:
    raise ValueError(f"restore_ids: ids_keep must hold token indices in [0, num_tokens="
                     f"{num_tokens}); got values in [{lo}, {hi}] {what}")
  ordered = np.sort(values, axis=1)
  repeats = np.flatnonzero(np.any(ordered[:, 1:] == ordered[:, :-1], axis=1))
  if repeats.size:
    raise ValueError(f"restore_ids: ids_keep must hold distinct indices within a row; rows "
                     f"{repeats[:6].tolist()} repeat one {what}")


def mae_forward(model: Any, variables: Any, x: jax.Array, key: jax.Array,
                mask_ratio: float | None = None, *, train: bool = False,
                return_features: bool = False, **apply_kwargs):
  """Random masking + a :class:`~jaxmed.models.MaskedAutoencoderViT` forward pass.

  ``random_masking(key, N, T, mask_ratio)`` (``mask_ratio`` defaults to ``model.mask_ratio``; T
  from ``model.num_tokens``), then ``model.apply(variables, x, ids_keep, ids_restore, ...)``.

  Args:
    model: a ``MaskedAutoencoderViT`` (anything with ``mask_ratio``, ``num_tokens`` and that
      call signature).
    variables: its variables.
    x: images ``(N, *S, C)``.
    key: the masking key (dropout needs ``rngs={"dropout": ...}`` in ``apply_kwargs``).
    mask_ratio: fraction of masked tokens; None uses ``model.mask_ratio``.
    train, return_features: passed to the model.
    **apply_kwargs: passed to ``model.apply`` (``rngs``, ``mutable``).

  Returns:
    ``(pred (N, T, prod(p) * C), mask (N, T), features)``; with ``mutable`` in
    ``apply_kwargs``, ``((pred, mask, features), updated_collections)``.
  """
  ratio = model.mask_ratio if mask_ratio is None else mask_ratio
  if getattr(x, "ndim", 0) < 3:
    raise ValueError(f"mae_forward expects x of shape (N, *spatial, C); "
                     f"got shape {getattr(x, 'shape', None)}")
  ids_keep, ids_restore, mask = random_masking(key, x.shape[0],
                                               model.num_tokens(x.shape[1:-1]), ratio)
  out = model.apply(variables, x, ids_keep, ids_restore, train=train,
                    return_features=return_features, **apply_kwargs)
  if apply_kwargs.get("mutable"):
    (pred, features), updates = out
    return (pred, mask, features), updates
  pred, features = out
  return pred, mask, features


def channel_masking(key: jax.Array, x: jax.Array, ratio: float = 0.6):
  """DAE local masking: zero ``int(ratio * C)`` channels of the patch embedding.

  One random subset of channels (drawn without replacement) per call, shared by every token and
  every sample, as the DAE reference (``random.sample(range(C), int(0.6 * C))``, then
  ``x * mask``); no mask token.

  Args:
    key: a ``jax.random`` key.
    x: embeddings or tokens, channels last: ``(N, *spatial, C)`` or ``(N, T, C)``.
    ratio: fraction of channels to zero, in [0, 1] (0.6 in DAE).

  Returns:
    ``(masked, mask)``: ``masked`` like ``x`` (``x`` times the 0/1 channel mask), ``mask`` (C,)
    float32, 1 for a zeroed channel.
  """
  if getattr(x, "ndim", 0) < 2:
    raise ValueError(f"channel_masking expects x with a channel axis (N, ..., C); "
                     f"got shape {getattr(x, 'shape', None)}")
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"ratio must be in [0, 1]; got ratio={ratio}")
  c = x.shape[-1]
  num_masked = int(ratio * c)
  chosen = jax.random.permutation(key, c)[:num_masked]
  mask = jnp.zeros((c,), jnp.float32).at[chosen].set(1.0)
  return x * (1.0 - mask).astype(x.dtype), mask

"""Optimizers and learning-rate schedules built from a config.

Config fields (``config.optim``):
  name: "sgd" | "adamw" | "adam".
  lr: peak learning rate.
  schedule: "poly" (nnU-Net: ``lr * (1 - step / total) ** power``), "cosine" (linear warm-up
    then cosine to ``end_lr``), or "constant" (after an optional warm-up).
  warmup_steps, poly_power, end_lr.
  momentum, nesterov: SGD.
  b1, b2, eps: Adam / AdamW.
  weight_decay: decoupled for AdamW; L2 added to the gradient for SGD and Adam (as in
    PyTorch's ``weight_decay`` argument, which nnU-Net and the papers use).
  grad_clip: global-norm clipping threshold (0 disables).
"""

from __future__ import annotations

import optax

_SCHEDULES = ("poly", "cosine", "constant")
_OPTIMIZERS = ("sgd", "adam", "adamw")


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
  """Learning-rate schedule ``step -> lr`` from ``cfg`` (see module docstring)."""
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive; got {total_steps}")
  warmup = int(cfg.get("warmup_steps", 0))
  if not 0 <= warmup < total_steps:
    raise ValueError(f"optim.warmup_steps must be in [0, total_steps={total_steps}); got {warmup}")
  lr = float(cfg.lr)
  name = cfg.get("schedule", "constant")
  if name == "poly":
    # nnU-Net "poly" policy, (1 - epoch / epoch_max) ** 0.9 (source_identification Sec. 5.5.3).
    decay = optax.polynomial_schedule(
        init_value=lr, end_value=0.0, power=float(cfg.get("poly_power", 0.9)),
        transition_steps=total_steps - warmup)
  elif name == "cosine":
    decay = optax.cosine_decay_schedule(
        init_value=lr, decay_steps=total_steps - warmup,
        alpha=float(cfg.get("end_lr", 0.0)) / lr if lr else 0.0)
  elif name == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f"optim.schedule must be one of {_SCHEDULES}; got {name!r}")
  if not warmup:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), decay], boundaries=[warmup])


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """``(optimizer, schedule)`` from ``cfg``: clipping -> weight decay -> update rule -> -lr."""
  schedule = make_schedule(cfg, total_steps)
  name = cfg.get("name", "sgd")
  wd = float(cfg.get("weight_decay", 0.0))
  chain = []
  if cfg.get("grad_clip", 0.0):
    chain.append(optax.clip_by_global_norm(float(cfg.grad_clip)))
  if name == "sgd":
    if wd:
      chain.append(optax.add_decayed_weights(wd))
    chain.append(optax.sgd(schedule, momentum=float(cfg.get("momentum", 0.9)) or None,
                           nesterov=bool(cfg.get("nesterov", False))))
  elif name == "adam":
    if wd:
      chain.append(optax.add_decayed_weights(wd))
    chain.append(optax.adam(schedule, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                            eps=float(cfg.get("eps", 1e-8))))
  elif name == "adamw":
    chain.append(optax.adamw(schedule, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                             eps=float(cfg.get("eps", 1e-8)), weight_decay=wd,
                             mask=_decay_mask))
  else:
    raise ValueError(f"optim.name must be one of {_OPTIMIZERS}; got {name!r}")
  return optax.chain(*chain), schedule


def _decay_mask(params):
  """AdamW decays kernels only (not biases or norm scales), as in timm / big_vision."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda p: p.ndim > 1, params)

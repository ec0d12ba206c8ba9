"""Optimizers and learning-rate schedules built from a config.

Config fields (``config.optim``):
  name: "sgd" | "adamw" | "adam" | "lars".
  lr: peak learning rate.
  schedule: "poly" (nnU-Net: ``lr * (1 - step / total) ** power``), "cosine" (linear warm-up
    then cosine to ``end_lr``), or "constant" (after an optional warm-up).
  warmup_steps, poly_power, end_lr.
  momentum, nesterov: SGD.
  b1, b2, eps: Adam / AdamW.
  weight_decay: decoupled for AdamW; L2 added to the gradient for SGD and Adam (as in
    PyTorch's ``weight_decay`` argument, which nnU-Net and the papers use).
  grad_clip: global-norm clipping threshold (0 disables).
  trust_coefficient, lars_eps: LARS only, read when the config has them (defaults 0.001 and
    1e-8: SwAV's ``LARC(trust_coefficient=0.001)`` and apex's eps).

"lars" is ``optax.lars`` (You et al. 2017) with ``momentum``, ``nesterov`` and ``weight_decay``
on every parameter (SwAV wraps ``torch.optim.SGD(momentum=0.9, weight_decay=1e-6)`` in apex's
``LARC(trust_coefficient=0.001, clip=False)``, which also scales every parameter, biases and
norms included). Per parameter tensor ``w`` with gradient ``g``, both scale
``u = g + wd * w`` by ``trust * ||w|| / (norm + eps)`` (by 1 where ``||w||`` or the norm is 0)
and then take a momentum step, with these differences from LARC:

  * the norm is ``||g + wd * w||`` here, ``||g|| + wd * ||w||`` in LARC: equal for wd = 0 or
    ``g`` parallel to ``w``, otherwise apart by at most ``2 wd ||w|| / ||g||`` relative (small
    with SwAV's wd = 1e-6);
  * optax's momentum accumulates ``lr * u`` (``trace`` after the learning rate), PyTorch's SGD
    accumulates ``u`` and multiplies by the current lr: identical under a constant lr, while
    under a schedule a change of lr reaches the step over ~1 / (1 - momentum) steps here and at
    once in PyTorch;
  * LARC's ``clip=True`` (trust ratio capped at 1 relative to the lr) has no counterpart; SwAV
    uses ``clip=False``.
"""

from __future__ import annotations

import dataclasses
import re

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

_SCHEDULES = ("poly", "cosine", "constant")
_OPTIMIZERS = ("sgd", "adam", "adamw", "lars")


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


def make_optimizer(cfg, total_steps: int, *, step_offset: int = 0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """``(optimizer, schedule)`` from ``cfg``: clipping -> weight decay -> update rule -> -lr.

  ``schedule`` is indexed by the global step. The optimizer reads it at its own update count
  plus ``step_offset``: a group frozen for its first ``step_offset`` steps keeps its state
  (count included) unchanged meanwhile, and so still follows the global schedule after.
  """
  global_schedule = make_schedule(cfg, total_steps)
  schedule = global_schedule
  if step_offset:
    schedule = lambda count: global_schedule(count + step_offset)
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
  elif name == "lars":
    chain.append(optax.lars(schedule, weight_decay=wd,
                            trust_coefficient=float(cfg.get("trust_coefficient", 0.001)),
                            eps=float(cfg.get("lars_eps", 1e-8)),
                            momentum=float(cfg.get("momentum", 0.9)),
                            nesterov=bool(cfg.get("nesterov", False))))
  else:
    raise ValueError(f"optim.name must be one of {_OPTIMIZERS}; got {name!r}")
  return optax.chain(*chain), global_schedule


def _decay_mask(params):
  """AdamW decays kernels only (not biases or norm scales), as in timm / big_vision."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


# --- Parameter groups: several optimizers over one parameter tree (big_vision's optax.make) ---

DEFAULT_GROUP = "default"


@dataclasses.dataclass(frozen=True)
class ParamGroup:
  """One optimizer over the parameters whose ``/``-joined path matches ``pattern``.

  Attributes:
    name: the group's name (its optimizer state is ``opt_state[name]``).
    pattern: a regular expression, matched with ``re.fullmatch`` against paths such as
      ``"discriminator/conv_1/kernel"``.
    tx: the optax transformation (None for a frozen group: no state, never updated).
    schedule: its learning-rate schedule (None when frozen).
    freeze_steps: the group's parameters (and optimizer state) stay unchanged during the first
      ``freeze_steps`` steps (SwAV's prototypes: ``freeze_prototypes_niters``).
  """

  name: str
  pattern: str
  tx: optax.GradientTransformation | None
  schedule: optax.Schedule | None
  freeze_steps: int = 0

  @property
  def frozen(self) -> bool:
    return self.tx is None


@dataclasses.dataclass(frozen=True)
class GroupedOptimizer:
  """Optimizers of parameter groups: each parameter belongs to the first group whose pattern
  matches its path; parameters no group matches belong to ``default`` (``config.optim``).

  The optimizer state is ``{group name: optax state over that group's parameters}``, each a
  nested dict holding only the group's leaves; frozen groups have no entry.
  """

  groups: tuple[ParamGroup, ...]

  def assign(self, params) -> dict[str, list[str]]:
    """``{group name: [parameter paths]}`` for a parameter tree; every group must match
    something (a misspelt pattern is an error)."""
    paths = list(flax.traverse_util.flatten_dict(params, sep="/"))
    out = {g.name: [] for g in self.groups}
    for path in paths:
      for g in self.groups:
        if re.fullmatch(g.pattern, path):
          out[g.name].append(path)
          break
      else:
        raise ValueError(f"parameter {path!r} matches no parameter group "
                         f"({[g.pattern for g in self.groups]})")
    empty = [g.name for g in self.groups if not out[g.name] and g.name != DEFAULT_GROUP]
    if empty:
      raise ValueError(f"param_groups {empty} match no parameter; parameter paths look like "
                       f"{paths[:5]}")
    return out

  def trainable(self) -> tuple[ParamGroup, ...]:
    return tuple(g for g in self.groups if not g.frozen)

  def init(self, params) -> dict:
    """``{group: optax state}`` for the trainable groups that own parameters."""
    members = self.assign(params)
    return {g.name: g.tx.init(_subtree(params, members[g.name]))
            for g in self.trainable() if members[g.name]}

  def update(self, grads, opt_state, params, step, groups=None):
    """``(params, opt_state)`` after one update of ``groups`` (default: every trainable group).

    Groups not named, frozen groups, and groups still inside their ``freeze_steps`` keep their
    parameters and state.
    """
    names = [g.name for g in self.trainable()] if groups is None else list(groups)
    known = {g.name: g for g in self.groups}
    unknown = [n for n in names if n not in known]
    if unknown:
      raise ValueError(f"unknown parameter groups {unknown}; known: {sorted(known)}")
    members = self.assign(params)
    flat = dict(flax.traverse_util.flatten_dict(params, sep="/"))
    opt_state = dict(opt_state)
    for name in names:
      group = known[name]
      if group.frozen or not members[name]:
        continue
      sub_params = _subtree(params, members[name])
      sub_grads = _subtree(grads, members[name])
      updates, new_state = group.tx.update(sub_grads, opt_state[name], sub_params)
      new_params = optax.apply_updates(sub_params, updates)
      if group.freeze_steps:
        still = step < group.freeze_steps
        pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(still, b, a), new, old)
        new_params = pick(new_params, sub_params)
        new_state = pick(new_state, opt_state[name])
      flat.update(flax.traverse_util.flatten_dict(new_params, sep="/"))
      opt_state[name] = new_state
    return flax.traverse_util.unflatten_dict(flat, sep="/"), opt_state

  def learning_rates(self, step) -> dict[str, jax.Array]:
    """``{"lr": config.optim's lr, "lr/<group>": each other trainable group's}`` at ``step``."""
    return {"lr" if g.name == DEFAULT_GROUP else f"lr/{g.name}": g.schedule(step)
            for g in self.trainable()}


def _subtree(tree, paths):
  flat = flax.traverse_util.flatten_dict(tree, sep="/")
  return flax.traverse_util.unflatten_dict({p: flat[p] for p in paths}, sep="/")


_GROUP_FIELDS = ("pattern", "frozen", "freeze_steps", "optim")


def make_grouped_optimizer(config, total_steps: int) -> GroupedOptimizer:
  """Parameter groups from ``config.param_groups`` (name -> ``pattern``, ``frozen``,
  ``freeze_steps``, ``optim``: overrides of ``config.optim`` fields), in order, then a
  ``default`` group with ``config.optim`` for every other parameter.

  E.g. pix2pix: ``param_groups = {"discriminator": dict(pattern="discriminator/.*",
  optim=dict(lr=2e-4, b1=0.5))}``; a loss network: ``dict(pattern="perceptual/.*",
  frozen=True)``.
  """
  groups = []
  for name, spec in (config.get("param_groups") or {}).items():
    spec = dict(spec)
    unknown = sorted(set(spec) - set(_GROUP_FIELDS))
    if unknown or "pattern" not in spec:
      raise ValueError(f"param_groups.{name}: fields must be {_GROUP_FIELDS} with a pattern; "
                       f"got {sorted(spec)}")
    if name == DEFAULT_GROUP:
      raise ValueError(f"param_groups.{name}: {DEFAULT_GROUP!r} is the group of config.optim")
    try:
      re.compile(spec["pattern"])
    except re.error as e:
      raise ValueError(f"param_groups.{name}.pattern {spec['pattern']!r}: {e}") from None
    freeze = int(spec.get("freeze_steps", 0) or 0)
    if freeze < 0:
      raise ValueError(f"param_groups.{name}.freeze_steps must be >= 0; got {freeze}")
    if spec.get("frozen", False):
      groups.append(ParamGroup(name, spec["pattern"], None, None))
      continue
    cfg = ml_collections.ConfigDict(dict(config.optim))
    for key, value in dict(spec.get("optim") or {}).items():
      if key not in cfg:
        raise ValueError(f"param_groups.{name}.optim.{key}: no such optim field "
                         f"({sorted(cfg)})")
      cfg[key] = value
    tx, schedule = make_optimizer(cfg, total_steps, step_offset=freeze)
    groups.append(ParamGroup(name, spec["pattern"], tx, schedule, freeze))
  tx, schedule = make_optimizer(config.optim, total_steps)
  groups.append(ParamGroup(DEFAULT_GROUP, ".*", tx, schedule))
  return GroupedOptimizer(tuple(groups))

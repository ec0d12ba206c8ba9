"""A frozen loss network inside a method (CoPer synthesis's CoPer loss, ViT-AE++'s L_per).

The network is a frozen parameter group ``loss_net``: checkpointed with the run, no optimizer
state, always in eval mode (batch-norm running statistics), no gradient into it. Its weights are
seeded random (``loss_net.source="random"``) or read from ``loss_net.path`` (``"pretrained"``: a
jaxmed run or a PyTorch file) by the trainer before init (`frozen_networks` ->
`jaxmed.train.init.load_frozen_networks` -> `set_frozen_network`); methods read no files.

Config section ``loss_net``: ``source`` ("none" | "random" | "pretrained"), ``model`` (a
registry section: ``name`` "vgg16" or "resnet" and its fields), ``taps``, ``preprocess``
(`jaxmed.losses.perceptual.PREPROCESS`), ``seed`` and the `jaxmed.train.init.load_pretrained`
fields ``path``, ``step``, ``prefix``, ``converter``, ``converter_kwargs``, ``key``, ``strip``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxmed import threefry
from jaxmed.losses import network_features
from jaxmed.losses.perceptual import PREPROCESS
from jaxmed.models.registry import build_model

LOSS_NET_SOURCES = ("none", "random", "pretrained")
_LOAD_FIELDS = ("path", "step", "prefix", "converter", "converter_kwargs", "key", "strip")


def loss_net_section(model: Mapping[str, Any], *, taps=(), preprocess: str) -> dict:
  """The default ``loss_net`` config section: a seeded random ``model``."""
  return dict(source="random", model=dict(model), taps=tuple(taps), preprocess=preprocess,
              seed=0, path="", step=None, prefix="", converter="", converter_kwargs=None,
              key="", strip=())


def network_variables(variables: Mapping[str, Any], name: str) -> dict:
  """The variables of network ``name`` (``"generator"``, ``"loss_net"`` ...) from a method's
  variables, in every collection that has it."""
  return {c: tree[name] for c, tree in variables.items()
          if isinstance(tree, Mapping) and name in tree}


def with_network_state(model_state: Mapping[str, Any], name: str, updates: Mapping) -> dict:
  """``model_state`` (non-param collections) with network ``name``'s entries replaced by
  ``updates`` (e.g. its new ``batch_stats``)."""
  out = dict(model_state)
  for collection, tree in updates.items():
    out[collection] = {**out.get(collection, {}), name: tree}
  return out


class FrozenLossNetwork:
  """Mixin of methods with a frozen loss network (before `Method` in the bases).

  Call `check_loss_net` in ``__init__`` (before ``Method.__init__``) and `build_loss_net` in
  ``build_model``; then `loss_net_variables` (for ``init``) and `features_fn` (for the loss).
  """

  name: str
  config: Any

  def check_loss_net(self, config) -> None:
    """Validates ``config.loss_net`` and its frozen ``param_groups.loss_net`` (present exactly
    when there is a loss network); sets ``loss_source``, ``taps``, ``preprocess``."""
    cfg = config.loss_net
    self.loss_source = cfg.source
    if self.loss_source not in LOSS_NET_SOURCES:
      raise ValueError(f"{self.name}: loss_net.source must be one of {LOSS_NET_SOURCES}; got "
                       f"{self.loss_source!r}")
    if self.loss_source == "pretrained" and not cfg.path:
      raise ValueError(f"{self.name}: loss_net.source='pretrained' needs loss_net.path (a "
                       "jaxmed run or a PyTorch file)")
    if self.loss_source == "random" and cfg.path:
      raise ValueError(f"{self.name}: loss_net.source='random' ignores loss_net.path="
                       f"{cfg.path!r}: set source='pretrained' or clear the path")
    if cfg.preprocess not in PREPROCESS:
      raise ValueError(f"{self.name}: loss_net.preprocess must be one of {PREPROCESS}; got "
                       f"{cfg.preprocess!r}")
    groups = dict(config.get("param_groups") or {})
    has_group = "loss_net" in groups
    if (self.loss_source != "none") != has_group or (
        has_group and not groups["loss_net"].get("frozen", False)):
      raise ValueError(f"{self.name}: param_groups.loss_net must be a frozen group exactly when "
                       f"there is a loss network (loss_net.source={self.loss_source!r}); got "
                       f"groups {sorted(groups)}")
    self.taps = tuple(cfg.taps) or None
    self.preprocess = cfg.preprocess
    self._pretrained = None

  def build_loss_net(self) -> None:
    """``self.loss_module``: the loss network's Flax module (None without one)."""
    self.loss_module = None
    if self.loss_source != "none":
      self.loss_module = build_model(**self.config.loss_net.model)
      # Eager init is slow; its draws hashed together compile faster (the same values).
      self._jitted_loss_net_init = jax.jit(threefry.merge_threefry_calls(self._loss_net_init))

  def _loss_net_init(self, key):
    # The whole feature extractor (every conv), whatever the taps: parameter shapes do not
    # depend on the spatial size, and a checkpoint converts into the full network.
    return self.loss_module.init(key, jnp.zeros((1, 32, 32, 3), jnp.float32), train=False)

  def loss_net_variables(self) -> dict:
    """The loss network's variables: seeded random ("random") or loaded ("pretrained")."""
    cfg = self.config.loss_net
    if self.loss_source == "random":
      return self._jitted_loss_net_init(jax.random.PRNGKey(int(cfg.seed)))
    if self._pretrained is None:
      raise ValueError(
          f"{self.name}: loss_net.source='pretrained': the loss network from {cfg.path!r} is "
          "loaded by the trainer before init (jaxmed.train.init.load_frozen_networks(method)); "
          "call it first when building the method yourself")
    return self._pretrained

  def frozen_networks(self) -> dict[str, tuple[dict, Any]]:
    """``{"loss_net": (load spec, variable shapes)}`` when the loss network is read from
    ``loss_net.path``: the trainer loads it before initialising
    (`jaxmed.train.init.load_frozen_networks`: a jaxmed run, its module found by shape when
    ``prefix`` is "", or a PyTorch file through ``converter``) and hands it to
    `set_frozen_network`."""
    if self.loss_source != "pretrained":
      return {}
    cfg = self.config.loss_net
    spec = {k: cfg[k] for k in _LOAD_FIELDS if k in cfg}
    return {"loss_net": (spec, jax.eval_shape(self._loss_net_init, jax.random.PRNGKey(0)))}

  def set_frozen_network(self, name: str, variables) -> None:
    """Receives the frozen network ``name`` loaded for `frozen_networks`."""
    if name != "loss_net":
      raise ValueError(f"{self.name} has no frozen network {name!r}; it has 'loss_net'")
    self._pretrained = jax.tree.map(jnp.asarray, variables)

  def features_fn(self, variables):
    """``x (M, H, W, 3) -> {tap: features}`` of the frozen loss network
    (`jaxmed.losses.network_features`: eval mode, no gradient to its variables)."""
    return network_features(self.loss_module, network_variables(variables, "loss_net"),
                            taps=self.taps, preprocess=self.preprocess)

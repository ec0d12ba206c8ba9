"""Device mesh and shardings: data parallel over ``data``, parameters optionally over ``fsdp``.

The batch's leading axis is split over both mesh axes; each parameter (and its optimizer
state) is split along its largest dimension divisible by the ``fsdp`` size, else replicated.
Under one global ``jax.jit`` XLA inserts the collectives, so the math is that of one device.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(cfg=None, devices=None) -> Mesh:
  """Mesh with axes ``("data", "fsdp")`` from ``cfg`` (fields ``data``, ``fsdp``; -1 = the rest).

  Args:
    cfg: mapping with ``data`` and ``fsdp`` sizes; ``None`` = all devices on ``data``.
    devices: devices to use (default ``jax.devices()``); ``cfg.num_devices`` > 0 takes the first n.
  """
  cfg = cfg or {}
  devices = list(jax.devices() if devices is None else devices)
  num = int(cfg.get("num_devices", 0) or 0)
  if num:
    if num > len(devices):
      raise ValueError(f"mesh.num_devices={num} but only {len(devices)} devices are available")
    devices = devices[:num]
  data, fsdp = int(cfg.get("data", -1)), int(cfg.get("fsdp", 1))
  n = len(devices)
  if data == -1 and fsdp == -1:
    raise ValueError("at most one of mesh.data and mesh.fsdp may be -1")
  if data == -1:
    data = n // fsdp
  if fsdp == -1:
    fsdp = n // data
  if data * fsdp != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} must equal the number of devices {n}")
  return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_spec(shape, fsdp_size: int) -> P:
  """Split the largest axis divisible by ``fsdp_size``; replicate small or indivisible arrays."""
  if fsdp_size == 1 or not shape or int(np.prod(shape)) < 2**12:
    return P()
  for axis in np.argsort(shape)[::-1]:
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_tree, mesh: Mesh):
  """Per-leaf `NamedSharding` for a (train state) pytree of arrays / ShapeDtypeStructs."""
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp_size)),
                      abstract_tree)


def global_batch(local_batch, mesh: Mesh):
  """Assemble a global, batch-sharded `jax.Array` from this process's part of the batch."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)

"""jaxmed: self-supervised learning for medical images in JAX/Flax."""

from jaxmed import _xla_flags

_xla_flags.apply_cpu_defaults()

__version__ = "0.1.0"

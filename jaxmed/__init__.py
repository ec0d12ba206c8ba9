"""jaxmed: self-supervised learning for medical images in JAX/Flax."""

from jaxmed import _malloc, _xla_flags

_xla_flags.apply_cpu_defaults()
_malloc.apply_malloc_defaults()

__version__ = "0.1.0"

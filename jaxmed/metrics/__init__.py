"""Pure, jit-compiled metric kernels. Importing this package pulls in nothing heavier than jax."""

from jaxmed.metrics.segmentation import dice

__all__ = ["dice"]

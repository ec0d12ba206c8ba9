"""Pretext transforms: pure functions of a key and a batch, usable inside `jit`."""

from jaxmed.pretext.inpaint import grid_cell_mask, grid_inpaint

__all__ = ["grid_cell_mask", "grid_inpaint"]

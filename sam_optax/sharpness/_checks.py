"""Argument checks shared by the sharpness modules (Python-side, before tracing)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def check_batches(batches: Any, name: str = "batches") -> int | None:
    """The common leading size of a pytree of stacked arrays (None for None)."""
    if batches is None:
        return None
    leaves = jax.tree.leaves(batches)
    if not leaves:
        raise ValueError(f"`{name}` has no arrays; pass a pytree of arrays "
                         "stacked on a leading axis.")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise ValueError(
            f"`{name}` must be a pytree of arrays sharing a non-empty leading "
            f"axis (the batch index); got leading sizes {sorted(map(str, sizes))}."
            " Stack a list of batches with "
            "`jax.tree.map(lambda *b: jnp.stack(b), *batch_list)`.")
    return sizes.pop()


def check_grid(values: Any, name: str) -> np.ndarray:
    """``values`` as a finite, non-empty 1-D NumPy array of coordinates."""
    array = np.asarray(values)
    if array.ndim != 1 or array.size < 1:
        raise ValueError(f"`{name}` must be a non-empty 1-D sequence of "
                         f"coordinates; got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` must be finite.")
    return array

"""Argument checks shared by the sharpness modules (Python-side, before tracing)."""

from __future__ import annotations

from typing import Any

import numpy as np

from sam_optax import validation


def check_batches(batches: Any, name: str = "batches") -> int | None:
    """The common leading size of a pytree of stacked arrays (None for None)."""
    if batches is None:
        return None
    stack = ("Stack a list of batches with "
             "`jax.tree.map(lambda *b: jnp.stack(b), *batch_list)`.")
    size = validation.leading_size(batches, name, stack)
    if size == 0:
        raise ValueError(f"`{name}` has an empty leading (batch) axis. {stack}")
    return size


def check_grid(values: Any, name: str) -> np.ndarray:
    """``values`` as a finite, non-empty 1-D NumPy array of coordinates."""
    array = np.asarray(values)
    if array.ndim != 1 or array.size < 1:
        raise ValueError(f"`{name}` must be a non-empty 1-D sequence of "
                         f"coordinates; got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` must be finite.")
    return array

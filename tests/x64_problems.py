"""Float64 JAX losses of the NumPy reference problems, and a runner that
iterates a transformation on them under x64: the comparison with a float64
NumPy reference is then limited by float64 rounding, not float32's.

Call :func:`run_x64` inside ``jax.enable_x64(True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from numpy_reference import TinyMLP
from sam_steps import iterate


def mlp_loss64(problem: TinyMLP) -> Callable[[Any], jax.Array]:
    """:class:`numpy_reference.TinyMLP`'s loss with float64 constants."""
    x = jnp.asarray(problem.x, jnp.float64)
    y = jnp.asarray(problem.y, jnp.float64)

    def loss(p):
        h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
        out = h @ p["l2"]["w"] + p["l2"]["b"]
        return 0.5 * jnp.mean((out - y) ** 2)

    return loss


def run_x64(tx, problem: TinyMLP, steps: int,
            states: Optional[list] = None) -> tuple[list, Any]:
    """Iterate ``tx`` (jitted once) from the problem's float64 init."""
    assert jax.config.jax_enable_x64, "call run_x64 under jax.enable_x64(True)"
    params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), problem.init)
    return iterate(tx, mlp_loss64(problem), params, steps, states=states)


def sorted_leaves(tree) -> list:
    """Leaves in sorted-key order (JAX's flatten order for dicts)."""
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in sorted_leaves(tree[k])]
    return [np.asarray(tree)]


def assert_close64(actual: list, expected: list, rtol: float = 1e-10,
                   atol: float = 1e-12) -> None:
    """Two trajectories of float64 param dicts agree step by step."""
    assert len(actual) == len(expected)
    for t, (a, e) in enumerate(zip(actual, expected, strict=True)):
        for x, y in zip(sorted_leaves(a), sorted_leaves(e),
                        strict=True):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol,
                                       err_msg=f"step {t}")

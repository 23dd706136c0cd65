"""The training step every test file needs, written once.

``sam_step(tx, loss_fn)`` is one SAM step ``(params, state[, batch]) ->
(params, state)`` with ``grad_fn`` bound to the same loss; ``iterate`` runs it
and keeps the params after each step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Optional

import jax
import numpy as np
import optax


def sam_step(tx: optax.GradientTransformation, loss_fn: Callable[..., Any], *,
             jit: bool = True, batched: bool = False) -> Callable:
    """``step(params, state) -> (params, state)`` (``step(params, state,
    batch)`` with ``batched=True``, for ``loss_fn(params, batch)``)."""
    def step(params, state, *batch):
        loss = (lambda p: loss_fn(p, *batch)) if batched else loss_fn
        grad_fn = jax.grad(loss)
        updates, state = tx.update(grad_fn(params), state, params,
                                   grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state
    return jax.jit(step) if jit else step


def iterate(tx: optax.GradientTransformation, loss_fn: Callable[..., Any],
            params: Any, steps: Optional[int] = None, *,
            batches: Optional[Iterable[Any]] = None, jit: bool = True,
            states: Optional[list] = None) -> tuple[list, Any]:
    """Run :func:`sam_step` from ``tx.init(params)``, ``steps`` times or once
    per batch. Returns (params after each step as float64 NumPy trees, the
    final state); ``states``, when given, receives the state after each
    step."""
    step = sam_step(tx, loss_fn, jit=jit, batched=batches is not None)
    state = tx.init(params)
    history = []
    for batch in (batches if batches is not None else [None] * steps):
        args = () if batches is None else (batch,)
        params, state = step(params, state, *args)
        if states is not None:
            states.append(state)
        history.append(jax.tree.map(lambda x: np.asarray(x, np.float64), params))
    return history, state

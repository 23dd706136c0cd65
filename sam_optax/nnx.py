"""SAM with Flax NNX: ``grad_fn`` from ``(model, loss_fn, batch)``.

``nnx.Optimizer.update(model, grads, **kwargs)`` forwards its keywords to
``tx.update``, so ``nnx.Optimizer(model, sam_optax.sam(...), wrt=nnx.Param)``
works as soon as the step passes ``grad_fn``. The optimizer calls it with the
*pure* parameter state (arrays, no ``Variable`` objects); :func:`grad_fn`
builds that function from a snapshot of the model, so users never write
``split``/``merge``.

The perturbed pass runs on a copy of the snapshot: it never mutates the
model's ``BatchStat`` variables or its RNG counters. Taking the snapshot
*before* the clean pass (as :func:`value_and_grad` does) gives the perturbed
pass the clean pass's dropout masks and running statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
from flax import nnx

from sam_optax import validation

PyTree = Any
DropoutKeyPolicy = Literal["same", "folded"]

# Folded into every RNG key of the snapshot for ``dropout_key="folded"``.
_PERTURBED_PASS_SALT = 1


def grad_fn(
    model: nnx.Module,
    loss_fn: Callable[..., Any],
    *args: Any,
    wrt: Any = nnx.Param,
    has_aux: bool = False,
    dropout_key: DropoutKeyPolicy = "same",
) -> Callable[[PyTree], tuple[jax.Array, PyTree]]:
    """The perturbed-pass gradient function of ``loss_fn(model, *args)``.

    The model's state is captured *now*; the returned function evaluates
    ``(L(w'), ∇L(w'))`` for any parameters ``w'`` (a pure ``nnx.State`` of the
    ``wrt`` variables, as ``nnx.Optimizer`` passes it) on a copy of that
    state, so neither ``BatchStat`` nor RNG variables of ``model`` change.

    Args:
      model: the NNX module.
      loss_fn: ``loss_fn(model, *args) -> loss`` (or ``(loss, aux)`` with
        ``has_aux=True``; ``aux`` is dropped).
      *args: the batch (and anything else ``loss_fn`` takes).
      wrt: the filter of the optimized variables; the optimizer's ``wrt``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      dropout_key: ``"same"``: the perturbed pass draws the random numbers of
        the captured RNG state (the clean pass's, when captured before it);
        ``"folded"``: a constant is folded into every captured key first.

    Returns:
      ``grad_fn(params) -> (loss, grads)``, for ``optimizer.update(model,
      grads, grad_fn=...)``.
    """
    validation.check_choice(dropout_key, "dropout_key", ("same", "folded"))
    graphdef, _, rest = nnx.split(model, wrt, ...)
    # Pure arrays: every `merge` builds fresh Variables, so the copy's updates
    # (batch statistics, RNG counts) never reach `model`.
    rest = nnx.as_pure(rest)
    if dropout_key == "folded":
        keys = nnx.as_pure(nnx.state(model, nnx.RngKey))
        folded = jax.tree.map(
            lambda k: jax.random.fold_in(k, _PERTURBED_PASS_SALT), keys)
        rest = nnx.merge_state(rest, folded)

    def loss_at(params: PyTree) -> jax.Array:
        out = loss_fn(nnx.merge(graphdef, params, rest), *args)
        return out[0] if has_aux else out

    def perturbed_value_and_grad(params: PyTree) -> tuple[jax.Array, PyTree]:
        return jax.value_and_grad(loss_at)(params)

    return perturbed_value_and_grad


def value_and_grad(
    model: nnx.Module,
    loss_fn: Callable[..., Any],
    *args: Any,
    wrt: Any = nnx.Param,
    has_aux: bool = False,
    dropout_key: DropoutKeyPolicy = "same",
) -> tuple[Any, PyTree, Callable[[PyTree], tuple[jax.Array, PyTree]]]:
    """The clean pass, its gradient, and the perturbed pass's ``grad_fn``.

    Like ``nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model,
    *args)``: the clean pass updates the model's batch statistics and RNG
    counters. ``grad_fn`` is built (:func:`grad_fn`) from the state *before*
    that pass, so with ``dropout_key="same"`` the perturbed gradient sees the
    clean pass's dropout masks, and its own statistics are discarded.

    Args:
      model, loss_fn, *args, wrt, has_aux, dropout_key: as :func:`grad_fn`.

    Returns:
      ``(value, grads, grad_fn)`` with ``value`` the loss (or ``(loss, aux)``)
      and ``grads`` an ``nnx.State`` of the ``wrt`` variables.

    Example:
      >>> import jax.numpy as jnp, optax, sam_optax
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)),
      ...                        nnx.BatchNorm(8, rngs=nnx.Rngs(0)),
      ...                        nnx.Linear(8, 1, rngs=nnx.Rngs(0)))
      >>> optimizer = nnx.Optimizer(model, sam_optax.sam(optax.sgd(0.1)),
      ...                           wrt=nnx.Param)
      >>> loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
      >>> @nnx.jit
      ... def train_step(model, optimizer, x, y):
      ...   loss, grads, grad_fn = sam_optax.nnx.value_and_grad(
      ...       model, loss_fn, x, y)
      ...   optimizer.update(model, grads, grad_fn=grad_fn, value=loss)
      ...   return loss
      >>> loss = train_step(model, optimizer, jnp.ones((4, 3)), jnp.zeros((4, 1)))
      >>> int(optimizer.step[...])
      1
    """
    perturbed = grad_fn(model, loss_fn, *args, wrt=wrt, has_aux=has_aux,
                        dropout_key=dropout_key)
    value, grads = nnx.value_and_grad(
        loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=has_aux)(model, *args)
    return value, grads, perturbed


__all__ = ["DropoutKeyPolicy", "grad_fn", "value_and_grad"]

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

Data parallelism: :func:`value_and_grad` with ``axis_name`` (inside
``shard_map``, ``pmap`` or a ``vmap`` with that axis) returns each replica's
local gradient (per-replica ε, m-sharpness) and averages the loss and the
model's ``BatchStat`` variables over the axis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Optional

import jax
from flax import nnx

from sam_optax import parallel, validation
from sam_optax.collectives import replica_mean_floats
from sam_optax.types import AxisName, PyTree

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
    axis_name: Optional[AxisName] = None,
) -> tuple[Any, PyTree, Callable[[PyTree], tuple[jax.Array, PyTree]]]:
    """The clean pass, its gradient, and the perturbed pass's ``grad_fn``.

    Like ``nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model,
    *args)``: the clean pass updates the model's batch statistics and RNG
    counters. ``grad_fn`` is built (:func:`grad_fn`) from the state *before*
    that pass, so with ``dropout_key="same"`` the perturbed gradient sees the
    clean pass's dropout masks, and its own statistics are discarded.

    With ``axis_name`` (data parallelism), ``grads`` is this replica's
    **local** gradient -- under ``shard_map`` it is taken at a "varying" copy
    of the parameters, since the gradient w.r.t. replicated ones comes back
    summed over shards -- so a SAM optimizer built with the same
    ``axis_name`` computes ε per replica (m-sharpness) and averages only the
    perturbed gradient. The loss (not ``aux``) and the floating-point
    ``BatchStat`` variables updated by the clean pass are averaged over the
    axis, :math:`s \\leftarrow \\tfrac{1}{n}\\sum_r s^{(r)}`, so every
    replica keeps the same model.

    Args:
      model: as :func:`grad_fn`.
      loss_fn: as :func:`grad_fn`.
      *args: as :func:`grad_fn`.
      wrt: as :func:`grad_fn`.
      has_aux: as :func:`grad_fn`.
      dropout_key: as :func:`grad_fn`.
      axis_name: the mapped axis (or axes) of the surrounding ``shard_map``,
        ``pmap`` or ``vmap``; ``None`` (default) on one device.

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
    differentiate = nnx.value_and_grad(
        loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=has_aux)
    if axis_name is None:
        value, grads = differentiate(model, *args)
        return value, grads, perturbed
    replicated = nnx.as_pure(nnx.state(model, wrt))
    varying = parallel.to_varying(replicated, axis_name)
    if varying is not replicated:  # inside shard_map: a varying copy
        nnx.update(model, varying)
    value, grads = differentiate(model, *args)
    if varying is not replicated:  # the optimizer updates the replicated w
        nnx.update(model, replicated)
    stats = nnx.as_pure(nnx.state(model, nnx.BatchStat))
    nnx.update(model, replica_mean_floats(stats, axis_name))
    if has_aux:
        value = (replica_mean_floats(value[0], axis_name), value[1])
    else:
        value = replica_mean_floats(value, axis_name)
    return value, grads, perturbed


__all__ = ["DropoutKeyPolicy", "grad_fn", "value_and_grad"]

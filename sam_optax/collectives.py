"""Collectives over mapped axes, safe under ``shard_map``'s typing.

The low layer below the core: how a SAM step averages over replicas
(:func:`replica_mean`) and keeps gradients local inside ``jax.shard_map``,
where JAX types every value as varying or invariant over each mesh axis and
``jax.grad`` w.r.t. an invariant (replicated) argument returns the gradient
already summed over shards. Under ``pmap``, ``vmap`` and
``shard_map(check_vma=False)`` nothing is tracked and these helpers reduce to
``lax.pmean`` or to no-ops. The user-facing step builders live above the
core, in :mod:`sam_optax.parallel`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp

from sam_optax.types import AxisName, PyTree

_PCAST_HINT = (
    "Inside `jax.shard_map`, `jax.grad` w.r.t. a replicated (invariant) "
    "argument returns the gradient already summed over shards, so SAM would "
    "see the global gradient instead of each shard's own. Differentiate "
    "w.r.t. `jax.lax.pcast(params, axis_name, to='varying')`, or build the "
    "step with `sam_optax.parallel.shard_map_step` / `data_parallel_step`, "
    "which do this for you.")


def axis_names(axis_name: Optional[AxisName]) -> tuple[str, ...]:
    """``axis_name`` as a tuple of names (``()`` for None)."""
    if axis_name is None:
        return ()
    if isinstance(axis_name, str):
        return (axis_name,)
    return tuple(axis_name)


def varying_axes(x: Any) -> frozenset:
    """The manual mesh axes over which ``x`` may differ (its "vma" type)."""
    aval = jax.typeof(x)
    axis_type = getattr(aval, "manual_axis_type", None)
    if axis_type is not None:
        return frozenset(axis_type.varying)
    return frozenset(getattr(aval, "vma", ()))  # older JAX spelling


def tracked_axes(axis_name: Optional[AxisName]) -> tuple[str, ...]:
    """The axes of ``axis_name`` over which JAX tracks varying/invariant values.

    That is the case inside ``jax.shard_map`` with ``check_vma=True`` (the
    default), where a replicated argument's gradient comes back summed. Under
    ``pmap``, ``vmap`` and ``shard_map(check_vma=False)`` nothing is tracked
    and gradients are local: this returns ``()``.
    """
    manual = set(jax.sharding.get_abstract_mesh().manual_axes)
    return tuple(axis for axis in axis_names(axis_name) if axis in manual
                 and axis in varying_axes(jax.lax.axis_index(axis)))


def to_varying(tree: PyTree, axis_name: Optional[AxisName]) -> PyTree:
    """Cast each leaf to "varying" over the tracked axes it is invariant over.

    A no-op outside ``shard_map`` (pmap, vmap, plain jit). Differentiating a
    loss w.r.t. the result gives each shard's **local** gradient.
    """
    axes = tracked_axes(axis_name)
    if not axes:
        return tree

    def cast(x):
        missing = tuple(a for a in axes if a not in varying_axes(x))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def vary_like(x: jax.Array, *like: Any) -> jax.Array:
    """``x`` typed varying over every manual axis any of ``like`` (arrays
    or trees of them) varies over.

    JAX's sort drops the varying type of its operand under ``shard_map``
    (``jnp.argsort`` of a per-shard array comes back typed as replicated), so
    a result computed from a sort's indices would pass for the same on every
    shard and be silently replaced by one shard's value at the boundary.
    Outside ``shard_map``: ``x`` unchanged.
    """
    axes = frozenset().union(*(varying_axes(leaf)
                               for leaf in jax.tree.leaves(like)))
    missing = tuple(sorted(axes - varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def local_grad_fn(grad_fn: Callable[[PyTree], Any], axis_name: Optional[AxisName]
                  ) -> Callable[[PyTree], Any]:
    """``grad_fn`` evaluated at a varying point, so its gradient is local."""
    if not tracked_axes(axis_name):
        return grad_fn
    return lambda point: grad_fn(to_varying(point, axis_name))


def check_local_gradients(grads: PyTree, axis_name: Optional[AxisName]) -> None:
    """Raise if ``grads`` were summed over shards by ``shard_map``'s transpose.

    Inside ``shard_map`` (``check_vma=True``) a local gradient varies over the
    data axis; a gradient that is invariant there was produced by
    differentiating w.r.t. replicated parameters and is the sum over shards.

    Raises:
      ValueError: naming the axis and the fix (``jax.lax.pcast``).
    """
    for axis in tracked_axes(axis_name):
        for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
            if (jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
                    and axis not in varying_axes(leaf)):
                raise ValueError(
                    f"the gradient leaf {jax.tree_util.keystr(path)} is "
                    f"invariant over the mapped axis {axis!r}: it is not "
                    "this shard's local gradient. " + _PCAST_HINT)


def replica_mean(tree: PyTree, axis_name: Optional[AxisName],
                 axis_index_groups: Optional[Sequence[Sequence[int]]] = None
                 ) -> PyTree:
    """``lax.pmean`` over ``axis_name`` (identity when None), safe under
    ``shard_map``'s varying/invariant typing."""
    if axis_name is None:
        return tree
    # Under shard_map, a value already averaged over some of the axes (e.g.
    # a grouped ε's norm) must be typed varying over all of them first.
    tree = to_varying(tree, axis_name)
    if axis_index_groups is None:
        return jax.lax.pmean(tree, axis_name)
    try:
        return jax.lax.pmean(tree, axis_name,
                             axis_index_groups=axis_index_groups)
    except NotImplementedError as err:  # JAX has groups under pmap only
        raise ValueError(
            "`perturbation_axis_index_groups` works under `jax.pmap` only; "
            "under `jax.shard_map` put the groups on a second mesh axis and "
            "pass it as `perturbation_axis_name`, under `vmap` split the "
            "batch into groups with a second vmap.") from err



def replica_mean_floats(tree: PyTree, axis_name: Optional[AxisName]) -> PyTree:
    """:func:`replica_mean` of the floating-point leaves (losses, metrics,
    BatchNorm statistics); other leaves (counters) are left as they are."""
    leaves, treedef = jax.tree.flatten(tree)
    floats = [i for i, x in enumerate(leaves)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    means = replica_mean([leaves[i] for i in floats], axis_name)
    for i, mean in zip(floats, means, strict=True):
        leaves[i] = mean
    return treedef.unflatten(leaves)

__all__ = [
    "axis_names",
    "check_local_gradients",
    "local_grad_fn",
    "replica_mean",
    "replica_mean_floats",
    "to_varying",
    "tracked_axes",
    "vary_like",
    "varying_axes",
]

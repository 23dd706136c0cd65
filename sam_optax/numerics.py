"""Tree numerics shared by every SAM variant: safe norms, dtypes and masks.

Everything that can produce a NaN lives here, written once:

* global L2 norms are accumulated in float32 (or wider, for float64 leaves);
* a normalisation ``v / ‖v‖`` returns exactly zero for a zero vector and stays
  exact for vectors whose squares under- or overflow (norms from ``1e-33``
  to ``1e31``), by power-of-two rescaling chosen branch-free; outside that
  range the direction is zero (below it, on a GPU that keeps subnormals,
  approximate), never a NaN;
* perturbations are computed in float32 and cast back to each leaf's dtype;
* masks select which leaves take part (``True`` = selected); unselected leaves
  get an exact zero and do not enter any norm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import jax
import jax.numpy as jnp

PyTree = Any
Mask = Union[PyTree, Callable[[PyTree], PyTree], None]


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype a leaf's perturbation arithmetic is done in: float32 or wider."""
    return jnp.promote_types(dtype, jnp.float32)


def is_float(x: Any) -> bool:
    """Whether a leaf takes part in perturbations (inexact dtype)."""
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)


def resolve_mask(mask: Mask, params: PyTree) -> PyTree | None:
    """Turn a mask (bool tree, callable on params, or None) into a bool tree.

    Raises:
      ValueError: if the mask's tree does not match ``params``.
    """
    if mask is None:
        return None
    mask_tree = mask(params) if callable(mask) else mask
    params_struct = jax.tree.structure(params)
    try:
        leaves = params_struct.flatten_up_to(mask_tree)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "`mask` must be a tree of bools with the same structure as params "
            f"(or a callable returning one); params have structure "
            f"{params_struct} but the mask has structure "
            f"{jax.tree.structure(mask_tree)}.") from err
    for leaf in leaves:
        if not isinstance(leaf, (bool, jax.Array)) and not hasattr(leaf, "dtype"):
            raise ValueError(
                "`mask` leaves must be Python bools (or boolean arrays); got "
                f"{type(leaf).__name__}.")
    return params_struct.unflatten(leaves)


def _selected(tree: PyTree, mask_tree: PyTree | None) -> list:
    """Leaves of ``tree`` that take part: float leaves that the mask selects."""
    leaves = jax.tree.leaves(tree)
    if mask_tree is None:
        flags = [True] * len(leaves)
    else:
        flags = jax.tree.structure(tree).flatten_up_to(mask_tree)
    return [x for x, keep in zip(leaves, flags) if keep is not False and is_float(x)]


def sum_of_squares(tree: PyTree, mask_tree: PyTree | None = None) -> jax.Array:
    """Σ x² over the selected float leaves, accumulated in float32 (or wider)."""
    leaves = _selected(tree, mask_tree)
    acc_dtype = jnp.float32
    for x in leaves:
        acc_dtype = jnp.promote_types(acc_dtype, x.dtype)
    total = jnp.zeros([], acc_dtype)
    for x in leaves:
        x = x.astype(acc_dtype)
        total = total + jnp.sum(x * x)
    return total


# Two power-of-two rescalings (exact in binary floating point) between them
# cover every gradient norm from ~1e-33 to ~1e31, where a plain float32 sum of
# squares only covers ~1e-19 to ~1e19:
#
# * Σ(x·2⁶⁰)² is used whenever it is finite, i.e. for norms below ~16. It
#   lifts entries down to ~1e-33 far enough that their squares are normal
#   float32 numbers (XLA flushes subnormals to zero).
# * Σ(x·2⁻⁴⁰)² takes over above that: it is then at least 2⁻⁷², so the
#   squares that matter are normal, and it overflows only past ‖x‖ ~ 2e31.
#
# The factors' ratio (2¹⁰⁰) is as wide as that hand-over allows. Neither is
# more than 2⁶³: when the gradient is a compile-time constant (a loss that
# ignores a parameter), XLA folds (x·c)² into x²·c² despite the barrier below,
# and c² must then be a normal float32 (2⁸⁰ gave 0·inf = NaN). Two sums, not
# three with a plain one: each sum costs ~1.5 % of a SAM step of the benchmark
# MLP on CPU.
_UP = 2.0 ** 60
_DOWN = 2.0 ** -40


def _two_sums_of_squares(tree: PyTree, mask_tree: PyTree | None,
                         up: jax.Array, down: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
    """(Σ(x·up)², Σ(x·down)²) in one pass over each leaf.

    Sibling reductions, which XLA fuses into one loop over the data. Not one
    variadic ``lax.reduce``: XLA's CPU backend does not vectorise those, and
    it made the norm 4× slower (1.1 ms instead of 0.3 ms on the benchmark
    MLP's 0.67 M parameters).
    """
    up_total = down_total = jnp.zeros([], up.dtype)
    for x in _selected(tree, mask_tree):
        x = x.astype(up.dtype)
        if x.size == 0:
            continue
        up_total = up_total + jnp.sum(jnp.square(x * up))
        down_total = down_total + jnp.sum(jnp.square(x * down))
    return up_total, down_total


def _norm_factors(tree: PyTree, mask_tree: PyTree | None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Scalars ``(norm, a, b)`` with ``tree / norm == (tree * a) * b``.

    Branch-free: the two rescaled sums of squares come from one fused pass
    over the data and ``jnp.where`` on scalars picks the one in range. No
    ``lax.cond``, whose predicate costs a device-to-host sync on GPU. A zero
    tree (or one whose norm is below ~1e-33) gives ``norm = 0`` and ``b = 0``:
    a zero direction, never a NaN; past ~1e31 the norm is ``inf`` and the
    direction again zero.
    """
    dtype = jnp.float32
    for x in _selected(tree, mask_tree):
        dtype = jnp.promote_types(dtype, x.dtype)
    # The barrier hides the constants from XLA's simplifier, which would
    # otherwise fold (x·2⁶⁰)² into x²·2¹²⁰ and undo the rescaling.
    up_factor, down_factor = jax.lax.optimization_barrier(
        (jnp.asarray(_UP, dtype), jnp.asarray(_DOWN, dtype)))
    up_sum, down_sum = _two_sums_of_squares(tree, mask_tree, up_factor,
                                            down_factor)
    use_up = jnp.isfinite(up_sum)
    pre = jnp.where(use_up, _UP, _DOWN).astype(dtype)
    scaled_norm = jnp.sqrt(jnp.where(use_up, up_sum, down_sum))
    usable = (scaled_norm > 0) & jnp.isfinite(scaled_norm)
    post = jnp.where(usable, 1.0 / jnp.where(usable, scaled_norm, 1.0), 0.0)
    return scaled_norm / pre, pre, post.astype(dtype)


def plain_norm(tree: PyTree) -> jax.Array:
    """√Σx² in float32 without rescaling, for diagnostics and well-scaled
    trees such as ε (0 if every square underflows)."""
    return jnp.sqrt(sum_of_squares(tree)).astype(jnp.float32)


def global_norm(tree: PyTree, mask_tree: PyTree | None = None) -> jax.Array:
    """‖tree‖₂ over the selected leaves; exact even when squares underflow."""
    return _norm_factors(tree, mask_tree)[0]


def safe_normalize(tree: PyTree, mask_tree: PyTree | None = None,
                   scale: jax.Array | float | None = None
                   ) -> tuple[PyTree, jax.Array]:
    """Return ``(scale · tree / ‖tree‖, ‖tree‖)`` in float32 (or wider).

    A zero (or all-unselected) tree gives a zero direction and norm 0, never a
    NaN; tiny (1e-30) and huge (1e30) trees keep their exact direction.
    Unselected and non-float leaves come back as zeros of the leaf's compute
    dtype. ``scale`` (e.g. ρ) is folded into the scalar factors, so it costs
    nothing per element.
    """
    norm, pre, post = _norm_factors(tree, mask_tree)
    # Two multiplications, not one by pre·post: for norms above ~8e37 the
    # product 1/‖tree‖ is a float32 subnormal, which XLA flushes to zero.
    # Both are fused into the same elementwise loop, so the second is free.
    if scale is not None:
        post = post * jnp.asarray(scale).astype(post.dtype)

    def direction(x, keep):
        if not is_float(x) or keep is False:
            dtype = compute_dtype(x.dtype) if is_float(x) else jnp.float32
            return jnp.zeros(jnp.shape(x), dtype)
        xc = x.astype(compute_dtype(x.dtype))
        return (xc * pre.astype(xc.dtype)) * post.astype(xc.dtype)

    unit = jax.tree.map(direction, tree, mask_flags(tree, mask_tree))
    return unit, norm


def mask_flags(tree: PyTree, mask_tree: PyTree | None) -> PyTree:
    """The resolved mask, or all-``True`` flags shaped like ``tree``."""
    if mask_tree is None:
        return jax.tree.map(lambda _: True, tree)
    return mask_tree


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """⟨a, b⟩ over float leaves, accumulated in float32 (or wider)."""
    total = jnp.zeros([], jnp.float32)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if not (is_float(x) and is_float(y)):
            continue
        dtype = jnp.promote_types(compute_dtype(x.dtype), y.dtype)
        total = total.astype(jnp.promote_types(total.dtype, dtype))
        total = total + jnp.sum(x.astype(dtype) * y.astype(dtype))
    return total


def cosine_similarity(a: PyTree, b: PyTree) -> jax.Array:
    """cos∠(a, b) over the whole tree; 0 when either side is zero."""
    _, pre_a, post_a = _norm_factors(a, None)
    _, pre_b, post_b = _norm_factors(b, None)
    # Rescale before the dot product so it cannot under- or overflow.
    dot = tree_vdot(scale_tree(a, pre_a), scale_tree(b, pre_b))
    return jnp.clip(dot * post_a * post_b, -1.0, 1.0)


def scale_tree(tree: PyTree, factor: jax.Array) -> PyTree:
    """``factor * tree`` computed in the compute dtype (no cast back)."""
    return jax.tree.map(
        lambda x: x.astype(compute_dtype(x.dtype)) * factor.astype(
            compute_dtype(x.dtype)) if is_float(x) else x, tree)


def add_perturbation(params: PyTree, perturbation: PyTree) -> PyTree:
    """``params + ε`` added in float32 (or wider), cast back to params' dtypes."""
    def add(p, e):
        if not is_float(p):
            return p
        wide = compute_dtype(p.dtype)
        return (p.astype(wide) + e.astype(wide)).astype(p.dtype)
    return jax.tree.map(add, params, perturbation)


def cast_like(tree: PyTree, reference: PyTree) -> PyTree:
    """Cast each float leaf of ``tree`` to the dtype of ``reference``'s leaf."""
    return jax.tree.map(
        lambda x, r: x.astype(r.dtype) if is_float(r) else x, tree, reference)


def zeros_like_compute(tree: PyTree) -> PyTree:
    """Zeros shaped like ``tree`` in each leaf's compute dtype."""
    return jax.tree.map(
        lambda x: jnp.zeros(x.shape, compute_dtype(x.dtype))
        if is_float(x) else jnp.zeros_like(x), tree)

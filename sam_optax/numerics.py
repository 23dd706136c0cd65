"""Tree numerics shared by every SAM variant: safe norms, dtypes and masks.

Everything that can produce a NaN lives here, written once:

* global L2 norms are accumulated in float32 (or wider, for float64 leaves);
* a normalisation ``v / ‖v‖`` returns exactly zero for a zero vector and stays
  exact for vectors whose squares under- or overflow (norms from ``1e-33``
  to ``1e31``), by power-of-two rescaling chosen branch-free; outside that
  range the direction is zero (below it, on a GPU that keeps subnormals,
  approximate), never a NaN;
* a vector with an ``inf`` or ``NaN`` entry (on the selected leaves) has the
  norm ``inf``/``NaN`` and the direction **zero**: every ascent then gives
  ε = 0 on every leaf (not a NaN at the bad entries), so the second
  gradient is taken at w itself and ``base_tx`` sees the same non-finite
  gradient (which ``optax.apply_if_finite`` can skip). The diagnostics then
  read ``perturbation_norm = 0`` and ``grad_norm = inf`` (or ``NaN``). The
  check is a scalar predicate from the norm's own sums and a select fused
  into the normalising pass: no extra pass over the parameters;
* perturbations are computed in float32 and cast back to each leaf's dtype;
  leaves may be arrays or Python scalars;
* zeros made for a leaf (state shaped like the params, unselected leaves)
  are sharded like it (:func:`typed_sharding`), so that state stays sharded
  like the parameters when they are (FSDP, ``docs/concepts/parallel.md``);
* masks select which leaves take part (``True`` = selected), as resolved by
  :func:`sam_optax.masks.leaf_flags`; unselected leaves get an exact zero and
  do not enter any norm.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from sam_optax import masks
from sam_optax.types import Mask, PyTree


def leaf_dtype(x: Any) -> jnp.dtype:
    """The dtype of a leaf: an array's own, a Python scalar's default one."""
    return x.dtype if hasattr(x, "dtype") else jnp.result_type(x)


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype a leaf's perturbation arithmetic is done in: float32 or wider."""
    return jnp.promote_types(dtype, jnp.float32)


def is_float(x: Any) -> bool:
    """Whether a leaf takes part in perturbations (inexact dtype)."""
    return jnp.issubdtype(leaf_dtype(x), jnp.inexact)


def as_compute(x: Any) -> jax.Array:
    """A float leaf as an array in its compute dtype."""
    return jnp.asarray(x).astype(compute_dtype(leaf_dtype(x)))


def _zeros_compute(x: Any) -> jax.Array:
    """Zeros shaped like ``x`` in its compute dtype (float32 for non-floats)."""
    dtype = compute_dtype(leaf_dtype(x)) if is_float(x) else jnp.float32
    return _zeros_placed_like(x, dtype)


def typed_sharding(x: Any) -> Optional[jax.sharding.NamedSharding]:
    """The sharding in a traced ``x``'s type, or ``None``.

    Under ``Explicit`` mesh axes an array's type says how it is sharded, and
    a value built from a shape alone (zeros, random draws) comes out
    replicated unless given that sharding (``out_sharding=``). ``None`` for
    anything not traced or sharded over no ``Explicit`` axis (``Auto`` axes,
    one device, inside ``shard_map`` over every axis), where plain
    construction is right.
    """
    if not isinstance(x, Tracer):
        return None
    sharding = jax.typeof(x).sharding
    if sharding.mesh.empty or all(s is None for s in sharding.spec):
        return None
    return sharding


def _zeros_placed_like(x: Any, dtype: Any) -> jax.Array:
    """Zeros shaped and sharded like ``x``, of ``dtype``.

    State shaped like the params (LookSAM's direction, MSAM's ε, EMAs) must
    be sharded like them: replicated zeros would hold a whole parameter-sized
    buffer per device under FSDP, and under ``Explicit`` mesh axes a
    ``lax.cond`` whose other branch returns it sharded does not trace. A
    concrete array's placement, or a traced one's :func:`typed_sharding`, is
    kept. Not ``jnp.zeros_like`` on tracers: inside ``shard_map`` it would
    also copy the varying type.
    """
    if isinstance(x, jax.Array) and not isinstance(x, Tracer):
        return jnp.zeros_like(x, dtype)
    return jnp.zeros(np.shape(x), dtype, out_sharding=typed_sharding(x))


def _flags(tree: PyTree, mask: Mask) -> list[bool]:
    """Per leaf of ``tree``: selected by the mask and of a float dtype."""
    return [keep and is_float(x) for x, keep in zip(
        jax.tree.leaves(tree), masks.leaf_flags(mask, tree), strict=True)]


def _selected(tree: PyTree, mask: Mask) -> list:
    """Leaves of ``tree`` that take part: float leaves that the mask selects."""
    return [jnp.asarray(x) for x, keep in zip(jax.tree.leaves(tree),
                                              _flags(tree, mask), strict=True)
            if keep]


def sum_of_squares(tree: PyTree, mask: Mask = None) -> jax.Array:
    """Σ x² over the selected float leaves, accumulated in float32 (or wider).

    ``mask`` (here and below): ``None``, or a mask resolved against the params
    by :func:`sam_optax.masks.resolve` (a callable would be applied to
    ``tree``, not to the params).
    """
    leaves = _selected(tree, mask)
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
# ignores a parameter), XLA folds (x·c)² into x²·c² despite the barrier in
# _two_sums_of_squares, and c² must then be a normal float32 (2⁸⁰ gave
# 0·inf = NaN). Two sums, not three with a plain one: each sum is a pass
# over the parameters (benchmarks/results/overhead_*.md).
_UP = 2.0 ** 60
_DOWN = 2.0 ** -40


def _two_sums_of_squares(tree: PyTree, mask: Mask,
                         up: jax.Array, down: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
    """(Σ(x·up)², Σ(x·down)²) in one pass over each leaf.

    Sibling reductions, which XLA fuses into one loop over the data. Not one
    variadic ``lax.reduce``: XLA's CPU backend does not vectorise those
    (measured in ``benchmarks/bench_overhead.py``).
    """
    up_total = down_total = jnp.zeros([], up.dtype)
    for x in _selected(tree, mask):
        x = x.astype(up.dtype)
        if x.size == 0:
            continue
        # One barrier per leaf, holding the leaf with the factors: XLA's
        # simplifier cannot fold (x·c)² into x²·c² (which would undo the
        # rescaling), and the factors stay distinct values per leaf until
        # fusion. A barrier on the factors alone gives one broadcast of each
        # per leaf *shape*, shared by the leaves of that shape; XLA:CPU then
        # materialises it as a parameter-sized constant array (+0.5 to
        # +0.7 P on an MLP) instead of fusing it into each sum. The barrier
        # is removed before fusion, so x is not materialised for it.
        x, up_leaf, down_leaf = jax.lax.optimization_barrier((x, up, down))
        up_total = up_total + jnp.sum(jnp.square(x * up_leaf))
        down_total = down_total + jnp.sum(jnp.square(x * down_leaf))
    return up_total, down_total


class NormFactors(NamedTuple):
    """Scalars with ``tree / norm == (tree * pre) * post`` where ``usable``.

    Attributes:
      norm: ‖tree‖₂ over the selected leaves: 0 below the range, ``inf``
        above it or for an ``inf`` entry, ``NaN`` for a ``NaN`` entry.
      pre: the power-of-two rescaling (exact).
      post: ``1 / (norm · pre)`` where ``usable``, else 0.
      usable: whether the direction is defined (``0 < norm < ∞``, every
        selected entry finite); where not, every direction is exactly 0.
    """

    norm: jax.Array
    pre: jax.Array
    post: jax.Array
    usable: jax.Array


def norm_factors(tree: PyTree, mask: Mask = None) -> NormFactors:
    """The :class:`NormFactors` of ``tree``, branch-free.

    Two rescaled sums of squares; ``jnp.where`` on scalars picks the one in
    range. No ``lax.cond``: its predicate costs a device-to-host sync
    on GPU, and the tree, an operand of the branch, would be written out in
    full (+1 P for GAM, fisher_sam +0.17 P: benchmarks/bench_memory.py).
    XLA:CPU reads the tree once per sum rather than fusing them: that is
    sam's 1.04x over a hand-written step on the CPU MLP
    (benchmarks/results/overhead_cpu_candidates.md). A zero tree (or one
    whose norm is below ~1e-33) gives ``norm = 0`` and ``post = 0``: a zero
    direction, never a NaN; past ~1e31 the norm is ``inf`` and the direction
    again zero. An ``inf`` or ``NaN`` entry makes both sums non-finite, so
    ``usable`` is False: the same scalar predicate, no extra pass.

    ``tree · pre`` is exact and keeps the direction, with a norm between
    ~1e-15 and ~2e19 for any norm in the safe range: an ascent that scales
    ``tree`` elementwise before normalising (ASAM's ``T ⊙ g``) scales
    ``tree · pre`` instead, which cannot under- or overflow. The factors
    come from the same two sums as :func:`global_norm`, which XLA computes
    once for both.
    """
    dtype = jnp.float32
    for x in _selected(tree, mask):
        dtype = jnp.promote_types(dtype, x.dtype)

    # (_two_sums_of_squares hides the factors from XLA's simplifier.)
    up_sum, down_sum = _two_sums_of_squares(
        tree, mask, jnp.asarray(_UP, dtype), jnp.asarray(_DOWN, dtype))
    use_up = jnp.isfinite(up_sum)
    pre = jnp.where(use_up, _UP, _DOWN).astype(dtype)
    scaled_norm = jnp.sqrt(jnp.where(use_up, up_sum, down_sum))
    usable = (scaled_norm > 0) & jnp.isfinite(scaled_norm)
    post = jnp.where(usable, 1.0 / jnp.where(usable, scaled_norm, 1.0), 0.0)
    return NormFactors(scaled_norm / pre, pre, post.astype(dtype), usable)




def plain_norm(tree: PyTree) -> jax.Array:
    """√Σx² in float32 without rescaling, for diagnostics and well-scaled
    trees such as ε (0 if every square underflows)."""
    return jnp.sqrt(sum_of_squares(tree)).astype(jnp.float32)


def global_norm(tree: PyTree, mask: Mask = None) -> jax.Array:
    """‖tree‖₂ over the selected leaves; exact even when squares underflow.

    ``inf`` for norms above ~1e31 or an ``inf`` entry, ``NaN`` for a ``NaN``
    entry (what the diagnostics report as ``grad_norm``).
    """
    return norm_factors(tree, mask).norm


class Normalized(NamedTuple):
    """The result of :func:`normalize`.

    Attributes:
      direction: ``scale · tree / ‖tree‖`` on the selected float leaves,
        zeros elsewhere, in each leaf's compute dtype; all zero where not
        ``usable``.
      norm: ‖tree‖₂ over the selected leaves (see :class:`NormFactors`).
      usable: scalar bool, whether ``direction`` is the normalised tree
        (the norm is in range and every selected entry finite) rather than
        zero.
    """

    direction: PyTree
    norm: jax.Array
    usable: jax.Array


def normalize(tree: PyTree, mask: Mask = None,
              scale: jax.Array | float | None = None) -> Normalized:
    """``scale · tree / ‖tree‖`` in float32 (or wider), safe everywhere.

    .. math::

      \\mathrm{direction} = \\begin{cases}
        s \\, x / \\lVert x \\rVert_2 & 0 < \\lVert x \\rVert_2 < ∞
          \\text{ (range 1e-33..1e31), } x \\text{ finite} \\\\
        0 & \\text{otherwise}
      \\end{cases}

    A zero (or all-unselected) tree gives a zero direction and norm 0, never
    a NaN; tiny (1e-30) and huge (1e30) trees keep their exact direction; a
    tree with an ``inf``/``NaN`` entry gives a zero direction. Unselected and
    non-float leaves come back as zeros of the leaf's compute dtype. ``scale``
    (e.g. ρ) is folded into the scalar factors, so it costs nothing per
    element.
    """
    factors = norm_factors(tree, mask)
    pre, post, usable = factors.pre, factors.post, factors.usable
    # Two multiplications, not one by pre·post: for norms above ~8e37 the
    # product 1/‖tree‖ is a float32 subnormal, which XLA flushes to zero.
    # Both are fused into the same elementwise loop, so the second is free.
    if scale is not None:
        post = post * jnp.asarray(scale).astype(post.dtype)

    def direction(x, keep):
        if not keep:
            return _zeros_compute(x)
        xc = as_compute(x)
        # post = 0 alone would leave inf·0 = NaN at a non-finite entry: the
        # select (fused into the same loop) makes the whole direction 0.
        return jnp.where(usable, (xc * pre.astype(xc.dtype))
                         * post.astype(xc.dtype), jnp.zeros([], xc.dtype))

    leaves, treedef = jax.tree.flatten(tree)
    unit = treedef.unflatten([direction(x, keep) for x, keep in zip(
        leaves, _flags(tree, mask), strict=True)])
    return Normalized(unit, factors.norm, usable)


def safe_normalize(tree: PyTree, mask: Mask = None,
                   scale: jax.Array | float | None = None
                   ) -> tuple[PyTree, jax.Array]:
    """``(direction, norm)`` of :func:`normalize`."""
    result = normalize(tree, mask, scale)
    return result.direction, result.norm


def all_finite(tree: PyTree, mask: Mask = None) -> jax.Array:
    """Scalar bool: every selected float entry is finite (True if none).

    Computed as ``isfinite(Σ (x - x))``: ``x - x`` is 0 for a finite entry
    and NaN for an ``inf`` or ``NaN`` one, and the sum is an ordinary float
    reduction. ``all(isfinite(x))`` made XLA:CPU write out the boolean mask
    of each leaf (a quarter of a parameter-sized buffer) before reducing it.
    """
    total = jnp.zeros([], jnp.float32)
    for x in _selected(tree, mask):
        total = total + jnp.sum(x - x).astype(jnp.float32)
    return jnp.isfinite(total)


def select_leaves(tree: PyTree, mask: Mask = None) -> PyTree:
    """``tree`` in the compute dtype on the selected float leaves, exact
    zeros (compute dtype) on the others."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([as_compute(x) if keep else _zeros_compute(x)
                              for x, keep in zip(leaves, _flags(tree, mask),
                                                 strict=True)])


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """⟨a, b⟩ over float leaves, accumulated in float32 (or wider)."""
    total = jnp.zeros([], jnp.float32)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if not (is_float(x) and is_float(y)):
            continue
        dtype = jnp.promote_types(compute_dtype(leaf_dtype(x)), leaf_dtype(y))
        total = total.astype(jnp.promote_types(total.dtype, dtype))
        total = total + jnp.sum(jnp.asarray(x).astype(dtype)
                                * jnp.asarray(y).astype(dtype))
    return total


def cosine_similarity(a: PyTree, b: PyTree) -> jax.Array:
    """cos∠(a, b) over the whole tree; 0 when either side is zero."""
    _, pre_a, post_a, _ = norm_factors(a, None)
    _, pre_b, post_b, _ = norm_factors(b, None)
    # Rescale before the dot product so it cannot under- or overflow.
    dot = tree_vdot(scale_tree(a, pre_a), scale_tree(b, pre_b))
    return jnp.clip(dot * post_a * post_b, -1.0, 1.0)


def scale_tree(tree: PyTree, factor: jax.Array | float) -> PyTree:
    """``factor * tree`` computed in the compute dtype (no cast back)."""
    def scale(x):
        if not is_float(x):
            return x
        xc = as_compute(x)
        return xc * jnp.asarray(factor).astype(xc.dtype)
    return jax.tree.map(scale, tree)


def add_perturbation(params: PyTree, perturbation: PyTree) -> PyTree:
    """``params + ε`` added in float32 (or wider), cast back to params' dtypes."""
    def add(p, e):
        if not is_float(p):
            return p
        wide = as_compute(p)
        return (wide + jnp.asarray(e).astype(wide.dtype)).astype(leaf_dtype(p))
    return jax.tree.map(add, params, perturbation)


def cast_like(tree: PyTree, reference: PyTree) -> PyTree:
    """Cast each float leaf of ``tree`` to the dtype of ``reference``'s leaf."""
    return jax.tree.map(
        lambda x, r: jnp.asarray(x).astype(leaf_dtype(r)) if is_float(r) else x,
        tree, reference)


def zeros_like_compute(tree: PyTree) -> PyTree:
    """Zeros shaped like ``tree`` in each leaf's compute dtype (and zeros of
    the leaf's own dtype for non-float leaves)."""
    return jax.tree.map(
        lambda x: _zeros_compute(x) if is_float(x)
        else _zeros_placed_like(x, leaf_dtype(x)), tree)

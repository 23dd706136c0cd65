"""Ways to combine the clean and the perturbed gradients for ``base_tx``.

A :class:`~sam_optax.core.Descent` receives, on steps that took the second
gradient, the clean gradient ``g = ∇L(w)`` and the perturbed one
``g_sam = ∇L(w + ε)`` and returns what ``base_tx`` sees. On steps a schedule
skipped, its optional ``reuse`` builds that from ``g`` and its own state
(LookSAM) without a second gradient. A descent that declares ``uses_point``
(GAM's) is also handed the :class:`~sam_optax.core.PerturbedPoint` and
evaluates a Hessian-vector product at ``w + ε`` itself.

All arithmetic is done in float32 (or wider); the core casts the result back
to the gradients' dtypes. Projections use :func:`orthogonal_part`, which is
safe when the direction projected out is zero.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import numerics, validation
from sam_optax.ascent import centralize, hessian_vector_product
from sam_optax.core import Descent, DescentResult, PerturbedPoint, no_state
from sam_optax.types import PyTree, ScalarOrSchedule


def _wide(x: jax.Array) -> jax.Array:
    return numerics.as_compute(x)


def _linear_combination(a: float | jax.Array, x: PyTree,
                        b: float | jax.Array, y: PyTree) -> PyTree:
    """``a·x + b·y`` leaf by leaf, in each leaf's compute dtype; a leaf that is
    not float on either side (an integer parameter's gradient, ``float0``)
    is ``x``'s, untouched."""
    def combine(u, v):
        if not (numerics.is_float(u) and numerics.is_float(v)):
            return u
        u, v = _wide(u), _wide(v)
        dtype = jnp.promote_types(u.dtype, v.dtype)
        return (jnp.asarray(a, dtype) * u.astype(dtype)
                + jnp.asarray(b, dtype) * v.astype(dtype))
    return jax.tree.map(combine, x, y)


def orthogonal_part(tree: PyTree, direction: PyTree) -> PyTree:
    """The component of ``tree`` orthogonal to ``direction`` (global dot).

    .. math::

      a_⊥ = a - \\langle a, \\hat b \\rangle \\hat b, \\qquad
      \\hat b = b / \\lVert b \\rVert_2

    ``a`` itself when ``b = 0`` (never NaN); computed in float32 or wider.
    A non-finite ``⟨a, b̂⟩`` (an inf or NaN entry in ``a`` or ``b``) also
    gives ``a``: the bad entry stays where it is instead of spreading to
    every leaf through the projection.
    """
    unit, _ = numerics.safe_normalize(direction)
    along = numerics.tree_vdot(tree, unit)
    along = jnp.where(jnp.isfinite(along), along, jnp.zeros_like(along))
    return _linear_combination(1.0, tree, -along, unit)


def sam_gradient() -> Descent:
    """Plain SAM: ``base_tx`` receives the perturbed gradient ``∇L(w + ε)``.

    References:
      Foret et al. 2021, https://arxiv.org/abs/2010.01412
    """

    def combine(grads, perturbed_grads, state):
        del grads  # not averaged for us: uses_clean_grads=False
        return DescentResult(perturbed_grads, state)

    return Descent(init=no_state, combine=combine, uses_clean_grads=False)


def centralized_gradient() -> Descent:
    """GCSAM's descent: ``base_tx`` receives the centralized perturbed
    gradient :math:`Φ(g_{sam})` (:func:`sam_optax.ascent.centralize`).

    References:
      Hassan et al. 2025, https://arxiv.org/abs/2501.11584
    """
    def combine(grads, perturbed_grads, state):
        del grads  # not averaged for us: uses_clean_grads=False
        return DescentResult(centralize(perturbed_grads), state)

    return Descent(init=no_state, combine=combine, uses_clean_grads=False)


def gsam_gradient(alpha: float = 0.1) -> Descent:
    """GSAM's surrogate-gap guided descent (Zhuang et al. 2022, Alg. 1).

    The clean gradient is split along the perturbed one; its orthogonal part
    is *subtracted*, which lowers the surrogate gap L(w+ε) − L(w) without
    changing the perturbed loss to first order:

    .. math::

      g_⊥ = g - \\langle g, \\hat g_{sam} \\rangle \\hat g_{sam}, \\qquad
      d = g_{sam} - α\\, g_⊥

    ``alpha = 0`` is plain SAM.

    Args:
      alpha: weight α ∈ [0, 1] of the surrogate-gap term.

    References:
      Zhuang et al., Surrogate Gap Guided Sharpness-Aware Minimization,
      ICLR 2022. https://arxiv.org/abs/2203.08065
    """
    validation.check_in_range(alpha, "alpha", 0.0, 1.0)

    def combine(grads, perturbed_grads, state):
        grads_orthogonal = orthogonal_part(grads, perturbed_grads)
        return DescentResult(_linear_combination(1.0, perturbed_grads, -alpha,
                                                 grads_orthogonal), state)

    return Descent(init=no_state, combine=combine)


def _sharpness_weight(gamma: float | jax.Array) -> float | jax.Array:
    """γ/(1−γ); a Python float stays one (exact under x64), a traced γ (from
    ``optax.inject_hyperparams``) stays traced."""
    validation.check_in_range(gamma, "gamma", 0.0, 1.0, high_open=True)
    if not isinstance(gamma, jax.Array):
        gamma = float(gamma)
    return gamma / (1.0 - gamma)


def wsam_gradient(gamma: float = 0.9) -> Descent:
    """WSAM, coupled form: the weighted sharpness enters the gradient.

    WSAM minimises :math:`L(w) + \\frac{γ}{1-γ}(L(w+ε) - L(w))`, whose gradient
    is handed to ``base_tx``:

    .. math::

      d = \\frac{1 - 2γ}{1 - γ}\\, g + \\frac{γ}{1 - γ}\\, g_{sam}

    ``gamma = 0`` is the base optimizer (on ``g``), ``gamma = 0.5`` is SAM.

    Args:
      gamma: sharpness weight γ ∈ [0, 1).

    References:
      Yue et al., Sharpness-Aware Minimization Revisited: Weighted Sharpness
      as a Regularization Term, KDD 2023. https://arxiv.org/abs/2305.15817
    """
    weight = _sharpness_weight(gamma)

    def combine(grads, perturbed_grads, state):
        return DescentResult(_linear_combination(1.0 - weight, grads, weight,
                                                 perturbed_grads), state)

    return Descent(init=no_state, combine=combine)


class DecoupledSharpnessState(NamedTuple):
    """State of :func:`wsam_decoupled_gradient`.

    Attributes:
      count: number of updates so far (int32), where η_t is evaluated.
    """

    count: jax.Array


def wsam_decoupled_gradient(gamma: float = 0.9,
                            learning_rate: ScalarOrSchedule = 0.1) -> Descent:
    """WSAM, decoupled form (Yue et al. 2023, Alg. 1): ``base_tx`` sees ``g``.

    ``base_tx`` receives the clean gradient ``g``; the sharpness gradient is
    a plain SGD step of its own, added to ``base_tx``'s update (the
    descent's ``correction``), like decoupled weight decay:

    .. math::

      u = \\mathrm{base\\_tx}(g) - η_t \\frac{γ}{1-γ}(g_{sam} - g)

    On a step a schedule skips there is no ``g_sam`` and no sharpness step.

    Args:
      gamma: sharpness weight γ ∈ [0, 1).
      learning_rate: η_t, a float or a schedule of the step count (the
        learning rate ``base_tx`` uses).
    """
    weight = _sharpness_weight(gamma)
    validation.check_nonnegative_scalar_or_schedule(learning_rate,
                                                    "learning_rate")

    def init(params):
        del params
        return DecoupledSharpnessState(jnp.zeros([], jnp.int32))

    def combine(grads, perturbed_grads, state):
        lr = (learning_rate(state.count) if callable(learning_rate)
              else learning_rate)
        step = -jnp.asarray(lr) * weight
        # η·γ/(1−γ) in each leaf's compute dtype: float64 under x64.
        correction = _linear_combination(step, perturbed_grads, -step, grads)
        return DescentResult(grads, _next(state), correction)

    def reuse(grads, state):
        return DescentResult(grads, _next(state))

    return Descent(init=init, combine=combine, reuse=reuse,
                   corrects_updates=True)


def _next(state: DecoupledSharpnessState) -> DecoupledSharpnessState:
    return DecoupledSharpnessState(
        jnp.asarray(optax.safe_int32_increment(state.count)))


class LookSAMState(NamedTuple):
    """State of :func:`looksam_gradient`.

    Attributes:
      orthogonal_direction: :math:`g_v / \\lVert g_v \\rVert`, the unit
        direction of the part of the last ``g_sam`` orthogonal to its clean
        gradient (zero if that part is zero), in float32 (or wider). Stored
        normalised so that a reuse step needs no norm of it.
    """

    orthogonal_direction: PyTree


def looksam_gradient(alpha: float = 0.7) -> Descent:
    """LookSAM's reuse of the sharpness direction (Liu et al. 2022, Alg. 1).

    On steps with a second gradient, ``base_tx`` receives ``g_sam`` and the
    state keeps its component orthogonal to ``g``:

    .. math::

      g_v = g_{sam} - \\lVert g_{sam} \\rVert \\cos θ\\, \\frac{g}{\\lVert g
      \\rVert} = g_{sam} - \\langle g_{sam}, \\hat g \\rangle \\hat g

    On the other steps, with the fresh ``g`` and no second gradient:

    .. math::

      d = g + α \\frac{\\lVert g \\rVert}{\\lVert g_v \\rVert} g_v

    Norms and the dot product are global over all leaves (the paper's
    PyTorch code uses per-tensor ones). ``g_v = 0`` gives ``d = g``, and so
    does a ``‖g‖`` that is non-finite or beyond the norm's range (~1e31).

    Args:
      alpha: weight α ≥ 0 of the reused direction.

    References:
      Liu et al., Towards Efficient and Scalable Sharpness-Aware Minimization,
      CVPR 2022. https://arxiv.org/abs/2203.02714
    """
    validation.check_in_range(alpha, "alpha", 0.0, float("inf"),
                              high_open=True)

    def init(params):
        return LookSAMState(numerics.zeros_like_compute(params))

    def combine(grads, perturbed_grads, state):
        unit, _ = numerics.safe_normalize(
            orthogonal_part(perturbed_grads, grads))
        # The stored direction keeps init's dtypes on every leaf (an integer
        # leaf's zeros too), so both branches of the schedule's cond agree.
        unit = jax.tree.map(lambda u, old: u.astype(old.dtype), unit,
                            state.orthogonal_direction)
        return DescentResult(perturbed_grads, LookSAMState(unit))

    def reuse(grads, state):
        scale = alpha * numerics.global_norm(grads)
        # ‖g‖ non-finite or beyond the norm's range (~1e31): no reused term
        # (d = g), rather than inf·0 = NaN or an inf in every leaf.
        scale = jnp.where(jnp.isfinite(scale), scale, jnp.zeros_like(scale))
        return DescentResult(_linear_combination(
            1.0, grads, scale, state.orthogonal_direction), state)

    return Descent(init=init, combine=combine, reuse=reuse)


def gradient_norm_gradient(alpha: float = 0.1) -> Descent:
    """GAM's descent (Zhang et al. 2023, Alg. 1): the loss gradient plus α
    times the gradient of the first-order flatness.

    With ``θ_adv = w + ε`` from :func:`sam_optax.ascent.gradient_norm_ascent`,
    ``g_adv = ∇L(θ_adv)`` the core's perturbed gradient and
    ``R⁽¹⁾_ρ(w) = ρ max_{‖δ‖≤ρ} ‖∇L(w + δ)‖``:

    .. math::

      ∇R^{(1)}_ρ(w) ≈ ρ\\, ∇^2 L(θ_{adv}) \\frac{g_{adv}}{\\lVert g_{adv}
      \\rVert_2}, \\qquad d = g + α\\, ∇R^{(1)}_ρ(w)

    The Hessian-vector product is taken exactly at ``θ_adv`` through the
    :class:`~sam_optax.core.PerturbedPoint` (``uses_point=True``), one
    ``jax.jvp`` of its ``grad_fn``: about two gradient evaluations. Under
    ``axis_name`` it is the replica average of each shard's product at its
    own ``θ_adv`` along the averaged ``ĝ_adv``, the same on every replica.
    ``g_adv = 0`` gives ``d = g``, never a NaN. ``alpha = 0`` is the base
    optimizer on ``g`` (the second gradient and both products are then
    wasted).

    Args:
      alpha: weight α ≥ 0 of the first-order flatness.

    References:
      Zhang, Xu, Yu, Zou, Cui. Gradient Norm Aware Minimization Seeks
      First-Order Flatness and Improves Generalization. CVPR 2023.
      https://arxiv.org/abs/2303.03108
    """
    validation.check_in_range(alpha, "alpha", 0.0, float("inf"),
                              high_open=True)

    def combine(grads, perturbed_grads, state, *, point: PerturbedPoint):
        unit = numerics.normalize(perturbed_grads).direction
        curvature = hessian_vector_product(point.grad_fn,
                                           point.perturbed_params(), unit)
        return DescentResult(_linear_combination(
            1.0, grads, alpha * point.rho, curvature), state)

    return Descent(init=no_state, combine=combine, uses_point=True)


__all__ = [
    "centralized_gradient",
    "DecoupledSharpnessState",
    "LookSAMState",
    "gradient_norm_gradient",
    "gsam_gradient",
    "looksam_gradient",
    "orthogonal_part",
    "sam_gradient",
    "wsam_decoupled_gradient",
    "wsam_gradient",
]

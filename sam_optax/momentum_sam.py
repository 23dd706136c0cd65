"""Momentum-SAM (MSAM): a SAM-like step with one gradient per step.

MSAM does not fit the core's "second gradient" step: its perturbation comes
from the optimizer's momentum, which is known *before* the step, so the
parameters the caller holds are kept at the perturbed point
:math:`\\tilde w_t = w_t + ε_t` and the caller's single gradient is already
the perturbed one. This module moves the parameters off ε_t, applies
``base_tx``, and onto the next ε_{t+1}, in one update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional, cast

import jax
import jax.numpy as jnp
import optax

from sam_optax import masks, numerics, validation
from sam_optax.collectives import replica_mean
from sam_optax.core import (
    SAMState,
    current_rho,
    find_sam_states,
    find_states,
    keep_if_base_rejected,
    zero_diagnostics,
)
from sam_optax.types import AxisName, Mask, PyTree, ScalarOrSchedule


class MomentumSAMState(NamedTuple):
    """The ``ascent_state`` of :func:`momentum_sam`.

    Attributes:
      perturbation: ε_t, the perturbation the caller's parameters carry
        (params' compute dtype: float32, or float64 for float64 params).
    """

    perturbation: PyTree


def momentum_sam(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.3,
    *,
    mask: Mask = None,
    axis_name: Optional[AxisName] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """MSAM: perturb along the optimizer's last update; one gradient a step.

    With ``base_tx`` SGD with momentum (buffer :math:`v_{t+1} = μ v_t + g_t`,
    step :math:`w_{t+1} = w_t - η v_{t+1}`), MSAM evaluates the gradient at
    :math:`\\tilde w_t = w_t - ρ\\, v_t / \\lVert v_t \\rVert` (along the
    *negative* momentum, as the authors' code does). Written with the base
    update :math:`u_t = \\mathrm{base\\_tx}(g_t)`:

    .. math::

      g_t = ∇L(w_t + ε_t), \\qquad w_{t+1} = w_t + u_t, \\qquad
      ε_{t+1} = ρ \\frac{u_t}{\\lVert u_t \\rVert_2}, \\qquad ε_0 = 0

    The caller's parameters are :math:`\\tilde w_t = w_t + ε_t` throughout;
    the returned update is :math:`u_t - ε_t + ε_{t+1}`. Use
    :func:`msam_clean_params` to get :math:`w_t` for evaluation and export.
    An update :math:`u_t` with an ``inf``/``NaN`` entry (from a non-finite
    gradient) gives :math:`ε_{t+1} = 0`, never a NaN in the state. ρ is
    kept in the params' compute dtype (float64 for float64 params).

    What ``base_tx`` must be: an optimizer whose update direction carries
    momentum. For ``optax.sgd(lr, momentum=μ)`` (optionally chained after
    ``optax.add_decayed_weights``) :math:`u_t/\\lVert u_t\\rVert` is exactly
    :math:`-v_{t+1}/\\lVert v_{t+1}\\rVert` of the paper. For Adam-type
    optimizers the direction is the preconditioned update, where the paper's
    AdamW variant uses the raw first moment. ``base_tx`` receives the clean
    parameters :math:`w_t` (weight decay acts on them). The state stores ε
    (one copy of the parameters in float32, float64 for float64 params).

    Args:
      base_tx: a momentum optimizer, e.g. ``optax.sgd(0.1, momentum=0.9)``.
      rho: the radius ρ ≥ 0 (the paper uses larger values than SAM, ~0.3 for
        SGD), or a schedule of the step count.
      mask: optional mask of the leaves to perturb (bool tree, prefix or
        callable on params, see :mod:`sam_optax.masks`); the norm of the
        update is taken over them only.
      axis_name: average the gradient over this mapped axis before
        ``base_tx``; ε derives from the (identical) update, so replicas stay
        identical and there is no per-shard perturbation to choose.
      full_diagnostics: also record ``grad_norm`` = ‖g_t‖₂ (else 0). Off by
        default: it is one more pass over the gradient in a step that is
        meant to cost one gradient. The other diagnostics are free and
        always on: ``perturbation_norm`` is ‖ε_{t+1}‖₂, the norm of the
        perturbation the returned parameters carry (ρ_t, or 0 where
        :math:`u_t` was zero or not finite), known from the normalisation
        without measuring ε; ``loss`` is ``value=`` when passed.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`;
      ``update(grads, state, params, *, grad_fn=None, **extra_args)``.
      ``grad_fn`` is accepted for the common contract and never called.
      The state is a :class:`~sam_optax.SAMState` whose ``ascent_state`` is
      a :class:`MomentumSAMState` holding ε; :func:`sam_optax.diagnostics`
      works on it.

    References:
      Becker, Altrock, Risse, Momentum-SAM: Sharpness Aware Minimization
      without Computational Overhead, 2024. https://arxiv.org/abs/2401.12033
    """
    validation.check_rho(rho)
    base_tx = validation.as_transformation(base_tx)
    validation.check_axis_name(axis_name, "axis_name")
    validation.check_bool(full_diagnostics, "full_diagnostics")
    masks.check(mask, "mask")

    def init_fn(params: PyTree) -> SAMState:
        masks.resolve(mask, params, "mask")  # fail early on a bad mask
        base_state = base_tx.init(params)
        if find_states(base_state, optax.MultiStepsState):
            raise ValueError(_MULTISTEPS_INSIDE)
        return SAMState.create(
            count=jnp.zeros([], jnp.int32),
            rho=jnp.zeros([], jnp.float32),
            base_state=base_state,
            ascent_state=MomentumSAMState(numerics.zeros_like_compute(params)),
            descent_state=(),
            schedule_state=(),
            diagnostics=zero_diagnostics(),
        )

    def update_fn(grads: PyTree, state: SAMState, params: PyTree = None, *,
                  grad_fn: Optional[Callable[[PyTree], Any]] = None,
                  perturb: Optional[bool] = None,
                  **extra_args: Any) -> tuple[PyTree, SAMState]:
        del grad_fn  # MSAM's one gradient is the caller's `grads`.
        if perturb is not None:
            raise TypeError(
                "MSAM takes one gradient per step and has no schedule: "
                "`perturb=` does not apply (leave it unset).")
        if params is None:
            raise ValueError(
                "MSAM moves the parameters off the perturbation: pass them, "
                "`tx.update(grads, opt_state, params)`.")
        validation.check_same_structure(grads, params, "grads")
        count = state.count
        # The core's ρ: float64 under x64 (so is ε of float64 params), and a
        # traced negative or NaN ρ is 0.
        rho_t = current_rho(rho, count)
        epsilon = state.ascent_state.perturbation
        grads = replica_mean(grads, axis_name)
        clean_params = numerics.add_perturbation(
            params, jax.tree.map(jnp.negative, epsilon))
        base_updates, base_state = base_tx.update(
            grads, state.base_state, clean_params, **extra_args)
        # ρ folds into the normalising factor: one multiply per element.
        # A non-finite update gives ε = 0 (never a NaN in the state).
        unit = numerics.normalize(
            base_updates, masks.resolve(mask, params, "mask"), scale=rho_t)
        new_epsilon = unit.direction
        updates = jax.tree.map(
            lambda u, e_old, e_new: (u.astype(e_new.dtype) - e_old + e_new
                                     ).astype(u.dtype)
            if numerics.is_float(u) else u,
            base_updates, epsilon, new_epsilon)
        value = extra_args.get("value")
        zero = jnp.zeros([], jnp.float32)
        # ‖ε_{t+1}‖ is ρ_t where the normalisation was usable: free. ‖g‖
        # costs a pass over the gradient: only when asked for.
        new_norm = jnp.where(unit.usable, rho_t, 0.0).astype(jnp.float32)
        diagnostics = zero_diagnostics()._replace(
            grad_norm=(numerics.global_norm(grads).astype(jnp.float32)
                       if full_diagnostics else zero),
            loss=zero if value is None else jnp.asarray(value, jnp.float32))
        # `msam(optax.apply_if_finite(base))` skipped a non-finite step: no
        # move at all (not even back to w), ε, its norm and the count kept.
        updates, new_epsilon, new_norm, new_count = keep_if_base_rejected(
            base_state,
            (updates, new_epsilon, new_norm, optax.safe_int32_increment(count)),
            (jax.tree.map(jnp.zeros_like, updates), epsilon,
             state.diagnostics.perturbation_norm, count))
        diagnostics = diagnostics._replace(perturbation_norm=new_norm)
        new_state = SAMState.create(
            count=new_count,
            rho=rho_t,
            base_state=base_state,
            ascent_state=MomentumSAMState(new_epsilon),
            descent_state=(),
            schedule_state=(),
            diagnostics=diagnostics,
        )
        return updates, new_state

    # `update` takes `grad_fn=` by keyword (for the common contract), which
    # optax's protocol type for update functions cannot express.
    return optax.GradientTransformationExtraArgs(
        init_fn, cast(optax.TransformUpdateExtraArgsFn, update_fn))


_MULTISTEPS_INSIDE = (
    "`msam` cannot wrap `optax.MultiSteps`: between two base updates MSAM "
    "would move the params back off ε at every micro-batch, so the "
    "micro-batch gradients would not be taken at the perturbed point. "
    "Accumulate outside instead: `optax.MultiSteps(sam_optax.msam(base, "
    "rho), k)` is right for MSAM (every micro-batch gradient is taken at the "
    "same perturbed params, and MSAM sees their mean).")


def _perturbation(opt_state: Any, caller: str) -> PyTree:
    """ε_t from the one MSAM state inside ``opt_state``."""
    sam_states = find_sam_states(opt_state)
    states = [s for s in sam_states
              if isinstance(s.ascent_state, MomentumSAMState)]
    if not states:
        other = (f" (it holds {len(sam_states)} SAM state(s) of another "
                 "variant, whose params are already the clean weights)"
                 if sam_states else "")
        raise ValueError(
            f"`{caller}` needs the optimizer state of `sam_optax.msam(...)` "
            f"(alone or inside a chain or wrapper); `opt_state` holds no MSAM "
            f"state{other}. Pass the state returned by the MSAM `tx.init`/"
            "`tx.update`.")
    if len(states) > 1:
        raise ValueError(
            f"`{caller}`: `opt_state` holds {len(states)} MSAM states; pass "
            "the sub-state of the MSAM transformation that perturbs these "
            "params.")
    return states[0].ascent_state.perturbation


def _check_matches(params: PyTree, epsilon: PyTree, name: str) -> None:
    if jax.tree.structure(params) != jax.tree.structure(epsilon):
        raise ValueError(
            f"`{name}` must have the tree structure of the params MSAM was "
            f"initialised with.\n  MSAM's ε: {jax.tree.structure(epsilon)}"
            f"\n  {name}: {jax.tree.structure(params)}")


def msam_clean_params(params: PyTree, opt_state: Any) -> PyTree:
    """The unperturbed weights :math:`w_t = \\tilde w_t - ε_t` of MSAM.

    Use them for evaluation and for exporting a model. To checkpoint and
    resume, save the (perturbed) ``params`` with ``opt_state`` as they are:
    together they are the exact training state.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> params = jnp.zeros(2)
      >>> tx = sam_optax.msam(optax.sgd(0.1, momentum=0.9), rho=0.3)
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p))
      >>> for _ in range(30):
      ...   updates, state = step(params, state)
      ...   params = optax.apply_updates(params, updates)
      >>> clean = sam_optax.msam_clean_params(params, state)
      >>> bool(loss_fn(clean) < 0.01)  # from 2.0 at the start
      True
    """
    epsilon = _perturbation(opt_state, "msam_clean_params")
    _check_matches(params, epsilon, "params")
    return numerics.add_perturbation(params, jax.tree.map(jnp.negative, epsilon))


def msam_perturbed_params(clean_params: PyTree, opt_state: Any) -> PyTree:
    """Inverse of :func:`msam_clean_params`: :math:`w_t + ε_t`.

    Use it to resume training from clean weights and an MSAM state.
    """
    epsilon = _perturbation(opt_state, "msam_perturbed_params")
    _check_matches(clean_params, epsilon, "clean_params")
    return numerics.add_perturbation(clean_params, epsilon)


__all__ = ["MomentumSAMState", "momentum_sam", "msam_clean_params",
           "msam_perturbed_params"]

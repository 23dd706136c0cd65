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
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from sam_optax import numerics, validation
from sam_optax.core import (
    AxisName,
    SAMState,
    ScalarOrSchedule,
    find_sam_states,
    replica_mean,
    zero_diagnostics,
)

PyTree = Any


def momentum_sam(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.3,
    *,
    mask: numerics.Mask = None,
    axis_name: AxisName = None,
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

    What ``base_tx`` must be: an optimizer whose update direction carries
    momentum. For ``optax.sgd(lr, momentum=μ)`` (optionally chained after
    ``optax.add_decayed_weights``) :math:`u_t/\\lVert u_t\\rVert` is exactly
    :math:`-v_{t+1}/\\lVert v_{t+1}\\rVert` of the paper. For Adam-type
    optimizers the direction is the preconditioned update, where the paper's
    AdamW variant uses the raw first moment. ``base_tx`` receives the clean
    parameters :math:`w_t` (weight decay acts on them). The state stores ε
    (one float32 copy of the parameters).

    Args:
      base_tx: a momentum optimizer, e.g. ``optax.sgd(0.1, momentum=0.9)``.
      rho: the radius ρ ≥ 0 (the paper uses larger values than SAM, ~0.3 for
        SGD), or a schedule of the step count.
      mask: optional bool tree (or callable on params) of the leaves to
        perturb.
      axis_name: average the gradient over this mapped axis before
        ``base_tx``; ε derives from the (identical) update, so replicas stay
        identical and there is no per-shard perturbation to choose.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`;
      ``update(grads, state, params, *, grad_fn=None, **extra_args)``.
      ``grad_fn`` is accepted for the common contract and never called.
      The state is a :class:`~sam_optax.SAMState` whose ``ascent_state`` is
      ε; :func:`sam_optax.diagnostics` works on it.

    References:
      Becker, Altrock, Risse, Momentum-SAM: Sharpness Aware Minimization
      without Computational Overhead, 2024. https://arxiv.org/abs/2401.12033
    """
    validation.check_rho(rho)
    base_tx = validation.as_transformation(base_tx)
    validation.check_axis_name(axis_name, "axis_name")
    validation.optional_mask_error(mask)

    def init_fn(params: PyTree) -> SAMState:
        numerics.resolve_mask(mask, params)  # fail early on a bad mask
        return SAMState.create(
            count=jnp.zeros([], jnp.int32),
            rho=jnp.zeros([], jnp.float32),
            base_state=base_tx.init(params),
            ascent_state=numerics.zeros_like_compute(params),
            descent_state=(),
            schedule_state=(),
            diagnostics=zero_diagnostics(),
        )

    def update_fn(grads: PyTree, state: SAMState, params: PyTree = None, *,
                  grad_fn: Optional[Callable[[PyTree], Any]] = None,
                  **extra_args: Any) -> tuple[PyTree, SAMState]:
        del grad_fn  # MSAM's one gradient is the caller's `grads`.
        if params is None:
            raise ValueError(
                "MSAM moves the parameters off the perturbation: pass them, "
                "`tx.update(grads, opt_state, params)`.")
        validation.check_same_structure(grads, params, "grads")
        count = state.count
        rho_t = jnp.asarray(rho(count) if callable(rho) else rho, jnp.float32)
        epsilon = state.ascent_state
        grads = replica_mean(grads, axis_name)
        clean_params = numerics.add_perturbation(
            params, jax.tree.map(jnp.negative, epsilon))
        base_updates, base_state = base_tx.update(
            grads, state.base_state, clean_params, **extra_args)
        # ρ folds into the normalising factor: one multiply per element.
        new_epsilon, _ = numerics.safe_normalize(
            base_updates, numerics.resolve_mask(mask, params), scale=rho_t)
        updates = jax.tree.map(
            lambda u, e_old, e_new: (u.astype(e_new.dtype) - e_old + e_new
                                     ).astype(u.dtype)
            if numerics.is_float(u) else u,
            base_updates, epsilon, new_epsilon)
        value = extra_args.get("value")
        # Plain norms: diagnostics only, kept off MSAM's one-gradient budget.
        diagnostics = zero_diagnostics()._replace(
            grad_norm=numerics.plain_norm(grads),
            perturbation_norm=numerics.plain_norm(epsilon),
            loss=(jnp.zeros([], jnp.float32) if value is None
                  else jnp.asarray(value, jnp.float32)))
        new_state = SAMState.create(
            count=optax.safe_int32_increment(count),
            rho=rho_t,
            base_state=base_state,
            ascent_state=new_epsilon,
            descent_state=(),
            schedule_state=(),
            diagnostics=diagnostics,
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _perturbation(opt_state: Any) -> PyTree:
    states = find_sam_states(opt_state)
    if len(states) != 1:
        raise ValueError(
            "expected exactly one MSAM state in `opt_state`, found "
            f"{len(states)}.")
    return states[0].ascent_state


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
    epsilon = _perturbation(opt_state)
    return numerics.add_perturbation(params, jax.tree.map(jnp.negative, epsilon))


def msam_perturbed_params(clean_params: PyTree, opt_state: Any) -> PyTree:
    """Inverse of :func:`msam_clean_params`: :math:`w_t + ε_t`.

    Use it to resume training from clean weights and an MSAM state.
    """
    return numerics.add_perturbation(clean_params, _perturbation(opt_state))


__all__ = ["momentum_sam", "msam_clean_params", "msam_perturbed_params"]

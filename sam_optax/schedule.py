"""When the second gradient is paid for, and schedules of ρ.

A :class:`~sam_optax.core.Schedule` decides at each step whether the core
takes the second gradient. A Python ``True`` builds no branch at all; a
boolean array makes the core run ``lax.cond``, so on a skipped step the second
``grad_fn`` call is really not executed (one gradient for that step).
``sam_optax.diagnostics(state).perturbed`` records each step's decision.

:func:`gsam_rho_schedule` turns a learning-rate schedule into a ρ schedule,
as GSAM does; any Optax schedule is accepted as ``rho`` by every variant.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import numerics, validation
from sam_optax.core import Schedule, no_state
from sam_optax.types import ScalarOrSchedule

# ‖g‖² is capped here so that its squared deviation (the variance update)
# stays finite in float32 even for absurd gradients (‖g‖ ≥ 1e9).
_MAX_SQUARED_NORM = 1e18



def every_step() -> Schedule:
    """Take the second gradient at every step (no ``lax.cond`` is built)."""

    def decide(grads, state, *, count):
        del grads, count
        return True, state

    return Schedule(init=no_state, decide=decide, uses_grads=False)


def every_k_steps(k: int) -> Schedule:
    """Take the second gradient at steps 0, k, 2k, ... only.

    ``k = 1`` is :func:`every_step` (no branch is built).

    Args:
      k: period ≥ 1, in updates.

    Example (a new combination in a few lines: GSAM's descent every 2 steps):
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> from sam_optax import ascent, descent, schedule
      >>> tx = sam_optax.sharpness_aware(
      ...     optax.sgd(0.1), rho=0.05, ascent=ascent.normalized_ascent(),
      ...     descent=descent.gsam_gradient(alpha=0.1),
      ...     schedule=schedule.every_k_steps(2))
      >>> loss_fn = lambda w: jnp.sum(w ** 2)
      >>> params, state = jnp.ones(2), tx.init(jnp.ones(2))
      >>> step = jax.jit(lambda p, s: tx.update(
      ...     jax.grad(loss_fn)(p), s, p, grad_fn=jax.grad(loss_fn)))
      >>> flags = []
      >>> for _ in range(4):
      ...   updates, state = step(params, state)
      ...   params = optax.apply_updates(params, updates)
      ...   flags.append(bool(sam_optax.diagnostics(state).perturbed))
      >>> flags
      [True, False, True, False]
    """
    validation.check_positive_int(k, "k")
    if k == 1:
        return every_step()

    def decide(grads, state, *, count):
        del grads
        return count % k == 0, state

    return Schedule(init=no_state, decide=decide, uses_grads=False)


class AdaptivePolicyState(NamedTuple):
    """State of :func:`adaptive_policy` (float32 scalars, zero at init).

    Attributes:
      mean: μ_t, the moving average of ‖g‖².
      variance: σ²_t, the moving average of (‖g‖² − μ_t)².
    """

    mean: jax.Array
    variance: jax.Array


def adaptive_policy(c: ScalarOrSchedule = 0.0,
                    delta: float = 0.9) -> Schedule:
    """AE-SAM's policy: SAM only where ‖g‖² is large (Jiang et al. 2023).

    With moving statistics of the squared gradient norm (zero at init):

    .. math::

      μ_t = δ μ_{t-1} + (1-δ) \\lVert g_t \\rVert^2, \\qquad
      σ^2_t = δ σ^2_{t-1} + (1-δ) (\\lVert g_t \\rVert^2 - μ_t)^2

    the step takes the second gradient iff
    :math:`\\lVert g_t \\rVert^2 ≥ μ_t + c_t σ_t`, else it is a plain base
    step. A larger ``c`` means fewer SAM steps. The paper moves :math:`c_t`
    linearly from λ₁ to λ₂ over the T training steps (λ₁ = −1, λ₂ = 1 on
    CIFAR: SAM on most steps early, on few late), i.e.
    ``c=optax.linear_schedule(-1.0, 1.0, T)``; any function of the step count
    is accepted. Under ``axis_name`` the norm is that of the replica-averaged
    gradient, so every replica decides alike.

    Args:
      c: threshold in standard deviations, a float or a schedule of the step.
      delta: forgetting rate δ ∈ [0, 1) of the moving statistics.

    References:
      Jiang et al., An Adaptive Policy to Employ Sharpness-Aware
      Minimization, ICLR 2023. https://arxiv.org/abs/2304.14647
    """
    validation.check_in_range(delta, "delta", 0.0, 1.0, high_open=True)
    if not callable(c):
        validation.check_in_range(c, "c", -float("inf"), float("inf"),
                                  low_open=True, high_open=True)

    def init(params):
        del params
        zero = jnp.zeros([], jnp.float32)
        return AdaptivePolicyState(mean=zero, variance=zero)

    def decide(grads, state, *, count):
        squared_norm = jnp.minimum(
            jnp.square(numerics.global_norm(grads).astype(jnp.float32)),
            _MAX_SQUARED_NORM)
        mean = delta * state.mean + (1.0 - delta) * squared_norm
        variance = (delta * state.variance
                    + (1.0 - delta) * jnp.square(squared_norm - mean))
        c_t = jnp.asarray(c(count) if callable(c) else c, jnp.float32)
        perturb = squared_norm >= mean + c_t * jnp.sqrt(variance)
        return perturb, AdaptivePolicyState(mean=mean, variance=variance)

    return Schedule(init=init, decide=decide, uses_grads=True)


def gsam_rho_schedule(learning_rate: optax.Schedule, *, lr_max: float,
                      lr_min: float, rho_max: float, rho_min: float
                      ) -> optax.Schedule:
    """ρ following the learning rate linearly, as in GSAM (Zhuang et al. 2022).

    .. math::

      ρ_t = ρ_{min} + (ρ_{max} - ρ_{min}) \\,
            \\mathrm{clip}\\Big(\\frac{η_t - η_{min}}{η_{max} - η_{min}},
            0, 1\\Big)

    so that ρ decays with the learning rate (e.g. a cosine or linear decay);
    a learning rate outside ``[lr_min, lr_max]`` gives ``rho_min`` or
    ``rho_max``, never a negative ρ. Computed in float64 when x64 is on.

    Args:
      learning_rate: the Optax schedule of ``base_tx``'s learning rate.
      lr_max: its largest value (e.g. the peak after warm-up).
      lr_min: its smallest value; ``lr_max > lr_min``.
      rho_max: ρ at ``lr_max``.
      rho_min: ρ at ``lr_min``; ``0 ≤ rho_min ≤ rho_max``.

    Returns:
      A schedule of the step count, to pass as ``rho``.

    Example:
      >>> import optax, sam_optax
      >>> lr = optax.linear_schedule(0.1, 0.0, transition_steps=100)
      >>> rho = sam_optax.gsam_rho_schedule(lr, lr_max=0.1, lr_min=0.0,
      ...                                   rho_max=0.04, rho_min=0.02)
      >>> [round(float(rho(t)), 3) for t in (0, 50, 100)]
      [0.04, 0.03, 0.02]
    """
    if not callable(learning_rate):
        raise ValueError(
            "`learning_rate` must be an Optax schedule (a function of the step "
            f"count); got {type(learning_rate).__name__}. For a constant "
            "learning rate pass a constant `rho` instead.")
    for name, value in (("lr_max", lr_max), ("lr_min", lr_min),
                        ("rho_max", rho_max), ("rho_min", rho_min)):
        validation.check_nonnegative_scalar_or_schedule(value, name)
        if callable(value):
            raise ValueError(f"`{name}` must be a number; got a callable.")
    if not lr_max > lr_min:
        raise ValueError(
            f"`lr_max` must exceed `lr_min`; got lr_max={lr_max}, "
            f"lr_min={lr_min}.")
    if not rho_max >= rho_min:
        raise ValueError(
            f"`rho_max` must be >= `rho_min`; got rho_max={rho_max}, "
            f"rho_min={rho_min}.")
    lr_max, lr_min = float(lr_max), float(lr_min)
    rho_max, rho_min = float(rho_max), float(rho_min)

    def schedule(count):
        lr = jnp.asarray(learning_rate(count))
        lr = lr.astype(jnp.promote_types(lr.dtype, jnp.float32))  # f64 in x64
        # A learning rate outside [lr_min, lr_max] (a warm-up above the peak,
        # a decay below the floor) clamps ρ to [rho_min, rho_max]: never a
        # negative ρ.
        fraction = jnp.clip((lr - lr_min) / (lr_max - lr_min), 0.0, 1.0)
        return rho_min + (rho_max - rho_min) * fraction

    return schedule


__all__ = [
    "AdaptivePolicyState",
    "adaptive_policy",
    "every_k_steps",
    "every_step",
    "gsam_rho_schedule",
]

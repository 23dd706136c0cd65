"""Named constructors: each variant is a combination of the core's parts."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any, NamedTuple, Optional, ParamSpec, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax import ascent as ascent_lib
from sam_optax import descent as descent_lib
from sam_optax import momentum_sam as momentum_sam_lib
from sam_optax import numerics, validation
from sam_optax import schedule as schedule_lib
from sam_optax.core import (
    Ascent,
    Descent,
    Schedule,
    sharpness_aware,
)
from sam_optax.types import AxisName, Mask, PyTree, ScalarOrSchedule

P = ParamSpec("P")
R = TypeVar("R")


# `optax.contrib.sam`'s arguments that have no counterpart here, and why.
_OPTAX_CONTRIB_ARGUMENTS = {
    "sync_period": "every update is one whole SAM step here (both gradients "
                   "inside `update`), so there is no period to synchronise",
    "opaque_mode": "sam_optax is always 'opaque': pass `grad_fn=` to `update`",
    "reset_state": "the ascent keeps no optimizer state to reset",
    "batch_axis_name": "use `axis_name=` (and `sync_perturbation=True` for one "
                       "ε over the global batch)",
    "adv_optimizer": "pass the radius `rho=` instead of an adversarial "
                     "optimizer",
}


# Arguments that take a callable which is not a schedule of the step count.
_CALLABLE_ARGUMENTS = ("mask", "adaptive")


def _check_call(kwargs: dict[str, Any]) -> None:
    """Clear errors for two ways of calling a constructor that would otherwise
    fail obscurely or, worse, silently:

    * arguments users bring from ``optax.contrib.sam`` (pointing to the
      migration notes);
    * a callable ``mask``/``adaptive`` under ``optax.inject_hyperparams``
      without ``static_args``: inject_hyperparams takes every callable for a
      schedule and calls it with the step count, so the mask would select
      nothing at all. It is only visible on the caller's frame, read here at
      trace time (no cost in the compiled step).
    """
    for name, why in _OPTAX_CONTRIB_ARGUMENTS.items():
        if name in kwargs:
            raise TypeError(
                f"`{name}` is an argument of `optax.contrib.sam`, not of "
                f"sam_optax: {why}. See {validation.MIGRATION_DOC}.")
    # The inject_hyperparams closure calls the constructor's wrapper directly.
    inject = validation.optax_caller("inject_hyperparams.", depth=5)
    scheduled = {} if inject is None else inject.f_locals.get("sched_hps", {})
    for name in _CALLABLE_ARGUMENTS:
        if name in scheduled:
            raise TypeError(
                f"`{name}` is a callable, which `optax.inject_hyperparams` "
                "takes for a schedule of the step count (the mask would "
                "select nothing): mark it static, "
                "`optax.inject_hyperparams(constructor, "
                f"static_args=('{name}',))(...)`.")


def _checks_call(constructor: Callable[P, R]) -> Callable[P, R]:
    """Wrap ``constructor`` with :func:`_check_call`: ``optax.contrib.sam``'s
    argument names get a message instead of Python's "unexpected keyword
    argument"; the signature is unchanged."""
    @functools.wraps(constructor)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        _check_call(kwargs)
        return constructor(*args, **kwargs)

    return wrapper


@_checks_call
def sam(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    *,
    mask: Mask = None,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    perturbation_axis_name: Optional[AxisName] = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    norm: str = "l2",
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Sharpness-Aware Minimization (SAM) around any Optax optimizer.

    With ``g = ∇L(w)`` the mini-batch gradient at the current weights:

    .. math::

      ε = ρ \\frac{g}{\\lVert g \\rVert_2}, \\qquad
      g_{sam} = ∇L(w + ε), \\qquad
      w \\leftarrow w + \\mathrm{base\\_tx}(g_{sam})

    The norm is the global L2 norm over all leaves, computed in float32; ε is
    exactly 0 when ``g`` is 0 (never NaN). Both gradient evaluations happen in
    the caller's one ``jit``: ``update`` calls ``grad_fn(w + ε)`` itself.

    Everything that should see the SAM gradient (clipping, weight decay,
    gradient accumulation with ``optax.MultiSteps``, schedules) belongs in
    ``base_tx``. A transformation placed *before* ``sam`` in an
    ``optax.chain`` changes only ``g`` (hence ε), not ``g_sam``.

    Args:
      base_tx: the optimizer that receives the SAM gradient.
      rho: the neighbourhood radius ρ ≥ 0, or an Optax schedule of the SAM
        step count. ``rho=0`` reproduces ``base_tx`` exactly.
      mask: optional mask of the leaves to perturb: a bool tree (Python,
        NumPy or concrete JAX bools), a prefix of the params tree as
        ``optax.masked`` takes, or a callable on params returning one; it
        must be static (not computed from traced values). The norm is taken
        over the selected leaves only; every leaf is still updated.
      axis_name: when called inside ``pmap``/``shard_map``/``vmap`` over this
        axis, pass **local (un-averaged) gradients**: ε is computed per shard
        (m-sharpness) and ``g_sam`` is averaged over the axis before
        ``base_tx``. :mod:`sam_optax.parallel` builds such steps for
        ``pmap``, ``shard_map``, ``jit`` and vmap-over-chunks.
      sync_perturbation: average ``g`` over ``axis_name`` before the ascent
        (one ε for the global batch: plain SAM) instead of per-shard ε.
      perturbation_axis_name: average ``g`` over these axes before the ascent
        (grouped ε: e.g. the inner axis of a 2-D mesh).
      perturbation_axis_index_groups: ``axis_index_groups`` for that average.
      norm: the norm of the neighbourhood: ``"l2"`` (p = 2, above) or
        ``"linf"`` (p = ∞, Foret et al. App. C.5: ``ε = ρ·sign(g)``).
      full_diagnostics: also record cos∠(g, g_sam) in
        :func:`sam_optax.diagnostics` (keeps ``g`` alive through the second
        gradient; off by default for speed).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`;
      ``update(grads, state, params, *, grad_fn, **extra_args)`` where
      ``grad_fn(params) -> grads`` (or ``-> (loss, grads)`` to record L(w+ε)).
      Pass ``value=loss`` too to record the sharpness L(w+ε) − L(w) in
      :func:`sam_optax.diagnostics`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> def loss_fn(w):
      ...   return jnp.sum((w - jnp.array([1.0, -2.0])) ** 2)
      >>> params = jnp.zeros(2)
      >>> tx = sam_optax.sam(optax.sgd(0.1), rho=0.05)
      >>> state = tx.init(params)
      >>> for _ in range(100):
      ...   grads = jax.grad(loss_fn)(params)
      ...   updates, state = tx.update(grads, state, params,
      ...                              grad_fn=jax.grad(loss_fn))
      ...   params = optax.apply_updates(params, updates)
      >>> [round(float(x), 2) for x in params]
      [1.0, -2.0]

    References:
      Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware Minimization for
      Efficiently Improving Generalization. ICLR 2021.
      https://arxiv.org/abs/2010.01412
    """
    return _sam_like(
        base_tx, rho, ascent_lib.normalized_ascent(mask=mask, norm=norm),
        options=SAMOptions(axis_name, sync_perturbation, perturbation_axis_name,
                           perturbation_axis_index_groups, full_diagnostics))


class SAMOptions(NamedTuple):
    """The keyword arguments every named constructor shares with :func:`sam`
    (each writes them out in its signature, meaning what they mean for
    :func:`sam`), handed on together to :func:`_sam_like`."""

    axis_name: Optional[AxisName]
    sync_perturbation: bool
    perturbation_axis_name: Optional[AxisName]
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]]
    full_diagnostics: bool


def _sam_like(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule,
    ascent: Ascent,
    *,
    descent: Optional[Descent] = None,
    schedule: Optional[Schedule] = None,
    options: SAMOptions,
) -> optax.GradientTransformationExtraArgs:
    """The pass-through every named constructor shares: ``sync_perturbation``
    resolved into ``perturbation_axis_name``, SAM's descent and every-step
    schedule unless given."""
    axis_name = options.axis_name
    perturbation_axis_name = options.perturbation_axis_name
    validation.check_bool(options.sync_perturbation, "sync_perturbation")
    if options.sync_perturbation:
        if perturbation_axis_name is not None:
            raise ValueError(
                "give either `sync_perturbation=True` or "
                "`perturbation_axis_name`, not both.")
        if axis_name is None:
            raise ValueError("`sync_perturbation=True` needs `axis_name`.")
        perturbation_axis_name = axis_name
    return sharpness_aware(
        base_tx, rho,
        ascent=ascent,
        descent=descent_lib.sam_gradient() if descent is None else descent,
        schedule=schedule_lib.every_step() if schedule is None else schedule,
        axis_name=axis_name,
        perturbation_axis_name=perturbation_axis_name,
        perturbation_axis_index_groups=options.perturbation_axis_index_groups,
        full_diagnostics=options.full_diagnostics,
    )


# ------------------------------------------------- the ascent family (ε)
# Each constructor below is SAM with another ascent from `sam_optax.ascent`;
# `mask`, `axis_name`, `sync_perturbation`, `perturbation_axis_name` and
# `perturbation_axis_index_groups` mean what they mean for `sam`.


@_checks_call
def gcsam(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    *,
    mask: Mask = None,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    perturbation_axis_name: Optional[AxisName] = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """GCSAM: SAM on centralized gradients (Hassan et al. 2025).

    With Φ the gradient centralization of Yong et al. 2020 (each kernel's
    gradient minus its mean over every axis but the output axis; biases
    unchanged, :func:`sam_optax.ascent.centralize`):

    .. math::

      ε = ρ \\frac{Φ(g)}{\\lVert Φ(g) \\rVert_2}, \\qquad
      w \\leftarrow w + \\mathrm{base\\_tx}\\big(Φ(∇L(w + ε))\\big)

    Args:
      base_tx: the optimizer that receives Φ(g_sam).
      rho: the radius ρ ≥ 0, or a schedule of the step count.
      mask: the leaves to perturb, as for :func:`sam`.
      axis_name: as for :func:`sam`.
      sync_perturbation: as for :func:`sam`.
      perturbation_axis_name: as for :func:`sam`.
      perturbation_axis_index_groups: as for :func:`sam`.
      full_diagnostics: as for :func:`sam`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> target = jnp.array([[1.0, -1.0], [2.0, 0.0]])
      >>> loss_fn = lambda w: jnp.sum((w["k"] - target) ** 2)
      >>> params = {"k": jnp.zeros((2, 2))}
      >>> tx = sam_optax.gcsam(optax.sgd(0.1), rho=0.05)
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda p, s: tx.update(
      ...     jax.grad(loss_fn)(p), s, p, grad_fn=jax.grad(loss_fn)))
      >>> for _ in range(100):
      ...   updates, state = step(params, state)
      ...   params = optax.apply_updates(params, updates)
      >>> # Each output column moves only within its zero-mean subspace:
      >>> # the centered target.
      >>> [[round(float(x), 2) + 0.0 for x in row] for row in params["k"]]
      [[-0.5, -0.5], [0.5, 0.5]]

    References:
      Hassan, Vakanski, Zhang, Xian. GCSAM: Gradient Centralized Sharpness
      Aware Minimization. 2025. https://arxiv.org/abs/2501.11584
    """
    return _sam_like(
        base_tx, rho, ascent_lib.centralized_ascent(mask=mask),
        descent=descent_lib.centralized_gradient(),
        options=SAMOptions(axis_name, sync_perturbation,
                           perturbation_axis_name,
                           perturbation_axis_index_groups, full_diagnostics))


@_checks_call
def asam(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.5,
    eta: float = 0.01,
    *,
    adaptive: Mask = None,
    mask: Mask = None,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    perturbation_axis_name: Optional[AxisName] = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Adaptive SAM (ASAM): a neighbourhood scaled by the weights.

    .. math::

      T_w = |w| + η, \\qquad
      ε = ρ \\frac{T_w^2 ⊙ g}{\\lVert T_w ⊙ g \\rVert_2}, \\qquad
      w \\leftarrow w + \\mathrm{base\\_tx}(∇L(w + ε))

    The radius is invariant to rescaling the weights, so ρ is larger than for
    SAM (the paper uses 0.5 to 2 on CIFAR). Cost: 2 gradient evaluations.

    Args:
      base_tx: the optimizer that receives the perturbed gradient.
      rho: the radius ρ ≥ 0 (float or schedule).
      eta: η ≥ 0 in ``T_w = |w| + η``.
      adaptive: leaves that get ``T_w = |w| + η`` (bool tree or callable on
        params); the others get ``T = 1``. Default: every leaf (the paper's
        formula); the official code scales weight tensors only, which
        ``adaptive=sam_optax.masks.exclude_bias_and_norm`` reproduces.
      mask: the leaves to perturb, as for :func:`sam`.
      axis_name: as for :func:`sam`.
      sync_perturbation: as for :func:`sam`.
      perturbation_axis_name: as for :func:`sam`.
      perturbation_axis_index_groups: as for :func:`sam`.
      full_diagnostics: as for :func:`sam`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - jnp.array([1.0, -2.0])) ** 2)
      >>> # full_diagnostics: ASAM's ‖ε‖ is measured on request only.
      >>> tx = sam_optax.asam(optax.sgd(0.1), rho=0.5, eta=0.01,
      ...                     full_diagnostics=True)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> grads = jax.grad(loss_fn)(params)
      >>> updates, state = tx.update(grads, state, params,
      ...                            grad_fn=jax.grad(loss_fn))
      >>> # At w = 0, T = η: the neighbourhood shrinks to radius ρ·η.
      >>> round(float(sam_optax.diagnostics(state).perturbation_norm), 6)
      0.005

    References:
      Kwon, Kim, Park, Choi. ASAM: Adaptive Sharpness-Aware Minimization for
      Scale-Invariant Learning of Deep Neural Networks. ICML 2021.
      https://arxiv.org/abs/2102.11600
    """
    return _sam_like(
        base_tx, rho, ascent_lib.adaptive_ascent(eta, adaptive=adaptive,
                                                 mask=mask),
        options=SAMOptions(axis_name, sync_perturbation,
                           perturbation_axis_name,
                           perturbation_axis_index_groups, full_diagnostics))


@_checks_call
def fisher_sam(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.1,
    eta: float = 1.0,
    *,
    mask: Mask = None,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    perturbation_axis_name: Optional[AxisName] = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Fisher-SAM: the neighbourhood is an ellipsoid of the Fisher metric.

    The Fisher information is approximated by its diagonal ``f = 1 + η g²``
    from the mini-batch gradient (no extra pass); ε maximises ``gᵀε`` over
    ``εᵀ diag(f) ε ≤ ρ²``:

    .. math::

      f = 1 + η \\, g ⊙ g, \\qquad
      ε = ρ \\frac{f^{-1} ⊙ g}{\\sqrt{g^⊤ f^{-1} g}}

    ``eta=0`` is SAM. Cost: 2 gradient evaluations, no extra state.

    Args:
      base_tx: the optimizer that receives the perturbed gradient.
      rho: the radius ρ ≥ 0 (float or schedule).
      eta: η ≥ 0, the weight of the squared-gradient Fisher estimate.
      mask: the leaves to perturb, as for :func:`sam`.
      axis_name: as for :func:`sam`.
      sync_perturbation: as for :func:`sam`.
      perturbation_axis_name: as for :func:`sam`.
      perturbation_axis_index_groups: as for :func:`sam`.
      full_diagnostics: as for :func:`sam`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - jnp.array([1.0, -2.0])) ** 2)
      >>> tx = sam_optax.fisher_sam(optax.sgd(0.1), rho=0.1, eta=1.0)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p,
      ...                                       grad_fn=jax.grad(loss_fn)))
      >>> for _ in range(100):
      ...   updates, state = step(params, state)
      ...   params = optax.apply_updates(params, updates)
      >>> [round(float(x), 2) for x in params]
      [1.0, -2.0]

    References:
      Kim, Li, Hu, Hospedales. Fisher SAM: Information Geometry and
      Sharpness Aware Minimisation. ICML 2022. https://arxiv.org/abs/2206.04920
    """
    return _sam_like(
        base_tx, rho, ascent_lib.fisher_ascent(eta, mask=mask),
        options=SAMOptions(axis_name, sync_perturbation,
                           perturbation_axis_name,
                           perturbation_axis_index_groups, full_diagnostics))


@_checks_call
def friendly_sam(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    sigma: float = 1.0,
    lmbda: float = 0.9,
    *,
    mask: Mask = None,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    perturbation_axis_name: Optional[AxisName] = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Friendly-SAM (F-SAM): ascend without the full-gradient component.

    The full gradient is estimated by an EMA ``m`` of past mini-batch
    gradients and removed from the ascent direction:

    .. math::

      v_t = g_t - σ m_{t-1}, \\qquad m_t = λ m_{t-1} + (1 - λ) g_t, \\qquad
      ε_t = ρ \\frac{v_t}{\\lVert v_t \\rVert_2}

    with ``m_1 = v_1 = g_1`` at the first step (official code). Cost: 2
    gradient evaluations; state: one param-sized EMA (float32 or wider).
    Under ``axis_name`` the EMA is of the gradient that defines ε (local,
    or averaged with ``sync_perturbation``).

    Args:
      base_tx: the optimizer that receives the perturbed gradient.
      rho: the radius ρ ≥ 0 (float or schedule).
      sigma: σ ≥ 0, the weight of the subtracted EMA (0: SAM).
      lmbda: λ ∈ [0, 1), the EMA decay.
      mask: the leaves to perturb, as for :func:`sam`.
      axis_name: as for :func:`sam`.
      sync_perturbation: as for :func:`sam`.
      perturbation_axis_name: as for :func:`sam`.
      perturbation_axis_index_groups: as for :func:`sam`.
      full_diagnostics: as for :func:`sam`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - jnp.array([1.0, -2.0])) ** 2)
      >>> tx = sam_optax.friendly_sam(optax.sgd(0.1), rho=0.05, sigma=1.0,
      ...                             lmbda=0.9)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p,
      ...                                       grad_fn=jax.grad(loss_fn)))
      >>> for _ in range(100):
      ...   updates, state = step(params, state)
      ...   params = optax.apply_updates(params, updates)
      >>> [round(float(x), 1) for x in params]
      [1.0, -2.0]

    References:
      Li, Zhou, He, Cheng, Huang. Friendly Sharpness-Aware Minimization.
      CVPR 2024. https://arxiv.org/abs/2403.12350
    """
    return _sam_like(
        base_tx, rho, ascent_lib.friendly_ascent(sigma, lmbda, mask=mask),
        options=SAMOptions(axis_name, sync_perturbation,
                           perturbation_axis_name,
                           perturbation_axis_index_groups, full_diagnostics))


@_checks_call
def vasso(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    theta: float = 0.4,
    *,
    mask: Mask = None,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    perturbation_axis_name: Optional[AxisName] = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Variance-suppressed SAM (VaSSO): ascend along an EMA of gradients.

    .. math::

      d_t = (1 - θ) d_{t-1} + θ g_t, \\qquad
      ε_t = ρ \\frac{d_t}{\\lVert d_t \\rVert_2}

    with ``d_1 = g_1``. ``theta=1`` is SAM. Cost: 2 gradient evaluations;
    state: one param-sized EMA (float32 or wider).

    Args:
      base_tx: the optimizer that receives the perturbed gradient.
      rho: the radius ρ ≥ 0 (float or schedule).
      theta: θ ∈ (0, 1], the weight of the newest gradient.
      mask: the leaves to perturb, as for :func:`sam`.
      axis_name: as for :func:`sam`.
      sync_perturbation: as for :func:`sam`.
      perturbation_axis_name: as for :func:`sam`.
      perturbation_axis_index_groups: as for :func:`sam`.
      full_diagnostics: as for :func:`sam`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - jnp.array([1.0, -2.0])) ** 2)
      >>> tx = sam_optax.vasso(optax.sgd(0.1), rho=0.05, theta=0.4)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p,
      ...                                       grad_fn=jax.grad(loss_fn)))
      >>> for _ in range(100):
      ...   updates, state = step(params, state)
      ...   params = optax.apply_updates(params, updates)
      >>> [round(float(x), 2) for x in params]
      [1.0, -2.0]

    References:
      Li, Giannakis. Enhancing Sharpness-Aware Optimization Through Variance
      Suppression. NeurIPS 2023. https://arxiv.org/abs/2309.15639
    """
    return _sam_like(
        base_tx, rho, ascent_lib.variance_suppressed_ascent(theta, mask=mask),
        options=SAMOptions(axis_name, sync_perturbation,
                           perturbation_axis_name,
                           perturbation_axis_index_groups, full_diagnostics))


@_checks_call
def random_sam(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    *,
    seed: ascent_lib.Seed = 0,
    mask: Mask = None,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    perturbation_axis_name: Optional[AxisName] = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """SAM's random-direction ablation: ε of radius ρ, direction random.

    .. math::

      z \\sim \\mathcal{N}(0, I), \\qquad ε = ρ \\frac{z}{\\lVert z \\rVert_2}

    The key lives in the state and is split at every step, so a seed gives
    a reproducible run and no retracing. Under ``axis_name`` every replica
    draws the same z. Cost: 2 gradient evaluations; state: one key.

    Args:
      base_tx: the optimizer that receives the perturbed gradient.
      rho: the radius ρ ≥ 0 (float or schedule).
      seed: an int or a JAX PRNG key.
      mask: the leaves to perturb, as for :func:`sam`.
      axis_name: as for :func:`sam`.
      sync_perturbation: as for :func:`sam`.
      perturbation_axis_name: as for :func:`sam`.
      perturbation_axis_index_groups: as for :func:`sam`.
      full_diagnostics: as for :func:`sam`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> tx = sam_optax.random_sam(optax.sgd(0.1), rho=0.05, seed=0)
      >>> params = jnp.zeros(3)
      >>> state = tx.init(params)
      >>> grads = jax.grad(loss_fn)(params)
      >>> updates, state = tx.update(grads, state, params,
      ...                            grad_fn=jax.grad(loss_fn))
      >>> round(float(sam_optax.diagnostics(state).perturbation_norm), 4)
      0.05

    References:
      Foret et al. 2021, App. C.5. https://arxiv.org/abs/2010.01412
    """
    return _sam_like(
        base_tx, rho, ascent_lib.random_ascent(seed, mask=mask),
        options=SAMOptions(axis_name, sync_perturbation,
                           perturbation_axis_name,
                           perturbation_axis_index_groups, full_diagnostics))


@_checks_call
def multistep_sam(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    steps: int = 2,
    *,
    step_size: Optional[float] = None,
    mask: Mask = None,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    perturbation_axis_name: Optional[AxisName] = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """SAM with several projected ascent steps (Foret et al., App. C.6).

    .. math::

      ε_1 = ρ \\frac{g}{\\lVert g \\rVert}, \\qquad
      ε_k = Π_{\\lVert ε \\rVert \\le ρ}\\Big(ε_{k-1}
        + αρ \\frac{∇L(w + ε_{k-1})}{\\lVert ∇L(w + ε_{k-1}) \\rVert}\\Big)

    for ``k = 2..n``, then ``base_tx`` receives ``∇L(w + ε_n)``. ``steps=1``
    is SAM. Cost: ``n + 1`` gradient evaluations (``grad_fn`` is called
    ``n`` times), no extra state.

    Args:
      base_tx: the optimizer that receives the perturbed gradient.
      rho: the radius ρ ≥ 0 (float or schedule).
      steps: n ≥ 1 ascent steps.
      step_size: α ∈ (0, 1], length of steps 2..n as a fraction of ρ
        (default 1/n).
      mask: the leaves to perturb, as for :func:`sam`.
      axis_name: as for :func:`sam`.
      sync_perturbation: as for :func:`sam`.
      perturbation_axis_name: as for :func:`sam`.
      perturbation_axis_index_groups: as for :func:`sam`.
      full_diagnostics: as for :func:`sam`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - jnp.array([1.0, -2.0])) ** 2)
      >>> tx = sam_optax.multistep_sam(optax.sgd(0.1), rho=0.05, steps=3)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p,
      ...                                       grad_fn=jax.grad(loss_fn)))
      >>> for _ in range(100):
      ...   updates, state = step(params, state)
      ...   params = optax.apply_updates(params, updates)
      >>> [round(float(x), 2) for x in params]
      [1.0, -2.0]

    References:
      Foret et al. 2021, https://arxiv.org/abs/2010.01412
    """
    return _sam_like(
        base_tx, rho, ascent_lib.multistep_ascent(steps, step_size=step_size,
                                                  mask=mask),
        options=SAMOptions(axis_name, sync_perturbation,
                           perturbation_axis_name,
                           perturbation_axis_index_groups, full_diagnostics))


@_checks_call
def esam(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    beta: float = 0.6,
    *,
    seed: ascent_lib.Seed = 0,
    granularity: str = "coordinate",
    selection_ratio: Optional[float] = None,
    selection: str = "sharpness",
    mask: Mask = None,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    perturbation_axis_name: Optional[AxisName] = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """ESAM: stochastic weight perturbation (SWP) and sharpness-sensitive
    data selection (SDS).

    **SWP** (always on; ``beta=1`` turns it off) thins SAM's ε:

    .. math::

      m_i \\sim \\mathrm{Bernoulli}(β), \\qquad
      ε = \\frac{ρ}{β} \\, m ⊙ \\frac{g}{\\lVert g \\rVert_2}

    In JAX every leaf's second gradient is computed anyway, so SWP changes
    the perturbation, not the cost; its state is one key.

    **SDS** (``selection_ratio=r``) takes the second gradient on a fraction
    of the batch only. With :math:`\\ell_i` the loss of example i of the
    batch (n examples), :math:`k = \\max(1, \\lfloor r n + ½ \\rfloor)` and
    S the k examples of largest score :math:`s_i`:

    .. math::

      s_i = \\ell_i(w + ε) - \\ell_i(w) \\;\\;(\\texttt{"sharpness"}), \\qquad
      s_i = \\ell_i(w) \\;\\;(\\texttt{"loss"}), \\qquad
      g_{sam} = ∇_w \\frac{1}{k} \\sum_{i ∈ S} \\ell_i(w) \\Big|_{w + ε}

    ``"sharpness"`` is the paper's rule (Du et al. eq. 7-8): one forward
    pass on the whole batch at w + ε picks S, then forward and backward on
    S: with F the cost of a full-batch forward pass and a backward pass
    costing 2F, a step costs (4 + 3r)F against SAM's 6F and the base
    optimizer's 3F (≈ 1.83× the base step at r = ½, SAM 2×). ``"loss"`` is
    *our* cheaper option, not the paper's: S are the examples of largest
    clean loss, so no forward pass at w + ε is needed and a step costs
    (3 + 3r)F (1.5× at r = ½). Where the backward pass costs less than 2F
    (an MLP's first layer needs no input gradient) the scoring pass weighs
    more: XLA counts 1.55× and 1.97× the base step at r = ½ for a
    784-512-512-10 MLP (``tests/test_esam_sds.py``). When k = n nothing is
    selected or scored: the step is ESAM's on the whole batch. ε still comes
    from the caller's full-batch gradient ``g``. k depends only on the
    batch's static shape, so nothing retraces; ties go to the lower index
    (``jax.lax.top_k``). Under ``axis_name`` each replica selects from its
    own local batch.

    With ``selection_ratio`` set, ``update`` builds the ``grad_fn`` it hands
    to the shared core from keyword arguments instead of taking one:
    ``update(grads, state, params, *, example_loss_fn, batch,
    example_losses=None, **extra_args)``, where

    * ``example_loss_fn(params, batch)`` returns the per-example losses,
      shape ``[n]`` (an array, not ``(losses, aux)``);
    * ``batch`` is a pytree whose leaves all have the leading axis n;
    * ``example_losses`` are the clean losses :math:`\\ell_i(w)`, shape
      ``[n]``, which a caller usually has for free from its own forward
      pass (``jax.value_and_grad(..., has_aux=True)``). Both rules need
      them; when absent they are computed, costing one more full-batch
      forward pass F (which XLA's CSE removes when the same ``jit`` already
      evaluates the same losses at ``params``).

    Passing ``grad_fn`` too is refused (it would be silently ignored). None
    of the three is forwarded to ``base_tx``. With the ``"sharpness"`` rule
    the diagnostics' ``perturbed_loss`` is the full-batch mean of
    :math:`\\ell_i(w + ε)` (free); with ``"loss"`` it is not known (0).

    Args:
      base_tx: the optimizer that receives the perturbed gradient.
      rho: the radius ρ ≥ 0 (float or schedule).
      beta: β ∈ (0, 1], the probability of perturbing a coordinate.
      seed: an int or a JAX PRNG key.
      granularity: ``"coordinate"`` (the paper) or ``"leaf"`` (one draw per
        parameter tensor, the official code).
      selection_ratio: r ∈ (0, 1], the fraction of the batch the second
        gradient is taken on (the paper uses ½); ``None`` (default): the
        whole batch, through ``grad_fn`` as for :func:`sam`. ``1.0`` is
        ESAM without SDS. A Python number (it fixes k): under
        ``optax.inject_hyperparams`` list it in ``static_args``.
      selection: the rule that picks the examples, ``"sharpness"`` (the
        paper's) or ``"loss"`` (cheaper, ours); only with
        ``selection_ratio``.
      mask: the leaves to perturb, as for :func:`sam`.
      axis_name: as for :func:`sam`.
      sync_perturbation: as for :func:`sam`.
      perturbation_axis_name: as for :func:`sam`.
      perturbation_axis_index_groups: as for :func:`sam`.
      full_diagnostics: as for :func:`sam`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - jnp.array([1.0, -2.0])) ** 2)
      >>> tx = sam_optax.esam(optax.sgd(0.1), rho=0.05, beta=0.6, seed=0)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p,
      ...                                       grad_fn=jax.grad(loss_fn)))
      >>> for _ in range(100):
      ...   updates, state = step(params, state)
      ...   params = optax.apply_updates(params, updates)
      >>> [round(float(x), 1) for x in params]
      [1.0, -2.0]

      With data selection, the second gradient on half of the batch:

      >>> x = jnp.stack([jnp.linspace(-1.0, 1.0, 8), jnp.ones(8)], axis=1)
      >>> batch = {"x": x, "y": x @ jnp.array([1.0, -2.0])}
      >>> def example_loss_fn(w, batch):  # one loss per example, shape [n]
      ...   return (batch["x"] @ w - batch["y"]) ** 2
      >>> def mean_loss(w, batch):
      ...   losses = example_loss_fn(w, batch)
      ...   return jnp.mean(losses), losses
      >>> tx = sam_optax.esam(optax.sgd(0.2), rho=0.05, beta=1.0,
      ...                     selection_ratio=0.5)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> @jax.jit
      ... def step(params, state, batch):
      ...   (loss, losses), grads = jax.value_and_grad(
      ...       mean_loss, has_aux=True)(params, batch)
      ...   updates, state = tx.update(
      ...       grads, state, params, example_loss_fn=example_loss_fn,
      ...       batch=batch, example_losses=losses)
      ...   return optax.apply_updates(params, updates), state
      >>> for _ in range(300):
      ...   params, state = step(params, state, batch)
      >>> [round(float(x), 2) for x in params]
      [1.0, -2.0]

    References:
      Du, Yan, Feng, Zhou, Zhen, Goh, Tan. Efficient Sharpness-aware
      Minimization for Improved Training of Neural Networks. ICLR 2022.
      https://arxiv.org/abs/2110.03141
    """
    _check_selection(selection_ratio, selection)
    ascent = ascent_lib.stochastic_weight_perturbation(
        ascent_lib.normalized_ascent(mask=mask), beta, seed=seed,
        granularity=granularity)
    tx = _sam_like(
        base_tx, rho, ascent,
        options=SAMOptions(axis_name, sync_perturbation,
                           perturbation_axis_name,
                           perturbation_axis_index_groups, full_diagnostics))
    if selection_ratio is None:
        return tx
    return _with_data_selection(tx, float(selection_ratio), selection)


def _check_selection(selection_ratio: Any, selection: Any) -> None:
    """``esam``'s data-selection arguments, checked at construction."""
    validation.check_choice(selection, "selection", ("sharpness", "loss"))
    if selection_ratio is None:
        if selection != "sharpness":
            raise ValueError(
                f"`selection={selection!r}` picks the examples of the data "
                "selection, which is off: set `selection_ratio` too (e.g. "
                "`selection_ratio=0.5`).")
        return
    if isinstance(selection_ratio, jax.Array):
        raise ValueError(
            "`selection_ratio` must be a Python number in (0, 1]; got a JAX "
            f"array ({selection_ratio!r})."
            + validation.static_hint("selection_ratio"))
    if isinstance(selection_ratio, bool) or not isinstance(selection_ratio,
                                                            Real):
        raise ValueError(
            "`selection_ratio` must be a number in (0, 1] (the fraction of "
            f"the batch), or None; got {selection_ratio!r}.")
    validation.check_in_range(selection_ratio, "selection_ratio", 0.0, 1.0,
                              low_open=True)


_MISSING_SELECTION_ARGS = (
    "`esam(..., selection_ratio=...)` takes the second gradient on a selected "
    "part of the batch, so `update` needs the per-example loss and the batch "
    "instead of `grad_fn`: `tx.update(grads, opt_state, params, "
    "example_loss_fn=example_loss_fn, batch=batch, example_losses=losses)`, "
    "where `example_loss_fn(params, batch)` returns one loss per example "
    "(shape [n]) and `losses` (optional) are those losses at `params`. Got "
    "no `{missing}`. (With Flax Linen's `sam_optax.linen.TrainState`, pass "
    "them in `extra_args={{...}}`.)")

_GRAD_FN_WITH_SELECTION = (
    "`esam(..., selection_ratio=...)` builds the second gradient itself from "
    "`example_loss_fn` and `batch`, and would ignore the `grad_fn` passed to "
    "`update`: drop `grad_fn` (or build `esam` without `selection_ratio` to "
    "take the second gradient on the whole batch through `grad_fn`).")


def _with_data_selection(
    tx: optax.GradientTransformationExtraArgs, ratio: float, selection: str,
) -> optax.GradientTransformationExtraArgs:
    """``tx`` whose ``update`` builds its ``grad_fn`` from the per-example
    loss and the batch: the gradient of the mean loss over the selected
    examples (ESAM's SDS). The second gradient is still taken in the core."""

    def update_fn(grads: PyTree, state: Any, params: PyTree = None, *,
                  example_loss_fn: Optional[Callable[[PyTree, PyTree],
                                                     jax.Array]] = None,
                  batch: PyTree = None,
                  example_losses: Optional[jax.Array] = None,
                  **extra_args: Any) -> tuple[PyTree, Any]:
        if extra_args.pop("grad_fn", None) is not None:
            raise TypeError(_GRAD_FN_WITH_SELECTION)
        if example_loss_fn is None:
            raise TypeError(_MISSING_SELECTION_ARGS.format(
                missing="example_loss_fn"))
        if batch is None:
            raise TypeError(_MISSING_SELECTION_ARGS.format(missing="batch"))
        if not callable(example_loss_fn):
            raise TypeError(
                "`example_loss_fn` must be a function `example_loss_fn("
                f"params, batch) -> losses` (shape [n]); got "
                f"{type(example_loss_fn).__name__}.")
        n = validation.leading_size(
            batch, "batch", "(Bind constants into `example_loss_fn`.)")
        k = max(1, min(n, math.floor(ratio * n + 0.5)))
        if example_losses is not None:
            _check_example_losses(example_losses, n, "example_losses")
        grad_fn = _selected_grad_fn(example_loss_fn, batch, params,
                                    example_losses, k, selection, n)
        return tx.update(grads, state, params, grad_fn=grad_fn, **extra_args)

    return optax.GradientTransformationExtraArgs(
        tx.init, cast(optax.TransformUpdateExtraArgsFn, update_fn))


def _check_example_losses(losses: Any, n: int, name: str) -> None:
    """One real loss per example: shape ``[n]`` (``name`` is the argument
    that holds, or the function that returned, them)."""
    subject = (f"`{name}` must return" if name == "example_loss_fn"
               else f"`{name}` must be")
    if isinstance(losses, (tuple, list, dict)):
        raise TypeError(
            f"{subject} an array of per-example losses, shape ({n},); got a "
            f"{type(losses).__name__} (from `has_aux`, take the losses, not "
            "`(losses, aux)`).")
    if np.shape(losses) != (n,):
        raise ValueError(
            f"{subject} one loss per example of `batch`, shape ({n},); got "
            f"shape {np.shape(losses)}.")
    if not jnp.issubdtype(jnp.result_type(losses), jnp.floating):
        raise TypeError(
            f"{subject} real floating-point losses; got dtype "
            f"{jnp.result_type(losses)}.")


def _selected_grad_fn(example_loss_fn: Callable[[PyTree, PyTree], jax.Array],
                      batch: PyTree, params: PyTree,
                      example_losses: Optional[jax.Array], k: int,
                      selection: str, n: int) -> Callable[[PyTree], Any]:
    """``grad_fn(point)``: the gradient at ``point`` (= w + ε) of the mean
    loss over the k selected examples, with the full-batch mean loss at
    ``point`` when the rule computed it anyway."""

    def losses_at(point: PyTree, examples: PyTree, count: int) -> jax.Array:
        losses = example_loss_fn(point, examples)
        _check_example_losses(losses, count, "example_loss_fn")
        return losses

    def mean_loss(point: PyTree, examples: PyTree, count: int) -> jax.Array:
        return jnp.mean(losses_at(point, examples, count))

    if k == n:  # Nothing to select: the whole batch, as `grad_fn` would.
        return lambda point: jax.value_and_grad(mean_loss)(point, batch, n)

    def grad_fn(point: PyTree) -> Any:
        # Built lazily: a schedule that skips the second gradient skips this.
        clean = (losses_at(params, batch, n) if example_losses is None
                 else example_losses)
        # Scores in float32 (or wider): l(w + ε) - l(w) cancels in bf16.
        clean = numerics.as_compute(jax.lax.stop_gradient(clean))
        perturbed_value = None
        if selection == "sharpness":
            perturbed = numerics.as_compute(
                jax.lax.stop_gradient(losses_at(point, batch, n)))
            scores = perturbed - clean
            perturbed_value = jnp.mean(perturbed)
        else:
            scores = clean
        _, chosen = jax.lax.top_k(scores, k)
        subset = jax.tree.map(lambda x: jnp.take(x, chosen, axis=0), batch)
        grads = jax.grad(mean_loss)(point, subset, k)
        return grads if perturbed_value is None else (perturbed_value, grads)

    return grad_fn


# ------------------------------------ the descent and schedule families
# SAM's ascent with another descent (what `base_tx` receives) or schedule
# (when the second gradient is paid for); `mask`, `axis_name`,
# `sync_perturbation`, `perturbation_axis_name` and
# `perturbation_axis_index_groups` mean what they mean for `sam`.


@_checks_call
def gsam(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    alpha: float = 0.1,
    *,
    mask: Mask = None,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    perturbation_axis_name: Optional[AxisName] = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """GSAM: SAM plus a descent on the surrogate gap (Zhuang et al. 2022).

    .. math::

      ε = ρ_t \\frac{g}{\\lVert g \\rVert}, \\quad g_{sam} = ∇L(w + ε), \\quad
      g_⊥ = g - \\langle g, \\hat g_{sam} \\rangle \\hat g_{sam}, \\quad
      w \\leftarrow w + \\mathrm{base\\_tx}(g_{sam} - α g_⊥)

    ``alpha = 0`` is SAM. The paper lets ρ decay with the learning rate: pass
    ``rho=sam_optax.gsam_rho_schedule(lr_schedule, lr_max=..., lr_min=...,
    rho_max=..., rho_min=...)``; any Optax schedule is accepted.

    Args:
      base_tx: the optimizer that receives the GSAM gradient.
      rho: radius ρ ≥ 0, or a schedule of the step count.
      alpha: weight α ∈ [0, 1] of the surrogate-gap term.
      mask: the leaves to perturb, as for :func:`sam`.
      axis_name: as for :func:`sam`.
      sync_perturbation: as for :func:`sam`.
      perturbation_axis_name: as for :func:`sam`.
      perturbation_axis_index_groups: as for :func:`sam`.
      full_diagnostics: as for :func:`sam`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - jnp.array([1.0, -2.0])) ** 2)
      >>> lr = optax.cosine_decay_schedule(0.1, 100)
      >>> rho = sam_optax.gsam_rho_schedule(lr, lr_max=0.1, lr_min=0.0,
      ...                                   rho_max=0.05, rho_min=0.01)
      >>> tx = sam_optax.gsam(optax.sgd(lr), rho=rho, alpha=0.1)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda p, s: tx.update(
      ...     jax.grad(loss_fn)(p), s, p, grad_fn=jax.grad(loss_fn)))
      >>> for _ in range(100):
      ...   updates, state = step(params, state)
      ...   params = optax.apply_updates(params, updates)
      >>> [round(float(x), 2) for x in params]
      [1.0, -2.0]

    References:
      Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan, Liu.
      Surrogate Gap Guided Sharpness-Aware Minimization. ICLR 2022.
      https://arxiv.org/abs/2203.08065
    """
    return _sam_like(
        base_tx, rho, ascent_lib.normalized_ascent(mask=mask),
        descent=descent_lib.gsam_gradient(alpha),
        options=SAMOptions(axis_name, sync_perturbation,
                           perturbation_axis_name,
                           perturbation_axis_index_groups, full_diagnostics))


@_checks_call
def wsam(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    gamma: float = 0.9,
    *,
    decoupled: bool = False,
    learning_rate: Optional[ScalarOrSchedule] = None,
    mask: Mask = None,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    perturbation_axis_name: Optional[AxisName] = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """WSAM: sharpness as a regularizer of weight γ/(1−γ) (Yue et al. 2023).

    WSAM minimises :math:`L(w) + \\frac{γ}{1-γ}\\,(L(w+ε) - L(w))`. Coupled
    form (default), the weighted gradient goes through ``base_tx``:

    .. math::

      w \\leftarrow w + \\mathrm{base\\_tx}\\Big(\\frac{1-2γ}{1-γ} g
      + \\frac{γ}{1-γ} g_{sam}\\Big)

    Decoupled form (``decoupled=True``, the paper's Algorithm 1), ``base_tx``
    sees only ``g`` and the sharpness term is a separate SGD step:

    .. math::

      w \\leftarrow w + \\mathrm{base\\_tx}(g)
      - η_t \\frac{γ}{1-γ} (g_{sam} - g)

    The decoupled form needs from ``base_tx`` its learning rate η_t: pass the
    same float or schedule as ``learning_rate`` (evaluated at the SAM step
    count). ``gamma = 0`` is the base optimizer on ``g`` (the second gradient
    is still computed); ``gamma = 0.5`` in the coupled form is SAM.

    Args:
      base_tx: the optimizer.
      rho: radius ρ ≥ 0, or a schedule of the step count.
      gamma: sharpness weight γ ∈ [0, 1).
      decoupled: use the decoupled form (needs ``learning_rate``).
      learning_rate: ``base_tx``'s learning rate, float or schedule; only
        for ``decoupled=True``.
      mask: the leaves to perturb, as for :func:`sam`.
      axis_name: as for :func:`sam`.
      sync_perturbation: as for :func:`sam`.
      perturbation_axis_name: as for :func:`sam`.
      perturbation_axis_index_groups: as for :func:`sam`.
      full_diagnostics: as for :func:`sam`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - jnp.array([1.0, -2.0])) ** 2)
      >>> tx = sam_optax.wsam(optax.sgd(0.1), rho=0.05, gamma=0.8,
      ...                     decoupled=True, learning_rate=0.1)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda p, s: tx.update(
      ...     jax.grad(loss_fn)(p), s, p, grad_fn=jax.grad(loss_fn)))
      >>> for _ in range(100):
      ...   updates, state = step(params, state)
      ...   params = optax.apply_updates(params, updates)
      >>> [round(float(x), 2) for x in params]
      [1.0, -2.0]

    References:
      Yue, Jiang, Ye, Gao, Liu, Zhang. Sharpness-Aware Minimization
      Revisited: Weighted Sharpness as a Regularization Term. KDD 2023.
      https://arxiv.org/abs/2305.15817
    """
    validation.check_bool(decoupled, "decoupled")
    if decoupled and learning_rate is None:
        raise ValueError(
            "`wsam(..., decoupled=True)` applies the sharpness term as its own "
            "SGD step after `base_tx`: pass `learning_rate=` (the float or "
            "schedule that `base_tx` uses).")
    if not decoupled and learning_rate is not None:
        raise ValueError(
            "`learning_rate` is only used by `decoupled=True`; drop it (the "
            "coupled form takes the learning rate from `base_tx`).")
    descent = (descent_lib.wsam_decoupled_gradient(gamma, learning_rate)
               if decoupled and learning_rate is not None
               else descent_lib.wsam_gradient(gamma))
    return _sam_like(
        base_tx, rho, ascent_lib.normalized_ascent(mask=mask),
        descent=descent,
        options=SAMOptions(axis_name, sync_perturbation,
                           perturbation_axis_name,
                           perturbation_axis_index_groups, full_diagnostics))


@_checks_call
def looksam(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    k: int = 5,
    alpha: float = 0.7,
    *,
    mask: Mask = None,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    perturbation_axis_name: Optional[AxisName] = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """LookSAM: a SAM step every k steps, its direction reused in between.

    At steps 0, k, 2k, ... a SAM step that stores
    :math:`g_v = g_{sam} - \\langle g_{sam}, \\hat g \\rangle \\hat g`; at the
    other steps, **without calling** ``grad_fn`` (``lax.cond``):

    .. math::

      w \\leftarrow w + \\mathrm{base\\_tx}\\Big(g + α
      \\frac{\\lVert g \\rVert}{\\lVert g_v \\rVert} g_v\\Big)

    so a step costs (k + 1)/k gradients on average. Norms are global over
    all leaves (the paper's PyTorch code uses per-tensor ones). ``k = 1`` is
    SAM. ``diagnostics(state).perturbed`` tells which steps paid.

    Args:
      base_tx: the optimizer.
      rho: radius ρ ≥ 0, or a schedule of the step count.
      k: refresh period ≥ 1.
      alpha: weight α ≥ 0 of the reused direction.
      mask: the leaves to perturb, as for :func:`sam`.
      axis_name: as for :func:`sam`.
      sync_perturbation: as for :func:`sam`.
      perturbation_axis_name: as for :func:`sam`.
      perturbation_axis_index_groups: as for :func:`sam`.
      full_diagnostics: as for :func:`sam`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - jnp.array([1.0, -2.0])) ** 2)
      >>> tx = sam_optax.looksam(optax.sgd(0.1), rho=0.05, k=5, alpha=0.7)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> paid = 0
      >>> step = jax.jit(lambda p, s: tx.update(
      ...     jax.grad(loss_fn)(p), s, p, grad_fn=jax.grad(loss_fn)))
      >>> for _ in range(100):
      ...   updates, state = step(params, state)
      ...   params = optax.apply_updates(params, updates)
      ...   paid += int(sam_optax.diagnostics(state).perturbed)
      >>> [round(float(x), 2) for x in params], paid
      ([1.0, -2.0], 20)

    References:
      Liu, Mai, Chen, Hsieh, You. Towards Efficient and Scalable
      Sharpness-Aware Minimization. CVPR 2022.
      https://arxiv.org/abs/2203.02714
    """
    return _sam_like(
        base_tx, rho, ascent_lib.normalized_ascent(mask=mask),
        descent=descent_lib.looksam_gradient(alpha),
        schedule=schedule_lib.every_k_steps(k),
        options=SAMOptions(axis_name, sync_perturbation,
                           perturbation_axis_name,
                           perturbation_axis_index_groups, full_diagnostics))


@_checks_call
def every_k_sam(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    k: int = 5,
    *,
    mask: Mask = None,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    perturbation_axis_name: Optional[AxisName] = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """SAM at steps 0, k, 2k, ...; the plain base step on ``g`` otherwise.

    The skipped steps do not call ``grad_fn`` (``lax.cond``): (k + 1)/k
    gradients per step on average. ``k = 1`` is SAM.

    Args:
      base_tx: the optimizer.
      rho: radius ρ ≥ 0, or a schedule of the step count.
      k: period ≥ 1.
      mask: the leaves to perturb, as for :func:`sam`.
      axis_name: as for :func:`sam`.
      sync_perturbation: as for :func:`sam`.
      perturbation_axis_name: as for :func:`sam`.
      perturbation_axis_index_groups: as for :func:`sam`.
      full_diagnostics: as for :func:`sam`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - jnp.array([1.0, -2.0])) ** 2)
      >>> tx = sam_optax.every_k_sam(optax.sgd(0.1), rho=0.05, k=2)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda p, s: tx.update(
      ...     jax.grad(loss_fn)(p), s, p, grad_fn=jax.grad(loss_fn)))
      >>> for _ in range(100):
      ...   updates, state = step(params, state)
      ...   params = optax.apply_updates(params, updates)
      >>> [round(float(x), 2) for x in params]
      [1.0, -2.0]

    References:
      The periodic schedule LookSAM builds on: Liu et al. 2022,
      https://arxiv.org/abs/2203.02714
    """
    return _sam_like(
        base_tx, rho, ascent_lib.normalized_ascent(mask=mask),
        schedule=schedule_lib.every_k_steps(k),
        options=SAMOptions(axis_name, sync_perturbation,
                           perturbation_axis_name,
                           perturbation_axis_index_groups, full_diagnostics))


@_checks_call
def ae_sam(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    c: ScalarOrSchedule = 0.0,
    delta: float = 0.9,
    *,
    mask: Mask = None,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    perturbation_axis_name: Optional[AxisName] = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """AE-SAM: SAM only when ‖g‖² is high for its recent history.

    With moving statistics μ_t, σ²_t (forgetting rate δ) of ‖g_t‖², the step
    is a SAM step iff :math:`\\lVert g_t \\rVert^2 ≥ μ_t + c_t σ_t`, else the
    plain base step on ``g`` without calling ``grad_fn`` (``lax.cond``); see
    :func:`sam_optax.schedule.adaptive_policy`. The paper moves :math:`c_t`
    linearly from λ₁ = −1 to λ₂ = 1 over training
    (``c=optax.linear_schedule(-1.0, 1.0, total_steps)``): SAM on most early
    steps, on few late ones. ``diagnostics(state).perturbed`` tells which
    steps paid.

    Args:
      base_tx: the optimizer.
      rho: radius ρ ≥ 0, or a schedule of the step count.
      c: threshold in standard deviations, a float or a schedule.
      delta: forgetting rate δ ∈ [0, 1) of the statistics.
      mask: the leaves to perturb, as for :func:`sam`.
      axis_name: as for :func:`sam`.
      sync_perturbation: as for :func:`sam`.
      perturbation_axis_name: as for :func:`sam`.
      perturbation_axis_index_groups: as for :func:`sam`.
      full_diagnostics: as for :func:`sam`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - jnp.array([1.0, -2.0])) ** 2)
      >>> tx = sam_optax.ae_sam(optax.sgd(0.1), rho=0.05,
      ...                       c=optax.linear_schedule(-1.0, 1.0, 100))
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda p, s: tx.update(
      ...     jax.grad(loss_fn)(p), s, p, grad_fn=jax.grad(loss_fn)))
      >>> for _ in range(100):
      ...   updates, state = step(params, state)
      ...   params = optax.apply_updates(params, updates)
      >>> [round(float(x), 2) for x in params]
      [1.0, -2.0]

    References:
      Jiang, Yang, Zhang, Kwok. An Adaptive Policy to Employ Sharpness-Aware
      Minimization. ICLR 2023. https://arxiv.org/abs/2304.14647
    """
    return _sam_like(
        base_tx, rho, ascent_lib.normalized_ascent(mask=mask),
        schedule=schedule_lib.adaptive_policy(c, delta),
        options=SAMOptions(axis_name, sync_perturbation,
                           perturbation_axis_name,
                           perturbation_axis_index_groups, full_diagnostics))


@_checks_call
def msam(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.3,
    *,
    mask: Mask = None,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    perturbation_axis_name: Optional[AxisName] = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """MSAM: perturb along the momentum, one gradient per step (Becker 2024).

    See ``sam_optax.momentum_sam.momentum_sam`` for the rule and what
    ``base_tx`` must be (a momentum optimizer, e.g. SGD with momentum). The
    parameters the caller holds are the *perturbed* ones; evaluate and export
    :func:`sam_optax.msam_clean_params`. ``grad_fn`` is accepted and never
    called. ε comes from the replica-identical update, so
    ``sync_perturbation``, ``perturbation_axis_name`` and
    ``perturbation_axis_index_groups`` are checked but change nothing.

    Args:
      base_tx: a momentum optimizer.
      rho: radius ρ ≥ 0 (the paper uses ~0.3 with SGD), or a schedule.
      mask: the leaves to perturb, as for :func:`sam`.
      axis_name: as for :func:`sam`.
      sync_perturbation: as for :func:`sam`.
      perturbation_axis_name: as for :func:`sam`.
      perturbation_axis_index_groups: as for :func:`sam`.
      full_diagnostics: also record ‖g‖ (see
        ``sam_optax.momentum_sam.momentum_sam``); ‖ε_{t+1}‖ is always
        recorded, at no cost.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> tx = sam_optax.msam(optax.sgd(0.1, momentum=0.9), rho=0.3)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
      >>> params = optax.apply_updates(params, updates)  # w₁ + ε₁
      >>> [round(float(x), 3) for x in params]
      [0.412, 0.412]
      >>> [round(float(x), 3) for x in sam_optax.msam_clean_params(params, state)]
      [0.2, 0.2]

    References:
      Becker, Altrock, Risse. Momentum-SAM: Sharpness Aware Minimization
      without Computational Overhead. 2024. https://arxiv.org/abs/2401.12033
    """
    validation.check_axis_name(perturbation_axis_name,
                               "perturbation_axis_name")
    validation.check_bool(sync_perturbation, "sync_perturbation")
    validation.check_bool(full_diagnostics, "full_diagnostics")
    if sync_perturbation and axis_name is None:
        raise ValueError("`sync_perturbation=True` needs `axis_name`.")
    if (perturbation_axis_index_groups is not None
            and perturbation_axis_name is None):
        raise ValueError(
            "`perturbation_axis_index_groups` needs `perturbation_axis_name`.")
    return momentum_sam_lib.momentum_sam(base_tx, rho, mask=mask,
                                         axis_name=axis_name,
                                         full_diagnostics=full_diagnostics)


# ------------------------------------------ sparse and look-behind ascents


@_checks_call
def ssam_f(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    sparsity: float = 0.5,
    *,
    update_interval: int = 100,
    mask: Mask = None,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    perturbation_axis_name: Optional[AxisName] = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """SSAM-F: SAM on the coordinates of largest Fisher information only.

    A binary mask ``m`` keeps the ``k = ⌊(1 − s)·N⌋`` coordinates (of all
    N, chosen together) with the largest accumulated squared gradient,
    refreshed every ``T_m`` steps (at ``t = 0, T_m, 2T_m, ...``):

    .. math::

      F ← F + g ⊙ g, \\qquad m = \\mathrm{top}_k(F) \\text{ at a refresh},
      \\qquad ε = ρ \\, m ⊙ \\frac{g}{\\lVert g \\rVert_2}, \\qquad
      w ← w + \\mathrm{base\\_tx}(∇L(w + ε))

    The norm is the whole gradient's (the paper's), so ‖ε‖ ≤ ρ; ``F`` is
    reset after each refresh. The paper computes the Fisher diagonal from
    N_F single-example gradients at each refresh; ``update`` sees only
    mini-batch gradients, so ``F`` sums the squared mini-batch gradients of
    the steps since the last refresh (no extra pass; the same with batches
    of one). ``sparsity=0`` is SAM. See
    :func:`sam_optax.ascent.fisher_sparse_ascent`. Under ``axis_name``,
    ``F`` and the mask come from the gradient that defines ε: per shard
    (state that differs across devices: use ``pmap``) unless
    ``sync_perturbation=True``.

    Cost: 2 gradient evaluations (a sort of the N scores at a refresh; in
    JAX the second gradient is dense anyway). State: a bool mask and a
    float32 accumulator, both parameter-sized, and a count.

    Args:
      base_tx: the optimizer that receives the perturbed gradient.
      rho: the radius ρ ≥ 0 (float or schedule).
      sparsity: s ∈ [0, 1], the fraction of coordinates *not* perturbed
        (the paper's headline setting is 0.5).
      update_interval: T_m ≥ 1, steps between refreshes of the mask (the
        paper refreshes every few epochs).
      mask: the leaves that take part, as for :func:`sam`; the others are
        never perturbed and take none of the k coordinates.
      axis_name: as for :func:`sam`.
      sync_perturbation: as for :func:`sam`.
      perturbation_axis_name: as for :func:`sam`.
      perturbation_axis_index_groups: as for :func:`sam`.
      full_diagnostics: as for :func:`sam` (‖ε‖ is measured on request only).

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum(jnp.array([4.0, 1.0, 3.0, 2.0]) * w ** 2)
      >>> tx = sam_optax.ssam_f(optax.sgd(0.05), rho=0.05, sparsity=0.5,
      ...                       update_interval=10)
      >>> params = jnp.ones(4)
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p,
      ...                                       grad_fn=jax.grad(loss_fn)))
      >>> updates, state = step(params, state)
      >>> state.ascent_state.mask  # the two largest squared gradients
      Array([ True, False,  True, False], dtype=bool)
      >>> for _ in range(100):
      ...   params = optax.apply_updates(params, updates)
      ...   updates, state = step(params, state)
      >>> [round(float(x), 3) for x in params]
      [0.0, 0.0, 0.0, 0.0]

    References:
      Mi, Shen, Ren, Zhou, Sun, Ji, Tao. Make Sharpness-Aware Minimization
      Stronger: A Sparsified Perturbation Approach. NeurIPS 2022.
      https://arxiv.org/abs/2210.05177
    """
    return _sam_like(
        base_tx, rho,
        ascent_lib.fisher_sparse_ascent(sparsity, update_interval, mask=mask),
        options=SAMOptions(axis_name, sync_perturbation,
                           perturbation_axis_name,
                           perturbation_axis_index_groups, full_diagnostics))


@_checks_call
def ssam_d(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    sparsity: float = 0.5,
    *,
    update_interval: int = 100,
    drop_rate: ScalarOrSchedule = 0.5,
    drop_criterion: str = "gradient",
    growth_criterion: str = "random",
    seed: ascent_lib.Seed = 0,
    mask: Mask = None,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    perturbation_axis_name: Optional[AxisName] = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """SSAM-D: SAM on a sparse mask evolved by dynamic sparse training.

    The mask starts as ``k = ⌊(1 − s)·N⌋`` random coordinates. At each
    refresh (``t = 0, T_m, 2T_m, ...``) ``n = min(⌊k·r_t⌋, N − k)``
    perturbed coordinates with the smallest drop score leave it and ``n``
    unperturbed ones with the largest growth score join it:

    .. math::

      m' = \\mathrm{top}_{k-n}(c_{drop}\\,|\\,m) ∪
           \\mathrm{top}_{n}(c_{grow}\\,|\\,\\lnot m), \\qquad
      ε = ρ \\, m' ⊙ \\frac{g}{\\lVert g \\rVert_2}, \\qquad
      w ← w + \\mathrm{base\\_tx}(∇L(w + ε))

    Defaults follow the paper's code: drop by ``|g|``, grow at random. The
    paper decays ``r_t`` with a cosine over training:
    ``drop_rate=optax.cosine_decay_schedule(0.5, total_steps)``.
    ``sparsity=0`` is SAM. See :func:`sam_optax.ascent.dynamic_sparse_ascent`.
    Under ``axis_name`` the ``|g|`` scores are those of the gradient that
    defines ε (per shard unless ``sync_perturbation=True``).

    Cost: 2 gradient evaluations (two sorts of the N scores at a refresh).
    State: a parameter-sized bool mask, a PRNG key and a count.

    Args:
      base_tx: the optimizer that receives the perturbed gradient.
      rho: the radius ρ ≥ 0 (float or schedule).
      sparsity: s ∈ [0, 1], the fraction of coordinates *not* perturbed.
      update_interval: T_m ≥ 1, steps between refreshes.
      drop_rate: r ∈ [0, 1], the fraction of the k perturbed coordinates
        swapped at a refresh; a float or a schedule of the step count.
      drop_criterion: ``"gradient"`` (``|g|``), ``"weight"`` (``|w|``) or
        ``"random"``: the smallest scores are dropped.
      growth_criterion: the same choices: the largest scores are grown.
      seed: an int or a JAX PRNG key (initial mask, random scores).
      mask: the leaves that take part, as for :func:`sam`.
      axis_name: as for :func:`sam`.
      sync_perturbation: as for :func:`sam`.
      perturbation_axis_name: as for :func:`sam`.
      perturbation_axis_index_groups: as for :func:`sam`.
      full_diagnostics: as for :func:`sam` (‖ε‖ is measured on request only).

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> tx = sam_optax.ssam_d(optax.sgd(0.1), rho=0.05, sparsity=0.75,
      ...                       update_interval=5, seed=0)
      >>> params = jnp.zeros(8)
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p,
      ...                                       grad_fn=jax.grad(loss_fn)))
      >>> for _ in range(100):
      ...   updates, state = step(params, state)
      ...   params = optax.apply_updates(params, updates)
      >>> int(state.ascent_state.mask.sum())  # 2 of 8 coordinates perturbed
      2
      >>> [round(float(x), 2) for x in params[:3]]
      [1.0, 1.0, 1.0]

    References:
      Mi et al. 2022, https://arxiv.org/abs/2210.05177
    """
    return _sam_like(
        base_tx, rho,
        ascent_lib.dynamic_sparse_ascent(
            sparsity, update_interval, drop_rate=drop_rate,
            drop_criterion=drop_criterion, growth_criterion=growth_criterion,
            seed=seed, mask=mask),
        options=SAMOptions(axis_name, sync_perturbation,
                           perturbation_axis_name,
                           perturbation_axis_index_groups, full_diagnostics))


class LookbehindState(NamedTuple):
    """State of :func:`lookbehind_sam`.

    Attributes:
      slow: the slow weights φ, the params at the start of the current
        outer step (compute dtype); ``()`` when no interpolation is needed
        (``alpha = 1`` or ``k = 1``).
      inner: the state of the SAM step taken at every update (a
        :class:`~sam_optax.SAMState`; its ascent state holds the inner step
        index and the perturbed point).
    """

    slow: Any
    inner: Any


def _look_behind(inner_tx: optax.GradientTransformationExtraArgs, k: int,
                 alpha: float | jax.Array
                 ) -> optax.GradientTransformationExtraArgs:
    """``inner_tx`` (whose ascent is :func:`sam_optax.ascent.lookbehind_ascent`
    with the same ``k``), with Lookahead's slow weights: the update that
    ends an outer step lands on ``φ + α(w_k − φ)`` instead of ``w_k``."""
    identity = isinstance(alpha, (int, float)) and float(alpha) == 1.0
    keeps_slow = k > 1 and not identity

    def init_fn(params: PyTree) -> LookbehindState:
        return LookbehindState(
            slow=numerics.zeros_like_compute(params) if keeps_slow else (),
            inner=inner_tx.init(params))

    def update_fn(grads: PyTree, state: LookbehindState, params: PyTree = None,
                  **extra_args: Any) -> tuple[PyTree, LookbehindState]:
        updates, inner = inner_tx.update(grads, state.inner, params,
                                         **extra_args)
        inner = cast(Any, inner)  # a SAMState
        if identity:
            return updates, LookbehindState(state.slow, inner)
        if k == 1:  # φ = w: the interpolation scales the update by α.
            return jax.tree.map(
                lambda u: (numerics.as_compute(u) * jnp.asarray(alpha).astype(
                    numerics.compute_dtype(u.dtype))).astype(u.dtype)
                if numerics.is_float(u) else u, updates), LookbehindState(
                    state.slow, inner)
        index = state.inner.ascent_state.index
        start = index == 0
        # The inner step was taken (not skipped by `perturb=False`, nor
        # rejected by a guard inside base_tx, which keep the index): only
        # then does it end the outer step.
        last = (index == k - 1) & (inner.ascent_state.index != index)

        def slow_leaf(s, w):
            if not numerics.is_float(w):
                return s
            return jnp.where(start, numerics.as_compute(w).astype(s.dtype), s)

        slow = jax.tree.map(slow_leaf, state.slow, params)

        def land(u, w, s):
            if not numerics.is_float(u):
                return u
            uc, wc = numerics.as_compute(u), numerics.as_compute(w)
            s = s.astype(uc.dtype)
            a = jnp.asarray(alpha).astype(uc.dtype)
            # w + u' = φ + α(w + u − φ)
            landed = s + a * (wc + uc - s) - wc
            return jnp.where(last, landed, uc).astype(u.dtype)

        return (jax.tree.map(land, updates, params, slow),
                LookbehindState(slow, inner))

    return optax.GradientTransformationExtraArgs(
        init_fn, cast(optax.TransformUpdateExtraArgsFn, update_fn))


@_checks_call
def lookbehind_sam(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    k: int = 5,
    alpha: float = 0.5,
    *,
    mask: Mask = None,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    perturbation_axis_name: Optional[AxisName] = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Lookbehind-SAM: k ascent steps back, one interpolated step forward.

    An *outer* step is ``k`` consecutive calls of ``update`` (the paper's
    inner steps; feed them the same mini-batch to reproduce the paper). With
    φ the (slow) weights at its start, ``w_0 = w'_0 = φ`` and
    ``i = 1..k``:

    .. math::

      w'_i = w'_{i-1} + ρ \\frac{∇L(w'_{i-1})}{\\lVert ∇L(w'_{i-1}) \\rVert},
      \\qquad w_i = w_{i-1} + \\mathrm{base\\_tx}(∇L(w'_i)),
      \\qquad φ ← φ + α (w_k - φ)

    The perturbed point keeps climbing over the outer step (it is neither
    projected nor reset), each inner step descends on its gradient with
    ``base_tx`` (whose state, e.g. momentum, advances every inner step), and
    the ``k``-th update lands on the interpolation, which is the next φ:
    the params the caller holds after every ``k``-th update are the slow
    weights (evaluate those); in between they are the fast weights w_i.
    ``k = 1, alpha = 1`` is SAM; ``alpha = 1`` keeps the fast weights.

    The ascent is :func:`sam_optax.ascent.lookbehind_ascent`, the second
    gradient ∇L(w'_i) the core's, and the interpolation a Lookahead-style
    wrapper around them (:class:`LookbehindState`). Under ``axis_name``
    the perturbed point climbs along per-shard gradients (per-device state)
    unless ``sync_perturbation=True``.

    Cost: 3 gradient evaluations per update for ``k ≥ 2`` (the caller's
    ``g``, which the method does not need, ∇L(w'_{i-1}) and ∇L(w'_i)); the
    paper's PyTorch code pays 2 per inner step because its model weights
    hold w'_i, where ``update``'s contract has the caller's params hold
    w_i. ``k = 1``: 2. State: the perturbed point and the slow weights
    (float32, parameter-sized each; none for ``k = 1``, no slow weights for
    ``alpha = 1``) and the inner index.

    Args:
      base_tx: the optimizer of the fast weights (the paper uses SGD with
        momentum).
      rho: the radius ρ ≥ 0 of each ascent step (float or schedule of the
        update count).
      k: inner steps per outer step (≥ 1; the paper uses 2 to 10).
      alpha: α ∈ (0, 1], the slow weights' step size.
      mask: the leaves to perturb, as for :func:`sam`.
      axis_name: as for :func:`sam`.
      sync_perturbation: as for :func:`sam`.
      perturbation_axis_name: as for :func:`sam`.
      perturbation_axis_index_groups: as for :func:`sam`.
      full_diagnostics: as for :func:`sam`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - jnp.array([1.0, -2.0])) ** 2)
      >>> tx = sam_optax.lookbehind_sam(optax.sgd(0.1), rho=0.05, k=2,
      ...                               alpha=0.5)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p,
      ...                                       grad_fn=jax.grad(loss_fn)))
      >>> for _ in range(200):  # 100 outer steps of k = 2 updates
      ...   updates, state = step(params, state)
      ...   params = optax.apply_updates(params, updates)
      >>> [round(float(x), 2) for x in params]
      [1.0, -2.0]

    References:
      Mordido, Malviya, Baratin, Chandar. Lookbehind-SAM: k steps back,
      1 step forward. ICML 2024. https://arxiv.org/abs/2307.16704
    """
    validation.check_in_range(alpha, "alpha", 0.0, 1.0, low_open=True)
    inner = _sam_like(
        base_tx, rho, ascent_lib.lookbehind_ascent(k, mask=mask),
        options=SAMOptions(axis_name, sync_perturbation,
                           perturbation_axis_name,
                           perturbation_axis_index_groups, full_diagnostics))
    return _look_behind(inner, k, alpha)


# --------------------------------------------- first-order flatness (GAM)


@_checks_call
def gam(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    alpha: float = 0.1,
    *,
    mask: Mask = None,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = False,
    perturbation_axis_name: Optional[AxisName] = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """GAM: gradient-norm aware minimization (Zhang et al. 2023, Alg. 1).

    GAM minimises ``L(w) + α R⁽¹⁾_ρ(w)``, where the *first-order* flatness
    ``R⁽¹⁾_ρ(w) = ρ max_{‖δ‖≤ρ} ‖∇L(w + δ)‖`` is the largest gradient norm
    in the ball (SAM's zeroth-order flatness is the largest loss). With
    ``g = ∇L(w)``, ``ĝ = g/‖g‖`` and ``H(θ) = ∇²L(θ)``:

    .. math::

      f = H(w)\\, ĝ, \\qquad θ_{adv} = w + ρ \\frac{f}{\\lVert f \\rVert},
      \\qquad g_{adv} = ∇L(θ_{adv}),

      w \\leftarrow w + \\mathrm{base\\_tx}\\Big(g + α ρ\\, H(θ_{adv})
      \\frac{g_{adv}}{\\lVert g_{adv} \\rVert}\\Big)

    This is the paper's Algorithm 1, the original GAM, with both
    Hessian-vector products exact (``jax.jvp`` of ``grad_fn``, see
    :func:`sam_optax.ascent.hessian_vector_product`). It is not the
    accelerated variant the official code ships (the paper's Appendix D:
    finite differences of gradients, merged with a SAM step and a
    GSAM-style decomposition, coefficients ``grad_beta_*`` and
    ``grad_gamma``), nor the paper's SAM + GAM. The ascent is
    :func:`sam_optax.ascent.gradient_norm_ascent`, the second gradient
    ``g_adv`` the core's, and the descent
    :func:`sam_optax.descent.gradient_norm_gradient`, which evaluates
    ``H(θ_adv) ĝ_adv`` through the core's
    :class:`~sam_optax.core.PerturbedPoint`. The paper's ``ξ`` in
    ``‖·‖ + ξ`` is the safe normalisation: a zero gradient gives ε = 0 and
    the plain base step on ``g``, never a NaN. Under ``axis_name``, θ_adv
    is per shard (m-sharpness) unless ``sync_perturbation=True``; the
    second product is averaged over replicas, so they stay identical.

    Cost: 2 gradient evaluations (the caller's ``g`` and ``g_adv``) and 2
    Hessian-vector products, each a forward-over-reverse pass of about two
    gradient evaluations' compute (it recomputes the gradient at its point
    alongside the product): XLA counts 5.5 times the FLOPs of a base step
    on a tanh MLP (256-512-512-10, batch 128), SAM 2.0. ``grad_fn`` must
    be forward-differentiable (``jax.jvp``), as ``jax.grad`` of ordinary
    JAX code is. State: none.

    Args:
      base_tx: the optimizer that receives ``g + α∇R⁽¹⁾``.
      rho: the radius ρ ≥ 0 (float or schedule) of the ball in which the
        gradient norm is maximised; it also scales the flatness gradient.
        ``rho=0`` is ``base_tx`` on ``g``.
      alpha: α ≥ 0, the weight of the first-order flatness; ``alpha=0`` is
        ``base_tx`` on ``g``. The defaults are a starting point, not the
        paper's tuned values: tune ρ and α together.
      mask: the leaves θ_adv moves, as for :func:`sam`; ``ĝ`` and the
        flatness gradient involve every leaf.
      axis_name: as for :func:`sam`.
      sync_perturbation: as for :func:`sam`.
      perturbation_axis_name: as for :func:`sam`.
      perturbation_axis_index_groups: as for :func:`sam`.
      full_diagnostics: as for :func:`sam` (``cosine`` is cos∠(g, g_adv)).

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - jnp.array([1.0, -2.0])) ** 2)
      >>> tx = sam_optax.gam(optax.sgd(0.1), rho=0.05, alpha=0.1)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p,
      ...                                       grad_fn=jax.grad(loss_fn)))
      >>> for _ in range(100):
      ...   updates, state = step(params, state)
      ...   params = optax.apply_updates(params, updates)
      >>> [round(float(x), 2) for x in params]
      [1.0, -2.0]

    References:
      Zhang, Xu, Yu, Zou, Cui. Gradient Norm Aware Minimization Seeks
      First-Order Flatness and Improves Generalization. CVPR 2023.
      https://arxiv.org/abs/2303.03108
    """
    return _sam_like(
        base_tx, rho, ascent_lib.gradient_norm_ascent(mask=mask),
        descent=descent_lib.gradient_norm_gradient(alpha),
        options=SAMOptions(axis_name, sync_perturbation,
                           perturbation_axis_name,
                           perturbation_axis_index_groups, full_diagnostics))


__all__ = ["ae_sam", "asam", "esam", "every_k_sam", "fisher_sam", "friendly_sam",
           "gam", "gcsam",
           "gsam", "lookbehind_sam", "looksam", "msam", "multistep_sam",
           "random_sam", "sam", "ssam_d", "ssam_f", "vasso", "wsam"]

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

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax import numerics, validation
from sam_optax.core import (
    Schedule,
    no_state,
    probe_schedules,
    the_sam_state,
)
from sam_optax.types import PyTree, ScalarOrSchedule

# ‖g‖² is capped here so that its squared deviation (the variance update)
# stays finite in float32 even for absurd gradients (‖g‖ ≥ 1e9).
_MAX_SQUARED_NORM = 1e18



def every_step() -> Schedule:
    """Take the second gradient at every step (no ``lax.cond`` is built)."""

    def decide(grads, state, *, count):
        del grads, count
        return True, state

    return Schedule(init=no_state, decide=decide, uses_grads=False,
                    on_count=_always)


def _always(count: int) -> bool:
    del count
    return True


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

    def on_count(count: int) -> bool:
        return count % k == 0

    return Schedule(init=no_state, decide=decide, uses_grads=False,
                    on_count=on_count)


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


# ------------------------------------------- deciding on the host
# A schedule that skips steps makes the core build `lax.cond`. That is right
# everywhere, and cheap on an MLP; but XLA:CPU runs a convolution's gradient
# inside a conditional 15-21x slower than at the top level, and any backend
# pays for the branch it cannot fuse across. When the decision depends on the
# update count alone, the host can make it instead: two compiled programs
# (`update(..., perturb=True)` and `perturb=False`), no conditional in either,
# and a Python choice between them at each step.


def _unused_grad_fn(params: PyTree) -> PyTree:
    # A SAM-type update stops before taking a gradient; another kind of
    # transformation (MSAM, SAMPa, bSAM) is traced to its end, abstractly.
    return jax.tree.map(jnp.zeros_like, params)


def count_rule(tx: optax.GradientTransformation, params: PyTree
               ) -> Optional[Callable[[int], bool]]:
    """Whether update ``t`` of ``tx`` takes the second gradient, as a pure
    Python function of ``t``, when ``tx``'s schedule depends on the count
    alone; ``None`` when it does not.

    Found by tracing ``tx.update`` abstractly (no computation, no
    compilation) up to the SAM-type transformation inside it, wherever it
    sits (``optax.chain``, ``inject_hyperparams``, ...). ``None`` for:
    AE-SAM (its decision reads the gradient: see :func:`decision`), MSAM
    (no second gradient to skip), a ``tx`` with no SAM-type transformation,
    and a ``base_tx`` holding ``optax.apply_if_finite`` or a ``MultiSteps``
    skip rule, which may hold the count back where the host cannot see it.

    Use it with ``update(..., perturb=rule(t))``: ``t`` is the SAM state's
    ``count`` (:func:`sam_count`), which :func:`host_scheduled` keeps for you.

    Example:
      >>> import functools, jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> tx = sam_optax.looksam(optax.sgd(0.1), rho=0.05, k=3)
      >>> params = jnp.zeros(2)
      >>> rule = sam_optax.schedule.count_rule(tx, params)
      >>> [rule(t) for t in range(6)]
      [True, False, False, True, False, False]
      >>> def step(params, state, perturb):
      ...   updates, state = tx.update(jax.grad(loss_fn)(params), state, params,
      ...                              grad_fn=jax.grad(loss_fn), perturb=perturb)
      ...   return optax.apply_updates(params, updates), state
      >>> steps = {flag: jax.jit(functools.partial(step, perturb=flag))
      ...          for flag in (True, False)}  # no lax.cond in either
      >>> state = tx.init(params)
      >>> for t in range(sam_optax.schedule.sam_count(state), 6):
      ...   params, state = steps[rule(t)](params, state)
      >>> int(state.count)
      6
    """

    def update(params):
        grads = jax.tree.map(jnp.zeros_like, params)
        return tx.update(
            grads, tx.init(params), params,
            grad_fn=_unused_grad_fn)  # pyright: ignore[reportCallIssue]

    def trace() -> None:
        try:
            jax.eval_shape(update, params)
        except Exception:  # noqa: BLE001 -- e.g. an axis name unbound here
            pass  # no report: not known to be count-based (the step itself
            # raises any real error)

    probes = probe_schedules("rule", trace)
    if len(probes) != 1 or probes[0].guarded:
        return None
    return probes[0].on_count


def decision(tx: optax.GradientTransformation, grads: PyTree,
             opt_state: optax.OptState, params: PyTree,
             **extra_args: Any) -> jax.Array:
    """The schedule's decision for this update, as a boolean scalar, without
    taking the step: for a two-phase step whose second phase is chosen on
    the host (e.g. AE-SAM, whose decision reads the gradient).

    Call it inside a traced function with the arguments the step's
    ``tx.update`` would get; ``True`` for a schedule that never skips.
    Reading the result on the host (``bool(flag)``) waits for the first
    phase: one device-to-host transfer per step.

    Example (AE-SAM in two phases, no ``lax.cond``):
      >>> import functools, jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> tx = sam_optax.ae_sam(optax.sgd(0.1), rho=0.05)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> @jax.jit
      ... def first(params, state):
      ...   grads = jax.grad(loss_fn)(params)
      ...   return grads, sam_optax.schedule.decision(tx, grads, state, params)
      >>> @functools.partial(jax.jit, static_argnames='perturb')
      ... def second(params, state, grads, perturb):
      ...   updates, state = tx.update(grads, state, params,
      ...                              grad_fn=jax.grad(loss_fn), perturb=perturb)
      ...   return optax.apply_updates(params, updates), state
      >>> for _ in range(3):
      ...   grads, flag = first(params, state)
      ...   params, state = second(params, state, grads, perturb=bool(flag))
      >>> int(state.count)
      3

    Raises:
      ValueError: if ``tx`` holds no SAM-type transformation with a schedule.
    """

    def update():
        return tx.update(
            grads, opt_state, params,
            grad_fn=_unused_grad_fn,  # pyright: ignore[reportCallIssue]
            **extra_args)

    probes = probe_schedules("decision", update)
    if not probes:
        raise ValueError(
            "`decision` found no SAM-type transformation with a schedule in "
            "`tx` (MSAM has none: it takes one gradient per step).")
    return jnp.asarray(probes[0].decision, jnp.bool_)


def sam_count(opt_state: optax.OptState) -> int:
    """The update count of the SAM-type state inside ``opt_state`` (chains,
    wrappers, a Flax NNX optimizer's state, replicated ``pmap`` states).

    A host read: call it once, when a run starts or resumes, not per step.

    Raises:
      ValueError: if ``opt_state`` holds no SAM state, or several.
    """
    return _read_count(_count_leaf(opt_state))


def _read_count(leaf: Any) -> int:
    # Across processes a replicated array is not fully addressable: read
    # this process's copy (every copy holds the same count).
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        leaf = leaf.addressable_data(0)
    return int(np.asarray(leaf).reshape(-1)[0])


def _count_leaf(opt_state: optax.OptState) -> jax.Array:
    # A Flax NNX optimizer wraps each array in a Variable: take the array.
    return jax.tree.leaves(the_sam_state(opt_state).count)[0]


class HostScheduledStep:
    """A training step that picks one of two compiled programs on the host.

    Built by :func:`host_scheduled`; call it like the step it wraps. It keeps
    the SAM update count ``t`` in Python: read from the state (one host read)
    on the first call and whenever it is handed a state it did not return
    (a checkpoint restored, a state from elsewhere), then counted, so a
    steady run never waits for the device.
    """

    def __init__(self, steps: Mapping[bool, Callable[..., Any]],
                 rule: Callable[[int], bool],
                 opt_state: Callable[[tuple], Any],
                 new_opt_state: Callable[[tuple, Any], Any]) -> None:
        self._steps = dict(steps)
        self._rule = rule
        self._opt_state = opt_state
        self._new_opt_state = new_opt_state
        self._index: Optional[int] = None
        self._last: Any = None
        self._count = 0

    @property
    def count(self) -> int:
        """The count the next call's decision is made for."""
        return self._count

    def _leaf(self, opt_state: Any) -> Any:
        leaves = jax.tree.leaves(opt_state)
        if self._index is None:
            target = _count_leaf(opt_state)
            self._index = next(i for i, leaf in enumerate(leaves)
                               if leaf is target)
        return leaves[self._index]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaf = self._leaf(self._opt_state(args))
        if leaf is not self._last:  # not the state we returned: read it
            self._count = _read_count(leaf)
        out = self._steps[bool(self._rule(self._count))](*args, **kwargs)
        self._last = self._leaf(self._new_opt_state(args, out))
        self._count += 1
        return out


def host_scheduled(
    make_step: Callable[[bool], Callable[..., Any]],
    rule: Optional[Callable[[int], bool]],
    *,
    opt_state: Callable[[tuple], Any] = lambda args: args[1],
    new_opt_state: Callable[[tuple, Any], Any] = lambda args, out: out[1],
) -> HostScheduledStep:
    """One step out of two compiled programs, chosen on the host by ``rule``.

    ``make_step(perturb)`` builds the (jitted, pmapped, ...) step whose
    ``tx.update`` gets ``perturb=perturb``: every step builder of the library
    takes ``perturb=`` (:func:`sam_optax.parallel.train_step` and the other
    parallel builders, :func:`sam_optax.linen.train_step`). Both programs are
    compiled on first use; neither holds a conditional.

    Args:
      make_step: ``make_step(True)`` takes the second gradient,
        ``make_step(False)`` is the schedule's skipped step.
      rule: ``rule(t) -> bool``, usually ``count_rule(tx, params)``.
      opt_state: where the optimizer state is among the step's arguments
        (default: the second, as in ``step(params, opt_state, batch)``).
      new_opt_state: where it is in ``(arguments, outputs)`` after the step
        (default: the second output).

    Returns:
      A :class:`HostScheduledStep`, called like the step.

    Raises:
      ValueError: if ``rule`` is ``None`` (the schedule does not depend on
        the count alone: keep the default path, or see :func:`decision`).

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w, batch: jnp.mean((batch @ w - 1.0) ** 2)
      >>> tx = sam_optax.every_k_sam(optax.sgd(0.1), rho=0.05, k=2)
      >>> params, batch = jnp.zeros(3), jnp.ones((4, 3))
      >>> step = sam_optax.schedule.host_scheduled(
      ...     lambda flag: jax.jit(sam_optax.parallel.train_step(
      ...         tx, loss_fn, perturb=flag)),
      ...     sam_optax.schedule.count_rule(tx, params))
      >>> state = tx.init(params)
      >>> flags = []
      >>> for _ in range(4):
      ...   params, state, loss = step(params, state, batch)
      ...   flags.append(bool(sam_optax.diagnostics(state).perturbed))
      >>> flags
      [True, False, True, False]
    """
    if rule is None:
        raise ValueError(
            "`rule` is None: this transformation's schedule does not depend "
            "on the update count alone (AE-SAM), it has no schedule (MSAM), "
            "or a guard in `base_tx` (`apply_if_finite`, a MultiSteps skip "
            "rule) may hold the count back. Use the default step (the "
            "schedule's `lax.cond`), or `sam_optax.schedule.decision` for a "
            "two-phase step.")
    steps = {flag: make_step(flag) for flag in (True, False)}
    return HostScheduledStep(steps, rule, opt_state, new_opt_state)


__all__ = [
    "AdaptivePolicyState",
    "HostScheduledStep",
    "adaptive_policy",
    "count_rule",
    "decision",
    "every_k_steps",
    "every_step",
    "gsam_rho_schedule",
    "host_scheduled",
    "sam_count",
]

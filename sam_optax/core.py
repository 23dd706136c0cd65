"""The SAM step, shared by every variant.

A sharpness-aware step has three parts that vary independently across the
literature (see ``DESIGN.md``):

1. the **ascent** (:class:`Ascent`) computes the perturbation ε from the clean
   gradient ``g`` -- see :mod:`sam_optax.ascent`;
2. the **descent** (:class:`Descent`) decides what ``base_tx`` receives from
   ``g`` and the perturbed gradient ``g_sam = ∇L(w + ε)`` -- see
   :mod:`sam_optax.descent`;
3. the **schedule** (:class:`Schedule`) decides *when* the second gradient is
   paid for -- see :mod:`sam_optax.schedule`. A skipped step goes through
   ``lax.cond``, so its second gradient is really not computed.

:func:`sharpness_aware` wires the three parts around ``base_tx``. The second
gradient is taken in exactly one place, :func:`perturbed_gradient`. A descent
that declares ``uses_point`` is also handed the :class:`PerturbedPoint`
(``w``, ε, ρ and a replica-averaged ``grad_fn``) and may take further
gradients or Hessian-vector products near ``w + ε`` (GAM's seam).

Data parallelism: with ``axis_name`` set, the step runs inside a mapped
computation (``pmap``, ``shard_map``, ``vmap(axis_name=...)``) and the caller
passes **local, un-averaged** gradients. ε is computed per shard (m-sharpness)
unless ``perturbation_axis_name`` names axes over which ``g`` is averaged
first; the perturbed gradient is averaged over ``axis_name`` before
``base_tx`` so replicas stay identical.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional, Union, cast

import jax
import jax.numpy as jnp
import optax

from sam_optax import numerics, validation
from sam_optax.collectives import (
    check_local_gradients,
    local_grad_fn,
    replica_mean,
)
from sam_optax.types import AxisName, GradFn, PyTree, ScalarOrSchedule


class SAMDiagnostics(NamedTuple):
    """Scalars recorded at every step, at no extra forward or backward pass.

    Attributes:
      grad_norm: ‖g‖₂ of the gradient that defined ε (after any averaging over
        ``perturbation_axis_name``; mean over replicas); ``inf`` (or ``NaN``)
        when g has an inf/NaN entry or a norm above ~1e31. On steps a
        schedule skipped, recorded with ``full_diagnostics=True`` only
        (else 0): two passes over g on a step meant to cost one gradient.
        0 for ``random_sam``, whose ε no gradient defines (so the caller's
        clean gradient, which nothing else reads, is not even computed).
      perturbation_norm: ‖ε‖₂ of the ε actually used: ρ for plain SAM with a
        usable gradient; 0 when g is zero, outside the safe norm range
        (~1e-33..1e31) or has an inf/NaN entry on the perturbed leaves, where
        ε = 0. Ascents with an elementwise scale (``asam``, ``fisher_sam``)
        and ``sam(norm="linf")`` do not know ‖ε‖ for free: recorded with
        ``full_diagnostics=True`` (else 0, as ``cosine``).
      cosine: cos∠(g, g_sam) between the clean and the perturbed gradient,
        recorded when the transformation is built with
        ``full_diagnostics=True`` (else 0).
      loss: L(w), when the caller passes ``value=`` to ``update``; else 0.
      perturbed_loss: L(w + ε), when ``grad_fn`` returns ``(value, grads)``
        (e.g. ``jax.value_and_grad``); else 0.
      sharpness: ``perturbed_loss - loss`` when both are known; else 0.
      perturbed: whether the second gradient was computed at this step.
    """

    grad_norm: jax.Array
    perturbation_norm: jax.Array
    cosine: jax.Array
    loss: jax.Array
    perturbed_loss: jax.Array
    sharpness: jax.Array
    perturbed: jax.Array


class SAMState(NamedTuple):
    """State of every SAM-type transformation.

    ρ and the diagnostics are packed into one float32 vector, ``scalars``, and
    read back through the ``rho`` and ``diagnostics`` properties: every array
    in the state is a buffer that JAX hands to and from each jitted step,
    which a small model on a GPU notices (measured in
    ``benchmarks/results/overhead_*.md``). Build one with :meth:`create`.

    Attributes:
      count: number of updates so far (int32).
      base_state: the state of ``base_tx``.
      ascent_state: state of the ascent (``()`` for plain SAM).
      descent_state: state of the descent (``()`` for plain SAM).
      schedule_state: state of the schedule (``()`` for every-step SAM).
      scalars: float32 ``[ρ, *diagnostics]``; use ``rho`` and ``diagnostics``.
      rho: (property) the radius ρ used at the last update.
      diagnostics: (property) :class:`SAMDiagnostics` of the last update.
    """

    count: jax.Array
    base_state: optax.OptState
    ascent_state: Any
    descent_state: Any
    schedule_state: Any
    scalars: jax.Array

    @classmethod
    def create(cls, *, count: jax.Array, rho: jax.Array,
               base_state: optax.OptState, ascent_state: Any,
               descent_state: Any, schedule_state: Any,
               diagnostics: SAMDiagnostics) -> SAMState:
        """A state from ρ and the diagnostics as separate scalars."""
        scalars = jnp.stack([jnp.asarray(x, jnp.float32)
                             for x in (rho, *diagnostics)])
        return cls(count, base_state, ascent_state, descent_state,
                   schedule_state, scalars)

    @property
    def rho(self) -> jax.Array:
        return self.scalars[..., 0]

    @property
    def diagnostics(self) -> SAMDiagnostics:
        # `...` keeps this working on states stacked by scan, vmap or pmap.
        values = [self.scalars[..., i + 1]
                  for i in range(len(SAMDiagnostics._fields))]
        values[-1] = values[-1] > 0.5  # `perturbed`, stored as 0.0 / 1.0
        return SAMDiagnostics(*values)


def no_state(params: PyTree) -> tuple:
    """``init`` of a stateless ascent, descent or schedule."""
    del params
    return ()


class Perturbation(NamedTuple):
    """What an ascent returns.

    Attributes:
      epsilon: ε, with the tree of params, in each leaf's compute dtype
        (float32 or wider), zero where nothing is perturbed.
      state: the ascent's new state.
      norm: ‖ε‖₂ when the ascent knows it for free (plain SAM: ρ, or 0 when
        ε = 0), else ``None`` and the core measures it for the diagnostics
        with ``full_diagnostics=True`` only (measuring keeps ε alive through
        the second gradient).
      grad_norm: ‖·‖₂ of the gradient that defined ε when that is not the
        ``grads`` the ascent was given (Lookbehind's, taken at its
        perturbed point); ``None``: the core reports ‖grads‖, which an
        ascent that never reads ``grads`` would otherwise keep computed and
        alive through the step only for the diagnostics.
    """

    epsilon: PyTree
    state: Any
    norm: Optional[jax.Array] = None
    grad_norm: Optional[jax.Array] = None


class Ascent(NamedTuple):
    """How ε is computed from the clean gradient.

    Attributes:
      init: ``init(params) -> state``.
      perturbation: ``perturbation(grads, state, params, *, rho, grad_fn)
        -> Perturbation``. ``grads`` is the gradient that defines ε (local,
        or averaged over ``perturbation_axis_name``); ``grad_fn(params) ->
        grads`` (averaged the same way) may be called by multi-step ascents;
        the gradient at ``params + ε`` is taken by the core, never here.
    """

    init: Callable[[PyTree], Any]
    perturbation: Callable[..., Perturbation]


class DescentResult(NamedTuple):
    """What a descent returns.

    Attributes:
      grads: what ``base_tx`` receives (compute dtype; the core casts it to
        the gradients' dtypes).
      state: the descent's new state.
      correction: a term added to ``base_tx``'s *update* (``None``: none),
        for decoupled forms such as WSAM's sharpness step; a descent that
        returns one sets ``Descent.corrects_updates``.
    """

    grads: PyTree
    state: Any
    correction: Optional[PyTree] = None


class PerturbedPoint(NamedTuple):
    """Where the second gradient was taken, for a descent that declares
    ``Descent.uses_point`` (e.g. GAM's, which needs a Hessian-vector product
    at ``w + ε``).

    Attributes:
      params: the clean params ``w`` (the caller's tree and dtypes).
      epsilon: ε as the ascent returned it (compute dtype); the perturbed
        gradient was taken at :meth:`perturbed_params`.
      rho: ρ at this step (after any schedule), at least float32.
      grad_fn: ``grad_fn(params) -> grads`` (gradients only: a loss value
        the caller's ``grad_fn`` returns is dropped), averaged exactly as
        the descent's other inputs are: over ``axis_name`` when set, so
        replicas stay identical. Each call is a further gradient
        evaluation, and ``jax.jvp`` through it a Hessian-vector product.
    """

    params: PyTree
    epsilon: PyTree
    rho: jax.Array
    grad_fn: Callable[[PyTree], PyTree]

    def perturbed_params(self) -> PyTree:
        """``w + ε``, formed as the core formed it for the second gradient
        (added in float32 or wider, cast back to each leaf's dtype)."""
        return numerics.add_perturbation(self.params, self.epsilon)


class _CleanGradientsNotRequested:
    """Stands in for ``g`` in ``combine`` when the descent declared
    ``uses_clean_grads=False``: any use fails loudly instead of silently
    reading the un-averaged local gradient."""

    def __repr__(self) -> str:
        return ("<clean gradients not passed: this Descent was built with "
                "uses_clean_grads=False>")


class Descent(NamedTuple):
    """What ``base_tx`` receives, from the clean and the perturbed gradients.

    Attributes:
      init: ``init(params) -> state``.
      combine: ``combine(grads, perturbed_grads, state) -> DescentResult`` on
        steps that took the second gradient (with ``uses_point``:
        ``combine(grads, perturbed_grads, state, point=PerturbedPoint)``).
        Under ``axis_name`` both gradients are averaged over replicas.
      reuse: ``reuse(grads, state) -> DescentResult`` on steps the schedule
        skipped (``None``: hand ``grads`` to ``base_tx`` unchanged, a plain
        base step).
      uses_clean_grads: whether ``combine`` reads ``grads``. When False the
        core saves the all-reduce of ``g`` and passes a placeholder that
        fails on any use, so a wrong flag cannot go unnoticed.
      corrects_updates: whether ``combine``/``reuse`` return a
        ``correction`` (then a missing one counts as zero).
      uses_point: whether ``combine`` takes ``point=``, a
        :class:`PerturbedPoint` (``w``, ε, ρ and a replica-averaged
        ``grad_fn``), to evaluate further gradients or Hessian-vector
        products near ``w + ε`` (GAM). Opt-in: every other descent is called
        without it. The core's second gradient is still the one
        ``perturbed_grads``; what ``combine`` adds is its own cost.
    """

    init: Callable[[PyTree], Any]
    combine: Callable[..., DescentResult]
    reuse: Optional[Callable[[PyTree, Any], DescentResult]] = None
    uses_clean_grads: bool = True
    corrects_updates: bool = False
    uses_point: bool = False


class Schedule(NamedTuple):
    """When the second gradient is paid for.

    Attributes:
      init: ``init(params) -> schedule_state``.
      decide: ``decide(grads, state, *, count) -> (perturb, new_state)``.
        ``perturb`` is the Python constant ``True`` (always: no ``lax.cond``
        is built) or a boolean scalar array. Under ``axis_name`` the core
        passes the replica-averaged gradient, so every replica decides alike.
      uses_grads: whether ``decide`` reads ``grads`` (when False, no
        averaging is done for it).
      on_count: the same decision as a pure Python function of the update
        count, ``on_count(t) -> bool``, when it depends on the count alone
        (every-k, LookSAM); ``None`` otherwise (AE-SAM). It lets the host
        choose between two compiled programs with no conditional in either
        (:func:`sam_optax.schedule.count_rule`).
    """

    init: Callable[[PyTree], Any]
    decide: Callable[..., tuple[Union[bool, jax.Array], Any]]
    uses_grads: bool = True
    on_count: Optional[Callable[[int], bool]] = None


_MISSING_GRAD_FN = (
    "SAM needs the gradient at the perturbed point, and `tx.update` got no "
    "`grad_fn`. With Flax Linen's `TrainState` (whose `apply_gradients` never "
    "passes it): use the drop-in `sam_optax.linen.TrainState` and call "
    "`state.apply_gradients(grads=grads, grad_fn=jax.grad(loss_fn))`, or build "
    "the whole step with `sam_optax.linen.train_step`. Calling `tx.update` "
    "yourself: `tx.update(grads, opt_state, params, "
    "grad_fn=jax.grad(loss_fn))`, where `loss_fn(params)` is the mini-batch "
    "loss of this step. With Flax NNX: `optimizer.update(model, grads, "
    "grad_fn=sam_optax.nnx.grad_fn(model, loss_fn, *batch))`.")

_MULTISTEPS_OUTSIDE = (
    "`optax.MultiSteps` wraps a SAM transformation here. MultiSteps hands its "
    "inner optimizer the running mean of the micro-batch gradients but the "
    "`grad_fn` of the last micro-batch only, so ε would come from the mean "
    "and the SAM gradient from one micro-batch. Put the accumulation inside "
    "SAM instead: `sam_optax.sam(optax.MultiSteps(base_tx, k).gradient_"
    "transformation(), rho)` takes a SAM step per micro-batch (its own ε and "
    "second gradient) and accumulates the SAM gradients for `base_tx`.")


_CORRECTION_WITH_MULTISTEPS = (
    "this method adds its own step to `base_tx`'s update (e.g. "
    "`wsam(..., decoupled=True)`'s sharpness step), which would move the "
    "params at every micro-batch while an `optax.MultiSteps` inside it waits "
    "for k of them. Use the coupled form (`decoupled=False`), or accumulate "
    "larger batches before calling `update`.")


_PERTURB_TYPE = (
    "`perturb` must be a Python bool (or None: the schedule decides); got "
    "{}. It chooses which program is compiled, so it cannot be traced: make "
    "it static, e.g. `jax.jit(step, static_argnames='perturb')` or one "
    "`functools.partial(step, perturb=flag)` per flag, and choose on the host "
    "with `sam_optax.schedule.count_rule(tx, params)(t)`.")


class ScheduleProbe(NamedTuple):
    """What a SAM-type ``update`` says about its schedule when probed
    (:func:`probe_schedules`).

    Attributes:
      on_count: the schedule's ``on_count`` (``None``: not count-based).
      guarded: whether a guard inside ``base_tx`` (``apply_if_finite``, a
        ``MultiSteps`` skip) may hold the count back, which the host cannot
        see without reading it.
      decision: the schedule's decision at this step (a traced bool or
        ``True``), in ``"decision"`` probes; else ``None``.
    """

    on_count: Optional[Callable[[int], bool]]
    guarded: bool
    decision: Union[bool, jax.Array, None] = None


class _ProbeDone(Exception):
    """Stops a probed ``update`` once it has said what was asked."""


# The active probe: (kind, found). `update` appends a ScheduleProbe to
# `found` and stops; it never runs a probe's step to completion.
_active_probe: list[tuple[str, list[ScheduleProbe]]] = []


def probe_schedules(kind: str, call: Callable[[], Any]) -> list[ScheduleProbe]:
    """Run ``call`` (which calls some ``tx.update``) until the first SAM-type
    ``update`` reports its schedule; ``kind`` is ``"rule"`` (before any
    computation: safe to trace abstractly, outside any mapped axis) or
    ``"decision"`` (after the schedule's decision, inside the caller's
    trace). Returns the reports (empty: no SAM-type transformation).
    """
    found: list[ScheduleProbe] = []
    _active_probe.append((kind, found))
    try:
        call()
    except _ProbeDone:
        pass
    finally:
        _active_probe.pop()
    return found


def report_schedule(schedule: Schedule, base_state: Any, kind: str,
                    decision: Union[bool, jax.Array, None] = None) -> None:
    """Inside ``update``: answer an active probe of ``kind`` and stop."""
    if not _active_probe or _active_probe[-1][0] != kind:
        return
    guarded = bool(_guard_flags(base_state))
    _active_probe[-1][1].append(
        ScheduleProbe(schedule.on_count, guarded, decision))
    raise _ProbeDone


def check_perturb(perturb: Any) -> Optional[bool]:
    """``perturb=`` is ``None`` or a Python bool (it picks the program)."""
    if perturb is None or isinstance(perturb, bool):
        return perturb
    raise TypeError(_PERTURB_TYPE.format(type(perturb).__name__))


def split_value_and_grads(out: Any, params: PyTree, name: str = "grad_fn"
                          ) -> tuple[Optional[jax.Array], PyTree]:
    """Accept ``grads`` or ``(value, grads)`` (also ``((value, aux), grads)``).

    The two forms cannot be confused: a tree never has the structure of a pair
    whose second element has the tree's own structure.

    Raises:
      ValueError: naming both structures (or the mismatching leaf) when the
        output is not a gradient of ``params``.
    """
    params_struct = jax.tree.structure(params)
    value = None
    grads = out
    if jax.tree.structure(out) != params_struct:
        if (isinstance(out, tuple) and len(out) == 2
                and jax.tree.structure(out[1]) == params_struct):
            value, grads = out
            if isinstance(value, tuple):  # jax.value_and_grad(has_aux=True)
                value = value[0]
            value = jnp.asarray(value)
            if value.shape != ():
                raise ValueError(
                    f"`{name}` returned (value, grads) with a value of shape "
                    f"{value.shape}; the value must be the scalar loss.")
        else:
            raise ValueError(
                f"`{name}` must return gradients with the tree structure of "
                "params (or `(value, grads)` as `jax.value_and_grad` does).\n"
                f"  params:        {params_struct}\n"
                f"  {name} gave: {jax.tree.structure(out)}")
    validation.check_same_shapes(grads, params, name)
    check_gradient_dtypes(grads, params, name)
    return value, grads


def check_gradient_dtypes(grads: PyTree, params: PyTree, name: str) -> None:
    """A float parameter's gradient must be real floating point.

    Integer, bool or complex gradients would be cast silently on the way into
    ε or ``base_tx`` (complex ones losing their imaginary part).

    Raises:
      TypeError: naming the first offending leaf and its dtype.
    """
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, p), g in zip(paths, jax.tree.leaves(grads)):
        if not numerics.is_float(p) or jnp.iscomplexobj(p):
            continue  # int leaves take no part; complex params: not SAM's
        dtype = jnp.asarray(g).dtype if not hasattr(g, "dtype") else g.dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"`{name}` leaf {jax.tree_util.keystr(path)} has dtype {dtype}, "
                f"but the parameter is {jnp.asarray(p).dtype}: gradients of "
                "float parameters must be real floating point (is the loss "
                "complex, or the gradient taken of an integer output?).")


def check_single_argument(grad_fn: Callable[..., Any]) -> None:
    """``grad_fn`` is called as ``grad_fn(params)``; refuse, with the fix, a
    function that needs more (``optax.contrib.sam``'s ``grad_fn(params, i)``)."""
    try:
        signature = inspect.signature(grad_fn)
    except (TypeError, ValueError):  # builtins, some C callables: unknown
        return
    required = [p for p in signature.parameters.values()
                if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) > 1:
        raise TypeError(
            f"`grad_fn` must take the parameters only, `grad_fn(params)`; its "
            f"signature is {signature}. Bind the batch (and anything else) "
            "first, e.g. `grad_fn=jax.grad(lambda p: loss_fn(p, batch))`. "
            "(`optax.contrib.sam`'s `grad_fn(params, i)` takes a micro-batch "
            f"index; see {validation.MIGRATION_DOC}.)")


def check_value(value: Any) -> None:
    """``value=`` (the clean loss, for the sharpness diagnostic) is a scalar."""
    if value is None:
        return
    if isinstance(value, (tuple, list, dict)):
        raise TypeError(
            "`value` must be the scalar loss L(w); got a "
            f"{type(value).__name__}. With `jax.value_and_grad(..., "
            "has_aux=True)` pass `value=loss`, not `value=(loss, aux)`.")
    if jnp.shape(value) != ():
        raise ValueError(
            f"`value` must be the scalar loss L(w); got shape {jnp.shape(value)}.")


def keep_if_base_rejected(base_state: Any, new: PyTree, old: PyTree) -> PyTree:
    """``old`` where the step was rejected by a guard inside ``base_tx``
    (:func:`_base_rejected`), else ``new``; ``new`` itself, at no cost, when
    ``base_tx`` has no such guard. Every SAM-type state goes through this,
    so a skipped step leaves the SAM side as it leaves ``base_tx``."""
    rejected = _base_rejected(base_state)
    if rejected is None:
        return new
    return jax.tree.map(lambda n, o: jnp.where(rejected, o, n), new, old)


def _base_rejected(base_state: Any) -> Optional[jax.Array]:
    """Whether an ``optax.apply_if_finite`` (or a ``MultiSteps`` with a
    ``should_skip_update_fn``) inside ``base_tx`` rejected this step; ``None``
    when ``base_tx`` holds neither: nothing to check, no cost.

    Reads the flag the wrapper computed itself, so guarding the SAM-side
    state costs no extra pass over the gradients.
    """
    flags = _guard_flags(base_state)
    if not flags:
        return None
    return jnp.logical_not(jnp.all(jnp.stack(flags)))


def _guard_flags(base_state: Any) -> list[jax.Array]:
    """The "step accepted" flags of the guards inside ``base_tx``: an
    ``optax.apply_if_finite``'s, or a ``MultiSteps``' with a
    ``should_skip_update_fn`` (e.g. ``optax.skip_not_finite``); empty when
    ``base_tx`` holds neither."""
    flags = [s.last_finite for s in find_states(base_state,
                                                 optax.ApplyIfFiniteState)]
    flags += [jnp.logical_not(s.skip_state["should_skip"])
              for s in find_states(base_state, optax.MultiStepsState)
              if isinstance(s.skip_state, dict) and "should_skip" in s.skip_state]
    return flags


def perturbed_gradient(grad_fn: Callable[[PyTree], Any], params: PyTree,
                       perturbation: PyTree
                       ) -> tuple[Optional[jax.Array], PyTree]:
    """The one place the second gradient is taken: ``grad_fn(params + ε)``.

    ``params + ε`` is added in float32 (or wider) and cast back to each leaf's
    dtype. Returns ``(value or None, grads)``. Beyond it, only a multi-step
    ascent (before) and a descent with ``Descent.uses_point`` (after, through
    :class:`PerturbedPoint`: GAM's Hessian-vector product at ``w + ε``)
    evaluate ``grad_fn``.
    """
    perturbed_params = numerics.add_perturbation(params, perturbation)
    return split_value_and_grads(grad_fn(perturbed_params), params)


def zero_diagnostics() -> SAMDiagnostics:
    """Diagnostics of a step that recorded nothing (all 0, not perturbed)."""
    zero = jnp.zeros([], jnp.float32)
    return SAMDiagnostics(zero, zero, zero, zero, zero, zero,
                          jnp.zeros([], jnp.bool_))


def _like_grads(descent_grads: PyTree, grads: PyTree) -> PyTree:
    """What ``base_tx`` receives, in the dtypes of the caller's gradients.

    Float leaves are cast back from the compute dtype; every other leaf
    (integer parameters' gradients, ``float0``) is the caller's own leaf,
    untouched: SAM perturbs and combines float leaves only. Both branches of
    a schedule's ``lax.cond`` then return the same types.
    """
    return jax.tree.map(
        lambda x, g: x.astype(g.dtype) if numerics.is_float(g) else g,
        descent_grads, grads)


def _as_scalar(value: Optional[jax.Array]) -> jax.Array:
    if value is None:
        return jnp.zeros([], jnp.float32)
    return jnp.asarray(value).astype(jnp.float32)


def current_rho(rho: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    """ρ at this step: at least float32 (``inject_hyperparams`` hands bf16 ρ
    to bf16 params), float64 under x64 for a Python float.

    A traced or scheduled ρ cannot be checked when the step is built:
    negative and NaN values become 0 (a plain base step), never a flipped
    or NaN ε (``NaN > 0`` is False).
    """
    rho_t = jnp.asarray(rho(count) if callable(rho) else rho)
    rho_t = rho_t.astype(jnp.promote_types(rho_t.dtype, jnp.float32))
    return jnp.where(rho_t > 0, rho_t, jnp.zeros_like(rho_t))


def check_update_call(grads: PyTree, params: PyTree,
                      grad_fn: Optional[GradFn]) -> GradFn:
    """The errors every SAM-type ``update`` raises before doing anything;
    returns ``grad_fn``, known to be there."""
    if grad_fn is None:
        raise TypeError(_MISSING_GRAD_FN)
    # MultiSteps hands its inner optimizer ordinary arguments: only the
    # Python stack shows the wrapping.
    if validation.optax_caller("MultiSteps.") is not None:
        raise TypeError(_MULTISTEPS_OUTSIDE)
    check_single_argument(grad_fn)
    if params is None:
        raise ValueError(
            "SAM perturbs the parameters: pass them, "
            "`tx.update(grads, opt_state, params, grad_fn=...)`.")
    validation.check_no_masked_nodes(params)
    validation.check_same_structure(grads, params, "grads")
    return grad_fn


def paid_diagnostics(ascent_grads: PyTree, perturbation: Perturbation,
                     perturbed_grads: PyTree, value: Optional[jax.Array],
                     perturbed_value: Optional[jax.Array],
                     full: bool) -> SAMDiagnostics:
    """The diagnostics of a step that took the second gradient (local: the
    caller averages them over replicas)."""
    loss, perturbed_loss = _as_scalar(value), _as_scalar(perturbed_value)
    known = value is not None and perturbed_value is not None
    return SAMDiagnostics(
        # The ascent's own norm computation: XLA's CSE merges the two.
        grad_norm=_as_scalar(numerics.global_norm(ascent_grads)
                             if perturbation.grad_norm is None
                             else perturbation.grad_norm),
        # Reported by the ascent when it knows ‖ε‖ (plain SAM: ρ or 0); else
        # measured, on request only: a sum over ε keeps ε alive as a
        # parameter-sized buffer (ASAM: +1 P, benchmarks/results/memory_*.md).
        perturbation_norm=(jnp.asarray(perturbation.norm, jnp.float32)
                           if perturbation.norm is not None
                           else numerics.plain_norm(perturbation.epsilon)
                           if full else _as_scalar(None)),
        cosine=(numerics.cosine_similarity(ascent_grads, perturbed_grads)
                if full else _as_scalar(None)),
        loss=loss,
        perturbed_loss=perturbed_loss,
        sharpness=perturbed_loss - loss if known else _as_scalar(None),
        perturbed=jnp.ones([], jnp.bool_),
    )


def sharpness_aware(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule,
    *,
    ascent: Ascent,
    descent: Descent,
    schedule: Schedule,
    axis_name: Optional[AxisName] = None,
    perturbation_axis_name: Optional[AxisName] = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Build a SAM-type transformation from an ascent, a descent and a schedule.

    Each update, with ``g`` the gradient at ``w``:

    .. math::

      ε = \\mathrm{ascent}(g), \\qquad g_{sam} = ∇L(w + ε), \\qquad
      u = \\mathrm{base\\_tx}(\\mathrm{descent}(g, g_{sam}))

    and, on steps the schedule skips, ``u = base_tx(descent.reuse(g))``
    without evaluating ``∇L`` again. A descent's ``correction`` is added to
    ``u``. A descent with ``uses_point`` also receives the
    :class:`PerturbedPoint` and may evaluate ``∇L`` (or ``∇²L·v``) again
    near ``w + ε``: GAM does.

    Args:
      base_tx: the optimizer that receives the (SAM) gradient.
      rho: the radius ρ ≥ 0, a float or a schedule of the update count.
      ascent: how ε is computed (:mod:`sam_optax.ascent`).
      descent: what ``base_tx`` receives (:mod:`sam_optax.descent`).
      schedule: when the second gradient is taken (:mod:`sam_optax.schedule`).
      axis_name: mapped axis (or axes) over which replicas average the
        gradient handed to ``base_tx``. The caller passes *local* gradients.
      perturbation_axis_name: axes over which ``g`` is averaged before the
        ascent. ``None``: per-shard ε (m-sharpness); ``axis_name``: one
        synchronised ε (SAM on the global batch); a sub-axis: grouped ε.
      perturbation_axis_index_groups: optional ``axis_index_groups`` for that
        averaging (groups of replicas sharing one ε, under ``pmap``).
      full_diagnostics: also record ``cosine`` = cos∠(g, g_sam) (else 0),
        and ‖ε‖ for an ascent that does not report it (else 0). Off by
        default: each keeps a parameter-sized buffer alive through the
        second gradient (``g``, ε) and costs extra passes
        (``benchmarks/results/speed_*.md``, ``memory_*.md``). The other
        diagnostics are always on.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
      ``(grads, state, params, *, grad_fn, perturb=None, **extra_args)``.
      ``perturb``, a Python bool, overrides the schedule's decision with the
      host's (``True``: take the second gradient; ``False``: the skipped
      step), building no ``lax.cond``: see
      :func:`sam_optax.schedule.count_rule`. Extra arguments (``value=``
      among them) are forwarded to ``base_tx`` when it accepts them.
    """
    validation.check_rho(rho)
    validation.check_bool(full_diagnostics, "full_diagnostics")
    base_tx = validation.as_transformation(base_tx)
    validation.check_axis_name(axis_name, "axis_name")
    validation.check_axis_name(perturbation_axis_name, "perturbation_axis_name")
    if perturbation_axis_index_groups is not None and perturbation_axis_name is None:
        raise ValueError(
            "`perturbation_axis_index_groups` needs `perturbation_axis_name` "
            "(the axis whose replicas are grouped).")
    # ε averaged exactly as base_tx's gradient is: one all-reduce serves both.
    same_average = (perturbation_axis_name == axis_name
                    and perturbation_axis_index_groups is None)

    def for_ascent(tree: PyTree) -> PyTree:
        return replica_mean(tree, perturbation_axis_name,
                            perturbation_axis_index_groups)

    def init_fn(params: PyTree) -> SAMState:
        base_state = base_tx.init(params)
        if descent.corrects_updates and find_states(base_state,
                                                    optax.MultiStepsState):
            raise ValueError(_CORRECTION_WITH_MULTISTEPS)
        return SAMState.create(
            count=jnp.zeros([], jnp.int32),
            rho=jnp.zeros([], jnp.float32),
            base_state=base_state,
            ascent_state=ascent.init(params),
            descent_state=descent.init(params),
            schedule_state=schedule.init(params),
            diagnostics=zero_diagnostics(),
        )

    def update_fn(grads: PyTree, state: SAMState, params: PyTree = None, *,
                  grad_fn: Optional[GradFn] = None,
                  perturb: Optional[bool] = None,
                  **extra_args: Any) -> tuple[PyTree, SAMState]:
        report_schedule(schedule, state.base_state, "rule")
        perturb = check_perturb(perturb)
        grad_fn = check_update_call(grads, params, grad_fn)
        if axis_name is not None:
            # Inside shard_map: reject gradients summed over shards, and take
            # every further gradient at a varying point so it stays local.
            check_local_gradients(grads, axis_name)
            grad_fn = local_grad_fn(grad_fn, axis_name)
        count = state.count
        rho_t = current_rho(rho, count)
        value = extra_args.get("value")
        check_value(value)

        # 1. g as each part sees it. The ascent's: local (m-sharpness) unless
        #    averaged over `perturbation_axis_name`. The schedule's and the
        #    descent's: averaged over replicas, so that all decide and step
        #    alike -- computed only when someone reads it (an all-reduce).
        ascent_grads = for_ascent(grads)

        def replica_averaged() -> PyTree:
            return ascent_grads if same_average else replica_mean(grads,
                                                                  axis_name)

        mean_grads = replica_averaged() if schedule.uses_grads else None

        # 2. Whether this step pays for the second gradient: the schedule's
        #    decision, or the host's (`perturb=`, a Python bool: then no
        #    conditional is built and the schedule only updates its state).
        decision, schedule_state = schedule.decide(
            grads if mean_grads is None else mean_grads,
            state.schedule_state, count=count)
        report_schedule(schedule, state.base_state, "decision", decision)
        take: Union[bool, jax.Array] = decision if perturb is None else perturb
        if mean_grads is None and (take is not True
                                   or descent.uses_clean_grads):
            mean_grads = replica_averaged()  # outside lax.cond, read inside

        def branch_output(result: DescentResult, ascent_state: Any,
                          diagnostics: SAMDiagnostics) -> tuple:
            # Both branches of the schedule's cond return the same types:
            # the caller's gradient dtypes, and a correction (zeros if none)
            # when the descent makes one.
            correction = result.correction
            if descent.corrects_updates and correction is None:
                correction = numerics.zeros_like_compute(grads)
            return (_like_grads(result.grads, grads), correction, ascent_state,
                    result.state, diagnostics)

        def paid(substates):
            ascent_state, descent_state = substates
            # 3. ε from g.
            perturbation = ascent.perturbation(
                ascent_grads, ascent_state, params, rho=rho_t,
                grad_fn=lambda point: for_ascent(
                    split_value_and_grads(grad_fn(point), params)[1]))
            # 4. g_sam = ∇L(w + ε), the one second gradient.
            perturbed_value, perturbed_grads = perturbed_gradient(
                grad_fn, params, perturbation.epsilon)
            diagnostics = paid_diagnostics(
                ascent_grads, perturbation, perturbed_grads, value,
                perturbed_value, full_diagnostics)
            if axis_name is not None:
                perturbed_grads = replica_mean(perturbed_grads, axis_name)
                diagnostics = _replica_mean_diagnostics(diagnostics, axis_name)
            # 5. What base_tx sees; a descent that asked for the point gets
            #    it, with a grad_fn averaged as its gradients are.
            point = {} if not descent.uses_point else {
                "point": PerturbedPoint(
                    params, perturbation.epsilon, rho_t,
                    lambda x: replica_mean(
                        split_value_and_grads(grad_fn(x), params)[1],
                        axis_name))}
            result = descent.combine(
                mean_grads if descent.uses_clean_grads
                else _CleanGradientsNotRequested(),
                perturbed_grads, descent_state, **point)
            return branch_output(result, perturbation.state, diagnostics)

        def skipped(substates):
            ascent_state, descent_state = substates
            result = (DescentResult(mean_grads, descent_state)
                      if descent.reuse is None
                      else descent.reuse(mean_grads, descent_state))
            # ‖g‖ on a skipped step would be two more passes over g, on the
            # steps that are meant to cost one gradient: asked for only.
            diagnostics = zero_diagnostics()._replace(
                grad_norm=_as_scalar(numerics.global_norm(mean_grads)
                                     if full_diagnostics else None),
                loss=_as_scalar(value))
            return branch_output(result, ascent_state, diagnostics)

        substates = (state.ascent_state, state.descent_state)
        if take is True:
            branch = paid(substates)
        elif take is False:
            branch = skipped(substates)
        else:
            branch = jax.lax.cond(take, paid, skipped, substates)
        descent_grads, correction, ascent_state, descent_state, diagnostics = (
            branch)

        # 6. The base optimizer on the original w.
        updates, base_state = base_tx.update(
            descent_grads, state.base_state, params, **extra_args)
        if correction is not None:
            # A step that a guard inside base_tx rejected moves nothing.
            correction = keep_if_base_rejected(
                base_state, correction,
                jax.tree.map(jnp.zeros_like, correction))
            updates = _add_correction(updates, correction)

        # 7. The new state. `sam(optax.apply_if_finite(base))` skipped a
        #    non-finite step: the SAM side (count, EMAs, schedule statistics,
        #    LookSAM's direction, keys) stays as it was, like base's state.
        new_count, ascent_state, descent_state, schedule_state = (
            keep_if_base_rejected(
                base_state,
                (optax.safe_int32_increment(count), ascent_state,
                 descent_state, schedule_state),
                (count, state.ascent_state, state.descent_state,
                 state.schedule_state)))
        return updates, SAMState.create(
            count=new_count,
            rho=rho_t.astype(jnp.float32),
            base_state=base_state,
            ascent_state=ascent_state,
            descent_state=descent_state,
            schedule_state=schedule_state,
            diagnostics=diagnostics,
        )

    # `update` takes `grad_fn=` by keyword, which optax's protocol type for
    # update functions cannot express.
    return optax.GradientTransformationExtraArgs(
        init_fn, cast(optax.TransformUpdateExtraArgsFn, update_fn))


def _replica_mean_diagnostics(diagnostics: SAMDiagnostics,
                              axis_name: AxisName) -> SAMDiagnostics:
    """Mean over replicas of the float diagnostics, in one collective."""
    scalars = {k: v for k, v in diagnostics._asdict().items()
               if k != "perturbed"}
    return diagnostics._replace(**replica_mean(scalars, axis_name))


def _add_correction(updates: PyTree, correction: PyTree) -> PyTree:
    """``updates + correction`` in the compute dtype, cast back."""
    return jax.tree.map(
        lambda u, c: (numerics.as_compute(u) + c).astype(u.dtype)
        if numerics.is_float(u) else u, updates, correction)


def find_sam_states(opt_state: Any) -> list[SAMState]:
    """All :class:`SAMState` inside an optimizer state (chains, wrappers)."""
    return find_states(opt_state, SAMState)


def find_states(opt_state: Any, kind: type) -> list:
    """All states of type ``kind`` inside an optimizer state, outermost first
    (not looking inside a found one)."""
    found: list = []

    def visit(node: Any) -> None:
        if isinstance(node, kind):
            found.append(node)
            return
        if isinstance(node, (tuple, list)):
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)
        elif hasattr(node, "__dict__") and not isinstance(node, jax.Array):
            for child in vars(node).values():
                visit(child)

    visit(opt_state)
    return found


def diagnostics(opt_state: Any) -> SAMDiagnostics:
    """The :class:`SAMDiagnostics` of the last update, wherever SAM sits.

    Works on the state of ``sam(...)`` itself, of an ``optax.chain`` holding
    it, of ``optax.inject_hyperparams(sam_optax.sam)(...)``, and so on.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> params = jnp.zeros(3)
      >>> tx = sam_optax.sam(optax.sgd(0.1), rho=0.05)
      >>> state = tx.init(params)
      >>> grads = jax.grad(loss_fn)(params)
      >>> _, state = tx.update(grads, state, params, grad_fn=jax.grad(loss_fn))
      >>> round(float(sam_optax.diagnostics(state).perturbation_norm), 4)
      0.05

    Raises:
      ValueError: if the state holds no SAM state, or several.
    """
    return the_sam_state(opt_state).diagnostics


def the_sam_state(opt_state: Any) -> SAMState:
    """The one :class:`SAMState` inside an optimizer state.

    Raises:
      ValueError: if the state holds no SAM state, or several.
    """
    states = find_sam_states(opt_state)
    if len(states) != 1:
        raise ValueError(
            f"expected exactly one SAM state in `opt_state`, found {len(states)}.")
    return states[0]

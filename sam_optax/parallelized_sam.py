"""SAMPa: SAM with its two gradients independent of each other.

SAM's second gradient needs ε, and ε needs the first gradient, so the two
run one after the other. SAMPa (Xie, Pethick, Cevher 2024) takes ε from the
gradient at an auxiliary point :math:`y_t` evaluated at the *previous* step,
so the two gradients of a step, at :math:`x_t + ε_t` and at
:math:`y_{t+1}`, depend only on what is known when the step starts. Here
they are one ``jax.vmap(grad_fn)`` over the stacked pair (or a caller's
``pair_grad_fn``, e.g. :func:`sampa_pair_grad_fn`, which puts one gradient
on each half of a mesh).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional, cast

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from sam_optax import numerics, validation
from sam_optax.collectives import local_grad_fn, replica_mean, to_varying
from sam_optax.core import (
    SAMDiagnostics,
    SAMState,
    check_update_call,
    check_value,
    current_rho,
    find_states,
    keep_if_base_rejected,
    split_value_and_grads,
)
from sam_optax.types import AxisName, GradFn, LossFn, PyTree, ScalarOrSchedule
from sam_optax.variants import _checks_call

#: ``pair_grad_fn(points) -> grads``: the mini-batch gradient at each member
#: of a pair of parameter trees stacked on a leading axis of size 2, returned
#: stacked the same way (or ``(values, grads)``).
PairGradFn = Callable[[PyTree], Any]


class SAMPaState(NamedTuple):
    """The ``ascent_state`` of :func:`sampa`.

    Attributes:
      auxiliary_grads: ∇f(y_t), the gradient at the auxiliary point taken at
        the previous step (zeros before the first step), in the params'
        compute dtype; under ``axis_name``, averaged over replicas.
    """

    auxiliary_grads: PyTree


@_checks_call
def sampa(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.1,
    lmbda: float = 0.2,
    *,
    vectorize: bool = True,
    axis_name: Optional[AxisName] = None,
) -> optax.GradientTransformationExtraArgs:
    """SAMPa: SAM whose two gradients can run at the same time.

    With SGD as ``base_tx`` (step :math:`η_t`), the paper's SAMPa-λ:

    .. math::

      \\tilde x_t = x_t + ρ \\frac{∇f(y_t)}{\\lVert ∇f(y_t) \\rVert_2},
      \\qquad y_{t+1} = x_t - η_t ∇f(y_t),

      x_{t+1} = x_t - η_t \\big[(1-λ)\\, ∇f(\\tilde x_t)
                + λ\\, ∇f(y_{t+1})\\big]

    :math:`∇f(\\tilde x_t)` and :math:`∇f(y_{t+1})` use only :math:`x_t` and
    the stored :math:`∇f(y_t)`, so they are evaluated together: by default
    as ``jax.vmap(grad_fn)`` over the pair stacked on a leading axis of
    size 2 (one batched program, no dependency between its halves).
    :math:`∇f(y_{t+1})` is stored for the next step's ε.

    With a general ``base_tx``, both moves are ``base_tx``'s: the auxiliary
    point is ``base_tx``'s step on :math:`∇f(y_t)` from the current base
    state, *not kept* (a look-ahead), and the real step is ``base_tx`` on
    the mixed gradient:

    .. math::

      y_{t+1} = x_t + \\mathrm{base\\_tx}(∇f(y_t); s_t), \\qquad
      x_{t+1} = x_t + \\mathrm{base\\_tx}\\big((1-λ) ∇f(\\tilde x_t)
                + λ ∇f(y_{t+1}); s_t\\big) \\to s_{t+1}

    For ``optax.sgd(η)`` that is the formula above; for SGD with momentum
    and weight decay it is what the authors' code does (the auxiliary step
    carries the momentum and decay of the current state).

    Where this departs from the paper's Algorithm 1 (all written in the
    docs): :math:`∇f(y_0)` is 0, not :math:`∇f(x_0)` (which would cost a
    third gradient at the first step; the authors' code starts from 0 too),
    so the first step has ε = 0; and both gradients of step t use the
    batch of step t (``grad_fn``), where the authors' code takes
    :math:`∇f(\\tilde x_t)` on the previous batch, the one that defined ε
    (a ``pair_grad_fn`` can do that: it sees both points and may use a
    different batch for each).

    The clean gradient at :math:`x_t` is not needed: ``update`` does not
    read ``grads`` (pass the clean gradient as with every method, which
    ``jit`` then never computes, or any tree shaped like the params).

    Args:
      base_tx: the optimizer (the paper: SGD with momentum).
      rho: the radius ρ ≥ 0, or a schedule of the step count (the authors'
        code defaults to 0.1).
      lmbda: λ ∈ [0, 1], the weight of :math:`∇f(y_{t+1})` in the step;
        the paper's main results use SAMPa-0.2. λ = 0 is plain SAMPa (its
        step still needs :math:`∇f(y_{t+1})` for the next ε).
      vectorize: evaluate the pair as ``jax.vmap(grad_fn)`` over the stacked
        points (default); ``False`` calls ``grad_fn`` twice, for models that
        cannot be vmapped. Neither call depends on the other either way.
      axis_name: inside ``pmap``/``shard_map``/``vmap`` over this axis, pass
        a ``grad_fn`` of the local batch: both gradients are averaged over
        the axis, so ε and the step are those of the global batch.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`;
      ``update(grads, state, params, *, grad_fn=None, pair_grad_fn=None,
      **extra_args)``. Pass ``grad_fn(params) -> grads`` (or ``-> (loss,
      grads)`` to record L(x̃) in the diagnostics), or instead
      ``pair_grad_fn(points) -> grads`` taking the two points stacked on a
      leading axis of size 2 (member 0: x̃_t, member 1: y_{t+1}) and
      returning their gradients stacked the same way, e.g.
      :func:`sampa_pair_grad_fn`. The state is a
      :class:`~sam_optax.SAMState` whose ``ascent_state`` is a
      :class:`SAMPaState`; :func:`sam_optax.diagnostics` works on it
      (``grad_norm`` is ‖∇f(y_t)‖).

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - jnp.array([1.0, -2.0])) ** 2)
      >>> tx = sam_optax.sampa(optax.sgd(0.1), rho=0.05, lmbda=0.2)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> @jax.jit
      ... def step(params, state):
      ...   updates, state = tx.update(params, state, params,
      ...                              grad_fn=jax.grad(loss_fn))
      ...   return optax.apply_updates(params, updates), state
      >>> for _ in range(100):
      ...   params, state = step(params, state)
      >>> [round(float(x), 2) for x in params]
      [1.0, -2.0]

    References:
      Xie, Pethick, Cevher. SAMPa: Sharpness-aware Minimization
      Parallelized. NeurIPS 2024. https://arxiv.org/abs/2410.10683
    """
    validation.check_rho(rho)
    validation.check_in_range(lmbda, "lmbda", 0.0, 1.0)
    validation.check_bool(vectorize, "vectorize")
    validation.check_axis_name(axis_name, "axis_name")
    base_tx = validation.as_transformation(base_tx)
    # A Python λ = 0 drops the term: 0·NaN would still be NaN.
    uses_auxiliary = not (isinstance(lmbda, (int, float)) and lmbda == 0)

    def init_fn(params: PyTree) -> SAMState:
        base_state = base_tx.init(params)
        if find_states(base_state, optax.MultiStepsState):
            raise ValueError(_MULTISTEPS_INSIDE)
        zero = jnp.zeros([], jnp.float32)
        return SAMState.create(
            count=jnp.zeros([], jnp.int32), rho=zero, base_state=base_state,
            ascent_state=SAMPaState(numerics.zeros_like_compute(params)),
            descent_state=(), schedule_state=(),
            diagnostics=SAMDiagnostics(zero, zero, zero, zero, zero, zero,
                                       jnp.zeros([], jnp.bool_)))

    def update_fn(grads: PyTree, state: SAMState, params: PyTree = None, *,
                  grad_fn: Optional[GradFn] = None,
                  pair_grad_fn: Optional[PairGradFn] = None,
                  **extra_args: Any) -> tuple[PyTree, SAMState]:
        if grad_fn is not None and pair_grad_fn is not None:
            raise TypeError(
                "pass `grad_fn` or `pair_grad_fn` to the SAMPa `update`, not "
                "both: `pair_grad_fn` evaluates both points itself.")
        checked = check_update_call(
            grads, params, grad_fn if pair_grad_fn is None else pair_grad_fn)
        value = extra_args.get("value")
        check_value(value)
        count = state.count
        rho_t = current_rho(rho, count)
        auxiliary = state.ascent_state.auxiliary_grads

        # ε_t from the stored ∇f(y_t): no gradient needed before the pair.
        unit = numerics.normalize(auxiliary, scale=rho_t)
        perturbed_params = numerics.add_perturbation(params, unit.direction)
        # y_{t+1}: base_tx's step on ∇f(y_t) from the current state (dropped).
        lookahead, _ = base_tx.update(numerics.cast_like(auxiliary, grads),
                                      state.base_state, params, **extra_args)
        auxiliary_params = numerics.add_perturbation(params, lookahead)

        if pair_grad_fn is not None:
            (perturbed_value, perturbed_grads), (_, new_auxiliary) = (
                _split_pair(checked(_stack(perturbed_params, auxiliary_params)),
                            params, "pair_grad_fn"))
        else:
            point_grad_fn = local_grad_fn(checked, axis_name)
            (perturbed_value, perturbed_grads), (_, new_auxiliary) = (
                _evaluate_pair(point_grad_fn, perturbed_params,
                               auxiliary_params, params, vectorize, axis_name))
        new_auxiliary = numerics.select_leaves(new_auxiliary)
        if axis_name is not None:
            perturbed_grads, new_auxiliary = replica_mean(
                (perturbed_grads, new_auxiliary), axis_name)
            if perturbed_value is not None:
                perturbed_value = replica_mean(perturbed_value, axis_name)

        def mix(g_pert, g_aux, g):
            if not numerics.is_float(g):
                return g
            mixed = numerics.as_compute(g_pert)
            if uses_auxiliary:
                lam = jnp.asarray(lmbda, mixed.dtype)
                mixed = (1 - lam) * mixed + lam * g_aux
            return mixed.astype(g.dtype)

        mixed = jax.tree.map(mix, perturbed_grads, new_auxiliary, grads)
        updates, base_state = base_tx.update(mixed, state.base_state, params,
                                             **extra_args)

        zero = jnp.zeros([], jnp.float32)
        loss = zero if value is None else jnp.asarray(value, jnp.float32)
        perturbed_loss = (zero if perturbed_value is None
                          else jnp.asarray(perturbed_value, jnp.float32))
        diagnostics = SAMDiagnostics(
            grad_norm=unit.norm.astype(jnp.float32),
            perturbation_norm=jnp.where(unit.usable, rho_t, 0.0).astype(
                jnp.float32),
            cosine=zero, loss=loss, perturbed_loss=perturbed_loss,
            sharpness=(perturbed_loss - loss
                       if value is not None and perturbed_value is not None
                       else zero),
            perturbed=jnp.ones([], jnp.bool_))
        # `sampa(optax.apply_if_finite(base))` skipped a non-finite step:
        # ∇f(y) and the count stay as they were, like base's state.
        new_count, new_auxiliary = keep_if_base_rejected(
            base_state, (optax.safe_int32_increment(count), new_auxiliary),
            (count, auxiliary))
        return updates, SAMState.create(
            count=new_count, rho=rho_t, base_state=base_state,
            ascent_state=SAMPaState(new_auxiliary), descent_state=(),
            schedule_state=(), diagnostics=diagnostics)

    # `update` takes `grad_fn=` by keyword, which optax's protocol type for
    # update functions cannot express.
    return optax.GradientTransformationExtraArgs(
        init_fn, cast(optax.TransformUpdateExtraArgsFn, update_fn))


_MULTISTEPS_INSIDE = (
    "`sampa` cannot wrap `optax.MultiSteps`: the auxiliary point y is "
    "base_tx's look-ahead step, which MultiSteps makes zero between "
    "accumulation boundaries (y would be x). Accumulate outside, "
    "`optax.MultiSteps(sam_optax.sampa(base, rho), k)` is refused too (it "
    "hands over one micro-batch's grad_fn): use larger batches instead.")


def _stack(first: PyTree, second: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.stack([a, b]), first, second)


def _member(tree: PyTree, index: int) -> PyTree:
    return jax.tree.map(lambda x: x[index], tree)


def _split_pair(out: Any, params: PyTree, name: str) -> list:
    """``[(value or None, grads)]`` of each member of a stacked output."""
    return [split_value_and_grads(_member(out, i), params, name)
            for i in (0, 1)]


def _evaluate_pair(grad_fn: GradFn, first: PyTree, second: PyTree,
                   params: PyTree, vectorize: bool,
                   axis_name: Optional[AxisName]) -> list:
    """The two gradients, neither computed from the other's output."""
    if not vectorize:
        return [split_value_and_grads(grad_fn(point), params)
                for point in (first, second)]
    # vmap over a stacked pair: one batched gradient program. Under
    # shard_map the stacked points are cast to varying first (the cast
    # inside `grad_fn` would see the batched values).
    stacked = to_varying(_stack(first, second), axis_name)
    return _split_pair(jax.vmap(grad_fn)(stacked), params, "grad_fn")


def sampa_pair_grad_fn(loss_fn: LossFn, batch: PyTree,
                         mesh: jax.sharding.Mesh, *, pair_axis: str = "pair",
                         data_axis: Optional[AxisName] = "data"
                         ) -> PairGradFn:
    """A ``pair_grad_fn`` for :func:`sampa`: one gradient per half of a mesh.

    ``mesh`` has an axis ``pair_axis`` of size 2 and (optionally) data axes:
    the devices at index 0 of ``pair_axis`` compute ∇f(x̃_t), those at
    index 1 compute ∇f(y_{t+1}), each on the whole ``batch`` split over
    ``data_axis`` (the local gradients are averaged within the group). Use
    it inside ``jax.jit`` with the params and the SAMPa state replicated;
    the mixing and the base step then run on every device.

    Args:
      loss_fn: ``loss_fn(params, local_batch) -> scalar``, the mean loss of
        a shard of the batch.
      batch: this step's batch (leading axis split over ``data_axis``).
      mesh: a mesh with ``pair_axis`` (size 2) and ``data_axis``.
      pair_axis: the mesh axis of size 2 that holds the pair.
      data_axis: mesh axis (or axes) the batch is split over, or ``None`` to
        give each group the whole batch.

    Returns:
      ``pair_grad_fn(points) -> (values, grads)``, both stacked on a leading
      axis of size 2 (member 0 on group 0, member 1 on group 1).

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, optax, sam_optax
      >>> from jax.sharding import Mesh
      >>> mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4),
      ...             ("pair", "data"))
      >>> loss_fn = lambda w, b: jnp.mean((b @ w - 1.0) ** 2)
      >>> tx = sam_optax.sampa(optax.sgd(0.1), rho=0.05)
      >>> @jax.jit
      ... def step(params, state, batch):
      ...   pair = sam_optax.sampa_pair_grad_fn(loss_fn, batch, mesh)
      ...   updates, state = tx.update(params, state, params,
      ...                              pair_grad_fn=pair)
      ...   return optax.apply_updates(params, updates), state
      >>> params, batch = jnp.zeros(3), jnp.ones((8, 3))
      >>> state = tx.init(params)
      >>> params, state = step(params, state, batch)
      >>> [round(float(x), 2) for x in params]
      [0.2, 0.2, 0.2]
    """
    if mesh.shape.get(pair_axis) != 2:
        raise ValueError(
            f"`mesh` must have an axis {pair_axis!r} of size 2 (one gradient "
            f"of the pair on each half); its axes are {dict(mesh.shape)}.")
    data_axes = () if data_axis is None else (
        (data_axis,) if isinstance(data_axis, str) else tuple(data_axis))
    missing = [a for a in data_axes if a not in mesh.shape]
    if missing:
        raise ValueError(
            f"`data_axis` {missing} is not an axis of `mesh` "
            f"{dict(mesh.shape)}.")
    data_spec = P(data_axes if len(data_axes) > 1 else
                  (data_axes[0] if data_axes else None))

    def group_gradient(points, local_batch):
        # Local gradient of this group's point on this shard of the batch,
        # then the mean over the group's shards.
        point = to_varying(_member(points, 0), data_axis)
        value, grads = jax.value_and_grad(loss_fn)(point, local_batch)
        if data_axes:
            value, grads = jax.lax.pmean((value, grads), data_axes)
        return jax.tree.map(lambda x: x[None], (value, grads))

    mapped = jax.shard_map(group_gradient, mesh=mesh,
                           in_specs=(P(pair_axis), data_spec),
                           out_specs=P(pair_axis))
    return lambda points: mapped(points, batch)


__all__ = ["PairGradFn", "SAMPaState", "sampa", "sampa_pair_grad_fn"]

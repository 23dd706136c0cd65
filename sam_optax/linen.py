"""SAM with Flax Linen: a ``TrainState`` that forwards ``grad_fn`` and a step.

Flax's ``TrainState.apply_gradients`` calls ``tx.update(grads, opt_state,
params)`` and nothing else, so ``grad_fn`` never reaches a SAM optimizer.
:class:`TrainState` is a drop-in replacement whose ``apply_gradients`` also
takes ``grad_fn`` (and ``value``) for ``tx.update``; :func:`train_step`
builds a whole step for models with BatchNorm and dropout, with the two
choices that matter made explicit:

- ``batch_stats``: which forward pass gives the new running statistics.
  ``"clean"`` (default, as the official SAM code) keeps those of the pass at
  ``w`` and discards the perturbed pass's updates; ``"perturbed"`` keeps those
  of the pass at ``w + ε``.
- ``dropout_key``: ``"same"`` (default) uses the clean pass's dropout key for
  the perturbed pass, so both gradients see one sub-network; ``"folded"``
  folds a constant into it, giving the perturbed pass a fresh mask.

With ``axis_name`` (data parallelism under ``shard_map``, ``pmap`` or a
``vmap`` over chunks), the step takes each shard's local gradient (per-shard
ε, m-sharpness), averages the loss and metrics, and averages the new batch
statistics over the axis, so that every replica keeps the same state.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from sam_optax import collectives, parallel, validation
from sam_optax.types import AxisName, PyTree

BatchStatsPolicy = Literal["clean", "perturbed"]
DropoutKeyPolicy = Literal["same", "folded"]

# Folded into the clean pass's keys for ``dropout_key="folded"``.
_PERTURBED_PASS_SALT = 1

# Flax's collection whose leaves take the gradient itself (a name that
# flax.training.train_state does not list among its exports).
_OVERWRITE_WITH_GRADIENT: str = (
    train_state.OVERWRITE_WITH_GRADIENT)  # pyright: ignore[reportPrivateImportUsage]


class TrainState(train_state.TrainState):
    """Flax's ``TrainState`` whose ``apply_gradients`` forwards ``grad_fn``.

    ``state.apply_gradients(grads=g, grad_fn=f, value=loss, batch_stats=s)``
    calls ``tx.update(g, opt_state, params, grad_fn=f, value=loss)`` and
    replaces the field ``batch_stats``, as Flax replaces the fields named in
    its keywords. Further arguments of ``tx.update`` go in ``extra_args``; any
    other keyword is refused (a misspelt field would otherwise be dropped
    silently). A plain Optax optimizer ignores ``grad_fn`` and ``value``
    (``optax.with_extra_args_support``); a SAM optimizer called without
    ``grad_fn`` raises the core's error naming the fix.

    Flax's ``overwrite_with_gradient`` convention is kept: when ``grads``
    holds that collection, only ``params['params']`` is optimized (and
    perturbed) and the collection's leaves are set to their gradient.
    ``grad_fn`` then takes and returns the whole variables, like ``grads``.

    Attributes:
      batch_stats: the model's ``batch_stats`` collection, or ``None``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> import flax.linen as nn
      >>> model = nn.Dense(1)
      >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
      >>> state = sam_optax.linen.TrainState.create(
      ...     apply_fn=model.apply, params=model.init(jax.random.key(0), x),
      ...     tx=sam_optax.sam(optax.sgd(0.1), rho=0.05))
      >>> loss_fn = lambda p: jnp.mean((state.apply_fn(p, x) - y) ** 2)
      >>> state = state.apply_gradients(grads=jax.grad(loss_fn)(state.params),
      ...                               grad_fn=jax.grad(loss_fn))
      >>> int(state.step)
      1
    """

    batch_stats: Any = None

    @classmethod
    def create(cls, *, apply_fn: Callable, params: PyTree,
               tx: optax.GradientTransformation, **kwargs: Any) -> TrainState:
        """As Flax's, with ``step`` an int32 array from the start.

        Flax starts from the Python int ``0``, so a jitted step compiles
        twice (int, then array); an array step also checkpoints like any leaf.
        """
        state = super().create(apply_fn=apply_fn, params=params, tx=tx,
                               **kwargs)
        return state.replace(step=jnp.zeros([], jnp.int32))

    def apply_gradients(self, *, grads: PyTree,
                        grad_fn: Optional[Callable[[PyTree], Any]] = None,
                        value: Any = None,
                        extra_args: Optional[dict[str, Any]] = None,
                        **fields: Any) -> TrainState:
        """One optimizer step.

        Args:
          grads: the gradient at ``params`` (same tree).
          grad_fn: ``grad_fn(params) -> grads`` (or ``(loss, grads)``), the
            mini-batch gradient at any point; SAM evaluates it at ``w + ε``.
          value: the loss at ``params``, for ``tx.update(..., value=...)``.
          extra_args: further keyword arguments of ``tx.update``.
          **fields: fields of the state to replace (e.g. ``batch_stats``).

        Raises:
          TypeError: for a keyword that is neither an argument above nor a
            replaceable field, listing the valid names.
        """
        _check_fields(self, fields)
        update_args = dict(extra_args or {})
        if value is not None:
            update_args["value"] = value
        tx = optax.with_extra_args_support(self.tx)
        overwrite = (isinstance(grads, Mapping)
                     and _OVERWRITE_WITH_GRADIENT in grads)
        # As Flax's TrainState: with an overwrite-with-gradient collection,
        # only ``params['params']`` is optimized, hence perturbed too.
        grads_with_opt = grads["params"] if overwrite else grads
        params_with_opt = self.params["params"] if overwrite else self.params
        if grad_fn is not None:
            update_args["grad_fn"] = (_grad_fn_of_params(grad_fn, self.params)
                                      if overwrite else grad_fn)
        updates, opt_state = tx.update(grads_with_opt, self.opt_state,
                                       params_with_opt, **update_args)
        new_params = optax.apply_updates(params_with_opt, updates)
        if overwrite:
            new_params = {
                "params": new_params,
                _OVERWRITE_WITH_GRADIENT:
                    grads[_OVERWRITE_WITH_GRADIENT],
            }
        return self.replace(step=self.step + 1, params=new_params,
                            opt_state=opt_state, **fields)


# Set by `apply_gradients` itself: not replaceable through its keywords.
_UPDATED_FIELDS = ("step", "params", "opt_state")
_OWN_ARGUMENTS = ("grads", "grad_fn", "value", "extra_args")


def _check_fields(state: TrainState, fields: dict[str, Any]) -> None:
    """Refuse keywords of ``apply_gradients`` that name no replaceable field."""
    replaceable = sorted(f.name for f in dataclasses.fields(state)
                         if f.name not in _UPDATED_FIELDS)
    unknown = sorted(set(fields) - set(replaceable))
    if not unknown:
        return
    hints = [f"{close[0]!r} for {name!r}" for name in unknown
             if name not in _UPDATED_FIELDS
             and (close := difflib.get_close_matches(
                 name, replaceable + list(_OWN_ARGUMENTS), n=1))]
    raise TypeError(
        f"`apply_gradients` got unexpected keyword argument(s) {unknown}"
        + (f" (did you mean {', '.join(hints)}?)" if hints else "")
        + f". It takes {', '.join(f'`{a}`' for a in _OWN_ARGUMENTS)} "
        "(further `tx.update` arguments go in `extra_args={...}`) and the "
        f"fields of the state to replace: {replaceable}"
        + (f"; {[n for n in unknown if n in _UPDATED_FIELDS]} are set by "
           "the step itself" if set(unknown) & set(_UPDATED_FIELDS) else "")
        + ".")


def _grad_fn_of_params(grad_fn: Callable[[PyTree], Any], variables: PyTree
                       ) -> Callable[[PyTree], Any]:
    """``grad_fn`` of the whole variables as a function of
    ``variables['params']``, the part the optimizer sees under Flax's
    overwrite-with-gradient convention; the other collections stay fixed."""

    def of_params(params: PyTree) -> Any:
        out = grad_fn({**variables, "params": params})
        if isinstance(out, tuple):  # (value, grads), as jax.value_and_grad
            value, grads = out
            return value, grads["params"]
        return out["params"]

    return of_params


def _same_trace(inner: jax.Array, outer: jax.Array) -> bool:
    # A value computed inside a `lax.cond` branch belongs to the branch's trace
    # and cannot be returned through a side channel; compare the traces.
    return getattr(inner, "_trace", None) is getattr(outer, "_trace", None)


def train_step(
    loss_fn: Callable[..., Any],
    *,
    batch_stats: BatchStatsPolicy = "clean",
    dropout_key: DropoutKeyPolicy = "same",
    rng_streams: Sequence[str] = ("dropout",),
    axis_name: Optional[AxisName] = None,
    perturb: Optional[bool] = None,
) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict]]:
    """Build ``step(state, batch, key) -> (state, metrics)`` for a Linen model.

    ``loss_fn(apply, batch)`` returns the loss or ``(loss, metrics)``;
    ``apply(*args, **kwargs)`` calls ``state.apply_fn`` with the parameters
    being differentiated, the running ``batch_stats`` (mutable) and the step's
    random keys, e.g. ``logits = apply(batch['x'], train=True)``.

    Each step makes a clean pass at ``w`` (loss, metrics, gradient ``g``, new
    batch statistics) and hands ``grad_fn`` to the optimizer, which evaluates
    the gradient only at ``w + ε`` starting from the *same* running statistics:

    .. math::

      (L, g, s_{clean}) = \\mathrm{pass}(w, s, k), \\qquad
      (g_{sam}, s_{pert}) = \\mathrm{pass}(w + ε, s, k'),

    with ``k' = k`` (``dropout_key="same"``) or ``k' = fold\\_in(k, 1)``
    (``"folded"``), and the new statistics ``s_{clean}`` (``batch_stats=
    "clean"``) or ``s_{pert}`` (``"perturbed"``). The step's key is
    ``k = fold_in(key, state.step)``, one per stream in ``rng_streams``, so a
    run resumed from a checkpoint draws the same masks.

    **Data parallelism** (``axis_name``): inside ``shard_map``, ``pmap`` or a
    ``vmap`` with that axis name, each replica differentiates its own batch
    at a "varying" copy of the parameters, so ``g`` is the replica's local
    gradient and ε is per replica (m-sharpness, m = the replica's batch) --
    as the optimizer's local-gradient rule asks; build ``tx`` with the same
    ``axis_name`` (and ``sync_perturbation=True`` for one ε). The loss, the
    metrics and the new batch statistics are averaged over the axis,

    .. math::

      s \\leftarrow \\frac{1}{n} \\sum_{r=1}^{n} s^{(r)}_{clean},

    as the official SAM code does: each replica normalizes with its own
    batch's statistics in the forward pass, and the running statistics stay
    identical on every replica. (For batch statistics of the global batch in
    the forward pass, give the model ``nn.BatchNorm(axis_name=...)``.)

    Args:
      loss_fn: ``loss_fn(apply, batch) -> loss | (loss, metrics)``.
      batch_stats: ``"clean"`` or ``"perturbed"``: whose statistics are kept.
        ``"perturbed"`` needs a variant that takes the second gradient at
        every step (its statistics do not exist on skipped steps).
      dropout_key: ``"same"`` or ``"folded"``: the perturbed pass's keys.
      rng_streams: names of the random streams passed to ``apply_fn``.
      axis_name: the mapped axis (or axes) of the surrounding ``shard_map``,
        ``pmap`` or ``vmap``; ``None`` on one device.
      perturb: ``None`` (the schedule decides inside the step) or a Python
        bool for ``tx.update(..., perturb=)``: one program per flag, chosen
        on the host with :func:`sam_optax.schedule.host_scheduled` (no
        ``lax.cond``; pass ``opt_state=lambda a: a[0].opt_state,
        new_opt_state=lambda a, out: out[0].opt_state``). With
        ``batch_stats="perturbed"`` a ``perturb=False`` step keeps the clean
        pass's statistics (it has no other).

    Returns:
      ``step(state, batch, key)``, to be wrapped in ``jax.jit`` (inside the
      mapping, with ``axis_name``); ``metrics`` holds ``loss`` and whatever
      ``loss_fn`` returned (averaged over ``axis_name``).

    Raises:
      ValueError: when traced under ``shard_map``, if the updated parameters
        differ across ``axis_name`` (``tx`` built without it) or the
        optimizer state does (a variant with per-replica state).

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> import flax.linen as nn
      >>> class Net(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x, train):
      ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
      ...     return nn.Dense(1)(nn.Dropout(0.2, deterministic=not train)(x))
      >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
      >>> variables = Net().init(jax.random.key(0), x, train=False)
      >>> state = sam_optax.linen.TrainState.create(
      ...     apply_fn=Net().apply, params=variables['params'],
      ...     batch_stats=variables['batch_stats'],
      ...     tx=sam_optax.sam(optax.sgd(0.1), rho=0.05))
      >>> def loss_fn(apply, batch):
      ...   return jnp.mean((apply(batch[0], train=True) - batch[1]) ** 2)
      >>> step = jax.jit(sam_optax.linen.train_step(loss_fn))
      >>> state, metrics = step(state, (x, y), jax.random.key(1))
      >>> int(state.step), sorted(metrics)
      (1, ['loss'])

    References:
      Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware Minimization for
      Efficiently Improving Generalization. ICLR 2021 (batch statistics of
      the clean pass: the official implementation).
      https://arxiv.org/abs/2010.01412
    """
    validation.check_choice(batch_stats, "batch_stats", ("clean", "perturbed"))
    validation.check_choice(dropout_key, "dropout_key", ("same", "folded"))
    if isinstance(rng_streams, str):
        rng_streams = (rng_streams,)
    rng_streams = tuple(rng_streams)

    def step(state: TrainState, batch: Any, key: jax.Array
             ) -> tuple[TrainState, dict]:
        step_key = jax.random.fold_in(key, state.step)
        clean_rngs = {name: jax.random.fold_in(step_key, i)
                      for i, name in enumerate(rng_streams)}
        perturbed_rngs = (clean_rngs if dropout_key == "same" else
                          {name: jax.random.fold_in(k, _PERTURBED_PASS_SALT)
                           for name, k in clean_rngs.items()})

        def objective(params, rngs):
            # Both passes start from the stored statistics; `apply` threads
            # the updated ones through repeated calls within one pass.
            stats = [state.batch_stats]

            def apply(*args, **kwargs):
                variables = {"params": params}
                if stats[0] is None:
                    return state.apply_fn(variables, *args, rngs=rngs, **kwargs)
                variables["batch_stats"] = stats[0]
                out, mutated = state.apply_fn(variables, *args, rngs=rngs,
                                              mutable=["batch_stats"], **kwargs)
                stats[0] = mutated["batch_stats"]
                return out

            out = loss_fn(apply, batch)
            loss, metrics = out if isinstance(out, tuple) else (out, {})
            return loss, (metrics, stats[0])

        value_and_grad = jax.value_and_grad(objective, has_aux=True)
        # Under shard_map, differentiating w.r.t. the replicated params would
        # return the gradient summed over shards: take it at a varying copy.
        (loss, (metrics, clean_stats)), grads = value_and_grad(
            parallel.to_varying(state.params, axis_name), clean_rngs)
        if axis_name is not None:
            loss, metrics = collectives.replica_mean_floats((loss, metrics), axis_name)
        perturbed_stats: list = []

        def grad_fn(params):
            (value, (_, stats)), perturbed_grads = value_and_grad(
                params, perturbed_rngs)
            perturbed_stats.append(stats)  # read only under "perturbed"
            return value, perturbed_grads

        state = state.apply_gradients(
            grads=grads, grad_fn=grad_fn, value=loss,
            extra_args=None if perturb is None else {"perturb": perturb})
        new_stats = clean_stats
        if (batch_stats == "perturbed" and clean_stats is not None
                and perturb is not False):
            if not perturbed_stats:
                raise ValueError(
                    "batch_stats='perturbed' needs an optimizer that evaluates "
                    "`grad_fn` (a sam_optax optimizer); this one never did.")
            # The last call is the one at w + ε (multi-step ascents call
            # grad_fn at intermediate points first).
            new_stats = perturbed_stats[-1]
            if not all(_same_trace(a, loss) for a in jax.tree.leaves(new_stats)):
                raise ValueError(
                    "batch_stats='perturbed' needs a variant that takes the "
                    "second gradient at every step: this one decides inside "
                    "`lax.cond`, where the perturbed pass's statistics cannot "
                    "be returned. Use batch_stats='clean'.")
        if axis_name is not None:
            new_stats = collectives.replica_mean_floats(new_stats, axis_name)
            _check_replicated(state, axis_name)
        return state.replace(batch_stats=new_stats), {"loss": loss, **metrics}

    return step


def _check_replicated(state: TrainState, axis_name: Optional[AxisName]) -> None:
    """Under ``shard_map``, refuse parameters or optimizer state that differ
    across replicas (JAX would only say that ``out_specs`` cannot hold)."""
    axes = set(parallel.tracked_axes(axis_name))
    fixes = {
        "parameter": (
            f"build the optimizer with `axis_name={axis_name!r}` (e.g. "
            f"`sam_optax.sam(base, rho, axis_name={axis_name!r})`; a plain "
            "optax optimizer needs the gradient averaged over the axis "
            "first), so that every replica applies the same update"),
        "optimizer state": (
            "this optimizer keeps per-replica state (e.g. a momentum of the "
            "local gradient: friendly_sam, vasso); share ε over the axis "
            "(`sync_perturbation=True`) or run the step under `jax.pmap`, "
            "which keeps one state per device"),
    }
    for kind, tree in (("parameter", state.params),
                       ("optimizer state", state.opt_state)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            varying = axes & collectives.varying_axes(leaf)
            if varying:
                raise ValueError(
                    f"the updated {kind} {jax.tree_util.keystr(path)} differs "
                    f"across the replicas of {sorted(varying)}: "
                    f"{fixes[kind]}.")


__all__ = ["BatchStatsPolicy", "DropoutKeyPolicy", "TrainState", "train_step"]

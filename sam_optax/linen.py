"""SAM with Flax Linen: a ``TrainState`` that forwards ``grad_fn`` and a step.

Flax's ``TrainState.apply_gradients`` calls ``tx.update(grads, opt_state,
params)`` and nothing else, so ``grad_fn`` never reaches a SAM optimizer.
:class:`TrainState` forwards every keyword that is not one of its fields to
``tx.update``; :func:`train_step` builds a whole step for models with
BatchNorm and dropout, with the two choices that matter made explicit:

- ``batch_stats``: which forward pass gives the new running statistics.
  ``"clean"`` (default, as the official SAM code) keeps those of the pass at
  ``w`` and discards the perturbed pass's updates; ``"perturbed"`` keeps those
  of the pass at ``w + ε``.
- ``dropout_key``: ``"same"`` (default) uses the clean pass's dropout key for
  the perturbed pass, so both gradients see one sub-network; ``"folded"``
  folds a constant into it, giving the perturbed pass a fresh mask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from sam_optax import validation

PyTree = Any
BatchStatsPolicy = Literal["clean", "perturbed"]
DropoutKeyPolicy = Literal["same", "folded"]

# Folded into the clean pass's keys for ``dropout_key="folded"``.
_PERTURBED_PASS_SALT = 1


class TrainState(train_state.TrainState):
    """Flax's ``TrainState`` whose ``apply_gradients`` forwards extra arguments.

    ``state.apply_gradients(grads=g, grad_fn=f, value=loss, batch_stats=s)``
    calls ``tx.update(g, opt_state, params, grad_fn=f, value=loss)`` and
    replaces the field ``batch_stats``: keywords naming a field of the state
    are replaced as in Flax, all others go to ``tx.update``. A plain Optax
    optimizer ignores them (``optax.with_extra_args_support``); a SAM optimizer
    called without ``grad_fn`` raises the core's error naming the fix.

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

    def apply_gradients(self, *, grads: PyTree, **kwargs: Any) -> TrainState:
        """One optimizer step; see the class docstring for the keywords."""
        fields = {field.name for field in dataclasses.fields(self)}
        replacements = {k: v for k, v in kwargs.items() if k in fields}
        extra_args = {k: v for k, v in kwargs.items() if k not in fields}
        tx = optax.with_extra_args_support(self.tx)
        overwrite = train_state.OVERWRITE_WITH_GRADIENT in grads
        # Same handling of Flax's overwrite-with-gradient collection as the
        # parent class: only ``params['params']`` is optimized (and perturbed).
        grads_with_opt = grads["params"] if overwrite else grads
        params_with_opt = self.params["params"] if overwrite else self.params
        updates, opt_state = tx.update(grads_with_opt, self.opt_state,
                                       params_with_opt, **extra_args)
        new_params = optax.apply_updates(params_with_opt, updates)
        if overwrite:
            new_params = {
                "params": new_params,
                train_state.OVERWRITE_WITH_GRADIENT:
                    grads[train_state.OVERWRITE_WITH_GRADIENT],
            }
        return self.replace(step=self.step + 1, params=new_params,
                            opt_state=opt_state, **replacements)


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

    Args:
      loss_fn: ``loss_fn(apply, batch) -> loss | (loss, metrics)``.
      batch_stats: ``"clean"`` or ``"perturbed"``: whose statistics are kept.
        ``"perturbed"`` needs a variant that takes the second gradient at
        every step (its statistics do not exist on skipped steps).
      dropout_key: ``"same"`` or ``"folded"``: the perturbed pass's keys.
      rng_streams: names of the random streams passed to ``apply_fn``.

    Returns:
      ``step(state, batch, key)``, to be wrapped in ``jax.jit``; ``metrics``
      holds ``loss`` and whatever ``loss_fn`` returned.

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
        (loss, (metrics, clean_stats)), grads = value_and_grad(
            state.params, clean_rngs)
        perturbed_stats: list = []

        def grad_fn(params):
            (value, (_, stats)), perturbed_grads = value_and_grad(
                params, perturbed_rngs)
            perturbed_stats.append(stats)  # read only under "perturbed"
            return value, perturbed_grads

        state = state.apply_gradients(grads=grads, grad_fn=grad_fn, value=loss)
        new_stats = clean_stats
        if batch_stats == "perturbed" and clean_stats is not None:
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
        return state.replace(batch_stats=new_stats), {"loss": loss, **metrics}

    return step


__all__ = ["BatchStatsPolicy", "DropoutKeyPolicy", "TrainState", "train_step"]

"""Save and restore a training state with Orbax, bit for bit.

A SAM run's state is the parameters, the :class:`sam_optax.SAMState` (the
base optimizer's state, the ascent/descent/schedule states of the variant --
LookSAM's stored direction, an EMA, ... -- the count and the diagnostics),
batch statistics, RNG state and the step. All of it is a pytree of arrays, so
one generic round trip covers every variant built on the core.

Two details make the round trip exact and generic:

- typed PRNG keys (``jax.random.key``, NNX ``RngKey``) are stored as their
  raw key data and re-wrapped with the target's key implementation;
- NNX ``Variable`` objects are stored as their values (``nnx.as_pure``);
  restore returns pure arrays, to be written back with ``nnx.update``.

Requires ``orbax-checkpoint`` (imported here only, not by ``sam_optax``).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from sam_optax.types import PyTree


def _is_typed_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype,
                                                        jax.dtypes.prng_key)


def _to_storable(tree: PyTree) -> PyTree:
    tree = nnx.as_pure(tree)
    return jax.tree.map(
        lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def save(directory: str | os.PathLike, state: PyTree) -> None:
    """Write ``state`` (any pytree of arrays) to ``directory``, synchronously.

    Args:
      directory: a path that does not exist yet (Orbax refuses to overwrite).
      state: e.g. a :class:`sam_optax.linen.TrainState`, or
        ``nnx.state((model, optimizer))``.
    """
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(directory), _to_storable(state))
        checkpointer.wait_until_finished()


def restore(directory: str | os.PathLike, target: PyTree) -> PyTree:
    """Read a state written by :func:`save`, with the structure of ``target``.

    Args:
      directory: the path given to :func:`save`.
      target: a state of the same structure, shapes and dtypes (e.g. a freshly
        initialised one, or its ``jax.eval_shape``); its values are unused.
        Static fields (``apply_fn``, ``tx``) come from it.

    Returns:
      The restored state: ``target``'s structure with the saved values (for an
      NNX state: pure arrays, apply with ``nnx.update(objects, restored)``).

    Example:
      >>> import tempfile, jax.numpy as jnp, optax, sam_optax
      >>> from sam_optax import checkpoint
      >>> tx = sam_optax.sam(optax.adam(1e-3))
      >>> state = {'params': jnp.ones(3), 'opt_state': tx.init(jnp.ones(3))}
      >>> path = tempfile.mkdtemp() + '/step_5'
      >>> checkpoint.save(path, state)
      >>> restored = checkpoint.restore(path, state)
      >>> restored['opt_state'].count.dtype
      dtype('int32')
    """
    pure_target = nnx.as_pure(target)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            _to_storable(pure_target))
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.restore(os.path.abspath(directory), abstract)

    def rewrap(like: Any, value: Any) -> Any:
        if _is_typed_key(like):
            return jax.random.wrap_key_data(value, impl=jax.random.key_impl(like))
        return value

    return jax.tree.map(rewrap, pure_target, stored)


__all__ = ["restore", "save"]

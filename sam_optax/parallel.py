"""Data parallelism and m-sharpness: step builders for every mapped context.

Every SAM-type transformation built with ``axis_name=...`` expects **local,
un-averaged gradients**: ε is computed from each shard's own gradient
(m-sharpness, with m the per-shard batch) and only the second gradient is
averaged over ``axis_name`` before ``base_tx``. The four ways to run it:

* ``jax.pmap`` -- :func:`pmap_step` (gradients inside ``pmap`` are local);
* ``jax.shard_map`` -- :func:`shard_map_step`. Inside ``shard_map``,
  ``jax.grad`` w.r.t. a *replicated* argument returns the gradient already
  **summed over shards**, which silently turns per-shard ε into global ε and
  multiplies the step by the number of shards. The builder casts the
  parameters to "varying" (``jax.lax.pcast(..., to='varying')``) before
  differentiating, and the core raises when it receives summed gradients;
* plain ``jax.jit`` with ``NamedSharding`` inputs -- :func:`data_parallel_step`
  builds the ``shard_map`` step over a mesh axis for you. Without it, ``jit``
  differentiates the global-batch loss: ε is then global (plain SAM);
* one device -- :func:`chunked_step` splits the batch into chunks of ``m``
  examples and ``vmap``s over them with an axis name (m-sharpness without
  extra devices).

All four run the same per-shard body, :func:`train_step`.

References:
  Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware Minimization for
  Efficiently Improving Generalization (section 4, m-sharpness). ICLR 2021.
  https://arxiv.org/abs/2010.01412

  Andriushchenko, Flammarion. Towards Understanding Sharpness-Aware
  Minimization. ICML 2022. https://arxiv.org/abs/2206.06232
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
AxisName = Union[str, Sequence[str]]
LossFn = Callable[[PyTree, PyTree], jax.Array]
Step = Callable[[PyTree, optax.OptState, PyTree],
                tuple[PyTree, optax.OptState, jax.Array]]

_PCAST_HINT = (
    "Inside `jax.shard_map`, `jax.grad` w.r.t. a replicated (invariant) "
    "argument returns the gradient already summed over shards, so SAM would "
    "see the global gradient instead of each shard's own. Differentiate "
    "w.r.t. `jax.lax.pcast(params, axis_name, to='varying')`, or build the "
    "step with `sam_optax.parallel.shard_map_step` / `data_parallel_step`, "
    "which do this for you.")


def _axes(axis_name: Optional[AxisName]) -> tuple[str, ...]:
    if axis_name is None:
        return ()
    if isinstance(axis_name, str):
        return (axis_name,)
    return tuple(axis_name)


def _varying_axes(x: Any) -> frozenset:
    """The manual mesh axes over which ``x`` may differ (its "vma" type)."""
    aval = jax.typeof(x)
    axis_type = getattr(aval, "manual_axis_type", None)
    if axis_type is not None:
        return frozenset(axis_type.varying)
    return frozenset(getattr(aval, "vma", ()))  # older JAX spelling


def tracked_axes(axis_name: Optional[AxisName]) -> tuple[str, ...]:
    """The axes of ``axis_name`` over which JAX tracks varying/invariant values.

    That is the case inside ``jax.shard_map`` with ``check_vma=True`` (the
    default), where a replicated argument's gradient comes back summed. Under
    ``pmap``, ``vmap`` and ``shard_map(check_vma=False)`` nothing is tracked
    and gradients are local: this returns ``()``.
    """
    manual = set(jax.sharding.get_abstract_mesh().manual_axes)
    return tuple(axis for axis in _axes(axis_name) if axis in manual
                 and axis in _varying_axes(jax.lax.axis_index(axis)))


def to_varying(tree: PyTree, axis_name: Optional[AxisName]) -> PyTree:
    """Cast each leaf to "varying" over the tracked axes it is invariant over.

    A no-op outside ``shard_map`` (pmap, vmap, plain jit). Differentiating a
    loss w.r.t. the result gives each shard's **local** gradient.
    """
    axes = tracked_axes(axis_name)
    if not axes:
        return tree

    def cast(x):
        missing = tuple(a for a in axes if a not in _varying_axes(x))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def local_grad_fn(grad_fn: Callable[[PyTree], Any], axis_name: Optional[AxisName]
                  ) -> Callable[[PyTree], Any]:
    """``grad_fn`` evaluated at a varying point, so its gradient is local."""
    if not tracked_axes(axis_name):
        return grad_fn
    return lambda point: grad_fn(to_varying(point, axis_name))


def check_local_gradients(grads: PyTree, axis_name: Optional[AxisName]) -> None:
    """Raise if ``grads`` were summed over shards by ``shard_map``'s transpose.

    Inside ``shard_map`` (``check_vma=True``) a local gradient varies over the
    data axis; a gradient that is invariant there was produced by
    differentiating w.r.t. replicated parameters and is the sum over shards.

    Raises:
      ValueError: naming the axis and the fix (``jax.lax.pcast``).
    """
    for axis in tracked_axes(axis_name):
        for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
            if (jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
                    and axis not in _varying_axes(leaf)):
                raise ValueError(
                    f"the gradient leaf {jax.tree_util.keystr(path)} is "
                    f"invariant over the mapped axis {axis!r}: it is not "
                    "this shard's local gradient. " + _PCAST_HINT)


def train_step(tx: optax.GradientTransformation, loss_fn: LossFn, *,
               axis_name: Optional[AxisName] = None) -> Step:
    """The per-shard SAM training step that every parallel path runs.

    Args:
      tx: a SAM-type transformation built with the same ``axis_name``.
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss of the
        *local* batch (shard or chunk).
      axis_name: the mapped axis (or axes) of the surrounding ``pmap``,
        ``shard_map`` or ``vmap``; ``None`` on one device.

    Returns:
      ``step(params, opt_state, batch) -> (params, opt_state, loss)`` where
      ``loss`` is the clean loss averaged over ``axis_name``. Inside
      ``shard_map`` the gradients are taken w.r.t. varying parameters (local
      gradients), never w.r.t. the replicated ones.
    """

    def step(params, opt_state, batch):
        value_and_grad = local_grad_fn(
            jax.value_and_grad(lambda p: loss_fn(p, batch)), axis_name)
        loss, grads = value_and_grad(params)
        if axis_name is not None:
            loss = jax.lax.pmean(loss, axis_name)
        updates, opt_state = tx.update(grads, opt_state, params,
                                       grad_fn=value_and_grad, value=loss)
        _check_replicated(updates, opt_state, axis_name)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _check_replicated(updates: PyTree, opt_state: PyTree,
                      axis_name: Optional[AxisName]) -> None:
    """Inside shard_map, updates and state must be the same on every shard."""
    axes = set(tracked_axes(axis_name))
    if not axes:
        return
    for name, tree, fix in (
            ("updates", updates,
             "build the transformation with the same `axis_name` as the step "
             "(e.g. `sam_optax.sam(base, rho, axis_name=...)`), so that the "
             "second gradient is averaged over shards"),
            ("optimizer state", opt_state,
             "this transformation keeps per-shard state (it depends on the "
             "local gradient); run it under `jax.pmap`, which keeps one state "
             "per device, or share ε over the axis (`sync_perturbation=True`"
             " or `perturbation_axis_name=` where the variant offers them)")):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if axes & _varying_axes(leaf):
                raise ValueError(
                    f"{name} leaf {jax.tree_util.keystr(path)} differs across "
                    f"shards of {sorted(axes)}: {fix}.")


def pmap_step(tx: optax.GradientTransformation, loss_fn: LossFn,
              axis_name: str = "batch", **pmap_kwargs: Any) -> Step:
    """The SAM step under ``jax.pmap``: one replica of params/state per device.

    ``params`` and ``opt_state`` carry a leading device axis (see
    :func:`replicate`), ``batch`` leaves are ``(devices, m, ...)``. Replicas
    stay identical: every device applies the same averaged update.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> from sam_optax import parallel
      >>> n = jax.local_device_count()
      >>> loss_fn = lambda w, b: jnp.mean((b @ w - 1.0) ** 2)
      >>> tx = sam_optax.sam(optax.sgd(0.1), rho=0.05, axis_name="batch")
      >>> step = parallel.pmap_step(tx, loss_fn, axis_name="batch")
      >>> params = parallel.replicate(jnp.zeros(3))
      >>> state = parallel.replicate(tx.init(jnp.zeros(3)))
      >>> batch = jnp.ones((n, 4, 3))
      >>> params, state, loss = step(params, state, batch)
      >>> params.shape == (n, 3)
      True
    """
    mapped = jax.pmap(train_step(tx, loss_fn, axis_name=axis_name),
                      axis_name=axis_name, **pmap_kwargs)
    devices = pmap_kwargs.get("devices") or jax.local_devices()
    # Inputs placed as pmap places its outputs: one compilation, not two.
    sharding = NamedSharding(
        jax.sharding.Mesh(np.asarray(devices), (axis_name,)), P(axis_name))

    def step(params, opt_state, batch):
        return mapped(*jax.device_put((params, opt_state, batch), sharding))

    step.mapped = mapped
    return step


def replicate(tree: PyTree, n: Optional[int] = None) -> PyTree:
    """Stack ``n`` copies (default: local device count) for ``jax.pmap``."""
    n = jax.local_device_count() if n is None else n
    return jax.tree.map(
        lambda x: jnp.broadcast_to(jnp.asarray(x), (n,) + jnp.shape(x)), tree)


def shard_map_step(tx: optax.GradientTransformation, loss_fn: LossFn,
                   mesh: jax.sharding.Mesh, axis_name: AxisName = "data", *,
                   batch_spec: Optional[P] = None) -> Step:
    """The SAM step as a ``jax.shard_map`` over ``axis_name`` of ``mesh``.

    Params and optimizer state are replicated (``P()``); every batch leaf is
    split along its first dimension over ``axis_name`` (or ``batch_spec``).
    Inside, the gradient is taken w.r.t. ``pcast(params, to='varying')``, so
    each shard sees its **local** gradient and ε is per shard (m-sharpness).
    Call the result inside your own ``jax.jit``, with inputs placed as its
    outputs are (``jax.device_put`` with ``NamedSharding``), or the second
    call compiles again.

    Args:
      tx: a SAM-type transformation built with ``axis_name`` (and optionally
        ``sync_perturbation=True`` or ``perturbation_axis_name=`` a sub-axis
        for grouped ε).
      loss_fn: ``loss_fn(params, local_batch) -> scalar`` mean loss.
      mesh: the device mesh.
      axis_name: the mesh axis (or axes) the batch is split over.
      batch_spec: partition spec of the batch (default ``P(axis_name)``).

    Returns:
      ``step(params, opt_state, batch) -> (params, opt_state, loss)``.
    """
    batch_spec = P(axis_name) if batch_spec is None else batch_spec
    return jax.shard_map(train_step(tx, loss_fn, axis_name=axis_name),
                         mesh=mesh, in_specs=(P(), P(), batch_spec),
                         out_specs=(P(), P(), P()))


def data_mesh(axis_name: str = "data", devices: Optional[Sequence[Any]] = None
              ) -> jax.sharding.Mesh:
    """A 1-D mesh over ``devices`` (default: all) with an ``Auto`` axis.

    ``jax.make_mesh`` defaults to ``Explicit`` axes in recent JAX; an ``Auto``
    axis lets ``jit`` accept unsharded inputs and shard them itself.
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.sharding.Mesh(np.asarray(devices), (axis_name,),
                             axis_types=(jax.sharding.AxisType.Auto,))


def data_parallel_step(tx: optax.GradientTransformation, loss_fn: LossFn,
                       mesh: Optional[jax.sharding.Mesh] = None,
                       axis_name: AxisName = "data", *,
                       donate: bool = False) -> Step:
    """A jitted SAM step with per-shard ε, for plain ``jax.jit`` users.

    With ``jax.jit`` alone (GSPMD, "pjit"), the loss is a function of the
    global batch and ε is **global** (plain SAM on the global batch), however
    the inputs are sharded. This helper gives per-shard ε (m-sharpness, m =
    global batch / shards) in one call: it builds :func:`shard_map_step` over
    ``axis_name`` and wraps it in ``jax.jit`` with replicated params and state
    and a batch split over ``axis_name`` (``Auto`` or ``Explicit`` mesh axes).
    Unsharded inputs are placed for you; across hosts (after
    ``jax.distributed.initialize``) pass global arrays, e.g. from
    ``jax.make_array_from_process_local_data``.

    Args:
      tx: a SAM-type transformation built with the same ``axis_name``.
      loss_fn: ``loss_fn(params, local_batch) -> scalar`` mean loss.
      mesh: the mesh (default: :func:`data_mesh` over all devices).
      axis_name: mesh axis (or axes) the batch is split over.
      donate: donate params and optimizer state buffers.

    Returns:
      a jitted ``step(params, opt_state, batch) -> (params, opt_state, loss)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> from sam_optax import parallel
      >>> loss_fn = lambda w, b: jnp.mean((b @ w - 1.0) ** 2)
      >>> tx = sam_optax.sam(optax.sgd(0.1), rho=0.05, axis_name="data")
      >>> step = parallel.data_parallel_step(tx, loss_fn)
      >>> params = jnp.zeros(3)
      >>> state = tx.init(params)
      >>> batch = jnp.ones((4 * jax.device_count(), 3))
      >>> params, state, loss = step(params, state, batch)
      >>> float(loss)
      1.0
    """
    mesh = data_mesh(axis_name) if mesh is None else mesh
    shardings = (NamedSharding(mesh, P()), NamedSharding(mesh, P()),
                 NamedSharding(mesh, P(axis_name)))
    jitted = jax.jit(shard_map_step(tx, loss_fn, mesh, axis_name),
                     in_shardings=shardings, out_shardings=shardings[0],
                     donate_argnums=(0, 1) if donate else ())

    def step(params, opt_state, batch):
        # Placing the inputs first (a no-op once they are placed) gives the
        # first call the same input types as later ones: one compilation.
        return jitted(*jax.device_put((params, opt_state, batch), shardings))

    step.jitted = jitted  # for `.lower(...)` and `._cache_size()`
    return step


def split_into_chunks(batch: PyTree, chunk_size: int) -> PyTree:
    """Reshape every batch leaf ``(B, ...)`` into ``(B // m, m, ...)``.

    Raises:
      ValueError: if ``B`` is not a multiple of ``chunk_size`` or the leaves
        disagree on ``B``.
    """
    if isinstance(chunk_size, bool) or not isinstance(
            chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(
            f"`chunk_size` must be an integer >= 1; got {chunk_size!r}.")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "every batch leaf must have the same leading (batch) dimension; "
            f"got {sorted(map(str, sizes))}.")
    (size,) = sizes
    if size % chunk_size:
        raise ValueError(
            f"the batch size {size} is not a multiple of `chunk_size` "
            f"{chunk_size}: choose m dividing the batch (or drop the "
            "remainder).")
    return jax.tree.map(
        lambda x: x.reshape((size // chunk_size, chunk_size) + x.shape[1:]),
        batch)


def chunked_step(tx: optax.GradientTransformation, loss_fn: LossFn,
                 chunk_size: int, axis_name: str = "chunks") -> Step:
    """m-sharpness on one device: ε per chunk of ``chunk_size`` examples.

    The batch is split into ``B / m`` chunks, and the per-shard body
    (:func:`train_step`) runs under ``jax.vmap(..., axis_name=axis_name)``:
    each chunk computes its own ε from its own gradient, and the perturbed
    gradients are averaged over chunks before ``base_tx``. With ``m = B``
    this is plain SAM. Costs the same FLOPs as SAM on the whole batch.

    Args:
      tx: a SAM-type transformation built with ``axis_name=axis_name``.
      loss_fn: ``loss_fn(params, chunk) -> scalar`` mean loss over a chunk.
      chunk_size: m, the number of examples per ε.
      axis_name: the vmap axis name (must match the transformation's).

    Returns:
      ``step(params, opt_state, batch) -> (params, opt_state, loss)``; wrap it
      in ``jax.jit``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> from sam_optax import parallel
      >>> loss_fn = lambda w, b: jnp.mean((b @ w - 1.0) ** 2)
      >>> tx = sam_optax.sam(optax.sgd(0.1), rho=0.05, axis_name="chunks")
      >>> step = jax.jit(parallel.chunked_step(tx, loss_fn, chunk_size=4))
      >>> params = jnp.zeros(3)
      >>> state = tx.init(params)
      >>> params, state, loss = step(params, state, jnp.ones((16, 3)))
      >>> float(loss)
      1.0
    """
    if not isinstance(axis_name, str):
        raise ValueError(f"`axis_name` must be a string; got {axis_name!r}.")
    body = jax.vmap(train_step(tx, loss_fn, axis_name=axis_name),
                    in_axes=(None, None, 0), out_axes=None, axis_name=axis_name)

    def step(params, opt_state, batch):
        try:
            return body(params, opt_state, split_into_chunks(batch, chunk_size))
        except ValueError as err:
            if "out_axes" not in str(err):
                raise
            raise ValueError(
                "the updates or the optimizer state differ across chunks: "
                "build the transformation with "
                f"`axis_name={axis_name!r}` (so the second gradient is "
                "averaged over chunks); a transformation that keeps per-shard "
                "state (it depends on the local gradient) needs `jax.pmap`."
            ) from err

    # Validate eagerly what is known now, so a bad m fails at construction.
    split_into_chunks({"probe": np.zeros((chunk_size,))}, chunk_size)
    return step


__all__ = [
    "check_local_gradients",
    "chunked_step",
    "data_mesh",
    "data_parallel_step",
    "local_grad_fn",
    "pmap_step",
    "replicate",
    "shard_map_step",
    "split_into_chunks",
    "to_varying",
    "tracked_axes",
    "train_step",
]

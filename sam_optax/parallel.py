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
  examples and runs ``vmap`` over them with an axis name (m-sharpness without
  extra devices).

All four run the same per-shard body, :func:`train_step`, and refuse (with a
``ValueError`` naming both axes and the fix) a transformation built without
the step's axis, whose replicas would drift apart, or for another axis.

References:
  Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware Minimization for
  Efficiently Improving Generalization (section 4, m-sharpness). ICLR 2021.
  https://arxiv.org/abs/2010.01412

  Andriushchenko, Flammarion. Towards Understanding Sharpness-Aware
  Minimization. ICML 2022. https://arxiv.org/abs/2206.06232
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sam_optax import validation
from sam_optax.collectives import (  # noqa: F401 -- re-exported
    axis_names,
    check_local_gradients,
    local_grad_fn,
    to_varying,
    tracked_axes,
    varying_axes,
)
from sam_optax.types import AxisName, LossFn, PyTree

Step = Callable[[PyTree, optax.OptState, PyTree],
                tuple[PyTree, optax.OptState, jax.Array]]


def train_step(tx: optax.GradientTransformation, loss_fn: LossFn, *,
               axis_name: Optional[AxisName] = None,
               perturb: Optional[bool] = None) -> Step:
    """The per-shard SAM training step that every parallel path runs.

    Args:
      tx: a SAM-type transformation built with the same ``axis_name``.
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss of the
        *local* batch (shard or chunk).
      axis_name: the mapped axis (or axes) of the surrounding ``pmap``,
        ``shard_map`` or ``vmap``; ``None`` on one device.
      perturb: ``None`` (the schedule decides, inside the step) or a Python
        bool passed to ``tx.update(..., perturb=)``: ``True`` takes the second
        gradient, ``False`` is the schedule's skipped step. Build one step
        per flag and choose on the host with
        :func:`sam_optax.schedule.host_scheduled` (no ``lax.cond``).

    Returns:
      ``step(params, opt_state, batch) -> (params, opt_state, loss)`` where
      ``loss`` is the clean loss averaged over ``axis_name``. Inside
      ``shard_map`` the gradients are taken w.r.t. varying parameters (local
      gradients), never w.r.t. the replicated ones.
    """

    host_decision = {} if perturb is None else {"perturb": perturb}

    def step(params, opt_state, batch):
        value_and_grad = local_grad_fn(
            jax.value_and_grad(lambda p: loss_fn(p, batch)), axis_name)
        loss, grads = value_and_grad(params)
        if axis_name is not None:
            loss = jax.lax.pmean(loss, axis_name)
        updates, opt_state = tx.update(
            grads, opt_state, params, grad_fn=value_and_grad,  # pyright: ignore[reportCallIssue]
            value=loss, **host_decision)  # pyright: ignore[reportCallIssue]
        _check_replicated(updates, opt_state, axis_name)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _check_replicated(updates: PyTree, opt_state: PyTree,
                      axis_name: Optional[AxisName]) -> None:
    """Inside shard_map, updates and state must be the same on every shard."""
    axes = set(tracked_axes(axis_name))
    if not axes:
        return
    for name, tree, fix in (("updates", updates, _updates_fix(axis_name)),
                            ("optimizer state", opt_state, _PER_SHARD_STATE_FIX)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if axes & varying_axes(leaf):
                leaf_name = f" leaf {jax.tree_util.keystr(path)}" if path else ""
                verb = "differ" if name == "updates" and not path else "differs"
                raise ValueError(
                    f"the {name}{leaf_name} {verb} across shards of "
                    f"{sorted(axes)}: {fix}.")


# ------------------------------------------ a transformation for another axis
# A SAM transformation averages over the axis it was built with. Built with
# none, each shard applies its own update: shard_map sees it in the types
# (`_check_replicated`), vmap refuses the unbatched output, pmap sees nothing
# and the replicas drift apart. Built with another axis, JAX fails on the
# unbound name: a NameError under vmap and pmap (that points to shard_map), a
# bare AssertionError under shard_map. The helpers below turn both into one
# ValueError naming the two axes, and `_probe_axes` traces the per-shard body
# under vmap (no devices, no compilation) where the context says nothing.

_PER_SHARD_STATE_FIX = (
    "this transformation keeps per-shard state (it depends on the local "
    "gradient); run it under `jax.pmap`, which keeps one state per device, "
    "or share ε over the axis (`sync_perturbation=True` or "
    "`perturbation_axis_name=` where the variant offers them)")

# JAX names the axis: "Found an unbound axis name: data. To fix ..." from a
# collective, "unbound axis name: data" from the axis environment.
_UNBOUND_AXIS = re.compile(r"unbound axis name: (\S+?)\.?(?=\s|$)")


def _updates_fix(axis_name: Optional[AxisName]) -> str:
    return ("build the transformation with the step's axis, "
            f"`axis_name={axis_name!r}` (e.g. `sam_optax.sam(base, rho, "
            f"axis_name={axis_name!r})`), so that the second gradient is "
            "averaged over it and every replica applies the same update")


def _mismatch_error(tx_axis: str, axis_name: AxisName, where: str
                    ) -> ValueError:
    return ValueError(
        f"the transformation averages over the axis {tx_axis!r} (its "
        f"`axis_name` or `perturbation_axis_name`), but {where} maps over "
        f"{axis_name!r} only, where {tx_axis!r} does not exist: build the "
        f"transformation with `axis_name={axis_name!r}`, or build the step "
        f"with `axis_name={tx_axis!r}` (for a mesh step, a mesh axis of that "
        "name).")


def _explain_axis_error(err: Exception, axis_name: AxisName, where: str,
                        differs: Optional[str]) -> Optional[ValueError]:
    """JAX's error for a transformation built for another axis (or none) as
    a ValueError naming both axes and the fix; ``None`` for any other error.

    Args:
      err: raised while tracing the per-shard body under ``axis_name``.
      axis_name: the step's mapped axis (or axes).
      where: the step builder, for the message.
      differs: the message for an output that varies over a ``vmap`` axis
        with ``out_axes=None`` (``None``: no such output in this trace).
    """
    if isinstance(err, NameError):
        match = _UNBOUND_AXIS.search(str(err))
        if match is not None:
            return _mismatch_error(match.group(1), axis_name, where)
    elif (isinstance(err, ValueError) and differs is not None
          and "out_axes is None" in str(err)):
        return ValueError(differs)
    return None


def _vmapped_body(tx: optax.GradientTransformation, loss_fn: LossFn,
                  axis_name: AxisName, axis_sizes: Mapping[str, Optional[int]], *,
                  batch_axis: Optional[int], state_axis: Optional[int],
                  perturb: Optional[bool] = None) -> Step:
    """:func:`train_step` under one ``vmap`` per named axis (outermost first).

    Params are shared (``in_axes=None``) and must come out unbatched
    (``out_axes=None``): vmap refuses updates that differ over an axis.
    """
    body = train_step(tx, loss_fn, axis_name=axis_name, perturb=perturb)
    for axis, size in reversed(list(axis_sizes.items())):
        body = jax.vmap(body, in_axes=(None, None, batch_axis),
                        out_axes=(None, state_axis, None), axis_name=axis,
                        axis_size=size)
    return body


def _shape(x: Any, shape: Optional[tuple[int, ...]] = None
           ) -> jax.ShapeDtypeStruct:
    """The abstract value of ``x`` (with ``shape`` instead of its own)."""
    return jax.ShapeDtypeStruct(np.shape(x) if shape is None else shape,
                                jnp.result_type(x))


def _probe_axes(tx: optax.GradientTransformation, loss_fn: LossFn,
                axis_name: AxisName, axis_sizes: dict[str, int],
                args: tuple[PyTree, PyTree, PyTree], *, batch_axis: Optional[int],
                where: str, perturb: Optional[bool] = None) -> None:
    """Trace the per-shard body under vmap to check the tx's axis names.

    ``args`` are the per-shard ``(params, opt_state, batch)`` (arrays or
    shapes), the batch with leading axes of ``axis_sizes`` when
    ``batch_axis=0``. Only ``jax.eval_shape``: nothing is compiled or run.

    Raises:
      ValueError: if the transformation averages over an axis the step does
        not map over, or (``batch_axis=0``) its updates differ across the
        step's axis (built without it). Any other error of this trace is left
        to the real one (e.g. ``axis_index_groups`` exist under pmap only).
    """
    body = _vmapped_body(tx, loss_fn, axis_name, axis_sizes,
                         batch_axis=batch_axis, state_axis=0, perturb=perturb)
    try:
        jax.eval_shape(body, *jax.tree.map(_shape, args))
    except Exception as err:  # noqa: BLE001 -- only our two cases are ours
        explained = _explain_axis_error(
            err, axis_name, where,
            f"the updates differ across the replicas of {axis_name!r}: "
            f"{_updates_fix(axis_name)}; without it each replica applies "
            "its own update and the replicas drift apart.")
        if explained is not None:
            raise explained from err


def _check_mesh_axes(mesh: jax.sharding.Mesh, axis_name: AxisName,
                     where: str) -> None:
    missing = [a for a in axis_names(axis_name) if a not in mesh.axis_names]
    if missing:
        raise ValueError(
            f"`axis_name` {axis_name!r} of {where} names {missing}, which the "
            f"mesh does not have (its axes: {tuple(mesh.axis_names)}): pass "
            "the mesh axis the batch is split over, and build the "
            "transformation with the same `axis_name`.")


def pmap_step(tx: optax.GradientTransformation, loss_fn: LossFn,
              axis_name: str = "batch", *, perturb: Optional[bool] = None,
              **pmap_kwargs: Any) -> Step:
    """The SAM step under ``jax.pmap``: one replica of params/state per device.

    ``params`` and ``opt_state`` carry a leading device axis (see
    :func:`replicate`), ``batch`` leaves are ``(devices, m, ...)``. Replicas
    stay identical: every device applies the same averaged update.

    ``pmap`` does not type values as varying or replicated, so a ``tx``
    built without ``axis_name`` would run and let the replicas drift apart.
    The first call therefore traces one replica's step under ``jax.vmap``
    (``jax.eval_shape``: nothing is compiled) to check that the updates are
    averaged over ``axis_name`` and that the transformation uses no other
    axis. ``perturb`` is :func:`train_step`'s (a host-chosen program).

    Raises:
      ValueError: at the first call, if ``tx`` was built without
        ``axis_name`` or with another axis name (naming both).

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
    mapped = jax.pmap(train_step(tx, loss_fn, axis_name=axis_name,
                                 perturb=perturb),
                      axis_name=axis_name, **pmap_kwargs)
    devices = pmap_kwargs.get("devices") or jax.local_devices()
    # Inputs placed as pmap places its outputs: one compilation, not two.
    sharding = NamedSharding(
        jax.sharding.Mesh(np.asarray(devices), (axis_name,)), P(axis_name))
    where = "`pmap_step`"
    probed: list = []

    def step(params, opt_state, batch):
        if not probed:
            # pmap tracks no varying/invariant types: a transformation built
            # without the axis would run, each replica applying its own
            # update. Check once, by tracing one replica's body under vmap.
            replica = jax.tree.map(lambda x: _shape(x, np.shape(x)[1:]),
                                   (params, opt_state))
            size = np.shape(jax.tree.leaves(batch)[0])[0]
            _probe_axes(tx, loss_fn, axis_name, {axis_name: size},
                        (*replica, batch), batch_axis=0, where=where,
                        perturb=perturb)
            probed.append(True)
        try:
            return mapped(*jax.device_put((params, opt_state, batch), sharding))
        except NameError as err:
            explained = _explain_axis_error(err, axis_name, where, None)
            if explained is None:
                raise
            raise explained from err

    step.mapped = mapped
    return step


def replicate(tree: PyTree, n: Optional[int] = None) -> PyTree:
    """Stack ``n`` copies (default: local device count) for ``jax.pmap``."""
    n = jax.local_device_count() if n is None else n
    return jax.tree.map(
        lambda x: jnp.broadcast_to(jnp.asarray(x), (n,) + jnp.shape(x)), tree)


def shard_map_step(tx: optax.GradientTransformation, loss_fn: LossFn,
                   mesh: jax.sharding.Mesh, axis_name: AxisName = "data", *,
                   batch_spec: Optional[P] = None,
                   perturb: Optional[bool] = None) -> Step:
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
      perturb: as for :func:`train_step` (a host-chosen program).

    Returns:
      ``step(params, opt_state, batch) -> (params, opt_state, loss)``.

    Raises:
      ValueError: when built, if ``axis_name`` is not an axis of ``mesh``;
        when traced, if ``tx`` was built without ``axis_name`` (its updates
        differ across shards) or with an axis the step does not map over
        (the message names both).
    """
    return _shard_map_step(tx, loss_fn, mesh, axis_name, batch_spec=batch_spec,
                           where="`shard_map_step`")


def _shard_map_step(tx: optax.GradientTransformation, loss_fn: LossFn,
                    mesh: jax.sharding.Mesh, axis_name: AxisName, *,
                    batch_spec: Optional[P], where: str,
                    perturb: Optional[bool] = None) -> Step:
    """:func:`shard_map_step`; ``where`` names the public builder in errors."""
    _check_mesh_axes(mesh, axis_name, where)
    batch_spec = P(axis_name) if batch_spec is None else batch_spec
    sharded = jax.shard_map(train_step(tx, loss_fn, axis_name=axis_name,
                                       perturb=perturb),
                            mesh=mesh, in_specs=(P(), P(), batch_spec),
                            out_specs=(P(), P(), P()))

    def step(params, opt_state, batch):
        try:
            return sharded(params, opt_state, batch)
        except (AssertionError, NameError) as err:
            # A collective over an axis the mesh lacks fails inside shard_map
            # with a bare AssertionError: retrace under vmap, which names it.
            explained = _explain_axis_error(err, axis_name, where, None)
            if explained is not None:
                raise explained from err
            try:
                shard = NamedSharding(mesh, batch_spec)
                local = jax.tree.map(
                    lambda x: _shape(x, shard.shard_shape(np.shape(x))), batch)
            except Exception:  # noqa: BLE001 -- no diagnosis: the original
                raise err from None
            _probe_axes(tx, loss_fn, axis_name, dict(mesh.shape),
                        (params, opt_state, local), batch_axis=None,
                        where=where, perturb=perturb)
            raise

    return step


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
                       donate: bool = False,
                       perturb: Optional[bool] = None) -> Step:
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
      perturb: as for :func:`train_step` (a host-chosen program).

    Returns:
      a jitted ``step(params, opt_state, batch) -> (params, opt_state, loss)``.

    Raises:
      ValueError: as :func:`shard_map_step` (an ``axis_name`` the mesh lacks,
        a ``tx`` built without the step's axis or with another one).

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
    if mesh is None:
        if not isinstance(axis_name, str):
            raise ValueError(
                f"`axis_name` {axis_name!r} names several axes: pass the "
                "`mesh` that has them (the default mesh is 1-D).")
        mesh = data_mesh(axis_name)
    where = "`data_parallel_step`"
    _check_mesh_axes(mesh, axis_name, where)
    shardings = (NamedSharding(mesh, P()), NamedSharding(mesh, P()),
                 NamedSharding(mesh, P(axis_name)))
    jitted = jax.jit(_shard_map_step(tx, loss_fn, mesh, axis_name,
                                     batch_spec=None, where=where,
                                     perturb=perturb),
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
    size = validation.leading_size(batch, "batch")
    if size % chunk_size:
        raise ValueError(
            f"the batch size {size} is not a multiple of `chunk_size` "
            f"{chunk_size}: choose m dividing the batch (or drop the "
            "remainder).")
    return jax.tree.map(
        lambda x: x.reshape((size // chunk_size, chunk_size) + x.shape[1:]),
        batch)


def chunked_step(tx: optax.GradientTransformation, loss_fn: LossFn,
                 chunk_size: int, axis_name: str = "chunks", *,
                 perturb: Optional[bool] = None) -> Step:
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
      perturb: as for :func:`train_step` (a host-chosen program).

    Returns:
      ``step(params, opt_state, batch) -> (params, opt_state, loss)``; wrap it
      in ``jax.jit``.

    Raises:
      ValueError: when traced, if the updates or the state differ across
        chunks (``tx`` built without ``axis_name``, or keeping per-shard
        state), or if ``tx`` uses another axis name (the message names both).

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
    body = _vmapped_body(tx, loss_fn, axis_name, {axis_name: None},
                         batch_axis=0, state_axis=None, perturb=perturb)
    where = "`chunked_step`"
    differs = (
        "the updates or the optimizer state differ across chunks. If the "
        f"updates do: {_updates_fix(axis_name)}. If the state does: "
        f"{_PER_SHARD_STATE_FIX}.")

    def step(params, opt_state, batch):
        try:
            return body(params, opt_state, split_into_chunks(batch, chunk_size))
        except (NameError, ValueError) as err:
            explained = _explain_axis_error(err, axis_name, where, differs)
            if explained is None:
                raise
            raise explained from err

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

"""The training job: data parallel SAM with checkpoints, metrics and a report.

:func:`train_and_evaluate` runs one job described by a config
(``configs/default.py`` lists every key) in a work directory:

1. checks the config (names, divisibility of the batch over the devices,
   a checkpoint of another config in the work directory) before anything is
   trained or written;
2. builds a 1-D mesh ``("data",)`` over ``config.num_devices`` local devices
   of every process, and one jitted ``shard_map`` step in which each device
   takes its local gradient (per-device ε, m-sharpness; one ε with
   ``config.sync_perturbation``) through ``sam_optax.linen.train_step``, which
   also averages the BatchNorm statistics over the devices;
3. restores the latest checkpoint, if any, and continues from its step: the
   batch order of every epoch is a function of ``(seed, epoch)``, and the
   checkpoint holds the metrics of the epoch in progress, so a resumed job
   ends bit-identical to an uninterrupted one (parameters and every metric
   but the timings);
4. trains, writing ``metrics.jsonl`` (one JSON object per epoch), TensorBoard
   events and a progress bar; checkpoints every
   ``config.checkpoint_every_steps`` steps and on SIGTERM (then returns with
   ``preempted=True``);
5. writes ``report.md`` and ``curves.png`` at the end.

Layout of the work directory::

    DIR/config.json        the job's config (compared on restart)
    DIR/checkpoints/<step> Orbax checkpoints (state + epoch progress + config)
    DIR/metrics.jsonl      one line per epoch
    DIR/tensorboard/       event files (tensorboardX)
    DIR/report.md, DIR/curves.png
"""

# ml_collections types every ConfigDict field as the union of all value types,
# so each `config.x` used as an int/str/float would be an error:
# pyright: reportArgumentType=false, reportOperatorIssue=false
# pyright: reportAssignmentType=false

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from sam_optax.train import data as data_lib
from sam_optax.train import models, optim

DATA_AXIS = "data"
CHUNK_AXIS = "chunk"
# Keys that control how a job runs, not what it computes: they may change
# when a job is resumed.
RUN_CONTROL_KEYS = ("checkpoint_every_steps", "progress_bar", "data_dir",
                    "host_schedule")
# The per-step metrics, packed into one vector by the step.
STEP_METRICS = ("train_loss", "train_accuracy", "grad_norm", "sharpness",
                "perturbed")


ConfigError = optim.ConfigError


class Result(NamedTuple):
    """What :func:`train_and_evaluate` returns.

    Attributes:
      state: the final (or, when preempted, the checkpointed) TrainState.
      metrics: the last line of ``metrics.jsonl`` (an empty dict if none).
      step: the step reached.
      preempted: whether the job stopped on SIGTERM before the end.
      eval_params: the parameters to evaluate (MSAM's clean ones).
    """

    state: Any
    metrics: dict
    step: int
    preempted: bool
    eval_params: Any


# ------------------------------------------------------------------ the config


def reference_config() -> ml_collections.ConfigDict:
    from sam_optax.train.configs import default

    return default.get_config()


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in (config.items() if hasattr(config, "items") else []):
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def config_to_dict(config: Any) -> dict:
    """A JSON-able dict of the config (tuples as lists)."""
    return json.loads(json.dumps(
        config.to_dict() if hasattr(config, "to_dict") else dict(config)))


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuse unknown keys, unknown names and out-of-range values.

    Raises:
      ConfigError: naming the key and the fix.
    """
    known = _flatten(reference_config())
    unknown = sorted(set(_flatten(config)) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {unknown}; the trainer reads only the keys "
            "of sam_optax/train/configs/default.py")
    optim.check_name(config.optimizer, optim.OPTIMIZERS, "optimizer")
    optim.check_name(config.base_optimizer, optim.BASE_OPTIMIZERS,
                     "base_optimizer")
    optim.check_name(config.lr_schedule, optim.LR_SCHEDULES, "lr_schedule")
    optim.check_name(config.dataset, data_lib.DATASETS, "dataset")
    optim.check_name(config.model, models.MODELS, "model")
    for key in ("batch_size", "num_epochs", "eval_batch_size",
                "eval_every_epochs"):
        if int(config[key]) < 1:
            raise ConfigError(f"`{key}` must be >= 1; got {config[key]!r}")
    for key in ("num_devices", "m", "train_size", "checkpoint_every_steps",
                "warmup_steps"):
        if int(config[key]) < 0:
            raise ConfigError(f"`{key}` must be >= 0; got {config[key]!r}")
    if not 0.0 <= config.label_noise <= 1.0:
        raise ConfigError(
            f"`label_noise` must be in [0, 1]; got {config.label_noise!r}")
    if config.optimizer == "sgd" and config.m:
        raise ConfigError("`m` (examples per ε) needs a SAM optimizer; "
                          "set `--config.m=0` for optimizer='sgd'")


class Topology(NamedTuple):
    """Where the job runs: the mesh, and how the batch is split over it."""

    mesh: jax.sharding.Mesh
    devices_per_process: int
    per_device_batch: int
    chunks: int  # ε per chunk of m examples within a device (1: per device)
    axis_name: Any  # None on one device without chunks


def topology(config: ml_collections.ConfigDict) -> Topology:
    """The mesh over ``config.num_devices`` local devices of every process.

    Raises:
      ConfigError: if the batch does not divide over the devices (or ``m``
        does not divide the per-device batch), naming the sizes and the fix.
    """
    local = jax.local_device_count()
    count = int(config.num_devices) or local
    if count > local:
        raise ConfigError(
            f"`num_devices` {count} exceeds the {local} local devices of this "
            "process; use 0 for all of them")
    chosen = [d for p in range(jax.process_count())
              for d in sorted((d for d in jax.devices() if d.process_index == p),
                              key=lambda d: d.id)[:count]]
    total = len(chosen)
    if config.batch_size % total:
        raise ConfigError(
            f"`batch_size` {config.batch_size} does not divide over the "
            f"{total} devices ({jax.process_count()} process(es) x {count}): "
            f"use a multiple of {total}, e.g. "
            f"{max(total, config.batch_size // total * total)}, or set "
            "`num_devices`")
    per_device = config.batch_size // total
    m = int(config.m) or per_device
    if per_device % m:
        raise ConfigError(
            f"`m` {m} does not divide the per-device batch {per_device} "
            f"(batch_size {config.batch_size} over {total} devices): choose "
            "m dividing it")
    chunks = per_device // m
    if (config.optimizer in optim.PER_REPLICA_STATE and total * chunks > 1
            and not config.sync_perturbation):
        raise ConfigError(
            f"`{config.optimizer}` keeps a momentum of the gradient that "
            "defines ε, which differs between replicas when ε is per device "
            f"or per chunk ({total} device(s), {chunks} chunk(s) each): set "
            "`--config.sync_perturbation=true` (one ε for the global batch), "
            "or run on one device (`--config.num_devices=1`, `--config.m=0`)")
    mesh = jax.sharding.Mesh(np.asarray(chosen), (DATA_AXIS,),
                             axis_types=(jax.sharding.AxisType.Auto,))
    if total == 1 and chunks == 1:
        axis_name = None
    elif chunks == 1:
        axis_name = DATA_AXIS
    else:
        axis_name = (DATA_AXIS, CHUNK_AXIS)
    return Topology(mesh, count, per_device, chunks, axis_name)


# ------------------------------------------------------------------ the steps


def _loss_fn(apply: Callable, batch: tuple) -> tuple[jax.Array, dict]:
    images, labels = batch
    logits = apply(images, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


def make_train_step(topo: Topology, is_sam: bool,
                    rule: Optional[Callable[[int], bool]] = None) -> Callable:
    """``step(state, batch, key) -> (state, metrics vector)``, jitted.

    The per-device body is ``sam_optax.linen.train_step`` with the job's
    axes; with ``chunks > 1`` it runs under ``vmap`` over chunks of m
    examples (one ε each). The metrics come back as one float32 vector
    (:data:`STEP_METRICS`), read by the host once per epoch.

    With ``rule`` (a count-based schedule's ``count_rule``), two programs are
    compiled, with and without the second gradient, and the host picks one
    per step (:func:`sam_optax.schedule.host_scheduled`): no ``lax.cond``.
    """
    if rule is not None:
        return sam_optax.schedule.host_scheduled(
            lambda flag: _compiled_train_step(topo, is_sam, flag), rule,
            opt_state=lambda args: args[0].opt_state,
            new_opt_state=lambda args, out: out[0].opt_state)
    return _compiled_train_step(topo, is_sam, None)


def _compiled_train_step(topo: Topology, is_sam: bool,
                         perturb: Optional[bool]) -> Callable:
    body = sam_optax.linen.train_step(_loss_fn, axis_name=topo.axis_name,
                                      perturb=perturb)
    if topo.chunks > 1:
        chunked = jax.vmap(body, in_axes=(None, 0, None), out_axes=(None, None),
                           axis_name=CHUNK_AXIS)

        def body(state, batch, key):  # noqa: F811 -- the chunked body
            split = jax.tree.map(
                lambda a: a.reshape((topo.chunks, -1) + a.shape[1:]), batch)
            return chunked(state, split, key)

    def per_device(state, batch, key):
        state, metrics = body(state, batch, key)
        zero = jnp.zeros([], jnp.float32)
        if is_sam:
            d = sam_optax.diagnostics(state.opt_state)
            extra = [d.grad_norm, d.sharpness, d.perturbed]
        else:
            extra = [zero, zero, zero]
        vector = jnp.stack([jnp.asarray(v, jnp.float32) for v in
                            (metrics["loss"], metrics["accuracy"], *extra)])
        return state, vector

    if topo.axis_name is None:
        return jax.jit(per_device, donate_argnums=0)
    # With chunks, a collective spans a shard_map axis and a vmap axis at
    # once, which JAX's varying-type check (check_vma) refuses; unchecked,
    # shard_map tracks nothing and gradients w.r.t. the replicated params
    # are local, as under pmap. Without chunks the check stays on.
    mapped = jax.shard_map(per_device, mesh=topo.mesh,
                           in_specs=(P(), P(DATA_AXIS), P()),
                           out_specs=(P(), P()), check_vma=topo.chunks == 1)
    return jax.jit(mapped, donate_argnums=0)


def eval_params(state: Any, optimizer_name: str) -> Any:
    """The parameters to evaluate: MSAM keeps w + ε in the state."""
    if optimizer_name == "msam":
        return sam_optax.msam_clean_params(state.params, state.opt_state)
    return state.params


def make_eval_step(topo: Topology, optimizer_name: str) -> Callable:
    """``evaluate(state, (x, y, weight)) -> [correct, loss sum, count]``,
    summed over the devices."""

    def per_device(state, batch):
        images, labels, weight = batch
        variables = {"params": eval_params(state, optimizer_name)}
        if state.batch_stats is not None:
            variables["batch_stats"] = state.batch_stats
        logits = state.apply_fn(variables, images, train=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        sums = jnp.stack([jnp.sum(weight * (jnp.argmax(logits, -1) == labels)),
                          jnp.sum(weight * losses), jnp.sum(weight)])
        if topo.axis_name is None:
            return sums
        return jax.lax.psum(sums, DATA_AXIS)

    if topo.axis_name is None:
        return jax.jit(per_device)
    return jax.jit(jax.shard_map(per_device, mesh=topo.mesh,
                                 in_specs=(P(), P(DATA_AXIS)), out_specs=P()))


# ------------------------------------------------------------- checkpoints


def _storable(tree: Any) -> Any:
    """Typed PRNG keys (random_sam, esam) as their raw key data."""
    return jax.tree.map(
        lambda x: jax.random.key_data(x)
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
        else x, tree)


def _rewrap(like: Any, value: Any) -> Any:
    if isinstance(like, jax.Array) and jnp.issubdtype(like.dtype,
                                                      jax.dtypes.prng_key):
        return jax.random.wrap_key_data(value, impl=jax.random.key_impl(like))
    return value


def _manager(workdir: str, read_only: bool = False):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=2, create=not read_only, read_only=read_only,
            enable_async_checkpointing=False),
        item_names=("state", "progress", "config"))


def stored_config(workdir: str) -> Optional[dict]:
    """The config of the latest checkpoint in ``workdir`` (``None``: none)."""
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path) or not os.listdir(path):
        return None
    import orbax.checkpoint as ocp

    with _manager(workdir, read_only=True) as manager:
        step = manager.latest_step()
        if step is None:
            return None
        restored = manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))
        return dict(restored["config"])


def load_checkpoint(workdir: str) -> tuple[int, dict]:
    """``(step, state)`` of the latest checkpoint in ``workdir``, the state
    as nested dicts of NumPy arrays (``params``, ``opt_state``,
    ``batch_stats``, ``step``) -- to evaluate or export a trained model.

    Raises:
      FileNotFoundError: if ``workdir`` holds no checkpoint.
    """
    import orbax.checkpoint as ocp

    if stored_config(workdir) is None:
        raise FileNotFoundError(f"no checkpoint in {workdir!r}/checkpoints")
    with _manager(workdir, read_only=True) as manager:
        step = manager.latest_step()
        path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step),
                            "state")
        # Onto this process's first device, whatever topology wrote it.
        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(path).item_metadata
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
            metadata.tree if hasattr(metadata, "tree") else metadata)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))
    return step, jax.tree.map(np.asarray, restored["state"])


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuse a work directory whose checkpoint comes from another config.

    Raises:
      ConfigError: listing the keys that differ and the two ways out.
    """
    stored = stored_config(workdir)
    if stored is None:
        return
    ours, theirs = _flatten(config_to_dict(config)), _flatten(stored)
    differ = sorted(k for k in set(ours) | set(theirs)
                    if k not in RUN_CONTROL_KEYS and ours.get(k) != theirs.get(k))
    if differ:
        details = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs now "
                            f"{ours.get(k)!r}" for k in differ[:8])
        raise ConfigError(
            f"the work directory {workdir!r} holds a checkpoint of a different "
            f"config ({details}). Nothing was written. Resume it with its own "
            "config (DIR/config.json), or use a new --workdir.")


# ----------------------------------------------------------------- the job


class _Preemption:
    """Sets a flag on SIGTERM (main thread only); restores the old handler."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread: no handler
            self._previous = None
        return self

    def _handler(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        # Every process must stop at the same step: agree on the flag, every
        # AGREE_EVERY steps (a host round trip, kept off most steps).
        if step % self.AGREE_EVERY:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.requested))
        return bool(np.any(flags))

    AGREE_EVERY = 10


def init_state(config, topo: Topology, splits: data_lib.Splits,
                tx: optax.GradientTransformation) -> Any:
    """The initial TrainState, replicated over the mesh (global arrays)."""
    model = models.create(config.model, splits.num_classes,
                          **dict(config[config.model]))
    key = jax.random.fold_in(jax.random.key(config.seed), 4)
    # The same values on every process (same seed): computed locally, then
    # placed as global replicated arrays.
    variables = jax.jit(lambda k: model.init(k, splits.x_train[:1], train=False))(key)
    variables = jax.device_get(variables)
    replicated = NamedSharding(topo.mesh, P())
    place = lambda a: jax.make_array_from_callback(
        np.shape(a), replicated, lambda index: np.asarray(a)[index])
    params = jax.tree.map(place, variables["params"])
    batch_stats = (jax.tree.map(place, variables["batch_stats"])
                   if "batch_stats" in variables else None)
    opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
    return sam_optax.linen.TrainState(
        step=jax.device_put(jnp.zeros([], jnp.int32), replicated),
        apply_fn=model.apply, params=params, tx=tx, opt_state=opt_state,
        batch_stats=batch_stats)


def _evaluate(evaluate, state, x, y, topo: Topology, batch_size: int
              ) -> tuple[float, float]:
    """(accuracy, mean loss) over all of ``x``: every example counted once."""
    sharding = NamedSharding(topo.mesh, P(DATA_AXIS))
    totals = np.zeros(3)
    for batch in data_lib.padded_batches(x, y, batch_size, jax.process_index(),
                                         jax.process_count()):
        if topo.axis_name is None:
            sums = evaluate(state, batch)
        else:
            sums = evaluate(state, jax.make_array_from_process_local_data(
                sharding, batch))
        totals += np.asarray(jax.device_get(sums), np.float64)
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


def _summarise(rows: np.ndarray, is_sam: bool) -> dict[str, float]:
    """Means over the epoch's steps of the per-step metrics (float64)."""
    means = rows.astype(np.float64).mean(axis=0)
    out = {"train_loss": means[0], "train_accuracy": means[1]}
    if is_sam:
        out.update(grad_norm=means[2], sharpness=means[3],
                   perturbed_fraction=means[4])
    return {k: float(v) for k, v in out.items()}


def _epoch_row(config, step: int, steps_per_epoch: int, total_steps: int,
               epoch_rows: list, is_sam: bool, evaluate: Callable,
               splits: data_lib.Splits, seconds: float, steps: int) -> dict:
    """One line of ``metrics.jsonl``: the epoch's training means, held-out
    and test accuracy (every ``eval_every_epochs`` and at the end), the
    learning rate, and the timings."""
    epoch = step // steps_per_epoch
    row = {"step": step, "epoch": epoch,
           **_summarise(np.stack(epoch_rows), is_sam)}
    if epoch % config.eval_every_epochs == 0 or step == total_steps:
        for split in ("val", "test"):
            x, y = getattr(splits, f"x_{split}"), getattr(splits, f"y_{split}")
            if len(x):
                row[f"{split}_accuracy"], row[f"{split}_loss"] = evaluate(x, y)
    schedule = optim.learning_rate_schedule(config, total_steps)
    row["learning_rate"] = float(schedule(step - 1))
    # Timings: the only fields that differ between reruns.
    row["time_epoch_s"] = seconds
    row["time_step_ms"] = 1e3 * seconds / steps
    return row


def _log(row: dict, path: str, writer: Any, bar: Any) -> None:
    """Append ``row`` to metrics.jsonl, TensorBoard and the progress bar."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    for name, value in row.items():
        if name not in ("step", "epoch"):
            writer.add_scalar(name, value, row["step"])
    writer.flush()
    if bar is not None:
        bar.set_postfix(loss=f"{row['train_loss']:.3f}",
                        test=f"{row.get('test_accuracy', float('nan')):.3f}")


def _read_metrics(path: str, up_to_step: int) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["step"] <= up_to_step]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       step_callback: Optional[Callable[[int], None]] = None
                       ) -> Result:
    """Run (or resume) the job ``config`` in ``workdir``.

    Args:
      config: a ConfigDict with the keys of ``configs/default.py``.
      workdir: the job's directory; rerunning with the same config resumes
        from its latest checkpoint (a finished job returns at once).
      step_callback: called with the step count after every step (e.g. for
        custom logging; the tests use it to send SIGTERM mid-run).

    Returns:
      a :class:`Result`.

    Raises:
      ConfigError: for an invalid config or a work directory holding a
        checkpoint of another config -- before anything is trained or
        written.
      FileNotFoundError: for missing Fashion-MNIST files, with the fix.
    """
    import orbax.checkpoint as ocp

    check_config(config)
    topo = topology(config)
    check_workdir(config, workdir)
    try:
        splits = data_lib.load(
            config.dataset, seed=config.seed, label_noise=config.label_noise,
            validation_fraction=config.validation_fraction,
            train_size=config.train_size, data_dir=config.data_dir or None)
    except ValueError as err:  # sizes and fractions: the config's fault
        raise ConfigError(str(err)) from err
    steps_per_epoch = len(splits.x_train) // config.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"`batch_size` {config.batch_size} exceeds the {len(splits.x_train)} "
            "training images: lower it")
    total_steps = steps_per_epoch * config.num_epochs
    is_sam = config.optimizer != "sgd"
    tx = optim.create(config, total_steps, topo.axis_name)
    state = init_state(config, topo, splits, tx)
    rule = (sam_optax.schedule.count_rule(tx, state.params)
            if is_sam and config.host_schedule else None)
    train_step = make_train_step(topo, is_sam, rule)
    evaluate = make_eval_step(topo, config.optimizer)
    eval_batch = math.ceil(config.eval_batch_size / len(topo.mesh.devices.flat)
                           ) * len(topo.mesh.devices.flat)
    primary = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config_to_dict(config), f, indent=2, sort_keys=True)

    manager = _manager(workdir)
    start_step, epoch_rows = 0, []
    if manager.latest_step() is not None:
        step = manager.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _storable(state))
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            progress=ocp.args.JsonRestore()))
        state = jax.tree.map(_rewrap, state, restored["state"])
        start_step = int(restored["progress"]["step"])
        epoch_rows = [np.asarray(r, np.float32)
                      for r in restored["progress"]["epoch_rows"]]
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    history = _read_metrics(metrics_path, start_step)
    if primary:  # drop lines logged after the checkpoint we resume from
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in history)

    def save(step: int) -> None:
        rows = np.stack(epoch_rows).tolist() if epoch_rows else []
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_storable(state)),
            progress=ocp.args.JsonSave({"step": step, "epoch_rows": rows}),
            config=ocp.args.JsonSave(config_to_dict(config))), force=True)
        manager.wait_until_finished()

    writer = bar = None
    if primary:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if config.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, initial=start_step, unit="step",
                       desc=f"{config.optimizer} on {config.dataset}")
    batch_sharding = NamedSharding(topo.mesh, P(DATA_AXIS))
    key = jax.random.key(config.seed)
    step, preempted = start_step, False
    epoch_start, epoch_first_step = time.perf_counter(), start_step
    pending: list = []  # this epoch's metric vectors, still on device
    try:
        with _Preemption() as preemption:
            while step < total_steps:
                epoch, in_epoch = divmod(step, steps_per_epoch)
                if in_epoch == 0 or step == start_step:
                    order = data_lib.epoch_order(config.seed, epoch,
                                                 len(splits.x_train))
                index = data_lib.host_batch_indices(
                    order, in_epoch, config.batch_size, jax.process_index(),
                    jax.process_count())
                batch = (splits.x_train[index], splits.y_train[index])
                if topo.axis_name is not None:
                    batch = jax.make_array_from_process_local_data(
                        batch_sharding, batch)
                state, vector = train_step(state, batch, key)
                pending.append(vector)
                step += 1
                if bar is not None:
                    bar.update(1)
                if step_callback is not None:
                    step_callback(step)
                end_of_epoch = step % steps_per_epoch == 0
                stop = preemption.reached(step) and step < total_steps
                checkpoint = (config.checkpoint_every_steps
                              and step % config.checkpoint_every_steps == 0)
                if pending and (end_of_epoch or stop or checkpoint):
                    epoch_rows.extend(np.asarray(jax.device_get(jnp.stack(pending))))
                    pending = []
                if end_of_epoch:
                    row = _epoch_row(
                        config, step, steps_per_epoch, total_steps, epoch_rows,
                        is_sam, lambda x, y: _evaluate(evaluate, state, x, y,
                                                       topo, eval_batch),
                        splits, time.perf_counter() - epoch_start,
                        step - epoch_first_step)
                    epoch_rows = []
                    history.append(row)
                    if primary:
                        _log(row, metrics_path, writer, bar)
                    epoch_start, epoch_first_step = time.perf_counter(), step
                if checkpoint or stop or step == total_steps:
                    save(step)
                if stop:
                    preempted = True
                    break
            if step == total_steps and manager.latest_step() != step:
                save(step)
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        manager.close()
    if preempted:
        print(f"SIGTERM: checkpoint at step {step} of {total_steps} written to "
              f"{workdir}; rerun the same command to resume.", flush=True)
    elif primary:
        from sam_optax.train import report

        report.write(workdir, history, config_to_dict(config))
    return Result(state=state, metrics=history[-1] if history else {},
                  step=step, preempted=preempted,
                  eval_params=eval_params(state, config.optimizer))


__all__ = ["ConfigError", "Result", "check_config", "check_workdir",
           "init_state", "load_checkpoint",
           "make_eval_step", "make_train_step", "reference_config",
           "topology", "train_and_evaluate"]

"""One process of the 2-process SAM test (run by tests/test_distributed.py).

    python tests/distributed_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

Each process owns 2 fake CPU devices and half of the global batch; the two
talk through gloo on 127.0.0.1 only. They train a small softmax-regression
model for a few SAM steps through ``sam_optax.parallel.data_parallel_step``
over a 2 x 2 mesh ``("group", "inner")`` of 4 devices, one row per process,
once per ε configuration of ``CONFIGS``, and write the params to OUT.npz
(keys ``"<config>.<leaf>"``). The test checks them against a per-chunk
float64 NumPy reference built from ``make_problem`` and the constants here.
"""

from __future__ import annotations

import os
import sys

LOCAL_DEVICES = 2
STEPS = 4
GLOBAL_BATCH = 16
DIM, CLASSES = 6, 4
LR, MOMENTUM, RHO = 0.3, 0.9, 0.1
# The batch is split in row-major order over the mesh ("group", "inner"):
# chunk c = 2 * group + inner lives on device `inner` of process `group`.
# "per_shard": each chunk's own ε; "grouped": ε averaged over "group", i.e.
# across the two processes (chunks {0, 2} and {1, 3} share one ε).
CONFIGS = {"per_shard": None, "grouped": "group"}


def make_problem():
    import numpy as np

    rng = np.random.RandomState(42)
    x = rng.randn(GLOBAL_BATCH, DIM).astype(np.float32)
    y = rng.randint(0, CLASSES, GLOBAL_BATCH).astype(np.int32)
    params = {"w": (rng.randn(DIM, CLASSES) * 0.3).astype(np.float32),
              "b": (rng.randn(CLASSES) * 0.1).astype(np.float32)}
    return params, x, y


def train(devices, process_index=0, process_count=1,
          perturbation_axis_name=None):
    """SAM with per-chunk (or grouped) ε over a 2 x 2 mesh of ``devices``
    (process-major); returns this process's copy of the params."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import sam_optax
    from sam_optax import parallel

    def loss_fn(params, batch):
        logits = batch["x"] @ params["w"] + params["b"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
            logits, batch["y"]))

    params, x, y = make_problem()
    axes = ("group", "inner")
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    mesh = jax.sharding.Mesh(np.asarray(devices).reshape(2, 2), axes,
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    replicated = NamedSharding(mesh, P())
    # Global arrays: params replicated everywhere, each process feeding its
    # own contiguous half of the batch (its row of the mesh).
    params = jax.tree.map(
        lambda a: jax.make_array_from_callback(a.shape, replicated,
                                               lambda index: a[index]), params)
    rows = np.split(np.arange(GLOBAL_BATCH), process_count)[process_index]
    batch = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P(axes)), {"x": x[rows], "y": y[rows]})
    tx = sam_optax.sam(optax.sgd(LR, momentum=MOMENTUM), rho=RHO,
                       axis_name=axes,
                       perturbation_axis_name=perturbation_axis_name)
    opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
    step = parallel.data_parallel_step(tx, loss_fn, mesh, axes)
    for _ in range(STEPS):
        params, opt_state, loss = step(params, opt_state, batch)
    return {k: np.asarray(v.addressable_shards[0].data)
            for k, v in params.items()}


def main(process_id: int, num_processes: int, port: int, out: str) -> None:
    if os.environ.get("DISTRIBUTED_WORKER_FAIL") == str(process_id):
        sys.exit(3)  # simulated crash, for the harness test
    # Before JAX starts: this process's own fake CPU devices.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(
        flags + [f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np

    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id,
                               heartbeat_timeout_seconds=10,
                               initialization_timeout=40)
    assert jax.process_count() == num_processes
    assert jax.device_count() == LOCAL_DEVICES * num_processes
    results = {}
    for name, perturbation_axis_name in CONFIGS.items():
        params = train(jax.devices(), jax.process_index(),
                       jax.process_count(), perturbation_axis_name)
        results.update({f"{name}.{k}": v for k, v in params.items()})
    np.savez(out, **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

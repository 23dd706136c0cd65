"""One process of the 2-process SAM test (run by tests/test_distributed.py).

    python tests/distributed_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

Each process owns 2 fake CPU devices and half of the global batch; the two
talk through gloo on 127.0.0.1 only. They train a small softmax-regression
model for a few SAM steps with per-shard ε via
``sam_optax.parallel.data_parallel_step`` and write their params to OUT.npz.
The problem (``make_problem``) and training loop (``train``) are shared with
the 1-process 4-device reference in the test.
"""

from __future__ import annotations

import os
import sys

LOCAL_DEVICES = 2
STEPS = 4
GLOBAL_BATCH = 16
DIM, CLASSES = 6, 4


def make_problem():
    import numpy as np

    rng = np.random.RandomState(42)
    x = rng.randn(GLOBAL_BATCH, DIM).astype(np.float32)
    y = rng.randint(0, CLASSES, GLOBAL_BATCH).astype(np.int32)
    params = {"w": (rng.randn(DIM, CLASSES) * 0.3).astype(np.float32),
              "b": np.zeros(CLASSES, np.float32)}
    return params, x, y


def train(devices, process_index=0, process_count=1):
    """Per-shard-ε SAM over a mesh of ``devices``; returns host params."""
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
    mesh = parallel.data_mesh("data", devices)
    replicated = NamedSharding(mesh, P())
    # Global arrays: params replicated everywhere, each process feeding its
    # own contiguous half of the batch.
    params = jax.tree.map(
        lambda a: jax.make_array_from_callback(a.shape, replicated,
                                               lambda index: a[index]), params)
    rows = np.split(np.arange(GLOBAL_BATCH), process_count)[process_index]
    batch = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("data")), {"x": x[rows], "y": y[rows]})
    tx = sam_optax.sam(optax.sgd(0.3, momentum=0.9), rho=0.1, axis_name="data")
    opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
    step = parallel.data_parallel_step(tx, loss_fn, mesh)
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
    params = train(jax.devices(), jax.process_index(), jax.process_count())
    np.savez(out, **params)
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

"""Data-parallel SAM: step time over 1, 2, 4, 8 devices and collectives per step.

For each device count n, three jitted steps over a mesh of n devices (batch
split over the ``data`` axis) are timed, interleaved round by round, and their
median is reported:

* ``base``: plain data parallelism, ``pmean`` of the gradient, then SGD;
* ``sam``: per-shard ε (``sam_optax.parallel.data_parallel_step``);
* ``sam_sync``: one ε for the global batch (``sync_perturbation=True``).

The compiled HLO of each is searched for all-reduce ops. Expected: per-shard
SAM has one gradient all-reduce per step (of ``g_sam``) plus a few scalar ones
(loss, diagnostics); synchronised SAM has one more (of ``g``).

On CPU, ``--devices`` fake devices are created with
``--xla_force_host_platform_device_count``: they share the same cores, so the
times show the overhead of the parallel step, **not** a speed-up.

    python benchmarks/bench_parallel.py [--devices 8] [--steps 30] [--width 256]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=8,
                        help="fake CPU devices (ignored on GPU/TPU)")
    parser.add_argument("--steps", type=int, default=30, help="timed rounds")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--width", type=int, default=256, help="MLP width")
    parser.add_argument("--out", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results"))
    return parser.parse_args()


def count_all_reduces(hlo: str) -> tuple[int, int, int]:
    """All-reduce ops, the non-scalar tensors they reduce, and their elements.

    XLA may fuse several reductions into one tuple all-reduce and may split
    one into an async ``-start``/``-done`` pair: each op is counted once, by
    its ``all-reduce(`` or ``all-reduce-start(`` instruction.
    """
    ops = tensors = elements = 0
    for line in hlo.splitlines():
        match = re.search(r"= (.*?) all-reduce(?:-start)?\(", line)
        if not match:
            continue
        ops += 1
        for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", match.group(1)):
            if dims:
                tensors += 1
                size = 1
                for d in dims.split(","):
                    size *= int(d)
                elements += size
    return ops, tensors, elements


def main():
    args = parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                               f"--xla_force_host_platform_device_count={args.devices}")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from tqdm import tqdm

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import sam_optax
    from sam_optax import parallel

    device_kind = jax.devices()[0].device_kind
    print("device:", device_kind, "count:", jax.device_count())

    rng = np.random.RandomState(0)
    dims = [64, args.width, args.width, 10]
    params = {f"layer{i}": {"w": jnp.asarray(rng.randn(a, b) / np.sqrt(a),
                                             jnp.float32),
                            "b": jnp.zeros(b, jnp.float32)}
              for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))}
    batch = {"x": jnp.asarray(rng.randn(args.batch, dims[0]), jnp.float32),
             "y": jnp.asarray(rng.randint(0, 10, args.batch), jnp.int32)}

    def loss_fn(p, b):
        h = b["x"]
        for i in range(len(dims) - 1):
            h = h @ p[f"layer{i}"]["w"] + p[f"layer{i}"]["b"]
            if i < len(dims) - 2:
                h = jax.nn.relu(h)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
            h, b["y"]))

    def base_step(tx, mesh):
        def body(p, s, b):
            grads = jax.grad(loss_fn)(parallel.to_varying(p, "data"), b)
            grads = jax.lax.pmean(grads, "data")
            updates, s = tx.update(grads, s, p)
            return optax.apply_updates(p, updates), s, jnp.zeros([])
        shardings = (NamedSharding(mesh, P()),) * 2 + (
            NamedSharding(mesh, P("data")),)
        jitted = jax.jit(jax.shard_map(body, mesh=mesh,
                                       in_specs=(P(), P(), P("data")),
                                       out_specs=(P(), P(), P())),
                         in_shardings=shardings, out_shardings=shardings[0])

        def step(p, s, b):
            return jitted(*jax.device_put((p, s, b), shardings))
        step.jitted = jitted
        return step

    counts = [n for n in (1, 2, 4, 8) if n <= jax.device_count()]
    configs = {}
    for n in counts:
        mesh = parallel.data_mesh("data", jax.devices()[:n])
        base = optax.sgd(0.01, momentum=0.9)
        txs = {"base": base,
               "sam": sam_optax.sam(base, 0.05, axis_name="data"),
               "sam_sync": sam_optax.sam(base, 0.05, axis_name="data",
                                         sync_perturbation=True)}
        for name, tx in txs.items():
            step = (base_step(tx, mesh) if name == "base"
                    else parallel.data_parallel_step(tx, loss_fn, mesh))
            state = tx.init(params)
            hlo = step.jitted.lower(params, state, batch).compile().as_text()
            ops, tensors, elements = count_all_reduces(hlo)
            p, s, _ = step(params, state, batch)  # compile + warm up
            jax.block_until_ready(p)
            configs[(n, name)] = {"step": step, "p": p, "s": s, "times": [],
                                  "all_reduces": ops,
                                  "reduced_tensors": tensors,
                                  "reduced_elements": elements}

    for _ in tqdm(range(args.steps), desc="rounds"):
        for cfg in configs.values():  # interleaved: same machine load
            start = time.perf_counter()
            cfg["p"], cfg["s"], _ = cfg["step"](cfg["p"], cfg["s"], batch)
            jax.block_until_ready(cfg["p"])
            cfg["times"].append(time.perf_counter() - start)

    rows = []
    for (n, name), cfg in configs.items():
        median = statistics.median(cfg["times"])
        base_median = statistics.median(configs[(n, "base")]["times"])
        sam_median = statistics.median(configs[(n, "sam")]["times"])
        rows.append({"devices": n, "step": name, "median_ms": median * 1e3,
                     "vs_base": median / base_median,
                     "vs_sam": median / sam_median,
                     "all_reduces": cfg["all_reduces"],
                     "reduced_tensors": cfg["reduced_tensors"],
                     "reduced_elements": cfg["reduced_elements"]})
    result = {"device_kind": device_kind, "platform": jax.devices()[0].platform,
              "jax": jax.__version__, "batch": args.batch, "width": args.width,
              "rounds": args.steps, "rows": rows}
    slug = re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_")
    os.makedirs(args.out, exist_ok=True)
    base_path = os.path.join(args.out, f"parallel_{slug}")
    with open(base_path + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        f"# Data-parallel SAM step time ({device_kind}, JAX {jax.__version__})",
        "",
        f"MLP 64-{args.width}-{args.width}-10, global batch {args.batch}, "
        f"median of {args.steps} interleaved rounds. "
        "`python benchmarks/bench_parallel.py`.",
        "",
    ]
    if jax.devices()[0].platform == "cpu":
        lines += ["Fake CPU devices share the same cores: this shows the "
                  "overhead of the parallel step, not a speed-up.", ""]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    lines += ["| devices | step | median ms | vs base | vs SAM | all-reduce ops "
              "| non-scalar tensors reduced | elements reduced / #params |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['devices']} | {r['step']} | {r['median_ms']:.2f} | "
                     f"{r['vs_base']:.2f} | {r['vs_sam']:.2f} | "
                     f"{r['all_reduces']} | {r['reduced_tensors']} | "
                     f"{r['reduced_elements'] / n_params:.2f} |")
    lines += ["", f"{n_params} parameters in {len(jax.tree.leaves(params))} "
              "leaves. XLA combines several reductions into one tuple "
              "all-reduce, so the op count is small; 'elements reduced / "
              "#params' counts how many gradient-sized reductions a step "
              "does (the rest are scalars: loss, diagnostics). With one "
              "device the all-reduces are trivial (nothing to exchange)."]
    with open(base_path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

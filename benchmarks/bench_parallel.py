"""Data-parallel SAM: step time over 1, 2, 4, 8 devices and collectives per step.

For each device count n, three jitted steps over a mesh of n devices (batch
split over the ``data`` axis) are timed in interleaved rounds
(``common.interleaved_rounds``); ratios are medians of per-round ratios:

* ``base``: plain data parallelism, ``pmean`` of the gradient, then SGD;
* ``sam``: per-shard ε (``sam_optax.parallel.data_parallel_step``);
* ``sam_sync``: one ε for the global batch (``sync_perturbation=True``).

The compiled HLO of each is searched for all-reduce ops. Expected: per-shard
SAM has one gradient all-reduce per step (of ``g_sam``) plus a few scalar ones
(loss, diagnostics); synchronised SAM has one more (of ``g``).

On CPU, ``--devices`` fake devices are created (``jax_num_cpu_devices``):
they share the same cores, so the times show the overhead of the parallel
step, **not** a speed-up.

    python benchmarks/bench_parallel.py [--devices 8] [--steps 30] [--width 256]

Results: ``<out>/parallel_<device>.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from typing import Any, Optional

import common
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from sam_optax import parallel

STEPS = ("base", "sam", "sam_sync")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=8,
                        help="fake CPU devices (ignored on GPU/TPU)")
    parser.add_argument("--steps", type=int, default=30, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--width", type=int, default=256, help="MLP width")
    parser.add_argument("--out", default=common.RESULTS_DIR)
    return parser.parse_args(argv)


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


def base_step(tx: optax.GradientTransformation, loss_fn, mesh):
    """Plain data parallelism, jitted: per-shard gradient, ``pmean``, base
    update."""

    def body(params, opt_state, batch):
        grads = jax.grad(loss_fn)(parallel.to_varying(params, "data"), batch)
        grads = jax.lax.pmean(grads, "data")
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, jnp.zeros([])

    shardings = (NamedSharding(mesh, P()),) * 2 + (NamedSharding(mesh, P("data")),)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P("data")),
                                 out_specs=(P(), P(), P())),
                   in_shardings=shardings, out_shardings=shardings[0])


def build(n: int, loss_fn, params, batch) -> dict[str, dict[str, Any]]:
    """The three steps on ``n`` devices, compiled once, with their
    all-reduces."""
    mesh = parallel.data_mesh("data", jax.devices()[:n])
    base = optax.sgd(0.01, momentum=0.9)
    txs = {"base": base,
           "sam": sam_optax.sam(base, 0.05, axis_name="data"),
           "sam_sync": sam_optax.sam(base, 0.05, axis_name="data",
                                     sync_perturbation=True)}
    built = {}
    for name, tx in txs.items():
        jitted = (base_step(tx, loss_fn, mesh) if name == "base"
                  else parallel.data_parallel_step(tx, loss_fn, mesh).jitted)
        state = tx.init(params)
        compiled = jitted.lower(params, state, batch).compile()
        ops, tensors, elements = count_all_reduces(compiled.as_text())
        # Placed once: later calls get the step's own (placed) outputs.
        carry = jax.device_put((params, state), compiled.input_shardings[0][:2])
        placed_batch = jax.device_put(batch, compiled.input_shardings[0][2])
        built[name] = {"step": compiled, "carry": list(carry),
                       "batch": placed_batch, "all_reduces": ops,
                       "reduced_tensors": tensors, "reduced_elements": elements}
    return built


def markdown(machine: dict, args: argparse.Namespace, rows: Sequence[dict],
             workload: common.Workload, n_params: int, n_leaves: int) -> str:
    lines = [
        f"# Data-parallel SAM step time ({machine['device_kind']})",
        "",
        common.device_line(machine),
        "",
        f"{workload.description} (global), {args.steps} interleaved rounds; "
        "ratios are medians of per-round ratios. "
        "`python benchmarks/bench_parallel.py`.",
        "",
    ]
    if machine["platform"] == "cpu":
        lines += ["Fake CPU devices share the same cores: this shows the "
                  "overhead of the parallel step, not a speed-up.", ""]
    lines += ["| devices | step | median ms | vs base | vs SAM | all-reduce ops "
              "| non-scalar tensors reduced | elements reduced / #params |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['devices']} | {r['step']} | {r['median_ms']:.2f} | "
                     f"{r['vs_base']:.2f} | {r['vs_sam']:.2f} | "
                     f"{r['all_reduces']} | {r['reduced_tensors']} | "
                     f"{r['reduced_elements'] / n_params:.2f} |")
    lines += ["", f"{n_params} parameters in {n_leaves} leaves. XLA combines "
              "several reductions into one tuple all-reduce, so the op count "
              "is small; 'elements reduced / #params' counts how many "
              "gradient-sized reductions a step does (the rest are scalars: "
              "loss, diagnostics). With one device the all-reduces are "
              "trivial (nothing to exchange)."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    # Before the first device query: only then does the CPU backend take it.
    jax.config.update("jax_num_cpu_devices", args.devices)
    machine = common.machine_info()
    print(common.device_line(machine))

    workload = common.mlp_workload(args.batch, input_dim=64,
                                   hidden=(args.width, args.width))
    key = jax.random.PRNGKey(0)
    params, _ = workload.init(key)
    batch = workload.batch(jax.random.fold_in(key, 1))
    loss_fn = lambda p, b: workload.loss(p, {}, b)[0]

    configs = {}
    for n in (n for n in (1, 2, 4, 8) if n <= jax.device_count()):
        for name, cfg in build(n, loss_fn, params, batch).items():
            configs[(n, name)] = cfg

    def sample(cfg: dict[str, Any]):
        def run() -> float:
            seconds, (params, state, _) = common.timed(
                cfg["step"], *cfg["carry"], cfg["batch"])
            cfg["carry"] = [params, state]
            return seconds

        return run

    times = common.interleaved_rounds(
        {key: sample(cfg) for key, cfg in configs.items()}, rounds=args.steps,
        warmup=args.warmup)
    rows = []
    for (n, name), cfg in configs.items():
        summary = common.summarize(times[(n, name)])
        rows.append({"devices": n, "step": name,
                     "median_ms": summary["median_ms"],
                     "vs_base": common.paired_ratio(times[(n, name)],
                                                    times[(n, "base")])[0],
                     "vs_sam": common.paired_ratio(times[(n, name)],
                                                   times[(n, "sam")])[0],
                     "all_reduces": cfg["all_reduces"],
                     "reduced_tensors": cfg["reduced_tensors"],
                     "reduced_elements": cfg["reduced_elements"]})
    leaves = jax.tree.leaves(params)
    n_params = sum(int(x.size) for x in leaves)
    payload = {"machine": machine, "workload": workload.description,
               "settings": vars(args), "rows": rows}
    common.write_results(
        os.path.join(args.out, f"parallel_{common.device_slug()}"), payload,
        markdown(machine, args, rows, workload, n_params, len(leaves)))
    return payload


if __name__ == "__main__":
    main()

"""Step time of every ascent method against the base step and the SAM step.

All configurations run on the same model and batch, compiled once, warmed up,
then timed in interleaved rounds (each round runs every configuration once in
a shuffled order) so that machine drift hits all of them alike. Ratios are
medians of per-round ratios (to the base optimizer's step and to SAM's step).

Usage::

  python benchmarks/bench_ascent.py                          # mlp, 50 rounds
  python benchmarks/bench_ascent.py --workload cnn_bn --rounds 100
  python benchmarks/bench_ascent.py --batch-size 32 --rounds 5 --out /tmp/b
  python benchmarks/bench_ascent.py --configs asam,multistep_sam  # + base, sam

Results go to ``<out>/ascent_<workload>_<device>.{md,json}`` (default
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from typing import Any

import common
import jax
import optax
from tqdm.auto import tqdm

import sam_optax


def base_tx() -> optax.GradientTransformation:
    return optax.sgd(0.05, momentum=0.9)


# name -> (optimizer, gradient evaluations per step). `None`: the base step.
CONFIGS: dict[str, tuple[Callable[[], Any] | None, int]] = {
    "base": (None, 1),
    "sam": (lambda: sam_optax.sam(base_tx(), 0.05), 2),
    "sam (p=inf)": (lambda: sam_optax.sam(base_tx(), 0.05, norm="linf"), 2),
    "asam": (lambda: sam_optax.asam(base_tx(), 0.5, eta=0.01), 2),
    "fisher_sam": (lambda: sam_optax.fisher_sam(base_tx(), 0.1, eta=1.0), 2),
    "friendly_sam": (lambda: sam_optax.friendly_sam(base_tx(), 0.05), 2),
    "vasso": (lambda: sam_optax.vasso(base_tx(), 0.05, theta=0.4), 2),
    "random_sam": (lambda: sam_optax.random_sam(base_tx(), 0.05, seed=0), 2),
    "multistep_sam (n=2)": (
        lambda: sam_optax.multistep_sam(base_tx(), 0.05, steps=2), 3),
    "multistep_sam (n=3)": (
        lambda: sam_optax.multistep_sam(base_tx(), 0.05, steps=3), 4),
    "esam (SWP, beta=0.6)": (lambda: sam_optax.esam(base_tx(), 0.05, beta=0.6),
                             2),
    "sam, mask=no bias/norm": (lambda: sam_optax.sam(
        base_tx(), 0.05, mask=sam_optax.masks.exclude_bias_and_norm), 2),
}


def _method(name: str) -> str:
    """A row's method: its name up to the first space or comma."""
    return re.split(r"[ ,]", name, maxsplit=1)[0]


def build(workload: common.Workload, name: str, key: jax.Array):
    make_tx, _ = CONFIGS[name]
    params, model_state = workload.init(key)
    batch = workload.batch(jax.random.fold_in(key, 1))
    if make_tx is None:
        tx = base_tx()
        step = common.base_step(workload, tx)
    else:
        tx = make_tx()
        step = common.grad_fn_step(workload, tx)
    opt_state = tx.init(params)
    compiled = common.compile_step(step, params, model_state, opt_state, batch)
    return compiled, [params, model_state, opt_state], batch


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="mlp",
                        choices=common.WORKLOAD_NAMES)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=50,
                        help="timed rounds (each runs every configuration once)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--configs", default="",
                        help="comma-separated methods, by the first word of "
                        "their row (base and sam are always kept), e.g. "
                        "'asam,multistep_sam'")
    parser.add_argument("--out", default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    names = list(CONFIGS)
    if args.configs:
        wanted = {c.strip() for c in args.configs.split(",") if c.strip()}
        unknown = wanted - {_method(n) for n in names}
        if unknown:
            parser.error(f"unknown --configs {sorted(unknown)}; choose from "
                         f"{sorted({_method(n) for n in names})}")
        names = [n for n in names
                 if n in ("base", "sam") or _method(n) in wanted]

    machine = common.machine_info()
    print(common.device_line(machine))
    workload = common.make_workload(args.workload, args.batch_size)
    key = jax.random.key(0)
    built = {name: build(workload, name, key)
             for name in tqdm(names, desc="compile")}

    def sample(name: str) -> Callable[[], float]:
        compiled, carry, batch = built[name]

        def run() -> float:
            seconds, out = common.timed(compiled.executable, *carry, batch)
            carry[:] = out[:3]  # params, model state, optimizer state
            return seconds

        return run

    times = common.interleaved_rounds(
        {name: sample(name) for name in built}, rounds=args.rounds,
        warmup=args.warmup)
    rows = []
    for name, (compiled, carry, _) in built.items():
        rows.append({
            "method": name,
            "grad_evals": CONFIGS[name][1],
            **common.summarize(times[name]),
            "ratio_to_base": common.paired_ratio(times[name], times["base"]),
            "ratio_to_sam": common.paired_ratio(times[name], times["sam"]),
            "compile_s": compiled.compile_s,
            "opt_state_bytes": common.tree_bytes(carry[2]),
        })
    payload = {"benchmark": "ascent", "workload": workload.description,
               "rounds": args.rounds, "machine": machine, "rows": rows}
    stem = os.path.join(args.out,
                        f"ascent_{workload.name}_{common.device_slug()}")
    common.write_results(stem, payload, markdown(payload))
    return payload


def markdown(payload: dict[str, Any]) -> str:
    machine = payload["machine"]
    lines = [
        f"# Ascent methods: step time ({machine['device_kind']})",
        "",
        common.device_line(machine),
        "",
        f"Workload: {payload['workload']}. {payload['rounds']} interleaved "
        "rounds. Ratios: median of per-round ratios [quartiles]. Command: "
        "`python benchmarks/bench_ascent.py`.",
        "",
        "| method | grad evals | median ms | × base | × sam | opt state MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in payload["rows"]:
        base, base_lo, base_hi = row["ratio_to_base"]
        sam, sam_lo, sam_hi = row["ratio_to_sam"]
        lines.append(
            f"| {row['method']} | {row['grad_evals']} | "
            f"{row['median_ms']:.2f} | {base:.2f} [{base_lo:.2f}, "
            f"{base_hi:.2f}] | {sam:.2f} [{sam_lo:.2f}, {sam_hi:.2f}] | "
            f"{row['opt_state_bytes'] / 2**20:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Cost of the schedule family (LookSAM, every-k, AE-SAM, MSAM) per step.

These methods pay for the second gradient on some steps only (MSAM never), so
their cost is an average over many steps. Each configuration runs in
*blocks* of consecutive steps (a multiple of k, so every block holds the same
mix of SAM and cheap steps); the rounds interleave all configurations in a
shuffled order, so drift of the machine hits all of them alike. A block's
time divided by its steps is one sample; ratios to the base step and to the
SAM step are medians of per-round ratios.

Rows: ``base`` (one gradient, the base optimizer), ``sam``, ``looksam`` (k=5),
``every_k_sam`` (k=5), ``ae_sam`` (c from −1 to 1 over the run, as in the
paper), ``msam``, and for reference the every-step descents ``gsam`` and
``wsam``. Each row also reports the fraction of steps that took the second
gradient (from ``sam_optax.diagnostics``).

Usage::

  python benchmarks/bench_schedule.py                 # quick: 200 steps per row
  python benchmarks/bench_schedule.py --full          # >= 5000 steps per row
  python benchmarks/bench_schedule.py --rounds 100 --block 10 --workloads mlp

Results: ``<out>/schedule_<device>.{md,json}``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional

import common
import jax
import jax.numpy as jnp
import optax

import sam_optax

TARGETS = {"looksam": 1.35, "msam": 1.10}  # × base step, from the issue
CPU_NOTE = (
    "On CPU the figures are indicative only: a step is compute-bound, and "
    "XLA:CPU runs a convolution gradient inside `lax.cond` (or any nested "
    "computation, such as `lax.while_loop`) far slower than at top level, so "
    "on the CPU CNN the conditional methods cost more than SAM (the CNN rows "
    "above show by how much). The full-size run (`--full`) on a GPU is the "
    "reference for the targets.")


def configs(base_tx: optax.GradientTransformation, rho: float,
            total_steps: int) -> dict[str, Optional[Callable[[], Any]]]:
    """Row name -> builder of its transformation (None: the base step)."""
    return {
        "base": None,
        "sam": lambda: sam_optax.sam(base_tx, rho),
        "looksam": lambda: sam_optax.looksam(base_tx, rho, k=5, alpha=0.7),
        "every_k_sam": lambda: sam_optax.every_k_sam(base_tx, rho, k=5),
        "ae_sam": lambda: sam_optax.ae_sam(
            base_tx, rho, c=optax.linear_schedule(-1.0, 1.0, total_steps)),
        "msam": lambda: sam_optax.msam(base_tx, 0.3),
        "gsam": lambda: sam_optax.gsam(base_tx, rho, alpha=0.1),
        "wsam": lambda: sam_optax.wsam(base_tx, rho, gamma=0.9),
    }


def run_workload(workload: common.Workload, args: argparse.Namespace,
                 names: Sequence[str]) -> list[dict]:
    base_tx = optax.sgd(args.learning_rate, momentum=0.9)
    total = args.rounds * args.block + args.warmup
    builders = configs(base_tx, args.rho, total)
    key = jax.random.PRNGKey(args.seed)
    batch = workload.batch(key)
    prepared = {}
    for name in names:
        params, model_state = workload.init(key)
        if builders[name] is None:
            tx = base_tx
            step = common.base_step(workload, tx)
        else:
            tx = builders[name]()
            step = common.grad_fn_step(workload, tx)
        opt_state = tx.init(params)
        step = common.with_flag(step, sam_like=builders[name] is not None)
        compiled = common.compile_step(step, params, model_state, opt_state,
                                       batch)
        # Fresh buffers: init may share one zero array between state leaves,
        # which cannot be donated twice.
        carry = jax.tree.map(jnp.copy, (params, model_state, opt_state))
        for _ in range(args.warmup):
            *carry, loss, _ = compiled.executable(*carry, batch)
        jax.block_until_ready(carry)
        prepared[name] = {"run": compiled.executable, "carry": tuple(carry),
                          "compile_s": compiled.compile_s,
                          "paid": 0, "steps": 0,
                          "sam_like": builders[name] is not None}

    def run_block(p: dict) -> float:
        """One sample: ``args.block`` consecutive steps, seconds per step."""

        def block(carry):
            flags = []
            for _ in range(args.block):
                *carry, loss, perturbed = p["run"](*carry, batch)
                flags.append(perturbed)  # device scalars, read after timing
            return tuple(carry), loss, flags

        seconds, (p["carry"], _, flags) = common.timed(block, p["carry"])
        p["paid"] += int(sum(int(x) for x in flags))
        p["steps"] += args.block
        return seconds / args.block

    times = common.interleaved_rounds(
        {name: functools.partial(run_block, prepared[name]) for name in names},
        rounds=args.rounds, seed=args.seed, desc=f"{workload.name}: rounds",
        progress=not args.no_progress)

    rows = []
    for name in names:
        p = prepared[name]
        row = {"workload": workload.name, "config": name,
               **common.summarize(times[name]),
               "steps": args.rounds * args.block,
               "compile_s": p["compile_s"],
               "second_gradient_fraction": (p["paid"] / p["steps"]
                                            if p["sam_like"] else 0.0)}
        for ref in ("base", "sam"):
            if ref in prepared:
                q50, q25, q75 = common.paired_ratio(times[name], times[ref])
                row[f"x_{ref}"], row[f"x_{ref}_q25"], row[f"x_{ref}_q75"] = (
                    q50, q25, q75)
        rows.append(row)
    return rows


def markdown(machine: dict, args: argparse.Namespace, rows: Sequence[dict],
             descriptions: dict[str, str]) -> str:
    lines = [
        "# Cost per step of the schedule family",
        "",
        common.device_line(machine),
        f"Base optimizer SGD (momentum 0.9, lr {args.learning_rate}), "
        f"ρ = {args.rho} (MSAM: 0.3). {args.rounds} interleaved rounds × "
        f"{args.block} consecutive steps per row "
        f"= {args.rounds * args.block} timed steps per row, after "
        f"{args.warmup} warm-up steps. Ratios: medians of per-round ratios "
        "[quartiles].",
        f"Reproduce: `{args.command}`.",
        "",
    ]
    for workload, description in descriptions.items():
        lines += [f"## {description}", "",
                  "| config | ms/step [q25–q75] | × base | × SAM | "
                  "2nd-gradient steps | compile s |",
                  "|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["workload"] == workload):
            lines.append(
                f"| {r['config']} | {r['median_ms']:.3f} "
                f"[{r['q25_ms']:.3f}–{r['q75_ms']:.3f}] | "
                f"{r.get('x_base', float('nan')):.2f} "
                f"[{r.get('x_base_q25', float('nan')):.2f}–"
                f"{r.get('x_base_q75', float('nan')):.2f}] | "
                f"{r.get('x_sam', float('nan')):.2f} | "
                f"{100 * r['second_gradient_fraction']:.0f}% | "
                f"{r['compile_s']:.1f} |")
        lines.append("")
    lines += ["## Targets (issue 4)", "",
              "| workload | config | × base | target | met |", "|---|---|---|---|---|"]
    for r in rows:
        if r["config"] in TARGETS and "x_base" in r:
            limit = TARGETS[r["config"]]
            lines.append(f"| {r['workload']} | {r['config']} | "
                         f"{r['x_base']:.2f} | ≤ {limit} | "
                         f"{'yes' if r['x_base'] <= limit else '**no**'} |")
    lines.append("")
    if machine["platform"] == "cpu":
        lines += [CPU_NOTE, ""]
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="mlp,cnn",
                        help="comma-separated subset of mlp,cnn,cnn_bn")
    parser.add_argument("--rounds", type=int, default=20,
                        help="interleaved rounds (one block per row each)")
    parser.add_argument("--block", type=int, default=10,
                        help="consecutive steps per block; a multiple of 5")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--full", action="store_true",
                        help="500 rounds x 10 steps = 5000 timed steps per row")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="override the batch size (default: the standard "
                        "sizes; 32 for the CNN on CPU)")
    parser.add_argument("--configs", default="",
                        help="comma-separated subset of rows (base is kept)")
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=common.RESULTS_DIR)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.full:
        args.rounds, args.block = max(args.rounds, 500), 10
    if args.rounds < 1 or args.block < 1 or args.block % 5:
        parser.error("--rounds must be >= 1 and --block a multiple of 5")
    args.command = "python benchmarks/bench_schedule.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    return args


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    args = parse_args(argv)
    machine = common.machine_info()
    print(common.device_line(machine))
    names = list(configs(optax.sgd(0.1), args.rho, 1))
    if args.configs:
        wanted = {c.strip() for c in args.configs.split(",")} | {"base"}
        names = [n for n in names if n in wanted]
    rows, descriptions = [], {}
    stem = os.path.join(args.out, f"schedule_{common.device_slug()}")
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for i, name in enumerate(workloads):
        batch_size = args.batch_size
        if batch_size is None and name.startswith("cnn") and (
                machine["platform"] == "cpu"):
            batch_size = 32  # the full-size CNN is too slow for a CPU run
        workload = common.make_workload(name, batch_size)
        descriptions[name] = workload.description
        rows += run_workload(workload, args, names)
        # Written after every workload: a long run keeps what it measured.
        payload = {"machine": machine, "settings": {
            k: v for k, v in vars(args).items() if k != "no_progress"},
            "rows": rows}
        common.write_results(stem, payload,
                             markdown(machine, args, rows, descriptions),
                             echo=i == len(workloads) - 1)
    return rows


if __name__ == "__main__":
    main()

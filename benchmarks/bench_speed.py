"""Speed, memory and compile cost of SAM implementations, side by side.

Every configuration of a workload is compiled once, warmed up, then timed in
interleaved rounds (each round runs every configuration once, in a shuffled
order), so that drift of the machine hits all of them alike. Ratios are medians
of per-round ratios.

Configurations:

* ``base``          -- one gradient and the base optimizer (the floor);
* ``handwritten``   -- ε = ρg/(‖g‖+1e-12), a second gradient, the same base
  update, written out by hand: the reference for the library's overhead;
* ``sam_optax.sam`` -- this library;
* ``optax.contrib.sam`` -- Optax's SAM in opaque mode (one call = one step);
* every variant ``sam_optax`` ships (``asam``, ``gsam``, ``looksam``, ...).

Figures per row: median ms/step (with quartiles), ratio to the base step,
ratio to the hand-written step, XLA FLOPs (``cost_analysis``), temporary
memory (``memory_analysis``), optimizer-state bytes and compile time.

Usage (``make bench`` runs the defaults)::

  python benchmarks/bench_speed.py                      # all workloads
  python benchmarks/bench_speed.py --workloads mlp --steps 100
  python benchmarks/bench_speed.py --out /tmp/bench     # on a GPU machine

Results go to ``<out>/speed_<device>.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import sam_optax

# Variants as the library exposes them, with the settings their papers use.
# A name that does not exist (yet) in `sam_optax` is skipped, so the table
# grows as variants land. Each is called as `fn(base_tx, **kwargs)`. The last
# field is the number of consecutive steps per timed sample: the schedule
# variants pay the second gradient on some steps only, so one sample covers
# a whole cycle (k = 5) and its time per step is the average over the cycle.
VARIANTS: tuple[tuple[str, dict[str, Any], int], ...] = (
    ("asam", {"rho": 0.5}, 1),
    ("fisher_sam", {}, 1),
    ("friendly_sam", {}, 1),
    ("vasso", {}, 1),
    ("random_sam", {}, 1),
    ("multistep_sam", {"steps": 2}, 1),
    ("esam", {}, 1),
    ("gsam", {}, 1),
    ("wsam", {}, 1),
    ("looksam", {"k": 5}, 5),
    ("every_k_sam", {"k": 5}, 5),
    ("ae_sam", {}, 5),
    ("msam", {}, 1),
)

REFERENCE_ROWS = ("base", "handwritten", "sam_optax.sam", "optax.contrib.sam")
# SAM with the opt-in cos∠(g, g_sam) diagnostic, which keeps g alive through
# the second gradient: shows what it costs. Timed with the variants.
FULL_SAM = "sam_optax.sam full_diagnostics=True"
SAM_ROWS = ("sam_optax.sam", FULL_SAM)


def full_sam(base_tx: optax.GradientTransformation, rho: float
             ) -> optax.GradientTransformation:
    """`sam` that also records the cosine diagnostic."""
    return sam_optax.sam(base_tx, rho, full_diagnostics=True)


@dataclasses.dataclass
class Config:
    """One row: how to build its optimizer and its step for a workload."""

    name: str
    build: Callable[[common.Workload], tuple[optax.GradientTransformation,
                                              common.Step]]
    steps_per_sample: int = 1


def make_base_tx(name: str, learning_rate: float) -> optax.GradientTransformation:
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=0.9)
    if name == "adam":
        return optax.adam(learning_rate)
    raise ValueError(f"--base must be 'sgd' or 'adam'; got {name!r}.")


def build_configs(base_tx: optax.GradientTransformation, rho: float,
                  only: Optional[Sequence[str]] = None
                  ) -> tuple[list[Config], list[str]]:
    """The rows to time, and notes on variants that could not be built."""
    configs = [
        Config("base", lambda w: (base_tx, common.base_step(w, base_tx))),
        Config("handwritten", lambda w: (
            base_tx, common.handwritten_sam_step(w, base_tx, rho))),
        Config("sam_optax.sam", lambda w: (
            sam_optax.sam(base_tx, rho),
            common.grad_fn_step(w, sam_optax.sam(base_tx, rho)))),
        Config("optax.contrib.sam",
               lambda w: common.optax_contrib_sam_step(w, base_tx, rho)),
        Config(FULL_SAM, lambda w: (
            full_sam(base_tx, rho),
            common.grad_fn_step(w, full_sam(base_tx, rho)))),
    ]
    notes = []
    for name, kwargs, steps_per_sample in VARIANTS:
        if not hasattr(sam_optax, name):
            continue
        constructor = getattr(sam_optax, name)
        try:
            tx = constructor(base_tx, **kwargs)
        except TypeError:
            try:  # a constructor that takes rho positionally only, etc.
                tx = constructor(base_tx)
            except Exception as err:  # noqa: BLE001 -- reported, not hidden
                notes.append(f"{name}: not built ({type(err).__name__}: {err})")
                continue
        except Exception as err:  # noqa: BLE001
            notes.append(f"{name}: not built ({type(err).__name__}: {err})")
            continue
        label = f"sam_optax.{name}" + "".join(
            f" {k}={v}" for k, v in kwargs.items() if k != "rho")
        configs.append(Config(
            label, lambda w, tx=tx: (tx, common.grad_fn_step(w, tx)),
            steps_per_sample))
    if only:
        configs = [c for c in configs if c.name in only
                   or c.name.split(" ")[0].removeprefix("sam_optax.") in only
                   or c.name in REFERENCE_ROWS[:2]]
    return configs, notes


@dataclasses.dataclass
class Prepared:
    config: Config
    compiled: common.Compiled
    state_bytes: int
    carry: tuple
    times: list


def run_workload(workload: common.Workload, configs: Sequence[Config], *,
                 steps: int, warmup: int, seed: int, progress: bool
                 ) -> tuple[list[dict], list[str]]:
    """Compile, warm up and time every configuration on one workload."""
    key = jax.random.PRNGKey(seed)
    params, model_state = workload.init(key)
    batch = workload.batch(jax.random.fold_in(key, 1))
    prepared: list[Prepared] = []
    notes: list[str] = []
    for config in tqdm(configs, desc=f"{workload.name}: compile", leave=False,
                       disable=not progress):
        try:
            tx, step = config.build(workload)
            opt_state = tx.init(params)
            compiled = common.compile_step(step, params, model_state,
                                           opt_state, batch)
        except Exception as err:  # noqa: BLE001 -- one broken row must not
            # hide all the others; the failure goes into the results.
            notes.append(f"{workload.name} / {config.name}: failed "
                         f"({type(err).__name__}: {str(err)[:200]})")
            continue
        # Each configuration owns its buffers: they are donated every step.
        carry = jax.tree.map(jnp.copy, (params, model_state, opt_state))
        prepared.append(Prepared(config, compiled, common.tree_bytes(opt_state),
                                 carry, []))

    losses = {}

    def sample(p: Prepared) -> Callable[[], float]:
        """Seconds per step over one sample (1 step, or a schedule's cycle)."""

        def steps_of_sample(carry):
            for _ in range(p.config.steps_per_sample):
                *carry, loss = p.compiled.executable(*carry, batch)
            return tuple(carry), loss

        def run() -> float:
            seconds, (p.carry, losses[p.config.name]) = common.timed(
                steps_of_sample, p.carry)
            return seconds / p.config.steps_per_sample

        return run

    times = common.interleaved_rounds(
        {p.config.name: sample(p) for p in prepared}, rounds=steps,
        warmup=warmup, seed=seed, desc=f"{workload.name}: timed rounds",
        progress=progress)
    for p in prepared:
        p.times = times[p.config.name]

    by_name = {p.config.name: p for p in prepared}
    rows = []
    for p in prepared:
        row = {"workload": workload.name, "config": p.config.name,
               **common.summarize(p.times),
               "steps_per_sample": p.config.steps_per_sample,
               "times_ms": [round(t * 1e3, 4) for t in p.times]}
        for ref in ("base", "handwritten"):
            if ref in by_name:
                mid, q25, q75 = common.paired_ratio(p.times, by_name[ref].times)
                row[f"x_{ref}"] = mid
                row[f"x_{ref}_q25"] = q25
                row[f"x_{ref}_q75"] = q75
        if "optax.contrib.sam" in by_name:
            row["x_optax_contrib"] = common.paired_ratio(
                p.times, by_name["optax.contrib.sam"].times)[0]
        row.update(flops=p.compiled.flops, temp_bytes=p.compiled.temp_bytes,
                   state_bytes=p.state_bytes, compile_s=p.compiled.compile_s,
                   final_loss=float(losses[p.config.name]))
        if "base" in by_name:
            base = by_name["base"]
            row["flops_x_base"] = p.compiled.flops / base.compiled.flops
            row["compile_x_base"] = p.compiled.compile_s / base.compiled.compile_s
            row["state_bytes_minus_base"] = p.state_bytes - base.state_bytes
        rows.append(row)
    return rows, notes


# --------------------------------------------------------------------------
# Targets and reports


def check_targets(rows: Sequence[dict]) -> list[dict]:
    """The issue's targets for the SAM rows, per workload, with verdicts."""
    checks = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        by = {r["config"]: r for r in rows if r["workload"] == workload}
        for config in SAM_ROWS:
            row = by.get(config)
            if row is None:
                continue

            def add(target, value, limit, unit="", row=row, config=config):
                checks.append({"workload": workload, "config": config,
                               "target": target, "value": value,
                               "limit": limit, "met": bool(value <= limit),
                               "unit": unit})

            if "x_handwritten" in row:
                add("time / hand-written", row["x_handwritten"], 1.02)
            if "x_optax_contrib" in row:
                add("time / optax.contrib.sam", row["x_optax_contrib"], 1.0)
            if "flops_x_base" in row:
                add("FLOPs / base", row["flops_x_base"], 2.01)
                add("state bytes - base", row["state_bytes_minus_base"], 1024,
                    " B")
                add("compile time / base", row["compile_x_base"], 2.5)
    return checks


def _fmt_bytes(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    if n < 1024 ** 2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 ** 2:.1f} MiB"


def _fmt_ratio(row: dict, key: str) -> str:
    if key not in row:
        return "–"
    return f"{row[key]:.2f} [{row[key + '_q25']:.2f}–{row[key + '_q75']:.2f}]"


def markdown_report(machine: dict, settings: dict, rows: Sequence[dict],
                    checks: Sequence[dict], notes: Sequence[str],
                    workloads: dict[str, str]) -> str:
    lines = [
        "# Speed, memory and compile cost",
        "",
        common.device_line(machine),
        f"Base optimizer `{settings['base']}`, ρ = {settings['rho']}; "
        f"{settings['steps']} interleaved timed rounds after {settings['warmup']}"
        " warm-up steps. Ratios are medians of per-round ratios [quartiles].",
        "Schedule variants (marked †) are timed over 5-step cycles: their "
        "ms/step is the cycle's average.",
        "Reproduce: `" + settings["command"] + "`.",
        "",
    ]
    header = ("| config | ms/step [q25–q75] | × base | × hand-written | "
              "GFLOPs | temp mem | opt-state | compile s |")
    rule = "|" + "---|" * 8
    for workload, description in workloads.items():
        wrows = [r for r in rows if r["workload"] == workload]
        if not wrows:
            continue
        lines += [f"## {description}", "", header, rule]
        for r in wrows:
            lines.append(
                f"| {r['config']}{' †' if r['steps_per_sample'] > 1 else ''} | "
                f"{r['median_ms']:.2f} "
                f"[{r['q25_ms']:.2f}–{r['q75_ms']:.2f}] | "
                f"{_fmt_ratio(r, 'x_base')} | {_fmt_ratio(r, 'x_handwritten')} | "
                f"{r['flops'] / 1e9:.3f} | {_fmt_bytes(r['temp_bytes'])} | "
                f"{_fmt_bytes(r['state_bytes'])} | {r['compile_s']:.2f} |")
        lines.append("")
    if checks:
        lines += ["## Targets", "",
                  "| workload | config | target | value | limit | met |",
                  "|---|---|---|---|---|---|"]
        for c in checks:
            value = (f"{c['value']:.0f}" if c["unit"] else f"{c['value']:.3f}")
            lines.append(f"| {c['workload']} | {c['config']} | {c['target']} | "
                         f"{value}{c['unit']} | ≤ {c['limit']}{c['unit']} | "
                         f"{'yes' if c['met'] else '**no**'} |")
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def plot_ratios(rows: Sequence[dict], path: str, title: str) -> None:
    """Grouped bar chart: time ratio to the base step per config and workload."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    lookup = {(r["workload"], r["config"]): r for r in rows}
    width = 0.8 / max(len(workloads), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(configs) + 2), 4.2))
    x = np.arange(len(configs))
    for i, workload in enumerate(workloads):
        mid = [lookup.get((workload, c), {}).get("x_base", np.nan)
               for c in configs]
        low = [m - lookup.get((workload, c), {}).get("x_base_q25", np.nan)
               for m, c in zip(mid, configs, strict=True)]
        high = [lookup.get((workload, c), {}).get("x_base_q75", np.nan) - m
                for m, c in zip(mid, configs, strict=True)]
        ax.bar(x + (i - (len(workloads) - 1) / 2) * width, mid, width,
               yerr=[low, high], capsize=2, label=workload)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(2.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(x)
    ax.set_xticklabels(configs, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("time per step / base step")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default=",".join(common.WORKLOAD_NAMES),
                        help="comma-separated subset of mlp,cnn,cnn_bn")
    parser.add_argument("--steps", type=int, default=30,
                        help="timed interleaved rounds (>= 30 for the report)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps per configuration after compiling")
    parser.add_argument("--configs", default="",
                        help="comma-separated subset of rows (base and "
                        "handwritten are always kept), e.g. sam,gsam")
    parser.add_argument("--no-variants", action="store_true",
                        help="time only the four reference rows")
    parser.add_argument("--variant-workloads", default="auto",
                        help="workloads that also time the variants: a "
                        "comma-separated list, 'all', or 'auto' (all on an "
                        "accelerator; mlp only on CPU, where the CNN rows "
                        "would dominate the run time)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="override the workloads' batch size (smoke tests)")
    parser.add_argument("--base", default="sgd", choices=("sgd", "adam"),
                        help="base optimizer (sgd: momentum 0.9)")
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=common.RESULTS_DIR,
                        help="output folder for speed_<device>.{md,json,png}")
    parser.add_argument("--tag", default="",
                        help="suffix for the output names, speed_<device>_<tag>")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    only = [c.strip() for c in args.configs.split(",") if c.strip()]
    if args.no_variants:
        only = list(REFERENCE_ROWS)
    base_tx = make_base_tx(args.base, args.learning_rate)
    configs, notes = build_configs(base_tx, args.rho, only)
    machine = common.machine_info()
    print(common.device_line(machine))
    print(f"rows: {', '.join(c.name for c in configs)}")
    missing = sorted({v[0] for v in VARIANTS} - set(sam_optax.__all__))
    if missing:
        notes.append("not (yet) in sam_optax, skipped: " + ", ".join(missing))

    if args.variant_workloads == "auto":
        on_cpu = machine["platform"] == "cpu"
        variant_workloads = ["mlp"] if on_cpu else names
    elif args.variant_workloads == "all":
        variant_workloads = names
    else:
        variant_workloads = [n.strip() for n in args.variant_workloads.split(",")]
    reference_configs = [c for c in configs if c.name in REFERENCE_ROWS]
    if len(reference_configs) < len(configs):
        skipped = [n for n in names if n not in variant_workloads]
        if skipped:
            notes.append("variants timed on " + (", ".join(
                n for n in names if n in variant_workloads) or "no workload")
                + "; reference rows only on " + ", ".join(skipped)
                + " (--variant-workloads).")

    rows: list[dict] = []
    descriptions = {}
    for name in names:
        workload = common.make_workload(name, args.batch_size)
        descriptions[name] = workload.description
        workload_rows, workload_notes = run_workload(
            workload, configs if name in variant_workloads else reference_configs,
            steps=args.steps, warmup=args.warmup,
            seed=args.seed, progress=not args.no_progress)
        rows += workload_rows
        notes += workload_notes
        for r in workload_rows:
            if not math.isfinite(r["final_loss"]):
                notes.append(f"{name} / {r['config']}: non-finite loss "
                             f"{r['final_loss']}")

    checks = check_targets(rows)
    command = "python benchmarks/bench_speed.py" + (
        " " + " ".join(argv) if argv else " " + " ".join(sys.argv[1:])).rstrip()
    settings = {"base": f"{args.base}(lr={args.learning_rate}"
                + (", momentum=0.9)" if args.base == "sgd" else ")"),
                "rho": args.rho, "steps": args.steps, "warmup": args.warmup,
                "batch_size": args.batch_size, "seed": args.seed,
                "command": command}
    report = markdown_report(machine, settings, rows, checks, notes,
                             descriptions)
    stem = os.path.join(args.out, f"speed_{common.device_slug()}"
                        + (f"_{args.tag}" if args.tag else ""))
    payload = {"machine": machine, "settings": settings,
               "workloads": descriptions, "rows": rows, "targets": checks,
               "notes": notes}
    common.write_results(stem, payload, report)
    if not args.no_plot and rows:
        plot_ratios(rows, stem + ".png",
                    f"Step time / base step on {machine['device_kind']}")
        print(f"wrote {stem}.png")
    return payload


if __name__ == "__main__":
    main()

"""Where `sam_optax.sam`'s overhead over a hand-written SAM step comes from.

An ablation on one workload (default W1, the MLP: its GPU step is short, so
every microsecond of host or kernel overhead shows), timed in interleaved
rounds like ``bench_speed.py``:

* ``handwritten``: the minimal two-gradient SAM step (the floor);
* ``handwritten + k scalars``: the same step passing ``k`` extra float32
  scalars in and out, as an optimizer state with ``k`` scalar leaves does
  (every array argument of a jitted call costs host time);
* ``sam_optax.sam``: the library's step;
* ``sam, unguarded norm``: the same with the safe norm's two rescaled sums
  replaced by one plain sum of squares (what the safe norm costs);
* ``sam, variadic norm``: the two sums as one variadic ``lax.reduce`` per
  leaf (the implementation before sibling reductions).

The last two patch ``sam_optax.numerics`` while their step is traced, and only
then: they measure alternatives, they are not options of the library.

Run: ``python benchmarks/bench_overhead.py``; writes
``benchmarks/results/overhead_<device>.{md,json}`` (the measured times are
there, not here).
"""

from __future__ import annotations

import argparse
import contextlib
import os

import common
import jax
import jax.numpy as jnp
import optax

import sam_optax
from sam_optax import numerics


def _one_plain_sum(tree, mask_tree, up, down):
    """One Σ(x·up)², reported for both scales: no overflow guard."""
    del down
    total = sum(jnp.sum(jnp.square(x.astype(up.dtype) * up))
                for x in numerics._selected(tree, mask_tree))
    return total, total


def _variadic_sums(tree, mask_tree, up, down):
    """Both sums from one variadic ``lax.reduce`` per leaf."""
    zero = jnp.zeros([], up.dtype)
    totals = (zero, zero)

    def add(a, b):
        return tuple(x + y for x, y in zip(a, b))

    for x in numerics._selected(tree, mask_tree):
        x = x.astype(up.dtype)
        if x.size:
            totals = add(totals, jax.lax.reduce(
                (jnp.square(x * up), jnp.square(x * down)), (zero, zero), add,
                tuple(range(x.ndim))))
    return totals


@contextlib.contextmanager
def _norm_sums(replacement):
    original = numerics._two_sums_of_squares
    numerics._two_sums_of_squares = replacement or original
    try:
        yield
    finally:
        numerics._two_sums_of_squares = original


def _with_extra_scalars(step, count):
    """``step`` whose optimizer state also carries ``count`` scalars."""

    def wrapped(params, model_state, opt_state, batch):
        base_state, scalars = opt_state
        params, model_state, base_state, loss = step(params, model_state,
                                                     base_state, batch)
        scalars = tuple(s + loss for s in scalars)
        return params, model_state, (base_state, scalars), loss

    return wrapped


def build_rows(workload, base_tx, rho, params, model_state, batch,
               extra_scalars):
    """(name, compiled step, optimizer state) for every row."""
    rows = []
    handwritten = common.handwritten_sam_step(workload, base_tx, rho)
    base_state = base_tx.init(params)
    for count in (0, *extra_scalars):
        name = "handwritten" if count == 0 else f"handwritten + {count} scalars"
        state = (base_state, tuple(jnp.zeros([], jnp.float32)
                                   for _ in range(count)))
        step = _with_extra_scalars(handwritten, count)
        compiled = common.compile_step(step, params, model_state, state, batch,
                                       donate=False)
        rows.append((name, compiled, state))
    tx = sam_optax.sam(base_tx, rho)
    for name, sums in (("sam_optax.sam", None),
                       ("sam, unguarded norm", _one_plain_sum),
                       ("sam, variadic norm", _variadic_sums)):
        state = tx.init(params)
        with _norm_sums(sums):
            compiled = common.compile_step(common.grad_fn_step(workload, tx),
                                           params, model_state, state, batch,
                                           donate=False)
        rows.append((name, compiled, state))
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="mlp",
                        choices=common.WORKLOAD_NAMES)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--out", default=common.RESULTS_DIR)
    args = parser.parse_args(argv)

    machine = common.machine_info()
    print(common.device_line(machine))
    workload = common.make_workload(args.workload)
    key = jax.random.PRNGKey(0)
    params, model_state = workload.init(key)
    batch = workload.batch(key)
    base_tx = optax.sgd(0.01, momentum=0.9)
    rows = build_rows(workload, base_tx, args.rho, params, model_state, batch,
                      extra_scalars=(2, 9))

    def sample(compiled, state):
        # No donation: every call starts from the same inputs.
        return lambda: common.timed(compiled.executable, params, model_state,
                                    state, batch)[0]

    times = common.interleaved_rounds(
        {name: sample(compiled, state) for name, compiled, state in rows},
        rounds=args.rounds, warmup=args.warmup)

    results = []
    for name, compiled, _ in rows:
        ratio, q25, q75 = common.paired_ratio(times[name], times["handwritten"])
        results.append({"config": name, **common.summarize(times[name]),
                        "x_handwritten": ratio, "x_handwritten_q25": q25,
                        "x_handwritten_q75": q75, "flops": compiled.flops,
                        "temp_bytes": compiled.temp_bytes})

    lines = [
        "# Where SAM's overhead over a hand-written step comes from", "",
        common.device_line(machine), "",
        f"Workload: {workload.description}; base `sgd(0.01, momentum=0.9)`, "
        f"ρ = {args.rho}; {args.rounds} interleaved rounds (shuffled order), "
        "no buffer donation. Ratios are medians of per-round ratios "
        "[quartiles].",
        "Reproduce: `python benchmarks/bench_overhead.py"
        + (f" --workload {args.workload}" if args.workload != "mlp" else "")
        + "`.", "",
        "| config | ms/step [q25–q75] | × hand-written | GFLOPs |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['config']} | {r['median_ms']:.3f} "
            f"[{r['q25_ms']:.3f}–{r['q75_ms']:.3f}] | {r['x_handwritten']:.3f} "
            f"[{r['x_handwritten_q25']:.3f}–{r['x_handwritten_q75']:.3f}] | "
            f"{r['flops'] / 1e9:.3f} |")
    slug = common.device_slug()
    suffix = "" if args.workload == "mlp" else f"_{args.workload}"
    payload = {"machine": machine, "settings": vars(args), "rows": results}
    common.write_results(os.path.join(args.out, f"overhead_{slug}{suffix}"),
                         payload, "\n".join(lines))
    return payload


if __name__ == "__main__":
    main()

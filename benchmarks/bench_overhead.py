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

With ``--candidates``, the rows that isolate each candidate for the rest of
the gap, by removing it alone and then all together:

* ``sam, no ε guard``: ε = ρ·(g·pre)·post without the select that zeroes ε
  when g has a non-finite entry (``numerics.normalize``);
* ``sam, no ρ clamp``: ρ as given, not ``where(ρ > 0, ρ, 0)``
  (``core.current_rho``);
* ``sam, no norm barrier``: the safe norm's two sums without the per-leaf
  ``optimization_barrier`` (XLA may then fold (x·c)² into x²·c²);
* ``sam, no diagnostics``: constant diagnostics, so none is computed and
  nothing but constants is packed into the state's ``scalars``;
* ``sam, all four removed``, and the same with the one-sum norm;
* ``sam, one-pass norm (cond fallback)``: a proposal for XLA:CPU, which
  does not fuse the safe norm's two sums (two reads of g): one plain Σx²,
  and the rescaled sums under ``lax.cond`` only when it is out of range.

Each table row also gives XLA's FLOPs and bytes accessed per step over the
hand-written step's, per parameter (noise-free: where the extra passes are).

The ablations patch ``sam_optax`` while their step is traced, and only then:
they measure alternatives, they are not options of the library.

Run: ``python benchmarks/bench_overhead.py [--candidates]``; writes
``benchmarks/results/overhead_<device>[_candidates].{md,json}`` (the
measured times are there, not here).
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
from sam_optax import core, numerics


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
def _patched(*replacements):
    """``(module, name, value)``: set while the block runs, then restored;
    a value of ``None`` keeps the original."""
    originals = [(module, name, getattr(module, name))
                 for module, name, _ in replacements]
    for module, name, value in replacements:
        if value is not None:
            setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in originals:
            setattr(module, name, value)


def _sums_without_barrier(tree, mask_tree, up, down):
    """The safe norm's two sums, without the per-leaf barrier."""
    up_total = down_total = jnp.zeros([], up.dtype)
    for x in numerics._selected(tree, mask_tree):
        x = x.astype(up.dtype)
        up_total = up_total + jnp.sum(jnp.square(x * up))
        down_total = down_total + jnp.sum(jnp.square(x * down))
    return up_total, down_total


def _normalize_unguarded(tree, mask=None, scale=None):
    """``numerics.normalize`` without the select on non-finite entries:
    ε = (x·pre)·post (post is already 0 where the norm is unusable)."""
    factors = numerics.norm_factors(tree, mask)
    post = factors.post
    if scale is not None:
        post = post * jnp.asarray(scale).astype(post.dtype)
    direction = jax.tree.map(
        lambda x: (numerics.as_compute(x) * factors.pre) * post, tree)
    return numerics.Normalized(direction, factors.norm, factors.usable)


def _rho_unclamped(rho, count):
    return jnp.asarray(rho(count) if callable(rho) else rho, jnp.float32)


_NORM_FACTORS = numerics.norm_factors


def _norm_factors_one_pass(tree, mask=None):
    """One plain Σx² (one pass over the data); the two rescaled sums only
    under ``lax.cond`` when Σx² is outside [2⁻⁶⁰, 2¹⁰⁰] (‖x‖ outside
    ~1e-9..1e15, zero or non-finite), where they give the same factors as
    ``numerics.norm_factors``. A CPU-only option: on a GPU the predicate
    of a ``lax.cond`` is read back to the host."""
    plain = numerics.sum_of_squares(tree, mask)
    in_range = (plain >= 2.0 ** -60) & (plain <= 2.0 ** 100)

    def fast():
        norm = jnp.sqrt(plain)
        one = jnp.ones([], plain.dtype)
        return numerics.NormFactors(norm, one, 1.0 / norm,
                                    jnp.ones([], jnp.bool_))

    return jax.lax.cond(in_range, fast, lambda: _NORM_FACTORS(tree, mask))


def _no_diagnostics(*args, **kwargs):
    del args, kwargs
    return core.zero_diagnostics()._replace(perturbed=jnp.ones([], jnp.bool_))


NO_GUARD = (numerics, "normalize", _normalize_unguarded)
NO_CLAMP = (core, "current_rho", _rho_unclamped)
NO_BARRIER = (numerics, "_two_sums_of_squares", _sums_without_barrier)
NO_DIAGNOSTICS = (core, "paid_diagnostics", _no_diagnostics)
CANDIDATES = (
    ("sam, no ε guard", (NO_GUARD,)),
    ("sam, no ρ clamp", (NO_CLAMP,)),
    ("sam, no norm barrier", (NO_BARRIER,)),
    ("sam, no diagnostics", (NO_DIAGNOSTICS,)),
    ("sam, all four removed", (NO_GUARD, NO_CLAMP, NO_BARRIER,
                               NO_DIAGNOSTICS)),
    ("sam, all four removed, one-sum norm",
     (NO_GUARD, NO_CLAMP, NO_DIAGNOSTICS,
      (numerics, "_two_sums_of_squares", _one_plain_sum))),
    ("sam, one-pass norm (cond fallback)",
     ((numerics, "norm_factors", _norm_factors_one_pass),)),
)


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
               extra_scalars, candidates=()):
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
    patches = [("sam_optax.sam", ()),
               ("sam, unguarded norm",
                ((numerics, "_two_sums_of_squares", _one_plain_sum),)),
               ("sam, variadic norm",
                ((numerics, "_two_sums_of_squares", _variadic_sums),)),
               *candidates]
    for name, replacements in patches:
        state = tx.init(params)
        with _patched(*replacements):
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
    parser.add_argument("--candidates", action="store_true",
                        help="also the rows removing each candidate (ε "
                        "guard, ρ clamp, norm barrier, diagnostics)")
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
                      extra_scalars=(2, 9),
                      candidates=CANDIDATES if args.candidates else ())
    n_params = sum(x.size for x in jax.tree.leaves(params))

    def sample(compiled, state):
        # No donation: every call starts from the same inputs.
        return lambda: common.timed(compiled.executable, params, model_state,
                                    state, batch)[0]

    times = common.interleaved_rounds(
        {name: sample(compiled, state) for name, compiled, state in rows},
        rounds=args.rounds, warmup=args.warmup)

    results = []
    hand = rows[0][1]
    for name, compiled, _ in rows:
        ratio, q25, q75 = common.paired_ratio(times[name], times["handwritten"])
        results.append({"config": name, **common.summarize(times[name]),
                        "x_handwritten": ratio, "x_handwritten_q25": q25,
                        "x_handwritten_q75": q75, "flops": compiled.flops,
                        "bytes_accessed": compiled.bytes_accessed,
                        "extra_flops_per_param":
                            (compiled.flops - hand.flops) / n_params,
                        "extra_bytes_per_param":
                            (compiled.bytes_accessed - hand.bytes_accessed)
                            / n_params,
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
        + (" --candidates" if args.candidates else "")
        + (f" --rounds {args.rounds}" if args.rounds != 200 else "")
        + "`. Load average (1/5/15 min) at the end: "
        + " ".join(f"{x:.2f}" for x in os.getloadavg()) + ".",
        f"Extra FLOPs and bytes per parameter: XLA's `cost_analysis()` of "
        f"the step minus the hand-written step's, over the {n_params:,} "
        "parameters (noise-free; for a step with `lax.cond` it counts both "
        "branches).", "",
        "| config | ms/step [q25–q75] | × hand-written | GFLOPs | "
        "extra FLOPs / param | extra bytes / param |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['config']} | {r['median_ms']:.3f} "
            f"[{r['q25_ms']:.3f}–{r['q75_ms']:.3f}] | {r['x_handwritten']:.3f} "
            f"[{r['x_handwritten_q25']:.3f}–{r['x_handwritten_q75']:.3f}] | "
            f"{r['flops'] / 1e9:.4f} | {r['extra_flops_per_param']:+.2f} | "
            f"{r['extra_bytes_per_param']:+.2f} |")
    slug = common.device_slug()
    suffix = ("" if args.workload == "mlp" else f"_{args.workload}") + (
        "_candidates" if args.candidates else "")
    payload = {"machine": machine, "settings": vars(args), "rows": results}
    common.write_results(os.path.join(args.out, f"overhead_{slug}{suffix}"),
                         payload, "\n".join(lines))
    return payload


if __name__ == "__main__":
    main()

"""Compiled memory of one donated step: every constructor against a
hand-written step of the same method.

For each public constructor of ``sam_optax`` the step
``step(params, opt_state, batch) -> (params, opt_state)`` is compiled with
``jax.jit(step, donate_argnums=(0, 1))`` on ``jax.ShapeDtypeStruct`` inputs
(nothing is allocated), and its memory is read from XLA's
``memory_analysis()``:

    memory = argument + output + temp - alias   (bytes)

expressed in **P**, one parameter-sized float32 buffer. The same is done for
a hand-written step of the *same method* (plain ``jax.numpy``, the same base
optimizer, and only the state the method needs: LookSAM's stored direction,
Friendly-SAM's EMA, MSAM's ε, ...; ``common.methods``, shared with
``bench_speed.py``, which times the same pairs). The difference is what the
library costs in memory over writing the method by hand; the target is
+0.1 P at most.

These figures come from the compiler, not from a clock: they are exact and
the same on every run of the same JAX version. Compiling needs no
accelerator and no memory for the model.

Run: ``python benchmarks/bench_memory.py`` (a 50 M-parameter MLP: 46
compilations, 1-2 min on a CPU); writes
``benchmarks/results/memory_<device>.{md,json}``.
``tests/test_memory.py`` asserts the same bound on a 3 M-parameter MLP.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import common
import jax
import jax.numpy as jnp
import optax

PyTree = Any
Step = Callable[[PyTree, PyTree, PyTree], tuple[PyTree, PyTree]]

#: 2048-4096-4096-4096-2048: 50.3 M parameters, P = 192 MiB.
LARGE_WIDTHS = (2048, 4096, 4096, 4096, 2048)
#: 512-1024-1024-1024-512: 3.1 M parameters, P = 12 MiB (the test's size).
SMALL_WIDTHS = (512, 1024, 1024, 1024, 512)
#: A small batch: activations stay far below P, so P is what shows.
BATCH = 8
#: The bound asserted by tests/test_memory.py: library - hand-written <= this.
TARGET_P = 0.1

LEARNING_RATE = 0.01
BASE = optax.sgd(LEARNING_RATE, momentum=0.9)


# --------------------------------------------------------------------------
# The model: an MLP in plain jax.numpy, squared error on a synthetic batch.


def mlp_params(widths: Sequence[int]) -> dict[str, dict[str, Any]]:
    """The MLP's parameters as ``jax.ShapeDtypeStruct`` (nothing allocated)."""
    return {f"layer{i}": {
        "w": jax.ShapeDtypeStruct((fan_in, fan_out), jnp.float32),
        "b": jax.ShapeDtypeStruct((fan_out,), jnp.float32)}
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:]))}


def mlp_batch(widths: Sequence[int], batch: int = BATCH) -> tuple:
    """An abstract ``(inputs, targets)`` batch."""
    return (jax.ShapeDtypeStruct((batch, widths[0]), jnp.float32),
            jax.ShapeDtypeStruct((batch, widths[-1]), jnp.float32))


def loss(params: PyTree, batch: tuple) -> jax.Array:
    x, y = batch
    layers = [params[f"layer{i}"] for i in range(len(params))]
    for i, layer in enumerate(layers):
        x = x @ layer["w"] + layer["b"]
        if i < len(layers) - 1:
            x = jax.nn.relu(x)
    return jnp.mean(jnp.square(x - y))


def parameter_bytes(params: PyTree) -> int:
    """P: the bytes of one float32 buffer shaped like the parameters."""
    return 4 * sum(math.prod(x.shape) for x in jax.tree.leaves(params))


# --------------------------------------------------------------------------
# The steps: ``step(params, opt_state, batch) -> (params, opt_state)``.


def _grad(params, batch):
    return jax.grad(loss)(params, batch)


def library_step(tx: optax.GradientTransformation) -> tuple[Callable, Step]:
    """The step a user writes with ``tx`` (``grad_fn`` for the second
    gradient; MSAM ignores it)."""
    def step(params, opt_state, batch):
        grads = _grad(params, batch)
        updates, opt_state = tx.update(
            grads, opt_state, params, grad_fn=lambda p: _grad(p, batch))
        return optax.apply_updates(params, updates), opt_state

    return tx.init, step


def hand_step(hand: common.HandMethod) -> tuple[Callable, Step]:
    """A hand-written method's step (a schedule decides inside the program,
    with ``lax.cond``, as the library's default step does)."""
    def step(params, state, batch):
        return hand.update(_grad(params, batch), state, params,
                           lambda p: _grad(p, batch))

    return hand.init, step


def hand_msam(rho: float = 0.3) -> tuple[Callable, Step]:
    """The hand-written MSAM step (``tests/test_memory.py`` counts its
    FLOPs)."""
    return hand_step(common.hand_msam(BASE, rho))


class Method(NamedTuple):
    """A row: the constructor's call and its hand-written counterpart."""

    name: str
    library: Callable[[], optax.GradientTransformation]
    hand: Callable[[], tuple[Callable, Step]]


# The hand-written methods (plain jax.numpy, only the state each method
# needs: the floor) are shared with bench_speed.py: benchmarks/common.py.
METHODS = tuple(
    Method(m.name, m.library, lambda m=m: hand_step(m.hand()))
    for m in common.methods(BASE, learning_rate=LEARNING_RATE))


# --------------------------------------------------------------------------
# Measurement.


class Memory(NamedTuple):
    """``memory_analysis()`` of one compiled, donated step, in bytes."""

    argument: int
    output: int
    temp: int
    alias: int

    @property
    def total(self) -> int:
        """What the step holds at its peak: its arguments and outputs (those
        the donated arguments become are counted once) and its temporaries."""
        return self.argument + self.output + self.temp - self.alias


def donated_memory(init: Callable, step: Step, params: PyTree,
                   batch: PyTree) -> Memory:
    """Compile ``step`` with params and state donated; nothing is allocated
    (``init`` is only traced, for the state's shapes)."""
    state = jax.eval_shape(init, params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, state, batch).compile()
    memory = compiled.memory_analysis()
    return Memory(int(memory.argument_size_in_bytes),
                  int(memory.output_size_in_bytes),
                  int(memory.temp_size_in_bytes),
                  int(memory.alias_size_in_bytes))


def measure(method: Method, widths: Sequence[int]) -> dict[str, Any]:
    """One row: the library's and the hand-written step's memory, in P."""
    params, batch = mlp_params(widths), mlp_batch(widths)
    p_bytes = parameter_bytes(params)
    library = donated_memory(*library_step(method.library()), params, batch)
    hand = donated_memory(*method.hand(), params, batch)
    return {
        "method": method.name,
        "library_P": library.total / p_bytes,
        "handwritten_P": hand.total / p_bytes,
        "difference_P": (library.total - hand.total) / p_bytes,
        "library_temp_P": library.temp / p_bytes,
        "handwritten_temp_P": hand.temp / p_bytes,
        "library_bytes": library._asdict(),
        "handwritten_bytes": hand._asdict(),
    }


def report(rows: list[dict[str, Any]], machine: dict[str, Any],
           widths: Sequence[int]) -> str:
    params = mlp_params(widths)
    n = parameter_bytes(params) // 4
    p_mib = parameter_bytes(params) / 2**20
    lines = [
        "# Memory of one donated step: library against hand-written",
        "",
        common.device_line(machine),
        "",
        f"Model: MLP {'-'.join(map(str, widths))} ({n / 1e6:.1f} M "
        f"parameters), batch {BATCH}; base `sgd({LEARNING_RATE}, "
        f"momentum=0.9)`. **P** = one parameter-sized float32 buffer "
        f"({p_mib:.0f} MiB). Memory = argument + output + temp − alias bytes "
        "of `jax.jit(step, donate_argnums=(0, 1)).lower(...).compile()"
        ".memory_analysis()` (params and optimizer state donated; nothing "
        "allocated). The hand-written step is the same method in plain "
        "`jax.numpy` with only the state it needs. Target: difference ≤ "
        f"+{TARGET_P} P.",
        "Reproduce: `python benchmarks/bench_memory.py`.",
        "",
        "| method | library (P) | hand-written (P) | difference (P) "
        "| temp: library / hand-written (P) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['library_P']:.3f} | "
            f"{row['handwritten_P']:.3f} | {row['difference_P']:+.3f} | "
            f"{row['library_temp_P']:.3f} / {row['handwritten_temp_P']:.3f} |")
    worst = max(rows, key=lambda r: r["difference_P"])
    above = [r["method"] for r in rows if r["difference_P"] > TARGET_P]
    lines += [
        "",
        f"Largest difference: {worst['method']} {worst['difference_P']:+.3f} "
        f"P. Target (≤ +{TARGET_P} P): "
        + (f"not met by {', '.join(above)}." if above
           else "met by every method."),
        "A negative difference means the library's step is the smaller one: "
        "XLA places the same method's buffers differently (random_sam: its "
        "Gaussian draws).",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default=",".join(map(str, LARGE_WIDTHS)),
                        help="MLP layer widths (default: the 50 M model)")
    parser.add_argument("--methods", default="",
                        help="comma-separated subset of: "
                        + ", ".join(m.name for m in METHODS))
    parser.add_argument("--out", default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    widths = tuple(int(w) for w in args.widths.split(","))
    wanted = set(filter(None, args.methods.split(",")))
    unknown = wanted - {m.name for m in METHODS}
    if unknown:
        parser.error(f"unknown --methods {sorted(unknown)}")
    rows = []
    for method in METHODS:
        if wanted and method.name not in wanted:
            continue
        rows.append(measure(method, widths))
        print(f"{method.name}: {rows[-1]['difference_P']:+.3f} P", flush=True)
    machine = common.machine_info()
    payload = {"machine": machine, "widths": list(widths), "batch": BATCH,
               "parameters": parameter_bytes(mlp_params(widths)) // 4,
               "target_P": TARGET_P, "rows": rows}
    common.write_results(os.path.join(args.out, f"memory_{common.device_slug()}"),
                         payload, report(rows, machine, widths))
    return payload


if __name__ == "__main__":
    main()

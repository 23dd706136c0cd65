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
Friendly-SAM's EMA, MSAM's ε, ...). The difference is what the library costs
in memory over writing the method by hand; the target is +0.1 P at most.

These figures come from the compiler, not from a clock: they are exact and
the same on every run of the same JAX version. Compiling needs no
accelerator and no memory for the model.

Run: ``python benchmarks/bench_memory.py`` (a 50 M-parameter MLP: 34
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

import sam_optax

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
# Hand-written steps: the minimal JAX program of each method.
#
# Each returns ``(init, step)``: ``init(params) -> state`` and
# ``step(params, state, batch) -> (params, state)``. Norms are plain global L2
# norms (no range guard, no diagnostics): the floor the library is held to.


def _grad(params, batch):
    return jax.grad(loss)(params, batch)


def _norm(tree):
    return optax.tree.norm(tree)


def _scale(tree, factor):
    return jax.tree.map(lambda x: factor * x, tree)


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a),
                                              jax.tree.leaves(b)))


def _unit(tree, radius):
    """``radius · tree / ‖tree‖``."""
    return _scale(tree, radius / _norm(tree))


def _apply(params, base_state, grads):
    updates, base_state = BASE.update(grads, base_state, params)
    return optax.apply_updates(params, updates), base_state


def _keys(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten(list(jax.random.split(key, len(leaves))))


def _centralize(tree):
    return jax.tree.map(
        lambda g: g - jnp.mean(g, axis=tuple(range(g.ndim - 1)), keepdims=True)
        if g.ndim >= 2 else g, tree)


def _ascent_step(epsilon_fn, *, extra_init=None):
    """SAM with ``ε = epsilon_fn(g, params, extra) -> (ε, extra)``; ``extra``
    is the ascent's own state (``None`` when it needs none)."""
    def init(params):
        extra = None if extra_init is None else extra_init(params)
        return BASE.init(params), extra

    def step(params, state, batch):
        base_state, extra = state
        grads = _grad(params, batch)
        epsilon, extra = epsilon_fn(grads, params, extra)
        sam_grads = _grad(_add(params, epsilon), batch)
        params, base_state = _apply(params, base_state, sam_grads)
        return params, (base_state, extra)

    return init, step


def hand_sam(rho=0.05):
    return _ascent_step(lambda g, w, extra: (_unit(g, rho), extra))


def hand_sam_linf(rho=0.05):
    return _ascent_step(
        lambda g, w, extra: (_scale(jax.tree.map(jnp.sign, g), rho), extra))


def hand_asam(rho=0.5, eta=0.01):
    def epsilon(g, w, extra):
        t = jax.tree.map(lambda x: jnp.abs(x) + eta, w)
        tg = jax.tree.map(jnp.multiply, t, g)
        return jax.tree.map(jnp.multiply, t, _unit(tg, rho)), extra
    return _ascent_step(epsilon)


def hand_fisher_sam(rho=0.1, eta=1.0):
    def epsilon(g, w, extra):
        s = jax.tree.map(lambda x: jax.lax.rsqrt(1.0 + eta * x * x), g)
        sg = jax.tree.map(jnp.multiply, s, g)
        return jax.tree.map(jnp.multiply, s, _unit(sg, rho)), extra
    return _ascent_step(epsilon)


def _count_and_ema(params):
    """State ``(count, ema)``: the count says whether this is the first step,
    whose EMA is seeded with g."""
    return jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params)


def hand_friendly_sam(rho=0.05, sigma=1.0, lmbda=0.9):
    def epsilon(g, w, extra):
        count, m = extra
        first = count == 0
        v = jax.tree.map(lambda x, y: jnp.where(first, x, x - sigma * y), g, m)
        m = jax.tree.map(
            lambda x, y: jnp.where(first, x, lmbda * y + (1 - lmbda) * x), g, m)
        return _unit(v, rho), (count + 1, m)
    return _ascent_step(epsilon, extra_init=_count_and_ema)


def hand_vasso(rho=0.05, theta=0.4):
    def epsilon(g, w, extra):
        count, d = extra
        d = jax.tree.map(
            lambda x, y: jnp.where(count == 0, x, (1 - theta) * y + theta * x),
            g, d)
        return _unit(d, rho), (count + 1, d)
    return _ascent_step(epsilon, extra_init=_count_and_ema)


def hand_random_sam(rho=0.05, seed=0):
    def epsilon(g, w, key):
        key, draw = jax.random.split(key)
        z = jax.tree.map(lambda k, x: jax.random.normal(k, x.shape, x.dtype),
                         _keys(draw, g), g)
        return _unit(z, rho), key
    return _ascent_step(epsilon,
                        extra_init=lambda params: jax.random.PRNGKey(seed))


def hand_esam(rho=0.05, beta=0.6, seed=0):
    def epsilon(g, w, key):
        key, draw = jax.random.split(key)
        unit = _unit(g, rho / beta)
        keep = jax.tree.map(lambda k, x: jax.random.bernoulli(k, beta, x.shape),
                            _keys(draw, g), g)
        return jax.tree.map(lambda e, m: jnp.where(m, e, 0.0), unit, keep), key
    return _ascent_step(epsilon,
                        extra_init=lambda params: jax.random.PRNGKey(seed))


def hand_gcsam(rho=0.05):
    def init(params):
        return BASE.init(params)

    def step(params, base_state, batch):
        grads = _grad(params, batch)
        epsilon = _unit(_centralize(grads), rho)
        sam_grads = _centralize(_grad(_add(params, epsilon), batch))
        return _apply(params, base_state, sam_grads)

    return init, step


def hand_multistep_sam(rho=0.05, steps=2):
    alpha = 1.0 / steps

    def init(params):
        return BASE.init(params)

    def step(params, base_state, batch):
        epsilon = _unit(_grad(params, batch), rho)
        for _ in range(steps - 1):
            epsilon = _add(epsilon, _unit(_grad(_add(params, epsilon), batch),
                                          alpha * rho))
            epsilon = _scale(epsilon, jnp.minimum(1.0, rho / _norm(epsilon)))
        sam_grads = _grad(_add(params, epsilon), batch)
        return _apply(params, base_state, sam_grads)

    return init, step


def _sam_grads(params, grads, batch, rho=0.05):
    return _grad(_add(params, _unit(grads, rho)), batch)


def _descent_step(descent_fn):
    """SAM's ascent; ``base_tx`` receives ``descent_fn(g, g_sam)``."""
    def init(params):
        return BASE.init(params)

    def step(params, base_state, batch):
        grads = _grad(params, batch)
        sam_grads = _sam_grads(params, grads, batch)
        return _apply(params, base_state, descent_fn(grads, sam_grads))

    return init, step


def hand_gsam(alpha=0.1):
    def descent(g, g_sam):
        unit = _unit(g_sam, 1.0)
        along = _vdot(g, unit)
        return jax.tree.map(
            lambda s, x, u: s - alpha * (x - along * u), g_sam, g, unit)
    return _descent_step(descent)


def hand_wsam(gamma=0.9):
    weight = gamma / (1 - gamma)
    return _descent_step(lambda g, g_sam: jax.tree.map(
        lambda x, s: (1 - weight) * x + weight * s, g, g_sam))


def hand_wsam_decoupled(rho=0.05, gamma=0.9, learning_rate=LEARNING_RATE):
    weight = gamma / (1 - gamma)

    def init(params):
        return BASE.init(params)

    def step(params, base_state, batch):
        grads = _grad(params, batch)
        sam_grads = _sam_grads(params, grads, batch, rho)
        updates, base_state = BASE.update(grads, base_state, params)
        updates = jax.tree.map(
            lambda u, s, g: u - learning_rate * weight * (s - g),
            updates, sam_grads, grads)
        return optax.apply_updates(params, updates), base_state

    return init, step


def _every_k(k, paid, skipped, extra_init):
    """A SAM step at steps 0, k, 2k, ... (``lax.cond``, like the library):
    ``paid``/``skipped(params, grads, extra, batch) -> (grads_for_base,
    extra)``."""
    def init(params):
        return BASE.init(params), jnp.zeros([], jnp.int32), extra_init(params)

    def step(params, state, batch):
        base_state, count, extra = state
        grads = _grad(params, batch)
        descent, extra = jax.lax.cond(
            count % k == 0, lambda e: paid(params, grads, e, batch),
            lambda e: skipped(params, grads, e, batch), extra)
        params, base_state = _apply(params, base_state, descent)
        return params, (base_state, count + 1, extra)

    return init, step


def hand_every_k_sam(k=5):
    return _every_k(
        k, lambda w, g, e, batch: (_sam_grads(w, g, batch), e),
        lambda w, g, e, batch: (g, e), lambda params: ())


def hand_looksam(k=5, alpha=0.7):
    def paid(w, g, direction, batch):
        sam_grads = _sam_grads(w, g, batch)
        unit_g = _unit(g, 1.0)
        along = _vdot(sam_grads, unit_g)
        orthogonal = jax.tree.map(lambda s, u: s - along * u, sam_grads,
                                  unit_g)
        return sam_grads, _unit(orthogonal, 1.0)

    def skipped(w, g, direction, batch):
        scale = alpha * _norm(g)
        return jax.tree.map(lambda x, d: x + scale * d, g, direction), direction

    return _every_k(k, paid, skipped,
                    lambda params: jax.tree.map(jnp.zeros_like, params))


def hand_ae_sam(c=0.0, delta=0.9):
    def init(params):
        zero = jnp.zeros([], jnp.float32)
        return BASE.init(params), (zero, zero)

    def step(params, state, batch):
        base_state, (mean, variance) = state
        grads = _grad(params, batch)
        squared = _vdot(grads, grads)
        mean = delta * mean + (1 - delta) * squared
        variance = delta * variance + (1 - delta) * jnp.square(squared - mean)
        descent = jax.lax.cond(
            squared >= mean + c * jnp.sqrt(variance),
            lambda: _sam_grads(params, grads, batch), lambda: grads)
        params, base_state = _apply(params, base_state, descent)
        return params, (base_state, (mean, variance))

    return init, step


def hand_msam(rho=0.3):
    """MSAM: the params carry ε; one gradient, at the perturbed point."""
    def init(params):
        return BASE.init(params), jax.tree.map(jnp.zeros_like, params)

    def step(params, state, batch):
        base_state, epsilon = state
        grads = _grad(params, batch)
        clean = jax.tree.map(jnp.subtract, params, epsilon)
        updates, base_state = BASE.update(grads, base_state, clean)
        new_epsilon = _unit(updates, rho)
        params = jax.tree.map(lambda w, u, e: w + u + e, clean, updates,
                              new_epsilon)
        return params, (base_state, new_epsilon)

    return init, step


# --------------------------------------------------------------------------
# The library's steps and the table of methods.


def library_step(tx: optax.GradientTransformation) -> tuple[Callable, Step]:
    """The step a user writes with ``tx`` (``grad_fn`` for the second
    gradient; MSAM ignores it)."""
    def step(params, opt_state, batch):
        grads = _grad(params, batch)
        updates, opt_state = tx.update(
            grads, opt_state, params, grad_fn=lambda p: _grad(p, batch))
        return optax.apply_updates(params, updates), opt_state

    return tx.init, step


class Method(NamedTuple):
    """A row: the constructor's call and its hand-written counterpart."""

    name: str
    library: Callable[[], optax.GradientTransformation]
    hand: Callable[[], tuple[Callable, Step]]


METHODS = (
    Method("sam", lambda: sam_optax.sam(BASE, 0.05), hand_sam),
    Method("sam_linf", lambda: sam_optax.sam(BASE, 0.05, norm="linf"),
           hand_sam_linf),
    Method("asam", lambda: sam_optax.asam(BASE, 0.5, eta=0.01), hand_asam),
    Method("fisher_sam", lambda: sam_optax.fisher_sam(BASE, 0.1, eta=1.0),
           hand_fisher_sam),
    Method("friendly_sam", lambda: sam_optax.friendly_sam(BASE, 0.05),
           hand_friendly_sam),
    Method("vasso", lambda: sam_optax.vasso(BASE, 0.05, theta=0.4),
           hand_vasso),
    Method("random_sam", lambda: sam_optax.random_sam(BASE, 0.05),
           hand_random_sam),
    Method("multistep_sam", lambda: sam_optax.multistep_sam(BASE, 0.05,
                                                            steps=2),
           hand_multistep_sam),
    Method("esam", lambda: sam_optax.esam(BASE, 0.05, beta=0.6), hand_esam),
    Method("gsam", lambda: sam_optax.gsam(BASE, 0.05, alpha=0.1), hand_gsam),
    Method("gcsam", lambda: sam_optax.gcsam(BASE, 0.05), hand_gcsam),
    Method("wsam", lambda: sam_optax.wsam(BASE, 0.05, gamma=0.9), hand_wsam),
    Method("wsam_decoupled", lambda: sam_optax.wsam(
        BASE, 0.05, gamma=0.9, decoupled=True, learning_rate=LEARNING_RATE),
        hand_wsam_decoupled),
    Method("looksam", lambda: sam_optax.looksam(BASE, 0.05, k=5, alpha=0.7),
           hand_looksam),
    Method("every_k_sam", lambda: sam_optax.every_k_sam(BASE, 0.05, k=5),
           hand_every_k_sam),
    Method("ae_sam", lambda: sam_optax.ae_sam(BASE, 0.05, c=0.0, delta=0.9),
           hand_ae_sam),
    Method("msam", lambda: sam_optax.msam(BASE, 0.3), hand_msam),
)


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

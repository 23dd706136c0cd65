"""Per-device memory of a SAM step with parameters and optimizer state
sharded over 8 devices (FSDP-style), against one device.

The model is ``bench_memory``'s MLP (2048-4096-4096-4096-2048, 50 M
parameters, batch 8). Each weight is split over the mesh axis ``fsdp`` along
one dimension, fan-out and fan-in in turn, and each bias along its only one,
so that every device holds 1/n of the model. The optimizer state gets the
sharding of the parameter it belongs to (``optax.tree_map_params``), and the
step is the one a user writes: ``jax.jit(step, in_shardings=...,
out_shardings=..., donate_argnums=(0, 1))``, compiled on sharded
``jax.ShapeDtypeStruct`` inputs (nothing is allocated) and measured with
``memory_analysis()``, whose figures are per device. For each layout, the
library's ``sam`` and a hand-written SAM step of the same model:

* ``1 device``: unsharded (``bench_memory.donated_memory``);
* ``auto``: ``Auto`` mesh axes, the plain model: XLA partitions it;
* ``explicit``: ``Explicit`` axes (``jax.make_mesh``'s default); the model
  computes on its shards and says where partial products are summed
  (``out_sharding=`` on the matmul that contracts a sharded dimension);
* ``explicit_gathered``: ``Explicit`` axes, each layer's weights all-gathered
  before use (``jax.sharding.reshard(w, P())``, ZeRO-3 style, no
  rematerialisation): the gathered weights stay alive for the backward pass,
  a cost of the model, the same for both steps;
* ``2d_auto``, ``2d_explicit``: a ``('data', 'fsdp')`` = ``(2, n/2)`` mesh,
  batch split over ``data``, parameters over ``fsdp``: 1/(n/2) of the model
  per device.

and, under ``Auto`` axes, m-sharpness through
``sam_optax.parallel.chunked_step`` (one ε per chunk of the batch), whose
chunks each hold their own gradient, ε and perturbed gradient.

Run: ``python benchmarks/bench_fsdp_memory.py`` (on CPU it creates
``--devices`` fake devices; 18 compilations, under a minute); writes
``benchmarks/results/fsdp_memory_<device>.{md,json}``.
``tests/test_fsdp.py`` asserts the 1/n on the 3 M-parameter model.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import bench_memory
import common
import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from sam_optax import parallel

PyTree = Any
Step = Callable[[PyTree, PyTree, PyTree], tuple[PyTree, PyTree]]

#: The mesh axis the parameters are split over, and the batch's on a 2-D mesh.
FSDP, DATA = "fsdp", "data"
RHO = 0.05


# --------------------------------------------------------------------------
# The sharded model.


class Layout(NamedTuple):
    """How the step is laid out over the devices.

    Attributes:
      name: the row's key.
      data_shards: devices the batch is split over (1: replicated batch);
        the parameters are split over the others.
      axis_type: the mesh axes' type (``None``: one device, no mesh).
      gather: the model all-gathers each layer's weights before using them.
    """

    name: str
    data_shards: int
    axis_type: Optional[AxisType]
    gather: bool = False


LAYOUTS = (
    Layout("1 device", 1, None),
    Layout("auto", 1, AxisType.Auto),
    Layout("explicit", 1, AxisType.Explicit),
    Layout("explicit_gathered", 1, AxisType.Explicit, gather=True),
    Layout("2d_auto", 2, AxisType.Auto),
    Layout("2d_explicit", 2, AxisType.Explicit),
)


def make_mesh(layout: Layout, devices: int) -> Optional[jax.sharding.Mesh]:
    """``(fsdp,)`` over ``devices``, or ``(data, fsdp)`` with the layout's
    data shards; ``None`` for one device."""
    if layout.axis_type is None:
        return None
    if layout.data_shards == 1:
        return jax.make_mesh((devices,), (FSDP,), axis_types=(layout.axis_type,))
    return jax.make_mesh((layout.data_shards, devices // layout.data_shards),
                         (DATA, FSDP), axis_types=(layout.axis_type,) * 2)


def param_specs(params: PyTree) -> PyTree:
    """Layer ``i``'s weight split along its fan-out (even ``i``) or fan-in
    (odd ``i``) over ``fsdp``, its bias along its only dimension.

    Consecutive layers then compute on their shards without gathering the
    weights: an even layer's output is split over its units, which the next
    layer contracts with its own split fan-in.
    """
    return {name: {"w": P(None, FSDP) if i % 2 == 0 else P(FSDP, None),
                   "b": P(FSDP)}
            for i, name in enumerate(sorted(params, key=_layer_index))}


def _layer_index(name: str) -> int:
    return int(name.removeprefix("layer"))


def batch_spec(mesh: jax.sharding.Mesh) -> P:
    """The batch split over ``data`` on a 2-D mesh, replicated otherwise."""
    return P(DATA) if DATA in mesh.axis_names else P()


def make_loss(mesh: Optional[jax.sharding.Mesh] = None, *,
              gather: bool = False) -> Callable[[PyTree, tuple], jax.Array]:
    """``bench_memory.loss`` written for the layout of :func:`param_specs`.

    One device or ``Auto`` axes: the plain model (XLA places the sums).
    ``Explicit`` axes: the matmul that contracts the split fan-in says
    where its partial products are summed (``out_sharding=``), and the bias
    added to the summed output is gathered (a vector); with ``gather=True``
    every weight is gathered before use instead.
    """
    explicit = mesh is not None and AxisType.Explicit in mesh.axis_types

    def replicated(x):
        return jax.sharding.reshard(x, NamedSharding(mesh, P())) if explicit else x

    def loss(params, batch):
        x, y = batch
        summed = (NamedSharding(mesh, P(*batch_spec(mesh), None)) if explicit
                  else None)
        n = len(params)
        for i in range(n):
            w, b = params[f"layer{i}"]["w"], params[f"layer{i}"]["b"]
            if gather:
                x = x @ replicated(w) + replicated(b)
            elif i % 2 == 0:
                x = x @ w + b  # out: split over the layer's units
            else:
                x = jnp.matmul(x, w, out_sharding=summed) + replicated(b)
            if i < n - 1:
                x = jax.nn.relu(x)
        return jnp.mean(jnp.square(x - y))

    return loss


def shard_like_params(init: Callable[[PyTree], PyTree], params: PyTree,
                      param_shardings: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
    """The optimizer state's shardings: each parameter-shaped subtree gets
    the parameters' shardings, everything else (counts, ρ, keys) is
    replicated. ``init`` is only traced."""
    return optax.tree_map_params(
        init, lambda _, sharding: sharding, jax.eval_shape(init, params),
        param_shardings, transform_non_params=lambda _: NamedSharding(mesh, P()))


def _placed(tree: PyTree, shardings: PyTree) -> PyTree:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        tree, shardings)


# --------------------------------------------------------------------------
# The two steps.


def library_step(tx: optax.GradientTransformation, loss: Callable
                 ) -> tuple[Callable, Step]:
    """The step a user writes with ``sam_optax``."""
    def step(params, opt_state, batch):
        grads = jax.grad(loss)(params, batch)
        updates, opt_state = tx.update(
            grads, opt_state, params,
            grad_fn=jax.grad(lambda p: loss(p, batch)))
        return optax.apply_updates(params, updates), opt_state

    return tx.init, step


def handwritten_step(loss: Callable, rho: float = RHO) -> tuple[Callable, Step]:
    """SAM in plain JAX: ε = ρ g/‖g‖, g_sam = ∇L(w + ε), the base update."""
    base = bench_memory.BASE

    def step(params, base_state, batch):
        grads = jax.grad(loss)(params, batch)
        scale = rho / optax.tree.norm(grads)
        perturbed = jax.tree.map(lambda w, g: w + scale * g, params, grads)
        updates, base_state = base.update(jax.grad(loss)(perturbed, batch),
                                          base_state, params)
        return optax.apply_updates(params, updates), base_state

    return base.init, step


def chunked_step(chunks: int) -> Callable[[Callable], tuple[Callable, Step]]:
    """m-sharpness: ``sam_optax.parallel.chunked_step`` with the batch in
    ``chunks`` chunks (one ε each), as a ``(params, opt_state)`` step."""
    def method(loss):
        tx = sam_optax.sam(bench_memory.BASE, RHO, axis_name="chunks")
        step = parallel.chunked_step(tx, loss, bench_memory.BATCH // chunks)
        return tx.init, lambda params, state, batch: step(params, state,
                                                          batch)[:2]
    return method


STEPS: dict[str, Callable[[Callable], tuple[Callable, Step]]] = {
    "sam": lambda loss: library_step(sam_optax.sam(bench_memory.BASE, RHO),
                                     loss),
    "hand-written": handwritten_step,
    "sam, 2 chunks": chunked_step(2),
    "sam, 4 chunks": chunked_step(4),
}

#: The steps that do not lower under ``Explicit`` axes in JAX 0.10: the
#: chunks' ``pmean`` over a ``vmap`` axis of an explicitly sharded value
#: (see ``docs/concepts/parallel.md``).
AUTO_ONLY = ("sam, 2 chunks", "sam, 4 chunks")


# --------------------------------------------------------------------------
# Measurement.


def sharded_memory(method: Callable[[Callable], tuple[Callable, Step]],
                   widths: Sequence[int], mesh: jax.sharding.Mesh, *,
                   gather: bool = False) -> bench_memory.Memory:
    """Per-device memory of the donated, jitted step over ``mesh``."""
    params = bench_memory.mlp_params(widths)
    batch = bench_memory.mlp_batch(widths)
    param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s),
                                   param_specs(params))
    batch_shardings = jax.tree.map(
        lambda _: NamedSharding(mesh, batch_spec(mesh)), batch)
    init, step = method(make_loss(mesh, gather=gather))
    params = _placed(params, param_shardings)
    state_shardings = shard_like_params(init, params, param_shardings, mesh)
    state = _placed(jax.eval_shape(init, params), state_shardings)
    compiled = jax.jit(
        step, in_shardings=(param_shardings, state_shardings, batch_shardings),
        out_shardings=(param_shardings, state_shardings),
        donate_argnums=(0, 1)).lower(params, state,
                                     _placed(batch, batch_shardings)).compile()
    memory = compiled.memory_analysis()
    return bench_memory.Memory(int(memory.argument_size_in_bytes),
                               int(memory.output_size_in_bytes),
                               int(memory.temp_size_in_bytes),
                               int(memory.alias_size_in_bytes))


def layout_memory(method: Callable[[Callable], tuple[Callable, Step]],
                  widths: Sequence[int], layout: Layout,
                  devices: int) -> bench_memory.Memory:
    """:func:`sharded_memory` of one layout (one device: unsharded)."""
    mesh = make_mesh(layout, devices)
    if mesh is None:
        return bench_memory.donated_memory(
            *method(make_loss()), bench_memory.mlp_params(widths),
            bench_memory.mlp_batch(widths))
    return sharded_memory(method, widths, mesh, gather=layout.gather)


def measure(widths: Sequence[int], devices: int,
            layouts: Sequence[Layout] = LAYOUTS) -> list[dict[str, Any]]:
    """One row per layout and step, in P and in bytes per device."""
    p_bytes = bench_memory.parameter_bytes(bench_memory.mlp_params(widths))
    rows: list[dict[str, Any]] = []
    single: dict[str, bench_memory.Memory] = {}
    for layout in layouts:
        for name, method in STEPS.items():
            if name in AUTO_ONLY and layout.axis_type is AxisType.Explicit:
                continue
            memory = layout_memory(method, widths, layout, devices)
            if layout.axis_type is None:
                single[name] = memory
            reference = single.get(name)
            used = memory.argument + memory.temp
            rows.append({
                "layout": layout.name,
                "devices": 1 if layout.axis_type is None else devices,
                "param_shards": (1 if layout.axis_type is None
                                 else devices // layout.data_shards),
                "step": name,
                "argument_P": memory.argument / p_bytes,
                "temp_P": memory.temp / p_bytes,
                "argument_plus_temp_P": used / p_bytes,
                "total_P": memory.total / p_bytes,
                "vs_1_device": (used / (reference.argument + reference.temp)
                                if reference else float("nan")),
                "bytes": memory._asdict(),
            })
            print(f"{layout.name:18s} {name:13s} argument+temp "
                  f"{used / p_bytes:.3f} P per device", flush=True)
    return rows


def report(rows: Sequence[dict[str, Any]], machine: dict[str, Any],
           widths: Sequence[int], devices: int) -> str:
    params = bench_memory.mlp_params(widths)
    p_bytes = bench_memory.parameter_bytes(params)
    lines = [
        "# Per-device memory of a sharded (FSDP) SAM step",
        "",
        common.device_line(machine),
        "",
        f"Model: MLP {'-'.join(map(str, widths))} ({p_bytes // 4 / 1e6:.1f} M "
        f"parameters), batch {bench_memory.BATCH}; base "
        f"`sgd({bench_memory.LEARNING_RATE}, momentum=0.9)`, ρ = {RHO}. "
        f"**P** = the whole model as one float32 buffer ({p_bytes / 2**20:.0f}"
        " MiB). Each weight is split over the mesh axis `fsdp` along its "
        "fan-out or fan-in (in turn), each bias along its length; the "
        "optimizer state is sharded like the parameters "
        "(`optax.tree_map_params`). Per-device figures of "
        "`jax.jit(step, in_shardings=..., out_shardings=..., "
        "donate_argnums=(0, 1)).lower(...).compile().memory_analysis()` "
        "on sharded `ShapeDtypeStruct`s (nothing allocated). "
        f"Sharded layouts run on {devices} devices; 'vs 1 device' is "
        "argument + temp against the same step on one device.",
        "Reproduce: `python benchmarks/bench_fsdp_memory.py`.",
        "",
        "| layout | devices (param shards) | step | argument (P) | temp (P) "
        "| argument + temp (P) | vs 1 device |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['devices']} ({r['param_shards']}) | "
            f"{r['step']} | {r['argument_P']:.3f} | {r['temp_P']:.3f} | "
            f"{r['argument_plus_temp_P']:.3f} | {r['vs_1_device']:.3f} |")
    by = {(r["layout"], r["step"]): r for r in rows}
    worst = max(abs(by[(layout, "sam")]["argument_plus_temp_P"]
                    - by[(layout, "hand-written")]["argument_plus_temp_P"])
                for layout, step in by if step == "sam")
    lines += [
        "",
        "The library's step and the hand-written one differ by at most "
        f"{worst:.3f} P per device in every layout: sharded over n devices, "
        "the parameters, the optimizer state, the gradients, ε and the "
        "perturbed gradient take 1/n each; nothing parameter-sized is "
        "replicated.",
    ]
    gathered, computed = (by.get(("explicit_gathered", "sam")),
                          by.get(("explicit", "sam")))
    if gathered is not None and computed is not None:
        lines += [
            "",
            f"`explicit_gathered` has {gathered['temp_P']:.2f} P of temp per "
            f"device against {computed['temp_P']:.2f} P for `explicit`: the "
            "gathered weights of every layer stay alive until the backward "
            "pass. That is the model's cost, the same for both steps; "
            "rematerialise the layers (`jax.checkpoint`) to gather them "
            "again there instead."]
    chunked = [r for r in rows if r["step"] in AUTO_ONLY]
    if chunked:
        lines += [
            "",
            "m-sharpness (`parallel.chunked_step`, one ε per chunk): each "
            "chunk computes its own gradient, ε and perturbed gradient, "
            "which costs about one parameter-sized buffer per chunk, split "
            "like the parameters (temp per device: about chunks × P / param "
            "shards). On "
            "the 2-D mesh XLA puts each chunk on a data shard, so up to one "
            "chunk per data shard costs no more than one. Not measured under "
            "`Explicit` axes, where JAX 0.10 does not lower it."]
    if any(r["layout"].startswith("2d") for r in rows):
        lines += [
            "",
            "On the 2-D mesh each device holds 1/(n/2) of the model, and the "
            "temp adds each data shard's partial gradient, summed over "
            "`data` (as in any data-parallel step)."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=8,
                        help="devices to shard over (fake CPU devices on CPU)")
    parser.add_argument("--widths",
                        default=",".join(map(str, bench_memory.LARGE_WIDTHS)),
                        help="MLP layer widths, each divisible by --devices")
    parser.add_argument("--out", default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    # Before the first device query: only then does the CPU backend take it.
    jax.config.update("jax_num_cpu_devices", args.devices)
    if jax.device_count() < args.devices:
        parser.error(f"{args.devices} devices needed, {jax.device_count()} "
                     "found: run on CPU (JAX_PLATFORMS=cpu) to fake them.")
    widths = tuple(int(w) for w in args.widths.split(","))
    rows = measure(widths, args.devices)
    machine = common.machine_info()
    payload = {"machine": machine, "widths": list(widths),
               "batch": bench_memory.BATCH, "devices": args.devices,
               "parameters": bench_memory.parameter_bytes(
                   bench_memory.mlp_params(widths)) // 4,
               "rows": rows}
    common.write_results(
        os.path.join(args.out, f"fsdp_memory_{common.device_slug()}"),
        payload, report(rows, machine, widths, args.devices))
    return payload


if __name__ == "__main__":
    main()

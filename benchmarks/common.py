"""Workloads, step builders and measurement helpers shared by the benchmarks.

Workloads (synthetic inputs of fixed seed: step time does not depend on data):

* ``mlp``    -- W1, an MLP 784-512-512-10, batch 256;
* ``cnn``    -- W2, a ResNet-style CNN for 32x32x3 inputs (3 stages x 2 basic
  blocks, widths 16/32/64), batch 128, without normalisation;
* ``cnn_bn`` -- W2 with BatchNorm (running statistics are model state, updated
  from the clean forward pass only; the perturbed pass discards them).

Every step built here has the signature
``step(params, model_state, opt_state, batch) -> (params, model_state,
opt_state, loss)`` so that all configurations are timed the same way.

Measurement helpers: :func:`compile_step` (compiled step, FLOPs, memory),
:func:`interleaved_rounds` (the timing loop every benchmark uses),
:func:`paired_ratio` and :func:`summarize` (statistics), :func:`machine_info`
and :func:`device_line` (what ran it), :func:`write_results` (the
``<stem>.json`` and ``<stem>.md`` files in :data:`RESULTS_DIR`).

A script in ``benchmarks/`` imports this module with ``import common``
(``python benchmarks/x.py`` puts the script's folder on ``sys.path``);
``sam_optax`` itself comes from the installed package (``pip install -e``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

PyTree = Any
Step = Callable[..., tuple]
LossFn = Callable[[PyTree, PyTree, PyTree], tuple[jax.Array, PyTree]]

#: Where every benchmark writes its results (``--out`` overrides it).
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --------------------------------------------------------------------------
# Models


class MLP(nn.Module):
    """784-512-512-10 with ReLU."""

    hidden: Sequence[int] = (512, 512)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = True):
        del train
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs and a (projected) shortcut."""

    width: int
    stride: int = 1
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = True):
        def norm(y):
            if not self.batch_norm:
                return y
            return nn.BatchNorm(use_running_average=not train, momentum=0.9)(y)

        # Biases are redundant before BatchNorm; keep them without it.
        conv = lambda w, k, s: nn.Conv(w, (k, k), strides=(s, s),
                                       use_bias=not self.batch_norm)
        residual = x
        y = nn.relu(norm(conv(self.width, 3, self.stride)(x)))
        y = norm(conv(self.width, 3, 1)(y))
        if residual.shape != y.shape:
            residual = norm(conv(self.width, 1, self.stride)(residual))
        return nn.relu(y + residual)


class SmallResNet(nn.Module):
    """3 stages x 2 basic blocks, widths 16/32/64, global pooling, 10 classes."""

    widths: Sequence[int] = (16, 32, 64)
    blocks_per_stage: int = 2
    batch_norm: bool = False
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(self.widths[0], (3, 3), use_bias=not self.batch_norm)(x)
        if self.batch_norm:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        for stage, width in enumerate(self.widths):
            for block in range(self.blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(width, stride, self.batch_norm)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


# --------------------------------------------------------------------------
# Workloads


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model, its loss and a fixed synthetic batch.

    Attributes:
      name: short key (``mlp``, ``cnn``, ``cnn_bn``).
      description: one line for tables.
      init: ``init(key) -> (params, model_state)``; ``model_state`` is ``{}``
        without BatchNorm.
      loss: ``loss(params, model_state, batch) -> (loss, new_model_state)``
        in training mode.
      batch: ``batch(key) -> (inputs, labels)``.
      batch_size: examples per step.
    """

    name: str
    description: str
    init: Callable[[jax.Array], tuple[PyTree, PyTree]]
    loss: LossFn
    batch: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
    batch_size: int


def _flax_workload(name: str, description: str, model: nn.Module,
                   input_shape: tuple[int, ...], batch_size: int,
                   num_classes: int = 10) -> Workload:
    has_state = getattr(model, "batch_norm", False)

    def make_batch(key):
        k_x, k_y = jax.random.split(key)
        inputs = jax.random.normal(k_x, (batch_size, *input_shape), jnp.float32)
        labels = jax.random.randint(k_y, (batch_size,), 0, num_classes)
        return inputs, labels

    def init(key):
        inputs = jnp.zeros((1, *input_shape), jnp.float32)
        variables = model.init(key, inputs, train=True)
        params = variables["params"]
        model_state = {"batch_stats": variables["batch_stats"]} if has_state else {}
        return params, model_state

    def loss(params, model_state, batch):
        inputs, labels = batch
        if has_state:
            logits, new_state = model.apply(
                {"params": params, **model_state}, inputs, train=True,
                mutable=["batch_stats"])
        else:
            logits = model.apply({"params": params}, inputs, train=True)
            new_state = model_state
        value = optax.softmax_cross_entropy_with_integer_labels(
            logits, labels).mean()
        return value, new_state

    return Workload(name, description, init, loss, make_batch, batch_size)


def make_workload(name: str, batch_size: Optional[int] = None) -> Workload:
    """Build ``mlp`` (W1), ``cnn`` (W2) or ``cnn_bn`` (W2 with BatchNorm).

    ``batch_size`` overrides the standard size (256 for W1, 128 for W2), e.g.
    for smoke tests.
    """
    if name == "mlp":
        return mlp_workload(batch_size or 256)
    if name in ("cnn", "cnn_bn"):
        size = batch_size or 128
        batch_norm = name == "cnn_bn"
        label = "with" if batch_norm else "without"
        return _flax_workload(
            name, f"W2 ResNet-style CNN 32x32x3, 16/32/64 x 2 blocks, "
            f"{label} BatchNorm, batch {size}",
            SmallResNet(batch_norm=batch_norm), (32, 32, 3), size)
    raise ValueError(
        f"unknown workload {name!r}; choose from {sorted(WORKLOAD_NAMES)}.")


WORKLOAD_NAMES = ("mlp", "cnn", "cnn_bn")


def mlp_workload(batch_size: int = 256, input_dim: int = 784,
                 hidden: Sequence[int] = (512, 512)) -> Workload:
    """An MLP ``input_dim``-``hidden``-10 with ReLU on a synthetic batch; the
    defaults are W1."""
    dims = "-".join(str(d) for d in (input_dim, *hidden, 10))
    standard = input_dim == 784 and tuple(hidden) == (512, 512)
    return _flax_workload(
        "mlp", f"{'W1 ' if standard else ''}MLP {dims}, batch {batch_size}",
        MLP(hidden=tuple(hidden)), (input_dim,), batch_size)


# --------------------------------------------------------------------------
# Steps: all take and return (params, model_state, opt_state, batch/loss)


def base_step(workload: Workload, tx: optax.GradientTransformation) -> Step:
    """One gradient, one base update: the reference cost."""

    def step(params, model_state, opt_state, batch):
        (loss, model_state), grads = jax.value_and_grad(
            workload.loss, has_aux=True)(params, model_state, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), model_state, opt_state, loss

    return step


def grad_fn_step(workload: Workload, tx: optax.GradientTransformation) -> Step:
    """A step for the ``sam_optax`` contract: ``update(..., grad_fn=...)``.

    The clean forward pass updates the BatchNorm statistics; the perturbed
    pass (inside ``tx.update``) reuses the old ones and its update is dropped.
    """

    def step(params, model_state, opt_state, batch):
        (loss, new_model_state), grads = jax.value_and_grad(
            workload.loss, has_aux=True)(params, model_state, batch)
        grad_fn = jax.grad(lambda p: workload.loss(p, model_state, batch)[0])
        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        return (optax.apply_updates(params, updates), new_model_state,
                opt_state, loss)

    return step


def handwritten_sam_step(workload: Workload, tx: optax.GradientTransformation,
                         rho: float) -> Step:
    """The minimal two-gradient SAM step, written out by hand.

    ε = ρ g / (‖g‖ + 1e-12), g_sam = ∇L(w + ε), then the same base update:
    the floor under any library's cost.
    """

    def step(params, model_state, opt_state, batch):
        (loss, new_model_state), grads = jax.value_and_grad(
            workload.loss, has_aux=True)(params, model_state, batch)
        norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
        scale = rho / (norm + 1e-12)
        perturbed = jax.tree.map(lambda p, g: p + scale * g, params, grads)
        sam_grads = jax.grad(lambda p: workload.loss(p, model_state, batch)[0])(
            perturbed)
        updates, opt_state = tx.update(sam_grads, opt_state, params)
        return (optax.apply_updates(params, updates), new_model_state,
                opt_state, loss)

    return step


def optax_contrib_sam_step(workload: Workload,
                           base_tx: optax.GradientTransformation,
                           rho: float) -> tuple[optax.GradientTransformation, Step]:
    """``optax.contrib.sam`` set up as the plain SAM of the paper.

    Opaque mode with ``sync_period=2`` runs one adversarial step (normalised
    SGD with learning rate ρ, i.e. ε = ρ g/‖g‖) and one outer update per call,
    so one call is one full SAM step, as for the other configurations.
    """
    adversarial = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    tx = optax.contrib.sam(base_tx, adversarial, sync_period=2,
                           opaque_mode=True)

    def step(params, model_state, opt_state, batch):
        (loss, new_model_state), grads = jax.value_and_grad(
            workload.loss, has_aux=True)(params, model_state, batch)
        grad_fn = jax.grad(
            lambda p, _: workload.loss(p, model_state, batch)[0])
        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        return (optax.apply_updates(params, updates), new_model_state,
                opt_state, loss)

    return tx, step


# --------------------------------------------------------------------------
# Measurement


def tree_bytes(tree: PyTree) -> int:
    """Bytes held by the array leaves of a tree (e.g. an optimizer state)."""
    return int(sum(np.asarray(x).nbytes if not hasattr(x, "nbytes") else x.nbytes
                   for x in jax.tree.leaves(tree)))


def _first(analysis: Any) -> Mapping[str, Any]:
    # Older JAX returns a list with one dict per computation.
    if isinstance(analysis, (list, tuple)):
        return analysis[0] if analysis else {}
    return analysis or {}


@dataclasses.dataclass
class Compiled:
    """A compiled step with its static costs.

    Attributes:
      executable: call it like the step (no retracing can happen).
      compile_s: wall time of lowering + XLA compilation.
      flops: XLA's FLOP estimate for one call (``cost_analysis``).
      temp_bytes: XLA's temporary buffer size (``memory_analysis``).
    """

    executable: Callable[..., Any]
    compile_s: float
    flops: float
    temp_bytes: int


def compile_step(step: Step, *args: Any, donate: bool = True) -> Compiled:
    """``jit(step).lower(*args).compile()`` with its cost and memory analysis.

    Args:
      step: the step function.
      *args: example arguments (params, model_state, opt_state, batch).
      donate: donate params, model state and optimizer state, as a training
        loop does; the caller must then never reuse the arguments it passed.
    """
    jitted = jax.jit(step, donate_argnums=(0, 1, 2) if donate else ())
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    cost = _first(compiled.cost_analysis())
    memory = compiled.memory_analysis()
    temp = int(getattr(memory, "temp_size_in_bytes", 0)) if memory else 0
    return Compiled(compiled, compile_s, float(cost.get("flops", float("nan"))),
                    temp)


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """``fn(*args)`` and the seconds it took, waiting for the device
    (``jax.block_until_ready``): JAX dispatches asynchronously."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, out


def interleaved_rounds(samples: Mapping[Hashable, Callable[[], float]], *,
                       rounds: int, warmup: int = 0, seed: int = 0,
                       desc: str = "rounds", progress: bool = True
                       ) -> dict[Hashable, list[float]]:
    """Time several configurations in interleaved rounds: the timing loop.

    ``samples[name]()`` runs one sample of configuration ``name`` and returns
    its seconds per step (see :func:`timed`). Each configuration first runs
    ``warmup`` untimed samples; then each round runs every configuration
    once, in an order shuffled per round (seeded), so that the machine's
    drift (other jobs, clock changes) hits all of them alike and
    :func:`paired_ratio` can cancel it.

    Returns:
      ``{name: [seconds per step of each round]}``.
    """
    for run in samples.values():
        for _ in range(warmup):
            run()
    times: dict[Hashable, list[float]] = {name: [] for name in samples}
    order = list(samples)
    rng = random.Random(seed)
    for _ in tqdm(range(rounds), desc=desc, disable=not progress):
        rng.shuffle(order)
        for name in order:
            times[name].append(samples[name]())
    return times


def paired_ratio(times: Sequence[float], reference: Sequence[float]
                 ) -> tuple[float, float, float]:
    """Median and quartiles of per-round ratios ``times[i] / reference[i]``.

    Configurations are timed in the same rounds, so a ratio within a round
    cancels the machine's drift (other jobs, clock changes) between rounds.
    """
    ratios = np.asarray(times) / np.asarray(reference)
    q25, q50, q75 = np.percentile(ratios, [25, 50, 75])
    return float(q50), float(q25), float(q75)


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and minimum of a list of seconds, in milliseconds."""
    ms = np.asarray(times) * 1e3
    q25, q75 = np.percentile(ms, [25, 75])
    return {"median_ms": float(statistics.median(ms)), "q25_ms": float(q25),
            "q75_ms": float(q75), "min_ms": float(ms.min()),
            "steps": int(ms.size)}


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: device kind, platform, CPU, versions, date."""
    device = jax.devices()[0]
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "date_utc": datetime.datetime.now(datetime.UTC).strftime(
            "%Y-%m-%d %H:%M UTC"),
    }


def device_line(machine: dict[str, Any]) -> str:
    """The "Device: ..." line every results file starts with."""
    return (f"Device: **{machine['device_kind']}** ({machine['platform']}, "
            f"{machine['cpu_count']} CPU cores visible), JAX {machine['jax']}, "
            f"Optax {machine['optax']}, {machine['date_utc']}.")


def device_slug() -> str:
    """A file-name-safe name of the device, e.g. ``cpu`` or ``nvidia-h100``."""
    device = jax.devices()[0]
    kind = device.device_kind if device.platform != "cpu" else "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in kind.lower())
    return "-".join(part for part in slug.split("-") if part)


def write_json(path: str, payload: Any) -> None:
    """``payload`` as indented JSON at ``path`` (folders made as needed)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")


def write_results(stem: str, payload: Any, report: str, *,
                  echo: bool = True) -> None:
    """A benchmark's results: ``<stem>.json`` (the payload, with its
    :func:`machine_info`) and ``<stem>.md`` (the report, which starts with
    the :func:`device_line`); ``echo`` prints the report and the paths."""
    write_json(stem + ".json", payload)
    with open(stem + ".md", "w") as f:
        f.write(report if report.endswith("\n") else report + "\n")
    if echo:
        print(report)
        print(f"wrote {stem}.md and {stem}.json")

"""Workloads, step builders and measurement helpers shared by the benchmarks.

Workloads (synthetic inputs of fixed seed: step time does not depend on data):

* ``mlp``    -- W1, an MLP 784-512-512-10, batch 256;
* ``cnn``    -- W2, a ResNet-style CNN for 32x32x3 inputs (3 stages x 2 basic
  blocks, widths 16/32/64), batch 128, without normalisation;
* ``cnn_bn`` -- W2 with BatchNorm (running statistics are model state, updated
  from the clean forward pass only; the perturbed pass discards them).

Every step built here has the signature
``step(params, model_state, opt_state, batch) -> (params, model_state,
opt_state, loss)`` so that all configurations are timed the same way (the
two phases of a two-phase step, :func:`decision_phase` and
:func:`update_phase`, excepted).

Hand-written methods: :func:`methods` lists every SAM-type constructor
benchmarked, each with a :class:`HandMethod`, the same method in plain
``jax.numpy`` (the floor the library is held to in time by
``bench_speed.py`` and in memory by ``bench_memory.py``).

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
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import sam_optax

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


def _clean_gradient_then(workload: Workload, finish: Callable[..., tuple]
                         ) -> Step:
    """The clean gradient (value, BatchNorm statistics), then
    ``finish(grads, opt_state, params, grad_fn) -> (params, opt_state)``.

    The clean forward pass updates the BatchNorm statistics; the perturbed
    pass (``grad_fn``) reuses the old ones and its update is dropped.
    """

    def step(params, model_state, opt_state, batch):
        (loss, new_model_state), grads = jax.value_and_grad(
            workload.loss, has_aux=True)(params, model_state, batch)
        grad_fn = jax.grad(lambda p: workload.loss(p, model_state, batch)[0])
        params, opt_state = finish(grads, opt_state, params, grad_fn)
        return params, new_model_state, opt_state, loss

    return step


def _library_finish(tx: optax.GradientTransformation,
                    perturb: Optional[bool] = None) -> Callable[..., tuple]:
    """``tx.update`` (with ``perturb=`` when given) and the new params."""
    extra = {} if perturb is None else {"perturb": perturb}

    def finish(grads, opt_state, params, grad_fn):
        updates, opt_state = tx.update(grads, opt_state, params,
                                       grad_fn=grad_fn, **extra)
        return optax.apply_updates(params, updates), opt_state

    return finish


def grad_fn_step(workload: Workload, tx: optax.GradientTransformation,
                 perturb: Optional[bool] = None) -> Step:
    """A step for the ``sam_optax`` contract: ``update(..., grad_fn=...)``.

    ``perturb`` (a Python bool) overrides a schedule's decision: the
    program of the host path (``sam_optax.schedule.host_scheduled``).
    """
    return _clean_gradient_then(workload, _library_finish(tx, perturb))


def hand_step(workload: Workload, hand: HandMethod,
              perturb: Optional[bool] = None) -> Step:
    """A :class:`HandMethod` as a step (``perturb`` as in its ``update``)."""
    return _clean_gradient_then(
        workload, lambda grads, state, params, grad_fn: hand.update(
            grads, state, params, grad_fn, perturb))


def handwritten_sam_step(workload: Workload, tx: optax.GradientTransformation,
                         rho: float) -> Step:
    """The minimal two-gradient SAM step, written out by hand.

    ε = ρ g / ‖g‖, g_sam = ∇L(w + ε), then the same base update: the floor
    under any library's cost. ``tx`` is the base optimizer.
    """
    return hand_step(workload, hand_sam(tx, rho))


def decision_phase(workload: Workload,
                   decide: Callable[[PyTree, Any, PyTree], tuple]) -> Callable:
    """Phase 1 of a two-phase step (AE-SAM without ``lax.cond``): the clean
    gradient and the schedule's decision.

    ``decide(grads, opt_state, params) -> (flag, new_opt_state or None)``.
    Returns ``first(params, model_state, opt_state, batch) -> (grads, loss,
    new_model_state, flag, new_opt_state or None)``; the host reads
    ``flag`` (a device-to-host sync) and calls :func:`update_phase`'s step.
    """

    def first(params, model_state, opt_state, batch):
        (loss, new_model_state), grads = jax.value_and_grad(
            workload.loss, has_aux=True)(params, model_state, batch)
        flag, opt_state = decide(grads, opt_state, params)
        return grads, loss, new_model_state, flag, opt_state

    return first


def update_phase(workload: Workload, finish: Callable[..., tuple]) -> Callable:
    """Phase 2: ``second(params, model_state, opt_state, grads, batch) ->
    (params, opt_state)`` with ``finish`` as in ``grad_fn_step`` (built for
    one value of ``perturb``); ``model_state`` is the one phase 1 got."""

    def second(params, model_state, opt_state, grads, batch):
        grad_fn = jax.grad(lambda p: workload.loss(p, model_state, batch)[0])
        return finish(grads, opt_state, params, grad_fn)

    return second


def library_two_phase(workload: Workload, tx: optax.GradientTransformation
                      ) -> tuple[Callable, dict[bool, Callable]]:
    """AE-SAM in two phases with ``sam_optax.schedule.decision``: phase 1
    leaves the state to phase 2, whose ``update(..., perturb=flag)`` updates
    the schedule's statistics."""
    first = decision_phase(workload, lambda grads, state, params: (
        sam_optax.schedule.decision(tx, grads, state, params), None))
    return first, {flag: update_phase(workload, _library_finish(tx, flag))
                   for flag in (True, False)}


def hand_two_phase(workload: Workload, hand: HandMethod
                   ) -> tuple[Callable, dict[bool, Callable]]:
    """A hand-written two-phase step: phase 1 decides and updates the
    schedule's statistics, phase 2 takes them."""
    assert hand.decide is not None
    first = decision_phase(workload, lambda grads, state, params:
                           hand.decide(grads, state))
    return first, {flag: update_phase(
        workload, lambda grads, state, params, grad_fn, flag=flag:
        hand.update(grads, state, params, grad_fn, flag))
        for flag in (True, False)}


def with_flag(step: Step, sam_like: bool = True) -> Step:
    """The step, also returning whether it took the second gradient
    (``sam_optax.diagnostics(...).perturbed``; ``False`` for a step without
    a SAM state). A fresh output: the state's own flag is donated to the
    next step, so it cannot be read after it."""

    def step_with_flag(params, model_state, opt_state, batch):
        params, model_state, opt_state, loss = step(params, model_state,
                                                    opt_state, batch)
        flag = (sam_optax.diagnostics(opt_state).perturbed if sam_like
                else jnp.zeros([], bool))
        return params, model_state, opt_state, loss, flag

    return step_with_flag


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
# Hand-written methods: the minimal JAX program of every SAM-type method,
# the floor the library is held to in time (bench_speed.py) and in memory
# (bench_memory.py). Plain jax.numpy: global L2 norms with no range guard, no
# diagnostics, only the state the method needs (LookSAM's stored direction,
# Friendly-SAM's EMA, MSAM's ε, ...).


class HandMethod(NamedTuple):
    """A SAM-type method written out by hand.

    Attributes:
      init: ``init(params) -> state``.
      update: ``update(grads, state, params, grad_fn, perturb=None) ->
        (new_params, state)``, everything after the clean gradient ``grads``
        (``grad_fn(point)`` gives the gradient at any point). ``perturb``
        matters to the schedule family only: ``None`` decides inside the
        program (``lax.cond``, like the library's default), a Python bool
        takes the second gradient or skips it, with no conditional built.
      rule: count-based schedules: ``rule(t)``, whether step ``t`` takes the
        second gradient (the host's choice for ``perturb``).
      decide: AE-SAM: ``decide(grads, state) -> (flag, state)``, the first
        phase of a two-phase step; ``update(..., perturb=bool(flag))`` then
        gets the state it returned.
    """

    init: Callable[[PyTree], Any]
    update: Callable[..., tuple[PyTree, Any]]
    rule: Optional[Callable[[int], bool]] = None
    decide: Optional[Callable[[PyTree, Any], tuple[jax.Array, Any]]] = None


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


def _keys(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten(list(jax.random.split(key, len(leaves))))


def _centralize(tree):
    return jax.tree.map(
        lambda g: g - jnp.mean(g, axis=tuple(range(g.ndim - 1)), keepdims=True)
        if g.ndim >= 2 else g, tree)


def _apply(base, params, base_state, grads):
    updates, base_state = base.update(grads, base_state, params)
    return optax.apply_updates(params, updates), base_state


def _sam_grads(params, grads, grad_fn, rho):
    return grad_fn(_add(params, _unit(grads, rho)))


def _ascent_method(base, epsilon_fn, *, extra_init=None) -> HandMethod:
    """SAM with ``ε = epsilon_fn(g, params, extra) -> (ε, extra)``; ``extra``
    is the ascent's own state (``None`` when it needs none)."""
    def init(params):
        extra = None if extra_init is None else extra_init(params)
        return base.init(params), extra

    def update(grads, state, params, grad_fn, perturb=None):
        del perturb
        base_state, extra = state
        epsilon, extra = epsilon_fn(grads, params, extra)
        params, base_state = _apply(base, params, base_state,
                                    grad_fn(_add(params, epsilon)))
        return params, (base_state, extra)

    return HandMethod(init, update)


def _base_state_method(base, descent_grads) -> HandMethod:
    """State = ``base``'s; ``base`` receives ``descent_grads(params, g,
    grad_fn)``."""
    def update(grads, base_state, params, grad_fn, perturb=None):
        del perturb
        return _apply(base, params, base_state,
                      descent_grads(params, grads, grad_fn))

    return HandMethod(base.init, update)


def hand_sam(base, rho=0.05):
    """Plain SAM; its state is ``base``'s own."""
    return _base_state_method(
        base, lambda w, g, grad_fn: _sam_grads(w, g, grad_fn, rho))


def hand_sam_linf(base, rho=0.05):
    return _ascent_method(
        base, lambda g, w, extra: (_scale(jax.tree.map(jnp.sign, g), rho),
                                   extra))


def hand_asam(base, rho=0.5, eta=0.01):
    def epsilon(g, w, extra):
        t = jax.tree.map(lambda x: jnp.abs(x) + eta, w)
        tg = jax.tree.map(jnp.multiply, t, g)
        return jax.tree.map(jnp.multiply, t, _unit(tg, rho)), extra
    return _ascent_method(base, epsilon)


def hand_fisher_sam(base, rho=0.1, eta=1.0):
    def epsilon(g, w, extra):
        s = jax.tree.map(lambda x: jax.lax.rsqrt(1.0 + eta * x * x), g)
        sg = jax.tree.map(jnp.multiply, s, g)
        return jax.tree.map(jnp.multiply, s, _unit(sg, rho)), extra
    return _ascent_method(base, epsilon)


def _count_and_ema(params):
    """State ``(count, ema)``: the count says whether this is the first step,
    whose EMA is seeded with g."""
    return jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params)


def hand_friendly_sam(base, rho=0.05, sigma=1.0, lmbda=0.9):
    def epsilon(g, w, extra):
        count, m = extra
        first = count == 0
        v = jax.tree.map(lambda x, y: jnp.where(first, x, x - sigma * y), g, m)
        m = jax.tree.map(
            lambda x, y: jnp.where(first, x, lmbda * y + (1 - lmbda) * x), g, m)
        return _unit(v, rho), (count + 1, m)
    return _ascent_method(base, epsilon, extra_init=_count_and_ema)


def hand_vasso(base, rho=0.05, theta=0.4):
    def epsilon(g, w, extra):
        count, d = extra
        d = jax.tree.map(
            lambda x, y: jnp.where(count == 0, x, (1 - theta) * y + theta * x),
            g, d)
        return _unit(d, rho), (count + 1, d)
    return _ascent_method(base, epsilon, extra_init=_count_and_ema)


def hand_random_sam(base, rho=0.05, seed=0):
    def epsilon(g, w, key):
        key, draw = jax.random.split(key)
        z = jax.tree.map(lambda k, x: jax.random.normal(k, x.shape, x.dtype),
                         _keys(draw, g), g)
        return _unit(z, rho), key
    return _ascent_method(base, epsilon,
                          extra_init=lambda params: jax.random.PRNGKey(seed))


def hand_esam(base, rho=0.05, beta=0.6, seed=0):
    def epsilon(g, w, key):
        key, draw = jax.random.split(key)
        unit = _unit(g, rho / beta)
        keep = jax.tree.map(lambda k, x: jax.random.bernoulli(k, beta, x.shape),
                            _keys(draw, g), g)
        return jax.tree.map(lambda e, m: jnp.where(m, e, 0.0), unit, keep), key
    return _ascent_method(base, epsilon,
                          extra_init=lambda params: jax.random.PRNGKey(seed))


def hand_gcsam(base, rho=0.05):
    return _base_state_method(base, lambda w, g, grad_fn: _centralize(
        grad_fn(_add(w, _unit(_centralize(g), rho)))))


def hand_multistep_sam(base, rho=0.05, steps=2):
    alpha = 1.0 / steps

    def descent_grads(w, g, grad_fn):
        epsilon = _unit(g, rho)
        for _ in range(steps - 1):
            epsilon = _add(epsilon, _unit(grad_fn(_add(w, epsilon)),
                                          alpha * rho))
            epsilon = _scale(epsilon, jnp.minimum(1.0, rho / _norm(epsilon)))
        return grad_fn(_add(w, epsilon))

    return _base_state_method(base, descent_grads)


def hand_gsam(base, rho=0.05, alpha=0.1):
    def descent_grads(w, g, grad_fn):
        g_sam = _sam_grads(w, g, grad_fn, rho)
        unit = _unit(g_sam, 1.0)
        along = _vdot(g, unit)
        return jax.tree.map(
            lambda s, x, u: s - alpha * (x - along * u), g_sam, g, unit)
    return _base_state_method(base, descent_grads)


def hand_wsam(base, rho=0.05, gamma=0.9):
    weight = gamma / (1 - gamma)
    return _base_state_method(base, lambda w, g, grad_fn: jax.tree.map(
        lambda x, s: (1 - weight) * x + weight * s, g,
        _sam_grads(w, g, grad_fn, rho)))


def hand_wsam_decoupled(base, learning_rate, rho=0.05, gamma=0.9):
    weight = gamma / (1 - gamma)

    def update(grads, base_state, params, grad_fn, perturb=None):
        del perturb
        sam_grads = _sam_grads(params, grads, grad_fn, rho)
        updates, base_state = base.update(grads, base_state, params)
        updates = jax.tree.map(
            lambda u, s, g: u - learning_rate * weight * (s - g),
            updates, sam_grads, grads)
        return optax.apply_updates(params, updates), base_state

    return HandMethod(base.init, update)


def _every_k(base, k, paid, skipped, extra_init) -> HandMethod:
    """A SAM step at steps 0, k, 2k, ...: ``paid``/``skipped(params, grads,
    extra, grad_fn) -> (grads_for_base, extra)``, chosen by ``lax.cond`` on
    the count (``perturb=None``) or by the host (a Python bool)."""
    def init(params):
        return base.init(params), jnp.zeros([], jnp.int32), extra_init(params)

    def update(grads, state, params, grad_fn, perturb=None):
        base_state, count, extra = state
        if perturb is None:
            descent, extra = jax.lax.cond(
                count % k == 0, lambda e: paid(params, grads, e, grad_fn),
                lambda e: skipped(params, grads, e, grad_fn), extra)
        else:
            descent, extra = (paid if perturb else skipped)(params, grads,
                                                            extra, grad_fn)
        params, base_state = _apply(base, params, base_state, descent)
        return params, (base_state, count + 1, extra)

    return HandMethod(init, update, rule=lambda t: t % k == 0)


def hand_every_k_sam(base, rho=0.05, k=5):
    return _every_k(
        base, k, lambda w, g, e, grad_fn: (_sam_grads(w, g, grad_fn, rho), e),
        lambda w, g, e, grad_fn: (g, e), lambda params: ())


def hand_looksam(base, rho=0.05, k=5, alpha=0.7):
    def paid(w, g, direction, grad_fn):
        sam_grads = _sam_grads(w, g, grad_fn, rho)
        unit_g = _unit(g, 1.0)
        along = _vdot(sam_grads, unit_g)
        orthogonal = jax.tree.map(lambda s, u: s - along * u, sam_grads,
                                  unit_g)
        return sam_grads, _unit(orthogonal, 1.0)

    def skipped(w, g, direction, grad_fn):
        scale = alpha * _norm(g)
        return jax.tree.map(lambda x, d: x + scale * d, g, direction), direction

    return _every_k(base, k, paid, skipped,
                    lambda params: jax.tree.map(jnp.zeros_like, params))


def hand_ae_sam(base, rho=0.05, c=0.0, delta=0.9):
    def init(params):
        zero = jnp.zeros([], jnp.float32)
        return base.init(params), (zero, zero)

    def decide(grads, state):
        base_state, (mean, variance) = state
        squared = _vdot(grads, grads)
        mean = delta * mean + (1 - delta) * squared
        variance = delta * variance + (1 - delta) * jnp.square(squared - mean)
        flag = squared >= mean + c * jnp.sqrt(variance)
        return flag, (base_state, (mean, variance))

    def update(grads, state, params, grad_fn, perturb=None):
        if perturb is None:
            perturb, state = decide(grads, state)
        base_state, stats = state
        if isinstance(perturb, bool):
            descent = (_sam_grads(params, grads, grad_fn, rho) if perturb
                       else grads)
        else:
            descent = jax.lax.cond(
                perturb, lambda: _sam_grads(params, grads, grad_fn, rho),
                lambda: grads)
        params, base_state = _apply(base, params, base_state, descent)
        return params, (base_state, stats)

    return HandMethod(init, update, decide=decide)


def hand_msam(base, rho=0.3):
    """MSAM: the params carry ε; one gradient, at the perturbed point."""
    def init(params):
        return base.init(params), jax.tree.map(jnp.zeros_like, params)

    def update(grads, state, params, grad_fn, perturb=None):
        del grad_fn, perturb
        base_state, epsilon = state
        clean = jax.tree.map(jnp.subtract, params, epsilon)
        updates, base_state = base.update(grads, base_state, clean)
        new_epsilon = _unit(updates, rho)
        params = jax.tree.map(lambda w, u, e: w + u + e, clean, updates,
                              new_epsilon)
        return params, (base_state, new_epsilon)

    return HandMethod(init, update)


def _flat(tree):
    """Every leaf raveled and concatenated: one vector of the N coordinates."""
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def _unflat(flat, like):
    """A flat vector back to the leaves of ``like``."""
    leaves, treedef = jax.tree.flatten(like)
    splits = np.cumsum([np.size(x) for x in leaves])[:-1]
    return treedef.unflatten([part.reshape(np.shape(x)) for part, x in zip(
        jnp.split(flat, splits), leaves)])


def _top_k_mask(scores, k):
    """True at the ``k`` largest scores (ties: the lower index)."""
    _, index = jax.lax.top_k(scores, k)
    return jnp.zeros(scores.shape, jnp.bool_).at[index].set(True)


def _masked_sam_grads(params, grads, grad_fn, rho, mask):
    """SAM's second gradient with ε = ρ m ⊙ g/‖g‖ (the whole g's norm)."""
    epsilon = jax.tree.map(lambda m, e: jnp.where(m, e, 0.0), mask,
                           _unit(grads, rho))
    return grad_fn(_add(params, epsilon))


def hand_ssam_f(base, rho=0.05, sparsity=0.5, update_interval=100):
    """SSAM-F: F += g², at t % T = 0 the mask is top-k(F) and F is reset."""
    def init(params):
        return (base.init(params), jnp.zeros([], jnp.int32),
                jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.bool_), params),
                jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params, grad_fn, perturb=None):
        del perturb
        base_state, count, mask, fisher = state
        k = int((1 - sparsity) * _flat(params).size)
        fisher = jax.tree.map(lambda f, g: f + g * g, fisher, grads)

        def refresh(fisher):
            return (_unflat(_top_k_mask(_flat(fisher), k), fisher),
                    jax.tree.map(jnp.zeros_like, fisher))

        mask, fisher = jax.lax.cond(count % update_interval == 0, refresh,
                                    lambda f: (mask, f), fisher)
        params, base_state = _apply(base, params, base_state, _masked_sam_grads(
            params, grads, grad_fn, rho, mask))
        return params, (base_state, count + 1, mask, fisher)

    return HandMethod(init, update)


def hand_ssam_d(base, rho=0.05, sparsity=0.5, update_interval=100,
                drop_rate=0.5, seed=0):
    """SSAM-D: a random mask of k coordinates; at t % T = 0 the n of smallest
    |g| leave it and n random others join it. The same keys as the library:
    ``key, draw = split(seed)`` for the first mask, ``key, _, grow =
    split(key, 3)`` at each refresh."""
    def init(params):
        n = _flat(params).size
        key, draw = jax.random.split(jax.random.PRNGKey(seed))
        mask = _top_k_mask(jax.random.uniform(draw, (n,)),
                           int((1 - sparsity) * n))
        return base.init(params), jnp.zeros([], jnp.int32), _unflat(
            mask, params), key

    def update(grads, state, params, grad_fn, perturb=None):
        del perturb
        base_state, count, mask, key = state
        n = _flat(params).size
        k = int((1 - sparsity) * n)
        swapped = min(int(k * drop_rate), n - k)

        def refresh(key):
            key, _, grow_key = jax.random.split(key, 3)
            live = _flat(mask)
            kept = _top_k_mask(jnp.where(live, jnp.abs(_flat(grads)), -1.0),
                               k - swapped)
            grown = _top_k_mask(jnp.where(
                live, -1.0, jax.random.uniform(grow_key, (n,))), swapped)
            return _unflat(kept | grown, params), key

        mask, key = jax.lax.cond(count % update_interval == 0, refresh,
                                 lambda key: (mask, key), key)
        params, base_state = _apply(base, params, base_state, _masked_sam_grads(
            params, grads, grad_fn, rho, mask))
        return params, (base_state, count + 1, mask, key)

    return HandMethod(init, update)


def hand_lookbehind_sam(base, rho=0.05, k=5, alpha=0.5):
    """Lookbehind-SAM: the point w' climbs from w_0 = φ over k inner steps,
    each a base step on ∇L(w'_i); the k-th lands on φ + α(w_k − φ)."""
    def init(params):
        return (base.init(params), jnp.zeros([], jnp.int32),
                jax.tree.map(jnp.zeros_like, params),   # φ
                jax.tree.map(jnp.zeros_like, params))   # w'

    def update(grads, state, params, grad_fn, perturb=None):
        del grads, perturb
        base_state, index, slow, point = state
        first, last = index == 0, index == k - 1
        slow = jax.tree.map(lambda s, w: jnp.where(first, w, s), slow, params)
        point = jax.tree.map(lambda p, w: jnp.where(first, w, p), point, params)
        point = _add(point, _unit(grad_fn(point), rho))
        params, base_state = _apply(base, params, base_state, grad_fn(point))
        params = jax.tree.map(
            lambda w, s: jnp.where(last, s + alpha * (w - s), w), params, slow)
        return params, (base_state, (index + 1) % k, slow, point)

    return HandMethod(init, update)


def hand_sampa(base, rho=0.1, lmbda=0.2):
    """SAMPa-λ: ε from the stored ∇f(y_t) (zero at first: ε = 0), then
    ∇f(x + ε) and ∇f(y_{t+1}), y_{t+1} = x + base(∇f(y_t)), in one vmap."""
    def init(params):
        return base.init(params), jax.tree.map(jnp.zeros_like, params)

    def update(grads, state, params, grad_fn, perturb=None):
        del grads, perturb
        base_state, auxiliary = state
        norm = _norm(auxiliary)
        perturbed = _add(params, _scale(
            auxiliary, jnp.where(norm > 0, rho / norm, 0.0)))
        lookahead, _ = base.update(auxiliary, base_state, params)
        pair = jax.tree.map(lambda a, b: jnp.stack([a, b]), perturbed,
                            optax.apply_updates(params, lookahead))
        both = jax.vmap(grad_fn)(pair)
        perturbed_grads = jax.tree.map(lambda x: x[0], both)
        auxiliary = jax.tree.map(lambda x: x[1], both)
        params, base_state = _apply(base, params, base_state, jax.tree.map(
            lambda a, b: (1 - lmbda) * a + lmbda * b, perturbed_grads,
            auxiliary))
        return params, (base_state, auxiliary)

    return HandMethod(init, update)


def hand_bsam(learning_rate, rho=0.01, num_data=50_000, beta1=0.9,
              beta2=0.999, weight_decay=0.0, damping=0.1, init_precision=1.0,
              seed=0):
    """bSAM (its own optimizer, no base): g at θ = w + z/√(N s), g_ε at
    w + ρ g/s, then the momentum, the precision and w −= α g_m/s. The same
    keys as the library: ``key, draw = split(key)``, one key per leaf."""
    def init(params):
        return (jax.random.PRNGKey(seed), jax.tree.map(jnp.zeros_like, params),
                jax.tree.map(lambda x: jnp.full_like(x, init_precision),
                             params))

    def update(grads, state, params, grad_fn, perturb=None):
        del grads, perturb
        key, momentum, precision = state
        key, draw = jax.random.split(key)
        noisy = jax.tree.map(
            lambda w, k, s: w + jax.random.normal(k, w.shape, w.dtype)
            / jnp.sqrt(num_data * s), params, _keys(draw, params), precision)
        g = grad_fn(noisy)
        g_eps = grad_fn(jax.tree.map(lambda w, x, s: w + rho * x / s,
                                     params, g, precision))
        momentum = jax.tree.map(
            lambda m, x, w: beta1 * m + (1 - beta1) * (x + weight_decay * w),
            momentum, g_eps, params)
        precision = jax.tree.map(
            lambda s, x: beta2 * s + (1 - beta2) * (
                jnp.sqrt(s) * jnp.abs(x) + weight_decay + damping),
            precision, g)
        params = jax.tree.map(lambda w, m, s: w - learning_rate * m / s,
                              params, momentum, precision)
        return params, (key, momentum, precision)

    return HandMethod(init, update)


def hand_gam(base, rho=0.05, alpha=0.1):
    """GAM (Alg. 1): θ = w + ρ f/‖f‖ with f = H(w) ĝ, then the base step on
    g + αρ H(θ) ĝ_adv; exact Hessian-vector products by ``jax.jvp``."""
    def descent_grads(w, g, grad_fn):
        def hvp(point, vector):
            return jax.jvp(grad_fn, (point,), (vector,))[1]

        theta = _add(w, _unit(hvp(w, _unit(g, 1.0)), rho))
        curvature = hvp(theta, _unit(grad_fn(theta), 1.0))
        return jax.tree.map(lambda x, h: x + alpha * rho * h, g, curvature)

    return _base_state_method(base, descent_grads)


class Method(NamedTuple):
    """A row of the benchmarks: the library's constructor and its
    hand-written counterpart, with the same settings.

    Attributes:
      name: the constructor's name (``sam_linf``, ``wsam_decoupled``: an
        option of ``sam``, ``wsam``).
      library: ``library() -> tx``.
      hand: ``hand() -> HandMethod``.
      settings: the settings, for tables.
      schedule: ``"count"`` (every-k, LookSAM: the host can decide),
        ``"adaptive"`` (AE-SAM: the decision reads g), ``""`` (every step;
        MSAM: one gradient).
    """

    name: str
    library: Callable[[], optax.GradientTransformation]
    hand: Callable[[], HandMethod]
    settings: str = ""
    schedule: str = ""


#: bSAM's dataset size N (its posterior variance is 1/(N s)): CIFAR-10's.
BSAM_NUM_DATA = 50_000


def methods(base: optax.GradientTransformation, rho: float = 0.05,
            learning_rate: float = 0.01) -> tuple[Method, ...]:
    """Every SAM-type constructor benchmarked, with its papers' settings.

    ``rho`` is the radius of the methods whose papers use SAM's (0.05);
    ASAM (0.5), Fisher-SAM (0.1), MSAM (0.3), SAMPa (0.1) and bSAM (0.01)
    keep their own. ``learning_rate`` is ``base``'s, which decoupled WSAM
    needs, and bSAM's (its own optimizer: it takes no ``base``).
    """
    sam = sam_optax
    return (
        Method("sam", lambda: sam.sam(base, rho), lambda: hand_sam(base, rho),
               f"ρ={rho}"),
        Method("sam_linf", lambda: sam.sam(base, rho, norm="linf"),
               lambda: hand_sam_linf(base, rho), f"ρ={rho}, p=∞"),
        Method("asam", lambda: sam.asam(base, 0.5, eta=0.01),
               lambda: hand_asam(base, 0.5, 0.01), "ρ=0.5, η=0.01"),
        Method("fisher_sam", lambda: sam.fisher_sam(base, 0.1, eta=1.0),
               lambda: hand_fisher_sam(base, 0.1, 1.0), "ρ=0.1, η=1"),
        Method("friendly_sam", lambda: sam.friendly_sam(base, rho),
               lambda: hand_friendly_sam(base, rho), f"ρ={rho}, σ=1, λ=0.9"),
        Method("vasso", lambda: sam.vasso(base, rho, theta=0.4),
               lambda: hand_vasso(base, rho, 0.4), f"ρ={rho}, θ=0.4"),
        Method("random_sam", lambda: sam.random_sam(base, rho),
               lambda: hand_random_sam(base, rho), f"ρ={rho}"),
        Method("multistep_sam", lambda: sam.multistep_sam(base, rho, steps=2),
               lambda: hand_multistep_sam(base, rho, 2), f"ρ={rho}, 2 steps"),
        Method("esam", lambda: sam.esam(base, rho, beta=0.6),
               lambda: hand_esam(base, rho, 0.6), f"ρ={rho}, β=0.6"),
        Method("gsam", lambda: sam.gsam(base, rho, alpha=0.1),
               lambda: hand_gsam(base, rho, 0.1), f"ρ={rho}, α=0.1"),
        Method("gcsam", lambda: sam.gcsam(base, rho),
               lambda: hand_gcsam(base, rho), f"ρ={rho}"),
        Method("wsam", lambda: sam.wsam(base, rho, gamma=0.9),
               lambda: hand_wsam(base, rho, 0.9), f"ρ={rho}, γ=0.9"),
        Method("wsam_decoupled", lambda: sam.wsam(
            base, rho, gamma=0.9, decoupled=True, learning_rate=learning_rate),
            lambda: hand_wsam_decoupled(base, learning_rate, rho, 0.9),
            f"ρ={rho}, γ=0.9, decoupled"),
        Method("looksam", lambda: sam.looksam(base, rho, k=5, alpha=0.7),
               lambda: hand_looksam(base, rho, 5, 0.7), f"ρ={rho}, k=5, α=0.7",
               "count"),
        Method("every_k_sam", lambda: sam.every_k_sam(base, rho, k=5),
               lambda: hand_every_k_sam(base, rho, 5), f"ρ={rho}, k=5",
               "count"),
        Method("ae_sam", lambda: sam.ae_sam(base, rho, c=0.0, delta=0.9),
               lambda: hand_ae_sam(base, rho, 0.0, 0.9), f"ρ={rho}, c=0, δ=0.9",
               "adaptive"),
        Method("msam", lambda: sam.msam(base, 0.3),
               lambda: hand_msam(base, 0.3), "ρ=0.3"),
        Method("ssam_f", lambda: sam.ssam_f(base, rho, sparsity=0.5,
                                            update_interval=100),
               lambda: hand_ssam_f(base, rho, 0.5, 100),
               f"ρ={rho}, s=0.5, T_m=100"),
        Method("ssam_d", lambda: sam.ssam_d(base, rho, sparsity=0.5,
                                            update_interval=100),
               lambda: hand_ssam_d(base, rho, 0.5, 100),
               f"ρ={rho}, s=0.5, T_m=100, r=0.5"),
        Method("lookbehind_sam",
               lambda: sam.lookbehind_sam(base, rho, k=5, alpha=0.5),
               lambda: hand_lookbehind_sam(base, rho, 5, 0.5),
               f"ρ={rho}, k=5, α=0.5"),
        Method("sampa", lambda: sam.sampa(base, 0.1, lmbda=0.2),
               lambda: hand_sampa(base, 0.1, 0.2), "ρ=0.1, λ=0.2"),
        Method("bsam", lambda: sam.bsam(learning_rate, 0.01,
                                        num_data=BSAM_NUM_DATA),
               lambda: hand_bsam(learning_rate, 0.01, BSAM_NUM_DATA),
               f"ρ=0.01, N={BSAM_NUM_DATA}, α={learning_rate}, no base"),
        Method("gam", lambda: sam.gam(base, rho, alpha=0.1),
               lambda: hand_gam(base, rho, 0.1), f"ρ={rho}, α=0.1"),
    )


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
      bytes_accessed: XLA's estimate of the bytes read and written by one
        call (``cost_analysis``): with ``flops``, a noise-free measure of
        the work a change adds or removes.
    """

    executable: Callable[..., Any]
    compile_s: float
    flops: float
    temp_bytes: int
    bytes_accessed: float = float("nan")


def compile_step(step: Step, *args: Any,
                 donate: bool | Sequence[int] = True) -> Compiled:
    """``jit(step).lower(*args).compile()`` with its cost and memory analysis.

    Args:
      step: the step function.
      *args: example arguments (params, model_state, opt_state, batch).
      donate: donate params, model state and optimizer state (``True``), as
        a training loop does, or the arguments at these positions; the
        caller must then never reuse the arguments it donated.
    """
    if isinstance(donate, bool):
        donate = (0, 1, 2) if donate else ()
    jitted = jax.jit(step, donate_argnums=tuple(donate))
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    cost = _first(compiled.cost_analysis())
    memory = compiled.memory_analysis()
    temp = int(getattr(memory, "temp_size_in_bytes", 0)) if memory else 0
    return Compiled(compiled, compile_s, float(cost.get("flops", float("nan"))),
                    temp, float(cost.get("bytes accessed", float("nan"))))


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
    """Median, quartiles, mean and minimum of a list of seconds, in
    milliseconds."""
    ms = np.asarray(times) * 1e3
    q25, q75 = np.percentile(ms, [25, 75])
    return {"median_ms": float(statistics.median(ms)), "q25_ms": float(q25),
            "q75_ms": float(q75), "mean_ms": float(ms.mean()),
            "min_ms": float(ms.min()), "steps": int(ms.size)}


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

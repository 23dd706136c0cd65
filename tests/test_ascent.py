"""The ascent family (sam_optax.ascent and its named constructors) against
float64 NumPy references of each paper's formula, reductions to SAM and to the
base optimizer, degenerate inputs (zero/tiny gradients, bf16), retracing and
argument checks."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from descent_schedule_reference import run_msam_general
from numpy_reference import (
    PROBLEMS,
    SGD,
    leaves,
    norm,
    run_sam,
    sam_perturbation,
    tmap,
)
from sam_steps import iterate

import sam_optax

RHO, LR, MOMENTUM, STEPS = 0.1, 0.1, 0.9, 5


def to_jax(tree, dtype=jnp.float32):
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def run_jax(tx, problem, steps=STEPS, jit=False):
    # Eager by default: the primitives' kernels are shared by every test, so
    # this is faster than compiling each method's step (tracing is tested in
    # test_zero_tiny_gradients_bf16_and_no_retracing). Loops (multi-step)
    # would be compiled at every eager call: those are jitted.
    return iterate(tx, problem.jax_loss, to_jax(problem.init), steps, jit=jit)


def assert_close_history(got, expected, rtol=2e-5):
    assert len(got) == len(expected)
    for t, (g, e) in enumerate(zip(got, expected, strict=True)):
        err = norm(tmap(np.subtract, g, e))
        assert err <= rtol * max(norm(e), 1.0), (t, err)


# ----------------------------------------------- float64 references (papers)


def run_reference(problem, perturbation, steps=STEPS, state=None):
    """SGD+momentum on ∇L(w + ε) with ε = perturbation(g, w, state, problem)."""
    base = SGD(LR, MOMENTUM)
    params = tmap(lambda x: np.asarray(x, np.float64), problem.init)
    base_state = base.init(params)
    history = []
    for _ in range(steps):
        g = problem.grad(params)
        eps, state = perturbation(g, params, state, problem)
        g_sam = problem.grad(tmap(np.add, params, eps))
        upd, base_state = base.update(g_sam, base_state)
        params = tmap(np.add, params, upd)
        history.append(params)
    return history


def unit_l2(v):
    n = norm(v)
    return tmap(lambda x: x / n if n > 0 else np.zeros_like(x), v)


def ref_linf(g, w, state, problem):
    return tmap(lambda x: RHO * np.sign(x), g), state


def ref_sam(g, w, state, problem):
    return sam_perturbation(g, RHO), state


def ref_asam(eta, adaptive=None):
    """T_w = |w| + η on the leaves ``adaptive`` selects (all: None), else 1."""
    def perturbation(g, w, state, problem):
        keep = tmap(lambda _: True, w) if adaptive is None else adaptive
        t = tmap(lambda x, k: np.abs(x) + eta if k else np.ones_like(x), w, keep)
        tg = tmap(np.multiply, t, g)
        n = norm(tg)                                      # ‖T_w g‖
        return tmap(lambda ti, gi: RHO * ti * ti * gi / n, t, g), state
    return perturbation


def ref_fisher(eta):
    def perturbation(g, w, state, problem):
        f = tmap(lambda x: 1.0 + eta * x * x, g)          # diagonal Fisher
        finv_g = tmap(np.divide, g, f)
        quad = sum(np.sum(a * b) for a, b in zip(leaves(g), leaves(finv_g),
                                                  strict=True))
        return tmap(lambda x: RHO * x / np.sqrt(quad), finv_g), state
    return perturbation


def ref_friendly(sigma, lmbda):
    def perturbation(g, w, m, problem):
        if m is None:                                     # first step: m = g
            return tmap(lambda x: RHO * x, unit_l2(g)), g
        v = tmap(lambda gi, mi: gi - sigma * mi, g, m)
        m = tmap(lambda mi, gi: lmbda * mi + (1 - lmbda) * gi, m, g)
        return tmap(lambda x: RHO * x, unit_l2(v)), m
    return perturbation


def ref_vasso(theta):
    def perturbation(g, w, d, problem):
        d = g if d is None else tmap(
            lambda di, gi: (1 - theta) * di + theta * gi, d, g)
        return tmap(lambda x: RHO * x, unit_l2(d)), d
    return perturbation


def ref_multistep(n, alpha=None):
    alpha = 1.0 / n if alpha is None else alpha

    def perturbation(g, w, state, problem):
        eps = tmap(lambda x: RHO * x, unit_l2(g))
        for _ in range(n - 1):
            gk = problem.grad(tmap(np.add, w, eps))
            eps = tmap(lambda e, u: e + alpha * RHO * u, eps, unit_l2(gk))
            size = norm(eps)
            if size > RHO:                                # project on the ball
                eps = tmap(lambda e: e * RHO / size, eps)
        return eps, state
    return perturbation


def keep_only(tree, keep):
    """The leaves ``keep`` selects; zeros elsewhere."""
    return tmap(lambda x, k: np.asarray(x) if k else np.zeros_like(x), tree, keep)


class MaskedProblem:
    """``problem`` whose gradients exist on the selected leaves only: what a
    masked ascent sees at every ascent step."""

    def __init__(self, problem, keep):
        self.problem, self.keep = problem, keep

    def grad(self, params):
        return keep_only(self.problem.grad(params), self.keep)


def masked(perturbation, keep):
    """The reference ``perturbation`` restricted to the selected leaves: every
    gradient it reads is zero elsewhere (so they are out of every norm, EMA
    and projection) and ε is zero there."""
    def restricted(g, w, state, problem):
        eps, state = perturbation(keep_only(g, keep), w, state,
                                  MaskedProblem(problem, keep))
        return keep_only(eps, keep), state
    return restricted


def sgdm():
    return optax.sgd(LR, momentum=MOMENTUM)


MLP_NOT_BIAS = {"l1": {"w": True, "b": False}, "l2": {"w": True, "b": False}}

REFERENCE_CASES = {
    "sam_linf": (lambda: sam_optax.sam(sgdm(), RHO, norm="linf"), ref_linf),
    "asam": (lambda: sam_optax.asam(sgdm(), RHO, eta=0.05), ref_asam(0.05)),
    "fisher_sam": (lambda: sam_optax.fisher_sam(sgdm(), RHO, eta=3.0),
                   ref_fisher(3.0)),
    "friendly_sam": (lambda: sam_optax.friendly_sam(sgdm(), RHO, sigma=0.8,
                                                    lmbda=0.6),
                     ref_friendly(0.8, 0.6)),
    "vasso": (lambda: sam_optax.vasso(sgdm(), RHO, theta=0.3), ref_vasso(0.3)),
    "multistep_sam": (lambda: sam_optax.multistep_sam(sgdm(), RHO, steps=3),
                      ref_multistep(3)),
    "multistep_sam_big_steps": (
        lambda: sam_optax.multistep_sam(sgdm(), RHO, steps=3, step_size=1.0),
        ref_multistep(3, alpha=1.0)),
    "sam_mask": (lambda: sam_optax.sam(sgdm(), RHO, mask=MLP_NOT_BIAS),
                 masked(ref_sam, MLP_NOT_BIAS)),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_CASES))
def test_matches_float64_reference_of_the_paper(name):
    make_tx, perturbation = REFERENCE_CASES[name]
    problem = PROBLEMS["mlp"]()
    expected = run_reference(problem, perturbation)
    got, _ = run_jax(make_tx(), problem, jit=name.startswith("multistep"))
    assert_close_history(got, expected)
    # Guard: the method is not plain SAM on this problem.
    sam_hist = run_sam(problem, SGD(LR, MOMENTUM), RHO, STEPS)
    assert norm(tmap(np.subtract, sam_hist[-1], expected[-1])) > 1e-6


def test_asam_adaptive_mask_matches_reference():
    """T = |w| + η on the weight matrices only, T = 1 on the biases."""
    problem = PROBLEMS["mlp"]()
    eta = 0.1

    expected = run_reference(problem, ref_asam(eta, adaptive=MLP_NOT_BIAS))
    tx = sam_optax.asam(sgdm(), RHO, eta=eta,
                        adaptive=sam_optax.masks.exclude_bias_and_norm)
    # The mask helper names the leaves "b", not "bias": pass the tree too.
    tx_tree = sam_optax.asam(sgdm(), RHO, eta=eta, adaptive=MLP_NOT_BIAS)
    assert_close_history(run_jax(tx_tree, problem)[0], expected)
    # exclude_bias_and_norm keeps every leaf here (no "bias" names): all T.
    assert_close_history(run_jax(tx, problem)[0],
                         run_reference(problem, ref_asam(eta)))


# ------------------------------------------------------------- reductions


@functools.cache
def _sam_history():
    return run_jax(sam_optax.sam(sgdm(), RHO), PROBLEMS["mlp"]())[0]


ALL_FALSE = {"l1": {"w": False, "b": False}, "l2": {"w": False, "b": False}}
ALL_TRUE = {"l1": {"w": True, "b": True}, "l2": {"w": True, "b": True}}

REDUCES_TO_SAM = {
    "asam_T_is_1": lambda: sam_optax.asam(sgdm(), RHO, adaptive=ALL_FALSE),
    "fisher_eta_0": lambda: sam_optax.fisher_sam(sgdm(), RHO, eta=0.0),
    "friendly_sigma_0": lambda: sam_optax.friendly_sam(sgdm(), RHO, sigma=0.0),
    "vasso_theta_1": lambda: sam_optax.vasso(sgdm(), RHO, theta=1.0),
    "multistep_n_1": lambda: sam_optax.multistep_sam(sgdm(), RHO, steps=1),
    "esam_beta_1": lambda: sam_optax.esam(sgdm(), RHO, beta=1.0),
    "full_mask": lambda: sam_optax.sam(sgdm(), RHO, mask=ALL_TRUE),
    "full_mask_callable": lambda: sam_optax.vasso(
        sgdm(), RHO, theta=1.0, mask=lambda p: jax.tree.map(lambda _: True, p)),
}


@pytest.mark.parametrize("name", sorted(REDUCES_TO_SAM))
def test_reduces_to_sam(name):
    problem = PROBLEMS["mlp"]()
    got, _ = run_jax(REDUCES_TO_SAM[name](), problem)
    assert_close_history(got, _sam_history(), rtol=1e-6)


def test_asam_with_T_equal_one_at_zero_weights_is_sam():
    """η = 1 at w = 0 gives T ≡ 1: the first ε is SAM's."""
    params = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
    grads = {"a": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([3.0, 0.0])}
    probe = lambda p: p  # sgd(1) then returns −ε
    eps = []
    for tx in (sam_optax.asam(optax.sgd(1.0), 0.3, eta=1.0),
               sam_optax.sam(optax.sgd(1.0), 0.3)):
        updates, _ = tx.update(grads, tx.init(params), params, grad_fn=probe)
        eps.append(updates)
    for a, b in zip(jax.tree.leaves(eps[0]), jax.tree.leaves(eps[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("make_tx", [
    lambda: sam_optax.sam(sgdm(), RHO, mask=ALL_FALSE),
    lambda: sam_optax.asam(sgdm(), RHO, mask=lambda p: jax.tree.map(
        lambda _: False, p)),
], ids=["sam", "asam_callable"])
def test_empty_mask_is_base_optimizer(make_tx):
    problem = PROBLEMS["mlp"]()
    got, state = run_jax(make_tx(), problem)
    expected = run_sam(problem, SGD(LR, MOMENTUM), 0.0, STEPS)
    assert_close_history(got, expected)
    assert float(sam_optax.diagnostics(state).perturbation_norm) == 0.0


# -------------------------------------------- every method: degenerate inputs

METHODS = {
    "sam_linf": lambda base: sam_optax.sam(base, 0.05, norm="linf"),
    "asam": lambda base: sam_optax.asam(base, 0.5),
    "fisher_sam": lambda base: sam_optax.fisher_sam(base, 0.1),
    "friendly_sam": lambda base: sam_optax.friendly_sam(base, 0.05),
    "vasso": lambda base: sam_optax.vasso(base, 0.05),
    "random_sam": lambda base: sam_optax.random_sam(base, 0.05, seed=1),
    "multistep_sam": lambda base: sam_optax.multistep_sam(base, 0.05, steps=3),
    "esam": lambda base: sam_optax.esam(base, 0.05, beta=0.5),
    "esam_leaf": lambda base: sam_optax.esam(base, 0.05, beta=0.5,
                                             granularity="leaf"),
    "sam_on": lambda base: sam_optax.sam(
        base, 0.05, mask=sam_optax.masks.normalization_layers),
}


def finite(tree):
    return all(np.all(np.isfinite(np.asarray(x, np.float64)))
               for x in jax.tree.leaves(tree) if np.asarray(x).dtype.kind == "f")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_zero_tiny_gradients_bf16_and_no_retracing(name):
    # bf16 weights, a float32 "norm layer", an empty leaf: 8 steps, 1 trace.
    params = {"dense": {"kernel": jnp.full((3, 2), 0.5, jnp.bfloat16)},
              "norm": {"scale": jnp.ones(2, jnp.float32),
                       "bias": jnp.zeros(2, jnp.float32)},
              "empty": jnp.zeros((0, 4), jnp.float32)}

    def loss_fn(p, scale):
        h = jnp.sum(p["dense"]["kernel"].astype(jnp.float32), 0)
        h = h * p["norm"]["scale"] + p["norm"]["bias"]
        return scale * jnp.sum((h - 2.0) ** 2) + jnp.sum(p["empty"])

    tx = METHODS[name](optax.sgd(0.01, momentum=0.9))
    traces = []

    @jax.jit
    def step(params, state, scale):
        traces.append(1)
        loss = lambda p: loss_fn(p, scale)
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params, grad_fn=jax.grad(loss))
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    dtypes0 = [x.dtype for x in jax.tree.leaves(state)]
    shapes0 = [x.shape for x in jax.tree.leaves(state)]
    # Zero gradient (scale 0): no NaN and, with no gradient anywhere, no move.
    p = params
    for _ in range(3):
        p, state = step(p, state, jnp.float32(0.0))
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32),
                                      np.asarray(b, np.float32))
    assert finite(state)
    diag = sam_optax.diagnostics(state)
    if name != "random_sam":  # a random direction ignores the gradient
        assert float(diag.perturbation_norm) == 0.0
    # Tiny gradients (squares underflow in float32): still finite.
    for _ in range(2):
        p, state = step(p, state, jnp.float32(1e-30))
    assert finite(p) and finite(state)
    # Ordinary gradients: training works with bf16 weights.
    for _ in range(3):
        p, state = step(p, state, jnp.float32(1.0))
    assert finite(p) and finite(state)
    assert float(loss_fn(p, 1.0)) < float(loss_fn(params, 1.0))
    assert p["dense"]["kernel"].dtype == jnp.bfloat16
    assert [x.dtype for x in jax.tree.leaves(state)] == dtypes0
    assert [x.shape for x in jax.tree.leaves(state)] == shapes0
    assert len(traces) == 1 and step._cache_size() == 1


# ------------------------------------------------ p = ∞, random, ESAM, steps


def probe_perturbation(tx, grads, params, state=None):
    """With grad_fn(p) = p at params 0 and sgd(1), the update is −ε."""
    state = tx.init(params) if state is None else state
    updates, state = tx.update(grads, state, params, grad_fn=lambda p: p)
    return jax.tree.map(lambda u: -np.asarray(u, np.float64), updates), state


def test_linf_is_rho_times_sign_with_mask():
    params = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
    grads = {"a": jnp.array([1e-30, -2.0, 0.0]), "b": jnp.array([3.0, -1.0])}
    tx = sam_optax.sam(optax.sgd(1.0), 0.2, norm="linf", mask={"a": True,
                                                              "b": False})
    eps, _ = probe_perturbation(tx, grads, params)
    np.testing.assert_allclose(eps["a"], [0.2, -0.2, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(eps["b"], [0.0, 0.0])


def key_stream(seed, tree, draw_leaf):
    """The documented key schedule: ``key, draw = split(key)`` per step, one
    ``split(draw, n_leaves)`` key per leaf (jax flatten order)."""
    key = jax.random.PRNGKey(seed)
    leaves_, treedef = jax.tree.flatten(tree)
    while True:
        key, draw = jax.random.split(key)
        keys = jax.random.split(draw, len(leaves_))
        yield treedef.unflatten([np.asarray(draw_leaf(k, np.shape(x)), np.float64)
                                 for k, x in zip(keys, leaves_, strict=True)])


def ref_random(seed, tree, keep=None):
    """ρ z_S/‖z_S‖: the draw restricted to the leaves ``keep`` selects."""
    draws = key_stream(seed, tree, lambda k, shape: jax.random.normal(k, shape))

    def perturbation(g, w, state, problem):
        z = next(draws)
        z = z if keep is None else keep_only(z, keep)
        return tmap(lambda x: RHO * x, unit_l2(z)), state
    return perturbation


def ref_esam(seed, beta, tree):
    draws = key_stream(seed, tree,
                       lambda k, shape: jax.random.bernoulli(k, beta, shape))

    def perturbation(g, w, state, problem):
        keep = next(draws)
        return tmap(lambda e, m: m * e / beta, tmap(
            lambda x: RHO * x, unit_l2(g)), keep), state
    return perturbation


@pytest.mark.parametrize("name", ["random_sam", "esam"])
def test_random_methods_match_float64_reference(name):
    problem = PROBLEMS["mlp"]()
    if name == "random_sam":
        tx = sam_optax.random_sam(sgdm(), RHO, seed=5)
        perturbation = ref_random(5, problem.init)
    else:
        tx = sam_optax.esam(sgdm(), RHO, beta=0.5, seed=5)
        perturbation = ref_esam(5, 0.5, problem.init)
    expected = run_reference(problem, perturbation)
    got, _ = run_jax(tx, problem)
    assert_close_history(got, expected)
    assert norm(tmap(np.subtract, _sam_history()[-1], expected[-1])) > 1e-6


def test_random_direction_is_reproducible_and_on_the_sphere():
    params = {"a": jnp.zeros((50,)), "b": jnp.zeros((10, 5))}
    grads = jax.tree.map(jnp.ones_like, params)
    seen = []
    for seed in (3, 3, jax.random.key(3), 4):
        tx = sam_optax.random_sam(optax.sgd(1.0), 0.3, seed=seed)
        state = tx.init(params)
        draws = []
        for _ in range(3):
            eps, state = probe_perturbation(tx, grads, params, state)
            np.testing.assert_allclose(norm(eps), 0.3, rtol=1e-5)
            draws.append(np.concatenate([x.ravel() for x in leaves(eps)]))
        seen.append(np.stack(draws))
    np.testing.assert_array_equal(seen[0], seen[1])      # same seed
    np.testing.assert_array_equal(seen[0], seen[2])      # same key
    assert np.abs(seen[0] - seen[3]).max() > 0.01        # other seed
    assert np.abs(seen[0][0] - seen[0][1]).max() > 0.01  # fresh draw each step
    # Not the gradient direction: cos with the all-ones gradient is small.
    cos = seen[0] @ np.ones(100) / (0.3 * 10.0)
    assert np.all(np.abs(cos) < 0.5)


def test_esam_keeps_each_coordinate_with_probability_beta():
    beta, rho = 0.3, 1.0
    params = {"w": jnp.zeros(20000)}
    grads = {"w": jax.random.normal(jax.random.key(0), (20000,)) + 2.0}
    tx = sam_optax.esam(optax.sgd(1.0), rho, beta=beta, seed=7)
    eps, state = probe_perturbation(tx, grads, params)
    sam_eps = rho * np.asarray(grads["w"], np.float64) / norm(grads)
    kept = eps["w"] != 0
    assert abs(kept.mean() - beta) < 0.02
    np.testing.assert_allclose(eps["w"][kept], sam_eps[kept] / beta, rtol=1e-5)
    eps2, _ = probe_perturbation(tx, grads, params, state)
    assert np.any((eps2["w"] != 0) != kept)               # a fresh mask


def test_esam_leaf_granularity_keeps_whole_leaves():
    params = {f"w{i}": jnp.zeros(4) for i in range(40)}
    grads = {k: jnp.arange(1.0, 5.0) for k in params}
    tx = sam_optax.esam(optax.sgd(1.0), 1.0, beta=0.5, granularity="leaf")
    eps, _ = probe_perturbation(tx, grads, params)
    kept = [bool(np.all(e != 0)) for e in eps.values()]
    assert all(np.all(e != 0) or np.all(e == 0) for e in eps.values())
    assert 5 < sum(kept) < 35


def test_multistep_calls_grad_fn_n_times_and_stays_in_the_ball():
    calls = []
    loss_fn = lambda w: jnp.sum(jnp.sin(3.0 * w))

    def grad_fn(w):
        calls.append(1)
        return jax.grad(loss_fn)(w)

    params = jnp.array([0.3, -0.2, 0.7])
    tx = sam_optax.multistep_sam(optax.sgd(0.1), 0.5, steps=4, step_size=0.9)
    state = tx.init(params)
    _, state = tx.update(jax.grad(loss_fn)(params), state, params,
                         grad_fn=grad_fn)
    # Steps 2..n written out (no loop for a compiler to optimise apart), one
    # call each, and one for the final g: n calls.
    assert len(calls) == 4
    assert float(sam_optax.diagnostics(state).perturbation_norm) <= 0.5 + 1e-6
    # Many steps: one loop body, traced once, and one for the final g.
    calls.clear()
    tx = sam_optax.multistep_sam(optax.sgd(0.1), 0.5, steps=12, step_size=0.3)
    _, state = tx.update(jax.grad(loss_fn)(params), tx.init(params), params,
                         grad_fn=grad_fn)
    assert len(calls) == 2
    assert float(sam_optax.diagnostics(state).perturbation_norm) <= 0.5 + 1e-6


def test_multistep_sync_perturbation_matches_full_batch():
    """Under vmap(axis_name) with a synchronised ε, every ascent step uses
    the batch-averaged gradient: same result as one device on the batch."""
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(8, 3), jnp.float32)
    y = jnp.asarray(rng.randn(8), jnp.float32)
    w0 = jnp.asarray(rng.randn(3), jnp.float32)
    make = lambda **kw: sam_optax.multistep_sam(optax.sgd(0.1), 0.3, steps=3,
                                                **kw)

    def shard_update(w, xb, yb):
        tx = make(axis_name="d", sync_perturbation=True)
        f = lambda p: jnp.mean((jnp.tanh(xb @ p) - yb) ** 2)
        u, _ = tx.update(jax.grad(f)(w), tx.init(w), w, grad_fn=jax.grad(f))
        return u

    sharded = jax.jit(jax.vmap(shard_update, in_axes=(None, 0, 0),
                               axis_name="d"))(
        w0, x.reshape(2, 4, 3), y.reshape(2, 4))
    tx = make()
    f = lambda p: jnp.mean((jnp.tanh(x @ p) - y) ** 2)
    full, _ = jax.jit(lambda w: tx.update(jax.grad(f)(w), tx.init(w), w,
                                          grad_fn=jax.grad(f)))(w0)
    np.testing.assert_allclose(sharded[0], full, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sharded[1], full, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("make", [
    lambda **kw: sam_optax.vasso(optax.sgd(0.1), 0.2, theta=0.3, **kw),
    lambda **kw: sam_optax.friendly_sam(optax.sgd(0.1), 0.2, sigma=0.7,
                                        lmbda=0.5, **kw),
], ids=["vasso", "friendly_sam"])
def test_stateful_ascent_under_axis_name_sees_the_averaged_gradient(make):
    """With a synchronised ε the EMA is of the replica-averaged gradient:
    two vmapped replicas follow one device on the whole batch, step by step."""
    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.randn(8, 3), jnp.float32)
    y = jnp.asarray(rng.randn(8), jnp.float32)
    loss = lambda w, xb, yb: jnp.mean((jnp.tanh(xb @ w) - yb) ** 2)
    w = w_full = jnp.asarray(rng.randn(3), jnp.float32)
    tx_shard, tx_full = make(axis_name="d", sync_perturbation=True), make()

    @jax.jit
    def shard_step(w, state, xb, yb):
        def one(xs, ys):
            g = jax.grad(loss)(w, xs, ys)
            u, s = tx_shard.update(g, state, w,
                                   grad_fn=jax.grad(lambda p: loss(p, xs, ys)))
            return w + u, s
        ws, states = jax.vmap(one, axis_name="d")(xb, yb)
        return ws[0], jax.tree.map(lambda a: a[0], states), ws

    @jax.jit
    def full_step(w, state):
        g = jax.grad(loss)(w, x, y)
        u, s = tx_full.update(g, state, w,
                              grad_fn=jax.grad(lambda p: loss(p, x, y)))
        return w + u, s

    state, state_full = tx_shard.init(w), tx_full.init(w)
    for _ in range(4):
        w, state, replicas = shard_step(w, state, x.reshape(2, 4, 3),
                                        y.reshape(2, 4))
        w_full, state_full = full_step(w_full, state_full)
        np.testing.assert_allclose(replicas[0], replicas[1], rtol=1e-6)
        np.testing.assert_allclose(w, w_full, rtol=1e-5, atol=1e-7)


def test_stateful_ascents_keep_their_ema_in_float32_state():
    params = {"w": jnp.zeros(3, jnp.bfloat16)}
    for tx in (sam_optax.friendly_sam(optax.sgd(0.1)),
               sam_optax.vasso(optax.sgd(0.1))):
        ascent_state = tx.init(params).ascent_state
        ema = ascent_state[1]
        assert ema["w"].dtype == jnp.float32 and ema["w"].shape == (3,)


# ------------------------------------------- every mask form × every ascent
# One mask concept (sam_optax.masks.leaf_flags) serves every consumer: each
# form below must select the same leaves in every method, checked against the
# float64 reference restricted to those leaves (`masked`). MASK_FORMS: name ->
# (the mask as passed, the leaves it selects).

SELECT = {"l1": {"w": True, "b": True}, "l2": {"w": False, "b": False}}
LARGE_ONLY = {"l1": {"w": True, "b": False}, "l2": {"w": False, "b": False}}


def _by_layer(first, second):
    """A callable mask giving ``first`` to layer l1's leaves, ``second`` to l2's."""
    return lambda p: {"l1": jax.tree.map(lambda _: first, p["l1"]),
                      "l2": jax.tree.map(lambda _: second, p["l2"])}


MASK_FORMS = {
    "python": (SELECT, SELECT),
    "numpy": (tmap(np.bool_, SELECT), SELECT),
    "jax": (tmap(jnp.asarray, SELECT), SELECT),
    "callable_python": (lambda p: SELECT, SELECT),
    "callable_numpy": (_by_layer(np.True_, np.False_), SELECT),
    "callable_jax": (_by_layer(jnp.bool_(True), jnp.bool_(False)), SELECT),
    "prefix": ({"l1": True, "l2": False}, SELECT),
    "callable_prefix": (lambda p: {"l1": np.True_, "l2": jnp.asarray(False)},
                        SELECT),
    # The issue's example: np.bool_ leaves computed from the shapes.
    "callable_shape": (lambda p: jax.tree.map(lambda x: np.prod(x.shape) > 8, p),
                       LARGE_ONLY),
}


def _reference_of(perturbation):
    return lambda problem, keep, steps: run_reference(
        problem, perturbation(keep), steps)


def _msam_reference(problem, keep, steps):
    return run_msam_general(problem, LR, MOMENTUM, RHO, steps, keep=keep)[0]


# name -> (tx for a mask, float64 history for the selected leaves `keep`).
MASKED_METHODS = {
    "sam": (lambda m: sam_optax.sam(sgdm(), RHO, mask=m),
            _reference_of(lambda keep: masked(ref_sam, keep))),
    "sam_linf": (lambda m: sam_optax.sam(sgdm(), RHO, norm="linf", mask=m),
                 _reference_of(lambda keep: masked(ref_linf, keep))),
    "asam_mask": (lambda m: sam_optax.asam(sgdm(), RHO, eta=0.05, mask=m),
                  _reference_of(lambda keep: masked(ref_asam(0.05), keep))),
    "asam_adaptive": (lambda m: sam_optax.asam(sgdm(), RHO, eta=0.05, adaptive=m),
                      _reference_of(lambda keep: ref_asam(0.05, adaptive=keep))),
    "fisher_sam": (lambda m: sam_optax.fisher_sam(sgdm(), RHO, eta=3.0, mask=m),
                   _reference_of(lambda keep: masked(ref_fisher(3.0), keep))),
    "friendly_sam": (
        lambda m: sam_optax.friendly_sam(sgdm(), RHO, sigma=0.8, lmbda=0.6,
                                         mask=m),
        _reference_of(lambda keep: masked(ref_friendly(0.8, 0.6), keep))),
    "vasso": (lambda m: sam_optax.vasso(sgdm(), RHO, theta=0.3, mask=m),
              _reference_of(lambda keep: masked(ref_vasso(0.3), keep))),
    "random_sam": (lambda m: sam_optax.random_sam(sgdm(), RHO, seed=5, mask=m),
                   _reference_of(lambda keep: ref_random(
                       5, PROBLEMS["mlp"]().init, keep))),
    "multistep_sam": (
        lambda m: sam_optax.multistep_sam(sgdm(), RHO, steps=3, mask=m),
        _reference_of(lambda keep: masked(ref_multistep(3), keep))),
    "esam": (lambda m: sam_optax.esam(sgdm(), RHO, beta=0.5, seed=5, mask=m),
             _reference_of(lambda keep: masked(
                 ref_esam(5, 0.5, PROBLEMS["mlp"]().init), keep))),
    "msam": (lambda m: sam_optax.msam(sgdm(), RHO, mask=m), _msam_reference),
}
MASK_STEPS = 2  # the second step reads the EMAs of friendly_sam and vasso


@pytest.mark.parametrize("form", sorted(MASK_FORMS))
@pytest.mark.parametrize("method", sorted(MASKED_METHODS))
def test_every_mask_form_selects_the_same_leaves_in_every_method(method, form):
    """Unselected leaves get no perturbation and stay out of every norm (for
    ``adaptive=``: get T = 1), whatever form the mask takes."""
    make_tx, reference = MASKED_METHODS[method]
    mask, keep = MASK_FORMS[form]
    problem = PROBLEMS["mlp"]()
    expected = reference(problem, keep, MASK_STEPS)
    got, _ = run_jax(make_tx(mask), problem, steps=MASK_STEPS,
                     jit=method == "multistep_sam")
    assert_close_history(got, expected)
    # Guard: the selection matters (the all-leaves reference differs).
    unmasked = reference(problem, tmap(lambda _: True, keep), MASK_STEPS)
    assert norm(tmap(np.subtract, unmasked[-1], expected[-1])) > 1e-6


@pytest.mark.parametrize("method", ["sam", "asam_adaptive", "msam"])
def test_callable_masks_of_concrete_jnp_bools_work_under_jit(method):
    """``jnp`` arithmetic on shapes is concrete, even while jit traces."""
    make_tx, reference = MASKED_METHODS[method]
    mask = lambda p: jax.tree.map(  # noqa: E731
        lambda x: jnp.prod(jnp.array(x.shape)) > 8, p)
    problem = PROBLEMS["mlp"]()
    got, _ = run_jax(make_tx(mask), problem, steps=2, jit=True)
    assert_close_history(got, reference(problem, LARGE_ONLY, 2))


@pytest.mark.parametrize("make, argument", [
    (lambda m: sam_optax.sam(sgdm(), RHO, mask=m), "mask"),
    (lambda m: sam_optax.asam(sgdm(), RHO, adaptive=m), "adaptive"),
    (lambda m: sam_optax.msam(sgdm(), RHO, mask=m), "mask"),
])
def test_mask_from_traced_values_is_refused_under_jit(make, argument):
    tx = make(lambda p: jax.tree.map(lambda x: jnp.all(x > 0), p))
    problem = PROBLEMS["mlp"]()
    with pytest.raises(ValueError, match=f"`{argument}` must be static"):
        run_jax(tx, problem, steps=1, jit=True)


@pytest.mark.parametrize("leaf, shown", [
    (1, "int 1"), (0.5, "float 0.5"), ("yes", "str 'yes'"),
    (np.int32(1), "int32"), (jnp.ones(2, bool), "shape (2,)"),
    (np.array(1.0), "float64"),
])
@pytest.mark.parametrize("make, argument", [
    (lambda m: sam_optax.sam(sgdm(), RHO, mask=m), "mask"),
    (lambda m: sam_optax.asam(sgdm(), RHO, adaptive=m), "adaptive"),
    (lambda m: sam_optax.fisher_sam(sgdm(), RHO, mask=m), "mask"),
    (lambda m: sam_optax.msam(sgdm(), RHO, mask=m), "mask"),
])
def test_mask_leaves_that_are_not_bools_are_refused(make, argument, leaf, shown):
    bad = {"l1": {"w": True, "b": leaf}, "l2": False}
    # At construction for a tree, at init for a callable; both name the leaf.
    with pytest.raises(ValueError, match=rf"`{argument}`.*\['l1'\]\['b'\]"
                       rf".*{re.escape(shown)}"):
        make(bad)
    with pytest.raises(ValueError, match=rf"`{argument}`.*\['l1'\]\['b'\]"):
        make(lambda p: bad).init(to_jax(PROBLEMS["mlp"]().init))


# ------------------------------------- non-finite gradients: ε = 0, reported

NONFINITE_METHODS = {
    "sam": lambda: sam_optax.sam(optax.sgd(1.0), 0.2),
    "sam_linf": lambda: sam_optax.sam(optax.sgd(1.0), 0.2, norm="linf",
                                      full_diagnostics=True),
    "sam_masked": lambda: sam_optax.sam(optax.sgd(1.0), 0.2,
                                        mask={"a": True, "b": False}),
    "asam": lambda: sam_optax.asam(optax.sgd(1.0), 0.2, eta=0.5,
                                   full_diagnostics=True),
    "asam_adaptive": lambda: sam_optax.asam(optax.sgd(1.0), 0.2, eta=0.5,
                                            adaptive={"a": False, "b": True},
                                            full_diagnostics=True),
    "fisher_sam": lambda: sam_optax.fisher_sam(optax.sgd(1.0), 0.2,
                                               full_diagnostics=True),
    "friendly_sam": lambda: sam_optax.friendly_sam(optax.sgd(1.0), 0.2),
    "vasso": lambda: sam_optax.vasso(optax.sgd(1.0), 0.2),
    "multistep_sam": lambda: sam_optax.multistep_sam(optax.sgd(1.0), 0.2,
                                                     steps=2),
    "esam": lambda: sam_optax.esam(optax.sgd(1.0), 0.2, beta=0.5),
}
FINITE_GRADS = {"a": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([3.0, 0.25])}


@pytest.mark.parametrize("bad", [-np.inf, np.nan])
@pytest.mark.parametrize("at_step", [1, 2])
@pytest.mark.parametrize("name", sorted(NONFINITE_METHODS))
def test_nonfinite_gradient_gives_zero_perturbation_and_says_so(name, at_step,
                                                                 bad):
    """An inf/NaN entry (in a perturbed leaf) makes the whole ε exactly 0, never
    a NaN; the diagnostics report ‖ε‖ = 0 and the non-finite ‖g‖."""
    params = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
    grads = dict(FINITE_GRADS, a=FINITE_GRADS["a"].at[1].set(bad))
    tx = NONFINITE_METHODS[name]()
    state = None
    if at_step == 2:  # after a finite step (stateful ascents hold an EMA)
        eps, state = probe_perturbation(tx, FINITE_GRADS, params)
        assert norm(eps) > 0.1
    eps, state = probe_perturbation(tx, grads, params, state)
    for leaf in leaves(eps):
        np.testing.assert_array_equal(leaf, 0.0)
    diag = sam_optax.diagnostics(state)
    assert float(diag.perturbation_norm) == 0.0
    assert not np.isfinite(float(diag.grad_norm))
    assert np.isnan(float(diag.grad_norm)) == np.isnan(bad)


def test_nonfinite_gradient_in_an_unperturbed_leaf_does_not_matter():
    params = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
    grads = dict(FINITE_GRADS, b=jnp.array([np.nan, 1.0]))
    tx = sam_optax.sam(optax.sgd(1.0), 0.2, mask={"a": True, "b": False})
    eps, _ = probe_perturbation(tx, grads, params)
    expected = 0.2 * np.asarray(FINITE_GRADS["a"]) / np.linalg.norm(
        FINITE_GRADS["a"])
    np.testing.assert_allclose(eps["a"], expected, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(NONFINITE_METHODS))
def test_perturbation_norm_is_the_one_used_above_the_safe_range(name):
    """‖g‖ ~ 1e32 (above the range of the safe L2 norm): ε is 0 for the
    L2 ascents; whatever ε is, ``perturbation_norm`` is its norm."""
    params = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
    grads = jax.tree.map(lambda g: g * 1e32, FINITE_GRADS)
    tx = NONFINITE_METHODS[name]()
    eps, state = probe_perturbation(tx, grads, params)
    assert all(np.all(np.isfinite(x)) for x in leaves(eps))
    if name in ("sam", "sam_masked", "friendly_sam", "vasso", "multistep_sam"):
        assert norm(eps) == 0.0
    np.testing.assert_allclose(
        float(sam_optax.diagnostics(state).perturbation_norm), norm(eps),
        rtol=1e-6)


# --------------------------------- the trees sam handles, every constructor

OWN_CONSTRUCTORS = {
    "sam": lambda b: sam_optax.sam(b, 0.1),
    "sam_linf": lambda b: sam_optax.sam(b, 0.1, norm="linf"),
    "asam": lambda b: sam_optax.asam(b, 0.1),
    "fisher_sam": lambda b: sam_optax.fisher_sam(b, 0.1),
    "friendly_sam": lambda b: sam_optax.friendly_sam(b, 0.1),
    "vasso": lambda b: sam_optax.vasso(b, 0.1),
    "random_sam": lambda b: sam_optax.random_sam(b, 0.1),
    "multistep_sam": lambda b: sam_optax.multistep_sam(b, 0.1, steps=2),
    "esam": lambda b: sam_optax.esam(b, 0.1),
    "msam": lambda b: sam_optax.msam(b, 0.1),
}
EDGE_TREES = {
    "empty": {},
    "python_float": {"a": 1.0, "b": jnp.array([1.0, -2.0])},
    "int_leaf": {"w": jnp.array([1.0, -2.0]), "step": jnp.array(3, jnp.int32)},
    "zero_size": {"w": jnp.array([1.0, -2.0]), "z": jnp.zeros((0, 3))},
}


def _is_float(x):
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _edge_loss(p):
    floats = [jnp.asarray(x) for x in jax.tree.leaves(p) if _is_float(x)]
    return sum((jnp.sum((x - 0.5) ** 2) for x in floats), jnp.zeros([]))


def _edge_grad(p):
    """∇ of the float leaves; integer leaves get a zero of their dtype (what
    optax applies to them unchanged)."""
    grads = jax.grad(_edge_loss, allow_int=True)(p)
    return jax.tree.map(lambda g, x: g if _is_float(x)
                        else jnp.zeros_like(x), grads, p)


@pytest.mark.parametrize("tree", sorted(EDGE_TREES))
@pytest.mark.parametrize("name", sorted(OWN_CONSTRUCTORS))
def test_every_constructor_handles_the_trees_sam_handles(name, tree):
    params = EDGE_TREES[tree]
    tx = OWN_CONSTRUCTORS[name](optax.sgd(0.1, momentum=0.9))
    state = tx.init(params)
    p = params
    for _ in range(2):  # eager: Python-float leaves reach the update as is
        updates, state = tx.update(_edge_grad(p), state, p, grad_fn=_edge_grad)
        p = optax.apply_updates(p, updates)
    assert jax.tree.structure(p) == jax.tree.structure(params)
    assert finite(p) and finite(state)
    if tree == "int_leaf":
        assert p["step"].dtype == jnp.int32 and int(p["step"]) == 3
    if tree == "zero_size":
        assert p["z"].shape == (0, 3)
    if tree != "empty":
        assert float(_edge_loss(p)) < float(_edge_loss(params))


@pytest.mark.parametrize("name", sorted(OWN_CONSTRUCTORS))
def test_float0_gradients_of_integer_leaves_pass_through(name):
    """``jax.grad(..., allow_int=True)`` gives float0 for integer leaves
    (which optax's own optimizers accept only behind ``optax.masked``)."""
    params = EDGE_TREES["int_leaf"]
    tx = OWN_CONSTRUCTORS[name](optax.masked(optax.sgd(0.1),
                                             {"w": True, "step": False}))
    grad_fn = jax.grad(_edge_loss, allow_int=True)
    updates, state = tx.update(grad_fn(params), tx.init(params), params,
                               grad_fn=grad_fn)
    assert finite(updates["w"]) and finite(state)
    assert updates["step"].dtype == jax.dtypes.float0


# ---------------------------------------------------------- bad arguments


@pytest.mark.parametrize("make, argument", [
    (lambda: sam_optax.asam(optax.sgd(0.1), eta=-0.1), "eta"),
    (lambda: sam_optax.fisher_sam(optax.sgd(0.1), eta=-1.0), "eta"),
    (lambda: sam_optax.vasso(optax.sgd(0.1), theta=0.0), "theta"),
    (lambda: sam_optax.vasso(optax.sgd(0.1), theta=1.5), "theta"),
    (lambda: sam_optax.multistep_sam(optax.sgd(0.1), steps=0), "steps"),
    (lambda: sam_optax.multistep_sam(optax.sgd(0.1), steps=2.0), "steps"),
    (lambda: sam_optax.multistep_sam(optax.sgd(0.1), step_size=0.0),
     "step_size"),
    (lambda: sam_optax.esam(optax.sgd(0.1), beta=0.0), "beta"),
    (lambda: sam_optax.esam(optax.sgd(0.1), beta=1.2), "beta"),
    (lambda: sam_optax.esam(optax.sgd(0.1), granularity="row"), "granularity"),
    (lambda: sam_optax.esam(optax.sgd(0.1), seed="x"), "seed"),
    (lambda: sam_optax.random_sam(optax.sgd(0.1), seed=1.5), "seed"),
    (lambda: sam_optax.friendly_sam(optax.sgd(0.1), sigma=-1.0), "sigma"),
    (lambda: sam_optax.friendly_sam(optax.sgd(0.1), lmbda=1.0), "lmbda"),
    (lambda: sam_optax.sam(optax.sgd(0.1), norm="l1"), "norm"),
    (lambda: sam_optax.asam(optax.sgd(0.1), rho=-1.0), "rho"),
    (lambda: sam_optax.sam(optax.sgd(0.1), mask={"w": 1}), "mask"),
])
def test_bad_arguments_raise_value_error_naming_them(make, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        make()


@pytest.mark.parametrize("make, argument", [
    (lambda m: sam_optax.sam(optax.sgd(0.1), mask=m), "mask"),
    (lambda m: sam_optax.vasso(optax.sgd(0.1), mask=m), "mask"),
    (lambda m: sam_optax.asam(optax.sgd(0.1), adaptive=m), "adaptive"),
    (lambda m: sam_optax.esam(optax.sgd(0.1), mask=m), "mask"),
    (lambda m: sam_optax.multistep_sam(optax.sgd(0.1), mask=m), "mask"),
])
def test_mask_whose_tree_does_not_match_fails_at_init(make, argument):
    params = {"w": jnp.zeros(2), "b": jnp.zeros(1)}
    with pytest.raises(ValueError, match=f"`{argument}`"):
        make({"w": True}).init(params)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        make(lambda p: [True, False]).init(params)

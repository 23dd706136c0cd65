"""The ascent family (sam_optax.ascent and its named constructors) against
float64 NumPy references of each paper's formula, reductions to SAM and to the
base optimizer, degenerate inputs (zero/tiny gradients, bf16), retracing and
argument checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy_reference import PROBLEMS, SGD, leaves, norm, run_sam, tmap

import sam_optax

RHO, LR, MOMENTUM, STEPS = 0.1, 0.1, 0.9, 5


def to_jax(tree, dtype=jnp.float32):
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def run_jax(tx, problem, steps=STEPS, jit=False):
    # Eager by default: the primitives' kernels are shared by every test, so
    # this is faster than compiling each method's step (tracing is tested in
    # test_zero_tiny_gradients_bf16_and_no_retracing). Loops (multi-step)
    # would be compiled at every eager call: those are jitted.
    params = to_jax(problem.init)
    state = tx.init(params)

    def step(params, state):
        grads = jax.grad(problem.jax_loss)(params)
        updates, state = tx.update(grads, state, params,
                                   grad_fn=jax.grad(problem.jax_loss))
        return optax.apply_updates(params, updates), state

    step = jax.jit(step) if jit else step

    history = []
    for _ in range(steps):
        params, state = step(params, state)
        history.append(jax.tree.map(np.asarray, params))
    return history, state


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


def ref_asam(eta):
    def perturbation(g, w, state, problem):
        t = tmap(lambda x: np.abs(x) + eta, w)           # T_w = |w| + η
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


def ref_masked(mask):
    def perturbation(g, w, state, problem):
        kept = tmap(lambda x, keep: x if keep else np.zeros_like(x), g, mask)
        return tmap(lambda x: RHO * x, unit_l2(kept)), state
    return perturbation


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
                 ref_masked(MLP_NOT_BIAS)),
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

    def perturbation(g, w, state, problem):
        t = tmap(lambda x, keep: np.abs(x) + eta if keep else np.ones_like(x),
                 w, MLP_NOT_BIAS)
        n = norm(tmap(np.multiply, t, g))
        return tmap(lambda ti, gi: RHO * ti * ti * gi / n, t, g), state

    expected = run_reference(problem, perturbation)
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


def ref_random(seed, tree):
    draws = key_stream(seed, tree, lambda k, shape: jax.random.normal(k, shape))

    def perturbation(g, w, state, problem):
        return tmap(lambda z: RHO * z, unit_l2(next(draws))), state
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
    # One trace of the fori_loop body for steps 2..n, one for the final g.
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

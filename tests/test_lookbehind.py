"""Lookbehind-SAM (Mordido et al. 2024) against a float64 NumPy reference of
Algorithm 1, its degenerate cases, guards, dtypes, retracing and bad
arguments."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy_reference import PROBLEMS, SGD, norm, tmap
from x64_problems import assert_close64, run_x64

import sam_optax

RHO, LR, MOMENTUM = 0.1, 0.2, 0.9


def run_lookbehind(problem, outer_steps, k, alpha, rho=RHO):
    """Mordido et al. 2024, Alg. 1, written out: per outer step, from the
    slow weights φ, k ascent steps of the perturbed point (never reset nor
    projected), a base step of the fast weights on the gradient at each new
    point, then φ ← φ + α(w_k − φ). Returns the params after each *inner*
    step (the fast weights, and φ after the k-th)."""
    slow = tmap(lambda x: np.asarray(x, np.float64), problem.init)
    base = SGD(LR, MOMENTUM)
    state = base.init(slow)
    history = []
    for _ in range(outer_steps):
        fast, point = slow, slow
        for i in range(k):
            g = problem.grad(point)
            scale = rho / norm(g)
            point = tmap(lambda p, d, c=scale: p + c * d, point, g)
            upd, state = base.update(problem.grad(point), state)
            fast = tmap(np.add, fast, upd)
            if i < k - 1:
                history.append(fast)
        slow = tmap(lambda s, f: s + alpha * (f - s), slow, fast)
        history.append(slow)
    return history


def base_tx():
    return optax.sgd(LR, momentum=MOMENTUM)


@functools.cache
def x64_run(k, alpha, updates, rho=RHO):
    tx = (sam_optax.sam(base_tx(), rho) if k is None
          else sam_optax.lookbehind_sam(base_tx(), rho, k=k, alpha=alpha))
    with jax.enable_x64(True):
        return run_x64(tx, PROBLEMS["mlp"](), updates)[0]


@pytest.mark.parametrize("k, alpha", [(3, 0.5), (2, 1.0)])
def test_matches_float64_reference_of_algorithm_1(k, alpha):
    problem = PROBLEMS["mlp"]()
    outer = 12 // k
    expected = run_lookbehind(problem, outer, k, alpha)
    assert_close64(x64_run(k, alpha, 12), expected)
    # Guard: the look-behind is visible (not multistep SAM, not SAM).
    sam = x64_run(None, None, 12)
    assert norm(tmap(np.subtract, sam[-1], expected[-1])) > 1e-3
    reset = run_lookbehind(problem, 12, 1, 1.0)  # the point reset each step
    assert norm(tmap(np.subtract, reset[-1], expected[-1])) > 1e-3


def test_one_inner_step_and_alpha_one_is_sam():
    assert_close64(x64_run(1, 1.0, 10), x64_run(None, None, 10),
                   rtol=1e-14, atol=1e-15)


def test_one_inner_step_scales_the_update_by_alpha():
    """k = 1: φ + α(w_1 − φ), i.e. SAM with α·update (for plain SGD: SAM
    with the learning rate α·η)."""
    problem = PROBLEMS["quadratic"]()
    loss = problem.jax_loss
    params = {"w": jnp.asarray(problem.init["w"], jnp.float32)}
    step = jax.jit(lambda tx, p, s: tx.update(jax.grad(loss)(p), s, p,
                                              grad_fn=jax.grad(loss)),
                   static_argnums=0)
    half = sam_optax.lookbehind_sam(optax.sgd(0.2), RHO, k=1, alpha=0.5)
    sam = sam_optax.sam(optax.sgd(0.1), RHO)
    a, b = params, params
    sa, sb = half.init(a), sam.init(b)
    assert sa.slow == () and sa.inner.ascent_state.point == ()
    for _ in range(5):
        ua, sa = step(half, a, sa)
        ub, sb = step(sam, b, sb)
        a, b = optax.apply_updates(a, ua), optax.apply_updates(b, ub)
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)


def test_state_and_diagnostics():
    problem = PROBLEMS["logistic"]()
    loss = problem.jax_loss
    tx = sam_optax.lookbehind_sam(optax.sgd(0.1), RHO, k=3, alpha=0.5,
                                  full_diagnostics=True)
    params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), problem.init)
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p,
                                          grad_fn=jax.grad(loss)))
    norms = []
    for t in range(6):
        updates, state = step(params, state)
        if t % 3 == 0:  # an outer step starts from the caller's params
            np.testing.assert_array_equal(state.slow["w"], params["w"])
        params = optax.apply_updates(params, updates)
        assert int(state.inner.ascent_state.index) == (t + 1) % 3
        diagnostics = sam_optax.diagnostics(state)
        assert bool(diagnostics.perturbed)
        norms.append(float(diagnostics.perturbation_norm))
    # ‖ε_1‖ = ρ; later ε reach beyond ρ (the point keeps climbing).
    assert abs(norms[0] - RHO) < 1e-6 and abs(norms[3] - RHO) < 1e-6
    assert norms[2] > 1.5 * RHO


def test_a_rejected_step_does_not_end_the_outer_step():
    """With `apply_if_finite` inside, a NaN gradient at the k-th update
    moves nothing (no interpolation) and keeps the inner index; the next
    finite update ends the outer step."""
    tx = sam_optax.lookbehind_sam(optax.apply_if_finite(optax.sgd(0.1), 3),
                                  RHO, k=2, alpha=0.5)
    params = {"w": jnp.array([1.0, -2.0])}
    loss = lambda p: jnp.sum((p["w"] - 0.5) ** 2)  # noqa: E731
    good = jax.grad(loss)
    bad = lambda p: {"w": jnp.array([jnp.nan, 1.0])}  # noqa: E731
    step = jax.jit(lambda p, s, nan: tx.update(
        jax.lax.cond(nan, bad, good, p), s, p,
        grad_fn=lambda q: jax.lax.cond(nan, bad, good, q)))
    state = tx.init(params)
    updates, state = step(params, state, False)
    params = optax.apply_updates(params, updates)
    assert int(state.inner.ascent_state.index) == 1
    updates, rejected = step(params, state, True)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert int(rejected.inner.ascent_state.index) == 1
    np.testing.assert_array_equal(rejected.slow["w"], state.slow["w"])
    updates, state = step(params, rejected, False)
    assert int(state.inner.ascent_state.index) == 0


def test_zero_gradient_bf16_and_no_retracing():
    params = {"k": jnp.ones((3, 2), jnp.bfloat16), "b": jnp.zeros(2, jnp.bfloat16)}
    tx = sam_optax.lookbehind_sam(optax.sgd(0.1, momentum=0.9), RHO, k=3,
                                  alpha=0.5)
    zero = lambda p: jax.tree.map(jnp.zeros_like, p)  # noqa: E731
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)
        return tx.update(zero(p), s, p, grad_fn=zero)

    state = tx.init(params)
    assert state.slow["k"].dtype == jnp.float32
    assert state.inner.ascent_state.point["k"].dtype == jnp.float32
    for _ in range(7):
        updates, state = step(params, state)
        assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
        assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert len(traces) == 1
    assert int(state.inner.ascent_state.index) == 1


def test_bf16_params_train():
    problem = PROBLEMS["logistic"]()
    loss = lambda p: problem.jax_loss(  # noqa: E731
        jax.tree.map(lambda v: v.astype(jnp.float32), p))
    tx = sam_optax.lookbehind_sam(optax.sgd(0.5), RHO, k=2, alpha=0.5)
    params = jax.tree.map(lambda v: jnp.asarray(v, jnp.bfloat16), problem.init)
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p,
                                          grad_fn=jax.grad(loss)))
    start = float(loss(params))
    for _ in range(10):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    assert params["w"].dtype == jnp.bfloat16
    assert float(loss(params)) < start


def test_mask_keeps_other_leaves_at_the_current_weights():
    problem = PROBLEMS["logistic"]()
    seen = []

    def grad_fn(p):
        seen.append(p)
        return jax.grad(problem.jax_loss)(p)

    tx = sam_optax.lookbehind_sam(optax.sgd(0.1), RHO, k=3, alpha=0.5,
                                  mask={"w": True, "b": False})
    params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), problem.init)
    state = tx.init(params)
    for _ in range(3):
        seen.clear()
        updates, state = tx.update(grad_fn(params), state, params,
                                   grad_fn=grad_fn)
        for point in seen[1:]:  # the ascent's and the core's points
            np.testing.assert_array_equal(point["b"], params["b"])
        params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("argument, name", [
    ({"k": 0}, "k"), ({"k": 2.5}, "k"), ({"k": jnp.asarray(2)}, "k"),
    ({"alpha": 0.0}, "alpha"), ({"alpha": 1.5}, "alpha"),
    ({"alpha": "half"}, "alpha"), ({"rho": -0.1}, "rho"),
    ({"mask": "yes"}, "mask"), ({"sync_period": 2}, "sync_period")])
def test_bad_arguments(argument, name):
    with pytest.raises((ValueError, TypeError), match=name):
        sam_optax.lookbehind_sam(optax.sgd(0.1), **argument)


def test_compositions():
    """``optax.chain`` around it is the method alone; ``optax.MultiSteps``
    outside is refused with the fix (as for every SAM-type method)."""
    problem = PROBLEMS["logistic"]()
    loss = problem.jax_loss
    params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), problem.init)

    def final(tx):
        state, p = tx.init(params), params
        for _ in range(4):
            updates, state = tx.update(jax.grad(loss)(p), state, p,
                                       grad_fn=jax.grad(loss))
            p = optax.apply_updates(p, updates)
        return p

    make = lambda: sam_optax.lookbehind_sam(optax.sgd(0.1), RHO, k=2)  # noqa: E731
    alone = final(make())
    chained = final(optax.chain(optax.identity(), make()))
    np.testing.assert_allclose(chained["w"], alone["w"], rtol=1e-6)
    accumulated = optax.MultiSteps(make(), every_k_schedule=2)
    with pytest.raises(TypeError, match="MultiSteps"):
        accumulated.update(jax.grad(loss)(params), accumulated.init(params),
                           params, grad_fn=jax.grad(loss))

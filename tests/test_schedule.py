"""Every-k SAM and AE-SAM against float64 NumPy references; the skip is real;
properties shared by the whole descent/schedule family (GSAM, WSAM, LookSAM,
every-k, AE-SAM, MSAM)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from descent_schedule_reference import (
    ae_sam_direction,
    assert_trajectories_close,
    every_k_direction,
    run_reference,
    run_tx,
)
from numpy_reference import PROBLEMS, SGD, run_sam

import sam_optax

STEPS = 12


def test_every_k_matches_reference():
    problem = PROBLEMS["mlp"]()
    expected, expected_flags = run_reference(
        problem, SGD(0.3, momentum=0.9), STEPS, every_k_direction(4))
    actual, flags, _ = run_tx(
        sam_optax.every_k_sam(optax.sgd(0.3, momentum=0.9), 0.05, k=4),
        problem, STEPS)
    assert flags == expected_flags == [t % 4 == 0 for t in range(STEPS)]
    assert_trajectories_close(actual, expected)


def test_every_k_with_k1_is_sam():
    problem = PROBLEMS["logistic"]()
    expected = run_sam(problem, SGD(0.5, momentum=0.9), 0.05, STEPS)
    actual, flags, _ = run_tx(
        sam_optax.every_k_sam(optax.sgd(0.5, momentum=0.9), 0.05, k=1),
        problem, STEPS)
    assert all(flags)
    assert_trajectories_close(actual, expected)


def test_ae_sam_matches_reference_with_c_schedule():
    problem = PROBLEMS["mlp"]()
    c = optax.linear_schedule(-1.0, 1.0, STEPS)
    c_ref = lambda t: -1.0 + 2.0 * t / STEPS
    expected, expected_flags = run_reference(
        problem, SGD(0.3, momentum=0.9), STEPS, ae_sam_direction(c_ref, 0.8))
    actual, flags, _ = run_tx(
        sam_optax.ae_sam(optax.sgd(0.3, momentum=0.9), 0.05, c=c, delta=0.8),
        problem, STEPS)
    assert flags == expected_flags
    assert 0 < sum(flags) < STEPS  # both branches are exercised
    assert_trajectories_close(actual, expected)


def test_ae_sam_that_never_fires_is_the_base_optimizer():
    problem = PROBLEMS["logistic"]()
    expected, _ = run_reference(problem, SGD(0.5, momentum=0.9), STEPS,
                                lambda t, p, g, grad, rho: (g, False))
    actual, flags, _ = run_tx(
        sam_optax.ae_sam(optax.sgd(0.5, momentum=0.9), 0.05, c=1e6),
        problem, STEPS)
    assert not any(flags)
    assert_trajectories_close(actual, expected)


def _counting_grad_fn(loss_fn, counter):
    """A test-only grad_fn that counts its evaluations at run time."""
    def bump():
        counter[0] += 1

    def grad_fn(params):
        jax.debug.callback(bump)
        return jax.grad(loss_fn)(params)

    return grad_fn


@pytest.mark.parametrize("name,make,expected_calls", [
    ("sam", lambda b: sam_optax.sam(b, 0.05), 10),
    ("looksam_k5", lambda b: sam_optax.looksam(b, 0.05, k=5), 2),
    ("every_k_k3", lambda b: sam_optax.every_k_sam(b, 0.05, k=3), 4),
    ("ae_sam_never", lambda b: sam_optax.ae_sam(b, 0.05, c=1e6), 0),
    ("msam", lambda b: sam_optax.msam(b, 0.3), 0),
])
def test_skipped_steps_do_not_call_grad_fn(name, make, expected_calls):
    problem = PROBLEMS["quadratic"]()
    counter = [0]
    grad_fn = _counting_grad_fn(problem.jax_loss, counter)
    tx = make(optax.sgd(0.1, momentum=0.9))
    params = jax.tree.map(jnp.float32, problem.init)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(problem.jax_loss)(params)  # the caller's, not counted
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    paid = 0
    for _ in range(10):
        params, state = step(params, state)
        paid += int(sam_optax.diagnostics(state).perturbed)
    jax.effects_barrier()
    assert counter[0] == expected_calls == paid


def test_ae_sam_decides_alike_on_every_replica():
    """Under axis_name the policy sees the replica-averaged gradient."""
    problem = PROBLEMS["quadratic"]()
    tx = sam_optax.ae_sam(optax.sgd(0.1), 0.05, c=0.5, axis_name="r")
    params = jax.tree.map(jnp.float32, problem.init)
    scales = jnp.array([0.5, 1.0, 3.0, 10.0])

    def step(scale, params, state):
        loss = lambda p: scale * problem.jax_loss(p)
        updates, state = tx.update(jax.grad(loss)(params), state, params,
                                   grad_fn=jax.grad(loss))
        return optax.apply_updates(params, updates), state

    mapped = jax.jit(jax.vmap(step, in_axes=(0, None, None), axis_name="r"))
    state = tx.init(params)
    for _ in range(6):
        new_params, states = mapped(scales, params, state)
        flags = np.asarray(states.diagnostics.perturbed)
        assert flags.min() == flags.max()
        for leaf in jax.tree.leaves(new_params):
            np.testing.assert_allclose(leaf, leaf[:1].repeat(4, 0), rtol=1e-6)
        params = jax.tree.map(lambda x: x[0], new_params)
        state = jax.tree.map(lambda x: x[0], states)


# ------------------------------------------------ the whole family at once

FAMILY = {
    "gsam": lambda b, **kw: sam_optax.gsam(b, 0.05, **kw),
    "wsam": lambda b, **kw: sam_optax.wsam(b, 0.05, **kw),
    "wsam_decoupled": lambda b, **kw: sam_optax.wsam(
        b, 0.05, decoupled=True, learning_rate=0.1, **kw),
    "looksam": lambda b, **kw: sam_optax.looksam(b, 0.05, k=2, **kw),
    "every_k_sam": lambda b, **kw: sam_optax.every_k_sam(b, 0.05, k=2, **kw),
    "ae_sam": lambda b, **kw: sam_optax.ae_sam(b, 0.05, **kw),
    "msam": lambda b, **kw: sam_optax.msam(b, 0.3, **kw),
}

BAD_ARGUMENTS = {
    "gsam": [({"alpha": -0.1}, "alpha"), ({"alpha": 1.5}, "alpha")],
    "wsam": [({"gamma": 1.0}, "gamma"), ({"gamma": -0.2}, "gamma")],
    "wsam_decoupled": [({"gamma": 1.0}, "gamma")],
    "looksam": [({"alpha": -1.0}, "alpha")],
    "every_k_sam": [],
    "ae_sam": [({"delta": 1.0}, "delta"), ({"c": float("nan")}, "c")],
    "msam": [],
}


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_family_zero_grad_bf16_no_retrace_bad_arguments(name):
    make = FAMILY[name]
    # Bad arguments name themselves, at construction time.
    for kwargs, arg in BAD_ARGUMENTS[name]:
        with pytest.raises(ValueError, match=arg):
            make(optax.sgd(0.1), **kwargs)
    with pytest.raises(ValueError, match="rho"):
        {"gsam": sam_optax.gsam, "wsam": sam_optax.wsam,
         "looksam": sam_optax.looksam, "every_k_sam": sam_optax.every_k_sam,
         "ae_sam": sam_optax.ae_sam, "msam": sam_optax.msam,
         "wsam_decoupled": sam_optax.wsam}[name](optax.sgd(0.1), rho=-1.0)
    if name in ("looksam", "every_k_sam"):
        for k in (0, -3, 2.5):
            with pytest.raises(ValueError, match="`k`"):
                getattr(sam_optax, name)(optax.sgd(0.1), 0.05, k=k)

    tx = make(optax.sgd(0.1, momentum=0.9))
    traces = [0]

    def loss_fn(p):
        return jnp.sum(p["w"].astype(jnp.float32) ** 2) + jnp.sum(
            p["b"].astype(jnp.float32))

    def step(params, state, zero):
        traces[0] += 1
        grads = jax.grad(loss_fn)(params)
        grads = jax.tree.map(lambda g: jnp.where(zero, 0, g).astype(g.dtype),
                             grads)
        grad_fn = lambda p: jax.tree.map(
            lambda g: jnp.where(zero, 0, g).astype(g.dtype), jax.grad(loss_fn)(p))
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step)
    for dtype in (jnp.float32, jnp.bfloat16):
        params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]], dtype),
                  "b": jnp.zeros(3, dtype)}
        state = tx.init(params)
        shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
        # Zero gradients first (no NaN, no movement), then ordinary ones.
        for zero in (True, True, False, False, False):
            new_params, state = step(params, state, jnp.asarray(zero))
            assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes
            for leaf in jax.tree.leaves((new_params, state)):
                if jnp.issubdtype(leaf.dtype, jnp.inexact):
                    assert bool(jnp.all(jnp.isfinite(leaf))), name
            assert jax.tree.map(lambda x: x.dtype, new_params) == jax.tree.map(
                lambda x: x.dtype, params)
            if zero:
                for a, b in zip(jax.tree.leaves(new_params),
                                jax.tree.leaves(params), strict=True):
                    np.testing.assert_array_equal(a, b)
            params = new_params
    assert traces[0] == 2  # once per dtype, never per step


def test_ae_sam_statistics_match_reference_at_every_step():
    # The decisions alone can hide a wrong statistic (e.g. σ² measured around
    # μ_{t-1} instead of μ_t): compare μ_t and σ²_t themselves, every step.
    problem = PROBLEMS["mlp"]()
    steps, delta = 20, 0.7
    expected_stats = []
    run_reference(problem, SGD(0.3, momentum=0.9), steps,
                  ae_sam_direction(lambda t: 0.0, delta, expected_stats))
    tx = sam_optax.ae_sam(optax.sgd(0.3, momentum=0.9), 0.05, c=0.0,
                          delta=delta)
    states = []
    run_tx(tx, problem, steps, states)
    for t, state in enumerate(states):
        policy = sam_optax.core.find_sam_states(state)[0].schedule_state
        mean, var = expected_stats[t]
        np.testing.assert_allclose(float(policy.mean), mean, rtol=1e-4,
                                   err_msg=f"mean, step {t}")
        np.testing.assert_allclose(float(policy.variance), var, rtol=1e-3,
                                   atol=1e-7 * mean ** 2, err_msg=f"var, step {t}")

"""GCSAM (gradient-centralized SAM) against a float64 NumPy reference of the
paper's formula, its degenerate cases and its bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from descent_schedule_reference import assert_trajectories_close, run_tx
from numpy_reference import PROBLEMS, SGD, norm, tmap

import sam_optax

RHO, LR, MOMENTUM, STEPS = 0.1, 0.2, 0.9, 10


def centralize(g):
    """Yong et al. 2020 for a (fan_in, fan_out) kernel: subtract each output
    column's mean; vectors (biases) unchanged."""
    return g - g.mean(axis=0, keepdims=True) if g.ndim >= 2 else g


def run_gcsam(problem, steps):
    """Hassan et al. 2025: ε = ρ Φ(g)/‖Φ(g)‖, w ← w + base(Φ(∇L(w + ε)))."""
    params = tmap(lambda x: np.asarray(x, np.float64), problem.init)
    base = SGD(LR, MOMENTUM)
    state = base.init(params)
    history = []
    for _ in range(steps):
        g = tmap(centralize, problem.grad(params))
        n = norm(g)
        eps = tmap(lambda x: RHO * x / n if n > 0 else 0.0 * x, g)
        g_sam = tmap(centralize, problem.grad(tmap(np.add, params, eps)))
        upd, state = base.update(g_sam, state)
        params = tmap(np.add, params, upd)
        history.append(params)
    return history


def test_matches_float64_reference_of_the_paper():
    problem = PROBLEMS["mlp"]()
    expected = run_gcsam(problem, STEPS)
    actual, flags, _ = run_tx(
        sam_optax.gcsam(optax.sgd(LR, momentum=MOMENTUM), RHO), problem, STEPS)
    assert all(flags)
    assert_trajectories_close(actual, expected)
    # Centralization is not a no-op here: plain SAM ends elsewhere.
    plain, _, _ = run_tx(sam_optax.sam(optax.sgd(LR, momentum=MOMENTUM), RHO),
                         problem, STEPS)
    assert norm(tmap(np.subtract, plain[-1], expected[-1])) > 1e-3


def test_zero_gradient_bf16_and_no_retracing():
    params = {"k": jnp.ones((3, 2), jnp.bfloat16), "b": jnp.zeros(2, jnp.bfloat16)}
    tx = sam_optax.gcsam(optax.sgd(0.1), RHO)
    zero = lambda p: jax.tree.map(jnp.zeros_like, p)  # noqa: E731
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)
        return tx.update(zero(p), s, p, grad_fn=zero)

    state = tx.init(params)
    for _ in range(3):
        updates, state = step(params, state)
        assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
        assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert len(traces) == 1
    assert float(sam_optax.diagnostics(state).perturbation_norm) == 0.0


@pytest.mark.parametrize("argument", [{"rho": -0.1}, {"rho": float("inf")},
                                      {"mask": "yes"}, {"sync_period": 2}])
def test_bad_arguments(argument):
    with pytest.raises((ValueError, TypeError)):
        sam_optax.gcsam(optax.sgd(0.1), **argument)

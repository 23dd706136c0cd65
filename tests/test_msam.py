"""MSAM against a float64 NumPy reference of the authors' SGD algorithm."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from descent_schedule_reference import assert_trajectories_close, run_msam
from numpy_reference import PROBLEMS

import sam_optax

STEPS = 12


def _run(tx, problem, steps=STEPS, msam=True):
    params = jax.tree.map(jnp.float32, problem.init)
    grad_fn = jax.grad(problem.jax_loss)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(grad_fn(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    perturbed, clean = [], []
    for _ in range(steps):
        params, state = step(params, state)
        as64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)
        perturbed.append(as64(params))
        if msam:
            clean.append(as64(sam_optax.msam_clean_params(params, state)))
    return perturbed, clean, params, state


@pytest.mark.parametrize("problem_name", ["logistic", "mlp"])
def test_msam_matches_reference(problem_name):
    problem = PROBLEMS[problem_name]()
    expected, expected_clean = run_msam(problem, lr=0.3, momentum=0.9, rho=0.1,
                                        steps=STEPS)
    perturbed, clean, _, state = _run(
        sam_optax.msam(optax.sgd(0.3, momentum=0.9), rho=0.1), problem)
    assert_trajectories_close(perturbed, expected)
    assert_trajectories_close(clean, expected_clean)
    diag = sam_optax.diagnostics(state)
    assert not bool(diag.perturbed)
    assert float(diag.perturbation_norm) == pytest.approx(0.1, rel=1e-5)


def test_msam_rho_zero_is_the_base_optimizer():
    problem = PROBLEMS["mlp"]()
    base = optax.sgd(0.3, momentum=0.9)
    msam_traj, _, _, _ = _run(sam_optax.msam(base, rho=0.0), problem)
    base_traj, _, _, _ = _run(
        optax.GradientTransformationExtraArgs(
            base.init, lambda g, s, p, **kw: base.update(g, s, p)), problem,
        msam=False)
    assert_trajectories_close(msam_traj, base_traj, rtol=1e-6, atol=1e-7)


def test_clean_and_perturbed_params_are_inverse():
    problem = PROBLEMS["mlp"]()
    tx = sam_optax.msam(optax.sgd(0.3, momentum=0.9), rho=0.2)
    _, _, params, state = _run(tx, problem, steps=3)
    clean = sam_optax.msam_clean_params(params, state)
    back = sam_optax.msam_perturbed_params(clean, state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    distance = np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2)
                           for a, b in zip(jax.tree.leaves(clean),
                                           jax.tree.leaves(params), strict=True)))
    assert distance == pytest.approx(0.2, rel=1e-5)


def test_msam_with_adam_and_weight_decay_runs_finite():
    problem = PROBLEMS["mlp"]()
    tx = sam_optax.msam(optax.adamw(1e-2, weight_decay=1e-2), rho=0.05)
    perturbed, clean, _, _ = _run(tx, problem, steps=5)
    assert all(np.all(np.isfinite(x)) for t in perturbed + clean
               for x in jax.tree.leaves(t))
    assert problem.loss(clean[-1]) < problem.loss(problem.init)


def test_msam_argument_errors():
    with pytest.raises(ValueError, match="sync_perturbation"):
        sam_optax.msam(optax.sgd(0.1), sync_perturbation=True)
    with pytest.raises(ValueError, match="rho"):
        sam_optax.msam(optax.sgd(0.1), rho=float("inf"))
    with pytest.raises(ValueError, match="two MSAM|exactly one"):
        sam_optax.msam_clean_params({"w": jnp.zeros(2)}, optax.sgd(0.1).init(
            {"w": jnp.zeros(2)}))


def test_msam_replicas_stay_identical_under_axis_name():
    problem = PROBLEMS["quadratic"]()
    tx = sam_optax.msam(optax.sgd(0.1, momentum=0.9), rho=0.1, axis_name="r")
    params = jax.tree.map(jnp.float32, problem.init)
    scales = jnp.array([0.5, 1.0, 2.0, 4.0])

    def step(scale, params, state):
        grads = jax.grad(lambda p: scale * problem.jax_loss(p))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    mapped = jax.jit(jax.vmap(step, in_axes=(0, None, None), axis_name="r"))
    state = tx.init(params)
    for _ in range(3):
        new_params, states = mapped(scales, params, state)
        for leaf in jax.tree.leaves((new_params, states.ascent_state)):
            np.testing.assert_allclose(leaf, leaf[:1].repeat(4, 0), rtol=1e-6)
        params = jax.tree.map(lambda x: x[0], new_params)
        state = jax.tree.map(lambda x: x[0], states)

"""MSAM against a float64 NumPy reference of the authors' SGD algorithm."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from descent_schedule_reference import (
    assert_trajectories_close,
    run_msam,
    run_msam_general,
)
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



@pytest.mark.parametrize("helper", [sam_optax.msam_clean_params,
                                    sam_optax.msam_perturbed_params])
def test_clean_params_need_an_msam_state_and_say_so(helper):
    params = {"w": jnp.zeros(2)}
    name = helper.__name__
    for not_msam in (optax.sgd(0.1).init(params),
                     sam_optax.sam(optax.sgd(0.1)).init(params),
                     sam_optax.vasso(optax.sgd(0.1)).init(params)):
        with pytest.raises(ValueError, match=rf"`{name}` needs the optimizer "
                           r"state of `sam_optax.msam\(...\)`.*no MSAM state"):
            helper(params, not_msam)
    msam = sam_optax.msam(optax.sgd(0.1, momentum=0.9))
    # Inside a chain it is found; two of them are ambiguous.
    chained = optax.chain(optax.clip(1.0), msam).init(params)
    helper(params, chained)
    with pytest.raises(ValueError, match="2 MSAM states"):
        helper(params, (msam.init(params), msam.init(params)))
    with pytest.raises(ValueError, match="tree structure"):
        helper({"v": jnp.zeros(2)}, msam.init(params))


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


def test_base_tx_sees_the_clean_weights():
    """Weight decay in ``base_tx`` acts on w, not on the perturbed w + ε: the
    float64 reference decays the clean weights."""
    problem = PROBLEMS["mlp"]()
    base = optax.chain(optax.add_decayed_weights(0.1),
                       optax.sgd(0.3, momentum=0.9))
    expected, expected_clean = run_msam_general(
        problem, lr=0.3, momentum=0.9, rho=0.2, steps=STEPS, weight_decay=0.1)
    perturbed, clean, _, _ = _run(sam_optax.msam(base, rho=0.2), problem)
    assert_trajectories_close(perturbed, expected)
    assert_trajectories_close(clean, expected_clean)
    # Guard: decaying the perturbed weights instead is a visible difference.
    wrong = run_msam_general(problem, lr=0.3, momentum=0.9, rho=0.2,
                             steps=STEPS, weight_decay=0.0)[0]
    with pytest.raises(AssertionError):
        assert_trajectories_close(wrong, expected)


def test_float64_params_keep_rho_in_float64():
    """With x64, ε (and ρ) are float64 for float64 params: 1e-12 agreement."""
    problem = PROBLEMS["quadratic"]()
    expected, expected_clean = run_msam(problem, lr=0.1, momentum=0.9, rho=0.1,
                                        steps=STEPS)
    with jax.enable_x64(True):
        a, c = jnp.asarray(problem.a), jnp.asarray(problem.c)
        grad_fn = lambda p: {"w": a @ (p["w"] - c)}  # noqa: E731
        tx = sam_optax.msam(optax.sgd(0.1, momentum=0.9), rho=0.1)
        params = {"w": jnp.asarray(problem.init["w"], jnp.float64)}
        state = tx.init(params)
        assert state.ascent_state.perturbation["w"].dtype == jnp.float64

        @jax.jit
        def step(params, state):
            updates, state = tx.update(grad_fn(params), state, params)
            return optax.apply_updates(params, updates), state

        for t in range(STEPS):
            params, state = step(params, state)
            clean = sam_optax.msam_clean_params(params, state)
            assert params["w"].dtype == jnp.float64
            np.testing.assert_allclose(params["w"], expected[t]["w"],
                                       rtol=1e-12, atol=1e-13)
            np.testing.assert_allclose(clean["w"], expected_clean[t]["w"],
                                       rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_nonfinite_gradient_gives_zero_next_perturbation(bad):
    """A non-finite gradient makes the base update (which defines ε_{t+1})
    non-finite: ε_{t+1} = 0, never NaN, and the clean weights stay readable."""
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    tx = sam_optax.msam(optax.sgd(0.1, momentum=0.9), rho=0.1)
    state = tx.init(params)
    _, state = tx.update({"w": jnp.ones(3)}, state, params)
    assert float(jnp.linalg.norm(state.ascent_state.perturbation["w"])) > 0.09
    _, state = tx.update({"w": jnp.array([1.0, bad, 1.0])}, state, params)
    np.testing.assert_array_equal(state.ascent_state.perturbation["w"], 0.0)
    assert np.all(np.isfinite(sam_optax.msam_clean_params(params, state)["w"]))


@pytest.mark.parametrize("bad_rho", [-0.2, np.nan])
def test_scheduled_rho_that_is_negative_or_nan_is_zero(bad_rho):
    params = {"w": jnp.array([1.0, -2.0])}
    tx = sam_optax.msam(optax.sgd(0.1, momentum=0.9), rho=lambda count: bad_rho)
    _, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
    np.testing.assert_array_equal(state.ascent_state.perturbation["w"], 0.0)

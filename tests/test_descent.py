"""GSAM, WSAM and LookSAM against float64 NumPy references of their papers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from descent_schedule_reference import (
    assert_trajectories_close,
    gsam_direction,
    looksam_direction,
    orthogonal,
    run_reference,
    run_tx,
    run_wsam_decoupled,
    wsam_coupled_direction,
)
from numpy_reference import PROBLEMS, SGD, run_sam

import sam_optax
from sam_optax import descent

STEPS = 12  # crosses several LookSAM refresh boundaries for k = 3, 5


@pytest.mark.parametrize("problem_name", ["mlp"])
def test_gsam_matches_reference_with_lr_following_rho(problem_name):
    problem = PROBLEMS[problem_name]()
    lr = optax.linear_schedule(0.5, 0.05, STEPS)
    rho = sam_optax.gsam_rho_schedule(lr, lr_max=0.5, lr_min=0.05,
                                      rho_max=0.1, rho_min=0.02)
    rho_ref = lambda t: 0.02 + (0.1 - 0.02) * (float(lr(t)) - 0.05) / 0.45

    class ScheduledSGD(SGD):
        def update(self, grads, trace):
            self.lr = float(lr(self.t))
            self.t += 1
            return super().update(grads, trace)

    base = ScheduledSGD(0.0, momentum=0.9)
    base.t = 0
    expected, _ = run_reference(problem, base, STEPS, gsam_direction(0.3),
                                rho=rho_ref)
    tx = sam_optax.gsam(optax.sgd(lr, momentum=0.9), rho=rho, alpha=0.3)
    actual, flags, state = run_tx(tx, problem, STEPS)
    assert_trajectories_close(actual, expected)
    assert all(flags)
    np.testing.assert_allclose(float(state.rho), rho_ref(STEPS - 1), rtol=1e-6)


def test_gsam_alpha_zero_is_sam():
    problem = PROBLEMS["mlp"]()
    gsam_traj, _, _ = run_tx(
        sam_optax.gsam(optax.sgd(0.3, momentum=0.9), 0.05, alpha=0.0),
        problem, STEPS)
    expected = run_sam(problem, SGD(0.3, momentum=0.9), 0.05, STEPS)
    assert_trajectories_close(gsam_traj, expected)


def test_gsam_rho_schedule_endpoints_and_errors():
    lr = optax.cosine_decay_schedule(1.0, 10, alpha=0.1)
    rho = sam_optax.gsam_rho_schedule(lr, lr_max=1.0, lr_min=0.1,
                                      rho_max=0.05, rho_min=0.01)
    assert float(rho(0)) == pytest.approx(0.05)
    assert float(rho(10)) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="lr_max"):
        sam_optax.gsam_rho_schedule(lr, lr_max=0.1, lr_min=0.1, rho_max=0.1,
                                    rho_min=0.0)
    with pytest.raises(ValueError, match="rho_max"):
        sam_optax.gsam_rho_schedule(lr, lr_max=1.0, lr_min=0.1, rho_max=0.01,
                                    rho_min=0.05)
    with pytest.raises(ValueError, match="learning_rate"):
        sam_optax.gsam_rho_schedule(0.1, lr_max=1.0, lr_min=0.1, rho_max=0.1,
                                    rho_min=0.0)


@pytest.mark.parametrize("gamma", [0.0, 0.9])  # γ = 0: the base optimizer
def test_wsam_coupled_matches_reference(gamma):
    problem = PROBLEMS["mlp"]()
    expected, _ = run_reference(problem, SGD(0.2, momentum=0.9), STEPS,
                                wsam_coupled_direction(gamma))
    tx = sam_optax.wsam(optax.sgd(0.2, momentum=0.9), rho=0.05, gamma=gamma)
    actual, _, _ = run_tx(tx, problem, STEPS)
    assert_trajectories_close(actual, expected)


@pytest.mark.parametrize("gamma", [0.0, 0.8])  # γ = 0: the base optimizer
def test_wsam_decoupled_matches_reference(gamma):
    problem = PROBLEMS["logistic"]()
    lr = optax.exponential_decay(0.5, 1, 0.9)
    lr_ref = lambda t: 0.5 * 0.9 ** t

    class ScheduledSGD(SGD):
        def update(self, grads, trace):
            self.lr = lr_ref(self.t)
            self.t += 1
            return super().update(grads, trace)

    base = ScheduledSGD(0.0, momentum=0.5)
    base.t = 0
    expected = run_wsam_decoupled(problem, base, STEPS, gamma, lr_ref)
    tx = sam_optax.wsam(optax.sgd(lr, momentum=0.5), rho=0.05, gamma=gamma,
                        decoupled=True, learning_rate=lr)
    actual, _, _ = run_tx(tx, problem, STEPS)
    assert_trajectories_close(actual, expected)


def test_wsam_coupled_with_gamma_half_is_sam():
    problem = PROBLEMS["mlp"]()
    half, _, _ = run_tx(sam_optax.wsam(optax.sgd(0.2, momentum=0.9), 0.05,
                                       gamma=0.5), problem, STEPS)
    expected = run_sam(problem, SGD(0.2, momentum=0.9), 0.05, STEPS)
    assert_trajectories_close(half, expected)


def test_wsam_argument_errors():
    with pytest.raises(ValueError, match="learning_rate"):
        sam_optax.wsam(optax.sgd(0.1), gamma=0.5, decoupled=True)
    with pytest.raises(ValueError, match="learning_rate"):
        sam_optax.wsam(optax.sgd(0.1), gamma=0.5, learning_rate=0.1)


@pytest.mark.parametrize("problem_name,k,alpha", [("mlp", 5, 0.7),
                                                  ("logistic", 3, 0.2)])
def test_looksam_matches_reference(problem_name, k, alpha):
    problem = PROBLEMS[problem_name]()
    expected, expected_flags = run_reference(
        problem, SGD(0.3, momentum=0.9), STEPS, looksam_direction(k, alpha))
    tx = sam_optax.looksam(optax.sgd(0.3, momentum=0.9), rho=0.05, k=k,
                           alpha=alpha)
    actual, flags, _ = run_tx(tx, problem, STEPS)
    assert flags == expected_flags == [t % k == 0 for t in range(STEPS)]
    assert_trajectories_close(actual, expected)


def test_looksam_k1_is_sam():
    problem = PROBLEMS["mlp"]()
    expected = run_sam(problem, SGD(0.3, momentum=0.9), 0.05, STEPS)
    actual, flags, _ = run_tx(
        sam_optax.looksam(optax.sgd(0.3, momentum=0.9), 0.05, k=1), problem,
        STEPS)
    assert all(flags)
    assert_trajectories_close(actual, expected)


def test_orthogonal_part_matches_reference_and_is_safe_at_zero():
    rng = np.random.RandomState(0)
    a = {"x": rng.randn(3, 2), "y": rng.randn(4)}
    b = {"x": rng.randn(3, 2), "y": rng.randn(4)}
    got = descent.orthogonal_part(jax.tree.map(jnp.float32, a),
                                  jax.tree.map(jnp.float32, b))
    want = orthogonal(a, b)
    for key in a:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)
    zero = jax.tree.map(jnp.zeros_like, jax.tree.map(jnp.float32, b))
    same = descent.orthogonal_part(jax.tree.map(jnp.float32, a), zero)
    for key in a:
        np.testing.assert_allclose(same[key], a[key], rtol=1e-6)


# ---------------------------------------- trust: ρ schedules, x64, odd trees


def test_gsam_rho_schedule_never_leaves_its_range():
    # A learning rate above lr_max (a warm-up overshoot) or below lr_min must
    # not extrapolate: below lr_min that would make ρ negative.
    lr = lambda count: jnp.asarray([2.0, 1.0, 0.5, 0.1, 0.0])[count]  # noqa: E731
    rho = sam_optax.gsam_rho_schedule(lr, lr_max=1.0, lr_min=0.1,
                                      rho_max=0.05, rho_min=0.01)
    values = [float(rho(t)) for t in range(5)]
    expected = [0.05, 0.05, 0.01 + 0.04 * (0.4 / 0.9), 0.01, 0.01]
    np.testing.assert_allclose(values, expected, rtol=1e-6)


def test_gsam_rho_schedule_and_decoupled_wsam_are_float64_under_x64():
    with jax.enable_x64(True):
        lr = lambda t: 0.03 + 0.27 * 0.5 * (1 + jnp.cos(jnp.pi * t / 50))  # noqa: E731
        rho = sam_optax.gsam_rho_schedule(lr, lr_max=0.3, lr_min=0.03,
                                          rho_max=0.05, rho_min=0.01)
        for t in (0, 7, 23, 50):
            lr_t = 0.03 + 0.27 * 0.5 * (1 + np.cos(np.pi * t / 50))
            expected = 0.01 + 0.04 * (lr_t - 0.03) / 0.27
            assert rho(t).dtype == jnp.float64
            np.testing.assert_allclose(float(rho(t)), expected, rtol=1e-13)

        # Decoupled WSAM with a float64 learning-rate schedule: every step
        # against the float64 reference to float64 precision.
        problem = PROBLEMS["quadratic"]()
        gamma, steps = 0.8, 6
        # (optax's own schedules compute in float32 even under x64.)
        lr_fn = lambda count: 0.3 - 0.2 * count / steps  # noqa: E731
        expected = run_wsam_decoupled(problem, SGD(0.2), steps, gamma,
                                      lambda t: 0.3 - 0.2 * t / steps)
        tx = sam_optax.wsam(optax.sgd(0.2), rho=0.05, gamma=gamma,
                            decoupled=True, learning_rate=lr_fn)
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64),
                              problem.init)
        a64, c64 = jnp.asarray(problem.a), jnp.asarray(problem.c)  # float64
        grad_fn = jax.grad(lambda p: 0.5 * (p["w"] - c64) @ a64 @ (p["w"] - c64))
        state = tx.init(params)
        for t in range(steps):
            updates, state = tx.update(grad_fn(params), state, params,
                                       grad_fn=grad_fn)
            params = optax.apply_updates(params, updates)
            for a, e in zip(jax.tree.leaves(params), jax.tree.leaves(expected[t])):
                assert a.dtype == jnp.float64
                np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["looksam", "every_k_sam", "gsam", "wsam"])
def test_trees_with_int_and_empty_leaves(name):
    # The same trees `sam` takes: an int leaf (not perturbed, not updated by
    # SGD), a zero-size leaf, an empty dict.
    tx = getattr(sam_optax, name)(optax.sgd(0.1), rho=0.05)
    loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2)  # noqa: E731
    grad_fn = lambda p: jax.tree.map(  # noqa: E731
        lambda x, g: g if jnp.issubdtype(x.dtype, jnp.floating)
        else jnp.zeros_like(x), p, jax.grad(loss, allow_int=True)(p))
    params = {"w": jnp.zeros(3), "i": jnp.arange(2), "e": jnp.zeros((0, 4)),
              "none": {}}
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))
    for _ in range(6):  # crosses skipped and paid steps for k-step variants
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    assert np.all(np.isfinite(params["w"])) and float(params["w"][0]) > 0.1
    np.testing.assert_array_equal(params["i"], [0, 1])

"""GAM (gradient-norm aware minimization, Zhang et al. 2023, Alg. 1) against a
float64 NumPy reference with analytic Hessians, its Hessian-vector products,
degenerate inputs, data parallelism and bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy_reference import SGD, Logistic, Quadratic, tmap
from sam_steps import iterate
from x64_problems import assert_close64

import sam_optax
from sam_optax import parallel
from sam_optax.ascent import hessian_vector_product

RHO, ALPHA, LR, MOMENTUM, STEPS = 0.3, 0.5, 0.5, 0.9, 12

# ------------------------------------------------- float64 NumPy reference
# Logistic regression: ℓ(θ) = mean log(1 + exp(−y aᵀθ)), a = [x, 1], whose
# Hessian is known in closed form: Aᵀ diag(σ(z)σ(−z)) A / n.


def sigmoid(t):
    return 1.0 / (1.0 + np.exp(-t))


def flat(p):
    return np.concatenate([np.ravel(p["w"]), np.ravel(p["b"])])


def unflat(theta):
    return {"w": theta[:-1], "b": np.array(theta[-1])}


def logistic_grad(theta, x, y):
    a = np.hstack([x, np.ones((len(x), 1))])
    z = y * (a @ theta)
    return a.T @ (-y * sigmoid(-z)) / len(y)


def logistic_hessian(theta, x, y):
    a = np.hstack([x, np.ones((len(x), 1))])
    z = y * (a @ theta)
    return a.T @ (a * (sigmoid(z) * sigmoid(-z))[:, None]) / len(y)


def unit(v):
    n = np.linalg.norm(v)
    return v / n if n > 0 else np.zeros_like(v)


def gam_direction(theta, chunks, rho, alpha, keep=None, sync=False):
    """What ``base_tx`` receives, from the paper's Algorithm 1.

    ``chunks``: ``[(x, y), ...]``, one per replica (one: the whole batch).
    Per chunk k: ``f_k = H_k(θ) ĝ_k``, ``θ_k = θ + ρ f_k/‖f_k‖`` (only the
    ``keep`` coordinates move), ``g_adv,k = ∇ℓ_k(θ_k)``. The base optimizer
    gets ``ḡ + αρ mean_k H_k(θ_k) u``, ``u`` the unit mean ``g_adv``. With
    ``sync``, ĝ and f come from the mean over chunks (one θ_adv).
    """
    grads = [logistic_grad(theta, x, y) for x, y in chunks]
    keep = np.ones_like(theta, bool) if keep is None else keep
    if sync:
        g_hat = unit(np.mean(grads, axis=0))
        f = np.mean([logistic_hessian(theta, x, y) @ g_hat for x, y in chunks],
                    axis=0)
        points = [theta + rho * unit(np.where(keep, f, 0.0))] * len(chunks)
    else:
        points = [theta + rho * unit(np.where(
            keep, logistic_hessian(theta, x, y) @ unit(g), 0.0))
            for g, (x, y) in zip(grads, chunks)]
    g_adv = np.mean([logistic_grad(p, x, y) for p, (x, y) in
                     zip(points, chunks)], axis=0)
    u = unit(g_adv)
    curvature = np.mean([logistic_hessian(p, x, y) @ u for p, (x, y) in
                         zip(points, chunks)], axis=0)
    return np.mean(grads, axis=0) + alpha * rho * curvature


def run_reference(problem, steps, rho, alpha, keep=None, chunks=1,
                  sync=False):
    theta = flat(tmap(lambda v: np.asarray(v, np.float64), problem.init))
    parts = list(zip(np.split(problem.x, chunks), np.split(problem.y, chunks)))
    base = SGD(LR, MOMENTUM)
    trace = base.init(theta)
    history = []
    for t in range(steps):
        rho_t = rho(t) if callable(rho) else rho
        upd, trace = base.update(gam_direction(theta, parts, rho_t, alpha,
                                               keep, sync), trace)
        theta = theta + upd
        history.append(unflat(theta))
    return history


def logistic_loss64(problem):
    x, y = jnp.asarray(problem.x), jnp.asarray(problem.y)

    def loss(p, batch=None):
        xb, yb = (x, y) if batch is None else batch
        z = yb * (xb @ p["w"] + p["b"])
        return jnp.mean(jnp.logaddexp(0.0, -z))

    return loss


def init64(problem):
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), problem.init)


@pytest.mark.parametrize("case", ["plain", "masked", "rho_schedule"])
def test_matches_float64_reference_of_algorithm_1(case):
    problem = Logistic()
    rho = optax.linear_schedule(RHO, 0.1, STEPS) if case == "rho_schedule" \
        else RHO
    mask = {"w": True, "b": False} if case == "masked" else None
    keep = np.array([True] * 4 + [False]) if case == "masked" else None
    states = []
    with jax.enable_x64(True):
        tx = sam_optax.gam(optax.sgd(LR, momentum=MOMENTUM), rho, ALPHA,
                           mask=mask)
        actual, state = iterate(tx, logistic_loss64(problem), init64(problem),
                                STEPS, states=states)
        assert sam_optax.diagnostics(state).perturbed
    # optax's schedule is float32 arithmetic, which XLA may round otherwise
    # than the host: the reference reads the ρ_t each step used (exact: it
    # is float32, as the state's record of it). A Python float stays float64.
    rho_used = [float(s.rho) for s in states]
    np.testing.assert_allclose(rho_used, [float(rho(t)) for t in range(STEPS)]
                               if callable(rho) else RHO, rtol=1e-6)
    expected = run_reference(problem, STEPS, rho_used.__getitem__
                             if callable(rho) else RHO, ALPHA, keep)
    assert_close64(actual, expected, rtol=1e-9, atol=1e-12)
    # The flatness term matters here: plain SGD (α = 0) ends elsewhere.
    sgd = run_reference(problem, STEPS, RHO, 0.0)
    assert np.max(np.abs(flat(sgd[-1]) - flat(expected[-1]))) > 1e-3


def test_hessian_vector_product_is_the_exact_hessian_product():
    problem = Quadratic(dim=5)
    rng = np.random.RandomState(3)
    w, v = rng.randn(5), rng.randn(5)
    with jax.enable_x64(True):
        a, c = jnp.asarray(problem.a), jnp.asarray(problem.c)
        loss = lambda p: 0.5 * (p["w"] - c) @ a @ (p["w"] - c)  # noqa: E731
        # An integer leaf takes no part and gets a zero product.
        point = {"w": jnp.asarray(w), "n": jnp.array(3, jnp.int32)}
        grad_fn = jax.grad(loss, allow_int=True)  # float0 for "n"
        product = hessian_vector_product(grad_fn, point,
                                          {"w": jnp.asarray(v), "n": 0.0})
        np.testing.assert_allclose(product["w"], problem.a @ v, rtol=1e-13)
        assert product["w"].dtype == jnp.float64
        np.testing.assert_array_equal(product["n"], 0.0)

        # One GAM step with sgd(1): the update is −(g + αρ A ĝ_adv), where
        # θ_adv = w + ρ Aĝ/‖Aĝ‖ and g_adv = A(θ_adv − c).
        tx = sam_optax.gam(optax.sgd(1.0), RHO, ALPHA)
        params = {"w": jnp.asarray(w)}
        updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params,
                               grad_fn=jax.grad(loss))
    g = problem.a @ (w - problem.c)
    adv = w + RHO * unit(problem.a @ unit(g))
    expected = g + ALPHA * RHO * problem.a @ unit(problem.a @ (adv - problem.c))
    np.testing.assert_allclose(-np.asarray(updates["w"]), expected, rtol=1e-12)


def test_zero_gradient_bf16_and_no_retracing():
    params = {"k": jnp.ones((3, 2), jnp.bfloat16), "b": jnp.zeros(2, jnp.bfloat16)}
    tx = sam_optax.gam(optax.sgd(0.1), RHO, ALPHA)
    zero_loss = lambda p: 0.0 * sum(jnp.sum(x) for x in jax.tree.leaves(p))  # noqa: E731
    quartic = lambda p: sum(jnp.sum(x.astype(jnp.float32) ** 4)  # noqa: E731
                            for x in jax.tree.leaves(p))
    traces = []

    def step(loss):
        @jax.jit
        def run(p, s):
            traces.append(1)
            grad_fn = jax.grad(loss)
            return tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
        return run

    zero_step, quartic_step = step(zero_loss), step(quartic)
    state = tx.init(params)
    for _ in range(3):
        updates, state = zero_step(params, state)
        assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
        assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert float(sam_optax.diagnostics(state).perturbation_norm) == 0.0
    p = params
    for _ in range(3):
        updates, state = quartic_step(p, state)
        p = optax.apply_updates(p, updates)
        assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
        assert all(np.all(np.isfinite(np.asarray(u, np.float32)))
                   for u in jax.tree.leaves(updates))
    assert len(traces) == 2  # one trace per step function, none per call
    assert float(quartic(p)) < float(quartic(params))
    assert float(sam_optax.diagnostics(state).perturbation_norm) == \
        pytest.approx(RHO)


@pytest.mark.parametrize("kwargs", [{"rho": 0.0}, {"alpha": 0.0}])
def test_rho_or_alpha_zero_is_the_base_optimizer(kwargs):
    problem = Logistic()
    expected = run_reference(problem, 4, 0.0, 0.0)
    with jax.enable_x64(True):
        tx = sam_optax.gam(optax.sgd(LR, momentum=MOMENTUM),
                           **{"rho": RHO, "alpha": ALPHA, **kwargs})
        actual, _ = iterate(tx, logistic_loss64(problem), init64(problem), 4)
    assert_close64(actual, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("sync", [False, True])
def test_axis_name_under_vmap_over_chunks_matches_per_chunk_reference(sync):
    """Per-chunk θ_adv (m-sharpness), or one with ``sync_perturbation``;
    the second product is averaged over chunks, so replicas agree."""
    problem, chunks = Logistic(n=32), 4
    expected = run_reference(problem, 4, RHO, ALPHA, chunks=chunks, sync=sync)
    with jax.enable_x64(True):
        tx = sam_optax.gam(optax.sgd(LR, momentum=MOMENTUM), RHO, ALPHA,
                           axis_name="chunks", sync_perturbation=sync)
        loss = logistic_loss64(problem)
        step = jax.jit(parallel.chunked_step(
            tx, lambda p, b: loss(p, (b["x"], b["y"])), 32 // chunks))
        batch = {"x": jnp.asarray(problem.x), "y": jnp.asarray(problem.y)}
        params, state = init64(problem), tx.init(init64(problem))
        actual = []
        for _ in range(4):
            params, state, _ = step(params, state, batch)
            actual.append(jax.tree.map(np.asarray, params))
    assert_close64(actual, expected, rtol=1e-9, atol=1e-12)
    if sync:  # one θ_adv over equal chunks: GAM on the whole batch
        assert_close64(actual, run_reference(problem, 4, RHO, ALPHA),
                       rtol=1e-9, atol=1e-12)


def test_inside_optax_chain():
    problem = Logistic()
    loss = problem.jax_loss
    params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), problem.init)

    def gam():
        return sam_optax.gam(optax.sgd(LR, momentum=MOMENTUM), RHO, ALPHA)

    alone, _ = iterate(gam(), loss, params, 3)
    for tx in (optax.chain(gam(), optax.identity()),
               optax.chain(optax.identity(), gam())):
        chained, state = iterate(tx, loss, params, 3)
        for a, b in zip(alone, chained):
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
                np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
        assert float(sam_optax.diagnostics(state).perturbation_norm) == \
            pytest.approx(RHO)


@pytest.mark.parametrize("kwargs, argument", [
    ({"rho": -0.1}, "rho"), ({"rho": float("inf")}, "rho"),
    ({"alpha": -1.0}, "alpha"), ({"alpha": float("nan")}, "alpha"),
    ({"alpha": float("inf")}, "alpha"), ({"alpha": "big"}, "alpha"),
    ({"mask": "yes"}, "mask"), ({"full_diagnostics": 1}, "full_diagnostics"),
])
def test_bad_arguments_name_themselves(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        sam_optax.gam(optax.sgd(0.1), **kwargs)


def test_optax_contrib_arguments_point_to_the_migration_notes():
    with pytest.raises(TypeError, match="sync_period"):
        sam_optax.gam(optax.sgd(0.1), sync_period=2)

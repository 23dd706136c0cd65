"""bSAM (Möllenhoff & Khan 2023, arXiv:2210.01620, Algorithm 1) against a
float64 NumPy reference that takes the posterior noise as input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy_reference import PROBLEMS, tmap
from test_sampa import jax_loss64

import sam_optax

STEPS = 12
HYPER = {"rho": 0.05, "num_data": 200.0, "beta1": 0.9, "beta2": 0.99,
         "weight_decay": 1e-3, "damping": 0.1, "init_precision": 2.0}


# ------------------------------------------------------------- reference


def run_bsam_reference(chunk_grads, init, noises, lr, rho, num_data, beta1,
                       beta2, weight_decay, damping, init_precision):
    """Algorithm 1 in float64. ``chunk_grads``: one gradient function per
    sub-batch (one for the plain algorithm); ``noises[t][r]``: z of step t,
    sub-batch r. Per sub-batch r (as the authors' code does):

        θ_r = w + z_r/√(N s),  g_r = ∇ℓ_r(θ_r),  ε_r = ρ g_r/s,
        g_ε = mean_r ∇ℓ_r(w + ε_r),  c = mean_r √s |g_r|
        m ← β₁m + (1−β₁)(g_ε + δw),  s ← β₂s + (1−β₂)(c + δ + γ),
        w ← w − α_t m/s
    """
    w = tmap(lambda a: np.asarray(a, np.float64), init)
    m = tmap(np.zeros_like, w)
    s = tmap(lambda a: np.full_like(a, init_precision), w)
    history = []
    for t, step_noises in enumerate(noises):
        g_eps_sum = tmap(np.zeros_like, w)
        c_sum = tmap(np.zeros_like, w)
        for grad, z in zip(chunk_grads, step_noises, strict=True):
            theta = tmap(lambda w_, z_, s_: w_ + z_ / np.sqrt(num_data * s_),
                         w, z, s)
            g = grad(theta)
            eps = tmap(lambda g_, s_: rho * g_ / s_, g, s)
            g_eps = grad(tmap(np.add, w, eps))
            g_eps_sum = tmap(np.add, g_eps_sum, g_eps)
            c_sum = tmap(lambda c_, s_, g_: c_ + np.sqrt(s_) * np.abs(g_),
                         c_sum, s, g)
        r = len(chunk_grads)
        m = tmap(lambda m_, ge, w_: beta1 * m_ + (1 - beta1) * (
            ge / r + weight_decay * w_), m, g_eps_sum, w)
        s = tmap(lambda s_, c_: beta2 * s_ + (1 - beta2) * (
            c_ / r + weight_decay + damping), s, c_sum)
        lr_t = lr(t) if callable(lr) else lr
        w = tmap(lambda w_, m_, s_: w_ - lr_t * m_ / s_, w, m, s)
        history.append(w)
    return history


def jax_noises(seed, params, steps, chunks=None):
    """z of each step as the docstring of `sam_optax.bsam` specifies: from
    the key sequence, one key per leaf (and per replica: the draw key folded
    with the replica index). Call under x64 for float64 draws."""
    leaves, treedef = jax.tree.flatten(params)
    key = jax.random.PRNGKey(seed)
    noises = []
    for _ in range(steps):
        key, draw = jax.random.split(key)
        draws = ([draw] if chunks is None
                 else [jax.random.fold_in(draw, r) for r in range(chunks)])
        step = []
        for d in draws:
            keys = jax.random.split(d, len(leaves))
            z = [jax.random.normal(k, np.shape(x), jnp.asarray(x).dtype)
                 for k, x in zip(keys, leaves, strict=True)]
            step.append(jax.tree.map(np.asarray, treedef.unflatten(z)))
        noises.append(step)
    return noises


def _close(actual, expected, rtol, atol):
    for a, e in zip(actual, expected, strict=True):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(e), strict=True):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def _run(tx, loss_fn, params, steps=STEPS):
    grad_fn = jax.value_and_grad(loss_fn)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(params, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    history = []
    for _ in range(steps):
        params, state = step(params, state)
        history.append(jax.tree.map(lambda a: np.asarray(a, np.float64),
                                    params))
    return history, state, params


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize("problem_name,scheduled", [("mlp", False),
                                                    ("logistic", True)])
def test_bsam_matches_float64_reference(problem_name, scheduled):
    problem = PROBLEMS[problem_name]()
    lr = optax.linear_schedule(0.05, 0.2, 8) if scheduled else 0.1
    with jax.enable_x64(True):
        params = jax.tree.map(jnp.float64, problem.init)
        noises = jax_noises(3, params, STEPS)
        tx = sam_optax.bsam(lr, seed=3, **HYPER)
        actual, state, _ = _run(tx, jax_loss64(problem), params)
        bayes = state.ascent_state
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(
            (bayes.momentum, bayes.precision)))
    expected = run_bsam_reference(
        [problem.grad], problem.init, noises,
        (lambda t: float(lr(t))) if scheduled else lr, **HYPER)
    _close(actual, expected, rtol=1e-9, atol=1e-12)
    assert problem.loss(expected[-1]) < problem.loss(problem.init)
    # The noise mattered: without it the trajectory is another one.
    zero_noise = [[tmap(np.zeros_like, n[0])] for n in noises]
    other = run_bsam_reference([problem.grad], problem.init, zero_noise,
                               (lambda t: float(lr(t))) if scheduled else lr,
                               **HYPER)
    assert not np.allclose(jax.tree.leaves(other[-1])[0],
                           jax.tree.leaves(expected[-1])[0], rtol=1e-6)
    diag = sam_optax.diagnostics(state)
    assert bool(diag.perturbed) and float(diag.perturbed_loss) > 0


def test_axis_name_gives_per_replica_noise_and_identical_replicas():
    problem = PROBLEMS["mlp"]()
    chunks = 4
    with jax.enable_x64(True):
        x = jnp.asarray(problem.x, jnp.float64).reshape(chunks, -1, 3)
        y = jnp.asarray(problem.y, jnp.float64).reshape(chunks, -1, 1)

        def loss_fn(p, xb, yb):
            h = jnp.tanh(xb @ p["l1"]["w"] + p["l1"]["b"])
            return 0.5 * jnp.mean((h @ p["l2"]["w"] + p["l2"]["b"] - yb) ** 2)

        tx = sam_optax.bsam(0.1, seed=5, axis_name="r", **HYPER)
        params = jax.tree.map(jnp.float64, problem.init)
        state = tx.init(params)
        noises = jax_noises(5, params, 6, chunks=chunks)

        def local_step(xb, yb, params, state):
            grad_fn = jax.grad(lambda p: loss_fn(p, xb, yb))
            updates, state = tx.update(params, state, params, grad_fn=grad_fn)
            return optax.apply_updates(params, updates), state

        step = jax.jit(jax.vmap(local_step, in_axes=(0, 0, None, None),
                                axis_name="r"))
        trajectory = []
        for _ in range(6):
            replicas, states = step(x, y, params, state)
            for leaf in jax.tree.leaves((replicas, states)):
                np.testing.assert_array_equal(leaf, jnp.broadcast_to(
                    leaf[0], leaf.shape))
            params, state = jax.tree.map(lambda a: a[0], (replicas, states))
            trajectory.append(jax.tree.map(np.asarray, params))

    def chunk_grad(r):
        sub = PROBLEMS["mlp"]()
        sub.x, sub.y = np.split(problem.x, chunks)[r], np.split(
            problem.y, chunks)[r]
        return sub.grad

    expected = run_bsam_reference([chunk_grad(r) for r in range(chunks)],
                                  problem.init, noises, 0.1, **HYPER)
    _close(trajectory, expected, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------ posterior and samples


def test_posterior_variance_and_samples():
    problem = PROBLEMS["logistic"]()
    params = jax.tree.map(jnp.float32, problem.init)
    tx = sam_optax.bsam(0.1, seed=1, **HYPER)
    _, state, params = _run(tx, problem.jax_loss, params, steps=5)
    mean, variance = sam_optax.bsam_posterior(params, state)
    assert mean is params
    for v, s in zip(jax.tree.leaves(variance),
                    jax.tree.leaves(state.ascent_state.precision), strict=True):
        np.testing.assert_allclose(v, 1.0 / (HYPER["num_data"] * s),
                                   rtol=1e-6)
    samples = sam_optax.bsam_sample(jax.random.key(0), params, state,
                                    num_samples=4000)
    for leaf, w, v in zip(jax.tree.leaves(samples), jax.tree.leaves(params),
                          jax.tree.leaves(variance), strict=True):
        assert leaf.shape == (4000, *np.shape(w))
        np.testing.assert_allclose(np.mean(leaf, 0), w,
                                   atol=4 * float(np.sqrt(np.max(v) / 4000)))
        np.testing.assert_allclose(np.var(leaf, 0), v, rtol=0.1)
    # Inside a chain it is found too.
    chained = optax.chain(optax.identity(), tx).init(params)
    assert sam_optax.bsam_posterior(params, chained).variance is not None


def test_sample_with_the_step_key_is_the_steps_noisy_point():
    """`bsam_sample(draw, w, state)` is w + z/√(N s) with the z of
    `jax_noises`, which the reference test shows the step uses."""
    params = {"a": jnp.array([0.5, -1.0]), "b": jnp.array(2.0)}
    state = sam_optax.bsam(0.1, seed=7, **HYPER).init(params)
    _, draw = jax.random.split(state.ascent_state.key)
    theta = sam_optax.bsam_sample(draw, params, state)
    (z,), = jax_noises(7, params, 1)
    scale = np.sqrt(HYPER["num_data"] * HYPER["init_precision"])
    for t, w, z_ in zip(jax.tree.leaves(theta), jax.tree.leaves(params),
                        jax.tree.leaves(z), strict=True):
        np.testing.assert_allclose(t, w + z_ / scale, rtol=1e-6)


def test_posterior_helpers_need_a_bsam_state():
    params = {"w": jnp.zeros(2)}
    for other in (optax.sgd(0.1).init(params),
                  sam_optax.sam(optax.sgd(0.1)).init(params)):
        with pytest.raises(ValueError, match=r"sam_optax.bsam\(...\).*0 bSAM"):
            sam_optax.bsam_posterior(params, other)
        with pytest.raises(ValueError, match="bsam_sample"):
            sam_optax.bsam_sample(jax.random.key(0), params, other)
    state = sam_optax.bsam(0.1, num_data=10).init(params)
    with pytest.raises(ValueError, match="tree structure"):
        sam_optax.bsam_posterior({"v": jnp.zeros(2)}, state)
    with pytest.raises(ValueError, match="num_samples"):
        sam_optax.bsam_sample(jax.random.key(0), params, state, num_samples=0)


# ------------------------------------------------------- numerics and cost


def test_zero_gradient_gives_no_nan():
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    tx = sam_optax.bsam(0.1, **HYPER)
    history, state, _ = _run(tx, lambda p: jnp.zeros([]), params, steps=4)
    assert all(np.all(np.isfinite(x)) for t in history
               for x in jax.tree.leaves(t))
    # Only the prior acts: s → β₂s + (1−β₂)(δ + γ), m from δw.
    s = HYPER["init_precision"]
    for _ in range(4):
        s = HYPER["beta2"] * s + (1 - HYPER["beta2"]) * (
            HYPER["weight_decay"] + HYPER["damping"])
    np.testing.assert_allclose(state.ascent_state.precision["w"], s,
                               rtol=1e-6)
    np.testing.assert_array_equal(history[-1]["b"], 0.0)
    assert np.all(history[-1]["w"] < 1.0)


def test_bfloat16_params():
    problem = PROBLEMS["mlp"]()
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), problem.init)
    tx = sam_optax.bsam(0.05, seed=2, **HYPER)
    history, state, final = _run(tx, lambda p: problem.jax_loss(
        jax.tree.map(lambda a: a.astype(jnp.float32), p)), params, steps=10)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(final))
    bayes = state.ascent_state
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(
        (bayes.momentum, bayes.precision)))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(history[-1]))
    assert problem.loss(history[-1]) < problem.loss(problem.init)


def test_no_retracing_and_stable_state():
    problem = PROBLEMS["logistic"]()
    params = jax.tree.map(jnp.float32, problem.init)
    tx = sam_optax.bsam(optax.cosine_decay_schedule(0.1, 10), seed=0,
                        full_diagnostics=True, **HYPER)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        loss, grads = jax.value_and_grad(problem.jax_loss)(params)
        updates, state = tx.update(grads, state, params,
                                   grad_fn=jax.grad(problem.jax_loss),
                                   value=loss)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    types = jax.tree.map(lambda a: (a.shape, a.dtype), state)
    keys = []
    for _ in range(6):
        params, state = step(params, state)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == types
        keys.append(tuple(np.asarray(state.ascent_state.key)))
    assert len(traces) == 1
    assert len(set(keys)) == 6  # a fresh draw at every step
    diag = sam_optax.diagnostics(state)
    assert float(diag.grad_norm) > 0 and float(diag.perturbation_norm) > 0
    assert float(diag.loss) > 0


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,name", [
    ({"learning_rate": -0.1}, "learning_rate"),
    ({"rho": float("nan")}, "rho"),
    ({"num_data": 0}, "num_data"),
    ({"beta1": 1.0}, "beta1"),
    ({"beta2": -0.1}, "beta2"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"damping": float("inf")}, "damping"),
    ({"init_precision": 0.0}, "init_precision"),
    ({"seed": "zero"}, "seed"),
    ({"axis_name": 1}, "axis_name"),
    ({"full_diagnostics": 1}, "full_diagnostics"),
])
def test_bad_arguments_are_named(kwargs, name):
    args = {"learning_rate": 0.1, "num_data": 100} | kwargs
    with pytest.raises(ValueError, match=name):
        sam_optax.bsam(**args)


def test_update_errors():
    tx = sam_optax.bsam(0.1, num_data=10)
    params = jnp.zeros(2)
    state = tx.init(params)
    with pytest.raises(TypeError, match="grad_fn"):
        tx.update(params, state, params)
    with pytest.raises(ValueError, match="pass them"):
        tx.update(params, state, None, grad_fn=lambda p: p)
    with pytest.raises(TypeError, match="num_data"):
        sam_optax.bsam(0.1)  # pyright: ignore[reportCallIssue]

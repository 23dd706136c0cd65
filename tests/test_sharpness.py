"""Tests of sam_optax.sharpness against dense float64 references."""

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sam_optax
from sam_optax import sharpness

matplotlib.use("Agg")


# --------------------------------------------------------------------------
# A tiny MLP with a cross-entropy loss: its Hessian is indefinite and dense.


def init_mlp(key, sizes=(4, 8, 3), dtype=jnp.float32):
    params = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        params.append({
            "w": jax.random.normal(k1, (fan_in, fan_out), dtype) / np.sqrt(fan_in),
            "b": 0.1 * jax.random.normal(k2, (fan_out,), dtype)})
    return params


def mlp_loss(params, batch):
    x, y = batch
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    logits = h @ params[-1]["w"] + params[-1]["b"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def make_data(key, n=32, dim=4, classes=3, dtype=jnp.float32):
    kx, ky = jax.random.split(key)
    return (jax.random.normal(kx, (n, dim), dtype),
            jax.random.randint(ky, (n,), 0, classes))


def dense_hessian(loss, params):
    flat, unravel = ravel_pytree(params)
    hessian = jax.jit(jax.hessian(lambda v: loss(unravel(v))))(flat)
    return np.asarray(hessian, np.float64)


def descending_eigh(matrix):
    values, vectors = np.linalg.eigh(matrix)
    return values[::-1], vectors[:, ::-1]


# --------------------------------------------------------------------------
# Eigenvalues vs jax.hessian + numpy.linalg.eigh, in float64.


@pytest.fixture(scope="module")
def x64_problem():
    # Build in float64, but leave the context before returning: tests enter it
    # themselves, and later tests must run with the default float32.
    with jax.enable_x64(True):
        params = init_mlp(jax.random.PRNGKey(0), dtype=jnp.float64)
        batch = make_data(jax.random.PRNGKey(1), dtype=jnp.float64)
        loss = lambda p: mlp_loss(p, batch)
        hessian = dense_hessian(loss, params)
    return params, batch, loss, hessian


def test_lanczos_matches_dense_eigh_in_float64(x64_problem):
    params, _, loss, hessian = x64_problem
    expected, expected_vectors = descending_eigh(hessian)
    assert hessian.shape == (67, 67)  # more parameters than Krylov steps
    with jax.enable_x64(True):
        result = sharpness.lanczos(loss, params, k=5, num_iterations=40)
        got = np.asarray(result.eigenvalues)
        assert got.dtype == np.float64
        vectors = np.stack([np.asarray(ravel_pytree(jax.tree.map(
            lambda x, i=i: x[i], result.eigenvectors))[0]) for i in range(5)])
    # The acceptance bar of the issue: λ_max to 1e-4 relative.
    assert abs(got[0] - expected[0]) <= 1e-4 * abs(expected[0])
    np.testing.assert_allclose(got, expected[:5], rtol=1e-4)
    assert bool(np.all(result.converged))
    assert int(result.num_iterations) == 40
    # Ritz vectors are unit eigenvectors, and the residual bound holds.
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-8)
    assert abs(abs(vectors[0] @ expected_vectors[:, 0]) - 1.0) < 1e-6
    true_residuals = np.linalg.norm(vectors @ hessian - got[:, None] * vectors, axis=1)
    np.testing.assert_allclose(true_residuals, np.asarray(result.residuals),
                               atol=1e-8 * abs(expected[0]))


def test_power_iteration_matches_dense_eigh_in_float64(x64_problem):
    params, _, loss, hessian = x64_problem
    values = np.linalg.eigvalsh(hessian)
    dominant = values[np.argmax(np.abs(values))]
    with jax.enable_x64(True):
        result = sharpness.power_iteration(loss, params, num_iterations=2000,
                                           tol=1e-12)
    assert abs(float(result.eigenvalues[0]) - dominant) <= 1e-4 * abs(dominant)
    assert bool(result.converged[0])
    assert 2 < int(result.num_iterations) < 2000  # stopped on the tolerance


def test_power_iteration_reports_non_convergence():
    loss = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 0.99, 0.98, 0.5]) * w ** 2)
    result = sharpness.power_iteration(loss, jnp.ones(4), num_iterations=3)
    assert int(result.num_iterations) == 3
    assert not bool(result.converged[0])
    assert float(result.residuals[0]) > 0


def test_lanczos_full_dimension_and_repeated_eigenvalues():
    # Repeated eigenvalues make the Krylov space invariant after 2 steps: the
    # restart must still find every copy, without NaN or ghosts.
    curvatures = jnp.array([5.0, 5.0, 5.0, 1.0, 1.0, -2.0])
    loss = lambda w: 0.5 * jnp.sum(curvatures * w ** 2)
    result = sharpness.lanczos(loss, jnp.zeros(6), k=6)
    assert int(result.num_iterations) == 6  # capped at the dimension
    np.testing.assert_allclose(result.eigenvalues, [5, 5, 5, 1, 1, -2], atol=1e-5)
    assert bool(np.all(np.isfinite(result.residuals)))


def test_repeated_calls_compile_once():
    loss = lambda w: 0.5 * jnp.sum(jnp.arange(1.0, 9.0) * jnp.tanh(w) ** 2)
    before = sharpness.spectra._lanczos._cache_size()
    first = sharpness.lanczos(loss, jnp.zeros(8), k=2)
    second = sharpness.lanczos(loss, jnp.full(8, 0.5, jnp.float32), k=2,
                               key=jax.random.PRNGKey(7))
    assert sharpness.spectra._lanczos._cache_size() == before + 1
    np.testing.assert_allclose(first.eigenvalues, [8.0, 7.0], rtol=1e-5)
    assert float(second.eigenvalues[0]) < 8.0  # tanh flattens away from 0


def test_lanczos_float32_and_jit_compatible():
    params = init_mlp(jax.random.PRNGKey(0))
    batch = make_data(jax.random.PRNGKey(1))
    loss = lambda p: mlp_loss(p, batch)
    expected = descending_eigh(dense_hessian(loss, params))[0]

    @jax.jit
    def top(p):
        return sharpness.lanczos(loss, p, k=5).eigenvalues

    np.testing.assert_allclose(top(params), expected[:5], rtol=2e-3, atol=1e-4)


def test_hessian_averaged_over_batches(x64_problem):
    params, batch, _, _ = x64_problem
    with jax.enable_x64(True):
        batches = jax.tree.map(lambda x: x.reshape((4, 8) + x.shape[1:]), batch)
        # Mean of per-batch losses = the loss of the Hessian we want.
        mean_loss = lambda p: jnp.mean(jnp.stack(
            [mlp_loss(p, jax.tree.map(lambda x: x[i], batches)) for i in range(4)]))
        mean_hessian = dense_hessian(mean_loss, params)
        expected = descending_eigh(mean_hessian)[0]
        result = sharpness.lanczos(mlp_loss, params, k=3, batches=batches)
        np.testing.assert_allclose(result.eigenvalues, expected[:3], rtol=1e-6)
        vector = jax.tree.map(jnp.ones_like, params)
        hvp = sharpness.hessian_vector_product(mlp_loss, params, batches)
        np.testing.assert_allclose(
            ravel_pytree(hvp(vector))[0],
            mean_hessian @ np.ones(67), rtol=1e-8)


def test_hessian_vector_product_of_bf16_params_is_finite():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                          init_mlp(jax.random.PRNGKey(0), sizes=(3, 4, 2)))
    batch = make_data(jax.random.PRNGKey(1), n=8, dim=3, classes=2)
    loss = lambda p: mlp_loss(p, batch)
    result = sharpness.lanczos(loss, params, k=2)
    reference = sharpness.lanczos(
        loss, jax.tree.map(lambda x: x.astype(jnp.float32), params), k=2)
    assert result.eigenvalues.dtype == jnp.float32
    np.testing.assert_allclose(result.eigenvalues, reference.eigenvalues, rtol=1e-2)


def test_zero_hessian_gives_zeros_not_nan():
    loss = lambda w: jnp.sum(w)  # linear: H = 0
    result = sharpness.lanczos(loss, jnp.ones(8), k=2)
    np.testing.assert_array_equal(result.eigenvalues, 0.0)
    power = sharpness.power_iteration(loss, jnp.ones(8))
    assert float(power.eigenvalues[0]) == 0.0
    assert np.isfinite(float(power.residuals[0]))


# --------------------------------------------------------------------------
# Hutchinson trace.


def test_hutchinson_trace_is_unbiased(x64_problem):
    params, _, loss, hessian = x64_problem
    with jax.enable_x64(True):
        estimate = sharpness.hutchinson_trace(loss, params, num_samples=400,
                                              key=jax.random.PRNGKey(3))
    exact = np.trace(hessian)
    samples = np.asarray(estimate.samples)
    assert samples.shape == (400,)
    assert float(estimate.stderr) == pytest.approx(
        samples.std(ddof=1) / np.sqrt(400), rel=1e-6)
    assert abs(float(estimate.trace) - exact) < 4 * float(estimate.stderr)
    # Each sample is zᵀHz for a ±1 vector: at most Σ|H_ij|, at least -Σ|H_ij|.
    assert np.all(np.abs(samples) <= np.abs(hessian).sum() + 1e-9)


def test_hutchinson_trace_is_exact_for_diagonal_hessians():
    curvatures = jnp.arange(1.0, 6.0)
    loss = lambda w: 0.5 * jnp.sum(curvatures * w ** 2)
    estimate = sharpness.hutchinson_trace(loss, jnp.zeros(5), num_samples=3)
    np.testing.assert_allclose(estimate.samples, 15.0, rtol=1e-6)
    assert float(estimate.stderr) == 0.0


# --------------------------------------------------------------------------
# m-sharpness vs a float64 NumPy reference of the SAM ascent.


def _regression_problem(near_fit=False):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3)).astype(np.float32)
    y = rng.normal(size=(12,)).astype(np.float32)
    w = rng.normal(size=(3,)).astype(np.float32)
    if near_fit:
        # Small residuals: the gradient is small against ρ·H, so the ascent
        # turns between its steps and the step rule shows in the result.
        y = (x @ w + 0.05 * y).astype(np.float32)
    return w, x, y


def _reference_m_sharpness(w, x, y, rho, m, steps):
    """Foret et al.'s multi-step ascent (App. C.6), as ``multistep_sam``
    takes it: a full step ρ ĝ, then steps of ρ/n projected on the ball."""
    w, x, y = (np.asarray(a, np.float64) for a in (w, x, y))
    loss = lambda v, xs, ys: 0.5 * np.mean((xs @ v - ys) ** 2)
    grad = lambda v, xs, ys: xs.T @ (xs @ v - ys) / len(ys)
    values = []
    for start in range(0, len(y), m):
        xs, ys = x[start:start + m], y[start:start + m]
        g = grad(w, xs, ys)
        eps = rho * g / np.linalg.norm(g)
        for _ in range(steps - 1):
            g = grad(w + eps, xs, ys)
            eps = eps + (rho / steps) * g / np.linalg.norm(g)
            eps = eps * min(1.0, rho / np.linalg.norm(eps))
        values.append(loss(w + eps, xs, ys) - loss(w, xs, ys))
    return np.mean(values), np.array(values)


@pytest.mark.parametrize("near_fit", [False, True])
@pytest.mark.parametrize("m,steps", [(1, 1), (4, 1), (12, 1), (3, 3), (4, 2)])
def test_m_sharpness_matches_numpy_reference(m, steps, near_fit):
    w, x, y = _regression_problem(near_fit)
    loss_fn = lambda v, data: 0.5 * jnp.mean((data[0] @ v - data[1]) ** 2)
    value, per_chunk = sharpness.m_sharpness(loss_fn, jnp.asarray(w), (x, y),
                                             rho=0.3, m=m, ascent_steps=steps)
    expected, expected_chunks = _reference_m_sharpness(w, x, y, 0.3, m, steps)
    np.testing.assert_allclose(per_chunk, expected_chunks, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(value, expected, rtol=1e-4)
    assert per_chunk.shape == (12 // m,)
    assert np.all(np.asarray(per_chunk) > 0)  # ascent increases a convex loss


def test_m_sharpness_takes_the_ascent_of_multistep_sam():
    """One definition: m-sharpness on one chunk is the sharpness
    ``L(w + ε) − L(w)`` that ``multistep_sam`` records for the same batch."""
    w, x, y = _regression_problem(near_fit=True)
    loss_fn = lambda v, data: 0.5 * jnp.mean((data[0] @ v - data[1]) ** 2)
    value, _ = sharpness.m_sharpness(loss_fn, jnp.asarray(w), (x, y), rho=0.3,
                                     m=12, ascent_steps=3)
    tx = sam_optax.multistep_sam(optax.sgd(0.1), 0.3, steps=3)
    batch_loss = lambda v: loss_fn(v, (x, y))
    params = jnp.asarray(w)
    update = jax.jit(lambda p, s: tx.update(
        jax.grad(batch_loss)(p), s, p, grad_fn=jax.value_and_grad(batch_loss),
        value=batch_loss(p)))
    _, state = update(params, tx.init(params))
    recorded = sam_optax.diagnostics(state).sharpness
    np.testing.assert_allclose(value, recorded, rtol=1e-5)


def test_m_sharpness_with_an_ascent_takes_no_ascent_steps():
    w, x, y = _regression_problem()
    loss_fn = lambda v, data: 0.5 * jnp.mean((data[0] @ v - data[1]) ** 2)
    args = (loss_fn, jnp.asarray(w), (x, y))
    with pytest.raises(ValueError, match="ascent_steps.*multistep_ascent"):
        sharpness.m_sharpness(*args, rho=0.3, m=4, ascent_steps=2,
                              ascent=sam_optax.ascent.normalized_ascent())
    # The default is the same ascent as passing multistep_ascent(n).
    default, _ = sharpness.m_sharpness(*args, rho=0.3, m=4, ascent_steps=2)
    explicit, _ = sharpness.m_sharpness(
        *args, rho=0.3, m=4, ascent=sam_optax.ascent.multistep_ascent(2))
    np.testing.assert_allclose(explicit, default, rtol=1e-6)
    with pytest.raises(ValueError, match="`data`"):
        sharpness.m_sharpness(loss_fn, jnp.asarray(w), None, rho=0.3, m=4)


def test_m_sharpness_smaller_m_is_sharper_and_rho_zero_is_zero():
    w, x, y = _regression_problem()
    loss_fn = lambda v, data: 0.5 * jnp.mean((data[0] @ v - data[1]) ** 2)
    small, _ = sharpness.m_sharpness(loss_fn, jnp.asarray(w), (x, y), rho=0.3, m=1)
    large, _ = sharpness.m_sharpness(loss_fn, jnp.asarray(w), (x, y), rho=0.3, m=12)
    assert float(small) > float(large)  # per-example worst cases are worse
    zero, _ = sharpness.m_sharpness(loss_fn, jnp.asarray(w), (x, y), rho=0.0, m=4)
    assert float(zero) == 0.0


# --------------------------------------------------------------------------
# Loss landscapes.


def test_filter_normalized_direction_matches_filter_norms():
    params = {"conv": jax.random.normal(jax.random.PRNGKey(0), (3, 3, 2, 5)),
              "bias": jnp.ones(5)}
    direction = sharpness.filter_normalized_direction(jax.random.PRNGKey(1), params)
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(direction["conv"]).reshape(-1, 5), axis=0),
        np.linalg.norm(np.asarray(params["conv"]).reshape(-1, 5), axis=0), rtol=1e-5)
    np.testing.assert_array_equal(direction["bias"], 0.0)
    whole = sharpness.filter_normalized_direction(jax.random.PRNGKey(1), params,
                                                  ignore_1d=False)
    assert float(jnp.linalg.norm(whole["bias"])) == pytest.approx(np.sqrt(5), 1e-5)
    other = sharpness.filter_normalized_direction(jax.random.PRNGKey(2), params)
    assert not np.allclose(other["conv"], direction["conv"])


def test_landscapes_match_pointwise_loops_and_compile_once():
    params = init_mlp(jax.random.PRNGKey(0))
    batch = make_data(jax.random.PRNGKey(1))
    loss = jax.jit(lambda p: mlp_loss(p, batch))
    dx = sharpness.filter_normalized_direction(jax.random.PRNGKey(2), params)
    dy = sharpness.filter_normalized_direction(jax.random.PRNGKey(3), params)
    shift = jax.jit(lambda a, b: jax.tree.map(lambda p, u, v: p + a * u + b * v,
                                              params, dx, dy))
    alphas, betas = np.linspace(-1, 1, 5), np.linspace(-0.5, 0.5, 4)

    line = sharpness.loss_landscape_1d(loss, params, dx, alphas)
    np.testing.assert_allclose(line, [loss(shift(a, 0.0)) for a in alphas],
                               rtol=1e-5)
    before = sharpness.landscapes._evaluate_chunk._cache_size()
    grid = sharpness.loss_landscape_2d(loss, params, dx, dy, alphas, betas)
    # One compilation for the whole grid.
    assert sharpness.landscapes._evaluate_chunk._cache_size() == before + 1
    assert grid.shape == (5, 4)
    expected = [[loss(shift(a, b)) for b in betas] for a in alphas]
    np.testing.assert_allclose(grid, expected, rtol=1e-5)
    # Chunked evaluation (7 points per call, padded): same values, one compile.
    chunked = sharpness.loss_landscape_2d(loss, params, dx, dy, alphas, betas,
                                          batch_size=7, progress=False)
    np.testing.assert_allclose(chunked, grid, rtol=1e-6)
    assert sharpness.landscapes._evaluate_chunk._cache_size() == before + 2


def test_interpolation_landscape_endpoints():
    params_a = init_mlp(jax.random.PRNGKey(0))
    params_b = init_mlp(jax.random.PRNGKey(5))
    batch = make_data(jax.random.PRNGKey(1))
    loss = lambda p: mlp_loss(p, batch)
    values = sharpness.interpolation_landscape(loss, params_a, params_b,
                                               [0.0, 0.25, 1.0])
    midway = jax.tree.map(lambda a, b: 0.75 * a + 0.25 * b, params_a, params_b)
    np.testing.assert_allclose(
        values, [loss(params_a), loss(midway), loss(params_b)], rtol=1e-5)


def test_plots_return_figures():
    from matplotlib.figure import Figure

    alphas = np.linspace(-1, 1, 5)
    fig = sharpness.plot_landscape_1d(alphas, {"sgd": alphas ** 2,
                                               "sam": 0.5 * alphas ** 2})
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert len(fig.axes[0].lines) == 2
    grids = {"sgd": np.add.outer(alphas ** 2, alphas ** 2),
             "sam": np.add.outer(alphas ** 2, alphas ** 2) / 2}
    fig2 = sharpness.plot_landscape_2d(alphas, alphas, grids, log_scale=True)
    assert isinstance(fig2, Figure)
    assert len(fig2.axes) == 3  # two panels and one shared colour bar
    with pytest.raises(ValueError, match="losses"):
        sharpness.plot_landscape_1d(alphas, np.ones(4))
    with pytest.raises(ValueError, match="len\\(alphas\\)"):
        sharpness.plot_landscape_2d(alphas, alphas, np.ones((5, 4)))


# --------------------------------------------------------------------------
# Bad arguments.


def test_bad_arguments_raise_clear_errors():
    loss = lambda w: jnp.sum(w ** 2)
    w = jnp.ones(3)
    with pytest.raises(ValueError, match="`k`"):
        sharpness.lanczos(loss, w, k=0)
    with pytest.raises(ValueError, match="exceeds the number of parameters"):
        sharpness.lanczos(loss, w, k=4)
    with pytest.raises(ValueError, match="num_iterations"):
        sharpness.lanczos(loss, w, k=3, num_iterations=2)
    with pytest.raises(ValueError, match="num_iterations"):
        sharpness.power_iteration(loss, w, num_iterations=0)
    with pytest.raises(ValueError, match="tol"):
        sharpness.power_iteration(loss, w, tol=-1.0)
    with pytest.raises(ValueError, match="num_samples"):
        sharpness.hutchinson_trace(loss, w, num_samples=0)
    with pytest.raises(ValueError, match="leading"):
        sharpness.lanczos(lambda p, b: loss(p), w, k=1,
                          batches=(jnp.ones((2, 3)), jnp.ones((3, 3))))
    with pytest.raises(ValueError, match="`m`"):
        sharpness.m_sharpness(lambda p, b: loss(p), w, jnp.ones((10, 3)),
                              rho=0.1, m=3)
    with pytest.raises(ValueError, match="`m`"):
        sharpness.m_sharpness(lambda p, b: loss(p), w, jnp.ones((10, 3)),
                              rho=0.1, m=0)
    with pytest.raises(ValueError, match="rho"):
        sharpness.m_sharpness(lambda p, b: loss(p), w, jnp.ones((10, 3)),
                              rho=-0.1, m=2)
    with pytest.raises(ValueError, match="alphas"):
        sharpness.loss_landscape_1d(loss, w, w, [])
    with pytest.raises(ValueError, match="direction"):
        sharpness.loss_landscape_1d(loss, w, jnp.ones(4), [0.0])
    with pytest.raises(ValueError, match="direction_y"):
        sharpness.loss_landscape_2d(loss, {"a": w}, {"a": w}, {"b": w},
                                    [0.0], [0.0])
    with pytest.raises(ValueError, match="batch_size"):
        sharpness.loss_landscape_1d(loss, w, w, [0.0, 1.0], batch_size=0)
    with pytest.raises(ValueError, match="params_b"):
        sharpness.interpolation_landscape(loss, w, jnp.ones(2), [0.0])


# --------------------------------------------------------------------------
# The package: one module per topic, the same public names, nothing at import.


def test_every_public_name_is_reexported_from_its_module():
    modules = (sharpness.spectra, sharpness.msharpness, sharpness.landscapes,
               sharpness.plots)
    names = [name for module in modules for name in module.__all__]
    assert sorted(names) == sorted(sharpness.__all__)
    for module in modules:
        for name in module.__all__:
            assert getattr(sharpness, name) is getattr(module, name), name
    # What README.md, the notebooks and the benchmarks call.
    for name in ("lanczos", "power_iteration", "hutchinson_trace",
                 "hessian_vector_product", "m_sharpness",
                 "filter_normalized_direction", "loss_landscape_1d",
                 "loss_landscape_2d", "interpolation_landscape",
                 "plot_landscape_1d", "plot_landscape_2d", "EigenResult",
                 "TraceEstimate"):
        assert callable(getattr(sam_optax.sharpness, name)), name


def test_docstrings_are_the_source_text():
    """No docstring is rewritten at import: each is what its source says."""
    import ast
    import inspect

    for name in sharpness.__all__:
        obj = getattr(sharpness, name)
        tree = ast.parse(inspect.getsource(inspect.getmodule(obj)))
        node = next(n for n in ast.walk(tree) if isinstance(
            n, (ast.FunctionDef, ast.ClassDef)) and n.name == name)
        assert obj.__doc__ == ast.get_docstring(node, clean=False), name
    for name in ("hessian_vector_product", "power_iteration", "lanczos",
                 "hutchinson_trace"):
        assert "batches: ``None`` when" in getattr(sharpness, name).__doc__


def test_importing_sam_optax_does_not_import_matplotlib():
    import os
    import subprocess
    import sys

    # A fresh interpreter: this one imported matplotlib at the top of the file.
    code = ("import sys, sam_optax; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr


def test_plots_without_matplotlib_say_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # not found
    with pytest.raises(ImportError, match="pip install matplotlib"):
        sharpness.plot_landscape_1d([0.0, 1.0], [1.0, 2.0])

"""Measuring flatness: Hessian spectra, m-sharpness and loss landscapes.

SAM's claim is geometric: it finds minima whose Hessian has a small top
eigenvalue λ_max (Foret et al. 2021, Fig. 3: λ_max ≈ 24 → ≈ 1 on a WRN,
λ_max/λ_5 ≈ 11.4 → 2.6). This module measures that on any JAX loss:

* :func:`hessian_vector_product` -- ``v ↦ H v`` by forward-over-reverse
  differentiation, on one batch or averaged over stacked batches;
* :func:`power_iteration` and :func:`lanczos` -- the top eigenvalue(s) of H
  from Hessian-vector products only (never forming H), with convergence info;
* :func:`hutchinson_trace` -- an unbiased estimate of tr(H);
* :func:`m_sharpness` -- ``max_{‖ε‖≤ρ} L(w+ε) − L(w)`` approximated by the
  SAM ascent (:mod:`sam_optax.ascent`), averaged over chunks of size m;
* :func:`filter_normalized_direction`, :func:`loss_landscape_1d`,
  :func:`loss_landscape_2d`, :func:`interpolation_landscape` -- loss slices
  (Li et al. 2018) evaluated with ``vmap`` in one compiled call;
* :func:`plot_landscape_1d` and :func:`plot_landscape_2d` -- matplotlib
  Figures of those slices.

Everything except the plots is pure JAX and can run under ``jax.jit``
(``loss_fn`` and the integer arguments are static). Vectors are handled flat
(:func:`jax.flatten_util.ravel_pytree`) in float32, or float64 when the
params are float64 (``jax.enable_x64``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from sam_optax import ascent as ascent_lib
from sam_optax import numerics, validation
from sam_optax.core import Ascent

PyTree = Any
LossFn = Callable[..., jax.Array]

_BATCHES_DOC = """batches: ``None`` when ``loss_fn(params)`` takes the params only;
        otherwise a pytree of arrays whose leading axis indexes batches, and
        ``loss_fn(params, batch)`` is called on each slice. The Hessian is
        then the mean over batches (the Hessian of the mean loss)."""


def _fill_batches_doc(fn: Callable) -> None:
    if fn.__doc__ is not None:  # None under `python -OO`
        fn.__doc__ = fn.__doc__.replace("{batches}", _BATCHES_DOC)


class EigenResult(NamedTuple):
    """Top eigenpairs of a Hessian and how far they have converged.

    Attributes:
      eigenvalues: ``(k,)`` Ritz values in descending order.
      eigenvectors: ``(k,)``-leading-axis tree like params: unit Ritz vectors.
      residuals: ``(k,)`` bounds on ``‖H y − θ y‖`` for each pair (for
        power iteration, the exact residual of the last iterate).
      converged: ``(k,)`` bool, ``residuals <= tol * max(|θ|, tiny)``.
      num_iterations: Hessian-vector products spent (int32 scalar).
    """

    eigenvalues: jax.Array
    eigenvectors: PyTree
    residuals: jax.Array
    converged: jax.Array
    num_iterations: jax.Array


class TraceEstimate(NamedTuple):
    """Hutchinson estimate of tr(H).

    Attributes:
      trace: the mean of ``zᵀ H z`` over Rademacher probes ``z``.
      stderr: its standard error (``std / sqrt(num_samples)``).
      samples: ``(num_samples,)`` the individual ``zᵀ H z``.
    """

    trace: jax.Array
    stderr: jax.Array
    samples: jax.Array


# --------------------------------------------------------------------------
# Argument checks (Python-side, before anything is traced).


def _check_batches(batches: Any, name: str = "batches") -> int | None:
    """The common leading size of a pytree of stacked arrays (None for None)."""
    if batches is None:
        return None
    leaves = jax.tree.leaves(batches)
    if not leaves:
        raise ValueError(f"`{name}` has no arrays; pass a pytree of arrays "
                         "stacked on a leading axis.")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise ValueError(
            f"`{name}` must be a pytree of arrays sharing a non-empty leading "
            f"axis (the batch index); got leading sizes {sorted(map(str, sizes))}."
            " Stack a list of batches with "
            "`jax.tree.map(lambda *b: jnp.stack(b), *batch_list)`.")
    return sizes.pop()


def _check_tol(tol: Any) -> None:
    validation.check_in_range(tol, "tol", 0.0, math.inf, high_open=True)


def _compute_dtype(params: PyTree) -> jnp.dtype:
    dtype = jnp.float32
    for x in jax.tree.leaves(params):
        if numerics.is_float(x):
            dtype = jnp.promote_types(dtype, numerics.compute_dtype(x.dtype))
    return dtype


def _as_compute(params: PyTree) -> PyTree:
    """Float leaves in their compute dtype, so HVPs of bf16 models stay exact."""
    return jax.tree.map(
        lambda x: x.astype(numerics.compute_dtype(x.dtype))
        if numerics.is_float(x) else x, params)


def _flat_params(params: PyTree) -> tuple[jax.Array, Callable]:
    params = _as_compute(params)
    flat, unravel = ravel_pytree(params)
    return flat.astype(_compute_dtype(params)), unravel


# --------------------------------------------------------------------------
# Hessian-vector products.


def hessian_vector_product(loss_fn: LossFn, params: PyTree,
                           batches: Any = None) -> Callable[[PyTree], PyTree]:
    """``v ↦ H v`` with ``H = ∇² L(params)``, by forward-over-reverse AD.

    .. math::

      H v = \\frac{d}{dt} ∇L(w + t v) \\Big|_{t=0}

    costs about two gradient evaluations and never forms ``H``. With
    ``batches``, the products are averaged over batches with ``lax.map``
    (one batch in memory at a time).

    Args:
      loss_fn: scalar loss, ``loss_fn(params)`` or ``loss_fn(params, batch)``.
      params: the point at which the Hessian is taken.
      {batches}

    Returns:
      A function mapping a tree like ``params`` to ``H v`` (same tree).

    Example:
      >>> import jax.numpy as jnp, sam_optax
      >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([3.0, 1.0]) * w ** 2)
      >>> hvp = sam_optax.sharpness.hessian_vector_product(loss, jnp.zeros(2))
      >>> hvp(jnp.ones(2)).tolist()
      [3.0, 1.0]
    """
    _check_batches(batches)
    params = _as_compute(params)

    def one(batch, v):
        fn = loss_fn if batch is None else (lambda p: loss_fn(p, batch))
        return jax.jvp(jax.grad(fn), (params,), (v,))[1]

    def hvp(v: PyTree) -> PyTree:
        v = numerics.cast_like(v, params)
        if batches is None:
            return one(None, v)
        per_batch = jax.lax.map(lambda b: one(b, v), batches)
        return jax.tree.map(lambda x: jnp.mean(x, axis=0), per_batch)

    return hvp


_fill_batches_doc(hessian_vector_product)


def _flat_hvp(loss_fn, params, batches):
    """``(hvp_flat, n, dtype, unravel)`` acting on flat compute-dtype vectors."""
    flat, unravel = _flat_params(params)
    tree_hvp = hessian_vector_product(loss_fn, params, batches)

    def hvp_flat(v):
        return ravel_pytree(_as_compute(tree_hvp(unravel(v))))[0].astype(flat.dtype)

    return hvp_flat, flat.shape[0], flat.dtype, unravel


# Reorthogonalization is only as good as its dot products: keep them in full
# precision on accelerators whose default float32 matmul is TF32/bf16.
_dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


def _random_unit(key, n, dtype):
    v = jax.random.normal(key, (n,), dtype)
    return v / jnp.linalg.norm(v)


# --------------------------------------------------------------------------
# Power iteration.


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_iterations"))
def _power_iteration(loss_fn, params, batches, key, tol, num_iterations):
    hvp, n, dtype, unravel = _flat_hvp(loss_fn, params, batches)
    tiny = jnp.finfo(dtype).tiny

    def step(carry):
        v, _, hv, i, _ = carry
        # If H v = 0 (v in the null space) keep v: λ = 0 exactly, never NaN.
        norm = jnp.linalg.norm(hv)
        v_new = jnp.where(norm > tiny, hv / jnp.where(norm > tiny, norm, 1.0), v)
        hv_new = hvp(v_new)
        lam_new = jnp.vdot(v_new, hv_new)
        return v_new, lam_new, hv_new, i + 1, carry[1]

    def not_done(carry):
        _, lam, _, i, lam_prev = carry
        change = jnp.abs(lam - lam_prev)
        return (i < num_iterations) & ((i < 2) | (change > tol * jnp.maximum(
            jnp.abs(lam), tiny)))

    v0 = _random_unit(key, n, dtype)
    hv0 = hvp(v0)
    init = (v0, jnp.vdot(v0, hv0), hv0, jnp.int32(1), jnp.asarray(jnp.inf, dtype))
    v, lam, hv, iters, _ = jax.lax.while_loop(not_done, step, init)
    residual = jnp.linalg.norm(hv - lam * v)
    converged = residual <= jnp.sqrt(tol) * jnp.maximum(jnp.abs(lam), tiny)
    return EigenResult(
        eigenvalues=lam[None],
        eigenvectors=jax.tree.map(lambda x: x[None], unravel(v)),
        residuals=residual[None],
        converged=converged[None],
        num_iterations=iters)


def power_iteration(loss_fn: LossFn, params: PyTree, *, batches: Any = None,
                    key: Optional[jax.Array] = None, num_iterations: int = 100,
                    tol: float = 1e-6) -> EigenResult:
    """The Hessian eigenvalue of largest magnitude, by power iteration.

    .. math::

      v_{t+1} = \\frac{H v_t}{\\lVert H v_t \\rVert}, \\qquad
      λ_t = v_t^\\top H v_t

    stopping when ``|λ_t − λ_{t−1}| ≤ tol·|λ_t|`` or after
    ``num_iterations`` Hessian-vector products. Power iteration converges to
    the eigenvalue of largest *magnitude*; at a minimum that is λ_max. Its
    speed depends on the gap |λ₂/λ₁|: prefer :func:`lanczos` for accuracy or
    for several eigenvalues.

    Args:
      loss_fn: scalar loss, ``loss_fn(params)`` or ``loss_fn(params, batch)``.
      params: the point at which the Hessian is taken.
      {batches}
      key: PRNG key for the random start (default ``PRNGKey(0)``).
      num_iterations: maximum number of Hessian-vector products (≥ 1).
      tol: relative tolerance on successive eigenvalue estimates.

    Returns:
      An :class:`EigenResult` with ``k = 1``. ``converged`` compares the true
      residual ``‖Hv − λv‖`` with ``sqrt(tol)·|λ|`` (the eigenvalue converges
      quadratically faster than the vector).

    Example:
      >>> import jax.numpy as jnp, sam_optax
      >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([4.0, 1.0, 0.5]) * w ** 2)
      >>> result = sam_optax.sharpness.power_iteration(loss, jnp.ones(3))
      >>> round(float(result.eigenvalues[0]), 4)
      4.0
    """
    validation.check_positive_int(num_iterations, "num_iterations")
    _check_tol(tol)
    _check_batches(batches)
    key = jax.random.PRNGKey(0) if key is None else key
    return _power_iteration(loss_fn, params, batches, key, tol, num_iterations)


_fill_batches_doc(power_iteration)


# --------------------------------------------------------------------------
# Lanczos.


@functools.partial(jax.jit, static_argnames=("loss_fn", "k", "num_iterations"))
def _lanczos(loss_fn, params, batches, key, tol, k, num_iterations):
    hvp, n, dtype, unravel = _flat_hvp(loss_fn, params, batches)
    m = min(num_iterations, n)  # a Krylov space never exceeds the dimension
    tiny = jnp.finfo(dtype).tiny
    eps = jnp.finfo(dtype).eps

    def orthogonalize(w, basis):
        # Full reorthogonalization, twice ("twice is enough", Kahan/Parlett):
        # without it Ritz values repeat (ghost eigenvalues) in finite precision.
        for _ in range(2):
            w = w - _dot(basis.T, _dot(basis, w))
        return w

    def body(j, carry):
        basis, alphas, betas, scale = carry
        v = basis[j]
        w = hvp(v)
        alpha = jnp.vdot(v, w)
        w = orthogonalize(w, basis)  # rows > j are still zero
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.abs(alpha) + beta)
        # Breakdown: the Krylov space is H-invariant. Continue from a fresh
        # random direction orthogonal to it (β = 0 splits T into blocks), so
        # every Ritz value stays an eigenvalue estimate of H.
        broke = beta <= 10 * math.sqrt(n) * eps * scale + tiny

        def restart(_):
            fresh = orthogonalize(jax.random.normal(
                jax.random.fold_in(key, j + 1), (n,), dtype), basis)
            return fresh / jnp.maximum(jnp.linalg.norm(fresh), tiny)

        next_v = jax.lax.cond(broke, restart,
                              lambda _: w / jnp.where(broke, 1.0, beta), None)
        basis = basis.at[j + 1].set(jnp.where(j + 1 < m, next_v, 0.0))
        return (basis, alphas.at[j].set(alpha),
                betas.at[j].set(jnp.where(broke, 0.0, beta)), scale)

    basis = jnp.zeros((m + 1, n), dtype).at[0].set(_random_unit(key, n, dtype))
    init = (basis, jnp.zeros(m, dtype), jnp.zeros(m, dtype), jnp.zeros([], dtype))
    basis, alphas, betas, _ = jax.lax.fori_loop(0, m, body, init)
    tridiagonal = (jnp.diag(alphas) + jnp.diag(betas[:-1], 1)
                   + jnp.diag(betas[:-1], -1))
    ritz_values, ritz_coords = jnp.linalg.eigh(tridiagonal)
    top = jnp.argsort(-ritz_values)[:k]
    values = ritz_values[top]
    coords = ritz_coords[:, top]  # (m, k)
    vectors = _dot(basis[:m].T, coords).T  # (k, n)
    # Classic Lanczos bound: ‖H y − θ y‖ = |β_m · s_{m}| for Ritz pair (θ, y).
    residuals = jnp.abs(betas[-1] * coords[-1])
    converged = residuals <= tol * jnp.maximum(jnp.abs(values), tiny)
    return EigenResult(
        eigenvalues=values,
        eigenvectors=jax.vmap(unravel)(vectors),
        residuals=residuals,
        converged=converged,
        num_iterations=jnp.int32(m))


def lanczos(loss_fn: LossFn, params: PyTree, *, k: int = 5,
            batches: Any = None, key: Optional[jax.Array] = None,
            num_iterations: Optional[int] = None,
            tol: float = 1e-4) -> EigenResult:
    """The ``k`` largest Hessian eigenvalues, by Lanczos with reorthogonalization.

    Builds an orthonormal basis ``V`` of the Krylov space
    ``span{v, Hv, …, H^{m−1}v}`` and the tridiagonal ``T = Vᵀ H V``; the
    eigenvalues of ``T`` (Ritz values) approximate the extreme eigenvalues
    of ``H``, the largest ones first. Every new basis vector is
    reorthogonalized against all previous ones, so no spurious copies appear.
    Memory: ``(m + 1) × n`` floats for ``n`` parameters.

    Args:
      loss_fn: scalar loss, ``loss_fn(params)`` or ``loss_fn(params, batch)``.
      params: the point at which the Hessian is taken.
      k: number of eigenvalues (≥ 1), e.g. 5 for the paper's λ_max/λ_5.
      {batches}
      key: PRNG key for the random start (default ``PRNGKey(0)``).
      num_iterations: Krylov dimension ``m`` (Hessian-vector products);
        default ``max(4k, 40)``, capped at the number of parameters (then the
        result is exact up to rounding).
      tol: ``converged`` is ``residual ≤ tol·|θ|``.

    Returns:
      An :class:`EigenResult` with ``k`` pairs, eigenvalues descending.

    Example:
      >>> import jax.numpy as jnp, sam_optax
      >>> curvatures = jnp.arange(1.0, 11.0)
      >>> loss = lambda w: 0.5 * jnp.sum(curvatures * w ** 2)
      >>> result = sam_optax.sharpness.lanczos(loss, jnp.zeros(10), k=3)
      >>> [round(float(x), 4) for x in result.eigenvalues]
      [10.0, 9.0, 8.0]
      >>> bool(result.converged.all())
      True

    References:
      Lanczos, An iteration method for the solution of the eigenvalue problem
      of linear differential and integral operators, J. Res. NBS 45 (1950).
      Ghorbani, Krishnan and Xiao, An Investigation into Neural Net
      Optimization via Hessian Eigenvalue Density, ICML 2019.
      https://arxiv.org/abs/1901.10159
    """
    validation.check_positive_int(k, "k")
    if num_iterations is None:
        num_iterations = max(4 * k, 40)
    validation.check_positive_int(num_iterations, "num_iterations")
    if num_iterations < k:
        raise ValueError(
            f"`num_iterations` ({num_iterations}) must be >= k ({k}): Lanczos "
            "finds at most as many eigenvalues as Krylov steps.")
    n = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    if k > n:
        raise ValueError(f"`k` ({k}) exceeds the number of parameters ({n}).")
    _check_tol(tol)
    _check_batches(batches)
    key = jax.random.PRNGKey(0) if key is None else key
    return _lanczos(loss_fn, params, batches, key, tol, k, num_iterations)


_fill_batches_doc(lanczos)


# --------------------------------------------------------------------------
# Hutchinson trace.


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_samples"))
def _hutchinson(loss_fn, params, batches, key, num_samples):
    hvp, n, dtype, _ = _flat_hvp(loss_fn, params, batches)

    def quadratic_form(sample_key):
        z = jax.random.rademacher(sample_key, (n,), dtype)
        return jnp.vdot(z, hvp(z))

    samples = jax.lax.map(quadratic_form, jax.random.split(key, num_samples))
    stderr = (jnp.std(samples, ddof=1) / jnp.sqrt(num_samples)
              if num_samples > 1 else jnp.asarray(jnp.inf, dtype))
    return TraceEstimate(jnp.mean(samples), stderr, samples)


def hutchinson_trace(loss_fn: LossFn, params: PyTree, *, batches: Any = None,
                     key: Optional[jax.Array] = None,
                     num_samples: int = 100) -> TraceEstimate:
    """Hutchinson's unbiased estimate of the Hessian trace.

    .. math::

      \\mathrm{tr}(H) = \\mathbb{E}_z[z^\\top H z], \\quad
      z_i \\in \\{-1, +1\\} \\text{ uniformly}

    Args:
      loss_fn: scalar loss, ``loss_fn(params)`` or ``loss_fn(params, batch)``.
      params: the point at which the Hessian is taken.
      {batches}
      key: PRNG key for the probes (default ``PRNGKey(0)``).
      num_samples: number of probes (≥ 1); the variance falls as 1/num_samples.

    Returns:
      A :class:`TraceEstimate` (estimate, standard error, samples).

    Example:
      >>> import jax.numpy as jnp, sam_optax
      >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([3.0, 2.0, 1.0]) * w ** 2)
      >>> est = sam_optax.sharpness.hutchinson_trace(loss, jnp.ones(3))
      >>> float(est.trace)  # exact for a diagonal Hessian
      6.0

    References:
      Hutchinson, A stochastic estimator of the trace of the influence matrix
      for Laplacian smoothing splines (1990). Yao et al., PyHessian,
      https://arxiv.org/abs/1912.07145
    """
    validation.check_positive_int(num_samples, "num_samples")
    _check_batches(batches)
    key = jax.random.PRNGKey(0) if key is None else key
    return _hutchinson(loss_fn, params, batches, key, num_samples)


_fill_batches_doc(hutchinson_trace)


# --------------------------------------------------------------------------
# m-sharpness.


@functools.cache
def _default_ascent() -> Ascent:
    # One instance, so repeated calls hit the same compiled function.
    return ascent_lib.normalized_ascent()


@functools.partial(jax.jit, static_argnames=("loss_fn", "m", "ascent_steps",
                                             "ascent"))
def _m_sharpness(loss_fn, params, data, rho, m, ascent_steps, ascent):
    n = jax.tree.leaves(data)[0].shape[0]
    chunks = jax.tree.map(lambda x: x.reshape((n // m, m) + x.shape[1:]), data)

    def one_chunk(chunk):
        loss = lambda p: loss_fn(p, chunk)
        grad_fn = jax.grad(loss)
        state = ascent.init(params)
        perturbation = numerics.zeros_like_compute(params)
        # s ascent steps of radius ρ/s each: ‖ε‖ ≤ ρ by the triangle inequality.
        for step in range(ascent_steps):
            point = numerics.add_perturbation(params, perturbation)
            delta, state, *_ = ascent.perturbation(
                grad_fn(point), state, point, rho=rho / ascent_steps,
                grad_fn=grad_fn, count=jnp.int32(step))
            perturbation = jax.tree.map(jnp.add, perturbation, delta)
        return loss(numerics.add_perturbation(params, perturbation)) - loss(params)

    per_chunk = jax.lax.map(one_chunk, chunks)
    return jnp.mean(per_chunk), per_chunk


def m_sharpness(loss_fn: LossFn, params: PyTree, data: PyTree, *,
                rho: float, m: int, ascent_steps: int = 1,
                ascent: Optional[Ascent] = None) -> tuple[jax.Array, jax.Array]:
    """m-sharpness: the SAM ascent's loss increase, averaged over chunks of m.

    Foret et al. (2021, §4.1) relate generalization to

    .. math::

      \\frac{1}{|S|/m} \\sum_{S_i} \\max_{\\lVert ε \\rVert_2 \\le ρ}
      L_{S_i}(w + ε) − L_{S_i}(w)

    over disjoint chunks ``S_i`` of ``m`` examples. The inner max is
    approximated by the SAM ascent (``ascent_steps`` steps of radius
    ``ρ/ascent_steps``), so the result is a lower bound on the true maximum
    that tightens with more steps. Chunks are processed with ``lax.map``.

    Args:
      loss_fn: ``loss_fn(params, chunk)`` -> mean loss over the chunk.
      params: the weights w.
      data: pytree of arrays with a leading example axis of size ``N``
        (``N`` divisible by ``m``).
      rho: the radius ρ ≥ 0.
      m: chunk size (≥ 1).
      ascent_steps: number of ascent steps (≥ 1).
      ascent: an :class:`sam_optax.Ascent` (default: SAM's
        :func:`sam_optax.ascent.normalized_ascent`).

    Returns:
      ``(mean, per_chunk)``: the m-sharpness and its ``(N/m,)`` chunk values.

    Example:
      >>> import jax.numpy as jnp, sam_optax
      >>> def loss_fn(w, x):  # mean of 0.5·(x·w)²: Hessian = mean x xᵀ
      ...   return 0.5 * jnp.mean((x @ w) ** 2)
      >>> x = jnp.eye(4) * 2.0
      >>> value, per_chunk = sam_optax.sharpness.m_sharpness(
      ...     loss_fn, jnp.ones(4), x, rho=0.1, m=1)
      >>> per_chunk.shape
      (4,)

    References:
      Foret et al., Sharpness-Aware Minimization for Efficiently Improving
      Generalization, ICLR 2021. https://arxiv.org/abs/2010.01412
    """
    validation.check_rho(rho)
    if callable(rho):
        raise ValueError("`rho` must be a number here, not a schedule.")
    validation.check_positive_int(m, "m")
    validation.check_positive_int(ascent_steps, "ascent_steps")
    n = _check_batches(data, "data")
    if n % m:
        raise ValueError(
            f"`m` ({m}) must divide the number of examples ({n}); drop "
            f"{n % m} examples or choose another m.")
    if ascent is None:
        ascent = _default_ascent()
    if not isinstance(ascent, Ascent):
        raise TypeError("`ascent` must be a sam_optax.Ascent, e.g. "
                        "`sam_optax.ascent.normalized_ascent()`.")
    return _m_sharpness(loss_fn, params, data, jnp.asarray(rho, jnp.float32), m,
                        ascent_steps, ascent)



# --------------------------------------------------------------------------
# Loss landscapes.


def filter_normalized_direction(key: jax.Array, params: PyTree, *,
                                filter_axis: int = -1,
                                ignore_1d: bool = True) -> PyTree:
    """A random direction with the norm of ``params`` filter by filter.

    Li et al. (2018) draw ``d ~ N(0, I)`` and rescale each filter (here: each
    slice along ``filter_axis``, the output axis of Flax/Haiku kernels) to
    the norm of the corresponding filter of the weights,

    .. math::

      d_{i} \\leftarrow \\frac{d_{i}}{\\lVert d_{i} \\rVert}
      \\lVert θ_{i} \\rVert

    so that plots of networks with different weight scales are comparable.
    Leaves with fewer than 2 dimensions (biases, norm scales) get a zero
    direction when ``ignore_1d`` (the paper's choice), else are normalized
    as a whole.

    Args:
      key: PRNG key.
      params: the weights θ.
      filter_axis: the axis that indexes filters in ≥2-D leaves.
      ignore_1d: zero direction on 0-D/1-D leaves.

    Returns:
      A tree like ``params`` (float32 or wider leaves).

    References:
      Li et al., Visualizing the Loss Landscape of Neural Nets, NeurIPS 2018.
      https://arxiv.org/abs/1712.09913
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))

    def one(k, theta):
        if not numerics.is_float(theta):
            return jnp.zeros(jnp.shape(theta), jnp.float32)
        theta = theta.astype(numerics.compute_dtype(theta.dtype))
        d = jax.random.normal(k, theta.shape, theta.dtype)
        if theta.ndim < 2:
            if ignore_1d:
                return jnp.zeros_like(d)
            axes = None
        else:
            axis = filter_axis % theta.ndim
            axes = tuple(a for a in range(theta.ndim) if a != axis)
        d_norm = jnp.sqrt(jnp.sum(d * d, axis=axes, keepdims=axes is not None))
        t_norm = jnp.sqrt(jnp.sum(theta * theta, axis=axes,
                                  keepdims=axes is not None))
        return d * (t_norm / jnp.maximum(d_norm, jnp.finfo(d.dtype).tiny))

    return treedef.unflatten([one(k, x) for k, x in zip(keys, leaves, strict=True)])


def _check_grid(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or array.size < 1:
        raise ValueError(f"`{name}` must be a non-empty 1-D sequence of "
                         f"coordinates; got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` must be finite.")
    return array


def _check_direction(direction: PyTree, params: PyTree, name: str) -> None:
    validation.check_same_structure(direction, params, name)


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def _evaluate_chunk(loss_fn, params, directions, coefficients):
    """L(θ + Σ_j c_j d_j) for a chunk of coefficient rows, with vmap."""

    def at(coeffs):
        combine = lambda *ds: sum(c * d for c, d in zip(coeffs, ds, strict=True))
        shift = jax.tree.map(combine, *directions)
        return loss_fn(numerics.add_perturbation(params, shift))

    return jax.vmap(at)(coefficients)


def _evaluate(loss_fn, params, directions, coefficients, batch_size, progress,
              desc):
    """Evaluate a grid of points in chunks of one compiled shape."""
    total = coefficients.shape[0]
    if batch_size is None:
        batch_size = total
    validation.check_positive_int(batch_size, "batch_size")
    batch_size = min(batch_size, total)
    num_chunks = -(-total // batch_size)
    # Pad to whole chunks so every call has the same shape: one compilation.
    padded = np.zeros((num_chunks * batch_size, coefficients.shape[1]),
                      coefficients.dtype)
    padded[:total] = coefficients
    chunks = range(num_chunks)
    if progress and num_chunks > 1:
        try:
            from tqdm import tqdm
            chunks = tqdm(chunks, desc=desc)
        except ImportError:  # tqdm is optional: no bar, same result
            pass
    out = []
    for i in chunks:
        chunk = jnp.asarray(padded[i * batch_size:(i + 1) * batch_size])
        out.append(_evaluate_chunk(loss_fn, params, tuple(directions), chunk))
        if not isinstance(chunks, range):
            # A bar should show work done, not calls queued asynchronously.
            out[-1].block_until_ready()
    return jnp.concatenate(out)[:total]


def loss_landscape_1d(loss_fn: Callable[[PyTree], jax.Array], params: PyTree,
                      direction: PyTree, alphas: Sequence[float], *,
                      batch_size: Optional[int] = None,
                      progress: bool = True) -> jax.Array:
    """``L(θ + α d)`` for each α: a 1-D slice of the loss landscape.

    Args:
      loss_fn: ``loss_fn(params)`` -> scalar (close over the data).
      params: the centre θ.
      direction: a tree like params, e.g. from
        :func:`filter_normalized_direction`.
      alphas: 1-D coordinates.
      batch_size: points per compiled call (default: all in one call); use it
        to bound memory, ``vmap`` holds ``batch_size`` copies of activations.
      progress: tqdm bar when there is more than one call.

    Returns:
      ``(len(alphas),)`` losses.

    Example:
      >>> import jax.numpy as jnp, sam_optax
      >>> loss = lambda w: jnp.sum(w ** 2)
      >>> sam_optax.sharpness.loss_landscape_1d(
      ...     loss, jnp.zeros(2), jnp.ones(2), [-1.0, 0.0, 2.0]).tolist()
      [2.0, 0.0, 8.0]
    """
    alphas = _check_grid(alphas, "alphas")
    _check_direction(direction, params, "direction")
    coefficients = alphas.astype(np.float32)[:, None]
    return _evaluate(loss_fn, params, [direction], coefficients, batch_size,
                     progress, "1-D landscape")


def loss_landscape_2d(loss_fn: Callable[[PyTree], jax.Array], params: PyTree,
                      direction_x: PyTree, direction_y: PyTree,
                      alphas: Sequence[float], betas: Sequence[float], *,
                      batch_size: Optional[int] = None,
                      progress: bool = True) -> jax.Array:
    """``L(θ + α d_x + β d_y)`` on a grid: a 2-D slice, in one compiled call.

    Args:
      loss_fn: ``loss_fn(params)`` -> scalar (close over the data).
      params: the centre θ.
      direction_x: first direction (tree like params).
      direction_y: second direction.
      alphas: coordinates along ``direction_x``.
      betas: coordinates along ``direction_y``.
      batch_size: points per compiled call (default: the whole grid at once).
      progress: tqdm bar when there is more than one call.

    Returns:
      ``(len(alphas), len(betas))`` losses; entry ``[i, j]`` is at
      ``(alphas[i], betas[j])``.

    Example:
      >>> import jax.numpy as jnp, sam_optax
      >>> loss = lambda w: w[0] ** 2 + 3 * w[1] ** 2
      >>> grid = sam_optax.sharpness.loss_landscape_2d(
      ...     loss, jnp.zeros(2), jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]),
      ...     [0.0, 1.0], [0.0, 1.0, 2.0])
      >>> grid.tolist()
      [[0.0, 3.0, 12.0], [1.0, 4.0, 13.0]]
    """
    alphas = _check_grid(alphas, "alphas")
    betas = _check_grid(betas, "betas")
    _check_direction(direction_x, params, "direction_x")
    _check_direction(direction_y, params, "direction_y")
    grid_a, grid_b = np.meshgrid(alphas, betas, indexing="ij")
    coefficients = np.stack([grid_a.ravel(), grid_b.ravel()], 1).astype(np.float32)
    flat = _evaluate(loss_fn, params, [direction_x, direction_y], coefficients,
                     batch_size, progress, "2-D landscape")
    return flat.reshape(len(alphas), len(betas))


def interpolation_landscape(loss_fn: Callable[[PyTree], jax.Array],
                            params_a: PyTree, params_b: PyTree,
                            alphas: Sequence[float], *,
                            batch_size: Optional[int] = None,
                            progress: bool = True) -> jax.Array:
    """``L((1 − α) θ_a + α θ_b)``: the loss on the line through two solutions.

    ``α = 0`` is ``params_a``, ``α = 1`` is ``params_b``; values outside
    [0, 1] extrapolate (Goodfellow et al. 2015).

    Args:
      loss_fn: ``loss_fn(params)`` -> scalar.
      params_a: first solution.
      params_b: second solution (same tree and shapes).
      alphas: 1-D coordinates.
      batch_size: points per compiled call (default: all at once).
      progress: tqdm bar when there is more than one call.

    Returns:
      ``(len(alphas),)`` losses.

    Example:
      >>> import jax.numpy as jnp, sam_optax
      >>> loss = lambda w: jnp.sum(w ** 2)
      >>> sam_optax.sharpness.interpolation_landscape(
      ...     loss, jnp.zeros(2), jnp.ones(2), [0.0, 0.5, 1.0]).tolist()
      [0.0, 0.5, 2.0]

    References:
      Goodfellow, Vinyals and Saxe, Qualitatively characterizing neural
      network optimization problems, ICLR 2015. https://arxiv.org/abs/1412.6544
    """
    _check_direction(params_b, params_a, "params_b")
    direction = jax.tree.map(
        lambda b, a: b.astype(numerics.compute_dtype(b.dtype))
        - a.astype(numerics.compute_dtype(a.dtype)), params_b, params_a)
    return loss_landscape_1d(loss_fn, params_a, direction, alphas,
                             batch_size=batch_size, progress=progress)


# --------------------------------------------------------------------------
# Plots.

Curves = Union[Mapping[str, Any], Any]


def _as_named(values: Curves, default: str) -> dict[str, np.ndarray]:
    if isinstance(values, Mapping):
        if not values:
            raise ValueError("nothing to plot: the mapping is empty.")
        return {str(k): np.asarray(v) for k, v in values.items()}
    return {default: np.asarray(values)}


def plot_landscape_1d(alphas: Sequence[float], losses: Curves, *,
                      xlabel: str = "α", ylabel: str = "loss",
                      title: Optional[str] = None, log_scale: bool = False,
                      ax: Any = None) -> Any:
    """Plot 1-D slices: ``losses`` is an array or a mapping name → array.

    Args:
      alphas: the coordinates.
      losses: one ``(len(alphas),)`` array, or a mapping of label → array.
      xlabel: x-axis label.
      ylabel: y-axis label.
      title: optional title.
      log_scale: logarithmic y axis.
      ax: draw into this Axes instead of a new Figure.

    Returns:
      The :class:`matplotlib.figure.Figure`.
    """
    from matplotlib.figure import Figure

    alphas = _check_grid(alphas, "alphas")
    curves = _as_named(losses, "loss")
    for name, curve in curves.items():
        if curve.shape != alphas.shape:
            raise ValueError(f"losses[{name!r}] has shape {curve.shape}; "
                             f"expected {alphas.shape} (one per alpha).")
    if ax is None:
        fig = Figure(figsize=(5, 3.5), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    for name, curve in curves.items():
        ax.plot(alphas, curve, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_scale:
        ax.set_yscale("log")
    if len(curves) > 1:
        ax.legend()
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def plot_landscape_2d(alphas: Sequence[float], betas: Sequence[float],
                      losses: Curves, *, levels: int = 20,
                      log_scale: bool = False, title: Optional[str] = None
                      ) -> Any:
    """Contour plots of 2-D slices, side by side with one shared colour scale.

    Args:
      alphas: coordinates of the first axis (rows of ``losses``).
      betas: coordinates of the second axis (columns).
      losses: one ``(len(alphas), len(betas))`` grid, or a mapping label → grid.
      levels: number of contour levels.
      log_scale: contour ``log10(loss)`` (helps when minima differ a lot).
      title: optional overall title.

    Returns:
      The :class:`matplotlib.figure.Figure`.
    """
    from matplotlib.figure import Figure

    alphas = _check_grid(alphas, "alphas")
    betas = _check_grid(betas, "betas")
    validation.check_positive_int(levels, "levels")
    grids = _as_named(losses, "loss")
    for name, grid in grids.items():
        if grid.shape != (alphas.size, betas.size):
            raise ValueError(
                f"losses[{name!r}] has shape {grid.shape}; expected "
                f"{(alphas.size, betas.size)} (len(alphas), len(betas)).")
    if log_scale:
        grids = {k: np.log10(np.maximum(v, 1e-12)) for k, v in grids.items()}
    low = min(float(np.min(g)) for g in grids.values())
    high = max(float(np.max(g)) for g in grids.values())
    contour_levels = np.linspace(low, high if high > low else low + 1, levels)
    fig = Figure(figsize=(4.2 * len(grids) + 0.8, 3.8), layout="constrained")
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    contour = None
    for ax, (name, grid) in zip(axes, grids.items(), strict=True):
        contour = ax.contourf(betas, alphas, grid, levels=contour_levels,
                              cmap="viridis")
        ax.contour(betas, alphas, grid, levels=contour_levels, colors="k",
                   linewidths=0.3)
        ax.plot([0], [0], "r+", markersize=10)
        ax.set_title(name)
        ax.set_xlabel("β")
        ax.set_ylabel("α")
    fig.colorbar(contour, ax=list(axes), label="log10 loss" if log_scale else "loss")
    if title:
        fig.suptitle(title)
    return fig


__all__ = [
    "EigenResult",
    "TraceEstimate",
    "filter_normalized_direction",
    "hessian_vector_product",
    "hutchinson_trace",
    "interpolation_landscape",
    "lanczos",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "m_sharpness",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "power_iteration",
]

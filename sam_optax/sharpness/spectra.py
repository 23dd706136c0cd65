"""Hessian spectra from Hessian-vector products: λ_max, the top-k, tr(H).

SAM's claim is geometric: it finds minima whose Hessian has a small top
eigenvalue λ_max (Foret et al. 2021, Fig. 3: λ_max ≈ 24 → ≈ 1 on a WRN,
λ_max/λ_5 ≈ 11.4 → 2.6). These functions measure that on any JAX loss,
never forming ``H``:

* :func:`hessian_vector_product` -- ``v ↦ H v`` by forward-over-reverse
  differentiation, on one batch or averaged over stacked batches;
* :func:`power_iteration` and :func:`lanczos` -- the top eigenvalue(s) of H,
  with convergence information (:class:`EigenResult`);
* :func:`hutchinson_trace` -- an unbiased estimate of tr(H)
  (:class:`TraceEstimate`).

All run under ``jax.jit`` (``loss_fn`` and the integer arguments are
static). Vectors are handled flat (:func:`jax.flatten_util.ravel_pytree`) in
float32, or float64 when the params are float64 (``jax.enable_x64``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from sam_optax import numerics, validation
from sam_optax.sharpness._checks import check_batches
from sam_optax.types import PyTree

# ``loss_fn(params)``, or ``loss_fn(params, batch)`` when batches are given.
ScalarLoss = Callable[..., jax.Array]


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
# Argument checks and dtypes.


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


def hessian_vector_product(loss_fn: ScalarLoss, params: PyTree,
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
      batches: ``None`` when ``loss_fn(params)`` takes the params only;
        otherwise a pytree of arrays whose leading axis indexes batches, and
        ``loss_fn(params, batch)`` is called on each slice. The Hessian is
        then the mean over batches (the Hessian of the mean loss).

    Returns:
      A function mapping a tree like ``params`` to ``H v`` (same tree).

    Example:
      >>> import jax.numpy as jnp, sam_optax
      >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([3.0, 1.0]) * w ** 2)
      >>> hvp = sam_optax.sharpness.hessian_vector_product(loss, jnp.zeros(2))
      >>> hvp(jnp.ones(2)).tolist()
      [3.0, 1.0]
    """
    check_batches(batches)
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


def power_iteration(loss_fn: ScalarLoss, params: PyTree, *, batches: Any = None,
                    key: Optional[jax.Array] = None, num_iterations: int = 100,
                    tol: float = 1e-6) -> EigenResult:
    """The Hessian eigenvalue of largest magnitude, by power iteration.

    .. math::

      v_{t+1} = \\frac{H v_t}{\\lVert H v_t \\rVert}, \\qquad
      λ_t = v_t^\\top H v_t

    stopping when ``|λ_t − λ_{t−1}| ≤ tol·|λ_t|`` or after
    ``num_iterations`` Hessian-vector products. Power iteration converges to
    the eigenvalue of largest *magnitude*; at a minimum that is λ_max. Its
    speed depends on the gap ``|λ₂/λ₁|``: prefer :func:`lanczos` for accuracy or
    for several eigenvalues.

    Args:
      loss_fn: scalar loss, ``loss_fn(params)`` or ``loss_fn(params, batch)``.
      params: the point at which the Hessian is taken.
      batches: ``None`` when ``loss_fn(params)`` takes the params only;
        otherwise a pytree of arrays whose leading axis indexes batches, and
        ``loss_fn(params, batch)`` is called on each slice. The Hessian is
        then the mean over batches (the Hessian of the mean loss).
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
    check_batches(batches)
    key = jax.random.PRNGKey(0) if key is None else key
    return _power_iteration(loss_fn, params, batches, key, tol, num_iterations)


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


def lanczos(loss_fn: ScalarLoss, params: PyTree, *, k: int = 5,
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
      batches: ``None`` when ``loss_fn(params)`` takes the params only;
        otherwise a pytree of arrays whose leading axis indexes batches, and
        ``loss_fn(params, batch)`` is called on each slice. The Hessian is
        then the mean over batches (the Hessian of the mean loss).
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
    check_batches(batches)
    key = jax.random.PRNGKey(0) if key is None else key
    return _lanczos(loss_fn, params, batches, key, tol, k, num_iterations)


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


def hutchinson_trace(loss_fn: ScalarLoss, params: PyTree, *, batches: Any = None,
                     key: Optional[jax.Array] = None,
                     num_samples: int = 100) -> TraceEstimate:
    """Hutchinson's unbiased estimate of the Hessian trace.

    .. math::

      \\mathrm{tr}(H) = \\mathbb{E}_z[z^\\top H z], \\quad
      z_i \\in \\{-1, +1\\} \\text{ uniformly}

    Args:
      loss_fn: scalar loss, ``loss_fn(params)`` or ``loss_fn(params, batch)``.
      params: the point at which the Hessian is taken.
      batches: ``None`` when ``loss_fn(params)`` takes the params only;
        otherwise a pytree of arrays whose leading axis indexes batches, and
        ``loss_fn(params, batch)`` is called on each slice. The Hessian is
        then the mean over batches (the Hessian of the mean loss).
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
    check_batches(batches)
    key = jax.random.PRNGKey(0) if key is None else key
    return _hutchinson(loss_fn, params, batches, key, num_samples)


__all__ = [
    "EigenResult",
    "TraceEstimate",
    "hessian_vector_product",
    "hutchinson_trace",
    "lanczos",
    "power_iteration",
]

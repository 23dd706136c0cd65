"""Loss landscapes: the loss along random or interpolating directions.

* :func:`filter_normalized_direction` -- a random direction with the scale
  of the weights, filter by filter (Li et al. 2018);
* :func:`loss_landscape_1d` and :func:`loss_landscape_2d` -- ``L(θ + α d)``
  and ``L(θ + α d_x + β d_y)`` on a grid;
* :func:`interpolation_landscape` -- ``L((1 − α) θ_a + α θ_b)`` between two
  solutions (Goodfellow et al. 2015).

The grid points are evaluated with ``vmap`` in chunks of one compiled shape,
so a whole 2-D grid costs one compilation. :mod:`sam_optax.sharpness.plots`
draws the results.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax import numerics, validation
from sam_optax.sharpness._checks import check_grid
from sam_optax.types import PyTree


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
    alpha_grid = check_grid(alphas, "alphas")
    _check_direction(direction, params, "direction")
    coefficients = alpha_grid.astype(np.float32)[:, None]
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
    alpha_grid = check_grid(alphas, "alphas")
    beta_grid = check_grid(betas, "betas")
    _check_direction(direction_x, params, "direction_x")
    _check_direction(direction_y, params, "direction_y")
    grid_a, grid_b = np.meshgrid(alpha_grid, beta_grid, indexing="ij")
    coefficients = np.stack([grid_a.ravel(), grid_b.ravel()], 1).astype(np.float32)
    flat = _evaluate(loss_fn, params, [direction_x, direction_y], coefficients,
                     batch_size, progress, "2-D landscape")
    return flat.reshape(len(alpha_grid), len(beta_grid))


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


__all__ = [
    "filter_normalized_direction",
    "interpolation_landscape",
    "loss_landscape_1d",
    "loss_landscape_2d",
]

"""m-sharpness: SAM's worst-case loss increase, measured on chunks of m examples.

The inner maximisation uses the library's own ascent, so "the SAM ascent
with n steps" means the same ε here as in training: ``ascent_steps=n`` is
:func:`sam_optax.ascent.multistep_ascent` with ``steps=n``, the ascent of
:func:`sam_optax.multistep_sam` (projected steps, see below), and
``ascent_steps=1`` is SAM's :func:`sam_optax.ascent.normalized_ascent`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Optional

import jax
import jax.numpy as jnp

from sam_optax import ascent as ascent_lib
from sam_optax import numerics, validation
from sam_optax.core import Ascent
from sam_optax.sharpness._checks import check_batches
from sam_optax.types import PyTree


@functools.cache
def _default_ascent(steps: int) -> Ascent:
    # One instance per n, so repeated calls hit the same compiled function.
    return ascent_lib.multistep_ascent(steps)


def _perturbation(ascent: Ascent, grad_fn: Callable[[PyTree], PyTree],
                  params: PyTree, rho: jax.Array) -> PyTree:
    """ε of a first SAM step at ``params``: the ascent, called as the core
    calls it (fresh state, the clean gradient, ``grad_fn`` for later steps)."""
    return ascent.perturbation(grad_fn(params), ascent.init(params), params,
                               rho=rho, grad_fn=grad_fn).epsilon


@functools.partial(jax.jit, static_argnames=("loss_fn", "m", "ascent"))
def _m_sharpness(loss_fn, params, data, rho, m, ascent):
    n = jax.tree.leaves(data)[0].shape[0]
    chunks = jax.tree.map(lambda x: x.reshape((n // m, m) + x.shape[1:]), data)

    def one_chunk(chunk):
        loss = lambda p: loss_fn(p, chunk)
        epsilon = _perturbation(ascent, jax.grad(loss), params, rho)
        return loss(numerics.add_perturbation(params, epsilon)) - loss(params)

    per_chunk = jax.lax.map(one_chunk, chunks)
    return jnp.mean(per_chunk), per_chunk


def m_sharpness(loss_fn: Callable[[PyTree, PyTree], jax.Array], params: PyTree,
                data: PyTree, *, rho: float, m: int, ascent_steps: int = 1,
                ascent: Optional[Ascent] = None) -> tuple[jax.Array, jax.Array]:
    """m-sharpness: the SAM ascent's loss increase, averaged over chunks of m.

    Foret et al. (2021, §4.1) relate generalization to

    .. math::

      \\frac{1}{|S|/m} \\sum_{S_i} \\max_{\\lVert ε \\rVert_2 \\le ρ}
      L_{S_i}(w + ε) − L_{S_i}(w)

    over disjoint chunks ``S_i`` of ``m`` examples. The inner max is
    approximated, on each chunk, by the ascent that
    :func:`sam_optax.multistep_sam` takes (Foret et al. 2021, App. C.6;
    :func:`sam_optax.ascent.multistep_ascent`): with ``n = ascent_steps``,
    ``g_k`` the chunk's gradient and Π the projection on the ball,

    .. math::

      ε_1 = ρ \\frac{g_1}{\\lVert g_1 \\rVert}, \\qquad
      ε_k = Π_{\\lVert ε \\rVert \\le ρ}\\Big(ε_{k-1} + \\frac{ρ}{n}
      \\frac{g_k}{\\lVert g_k \\rVert}\\Big), \\quad
      g_k = ∇L_{S_i}(w + ε_{k-1})

    ``n = 1`` is SAM's ascent ``ε = ρ g/‖g‖``. Every ε lies in the ball, so
    the result is a lower bound on the true maximum. Chunks are processed
    with ``lax.map``.

    Args:
      loss_fn: ``loss_fn(params, chunk)`` -> mean loss over the chunk.
      params: the weights w.
      data: pytree of arrays with a leading example axis of size ``N``
        (``N`` divisible by ``m``).
      rho: the radius ρ ≥ 0.
      m: chunk size (≥ 1).
      ascent_steps: n ≥ 1, the number of ascent steps of the default ascent.
      ascent: another :class:`sam_optax.Ascent` to take instead (e.g.
        :func:`sam_optax.ascent.adaptive_ascent`, or
        ``multistep_ascent(n, step_size=...)`` for other step sizes); then
        ``ascent_steps`` must stay 1: the ascent defines its own steps.

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
    n = check_batches(data, "data")
    if n is None:
        raise ValueError("`data` must be a pytree of arrays with a leading "
                         "example axis; got None.")
    if n % m:
        raise ValueError(
            f"`m` ({m}) must divide the number of examples ({n}); drop "
            f"{n % m} examples or choose another m.")
    if ascent is None:
        ascent = _default_ascent(ascent_steps)
    elif not isinstance(ascent, Ascent):
        raise TypeError("`ascent` must be a sam_optax.Ascent, e.g. "
                        "`sam_optax.ascent.normalized_ascent()`.")
    elif ascent_steps != 1:
        raise ValueError(
            f"`ascent_steps` ({ascent_steps}) sets the steps of the default "
            "ascent only; with `ascent=` leave it at 1 and pass a multi-step "
            f"ascent, e.g. `ascent=sam_optax.ascent.multistep_ascent("
            f"{ascent_steps}, mask=...)`.")
    return _m_sharpness(loss_fn, params, data, jnp.asarray(rho, jnp.float32), m,
                        ascent)


__all__ = ["m_sharpness"]

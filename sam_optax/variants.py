"""Named constructors: each variant is a combination of the core's parts."""

from __future__ import annotations

from typing import Optional, Sequence

import optax

from sam_optax import ascent as ascent_lib
from sam_optax import descent as descent_lib
from sam_optax import numerics
from sam_optax import schedule as schedule_lib
from sam_optax.core import AxisName, ScalarOrSchedule, sharpness_aware


def sam(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    *,
    mask: numerics.Mask = None,
    axis_name: AxisName = None,
    sync_perturbation: bool = False,
    perturbation_axis_name: AxisName = None,
    perturbation_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
) -> optax.GradientTransformationExtraArgs:
    """Sharpness-Aware Minimization (SAM) around any Optax optimizer.

    With ``g = ∇L(w)`` the mini-batch gradient at the current weights:

    .. math::

      ε = ρ \\frac{g}{\\lVert g \\rVert_2}, \\qquad
      g_{sam} = ∇L(w + ε), \\qquad
      w \\leftarrow w + \\mathrm{base\\_tx}(g_{sam})

    The norm is the global L2 norm over all leaves, computed in float32; ε is
    exactly 0 when ``g`` is 0 (never NaN). Both gradient evaluations happen in
    the caller's one ``jit``: ``update`` calls ``grad_fn(w + ε)`` itself.

    Everything that should see the SAM gradient (clipping, weight decay,
    gradient accumulation with ``optax.MultiSteps``, schedules) belongs in
    ``base_tx``. A transformation placed *before* ``sam`` in an
    ``optax.chain`` changes only ``g`` (hence ε), not ``g_sam``.

    Args:
      base_tx: the optimizer that receives the SAM gradient.
      rho: the neighbourhood radius ρ ≥ 0, or an Optax schedule of the SAM
        step count. ``rho=0`` reproduces ``base_tx`` exactly.
      mask: optional bool tree (or callable on params) of the leaves to
        perturb; the norm is taken over them only; every leaf is still updated.
      axis_name: when called inside ``pmap``/``shard_map``/``vmap`` over this
        axis, pass **local (un-averaged) gradients**: ε is computed per shard
        (m-sharpness) and ``g_sam`` is averaged over the axis before
        ``base_tx``.
      sync_perturbation: average ``g`` over ``axis_name`` before the ascent
        (one ε for the global batch: plain SAM) instead of per-shard ε.
      perturbation_axis_name: average ``g`` over these axes before the ascent
        (grouped ε: e.g. the inner axis of a 2-D mesh).
      perturbation_axis_index_groups: ``axis_index_groups`` for that average.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`;
      ``update(grads, state, params, *, grad_fn, **extra_args)`` where
      ``grad_fn(params) -> grads`` (or ``-> (loss, grads)`` to record L(w+ε)).
      Pass ``value=loss`` too to record the sharpness L(w+ε) − L(w) in
      :func:`sam_optax.diagnostics`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> def loss_fn(w):
      ...   return jnp.sum((w - jnp.array([1.0, -2.0])) ** 2)
      >>> params = jnp.zeros(2)
      >>> tx = sam_optax.sam(optax.sgd(0.1), rho=0.05)
      >>> state = tx.init(params)
      >>> for _ in range(100):
      ...   grads = jax.grad(loss_fn)(params)
      ...   updates, state = tx.update(grads, state, params,
      ...                              grad_fn=jax.grad(loss_fn))
      ...   params = optax.apply_updates(params, updates)
      >>> [round(float(x), 2) for x in params]
      [1.0, -2.0]

    References:
      Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware Minimization for
      Efficiently Improving Generalization. ICLR 2021.
      https://arxiv.org/abs/2010.01412
    """
    if sync_perturbation:
        if perturbation_axis_name is not None:
            raise ValueError(
                "give either `sync_perturbation=True` or "
                "`perturbation_axis_name`, not both.")
        if axis_name is None:
            raise ValueError("`sync_perturbation=True` needs `axis_name`.")
        perturbation_axis_name = axis_name
    return sharpness_aware(
        base_tx, rho,
        ascent=ascent_lib.normalized_ascent(mask=mask),
        descent=descent_lib.sam_gradient(),
        schedule=schedule_lib.every_step(),
        axis_name=axis_name,
        perturbation_axis_name=perturbation_axis_name,
        perturbation_axis_index_groups=perturbation_axis_index_groups,
    )


__all__ = ["sam"]

"""Ways to compute the perturbation ε from the clean gradient.

Every ascent returns ε in float32 (or wider) with the tree of params, zero on
leaves it does not perturb; the core adds it to the params in their own dtype.
Norms and masks come from :mod:`sam_optax.numerics`, so zero and tiny
gradients are handled once for all.
"""

from __future__ import annotations

from typing import Any


from sam_optax import numerics
from sam_optax import validation
from sam_optax.core import Ascent

PyTree = Any


def _no_state(params: PyTree) -> tuple:
    del params
    return ()


def normalized_ascent(mask: numerics.Mask = None) -> Ascent:
    """SAM's ascent for p = 2 (Foret et al. 2021, eq. 2).

    .. math::

      ε = ρ \\frac{g}{\\lVert g \\rVert_2}

    with the global L2 norm over all (selected) leaves; ε = 0 when g = 0.

    Args:
      mask: optional bool tree (or callable on params returning one): only
        selected leaves are perturbed and enter the norm.

    References:
      Foret et al., Sharpness-Aware Minimization for Efficiently Improving
      Generalization, ICLR 2021. https://arxiv.org/abs/2010.01412
    """
    validation.optional_mask_error(mask)

    def init(params: PyTree) -> tuple:
        numerics.resolve_mask(mask, params)  # fail early on a bad mask
        return ()

    def perturbation(grads, state, params, *, rho, grad_fn, count):
        del grad_fn, count
        direction, _ = numerics.safe_normalize(
            grads, numerics.resolve_mask(mask, params))
        return numerics.scale_tree(direction, rho), state

    return Ascent(init=init, perturbation=perturbation)


__all__ = ["normalized_ascent"]

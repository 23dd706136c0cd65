"""Ways to combine the clean and the perturbed gradients for ``base_tx``."""

from __future__ import annotations

from typing import Any

from sam_optax.core import Descent

PyTree = Any


def sam_gradient() -> Descent:
    """Plain SAM: ``base_tx`` receives the perturbed gradient ``∇L(w + ε)``.

    References:
      Foret et al. 2021, https://arxiv.org/abs/2010.01412
    """

    def init(params: PyTree) -> tuple:
        del params
        return ()

    def combine(grads, perturbed_grads, state, params, *, perturbation, rho,
                count):
        del grads, params, perturbation, rho, count
        return perturbed_grads, state

    return Descent(init=init, combine=combine, reuse=None,
                   uses_clean_grads=False)


__all__ = ["sam_gradient"]

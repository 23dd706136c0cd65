"""Measuring flatness: Hessian spectra, m-sharpness and loss landscapes.

SAM's claim is geometric: it finds minima whose Hessian has a small top
eigenvalue λ_max (Foret et al. 2021, Fig. 3). This package measures that,
and the loss around a solution, on any JAX loss. One module per topic, every
public name re-exported here (``sam_optax.sharpness.lanczos``):

* ``sam_optax.sharpness.spectra`` -- :func:`hessian_vector_product`,
  :func:`power_iteration`, :func:`lanczos` (top eigenvalues, as
  :class:`EigenResult`) and :func:`hutchinson_trace` (tr(H), as
  :class:`TraceEstimate`), from Hessian-vector products only;
* ``sam_optax.sharpness.msharpness`` -- :func:`m_sharpness`,
  ``max_{‖ε‖≤ρ} L(w+ε) − L(w)`` by the library's SAM ascent, averaged over
  chunks of m examples;
* ``sam_optax.sharpness.landscapes`` --
  :func:`filter_normalized_direction`, :func:`loss_landscape_1d`,
  :func:`loss_landscape_2d` and :func:`interpolation_landscape`: loss slices
  (Li et al. 2018) evaluated with ``vmap`` in one compiled call;
* ``sam_optax.sharpness.plots`` -- :func:`plot_landscape_1d` and
  :func:`plot_landscape_2d`, matplotlib Figures (matplotlib is imported on
  first use only).

Everything except the plots is pure JAX and can run under ``jax.jit``.
"""

from sam_optax.sharpness.landscapes import (
    filter_normalized_direction,
    interpolation_landscape,
    loss_landscape_1d,
    loss_landscape_2d,
)
from sam_optax.sharpness.msharpness import m_sharpness
from sam_optax.sharpness.plots import plot_landscape_1d, plot_landscape_2d
from sam_optax.sharpness.spectra import (
    EigenResult,
    TraceEstimate,
    hessian_vector_product,
    hutchinson_trace,
    lanczos,
    power_iteration,
)

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

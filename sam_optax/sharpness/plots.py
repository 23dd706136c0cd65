"""Matplotlib figures of loss landscapes, several models side by side.

:func:`plot_landscape_1d` and :func:`plot_landscape_2d` draw the output of
:mod:`sam_optax.sharpness.landscapes`. Matplotlib is imported inside the
functions, so ``import sam_optax`` does not import it (it is an optional
dependency: install it to plot). Both build a
:class:`matplotlib.figure.Figure` directly, without pyplot's global state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np

from sam_optax import validation
from sam_optax.sharpness._checks import check_grid

Curves = Union[Mapping[str, Any], Any]


def _as_named(values: Curves, default: str) -> dict[str, np.ndarray]:
    if isinstance(values, Mapping):
        if not values:
            raise ValueError("nothing to plot: the mapping is empty.")
        return {str(k): np.asarray(v) for k, v in values.items()}
    return {default: np.asarray(values)}


def _figure_class() -> Any:
    """``matplotlib.figure.Figure``, imported on first use (an optional
    dependency: ``import sam_optax`` must not pay for it or require it)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "the sharpness plots need matplotlib: `pip install matplotlib` "
            "(or `pip install sam_optax[train]`).") from err
    return Figure


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
    Figure = _figure_class()
    alpha_grid = check_grid(alphas, "alphas")
    curves = _as_named(losses, "loss")
    for name, curve in curves.items():
        if curve.shape != alpha_grid.shape:
            raise ValueError(f"losses[{name!r}] has shape {curve.shape}; "
                             f"expected {alpha_grid.shape} (one per alpha).")
    if ax is None:
        fig = Figure(figsize=(5, 3.5), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    for name, curve in curves.items():
        ax.plot(alpha_grid, curve, label=name)
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
    Figure = _figure_class()
    alpha_grid = check_grid(alphas, "alphas")
    beta_grid = check_grid(betas, "betas")
    validation.check_positive_int(levels, "levels")
    grids = _as_named(losses, "loss")
    for name, grid in grids.items():
        if grid.shape != (alpha_grid.size, beta_grid.size):
            raise ValueError(
                f"losses[{name!r}] has shape {grid.shape}; expected "
                f"{(alpha_grid.size, beta_grid.size)} (len(alphas), len(betas)).")
    if log_scale:
        grids = {k: np.log10(np.maximum(v, 1e-12)) for k, v in grids.items()}
    low = min(float(np.min(g)) for g in grids.values())
    high = max(float(np.max(g)) for g in grids.values())
    contour_levels = np.linspace(low, high if high > low else low + 1, levels)
    fig = Figure(figsize=(4.2 * len(grids) + 0.8, 3.8), layout="constrained")
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    contour = None
    for ax, (name, grid) in zip(axes, grids.items(), strict=True):
        contour = ax.contourf(beta_grid, alpha_grid, grid,
                              levels=contour_levels, cmap="viridis")
        ax.contour(beta_grid, alpha_grid, grid, levels=contour_levels,
                   colors="k", linewidths=0.3)
        ax.plot([0], [0], "r+", markersize=10)
        ax.set_title(name)
        ax.set_xlabel("β")
        ax.set_ylabel("α")
    fig.colorbar(contour, ax=list(axes), label="log10 loss" if log_scale else "loss")
    if title:
        fig.suptitle(title)
    return fig


__all__ = ["plot_landscape_1d", "plot_landscape_2d"]

"""Optimizers by name: the base optimizer, its schedule, and any SAM method.

``config.optimizer`` is ``"sgd"`` (no SAM: the base optimizer alone) or the
name of a ``sam_optax`` constructor; that constructor's hyperparameters come
from the config block of the same name (``config.sam.rho``,
``config.gsam.alpha``, ...), whose defaults are the constructor's own
(:func:`default_hyperparameters`, read from its signature).
``config.base_optimizer`` is ``"sgd"`` (with momentum), ``"adam"`` or
``"adamw"``, with the learning rate ``config.learning_rate`` following
``config.lr_schedule``: ``"constant"``, ``"cosine"`` (to 0 at the last step)
or ``"warmup_cosine"`` (linear warm-up over ``config.warmup_steps``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Optional

import jax
import optax

import sam_optax

SAM_METHODS = ("sam", "asam", "fisher_sam", "friendly_sam", "gcsam", "vasso",
               "random_sam", "multistep_sam", "esam", "ssam_f", "ssam_d",
               "gsam", "wsam", "looksam", "every_k_sam", "ae_sam", "msam",
               "lookbehind_sam", "sampa", "gam")
OPTIMIZERS = ("sgd",) + SAM_METHODS
# Keep state computed from the gradient that defines ε (a momentum, a sparse
# mask, a perturbed point): per replica under per-device ε, which a
# replicated state cannot hold (run them with one ε).
PER_REPLICA_STATE = ("friendly_sam", "vasso", "ssam_f", "ssam_d",
                     "lookbehind_sam")
BASE_OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "warmup_cosine")

# Arguments the trainer sets itself (parallelism) or that are not plain
# numbers (masks are functions of the params): not in the config blocks.
_NOT_HYPERPARAMETERS = {
    "base_tx", "mask", "adaptive", "axis_name", "sync_perturbation",
    "perturbation_axis_name", "perturbation_axis_index_groups",
    "full_diagnostics", "learning_rate", "step_size"}


class ConfigError(ValueError):
    """A config the trainer refuses, with the key and the fix."""


def default_hyperparameters(name: str) -> dict[str, Any]:
    """The float/int/bool/str keyword arguments of constructor ``name`` with
    their defaults, e.g. ``{"rho": 0.05, "k": 5, "alpha": 0.7}`` for
    ``looksam``."""
    check_name(name, SAM_METHODS, "optimizer")
    signature = inspect.signature(getattr(sam_optax, name))
    return {p.name: p.default for p in signature.parameters.values()
            if p.name not in _NOT_HYPERPARAMETERS
            and isinstance(p.default, (bool, int, float, str))}


def check_name(value: str, valid: Sequence[str], key: str) -> None:
    """:class:`ConfigError` naming the config key and the valid values."""
    if value not in valid:
        raise ConfigError(
            f"unknown `{key}` {value!r}; valid: {', '.join(valid)} "
            f"(set it with `--config.{key}=NAME`)")


def learning_rate_schedule(config: Any, total_steps: int) -> optax.Schedule:
    """``config.learning_rate`` under ``config.lr_schedule`` over the run."""
    check_name(config.lr_schedule, LR_SCHEDULES, "lr_schedule")
    peak = float(config.learning_rate)
    if config.lr_schedule == "constant":
        return optax.constant_schedule(peak)
    if config.lr_schedule == "cosine":
        return optax.cosine_decay_schedule(peak, max(total_steps, 1))
    warmup = int(config.warmup_steps)
    if not 0 <= warmup < total_steps:
        raise ConfigError(
            f"`warmup_steps` {warmup} must be in [0, total steps = "
            f"{total_steps}) for lr_schedule='warmup_cosine'")
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total_steps)


def base_optimizer(config: Any, schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
    """The base optimizer (what receives the SAM gradient), weight decay in it."""
    check_name(config.base_optimizer, BASE_OPTIMIZERS, "base_optimizer")
    decay = float(config.weight_decay)
    if config.base_optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=decay)
    # L2 regularisation as a gradient term: it belongs inside SAM's base, so
    # it sees the SAM gradient (DESIGN.md's composition rule).
    parts = [optax.add_decayed_weights(decay)] if decay else []
    if config.base_optimizer == "sgd":
        parts.append(optax.sgd(schedule, momentum=float(config.momentum) or None))
    else:
        parts.append(optax.adam(schedule))
    return optax.chain(*parts)


def replica_mean(axis_name: Any) -> optax.GradientTransformation:
    """Average the (local) gradient over ``axis_name``: data parallelism for
    an optimizer without SAM, which would otherwise apply each replica's own
    update."""

    def update_fn(updates, state, params=None):
        del params
        return jax.lax.pmean(updates, axis_name), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                        update_fn)


def create(config: Any, total_steps: int, axis_name: Optional[Any] = None
           ) -> optax.GradientTransformationExtraArgs:
    """The optimizer named by ``config.optimizer``, for replicas over
    ``axis_name`` (``None``: one device, no collectives).

    Per-replica ε (m-sharpness) unless ``config.sync_perturbation``.

    Raises:
      ValueError: for an unknown name (listing the valid ones) or a
        hyperparameter the constructor does not take.
    """
    check_name(config.optimizer, OPTIMIZERS, "optimizer")
    schedule = learning_rate_schedule(config, total_steps)
    base = base_optimizer(config, schedule)
    if config.optimizer == "sgd":
        if axis_name is not None:
            base = optax.chain(replica_mean(axis_name), base)
        return optax.with_extra_args_support(base)
    name = config.optimizer
    hyper = dict(config[name]) if name in config else {}
    unknown = sorted(set(hyper) - set(default_hyperparameters(name)))
    if unknown:
        raise ConfigError(
            f"`{name}` takes no hyperparameter(s) {unknown}; its config block "
            f"`config.{name}` may set {sorted(default_hyperparameters(name))}")
    if name == "wsam" and hyper.get("decoupled"):
        hyper["learning_rate"] = schedule  # the decoupled step needs η_t
    constructor = getattr(sam_optax, name)
    if axis_name is not None:
        hyper["axis_name"] = axis_name
        # (SAMPa has no per-replica ε: its gradients are always averaged.)
        if "sync_perturbation" in inspect.signature(constructor).parameters:
            hyper["sync_perturbation"] = bool(config.sync_perturbation)
    return constructor(base, **hyper)


__all__ = ["BASE_OPTIMIZERS", "ConfigError", "LR_SCHEDULES", "OPTIMIZERS",
           "SAM_METHODS", "create", "default_hyperparameters",
           "learning_rate_schedule"]

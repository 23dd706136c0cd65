"""Argument checks with messages that name the argument and the fix.

Checks run at construction time where the value is known; values that arrive
traced (e.g. ρ under ``optax.inject_hyperparams``) are checked only for type.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from numbers import Real
from types import FrameType
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.core import Tracer


def _is_traced(x: Any) -> bool:
    return isinstance(x, Tracer)


def static_hint(name: str) -> str:
    """The fix for a hyperparameter that must be a Python value but arrived as
    a JAX array, as ``optax.inject_hyperparams`` makes every numeric one."""
    return (f" `{name}` fixes the program's structure, so it must be a Python "
            "value, not a JAX array: under `optax.inject_hyperparams` mark it "
            f"static, e.g. `optax.inject_hyperparams(constructor, "
            f"static_args=('{name}',))(...)`.")


def _is_real_scalar_dtype(dtype: Any) -> bool:
    # jnp's dtype tree knows bfloat16 (ml_dtypes); numpy's does not.
    return (jnp.issubdtype(dtype, jnp.integer)
            or jnp.issubdtype(dtype, jnp.floating))


def check_nonnegative_scalar_or_schedule(value: Any, name: str) -> None:
    """A float ≥ 0 (finite), a scalar array, or a callable schedule."""
    if callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, (Real, np.ndarray,
                                                          jax.Array)):
        raise ValueError(
            f"`{name}` must be a non-negative float or an optax schedule "
            f"(a function of the step count); got {type(value).__name__}: "
            f"{value!r}.")
    if _is_traced(value):
        return
    array = np.asarray(value)
    if array.shape != ():
        raise ValueError(
            f"`{name}` must be a scalar; got an array of shape {array.shape}.")
    if not _is_real_scalar_dtype(array.dtype):
        raise ValueError(
            f"`{name}` must be a real number; got an array of dtype "
            f"{array.dtype}.")
    scalar = float(array)
    if math.isnan(scalar) or scalar < 0 or math.isinf(scalar):
        raise ValueError(
            f"`{name}` must be finite and >= 0 (e.g. {name}=0.05); "
            f"got {scalar}.")


def check_choice(value: Any, name: str, choices: Sequence[str]) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a choice."""
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {', '.join(map(repr, choices))}; "
            f"got {value!r}.")


# Where users coming from `optax.contrib.sam` find the mapping of arguments.
MIGRATION_DOC = "README.md, section 'Coming from optax.contrib.sam'"


def check_rho(rho: Any) -> None:
    """ρ: a non-negative finite float or a schedule."""
    if hasattr(rho, "init") and hasattr(rho, "update"):
        raise TypeError(
            "`rho` is an optax transformation: this looks like "
            "`optax.contrib.sam(optimizer, adv_optimizer)`. sam_optax takes "
            "the ascent step itself; pass its radius instead, e.g. "
            "`sam_optax.sam(optimizer, rho=0.05)` for an `adv_optimizer` of "
            f"`optax.chain(normalize(), optax.sgd(0.05))` (see {MIGRATION_DOC}).")
    check_nonnegative_scalar_or_schedule(rho, "rho")


def check_in_range(value: Any, name: str, low: float, high: float, *,
                   low_open: bool = False, high_open: bool = False) -> None:
    """Finite and ``low ≤ value ≤ high`` (or open ends); skipped for traced
    values. An infinite bound means "any finite value on that side": ``inf``
    itself is refused (it turns the update into NaN)."""
    if _is_traced(value) or callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, (Real, np.ndarray,
                                                          jax.Array)):
        raise ValueError(f"`{name}` must be a number; got {value!r}.")
    array = np.asarray(value)
    if array.shape != () or not _is_real_scalar_dtype(array.dtype):
        raise ValueError(f"`{name}` must be a real scalar; got {value!r}.")
    scalar = float(array)
    too_low = scalar <= low if low_open else scalar < low
    too_high = scalar >= high if high_open else scalar > high
    if not math.isfinite(scalar):
        raise ValueError(f"`{name}` must be a finite number; got {scalar}.")
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(
            f"`{name}` must lie in {left}{low}, {high}{right}; got {scalar}.")


def check_positive_int(value: Any, name: str) -> None:
    """A Python (or NumPy) integer ≥ 1."""
    if isinstance(value, jax.Array):
        raise ValueError(f"`{name}` must be a Python int >= 1; got a JAX array "
                         f"({value!r})." + static_hint(name))
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
            value < 1):
        raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")


def check_bool(value: Any, name: str) -> None:
    """A Python bool (a flag that changes which program is built)."""
    if isinstance(value, jax.Array):
        raise ValueError(f"`{name}` must be True or False; got a JAX array "
                         f"({value!r})." + static_hint(name))
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False; got {value!r}.")


def as_transformation(base_tx: Any) -> optax.GradientTransformationExtraArgs:
    """Accept any Optax transformation (or ``optax.MultiSteps``).

    Raises:
      TypeError: if ``base_tx`` has no ``init``/``update``.
    """
    if hasattr(base_tx, "gradient_transformation") and not isinstance(
            base_tx, optax.GradientTransformation):
        base_tx = base_tx.gradient_transformation()  # optax.MultiSteps
    if not (callable(getattr(base_tx, "init", None))
            and callable(getattr(base_tx, "update", None))):
        raise TypeError(
            "`base_tx` must be an optax.GradientTransformation (e.g. "
            f"`optax.sgd(0.1)`); got {type(base_tx).__name__}.")
    if not isinstance(base_tx, optax.GradientTransformation):
        base_tx = optax.GradientTransformationExtraArgs(base_tx.init,
                                                        base_tx.update)
    return optax.with_extra_args_support(base_tx)


def check_axis_name(axis_name: Any, name: str) -> None:
    """``None``, a string, or a tuple of strings."""
    if axis_name is None or isinstance(axis_name, str):
        return
    if isinstance(axis_name, (tuple, list)) and all(
            isinstance(a, str) for a in axis_name):
        return
    raise ValueError(
        f"`{name}` must be None, an axis name (str) or a tuple of them; "
        f"got {axis_name!r}.")


def check_same_structure(tree: Any, params: Any, name: str) -> None:
    """``tree`` must have the structure and leaf shapes of ``params``."""
    params_struct = jax.tree.structure(params)
    tree_struct = jax.tree.structure(tree)
    if tree_struct != params_struct:
        raise ValueError(
            f"`{name}` must have the tree structure of params.\n"
            f"  params: {params_struct}\n"
            f"  {name}: {tree_struct}")
    check_same_shapes(tree, params, name)


def check_same_shapes(tree: Any, params: Any, name: str) -> None:
    """Leaf-by-leaf shape check, naming the first mismatching path."""
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, p), t in zip(paths, jax.tree.leaves(tree)):
        if np.shape(p) != np.shape(t):
            raise ValueError(
                f"`{name}` leaf {jax.tree_util.keystr(path)} has shape "
                f"{np.shape(t)} but the parameter has shape {np.shape(p)}.")


def leading_size(tree: Any, name: str, hint: str = "") -> int:
    """The leading (example) axis every array leaf of ``tree`` shares.

    Raises:
      ValueError: naming ``name`` and the offending leaf (or the sizes) when
        ``tree`` has no arrays, a scalar leaf, or leaves that disagree;
        ``hint`` (the fix in the caller's terms) is appended.
    """
    suffix = f" {hint}" if hint else ""
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not paths:
        raise ValueError(f"`{name}` has no arrays: it must hold the examples "
                         "stacked on a leading axis." + suffix)
    sizes = []
    for path, leaf in paths:
        shape = np.shape(leaf)
        if not shape:
            raise ValueError(
                f"`{name}` leaf {jax.tree_util.keystr(path)} is a scalar: "
                f"every leaf of `{name}` must have the examples on its "
                "leading axis." + suffix)
        sizes.append((jax.tree_util.keystr(path), shape[0]))
    if len({size for _, size in sizes}) > 1:
        listed = ", ".join(f"{path or name}: {size}" for path, size in sizes)
        raise ValueError(
            f"the leaves of `{name}` must share their leading (example) axis; "
            f"got {listed}." + suffix)
    return int(sizes[0][1])


def check_no_masked_nodes(params: Any) -> None:
    """SAM needs the whole parameter tree to evaluate ``grad_fn``."""
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    if any(is_masked(x) for x in jax.tree.leaves(params, is_leaf=is_masked)):
        raise TypeError(
            "SAM sits inside `optax.masked`/`optax.multi_transform` here and "
            "sees only part of the parameters, so it cannot evaluate "
            "`grad_fn` at params + ε. Put the masking inside SAM instead: "
            "`sam_optax.sam(optax.masked(base, mask))` or "
            "`sam_optax.sam(optax.multi_transform(...))`, and use "
            "`sam_optax.sam(base, mask=...)` to perturb only some leaves.")


def optax_caller(qualname_prefix: str, depth: Optional[int] = None
                 ) -> Optional[FrameType]:
    """The nearest frame of an Optax function named ``qualname_prefix...``
    among the callers of the function that calls this one (looking at most
    ``depth`` frames up), else ``None``.

    For wrappers that hand a SAM transformation ordinary arguments, so that
    only the Python stack shows them (``optax.MultiSteps``,
    ``optax.inject_hyperparams``). Read at trace time: no cost in the
    compiled step.
    """
    frame = sys._getframe(2)
    seen = 0
    while frame is not None and (depth is None or seen < depth):
        if (frame.f_code.co_qualname.startswith(qualname_prefix)
                and frame.f_globals.get("__name__", "").startswith("optax")):
            return frame
        frame = frame.f_back
        seen += 1
    return None

"""Masks: which leaves SAM perturbs, and helpers for Flax trees (SAM-ON).

**What a mask is.** Every ``mask=`` of this library (and ASAM's
``adaptive=``) means one thing, resolved by :func:`leaf_flags` in one
place:

* ``None``: every leaf;
* a tree of bools with the structure of the params, or a *prefix* of it, as
  ``optax.masked`` accepts: ``{"dense": True, "bn": False}`` selects every
  leaf under ``dense``, and a single ``True`` selects everything;
* a callable ``mask(params)`` returning such a tree (called with the params,
  at every step, under ``jax.ensure_compile_time_eval``).

A leaf of the mask may be a Python ``bool``, a NumPy ``bool_``, a 0-d NumPy
bool array or a *concrete* 0-d JAX bool array. Masks are static: they decide
which leaves enter the norm when the step is traced, so a mask computed from
parameter *values* inside ``jit`` (a tracer) is refused, as are leaves that
are not bools (ints, floats, strings, arrays with more than one entry).

**Helpers.** Each helper below takes a parameter tree (Flax Linen
``variables``/``params`` dicts, Flax NNX ``nnx.State``, or any nested dict)
and returns a bool tree of the same structure, so it can be passed as
``mask=`` (the function itself, like ``optax.masked``) to
:func:`sam_optax.sam` and every ascent variant::

  sam_optax.sam(optax.sgd(0.1), rho=0.5,
                mask=sam_optax.masks.normalization_layers)   # SAM-ON

A leaf's *module* is its path without the leaf name; a module is a
normalization layer when it holds a ``scale`` leaf (Flax's ``BatchNorm``,
``LayerNorm``, ``GroupNorm``, ``RMSNorm`` and ``InstanceNorm`` all name their
γ ``scale``) or when its name matches ``pattern`` (``BatchNorm_0``, ``bn1``,
``ln_f``, ``norm``...). Every parameter of such a module (γ and β) is a
normalization parameter. Pass another ``pattern`` for other naming schemes.

References:
  Mueller, Vlaar, Rolnick, Hein. Normalization Layers Are All That
  Sharpness-Aware Minimization Needs. NeurIPS 2023.
  https://arxiv.org/abs/2306.04226
"""

from __future__ import annotations

import re
from typing import Any, Optional, Union

import jax
import numpy as np
from jax.core import Tracer

from sam_optax.types import Mask, PyTree

Pattern = Union[str, re.Pattern]

# ------------------------------------------------- the one mask concept

_FIX = ("Pass a tree of Python bools with the structure of the params or a "
        "prefix of it (as `optax.masked` accepts), or a function of the "
        "params returning one.")


def _as_flag(leaf: Any, path: str, name: str) -> bool:
    """One mask leaf as a Python bool, or a ValueError naming ``path``."""
    if isinstance(leaf, Tracer):
        raise ValueError(
            f"`{name}` must be static, but its leaf {path} is a traced value "
            "(a mask computed from parameter values inside `jit`): which "
            "leaves take part must be known when the step is traced. Compute "
            "the mask from names or shapes (e.g. `lambda p: jax.tree.map("
            "lambda x: x.ndim > 1, p)`), or pass a precomputed bool tree.")
    if isinstance(leaf, (bool, np.bool_)):
        return bool(leaf)
    if (isinstance(leaf, (np.ndarray, jax.Array)) and leaf.shape == ()
            and leaf.dtype == np.bool_):
        return bool(leaf)
    described = (f"an array of dtype {leaf.dtype} and shape {leaf.shape}"
                 if hasattr(leaf, "dtype") and hasattr(leaf, "shape")
                 else f"{type(leaf).__name__} {leaf!r}")
    raise ValueError(
        f"`{name}` leaves must be bools (Python, NumPy or a concrete 0-d JAX "
        f"bool array); its leaf {path} is {described}. {_FIX}")


def _mask_tree_flags(mask_tree: PyTree, name: str) -> tuple[Any, list[bool]]:
    """The mask's own structure and its leaves as Python bools."""
    with_paths, structure = jax.tree_util.tree_flatten_with_path(mask_tree)
    return structure, [_as_flag(leaf, jax.tree_util.keystr(path) or "(root)",
                                name)
                        for path, leaf in with_paths]


def check(mask: Mask, name: str = "mask") -> None:
    """Check a mask at construction: leaves of a tree mask must be bools.

    Callables and the match with the params are checked by :func:`resolve`
    once the params are known (at ``init`` and at every ``update``).

    Raises:
      ValueError: naming ``name`` and the offending leaf.
    """
    if mask is None or callable(mask):
        return
    _mask_tree_flags(mask, name)


def leaf_flags(mask: Mask, params: PyTree, name: str = "mask") -> list[bool]:
    """Per leaf of ``params`` (flatten order), whether the mask selects it.

    Example:
      >>> import numpy as np, sam_optax
      >>> params = {"dense": {"b": np.zeros(2), "w": np.zeros((2, 2))},
      ...           "bn": {"scale": np.ones(2)}}
      >>> sam_optax.masks.leaf_flags({"dense": True, "bn": np.bool_(False)},
      ...                            params)   # a prefix of the params
      [False, True, True]

    Args:
      mask: ``None`` (every leaf), a bool tree with the structure of
        ``params`` or a prefix of it, or a callable on ``params`` returning
        one (see the module docstring).
      params: the parameter tree (arrays, tracers or Python scalars).
      name: the argument's name in error messages (``mask``, ``adaptive``).

    Raises:
      ValueError: for a traced leaf, a leaf that is not a bool, or a tree
        that is not a prefix of ``params``, naming ``name``.
    """
    params_struct = jax.tree.structure(params)
    if mask is None:
        return [True] * params_struct.num_leaves
    if callable(mask):
        # Concrete jnp arithmetic on names or shapes (jnp.prod(x.shape) > 8)
        # stays concrete under jit; only value-dependent masks are traced.
        with jax.ensure_compile_time_eval():
            mask_tree = mask(params)
    else:
        mask_tree = mask
    structure, flags = _mask_tree_flags(mask_tree, name)
    try:
        # One params subtree per mask leaf, in the params' flatten order.
        subtrees = structure.flatten_up_to(params)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"`{name}` must match the params or be a prefix of their tree; "
            f"the params have structure\n  {params_struct}\nbut `{name}` "
            f"has structure\n  {structure}\n{_FIX}") from err
    return [flag for flag, subtree in zip(flags, subtrees, strict=True)
            for _ in range(jax.tree.structure(subtree).num_leaves)]


def resolve(mask: Mask, params: PyTree, name: str = "mask"
            ) -> Optional[PyTree]:
    """:func:`leaf_flags` as a tree of Python bools shaped like ``params``
    (``None`` stays ``None``). Resolving a resolved mask returns it."""
    if mask is None:
        return None
    return jax.tree.structure(params).unflatten(leaf_flags(mask, params, name))


# Module names of normalization layers: Flax's defaults (BatchNorm_0,
# LayerNorm_1, RMSNorm_0...), names ending in "norm" plus an optional index
# (final_norm, norm1, input_layernorm) and the usual short names (bn1, ln_f,
# gn). Names with "norm" inside (prenorm_block) are not matched.
DEFAULT_NORM_PATTERN = r"(?i)(norm_?[0-9]*$|^(bn|ln|gn)(_?[0-9a-z]{0,2})$)"

# Trailing path entries that are not names (NNX wraps arrays in a Variable).
_WRAPPERS = ("value", "raw_value")


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _names(path: tuple) -> tuple[str, ...]:
    names = tuple(_key_name(k) for k in path)
    while names and names[-1] in _WRAPPERS:
        names = names[:-1]
    return names


def _norm_flags(params: PyTree, pattern: Pattern) -> list[bool]:
    """Per leaf (flatten order): whether it belongs to a normalization layer."""
    regex = re.compile(pattern)
    paths = [_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    norm_modules = {names[:-1] for names in paths if names and names[-1] == "scale"}
    # Only the leaf's own module name counts: a block called `prenorm_mlp`
    # holding Dense layers is not a normalization layer.
    return [len(names) >= 2 and (names[:-1] in norm_modules
                                 or regex.search(names[-2]) is not None)
            for names in paths]


def _unflatten(params: PyTree, flags: list[bool]) -> PyTree:
    return jax.tree.structure(params).unflatten(flags)


def normalization_layers(params: PyTree, *,
                         pattern: Pattern = DEFAULT_NORM_PATTERN) -> PyTree:
    """``True`` on the parameters of normalization layers (SAM-ON).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, sam_optax
      >>> class Net(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x):
      ...     return nn.Dense(2)(nn.LayerNorm()(nn.Dense(3)(x)))
      >>> params = Net().init(jax.random.key(0), jnp.ones((1, 2)))["params"]
      >>> sam_optax.masks.normalization_layers(params)["LayerNorm_0"]
      {'bias': True, 'scale': True}
      >>> sam_optax.masks.normalization_layers(params)["Dense_0"]
      {'bias': False, 'kernel': False}

    Args:
      params: a parameter tree.
      pattern: regular expression for module names of normalization layers.

    Returns:
      A bool tree with the structure of ``params``.
    """
    return _unflatten(params, _norm_flags(params, pattern))


def exclude_bias_and_norm(params: PyTree, *,
                          pattern: Pattern = DEFAULT_NORM_PATTERN) -> PyTree:
    """``False`` on biases (leaves named ``bias``) and normalization params.

    Useful as ``mask=`` (perturb weight tensors only) and as ASAM's
    ``adaptive=`` (``T = |w| + η`` on weight tensors, ``T = 1`` elsewhere).

    Example:
      >>> import jax.numpy as jnp, sam_optax
      >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
      ...           "bn": {"scale": jnp.ones(2), "bias": jnp.zeros(2)}}
      >>> sam_optax.masks.exclude_bias_and_norm(params)
      {'bn': {'bias': False, 'scale': False}, 'dense': {'bias': False, 'kernel': True}}

    Args:
      params: a parameter tree.
      pattern: regular expression for module names of normalization layers.

    Returns:
      A bool tree with the structure of ``params``.
    """
    paths = [_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    norm = _norm_flags(params, pattern)
    flags = [not (is_norm or (names and names[-1] == "bias"))
             for names, is_norm in zip(paths, norm, strict=True)]
    return _unflatten(params, flags)


__all__ = ["DEFAULT_NORM_PATTERN", "Mask", "check", "exclude_bias_and_norm",
           "leaf_flags", "normalization_layers", "resolve"]

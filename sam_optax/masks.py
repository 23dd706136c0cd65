"""Masks for Flax parameter trees: which leaves SAM perturbs (SAM-ON).

Each helper takes a parameter tree (Flax Linen ``variables``/``params`` dicts,
Flax NNX ``nnx.State``, or any nested dict) and returns a bool tree of the
same structure, so it can be passed as ``mask=`` (the function itself, like
``optax.masked``) to :func:`sam_optax.sam` and every ascent variant::

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
from typing import Any, Union

import jax

PyTree = Any
Pattern = Union[str, re.Pattern]

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


__all__ = ["DEFAULT_NORM_PATTERN", "exclude_bias_and_norm", "normalization_layers"]

"""Ways to compute the perturbation ε from the clean gradient.

Every ascent returns ε in float32 (or wider) with the tree of params, zero on
leaves it does not perturb; the core adds it to the params in their own dtype.

Almost every method in the literature is one formula,

.. math::

  ε = ρ \\, S ⊙ \\mathrm{unit}_p(S ⊙ v), \\qquad
  \\mathrm{unit}_2(x) = \\frac{x}{\\lVert x \\rVert_2}, \\quad
  \\mathrm{unit}_\\infty(x) = \\mathrm{sign}(x),

that differs only in the vector ``v`` that is normalised (the gradient, a
gradient corrected by an EMA, an EMA, a random draw) and in the elementwise
scale ``S`` (1; ``|w| + η`` for ASAM; ``(1 + η g²)^{-1/2}`` for Fisher-SAM).
:func:`_ascent` writes that formula, the mask and the safe norm once; each
public ascent below only says what ``v`` and ``S`` are. Two ascents wrap
others: :func:`multistep_ascent` (several ascent steps) and
:func:`stochastic_weight_perturbation` (ESAM's random subset of coordinates).
Norms come from :mod:`sam_optax.numerics`, so zero and tiny gradients give a
zero or an exact direction, never a NaN; a gradient with an ``inf`` or
``NaN`` entry (on the perturbed leaves) gives ε = 0 on every leaf, for every
ascent. Masks (``mask=``, ASAM's ``adaptive=``) are resolved by
:func:`sam_optax.masks.leaf_flags`, the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.core import Tracer

from sam_optax import masks, numerics, validation
from sam_optax.core import Ascent, Perturbation, no_state
from sam_optax.types import Mask, PyTree

Seed = Union[int, jax.Array]
# direction(grads, state, params) -> (v, new_state)
DirectionFn = Callable[[PyTree, Any, PyTree], tuple[PyTree, Any]]
# scale(grads, params) -> S (a tree of params' shape, compute dtype)
ScaleFn = Callable[[PyTree, PyTree], PyTree]

NORMS = ("l2", "linf")


class RandomAscentState(NamedTuple):
    """State of :func:`random_ascent`: the PRNG key of the next draw."""

    key: jax.Array


class FriendlyAscentState(NamedTuple):
    """State of :func:`friendly_ascent`.

    Attributes:
      count: number of ascents taken (int32); the first one seeds ``momentum``.
      momentum: EMA ``m`` of past gradients (compute dtype).
    """

    count: jax.Array
    momentum: PyTree


class VarianceSuppressedState(NamedTuple):
    """State of :func:`variance_suppressed_ascent` (VaSSO).

    Attributes:
      count: number of ascents taken (int32); the first one seeds ``ema``.
      ema: the EMA ``d`` of gradients that defines ε (compute dtype).
    """

    count: jax.Array
    ema: PyTree


class StochasticPerturbationState(NamedTuple):
    """State of :func:`stochastic_weight_perturbation` (ESAM).

    Attributes:
      key: the PRNG key of the next Bernoulli draw.
      inner: the state of the wrapped ascent.
    """

    key: jax.Array
    inner: Any


# ------------------------------------------------------------ shared pieces



def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(
            f"`norm` must be one of {NORMS} ('l2': ε = ρ g/‖g‖₂, SAM's p = 2; "
            f"'linf': ε = ρ sign(g), p = ∞); got {norm!r}.")


def _multiply(tree: PyTree, scale: Optional[PyTree]) -> PyTree:
    """``scale ⊙ tree`` in the compute dtype (identity when scale is None)."""
    if scale is None:
        return tree
    return jax.tree.map(
        lambda x, s: numerics.as_compute(x) * jnp.asarray(s).astype(
            numerics.compute_dtype(numerics.leaf_dtype(x)))
        if numerics.is_float(x) else x, tree, scale)


def _sign(tree: PyTree, mask_tree: Optional[PyTree]) -> PyTree:
    """``sign(x)``, the maximiser of ⟨x, ε⟩ over the ∞-ball (p = ∞), on the
    selected leaves; exact zeros elsewhere."""
    return jax.tree.map(jnp.sign, numerics.select_leaves(tree, mask_tree))


def _raw_key(seed: Seed) -> jax.Array:
    """A legacy ``uint32[2]`` key from an int seed or any JAX key."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return jax.random.PRNGKey(int(seed))
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype,
                                                      jax.dtypes.prng_key):
        return jax.random.key_data(seed)
    if (isinstance(seed, (jax.Array, np.ndarray)) and seed.shape == (2,)
            and seed.dtype == np.uint32):
        return jnp.asarray(seed)
    # optax.inject_hyperparams turns an int seed into an int32 array.
    hint = validation.static_hint("seed") if isinstance(seed, jax.Array) else ""
    raise ValueError(
        "`seed` must be an int or a JAX PRNG key (`jax.random.key(0)` or "
        f"`jax.random.PRNGKey(0)`); got {seed!r}.{hint}")


def _check_seed(seed: Seed) -> None:
    if not isinstance(seed, Tracer):
        _raw_key(seed)


def _map_pairs(f: Callable[..., tuple[Any, Any]], tree: PyTree,
               other: PyTree) -> tuple[PyTree, PyTree]:
    """``f`` leafwise returning pairs, as two trees of ``tree``'s structure
    (also for a tree without leaves, where ``jax.tree.transpose`` fails)."""
    leaves, treedef = jax.tree.flatten(tree)
    pairs = [f(x, y) for x, y in zip(leaves, treedef.flatten_up_to(other),
                                     strict=True)]
    return (treedef.unflatten([a for a, _ in pairs]),
            treedef.unflatten([b for _, b in pairs]))


def _leaf_keys(key: jax.Array, tree: PyTree) -> PyTree:
    """One independent key per leaf of ``tree``."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = list(jax.random.split(key, max(len(leaves), 1)))[:len(leaves)]
    return treedef.unflatten(keys)


def _ascent(direction: DirectionFn, init: Callable[[PyTree], Any] = no_state,
            *, mask: Mask = None, scale: Optional[ScaleFn] = None,
            norm: str = "l2") -> Ascent:
    """The one ascent mechanism: ``ε = ρ · S ⊙ unit(S ⊙ v)``.

    ε is exactly 0 on unselected leaves, and on every leaf when ``S ⊙ v`` has
    an ``inf``/``NaN`` entry on the selected leaves (or, for p = 2, ``v`` or
    ``S ⊙ v`` a norm outside the safe range): see :mod:`sam_optax.numerics`.

    Args:
      direction: ``direction(grads, state, params) -> (v, new_state)``.
      init: ``init(params) -> state`` of ``direction``.
      mask: leaves that are perturbed; only they enter the norm
        (:func:`sam_optax.masks.leaf_flags`).
      scale: ``scale(grads, params) -> S``, an elementwise scale (``None``: 1).
      norm: ``"l2"`` or ``"linf"``.
    """
    masks.check(mask, "mask")
    _check_norm(norm)

    def init_fn(params: PyTree) -> Any:
        masks.resolve(mask, params, "mask")  # fail early on a bad mask
        return init(params)

    def perturbation(grads, state, params, *, rho, grad_fn):
        del grad_fn
        mask_tree = masks.resolve(mask, params, "mask")
        v, state = direction(grads, state, params)
        s = None if scale is None else scale(grads, params)
        if s is None and norm == "l2":
            # Plain SAM: ρ folds into the normalising factor (one multiply
            # per element instead of two), and ‖ε‖ = ρ where ε ≠ 0 is known.
            unit = numerics.normalize(v, mask_tree, scale=rho)
            return Perturbation(unit.direction, state,
                                norm=jnp.where(unit.usable, rho, 0.0))
        if norm == "l2":
            # v times its own power of two (exact: the same direction)
            # before S, so S ⊙ v is well scaled. It also makes S ⊙ v depend
            # on v's sums of squares, which the diagnostics' ‖g‖ shares when
            # v = g: XLA then sums g before it writes S ⊙ v, and writes it
            # over g (on CPU it kept g alive beside S ⊙ v instead: +0.17 P
            # for ASAM, benchmarks/bench_memory.py). As for plain SAM, v
            # outside the safe range gives ε = 0.
            v_factors = numerics.norm_factors(v, mask_tree)
            v = numerics.scale_tree(v, v_factors.pre)
        scaled = _multiply(v, s)
        if norm == "l2":
            unit = numerics.normalize(scaled, mask_tree)
            direction_tree = unit.direction
            usable = unit.usable & v_factors.usable
        else:
            direction_tree = _sign(scaled, mask_tree)
            usable = numerics.all_finite(scaled, mask_tree)
        # S ⊙ unit, times ρ; the select (one elementwise pass with the
        # products) zeroes the whole ε when S ⊙ v was not finite.
        epsilon = numerics.scale_tree(_multiply(direction_tree, s), rho)
        epsilon = jax.tree.map(
            lambda e: jnp.where(usable, e, jnp.zeros([], e.dtype)),
            numerics.select_leaves(epsilon, mask_tree))
        # ‖ε‖ is not known here without a sum over ε (which would keep ε
        # alive as a parameter-sized buffer): left to the core.
        return Perturbation(epsilon, state)

    return Ascent(init=init_fn, perturbation=perturbation)


def _gradient(grads, state, params):
    del params
    return grads, state


# ------------------------------------------------------------------ ascents


def normalized_ascent(mask: Mask = None, norm: str = "l2") -> Ascent:
    """SAM's ascent (Foret et al. 2021, eq. 2 and App. C.5).

    .. math::

      ε = ρ \\frac{g}{\\lVert g \\rVert_2} \\quad (p = 2), \\qquad
      ε = ρ \\, \\mathrm{sign}(g) \\quad (p = ∞)

    with the global norm over all (selected) leaves; ε = 0 when g = 0.

    Args:
      mask: optional bool tree (the params' structure or a prefix of it,
        like ``optax.masked``) or a callable on params returning one, see
        :mod:`sam_optax.masks`: only selected leaves are perturbed and enter
        the norm (SAM-ON with :func:`sam_optax.masks.normalization_layers`).
      norm: ``"l2"`` (p = 2, the default) or ``"linf"`` (p = ∞, the dual
        norm's maximiser ``sign(g)``; then ‖ε‖₂ = ρ·sqrt(#perturbed entries)).

    References:
      Foret et al., Sharpness-Aware Minimization for Efficiently Improving
      Generalization, ICLR 2021. https://arxiv.org/abs/2010.01412
    """
    return _ascent(_gradient, mask=mask, norm=norm)


def adaptive_ascent(eta: float = 0.01, *, adaptive: Mask = None,
                    mask: Mask = None) -> Ascent:
    """ASAM's ascent (Kwon et al. 2021, eq. 11), with ``T_w = |w| + η``.

    .. math::

      T_w = |w| + η, \\qquad
      ε = ρ \\frac{T_w^2 ⊙ g}{\\lVert T_w ⊙ g \\rVert_2}

    Args:
      eta: η ≥ 0, keeps ``T_w > 0`` at ``w = 0``.
      adaptive: leaves whose ``T_w = |w| + η`` (a mask: bool tree, prefix
        or callable on params, see :mod:`sam_optax.masks`); other leaves take
        ``T = 1``. Default ``None``: every leaf,
        as in the paper's formula. The official code scales weight tensors
        only; :func:`sam_optax.masks.exclude_bias_and_norm` gives T = 1 to
        biases and normalization params.
      mask: leaves that are perturbed at all (and enter the norm).

    References:
      Kwon, Kim, Park, Choi. ASAM: Adaptive Sharpness-Aware Minimization for
      Scale-Invariant Learning of Deep Neural Networks. ICML 2021.
      https://arxiv.org/abs/2102.11600
    """
    validation.check_in_range(eta, "eta", 0.0, float("inf"))
    masks.check(adaptive, "adaptive")

    def scale(grads, params):
        del grads
        flags = masks.leaf_flags(adaptive, params, "adaptive")

        def t(w, keep):
            wide = numerics.as_compute(w)
            if keep and numerics.is_float(w):
                return jnp.abs(wide) + jnp.asarray(eta, wide.dtype)
            return jnp.ones(wide.shape, wide.dtype)

        leaves, treedef = jax.tree.flatten(params)
        return treedef.unflatten([t(w, keep) for w, keep in zip(
            leaves, flags, strict=True)])

    def init(params):
        masks.resolve(adaptive, params, "adaptive")  # fail early on a bad tree
        return ()

    return _ascent(_gradient, init, mask=mask, scale=scale)


def fisher_ascent(eta: float = 1.0, *, mask: Mask = None) -> Ascent:
    """Fisher-SAM's ascent (Kim et al. 2022, eq. 13-14).

    The Fisher information is approximated by its diagonal built from the
    mini-batch gradient itself, ``f = 1 + η g²`` (elementwise); the ascent is
    the steepest one in the ball ``εᵀ diag(f) ε ≤ ρ²``:

    .. math::

      f = 1 + η \\, g ⊙ g, \\qquad
      ε = ρ \\frac{f^{-1} ⊙ g}{\\sqrt{g^⊤ f^{-1} g}}
        = ρ \\, f^{-1/2} ⊙ \\frac{f^{-1/2} ⊙ g}{\\lVert f^{-1/2} ⊙ g \\rVert_2}

    (the second form is how it is computed: it reuses the safe L2 norm).
    ``η = 0`` gives SAM.

    Args:
      eta: η ≥ 0, the weight of the squared-gradient Fisher estimate.
      mask: leaves that are perturbed (and enter the norm).

    References:
      Kim, Li, Hu, Hospedales. Fisher SAM: Information Geometry and
      Sharpness Aware Minimisation. ICML 2022. https://arxiv.org/abs/2206.04920
    """
    validation.check_in_range(eta, "eta", 0.0, float("inf"))

    def scale(grads, params):
        del params

        def inv_sqrt_fisher(g):
            if not numerics.is_float(g):  # int params' (float0) gradients
                return jnp.ones(np.shape(g), jnp.float32)
            gw = numerics.as_compute(g)
            # rsqrt(inf) = 0 where η g² overflows: a huge finite coordinate
            # gets no perturbation. An inf/NaN one makes S ⊙ g non-finite,
            # hence ε = 0 as a whole (see _ascent).
            return jax.lax.rsqrt(1.0 + jnp.asarray(eta, gw.dtype) * gw * gw)

        return jax.tree.map(inv_sqrt_fisher, grads)

    return _ascent(_gradient, mask=mask, scale=scale)


def friendly_ascent(sigma: float = 1.0, lmbda: float = 0.9, *,
                    mask: Mask = None) -> Ascent:
    """Friendly-SAM's ascent (Li et al. 2024, Alg. 1): remove the full-gradient
    component, estimated by an EMA of past gradients, from the ascent.

    .. math::

      v_t = g_t - σ m_{t-1}, \\qquad
      m_t = λ m_{t-1} + (1 - λ) g_t, \\qquad
      ε_t = ρ \\frac{v_t}{\\lVert v_t \\rVert_2}

    At the first ascent, as in the official code, ``m_1 = g_1`` and
    ``v_1 = g_1`` (a SAM step). ``sigma = 0`` is SAM at every step.

    Args:
      sigma: σ ≥ 0, how much of the EMA is subtracted.
      lmbda: λ ∈ [0, 1), the EMA decay.
      mask: leaves that are perturbed (and enter the norm).

    References:
      Li, Zhou, He, Cheng, Huang. Friendly Sharpness-Aware Minimization.
      CVPR 2024. https://arxiv.org/abs/2403.12350
    """
    validation.check_in_range(sigma, "sigma", 0.0, float("inf"))
    validation.check_in_range(lmbda, "lmbda", 0.0, 1.0, high_open=True)

    def init(params):
        return FriendlyAscentState(count=jnp.zeros([], jnp.int32),
                                   momentum=numerics.zeros_like_compute(params))

    def direction(grads, state, params):
        del params
        first = state.count == 0

        def update(g, m):
            if not numerics.is_float(m):  # an int leaf: never perturbed
                return m, m
            gw = jnp.asarray(g).astype(m.dtype)
            v = jnp.where(first, gw, gw - jnp.asarray(sigma, m.dtype) * m)
            new_m = jnp.where(first, gw, lmbda * m + (1.0 - lmbda) * gw)
            return v, new_m

        v, momentum = _map_pairs(update, grads, state.momentum)
        return v, FriendlyAscentState(
            count=jnp.asarray(optax.safe_int32_increment(state.count)),
            momentum=momentum)

    return _ascent(direction, init, mask=mask)


def variance_suppressed_ascent(theta: float = 0.4, *,
                               mask: Mask = None) -> Ascent:
    """VaSSO's ascent (Li & Giannakis 2023, eq. 5): normalise an EMA of
    gradients instead of the noisy mini-batch gradient.

    .. math::

      d_t = (1 - θ) d_{t-1} + θ g_t, \\qquad
      ε_t = ρ \\frac{d_t}{\\lVert d_t \\rVert_2}

    with ``d_1 = g_1`` (the first ascent is a SAM step). ``θ = 1`` is SAM.

    Args:
      theta: θ ∈ (0, 1], the weight of the new gradient.
      mask: leaves that are perturbed (and enter the norm).

    References:
      Li, Giannakis. Enhancing Sharpness-Aware Optimization Through Variance
      Suppression. NeurIPS 2023. https://arxiv.org/abs/2309.15639
    """
    validation.check_in_range(theta, "theta", 0.0, 1.0, low_open=True)

    def init(params):
        return VarianceSuppressedState(count=jnp.zeros([], jnp.int32),
                                       ema=numerics.zeros_like_compute(params))

    def direction(grads, state, params):
        del params
        first = state.count == 0

        def update(g, d):
            if not numerics.is_float(d):  # an int leaf: never perturbed
                return d
            gw = jnp.asarray(g).astype(d.dtype)
            return jnp.where(first, gw, (1.0 - theta) * d + theta * gw)

        ema = jax.tree.map(update, grads, state.ema)
        return ema, VarianceSuppressedState(
            count=jnp.asarray(optax.safe_int32_increment(state.count)),
            ema=ema)

    return _ascent(direction, init, mask=mask)


def random_ascent(seed: Seed = 0, *, mask: Mask = None) -> Ascent:
    """A random direction of radius ρ (the ablation of Foret et al., App. C.5).

    .. math::

      z \\sim \\mathcal{N}(0, I), \\qquad ε = ρ \\frac{z}{\\lVert z \\rVert_2}

    The gradient is ignored. ``z`` is drawn from a key kept in the ascent
    state and split at every step: the same seed gives the same sequence of
    ε, with no retracing.

    Args:
      seed: an int or a JAX PRNG key.
      mask: leaves that are perturbed (and enter the norm).

    References:
      Foret et al. 2021, https://arxiv.org/abs/2010.01412
    """
    _check_seed(seed)

    def init(params):
        del params
        return RandomAscentState(key=_raw_key(seed))

    def direction(grads, state, params):
        del params
        key, draw = jax.random.split(state.key)

        def normal(k, g):
            if not numerics.is_float(g):
                return jnp.zeros(np.shape(g), jnp.float32)
            return jax.random.normal(k, np.shape(g), numerics.compute_dtype(
                numerics.leaf_dtype(g)))

        z = jax.tree.map(normal, _leaf_keys(draw, grads), grads)
        return z, RandomAscentState(key=key)

    return _ascent(direction, init, mask=mask)


def centralize(tree: PyTree) -> PyTree:
    """Gradient centralization (Yong et al. 2020): each kernel leaf (two or
    more axes) minus its mean over every axis but the last, Flax's output
    axis; other leaves unchanged. Computed in the compute dtype.

    .. math::

      Φ(g)_{\\cdot j} = g_{\\cdot j} - \\tfrac{1}{n} \\textstyle\\sum_i g_{ij}

    References:
      Yong, Huang, Hua, Zhang. Gradient Centralization: A New Optimization
      Technique for Deep Neural Networks. ECCV 2020.
      https://arxiv.org/abs/2004.01461
    """
    def leaf(g):
        if not numerics.is_float(g) or np.ndim(g) < 2:
            return g
        wide = numerics.as_compute(g)
        return wide - jnp.mean(wide, axis=tuple(range(wide.ndim - 1)),
                               keepdims=True)

    return jax.tree.map(leaf, tree)


def centralized_ascent(mask: Mask = None) -> Ascent:
    """GCSAM's ascent: SAM's, on the centralized gradient (Hassan et al.
    2025).

    .. math::

      ε = ρ \\frac{Φ(g)}{\\lVert Φ(g) \\rVert_2}

    with :func:`centralize` as Φ.

    References:
      Hassan, Vakanski, Zhang, Xian. GCSAM: Gradient Centralized Sharpness
      Aware Minimization. 2025. https://arxiv.org/abs/2501.11584
    """
    return _ascent(lambda grads, state, params: (centralize(grads), state),
                   mask=mask)


def multistep_ascent(steps: int = 2, *, step_size: Optional[float] = None,
                     mask: Mask = None) -> Ascent:
    """Several normalised ascent steps (Foret et al. 2021, App. C.6).

    With ``g_1 = g`` the clean gradient, α the step size (a fraction of ρ)
    and Π the projection on the ball ``‖ε‖₂ ≤ ρ``:

    .. math::

      ε_1 = ρ \\frac{g_1}{\\lVert g_1 \\rVert}, \\qquad
      ε_k = Π\\Big(ε_{k-1} + αρ \\frac{g_k}{\\lVert g_k \\rVert}\\Big),
      \\quad g_k = ∇L(w + ε_{k-1}), \\quad k = 2..n

    ``n = 1`` is SAM. Each step after the first calls ``grad_fn`` once, so a
    SAM step costs ``n + 1`` gradient evaluations in all (with the clean one).

    Args:
      steps: n ≥ 1, the number of ascent steps.
      step_size: α ∈ (0, 1], the later steps' length as a fraction of ρ
        (default 1/n).
      mask: leaves that are perturbed (and enter the norms).
    """
    validation.check_positive_int(steps, "steps")
    if step_size is not None:
        validation.check_in_range(step_size, "step_size", 0.0, 1.0,
                                  low_open=True)
    alpha = 1.0 / steps if step_size is None else float(step_size)
    first = normalized_ascent(mask=mask)

    def perturbation(grads, state, params, *, rho, grad_fn):
        first_step = first.perturbation(grads, state, params, rho=rho,
                                        grad_fn=grad_fn)
        if steps == 1:
            return first_step
        mask_tree = masks.resolve(mask, params, "mask")

        def ascend(_, carry):
            eps, _ = carry
            g = grad_fn(numerics.add_perturbation(params, eps))
            # A non-finite g_k gives a zero step: ε stays where it was.
            step = numerics.normalize(g, mask_tree, scale=alpha * rho).direction
            eps = jax.tree.map(jnp.add, eps, step)
            norm = numerics.global_norm(eps, mask_tree)
            shrink = jnp.where(norm > rho, rho / jnp.where(norm > 0, norm, 1.0),
                               1.0)
            # ‖ε‖ after the projection (ρ if it shrank), for the diagnostics:
            # known here, so ε need not be measured again.
            return (numerics.scale_tree(eps, shrink),
                    jnp.minimum(norm, rho).astype(jnp.result_type(
                        first_step.norm)))

        # fori_loop: one trace of grad_fn whatever n is.
        epsilon, norm = jax.lax.fori_loop(
            1, steps, ascend, (first_step.epsilon, first_step.norm))
        return Perturbation(epsilon, first_step.state, norm=norm)

    return Ascent(init=first.init, perturbation=perturbation)


def stochastic_weight_perturbation(ascent: Ascent, beta: float = 0.6, *,
                                   seed: Seed = 0,
                                   granularity: str = "coordinate") -> Ascent:
    """ESAM's stochastic weight perturbation (Du et al. 2021, eq. 5-6).

    Keep each coordinate (or whole leaf) of the wrapped ascent's ε with
    probability β, rescaled by 1/β so that E[ε̂] = ε:

    .. math::

      m_i \\sim \\mathrm{Bernoulli}(β), \\qquad ε̂ = \\frac{m ⊙ ε}{β}

    ``β = 1`` is the wrapped ascent. The key lives in the state and is split
    at every step. In JAX every leaf's second gradient is computed anyway, so
    this changes the perturbation, not the cost (the PyTorch code saves the
    backward pass of frozen parameters).

    Args:
      ascent: the ascent whose ε is thinned (e.g. :func:`normalized_ascent`).
      beta: β ∈ (0, 1], the keep probability.
      seed: an int or a JAX PRNG key.
      granularity: ``"coordinate"`` (one draw per entry, the paper) or
        ``"leaf"`` (one draw per parameter tensor, the official code).

    References:
      Du, Yan, Feng, Zhou, Zhen, Goh, Tan. Efficient Sharpness-aware
      Minimization for Improved Training of Neural Networks. ICLR 2022.
      https://arxiv.org/abs/2110.03141
    """
    validation.check_in_range(beta, "beta", 0.0, 1.0, low_open=True)
    _check_seed(seed)
    validation.check_choice(granularity, "granularity", ("coordinate", "leaf"))

    def init(params):
        return StochasticPerturbationState(key=_raw_key(seed),
                                           inner=ascent.init(params))

    def perturbation(grads, state, params, *, rho, grad_fn):
        # (The wrapped ascent's ‖ε‖ does not hold after thinning.)
        inner = ascent.perturbation(grads, state.inner, params, rho=rho,
                                    grad_fn=grad_fn)
        key, draw = jax.random.split(state.key)

        def thin(k, e):
            shape = jnp.shape(e) if granularity == "coordinate" else ()
            keep = jax.random.bernoulli(k, beta, shape)
            return jnp.where(keep, e / jnp.asarray(beta, e.dtype),
                             jnp.zeros_like(e))

        epsilon = jax.tree.map(thin, _leaf_keys(draw, inner.epsilon),
                               inner.epsilon)
        # ‖ε̂‖ is measured here (one sum over ε̂, which the second gradient's
        # point is computed from anyway).
        return Perturbation(
            epsilon, StochasticPerturbationState(key=key, inner=inner.state),
            norm=numerics.plain_norm(epsilon))

    return Ascent(init=init, perturbation=perturbation)


__all__ = [
    "FriendlyAscentState",
    "RandomAscentState",
    "StochasticPerturbationState",
    "VarianceSuppressedState",
    "adaptive_ascent",
    "centralize",
    "centralized_ascent",
    "fisher_ascent",
    "friendly_ascent",
    "multistep_ascent",
    "normalized_ascent",
    "random_ascent",
    "stochastic_weight_perturbation",
    "variance_suppressed_ascent",
]

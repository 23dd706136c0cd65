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

from sam_optax import collectives, masks, numerics, validation
from sam_optax.core import Ascent, Perturbation, no_state
from sam_optax.types import Mask, PyTree, ScalarOrSchedule

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
            norm: str = "l2", from_gradient: bool = True) -> Ascent:
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
      from_gradient: whether ``v`` comes from the gradient; if not (a random
        direction), ‖g‖ is reported as 0, so that the caller's gradient,
        which nothing else reads, need not be computed.
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
            return Perturbation(
                unit.direction, state, norm=jnp.where(unit.usable, rho, 0.0),
                grad_norm=None if from_gradient else jnp.zeros([], jnp.float32))
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
            # Drawn sharded like g (FSDP under Explicit axes): a replicated
            # draw would hold the whole model per device.
            return jax.random.normal(
                k, np.shape(g),
                numerics.compute_dtype(numerics.leaf_dtype(g)),
                out_sharding=numerics.typed_sharding(g))

        z = jax.tree.map(normal, _leaf_keys(draw, grads), grads)
        return z, RandomAscentState(key=key)

    return _ascent(direction, init, mask=mask, from_gradient=False)


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


# Up to this many ascent steps are written out rather than looped.
_UNROLLED_ASCENT_STEPS = 8


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

        carry = (first_step.epsilon, first_step.norm)
        if steps <= _UNROLLED_ASCENT_STEPS:
            # Written out: a compiler optimises a loop body on its own, and
            # XLA:CPU runs a convolution's gradient inside one 15-21x slower
            # (benchmarks/results/speed_cpu.md); a few more traces of
            # grad_fn cost compile time only.
            for i in range(1, steps):
                carry = ascend(i, carry)
            epsilon, norm = carry
        else:  # one trace of grad_fn whatever n is
            epsilon, norm = jax.lax.fori_loop(1, steps, ascend, carry)
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
            keep = jax.random.bernoulli(
                k, beta, shape,
                out_sharding=numerics.typed_sharding(e) if shape else None)
            return jnp.where(keep, e / jnp.asarray(beta, e.dtype),
                             jnp.zeros_like(e))

        if isinstance(beta, (int, float)) and beta == 1:
            epsilon = inner.epsilon  # every coordinate kept: nothing to draw
        else:
            epsilon = jax.tree.map(thin, _leaf_keys(draw, inner.epsilon),
                                   inner.epsilon)
        # ‖ε̂‖ is measured here (one sum over ε̂, which the second gradient's
        # point is computed from anyway).
        return Perturbation(
            epsilon, StochasticPerturbationState(key=key, inner=inner.state),
            norm=numerics.plain_norm(epsilon))

    return Ascent(init=init, perturbation=perturbation)


# ------------------------------------------------------- sparse SAM (SSAM)
# SSAM perturbs a fixed number of coordinates, chosen by a rule that is
# refreshed every `update_interval` ascents. The coordinate mask is the
# ascent's own state (bool arrays of the params' shapes: static shapes); the
# leaf-level `mask=` (sam_optax.masks) says which leaves take part at all.
# The choice is a top-k over the flattened vector of every taking-part
# coordinate (one global budget, as in the paper's code), not per leaf.

SPARSE_CRITERIA = ("gradient", "weight", "random")


class FisherSparseState(NamedTuple):
    """State of :func:`fisher_sparse_ascent` (SSAM-F).

    Attributes:
      count: number of ascents taken (int32); the mask is refreshed when
        ``count % update_interval == 0``.
      mask: per leaf, a bool array of the leaf's shape, the coordinates ε
        perturbs (a bool scalar ``False`` on leaves that take no part).
      fisher: per leaf, Σ g² over the ascents since the last refresh
        (compute dtype; a scalar 0 on leaves that take no part).
    """

    count: jax.Array
    mask: PyTree
    fisher: PyTree


class DynamicSparseState(NamedTuple):
    """State of :func:`dynamic_sparse_ascent` (SSAM-D).

    Attributes:
      count: number of ascents taken (int32); the mask is refreshed when
        ``count % update_interval == 0``.
      mask: per leaf, a bool array of the leaf's shape (a bool scalar
        ``False`` on leaves that take no part).
      key: the PRNG key of the next refresh's random draws.
    """

    count: jax.Array
    mask: PyTree
    key: jax.Array


def _sparse_pool(mask: Mask, params: PyTree) -> list[bool]:
    """Per leaf (flatten order): whether its coordinates compete for the
    sparse mask (selected by ``mask`` and of a float dtype)."""
    return [keep and numerics.is_float(x) for x, keep in zip(
        jax.tree.leaves(params), masks.leaf_flags(mask, params, "mask"),
        strict=True)]


def _pool_size(params: PyTree, pool: list[bool]) -> int:
    return sum(int(np.size(x)) for x, keep in zip(jax.tree.leaves(params),
                                                 pool, strict=True) if keep)


def _perturbed_count(sparsity: float, size: int) -> int:
    """⌊(1 − s)·N⌋ coordinates are perturbed (the tolerance keeps e.g.
    (1 − 0.3)·10 at 7 despite binary rounding)."""
    return min(size, int(np.floor((1.0 - float(sparsity)) * size + 1e-9)))


def _flatten_pool(tree: PyTree, pool: list[bool]) -> jax.Array:
    """The taking-part leaves of ``tree``, raveled and concatenated."""
    return jnp.concatenate([jnp.ravel(jnp.asarray(x)) for x, keep in zip(
        jax.tree.leaves(tree), pool, strict=True) if keep])


def _unflatten_mask(flags: jax.Array, params: PyTree,
                    pool: list[bool]) -> PyTree:
    """A flat bool vector back to per-leaf bool arrays (scalar ``False``
    on leaves that take no part)."""
    leaves, treedef = jax.tree.flatten(params)
    out, start = [], 0
    for x, keep in zip(leaves, pool, strict=True):
        if keep:
            size = int(np.size(x))
            out.append(flags[start:start + size].reshape(np.shape(x)))
            start += size
        else:
            out.append(jnp.zeros([], jnp.bool_))
    return treedef.unflatten(out)


def _no_coordinates(params: PyTree, pool: list[bool]) -> PyTree:
    """The all-False coordinate mask."""
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten([jnp.zeros(np.shape(x) if keep else (), jnp.bool_)
                              for x, keep in zip(leaves, pool, strict=True)])


def _top_k(scores: jax.Array, k: Union[int, jax.Array]) -> jax.Array:
    """True at the ``k`` largest scores (ties: the lower index first).

    A Python ``k`` takes ``lax.top_k`` (its k indices, scattered); a traced
    one (a scheduled drop rate) ranks every score by a stable sort, which
    holds several score-sized temporaries (+1.6 to +3.4 P for SSAM on the
    memory benchmark, had it been the only path).
    """
    n = scores.shape[0]
    if isinstance(k, (int, np.integer)):
        k = int(min(max(k, 0), n))
        if k == 0:
            return jnp.zeros(n, jnp.bool_)
        _, chosen = jax.lax.top_k(scores, k)
        # (A sort forgets that per-shard scores vary across shards: restore
        # it, or a per-shard mask would pass for a replicated one.)
        chosen = collectives.vary_like(chosen, scores)
        return jnp.zeros(n, jnp.bool_).at[chosen].set(True)
    order = collectives.vary_like(jnp.argsort(-scores, stable=True), scores)
    ranks = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return ranks < k


def _on_refresh_steps(count: jax.Array, update_interval: int,
                      refresh: Callable[[Any], Any], keep: Callable[[Any], Any],
                      operand: Any) -> Any:
    """``refresh(operand)`` at steps 0, T, 2T, ... (T = ``update_interval``),
    else ``keep(operand)``; no conditional when every step refreshes."""
    if update_interval == 1:
        return refresh(operand)
    return jax.lax.cond(count % update_interval == 0, refresh, keep, operand)


def _typed_like_grads(tree: PyTree, grads: PyTree) -> PyTree:
    """Under ``shard_map``, ``tree`` typed varying wherever the (local)
    gradient is, so both branches of a mask refresh have one type (and a
    per-shard mask is seen as per-shard state); elsewhere unchanged."""
    return jax.tree.map(lambda x: collectives.vary_like(x, grads), tree)


def _sparse_epsilon(unit_direction: PyTree, coordinate_mask: PyTree,
                    pool: list[bool]) -> PyTree:
    """``m ⊙ direction`` on the taking-part leaves (the others are zero
    already: unselected or not float)."""
    leaves, treedef = jax.tree.flatten(unit_direction)
    return treedef.unflatten([
        jnp.where(m, d, jnp.zeros([], d.dtype)) if keep else d
        for d, m, keep in zip(leaves, treedef.flatten_up_to(coordinate_mask),
                              pool, strict=True)])


def _check_sparse(sparsity: float, update_interval: int, mask: Mask) -> None:
    validation.check_in_range(sparsity, "sparsity", 0.0, 1.0)
    if isinstance(sparsity, jax.Array):  # inject_hyperparams: a traced array
        raise ValueError(f"`sparsity` must be a Python float; got a JAX array "
                         f"({sparsity!r})." + validation.static_hint("sparsity"))
    validation.check_positive_int(update_interval, "update_interval")
    masks.check(mask, "mask")


def fisher_sparse_ascent(sparsity: float = 0.5, update_interval: int = 100, *,
                         mask: Mask = None) -> Ascent:
    """SSAM-F's ascent (Mi et al. 2022): SAM's ε on the coordinates of
    largest (empirical) Fisher information only.

    .. math::

      F ← F + g ⊙ g, \\qquad
      m = \\mathrm{top}_k(F), \\; F ← 0
      \\quad \\text{(when } t \\bmod T_m = 0\\text{)}, \\qquad
      ε = ρ \\, m ⊙ \\frac{g}{\\lVert g \\rVert_2}

    with ``k = ⌊(1 − s)·N⌋`` of the N coordinates of the (selected) leaves,
    chosen over all of them at once, ties to the earlier coordinate. The
    norm is that of the whole gradient, as in the paper, so ‖ε‖ ≤ ρ.
    The paper estimates the Fisher diagonal from the squared gradients of
    N_F single examples at each refresh; here it is the sum of the squared
    *mini-batch* gradients of the ascents since the last refresh, this one
    included (no extra pass; equal to the paper's with batches of one).
    The first refresh (``t = 0``) uses ``g_0`` alone. A non-finite or zero
    ``g`` adds nothing.

    Args:
      sparsity: s ∈ [0, 1], the fraction of coordinates *not* perturbed
        (0: SAM; 1: ε = 0).
      update_interval: T_m ≥ 1, ascents between refreshes of the mask.
      mask: leaves that take part (and enter the norm); the others are
        never perturbed.

    References:
      Mi, Shen, Ren, Zhou, Sun, Ji, Tao. Make Sharpness-Aware Minimization
      Stronger: A Sparsified Perturbation Approach. NeurIPS 2022.
      https://arxiv.org/abs/2210.05177
    """
    _check_sparse(sparsity, update_interval, mask)

    def init(params):
        pool = _sparse_pool(mask, params)
        leaves, treedef = jax.tree.flatten(params)
        fisher = treedef.unflatten([
            numerics.zeros_like_compute(x) if keep
            else jnp.zeros([], jnp.float32)
            for x, keep in zip(leaves, pool, strict=True)])
        return FisherSparseState(count=jnp.zeros([], jnp.int32),
                                 mask=_no_coordinates(params, pool),
                                 fisher=fisher)

    def perturbation(grads, state, params, *, rho, grad_fn):
        del grad_fn
        pool = _sparse_pool(mask, params)
        mask_tree = masks.resolve(mask, params, "mask")
        unit = numerics.normalize(grads, mask_tree, scale=rho)
        size = _pool_size(params, pool)
        coordinate_mask, fisher = state.mask, state.fisher
        if size:
            leaves, treedef = jax.tree.flatten(fisher)
            fisher = treedef.unflatten([
                f + jnp.where(unit.usable, jnp.square(
                    numerics.as_compute(g).astype(f.dtype)),
                    jnp.zeros([], f.dtype)) if keep else f
                for f, g, keep in zip(leaves, jax.tree.leaves(grads), pool,
                                      strict=True)])
            k = _perturbed_count(sparsity, size)

            def refresh(fisher):
                chosen = _top_k(_flatten_pool(fisher, pool), k)
                return _typed_like_grads((_unflatten_mask(chosen, params, pool),
                                          jax.tree.map(jnp.zeros_like, fisher)),
                                         grads)

            def keep_mask(fisher):
                return _typed_like_grads((state.mask, fisher), grads)

            coordinate_mask, fisher = _on_refresh_steps(
                state.count, update_interval, refresh, keep_mask, fisher)
        epsilon = _sparse_epsilon(unit.direction, coordinate_mask, pool)
        return Perturbation(epsilon, FisherSparseState(
            count=jnp.asarray(optax.safe_int32_increment(state.count)),
            mask=coordinate_mask, fisher=fisher))

    return Ascent(init=init, perturbation=perturbation)


def dynamic_sparse_ascent(sparsity: float = 0.5, update_interval: int = 100,
                          *, drop_rate: ScalarOrSchedule = 0.5,
                          drop_criterion: str = "gradient",
                          growth_criterion: str = "random", seed: Seed = 0,
                          mask: Mask = None) -> Ascent:
    """SSAM-D's ascent (Mi et al. 2022): SAM's ε on a sparse mask that
    evolves by dynamic sparse training (drop and grow).

    The mask starts as ``k = ⌊(1 − s)·N⌋`` coordinates drawn at random. At
    every refresh (``t mod T_m = 0``, ``t = 0`` included), with the drop
    rate ``r_t`` and ``n = min(⌊k·r_t⌋, N − k)``:

    .. math::

      m' = \\mathrm{top}_{k-n}\\big(c_{drop} \\text{ on } m\\big) ∪
           \\mathrm{top}_{n}\\big(c_{grow} \\text{ on } \\lnot m\\big),
      \\qquad ε = ρ \\, m' ⊙ \\frac{g}{\\lVert g \\rVert_2}

    that is, the ``n`` perturbed coordinates of smallest drop score leave
    the mask and the ``n`` unperturbed ones of largest growth score join it
    (so exactly ``k`` stay perturbed). Scores: ``"gradient"`` ``|g|``,
    ``"weight"`` ``|w|``, ``"random"`` a uniform draw. The paper's code drops
    by ``|g|`` and grows at random (the defaults) and decays ``r_t`` with a
    cosine over training: pass ``drop_rate=optax.cosine_decay_schedule(0.5,
    total_steps)`` (evaluated at the ascent count). A non-finite score
    counts as 0.

    Args:
      sparsity: s ∈ [0, 1], the fraction of coordinates *not* perturbed.
      update_interval: T_m ≥ 1, ascents between refreshes.
      drop_rate: r ∈ [0, 1], the fraction of the perturbed coordinates
        swapped at a refresh; a float or a schedule of the ascent count.
      drop_criterion: score whose smallest values are dropped.
      growth_criterion: score whose largest values are grown.
      seed: an int or a JAX PRNG key (the initial mask, random scores).
      mask: leaves that take part (and enter the norm).

    References:
      Mi et al. 2022, https://arxiv.org/abs/2210.05177
    """
    _check_sparse(sparsity, update_interval, mask)
    if callable(drop_rate):
        validation.check_nonnegative_scalar_or_schedule(drop_rate, "drop_rate")
    else:
        validation.check_in_range(drop_rate, "drop_rate", 0.0, 1.0)
    validation.check_choice(drop_criterion, "drop_criterion", SPARSE_CRITERIA)
    validation.check_choice(growth_criterion, "growth_criterion",
                            SPARSE_CRITERIA)
    _check_seed(seed)

    def init(params):
        pool = _sparse_pool(mask, params)
        size = _pool_size(params, pool)
        key, draw = jax.random.split(_raw_key(seed))
        if not size:
            return DynamicSparseState(jnp.zeros([], jnp.int32),
                                      _no_coordinates(params, pool), key)
        chosen = _top_k(jax.random.uniform(draw, (size,)),
                        _perturbed_count(sparsity, size))
        return DynamicSparseState(count=jnp.zeros([], jnp.int32),
                                  mask=_unflatten_mask(chosen, params, pool),
                                  key=key)

    def scores(criterion, key, grads, params, pool, size):
        if criterion == "random":
            values = jax.random.uniform(key, (size,))
        else:
            source = grads if criterion == "gradient" else params
            values = jnp.abs(_flatten_pool(numerics.select_leaves(source), pool))
        # Scores are ≥ 0; a non-finite one counts as 0, below none of them.
        return jnp.where(jnp.isfinite(values), values, 0.0)

    def perturbation(grads, state, params, *, rho, grad_fn):
        del grad_fn
        pool = _sparse_pool(mask, params)
        mask_tree = masks.resolve(mask, params, "mask")
        unit = numerics.normalize(grads, mask_tree, scale=rho)
        size = _pool_size(params, pool)
        coordinate_mask, key = state.mask, state.key
        if size:
            k = _perturbed_count(sparsity, size)
            room = min(k, size - k)
            if callable(drop_rate) or isinstance(drop_rate, jax.Array):
                # A schedule, or a value traced by optax.inject_hyperparams.
                rate = drop_rate(state.count) if callable(drop_rate) else drop_rate
                rate = jnp.clip(jnp.asarray(rate, jnp.float32), 0.0, 1.0)
                swapped = jnp.minimum(jnp.floor(rate * k).astype(jnp.int32),
                                      room)
            else:
                swapped = min(int(np.floor(k * float(drop_rate) + 1e-9)), room)

            def refresh(key):
                key, drop_key, grow_key = jax.random.split(key, 3)
                live = _flatten_pool(state.mask, pool)
                drop = scores(drop_criterion, drop_key, grads, params, pool, size)
                grow = scores(growth_criterion, grow_key, grads, params, pool,
                              size)
                # -1 sorts every excluded coordinate after the candidates.
                kept = _top_k(jnp.where(live, drop, -1.0), k - swapped)
                grown = _top_k(jnp.where(live, -1.0, grow), swapped)
                return _typed_like_grads(
                    _unflatten_mask(kept | grown, params, pool), grads), key

            def keep_mask(key):
                return _typed_like_grads(state.mask, grads), key

            coordinate_mask, key = _on_refresh_steps(
                state.count, update_interval, refresh, keep_mask, key)
        epsilon = _sparse_epsilon(unit.direction, coordinate_mask, pool)
        return Perturbation(epsilon, DynamicSparseState(
            count=jnp.asarray(optax.safe_int32_increment(state.count)),
            mask=coordinate_mask, key=key))

    return Ascent(init=init, perturbation=perturbation)


# ---------------------------------------------------------- Lookbehind-SAM


class LookbehindAscentState(NamedTuple):
    """State of :func:`lookbehind_ascent`.

    Attributes:
      index: the inner step ``i ∈ [0, k)`` the next ascent takes (int32);
        ``0`` starts an outer step at the current weights.
      point: the perturbed point ``w'_i`` the next inner ascent starts from
        (compute dtype), meaningful when ``index > 0``; ``()`` for ``k = 1``.
    """

    index: jax.Array
    point: Any


def lookbehind_ascent(k: int = 5, *, mask: Mask = None) -> Ascent:
    """Lookbehind's ascent (Mordido et al. 2024, Alg. 1): over the ``k``
    inner steps of an outer step, the perturbed point keeps climbing from
    where the last one ended, while the weights take a descent step each.

    With ``w_{i-1}`` the weights at inner step ``i`` (``w_0``: those at the
    start of the outer step) and ``w'_0 = w_0``:

    .. math::

      w'_i = w'_{i-1} + ρ \\frac{∇L(w'_{i-1})}{\\lVert ∇L(w'_{i-1}) \\rVert_2},
      \\qquad ε_i = w'_i - w_{i-1}

    so that the core's second gradient is ``∇L(w'_i)``. The point is
    neither projected nor reset within the outer step (‖ε‖ can reach about
    ``iρ``). ``k = 1`` is SAM's ascent. For ``k ≥ 2`` each ascent calls
    ``grad_fn`` once at ``w'_{i-1}`` (at ``i = 1`` that is ``w_0``, where it
    gives ``g`` again: a conditional would skip it, but it would nest a
    gradient in ``lax.cond``, which XLA:CPU runs far slower for
    convolutions).

    Args:
      k: inner steps per outer step (≥ 1).
      mask: leaves that are perturbed (and enter the norms); the others are
        evaluated at the current weights.

    References:
      Mordido, Malviya, Baratin, Chandar. Lookbehind-SAM: k steps back,
      1 step forward. ICML 2024. https://arxiv.org/abs/2307.16704
    """
    validation.check_positive_int(k, "k")
    masks.check(mask, "mask")

    def init(params):
        masks.resolve(mask, params, "mask")  # fail early on a bad mask
        return LookbehindAscentState(
            index=jnp.zeros([], jnp.int32),
            point=() if k == 1 else numerics.zeros_like_compute(params))

    def perturbation(grads, state, params, *, rho, grad_fn):
        mask_tree = masks.resolve(mask, params, "mask")
        if k == 1:
            unit = numerics.normalize(grads, mask_tree, scale=rho)
            return Perturbation(unit.direction, state,
                                norm=jnp.where(unit.usable, rho, 0.0))
        first = state.index == 0

        def offset(point, w):
            if not numerics.is_float(w):
                return jnp.zeros(np.shape(w), jnp.float32)
            wide = numerics.as_compute(w)
            return jnp.where(first, jnp.zeros([], wide.dtype),
                             point.astype(wide.dtype) - wide)

        # w'_{i-1} - w_{i-1}, on the perturbed leaves only.
        behind = numerics.select_leaves(
            jax.tree.map(offset, state.point, params), mask_tree)
        g = grad_fn(numerics.add_perturbation(params, behind))
        step = numerics.normalize(g, mask_tree, scale=rho).direction
        epsilon = jax.tree.map(jnp.add, behind, step)
        # ε comes from g at w'_{i-1}, not from the caller's gradient: report
        # its norm, so the caller's gradient is never needed (nor computed).
        grad_norm = numerics.global_norm(g)

        def advance(point, w, e):
            if not numerics.is_float(w):
                return point
            return (numerics.as_compute(w) + e).astype(point.dtype)

        point = jax.tree.map(advance, state.point, params, epsilon)
        return Perturbation(epsilon, LookbehindAscentState(
            index=(state.index + 1) % k, point=point), grad_norm=grad_norm)

    return Ascent(init=init, perturbation=perturbation)


# ------------------------------------------------ GAM: first-order flatness


def hessian_vector_product(grad_fn: Callable[[PyTree], PyTree], point: PyTree,
                           vector: PyTree) -> PyTree:
    """``∇²L(point) · vector``, exactly, by ``jax.jvp`` of ``grad_fn``
    (forward-over-reverse; the Hessian is never formed).

    .. math::

      H v = \\frac{d}{dt} ∇L(w + t v) \\Big|_{t=0}

    One product costs about two gradient evaluations of compute (the jvp
    also recomputes ``∇L(point)`` as its primal output) and keeps the
    activations of one. ``grad_fn`` must return the gradients only (the
    core's ``grad_fn`` for ascents and :class:`~sam_optax.core.PerturbedPoint`
    does) and be forward-differentiable, as ``jax.grad`` of ordinary JAX code
    is. ``vector`` is cast to each leaf's dtype (a bfloat16 leaf gets a
    bfloat16 tangent); non-float leaves get a zero ``float0`` tangent and a
    zero product. Under ``jax.shard_map`` the point and the tangent are typed
    varying alike, so the product is the shard's own (``grad_fn`` does any
    averaging). (:func:`sam_optax.sharpness.hessian_vector_product` is the
    same product built from a loss function, for measuring flatness.)

    Returns:
      ``H v`` with the tree of ``point``, in each leaf's compute dtype
      (float32 zeros on non-float leaves).
    """
    def tangent_pair(p, v):
        if not numerics.is_float(p):
            return p, np.zeros(np.shape(p), jax.dtypes.float0)
        p = jnp.asarray(p)
        t = jnp.asarray(v).astype(p.dtype)
        return collectives.vary_like(p, t), collectives.vary_like(t, p)

    primals, tangents = _map_pairs(tangent_pair, point, vector)
    _, product = jax.jvp(grad_fn, (primals,), (tangents,))
    return jax.tree.map(
        lambda h, p: numerics.as_compute(h) if numerics.is_float(p)
        else jnp.zeros(np.shape(p), jnp.float32), product, point)


def gradient_norm_ascent(mask: Mask = None) -> Ascent:
    """GAM's ascent (Zhang et al. 2023, Alg. 1): towards the largest
    gradient *norm* in the ball, not the largest loss.

    With ``g`` the clean gradient, ``ĝ = g/‖g‖`` and ``H = ∇²L(w)``:

    .. math::

      f = H ĝ = ∇\\lVert ∇L(w) \\rVert_2, \\qquad
      ε = ρ \\frac{f}{\\lVert f \\rVert_2}

    so that ``w + ε`` maximises ‖∇L‖ over the ball of radius ρ to first
    order (the paper's ``θ_adv``). ``f`` is one exact Hessian-vector product
    (:func:`hessian_vector_product` of ``grad_fn`` at ``w``): about two
    gradient evaluations. The paper's ``ξ`` in ``‖·‖ + ξ`` is replaced by
    the safe normalisation: ε = 0 when ``g`` or ``f`` is zero or not finite.

    Args:
      mask: leaves that are perturbed. ``ĝ`` is always the whole gradient's
        direction (``∇‖∇L‖`` involves every leaf); ε is ``f`` restricted to
        the selected leaves and normalised over them.

    References:
      Zhang, Xu, Yu, Zou, Cui. Gradient Norm Aware Minimization Seeks
      First-Order Flatness and Improves Generalization. CVPR 2023.
      https://arxiv.org/abs/2303.03108
    """
    masks.check(mask, "mask")

    def init(params):
        masks.resolve(mask, params, "mask")  # fail early on a bad mask
        return ()

    def perturbation(grads, state, params, *, rho, grad_fn):
        mask_tree = masks.resolve(mask, params, "mask")
        # ĝ is exactly 0 for a zero or non-finite g; then f = H·0 is 0 (or
        # NaN where the loss is not finite) and ε = 0 either way.
        unit = numerics.normalize(grads).direction
        f = hessian_vector_product(grad_fn, params, unit)
        # ε = ρ f/‖f‖ as numerics.normalize forms it, but with the factors
        # of |f| (the same sums of squares, the same inf/NaN entries). f's
        # leaves are not arrays XLA writes out: each is the jvp's sum of two
        # tangent products (then a layout transpose). normalize(f) reads
        # that one value twice, in the safe norm's per-leaf barrier and in
        # the normalising multiply; the barrier keeps XLA's simplifier from
        # sinking the transpose below the multiply, so the sum was fused
        # into every consumer and both of its operands stayed alive until ε
        # was formed (+0.47 P, benchmarks/bench_memory.py's MLPs). With the
        # norm taken of |f|, the multiply, whose factor depends on the sums,
        # is the sum's own consumer: XLA writes f once, as a hand-written
        # step does.
        factors = numerics.norm_factors(jax.tree.map(jnp.abs, f), mask_tree)
        post = factors.post * jnp.asarray(rho).astype(factors.post.dtype)

        def direction(h):
            return jnp.where(factors.usable,
                             (h * factors.pre.astype(h.dtype))
                             * post.astype(h.dtype), jnp.zeros([], h.dtype))

        epsilon = jax.tree.map(direction,
                               numerics.select_leaves(f, mask_tree))
        return Perturbation(epsilon, state,
                            norm=jnp.where(factors.usable, rho, 0.0))

    return Ascent(init=init, perturbation=perturbation)


__all__ = [
    "DynamicSparseState",
    "FisherSparseState",
    "FriendlyAscentState",
    "LookbehindAscentState",
    "RandomAscentState",
    "StochasticPerturbationState",
    "VarianceSuppressedState",
    "adaptive_ascent",
    "centralize",
    "centralized_ascent",
    "dynamic_sparse_ascent",
    "fisher_ascent",
    "fisher_sparse_ascent",
    "friendly_ascent",
    "gradient_norm_ascent",
    "hessian_vector_product",
    "lookbehind_ascent",
    "multistep_ascent",
    "normalized_ascent",
    "random_ascent",
    "stochastic_weight_perturbation",
    "variance_suppressed_ascent",
]

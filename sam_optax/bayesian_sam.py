"""bSAM: Bayesian SAM, an Adam-like SAM that learns a Gaussian posterior.

Möllenhoff & Khan (2023) show SAM optimises a relaxation of the Bayes
objective for an isotropic Gaussian posterior of fixed variance; bSAM also
learns a diagonal variance. It is its own optimizer, not a wrapper of a
``base_tx``: the precision ``s`` it learns is at once the posterior
precision, the preconditioner of the mean step and the scale of ε, so the
variance it reports means something only when ``s`` also drives the step.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax import ascent as ascent_lib
from sam_optax import numerics, validation
from sam_optax.collectives import (
    check_local_gradients,
    local_grad_fn,
    replica_mean,
)
from sam_optax.core import (
    SAMDiagnostics,
    SAMState,
    check_update_call,
    check_value,
    current_rho,
    find_sam_states,
    perturbed_gradient,
    split_value_and_grads,
)
from sam_optax.types import AxisName, GradFn, PyTree, ScalarOrSchedule


class BayesianSAMState(NamedTuple):
    """The ``ascent_state`` of :func:`bsam`.

    Attributes:
      key: the PRNG key (``uint32[2]``) of the next posterior sample.
      momentum: :math:`g_m`, the EMA of :math:`g_ε + δ w` (params' compute
        dtype).
      precision: :math:`s`, the per-parameter precision per example; the
        posterior variance is :math:`σ^2 = 1/(N s)` (compute dtype).
      num_data: N, the dataset size (float32 scalar), kept for
        :func:`bsam_posterior` and :func:`bsam_sample`.
    """

    key: jax.Array
    momentum: PyTree
    precision: PyTree
    num_data: jax.Array


class BayesianSAMPosterior(NamedTuple):
    """The Gaussian posterior :math:`\\mathcal N(w, σ^2)` learnt by bSAM.

    Attributes:
      mean: the params :math:`w`.
      variance: :math:`σ^2 = 1/(N s)` per parameter (compute dtype).
    """

    mean: PyTree
    variance: PyTree


def bsam(
    learning_rate: ScalarOrSchedule,
    rho: ScalarOrSchedule = 0.01,
    *,
    num_data: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    weight_decay: float = 0.0,
    damping: float = 0.1,
    init_precision: float = 1.0,
    seed: ascent_lib.Seed = 0,
    axis_name: Optional[AxisName] = None,
    full_diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """bSAM (Algorithm 1 of Möllenhoff & Khan 2023): SAM with a posterior.

    Each step, with :math:`N` the dataset size, :math:`δ` the weight decay
    (the prior precision divided by N) and :math:`γ` the damping; products,
    quotients, :math:`\\sqrt{\\cdot}` and :math:`|\\cdot|` are elementwise:

    .. math::

      θ = w + σ ⊙ z, \\quad z \\sim \\mathcal N(0, I), \\quad
      σ^2 = \\frac{1}{N s}, \\qquad g = ∇L(θ), \\qquad
      ε = ρ\\, \\frac{g}{s}, \\qquad g_ε = ∇L(w + ε)

      g_m \\leftarrow β_1 g_m + (1 - β_1)(g_ε + δ w), \\qquad
      s \\leftarrow β_2 s + (1 - β_2)\\big(\\sqrt{s}\\, |g| + δ + γ\\big),
      \\qquad w \\leftarrow w - α_t \\frac{g_m}{s}

    with :math:`s_0` = ``init_precision`` and :math:`g_m = 0` at the start.
    The step divides by the *new* s, in the order of the paper's listing;
    the authors' code divides by the previous one (the two differ by the
    factor :math:`s_{new}/s_{old} = β_2 + (1-β_2)(\\sqrt{s}|g| + δ + γ)/s`,
    near 1 once s has settled, further from it in the first steps). After training,
    :math:`\\mathcal N(w, σ^2)` is the posterior: :func:`bsam_posterior`
    gives σ², :func:`bsam_sample` draws weights for Bayesian model
    averaging.

    Two gradients per step, one after the other as in SAM: at the posterior
    sample θ and at :math:`w + ε`. The first is at θ, not at w, so
    ``update`` does not read ``grads`` (pass the clean gradient as with
    every method, which ``jit`` then never computes, or any tree shaped
    like the params). z is drawn from a key in the state, split at every
    step (the same seed gives the same run, with no retracing):
    ``key, draw = jax.random.split(key)``, then one key per leaf,
    ``jax.random.split(draw, n_leaves)``, each drawing
    ``jax.random.normal`` in the leaf's compute dtype.

    Args:
      learning_rate: α ≥ 0, or a schedule (the authors use warm-up then
        cosine, from α = 0.5 on CIFAR-10).
      rho: ρ ≥ 0, or a schedule. ρ scales g/s, not a unit vector: its scale
        differs from SAM's (the authors use 0.01 on CIFAR).
      num_data: N > 0, the number of training examples (the authors
        multiply it by 4 to account for data augmentation).
      beta1: β₁ ∈ [0, 1), the momentum of the gradient.
      beta2: β₂ ∈ [0, 1), the EMA of the precision.
      weight_decay: δ ≥ 0, the prior precision divided by N (the authors:
        prior precision 10 to 25).
      damping: γ ≥ 0, added to the precision for stability (0.1 in the
        authors' code).
      init_precision: s₀ > 0, the initial precision per example.
      seed: an int or a JAX PRNG key.
      axis_name: inside ``pmap``/``shard_map``/``vmap`` over this axis, pass
        a ``grad_fn`` of the local batch: each replica draws its own θ (the
        key folded with the replica index) and takes its own ε, as the
        authors do on sub-batches; :math:`g_ε` and
        :math:`\\sqrt{s}\\,|g|` are averaged over the axis, so the state
        stays identical across replicas.
      full_diagnostics: also record ‖g‖ and ‖ε‖ (extra passes over the
        parameters; else 0). ``loss`` (``value=``), ``perturbed_loss``
        (when ``grad_fn`` returns ``(loss, grads)``) are always recorded.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`;
      ``update(grads, state, params, *, grad_fn, **extra_args)``. The state
      is a :class:`~sam_optax.SAMState` whose ``ascent_state`` is a
      :class:`BayesianSAMState`; :func:`sam_optax.diagnostics` works on it.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w: jnp.mean((w - jnp.array([1.0, -2.0])) ** 2)
      >>> tx = sam_optax.bsam(0.05, rho=0.01, num_data=100, seed=0)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> @jax.jit
      ... def step(params, state):
      ...   updates, state = tx.update(params, state, params,
      ...                              grad_fn=jax.grad(loss_fn))
      ...   return optax.apply_updates(params, updates), state
      >>> for _ in range(300):
      ...   params, state = step(params, state)
      >>> [round(float(x), 1) for x in params]
      [1.0, -2.0]
      >>> mean, variance = sam_optax.bsam_posterior(params, state)
      >>> bool(jnp.all(variance < 0.02))
      True

    References:
      Möllenhoff, Khan. SAM as an Optimal Relaxation of Bayes. ICLR 2023.
      https://arxiv.org/abs/2210.01620
    """
    validation.check_nonnegative_scalar_or_schedule(learning_rate,
                                                    "learning_rate")
    validation.check_rho(rho)
    validation.check_in_range(num_data, "num_data", 0.0, float("inf"),
                              low_open=True)
    validation.check_in_range(beta1, "beta1", 0.0, 1.0, high_open=True)
    validation.check_in_range(beta2, "beta2", 0.0, 1.0, high_open=True)
    validation.check_in_range(weight_decay, "weight_decay", 0.0, float("inf"))
    validation.check_in_range(damping, "damping", 0.0, float("inf"))
    validation.check_in_range(init_precision, "init_precision", 0.0,
                              float("inf"), low_open=True)
    ascent_lib._check_seed(seed)
    validation.check_axis_name(axis_name, "axis_name")
    validation.check_bool(full_diagnostics, "full_diagnostics")

    def init_fn(params: PyTree) -> SAMState:
        zero = jnp.zeros([], jnp.float32)
        precision = jax.tree.map(
            lambda z: jnp.full_like(z, init_precision)
            if numerics.is_float(z) else z, numerics.zeros_like_compute(params))
        return SAMState.create(
            count=jnp.zeros([], jnp.int32), rho=zero, base_state=(),
            ascent_state=BayesianSAMState(
                key=ascent_lib._raw_key(seed),
                momentum=numerics.zeros_like_compute(params),
                precision=precision,
                num_data=jnp.asarray(num_data, jnp.float32)),
            descent_state=(), schedule_state=(),
            diagnostics=SAMDiagnostics(zero, zero, zero, zero, zero, zero,
                                       jnp.zeros([], jnp.bool_)))

    def update_fn(grads: PyTree, state: SAMState, params: PyTree = None, *,
                  grad_fn: Optional[GradFn] = None,
                  **extra_args: Any) -> tuple[PyTree, SAMState]:
        grad_fn = check_update_call(grads, params, grad_fn)
        if axis_name is not None:
            check_local_gradients(grads, axis_name)
            grad_fn = local_grad_fn(grad_fn, axis_name)
        value = extra_args.get("value")
        check_value(value)
        bayes = state.ascent_state
        count = state.count
        rho_t = current_rho(rho, count)
        lr_t = current_rho(learning_rate, count)  # same safe cast
        key, draw = jax.random.split(bayes.key)
        if axis_name is not None:  # one θ per replica
            draw = jax.random.fold_in(draw, jax.lax.axis_index(axis_name))

        # 1. g at a posterior sample θ ~ N(w, 1/(N s)).
        noisy = _sample(draw, params, bayes.precision, bayes.num_data)
        _, noisy_grads = split_value_and_grads(grad_fn(noisy), params)

        # 2. ε = ρ g / s and the second gradient at w + ε.
        def ascent(g, s):
            return (rho_t.astype(s.dtype) * numerics.as_compute(g) / s
                    if numerics.is_float(g) else s)

        epsilon = jax.tree.map(ascent, noisy_grads, bayes.precision)
        perturbed_value, perturbed_grads = perturbed_gradient(
            grad_fn, params, epsilon)

        # 3. Momentum, precision, mean step (Algorithm 1, lines 8-10).
        def curvature(g, s):  # √s |g|, the precision's data term
            return (jnp.sqrt(s) * jnp.abs(numerics.as_compute(g))
                    if numerics.is_float(g) else s)

        data_term = jax.tree.map(curvature, noisy_grads, bayes.precision)
        if axis_name is not None:
            perturbed_grads, data_term = replica_mean(
                (perturbed_grads, data_term), axis_name)
            if perturbed_value is not None:
                perturbed_value = replica_mean(perturbed_value, axis_name)

        def step(p, g_eps, c, m, s):
            if not numerics.is_float(p):
                return jnp.zeros_like(p), m, s
            w = numerics.as_compute(p)
            dtype = w.dtype
            m = beta1 * m + (1 - beta1) * (
                numerics.as_compute(g_eps) + weight_decay * w)
            s = beta2 * s + (1 - beta2) * (c + (weight_decay + damping))
            update = (-lr_t.astype(dtype) * m / s).astype(p.dtype)
            return update, m, s

        leaves, treedef = jax.tree.flatten(params)
        results = [step(*args) for args in zip(
            leaves, *(treedef.flatten_up_to(t) for t in (
                perturbed_grads, data_term, bayes.momentum,
                bayes.precision)), strict=True)]
        updates, momentum, precision = (
            treedef.unflatten([r[i] for r in results]) for i in range(3))

        zero = jnp.zeros([], jnp.float32)
        loss = zero if value is None else jnp.asarray(value, jnp.float32)
        perturbed_loss = (zero if perturbed_value is None
                          else jnp.asarray(perturbed_value, jnp.float32))
        diagnostics = SAMDiagnostics(
            grad_norm=(replica_mean(numerics.global_norm(noisy_grads),
                                    axis_name).astype(jnp.float32)
                       if full_diagnostics else zero),
            perturbation_norm=(replica_mean(numerics.plain_norm(epsilon),
                                            axis_name)
                               if full_diagnostics else zero),
            cosine=zero, loss=loss, perturbed_loss=perturbed_loss,
            sharpness=(perturbed_loss - loss
                       if value is not None and perturbed_value is not None
                       else zero),
            perturbed=jnp.ones([], jnp.bool_))
        return updates, SAMState.create(
            count=jnp.asarray(optax.safe_int32_increment(count)), rho=rho_t,
            base_state=(),
            ascent_state=BayesianSAMState(key, momentum, precision,
                                          bayes.num_data),
            descent_state=(), schedule_state=(), diagnostics=diagnostics)

    # `update` takes `grad_fn=` by keyword, which optax's protocol type for
    # update functions cannot express.
    return optax.GradientTransformationExtraArgs(
        init_fn, cast(optax.TransformUpdateExtraArgsFn, update_fn))


def _sample(key: jax.Array, params: PyTree, precision: PyTree,
            num_data: jax.Array) -> PyTree:
    """``w + z / √(N s)``, z ~ N(0, I) with one key per leaf (the params'
    dtypes; drawn and added in the compute dtype)."""
    def draw(k, p, s):
        if not numerics.is_float(p):
            return p
        z = jax.random.normal(k, np.shape(p), s.dtype)
        return (numerics.as_compute(p)
                + z * jax.lax.rsqrt(num_data.astype(s.dtype) * s)
                ).astype(numerics.leaf_dtype(p))

    return jax.tree.map(draw, ascent_lib._leaf_keys(key, params), params,
                        precision)


def _bayes_state(opt_state: Any, caller: str) -> BayesianSAMState:
    """The one :class:`BayesianSAMState` inside ``opt_state``."""
    states = [s.ascent_state for s in find_sam_states(opt_state)
              if isinstance(s.ascent_state, BayesianSAMState)]
    if len(states) != 1:
        raise ValueError(
            f"`{caller}` needs the optimizer state of `sam_optax.bsam(...)` "
            f"(alone or inside a chain or wrapper); `opt_state` holds "
            f"{len(states)} bSAM states. Pass the state returned by the bSAM "
            "`tx.init`/`tx.update`.")
    return states[0]


def _check_matches(params: PyTree, bayes: BayesianSAMState) -> None:
    if jax.tree.structure(params) != jax.tree.structure(bayes.precision):
        raise ValueError(
            "`params` must have the tree structure of the params bSAM was "
            f"initialised with.\n  bSAM's precision: "
            f"{jax.tree.structure(bayes.precision)}\n  params: "
            f"{jax.tree.structure(params)}")


def bsam_posterior(params: PyTree, opt_state: Any) -> BayesianSAMPosterior:
    """The posterior :math:`\\mathcal N(w, σ^2)`, σ² = 1/(N s), of bSAM.

    Args:
      params: the trained params w (the posterior mean).
      opt_state: the state of ``sam_optax.bsam(...)`` (alone or inside a
        chain or wrapper).

    Returns:
      A :class:`BayesianSAMPosterior` ``(mean, variance)``.
    """
    bayes = _bayes_state(opt_state, "bsam_posterior")
    _check_matches(params, bayes)
    variance = jax.tree.map(
        lambda p, s: 1.0 / (bayes.num_data.astype(s.dtype) * s)
        if numerics.is_float(p) else jnp.zeros(np.shape(p), jnp.float32),
        params, bayes.precision)
    return BayesianSAMPosterior(params, variance)


def bsam_sample(key: jax.Array, params: PyTree, opt_state: Any,
                num_samples: Optional[int] = None) -> PyTree:
    """Weights drawn from bSAM's posterior, for Bayesian model averaging.

    :math:`θ = w + z / \\sqrt{N s}`, z ~ N(0, I), drawn as in the bSAM step
    (one key per leaf from ``key``): ``bsam_sample(draw, w, state)`` with
    the step's ``draw`` key is the θ that step took its first gradient at.

    Args:
      key: a JAX PRNG key.
      params: the posterior mean w.
      opt_state: the state of ``sam_optax.bsam(...)``.
      num_samples: ``None`` for one tree of weights; an int ≥ 1 for that
        many, stacked on a leading axis (``jax.vmap`` the model over it and
        average the predicted probabilities).

    Returns:
      The sampled params, in the params' dtypes.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> tx = sam_optax.bsam(0.1, num_data=1000)
      >>> params = {"w": jnp.zeros(3)}
      >>> state = tx.init(params)
      >>> samples = sam_optax.bsam_sample(jax.random.key(1), params, state,
      ...                                 num_samples=8)
      >>> samples["w"].shape
      (8, 3)
    """
    bayes = _bayes_state(opt_state, "bsam_sample")
    _check_matches(params, bayes)
    key = ascent_lib._raw_key(key)
    if num_samples is None:
        return _sample(key, params, bayes.precision, bayes.num_data)
    validation.check_positive_int(num_samples, "num_samples")
    keys = jax.random.split(key, num_samples)
    return jax.vmap(lambda k: _sample(k, params, bayes.precision,
                                      bayes.num_data))(keys)


__all__ = ["BayesianSAMPosterior", "BayesianSAMState", "bsam",
           "bsam_posterior", "bsam_sample"]

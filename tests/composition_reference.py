"""Float64 NumPy references for the composition matrix
(``tests/test_composition_matrix.py``).

* :class:`BatchProblem`: a two-leaf problem whose mini-batch changes at every
  step, with a float64 NumPy gradient and a JAX loss in any float dtype; its
  degenerate batches give gradients that are zero, tiny, huge, or that hold
  an ``inf`` or ``NaN`` entry.
* The methods as float64 rules, from the papers' formulas (the ascents of
  ``test_ascent.py``, the descents and schedules of
  ``descent_schedule_reference.py``, MSAM and decoupled WSAM written here for
  a changing batch), and runners that iterate them alone or with gradient
  accumulation inside SAM (``C(optax.MultiSteps(base, k))``).

Nothing here imports ``sam_optax`` except through those two modules' own
imports; no rule calls the library.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from descent_schedule_reference import sam_second_gradient
from numpy_reference import norm, tmap

PyTree = Any
# direction_fn(t, params, g, grad, rho) -> (what base_tx receives, whether the
# second gradient was taken); `grad(params)` is this step's batch gradient.
DirectionFn = Callable[..., tuple[PyTree, bool]]

# ------------------------------------------------------------------ problem


def _f32(x) -> np.ndarray:
    """Values exactly representable in float32, so that the float32 runs and
    the float64 reference see the same data."""
    return np.asarray(np.asarray(x, np.float32), np.float64)


class Batch(NamedTuple):
    """One mini-batch: the loss is ``scale · [Σ_i weights_i ℓ_i + κ q]``.

    ``weights`` and ``targets`` have one entry per coordinate
    ``θ = (w₀, w₁, w₂, b₀)``.
    """

    scale: np.ndarray
    weights: np.ndarray
    targets: np.ndarray

    def as_jax(self, dtype=jnp.float32) -> Batch:
        return Batch(*(jnp.asarray(x, dtype) for x in self))


class BatchProblem:
    """A mini-batch loss of params ``{"w": (3,), "b": (1,)}``:

    .. math::

      L(θ; s, v, c) = s \\Big[\\sum_i v_i ℓ_i(θ_i - c_i)
        + κ\\, \\mathrm{softplus}(\\langle u, w \\rangle + b)\\Big], \\qquad
      ℓ_i(z) = \\frac{a_i}{2} z^2 + \\mathrm{softplus}(z)

    Curved (the Hessian depends on θ, so ε changes the second gradient
    nonlinearly), coupled across the two leaves, with a gradient that grows
    at most linearly (a huge step leaves the following ones finite). The
    per-coordinate weights put an ``inf`` or ``NaN`` in one gradient entry
    only; the scale makes the whole gradient zero, tiny or huge.
    """

    A = np.array([1.0, 2.0, 0.5, 1.5])
    U = np.array([1.0, -0.5, 0.25])
    KAPPA = 0.75
    # Exactly representable in bfloat16 and float16.
    init = {"w": np.array([0.375, -0.5, 0.25]), "b": np.array([0.125])}

    @staticmethod
    def batches(n: int, seed: int = 0) -> list[Batch]:
        """``n`` ordinary mini-batches, each with its own weights and targets."""
        rng = np.random.RandomState(seed)
        return [Batch(_f32(1.0), _f32(rng.uniform(0.5, 1.5, 4)),
                      _f32(rng.normal(0.4, 0.6, 4))) for _ in range(n)]

    @staticmethod
    def degenerate(kind: str, like: Batch) -> Batch:
        """A batch whose gradient (at any params of moderate size) is of the
        given kind: ``zero``, ``tiny`` (entries ~1e-38), ``huge`` (~1e38),
        ``inf`` or ``nan`` (in the entry of ``w[1]`` only)."""
        weights, targets = like.weights.copy(), like.targets.copy()
        scale = 1.0
        if kind == "zero":
            scale = 0.0
        elif kind == "tiny":
            scale = 3e-38
        elif kind == "huge":
            # |v·ℓ'(z) + κσ| stays below ~2, so entries ~1e38 do not overflow.
            scale, weights = 1e38, np.full(4, 0.25)
        elif kind == "inf":
            # θ₁ − c₁ > 0: both terms of ∞·ℓ'(z) are +∞ (no ∞ − ∞ = NaN).
            weights[1], targets[1] = np.inf, -10.0
        elif kind == "nan":
            weights[1] = np.nan
        else:
            raise ValueError(kind)
        return Batch(_f32(scale), _f32(weights), _f32(targets))

    @staticmethod
    def _theta(p) -> np.ndarray:
        return np.concatenate([np.ravel(p["w"]), np.ravel(p["b"])])

    def grad(self, p, batch: Batch) -> dict:
        """∇L in float64."""
        theta = self._theta({k: np.asarray(v, np.float64) for k, v in p.items()})
        z = theta - batch.targets
        sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))
        own = batch.weights * (self.A * z + sigmoid(z))
        coupling = self.KAPPA * sigmoid(self.U @ theta[:3] + theta[3])
        g = batch.scale * (own + coupling * np.append(self.U, 1.0))
        return {"w": g[:3], "b": g[3:]}

    def jax_loss(self, p, batch: Batch):
        """L in the params' compute dtype (float32, or float64 for float64
        params): bf16/f16 params get float32 arithmetic and gradients in
        their own dtype."""
        dtype = jnp.promote_types(p["w"].dtype, jnp.float32)
        w, b = p["w"].astype(dtype), p["b"].astype(dtype)
        theta = jnp.concatenate([w, b])
        scale, weights, targets = (x.astype(dtype) for x in batch)
        z = theta - targets
        own = jnp.asarray(self.A, dtype) * z * z / 2 + jax.nn.softplus(z)
        coupling = jax.nn.softplus(w @ jnp.asarray(self.U, dtype) + b[0])
        return scale * (jnp.sum(weights * own) + self.KAPPA * coupling)


# -------------------------------------------------------------------- rules


def sam_direction() -> DirectionFn:
    """Foret et al. 2021: base receives ∇L(w + ρ g/‖g‖)."""
    def fn(t, params, g, grad, rho):
        return sam_second_gradient(params, g, grad, rho), True
    return fn


def ascent_direction(make_perturbation: Callable[[], Callable], rho: float
                     ) -> Callable[[], DirectionFn]:
    """A direction rule from an ascent reference of ``test_ascent.py``.

    Those references, ``perturbation(g, w, state, problem) -> (ε, state)``,
    have ρ built in (``test_ascent.RHO``) and may call ``problem.grad``
    (multi-step SAM): here that is the step's own batch gradient. Returns a
    factory of fresh (stateful) rules.
    """
    def make() -> DirectionFn:
        perturbation = make_perturbation()
        memory = {"state": None}

        def fn(t, params, g, grad, rho_t):
            assert rho_t == rho, "the ascent references have ρ built in"
            eps, memory["state"] = perturbation(
                g, params, memory["state"], types.SimpleNamespace(grad=grad))
            return grad(tmap(np.add, params, eps)), True
        return fn
    return make


class Reference(NamedTuple):
    """A method's float64 reference.

    Attributes:
      direction: factory of a fresh direction rule (what ``base_tx`` receives
        each step), or None for methods that act on the params themselves
        (MSAM, decoupled WSAM).
      run: ``run(problem, base, batches, rho) -> (history, flags)`` for
        those methods; None for direction rules (use :func:`run_alone`).
    """

    direction: Optional[Callable[[], DirectionFn]] = None
    run: Optional[Callable[..., tuple[list, list]]] = None


def _start(problem) -> dict:
    return tmap(lambda x: np.asarray(x, np.float64), problem.init)


def _batch_grad(problem, batch: Batch) -> Callable[[dict], dict]:
    return lambda p: problem.grad(p, batch)


def run_alone(reference: Reference, problem, base, batches, rho
              ) -> tuple[list, list]:
    """``C(base)`` in float64: params after each step and the steps that
    took a second gradient."""
    if reference.run is not None:
        return reference.run(problem, base, batches, rho)
    direction_fn = reference.direction()
    params = _start(problem)
    state = base.init(params)
    history, flags = [], []
    for t, batch in enumerate(batches):
        grad = _batch_grad(problem, batch)
        direction, perturbed = direction_fn(t, params, grad(params), grad, rho)
        updates, state = base.update(direction, state)
        params = tmap(np.add, params, updates)
        history.append(params)
        flags.append(perturbed)
    return history, flags


def run_accumulated(reference: Reference, problem, base, batches, rho, k
                    ) -> tuple[list, list]:
    """``C(optax.MultiSteps(base, k))`` in float64.

    The SAM-side rule runs once per micro-batch (its own ε from that
    micro-batch's gradient, its state and step count advancing every
    micro-batch) at params that stay fixed during the accumulation; ``base``
    receives the mean of the k directions once every k micro-batches.
    """
    assert reference.direction is not None, "accumulation needs a direction"
    direction_fn = reference.direction()
    params = _start(problem)
    state = base.init(params)
    accumulated = tmap(np.zeros_like, params)
    history, flags = [], []
    for t, batch in enumerate(batches):
        grad = _batch_grad(problem, batch)
        direction, perturbed = direction_fn(t, params, grad(params), grad, rho)
        accumulated = tmap(np.add, accumulated, direction)
        if (t + 1) % k == 0:
            updates, state = base.update(tmap(lambda a: a / k, accumulated),
                                         state)
            params = tmap(np.add, params, updates)
            accumulated = tmap(np.zeros_like, params)
        history.append(params)
        flags.append(perturbed)
    return history, flags


def wsam_decoupled(gamma: float, learning_rate: float) -> Reference:
    """Yue et al. 2023, Alg. 1: ``w ← w + base(g) − η γ/(1−γ) (g_sam − g)``."""
    weight = gamma / (1.0 - gamma)

    def run(problem, base, batches, rho):
        params = _start(problem)
        state = base.init(params)
        history = []
        for batch in batches:
            grad = _batch_grad(problem, batch)
            g = grad(params)
            g_sam = sam_second_gradient(params, g, grad, rho)
            updates, state = base.update(g, state)
            params = tmap(lambda p, u, s, c: p + u - learning_rate * weight
                          * (s - c), params, updates, g_sam, g)
            history.append(params)
        return history, [True] * len(batches)

    return Reference(run=run)


def msam(learning_rate: float, momentum: float) -> Reference:
    """Becker et al. 2024, the authors' SGD formulation, on a changing batch.

    The held weights are ``w̃ = w − ρ v/‖v‖`` (v: the momentum buffer,
    ``v ← μ v + g``, ``w ← w − η v``), and the gradient is taken at w̃. The
    history holds w̃ (what the caller holds); no second gradient is taken.
    """
    def run(problem, base, batches, rho):
        del base  # the rule is written for SGD with momentum
        held = _start(problem)
        buffer = tmap(np.zeros_like, held)
        inverse_norm = 0.0
        history = []
        for batch in batches:
            g = problem.grad(held, batch)
            clean = tmap(lambda x, v: x + rho * inverse_norm * v, held, buffer)
            buffer = tmap(lambda v, d: momentum * v + d, buffer, g)
            clean = tmap(lambda x, v: x - learning_rate * v, clean, buffer)
            size = norm(buffer)
            inverse_norm = 1.0 / size if size > 0 else 0.0
            held = tmap(lambda x, v: x - rho * inverse_norm * v, clean, buffer)
            history.append(held)
        return history, [False] * len(batches)

    return Reference(run=run)

"""Float64 NumPy references for the descent and schedule families.

Each rule is written from its paper's formula (GSAM, WSAM, LookSAM, every-k,
AE-SAM, MSAM) on plain dicts of arrays, without JAX or Optax, plus a small
runner that iterates a ``sam_optax`` transformation on the same problem.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from numpy_reference import norm, sam_perturbation, tmap
from sam_steps import iterate

import sam_optax


def vdot(a, b):
    return sum(float(np.sum(np.asarray(x, np.float64) * np.asarray(y, np.float64)))
               for x, y in zip(_leaves(a), _leaves(b), strict=True))


def _leaves(tree):
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _leaves(tree[k])]
    return [np.asarray(tree)]


def orthogonal(a, b):
    """a − ⟨a, b̂⟩ b̂ (a when b = 0)."""
    nb = norm(b)
    if nb == 0.0:
        return tmap(np.copy, a)
    coef = vdot(a, b) / nb ** 2
    return tmap(lambda x, y: x - coef * y, a, b)


def run_reference(problem, base, steps, direction_fn, rho=0.05):
    """Iterate ``w ← w + base(direction_fn(t, w, g, rho_t))`` in float64.

    ``direction_fn(t, params, g, grad, rho_t) -> (direction, perturbed)`` may
    call ``grad`` (the problem's gradient) at any point; ``rho`` is a float
    or a function of t. Returns (params after each step, perturbed flags).
    """
    params = tmap(lambda x: np.asarray(x, np.float64), problem.init)
    state = base.init(params)
    history, flags = [], []
    for t in range(steps):
        rho_t = rho(t) if callable(rho) else rho
        g = problem.grad(params)
        direction, perturbed = direction_fn(t, params, g, problem.grad, rho_t)
        upd, state = base.update(direction, state)
        params = tmap(np.add, params, upd)
        history.append(params)
        flags.append(perturbed)
    return history, flags


def sam_second_gradient(params, g, grad, rho):
    eps = sam_perturbation(g, rho)
    return grad(tmap(np.add, params, eps))


def gsam_direction(alpha):
    """Zhuang et al. 2022: g_sam − α (g − ⟨g, ĝ_sam⟩ ĝ_sam)."""
    def fn(t, params, g, grad, rho):
        g_sam = sam_second_gradient(params, g, grad, rho)
        g_perp = orthogonal(g, g_sam)
        return tmap(lambda s, p: s - alpha * p, g_sam, g_perp), True
    return fn


def wsam_coupled_direction(gamma):
    """Yue et al. 2023: (1−2γ)/(1−γ) g + γ/(1−γ) g_sam."""
    def fn(t, params, g, grad, rho):
        g_sam = sam_second_gradient(params, g, grad, rho)
        a = (1 - 2 * gamma) / (1 - gamma)
        b = gamma / (1 - gamma)
        return tmap(lambda x, y: a * x + b * y, g, g_sam), True
    return fn


def run_wsam_decoupled(problem, base, steps, gamma, lr_fn, rho=0.05):
    """w ← w + base(g) − η_t γ/(1−γ) (g_sam − g)."""
    params = tmap(lambda x: np.asarray(x, np.float64), problem.init)
    state = base.init(params)
    history = []
    weight = gamma / (1 - gamma)
    for t in range(steps):
        g = problem.grad(params)
        g_sam = sam_second_gradient(params, g, problem.grad, rho)
        upd, state = base.update(g, state)
        params = tmap(lambda p, u, s, c: p + u - lr_fn(t) * weight * (s - c),
                      params, upd, g_sam, g)
        history.append(params)
    return history


def looksam_direction(k, alpha):
    """Liu et al. 2022, Alg. 1: refresh g_v every k steps, reuse in between."""
    memory = {}

    def fn(t, params, g, grad, rho):
        if t % k == 0:
            g_sam = sam_second_gradient(params, g, grad, rho)
            # g_v = g_s − ‖g_s‖ cos θ g/‖g‖
            cos = vdot(g, g_sam) / (norm(g) * norm(g_sam))
            ng, ns = norm(g), norm(g_sam)
            memory["g_v"] = tmap(lambda s, x: s - ns * cos * x / ng, g_sam, g)
            return g_sam, True
        g_v = memory["g_v"]
        scale = alpha * norm(g) / norm(g_v)
        return tmap(lambda x, v: x + scale * v, g, g_v), False
    return fn


def every_k_direction(k):
    def fn(t, params, g, grad, rho):
        if t % k == 0:
            return sam_second_gradient(params, g, grad, rho), True
        return g, False
    return fn


def ae_sam_direction(c_fn, delta, history=None):
    """Jiang et al. 2023: SAM iff ‖g‖² ≥ μ_t + c_t σ_t (EMA statistics).

    ``history``, when given, receives ``(μ_t, σ²_t)`` after each step.
    """
    stats = {"mean": 0.0, "var": 0.0}

    def fn(t, params, g, grad, rho):
        sq = norm(g) ** 2
        stats["mean"] = delta * stats["mean"] + (1 - delta) * sq
        stats["var"] = delta * stats["var"] + (1 - delta) * (sq - stats["mean"]) ** 2
        if history is not None:
            history.append((stats["mean"], stats["var"]))
        if sq >= stats["mean"] + c_fn(t) * np.sqrt(stats["var"]):
            return sam_second_gradient(params, g, grad, rho), True
        return g, False
    return fn


def run_msam(problem, lr, momentum, rho, steps):
    """Becker et al. 2024, the authors' SGD formulation.

    The stored weights are w̃ = w − ρ v/‖v‖ (v: momentum buffer, v ← μv + g,
    w ← w − η v); the gradient is taken at w̃. Returns w̃ after each step.
    """
    p = tmap(lambda x: np.asarray(x, np.float64), problem.init)
    v = tmap(np.zeros_like, p)
    inv = 0.0
    history, clean = [], []
    for _ in range(steps):
        g = problem.grad(p)
        p = tmap(lambda x, b: x + rho * inv * b, p, v)         # back to w
        v = tmap(lambda b, d: momentum * b + d, v, g)
        p = tmap(lambda x, b: x - lr * b, p, v)                 # SGD step
        n = norm(v)
        inv = 1.0 / n if n > 0 else 0.0
        clean.append(p)
        p = tmap(lambda x, b: x - rho * inv * b, p, v)          # w̃
        history.append(p)
    return history, clean


def run_tx(tx, problem, steps, states=None):
    """Iterate a sam_optax transformation (jitted once) on ``problem``.

    Returns (params after each step as float64 dicts, perturbed flags,
    the final state); ``states``, when given, receives the state after each
    step.
    """
    states = [] if states is None else states
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), problem.init)
    history, state = iterate(tx, problem.jax_loss, params, steps, states=states)
    flags = [bool(sam_optax.diagnostics(s).perturbed) for s in states[-steps:]]
    return history, flags, state


def assert_trajectories_close(actual, expected, rtol=2e-5, atol=2e-6):
    assert len(actual) == len(expected)
    for t, (a, e) in enumerate(zip(actual, expected, strict=True)):
        for x, y in zip(_leaves(a), _leaves(e), strict=True):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol,
                                       err_msg=f"step {t}")


def run_msam_general(problem, lr, momentum, rho, steps, *, weight_decay=0.0,
                     keep=None):
    """MSAM (Becker et al. 2024) around SGD with momentum on ``g + λ w``.

    The weight decay acts on the clean weights w, never on w̃ = w + ε; ε is
    restricted to the leaves ``keep`` selects (a bool tree; None: all), with
    the norm over them only: ε = −ρ v_S/‖v_S‖. Returns (w̃, w) after each step.
    """
    def selected(tree):
        if keep is None:
            return tree
        return tmap(lambda x, k: x if k else np.zeros_like(x), tree, keep)

    w = tmap(lambda x: np.asarray(x, np.float64), problem.init)
    v = tmap(np.zeros_like, w)
    eps = tmap(np.zeros_like, w)
    history, clean = [], []
    for _ in range(steps):
        g = problem.grad(tmap(np.add, w, eps))        # at the perturbed point
        v = tmap(lambda b, d, x: momentum * b + d + weight_decay * x, v, g, w)
        w = tmap(lambda x, b: x - lr * b, w, v)
        v_s = selected(v)
        n = norm(v_s)
        eps = tmap(lambda b: -rho * b / n if n > 0 else np.zeros_like(b), v_s)
        clean.append(w)
        history.append(tmap(np.add, w, eps))
    return history, clean

"""Independent float64 NumPy references: problems with known gradients, base
optimizers and the SAM rule of Foret et al. 2021 (arXiv:2010.01412), written
from the paper's formulas without JAX or Optax."""

from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------- problems


class Quadratic:
    """L(w) = ½ (w − c)ᵀ A (w − c), A symmetric positive definite."""

    def __init__(self, dim: int = 5, seed: int = 0):
        rng = np.random.RandomState(seed)
        m = rng.randn(dim, dim)
        self.a = m @ m.T / dim + np.eye(dim) * 0.5
        self.c = rng.randn(dim)
        self.init = {"w": rng.randn(dim) * 0.5}

    def loss(self, p):
        d = p["w"] - self.c
        return 0.5 * d @ self.a @ d

    def grad(self, p):
        return {"w": self.a @ (p["w"] - self.c)}

    def jax_loss(self, p):
        import jax.numpy as jnp
        d = p["w"] - jnp.asarray(self.c, jnp.float32)
        return 0.5 * d @ jnp.asarray(self.a, jnp.float32) @ d


class Logistic:
    """Mean logistic loss of a linear model with bias, labels y ∈ {−1, +1}."""

    def __init__(self, n: int = 32, dim: int = 4, seed: int = 1):
        rng = np.random.RandomState(seed)
        self.x = rng.randn(n, dim)
        self.y = np.sign(self.x @ rng.randn(dim) + 0.3 * rng.randn(n))
        self.init = {"w": rng.randn(dim) * 0.1, "b": np.array(0.05)}

    def loss(self, p):
        z = self.y * (self.x @ p["w"] + p["b"])
        return np.mean(np.logaddexp(0.0, -z))

    def grad(self, p):
        z = self.y * (self.x @ p["w"] + p["b"])
        s = -self.y / (1.0 + np.exp(z)) / len(self.y)  # dL/d(logit)
        return {"w": self.x.T @ s, "b": np.array(np.sum(s))}

    def jax_loss(self, p):
        import jax.numpy as jnp
        z = jnp.asarray(self.y, jnp.float32) * (
            jnp.asarray(self.x, jnp.float32) @ p["w"] + p["b"])
        return jnp.mean(jnp.logaddexp(0.0, -z))


class TinyMLP:
    """One tanh hidden layer, squared error: two layers, four leaves."""

    def __init__(self, n: int = 16, din: int = 3, hidden: int = 6, seed: int = 2):
        rng = np.random.RandomState(seed)
        self.x = rng.randn(n, din)
        self.y = rng.randn(n, 1)
        self.init = {
            "l1": {"w": rng.randn(din, hidden) * 0.5, "b": rng.randn(hidden) * 0.1},
            "l2": {"w": rng.randn(hidden, 1) * 0.5, "b": rng.randn(1) * 0.1},
        }

    def loss(self, p):
        h = np.tanh(self.x @ p["l1"]["w"] + p["l1"]["b"])
        out = h @ p["l2"]["w"] + p["l2"]["b"]
        return 0.5 * np.mean((out - self.y) ** 2)

    def grad(self, p):
        n = len(self.x)
        pre = self.x @ p["l1"]["w"] + p["l1"]["b"]
        h = np.tanh(pre)
        out = h @ p["l2"]["w"] + p["l2"]["b"]
        d_out = (out - self.y) / n
        d_h = d_out @ p["l2"]["w"].T
        d_pre = d_h * (1.0 - h ** 2)
        return {
            "l1": {"w": self.x.T @ d_pre, "b": d_pre.sum(0)},
            "l2": {"w": h.T @ d_out, "b": d_out.sum(0)},
        }

    def jax_loss(self, p):
        import jax.numpy as jnp
        x = jnp.asarray(self.x, jnp.float32)
        y = jnp.asarray(self.y, jnp.float32)
        h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
        out = h @ p["l2"]["w"] + p["l2"]["b"]
        return 0.5 * jnp.mean((out - y) ** 2)


PROBLEMS = {"quadratic": Quadratic, "logistic": Logistic, "mlp": TinyMLP}

# ------------------------------------------------------------- tree helpers


def tmap(f, *trees):
    if isinstance(trees[0], dict):
        return {k: tmap(f, *(t[k] for t in trees)) for k in trees[0]}
    return f(*trees)


def leaves(tree):
    if isinstance(tree, dict):
        return [x for k in tree for x in leaves(tree[k])]
    return [np.asarray(tree)]


def norm(tree):
    return np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in leaves(tree)))


# --------------------------------------------------------- base optimizers


class SGD:
    """w ← w − lr·(g + μ·trace) with optax's (non-Nesterov) momentum trace."""

    def __init__(self, lr: float, momentum: float = 0.0):
        self.lr, self.momentum = lr, momentum

    def init(self, params):
        return tmap(np.zeros_like, params)

    def update(self, grads, trace):
        trace = tmap(lambda g, t: g + self.momentum * t, grads, trace)
        return tmap(lambda t: -self.lr * t, trace), trace


class Adam:
    """Kingma & Ba (2015), bias-corrected, ε outside the square root."""

    def __init__(self, lr: float, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps

    def init(self, params):
        z = tmap(np.zeros_like, params)
        return (0, z, z)

    def update(self, grads, state):
        t, m, v = state
        t += 1
        m = tmap(lambda m_, g: self.b1 * m_ + (1 - self.b1) * g, m, grads)
        v = tmap(lambda v_, g: self.b2 * v_ + (1 - self.b2) * g * g, v, grads)
        upd = tmap(lambda m_, v_: -self.lr * (m_ / (1 - self.b1 ** t)) / (
            np.sqrt(v_ / (1 - self.b2 ** t)) + self.eps), m, v)
        return upd, (t, m, v)


# -------------------------------------------------------------------- SAM


def sam_perturbation(grads, rho):
    """ε = ρ g / ‖g‖₂ (global norm), and 0 at g = 0."""
    n = norm(grads)
    if n == 0.0:
        return tmap(np.zeros_like, grads)
    return tmap(lambda g: rho * g / n, grads)


def run_sam(problem, base, rho, steps):
    """Iterate SAM in float64; returns the list of params after each step."""
    params = tmap(lambda x: np.asarray(x, np.float64), problem.init)
    state = base.init(params)
    history = []
    for _ in range(steps):
        g = problem.grad(params)
        eps = sam_perturbation(g, rho)
        g_sam = problem.grad(tmap(np.add, params, eps))
        upd, state = base.update(g_sam, state)
        params = tmap(np.add, params, upd)
        history.append(params)
    return history

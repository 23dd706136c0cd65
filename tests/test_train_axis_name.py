"""`axis_name` of the Flax helpers (`sam_optax.linen.train_step`,
`sam_optax.nnx.value_and_grad`): per-replica ε and averaged BatchNorm
statistics, as the trainer uses them.

Each check runs the helper inside `jax.shard_map` over 4 of the 8 fake CPU
devices (and, for Linen, under `vmap` over chunks) and compares with a
float64 NumPy reference: ε from each replica's own gradient, the perturbed
gradients averaged, the running statistics the mean of the replicas'.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import sam_optax

REPLICAS, PER_REPLICA, DIM, CLASSES = 4, 6, 5, 3
LR, MOMENTUM, RHO, STEPS = 0.2, 0.9, 0.1, 3


def problem():
    rng = np.random.RandomState(0)
    x = rng.randn(REPLICAS * PER_REPLICA, DIM).astype(np.float32)
    y = rng.randint(0, CLASSES, len(x)).astype(np.int32)
    w = (rng.randn(DIM, CLASSES) * 0.3).astype(np.float32)
    b = (rng.randn(CLASSES) * 0.1).astype(np.float32)
    return x, y, w, b


def np_grad(w, b, x, y):
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return x.T @ p, p.sum(0)


def reference():
    """SAM with ε per replica, momentum SGD on the mean perturbed gradient."""
    x, y, w, b = (a.astype(np.float64) if a.dtype == np.float32 else a
                  for a in problem())
    chunks = np.split(np.arange(len(x)), REPLICAS)
    tw, tb = np.zeros_like(w), np.zeros_like(b)
    for _ in range(STEPS):
        gw_sam, gb_sam = np.zeros_like(w), np.zeros_like(b)
        for c in chunks:
            gw, gb = np_grad(w, b, x[c], y[c])
            scale = RHO / np.sqrt(np.sum(gw ** 2) + np.sum(gb ** 2))
            pw, pb = np_grad(w + scale * gw, b + scale * gb, x[c], y[c])
            gw_sam += pw / REPLICAS
            gb_sam += pb / REPLICAS
        tw, tb = gw_sam + MOMENTUM * tw, gb_sam + MOMENTUM * tb
        w, b = w - LR * tw, b - LR * tb
    return w, b


def global_reference_differs():
    """Guard: one ε for the whole batch gives another answer."""
    w_ref, _ = reference()
    x, y, w, b = problem()
    x, w, b = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    tw, tb = np.zeros_like(w), np.zeros_like(b)
    for _ in range(STEPS):
        gw, gb = np_grad(w, b, x, y)
        scale = RHO / np.sqrt(np.sum(gw ** 2) + np.sum(gb ** 2))
        pw, pb = np_grad(w + scale * gw, b + scale * gb, x, y)
        tw, tb = pw + MOMENTUM * tw, pb + MOMENTUM * tb
        w, b = w - LR * tw, b - LR * tb
    return np.max(np.abs(w - w_ref))


def mesh():
    return jax.sharding.Mesh(np.asarray(jax.devices()[:REPLICAS]), ("data",),
                             axis_types=(jax.sharding.AxisType.Auto,))


def tx(axis_name="data"):
    return sam_optax.sam(optax.sgd(LR, momentum=MOMENTUM), rho=RHO,
                         axis_name=axis_name)


# ------------------------------------------------------------------- Linen


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        del train
        return nn.Dense(CLASSES)(x)


class NormThenLinear(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(CLASSES)(x)


def linen_loss(apply, batch):
    x, y = batch
    logits = apply(x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def linen_state(model, optimizer):
    x, _, w, b = problem()
    variables = model.init(jax.random.key(0), x[:1], train=False)
    params = jax.tree.map(lambda a: a, variables["params"])
    params["Dense_0"] = {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}
    return sam_optax.linen.TrainState.create(
        apply_fn=model.apply, params=params, tx=optimizer,
        batch_stats=variables.get("batch_stats"))


def run_linen(model, how, optimizer=None, steps=STEPS):
    x, y, _, _ = problem()
    state = linen_state(model, optimizer or tx())
    body = sam_optax.linen.train_step(linen_loss, axis_name="data")
    if how == "shard_map":
        step = jax.jit(jax.shard_map(body, mesh=mesh(),
                                     in_specs=(P(), P("data"), P()),
                                     out_specs=(P(), P())))
        batch = (x, y)
    else:  # vmap over chunks: m-sharpness on one device
        step = jax.jit(jax.vmap(body, in_axes=(None, 0, None),
                                out_axes=(None, None), axis_name="data"))
        batch = (x.reshape(REPLICAS, PER_REPLICA, DIM),
                 y.reshape(REPLICAS, PER_REPLICA))
    for _ in range(steps):
        state, metrics = step(state, batch, jax.random.key(1))
    return state, metrics


@pytest.mark.parametrize("how", ["shard_map", "vmap"])
def test_linen_train_step_takes_local_gradients(how):
    assert global_reference_differs() > 1e-3
    state, metrics = run_linen(Linear(), how)
    w, b = reference()
    np.testing.assert_allclose(state.params["Dense_0"]["kernel"], w,
                               rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(state.params["Dense_0"]["bias"], b,
                               rtol=2e-5, atol=2e-6)
    assert np.shape(metrics["loss"]) == ()


def test_linen_batch_stats_are_the_mean_of_the_replicas():
    state, _ = run_linen(NormThenLinear(), "shard_map", steps=1)
    x = problem()[0].astype(np.float64).reshape(REPLICAS, PER_REPLICA, DIM)
    means, variances = x.mean(1), x.var(1)  # per replica, biased variance
    stats = state.batch_stats["BatchNorm_0"]
    np.testing.assert_allclose(stats["mean"], 0.1 * means.mean(0), rtol=1e-5,
                               atol=1e-6)
    # The mean of the replicas' variances, not the global batch's variance.
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * variances.mean(0),
                               rtol=1e-5)
    assert np.max(np.abs(0.9 + 0.1 * x.reshape(-1, DIM).var(0)
                         - 0.9 - 0.1 * variances.mean(0))) > 1e-3


def test_linen_optimizer_without_the_axis_is_refused():
    plain = optax.with_extra_args_support(optax.sgd(LR))
    with pytest.raises(ValueError, match=r"differs across the replicas.*"
                       r"axis_name='data'"):
        run_linen(Linear(), "shard_map", optimizer=plain, steps=1)


# --------------------------------------------------------------------- NNX


class NNXModel(nnx.Module):
    def __init__(self, norm: bool):
        _, _, w, b = problem()
        self.norm = (nnx.BatchNorm(DIM, momentum=0.9, rngs=nnx.Rngs(0))
                     if norm else None)
        self.linear = nnx.Linear(DIM, CLASSES, rngs=nnx.Rngs(0))
        self.linear.kernel[...] = jnp.asarray(w)
        self.linear.bias[...] = jnp.asarray(b)

    def __call__(self, x):
        return self.linear(self.norm(x) if self.norm is not None else x)


def nnx_loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def run_nnx(norm, steps=STEPS):
    x, y, _, _ = problem()
    model = NNXModel(norm)
    optimizer = nnx.Optimizer(model, tx(), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def body(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads, grad_fn = sam_optax.nnx.value_and_grad(
            model, nnx_loss, x, y, axis_name="data")
        optimizer.update(model, grads, grad_fn=grad_fn, value=loss)
        return nnx.state((model, optimizer)), loss

    step = jax.jit(jax.shard_map(body, mesh=mesh(),
                                 in_specs=(P(), P("data"), P("data")),
                                 out_specs=(P(), P())))
    state = nnx.as_pure(state)
    for _ in range(steps):
        state, loss = step(state, x, y)
    model, _ = nnx.merge(graphdef, state)
    return model, loss


def test_nnx_value_and_grad_takes_local_gradients():
    model, loss = run_nnx(norm=False)
    w, b = reference()
    np.testing.assert_allclose(model.linear.kernel[...], w, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(model.linear.bias[...], b, rtol=2e-5, atol=2e-6)
    assert np.shape(loss) == ()


def test_nnx_batch_stats_are_the_mean_of_the_replicas():
    model, _ = run_nnx(norm=True, steps=1)
    x = problem()[0].astype(np.float64).reshape(REPLICAS, PER_REPLICA, DIM)
    np.testing.assert_allclose(model.norm.mean[...], 0.1 * x.mean(1).mean(0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.norm.var[...], 0.9 + 0.1 * x.var(1).mean(0),
                               rtol=1e-5)

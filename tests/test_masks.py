"""SAM-ON mask helpers on Flax Linen and NNX parameter trees, and a masked SAM
step against a float64 reference (norm over the selected leaves only)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sam_optax
from sam_optax import masks


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(4)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.LayerNorm(name="ln_f")(x)
        x = nn.Dense(4, name="prenorm_block")(x)   # not a norm layer
        return nn.Dense(2, name="head", use_bias=False)(x)


def linen_params():
    variables = LinenNet().init(jax.random.key(0), jnp.ones((2, 3)))
    return variables["params"], variables


def test_normalization_layers_on_linen_params():
    params, variables = linen_params()
    got = masks.normalization_layers(params)
    assert got == {
        "BatchNorm_0": {"bias": True, "scale": True},
        "Dense_0": {"bias": False, "kernel": False},
        "ln_f": {"bias": True, "scale": True},
        "prenorm_block": {"bias": False, "kernel": False},
        "head": {"kernel": False},
    }
    # The whole `variables` dict works too; the rule is by module, so the
    # batch statistics of a norm layer are selected as well.
    full = masks.normalization_layers(variables)
    assert full["batch_stats"]["BatchNorm_0"] == {"mean": True, "var": True}
    assert full["params"]["ln_f"] == {"bias": True, "scale": True}


def test_exclude_bias_and_norm_on_linen_params():
    params, _ = linen_params()
    assert masks.exclude_bias_and_norm(params) == {
        "BatchNorm_0": {"bias": False, "scale": False},
        "Dense_0": {"bias": False, "kernel": True},
        "ln_f": {"bias": False, "scale": False},
        "prenorm_block": {"bias": False, "kernel": True},
        "head": {"kernel": True},
    }


def test_pattern_names_norm_layers_without_scale():
    params = {"bn1": {"bias": jnp.zeros(2)}, "my_norm": {"offset": jnp.zeros(2)},
              "conv": {"kernel": jnp.zeros((2, 2))},
              "custom": {"gamma": jnp.zeros(2)}}
    assert masks.normalization_layers(params) == {
        "bn1": {"bias": True}, "my_norm": {"offset": True},
        "conv": {"kernel": False}, "custom": {"gamma": False}}
    assert masks.normalization_layers(params, pattern="custom")["custom"] == {
        "gamma": True}


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.out = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(self.bn(self.lin(x)))


def test_masks_on_nnx_state_and_sam_on_step():
    model = NNXNet(nnx.Rngs(0))
    model.eval()
    state = nnx.state(model, nnx.Param)
    flags = {tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path):
             leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
                 masks.normalization_layers(state))[0]}
    assert flags[("bn", "scale", "value")] is True
    assert flags[("bn", "bias", "value")] is True
    assert flags[("lin", "kernel", "value")] is False
    assert flags[("out", "bias", "value")] is False

    # SAM-ON on the NNX state: ε lives on the BatchNorm params only.
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    x = jnp.ones((5, 3))

    def loss_fn(params):
        return jnp.mean(nnx.merge(graphdef, params, rest)(x) ** 2)

    tx = sam_optax.sam(optax.sgd(1.0), rho=0.2,
                       mask=masks.normalization_layers)
    opt_state = tx.init(state)
    grads = jax.grad(loss_fn)(state)
    # grad_fn(p) = p and sgd(1): updates = −(w + ε).
    updates, opt_state = tx.update(
        grads, opt_state, state, grad_fn=lambda p: jax.tree.map(jnp.asarray, p))
    eps = jax.tree.map(lambda u, w: -np.asarray(u) - np.asarray(w), updates,
                       state)
    np.testing.assert_allclose(
        sam_optax.diagnostics(opt_state).perturbation_norm, 0.2, rtol=1e-5)
    for path, e in jax.tree_util.tree_flatten_with_path(eps)[0]:
        on_norm_layer = "bn" in jax.tree_util.keystr(path)
        assert np.abs(e).max() > 0 if on_norm_layer else np.all(e == 0), path


def test_sam_on_linen_matches_reference_of_masked_norm():
    """ε = ρ g_S/‖g_S‖ on the selected leaves S, 0 elsewhere; the update uses
    the perturbed gradient of every leaf."""
    params, _ = linen_params()
    x = jax.random.normal(jax.random.key(1), (6, 3))

    def loss_fn(p):
        out = LinenNet().apply({"params": p, "batch_stats": {
            "BatchNorm_0": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}}, x)
        return jnp.mean(out ** 2)

    rho, lr = 0.3, 0.1
    tx = sam_optax.sam(optax.sgd(lr), rho, mask=masks.normalization_layers)
    grads = jax.grad(loss_fn)(params)
    updates, _ = tx.update(grads, tx.init(params), params,
                           grad_fn=jax.grad(loss_fn))

    sel = masks.normalization_layers(params)
    g = jax.tree.map(lambda a: np.asarray(a, np.float64), grads)
    norm_s = np.sqrt(sum(np.sum(a ** 2) for a, k in zip(
        jax.tree.leaves(g), jax.tree.leaves(sel), strict=True) if k))
    eps = jax.tree.map(lambda a, k: rho * a / norm_s if k else 0.0 * a, g, sel)
    g_sam = jax.grad(loss_fn)(jax.tree.map(
        lambda p, e: p + jnp.asarray(e, jnp.float32), params, eps))
    for u, gs in zip(jax.tree.leaves(updates), jax.tree.leaves(g_sam),
                     strict=True):
        np.testing.assert_allclose(u, -lr * np.asarray(gs), rtol=1e-5, atol=1e-7)
    # Unselected leaves still move (the descent uses every leaf).
    assert np.abs(np.asarray(updates["Dense_0"]["kernel"])).max() > 0

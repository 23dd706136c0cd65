"""SAM-ON mask helpers on Flax Linen and NNX parameter trees, and a masked SAM
step against a float64 reference (norm over the selected leaves only)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
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


# ---------------------------------------------- the one mask concept

NESTED = {"bn": {"scale": jnp.ones(2), "bias": jnp.zeros(2)},
          "dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
# Flatten order: bn/bias, bn/scale, dense/bias, dense/kernel.


@pytest.mark.parametrize("true, false", [
    (True, False), (np.True_, np.False_), (np.array(True), np.array(False)),
    (jnp.asarray(True), jnp.asarray(False)),
])
def test_every_bool_form_is_a_python_bool(true, false):
    mask = {"bn": {"scale": true, "bias": false},
            "dense": {"kernel": true, "bias": true}}
    assert masks.leaf_flags(mask, NESTED) == [False, True, True, True]
    resolved = masks.resolve(lambda p: mask, NESTED)
    assert all(type(x) is bool for x in jax.tree.leaves(resolved))
    assert masks.resolve(resolved, NESTED) == resolved   # idempotent


def test_prefix_masks_broadcast_like_optax_masked():
    assert masks.leaf_flags({"dense": True, "bn": False}, NESTED) == [
        False, False, True, True]
    assert masks.resolve({"dense": np.True_, "bn": {"scale": True,
                                                    "bias": False}}, NESTED) == {
        "bn": {"scale": True, "bias": False},
        "dense": {"kernel": True, "bias": True}}
    assert masks.leaf_flags(True, NESTED) == [True] * 4
    assert masks.leaf_flags(None, NESTED) == [True] * 4
    assert masks.resolve(None, NESTED) is None
    # optax.masked takes the same prefix and selects the same leaves.
    ones = jax.tree.map(jnp.ones_like, NESTED)
    for prefix in ({"dense": True, "bn": False}, {"dense": False, "bn": True}):
        zeroed = optax.masked(optax.scale(0.0), prefix)
        updates, _ = zeroed.update(ones, zeroed.init(ones))
        assert [bool(np.all(u == 0)) for u in jax.tree.leaves(updates)] == (
            masks.leaf_flags(prefix, NESTED))
    # Trees without leaves.
    assert masks.leaf_flags({}, {}) == [] and masks.leaf_flags(True, {}) == []


def test_mask_that_is_no_prefix_names_the_argument_and_both_trees():
    with pytest.raises(ValueError, match=r"(?s)`adaptive` must match the params "
                       r"or be a prefix.*'dense'.*'conv'"):
        masks.leaf_flags({"conv": True, "bn": False}, NESTED, "adaptive")
    with pytest.raises(ValueError, match="`mask`"):
        masks.resolve({"a": True}, {"a": 1.0, "b": 2.0})
    with pytest.raises(ValueError, match="`mask`"):
        masks.resolve(lambda p: [True, False], NESTED)


@pytest.mark.parametrize("leaf, shown", [
    (1, "int 1"), (0.0, "float 0.0"), ("no", "str 'no'"), (None, None),
    (np.ones(2, bool), "shape (2,)"), (jnp.asarray(1.0), "dtype float32"),
])
def test_leaves_that_are_not_bools_are_refused_with_their_path(leaf, shown):
    mask = {"dense": leaf, "bn": True}
    if leaf is None:  # None is an empty subtree: no longer a prefix
        with pytest.raises(ValueError, match="prefix"):
            masks.leaf_flags(mask, NESTED)
        return
    with pytest.raises(ValueError, match=r"`mask` leaves must be bools.*"
                       r"\['dense'\] is .*" + re.escape(shown)):
        masks.check(mask)
    with pytest.raises(ValueError, match=r"\['dense'\]"):
        masks.leaf_flags(lambda p: mask, NESTED)


def test_traced_mask_is_refused_with_the_fix():
    value_mask = lambda p: jax.tree.map(lambda x: jnp.all(x > 0), p)  # noqa: E731
    # Eager, the mask is concrete: fine.
    assert masks.leaf_flags(value_mask, NESTED) == [False, True, False, True]
    with pytest.raises(ValueError, match=r"(?s)`mask` must be static.*\['bn'\]"
                       r"\['bias'\].*traced.*x.ndim > 1"):
        jax.jit(lambda p: masks.leaf_flags(value_mask, p) and p)(NESTED)
    # Concrete arithmetic on shapes stays concrete while jit traces.
    shape_mask = lambda p: jax.tree.map(  # noqa: E731
        lambda x: jnp.asarray(x.shape).prod() > 2, p)
    seen = []
    jax.jit(lambda p: seen.append(masks.leaf_flags(shape_mask, p)) or 0)(NESTED)
    assert seen == [[False, False, True, True]]


def test_check_at_construction_leaves_callables_for_later():
    masks.check(None)
    masks.check(lambda p: 1)     # checked once params are known
    masks.check({"a": np.True_, "b": jnp.asarray(False)})
    with pytest.raises(ValueError, match="`adaptive`"):
        masks.check({"a": 1}, "adaptive")

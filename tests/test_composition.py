"""`sam` composed with Optax: chain, masked, multi_transform, MultiSteps,
apply_if_finite, clipping and weight decay, extra arguments, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sam_steps import iterate

import sam_optax

TARGET = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([0.3])}


def loss_fn(p, batch=1.0):
    return batch * (jnp.sum((p["w"] - TARGET["w"]) ** 2 * jnp.array([1.0, 3.0, 0.5]))
                    + jnp.sum((p["b"] - TARGET["b"]) ** 2))


PARAMS = {"w": jnp.zeros(3), "b": jnp.zeros(1)}


def run(tx, steps=4, params=PARAMS, batches=None):
    batches = batches if batches is not None else [1.0] * steps
    history, state = iterate(tx, loss_fn, params,
                             batches=[jnp.float32(b) for b in batches])
    return history[-1], state


def manual_sam(base, rho, batches, params=PARAMS):
    """SAM written out by hand around `base`, for comparisons."""
    state = base.init(params)
    for b in batches:
        lf = lambda p: loss_fn(p, b)
        g = jax.grad(lf)(params)
        n = optax.tree.norm(g)
        eps = jax.tree.map(lambda x: rho * x / n, g)
        g_sam = jax.grad(lf)(jax.tree.map(jnp.add, params, eps))
        u, state = base.update(g_sam, state, params)
        params = optax.apply_updates(params, u)
    return params


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def test_inside_chain_with_a_following_transformation():
    tx = optax.chain(sam_optax.sam(optax.identity(), 0.1), optax.sgd(0.1))
    params, _ = run(tx)
    assert_trees_close(params, manual_sam(optax.sgd(0.1), 0.1, [1.0] * 4))


def test_masked_and_multi_transform_as_base():
    mask = {"w": True, "b": False}
    base = optax.masked(optax.sgd(0.1), mask)
    params, _ = run(sam_optax.sam(base, 0.1))
    assert_trees_close(params, manual_sam(base, 0.1, [1.0] * 4))

    labels = {"w": "fast", "b": "slow"}
    base = optax.multi_transform({"fast": optax.adam(0.05), "slow": optax.sgd(0.01)},
                                 labels)
    params, _ = run(sam_optax.sam(base, 0.1))
    assert_trees_close(params, manual_sam(base, 0.1, [1.0] * 4))


def test_sam_inside_masked_raises_with_the_fix():
    tx = optax.masked(sam_optax.sam(optax.sgd(0.1), 0.1), {"w": True, "b": False})
    with pytest.raises(TypeError, match="sam_optax.sam\\(optax.masked"):
        run(tx, steps=1)


def test_sam_inside_multi_transform_raises_with_the_fix():
    tx = optax.multi_transform(
        {"sam": sam_optax.sam(optax.sgd(0.1), 0.1), "plain": optax.sgd(0.1)},
        {"w": "sam", "b": "plain"})
    with pytest.raises(TypeError, match="optax.multi_transform"):
        run(tx, steps=1)


def test_multisteps_accumulates_sam_gradients_of_each_micro_batch():
    k = 3
    batches = [1.0, 2.0, 0.5, 1.5, 1.0, 3.0]
    tx = sam_optax.sam(optax.MultiSteps(optax.sgd(0.1), every_k_schedule=k), 0.1)
    params, _ = run(tx, batches=batches)

    # Reference: each micro-batch its own ε at the *same* params; mean of g_sam.
    ref = PARAMS
    for start in range(0, len(batches), k):
        acc = jax.tree.map(jnp.zeros_like, ref)
        for b in batches[start:start + k]:
            lf = lambda p: loss_fn(p, b)
            g = jax.grad(lf)(ref)
            eps = jax.tree.map(lambda x: 0.1 * x / optax.tree.norm(g), g)
            g_sam = jax.grad(lf)(jax.tree.map(jnp.add, ref, eps))
            acc = jax.tree.map(lambda a, x: a + x / k, acc, g_sam)
        ref = jax.tree.map(lambda p, a: p - 0.1 * a, ref, acc)
    assert_trees_close(params, ref)


def test_apply_if_finite_both_ways():
    inner = sam_optax.sam(optax.sgd(0.1), 0.1)
    params, state = run(optax.apply_if_finite(inner, max_consecutive_errors=3))
    assert_trees_close(params, manual_sam(optax.sgd(0.1), 0.1, [1.0] * 4))
    params, _ = run(sam_optax.sam(optax.apply_if_finite(optax.sgd(0.1), 3), 0.1))
    assert_trees_close(params, manual_sam(optax.sgd(0.1), 0.1, [1.0] * 4))

    # A NaN loss is skipped by the wrapper, not turned into NaN params.
    tx = optax.apply_if_finite(sam_optax.sam(optax.sgd(0.1), 0.1), 3)
    params, state = run(tx, batches=[1.0, float("nan"), 1.0])
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
    assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 1


def test_clipping_and_weight_decay_in_base_see_the_sam_gradient():
    base = optax.chain(optax.clip_by_global_norm(0.5), optax.add_decayed_weights(0.1),
                       optax.sgd(0.1))
    params, _ = run(sam_optax.sam(base, 0.2))
    assert_trees_close(params, manual_sam(base, 0.2, [1.0] * 4))


def test_clipping_before_sam_only_touches_the_first_gradient():
    """Documented pitfall: a clip placed *before* `sam` in a chain rescales
    only g, whose direction (hence ε) a global-norm clip does not change;
    g_sam reaches the base optimizer unclipped."""
    clipped_before, _ = run(optax.chain(optax.clip_by_global_norm(1e-3),
                                        sam_optax.sam(optax.sgd(0.1), 0.2)))
    plain, _ = run(sam_optax.sam(optax.sgd(0.1), 0.2))
    clipped_inside, _ = run(sam_optax.sam(
        optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(0.1)), 0.2))
    assert_trees_close(clipped_before, plain)
    assert optax.tree.norm(jax.tree.map(jnp.subtract, clipped_inside, plain)) > 0.1


def test_extra_args_reach_base_tx_when_it_accepts_them():
    seen = {}

    def update(updates, state, params=None, *, value=None, **extra):
        seen["value"] = value
        seen["extra"] = sorted(extra)
        return updates, state

    base = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    tx = sam_optax.sam(base, 0.1)
    g = jax.grad(loss_fn)(PARAMS)
    tx.update(g, tx.init(PARAMS), PARAMS, grad_fn=jax.grad(loss_fn), value=3.0,
              other="x")
    assert seen == {"value": 3.0, "extra": ["other"]}
    # A base without extra-args support just ignores them.
    plain = sam_optax.sam(optax.sgd(0.1), 0.1)
    plain.update(g, plain.init(PARAMS), PARAMS, grad_fn=jax.grad(loss_fn), value=1.0)


@pytest.mark.parametrize("rho", [-0.1, float("nan"), float("inf"), "0.1", None,
                                 True, np.ones(2)])
def test_bad_rho(rho):
    with pytest.raises(ValueError, match="rho"):
        sam_optax.sam(optax.sgd(0.1), rho=rho)


@pytest.mark.parametrize("base", [None, "sgd", optax.sgd, 0.1])
def test_bad_base_tx(base):
    with pytest.raises(TypeError, match="base_tx"):
        sam_optax.sam(base, rho=0.1)


def test_missing_grad_fn_shows_the_fix():
    tx = sam_optax.sam(optax.sgd(0.1))
    g = jax.grad(loss_fn)(PARAMS)
    with pytest.raises(TypeError, match=r"grad_fn=jax.grad\(loss_fn\)"):
        tx.update(g, tx.init(PARAMS), PARAMS)
    with pytest.raises(ValueError, match="params"):
        tx.update(g, tx.init(PARAMS), None, grad_fn=jax.grad(loss_fn))


def test_grad_fn_with_wrong_structure_or_shape():
    tx = sam_optax.sam(optax.sgd(0.1))
    g = jax.grad(loss_fn)(PARAMS)
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match=r"(?s)params:.*grad_fn gave:"):
        tx.update(g, state, PARAMS, grad_fn=lambda p: [p["w"], p["b"]])
    with pytest.raises(ValueError, match=r"\['w'\].*shape \(2,\)"):
        tx.update(g, state, PARAMS,
                  grad_fn=lambda p: {"w": p["w"][:2], "b": p["b"]})
    with pytest.raises(ValueError, match="grads"):
        tx.update({"w": g["w"]}, state, PARAMS, grad_fn=jax.grad(loss_fn))
    with pytest.raises(ValueError, match="scalar loss"):
        tx.update(g, state, PARAMS, grad_fn=lambda p: (jnp.ones(2), p))


def test_bad_axis_arguments():
    with pytest.raises(ValueError, match="axis_name"):
        sam_optax.sam(optax.sgd(0.1), axis_name=3)
    with pytest.raises(ValueError, match="sync_perturbation"):
        sam_optax.sam(optax.sgd(0.1), sync_perturbation=True)


VARIANT_NAMES = ["asam", "fisher_sam", "friendly_sam", "vasso", "random_sam",
                 "multistep_sam", "esam", "gsam", "wsam", "looksam",
                 "every_k_sam", "ae_sam", "msam"]


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_every_variant_shares_sams_keyword_options(name):
    """Written once in `variants._shares_sam_options`, visible everywhere."""
    import inspect

    constructor = getattr(sam_optax, name)
    params = inspect.signature(constructor).parameters
    for option in ("axis_name", "sync_perturbation", "perturbation_axis_name",
                   "perturbation_axis_index_groups", "full_diagnostics"):
        assert params[option].kind is inspect.Parameter.KEYWORD_ONLY, option
    assert "options" not in params
    with pytest.raises(TypeError, match="bogus"):
        constructor(optax.sgd(0.1), bogus=1)
    with pytest.raises(ValueError, match="sync_perturbation"):
        constructor(optax.sgd(0.1), sync_perturbation=True)


def test_full_diagnostics_and_inject_hyperparams_on_a_variant():
    tx = optax.inject_hyperparams(sam_optax.gsam)(
        base_tx=optax.sgd(0.1), rho=0.1, alpha=0.2, full_diagnostics=True)
    params, state = run(tx, steps=2)
    assert float(sam_optax.diagnostics(state).cosine) > 0.0
    lean = sam_optax.gsam(optax.sgd(0.1), 0.1, 0.2)
    _, lean_state = run(lean, steps=2)
    assert float(sam_optax.diagnostics(lean_state).cosine) == 0.0

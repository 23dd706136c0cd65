"""Flax Linen: TrainState forwarding and the train-step builder's policies."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state as flax_train_state

import sam_optax
from sam_optax import linen

RHO, LR = 0.1, 0.05


class Net(nn.Module):
    """Dense -> BatchNorm -> relu -> Dropout -> Dense: stats and masks matter."""

    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(6)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
        return nn.Dense(1)(x)


def _data():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 1)), jnp.float32)
    return x, y


# `apply_fn` is a static field: one bound method for every state, so that a
# jitted step compiles once per policy across the tests.
MODEL = Net()


def _state(tx):
    x, _ = _data()
    variables = MODEL.init(jax.random.key(0), x, train=False)
    return linen.TrainState.create(apply_fn=MODEL.apply,
                                   params=variables["params"],
                                   batch_stats=variables["batch_stats"], tx=tx)


def loss_fn(apply, batch):
    x, y = batch
    pred = apply(x, train=True)
    return jnp.mean((pred - y) ** 2), {"mean_pred": jnp.mean(pred)}


@jax.jit
def _pass(params, stats, batch, dropout_rng):
    """One training forward pass by hand: (loss, new stats), grads."""
    def f(p):
        pred, mutated = Net().apply({"params": p, "batch_stats": stats},
                                    batch[0], train=True, mutable=["batch_stats"],
                                    rngs={"dropout": dropout_rng})
        return jnp.mean((pred - batch[1]) ** 2), mutated["batch_stats"]
    return jax.value_and_grad(f, has_aux=True)(params)


def _np_norm(tree):
    return np.sqrt(sum(np.sum(a ** 2) for a in jax.tree.leaves(tree)))


def _reference_run(state, batch, key, steps, *, key_policy, stats_policy,
                   ascent_steps=1):
    """SAM + SGD by hand; ε and the update in float64 NumPy.

    ``ascent_steps > 1``: Foret et al.'s multi-step ascent (App. C.6) with
    step size 1/n and projection on the ρ-ball; every pass at a perturbed
    point starts from the stored statistics and uses the perturbed key, and
    ``"perturbed"`` keeps the statistics of the last pass (at ``w + ε_n``).
    """
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), state.params)
    stats = state.batch_stats
    as32 = functools.partial(jax.tree.map,
                             lambda a: jnp.asarray(a, jnp.float32))
    as64 = functools.partial(jax.tree.map, lambda a: np.asarray(a, np.float64))
    for t in range(steps):
        clean_key = jax.random.fold_in(jax.random.fold_in(key, t), 0)
        pert_key = (clean_key if key_policy == "same"
                    else jax.random.fold_in(clean_key, 1))
        (_, clean_stats), g = _pass(as32(params), stats, batch, clean_key)
        g = as64(g)
        norm = _np_norm(g)
        eps = jax.tree.map(lambda gi: RHO * gi / norm, g)
        for _ in range(ascent_steps - 1):
            _, g_k = _pass(as32(jax.tree.map(np.add, params, eps)), stats,
                           batch, pert_key)
            g_k = as64(g_k)
            step_k = RHO / ascent_steps / _np_norm(g_k)  # α = 1/n
            eps = jax.tree.map(lambda e, gi: e + step_k * gi, eps, g_k)
            shrink = min(1.0, RHO / _np_norm(eps))  # back on the ρ-ball
            eps = jax.tree.map(lambda e: e * shrink, eps)
        perturbed = jax.tree.map(np.add, params, eps)
        (_, pert_stats), g_sam = _pass(as32(perturbed), stats, batch, pert_key)
        params = jax.tree.map(lambda w, gs: w - LR * np.asarray(gs, np.float64),
                              params, g_sam)
        stats = clean_stats if stats_policy == "clean" else pert_stats
    return params, stats


def _assert_close(actual, expected, rtol=2e-5, atol=2e-6):
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64),
                                   np.asarray(b, np.float64), rtol=rtol, atol=atol)


# One optimizer object and one jitted step per policy, shared by the tests:
# `tx` is a static field of the state, so sharing it avoids recompiling.
SAM_TX = sam_optax.sam(optax.sgd(LR), rho=RHO)


@functools.cache
def _step(stats_policy, key_policy):
    return jax.jit(linen.train_step(loss_fn, batch_stats=stats_policy,
                                    dropout_key=key_policy))


@pytest.mark.parametrize("stats_policy,key_policy",
                         [("clean", "same"), ("perturbed", "same"),
                          ("clean", "folded")])
def test_builder_matches_hand_written_reference(stats_policy, key_policy):
    state = _state(SAM_TX)
    batch, key = _data(), jax.random.key(42)
    step = _step(stats_policy, key_policy)
    expected_params, expected_stats = _reference_run(
        state, batch, key, 3, key_policy=key_policy, stats_policy=stats_policy)
    for _ in range(3):
        state, metrics = step(state, batch, key)
    _assert_close(state.params, expected_params)
    _assert_close(state.batch_stats, expected_stats)
    assert set(metrics) == {"loss", "mean_pred"}
    assert int(state.step) == 3
    assert step._cache_size() == 1  # no retracing across steps


def test_perturbed_batch_stats_with_multi_step_ascent():
    """``grad_fn`` is called twice per step (at w + ε_1, then w + ε_2): the
    statistics kept are those of the last pass, each pass starting from the
    stored statistics (never from the previous pass's)."""
    tx = sam_optax.multistep_sam(optax.sgd(LR), rho=RHO, steps=2)
    state = _state(tx)
    batch, key = _data(), jax.random.key(5)
    step = jax.jit(linen.train_step(loss_fn, batch_stats="perturbed"))
    expected_params, expected_stats = _reference_run(
        state, batch, key, 2, key_policy="same", stats_policy="perturbed",
        ascent_steps=2)
    for _ in range(2):
        state, _ = step(state, batch, key)
    _assert_close(state.params, expected_params)
    _assert_close(state.batch_stats, expected_stats)
    # The test can fail: the first ascent point's statistics differ.
    one_step, _ = _reference_run(_state(tx), batch, key, 2, key_policy="same",
                                 stats_policy="perturbed")
    diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                        one_step, expected_params)
    assert max(jax.tree.leaves(diff)) > 1e-5


def test_batch_stats_equal_clean_pass_alone():
    state = _state(SAM_TX)
    batch, key = _data(), jax.random.key(7)
    new_state, metrics = _step("clean", "same")(state, batch, key)
    clean_key = jax.random.fold_in(jax.random.fold_in(key, 0), 0)
    (loss, clean_stats), _ = _pass(state.params, state.batch_stats, batch,
                                   clean_key)
    _assert_close(new_state.batch_stats, clean_stats, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    # The perturbed pass's statistics differ: the policy is observable.
    perturbed_state, _ = _step("perturbed", "same")(state, batch, key)
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                        perturbed_state.batch_stats, new_state.batch_stats)
    assert max(jax.tree.leaves(diff)) > 1e-6


def test_dropout_key_policy_is_observable():
    state = _state(SAM_TX)
    batch, key = _data(), jax.random.key(3)
    same, _ = _step("clean", "same")(state, batch, key)
    folded, _ = _step("clean", "folded")(state, batch, key)
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                        same.params, folded.params)
    assert max(jax.tree.leaves(diff)) > 1e-6


def test_model_without_batch_stats():
    model = nn.Dense(1)
    x, y = _data()
    state = linen.TrainState.create(
        apply_fn=model.apply, params=model.init(jax.random.key(0), x)["params"],
        tx=sam_optax.sam(optax.sgd(LR), rho=RHO))

    def mse(apply, batch):
        return jnp.mean((apply(batch[0]) - batch[1]) ** 2)

    new_state, metrics = jax.jit(linen.train_step(mse))(state, (x, y),
                                                         jax.random.key(0))
    assert new_state.batch_stats is None and set(metrics) == {"loss"}
    loss = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
    g = jax.grad(loss)(state.params)
    norm = optax.tree.norm(g)
    g_sam = jax.grad(loss)(jax.tree.map(lambda w, gi: w + RHO * gi / norm,
                                        state.params, g))
    _assert_close(new_state.params,
                  jax.tree.map(lambda w, gs: w - LR * gs, state.params, g_sam))


def _recording_tx(seen: dict) -> optax.GradientTransformationExtraArgs:
    """An identity transformation that records the extra arguments it got."""
    def update(updates, state, params=None, **extra):
        seen.update(extra)
        return updates, state

    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(),
                                                 update)


def test_apply_gradients_forwards_extra_args_and_replaces_fields():
    seen = {}
    state = _state(_recording_tx(seen))
    new_stats = jax.tree.map(jnp.zeros_like, state.batch_stats)
    grads = jax.tree.map(jnp.ones_like, state.params)
    marker = object()
    new_state = state.apply_gradients(grads=grads, grad_fn=marker, value=1.5,
                                      batch_stats=new_stats)
    assert seen == {"grad_fn": marker, "value": 1.5}
    assert new_state.batch_stats is new_stats and int(new_state.step) == 1


def test_apply_gradients_refuses_unknown_keywords():
    """A misspelt field used to go to `tx.update` and be dropped silently."""
    state = _state(SAM_TX)
    grads = jax.tree.map(jnp.ones_like, state.params)
    with pytest.raises(TypeError, match=(
            r"(?s)\['batch_stat'\].*'batch_stats' for 'batch_stat'.*"
            r"`grads`, `grad_fn`, `value`, `extra_args`.*'batch_stats'")):
        state.apply_gradients(grads=grads, grad_fn=jax.grad(lambda p: 0.0),
                              batch_stat=state.batch_stats)
    with pytest.raises(TypeError, match="set by the step itself"):
        state.apply_gradients(grads=grads, opt_state=state.opt_state)


def test_apply_gradients_extra_args_reach_tx_update():
    seen = {}
    state = _state(_recording_tx(seen))
    grads = jax.tree.map(jnp.ones_like, state.params)
    state.apply_gradients(grads=grads, extra_args={"loss_scale": 2.0})
    assert seen == {"loss_scale": 2.0}


def test_flax_train_state_error_names_the_drop_in():
    """Flax's own TrainState never passes `grad_fn`: the error must point to
    `sam_optax.linen.TrainState`, not only to `tx.update`."""
    state = _state(SAM_TX)
    flax_state = flax_train_state.TrainState.create(
        apply_fn=state.apply_fn, params=state.params, tx=SAM_TX)
    grads = jax.tree.map(jnp.ones_like, state.params)
    with pytest.raises(TypeError, match="sam_optax.linen.TrainState"):
        flax_state.apply_gradients(grads=grads)


OWG = flax_train_state.OVERWRITE_WITH_GRADIENT


def test_overwrite_with_gradient_collection():
    """Flax's convention: the `overwrite_with_gradient` leaves receive their
    gradient; only `params['params']` is optimized and perturbed (ε's norm
    over it alone), and `grad_fn` takes and returns the whole variables."""
    rng = np.random.default_rng(1)
    w0, s0, target = (rng.normal(size=3) for _ in range(3))

    def loss(variables):  # L = ½‖w ⊙ s − t‖², s in the overwrite collection
        w, s = variables["params"]["w"], variables[OWG]["s"]
        return 0.5 * jnp.sum((w * s - target) ** 2)

    variables = {"params": {"w": jnp.asarray(w0, jnp.float32)},
                 OWG: {"s": jnp.asarray(s0, jnp.float32)}}
    state = linen.TrainState.create(apply_fn=None, params=variables,
                                    tx=sam_optax.sam(optax.sgd(LR), rho=RHO))
    grads = jax.grad(loss)(state.params)
    new = state.apply_gradients(grads=grads,
                                grad_fn=jax.value_and_grad(loss))
    g = (w0 * s0 - target) * s0  # float64 reference
    eps = RHO * g / np.linalg.norm(g)
    g_sam = ((w0 + eps) * s0 - target) * s0
    np.testing.assert_allclose(new.params["params"]["w"], w0 - LR * g_sam,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(new.params[OWG]["s"], grads[OWG]["s"])
    np.testing.assert_allclose(  # the perturbation used params['params'] only
        sam_optax.diagnostics(new.opt_state).perturbation_norm, RHO, rtol=1e-6)


def test_plain_optax_state_ignores_grad_fn():
    state = _state(optax.adam(1e-2))
    flax_state = flax_train_state.TrainState.create(
        apply_fn=state.apply_fn, params=state.params, tx=optax.adam(1e-2))
    grads = jax.tree.map(jnp.ones_like, state.params)
    ours = state.apply_gradients(grads=grads, grad_fn=lambda p: grads)
    theirs = flax_state.apply_gradients(grads=grads)
    _assert_close(ours.params, theirs.params, rtol=0, atol=0)


def test_sam_without_grad_fn_gives_core_error():
    state = _state(SAM_TX)
    grads = jax.tree.map(jnp.ones_like, state.params)
    with pytest.raises(TypeError, match="grad_fn"):
        state.apply_gradients(grads=grads)


def test_bad_policies_raise():
    with pytest.raises(ValueError, match="batch_stats"):
        linen.train_step(loss_fn, batch_stats="average")
    with pytest.raises(ValueError, match="dropout_key"):
        linen.train_step(loss_fn, dropout_key="new")


def test_perturbed_stats_with_conditional_schedule_raises():
    every_other = sam_optax.Schedule(
        init=lambda params: (),
        decide=lambda grads, state, *, count: (count % 2 == 0, state),
        uses_grads=False)
    ascent = sam_optax.ascent.normalized_ascent()
    tx = sam_optax.sharpness_aware(optax.sgd(LR), RHO, ascent=ascent,
                                   descent=sam_optax.descent.sam_gradient(),
                                   schedule=every_other)
    state = _state(tx)
    step = jax.jit(linen.train_step(loss_fn, batch_stats="perturbed"))
    with pytest.raises(ValueError, match="every step"):
        step(state, _data(), jax.random.key(0))

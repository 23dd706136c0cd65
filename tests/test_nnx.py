"""Flax NNX: nnx.Optimizer with SAM, grad_fn built from (model, loss_fn, batch)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sam_optax

RHO, LR = 0.1, 0.05


class Net(nnx.Module):
    """Linear -> BatchNorm -> relu -> Dropout -> Linear: stats and masks matter."""

    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 6, rngs=rngs)
        self.norm = nnx.BatchNorm(6, momentum=0.5, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(6, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(nnx.relu(self.norm(self.hidden(x)))))


def _model():
    return Net(nnx.Rngs(0, dropout=1))


def _data():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.normal(size=(16, 4)), jnp.float32),
            jnp.asarray(rng.normal(size=(16, 1)), jnp.float32))


def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def _pure(model, filt):
    return nnx.as_pure(nnx.state(model, filt))


def _assert_close(actual, expected, rtol=2e-5, atol=2e-6):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64),
                                   np.asarray(b, np.float64), rtol=rtol, atol=atol)


def _reference_step(model, x, y, *, key_policy="same"):
    """One SAM + SGD step by hand on split/merge copies; ε in float64 NumPy.

    Returns the new params, the state after the clean pass alone (batch stats,
    RNG counts) and the clean loss.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)

    def loss_and_state(p, r):
        copy = nnx.merge(graphdef, p, r)
        return loss_fn(copy, x, y), (_pure(copy, nnx.BatchStat),
                                     _pure(copy, nnx.RngCount))

    (loss, after_clean), g = jax.value_and_grad(loss_and_state, has_aux=True)(
        params, rest)
    g64 = jax.tree.map(lambda a: np.asarray(a, np.float64), g)
    norm = np.sqrt(sum(np.sum(a ** 2) for a in jax.tree.leaves(g64)))
    perturbed = jax.tree.map(
        lambda w, gi: jnp.asarray(np.asarray(w, np.float64) + RHO * gi / norm,
                                  jnp.float32), params, g64)
    pert_rest = rest
    if key_policy == "folded":
        keys = nnx.as_pure(nnx.state(model, nnx.RngKey))
        pert_rest = nnx.merge_state(
            rest, jax.tree.map(lambda k: jax.random.fold_in(k, 1), keys))
    _, g_sam = jax.value_and_grad(loss_and_state, has_aux=True)(perturbed,
                                                                pert_rest)
    new_params = jax.tree.map(
        lambda w, gs: np.asarray(w, np.float64) - LR * np.asarray(gs, np.float64),
        params, g_sam)
    return new_params, after_clean, loss


# "folded" follows the same code path with other keys (observable below).
@pytest.mark.parametrize("key_policy", ["same"])
def test_optimizer_step_matches_reference(key_policy):
    model = _model()
    optimizer = nnx.Optimizer(model, sam_optax.sam(optax.sgd(LR), rho=RHO),
                              wrt=nnx.Param)
    x, y = _data()
    traces = []

    @nnx.jit
    def train_step(model, optimizer, x, y):
        traces.append(None)  # runs once per compilation
        loss, grads, grad_fn = sam_optax.nnx.value_and_grad(
            model, loss_fn, x, y, dropout_key=key_policy)
        optimizer.update(model, grads, grad_fn=grad_fn, value=loss)
        return loss

    for _ in range(3):
        expected_params, after_clean, expected_loss = _reference_step(
            model, x, y, key_policy=key_policy)
        loss = train_step(model, optimizer, x, y)
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
        _assert_close(_pure(model, nnx.Param), expected_params)
        # BatchStat and RNG counters are exactly those of the clean pass alone.
        clean_stats, clean_counts = after_clean
        _assert_close(_pure(model, nnx.BatchStat), clean_stats,
                      rtol=1e-6, atol=1e-7)
        _assert_close(_pure(model, nnx.RngCount), clean_counts, rtol=0, atol=0)
    assert len(traces) == 1  # no retracing across steps
    assert int(optimizer.step[...]) == 3
    diagnostics = sam_optax.diagnostics(nnx.as_pure(optimizer.opt_state))
    np.testing.assert_allclose(diagnostics.perturbation_norm, RHO, rtol=1e-5)
    assert float(diagnostics.perturbed_loss) > 0.0


def test_perturbed_pass_does_not_mutate_model():
    model = _model()
    x, y = _data()
    def snapshot():
        return (_pure(model, nnx.BatchStat), _pure(model, nnx.RngCount),
                jax.tree.map(jax.random.key_data, _pure(model, nnx.RngKey)))

    before = snapshot()
    for policy in ("same", "folded"):
        grad_fn = sam_optax.nnx.grad_fn(model, loss_fn, x, y, dropout_key=policy)
        params = _pure(model, nnx.Param)
        value, grads = grad_fn(jax.tree.map(lambda w: w + 0.01, params))
        assert jnp.isfinite(value)
        assert jax.tree.structure(grads) == jax.tree.structure(params)
        _assert_close(snapshot(), before, rtol=0, atol=0)


def test_same_key_reproduces_clean_gradient_at_rho_zero():
    # At w + 0 with the same masks and statistics, the perturbed pass *is*
    # the clean pass; with a folded key the masks (hence gradients) differ.
    model = _model()
    x, y = _data()
    for policy, equal in (("same", True), ("folded", False)):
        copy = nnx.clone(model)
        loss, grads, grad_fn = sam_optax.nnx.value_and_grad(
            copy, loss_fn, x, y, dropout_key=policy)
        value, perturbed = grad_fn(_pure(copy, nnx.Param))
        same = all(np.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(
            jax.tree.leaves(nnx.as_pure(grads)), jax.tree.leaves(perturbed),
            strict=True))
        assert same == equal and bool(np.isclose(value, loss)) == equal


def test_has_aux_and_custom_wrt():
    model = _model()
    x, y = _data()

    def loss_with_aux(model, x, y):
        pred = model(x)
        return jnp.mean((pred - y) ** 2), {"mean": jnp.mean(pred)}

    only_out = nnx.All(nnx.Param, nnx.PathContains("out"))
    optimizer = nnx.Optimizer(model, sam_optax.sam(optax.sgd(LR), rho=RHO),
                              wrt=only_out)
    hidden_before = _pure(model.hidden, nnx.Param)
    (loss, aux), grads, grad_fn = sam_optax.nnx.value_and_grad(
        model, loss_with_aux, x, y, wrt=only_out, has_aux=True)
    optimizer.update(model, grads, grad_fn=grad_fn)
    assert set(aux) == {"mean"} and jnp.isfinite(loss)
    _assert_close(_pure(model.hidden, nnx.Param), hidden_before, rtol=0, atol=0)


def test_sam_without_grad_fn_gives_core_error():
    model = _model()
    optimizer = nnx.Optimizer(model, sam_optax.sam(optax.sgd(LR)), wrt=nnx.Param)
    grads = nnx.grad(loss_fn)(model, *_data())
    with pytest.raises(TypeError, match="grad_fn"):
        optimizer.update(model, grads)


def test_bad_dropout_key_raises():
    with pytest.raises(ValueError, match="dropout_key"):
        sam_optax.nnx.grad_fn(_model(), loss_fn, *_data(), dropout_key="new")


@pytest.mark.parametrize("helper", ["grad_fn", "value_and_grad"])
def test_misspelt_keyword_is_refused(helper):
    """Unlike a forwarding `**kwargs`, the helpers' keywords are explicit: a
    misspelt option (or a keyword meant for `loss_fn`) raises, never drops."""
    with pytest.raises(TypeError, match="dropout_keys"):
        getattr(sam_optax.nnx, helper)(_model(), loss_fn, *_data(),
                                       dropout_keys="folded")

"""ESAM's sharpness-sensitive data selection (SDS): ``esam(selection_ratio=)``.

The rule is checked against a float64 NumPy reference written from the paper
(Du et al. 2021, eq. 7-8, arXiv:2110.03141): a small MLP on scikit-learn's
digits, per-example cross-entropies and their gradients written out by hand,
the examples chosen by ``argsort``. Then the degenerate cases, the cost in
XLA FLOPs, retracing, dtypes and the argument errors.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import sam_optax

RHO = 0.1
LR = 0.1
MOMENTUM = 0.9
STEPS = 12
N = 40


# ------------------------------------------------------------------ problem

def _data():
    digits = load_digits()
    return digits.data[:N] / 16.0, digits.target[:N].astype(np.int64)


def _init():
    rng = np.random.RandomState(0)
    return {"W1": 0.3 * rng.randn(64, 16), "b1": 0.1 * rng.randn(16),
            "W2": 0.3 * rng.randn(16, 10), "b2": 0.1 * rng.randn(10)}


def example_loss_fn(params, batch):
    """Per-example cross-entropy of a tanh MLP, shape [n]."""
    h = jnp.tanh(batch["x"] @ params["W1"] + params["b1"])
    logits = h @ params["W2"] + params["b2"]
    picked = jnp.take_along_axis(logits, batch["y"][:, None], axis=1)[:, 0]
    return jax.nn.logsumexp(logits, axis=1) - picked


def mean_loss(params, batch):
    losses = example_loss_fn(params, batch)
    return jnp.mean(losses), losses


# -------------------------------------------------------- float64 reference

def np_example_losses(w, x, y):
    logits = np.tanh(x @ w["W1"] + w["b1"]) @ w["W2"] + w["b2"]
    top = logits.max(axis=1, keepdims=True)
    logsumexp = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return logsumexp - logits[np.arange(len(y)), y]


def np_mean_grad(w, x, y):
    """∇ of the mean cross-entropy over the rows given, by backpropagation."""
    h = np.tanh(x @ w["W1"] + w["b1"])
    logits = h @ w["W2"] + w["b2"]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    dz = p / len(y)
    da = (dz @ w["W2"].T) * (1.0 - h ** 2)
    return {"W1": x.T @ da, "b1": da.sum(axis=0),
            "W2": h.T @ dz, "b2": dz.sum(axis=0)}


def swp_masks(seed, beta, tree):
    """ESAM's key schedule (as ``stochastic_weight_perturbation`` documents
    it): ``key, draw = split(key)`` per step, one key per leaf in JAX's
    flatten order; the Bernoulli draws taken with JAX, the rule in NumPy."""
    key = jax.random.PRNGKey(seed)
    leaves, treedef = jax.tree.flatten(tree)
    while True:
        key, draw = jax.random.split(key)
        keys = jax.random.split(draw, len(leaves))
        yield treedef.unflatten([
            np.asarray(jax.random.bernoulli(k, beta, np.shape(x)), np.float64)
            for k, x in zip(keys, leaves)])


def reference_step(w, x, y, rule, k, mask=None, beta=1.0):
    """ε, the selected rows and g_sam of one ESAM step on (x, y)."""
    g = np_mean_grad(w, x, y)
    norm = math.sqrt(sum(float(np.sum(v ** 2)) for v in g.values()))
    eps = {n: (RHO * v / norm if norm > 0 else 0.0 * v) for n, v in g.items()}
    if mask is not None:
        eps = {n: mask[n] * v / beta for n, v in eps.items()}
    point = {n: w[n] + eps[n] for n in w}
    clean = np_example_losses(w, x, y)
    if rule == "sharpness":
        scores = np_example_losses(point, x, y) - clean
    else:
        scores = clean
    chosen = np.argsort(-scores, kind="stable")[:k]  # ties: lower index first
    return chosen, np_mean_grad(point, x[chosen], y[chosen])


def reference(rule, ratio, *, beta=1.0, seed=0, shards=1):
    """Params after each step, and the rows chosen at each step: SGD with
    momentum on g_sam (the mean over shards, each with its own ε and its own
    selection from its own rows)."""
    x, y = _data()
    w = _init()
    trace = {n: np.zeros_like(v) for n, v in w.items()}
    masks = swp_masks(seed, beta, w) if beta < 1 else None
    size = N // shards
    k = max(1, math.floor(ratio * size + 0.5))
    history, chosen_rows = [], []
    for _ in range(STEPS):
        mask = next(masks) if masks is not None else None
        grads, chosen_now = [], []
        for j in range(shards):
            rows = slice(j * size, (j + 1) * size)
            chosen, g_sam = reference_step(w, x[rows], y[rows], rule, k,
                                           mask, beta)
            grads.append(g_sam)
            chosen_now.append(chosen + j * size)
        g_sam = {n: sum(g[n] for g in grads) / shards for n in w}
        trace = {n: g_sam[n] + MOMENTUM * trace[n] for n in w}
        w = {n: w[n] - LR * trace[n] for n in w}
        history.append(w)
        chosen_rows.append(np.sort(np.concatenate(chosen_now)))
    return history, chosen_rows


# ----------------------------------------------------------------- JAX side

def sgdm():
    return optax.sgd(LR, momentum=MOMENTUM)


def sds_step(tx, *, pass_losses=True):
    def step(params, state, batch):
        (loss, losses), grads = jax.value_and_grad(mean_loss, has_aux=True)(
            params, batch)
        extra = {"example_losses": losses} if pass_losses else {}
        updates, state = tx.update(grads, state, params,
                                   example_loss_fn=example_loss_fn,
                                   batch=batch, value=loss, **extra)
        return optax.apply_updates(params, updates), state
    return step


def grad_fn_step(tx):
    def step(params, state, batch):
        grad_fn = jax.grad(lambda p: mean_loss(p, batch)[0])
        updates, state = tx.update(grad_fn(params), state, params,
                                   grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state
    return step


def run(tx, step, params=None, batch=None, steps=STEPS):
    x, y = _data()
    params = jax.tree.map(jnp.asarray, _init()) if params is None else params
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)} if batch is None else batch
    state = tx.init(params)
    step = jax.jit(step)
    history = []
    for _ in range(steps):
        params, state = step(params, state, batch)
        history.append(params)
    return history, state


def assert_history_close(got, expected, tol=1e-10):
    for step, (g, e) in enumerate(zip(got, expected, strict=True)):
        for name in e:
            np.testing.assert_allclose(np.asarray(g[name]), e[name], rtol=tol,
                                       atol=tol, err_msg=f"step {step} {name}")


def _distance(a, b):
    return max(float(np.max(np.abs(np.asarray(a[n]) - b[n]))) for n in b)


# ----------------------------------------------------- 1. float64 reference

@pytest.mark.parametrize("rule", ["sharpness", "loss"])
@pytest.mark.parametrize("ratio, pass_losses", [(0.5, True), (0.3, False)])
def test_matches_float64_reference(rule, ratio, pass_losses):
    expected, chosen = reference(rule, ratio)
    with jax.enable_x64(True):
        tx = sam_optax.esam(sgdm(), RHO, beta=1.0, selection_ratio=ratio,
                            selection=rule)
        got, _ = run(tx, sds_step(tx, pass_losses=pass_losses))
        assert got[-1]["W1"].dtype == jnp.float64
    assert_history_close(got, expected)
    # The selection matters: the full batch, and the other rule, end elsewhere
    # and pick other examples.
    full, _ = reference(rule, 1.0)
    assert _distance(got[-1], full[-1]) > 1e-4
    other = "loss" if rule == "sharpness" else "sharpness"
    other_history, other_chosen = reference(other, ratio)
    assert _distance(got[-1], other_history[-1]) > 1e-4
    assert any(not np.array_equal(a, b) for a, b in zip(chosen, other_chosen))
    assert all(len(c) == max(1, math.floor(ratio * N + 0.5)) for c in chosen)


def test_with_weight_perturbation_matches_float64_reference():
    with jax.enable_x64(True):  # the Bernoulli draws as the library's
        expected, _ = reference("sharpness", 0.5, beta=0.5, seed=3)
        tx = sam_optax.esam(sgdm(), RHO, beta=0.5, seed=3,
                            selection_ratio=0.5)
        got, _ = run(tx, sds_step(tx))
    assert_history_close(got, expected)
    without_swp, _ = reference("sharpness", 0.5)
    assert _distance(got[-1], without_swp[-1]) > 1e-4


@pytest.mark.parametrize("rule", ["sharpness", "loss"])
def test_selects_per_replica_under_axis_name(rule):
    """Each replica picks from its own local batch (and has its own ε); the
    perturbed gradients are averaged over replicas."""
    shards = 2
    expected, _ = reference(rule, 0.5, shards=shards)
    with jax.enable_x64(True):
        tx = sam_optax.esam(sgdm(), RHO, beta=1.0, selection_ratio=0.5,
                            selection=rule, axis_name="data")

        def shard_step(params, state, batch):
            (_, losses), grads = jax.value_and_grad(mean_loss, has_aux=True)(
                params, batch)
            updates, state = tx.update(grads, state, params,
                                       example_loss_fn=example_loss_fn,
                                       batch=batch, example_losses=losses)
            return optax.apply_updates(params, updates), state

        step = jax.vmap(shard_step, in_axes=(None, None, 0),
                        out_axes=(None, None), axis_name="data")
        x, y = _data()
        batch = {"x": jnp.asarray(x).reshape(shards, N // shards, -1),
                 "y": jnp.asarray(y).reshape(shards, N // shards)}
        got, _ = run(tx, step, batch=batch)
    assert_history_close(got, expected)


# ------------------------------------------------------ 2. degenerate cases

@pytest.mark.parametrize("rule, beta", [("sharpness", 1.0), ("loss", 1.0),
                                        ("sharpness", 0.6)])
def test_ratio_one_is_plain_esam(rule, beta):
    tx = sam_optax.esam(sgdm(), RHO, beta=beta, seed=1, selection_ratio=1.0,
                        selection=rule)
    got, _ = run(tx, sds_step(tx))
    plain = sam_optax.esam(sgdm(), RHO, beta=beta, seed=1)
    expected, _ = run(plain, grad_fn_step(plain))
    for g, e in zip(got, expected, strict=True):
        for name in e:
            np.testing.assert_array_equal(g[name], e[name])
    if beta == 1.0:
        # `esam(beta=1)` itself matches `sam` to the last float32 bit or so
        # (XLA fuses the two ε computations differently), not bit for bit.
        sam = sam_optax.sam(sgdm(), RHO)
        expected, _ = run(sam, grad_fn_step(sam))
        for g, e in zip(got, expected, strict=True):
            for name in e:
                np.testing.assert_allclose(g[name], e[name], rtol=1e-6,
                                           atol=1e-7)


def test_diagnostics_record_the_full_batch_perturbed_loss():
    """"sharpness" knows L(w + ε) on the whole batch for free; "loss" not."""
    x, y = _data()
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    params = jax.tree.map(jnp.asarray, _init())
    for rule in ("sharpness", "loss"):
        tx = sam_optax.esam(sgdm(), RHO, beta=1.0, selection_ratio=0.5,
                            selection=rule)
        _, state = run(tx, sds_step(tx), steps=1)
        diagnostics = sam_optax.diagnostics(state)
        loss = float(mean_loss(params, batch)[0])
        np.testing.assert_allclose(float(diagnostics.loss), loss, rtol=1e-6)
        if rule == "loss":
            assert float(diagnostics.perturbed_loss) == 0.0
            continue
        g = jax.grad(lambda p: mean_loss(p, batch)[0])(params)
        norm = optax.tree.norm(g)
        point = jax.tree.map(lambda w, v: w + RHO * v / norm, params, g)
        np.testing.assert_allclose(float(diagnostics.perturbed_loss),
                                   float(mean_loss(point, batch)[0]),
                                   rtol=1e-5)
        assert float(diagnostics.sharpness) > 0


# ------------------------------------------------------------ 3. the cost

def _mlp_problem(batch_size=256, sizes=(784, 512, 512, 10)):
    key = jax.random.PRNGKey(0)
    params = [{"w": jax.random.normal(jax.random.fold_in(key, i), (a, b))
               / math.sqrt(a), "b": jnp.zeros(b)}
              for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
    batch = {"x": jax.random.normal(key, (batch_size, sizes[0])),
             "y": jnp.arange(batch_size) % sizes[-1]}
    return params, batch


def _mlp_example_losses(params, batch):
    h = batch["x"]
    for layer in params[:-1]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    logits = h @ params[-1]["w"] + params[-1]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def _flops(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_flops_below_sam_and_within_the_derived_bound():
    """XLA's FLOPs of one step, relative to the base step (one
    ``value_and_grad`` and SGD). With F a full-batch forward pass and B its
    backward pass, base = F + B, SAM = 2(F + B), SDS "loss" = (1 + r)(F + B)
    and "sharpness" = (1 + r)(F + B) + F. For this MLP B ≈ 1.4F (the first
    layer needs no input gradient), so F/(F + B) ≈ 0.42 rather than ⅓."""
    params, batch = _mlp_problem()
    base_tx = sgdm()

    def loss(p, b):
        return jnp.mean(_mlp_example_losses(p, b))

    def base_step(p, s, b):
        updates, s = base_tx.update(jax.grad(loss)(p, b), s, p)
        return optax.apply_updates(p, updates), s

    def sam_step(tx):
        def step(p, s, b):
            grad_fn = jax.grad(lambda q: loss(q, b))
            updates, s = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
            return optax.apply_updates(p, updates), s
        return step

    def selection_step(tx):
        def step(p, s, b):
            losses, vjp = jax.vjp(lambda q: _mlp_example_losses(q, b), p)
            grads = vjp(jnp.full_like(losses, 1.0 / losses.shape[0]))[0]
            updates, s = tx.update(grads, s, p,
                                   example_loss_fn=_mlp_example_losses,
                                   batch=b, example_losses=losses)
            return optax.apply_updates(p, updates), s
        return step

    def ratio(step, tx):
        return _flops(step, params, tx.init(params), batch) / base

    base = _flops(base_step, params, base_tx.init(params), batch)
    forward = _flops(_mlp_example_losses, params, batch) / base  # F/(F + B)
    sam_tx = sam_optax.sam(base_tx, RHO)
    sam_ratio = ratio(sam_step(sam_tx), sam_tx)
    esam_tx = sam_optax.esam(base_tx, RHO)
    esam_ratio = ratio(sam_step(esam_tx), esam_tx)
    # SAM's and ESAM's own work (norms, ε, SWP's random bits) on top of the
    # gradients, at most:
    overhead = 0.07
    assert 2.0 <= sam_ratio <= 2.0 + overhead
    assert esam_ratio <= 2.0 + overhead
    measured = {}
    for rule in ("loss", "sharpness"):
        for r in (0.5, 0.25):
            tx = sam_optax.esam(base_tx, RHO, selection_ratio=r,
                                selection=rule)
            measured[rule, r] = ratio(selection_step(tx), tx)
            bound = 1.0 + r + (forward if rule == "sharpness" else 0.0)
            assert bound <= measured[rule, r] <= bound + overhead
            assert measured[rule, r] < sam_ratio
    assert measured["loss", 0.5] <= 1.6
    assert measured["loss", 0.5] < measured["sharpness", 0.5]
    print(f"\nFLOPs / base step (MLP 784-512-512-10, batch 256): "
          f"sam {sam_ratio:.3f}, esam {esam_ratio:.3f}, F/(F+B) "
          f"{forward:.3f}; " + ", ".join(
              f"{rule} r={r}: {v:.3f}" for (rule, r), v in measured.items()))


# --------------------------------------------------------- 4. robustness

def test_no_retracing_across_steps():
    traces = []
    tx = sam_optax.esam(sgdm(), RHO, selection_ratio=0.5)
    inner = sds_step(tx)

    def step(params, state, batch):
        traces.append(1)
        return inner(params, state, batch)

    _, state = run(tx, step, steps=5)
    assert len(traces) == 1
    assert int(state.count) == 5


@pytest.mark.parametrize("rule", ["sharpness", "loss"])
def test_bfloat16_params_give_finite_updates(rule):
    params = jax.tree.map(lambda v: jnp.asarray(v, jnp.bfloat16), _init())
    x, y = _data()
    batch = {"x": jnp.asarray(x, jnp.bfloat16), "y": jnp.asarray(y)}
    tx = sam_optax.esam(sgdm(), RHO, selection_ratio=0.5, selection=rule)
    history, state = run(tx, sds_step(tx), params=params, batch=batch,
                         steps=3)
    for leaf in jax.tree.leaves(history[-1]):
        assert leaf.dtype == jnp.bfloat16
        assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
    assert np.isfinite(float(sam_optax.diagnostics(state).grad_norm))


@pytest.mark.parametrize("rule", ["sharpness", "loss"])
def test_zero_gradient_gives_a_defined_step(rule):
    """At w = 0 the loss (x·w)² has zero gradient and zero per-example
    losses: ε = 0, every score ties, the step is exactly zero."""
    params = {"w": jnp.zeros(3)}
    batch = {"x": jnp.arange(12.0).reshape(4, 3)}

    def losses_fn(p, b):
        return (b["x"] @ p["w"]) ** 2

    tx = sam_optax.esam(sgdm(), RHO, selection_ratio=0.5, selection=rule)
    state = tx.init(params)
    grads = jax.grad(lambda p: jnp.mean(losses_fn(p, batch)))(params)
    updates, state = jax.jit(lambda g, s, p: tx.update(
        g, s, p, example_loss_fn=losses_fn, batch=batch))(grads, state, params)
    np.testing.assert_array_equal(updates["w"], np.zeros(3))
    diagnostics = sam_optax.diagnostics(state)
    assert float(diagnostics.perturbation_norm) == 0.0
    assert all(np.isfinite(float(v)) for v in diagnostics[:-1])


def test_ties_go_to_the_lower_index():
    """Equal clean losses: the "loss" rule takes the first k examples."""
    params = {"w": jnp.ones(2)}
    x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [5.0, 5.0]])
    batch = {"x": x}
    # Examples 0, 1, 2 tie (loss 1); example 3 is largest. k = 2: {3, 0}.
    losses_fn = lambda p, b: (b["x"] @ p["w"]) ** 2  # noqa: E731
    tx = sam_optax.esam(optax.sgd(1.0), 0.0, selection_ratio=0.5,
                        selection="loss")
    grads = jax.grad(lambda p: jnp.mean(losses_fn(p, batch)))(params)
    updates, _ = tx.update(grads, tx.init(params), params,
                           example_loss_fn=losses_fn, batch=batch)
    subset = {"x": x[jnp.array([3, 0])]}
    expected = -jax.grad(lambda p: jnp.mean(losses_fn(p, subset)))(params)["w"]
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)


@pytest.mark.parametrize("kwargs, name", [
    ({"selection_ratio": 0.0}, "selection_ratio"),
    ({"selection_ratio": -0.5}, "selection_ratio"),
    ({"selection_ratio": 1.5}, "selection_ratio"),
    ({"selection_ratio": "0.5"}, "selection_ratio"),
    ({"selection_ratio": True}, "selection_ratio"),
    ({"selection_ratio": float("nan")}, "selection_ratio"),
    ({"selection_ratio": jnp.asarray(0.5)}, "selection_ratio"),
    ({"selection_ratio": 0.5, "selection": "random"}, "selection"),
    ({"selection": "loss"}, "selection_ratio"),
])
def test_bad_constructor_arguments_are_refused(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        sam_optax.esam(sgdm(), RHO, **kwargs)


def _update_with(**kwargs):
    tx = sam_optax.esam(sgdm(), RHO, selection_ratio=0.5)
    params = {"w": jnp.ones(3)}
    return tx.update({"w": jnp.ones(3)}, tx.init(params), params, **kwargs)


BATCH = {"x": jnp.ones((4, 3))}


def _losses(p, b):
    return b["x"] @ p["w"]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"batch": BATCH}, TypeError, "example_loss_fn=example_loss_fn"),
    ({"example_loss_fn": _losses}, TypeError, "no `batch`"),
    ({}, TypeError, "no `example_loss_fn`"),
    ({"example_loss_fn": _losses, "batch": BATCH,
      "grad_fn": jax.grad(lambda p: 0.0)}, TypeError, "drop `grad_fn`"),
    ({"example_loss_fn": "loss", "batch": BATCH}, TypeError,
     "`example_loss_fn` must be a function"),
    ({"example_loss_fn": _losses, "batch": BATCH,
      "example_losses": jnp.ones(5)}, ValueError,
     r"`example_losses` must be one loss per example.*\(4,\).*\(5,\)"),
    ({"example_loss_fn": _losses, "batch": BATCH,
      "example_losses": jnp.ones((4, 1))}, ValueError, "`example_losses`"),
    ({"example_loss_fn": _losses, "batch": BATCH,
      "example_losses": (jnp.ones(4), None)}, TypeError,
     "`example_losses` must be an array"),
    ({"example_loss_fn": _losses,
      "batch": {"x": jnp.ones((4, 3)), "y": jnp.ones(5)}}, ValueError,
     r"leaves of `batch` must share.*\['x'\]: 4, \['y'\]: 5"),
    ({"example_loss_fn": _losses, "batch": {"x": jnp.ones((4, 3)),
                                            "t": jnp.float32(1.0)}},
     ValueError, r"`batch` leaf \['t'\] is a scalar"),
    ({"example_loss_fn": _losses, "batch": {}}, ValueError, "`batch` has no"),
    ({"example_loss_fn": lambda p, b: jnp.sum(b["x"] @ p["w"]),
      "batch": BATCH}, ValueError,
     r"`example_loss_fn` must return one loss per example.*got shape \(\)"),
])
def test_bad_update_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        _update_with(**kwargs)


# ------------------------------------------------------------ composition

def _recording(base_tx, seen):
    """``base_tx`` that records the keyword arguments it is handed."""
    def update(updates, state, params=None, **extra_args):
        seen.append(set(extra_args))
        return base_tx.update(updates, state, params)
    return optax.GradientTransformationExtraArgs(base_tx.init, update)


def test_selection_arguments_do_not_reach_base_tx_in_a_chain():
    seen = []
    tx = sam_optax.esam(_recording(sgdm(), seen), RHO, seed=2,
                        selection_ratio=0.5)
    chained = optax.chain(optax.identity(), tx)
    got, _ = run(chained, sds_step(chained), steps=3)
    assert seen and all(s == {"value"} for s in seen)
    alone = sam_optax.esam(sgdm(), RHO, seed=2, selection_ratio=0.5)
    expected, _ = run(alone, sds_step(alone), steps=3)
    for g, e in zip(got, expected, strict=True):
        for name in e:
            np.testing.assert_array_equal(g[name], e[name])


def test_inject_hyperparams_with_static_selection_ratio():
    seen = []
    inject = optax.inject_hyperparams(
        sam_optax.esam, static_args=("seed", "selection_ratio"))
    tx = inject(_recording(sgdm(), seen), rho=RHO, seed=2,
                selection_ratio=0.5, selection="loss")
    got, state = run(tx, sds_step(tx), steps=3)
    assert seen and all(s == {"value"} for s in seen)
    np.testing.assert_allclose(state.hyperparams["rho"], RHO)
    alone = sam_optax.esam(sgdm(), RHO, seed=2, selection_ratio=0.5,
                           selection="loss")
    expected, _ = run(alone, sds_step(alone), steps=3)
    for g, e in zip(got, expected, strict=True):
        for name in e:
            np.testing.assert_allclose(g[name], e[name], rtol=1e-6, atol=1e-7)


def test_inject_hyperparams_without_static_selection_ratio_says_so():
    tx = optax.inject_hyperparams(sam_optax.esam, static_args=("seed",))(
        sgdm(), rho=RHO, selection_ratio=0.5)
    with pytest.raises(ValueError, match="static_args=\\('selection_ratio',\\)"):
        tx.init(_init())

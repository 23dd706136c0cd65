"""SAMPa (Xie, Pethick, Cevher 2024, arXiv:2410.10683) against a float64
NumPy reference of its recursion, and its two gradients' independence."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from numpy_reference import PROBLEMS, SGD, Adam, norm, tmap

import sam_optax

STEPS = 12


# ------------------------------------------------------------- reference


def run_sampa_reference(grad, init, base, rho, lmbda, steps):
    """SAMPa-λ in float64, from the paper's recursion with the base step
    written out (see `sam_optax.sampa`'s docstring):

        x̃_t = x_t + ρ ĝ_t/‖ĝ_t‖,          ĝ_t = ∇f(y_t), ĝ_0 = 0
        y_{t+1} = x_t + base(ĝ_t; s_t)     (state not kept)
        x_{t+1} = x_t + base((1−λ)∇f(x̃_t) + λ∇f(y_{t+1}); s_t) → s_{t+1}
    """
    x = tmap(lambda a: np.asarray(a, np.float64), init)
    state = base.init(x)
    aux = tmap(np.zeros_like, x)
    history = []
    for _ in range(steps):
        n = norm(aux)
        eps = tmap(lambda a: rho * a / n if n > 0 else np.zeros_like(a), aux)
        x_tilde = tmap(np.add, x, eps)
        look, _ = base.update(aux, state)
        y_next = tmap(np.add, x, look)
        g_tilde, aux = grad(x_tilde), grad(y_next)
        mixed = tmap(lambda a, b: (1 - lmbda) * a + lmbda * b, g_tilde, aux)
        upd, state = base.update(mixed, state)
        x = tmap(np.add, x, upd)
        history.append(x)
    return history


def jax_loss64(problem):
    """The problem's loss in JAX with its data in float64 (under x64)."""
    x = jnp.asarray(problem.x, jnp.float64)
    y = jnp.asarray(problem.y, jnp.float64)
    if "l1" in problem.init:
        def loss(p):
            h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
            return 0.5 * jnp.mean((h @ p["l2"]["w"] + p["l2"]["b"] - y) ** 2)
    else:
        def loss(p):
            return jnp.mean(jnp.logaddexp(0.0, -y * (x @ p["w"] + p["b"])))
    return loss


def _run(tx, loss_fn, params, steps=STEPS, **update_kwargs):
    grad_fn = jax.grad(loss_fn)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(params, state, params, grad_fn=grad_fn,
                                   **update_kwargs)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    history = []
    for _ in range(steps):
        params, state = step(params, state)
        history.append(jax.tree.map(lambda a: np.asarray(a, np.float64),
                                    params))
    return history, state, params


def _close(actual, expected, rtol, atol):
    for a, e in zip(actual, expected, strict=True):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(e), strict=True):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize("problem_name,base_name,lmbda", [
    ("mlp", "sgd_momentum", 0.2),
    ("logistic", "sgd_momentum", 0.0),
    ("mlp", "adam", 0.5),
])
def test_sampa_matches_float64_reference(problem_name, base_name, lmbda):
    problem = PROBLEMS[problem_name]()
    bases = {"sgd_momentum": (optax.sgd(0.3, momentum=0.9), SGD(0.3, 0.9)),
             "adam": (optax.adam(0.05), Adam(0.05))}
    tx_base, ref_base = bases[base_name]
    expected = run_sampa_reference(problem.grad, problem.init, ref_base,
                                   rho=0.1, lmbda=lmbda, steps=STEPS)
    with jax.enable_x64(True):
        params = jax.tree.map(jnp.float64, problem.init)
        tx = sam_optax.sampa(tx_base, rho=0.1, lmbda=lmbda)
        actual, state, _ = _run(tx, jax_loss64(problem), params)
        assert jax.tree.leaves(state.ascent_state)[0].dtype == jnp.float64
    _close(actual, expected, rtol=1e-9, atol=1e-12)
    # The trajectory really moved, and ε did: not a trivially equal pair.
    assert norm(tmap(np.subtract, expected[-1], problem.init)) > 1e-2
    assert float(sam_optax.diagnostics(state).perturbation_norm) == (
        pytest.approx(0.1))


def test_rho_and_lambda_zero_is_the_base_optimizer():
    problem = PROBLEMS["mlp"]()
    params = jax.tree.map(jnp.float32, problem.init)
    base = optax.sgd(0.3, momentum=0.9)
    actual, _, _ = _run(sam_optax.sampa(base, rho=0.0, lmbda=0.0),
                     problem.jax_loss, params)

    @jax.jit
    def base_step(params, state):
        updates, state = base.update(jax.grad(problem.jax_loss)(params),
                                     state, params)
        return optax.apply_updates(params, updates), state

    state, expected = base.init(params), []
    for _ in range(STEPS):
        params, state = base_step(params, state)
        expected.append(params)
    _close(actual, expected, rtol=1e-6, atol=1e-7)


def test_vectorized_pair_equals_two_calls():
    problem = PROBLEMS["mlp"]()
    params = jax.tree.map(jnp.float32, problem.init)
    base = optax.sgd(0.3, momentum=0.9)
    vmapped, _, _ = _run(sam_optax.sampa(base, rho=0.1), problem.jax_loss, params)
    sequential, _, _ = _run(sam_optax.sampa(base, rho=0.1, vectorize=False),
                         problem.jax_loss, params)
    _close(vmapped, sequential, rtol=1e-5, atol=1e-6)


# ------------------------------------------------ the two gradients' independence


def _marked_grad_fn(loss_fn):
    """`grad_fn` as a jitted function named `marked_grad`, to find in jaxprs."""
    def marked_grad(p):
        return jax.grad(loss_fn)(p)
    return jax.jit(marked_grad)


def _grad_calls(jaxpr):
    return [e for e in jaxpr.eqns if e.params.get("name") == "marked_grad"]


def _depends_on(jaxpr, source_eqn, target_eqn) -> bool:
    """Whether an input of ``target_eqn`` is computed from an output of
    ``source_eqn`` (transitively, at the top level of ``jaxpr``)."""
    tainted = set(map(id, source_eqn.outvars))
    for eqn in jaxpr.eqns:
        if eqn is target_eqn:
            return any(id(v) in tainted for v in eqn.invars)
        if any(id(v) in tainted for v in eqn.invars):
            tainted.update(map(id, eqn.outvars))
    raise AssertionError("target equation not found")


def test_the_two_gradients_do_not_depend_on_each_other():
    problem = PROBLEMS["mlp"]()
    params = jax.tree.map(jnp.float32, problem.init)
    grad_fn = _marked_grad_fn(problem.jax_loss)
    base = optax.sgd(0.3, momentum=0.9)

    def jaxpr_of(tx, clean_grads):
        state = tx.init(params)

        def step(p, s):
            grads = grad_fn(p) if clean_grads else p
            return tx.update(grads, s, p, grad_fn=grad_fn)
        return jax.make_jaxpr(step)(params, state).jaxpr

    # vectorize=True: both gradients are one vmapped call on the stacked pair.
    (call,) = _grad_calls(jaxpr_of(sam_optax.sampa(base), False))
    assert all(v.aval.shape[0] == 2 for v in call.invars)
    # vectorize=False: two calls, neither fed by the other's output.
    jaxpr = jaxpr_of(sam_optax.sampa(base, vectorize=False), False)
    first, second = _grad_calls(jaxpr)
    assert not _depends_on(jaxpr, first, second)
    assert not _depends_on(jaxpr, second, first)
    # The check does see SAM's dependency: ∇L(w + ε) needs ∇L(w).
    jaxpr = jaxpr_of(sam_optax.sam(base), True)
    clean, perturbed = _grad_calls(jaxpr)
    assert _depends_on(jaxpr, clean, perturbed)


def test_unused_clean_gradient_costs_nothing_under_jit():
    problem = PROBLEMS["mlp"]()
    params = jax.tree.map(jnp.float32, problem.init)
    tx = sam_optax.sampa(optax.sgd(0.1))
    state = tx.init(params)
    grad_fn = jax.grad(problem.jax_loss)

    def flops(clean_grads):
        def step(p, s):
            grads = grad_fn(p) if clean_grads else p
            return tx.update(grads, s, p, grad_fn=grad_fn)
        return jax.jit(step).lower(params, state).compile().cost_analysis()[
            "flops"]

    assert flops(True) == flops(False)


# --------------------------------------------------- pair sharded on a mesh


def test_sharded_pair_matches_single_device_rule():
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = Mesh(devices, ("pair", "data"))
    problem = PROBLEMS["mlp"]()
    batch = (jnp.asarray(problem.x, jnp.float32),
             jnp.asarray(problem.y, jnp.float32))

    def loss_fn(p, b):
        h = jnp.tanh(b[0] @ p["l1"]["w"] + p["l1"]["b"])
        return 0.5 * jnp.mean((h @ p["l2"]["w"] + p["l2"]["b"] - b[1]) ** 2)

    params = jax.tree.map(jnp.float32, problem.init)
    tx = sam_optax.sampa(optax.sgd(0.3, momentum=0.9), rho=0.1, lmbda=0.2)

    def sharded_step(params, state, batch):
        pair = sam_optax.sampa_pair_grad_fn(loss_fn, batch, mesh)
        updates, state = tx.update(params, state, params, pair_grad_fn=pair)
        return optax.apply_updates(params, updates), state

    step = jax.jit(sharded_step)
    state = tx.init(params)
    sharded = []
    for _ in range(10):
        params, state = step(params, state, batch)
        sharded.append(params)
    single, _, _ = _run(sam_optax.sampa(optax.sgd(0.3, momentum=0.9), rho=0.1,
                                     lmbda=0.2, vectorize=False),
                     lambda p: loss_fn(p, batch),
                     jax.tree.map(jnp.float32, problem.init), steps=10)
    _close(sharded, single, rtol=1e-5, atol=1e-6)
    reference = run_sampa_reference(problem.grad, problem.init,
                                    SGD(0.3, 0.9), 0.1, 0.2, 10)
    _close(sharded, reference, rtol=1e-4, atol=1e-5)
    assert float(sam_optax.diagnostics(state).perturbed_loss) > 0

    # One shard_map computes both: each group gets one member of the pair
    # (leading axis 1 of 2) and a quarter of the batch.
    jaxpr = jax.make_jaxpr(sharded_step)(params, state, batch).jaxpr
    (mapped,) = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
    body = mapped.params["jaxpr"]
    n_leaves = len(jax.tree.leaves(params))
    point_shapes = [v.aval.shape for v in body.invars[:n_leaves]]
    assert point_shapes == [(1, *np.shape(x)) for x in
                            jax.tree.leaves(params)]
    assert body.invars[n_leaves].aval.shape[0] == len(problem.x) // 4


def test_pair_grad_fn_checks_its_mesh_and_output():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("pair", "data"))
    with pytest.raises(ValueError, match="axis 'pair' of size 2"):
        sam_optax.sampa_pair_grad_fn(lambda p, b: 0.0, None, mesh)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("pair", "data"))
    with pytest.raises(ValueError, match="not an axis"):
        sam_optax.sampa_pair_grad_fn(lambda p, b: 0.0, None, mesh,
                                     data_axis="batch")
    tx = sam_optax.sampa(optax.sgd(0.1))
    params = jnp.zeros(3)
    with pytest.raises(ValueError, match="pair_grad_fn"):  # one member only
        tx.update(params, tx.init(params), params,
                  pair_grad_fn=lambda points: points[0])


def test_axis_name_averages_to_the_global_batch_rule():
    problem = PROBLEMS["mlp"]()
    x = jnp.asarray(problem.x, jnp.float32)
    y = jnp.asarray(problem.y, jnp.float32)

    def loss_fn(p, xb, yb):
        h = jnp.tanh(xb @ p["l1"]["w"] + p["l1"]["b"])
        return 0.5 * jnp.mean((h @ p["l2"]["w"] + p["l2"]["b"] - yb) ** 2)

    tx = sam_optax.sampa(optax.sgd(0.3, momentum=0.9), axis_name="chunks")
    params = jax.tree.map(jnp.float32, problem.init)
    state = tx.init(params)

    def local_step(xb, yb, params, state):
        grad_fn = jax.grad(lambda p: loss_fn(p, xb, yb))
        updates, state = tx.update(params, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    chunked = jax.jit(jax.vmap(local_step, in_axes=(0, 0, None, None),
                               axis_name="chunks"))
    trajectory = []
    for _ in range(6):
        replicas, state = chunked(x.reshape(4, -1, 3), y.reshape(4, -1, 1),
                                  params, state)
        params = jax.tree.map(lambda a: a[0], replicas)
        for leaf in jax.tree.leaves(replicas):  # replicas stay identical
            np.testing.assert_array_equal(leaf, jnp.broadcast_to(
                leaf[0], leaf.shape))
        state = jax.tree.map(lambda a: a[0], state)
        trajectory.append(params)
    expected = run_sampa_reference(problem.grad, problem.init, SGD(0.3, 0.9),
                                   0.1, 0.2, 6)
    _close(trajectory, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------- numerics and cost


def test_zero_gradient_gives_no_nan():
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    tx = sam_optax.sampa(optax.sgd(0.1, momentum=0.9), rho=0.1)
    history, state, _ = _run(tx, lambda p: jnp.zeros([]), params,
                               steps=3)
    for leaf in jax.tree.leaves(history[-1]):
        assert np.all(np.isfinite(leaf))
    _close(history[-1:], [params], rtol=0, atol=0)
    diag = sam_optax.diagnostics(state)
    assert float(diag.perturbation_norm) == 0.0
    assert float(diag.grad_norm) == 0.0


def test_bfloat16_params():
    problem = PROBLEMS["mlp"]()
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), problem.init)
    tx = sam_optax.sampa(optax.sgd(0.1, momentum=0.9), rho=0.05)
    history, state, final = _run(tx, lambda p: problem.jax_loss(
        jax.tree.map(lambda a: a.astype(jnp.float32), p)), params, steps=10)
    assert all(leaf.dtype == jnp.bfloat16
               for leaf in jax.tree.leaves(final))
    assert all(leaf.dtype == jnp.float32  # ∇f(y) kept in float32
               for leaf in jax.tree.leaves(state.ascent_state))
    assert problem.loss(history[-1]) < problem.loss(problem.init)


def test_no_retracing_and_stable_state():
    problem = PROBLEMS["logistic"]()
    params = jax.tree.map(jnp.float32, problem.init)
    tx = sam_optax.sampa(optax.adam(1e-2), rho=optax.linear_schedule(
        0.0, 0.1, 5))
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        updates, state = tx.update(
            params, state, params,
            grad_fn=jax.value_and_grad(problem.jax_loss))
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    types = jax.tree.map(lambda a: (a.shape, a.dtype), state)
    for _ in range(6):
        params, state = step(params, state)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == types
    assert len(traces) == 1
    assert float(sam_optax.diagnostics(state).perturbed_loss) > 0


def test_a_step_rejected_by_apply_if_finite_keeps_the_sampa_state():
    tx = sam_optax.sampa(optax.apply_if_finite(optax.sgd(0.1), 5), rho=0.1)

    @jax.jit
    def step(params, state, poison):
        grad_fn = jax.grad(lambda w: jnp.sum((w - 1.0) ** 2) * poison)
        updates, state = tx.update(params, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    params = jnp.zeros(3)
    state = tx.init(params)
    params, state = step(params, state, 1.0)
    before = (params, state.count, state.ascent_state)
    params, state = step(params, state, jnp.nan)
    after = (params, state.count, state.ascent_state)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    params, _ = step(params, state, 1.0)  # and goes on from there
    assert np.all(np.isfinite(params)) and np.all(params > before[0])


# ---------------------------------------------------------------- errors


def test_bad_arguments_are_named():
    sgd = optax.sgd(0.1)
    with pytest.raises(ValueError, match="rho"):
        sam_optax.sampa(sgd, rho=-0.1)
    with pytest.raises(ValueError, match="lmbda"):
        sam_optax.sampa(sgd, lmbda=1.5)
    with pytest.raises(ValueError, match="vectorize"):
        sam_optax.sampa(sgd, vectorize="yes")
    with pytest.raises(ValueError, match="axis_name"):
        sam_optax.sampa(sgd, axis_name=3)
    with pytest.raises(TypeError, match="base_tx"):
        sam_optax.sampa("sgd")
    with pytest.raises(TypeError, match="sync_period"):
        sam_optax.sampa(sgd, sync_period=2)
    with pytest.raises(ValueError, match="MultiSteps"):
        sam_optax.sampa(optax.MultiSteps(sgd, 2)).init(jnp.zeros(2))

    tx = sam_optax.sampa(sgd)
    params = jnp.zeros(2)
    state = tx.init(params)
    grad_fn = jax.grad(lambda w: jnp.sum(w ** 2))
    with pytest.raises(TypeError, match="grad_fn"):
        tx.update(params, state, params)
    with pytest.raises(TypeError, match="not both"):
        tx.update(params, state, params, grad_fn=grad_fn,
                  pair_grad_fn=jax.vmap(grad_fn))
    with pytest.raises(ValueError, match="pass them"):
        tx.update(params, state, None, grad_fn=grad_fn)

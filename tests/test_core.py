"""The core `sam()` against a float64 NumPy reference, degenerate inputs,
tracing, state layout and diagnostics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy_reference import PROBLEMS, SGD, Adam, norm, run_sam, tmap
from sam_steps import iterate, sam_step

import sam_optax

BASES = {
    "sgd": (lambda: optax.sgd(0.1), lambda: SGD(0.1)),
    "momentum": (lambda: optax.sgd(0.05, momentum=0.9), lambda: SGD(0.05, 0.9)),
    "adam": (lambda: optax.adam(0.01), lambda: Adam(0.01)),
}


def to_jax(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def make_step(tx, loss_fn):
    return sam_step(tx, loss_fn)


@pytest.mark.parametrize("problem_name", sorted(PROBLEMS))
@pytest.mark.parametrize("base_name", sorted(BASES))
def test_sam_matches_float64_reference(problem_name, base_name):
    problem = PROBLEMS[problem_name]()
    make_tx, make_ref = BASES[base_name]
    rho, steps = 0.1, 6
    expected = run_sam(problem, make_ref(), rho, steps)

    tx = sam_optax.sam(make_tx(), rho=rho)
    params = to_jax(problem.init)
    state = tx.init(params)
    step = make_step(tx, problem.jax_loss)
    for t in range(steps):
        params, state = step(params, state)
        got = jax.tree.map(np.asarray, params)
        scale = max(norm(expected[t]), 1.0)
        err = norm(tmap(np.subtract, got, expected[t]))
        assert err <= 2e-5 * scale, (t, err)


def test_reference_differs_from_base_optimizer():
    """Guard: the reference problems are ones where SAM ≠ plain SGD."""
    problem = PROBLEMS["mlp"]()
    sam_hist = run_sam(problem, SGD(0.1), 0.1, 3)
    sgd_hist = run_sam(problem, SGD(0.1), 0.0, 3)
    assert norm(tmap(np.subtract, sam_hist[-1], sgd_hist[-1])) > 1e-3


def identity_probe():
    """grad_fn(p) = p at params 0: with sgd(1) the update is exactly −ε."""
    return lambda p: p


def perturbation_of(tx, grads, params):
    state = tx.init(params)
    updates, state = tx.update(grads, state, params, grad_fn=identity_probe())
    return jax.tree.map(lambda u: -u, updates), state


def test_perturbation_is_rho_times_unit_gradient():
    params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    grads = {"a": jnp.array([1.0, -2.0, 2.0]), "b": jnp.array([[0.0, 4.0],
                                                               [-2.0, 0.0]])}
    eps, state = perturbation_of(sam_optax.sam(optax.sgd(1.0), rho=0.3),
                                 grads, params)
    total = np.sqrt(1 + 4 + 4 + 16 + 4)
    np.testing.assert_allclose(eps["a"], 0.3 * np.array([1, -2, 2]) / total,
                               rtol=1e-6)
    np.testing.assert_allclose(eps["b"], 0.3 * np.array([[0, 4], [-2, 0]]) / total,
                               rtol=1e-6)
    diag = sam_optax.diagnostics(state)
    np.testing.assert_allclose(diag.perturbation_norm, 0.3, rtol=1e-6)
    np.testing.assert_allclose(diag.grad_norm, total, rtol=1e-6)


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-20, 1e-12, 1e20, 1e30])
def test_zero_tiny_and_huge_gradients(scale):
    params = {"a": jnp.zeros(4), "b": jnp.zeros(2)}
    direction = {"a": jnp.array([3.0, 0.0, -4.0, 0.0]), "b": jnp.array([0.0, 12.0])}
    grads = jax.tree.map(lambda d: d * jnp.float32(scale), direction)
    tx = sam_optax.sam(optax.sgd(1.0), rho=0.5)
    eps, state = jax.jit(lambda g, p: perturbation_of(tx, g, p))(grads, params)
    for leaf in jax.tree.leaves((eps, state)):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
    if scale == 0.0:
        for leaf in jax.tree.leaves(eps):
            np.testing.assert_array_equal(leaf, 0.0)
    else:
        unit = jax.tree.map(lambda d: np.asarray(d) / 13.0, direction)
        for e, u in zip(jax.tree.leaves(eps), jax.tree.leaves(unit)):
            np.testing.assert_allclose(e, 0.5 * u, rtol=1e-6, atol=1e-7)


def test_zero_gradient_full_step_is_finite_and_equals_base():
    loss_fn = lambda p: jnp.sum(p["w"] * 0.0)
    params = {"w": jnp.ones(3)}
    tx = sam_optax.sam(optax.adam(0.1), rho=0.05)
    state = tx.init(params)
    step = make_step(tx, loss_fn)
    for _ in range(3):
        params, state = step(params, state)
    np.testing.assert_array_equal(params["w"], np.ones(3))
    assert all(np.all(np.isfinite(np.asarray(x, np.float64)))
               for x in jax.tree.leaves(state))


def test_bf16_and_mixed_precision_params_keep_dtypes():
    params = {"w": jnp.full((4,), 0.5, jnp.bfloat16), "b": jnp.zeros(2, jnp.float32)}
    loss_fn = lambda p: (jnp.sum(p["w"].astype(jnp.float32) ** 2)
                         + jnp.sum((p["b"] - 1.0) ** 2))
    tx = sam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
    state = tx.init(params)
    dtypes0 = [x.dtype for x in jax.tree.leaves(state)]
    step = make_step(tx, loss_fn)
    for _ in range(5):
        params, state = step(params, state)
    assert params["w"].dtype == jnp.bfloat16 and params["b"].dtype == jnp.float32
    assert [x.dtype for x in jax.tree.leaves(state)] == dtypes0
    assert all(np.all(np.isfinite(np.asarray(x, np.float32)))
               for x in jax.tree.leaves(params))
    # The float32 leaf follows the reference exactly despite the bf16 one.
    assert float(jnp.abs(params["b"] - 1.0).max()) < 1.0


def test_tiny_bf16_gradient_direction():
    params = {"w": jnp.zeros(2, jnp.bfloat16)}
    grads = {"w": jnp.array([3e-30, -4e-30], jnp.bfloat16)}
    tx = sam_optax.sam(optax.sgd(1.0), rho=1.0)
    eps, _ = perturbation_of(tx, grads, params)
    np.testing.assert_allclose(np.asarray(eps["w"], np.float32), [0.6, -0.8],
                               rtol=1e-2)


def test_no_retracing_over_many_steps():
    problem = PROBLEMS["mlp"]()
    traces = []

    def loss_fn(p):
        return problem.jax_loss(p)

    tx = sam_optax.sam(optax.adam(1e-2), rho=optax.linear_schedule(0.0, 0.1, 10))

    @jax.jit
    def step(params, state):
        traces.append(1)
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params, grad_fn=jax.grad(loss_fn))
        return optax.apply_updates(params, updates), state

    params = to_jax(problem.init)
    state = tx.init(params)
    for _ in range(25):
        params, state = step(params, state)
    assert len(traces) == 1
    assert step._cache_size() == 1


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("base_name", sorted(BASES))
def test_rho_zero_is_base_optimizer_bit_for_bit(base_name, jit):
    """ρ = 0 gives ε = 0 exactly, so ``grad_fn(w + 0)`` is ``grad_fn(w)``.

    Op by op the result is bit-identical. Under ``jit`` XLA may fuse Adam's
    elementwise update differently inside the larger SAM graph, which can move
    a result by one float32 ulp; SGD and momentum stay bit-identical.
    """
    problem = PROBLEMS["mlp"]()
    base = BASES[base_name][0]()
    tx = sam_optax.sam(base, rho=0.0)

    def both(p_sam, s_sam, p_base, s_base):
        g = jax.grad(problem.jax_loss)(p_sam)
        u, s_sam = tx.update(g, s_sam, p_sam, grad_fn=jax.grad(problem.jax_loss))
        gb = jax.grad(problem.jax_loss)(p_base)
        ub, s_base = base.update(gb, s_base, p_base)
        return (optax.apply_updates(p_sam, u), s_sam,
                optax.apply_updates(p_base, ub), s_base)

    if jit:
        both = jax.jit(both)
    p_sam = p_base = to_jax(problem.init)
    s_sam, s_base = tx.init(p_sam), base.init(p_base)
    for _ in range(5 if jit else 3):
        p_sam, s_sam, p_base, s_base = both(p_sam, s_sam, p_base, s_base)
    pairs = list(zip(jax.tree.leaves(p_sam), jax.tree.leaves(p_base)))
    pairs += list(zip(jax.tree.leaves(s_sam.base_state), jax.tree.leaves(s_base)))
    # Under jit XLA may fuse the larger SAM graph differently (Adam on CPU;
    # every base on GPU, where the gradient's kernels are chosen per graph):
    # equal to float32 rounding there, bit-for-bit elsewhere.
    ulp_level = jit and (base_name == "adam" or jax.default_backend() != "cpu")
    for a, b in pairs:
        if ulp_level:
            np.testing.assert_allclose(a, b, rtol=3e-7, atol=1e-9)
        else:
            np.testing.assert_array_equal(a, b)


def test_rho_schedule_follows_step_count():
    schedule = optax.linear_schedule(0.1, 0.5, transition_steps=4)
    params = {"w": jnp.zeros(3)}
    grads = {"w": jnp.array([1.0, 2.0, 2.0])}
    tx = sam_optax.sam(optax.sgd(1.0), rho=schedule)
    state = tx.init(params)
    step = jax.jit(lambda s: tx.update(grads, s, params, grad_fn=identity_probe()))
    for t in range(6):
        updates, state = step(state)
        np.testing.assert_allclose(float(state.rho), schedule(t), rtol=1e-6)
        np.testing.assert_allclose(
            float(sam_optax.diagnostics(state).perturbation_norm), schedule(t),
            rtol=1e-6)
        np.testing.assert_allclose(updates["w"], -schedule(t) * grads["w"] / 3.0,
                                   rtol=1e-6)


def test_inject_hyperparams_changes_rho_at_run_time():
    tx = optax.inject_hyperparams(sam_optax.sam)(base_tx=optax.sgd(1.0), rho=0.1)
    params = {"w": jnp.zeros(2)}
    grads = {"w": jnp.array([3.0, 4.0])}
    state = tx.init(params)

    @jax.jit
    def step(state):
        return tx.update(grads, state, params, grad_fn=identity_probe())

    updates, state = step(state)
    np.testing.assert_allclose(updates["w"], [-0.06, -0.08], rtol=1e-6)
    state.hyperparams["rho"] = jnp.asarray(0.5, state.hyperparams["rho"].dtype)
    updates, state = step(state)
    np.testing.assert_allclose(updates["w"], [-0.3, -0.4], rtol=1e-6)
    assert step._cache_size() == 1


def test_state_holds_no_param_sized_copy():
    params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros(32)}
    base = optax.adam(1e-3)
    base_leaves = jax.tree.leaves(base.init(params))
    sam_state = sam_optax.sam(base, 0.05).init(params)
    # Two extra leaves: the int32 count and one float32 vector holding ρ and
    # the diagnostics (each leaf is a buffer passed to and from every step).
    assert len(jax.tree.leaves(sam_state)) - len(base_leaves) == 2
    assert sam_state.count.shape == () and sam_state.scalars.shape == (8,)
    assert sam_state.rho.shape == ()
    assert all(x.shape == () for x in sam_state.diagnostics)
    assert sam_state.diagnostics.perturbed.dtype == jnp.bool_
    base_bytes = sum(x.nbytes for x in base_leaves)
    sam_bytes = sum(x.nbytes for x in jax.tree.leaves(sam_state))
    assert sam_bytes - base_bytes < 64


def test_diagnostics_match_reference():
    problem = PROBLEMS["logistic"]()
    params = to_jax(problem.init)
    rho = 0.2
    tx = sam_optax.sam(optax.sgd(0.1), rho=rho, full_diagnostics=True)
    state = tx.init(params)
    loss, grads = jax.value_and_grad(problem.jax_loss)(params)
    _, state = jax.jit(lambda g, s, p, v: tx.update(
        g, s, p, grad_fn=jax.value_and_grad(problem.jax_loss), value=v))(
            grads, state, params, loss)
    diag = sam_optax.diagnostics(state)

    p64 = tmap(lambda x: np.asarray(x, np.float64), problem.init)
    g = problem.grad(p64)
    eps = tmap(lambda x: rho * x / norm(g), g)
    g_sam = problem.grad(tmap(np.add, p64, eps))
    dot = sum(np.sum(a * b) for a, b in zip(
        [g["w"], g["b"]], [g_sam["w"], g_sam["b"]]))
    np.testing.assert_allclose(diag.grad_norm, norm(g), rtol=1e-5)
    np.testing.assert_allclose(diag.perturbation_norm, rho, rtol=1e-5)
    np.testing.assert_allclose(diag.cosine, dot / norm(g) / norm(g_sam), rtol=1e-5)
    np.testing.assert_allclose(diag.loss, problem.loss(p64), rtol=1e-5)
    perturbed = problem.loss(tmap(np.add, p64, eps))
    np.testing.assert_allclose(diag.perturbed_loss, perturbed, rtol=1e-5)
    np.testing.assert_allclose(diag.sharpness, perturbed - problem.loss(p64),
                               rtol=1e-3, atol=1e-7)
    assert bool(diag.perturbed)
    # The cosine is opt-in (it keeps g alive through the second gradient).
    lean = sam_optax.sam(optax.sgd(0.1), rho=rho)
    _, lean_state = lean.update(grads, lean.init(params), params,
                                grad_fn=jax.grad(problem.jax_loss))
    lean_diag = sam_optax.diagnostics(lean_state)
    assert float(lean_diag.cosine) == 0.0
    np.testing.assert_allclose(lean_diag.perturbation_norm, rho, rtol=1e-5)


def test_value_and_grad_with_aux_is_accepted():
    loss_fn = lambda p: (jnp.sum(p ** 2), {"aux": 1.0})
    params = jnp.ones(3)
    tx = sam_optax.sam(optax.sgd(0.1), 0.1)
    state = tx.init(params)
    grads = jax.grad(lambda p: loss_fn(p)[0])(params)
    _, state = tx.update(grads, state, params,
                         grad_fn=jax.value_and_grad(loss_fn, has_aux=True))
    expected = np.sum((np.ones(3) * (1 + 0.1 / np.sqrt(3))) ** 2)
    np.testing.assert_allclose(sam_optax.diagnostics(state).perturbed_loss,
                               expected, rtol=1e-6)
    # Without `value=` the sharpness is left at 0 rather than guessed.
    assert float(sam_optax.diagnostics(state).sharpness) == 0.0


def test_empty_leaves_and_empty_tree():
    params = {"empty": jnp.zeros((0, 3)), "w": jnp.ones(2), "nothing": {}}
    loss_fn = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["empty"])
    tx = sam_optax.sam(optax.adam(0.1), 0.05)
    state = tx.init(params)
    params, state = make_step(tx, loss_fn)(params, state)
    assert params["empty"].shape == (0, 3)
    assert np.all(np.isfinite(params["w"]))

    empty_tx = sam_optax.sam(optax.sgd(0.1), 0.05)
    updates, _ = empty_tx.update({}, empty_tx.init({}), {}, grad_fn=lambda p: {})
    assert updates == {}


def test_float64_params_are_computed_in_float64():
    with jax.enable_x64(True):
        params = jnp.zeros(2, jnp.float64)
        grads = jnp.array([3.0, 4.0], jnp.float64)
        tx = sam_optax.sam(optax.sgd(1.0), rho=1.0 / 3.0)
        eps, _ = perturbation_of(tx, grads, params)
        assert eps.dtype == jnp.float64
        np.testing.assert_allclose(eps, [0.2, 0.8 / 3.0], rtol=1e-15)


# ------------------------------------------------ trust: arguments and errors


def sam_params_after(tx, loss_fn, params, steps=3):
    history, state = iterate(tx, loss_fn, params, steps)
    return jax.tree.map(lambda h, p: np.asarray(h).astype(p.dtype),
                        history[-1], params), state


QUADRATIC = lambda w: jnp.sum((w - jnp.array([1.0, -2.0, 0.5])) ** 2)  # noqa: E731


@pytest.mark.parametrize("bad_rho", [-0.05, float("nan"), -float("inf")])
@pytest.mark.parametrize("how", ["schedule", "inject_hyperparams"])
def test_traced_rho_that_is_negative_or_nan_acts_as_zero(bad_rho, how):
    # Eagerly such a ρ is refused; traced, it cannot be: it must act as ρ = 0
    # (the base optimizer), never flip ε or give a NaN.
    if how == "schedule":
        tx = sam_optax.sam(optax.sgd(0.1), rho=lambda count: bad_rho + 0 * count)
    else:
        tx = optax.inject_hyperparams(sam_optax.sam)(optax.sgd(0.1), rho=0.05)
    params = jnp.zeros(3)
    state = tx.init(params)
    if how == "inject_hyperparams":
        state.hyperparams["rho"] = jnp.asarray(bad_rho)
    step = make_step(tx, QUADRATIC)
    for _ in range(3):
        params, state = step(params, state)
    base = jnp.zeros(3)
    for _ in range(3):
        base = base - 0.1 * jax.grad(QUADRATIC)(base)
    np.testing.assert_allclose(params, base, rtol=1e-6)
    assert float(sam_optax.diagnostics(state).perturbation_norm) == 0.0


def test_inject_hyperparams_and_rho_array_in_bf16():
    params = jnp.zeros(3, jnp.bfloat16)
    loss = lambda w: QUADRATIC(w.astype(jnp.float32))  # noqa: E731
    tx = optax.inject_hyperparams(sam_optax.sam)(optax.sgd(0.1), rho=0.05)
    injected, _ = sam_params_after(tx, loss, params)
    plain, _ = sam_params_after(sam_optax.sam(optax.sgd(0.1), rho=0.05), loss,
                                params)
    array_rho, _ = sam_params_after(
        sam_optax.sam(optax.sgd(0.1), rho=jnp.asarray(0.05, jnp.bfloat16)),
        loss, params)
    assert injected.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(injected), np.float32(plain),
                               rtol=1e-2)
    np.testing.assert_allclose(np.float32(array_rho), np.float32(plain),
                               rtol=1e-2)


@pytest.mark.parametrize("name, kwargs", [
    ("looksam", {}), ("every_k_sam", {}), ("multistep_sam", {}),
    ("esam", {}), ("random_sam", {})])
def test_inject_hyperparams_names_the_static_args_fix(name, kwargs):
    constructor = getattr(sam_optax, name)
    with pytest.raises(ValueError, match="static_args"):
        optax.inject_hyperparams(constructor)(optax.sgd(0.1), **kwargs).init(
            jnp.zeros(3))


@pytest.mark.parametrize("name, static", [
    ("looksam", ("k",)), ("every_k_sam", ("k",)), ("multistep_sam", ("steps",)),
    ("esam", ("seed",)), ("random_sam", ("seed",)), ("wsam", ())])
def test_inject_hyperparams_with_static_args_equals_the_plain_constructor(
        name, static):
    constructor = getattr(sam_optax, name)
    injected = optax.inject_hyperparams(constructor, static_args=static)(
        optax.sgd(0.1), rho=0.05)
    plain = constructor(optax.sgd(0.1), rho=0.05)
    a, _ = sam_params_after(injected, QUADRATIC, jnp.zeros(3), steps=4)
    b, _ = sam_params_after(plain, QUADRATIC, jnp.zeros(3), steps=4)
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("bad_dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_gradients_that_are_not_real_floats_are_refused(bad_dtype):
    tx = sam_optax.sam(optax.sgd(0.1), 0.05)
    params = jnp.zeros(3)
    grads = jnp.ones(3)
    bad_grad_fn = lambda p: jnp.ones(3, bad_dtype)  # noqa: E731
    with pytest.raises(TypeError, match="dtype"):
        tx.update(grads, tx.init(params), params, grad_fn=bad_grad_fn)


def test_value_must_be_the_scalar_loss():
    tx = sam_optax.sam(optax.sgd(0.1), 0.05)
    params = jnp.zeros(3)
    grads = jax.grad(QUADRATIC)(params)
    with pytest.raises(TypeError, match="value=loss"):
        tx.update(grads, tx.init(params), params, grad_fn=jax.grad(QUADRATIC),
                  value=(QUADRATIC(params), {"aux": 1.0}))
    with pytest.raises(ValueError, match="scalar"):
        tx.update(grads, tx.init(params), params, grad_fn=jax.grad(QUADRATIC),
                  value=jnp.ones(2))


def test_grad_fn_with_two_arguments_points_to_the_migration_notes():
    tx = sam_optax.sam(optax.sgd(0.1), 0.05)
    params = jnp.zeros(3)
    grads = jax.grad(QUADRATIC)(params)
    with pytest.raises(TypeError, match="optax.contrib.sam"):
        tx.update(grads, tx.init(params), params,
                  grad_fn=lambda p, i: jax.grad(QUADRATIC)(p))


@pytest.mark.parametrize("argument", [
    {"sync_period": 2}, {"opaque_mode": True}, {"batch_axis_name": "batch"},
    {"reset_state": False}])
@pytest.mark.parametrize("name", ["sam", "asam", "looksam"])
def test_optax_contrib_arguments_point_to_the_migration_notes(name, argument):
    with pytest.raises(TypeError, match="optax.contrib.sam.*Coming from"):
        getattr(sam_optax, name)(optax.sgd(0.1), **argument)


def test_adversarial_optimizer_as_rho_points_to_the_migration_notes():
    with pytest.raises(TypeError, match="rho=0.05"):
        sam_optax.sam(optax.sgd(0.1), optax.sgd(0.05))


@pytest.mark.parametrize("name, argument", [
    ("sam", "full_diagnostics"), ("sam", "sync_perturbation"),
    ("wsam", "decoupled"), ("gsam", "full_diagnostics")])
def test_flags_must_be_bools(name, argument):
    with pytest.raises(ValueError, match=argument):
        getattr(sam_optax, name)(optax.sgd(0.1), **{argument: "yes"})


@pytest.mark.parametrize("name, argument", [
    ("asam", "eta"), ("fisher_sam", "eta"), ("friendly_sam", "sigma"),
    ("ae_sam", "c"), ("looksam", "alpha"), ("gsam", "alpha")])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_hyperparameters_are_refused(name, argument, value):
    with pytest.raises(ValueError, match=f"`{argument}` must be"):
        getattr(sam_optax, name)(optax.sgd(0.1), **{argument: value})


def test_import_under_python_OO():
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-OO", "-c", "import sam_optax"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ------------------------------------ the descent's opt-in PerturbedPoint


def test_descent_with_uses_point_gets_the_point_and_others_do_not():
    """``uses_point=True``: ``combine`` receives ``point=PerturbedPoint``
    whose ``grad_fn`` evaluates at the point it is given (gradients only,
    even from a ``value_and_grad``); a default descent is called with the
    three positional arguments alone."""
    from sam_optax import ascent, core, descent, schedule
    target = jnp.array([1.0, -2.0, 0.5])
    loss_fn = lambda w: 0.5 * jnp.sum((w - target) ** 2)  # noqa: E731
    params, rho = jnp.zeros(3), 0.1
    seen = {}

    def combine_with_point(grads, perturbed_grads, state, *, point):
        seen["point"] = point
        seen["at_adv"] = point.grad_fn(point.perturbed_params())
        seen["at_clean"] = point.grad_fn(point.params)
        seen["perturbed_grads"] = perturbed_grads
        return core.DescentResult(perturbed_grads, state)

    def combine_plain(grads, perturbed_grads, state):  # no **kwargs at all
        seen["plain"] = True
        return core.DescentResult(perturbed_grads, state)

    def build(combine, uses_point):
        return sam_optax.sharpness_aware(
            optax.sgd(1.0), rho, ascent=ascent.normalized_ascent(),
            descent=core.Descent(init=core.no_state, combine=combine,
                                 uses_clean_grads=False,
                                 uses_point=uses_point),
            schedule=schedule.every_step())

    grads = jax.grad(loss_fn)(params)
    tx = build(combine_with_point, True)
    updates, _ = tx.update(grads, tx.init(params), params,
                           grad_fn=jax.value_and_grad(loss_fn))
    point = seen["point"]
    assert isinstance(point, core.PerturbedPoint)
    eps = rho * np.asarray(grads) / np.linalg.norm(np.asarray(grads))
    np.testing.assert_allclose(point.epsilon, eps, rtol=1e-6)
    np.testing.assert_allclose(point.rho, rho)
    np.testing.assert_array_equal(point.params, params)
    # grad_fn(point) is ∇L at that point: w + ε gives the perturbed gradient.
    np.testing.assert_allclose(seen["at_adv"], seen["perturbed_grads"],
                               rtol=1e-6)
    np.testing.assert_allclose(seen["at_adv"], eps - target, rtol=1e-6)
    np.testing.assert_allclose(seen["at_clean"], grads, rtol=1e-6)
    np.testing.assert_allclose(updates, -(eps - target), rtol=1e-6)
    assert descent.sam_gradient().uses_point is False

    tx = build(combine_plain, False)
    tx.update(grads, tx.init(params), params, grad_fn=jax.grad(loss_fn))
    assert seen["plain"]

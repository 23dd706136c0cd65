"""Memory is part of the contract: a donated step at the hand-written floor.

Every figure here comes from XLA's ``memory_analysis()`` and
``cost_analysis()`` of a compiled step on ``jax.ShapeDtypeStruct`` inputs:
nothing is allocated, nothing is timed, and the numbers are the same on every
run. The steps and the hand-written counterparts are those of
``benchmarks/bench_memory.py`` (which measures the 50 M-parameter model);
here the model has 3 M parameters, where one parameter-sized buffer (P,
12 MiB) is still far above every fixed overhead.
"""

import importlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import numerics

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _import_benchmark(name):
    """A script as a module, imported as ``python benchmarks/x.py`` runs it
    (its folder on ``sys.path`` for ``import common``, restored after)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        return importlib.import_module(name)


bench_memory = _import_benchmark("bench_memory")
WIDTHS = bench_memory.SMALL_WIDTHS
PARAMS = bench_memory.mlp_params(WIDTHS)
BATCH = bench_memory.mlp_batch(WIDTHS)
P = bench_memory.parameter_bytes(PARAMS)

# ‖ε‖ where the ascent does not know it (an elementwise scale S as in ASAM
# and Fisher-SAM, or p = ∞) is measured only under `full_diagnostics=True`:
# measuring it keeps ε alive as a parameter-sized buffer (+0.5 to +1 P).


def test_every_public_constructor_is_measured():
    constructors = {name for name in sam_optax.__all__
                    if name.islower() and callable(getattr(sam_optax, name))
                    and name not in ("bsam_posterior", "bsam_sample",
                                     "diagnostics", "gsam_rho_schedule",
                                     "msam_clean_params",
                                     "msam_perturbed_params",
                                     "sampa_pair_grad_fn",
                                     "sharpness_aware")}
    measured = {m.name for m in bench_memory.METHODS}
    assert constructors <= measured, constructors - measured


def test_model_is_large_enough_for_P_to_show():
    assert P > 10 * 2**20
    shapes = [x.shape for x in jax.tree.leaves(PARAMS)]
    # Two leaves of one shape: where XLA:CPU once shared (and materialised)
    # a broadcast constant between the safe norm's sums of both.
    assert shapes.count((1024, 1024)) == 2


@pytest.mark.parametrize("method", bench_memory.METHODS,
                         ids=[m.name for m in bench_memory.METHODS])
def test_donated_step_is_within_a_tenth_of_P_of_hand_written(method):
    row = bench_memory.measure(method, WIDTHS)
    assert row["difference_P"] <= bench_memory.TARGET_P, row
    # Sanity: the step holds at least params and base state (donated).
    assert row["handwritten_P"] >= 2.0


# ------------------------------------------------------------ the safe norm


def _temp_bytes(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_safe_norm_materialises_no_parameter_sized_constant():
    """The two rescaled sums of squares of equal-shaped leaves: their scale
    factors once became one shared broadcast per shape, which XLA:CPU wrote
    out as an array (one leaf-sized temporary per factor and shape)."""
    tree = {name: jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
            for name in ("a", "b", "c")}
    leaf = 1024 * 1024 * 4
    assert _temp_bytes(numerics.global_norm, tree) < 0.01 * leaf
    # ... and the normalisation writes nothing but its output.
    assert _temp_bytes(numerics.safe_normalize, tree) < 0.01 * leaf


def test_finiteness_check_writes_no_mask():
    """``all_finite`` (p = ∞'s guard) once wrote each leaf's boolean
    isfinite mask out before reducing it."""
    tree = {name: jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
            for name in ("a", "b", "c")}
    assert _temp_bytes(numerics.all_finite, tree) < 0.01 * 1024 * 1024


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_finiteness_check_against_numpy(bad):
    only_a = {"a": True, "b": False}
    for jit in (False, True):
        wrap = jax.jit if jit else (lambda f: f)
        check = wrap(numerics.all_finite)
        check_a = wrap(lambda t: numerics.all_finite(t, only_a))
        tree = {"a": jnp.array([1.0, 3e38, -2.0]), "b": jnp.ones((2, 2))}
        assert bool(check(tree))
        tree["b"] = tree["b"].at[1, 0].set(bad)
        assert not bool(check(tree))
        assert bool(check_a(tree))


def test_safe_norm_keeps_its_range_after_the_per_leaf_barrier():
    # The barrier hides the factors from the simplifier, leaf by leaf:
    # (x·2⁶⁰)² is not folded into x²·2¹²⁰, so 1e-30 and 1e30 stay exact.
    for scale in (1e-30, 1.0, 1e30):
        tree = {"a": jnp.full((3, 2), 3.0 * scale, jnp.float32),
                "b": jnp.full((3, 2), 4.0 * scale, jnp.float32)}
        unit, norm = jax.jit(numerics.safe_normalize)(tree)
        np.testing.assert_allclose(float(norm), 5.0 * scale * np.sqrt(6),
                                   rtol=1e-6)
        np.testing.assert_allclose(unit["a"], 0.6 / np.sqrt(6), rtol=1e-6)


# ----------------------------------------- ASAM: g rescaled before T ⊙ g


def test_asam_is_exact_where_t_times_g_leaves_the_safe_range():
    """ε = ρ T² g / ‖T g‖ with T = |w| + η (float64 reference). With
    ‖g‖ ~ 1e30 (inside the safe norm's range) and weights ~1e3, ‖T g‖ ~ 1e33
    is above it: ASAM gave ε = 0. g is now rescaled by its own power of two
    first (exact, the same direction), so T ⊙ g is well scaled."""
    rho, eta = 0.2, 0.01
    params = {"a": jnp.zeros(3), "b": jnp.array([500.0, -1000.0])}
    grads = {"a": jnp.array([1.0, -2.0, 0.5]) * 1e30,
             "b": jnp.array([3.0, 0.25]) * 1e30}
    tx = sam_optax.asam(optax.sgd(1.0), rho, eta=eta)
    seen = {}

    def grad_fn(point):
        seen["eps"] = jax.tree.map(jnp.subtract, point, params)
        return grads

    tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
    t = {k: np.abs(np.asarray(v, np.float64)) + eta for k, v in params.items()}
    g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
    tg_norm = np.sqrt(sum(np.sum((t[k] * g[k]) ** 2) for k in g))
    for k in g:
        expected = rho * t[k] ** 2 * g[k] / tg_norm
        np.testing.assert_allclose(seen["eps"][k], expected, rtol=1e-5,
                                   atol=1e-7)


# ---------------------------- MSAM: diagnostics free by default, ‖g‖ opt-in


def _msam_run(full_diagnostics, steps=4, base=None, grads_at=None):
    target = jnp.array([1.0, -2.0, 0.5])
    loss_fn = lambda w: jnp.sum((w - target) ** 2 * jnp.arange(1.0, 4.0))
    base = optax.sgd(0.1, momentum=0.9) if base is None else base
    tx = sam_optax.msam(base, rho=0.3, full_diagnostics=full_diagnostics)
    params = jnp.zeros(3)
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    records = []
    for t in range(steps):
        grads = jax.grad(loss_fn)(params)
        if grads_at is not None and t in grads_at:
            grads = grads_at[t]
        updates, state = step(params, state, grads)
        params = optax.apply_updates(params, updates)
        records.append((np.asarray(grads, np.float64),
                        np.asarray(state.ascent_state.perturbation, np.float64),
                        sam_optax.diagnostics(state)))
    return records


def test_msam_default_diagnostics_are_free_and_right():
    for _, epsilon, diag in _msam_run(full_diagnostics=False):
        # ‖ε_{t+1}‖ (the perturbation the returned params carry) is ρ:
        # known from the normalisation, not measured.
        np.testing.assert_allclose(float(diag.perturbation_norm),
                                   np.linalg.norm(epsilon), rtol=1e-6)
        np.testing.assert_allclose(float(diag.perturbation_norm), 0.3,
                                   rtol=1e-6)
        assert float(diag.grad_norm) == 0.0  # not recorded: opt-in
        assert not bool(diag.perturbed)


def test_msam_full_diagnostics_record_the_gradient_norm():
    lean = _msam_run(full_diagnostics=False)
    for (grads, epsilon, diag), (_, lean_eps, lean_diag) in zip(
            _msam_run(full_diagnostics=True), lean):
        np.testing.assert_allclose(float(diag.grad_norm),
                                   np.linalg.norm(grads), rtol=1e-6)
        # The same trajectory and the same ‖ε‖ as without them.
        np.testing.assert_array_equal(epsilon, lean_eps)
        assert float(diag.perturbation_norm) == float(
            lean_diag.perturbation_norm)


def test_msam_perturbation_norm_is_zero_with_a_nonfinite_update_and_kept_on_a_skip():
    bad = {1: jnp.array([1.0, np.nan, 0.0])}
    # A non-finite gradient reaches the base step: ε_{t+1} = 0, and says so.
    records = _msam_run(False, steps=2, grads_at=bad)
    np.testing.assert_array_equal(records[1][1], 0.0)
    assert float(records[1][2].perturbation_norm) == 0.0
    # apply_if_finite rejects the step: ε and its norm are kept.
    records = _msam_run(False, steps=2, grads_at=bad,
                        base=optax.apply_if_finite(
                            optax.sgd(0.1, momentum=0.9), 5))
    np.testing.assert_array_equal(records[1][1], records[0][1])
    assert float(records[1][2].perturbation_norm) == pytest.approx(0.3,
                                                                  rel=1e-6)


def _flops(init, step):
    state = jax.eval_shape(init, PARAMS)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        PARAMS, state, BATCH).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"]


def test_msam_default_step_does_no_diagnostic_pass():
    """FLOPs per parameter over the hand-written MSAM step: the safe norm of
    the update (two rescaled sums instead of one plain sum) and its select,
    ~8; the plain norms of g and ε it used to add every step were 4 more.
    ``full_diagnostics=True`` adds ‖g‖'s two sums."""
    n = P // 4
    hand = _flops(*bench_memory.hand_msam())
    lean = _flops(*bench_memory.library_step(
        sam_optax.msam(bench_memory.BASE, 0.3)))
    full = _flops(*bench_memory.library_step(
        sam_optax.msam(bench_memory.BASE, 0.3, full_diagnostics=True)))
    assert (lean - hand) / n <= 8.5, (lean - hand) / n
    assert (full - lean) / n >= 4.0, (full - lean) / n

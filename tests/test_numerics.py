"""Safe norms, normalisation, cosine and masks against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sam_optax import numerics

_normalize = jax.jit(numerics.safe_normalize)
_cosine = jax.jit(numerics.cosine_similarity)


# Norms from ~1e-32 to ~1e30 (see numerics: 1e-33 to 1e31 is the promise).
@given(seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-32.5, 30.2))
# Entries near 1e-33 once lost 1e-4 of the norm to flushed subnormal squares;
# norms above 8e37 once gave a zero direction (1/‖g‖ flushed to zero).
@example(seed=139, log_scale=-32.5)
@example(seed=2597, log_scale=30.2)
@settings(deadline=None)
def test_normalize_matches_float64_at_any_scale(seed, log_scale):
    rng = np.random.RandomState(seed)
    tree = {"a": rng.randn(7), "b": rng.randn(3, 2), "c": rng.randn()}
    tree = jax.tree.map(lambda x: np.asarray(x * 10.0 ** log_scale, np.float32), tree)
    unit, norm = _normalize(tree)
    flat = np.concatenate([np.ravel(x).astype(np.float64)
                           for x in jax.tree.leaves(tree)])
    expected_norm = np.linalg.norm(flat)
    np.testing.assert_allclose(float(norm), expected_norm, rtol=1e-5)
    got = np.concatenate([np.ravel(x) for x in jax.tree.leaves(unit)])
    np.testing.assert_allclose(got, flat / expected_norm, rtol=1e-5, atol=1e-7)


def test_zero_tree_gives_zero_direction_and_norm():
    unit, norm = _normalize({"a": jnp.zeros(3), "b": jnp.zeros((0,))})
    assert float(norm) == 0.0
    np.testing.assert_array_equal(unit["a"], 0.0)
    assert unit["b"].shape == (0,)


@pytest.mark.parametrize("value", [1e-39, 1e-37, 1e36, 3e38])
def test_norms_outside_the_range_are_defined(value):
    # Below ~1e-33 the rescaled squares reach float32's subnormals (XLA:CPU
    # flushes them to zero, giving a zero direction; the GPU keeps a few
    # digits, giving a direction within ~1e-3); above ~1e31 both sums
    # overflow. Never a NaN, never longer than a unit vector, and an
    # infinite norm only above the range.
    tree = {"a": jnp.full(4, value, jnp.float32)}
    unit, norm = _normalize(tree)
    assert not np.isnan(float(norm))
    assert np.isinf(float(norm)) == (value > 1e31)
    direction = np.asarray(unit["a"])
    assert np.all(direction == 0.0) or np.allclose(direction, 0.5, rtol=1e-3)
    if value > 1e31:
        np.testing.assert_array_equal(direction, 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_constant_zero_gradient_under_jit_is_zero_not_nan(dtype):
    # A gradient XLA knows at compile time is constant-folded through the
    # rescaling; the squared factors must stay finite for 0 · c² to be 0.
    with jax.enable_x64(dtype == jnp.float64):
        norm = jax.jit(lambda w: numerics.global_norm({"w": w * 0.0}))(
            jnp.ones(3, dtype))
    assert float(norm) == 0.0


def test_mask_selects_leaves_for_norm_and_direction():
    tree = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([100.0])}
    unit, norm = numerics.safe_normalize(tree, {"a": True, "b": False})
    np.testing.assert_allclose(float(norm), 5.0)
    np.testing.assert_allclose(unit["a"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(unit["b"], 0.0)
    # Nothing selected: zero, not NaN.
    unit, norm = numerics.safe_normalize(tree, {"a": False, "b": False})
    assert float(norm) == 0.0 and float(jnp.abs(unit["a"]).sum()) == 0.0


def test_norms_take_every_mask_form():
    """The norm resolves masks through sam_optax.masks: np.bool_ leaves and
    prefixes select like Python bools (they were once ignored/refused)."""
    tree = {"a": {"x": jnp.array([3.0]), "y": jnp.array([4.0])},
            "b": jnp.array([100.0])}
    for mask in ({"a": {"x": True, "y": True}, "b": False},
                 {"a": np.True_, "b": np.False_},
                 {"a": jnp.asarray(True), "b": np.array(False)}):
        unit, norm = numerics.safe_normalize(tree, mask)
        np.testing.assert_allclose(float(norm), 5.0)
        np.testing.assert_allclose(unit["a"]["y"], [0.8], rtol=1e-6)
        np.testing.assert_array_equal(unit["b"], 0.0)
        np.testing.assert_allclose(float(numerics.sum_of_squares(tree, mask)),
                                   25.0)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("jit", [False, True])
def test_nonfinite_entry_gives_zero_direction(bad, jit):
    """inf·0 would be NaN: the direction is exactly zero instead, the norm
    says what happened (inf, or NaN), and ``usable`` is False."""
    tree = {"a": jnp.array([1.0, bad, 2.0]), "b": jnp.ones((2, 2))}
    def normalize(tree, mask, scale):
        fn = lambda t: numerics.normalize(t, mask, scale)  # noqa: E731
        return (jax.jit(fn) if jit else fn)(tree)

    result = normalize(tree, None, 0.5)
    for leaf in jax.tree.leaves(result.direction):
        np.testing.assert_array_equal(leaf, 0.0)
    assert not bool(result.usable)
    assert np.isnan(float(result.norm)) == np.isnan(bad)
    assert np.isinf(float(result.norm)) == np.isinf(bad)
    assert not bool(numerics.all_finite(tree))
    # Outside the mask it does not matter.
    result = normalize(tree, {"a": False, "b": True}, 0.5)
    np.testing.assert_allclose(result.direction["b"], 0.25, rtol=1e-6)
    assert bool(result.usable)
    assert bool(numerics.all_finite(tree, {"a": False, "b": True}))


def test_python_scalar_leaves():
    tree = {"a": 3.0, "b": jnp.array([4.0])}
    unit, norm = numerics.safe_normalize(tree)
    np.testing.assert_allclose(float(norm), 5.0)
    np.testing.assert_allclose(float(unit["a"]), 0.6, rtol=1e-6)
    assert numerics.zeros_like_compute(tree)["a"].shape == ()
    out = numerics.add_perturbation(tree, {"a": jnp.asarray(0.5),
                                           "b": jnp.zeros(1)})
    assert float(out["a"]) == 3.5 and out["a"].dtype == jnp.float32
    assert numerics.cast_like({"a": jnp.ones(()), "b": jnp.ones(1)},
                              tree)["a"].dtype == jnp.float32


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_cosine_at_extreme_scales(scale):
    a = {"x": jnp.array([1.0, 0.0, 1.0]) * scale}
    b = {"x": jnp.array([1.0, 1.0, 0.0]) * scale}
    np.testing.assert_allclose(float(_cosine(a, b)), 0.5, rtol=1e-5)
    assert float(_cosine(a, {"x": jnp.zeros(3)})) == 0.0


def test_bf16_sum_is_accumulated_in_float32():
    tree = {"w": jnp.full((4096,), 1.0, jnp.bfloat16)}
    # bf16 accumulation would stall at 256; float32 gets 4096 exactly.
    assert numerics.sum_of_squares(tree).dtype == jnp.float32
    assert float(numerics.sum_of_squares(tree)) == 4096.0
    unit, _ = numerics.safe_normalize(tree)
    assert unit["w"].dtype == jnp.float32


def test_add_perturbation_keeps_dtypes_and_skips_integers():
    params = {"w": jnp.ones(2, jnp.bfloat16), "step": jnp.array(3, jnp.int32)}
    eps = {"w": jnp.full(2, 0.5, jnp.float32), "step": jnp.zeros((), jnp.float32)}
    out = numerics.add_perturbation(params, eps)
    assert out["w"].dtype == jnp.bfloat16 and out["step"].dtype == jnp.int32
    np.testing.assert_allclose(np.asarray(out["w"], np.float32), 1.5)
    assert int(out["step"]) == 3

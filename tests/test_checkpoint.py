"""Orbax round trips: a resumed run continues bit-identically.

Covered: every SAM variant that carries state (through the shared SAMState),
a Linen TrainState with batch statistics (also restored in a fresh process),
and an NNX model + optimizer with BatchStat and RNG state.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_linen import MODEL as LINEN_MODEL
from test_linen import _data
from test_linen import loss_fn as linen_loss_fn
from test_nnx import Net as NnxNet
from test_nnx import loss_fn as nnx_loss_fn

import sam_optax
from sam_optax import checkpoint

STEPS_BEFORE, STEPS_AFTER = 3, 5

# Constructors whose state may hold more than the base optimizer's; names not
# (yet) in sam_optax are skipped, stateless ones are covered by `sam`.
VARIANTS = ["sam", "looksam", "vasso", "friendly_sam", "every_k_sam", "esam",
            "ae_sam", "fisher_sam", "msam", "random_sam", "multistep_sam",
            "asam", "gsam", "wsam", "wsam_decoupled"]
# Variants that are a constructor with arguments (name -> (constructor, kw)).
CONFIGURED = {"wsam_decoupled": ("wsam", {"decoupled": True,
                                          "learning_rate": 0.1})}


def _assert_identical(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected),
                    strict=True):
        if jnp.issubdtype(jnp.asarray(a).dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def _softmax_problem():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(32, 5)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, size=32))

    def loss(params):
        logits = x @ params["w"] + params["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                               labels).mean()

    params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
              "b": jnp.zeros(3, jnp.float32)}
    return loss, params


def _has_own_state(opt_state) -> bool:
    sam_state = sam_optax.core.find_sam_states(opt_state)[0]
    return bool(jax.tree.leaves((sam_state.ascent_state, sam_state.descent_state,
                                 sam_state.schedule_state)))


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_round_trip_is_bit_identical(name, tmp_path):
    constructor, kwargs = CONFIGURED.get(name, (name, {}))
    if not hasattr(sam_optax, constructor):
        pytest.skip(f"sam_optax.{constructor} does not exist yet")
    tx = getattr(sam_optax, constructor)(optax.sgd(0.1, momentum=0.9), **kwargs)
    loss, params = _softmax_problem()
    state = {"params": params, "opt_state": tx.init(params)}
    if name != "sam" and not _has_own_state(state["opt_state"]):
        pytest.skip(f"{name} keeps no state of its own (covered by sam)")

    @jax.jit
    def step(state):
        value, grads = jax.value_and_grad(loss)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"],
                                       state["params"],
                                       grad_fn=jax.value_and_grad(loss),
                                       value=value)
        return {"params": optax.apply_updates(state["params"], updates),
                "opt_state": opt_state}

    for _ in range(STEPS_BEFORE):
        state = step(state)
    checkpoint.save(tmp_path / "ckpt", state)
    # A target with other values: restore must overwrite every leaf.
    target = {"params": jax.tree.map(jnp.zeros_like, params),
              "opt_state": tx.init(jax.tree.map(jnp.zeros_like, params))}
    resumed = checkpoint.restore(tmp_path / "ckpt", target)
    _assert_identical(resumed, state)
    for _ in range(STEPS_AFTER):
        state, resumed = step(state), step(resumed)
    _assert_identical(resumed, state)


# One optimizer object for every state: `tx` is a static field, so a state
# restored into a target built with the same `tx` reuses the compiled step.
_LINEN_TX = sam_optax.sam(optax.adam(1e-2), rho=0.1)


def _linen_state(seed):
    x, _ = _data()
    variables = LINEN_MODEL.init(jax.random.key(seed), x, train=False)
    return sam_optax.linen.TrainState.create(
        apply_fn=LINEN_MODEL.apply, params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=_LINEN_TX)


_LINEN_STEP = jax.jit(sam_optax.linen.train_step(linen_loss_fn))
_KEY = 17


def _run_linen(state, steps):
    for _ in range(steps):
        state, _ = _LINEN_STEP(state, _data(), jax.random.key(_KEY))
    return state


def resume_linen_and_save(directory, output):
    """Entry point of the fresh process: restore, continue, dump the leaves."""
    state = _run_linen(checkpoint.restore(directory, _linen_state(seed=1)),
                       STEPS_AFTER)
    leaves = {str(i): np.asarray(leaf)
              for i, leaf in enumerate(jax.tree.leaves(state))}
    np.savez(output, **leaves)


def test_linen_round_trip_in_process_and_fresh_process(tmp_path):
    state = _run_linen(_linen_state(seed=0), STEPS_BEFORE)
    checkpoint.save(tmp_path / "ckpt", state)
    resumed = checkpoint.restore(tmp_path / "ckpt", _linen_state(seed=1))
    expected = _run_linen(state, STEPS_AFTER)
    # Compare the array fields (`tx` and `apply_fn` are static and come from
    # the target: equal in behaviour, distinct objects).
    arrays = lambda s: (s.step, s.params, s.opt_state, s.batch_stats)
    _assert_identical(arrays(_run_linen(resumed, STEPS_AFTER)), arrays(expected))
    assert int(expected.step) == STEPS_BEFORE + STEPS_AFTER

    tests_dir = os.path.dirname(os.path.abspath(__file__))
    output = tmp_path / "fresh.npz"
    code = (f"import sys; sys.path.insert(0, {tests_dir!r}); "
            "import test_checkpoint as t; "
            f"t.resume_linen_and_save({str(tmp_path / 'ckpt')!r}, {str(output)!r})")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", code], check=True, env=env,
                   timeout=300, cwd=os.path.dirname(tests_dir))
    fresh = np.load(output)
    expected_leaves = jax.tree.leaves(expected)
    assert len(fresh.files) == len(expected_leaves)
    for i, leaf in enumerate(expected_leaves):
        np.testing.assert_array_equal(fresh[str(i)], np.asarray(leaf))


# Variants' own states are covered above; here: BatchStat, RNG keys and counts.
_NNX_TX = sam_optax.sam(optax.adam(1e-2), rho=0.1)


def _nnx_objects(seed):
    model = NnxNet(nnx.Rngs(seed, dropout=seed + 1))
    return model, nnx.Optimizer(model, _NNX_TX, wrt=nnx.Param)


@nnx.jit
def _nnx_step(model, optimizer, x, y):
    loss, grads, grad_fn = sam_optax.nnx.value_and_grad(model, nnx_loss_fn, x, y)
    optimizer.update(model, grads, grad_fn=grad_fn, value=loss)


def test_nnx_round_trip(tmp_path):
    x, y = _data()
    model, optimizer = _nnx_objects(seed=0)
    for _ in range(STEPS_BEFORE):
        _nnx_step(model, optimizer, x, y)
    checkpoint.save(tmp_path / "ckpt", nnx.state((model, optimizer)))
    model2, optimizer2 = _nnx_objects(seed=5)
    restored = checkpoint.restore(tmp_path / "ckpt",
                                  nnx.state((model2, optimizer2)))
    nnx.update((model2, optimizer2), restored)
    _assert_identical(nnx.as_pure(nnx.state((model2, optimizer2))),
                      nnx.as_pure(nnx.state((model, optimizer))))
    for _ in range(STEPS_AFTER):
        _nnx_step(model, optimizer, x, y)
        _nnx_step(model2, optimizer2, x, y)
    _assert_identical(nnx.as_pure(nnx.state((model2, optimizer2))),
                      nnx.as_pure(nnx.state((model, optimizer))))

"""Data parallelism and m-sharpness (sam_optax.parallel, core axis arguments).

Every parallel path (pmap, shard_map, the jit helper, vmap over chunks) is
checked against an independent float64 NumPy reference that splits the batch
into the same chunks, computes each chunk's ε and perturbed gradient, and
averages them (Foret et al. 2021, section 4: m-sharpness).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from sam_optax import parallel, variants

N_DEV = 8
BATCH = 32
DIM, CLASSES = 5, 3
LR, MOMENTUM, RHO = 0.5, 0.9, 0.2
STEPS = 5


@pytest.fixture(scope="module", autouse=True)
def _eight_devices():
    if jax.device_count() < N_DEV:
        pytest.skip("needs 8 (fake) devices: see conftest.py")


# ----------------------------------------------------------------- problem


def make_problem(seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(BATCH, DIM)
    y = rng.randint(0, CLASSES, BATCH)
    params = {"w": rng.randn(DIM, CLASSES) * 0.3, "b": rng.randn(CLASSES) * 0.1}
    return params, {"x": x, "y": y}


def mean_loss(params, batch):
    logits = batch["x"] @ params["w"] + params["b"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"]))


loss_fn = mean_loss


def as_jax(tree):
    return jax.tree.map(
        lambda a: jnp.asarray(a, jnp.int32 if a.dtype.kind == "i" else
                              jnp.float32), tree)


# ------------------------------------------------- float64 NumPy reference


def np_grad(params, x, y):
    """Gradient of the mean softmax cross-entropy, written by hand."""
    logits = x @ params["w"] + params["b"]
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs[np.arange(len(y)), y] -= 1.0
    probs /= len(y)
    return {"w": x.T @ probs, "b": probs.sum(axis=0)}


def np_norm(tree):
    return np.sqrt(sum(np.sum(v ** 2) for v in tree.values()))


def reference(params, batch, *, groups, chunk=BATCH // N_DEV, steps=STEPS,
              rho=RHO):
    """SGD+momentum on SAM gradients; ε shared inside each group of chunks.

    ``groups`` lists, for each ε, the example indices whose mean gradient
    defines it; every chunk of ``chunk`` examples (one shard) then takes its
    perturbed gradient at the ε of its group, and these are averaged.
    """
    w = {k: v.astype(np.float64).copy() for k, v in params.items()}
    trace = {k: np.zeros_like(v) for k, v in w.items()}
    x, y = batch["x"], batch["y"]
    chunks = np.split(np.arange(BATCH), BATCH // chunk)
    for _ in range(steps):
        epsilon_of = {}
        for group in groups:
            g = np_grad(w, x[group], y[group])
            eps = {k: rho * v / np_norm(g) for k, v in g.items()}
            for i in group:
                epsilon_of[i] = eps
        g_sam = {k: np.zeros_like(v) for k, v in w.items()}
        for shard in chunks:
            eps = epsilon_of[shard[0]]
            gs = np_grad({k: w[k] + eps[k] for k in w}, x[shard], y[shard])
            for k in w:
                g_sam[k] += gs[k] / len(chunks)
        for k in w:
            trace[k] = g_sam[k] + MOMENTUM * trace[k]
            w[k] = w[k] - LR * trace[k]
    return w


def per_chunk_groups():
    return np.split(np.arange(BATCH), N_DEV)


def assert_close(actual, expected, rtol=2e-5, atol=2e-6):
    for k in expected:
        np.testing.assert_allclose(np.asarray(actual[k], np.float64),
                                   expected[k], rtol=rtol, atol=atol,
                                   err_msg=f"leaf {k}")


def max_error(actual, expected):
    return max(float(np.max(np.abs(np.asarray(actual[k]) - expected[k])))
               for k in expected)


def base():
    return optax.sgd(LR, momentum=MOMENTUM)


# -------------------------------------------------------------- the paths
# Compiled steps are cached per configuration and shared between tests: on
# 2 shared CPU cores, compilation is most of the cost of this module.


def grid_mesh():
    return jax.sharding.Mesh(np.asarray(jax.devices()[:N_DEV]).reshape(2, 4),
                             ("group", "inner"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)


MESHES = {
    "auto": lambda: parallel.data_mesh("data"),
    "explicit": lambda: jax.make_mesh(
        (N_DEV,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,)),
    "grid": grid_mesh,
}


TRACES: dict = {}


@functools.cache
def build(path, axis, mesh="auto", **tx_kwargs):
    """``(step, tx)`` for one path; tx_kwargs go to ``sam_optax.sam``."""
    key = (path, axis, mesh, tuple(sorted(tx_kwargs.items())))
    tx_kwargs = {k: (list(map(list, v)) if k.endswith("groups") else v)
                 for k, v in tx_kwargs.items()}
    tx = sam_optax.sam(base(), RHO, axis_name=axis, **tx_kwargs)
    TRACES[key] = 0

    def loss_fn(params, batch):  # counts traces: each one is a compilation
        TRACES[key] += 1
        return mean_loss(params, batch)

    if path == "pmap":
        step = parallel.pmap_step(tx, loss_fn, axis_name=axis)
    elif path == "shard_map":
        step = jax.jit(parallel.shard_map_step(tx, loss_fn, MESHES[mesh](), axis))
    elif path == "jit_helper":
        step = parallel.data_parallel_step(tx, loss_fn, MESHES[mesh](), axis)
    else:
        step = jax.jit(parallel.chunked_step(tx, loss_fn, int(path[6:]), axis))
    return step, tx


def run(path, params, batch, steps=STEPS, *, mesh="auto", **config):
    """Train ``steps`` SAM steps on one path; returns replica-0 params, state."""
    step, tx = build(path, mesh=mesh, **config)
    p, s, b = as_jax(params), tx.init(as_jax(params)), as_jax(batch)
    if path == "pmap":
        p, s = parallel.replicate(p), parallel.replicate(s)
        b = jax.tree.map(lambda a: a.reshape((N_DEV, -1) + a.shape[1:]), b)
    if path == "shard_map":  # placed as the outputs will be: one compilation
        m = MESHES[mesh]()
        p, s = jax.device_put((p, s), NamedSharding(m, P()))
        b = jax.device_put(b, NamedSharding(m, P(config["axis"])))
    for _ in range(steps):
        p, s, _ = step(p, s, b)
    if path == "pmap":
        return jax.tree.map(lambda a: a[0], p), s
    return p, s


PATHS = {  # path -> axis name
    "pmap": "batch", "shard_map": "data", "jit_helper": "data",
    f"chunks{BATCH // N_DEV}": "chunks",
}


# ------------------------------------------------------------------ tests


def test_four_paths_equal_per_chunk_reference():
    params, batch = make_problem()
    expected = reference(params, batch, groups=per_chunk_groups())
    global_eps = reference(params, batch, groups=[np.arange(BATCH)])
    # The test can fail: per-shard ε is measurably not global ε here.
    assert max_error({k: v.astype(np.float32) for k, v in global_eps.items()},
                     expected) > 1e-3
    results = {path: run(path, params, batch, axis=axis)[0]
               for path, axis in PATHS.items()}
    for path, result in results.items():
        assert_close(result, expected)
        for k in expected:  # and with each other
            np.testing.assert_allclose(result[k], results["pmap"][k],
                                       rtol=1e-5, atol=1e-6, err_msg=path)


def test_pmap_replicas_identical_after_20_steps():
    params, batch = make_problem(1)
    step, tx = build("pmap", mesh="auto", axis="batch")
    p = parallel.replicate(as_jax(params))
    s = parallel.replicate(tx.init(as_jax(params)))
    b = jax.tree.map(lambda a: a.reshape((N_DEV, -1) + a.shape[1:]),
                     as_jax(batch))
    for _ in range(20):
        p, s, _ = step(p, s, b)
    for leaf in jax.tree.leaves((p, s)):
        leaf = np.asarray(leaf)
        for replica in leaf[1:]:
            np.testing.assert_array_equal(replica, leaf[0])


def test_jit_helper_outputs_identical_on_every_device_after_20_steps():
    params, batch = make_problem(1)
    step, tx = build("jit_helper", mesh="auto", axis="data")
    p, s = as_jax(params), tx.init(as_jax(params))
    for _ in range(20):
        p, s, _ = step(p, s, as_jax(batch))
    for leaf in jax.tree.leaves((p, s)):
        assert leaf.sharding.is_fully_replicated
        shards = [np.asarray(x.data) for x in leaf.addressable_shards]
        assert len(shards) == N_DEV
        for shard in shards[1:]:
            np.testing.assert_array_equal(shard, shards[0])


def test_sync_perturbation_equals_single_device_full_batch_sam():
    params, batch = make_problem(2)
    expected = reference(params, batch, groups=[np.arange(BATCH)])
    single = sam_optax.sam(base(), RHO)
    p, s = as_jax(params), single.init(as_jax(params))

    @jax.jit
    def step(p, s):
        grad_fn = jax.grad(lambda q: loss_fn(q, as_jax(batch)))
        u, s = single.update(grad_fn(p), s, p, grad_fn=grad_fn)
        return optax.apply_updates(p, u), s

    for _ in range(STEPS):
        p, s = step(p, s)
    assert_close(p, expected)
    result, _ = run("shard_map", params, batch, axis="data",
                    sync_perturbation=True)
    assert_close(result, expected)


def test_grouped_perturbation_pmap_groups_and_mesh_axis():
    params, batch = make_problem(3)
    # Two groups of four devices: ε from each group's mean gradient.
    halves = [np.arange(16), np.arange(16, 32)]
    expected = reference(params, batch, groups=halves)
    result, _ = run("pmap", params, batch, axis="batch",
                    perturbation_axis_name="batch",
                    perturbation_axis_index_groups=((0, 1, 2, 3), (4, 5, 6, 7)))
    assert_close(result, expected)
    # The same groups as the inner axis of a 2-D mesh, under the jit helper.
    result, _ = run("jit_helper", params, batch, axis=("group", "inner"),
                    mesh="grid", perturbation_axis_name="inner")
    assert_close(result, expected)


@pytest.mark.parametrize("path", ["shard_map", "chunks4"])
def test_axis_index_groups_outside_pmap_raise_clearly(path):
    params, batch = make_problem()
    axis = PATHS[path]
    with pytest.raises(ValueError, match="perturbation_axis_name"):
        run(path, params, batch, steps=1, axis=axis,
            perturbation_axis_name=axis,
            perturbation_axis_index_groups=((0, 1, 2, 3), (4, 5, 6, 7)))


def naive_shard_map_step(tx, mesh):
    """What a user would write: jax.grad w.r.t. the replicated params."""

    def step(params, opt_state, batch):
        grad_fn = jax.grad(lambda p: loss_fn(p, batch))
        updates, opt_state = tx.update(grad_fn(params), opt_state, params,
                                       grad_fn=grad_fn)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data")),
                                 out_specs=(P(), P())))


def test_shard_map_summed_gradient_trap_is_caught(monkeypatch):
    params, batch = make_problem()
    expected = reference(params, batch, groups=per_chunk_groups())
    tx = sam_optax.sam(base(), RHO, axis_name="data")
    naive = naive_shard_map_step(tx, parallel.data_mesh("data"))
    with pytest.raises(ValueError, match="pcast"):
        naive(as_jax(params), tx.init(as_jax(params)), as_jax(batch))
    # Without the check the naive step runs and is silently wrong: its
    # gradients are summed over the 8 shards (global ε, an 8x larger step).
    monkeypatch.setattr(sam_optax.core, "check_local_gradients", lambda *a: None)
    p, s = as_jax(params), tx.init(as_jax(params))
    for _ in range(STEPS):
        p, s = naive(p, s, as_jax(batch))
    assert max_error(p, expected) > 1e-2
    # Ours matches the reference (same problem as the four-path test).
    assert_close(run("shard_map", params, batch, axis="data")[0], expected)


def test_transformation_without_axis_name_is_rejected():
    params, batch = make_problem()
    tx = sam_optax.sam(base(), RHO)
    step = jax.jit(parallel.shard_map_step(tx, loss_fn,
                                           parallel.data_mesh("data")))
    with pytest.raises(ValueError, match="axis_name"):
        step(as_jax(params), tx.init(as_jax(params)), as_jax(batch))
    step = jax.jit(parallel.chunked_step(tx, loss_fn, 4, "chunks"))
    with pytest.raises(ValueError, match="axis_name"):
        step(as_jax(params), tx.init(as_jax(params)), as_jax(batch))


def _pmap_inputs(tx, params, batch):
    p = as_jax(params)
    b = jax.tree.map(lambda a: a.reshape((N_DEV, -1) + a.shape[1:]),
                     as_jax(batch))
    return parallel.replicate(p), parallel.replicate(tx.init(p)), b


def test_pmap_transformation_without_axis_name_is_rejected():
    """Under pmap nothing types the updates: without the check each replica
    applied its own update and the replicas drifted apart silently."""
    params, batch = make_problem()
    tx = sam_optax.sam(base(), RHO)
    step = parallel.pmap_step(tx, loss_fn, axis_name="batch")
    with pytest.raises(ValueError, match="(?s)replicas of 'batch'.*"
                       "axis_name='batch'.*drift apart"):
        step(*_pmap_inputs(tx, params, batch))
    # What the check prevents: the replicas no longer agree after one step.
    p, _, _ = step.mapped(*_pmap_inputs(tx, params, batch))
    assert np.max(np.abs(np.asarray(p["w"][1] - p["w"][0]))) > 1e-4


MISMATCH_STEPS = {  # the step's axis is "data" (or "chunks"); the tx's "batch"
    "pmap": lambda tx: parallel.pmap_step(tx, loss_fn, axis_name="data"),
    "shard_map": lambda tx: jax.jit(parallel.shard_map_step(
        tx, loss_fn, parallel.data_mesh("data"), "data")),
    "jit_helper": lambda tx: parallel.data_parallel_step(tx, loss_fn),
    "chunks": lambda tx: jax.jit(parallel.chunked_step(tx, loss_fn, 4)),
}


@pytest.mark.parametrize("path", sorted(MISMATCH_STEPS))
@pytest.mark.parametrize("tx_kwargs", [
    {"axis_name": "batch"},
    {"axis_name": "STEP", "perturbation_axis_name": "batch"}])
def test_axis_name_mismatch_names_both_axes(path, tx_kwargs):
    """Was a bare AssertionError (shard_map) or a NameError pointing to
    shard_map (pmap, vmap): now one ValueError naming both axes."""
    params, batch = make_problem()
    step_axis = "chunks" if path == "chunks" else "data"
    tx_kwargs = {k: step_axis if v == "STEP" else v for k, v in tx_kwargs.items()}
    tx = sam_optax.sam(base(), RHO, **tx_kwargs)
    step = MISMATCH_STEPS[path](tx)
    args = ((_pmap_inputs(tx, params, batch)) if path == "pmap" else
            (as_jax(params), tx.init(as_jax(params)), as_jax(batch)))
    with pytest.raises(ValueError, match=(
            f"(?s)axis 'batch'.* maps over '{step_axis}'.*"
            f"axis_name='{step_axis}'.*axis_name='batch'")):
        step(*args)


@pytest.mark.parametrize("builder", ["shard_map_step", "data_parallel_step"])
def test_step_axis_missing_from_mesh_is_refused_at_build(builder):
    tx = sam_optax.sam(base(), RHO, axis_name="batch")
    with pytest.raises(ValueError, match="(?s)'batch'.*axes: \\('data',\\)"):
        getattr(parallel, builder)(tx, loss_fn, parallel.data_mesh("data"),
                                   "batch")


def test_explicit_mesh_axes_work_with_jit_helper():
    params, batch = make_problem()
    expected = reference(params, batch, groups=per_chunk_groups())
    result, _ = run("jit_helper", params, batch, axis="data", mesh="explicit")
    assert_close(result, expected)


@pytest.mark.parametrize("m", [2])
def test_chunked_step_other_chunk_sizes_match_reference(m):
    params, batch = make_problem(6)
    result, _ = run(f"chunks{m}", params, batch, axis="chunks")
    chunks = np.split(np.arange(BATCH), BATCH // m)
    assert_close(result, reference(params, batch, groups=chunks, chunk=m))


def test_no_retracing_and_stable_state():
    params, batch = make_problem()
    for path, axis in PATHS.items():
        before = run(path, params, batch, steps=1, axis=axis)[1]
        traces = dict(TRACES)
        after = run(path, params, batch, steps=3, axis=axis)[1]
        assert TRACES == traces, path  # no new trace, hence no compilation
        assert (jax.tree.map(lambda a: (a.shape, a.dtype), before)
                == jax.tree.map(lambda a: (a.shape, a.dtype), after))
    # The jitted helpers hold one executable each (no second compilation
    # when the placed outputs come back as inputs).
    helper, _ = build("jit_helper", mesh="auto", axis="data")
    assert helper.jitted._cache_size() == 1


def test_zero_and_tiny_gradient_shards_give_no_nan():
    params, batch = make_problem()
    p0, b = as_jax(params), as_jax(batch)
    # Shard i's loss is scaled by 0 for even i and 1e-30 for odd i: exactly
    # zero gradients on half the shards, underflowing squares on the rest.
    def scaled_loss(p, local):
        scale = local["scale"][0]
        return scale * mean_loss(p, local)

    scales = np.repeat(np.where(np.arange(N_DEV) % 2, 1e-30, 0.0), BATCH // N_DEV)
    b = {**b, "scale": jnp.asarray(scales, jnp.float32)}
    for path in ("shard_map", "chunks"):
        axis = "data" if path == "shard_map" else "chunks"
        tx = sam_optax.sam(base(), RHO, axis_name=axis)
        if path == "shard_map":
            step = parallel.shard_map_step(tx, scaled_loss,
                                           parallel.data_mesh("data"), axis)
        else:
            step = parallel.chunked_step(tx, scaled_loss, BATCH // N_DEV, axis)
        p, s, loss = jax.jit(step)(p0, tx.init(p0), b)
        for leaf in jax.tree.leaves((p, sam_optax.diagnostics(s), loss)):
            assert np.all(np.isfinite(np.asarray(leaf))), path
        for k in params:  # the updates are (numerically) zero
            np.testing.assert_allclose(p[k], p0[k], atol=1e-6, err_msg=path)
        # ε of the tiny shards is still ρ in norm: the normalisation is exact.
        assert np.isclose(float(sam_optax.diagnostics(s).perturbation_norm),
                          RHO / 2, rtol=1e-5), path


def test_split_into_chunks_errors():
    with pytest.raises(ValueError, match="multiple of `chunk_size`"):
        parallel.split_into_chunks({"x": np.zeros((10, 2))}, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        parallel.chunked_step(sam_optax.sam(base()), loss_fn, 0)
    with pytest.raises(ValueError, match="leading"):
        parallel.split_into_chunks({"x": np.zeros((8, 2)),
                                    "y": np.zeros((4,))}, 4)


# -------------------------------------------- every variant, through the core

_NOT_VARIANTS = {"sam"}


def _variant_names():
    return [name for name in getattr(variants, "__all__", [])
            if name not in _NOT_VARIANTS
            and callable(getattr(variants, name, None))]


VARIANT_STEPS = 2


def _variant_tx(name, axis):
    ctor = getattr(variants, name)
    kwargs = {"axis_name": axis}
    if "rho" in inspect.signature(ctor).parameters:
        kwargs["rho"] = RHO
    return ctor(optax.sgd(0.1), **kwargs)


@pytest.fixture(scope="module")
def variant_runs():
    """Every variant trained by shard_map and by vmap-over-chunks.

    All of them in one jitted program (one compilation instead of two per
    variant: compilation dominates on 2 shared cores). Variants that keep
    per-shard state are detected by tracing alone and listed apart.
    """
    params, batch = make_problem(7)
    p0, b = as_jax(params), as_jax(batch)
    mesh = parallel.data_mesh("data")
    paths, per_shard_state = {}, {}
    for name in ["sam", *_variant_names()]:
        tx = _variant_tx(name, "data")
        sharded = parallel.shard_map_step(tx, loss_fn, mesh, "data")
        try:
            jax.eval_shape(sharded, p0, tx.init(p0), b)
        except ValueError as err:
            if "per-shard state" not in str(err):
                raise
            per_shard_state[name] = str(err)
            continue
        chunked = parallel.chunked_step(_variant_tx(name, "chunks"), loss_fn,
                                        BATCH // N_DEV, "chunks")
        paths[name] = (tx, sharded, chunked)

    @jax.jit
    def train_all(p0, b):
        out = {}
        for name, (tx, sharded, chunked) in paths.items():
            out[name] = [
                jax.lax.fori_loop(
                    0, VARIANT_STEPS,
                    lambda _, carry, step=step: step(*carry, b)[:2],
                    (p0, tx.init(p0)))[0]
                for step in (sharded, chunked)]
        return out

    return params, train_all(p0, b), per_shard_state


@pytest.mark.parametrize("name", ["sam", *_variant_names()])
def test_every_variant_agrees_across_parallel_paths(name, variant_runs):
    """shard_map and vmap-over-chunks give the same result for every variant.

    Each variant's own update rule is tested against its reference in its
    own module; here we check that the parallel machinery of the core is
    inherited. A variant that keeps per-shard state (e.g. a momentum of the
    local gradient) is rejected clearly outside pmap, and under pmap keeps
    identical parameters on every replica.
    """
    assert "axis_name" in inspect.signature(getattr(variants, name)).parameters
    params, results, per_shard_state = variant_runs
    if name in per_shard_state:
        assert "jax.pmap" in per_shard_state[name]
        step = parallel.pmap_step(_variant_tx(name, "batch"), loss_fn, "batch")
        p0 = as_jax(params)
        p = parallel.replicate(p0)
        s = parallel.replicate(_variant_tx(name, "batch").init(p0))
        b = jax.tree.map(lambda a: a.reshape((N_DEV, -1) + a.shape[1:]),
                         as_jax(make_problem(7)[1]))
        for _ in range(VARIANT_STEPS):
            p, s, _ = step(p, s, b)
        sharded = jax.tree.map(lambda a: np.asarray(a[0]), p)
        for leaf in jax.tree.leaves(p):
            leaf = np.asarray(leaf)
            np.testing.assert_array_equal(leaf[1:], np.broadcast_to(
                leaf[0], leaf[1:].shape))
    else:
        sharded, chunked = results[name]
        for k in params:
            np.testing.assert_allclose(chunked[k], sharded[k], rtol=1e-5,
                                       atol=1e-6, err_msg=f"{name}, leaf {k}")
    moved = max(float(np.max(np.abs(np.asarray(sharded[k]) - params[k])))
                for k in params)
    assert moved > 1e-4  # the steps did something

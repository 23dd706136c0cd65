"""Deciding on the host: `update(..., perturb=)`, `schedule.count_rule`,
`schedule.host_scheduled` and `schedule.decision`, through every step
builder. The host path must give the schedule's own result, with no
conditional in either compiled program."""

from __future__ import annotations

import functools
import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sam_optax
from sam_optax import parallel, schedule

STEPS = 7


def loss_fn(params, batch):
    x, y = batch
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] - y) ** 2)


def make_problem(batch_size=16):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    params = {"w1": jax.random.normal(k1, (5, 8)) * 0.5,
              "b1": jnp.zeros(8),
              "w2": jax.random.normal(k2, (8, 1)) * 0.5}
    batches = [(jax.random.normal(jax.random.fold_in(k3, t), (batch_size, 5)),
                jax.random.normal(jax.random.fold_in(k4, t), (batch_size, 1)))
               for t in range(STEPS)]
    return params, batches


COUNT_BASED = {
    "every_k_sam": lambda **kw: sam_optax.every_k_sam(
        optax.sgd(0.1, momentum=0.9), rho=0.1, k=3, **kw),
    "looksam": lambda **kw: sam_optax.looksam(
        optax.sgd(0.1, momentum=0.9), rho=0.1, k=3, **kw),
    "gsam_every_2": lambda **kw: sam_optax.sharpness_aware(
        optax.adam(0.01), 0.1, ascent=sam_optax.ascent.normalized_ascent(),
        descent=sam_optax.descent.gsam_gradient(0.2),
        schedule=schedule.every_k_steps(2), **kw),
    "sam": lambda **kw: sam_optax.sam(optax.sgd(0.1), rho=0.1, **kw),
}


def assert_trees_equal(a, b):
    # Equal up to the rounding of a differently fused program (1 ulp, grown
    # to ~1e-5 in LookSAM's stored direction, a difference of near-equal
    # vectors); a step on the wrong side of the schedule is off by ~1e-2.
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                   rtol=1e-4, atol=1e-6)


_GRADIENT_PRIMITIVES = {"dot_general", "conv_general_dilated"}


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v


def _has_gradient(jaxpr):
    return any(eqn.primitive.name in _GRADIENT_PRIMITIVES
               or any(_has_gradient(sub) for sub in _sub_jaxprs(eqn))
               for eqn in jaxpr.eqns)


def _conditional_gradients(jaxpr):
    count = 0
    for eqn in jaxpr.eqns:
        subs = list(_sub_jaxprs(eqn))
        if eqn.primitive.name == "cond":
            count += sum(_has_gradient(sub) for sub in subs) > 0
        else:
            count += sum(_conditional_gradients(sub) for sub in subs)
    return count


def conditionals(jitted, *args):
    """How many conditionals hold a gradient (a matrix product) in a branch:
    the schedule's. (The safe norm's scalar branch on CPU holds none.)"""
    return _conditional_gradients(jax.make_jaxpr(jitted)(*args).jaxpr)


# ------------------------------------------------------------- the rule


@pytest.mark.parametrize("make, expected", [
    (lambda: sam_optax.every_k_sam(optax.sgd(0.1), rho=0.1, k=3),
     [True, False, False, True, False, False, True]),
    (lambda: sam_optax.looksam(optax.sgd(0.1), rho=0.1, k=2),
     [True, False, True, False, True, False, True]),
    (lambda: sam_optax.sam(optax.sgd(0.1), rho=0.1), [True] * 7),
    (lambda: sam_optax.asam(optax.sgd(0.1), rho=0.1), [True] * 7),
    (lambda: optax.chain(optax.clip_by_global_norm(1.0), sam_optax.every_k_sam(
        optax.sgd(0.1), rho=0.1, k=2)), [True, False] * 3 + [True]),
    (lambda: optax.inject_hyperparams(sam_optax.looksam, static_args=("k",))(
        optax.sgd(0.1), rho=0.1, k=3), [True, False, False] * 2 + [True]),
    # Not count-based, no schedule, or a guard that may hold the count back.
    (lambda: sam_optax.ae_sam(optax.sgd(0.1), rho=0.1), None),
    (lambda: sam_optax.msam(optax.sgd(0.1), rho=0.1), None),
    (lambda: sam_optax.every_k_sam(optax.apply_if_finite(optax.sgd(0.1), 3),
                                   rho=0.1, k=2), None),
    (lambda: optax.sgd(0.1), None),
])
def test_count_rule(make, expected):
    params, _ = make_problem()
    rule = schedule.count_rule(make(), params)
    if expected is None:
        assert rule is None
    else:
        assert [rule(t) for t in range(7)] == expected


def test_count_rule_under_an_axis_name_needs_no_mapped_axis():
    params, _ = make_problem()
    tx = sam_optax.looksam(optax.sgd(0.1), rho=0.1, k=2, axis_name="data")
    assert schedule.count_rule(tx, params)(3) is False


# ----------------------------------------------- plain update(..., perturb=)


@pytest.mark.parametrize("name", sorted(COUNT_BASED))
def test_host_path_equals_the_schedule_with_no_conditional(name):
    tx = COUNT_BASED[name]()
    params, batches = make_problem()
    default = jax.jit(parallel.train_step(tx, loss_fn))
    host = schedule.host_scheduled(
        lambda flag: jax.jit(parallel.train_step(tx, loss_fn, perturb=flag)),
        schedule.count_rule(tx, params))
    p1 = p2 = params
    s1 = s2 = tx.init(params)
    flags = []
    for batch in batches:
        p1, s1, l1 = default(p1, s1, batch)
        p2, s2, l2 = host(p2, s2, batch)
        flags.append(bool(sam_optax.diagnostics(s2).perturbed))
        assert_trees_equal((p1, s1, l1), (p2, s2, l2))
    rule = schedule.count_rule(tx, params)
    assert flags == [rule(t) for t in range(STEPS)]
    assert host.count == STEPS
    for flag in (True, False):
        assert conditionals(host._steps[flag], p2, s2, batches[0]) == 0
    if name != "sam":  # the default path's schedule does build one
        assert conditionals(default, p1, s1, batches[0]) == 1


def test_host_step_realigns_with_a_restored_state():
    """A state the step did not return (a checkpoint) is read once: the
    schedule's phase follows `state.count`, not the calls made."""
    tx = COUNT_BASED["looksam"]()
    params, batches = make_problem()
    host = schedule.host_scheduled(
        lambda flag: jax.jit(parallel.train_step(tx, loss_fn, perturb=flag)),
        schedule.count_rule(tx, params))
    default = jax.jit(parallel.train_step(tx, loss_fn))
    p_ref, s_ref = params, tx.init(params)
    for batch in batches:
        p_ref, s_ref, _ = default(p_ref, s_ref, batch)
    # Run 2 steps, "checkpoint" after 4 steps of another run, resume it.
    p, s = params, tx.init(params)
    for batch in batches[:2]:
        p, s, _ = host(p, s, batch)
    p, s = params, tx.init(params)
    for batch in batches[:4]:
        p, s, _ = default(p, s, batch)
    p, s = jax.tree.map(np.asarray, (p, s))  # restored: new objects
    for batch in batches[4:]:
        p, s, _ = host(p, s, batch)
    assert host.count == STEPS == schedule.sam_count(s)
    assert_trees_equal((p, s), (p_ref, s_ref))


def test_perturb_overrides_and_flows_through_chain_and_inject_hyperparams():
    params, (batch, *_) = make_problem()
    grad_fn = jax.grad(functools.partial(loss_fn, batch=batch))
    grads = grad_fn(params)
    for tx in (optax.chain(optax.scale(1.0), sam_optax.every_k_sam(
                   optax.sgd(0.1), rho=0.1, k=2)),
               optax.inject_hyperparams(sam_optax.every_k_sam,
                                        static_args=("k",))(
                   optax.sgd(0.1), rho=0.1, k=2)):
        state = tx.init(params)
        skipped, s_skip = tx.update(grads, state, params, grad_fn=grad_fn,
                                    perturb=False)
        paid, s_paid = tx.update(grads, state, params, grad_fn=grad_fn,
                                 perturb=True)
        assert not sam_optax.diagnostics(s_skip).perturbed
        assert sam_optax.diagnostics(s_paid).perturbed
        # The skipped step is the base step on g; the paid one is not.
        base = jax.tree.map(lambda g: -0.1 * g, grads)
        assert_trees_equal(skipped, base)
        assert not np.allclose(paid["w1"], base["w1"])


def test_bad_perturb_is_refused():
    params, (batch, *_) = make_problem()
    grad_fn = jax.grad(functools.partial(loss_fn, batch=batch))
    tx = COUNT_BASED["every_k_sam"]()
    state = tx.init(params)
    with pytest.raises(TypeError, match="`perturb` must be a Python bool"):
        jax.jit(lambda f: tx.update(grad_fn(params), state, params,
                                    grad_fn=grad_fn, perturb=f))(True)
    with pytest.raises(TypeError, match="`perturb` must be a Python bool"):
        tx.update(grad_fn(params), state, params, grad_fn=grad_fn, perturb=1)
    msam = sam_optax.msam(optax.sgd(0.1), rho=0.1)
    with pytest.raises(TypeError, match="MSAM .* no schedule"):
        msam.update(grad_fn(params), msam.init(params), params, perturb=True)
    with pytest.raises(ValueError, match="`rule` is None"):
        schedule.host_scheduled(lambda flag: None, None)


# ------------------------------------------------- AE-SAM in two phases


def test_decision_gives_ae_sam_in_two_phases():
    tx = sam_optax.ae_sam(optax.sgd(0.1, momentum=0.9), rho=0.1, c=0.0,
                          delta=0.5)
    params, batches = make_problem()
    default = jax.jit(parallel.train_step(tx, loss_fn))

    @jax.jit
    def first(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        return loss, grads, schedule.decision(tx, grads, state, params)

    @functools.partial(jax.jit, static_argnames="perturb")
    def second(params, state, batch, loss, grads, perturb):
        updates, state = tx.update(
            grads, state, params, value=loss, perturb=perturb,
            grad_fn=jax.value_and_grad(functools.partial(loss_fn, batch=batch)))
        return optax.apply_updates(params, updates), state

    p1 = p2 = params
    s1 = s2 = tx.init(params)
    flags = []
    for batch in batches:
        p1, s1, _ = default(p1, s1, batch)
        loss, grads, flag = first(p2, s2, batch)
        flags.append(bool(flag))
        p2, s2 = second(p2, s2, batch, loss, grads, perturb=bool(flag))
        np.testing.assert_allclose(np.asarray(p2["w1"]), np.asarray(p1["w1"]),
                                   rtol=1e-6, atol=1e-7)
        assert bool(sam_optax.diagnostics(s1).perturbed) == flags[-1]
    assert True in flags and False in flags  # both phases exercised
    with pytest.raises(ValueError, match="no SAM-type transformation"):
        msam = sam_optax.msam(optax.sgd(0.1), rho=0.1)
        schedule.decision(msam, params, msam.init(params), params)


# ------------------------------------------- parallel, Linen, NNX, trainer


@pytest.mark.parametrize("builder", ["pmap", "data_parallel", "chunked"])
def test_parallel_builders_take_perturb(builder):
    # float64: the all-reduces of two different programs round differently
    # in float32 (LookSAM's direction then differs by ~2e-4 relative).
    with jax.enable_x64(True):
        _parallel_builders_take_perturb(builder)


def _parallel_builders_take_perturb(builder):
    n = 4
    params, batches = jax.tree.map(lambda x: x.astype(jnp.float64),
                                   make_problem(batch_size=16))
    tx = sam_optax.looksam(optax.sgd(0.1), rho=0.1, k=2, axis_name="data")
    if builder == "pmap":
        devices = jax.local_devices()[:n]
        make = lambda flag: parallel.pmap_step(  # noqa: E731
            tx, loss_fn, axis_name="data", devices=devices, perturb=flag)
        place = lambda p, s: (parallel.replicate(p, n),  # noqa: E731
                              parallel.replicate(s, n))
        batches = [jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), b)
                   for b in batches]
    elif builder == "data_parallel":
        mesh = parallel.data_mesh("data", jax.devices()[:n])
        make = lambda flag: parallel.data_parallel_step(  # noqa: E731
            tx, loss_fn, mesh, "data", perturb=flag)
        place = lambda p, s: (p, s)  # noqa: E731
    else:
        make = lambda flag: jax.jit(parallel.chunked_step(  # noqa: E731
            tx, loss_fn, chunk_size=4, axis_name="data", perturb=flag))
        place = lambda p, s: (p, s)  # noqa: E731
    default = make(None)
    host = schedule.host_scheduled(make, schedule.count_rule(tx, params))
    p1, s1 = p2, s2 = place(params, tx.init(params))
    for batch in batches[:5]:
        p1, s1, _ = default(p1, s1, batch)
        p2, s2, _ = host(p2, s2, batch)
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2)),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12)
    assert host.count == 5


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(1)(nn.relu(x))


@pytest.mark.parametrize("batch_stats", ["clean", "perturbed"])
def test_linen_train_step_takes_perturb(batch_stats):
    _, batches = make_problem()
    variables = Net().init(jax.random.key(1), batches[0][0], train=False)
    tx = sam_optax.every_k_sam(optax.sgd(0.1), rho=0.1, k=2)
    state = sam_optax.linen.TrainState.create(
        apply_fn=Net().apply, params=variables["params"],
        batch_stats=variables["batch_stats"], tx=tx)

    def objective(apply, batch):
        return jnp.mean((apply(batch[0], train=True) - batch[1]) ** 2)

    host = schedule.host_scheduled(
        lambda flag: jax.jit(sam_optax.linen.train_step(
            objective, batch_stats=batch_stats, perturb=flag)),
        schedule.count_rule(tx, state.params),
        opt_state=lambda args: args[0].opt_state,
        new_opt_state=lambda args, out: out[0].opt_state)
    key = jax.random.key(2)
    s2 = state
    for batch in batches[:4]:
        s2, _ = host(s2, batch, key)
    if batch_stats == "clean":
        default = jax.jit(sam_optax.linen.train_step(objective))
        s1 = state
        for batch in batches[:4]:
            s1, _ = default(s1, batch, key)
        for a, b in zip(jax.tree.leaves((s1.params, s1.batch_stats, s1.opt_state)),
                        jax.tree.leaves((s2.params, s2.batch_stats, s2.opt_state)),
                        strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                       rtol=1e-6, atol=1e-7)
    else:
        # Paid steps keep the perturbed pass's statistics, skipped steps the
        # clean pass's (they have no other): finite and moving.
        stats = jax.tree.leaves(s2.batch_stats)
        assert all(np.isfinite(np.asarray(x)).all() for x in stats)
    assert int(s2.step) == 4 == host.count


def test_nnx_optimizer_update_takes_perturb():
    _, batches = make_problem()

    def run(host):
        model = nnx.Linear(5, 1, rngs=nnx.Rngs(0))
        tx = sam_optax.looksam(optax.sgd(0.1), rho=0.1, k=2)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

        def loss(model, x, y):
            return jnp.mean((model(x) - y) ** 2)

        @functools.partial(nnx.jit, static_argnames="perturb")
        def step(model, optimizer, x, y, perturb=None):
            grads = nnx.grad(loss)(model, x, y)
            kwargs = {} if perturb is None else {"perturb": perturb}
            optimizer.update(model, grads, grad_fn=sam_optax.nnx.grad_fn(
                model, loss, x, y), **kwargs)

        if host:
            rule = schedule.count_rule(tx, nnx.state(model, nnx.Param))
            step = schedule.host_scheduled(
                lambda flag: functools.partial(step, perturb=flag), rule,
                opt_state=lambda args: args[1].opt_state,
                new_opt_state=lambda args, out: args[1].opt_state)
        for x, y in batches[:5]:
            step(model, optimizer, x, y)
        return nnx.state(model, nnx.Param), step

    default, _ = run(False)
    host_params, host = run(True)
    assert host.count == 5
    for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(host_params),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                   rtol=1e-6, atol=1e-7)


def test_trainer_host_schedule_is_the_same_job_and_resumes(tmp_path):
    pytest.importorskip("ml_collections")
    pytest.importorskip("tensorboardX")
    from sam_optax.train import trainer
    from sam_optax.train.configs import default

    def config(host_schedule):
        c = default.get_config()
        c.mlp.hidden = (16,)
        c.batch_size, c.num_epochs, c.train_size = 32, 2, 160  # 10 steps
        c.num_devices, c.progress_bar = 1, False
        c.checkpoint_every_steps = 3
        c.optimizer, c.looksam.k = "looksam", 3
        c.host_schedule = host_schedule
        return c

    reference = trainer.train_and_evaluate(config(False),
                                           str(tmp_path / "cond"))

    def preempt(step):
        if step == 7:  # one step after a checkpoint, mid-cycle of k = 3
            os.kill(os.getpid(), signal.SIGTERM)

    workdir = str(tmp_path / "host")
    first = trainer.train_and_evaluate(config(True), workdir,
                                       step_callback=preempt)
    assert first.preempted
    resumed = trainer.train_and_evaluate(config(True), workdir)
    assert resumed.step == 10
    for a, b in zip(jax.tree.leaves((resumed.state.params,
                                     resumed.state.opt_state)),
                    jax.tree.leaves((reference.state.params,
                                     reference.state.opt_state)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                   rtol=1e-6, atol=1e-7)

"""SSAM (sparse SAM, Mi et al. 2022): SSAM-F and SSAM-D against float64
NumPy references of the paper's rule, their degenerate cases, the mask's
invariants, dtypes, retracing and bad arguments."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy_reference import PROBLEMS, SGD, norm, tmap
from x64_problems import assert_close64, run_x64, sorted_leaves

import sam_optax

RHO, LR, MOMENTUM = 0.1, 0.2, 0.9
STEPS, INTERVAL, SPARSITY = 12, 4, 0.5


# ------------------------------------------------ the float64 references


def flat(tree):
    """One vector of a dict of arrays (sorted keys, as JAX flattens)."""
    return np.concatenate([x.ravel() for x in sorted_leaves(tree)])


def unflat(vector, like):
    out, start = {}, 0
    for key in sorted(like):
        if isinstance(like[key], dict):
            sub = unflat(vector[start:], like[key])
            size = sum(x.size for x in sorted_leaves(like[key]))
        else:
            size = np.size(like[key])
            sub = vector[start:start + size].reshape(np.shape(like[key]))
        out[key] = sub
        start += size
    return out


def top_k(scores, k):
    """The k largest scores, ties to the lower index (a stable sort)."""
    chosen = np.zeros(scores.shape, bool)
    chosen[np.argsort(-scores, kind="stable")[:k]] = True
    return chosen


def sparse_step(params, g, grad, mask_vector, rho):
    """ε = ρ m ⊙ g/‖g‖ (the whole gradient's norm), g_sam = ∇L(w + ε)."""
    n = norm(g)
    eps = flat(g) * mask_vector * (rho / n if n > 0 else 0.0)
    return grad(tmap(np.add, params, unflat(eps, params)))


def run_ssam_f(problem, steps, sparsity, interval, rho=RHO):
    """Mi et al. 2022, SSAM-F, with the Fisher diagonal summed from the
    squared mini-batch gradients since the last refresh."""
    params = tmap(lambda x: np.asarray(x, np.float64), problem.init)
    base = SGD(LR, MOMENTUM)
    state = base.init(params)
    size = flat(params).size
    k = int(np.floor((1 - sparsity) * size + 1e-9))
    fisher, mask = np.zeros(size), np.zeros(size, bool)
    history, masks = [], []
    for t in range(steps):
        g = problem.grad(params)
        fisher = fisher + flat(g) ** 2
        if t % interval == 0:
            mask, fisher = top_k(fisher, k), np.zeros(size)
        g_sam = sparse_step(params, g, problem.grad, mask, rho)
        upd, state = base.update(g_sam, state)
        params = tmap(np.add, params, upd)
        history.append(params)
        masks.append(mask)
    return history, masks


def run_ssam_d(problem, steps, sparsity, interval, drop_rate, initial_mask,
               drop="gradient", grow="weight"):
    """Mi et al. 2022, SSAM-D with deterministic scores: at a refresh the
    ⌊k·r⌋ perturbed coordinates of smallest drop score leave, as many
    unperturbed ones of largest growth score join."""
    params = tmap(lambda x: np.asarray(x, np.float64), problem.init)
    base = SGD(LR, MOMENTUM)
    state = base.init(params)
    size = flat(params).size
    k = int(np.floor((1 - sparsity) * size + 1e-9))
    swapped = min(int(np.floor(k * drop_rate + 1e-9)), k, size - k)
    mask = initial_mask.copy()
    history, masks = [], []

    def score(kind, g):
        return np.abs(flat(g) if kind == "gradient" else flat(params))

    for t in range(steps):
        g = problem.grad(params)
        if t % interval == 0:
            kept = top_k(np.where(mask, score(drop, g), -1.0), k - swapped)
            grown = top_k(np.where(mask, -1.0, score(grow, g)), swapped)
            assert not np.any(kept & grown)
            mask = kept | grown
        g_sam = sparse_step(params, g, problem.grad, mask, RHO)
        upd, state = base.update(g_sam, state)
        params = tmap(np.add, params, upd)
        history.append(params)
        masks.append(mask)
    return history, masks


def ref_ssam_f(sparsity, interval, rho=RHO):
    """SSAM-F as an ascent reference of ``test_ascent``'s form,
    ``perturbation(g, w, state, problem) -> (ε, state)`` (the composition
    matrix runs it on a changing batch)."""
    def perturbation(g, w, state, problem):
        size = flat(g).size
        t, fisher, mask = (0, np.zeros(size), None) if state is None else state
        fisher = fisher + flat(g) ** 2
        if t % interval == 0:
            k = int(np.floor((1 - sparsity) * size + 1e-9))
            mask, fisher = top_k(fisher, k), np.zeros(size)
        n = norm(g)
        eps = flat(g) * mask * (rho / n if n > 0 else 0.0)
        return unflat(eps, g), (t + 1, fisher, mask)
    return perturbation


def ref_ssam_d(sparsity, interval, drop_rate, seed, drop="gradient",
               grow="weight", rho=RHO):
    """SSAM-D with deterministic scores as an ascent reference; the initial
    mask is the documented draw: ``key, draw = split(PRNGKey(seed))``, the
    k largest of ``uniform(draw, (N,))``."""
    def perturbation(g, w, state, problem):
        size = flat(g).size
        k = int(np.floor((1 - sparsity) * size + 1e-9))
        if state is None:
            _, draw = jax.random.split(jax.random.PRNGKey(seed))
            state = (0, top_k(np.asarray(jax.random.uniform(draw, (size,))), k))
        t, mask = state
        if t % interval == 0:
            swapped = min(int(np.floor(k * drop_rate + 1e-9)), k, size - k)
            score = {"gradient": np.abs(flat(g)), "weight": np.abs(flat(w))}
            kept = top_k(np.where(mask, score[drop], -1.0), k - swapped)
            grown = top_k(np.where(mask, -1.0, score[grow]), swapped)
            mask = kept | grown
        n = norm(g)
        eps = flat(g) * mask * (rho / n if n > 0 else 0.0)
        return unflat(eps, g), (t + 1, mask)
    return perturbation


def base_tx():
    return optax.sgd(LR, momentum=MOMENTUM)


def state_mask(state):
    return flat(jax.tree.map(np.asarray, state.ascent_state.mask))


# ------------------------------------------------------------- references


def test_ssam_f_matches_float64_reference():
    problem = PROBLEMS["mlp"]()
    expected, expected_masks = run_ssam_f(problem, STEPS, SPARSITY, INTERVAL)
    with jax.enable_x64(True):
        states = []
        actual, _ = run_x64(sam_optax.ssam_f(base_tx(), RHO, SPARSITY,
                                             update_interval=INTERVAL),
                            problem, STEPS, states=states)
    assert_close64(actual, expected)
    for t, (state, mask) in enumerate(zip(states, expected_masks, strict=True)):
        np.testing.assert_array_equal(state_mask(state), mask, err_msg=f"{t}")
    # The mask really changes between refreshes and is really sparse.
    assert expected_masks[0].sum() == 15  # ⌊0.5 · 31⌋
    assert not np.array_equal(expected_masks[0], expected_masks[-1])
    # Guard: the rule is visible (the whole gradient's norm, a sparse ε).
    dense, _ = run_ssam_f(problem, STEPS, 0.0, INTERVAL)
    assert norm(tmap(np.subtract, dense[-1], expected[-1])) > 1e-4


def test_ssam_d_matches_float64_reference():
    problem = PROBLEMS["mlp"]()
    with jax.enable_x64(True):
        tx = sam_optax.ssam_d(base_tx(), RHO, 0.6, update_interval=3,
                              drop_rate=0.5, drop_criterion="gradient",
                              growth_criterion="weight", seed=3)
        params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64),
                              problem.init)
        initial = state_mask(tx.init(params))  # the paper's random start
        states = []
        actual, _ = run_x64(tx, problem, STEPS, states=states)
    expected, expected_masks = run_ssam_d(problem, STEPS, 0.6, 3, 0.5, initial)
    assert initial.sum() == 12  # ⌊0.4 · 31⌋
    assert_close64(actual, expected)
    for t, (state, mask) in enumerate(zip(states, expected_masks, strict=True)):
        np.testing.assert_array_equal(state_mask(state), mask, err_msg=f"{t}")
    assert not np.array_equal(initial, expected_masks[0])  # refreshed at t = 0


@functools.cache
def x64_run(name, sparsity):
    make = {"f": lambda s: sam_optax.ssam_f(base_tx(), RHO, s, update_interval=3),
            "d": lambda s: sam_optax.ssam_d(base_tx(), RHO, s, update_interval=3,
                                           seed=1),
            "sam": lambda s: sam_optax.sam(base_tx(), RHO * (1 - s))}[name]
    with jax.enable_x64(True):
        return run_x64(make(sparsity), PROBLEMS["mlp"](), 5)[0]


@pytest.mark.parametrize("name, sparsity", [("f", 0.0), ("d", 0.0), ("f", 1.0)])
def test_no_sparsity_is_sam_and_full_sparsity_is_the_base_step(name, sparsity):
    """s = 0: SAM; s = 1: ε = 0, the base step on g (SAM with ρ = 0)."""
    assert_close64(x64_run(name, sparsity), x64_run("sam", sparsity),
                   rtol=1e-13, atol=1e-15)


# ------------------------------------------------------ mask invariants


def test_random_growth_swaps_within_the_budget():
    """Default SSAM-D (drop by |g|, grow at random, a cosine drop rate):
    exactly k coordinates stay perturbed, the kept ones are the live ones of
    largest |g|, the grown ones were not perturbed before."""
    problem = PROBLEMS["mlp"]()
    schedule = optax.cosine_decay_schedule(0.5, 8)
    tx = sam_optax.ssam_d(optax.sgd(LR), RHO, 0.5, update_interval=2,
                          drop_rate=schedule, seed=7)
    loss = problem.jax_loss
    params = jax.tree.map(jnp.asarray, problem.init)
    params = jax.tree.map(lambda v: v.astype(jnp.float32), params)
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p,
                                          grad_fn=jax.grad(loss)))
    grad = jax.jit(jax.grad(loss))
    swaps = 0
    for t in range(8):
        before = state_mask(state)
        g = flat(jax.tree.map(np.asarray, grad(params)))
        updates, state = step(params, state)
        after = state_mask(state)
        assert after.sum() == 15
        if t % 2:
            np.testing.assert_array_equal(after, before)
            continue
        n = int(np.floor(float(schedule(t)) * 15))
        kept, grown = after & before, after & ~before
        assert grown.sum() == n and kept.sum() == 15 - n
        dropped = before & ~after
        if n and kept.any():
            assert np.abs(g[dropped]).max() <= np.abs(g[kept]).min()
        swaps += n
        params = optax.apply_updates(params, updates)
    assert swaps > 0


def test_leaf_mask_takes_leaves_out_of_the_pool():
    """Only the selected leaves compete for the k = ⌊(1 − s)·N⌋ coordinates
    (N counts them alone); the others hold a scalar False."""
    problem = PROBLEMS["mlp"]()
    keep = {"l1": {"w": True, "b": False}, "l2": False}
    params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), problem.init)
    grad_fn = jax.grad(problem.jax_loss)
    tx = sam_optax.ssam_f(optax.sgd(LR), RHO, 0.5, mask=keep)
    updates, state = jax.jit(lambda p, s: tx.update(
        grad_fn(p), s, p, grad_fn=grad_fn))(params, tx.init(params))
    initial = sam_optax.ssam_d(optax.sgd(LR), RHO, 0.5, mask=keep).init(params)
    for mask in (state.ascent_state.mask, initial.ascent_state.mask):
        assert mask["l1"]["w"].shape == (3, 6) and int(mask["l1"]["w"].sum()) == 9
        for leaf in (mask["l1"]["b"], mask["l2"]["w"], mask["l2"]["b"]):
            assert leaf.shape == () and not bool(leaf)
    assert jax.tree.map(jnp.shape, state.ascent_state.fisher)["l2"]["w"] == ()


# ----------------------------------------------- dtypes, zeros, retracing


@pytest.mark.parametrize("make", [
    lambda: sam_optax.ssam_f(optax.sgd(0.1), RHO, 0.5, update_interval=2,
                             full_diagnostics=True),
    lambda: sam_optax.ssam_d(optax.sgd(0.1), RHO, 0.5, update_interval=2,
                             drop_rate=lambda t: 0.5 / (1.0 + t),
                             full_diagnostics=True)])
def test_zero_gradient_bf16_and_no_retracing(make):
    params = {"k": jnp.ones((3, 2), jnp.bfloat16), "b": jnp.zeros(2, jnp.bfloat16)}
    tx = make()
    zero = lambda p: jax.tree.map(jnp.zeros_like, p)  # noqa: E731
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)
        return tx.update(zero(p), s, p, grad_fn=zero)

    state = tx.init(params)
    for _ in range(5):
        updates, state = step(params, state)
        assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
        assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert len(traces) == 1
    assert float(sam_optax.diagnostics(state).perturbation_norm) == 0.0
    assert int(state.ascent_state.count) == 5


def test_bf16_params_train():
    problem = PROBLEMS["logistic"]()
    loss = lambda p: problem.jax_loss(  # noqa: E731
        jax.tree.map(lambda v: v.astype(jnp.float32), p))
    # (SSAM-D's bf16 path is the zero-gradient test's; its ε is SSAM-F's.)
    for tx in (sam_optax.ssam_f(optax.sgd(0.5), RHO, 0.5, update_interval=3),):
        params = jax.tree.map(lambda v: jnp.asarray(v, jnp.bfloat16),
                              problem.init)
        state = tx.init(params)
        assert state.ascent_state.mask["w"].dtype == jnp.bool_
        step = jax.jit(lambda p, s, tx=tx: tx.update(
            jax.grad(loss)(p), s, p, grad_fn=jax.grad(loss)))
        start = float(loss(params))
        for _ in range(20):
            updates, state = step(params, state)
            params = optax.apply_updates(params, updates)
        assert params["w"].dtype == jnp.bfloat16
        assert float(loss(params)) < start


# ------------------------------------------------------- bad arguments


@pytest.mark.parametrize("argument, name", [
    ({"sparsity": -0.1}, "sparsity"), ({"sparsity": 1.5}, "sparsity"),
    ({"sparsity": "half"}, "sparsity"),
    ({"sparsity": jnp.asarray(0.5)}, "sparsity"),
    ({"update_interval": 0}, "update_interval"),
    ({"update_interval": 2.5}, "update_interval"),
    ({"rho": -0.1}, "rho"), ({"mask": "yes"}, "mask"),
    ({"sync_period": 2}, "sync_period")])
@pytest.mark.parametrize("constructor", [sam_optax.ssam_f, sam_optax.ssam_d])
def test_bad_arguments(constructor, argument, name):
    with pytest.raises((ValueError, TypeError), match=name):
        constructor(optax.sgd(0.1), **argument)


@pytest.mark.parametrize("argument, name", [
    ({"drop_rate": 1.5}, "drop_rate"), ({"drop_rate": "x"}, "drop_rate"),
    ({"drop_criterion": "size"}, "drop_criterion"),
    ({"growth_criterion": "magnitude"}, "growth_criterion"),
    ({"seed": "a"}, "seed")])
def test_bad_dynamic_arguments(argument, name):
    with pytest.raises((ValueError, TypeError), match=name):
        sam_optax.ssam_d(optax.sgd(0.1), **argument)


@pytest.mark.parametrize("make", [sam_optax.ssam_f, sam_optax.ssam_d])
def test_a_per_shard_mask_is_seen_as_per_shard_state(make):
    """JAX's sort forgets that per-shard scores vary across shards; the mask
    built from it must still count as per-shard state under shard_map (else
    one shard's mask would silently replace the others')."""
    from sam_optax import parallel

    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    loss = lambda p, x: jnp.mean((x @ p["w"] + p["b"]) ** 2)  # noqa: E731
    tx = make(optax.sgd(0.1), rho=0.1, sparsity=0.5, update_interval=2,
              axis_name="data")
    mesh = parallel.data_mesh("data", jax.devices()[:2])
    step = parallel.shard_map_step(tx, loss, mesh, "data")
    with pytest.raises(ValueError, match="per-shard state"):
        jax.eval_shape(step, params, tx.init(params), jnp.ones((8, 4)))

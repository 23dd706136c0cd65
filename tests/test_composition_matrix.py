"""The composition matrix (issue 11): every public constructor, composed the
ways users compose it, gives its float64 reference's result or a clear error.

Axes, combined (not multiplied out) to keep the compile count small:

* constructors × wrappers, float32: alone (against the float64 reference of
  the paper's formula), ``optax.chain`` on either side, ``apply_if_finite``
  on either side and ``inject_hyperparams`` (each equal to alone),
  ``C(MultiSteps(base))`` (against an accumulation reference) and
  ``MultiSteps(C)`` (refused);
* constructors × dtypes, alone: bfloat16, float16, float64 under x64;
* constructors × degenerate gradients × {alone, both ``apply_if_finite``
  orders}: a zero, tiny, huge, inf-entry or NaN-entry gradient at one step.

The problem is :class:`composition_reference.BatchProblem`: two leaves, a new
mini-batch at every step (so that wrappers mixing micro-batches are told
apart). Each case's step is jitted once (cached per constructor, wrapper and
dtype) and reused by every test that needs it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import composition_reference as ref
import descent_schedule_reference as dsr
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import test_ascent
import test_ssam
from numpy_reference import SGD, norm, tmap

import sam_optax

RHO = test_ascent.RHO  # the ascent references of test_ascent have it built in
LR, MOMENTUM = 0.1, 0.9
STEPS = 6
MULTISTEPS_K = 3  # two base updates over the six micro-batches
PROBLEM = ref.BatchProblem()
BATCHES = PROBLEM.batches(STEPS)
# Steps 2 and 3: a paid and a skipped step of the k = 2 schedules.
DEGENERATE_POSITIONS = (2, 3)
KINDS = ("zero", "tiny", "huge", "inf", "nan")
# Per-step error ≤ tol · max(‖reference‖, 1), from each dtype's unit roundoff
# u over six steps (bf16/f16 params are rounded at every step): ~5u for
# bf16 (u = 2⁻⁸), ~8u for f16 (u = 2⁻¹¹); float32 and float64 take more
# units (LookSAM's reuse amplifies rounding), far below any method's effect.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 4e-3,
             "float64": 1e-10}
# "Equal to alone": the same method through another program; XLA may fuse
# the arithmetic differently, so float32 rounding, not bit equality.
SAME_RUN_TOLERANCE = 5e-6


def base() -> optax.GradientTransformation:
    return optax.sgd(LR, momentum=MOMENTUM)


class Method(NamedTuple):
    """A public constructor with the hyperparameters the matrix uses.

    Attributes:
      constructor: the public constructor.
      kwargs: its arguments besides ``base_tx`` (ρ included).
      reference: its float64 reference.
      static_args: what ``optax.inject_hyperparams`` must keep static.
      ascent_uses_g: whether ε depends on g (then a degenerate g gives
        ε = 0); not for a random direction, nor MSAM's ε (from the update).
      ascent_from_average: ε normalises an average of past gradients
        (friendly SAM, VaSSO): a zero or tiny g alone leaves it nonzero, as
        the papers' formula says; only a non-finite or huge one zeroes it.
      accumulates: whether ``C(optax.MultiSteps(base))`` is supported (MSAM
        and decoupled WSAM move the params every micro-batch: refused).
      accumulates_outside: whether ``optax.MultiSteps(C(base))`` is right
        (MSAM only: every micro-batch gradient is taken at the same
        perturbed params, so MSAM on their mean is MSAM on the big batch).
    """

    constructor: Callable[..., optax.GradientTransformation]
    kwargs: dict
    reference: ref.Reference
    static_args: tuple = ()
    ascent_uses_g: bool = True
    ascent_from_average: bool = False
    accumulates: bool = True
    accumulates_outside: bool = False

    def build(self, base_tx) -> optax.GradientTransformation:
        return self.constructor(base_tx, **self.kwargs)


def _ascent(make_perturbation) -> ref.Reference:
    return ref.Reference(direction=ref.ascent_direction(make_perturbation, RHO))


def _direction(make) -> ref.Reference:
    return ref.Reference(direction=make)


# AE-SAM: c and δ chosen so that both branches occur on these batches (the
# reference test checks it).
AE_C, AE_DELTA = 1.0, 0.5

METHODS = {
    "sam": Method(sam_optax.sam, {"rho": RHO}, _direction(ref.sam_direction)),
    # The matrix's params are vectors, which centralization leaves as they
    # are: GCSAM is SAM here (its own reference test is tests/test_gcsam.py).
    "gcsam": Method(sam_optax.gcsam, {"rho": RHO}, _direction(ref.sam_direction)),
    "asam": Method(sam_optax.asam, {"rho": RHO, "eta": 0.05},
                   _ascent(lambda: test_ascent.ref_asam(0.05))),
    "fisher_sam": Method(sam_optax.fisher_sam, {"rho": RHO, "eta": 3.0},
                         _ascent(lambda: test_ascent.ref_fisher(3.0))),
    "friendly_sam": Method(sam_optax.friendly_sam,
                           {"rho": RHO, "sigma": 0.8, "lmbda": 0.6},
                           _ascent(lambda: test_ascent.ref_friendly(0.8, 0.6)),
                           ascent_from_average=True),
    "vasso": Method(sam_optax.vasso, {"rho": RHO, "theta": 0.3},
                    _ascent(lambda: test_ascent.ref_vasso(0.3)),
                    ascent_from_average=True),
    "random_sam": Method(sam_optax.random_sam, {"rho": RHO, "seed": 5},
                         _ascent(lambda: test_ascent.ref_random(5, PROBLEM.init)),
                         static_args=("seed",), ascent_uses_g=False),
    "multistep_sam": Method(sam_optax.multistep_sam, {"rho": RHO, "steps": 3},
                            _ascent(lambda: test_ascent.ref_multistep(3)),
                            static_args=("steps",)),
    "esam": Method(sam_optax.esam, {"rho": RHO, "beta": 0.5, "seed": 5},
                   _ascent(lambda: test_ascent.ref_esam(5, 0.5, PROBLEM.init)),
                   static_args=("seed",)),
    "ssam_f": Method(sam_optax.ssam_f,
                     {"rho": RHO, "sparsity": 0.5, "update_interval": 2},
                     _ascent(lambda: test_ssam.ref_ssam_f(0.5, 2)),
                     static_args=("sparsity", "update_interval")),
    "ssam_d": Method(sam_optax.ssam_d,
                     {"rho": RHO, "sparsity": 0.5, "update_interval": 2,
                      "drop_rate": 0.5, "growth_criterion": "weight",
                      "seed": 5},
                     _ascent(lambda: test_ssam.ref_ssam_d(0.5, 2, 0.5, 5)),
                     static_args=("sparsity", "update_interval", "seed")),
    "gsam": Method(sam_optax.gsam, {"rho": RHO, "alpha": 0.3},
                   _direction(lambda: dsr.gsam_direction(0.3))),
    "wsam": Method(sam_optax.wsam, {"rho": RHO, "gamma": 0.8},
                   _direction(lambda: dsr.wsam_coupled_direction(0.8))),
    "wsam_decoupled": Method(sam_optax.wsam,
                             {"rho": RHO, "gamma": 0.8, "decoupled": True,
                              "learning_rate": LR},
                             ref.wsam_decoupled(0.8, LR), accumulates=False),
    "looksam": Method(sam_optax.looksam, {"rho": RHO, "k": 2, "alpha": 0.7},
                      _direction(lambda: dsr.looksam_direction(2, 0.7)),
                      static_args=("k",)),
    "every_k_sam": Method(sam_optax.every_k_sam, {"rho": RHO, "k": 2},
                          _direction(lambda: dsr.every_k_direction(2)),
                          static_args=("k",)),
    "ae_sam": Method(sam_optax.ae_sam,
                     {"rho": RHO, "c": AE_C, "delta": AE_DELTA},
                     _direction(lambda: dsr.ae_sam_direction(lambda t: AE_C,
                                                             AE_DELTA))),
    "msam": Method(sam_optax.msam, {"rho": RHO}, ref.msam(LR, MOMENTUM),
                   ascent_uses_g=False, accumulates=False,
                   accumulates_outside=True),
}
NAMES = list(METHODS)
ACCUMULATING = [n for n in NAMES if METHODS[n].accumulates]
NOT_ACCUMULATING = [n for n in NAMES if not METHODS[n].accumulates]
WITH_STATIC_ARGS = [n for n in NAMES if METHODS[n].static_args]


def _inject(method: Method, base_tx) -> optax.GradientTransformation:
    return optax.inject_hyperparams(
        method.constructor, static_args=method.static_args)(base_tx,
                                                            **method.kwargs)


WRAPPERS: dict[str, Callable[[Method, Any], optax.GradientTransformation]] = {
    "alone": lambda m, b: m.build(b),
    "chain_C_identity": lambda m, b: optax.chain(m.build(b), optax.identity()),
    "chain_identity_C": lambda m, b: optax.chain(optax.identity(), m.build(b)),
    "C_of_multisteps": lambda m, b: m.build(optax.MultiSteps(
        b, every_k_schedule=MULTISTEPS_K).gradient_transformation()),
    "multisteps_of_C": lambda m, b: optax.MultiSteps(
        m.build(b), every_k_schedule=MULTISTEPS_K),
    "C_of_apply_if_finite": lambda m, b: m.build(
        optax.apply_if_finite(b, max_consecutive_errors=3)),
    "apply_if_finite_of_C": lambda m, b: optax.apply_if_finite(
        m.build(b), max_consecutive_errors=3),
    "inject_hyperparams": _inject,
}
GUARDS = ("C_of_apply_if_finite", "apply_if_finite_of_C")

# ------------------------------------------------------------------ running


def _x64(dtype: str):
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def _step_fn(tx) -> Callable:
    """One training step of ``tx`` on a batch, jitted once."""
    @jax.jit
    def step(params, state, batch):
        grad_fn = jax.grad(lambda p: PROBLEM.jax_loss(p, batch))
        updates, state = tx.update(grad_fn(params), state, params,
                                   grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state
    return step


@functools.cache
def compiled(name: str, wrapper: str, dtype: str) -> tuple[Any, Callable]:
    """``(tx, step)`` of one case; ``dtype`` keys the cache (a float64 step
    is traced, and must be called, under x64)."""
    tx = WRAPPERS[wrapper](METHODS[name], base())
    return tx, _step_fn(tx)


class Run(NamedTuple):
    history: list       # params after each step, as float64 NumPy dicts
    diagnostics: list   # sam_optax.diagnostics after each step (NumPy)
    params: Any         # the final params, in their own dtype
    state: Any          # the final optimizer state

    @property
    def perturbed(self) -> list[bool]:
        return [bool(d.perturbed) for d in self.diagnostics]


def run(name: str, wrapper: str, batches, dtype: str = "float32") -> Run:
    """Iterate one case over ``batches``; the caller sets x64 for float64."""
    tx, step = compiled(name, wrapper, dtype)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), PROBLEM.init)
    batch_dtype = jnp.promote_types(dtype, jnp.float32)
    state = tx.init(params)
    history, diagnostics = [], []
    for batch in batches:
        params, state = step(params, state, batch.as_jax(batch_dtype))
        history.append(jax.tree.map(lambda x: np.asarray(x, np.float64), params))
        # Also checks that diagnostics finds the SAM state in every wrapper.
        diagnostics.append(jax.tree.map(np.asarray,
                                        sam_optax.diagnostics(state)))
    return Run(history, diagnostics, params, state)


@functools.cache
def clean_run(name: str, wrapper: str, dtype: str = "float32") -> Run:
    with _x64(dtype):
        return run(name, wrapper, BATCHES, dtype)


@functools.cache
def reference(name: str, x64: bool = False) -> tuple[list, list]:
    """The float64 reference on BATCHES. Random methods draw their keys with
    JAX, whose samplers give float64 draws under x64 as the library does."""
    with _x64("float64" if x64 else "float32"):
        return ref.run_alone(METHODS[name].reference, PROBLEM,
                             SGD(LR, MOMENTUM), BATCHES, RHO)


# ------------------------------------------------------------------- checks


def assert_matches_reference(history, expected, tol):
    """Each step within ``tol · max(‖reference‖, 1)`` of the reference."""
    assert len(history) == len(expected)
    for t, (got, want) in enumerate(zip(history, expected, strict=True)):
        error = norm(tmap(np.subtract, got, want))
        assert error <= tol * max(norm(want), 1.0), (
            f"step {t}: error {error:.3g} > {tol:g}·‖ref‖; got {got}, "
            f"reference {want}")


def assert_same_run(got: Run, alone: Run):
    """Another composition of the method equals the method alone."""
    assert_matches_reference(got.history, alone.history, SAME_RUN_TOLERANCE)
    assert got.perturbed == alone.perturbed


def sam_state(opt_state) -> sam_optax.SAMState:
    """The one SAMState inside an optimizer state."""
    is_sam = lambda x: isinstance(x, sam_optax.SAMState)
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_sam) if is_sam(x)]
    assert len(found) == 1, f"{len(found)} SAM states"
    return found[0]


def sam_side(opt_state) -> Any:
    """The SAM state with every ``apply_if_finite`` counter taken out (a run
    that saw a rejected batch has counted it; nothing else may differ)."""
    is_guard = lambda x: isinstance(x, optax.ApplyIfFiniteState)
    return jax.tree.map(lambda x: x.inner_state if is_guard(x) else x,
                        sam_state(opt_state), is_leaf=is_guard)


def assert_identical(got, want, what: str):
    got_leaves, got_tree = jax.tree.flatten(got)
    want_leaves, want_tree = jax.tree.flatten(want)
    assert got_tree == want_tree, what
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(want)[0]]
    for path, x, y in zip(paths, got_leaves, want_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=f"{what}{path}")


def no_nan(tree) -> bool:
    return not any(np.any(np.isnan(np.asarray(x, np.float64)))
                   for x in jax.tree.leaves(tree)
                   if jnp.issubdtype(np.asarray(x).dtype, jnp.inexact))


def all_finite(tree) -> bool:
    return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree))


@functools.cache
def _f32_grad() -> Callable:
    return jax.jit(jax.grad(PROBLEM.jax_loss))


def assert_gradient_kind(params: dict, batch: ref.Batch, kind: str):
    """Guards the setup: the degenerate batch gives the intended gradient."""
    g = jax.tree.map(lambda x: np.asarray(x, np.float64), _f32_grad()(
        jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params),
        batch.as_jax()))
    flat = np.concatenate([g["w"], g["b"]])
    finite = np.delete(flat, 1)  # every entry but w[1]
    assert np.all(np.isfinite(finite)), flat
    if kind == "zero":
        assert np.all(flat == 0), flat
    elif kind == "tiny":
        assert 0 < np.linalg.norm(flat) < 1e-33, flat
    elif kind == "huge":
        assert np.all(np.isfinite(flat)) and np.linalg.norm(flat) > 1e31, flat
    elif kind == "inf":
        assert np.isinf(flat[1]), flat
    else:
        assert np.isnan(flat[1]), flat


# -------------------------------------------------------------------- tests


def test_problem_gradient_matches_its_jax_loss():
    """The NumPy gradient is the JAX loss's (float64), clean and degenerate."""
    batches = BATCHES[:2] + [PROBLEM.degenerate(k, BATCHES[2]) for k in KINDS]
    with jax.enable_x64(True):
        grad = jax.jit(jax.grad(PROBLEM.jax_loss))
        params = jax.tree.map(jnp.asarray, PROBLEM.init)
        for batch in batches:
            got = grad(params, batch.as_jax(jnp.float64))
            want = PROBLEM.grad(PROBLEM.init, batch)
            for key in want:
                np.testing.assert_allclose(got[key], want[key], rtol=1e-12)
    for kind, batch in zip(KINDS, batches[2:], strict=True):
        assert_gradient_kind(PROBLEM.init, batch, kind)


def test_references_tell_the_methods_apart():
    """Guards the matrix: on this problem every method (and the base alone)
    ends elsewhere, far beyond the float32 tolerance; the schedules both pay
    and skip, alone and accumulated."""
    finals = {name: reference(name)[0][-1] for name in NAMES}
    plain, _ = ref.run_alone(ref.Reference(direction=lambda: (
        lambda t, params, g, grad, rho: (g, False))), PROBLEM, SGD(LR, MOMENTUM),
        BATCHES, RHO)
    finals["base alone"] = plain[-1]
    for i, a in enumerate(finals):
        for b in list(finals)[i + 1:]:
            if {a, b} == {"sam", "gcsam"}:
                continue  # one rule on vector params (see METHODS)
            distance = norm(tmap(np.subtract, finals[a], finals[b]))
            assert distance > 20 * TOLERANCE["float32"], (a, b, distance)
    for name in ("looksam", "every_k_sam", "ae_sam"):
        _, flags = reference(name)
        _, accumulated = ref.run_accumulated(
            METHODS[name].reference, PROBLEM, SGD(LR, MOMENTUM), BATCHES, RHO,
            MULTISTEPS_K)
        assert True in flags and False in flags, (name, flags)
        assert True in accumulated and False in accumulated, (name, accumulated)


@pytest.mark.parametrize("name", NAMES)
def test_alone_matches_float64_reference(name):
    got = clean_run(name, "alone")
    expected, flags = reference(name)
    assert_matches_reference(got.history, expected, TOLERANCE["float32"])
    assert got.perturbed == flags


@pytest.mark.parametrize("wrapper", ["chain_C_identity", "chain_identity_C",
                                     *GUARDS, "inject_hyperparams"])
@pytest.mark.parametrize("name", NAMES)
def test_composition_equals_alone(name, wrapper):
    """``optax.chain`` on either side, ``apply_if_finite`` on either side
    (finite batches) and ``inject_hyperparams`` (with the static arguments
    the method needs) give the method alone; ``diagnostics`` finds its
    state in each."""
    assert_same_run(clean_run(name, wrapper), clean_run(name, "alone"))


@pytest.mark.parametrize("name", WITH_STATIC_ARGS)
def test_inject_hyperparams_without_static_args_says_so(name):
    method = METHODS[name]
    params = jax.tree.map(jnp.asarray, PROBLEM.init)
    with pytest.raises(ValueError, match="static_args"):
        tx = optax.inject_hyperparams(method.constructor)(base(),
                                                          **method.kwargs)
        _step_fn(tx)(params, tx.init(params), BATCHES[0].as_jax())


@pytest.mark.parametrize("name", ACCUMULATING)
def test_accumulation_inside_sam_matches_reference(name):
    """``C(MultiSteps(base, k))``: the SAM-side rule per micro-batch at fixed
    params, ``base`` on the mean of the k directions."""
    got = clean_run(name, "C_of_multisteps")
    expected, flags = ref.run_accumulated(
        METHODS[name].reference, PROBLEM, SGD(LR, MOMENTUM), BATCHES, RHO,
        MULTISTEPS_K)
    assert_matches_reference(got.history, expected, TOLERANCE["float32"])
    assert got.perturbed == flags
    assert int(sam_state(got.state).count) == STEPS  # one per micro-batch


@pytest.mark.parametrize("name", NOT_ACCUMULATING)
def test_accumulation_inside_is_refused_where_updates_move_params(name):
    with pytest.raises((TypeError, ValueError), match="MultiSteps"):
        run(name, "C_of_multisteps", BATCHES[:1])


@pytest.mark.parametrize(
    "name", [n for n in NAMES if not METHODS[n].accumulates_outside])
def test_accumulation_outside_is_refused_with_the_right_order(name):
    # Where accumulation inside is refused too, no order is right: the
    # message need only name MultiSteps.
    pattern = (r"sam_optax\.sam\(optax\.MultiSteps\("
               if METHODS[name].accumulates else "MultiSteps")
    with pytest.raises(TypeError, match=pattern):
        run(name, "multisteps_of_C", BATCHES[:1])


@pytest.mark.parametrize(
    "name", [n for n in NAMES if METHODS[n].accumulates_outside])
def test_accumulation_outside_is_the_method_on_the_mean_gradient(name):
    """``optax.MultiSteps(msam(base), k)``: every micro-batch gradient is
    taken at the same (perturbed) params, so it is MSAM stepping on their
    mean, once every k micro-batches."""
    got = clean_run(name, "multisteps_of_C")
    tx = METHODS[name].build(base())
    params = jax.tree.map(jnp.asarray, PROBLEM.init)
    state = tx.init(params)
    for start in range(0, STEPS, MULTISTEPS_K):
        grads = [jax.grad(PROBLEM.jax_loss)(params, batch.as_jax())
                 for batch in BATCHES[start:start + MULTISTEPS_K]]
        mean = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
        updates, state = tx.update(mean, state, params)
        params = optax.apply_updates(params, updates)
        expected = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
        assert_matches_reference([got.history[start + MULTISTEPS_K - 1]],
                                 [expected], SAME_RUN_TOLERANCE)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_dtype_matches_float64_reference(name, dtype):
    got = clean_run(name, "alone", dtype)
    expected, flags = reference(name, x64=dtype == "float64")
    assert all_finite(got.history)
    assert all(x.dtype == jnp.dtype(dtype) for x in jax.tree.leaves(got.params))
    assert_matches_reference(got.history, expected, TOLERANCE[dtype])
    if dtype == "float64":
        assert got.perturbed == flags


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wrapper", ["alone", *GUARDS])
@pytest.mark.parametrize("name", NAMES)
def test_degenerate_gradient(name, wrapper, kind):
    """One step's gradient is zero, tiny, huge, or has an inf/NaN entry
    (at a paid and at a skipped step of the k = 2 schedules).

    Never a NaN from the library; ε = 0 (``perturbation_norm == 0``) where
    the ascent depends on g. A non-finite step under ``apply_if_finite``
    (either order) is invisible: the final params and SAM-side state equal
    those of the run that never saw it.
    """
    method = METHODS[name]
    clean = clean_run(name, wrapper)
    for position in DEGENERATE_POSITIONS:
        bad = PROBLEM.degenerate(kind, BATCHES[position])
        got = run(name, wrapper, [*BATCHES[:position], bad, *BATCHES[position:]])
        where = f"degenerate step {position}"
        assert_gradient_kind(got.history[position - 1], bad, kind)
        diagnostics = got.diagnostics[position]
        # apply_if_finite outside never calls C on a non-finite step: the
        # diagnostics are those of the step before (the step is invisible).
        skipped_whole = kind in ("inf", "nan") and wrapper == "apply_if_finite_of_C"
        kept_by_average = method.ascent_from_average and kind in ("zero", "tiny")
        if method.ascent_uses_g and not skipped_whole and not kept_by_average:
            assert float(diagnostics.perturbation_norm) == 0.0, (
                where, diagnostics)
        if kind in ("zero", "tiny", "huge"):
            assert all_finite(got.history), (where, got.history)
            assert no_nan(got.state) and no_nan(got.diagnostics), where
        elif wrapper == "alone":
            # The user's non-finite entry (w[1]) is theirs; the library must
            # not spread it to the other entries.
            after = got.history[position]
            others = np.delete(np.concatenate([after["w"], after["b"]]), 1)
            assert np.all(np.isfinite(others)), (where, after)
        else:
            assert_identical(got.params, clean.params, f"{where}: params")
            assert_identical(sam_side(got.state), sam_side(clean.state),
                             f"{where}: SAM state")

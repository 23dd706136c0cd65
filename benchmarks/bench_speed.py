"""Speed of every SAM-type method against the base step and against the same
method written by hand, on an MLP and a CNN at two batch sizes; with the
compiled memory of a 50 M-parameter model beside it.

Every row of a workload is compiled once, warmed up, then timed in
interleaved rounds (each round runs every row once, in a shuffled order), so
that drift of the machine hits all of them alike. Ratios are medians of
per-round ratios.

Rows:

* ``base``           -- one gradient and the base optimizer (the floor);
* ``handwritten``    -- SAM written out by hand (ε = ρg/‖g‖, a second
  gradient, the same base update): plain SAM's counterpart;
* ``sam_optax.sam``, ``optax.contrib.sam`` (opaque mode, one call = one
  step) and ``sam_optax.sam full_diagnostics=True``;
* every method of ``common.methods`` (the table ``bench_memory.py`` measures)
  as the library builds it, ``sam_optax.<name>``, and as written by hand,
  ``hand-written <name>`` (its counterpart: the same method in plain
  ``jax.numpy``, with only the state it needs).

The schedule family is timed on both paths. Every-k and LookSAM (k = 5):
``cond`` (the default, one program with ``lax.cond``) and ``[host]``
(``sam_optax.schedule.host_scheduled`` over two compiled programs,
``update(..., perturb=True/False)``, chosen in Python by ``count_rule``).
AE-SAM, whose decision reads the gradient: ``cond``, and ``[two-phase]``
(program 1: the gradient and ``sam_optax.schedule.decision``; the host reads
the flag, a device-to-host sync per step; program 2: ``update(...,
perturb=flag)``). Their hand-written counterparts choose in Python: a SAM
step on SAM steps and a base step otherwise (the ideal); AE-SAM's in two
phases like the library's. One timed sample of these rows is 5 consecutive
steps (a whole k = 5 cycle): their ms/step is the sample's average.

Figures per row: median ms/step (with quartiles), × base, × its hand-written
counterpart, × ``sam_optax.sam``, the share of steps that took the second
gradient (schedule family), XLA FLOPs per step (``cost_analysis``; a program
with ``lax.cond`` counts both branches), temporary memory
(``memory_analysis``), optimizer-state bytes and compile time.

Usage (``make bench`` runs the defaults: ~17 min on 2 idle CPU cores)::

  python benchmarks/bench_speed.py                       # mlp, cnn:8, cnn:32
  python benchmarks/bench_speed.py --workloads mlp --steps 100
  python benchmarks/bench_speed.py --configs every_k_sam,msam
  python benchmarks/bench_speed.py --out /tmp/bench      # on a GPU machine

Results go to ``<out>/speed_<device>.{md,json,png}``; the memory table is
read from ``memory_<device>.json`` (``bench_memory.py``) when it is there.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import sam_optax

REFERENCE_ROWS = ("base", "handwritten", "sam_optax.sam", "optax.contrib.sam")
# SAM with the opt-in cos∠(g, g_sam) diagnostic, which keeps g alive through
# the second gradient: shows what it costs.
FULL_SAM = "sam_optax.sam full_diagnostics=True"
SAM_ROWS = ("sam_optax.sam", FULL_SAM)
# The schedule family's period, and one timed sample: a whole cycle.
K = 5
# Targets (issue 13): the host path of the count-based schedules, × base;
# MSAM, × its hand-written step.
HOST_LIMIT = 1.30
MSAM_LIMIT = 1.05
DEFAULT_WORKLOADS = "mlp,cnn:8,cnn:32"


def full_sam(base_tx: optax.GradientTransformation, rho: float
             ) -> optax.GradientTransformation:
    """`sam` that also records the cosine diagnostic."""
    return sam_optax.sam(base_tx, rho, full_diagnostics=True)


def make_base_tx(name: str, learning_rate: float) -> optax.GradientTransformation:
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=0.9)
    if name == "adam":
        return optax.adam(learning_rate)
    raise ValueError(f"--base must be 'sgd' or 'adam'; got {name!r}.")


# --------------------------------------------------------------------------
# Runners: a row's compiled programs and how one sample runs them.


class Runner:
    """Runs a row's steps on its own buffers (donated at every step).

    Attributes:
      programs: the row's compiled programs by name.
      uses: how often each program ran (for the FLOPs per step).
      steps: steps run so far.
      paid: steps that took the second gradient, where the host knows it.
      loss: the last step's loss.
    """

    def __init__(self, carry: tuple, batch: Any) -> None:
        self.carry = carry
        self.batch = batch
        self.programs: dict[str, common.Compiled] = {}
        self.uses: collections.Counter = collections.Counter()
        self.steps = 0
        self.paid: Optional[int] = None
        self.loss: Any = None
        self._flags: list = []

    def call(self, name: str, *args: Any) -> Any:
        self.uses[name] += 1
        return self.programs[name].executable(*args)

    def run(self, n: int) -> Any:
        """``n`` steps; returns device values to wait for."""
        raise NotImplementedError

    def settle(self) -> None:
        """After a timed sample: read what the host did not need to wait
        for (flags returned by the programs)."""
        if self._flags:
            self.paid = (self.paid or 0) + int(sum(int(f) for f in self._flags))
            self._flags = []

    # Static costs, per step (over the programs each step ran).
    def _per_step(self, cost: str) -> float:
        if not self.steps:
            return float("nan")
        return sum(getattr(self.programs[name], cost) * uses
                   for name, uses in self.uses.items()) / self.steps

    def flops(self) -> float:
        return self._per_step("flops")

    def bytes_accessed(self) -> float:
        return self._per_step("bytes_accessed")

    def temp_bytes(self) -> int:
        return max(p.temp_bytes for p in self.programs.values())

    def compile_s(self) -> float:
        return sum(p.compile_s for p in self.programs.values())


class OneProgram(Runner):
    """One program per step; a fifth output, if any, says whether the step
    took the second gradient (AE-SAM's ``lax.cond``), read after the
    sample."""

    def __init__(self, carry, batch, compiled):
        super().__init__(carry, batch)
        self.programs["step"] = compiled

    def run(self, n):
        carry = self.carry
        for _ in range(n):
            out = self.call("step", *carry, self.batch)
            carry, self.loss = out[:3], out[3]
            self._flags += out[4:]
        self.carry = tuple(carry)
        self.steps += n
        return self.carry, self.loss


class HostChoice(Runner):
    """Two programs, ``perturb=True`` and ``perturb=False``, chosen on the
    host at each step: by ``sam_optax.schedule.host_scheduled`` (the
    library's rows) or by a Python count (the hand-written rows)."""

    def __init__(self, carry, batch, programs, rule, library):
        super().__init__(carry, batch)
        self.programs.update({f"perturb={flag}": c
                              for flag, c in programs.items()})
        self.paid = 0
        if library:
            self.step = sam_optax.schedule.host_scheduled(
                lambda flag: lambda *args: self.call(f"perturb={flag}", *args),
                rule, opt_state=lambda args: args[2],
                new_opt_state=lambda args, out: out[2])
        else:
            count = iter(range(sys.maxsize))
            self.step = lambda *args: self.call(
                f"perturb={bool(rule(next(count)))}", *args)

    def run(self, n):
        carry = self.carry
        for _ in range(n):
            *carry, self.loss = self.step(*carry, self.batch)
        self.carry = tuple(carry)
        self.steps += n
        self.paid = self.uses["perturb=True"]
        return self.carry, self.loss


class TwoPhase(Runner):
    """Program 1: the gradient and the decision; the host reads the flag
    (one device-to-host sync per step); program 2 for that flag."""

    def __init__(self, carry, batch, first, seconds, first_returns_state):
        super().__init__(carry, batch)
        self.programs["decide"] = first
        self.programs.update({f"perturb={flag}": c
                              for flag, c in seconds.items()})
        self.first_returns_state = first_returns_state
        self.paid = 0

    def run(self, n):
        params, model_state, state = self.carry
        for _ in range(n):
            grads, self.loss, new_model_state, flag, new_state = self.call(
                "decide", params, model_state, state, self.batch)
            if self.first_returns_state:
                state = new_state
            flag = bool(flag)  # the sync
            self.paid += flag
            params, state = self.call(f"perturb={flag}", params, model_state,
                                      state, grads, self.batch)
            model_state = new_model_state
        self.carry = (params, model_state, state)
        self.steps += n
        return self.carry, self.loss


# --------------------------------------------------------------------------
# Rows


@dataclasses.dataclass
class Config:
    """One row: how to build its runner for a workload.

    Attributes:
      name: the row's label.
      method: the method's name (``base``, ``sam``, ``every_k_sam``, ...).
      kind: ``base``, ``library`` (a ``sam_optax`` row), ``hand`` or
        ``other`` (``optax.contrib.sam``).
      path: ``cond``, ``host`` or ``two-phase`` for the schedule family.
      counterpart: the row its "× hand-written" is measured against.
      build: ``build(workload, params, model_state, batch) -> Runner``.
      steps_per_sample: consecutive steps per timed sample.
      settings: the method's settings, for tables.
      schedule: ``count``, ``adaptive`` or ``""`` (``common.Method``).
      rule: for a count-based schedule's ``cond`` row: whether step ``t``
        took the second gradient (the share is then known exactly).
    """

    name: str
    method: str
    kind: str
    build: Callable[..., Runner]
    path: str = ""
    counterpart: Optional[str] = None
    steps_per_sample: int = 1
    settings: str = ""
    schedule: str = ""
    rule: Optional[Callable[[int], bool]] = None


def _fresh(tree):
    # Each row owns its buffers (they are donated every step); init may
    # share one zero array between state leaves, which cannot be donated
    # twice.
    return jax.tree.map(jnp.copy, tree)


def _one_program(make: Callable[[common.Workload], tuple[Any, common.Step]],
                 with_flag: bool = False) -> Callable[..., Runner]:
    """``make(workload) -> (init, step)``: a single-program row."""

    def build(workload, params, model_state, batch):
        init, step = make(workload)
        state = init(params)
        if with_flag:
            step = common.with_flag(step)
        compiled = common.compile_step(step, params, model_state, state, batch)
        return OneProgram(_fresh((params, model_state, state)), batch,
                          compiled)

    return build


def _host_choice(init, make_step, rule, library) -> Callable[..., Runner]:
    """``make_step(workload, perturb) -> step``: one program per flag."""

    def build(workload, params, model_state, batch):
        state = init(params)
        programs = {flag: common.compile_step(make_step(workload, flag),
                                              params, model_state, state,
                                              batch)
                    for flag in (True, False)}
        return HostChoice(_fresh((params, model_state, state)), batch,
                          programs, rule, library)

    return build


def _two_phase(init, make_phases, first_returns_state) -> Callable[..., Runner]:
    """``make_phases(workload) -> (first, {flag: second})``."""

    def build(workload, params, model_state, batch):
        state = init(params)
        first, seconds = make_phases(workload)
        # Phase 1 keeps params and the state for phase 2; a hand-written
        # phase 1 hands back the state it updated (donated: no copy).
        compiled_first = common.compile_step(
            first, params, model_state, state, batch,
            donate=(2,) if first_returns_state else ())
        grads = jax.tree.map(jnp.zeros_like, params)
        compiled = {flag: common.compile_step(
            second, params, model_state, state, grads, batch,
            donate=(0, 2, 3)) for flag, second in seconds.items()}
        return TwoPhase(_fresh((params, model_state, state)), batch,
                        compiled_first, compiled, first_returns_state)

    return build


def _library_rows(m: common.Method) -> list[Config]:
    """The library's rows of one method: its default step, and the host
    path (count-based schedules) or the two-phase step (AE-SAM)."""
    label = f"sam_optax.{m.name}"
    hand_label = "handwritten" if m.name == "sam" else f"hand-written {m.name}"
    common_fields = dict(method=m.name, kind="library", counterpart=hand_label,
                         settings=m.settings, schedule=m.schedule)
    rows = [Config(
        label, path="cond" if m.schedule else "",
        build=_one_program(lambda w: _library_step(w, m.library()),
                           with_flag=m.schedule == "adaptive"),
        steps_per_sample=K if m.schedule else 1, **common_fields)]
    if m.schedule == "count":
        tx = m.library()

        def host_rule(params, tx=tx):
            return sam_optax.schedule.count_rule(tx, params)

        rows[0].rule = lambda t: t % K == 0
        rows.append(Config(
            f"{label} [host]", path="host", steps_per_sample=K,
            build=_library_host(tx, host_rule), **common_fields))
    elif m.schedule == "adaptive":
        tx = m.library()
        rows.append(Config(
            f"{label} [two-phase]", path="two-phase", steps_per_sample=K,
            build=_two_phase(tx.init,
                             lambda w, tx=tx: common.library_two_phase(w, tx),
                             first_returns_state=False), **common_fields))
    return rows


def _library_step(workload, tx):
    return tx.init, common.grad_fn_step(workload, tx)


def _library_host(tx, host_rule) -> Callable[..., Runner]:
    def build(workload, params, model_state, batch):
        rule = host_rule(params)
        if rule is None:
            raise ValueError("count_rule returned None for a count-based "
                             "schedule")
        return _host_choice(
            tx.init, lambda w, flag: common.grad_fn_step(w, tx, perturb=flag),
            rule, library=True)(workload, params, model_state, batch)

    return build


def _hand_row(m: common.Method) -> Config:
    """The hand-written counterpart: the host chooses for the schedule
    family (Python count; AE-SAM in two phases), one program otherwise."""
    hand = m.hand()
    name = "handwritten" if m.name == "sam" else f"hand-written {m.name}"
    fields = dict(method=m.name, kind="hand", counterpart=name,
                  settings=m.settings, schedule=m.schedule)
    if m.schedule == "count":
        assert hand.rule is not None
        return Config(name, path="host", steps_per_sample=K, build=_host_choice(
            hand.init, lambda w, flag: common.hand_step(w, hand, flag),
            hand.rule, library=False), **fields)
    if m.schedule == "adaptive":
        return Config(name, path="two-phase", steps_per_sample=K,
                      build=_two_phase(hand.init, lambda w: common.hand_two_phase(
                          w, hand), first_returns_state=True), **fields)
    return Config(name, build=_one_program(
        lambda w: (hand.init, common.hand_step(w, hand))), **fields)


def build_configs(base_tx: optax.GradientTransformation, rho: float,
                  learning_rate: float,
                  only: Optional[Sequence[str]] = None) -> list[Config]:
    """Every row, in table order; ``only``: row labels or method names to
    keep (``base``, ``handwritten``, ``sam_optax.sam`` and each kept row's
    counterpart stay)."""
    table = common.methods(base_tx, rho, learning_rate)
    sam_method = table[0]
    assert sam_method.name == "sam"
    configs = [
        Config("base", method="base", kind="base", counterpart="base",
               build=_one_program(lambda w: (base_tx.init,
                                             common.base_step(w, base_tx)))),
        _hand_row(sam_method),
        *_library_rows(sam_method),
        Config("optax.contrib.sam", method="sam", kind="other",
               counterpart="handwritten", settings=f"ρ={rho}",
               build=_one_program(lambda w: _contrib(w, base_tx, rho))),
        Config(FULL_SAM, method="sam", kind="library",
               counterpart="handwritten", settings=f"ρ={rho}, cosine",
               build=_one_program(lambda w: _library_step(
                   w, full_sam(base_tx, rho)))),
    ]
    for m in table[1:]:
        configs += [*_library_rows(m), _hand_row(m)]
    if only:
        wanted = {c.name for c in configs
                  if c.name in only or c.method in only}
        wanted |= {c.counterpart for c in configs if c.name in wanted}
        wanted |= set(REFERENCE_ROWS[:3])
        configs = [c for c in configs if c.name in wanted]
    return configs


def _contrib(workload, base_tx, rho):
    tx, step = common.optax_contrib_sam_step(workload, base_tx, rho)
    return tx.init, step


# --------------------------------------------------------------------------
# Timing one workload


def run_workload(workload: common.Workload, key: str,
                 configs: Sequence[Config], *, steps: int, warmup: int,
                 seed: int, progress: bool) -> tuple[list[dict], list[str]]:
    """Compile, warm up and time every row on one workload."""
    rng = jax.random.PRNGKey(seed)
    params, model_state = workload.init(rng)
    batch = workload.batch(jax.random.fold_in(rng, 1))
    runners: dict[str, Runner] = {}
    by_name: dict[str, Config] = {}
    notes: list[str] = []
    for config in tqdm(configs, desc=f"{key}: compile", leave=False,
                       disable=not progress):
        try:
            runners[config.name] = config.build(workload, params, model_state,
                                                batch)
            by_name[config.name] = config
        except Exception as err:  # noqa: BLE001 -- one broken row must not
            # hide all the others; the failure goes into the results.
            notes.append(f"{key} / {config.name}: failed "
                         f"({type(err).__name__}: {str(err)[:300]})")

    def sample(config: Config) -> Callable[[], float]:
        runner = runners[config.name]

        def run() -> float:
            seconds, _ = common.timed(runner.run, config.steps_per_sample)
            runner.settle()
            return seconds / config.steps_per_sample

        return run

    times = common.interleaved_rounds(
        {name: sample(by_name[name]) for name in runners}, rounds=steps,
        warmup=warmup, seed=seed, desc=f"{key}: timed rounds",
        progress=progress)

    def adaptive(row_name: str) -> bool:
        return by_name[row_name].schedule == "adaptive"

    base = times.get("base")
    hand_sam = times.get("handwritten")
    ideal = None
    if base is not None and hand_sam is not None:
        # The schedule family's ideal: (SAM + (k-1) base) / k, per round.
        ideal = [(h + (K - 1) * b) / K for h, b in zip(hand_sam, base,
                                                         strict=True)]
    rows = []
    for name, runner in runners.items():
        config = by_name[name]
        row: dict[str, Any] = {
            "workload": key, "config": name, "method": config.method,
            "kind": config.kind, "path": config.path,
            "schedule": config.schedule, "settings": config.settings,
            "counterpart": config.counterpart,
            **common.summarize(times[name]),
            "steps_per_sample": config.steps_per_sample,
            "times_ms": [round(t * 1e3, 4) for t in times[name]]}
        refs = {"base": "base", "handwritten": config.counterpart,
                "sam": "sam_optax.sam", "optax_contrib": "optax.contrib.sam"}
        for label, ref in refs.items():
            if ref in times:
                mid, q25, q75 = _compare(times[name], times[ref],
                                         adaptive(name) or adaptive(ref))
                row[f"x_{label}"] = mid
                if label != "optax_contrib":
                    row[f"x_{label}_q25"] = q25
                    row[f"x_{label}_q75"] = q75
        if ideal is not None and config.schedule:
            row["x_ideal"] = _compare(times[name], ideal, adaptive(name))[0]
        paid = runner.paid
        if paid is None and config.rule is not None:
            paid = sum(bool(config.rule(t)) for t in range(runner.steps))
        if config.schedule:
            row["second_gradient_fraction"] = (
                None if paid is None else paid / max(runner.steps, 1))
        row.update(flops=runner.flops(),
                   bytes_accessed=runner.bytes_accessed(),
                   temp_bytes=runner.temp_bytes(),
                   state_bytes=common.tree_bytes(runner.carry[2]),
                   compile_s=runner.compile_s(),
                   programs=len(runner.programs),
                   final_loss=float(runner.loss))
        rows.append(row)
    if "base" in runners:
        base_row = next(r for r in rows if r["config"] == "base")
        for row in rows:
            row["flops_x_base"] = row["flops"] / base_row["flops"]
            row["compile_x_base"] = row["compile_s"] / base_row["compile_s"]
            row["state_bytes_minus_base"] = (row["state_bytes"]
                                             - base_row["state_bytes"])
    if base is not None and ideal is not None:
        mid, q25, q75 = common.paired_ratio(ideal, base)
        notes.append(f"{key}: the schedule family's ideal (hand-written SAM "
                     f"+ {K - 1} base steps)/{K} = {mid:.2f}× base "
                     f"[{q25:.2f}–{q75:.2f}].")
        for row in rows:
            if row["config"] == "base":
                row["ideal_x_base"] = mid
    return rows, notes


def _compare(times: Sequence[float], reference: Sequence[float],
             by_totals: bool) -> tuple[float, Optional[float], Optional[float]]:
    """(ratio, q25, q75): the median and quartiles of per-round ratios; or,
    ``by_totals``, the ratio of the total times (no quartiles). AE-SAM takes
    the second gradient on a varying number of steps per sample (0 to 5),
    so only its total time over all samples is its cost per step."""
    if by_totals:
        return float(np.sum(times) / np.sum(reference)), None, None
    return common.paired_ratio(times, reference)


# --------------------------------------------------------------------------
# Targets and reports


def check_targets(rows: Sequence[dict]) -> list[dict]:
    """The issue's targets, per workload, with verdicts."""
    checks = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        by = {r["config"]: r for r in rows if r["workload"] == workload}

        def add(config, target, value, limit, unit=""):
            checks.append({"workload": workload, "config": config,
                           "target": target, "value": value, "limit": limit,
                           "met": bool(value <= limit), "unit": unit})

        for config in SAM_ROWS:
            row = by.get(config)
            if row is None:
                continue
            if "x_handwritten" in row:
                add(config, "time / hand-written", row["x_handwritten"],
                    1.02)
            if "x_optax_contrib" in row:
                add(config, "time / optax.contrib.sam",
                    row["x_optax_contrib"], 1.0)
            if "flops_x_base" in row:
                add(config, "FLOPs / base", row["flops_x_base"], 2.01)
                add(config, "state bytes - base",
                    row["state_bytes_minus_base"], 1024, " B")
                add(config, "compile time / base", row["compile_x_base"],
                    2.5)
        for config, row in by.items():
            if row.get("kind") != "library":
                continue
            if row.get("schedule"):
                if row.get("path") == "host" and "x_base" in row:
                    add(config, "time / base", row["x_base"], HOST_LIMIT)
                if "x_sam" in row:
                    add(config, "time / sam", row["x_sam"], 1.0)
            if row.get("method") == "msam" and "x_handwritten" in row:
                add(config, "time / hand-written", row["x_handwritten"],
                    MSAM_LIMIT)
    return checks


def _fmt_bytes(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    if n < 1024 ** 2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 ** 2:.1f} MiB"


def _ratio(row: Optional[dict], key: str, quartiles: bool = True) -> str:
    if row is None or key not in row:
        return "–"
    if not quartiles or row.get(key + "_q25") is None:
        return f"{row[key]:.2f}"
    return f"{row[key]:.2f} [{row[key + '_q25']:.2f}–{row[key + '_q75']:.2f}]"


def _path(row: dict) -> str:
    return row.get("path") or ""


def summary_table(rows: Sequence[dict], workloads: dict[str, str]) -> list[str]:
    """Time: × base and × hand-written per library row, workloads side by
    side."""
    keys = [k for k in workloads if any(r["workload"] == k for r in rows)]
    lookup = {(r["workload"], r["config"]): r for r in rows}
    configs = [c for c in dict.fromkeys(r["config"] for r in rows)
               if any(lookup.get((k, c), {}).get("kind") in ("library", "other")
                      for k in keys) or c == "handwritten"]
    header = "| method | path | " + " | ".join(
        f"{k} × base | {k} × hand" for k in keys) + " |"
    lines = [header, "|" + "---|" * (2 + 2 * len(keys))]
    for config in configs:
        first = next(lookup[(k, config)] for k in keys if (k, config) in lookup)
        label = config.removeprefix("sam_optax.").split(" [")[0]
        if config == FULL_SAM:
            label = "sam full_diagnostics"
        if config == "handwritten":
            label = "hand-written sam"
        if first.get("schedule") == "adaptive":
            label += " ‡"
        cells = []
        for k in keys:
            row = lookup.get((k, config))
            cells += [_ratio(row, "x_base", False),
                      _ratio(row, "x_handwritten", False)
                      if config != "handwritten" else "1"]
        lines.append(f"| {label} | {_path(first)} | " + " | ".join(cells)
                     + " |")
    ideal = []
    for k in keys:
        base_row = lookup.get((k, "base"), {})
        ideal += [f"{base_row['ideal_x_base']:.2f}"
                  if "ideal_x_base" in base_row else "–", ""]
    lines.append("| *ideal k=5: (SAM + 4 base)/5* | | " + " | ".join(ideal)
                 + " |")
    return lines


def memory_table(memory: dict) -> list[str]:
    """The 50 M-parameter model's compiled memory (``bench_memory.py``)."""
    widths = "-".join(map(str, memory["widths"]))
    lines = [
        f"MLP {widths} ({memory['parameters'] / 1e6:.1f} M parameters), "
        f"batch {memory['batch']}; {memory['machine']['date_utc']}, JAX "
        f"{memory['machine']['jax']}. **P** = one parameter-sized float32 "
        "buffer; memory = argument + output + temp − alias bytes of one "
        "donated step (`memory_analysis()`); target: library − hand-written "
        f"≤ +{memory['target_P']} P.",
        "",
        "| method | library (P) | hand-written (P) | difference (P) |",
        "|---|---|---|---|"]
    for row in memory["rows"]:
        lines.append(f"| {row['method']} | {row['library_P']:.3f} | "
                     f"{row['handwritten_P']:.3f} | "
                     f"{row['difference_P']:+.3f} |")
    return lines


def markdown_report(machine: dict, settings: dict, rows: Sequence[dict],
                    checks: Sequence[dict], notes: Sequence[str],
                    workloads: dict[str, str],
                    memory: Optional[dict]) -> str:
    load = settings.get("loadavg", {})
    lines = [
        "# Speed, memory and compile cost",
        "",
        common.device_line(machine),
        f"Base optimizer `{settings['base']}`, ρ = {settings['rho']} (other "
        "radii as listed); interleaved timed rounds after "
        f"{settings['warmup']} warm-up samples per row: "
        + ", ".join(f"{k} {n}" for k, n in settings["rounds"].items())
        + ". Ratios are medians of per-round ratios [quartiles].",
        "Schedule family (every-k, LookSAM, AE-SAM; k = 5): one sample is 5 "
        "consecutive steps, ms/step its average. Paths: `cond` = the "
        "default step (`lax.cond`); `host` = `host_scheduled` over "
        "`update(..., perturb=True/False)`; `two-phase` = gradient + "
        "`decision`, a host read of the flag (one device→host sync per "
        "step), then `update(..., perturb=flag)`. Their hand-written "
        "counterparts choose in Python (SAM step or base step: the ideal). "
        "‡ AE-SAM: a sample holds 0 to 5 SAM steps, so its figures are "
        "ratios of total times over all rounds (mean ms/step), not medians.",
        "Reproduce: `" + settings["command"] + "`"
        + (f" ({settings['runtime_min']:.0f} min)"
           if "runtime_min" in settings else "") + "."
        + (f" Load average (1/5/15 min) at start {load['start']}, at end "
           f"{load['end']} (the run itself adds ~1–2)." if "end" in load
           else "")
        + f" Source: {settings['source']}.",
        "",
        "## Time: × base step and × hand-written step",
        "",
        *summary_table(rows, workloads),
        "",
        "Workloads: " + "; ".join(f"**{k}** {d}" for k, d in workloads.items())
        + ".",
        "",
    ]
    if memory:
        lines += ["## Memory: one donated step, 50 M-parameter MLP", "",
                  *memory_table(memory), ""]
    if checks:
        lines += ["## Targets", "",
                  "| workload | config | target | value | limit | met |",
                  "|---|---|---|---|---|---|"]
        for c in checks:
            value = (f"{c['value']:.0f}" if c["unit"] else f"{c['value']:.3f}")
            lines.append(f"| {c['workload']} | {c['config']} | {c['target']} | "
                         f"{value}{c['unit']} | ≤ {c['limit']}{c['unit']} | "
                         f"{'yes' if c['met'] else '**no**'} |")
        lines.append("")
    header = ("| config | ms/step [q25–q75] | × base | × hand-written | "
              "× sam | 2nd grad | GFLOPs/step | temp mem | opt-state | "
              "compile s |")
    for key, description in workloads.items():
        wrows = [r for r in rows if r["workload"] == key]
        if not wrows:
            continue
        lines += [f"## {key}: {description}", "", header, "|" + "---|" * 10]
        for r in wrows:
            fraction = r.get("second_gradient_fraction")
            time_cell = (f"{r['mean_ms']:.2f} (mean) ‡"
                         if r.get("schedule") == "adaptive" else
                         f"{r['median_ms']:.2f} "
                         f"[{r['q25_ms']:.2f}–{r['q75_ms']:.2f}]")
            lines.append(
                f"| {r['config']} | {time_cell} | "
                f"{_ratio(r, 'x_base')} | {_ratio(r, 'x_handwritten')} | "
                f"{_ratio(r, 'x_sam', False)} | "
                f"{'' if fraction is None else f'{100 * fraction:.0f}%'} | "
                f"{r['flops'] / 1e9:.3f} | {_fmt_bytes(r['temp_bytes'])} | "
                f"{_fmt_bytes(r['state_bytes'])} | {r['compile_s']:.2f} |")
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def plot_ratios(rows: Sequence[dict], path: str, title: str,
                cap: float = 4.0) -> None:
    """Bars of × base per library row and workload (both paths of the
    schedule family), with the schedule family's ideal as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    configs = [c for c in dict.fromkeys(r["config"] for r in rows)
               if c == "handwritten" or any(
                   r["config"] == c and r.get("kind") in ("library", "other")
                   for r in rows)]
    lookup = {(r["workload"], r["config"]): r for r in rows}
    width = 0.8 / max(len(workloads), 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.42 * len(configs) + 2), 4.8))
    x = np.arange(len(configs))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, workload in enumerate(workloads):
        color = colors[i % len(colors)]
        offset = (i - (len(workloads) - 1) / 2) * width
        mid = np.array([lookup.get((workload, c), {}).get("x_base", np.nan)
                        for c in configs])
        shown = np.minimum(mid, cap)
        ax.bar(x + offset, shown, width, label=workload, color=color)
        for xi, value in zip(x + offset, mid, strict=True):
            if value > cap:
                ax.text(xi, cap, f"{value:.1f}", rotation=90, ha="center",
                        va="top", fontsize=6, color="white")
        ideal = lookup.get((workload, "base"), {}).get("ideal_x_base")
        family = [j for j, c in enumerate(configs)
                  if lookup.get((workload, c), {}).get("schedule")]
        if ideal is not None and family:
            ax.hlines(ideal, min(family) - 0.45, max(family) + 0.45,
                      colors=color, linestyles=":", lw=1.2)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(2.0, color="gray", lw=0.8, ls="--")
    ax.set_ylim(0, cap)
    ax.set_xticks(x)
    paths = {r["config"]: r.get("path") for r in rows}
    ax.set_xticklabels([c.removeprefix("sam_optax.")
                        + (" [cond]" if paths.get(c) == "cond" else "")
                        for c in configs], rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("time per step / base step")
    ax.set_title(title + f" (dotted: schedule family's ideal; bars above "
                 f"{cap:g} are capped)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------


def parse_workloads(spec: str, batch_size: Optional[int]
                    ) -> list[tuple[str, str, Optional[int]]]:
    """``mlp,cnn:8`` -> [(key, name, batch)]: ``name[:batch]``, keyed
    ``cnn_b8``; ``batch_size`` overrides every batch (smoke tests)."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, size = item.partition(":")
        if name not in common.WORKLOAD_NAMES:
            raise SystemExit(f"unknown workload {name!r} in --workloads; "
                             f"choose from {common.WORKLOAD_NAMES}")
        batch = int(size) if size else None
        key = f"{name}_b{batch}" if batch else name
        out.append((key, name, batch_size or batch))
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                        help="comma-separated name[:batch] of mlp, cnn, "
                        "cnn_bn (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30,
                        help="timed interleaved rounds on the MLP")
    parser.add_argument("--cnn-steps", type=int, default=None,
                        help="timed rounds on the CNNs (default 20 on CPU, "
                        "--steps elsewhere)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed samples per row after compiling")
    parser.add_argument("--configs", default="",
                        help="comma-separated rows or method names (base, "
                        "handwritten, sam_optax.sam and the counterparts are "
                        "kept), e.g. every_k_sam,msam")
    parser.add_argument("--no-variants", action="store_true",
                        help="time only the four reference rows")
    parser.add_argument("--variant-workloads", default="all",
                        help="workload keys that also time the variants "
                        "(comma-separated, or 'all'); the others time the "
                        "reference rows only")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="override every workload's batch size (smoke "
                        "tests)")
    parser.add_argument("--base", default="sgd", choices=("sgd", "adam"),
                        help="base optimizer (sgd: momentum 0.9)")
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=common.RESULTS_DIR,
                        help="output folder for speed_<device>.{md,json,png}")
    parser.add_argument("--memory", default=None,
                        help="memory_<device>.json of bench_memory.py "
                        "(default: in --out, else in benchmarks/results)")
    parser.add_argument("--tag", default="",
                        help="suffix for the output names, speed_<device>_<tag>")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="time nothing: write the report and plot again "
                        "from a speed_<device>.json (after a change of "
                        "format, or of the memory results)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def _load_memory(path: Optional[str], out: str) -> Optional[dict]:
    name = f"memory_{common.device_slug()}.json"
    candidates = [path] if path else [os.path.join(out, name),
                                      os.path.join(common.RESULTS_DIR, name)]
    for candidate in candidates:
        if candidate and os.path.exists(candidate):
            with open(candidate) as f:
                return json.load(f)
    return None


def _source_state() -> str:
    """The commit measured, and the library files with uncommitted edits
    (other work in progress is measured with it)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                              cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "sam_optax"],
                               cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    edited = [line[3:] for line in dirty if line.strip()]
    return head + (f" + uncommitted edits to {len(edited)} files in "
                   "sam_optax/" if edited else "")


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def render(path: str, args: argparse.Namespace) -> dict:
    """The report and plot of a saved run (``--render``), with the current
    memory results."""
    with open(path) as f:
        payload = json.load(f)
    memory = _load_memory(args.memory, args.out)
    payload["targets"] = check_targets(payload["rows"])
    payload["memory_source"] = memory and memory["machine"]["date_utc"]
    stem = path.removesuffix(".json")
    common.write_results(stem, payload, markdown_report(
        payload["machine"], payload["settings"], payload["rows"],
        payload["targets"], payload["notes"], payload["workloads"], memory))
    if not args.no_plot:
        plot_ratios(payload["rows"], stem + ".png", "Step time / base step "
                    f"on {payload['machine']['device_kind']}")
    return payload


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.render:
        return render(args.render, args)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    started = time.perf_counter()
    load_start = _loadavg()
    workloads = parse_workloads(args.workloads, args.batch_size)
    only = [c.strip() for c in args.configs.split(",") if c.strip()]
    if args.no_variants:
        only = list(REFERENCE_ROWS)
    base_tx = make_base_tx(args.base, args.learning_rate)
    configs = build_configs(base_tx, args.rho, args.learning_rate, only)
    if args.no_variants:
        configs = [c for c in configs if c.name in REFERENCE_ROWS]
    machine = common.machine_info()
    print(common.device_line(machine))
    print(f"load average: {load_start}")
    print(f"rows: {', '.join(c.name for c in configs)}")
    notes: list[str] = []
    if args.variant_workloads == "all":
        variant_keys = [key for key, _, _ in workloads]
    else:
        variant_keys = [k.strip() for k in args.variant_workloads.split(",")]
    cnn_steps = args.cnn_steps or (20 if machine["platform"] == "cpu"
                                   else args.steps)
    reference_configs = [c for c in configs if c.name in REFERENCE_ROWS]
    skipped = [key for key, _, _ in workloads if key not in variant_keys]
    if skipped and len(reference_configs) < len(configs):
        notes.append("reference rows only on " + ", ".join(skipped)
                     + " (--variant-workloads).")

    command = "python benchmarks/bench_speed.py" + (
        " " + " ".join(argv) if argv is not None
        else " " + " ".join(sys.argv[1:])).rstrip()
    settings: dict[str, Any] = {
        "base": f"{args.base}(lr={args.learning_rate}"
        + (", momentum=0.9)" if args.base == "sgd" else ")"),
        "rho": args.rho, "steps": args.steps, "cnn_steps": cnn_steps,
        "warmup": args.warmup, "batch_size": args.batch_size,
        "seed": args.seed, "command": command, "rounds": {},
        "loadavg": {"start": load_start}, "source": _source_state()}
    memory = _load_memory(args.memory, args.out)
    stem = os.path.join(args.out, f"speed_{common.device_slug()}"
                        + (f"_{args.tag}" if args.tag else ""))
    rows: list[dict] = []
    descriptions: dict[str, str] = {}
    payload: dict[str, Any] = {}
    for i, (key, name, batch) in enumerate(workloads):
        workload = common.make_workload(name, batch)
        descriptions[key] = workload.description
        rounds = args.steps if name == "mlp" else cnn_steps
        settings["rounds"][key] = rounds
        workload_rows, workload_notes = run_workload(
            workload, key,
            configs if key in variant_keys else reference_configs,
            steps=rounds, warmup=args.warmup, seed=args.seed,
            progress=not args.no_progress)
        rows += workload_rows
        notes += workload_notes
        for r in workload_rows:
            if not math.isfinite(r["final_loss"]):
                notes.append(f"{key} / {r['config']}: non-finite loss "
                             f"{r['final_loss']}")
        last = i == len(workloads) - 1
        if last:
            settings["loadavg"]["end"] = _loadavg()
            settings["runtime_min"] = (time.perf_counter() - started) / 60
        checks = check_targets(rows)
        report = markdown_report(machine, settings, rows, checks, notes,
                                 descriptions, memory)
        payload = {"machine": machine, "settings": settings,
                   "workloads": descriptions, "rows": rows, "targets": checks,
                   "notes": notes,
                   "memory_source": memory and memory["machine"]["date_utc"]}
        # Written after every workload: a long run keeps what it measured.
        common.write_results(stem, payload, report, echo=last)
    if not args.no_plot and rows:
        plot_ratios(rows, stem + ".png",
                    f"Step time / base step on {machine['device_kind']}")
        print(f"wrote {stem}.png")
    return payload


if __name__ == "__main__":
    main()

"""Foret et al. (2021) on Fashion-MNIST, through the trainer (`make results`).

Experiments, every run a job of ``sam_optax.train`` (the trainer the
README documents), on 28x28 Fashion-MNIST images with an MLP, seeds 0-2
(the seed fixes the held-out split, the label noise, the initialisation
and the batch order):

1. **Label noise** (the analogue of the paper's Table 4): momentum SGD vs
   SAM at 0/20/40/60/80 % symmetric noise on the training and held-out
   labels (test labels clean). SAM's ρ is chosen from the paper's grid
   {0.01, 0.02, 0.05, 0.1, 0.2, 0.5} by the final accuracy on the *noisy*
   held-out split of seed 0, then run on seeds 1 and 2. λ_max and λ_max/λ_5
   of the Hessian of the noisy training loss (``sam_optax.sharpness.lanczos``
   on 2,048 training images) for the SGD and SAM solutions (the paper's
   Fig. 3: 24 -> 1.0 on CIFAR-10).
2. **Variants at one noise level** (40 %): ASAM, GSAM, LookSAM and MSAM
   against SGD and SAM: test accuracy against wall time per epoch.
3. **m-sharpness** at the same level: SAM with ε per chunk of m examples
   (``config.m``) for m in {128 (= the batch), 32, 8, 4} at the tuned ρ and
   m in {128, 32, 8} at ρ = 0.05 (the best ρ moves with m), the paper's
   Fig. 3 analogue.
4. **Timing**: seconds per epoch of each method of experiment 2, measured
   apart from the runs in interleaved rounds (the runs share the machine).

**Resumable**: each finished run ("cell") is written to
``<out>/fashion_mnist_cells/<cell>.json`` and skipped on restart; a run cut
short resumes from its last trainer checkpoint (in ``--workdir-root``).
SIGTERM stops cleanly after a checkpoint.

Usage::

  nice -n 10 python benchmarks/fashion_mnist.py            # full, ~1-1.5 h, 2 CPUs
  python benchmarks/fashion_mnist.py --smoke --out /tmp/fm # tiny, < 2 min
  python benchmarks/fashion_mnist.py --tables-only         # rebuild md/png

Writes ``<out>/fashion_mnist.{md,json}`` and ``fashion_mnist_*.png``
(``<out>`` defaults to ``benchmarks/results``); the device is named in each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RHO_GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
NOISE_LEVELS = (0.0, 0.2, 0.4, 0.6, 0.8)
VARIANTS = ("asam", "gsam", "looksam", "msam")
M_VALUES = (32, 8, 4)  # besides the whole batch
# Foret et al. 2021, Table 4 (CIFAR-10, ResNet-32 / WRN): test accuracy %.
PAPER_TABLE_4 = {0.2: (84.8, 95.1), 0.4: (68.8, 93.4), 0.6: (48.2, 90.5),
                 0.8: (26.2, 77.9)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--train-size", type=int, default=4000,
                        help="training images (a seeded subset of 54,000)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[512])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--noise", type=float, nargs="+", default=NOISE_LEVELS)
    parser.add_argument("--rhos", type=float, nargs="+", default=RHO_GRID)
    parser.add_argument("--variant-noise", type=float, default=0.4)
    parser.add_argument("--m", type=int, nargs="+", default=M_VALUES,
                        help="m (besides the batch) at the tuned ρ")
    parser.add_argument("--m-rhos", type=float, nargs="*", default=[0.05],
                        help="further ρ for the m-sharpness curve")
    parser.add_argument("--m-extra", type=int, nargs="*", default=[32, 8],
                        help="m (besides the batch) at the further ρ")
    parser.add_argument("--hessian-examples", type=int, default=2048)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes to check the pipeline (minutes)")
    parser.add_argument("--tables-only", action="store_true",
                        help="rebuild the tables and plots from finished cells")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--workdir-root", default=os.path.join(
        os.environ.get("TMPDIR", "/tmp"), "sam_optax_fashion_mnist"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.epochs, args.train_size = 2, 2, 512
        args.hidden, args.noise, args.rhos = [32], [0.0, 0.4], [0.05, 0.5]
        args.m, args.hessian_examples = [16], 256
        args.m_extra = [16]
        args.variant_noise = 0.4
    args.command_flags = " ".join(argv if argv is not None else sys.argv[1:])
    return args


# ----------------------------------------------------------------- the cells


def base_config(args: argparse.Namespace):
    from sam_optax.train.configs import fashion_mnist

    config = fashion_mnist.get_config()
    config.data_dir = args.data_dir
    config.train_size = args.train_size
    config.num_epochs = args.epochs
    config.batch_size = args.batch_size
    config.learning_rate = args.lr
    config.mlp.hidden = tuple(args.hidden)
    config.progress_bar = False
    config.checkpoint_every_steps = 200
    config.num_devices = 1
    config.eval_every_epochs = 5
    return config


def cell_config(args, *, optimizer: str, noise: float, seed: int,
                rho: float | None = None, m: int = 0):
    config = base_config(args)
    config.optimizer, config.label_noise, config.seed, config.m = (
        optimizer, noise, seed, m)
    if rho is not None:
        config[optimizer].rho = rho
    return config


def cell_name(optimizer: str, noise: float, seed: int, rho=None, m: int = 0) -> str:
    name = f"{optimizer}_noise{round(noise * 100):02d}_seed{seed}"
    if rho is not None:
        name += f"_rho{rho:g}"
    return name + (f"_m{m}" if m else "")


def hessian_eigs(result, config, args) -> list[float]:
    """Top-5 Hessian eigenvalues of the noisy training loss at the solution."""
    import jax
    import jax.numpy as jnp
    import optax

    from sam_optax import sharpness
    from sam_optax.train import data

    splits = data.load(config.dataset, seed=config.seed,
                       label_noise=config.label_noise,
                       validation_fraction=config.validation_fraction,
                       train_size=config.train_size,
                       data_dir=config.data_dir or None)
    n = min(args.hessian_examples, len(splits.x_train))
    x, y = jnp.asarray(splits.x_train[:n]), jnp.asarray(splits.y_train[:n])
    apply_fn = result.state.apply_fn
    params = jax.device_get(result.eval_params)

    def loss_fn(p):
        logits = apply_fn({"params": p}, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    eig = sharpness.lanczos(loss_fn, params, k=5, num_iterations=60)
    return [float(v) for v in eig.eigenvalues]


def run_cell(name: str, config, args, *, hessian: bool = False) -> dict:
    """The cell's result, from its JSON if finished, else by training."""
    path = os.path.join(args.out, "fashion_mnist_cells", name + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    from sam_optax.train import trainer

    workdir = os.path.join(args.workdir_root, name)
    started = time.perf_counter()
    result = trainer.train_and_evaluate(config, workdir)
    if result.preempted:
        print(f"stopped by SIGTERM in cell {name}; rerun to continue", flush=True)
        sys.exit(0)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    epoch_times = [r["time_epoch_s"] for r in rows[1:]] or [rows[0]["time_epoch_s"]]
    cell = {"name": name, "config": trainer.config_to_dict(config),
            "final": rows[-1], "rows": rows,
            "seconds_per_epoch": float(np.median(epoch_times)),
            "seconds": time.perf_counter() - started}
    if hessian:
        cell["eigenvalues"] = hessian_eigs(result, config, args)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(cell, f)
    os.replace(path + ".tmp", path)  # a cell is finished once its JSON exists
    shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
    print(f"{name}: test {cell['final']['test_accuracy']:.4f} "
          f"val {cell['final']['val_accuracy']:.4f} "
          f"({cell['seconds']:.0f} s)", flush=True)
    return cell


def epoch_seconds(cells) -> float:
    """Wall time of one epoch: the fastest epoch after the first (which
    compiles) of each run, median over the runs. The machine is shared: the
    fastest epoch is the least disturbed by other jobs."""
    return float(np.median([min(r["time_epoch_s"] for r in c["rows"][1:])
                            for c in cells if c]))


def cached(name: str, args) -> dict | None:
    path = os.path.join(args.out, "fashion_mnist_cells", name + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# -------------------------------------------------------------- experiments


def label_noise(args, run) -> dict:
    """SGD and SAM (ρ tuned on seed 0's noisy held-out split) per noise level."""
    out = {}
    seeds = range(args.seeds)
    for noise in args.noise:
        sgd = [run(cell_name("sgd", noise, s),
                   cell_config(args, optimizer="sgd", noise=noise, seed=s),
                   hessian=True) for s in seeds]
        grid = {rho: run(cell_name("sam", noise, 0, rho),
                         cell_config(args, optimizer="sam", noise=noise, seed=0,
                                     rho=rho), hessian=True)
                for rho in args.rhos}
        if any(cell is None for cell in grid.values()):
            out[noise] = {"sgd": sgd, "grid": grid}
            continue
        best = max(args.rhos, key=lambda r: grid[r]["final"]["val_accuracy"])
        sam = [grid[best]] + [
            run(cell_name("sam", noise, s, best),
                cell_config(args, optimizer="sam", noise=noise, seed=s, rho=best),
                hessian=True) for s in seeds if s > 0]
        out[noise] = {"sgd": sgd, "grid": grid, "rho": best, "sam": sam}
    return out


def variants(args, run, rho: float) -> dict:
    """ASAM/GSAM/LookSAM/MSAM at one noise level. GSAM and LookSAM keep SAM's
    ε = ρ g/‖g‖ and take SAM's tuned ρ; ASAM's ρ lives on another scale
    (ε ∝ |w|) and MSAM's on the update's: both keep their defaults."""
    noise = args.variant_noise
    out = {}
    for method in VARIANTS:
        method_rho = rho if method in ("gsam", "looksam") else None
        out[method] = [run(cell_name(method, noise, s, method_rho),
                           cell_config(args, optimizer=method, noise=noise,
                                       seed=s, rho=method_rho))
                       for s in range(args.seeds)]
    return out


def msharpness(args, run, rho: float) -> dict:
    """``{ρ: {m: cells}}``: SAM's test accuracy against m, at the tuned ρ
    (m in ``--m``) and at each of ``--m-rhos`` (m in ``--m-extra``); m = the
    batch is plain SAM (the label-noise cells)."""
    noise = args.variant_noise
    series = {}
    for r, ms in [(rho, args.m)] + [(r, args.m_extra) for r in args.m_rhos
                                    if r != rho]:
        series[r] = {m: [run(cell_name("sam", noise, s, r, 0 if m == args.batch_size
                                       else m),
                             cell_config(args, optimizer="sam", noise=noise,
                                         seed=s, rho=r,
                                         m=0 if m == args.batch_size else m),
                             hessian=m == args.batch_size and s == 0)
                         for s in range(args.seeds)]
                     for m in [args.batch_size] + list(ms)}
    return series


def timing(args, rho: float, rounds: int = 9) -> dict:
    """Seconds per epoch of SGD, SAM and each variant, measured apart from
    the runs: the trainer's own step for each method, compiled and warmed
    up, then ``rounds`` rounds in which every method trains one epoch in a
    shuffled order (so drifts of the shared machine hit all alike). Per
    method: the median epoch time and the median of its per-round ratio to
    SGD."""
    path = os.path.join(args.out, "fashion_mnist_cells", "timing.json")
    if os.path.exists(path) or args.tables_only:
        return cached("timing", args)
    import jax

    from sam_optax.train import data, optim, trainer

    methods = ("sgd", "sam") + VARIANTS
    config = base_config(args)
    splits = data.load(config.dataset, seed=0, label_noise=args.variant_noise,
                       train_size=config.train_size,
                       data_dir=config.data_dir or None)
    steps = len(splits.x_train) // args.batch_size
    order = data.epoch_order(0, 0, len(splits.x_train))
    batches = [(splits.x_train[i], splits.y_train[i]) for i in
               order[:steps * args.batch_size].reshape(steps, -1)]
    key = jax.random.key(0)
    runs = {}
    for method in methods:
        c = cell_config(args, optimizer=method, noise=args.variant_noise, seed=0,
                        rho=rho if method in ("sam", "gsam", "looksam") else None)
        topo = trainer.topology(c)
        tx = optim.create(c, steps * args.epochs, topo.axis_name)
        runs[method] = [trainer.init_state(c, topo, splits, tx),
                        trainer.make_train_step(topo, method != "sgd")]

    def epoch(method):
        state, step = runs[method]
        start = time.perf_counter()
        for batch in batches:
            state, vector = step(state, batch, key)
        jax.block_until_ready((state, vector))
        runs[method][0] = state
        return time.perf_counter() - start

    for method in methods:  # compile and warm up
        epoch(method)
        epoch(method)
    times = {m: [] for m in methods}
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        for method in rng.permutation(methods):
            times[method].append(epoch(method))
    result = {m: {"seconds_per_epoch": float(np.median(t)),
                  "ratio_to_sgd": float(np.median(np.divide(t, times["sgd"]))),
                  "times": t} for m, t in times.items()}
    with open(path, "w") as f:
        json.dump(result, f)
    return result


# ----------------------------------------------------------------- reporting


def stats(values) -> tuple[float, float]:
    values = np.asarray([v for v in values if v is not None], np.float64)
    if not values.size:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1) if values.size > 1 else 0.0)


def fmt(values, scale: float = 1.0, digits: int = 1) -> str:
    mean, std = stats([None if v is None else v * scale for v in values])
    return "–" if np.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def test_acc(cells) -> list:
    return [c["final"]["test_accuracy"] if c else None for c in cells]


def markdown(results: dict, args, machine: dict) -> str:
    import common
    noise_rows, variant_rows, m_rows = (results["label_noise"],
                                        results.get("variants", {}),
                                        results.get("msharpness", {}))
    flags = f" {args.command_flags}" if args.command_flags else ""
    lines = [
        "# SAM on Fashion-MNIST: label noise, variants, m-sharpness",
        "",
        f"{common.device_line(machine)} Command: `python "
        f"benchmarks/fashion_mnist.py{flags}` ({results['minutes']:.0f} min "
        "of training runs in total, on 2 CPU cores shared with other jobs).",
        "",
        f"Every run is a `sam_optax.train` job: MLP 784-"
        f"{'-'.join(map(str, args.hidden))}-10, {args.train_size} training "
        f"images (a seeded subset), 6,000 held-out, the 10,000 test images; "
        f"batch {args.batch_size}, {args.epochs} epochs, momentum SGD (0.9, "
        f"lr {args.lr}, cosine, weight decay 5e-4), {args.seeds} seeds "
        "(split, noise, init, order). Symmetric noise: a label is replaced, "
        "with the given probability, by one of the 9 other classes (training "
        "and held-out labels; test labels clean). Mean ± std over seeds.",
        "",
        "## Label noise: SGD vs SAM (cf. Foret et al. 2021, Table 4)",
        "",
        "ρ chosen from {" + ", ".join(f"{r:g}" for r in args.rhos) + "} by the "
        "final accuracy on seed 0's noisy held-out split. λ: top Hessian "
        f"eigenvalues of the noisy training loss on {args.hessian_examples} "
        "training images (Lanczos).",
        "",
        "| label noise | SGD test acc. % | SAM test acc. % | SAM ρ | SGD λ_max | "
        "SAM λ_max | SGD λ_max/λ_5 | SAM λ_max/λ_5 | SGD / SAM train acc. on "
        "noisy labels % | paper (CIFAR-10) SGD / SAM % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for noise, row in noise_rows.items():
        sgd, sam = row["sgd"], row.get("sam", [])
        lam = lambda cells, i: [c["eigenvalues"][0] / (c["eigenvalues"][i] if i else 1)
                                if c and "eigenvalues" in c else None for c in cells]
        memo = lambda cells: [c["final"]["train_accuracy"] if c else None
                              for c in cells]
        paper = PAPER_TABLE_4.get(noise)
        lines.append(
            f"| {noise:.0%} | {fmt(test_acc(sgd), 100)} | "
            f"{fmt(test_acc(sam), 100)} | {row.get('rho', '–')} | "
            f"{fmt(lam(sgd, 0), 1, 2)} | {fmt(lam(sam, 0), 1, 2)} | "
            f"{fmt(lam(sgd, 4), 1, 2)} | {fmt(lam(sam, 4), 1, 2)} | "
            f"{fmt(memo(sgd), 100)} / {fmt(memo(sam), 100)} | "
            f"{f'{paper[0]} / {paper[1]}' if paper else '–'} |")
    lines += ["", "Held-out (noisy) accuracy of SAM by ρ, seed 0 — the "
              "selection; test accuracy in brackets:", "",
              "| label noise | " + " | ".join(f"ρ={r:g}" for r in args.rhos)
              + " |", "|---|" + "---|" * len(args.rhos)]
    for noise, row in noise_rows.items():
        cells = [row["grid"].get(r) for r in args.rhos]
        lines.append(f"| {noise:.0%} | " + " | ".join(
            f"{100 * c['final']['val_accuracy']:.1f} "
            f"({100 * c['final']['test_accuracy']:.1f})" if c else "–"
            for c in cells) + " |")
    if variant_rows:
        level = args.variant_noise
        reference = noise_rows.get(level, {})
        timed = results.get("timing") or {}
        lines += ["", f"## Variants at {level:.0%} label noise: accuracy against "
                  "wall time", "",
                  "Wall time per epoch: measured apart from the runs, with "
                  "the trainer's step of each method, in 9 rounds of one "
                  f"epoch ({args.train_size // args.batch_size} steps of "
                  f"batch {args.batch_size}) per method in shuffled order; "
                  "median epoch time and median per-round ratio to SGD. "
                  f"GSAM and LookSAM use SAM's tuned ρ = {results['rho']}; "
                  "ASAM (ρ = 0.5, η = 0.01) and MSAM (ρ = 0.3) their "
                  "constructors' defaults, their ρ being on other scales.", "",
                  "| method | test acc. % | s / epoch | × SGD | second gradient "
                  "paid | final sharpness L(w+ε)−L(w) |", "|---|---|---|---|---|---|"]
        entries = [("sgd", "SGD", reference["sgd"]),
                   ("sam", f"SAM (ρ={results['rho']})", reference["sam"])]
        entries += [(m, m, cells) for m, cells in variant_rows.items()]
        for method, label, cells in entries:
            cells = [c for c in cells if c]
            t = timed.get(method, {}).get("seconds_per_epoch", float("nan"))
            ratio = timed.get(method, {}).get("ratio_to_sgd", float("nan"))
            paid = [c["final"].get("perturbed_fraction") for c in cells]
            sharp = [c["final"].get("sharpness") for c in cells]
            # MSAM never pays a second gradient and records no sharpness.
            sharp_text = ("–" if sharp[0] is None or not np.mean(paid)
                          else fmt(sharp, 1, 3))
            lines.append(
                f"| {label} | {fmt(test_acc(cells), 100)} | {t:.3f} | "
                f"{ratio:.2f} | "
                f"{'–' if paid[0] is None else f'{100 * np.mean(paid):.0f} %'} | "
                f"{sharp_text} |")
    if m_rows:
        rhos = list(m_rows)
        ms = sorted({m for series in m_rows.values() for m in series}, reverse=True)
        lines += ["", f"## m-sharpness at {args.variant_noise:.0%} label noise "
                  "(cf. the paper's Fig. 3)", "",
                  "SAM with ε computed per chunk of m examples of each batch "
                  f"(`--config.m`); m = {args.batch_size} is SAM on the whole "
                  f"batch. ρ = {results['rho']} is the tuned one; the other ρ "
                  "shows how the best ρ moves with m. Test accuracy %; last "
                  "column: seconds per epoch (fastest epoch of a run).", "",
                  "| m | " + " | ".join(f"ρ = {r:g}" for r in rhos)
                  + " | s / epoch |", "|---|" + "---|" * (len(rhos) + 1)]
        for m in ms:
            row = [m_rows[r].get(m) for r in rhos]
            cells = [c for series in row if series for c in series if c]
            lines.append(f"| {m} | " + " | ".join(
                fmt(test_acc(series), 100) if series else "–" for series in row)
                + f" | {epoch_seconds(cells):.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, args, machine: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = results["label_noise"]
    noises = [n for n in rows if rows[n].get("sam")]
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax_acc, ax_lam = fig.subplots(1, 2)
    for method, color in (("sgd", "tab:blue"), ("sam", "tab:orange")):
        acc = [stats(np.multiply(test_acc(rows[n][method]), 100)) for n in noises]
        lam = [stats([c["eigenvalues"][0] for c in rows[n][method]]) for n in noises]
        label = "momentum SGD" if method == "sgd" else "SAM (ρ tuned)"
        x = [100 * n for n in noises]
        ax_acc.errorbar(x, [a[0] for a in acc], [a[1] for a in acc], marker="o",
                        capsize=3, color=color, label=label)
        ax_lam.errorbar(x, [a[0] for a in lam], [a[1] for a in lam], marker="o",
                        capsize=3, color=color, label=label)
    ax_acc.set(xlabel="label noise (%)", ylabel="clean test accuracy (%)",
               title="Fashion-MNIST: test accuracy")
    ax_lam.set(xlabel="label noise (%)", ylabel="λ_max (noisy training loss)",
               title="top Hessian eigenvalue", yscale="log")
    for ax in (ax_acc, ax_lam):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"SGD vs SAM under label noise, {args.seeds} seeds "
                 f"({machine['device_kind']})")
    fig.savefig(os.path.join(out, "fashion_mnist_label_noise.png"), dpi=110)

    if results.get("variants"):
        level = args.variant_noise
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        entries = [("sgd", rows[level]["sgd"]), ("sam", rows[level]["sam"])]
        entries += list(results["variants"].items())
        for label, cells in entries:
            t = (results.get("timing") or {}).get(label, {}).get(
                "seconds_per_epoch", float("nan"))
            mean, std = stats(np.multiply(test_acc(cells), 100))
            ax.errorbar([t], [mean], [std], marker="o", capsize=3)
            ax.annotate(label, (t, mean), textcoords="offset points",
                        xytext=(5, 5))
        ax.set(xlabel="wall time per epoch (s, this machine)",
               ylabel="clean test accuracy (%)",
               title=f"cost and benefit at {level:.0%} label noise")
        ax.grid(alpha=0.3)
        fig.savefig(os.path.join(out, "fashion_mnist_variants.png"), dpi=110)

    if results.get("msharpness"):
        fig = Figure(figsize=(5, 3.6), layout="constrained")
        ax = fig.subplots()
        all_ms = set()
        for r, series in results["msharpness"].items():
            ms = sorted(series)
            all_ms |= set(ms)
            acc = [stats(np.multiply(test_acc(series[m]), 100)) for m in ms]
            ax.errorbar(ms, [a[0] for a in acc], [a[1] for a in acc], marker="o",
                        capsize=3, label=f"SAM, ρ = {r:g}")
        sgd = stats(np.multiply(test_acc(rows[args.variant_noise]["sgd"]), 100))
        ax.axhline(sgd[0], color="gray", ls="--", label="SGD")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(all_ms), [str(m) for m in sorted(all_ms)])
        ax.invert_xaxis()
        ax.set(xlabel="m (examples per ε)", ylabel="clean test accuracy (%)",
               title=f"m-sharpness, {args.variant_noise:.0%} label noise")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.savefig(os.path.join(out, "fashion_mnist_msharpness.png"), dpi=110)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import common  # benchmarks/common.py: the script's folder is on sys.path

    machine = common.machine_info()
    print(f"device: {machine['device_kind']}", flush=True)
    def run(name, config, hessian=False):
        if args.tables_only:
            return cached(name, args)
        return run_cell(name, config, args, hessian=hessian)

    results: dict[str, Any] = {"label_noise": label_noise(args, run)}
    level = results["label_noise"].get(args.variant_noise, {})
    if "rho" in level:
        results["rho"] = level["rho"]
        results["variants"] = variants(args, run, level["rho"])
        results["msharpness"] = msharpness(args, run, level["rho"])
        results["timing"] = timing(args, level["rho"])
        if any(c is None for cells in results["variants"].values()
               for c in cells):
            results.pop("variants")
        results["msharpness"] = {
            r: {m: cells for m, cells in series.items()
                if all(c is not None for c in cells)}
            for r, series in results["msharpness"].items()}
        results["msharpness"] = {r: series for r, series in
                                 results["msharpness"].items() if len(series) > 1}
        if results.get("timing") is None:
            results.pop("timing")
    cells = [c for c in _all_cells(results) if c]
    results["minutes"] = sum(c["seconds"] for c in cells) / 60
    os.makedirs(args.out, exist_ok=True)
    text = markdown(results, args, machine)
    with open(os.path.join(args.out, "fashion_mnist.md"), "w") as f:
        f.write(text)
    summary = {"machine": machine, "args": {k: v for k, v in vars(args).items()
                                            if k not in ("out", "workdir_root")},
               "paper_table_4": {str(k): v for k, v in PAPER_TABLE_4.items()},
               "results": _strip(results)}
    common.write_json(os.path.join(args.out, "fashion_mnist.json"), summary)
    plot(results, args, machine, args.out)
    print(text)
    return results


def _all_cells(tree):
    if isinstance(tree, dict) and "final" in tree:
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _all_cells(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _all_cells(value)


def _strip(tree):
    """The summary without per-epoch rows (those stay in the cell files)."""
    if isinstance(tree, dict) and "final" in tree:
        return {k: v for k, v in tree.items() if k not in ("rows", "config")}
    if isinstance(tree, dict):
        return {str(k): _strip(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_strip(v) for v in tree]
    return tree


if __name__ == "__main__":
    main()

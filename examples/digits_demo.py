"""`make demo`: momentum SGD vs SAM on noisy digits, through the trainer.

Six ``sam_optax.train`` jobs (the same trainer as ``python -m
sam_optax.train``): an MLP 64-256-256-10 on scikit-learn's bundled 8x8 digits
(no download) with 40 % of the training labels replaced by random other
classes, momentum SGD against SAM around the same base, 3 seeds; the clean
test accuracy is compared. Prints a table, writes a plot.

Usage::

    python examples/digits_demo.py [--noise 0.4] [--seeds 3] [--epochs 60]
        [--rho 0.5] [--out examples/results]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from sam_optax.train import trainer
from sam_optax.train.configs import digits

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def demo_config(optimizer: str, args: argparse.Namespace, seed: int):
    """The digits config with the demo's settings: constant lr 0.05,
    momentum 0.9, no weight decay, batch 64, all non-test images for
    training (no held-out split)."""
    config = digits.get_config()
    config.optimizer = optimizer
    config.sam.rho = args.rho
    config.label_noise = args.noise
    config.seed = seed
    config.num_epochs = args.epochs
    config.mlp.hidden = (256, 256)
    config.lr_schedule = "constant"
    config.weight_decay = 0.0
    config.validation_fraction = 0.0
    config.num_devices = 1
    config.checkpoint_every_steps = 0
    config.progress_bar = False
    return config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, default=0.4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    from tqdm import tqdm

    names = {"sgd": "momentum SGD", "sam": f"SAM (ρ = {args.rho})"}
    curves = {name: [] for name in names}
    start = time.time()
    with tempfile.TemporaryDirectory() as root:
        jobs = [(seed, name) for seed in range(args.seeds) for name in names]
        for seed, name in tqdm(jobs, desc="trainer jobs", unit="job"):
            workdir = os.path.join(root, f"{name}_{seed}")
            trainer.train_and_evaluate(demo_config(name, args, seed), workdir)
            with open(os.path.join(workdir, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f]
            curves[name].append([r["test_accuracy"] for r in rows])
    elapsed = time.time() - start

    header = (f"Digits, {args.noise:.0%} label noise on the training split, "
              f"{args.seeds} seeds, {args.epochs} epochs, MLP 64-256-256-10")
    print(f"\n{header}\n")
    print("| optimizer | final clean test acc. (mean ± std) | best epoch acc. |")
    print("|---|---|---|")
    rows = []
    for name, runs in curves.items():
        final = np.array([r[-1] for r in runs]) * 100
        best = np.array([max(r) for r in runs]) * 100
        rows.append({"optimizer": names[name], "final_mean": final.mean(),
                     "final_std": final.std(), "best_mean": best.mean(),
                     "finals": final.tolist()})
        print(f"| {names[name]} | {final.mean():.2f} ± {final.std():.2f} % "
              f"| {best.mean():.2f} % |")
    print(f"\n({elapsed:.0f} s for {len(jobs)} trainer jobs)")

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    os.makedirs(args.out, exist_ok=True)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for name, runs in curves.items():
        runs = np.array(runs) * 100
        epochs = np.arange(1, runs.shape[1] + 1)
        ax.plot(epochs, runs.mean(0), label=names[name])
        ax.fill_between(epochs, runs.min(0), runs.max(0), alpha=0.2)
    ax.set(xlabel="epoch", ylabel="clean test accuracy (%)",
           title=f"digits, {args.noise:.0%} label noise ({args.seeds} seeds)")
    ax.legend()
    png = os.path.join(args.out, "demo_digits.png")
    fig.savefig(png, dpi=120)
    with open(os.path.join(args.out, "demo_digits.json"), "w") as f:
        json.dump({"setting": header, "rows": rows, "seconds": elapsed}, f,
                  indent=2)
    print(f"wrote {png}")
    return rows


if __name__ == "__main__":
    main()

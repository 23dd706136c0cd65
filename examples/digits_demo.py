"""`make demo`: momentum SGD vs SAM on scikit-learn's digits with noisy labels.

A small MLP is trained on the bundled 8×8 digits (no download) with a fraction
of the training labels replaced by random classes; clean test accuracy is
compared over several seeds. Both optimizers share the same base (momentum SGD,
same learning rate and epochs); SAM only adds the ascent step.

Usage::

    python examples/digits_demo.py [--noise 0.4] [--seeds 3] [--epochs 60]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import sam_optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def load_data(noise: float, seed: int):
    """Digits scaled to [0, 1]; `noise` of the training labels randomised."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0,
                                              stratify=y)
    rng = np.random.RandomState(seed)
    flip = rng.rand(len(y_tr)) < noise
    # A flipped label is drawn uniformly among the *other* nine classes.
    y_noisy = y_tr.copy()
    y_noisy[flip] = (y_tr[flip] + rng.randint(1, 10, flip.sum())) % 10
    return x_tr, y_noisy, x_te, y_te


def init_mlp(key, sizes=(64, 256, 256, 10)):
    params = []
    for din, dout in zip(sizes[:-1], sizes[1:]):
        key, sub = jax.random.split(key)
        params.append({"w": jax.random.normal(sub, (din, dout)) * jnp.sqrt(2.0 / din),
                       "b": jnp.zeros(dout)})
    return params


def apply_mlp(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, x, y):
    logits = apply_mlp(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_epoch(tx, batch_size):
    """One jitted epoch: lax.scan over shuffled mini-batches."""

    def step(carry, batch):
        params, state = carry
        x, y = batch
        batch_loss = lambda p: loss_fn(p, x, y)
        grads = jax.grad(batch_loss)(params)
        updates, state = tx.update(grads, state, params, grad_fn=jax.grad(batch_loss))
        return (optax.apply_updates(params, updates), state), None

    @jax.jit
    def epoch(params, state, x, y, key):
        n = (x.shape[0] // batch_size) * batch_size
        order = jax.random.permutation(key, x.shape[0])[:n]
        xb = x[order].reshape(-1, batch_size, x.shape[1])
        yb = y[order].reshape(-1, batch_size)
        (params, state), _ = jax.lax.scan(step, (params, state), (xb, yb))
        return params, state

    return epoch


@jax.jit
def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(apply_mlp(params, x), -1) == y)


def train(tx, data, seed, epochs, batch_size):
    x_tr, y_tr, x_te, y_te = (jnp.asarray(a) for a in data)
    params = init_mlp(jax.random.PRNGKey(seed))
    state = tx.init(params)
    epoch = make_epoch(tx, batch_size)
    key = jax.random.PRNGKey(1000 + seed)
    curve = []
    for _ in range(epochs):
        key, sub = jax.random.split(key)
        params, state = epoch(params, state, x_tr, y_tr, sub)
        curve.append(float(accuracy(params, x_te, y_te)))
    return curve


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, default=0.4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    optimizers = {
        "momentum SGD": lambda: optax.sgd(args.lr, momentum=0.9),
        f"SAM (rho={args.rho})": lambda: sam_optax.sam(
            optax.sgd(args.lr, momentum=0.9), rho=args.rho),
    }
    curves = {name: [] for name in optimizers}
    start = time.time()
    jobs = [(seed, name) for seed in range(args.seeds) for name in optimizers]
    for seed, name in tqdm(jobs, desc="training", unit="run"):
        data = load_data(args.noise, seed)
        curves[name].append(train(optimizers[name](), data, seed, args.epochs,
                                  args.batch_size))
    elapsed = time.time() - start

    rows = []
    header = (f"Digits, {args.noise:.0%} label noise on the training split, "
              f"{args.seeds} seeds, {args.epochs} epochs, MLP 64-256-256-10")
    print(f"\n{header}\n")
    print("| optimizer | final clean test acc. (mean ± std) | best epoch acc. |")
    print("|---|---|---|")
    for name, runs in curves.items():
        final = np.array([r[-1] for r in runs]) * 100
        best = np.array([max(r) for r in runs]) * 100
        rows.append({"optimizer": name, "final_mean": final.mean(),
                     "final_std": final.std(), "best_mean": best.mean(),
                     "finals": final.tolist()})
        print(f"| {name} | {final.mean():.2f} ± {final.std():.2f} % "
              f"| {best.mean():.2f} % |")
    print(f"\n({elapsed:.0f} s on {jax.devices()[0].device_kind})")

    args.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in curves.items():
        runs = np.array(runs) * 100
        epochs = np.arange(1, runs.shape[1] + 1)
        ax.plot(epochs, runs.mean(0), label=name)
        ax.fill_between(epochs, runs.min(0), runs.max(0), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_title(f"digits, {args.noise:.0%} label noise ({args.seeds} seeds)")
    ax.legend()
    fig.tight_layout()
    png = args.out / "demo_digits.png"
    fig.savefig(png, dpi=120)
    (args.out / "demo_digits.json").write_text(json.dumps(
        {"setting": header, "rows": rows, "seconds": elapsed,
         "device": jax.devices()[0].device_kind}, indent=2))
    print(f"wrote {png}")
    return rows


if __name__ == "__main__":
    main()

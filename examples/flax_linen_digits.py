"""SAM with Flax Linen: a small ResNet (BatchNorm + dropout) on sklearn digits.

    .venv/bin/python examples/flax_linen_digits.py --epochs 3 --rho 0.05

Uses ``sam_optax.linen.TrainState`` and ``sam_optax.linen.train_step``: the
clean pass gives the loss, metrics and new batch statistics; the perturbed
pass only the gradient at w + ε (same dropout key, statistics discarded).
``--rho 0`` trains with the base optimizer alone, for comparison.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import sam_optax
from sam_optax.train.data import load_digits_split, shuffled_batches
from sam_optax.train.models import ResNet


def loss_fn(apply, batch):
    images, labels = batch
    logits = apply(images, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}")

    x_train, y_train, x_test, y_test = load_digits_split(seed=args.seed)
    # The trainer's small ResNet (shared model module), with dropout.
    model = ResNet(width=16, stages=1, blocks=2, dropout=0.2)
    variables = model.init(jax.random.key(args.seed), x_train[:1], train=False)
    base = optax.sgd(args.lr, momentum=0.9)
    state = sam_optax.linen.TrainState.create(
        apply_fn=model.apply, params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=sam_optax.sam(base, rho=args.rho) if args.rho > 0 else base)
    step = jax.jit(sam_optax.linen.train_step(loss_fn))

    @jax.jit
    def evaluate(state, images, labels):
        logits = state.apply_fn({"params": state.params,
                                 "batch_stats": state.batch_stats},
                                images, train=False)
        return jnp.mean(jnp.argmax(logits, -1) == labels)

    rng, key = np.random.default_rng(args.seed), jax.random.key(args.seed + 1)
    for epoch in range(args.epochs):
        losses = []
        epoch_batches = shuffled_batches(x_train, y_train, args.batch_size, rng)
        for batch in tqdm(list(epoch_batches),
                          desc=f"epoch {epoch + 1}", leave=False):
            state, metrics = step(state, batch, key)
            losses.append(metrics["loss"])
        print(f"epoch {epoch + 1}: train loss {float(np.mean(losses)):.4f}  "
              f"test accuracy {float(evaluate(state, x_test, y_test)):.4f}")


if __name__ == "__main__":
    main()

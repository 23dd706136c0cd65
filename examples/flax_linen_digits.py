"""SAM with Flax Linen: a small ResNet (BatchNorm + dropout) on sklearn digits.

    .venv/bin/python examples/flax_linen_digits.py --epochs 3 --rho 0.05

Uses ``sam_optax.linen.TrainState`` and ``sam_optax.linen.train_step``: the
clean pass gives the loss, metrics and new batch statistics; the perturbed
pass only the gradient at w + ε (same dropout key, statistics discarded).
``--rho 0`` trains with the base optimizer alone, for comparison.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from digits_data import batches, load
from tqdm import tqdm

import sam_optax


class ResidualBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train):
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
        y = nn.relu(norm()(nn.Conv(self.features, (3, 3))(x)))
        y = norm()(nn.Conv(self.features, (3, 3))(y))
        return nn.relu(x + y)


class ResNet(nn.Module):
    features: int = 16
    blocks: int = 2
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x, train):
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(
            nn.Conv(self.features, (3, 3))(x)))
        for _ in range(self.blocks):
            x = ResidualBlock(self.features)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(10)(x)


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

    x_train, y_train, x_test, y_test = load(args.seed)
    model = ResNet()
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
        for batch in tqdm(list(batches(x_train, y_train, args.batch_size, rng)),
                          desc=f"epoch {epoch + 1}", leave=False):
            state, metrics = step(state, batch, key)
            losses.append(metrics["loss"])
        print(f"epoch {epoch + 1}: train loss {float(np.mean(losses)):.4f}  "
              f"test accuracy {float(evaluate(state, x_test, y_test)):.4f}")


if __name__ == "__main__":
    main()

"""SAM with Flax NNX: a small ResNet (BatchNorm + dropout) on sklearn digits.

    .venv/bin/python examples/flax_nnx_digits.py --epochs 3 --rho 0.05

``nnx.Optimizer(model, sam_optax.sam(...), wrt=nnx.Param)`` with
``sam_optax.nnx.value_and_grad``: no split/merge in user code; the perturbed
pass never touches the model's BatchStat or RNG variables.
``--rho 0`` trains with the base optimizer alone, for comparison.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import sam_optax
from sam_optax.train.data import load_digits_split, shuffled_batches


class ResidualBlock(nnx.Module):
    def __init__(self, features: int, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(features, features, (3, 3), rngs=rngs)
        self.norm1 = nnx.BatchNorm(features, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(features, features, (3, 3), rngs=rngs)
        self.norm2 = nnx.BatchNorm(features, momentum=0.9, rngs=rngs)

    def __call__(self, x):
        y = nnx.relu(self.norm1(self.conv1(x)))
        return nnx.relu(x + self.norm2(self.conv2(y)))


class ResNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, features: int = 16, blocks: int = 2,
                 dropout: float = 0.2):
        self.stem = nnx.Conv(1, features, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(features, momentum=0.9, rngs=rngs)
        self.blocks = nnx.List([ResidualBlock(features, rngs)
                                for _ in range(blocks)])
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(features, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.dropout(jnp.mean(x, axis=(1, 2))))


def loss_fn(model, images, labels):
    logits = model(images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


@nnx.jit
def train_step(model, optimizer, images, labels):
    (loss, accuracy), grads, grad_fn = sam_optax.nnx.value_and_grad(
        model, loss_fn, images, labels, has_aux=True)
    optimizer.update(model, grads, grad_fn=grad_fn, value=loss)
    return loss, accuracy


@nnx.jit
def evaluate(model, images, labels):
    return jnp.mean(jnp.argmax(model(images), -1) == labels)


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
    model = ResNet(nnx.Rngs(args.seed, dropout=args.seed + 1))
    base = optax.sgd(args.lr, momentum=0.9)
    # A plain optimizer ignores nothing: pass grad_fn only to a SAM one.
    tx = sam_optax.sam(base, rho=args.rho) if args.rho > 0 else (
        optax.with_extra_args_support(base))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    rng = np.random.default_rng(args.seed)
    for epoch in range(args.epochs):
        model.train()
        losses = []
        for images, labels in tqdm(
                list(shuffled_batches(x_train, y_train, args.batch_size, rng)),
                desc=f"epoch {epoch + 1}", leave=False):
            loss, _ = train_step(model, optimizer, images, labels)
            losses.append(loss)
        model.eval()
        print(f"epoch {epoch + 1}: train loss {float(np.mean(losses)):.4f}  "
              f"test accuracy {float(evaluate(model, x_test, y_test)):.4f}")


if __name__ == "__main__":
    main()

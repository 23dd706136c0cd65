"""Flax Linen models for the trainer, the examples and the benchmarks.

* :class:`MLP` -- flatten, ``hidden`` ReLU layers, a linear head;
* :class:`ResNet` -- a small pre-activation-free ResNet for small images:
  a 3x3 stem, ``stages`` stages of ``blocks`` basic residual blocks (two 3x3
  convolutions with BatchNorm), the width doubling and the resolution
  halving from one stage to the next, global average pooling, optional
  dropout, a linear head.

Every model is called as ``model.apply(variables, images, train=...)``;
BatchNorm uses batch statistics when ``train=True`` and the running ones
otherwise (the ``batch_stats`` collection).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

MODELS = ("mlp", "resnet")


class MLP(nn.Module):
    """``x.reshape(N, -1)`` → [Dense(h) → ReLU] for h in ``hidden`` → Dense."""

    hidden: Sequence[int] = (256,)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        del train  # no batch statistics, no dropout
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm; a 1x1 projection on the skip
    path when the stride or the width changes."""

    features: int
    stride: int = 1
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        norm = lambda: nn.BatchNorm(use_running_average=not train,
                                    momentum=self.bn_momentum)
        y = nn.Conv(self.features, (3, 3), strides=self.stride,
                    use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = norm()(nn.Conv(self.features, (3, 3), use_bias=False)(y))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = norm()(nn.Conv(self.features, (1, 1), strides=self.stride,
                               use_bias=False)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A small ResNet: stem, ``stages`` x ``blocks`` residual blocks, head.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from sam_optax.train import models
      >>> model = models.ResNet(width=4, stages=1, num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
      >>> sorted(variables), model.apply(variables, jnp.zeros((2, 4, 4, 1))).shape
      (['batch_stats', 'params'], (2, 10))
    """

    width: int = 16
    stages: int = 3
    blocks: int = 1
    num_classes: int = 10
    bn_momentum: float = 0.9
    dropout: float = 0.0  # before the head; needs a "dropout" rng when > 0

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = nn.Conv(self.width, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train,
                                 momentum=self.bn_momentum)(x))
        for stage in range(self.stages):
            for block in range(self.blocks):
                x = ResidualBlock(self.width * 2 ** stage,
                                  stride=2 if stage and not block else 1,
                                  bn_momentum=self.bn_momentum)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        if self.dropout:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


def create(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """A model by name (``"mlp"`` or ``"resnet"``) with its keyword arguments.

    Raises:
      ValueError: for an unknown name (listing the valid ones) or keyword.
    """
    classes = {"mlp": MLP, "resnet": ResNet}
    if name not in classes:
        raise ValueError(f"unknown `model` {name!r}; valid: {list(MODELS)}")
    cls = classes[name]
    fields = {f for f in cls.__dataclass_fields__ if f not in ("parent", "name")}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"`{name}` has no option(s) {unknown}; it takes "
                         f"{sorted(fields - {'num_classes'})}")
    if "hidden" in kwargs:
        kwargs["hidden"] = tuple(kwargs["hidden"])
    return cls(num_classes=num_classes, **kwargs)


__all__ = ["MLP", "MODELS", "ResNet", "ResidualBlock", "create"]

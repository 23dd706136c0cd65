"""Type aliases shared by every module (one definition each)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
import optax

#: A nested structure of arrays (params, gradients, states).
PyTree = Any

#: A mapped axis (``pmap``/``shard_map``/``vmap(axis_name=...)``) or several;
#: write ``Optional[AxisName]`` where "no axis" is allowed.
AxisName = Union[str, Sequence[str]]

#: A float ≥ 0 or an Optax schedule of the step count.
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]

#: ``grad_fn(params) -> grads`` or ``-> (loss, grads)``: the mini-batch
#: gradient at any point.
GradFn = Callable[[PyTree], Any]

#: ``loss_fn(params, batch) -> scalar loss``.
LossFn = Callable[[PyTree, PyTree], jax.Array]

#: Which leaves a method perturbs: ``None`` (all), a bool tree (or a prefix
#: of the params tree), or a callable on params returning one.
Mask = Union[PyTree, Callable[[PyTree], PyTree], None]

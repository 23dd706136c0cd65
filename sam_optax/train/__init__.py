"""A SAM trainer for batch jobs: ``python -m sam_optax.train``.

One config (``ml_collections``, ``configs/*.py``, overridable on the command
line), one work directory, any optimizer of the library by name, data
parallel over every device of every host, Orbax checkpoints that survive
preemption, ``metrics.jsonl`` + TensorBoard + a report. Its data and model
modules (:mod:`sam_optax.train.data`, :mod:`sam_optax.train.models`) serve
the examples, benchmarks and notebooks too.

Needs the ``train`` extra: ``pip install 'sam_optax[train]'``.
"""

"""Command line: ``python -m sam_optax.train`` (or ``sam-optax-train``).

    python -m sam_optax.train --workdir=DIR \
        --config=sam_optax/train/configs/digits.py [--config.KEY=VALUE ...]

Many hosts: start the same command on every host with
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or none
of them on TPU pods, SLURM and Kubernetes, where ``jax.distributed``
detects its peers); every host reads its own slice of each batch.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and "
                    "the report; rerun the same command to resume.")
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (sam_optax/train/configs/*.py); "
    "override keys with --config.KEY=VALUE.", lock_config=True)
flags.DEFINE_string("coordinator_address", None,
                    "jax.distributed coordinator HOST:PORT (many hosts).")
flags.DEFINE_integer("num_processes", None, "jax.distributed process count.")
flags.DEFINE_integer("process_id", None, "jax.distributed process index.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() "
                  "with auto-detection (TPU pods, SLURM, Kubernetes).")
flags.mark_flags_as_required(["workdir", "config"])


def _main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes
    import jax

    if FLAGS.coordinator_address or FLAGS.distributed:
        # CPU processes need a collectives backend to talk (GPUs and TPUs
        # have their own); gloo is built into jaxlib.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address,
                                   FLAGS.num_processes, FLAGS.process_id)
    from sam_optax.train import trainer

    config = FLAGS.config
    if jax.process_index() == 0:
        # The config without the blocks of the optimizers not in use.
        unused = [name for name in trainer.optim.SAM_METHODS
                  if name != config.optimizer]
        shown = {k: v for k, v in config.to_dict().items() if k not in unused}
        print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
              f"over {jax.process_count()} process(es); config: {shown}",
              flush=True)
    try:
        result = trainer.train_and_evaluate(config, FLAGS.workdir)
    except (trainer.ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    if jax.process_index() == 0 and not result.preempted:
        shown = {k: round(v, 4) for k, v in result.metrics.items()
                 if k.endswith("accuracy") or k == "train_loss"}
        print(f"done: step {result.step}, {shown}; report in "
              f"{FLAGS.workdir}/report.md", flush=True)
    if FLAGS.coordinator_address or FLAGS.distributed:
        jax.distributed.shutdown()


def run() -> None:
    """The console script ``sam-optax-train``."""
    app.run(_main)


if __name__ == "__main__":
    run()

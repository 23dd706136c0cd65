"""Every key the trainer reads, with its default (the digits job).

``python -m sam_optax.train --workdir=DIR --config=.../digits.py
--config.KEY=VALUE``; a key not listed here is refused.
"""

import ml_collections

from sam_optax.train import optim


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Data: "digits" (scikit-learn, bundled) or "fashion_mnist" (IDX files).
    config.dataset = "digits"
    config.data_dir = ""  # "" = /usr/share/datasets/fashion-mnist
    config.label_noise = 0.0  # fraction of train + validation labels flipped
    config.validation_fraction = 0.1  # held-out split (noisy), to tune ρ
    config.train_size = 0  # > 0: a subset of the training images

    # Model: "mlp" or "resnet", with their options.
    config.model = "mlp"
    config.mlp = ml_collections.ConfigDict({"hidden": (256,)})
    config.resnet = ml_collections.ConfigDict(
        {"width": 16, "stages": 3, "blocks": 1})

    # Optimizer: "sgd" (no SAM) or a sam_optax constructor by name; its
    # hyperparameters in the block of the same name (config.sam.rho, ...).
    config.optimizer = "sam"
    for name in optim.SAM_METHODS:
        config[name] = ml_collections.ConfigDict(
            optim.default_hyperparameters(name))
    config.base_optimizer = "sgd"  # "sgd" (momentum), "adam", "adamw"
    config.learning_rate = 0.05
    config.lr_schedule = "cosine"  # "constant", "cosine", "warmup_cosine"
    config.warmup_steps = 0
    config.momentum = 0.9
    config.weight_decay = 5e-4

    # Training.
    config.batch_size = 64  # global: split over all devices of all hosts
    config.num_epochs = 30
    config.seed = 0  # split, label noise, initialisation, batch order
    config.eval_batch_size = 1000
    config.eval_every_epochs = 1  # validation + test accuracy (and the last)

    # Devices: data parallel over `num_devices` local devices of every host
    # (0 = all). ε per device (m-sharpness, m = per-device batch) unless
    # `sync_perturbation`; `m` > 0 splits each device's batch further into
    # chunks of m examples, one ε each.
    config.num_devices = 0
    config.sync_perturbation = False
    config.m = 0

    # Run control (may change between a job and its resumption).
    config.checkpoint_every_steps = 500
    # A schedule that depends on the step count alone (every_k_sam, looksam):
    # the host picks one of two compiled programs per step, with no
    # `lax.cond` (same results; much faster for convnets on CPU). False: the
    # schedule decides inside the step.
    config.host_schedule = True
    config.progress_bar = True
    return config

"""SAM on Fashion-MNIST (60,000 / 10,000 images of 28x28).

Needs the IDX files: `sudo apt-get install -y dataset-fashion-mnist` (they go
to /usr/share/datasets/fashion-mnist), or `--config.data_dir=DIR`.

    python -m sam_optax.train --workdir=/tmp/fmnist \
        --config=sam_optax/train/configs/fashion_mnist.py
    # the ResNet, e.g. on an accelerator:
    python -m sam_optax.train --workdir=/tmp/fmnist_resnet \
        --config=sam_optax/train/configs/fashion_mnist.py --config.model=resnet
"""

# ml_collections types nested ConfigDict fields as a union of value types:
# pyright: reportAttributeAccessIssue=false, reportOptionalMemberAccess=false

from sam_optax.train.configs import default


def get_config():
    config = default.get_config()
    config.dataset = "fashion_mnist"
    config.mlp.hidden = (512,)
    config.batch_size = 128
    config.num_epochs = 20
    config.learning_rate = 0.05
    config.checkpoint_every_steps = 1000
    return config

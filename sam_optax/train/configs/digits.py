"""SGD-with-SAM on scikit-learn's 8x8 digits: no download, seconds on a CPU.

    python -m sam_optax.train --workdir=/tmp/digits \
        --config=sam_optax/train/configs/digits.py --config.label_noise=0.4
"""

from sam_optax.train.configs import default


def get_config():
    return default.get_config()  # digits is the default job

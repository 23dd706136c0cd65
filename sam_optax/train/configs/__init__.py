"""Built-in trainer configs: ``digits.py`` (the default) and ``fashion_mnist.py``.

Each file defines ``get_config()`` returning an ``ml_collections.ConfigDict``;
pass its path to the trainer (``--config=sam_optax/train/configs/digits.py``)
and override any key on the command line (``--config.sam.rho=0.1``).
"""

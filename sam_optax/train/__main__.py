"""``python -m sam_optax.train``: see :mod:`sam_optax.train.main`."""

from sam_optax.train.main import run

if __name__ == "__main__":
    run()

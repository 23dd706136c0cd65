"""Datasets for the trainer, the examples, the benchmarks and the notebooks.

Two image-classification datasets, both as float32 NHWC images in [0, 1]
and int32 labels:

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, no download);
* ``fashion_mnist``: Fashion-MNIST (Xiao et al. 2017), 60,000 training and
  10,000 test images of 28x28, read from the four IDX files that Debian's
  ``dataset-fashion-mnist`` package installs under
  ``/usr/share/datasets/fashion-mnist/`` (gzipped or not), or from any
  directory holding them.

:func:`load` returns a :class:`Splits`: a held-out validation split is cut
from the training images (for tuning ρ without touching the test set), and
symmetric label noise, drawn from the seed, is applied to the training and
validation labels only; the test labels stay clean.

:func:`epoch_order` and :func:`host_batch_indices` fix which examples every
step sees: the order of epoch ``e`` depends only on ``(seed, e)``, so a job
resumed at any step continues exactly, and each process reads only its own
slice of the global batch.
"""

# scikit-learn's stubs type `load_digits()` as a Bunch-or-tuple union and
# `train_test_split` as lists:
# pyright: reportAttributeAccessIssue=false, reportReturnType=false

from __future__ import annotations

import gzip
import os
import struct
from typing import NamedTuple, Optional

import numpy as np

DATASETS = ("digits", "fashion_mnist")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_INSTALL = "sudo apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# IDX type codes (the third byte of the magic number) and their dtypes.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
               0x0E: np.dtype(">f8")}


class Splits(NamedTuple):
    """Images ``x_*`` (N, H, W, C) float32 in [0, 1] and int32 labels ``y_*``.

    ``y_train`` and ``y_val`` carry the label noise; ``y_test`` is clean, and
    ``y_train_clean`` keeps the training labels before the noise (to measure
    memorisation). ``noisy_train`` marks the flipped training labels.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    y_train_clean: np.ndarray
    noisy_train: np.ndarray
    num_classes: int


# ------------------------------------------------------------------- IDX files


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (LeCun's MNIST format), gzipped (``.gz``) or not.

    The header is two zero bytes, a type code, the number of dimensions
    ``d``, then ``d`` big-endian uint32 sizes; the data follow.

    Raises:
      ValueError: naming the file, if the header or the length is wrong.
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file (its magic number is {raw[:4].hex()}; "
            "expected 0000 then a type code such as 08 and a dimension count)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: the header announces shape {shape} ({expected} bytes of "
            f"data) but the file holds {len(raw) - header}; it is truncated "
            "or corrupt")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file, gzipped when ``path`` ends in .gz."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_idx writes uint8 arrays; got {array.dtype}")
    payload = (bytes([0, 0, 0x08, array.ndim])
               + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def _find_idx(directory: str, stem: str) -> Optional[str]:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                 stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def load_fashion_mnist(data_dir: Optional[str] = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST's official splits: ``(x_train, y_train, x_test, y_test)``.

    Args:
      data_dir: a directory holding the four IDX files (``train-images-idx3-
        ubyte`` etc., each optionally ``.gz``); default
        ``/usr/share/datasets/fashion-mnist``.

    Raises:
      FileNotFoundError: naming the missing files and the install command.
      ValueError: if the files are malformed or disagree in length.
    """
    directory = data_dir or FASHION_MNIST_DIR
    paths = {key: _find_idx(directory, stem)
             for key, stem in FASHION_MNIST_FILES.items()}
    missing = [FASHION_MNIST_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        install = (f"Install them with `{FASHION_MNIST_INSTALL}` (they go to "
                   f"{FASHION_MNIST_DIR}), or point" if data_dir is None
                   else "Point")
        raise FileNotFoundError(
            f"Fashion-MNIST: {', '.join(missing)} (or .gz) not found in "
            f"{directory!r}. {install} `data_dir` (`--config.data_dir=DIR`) at "
            "a directory holding the four IDX files "
            f"{', '.join(FASHION_MNIST_FILES.values())} (each may be .gz).")
    arrays = {key: read_idx(path) for key, path in paths.items()
              if path is not None}  # none is missing (checked above)
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST {part}: images of shape {images.shape} and "
                f"labels of shape {labels.shape} do not match (expected "
                "(N, 28, 28) and (N,))")
    scale = lambda a: (a.astype(np.float32) / 255.0)[..., None]
    return (scale(arrays["train_images"]),
            arrays["train_labels"].astype(np.int32),
            scale(arrays["test_images"]), arrays["test_labels"].astype(np.int32))


# ---------------------------------------------------------------------- digits


def load_digits_split(test_size: float = 0.25, seed: int = 0, flat: bool = False
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(x_train, y_train, x_test, y_test)``.

    A stratified split (``sklearn.model_selection.train_test_split`` with
    ``random_state=seed``); images scaled to [0, 1], NHWC (N, 8, 8, 1), or
    (N, 64) with ``flat=True``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_size, random_state=seed, stratify=labels)
    if flat:
        x_train, x_test = (x.reshape(len(x), -1) for x in (x_train, x_test))
    return x_train, y_train, x_test, y_test


# ------------------------------------------------------------------ label noise


def symmetric_label_noise(labels: np.ndarray, fraction: float, seed,
                          num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Replace each label, with probability ``fraction``, by another class.

    The new class is drawn uniformly among the ``num_classes - 1`` *other*
    classes (symmetric noise), from ``np.random.default_rng(seed)``: the same
    seed gives the same noise. Returns ``(noisy_labels, flipped_mask)``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"`label_noise` must be in [0, 1]; got {fraction!r}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    flip = rng.random(len(labels)) < fraction
    noisy = labels.copy()
    noisy[flip] = (labels[flip] + rng.integers(1, num_classes, int(flip.sum()))
                   ) % num_classes
    return noisy.astype(np.int32), flip


# ---------------------------------------------------------------------- splits


def load(dataset: str, *, seed: int = 0, label_noise: float = 0.0,
         validation_fraction: float = 0.1, train_size: int = 0,
         data_dir: Optional[str] = None) -> Splits:
    """Train / validation / test splits of ``dataset`` with label noise.

    The validation split is the first ``validation_fraction`` of a permutation
    of the official training images drawn from ``seed``; ``train_size > 0``
    keeps only that many of the remaining training images (a subset, for
    quick runs). ``label_noise`` of the training *and* validation labels are
    flipped (:func:`symmetric_label_noise`, seeded); test labels stay clean.
    For digits, the "official" test split is a fixed stratified 25 %.

    Raises:
      ValueError: for an unknown dataset name (listing the valid ones) or
        out-of-range fractions.
      FileNotFoundError: if Fashion-MNIST's files are missing (with the fix).
    """
    if dataset == "digits":
        x_all, y_all, x_test, y_test = load_digits_split()
    elif dataset == "fashion_mnist":
        x_all, y_all, x_test, y_test = load_fashion_mnist(data_dir)
    else:
        raise ValueError(f"unknown `dataset` {dataset!r}; valid: {list(DATASETS)}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError("`validation_fraction` must be in [0, 1); got "
                         f"{validation_fraction!r}")
    num_classes = int(max(y_all.max(), y_test.max())) + 1
    order = np.random.default_rng([seed, 1]).permutation(len(x_all))
    n_val = int(round(validation_fraction * len(x_all)))
    val, train = order[:n_val], order[n_val:]
    if train_size:
        if not 0 < train_size <= len(train):
            raise ValueError(
                f"`train_size` {train_size} must be between 1 and the "
                f"{len(train)} training images left after the validation "
                "split (0 for all)")
        train = train[:train_size]
    noisy, flipped = symmetric_label_noise(y_all, label_noise, [seed, 2],
                                           num_classes)
    return Splits(x_train=x_all[train], y_train=noisy[train],
                  x_val=x_all[val], y_val=noisy[val],
                  x_test=x_test, y_test=y_test, y_train_clean=y_all[train],
                  noisy_train=flipped[train], num_classes=num_classes)


# ------------------------------------------------------------------- batching


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The shuffled order of epoch ``epoch``: a function of ``(seed, epoch)``.

    A resumed job recomputes the order of its current epoch and continues
    from the step it stopped at; nothing about the data stream is stored.
    """
    return np.random.default_rng([seed, 3, epoch]).permutation(num_examples)


def host_batch_indices(order: np.ndarray, step_in_epoch: int, batch_size: int,
                       process_index: int = 0, process_count: int = 1
                       ) -> np.ndarray:
    """The indices of this process's slice of global batch ``step_in_epoch``.

    The global batch is ``order[s * B:(s + 1) * B]``; process ``i`` of ``P``
    reads its ``i``-th contiguous ``B / P`` rows (the rows its devices hold
    in a mesh ordered by process), and nothing else.
    """
    per_host = batch_size // process_count
    start = step_in_epoch * batch_size + process_index * per_host
    return order[start:start + per_host]


def shuffled_batches(x: np.ndarray, y: np.ndarray, batch_size: int,
                     rng: np.random.Generator):
    """One shuffled epoch of full batches ``(x, y)`` (the remainder dropped,
    so every batch has one shape: one compilation)."""
    order = rng.permutation(len(x))
    for start in range(0, len(x) - batch_size + 1, batch_size):
        index = order[start:start + batch_size]
        yield x[index], y[index]


def padded_batches(x: np.ndarray, y: np.ndarray, batch_size: int,
                   process_index: int = 0, process_count: int = 1):
    """Evaluation batches: every example once, the last batch zero-padded.

    Yields this process's slice ``(x, y, weight)`` of each global batch, with
    ``weight`` 0 on padding, so sums over batches count every example once.
    """
    n = len(x)
    per_host = batch_size // process_count
    for start in range(0, n, batch_size):
        lo = start + process_index * per_host
        index = np.arange(lo, lo + per_host)
        weight = (index < n).astype(np.float32)
        index = np.minimum(index, n - 1)
        yield x[index], y[index], weight


__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_INSTALL",
    "Splits",
    "epoch_order",
    "host_batch_indices",
    "load",
    "load_digits_split",
    "load_fashion_mnist",
    "padded_batches",
    "read_idx",
    "shuffled_batches",
    "symmetric_label_noise",
    "write_idx",
]

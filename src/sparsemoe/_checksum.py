"""SHA-256 checksums kept beside a file (``FILE.sha256``, the format of ``sha256sum``): written
with the file and checked when it is read back, so one flipped byte is refused with the path
and both digests. The run directories' checkpoints (:mod:`sparsemoe.experiments.runs`) and
the plain values of a distributed checkpoint (:mod:`sparsemoe.parallel.checkpoint`) use it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHECKSUM_SUFFIX = ".sha256"


def checksum_path(path: str | Path) -> Path:
    """Where the SHA-256 of a file is kept: beside it, with ``.sha256`` appended."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def sha256(data: bytes) -> str:
    """The hexadecimal SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def checksum_text(path: str | Path, data: bytes) -> str:
    """The checksum file's text for ``data``, about to replace ``path``: the digest of ``data``
    and that of the file now at ``path`` (if any), one ``sha256sum`` line each. Written before
    the file is replaced, it lets a process killed between the two writes leave a file that
    still verifies (the old one)."""
    path = Path(path)
    digests = [sha256(data)]
    if path.exists():
        digests.append(sha256(path.read_bytes()))
    return "".join(f"{d}  {path.name}\n" for d in digests)


def read_verified(path: str | Path, error: type[Exception]) -> bytes:
    """The bytes of the file ``path``, once their SHA-256 is one that its checksum file lists.

    Raises:
        error: the checksum file is missing, or the bytes do not match it; the message names
            the path and both digests.
    """
    path = Path(path)
    digest_file = checksum_path(path)
    if not digest_file.is_file():
        raise error(f"{path} has no checksum file {digest_file.name} beside it, so its "
                    f"integrity cannot be verified; it was not written by sparsemoe")
    data = path.read_bytes()
    recorded = [line.split()[0] for line in digest_file.read_text().splitlines() if line.split()]
    actual = sha256(data)
    if actual not in recorded:
        raise error(f"{path} is corrupt: its SHA-256 is {actual}, {digest_file.name} "
                    f"records {' or '.join(recorded) or 'nothing'}")
    return data

#!/usr/bin/env python3
"""Set-up and the two project commands, needing nothing but Python 3.11+.

    python3 dev.py main   # the main job: the paper's claim in miniature (~5 min)
    python3 dev.py test   # lint + the test suite (not the slow-marked tests); args go to pytest

``main`` runs ``sparsemoe lm compare --arch transformer --presets experts --vocab-size 2000
--batch-size 16 --bptt 64 --steps 1000 --lr 0.008 --eval-tokens 5000 --out runs/main`` on the
default corpus: a dense Transformer and its MoE twins with 8 and 16 experts at the same
multiply-adds per token, each for the same 1000 steps at the learning rate all three do best
at (a fixed amount of work, so every machine computes the same table; why the Transformer and
not the paper's LSTM: README, "Main job"); extra arguments are appended (a later flag wins,
e.g. ``--out runs/x``).

Both create ``.venv`` on first use and install sparsemoe into it with torch pinned to 2.13.0
(a CPU build; a looser pin can pull a multi-GB CUDA build) and every other package at the
version of ``constraints.txt`` (``pip install -c``), so that a fresh machine gets the versions
the tests passed with, whatever PyPI holds by then. Several of those versions need Python 3.11.
The install is redone only when pyproject.toml or constraints.txt changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
TORCH_PIN = "torch==2.13.0"
CONSTRAINTS = ROOT / "constraints.txt"
MIN_PYTHON = (3, 11)  # the oldest Python that the versions of constraints.txt support
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
MAIN_JOB = ("--arch", "transformer", "--presets", "experts", "--vocab-size", "2000",
            "--batch-size", "16", "--bptt", "64", "--steps", "1000", "--lr", "0.008",
            "--eval-tokens", "5000", "--out", "runs/main")


def run(*cmd: str | Path) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


def install_stamp(extras: str) -> Path:
    """The file marking an install of sparsemoe[extras]: named by a hash of everything that
    decides the installed versions (pyproject.toml, constraints.txt, the torch pin, extras)."""
    spec = ((ROOT / "pyproject.toml").read_bytes() + CONSTRAINTS.read_bytes()
            + TORCH_PIN.encode() + extras.encode())
    return VENV / f".installed-{hashlib.sha256(spec).hexdigest()[:16]}"


def ensure_env(extras: str) -> None:
    """Create the virtual environment and install sparsemoe[extras] at the pinned versions,
    once per :func:`install_stamp`."""
    stamp = install_stamp(extras)
    if stamp.exists():
        return
    if not (BIN / "python").exists():
        venv.create(VENV, with_pip=True)
    pip = (BIN / "python", "-m", "pip", "install", "--quiet", "-c", CONSTRAINTS)
    run(*pip, "--upgrade", "pip")
    run(*pip, TORCH_PIN, "-e", f".[{extras}]")
    for old in VENV.glob(".installed-*"):
        old.unlink()
    stamp.touch()


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("main", "test"):
        print(__doc__)
        return 2
    command, rest = sys.argv[1], sys.argv[2:]
    if sys.version_info < MIN_PYTHON:
        need, have = ".".join(map(str, MIN_PYTHON)), ".".join(map(str, sys.version_info[:3]))
        print(f"dev.py needs Python >= {need} (the pinned versions of {CONSTRAINTS.name}), got "
              f"Python {have}; run it with a newer python3")
        return 2
    try:
        ensure_env("dev,plot,hf,mt")  # hf, mt: so that the interop and translation tests run in CI
        if command == "main":
            run(BIN / "sparsemoe", "lm", "compare", *MAIN_JOB, *rest)
        else:
            run(BIN / "python", "-m", "ruff", "check", "src", "tests", "benchmarks", "dev.py")
            # The short suite; `python3 dev.py test -m slow` runs the long checks instead.
            markers = [] if "-m" in rest else ["-m", "not slow"]
            run(BIN / "python", "-m", "pytest", "-q", *markers, *rest)
    except subprocess.CalledProcessError as e:
        return e.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())

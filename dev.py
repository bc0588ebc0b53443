#!/usr/bin/env python3
"""Set-up and the two project commands, needing nothing but Python 3.10+.

    python3 dev.py main   # the main job: the paper's claim in miniature (~15 min)
    python3 dev.py test   # lint + the test suite (not the slow-marked tests); args go to pytest

``main`` runs ``sparsemoe lm compare --arch transformer --presets experts --vocab-size 2000
--batch-size 16 --bptt 64 --steps 1000 --eval-tokens 5000 --out runs/main`` on the default
corpus: a dense Transformer and its MoE twins with 8 and 16 experts at the same multiply-adds
per token, each for the same 1000 steps (a fixed amount of work, so every machine computes
the same table; why the Transformer and not the paper's LSTM: README, "Main job"); extra
arguments are appended (a later flag wins, e.g. ``--out runs/x``).

Both create ``.venv`` on first use and install sparsemoe into it with torch pinned to 2.13.0
(a CPU build; a looser pin can pull a multi-GB CUDA build). The install is redone only when
pyproject.toml changes.
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
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
MAIN_JOB = ("--arch", "transformer", "--presets", "experts", "--vocab-size", "2000",
            "--batch-size", "16", "--bptt", "64", "--steps", "1000", "--eval-tokens", "5000",
            "--out", "runs/main")


def run(*cmd: str | Path) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


def ensure_env(extras: str) -> None:
    """Create the virtual environment and install sparsemoe[extras] once per pyproject."""
    spec = (ROOT / "pyproject.toml").read_bytes() + TORCH_PIN.encode() + extras.encode()
    stamp = VENV / f".installed-{hashlib.sha256(spec).hexdigest()[:16]}"
    if stamp.exists():
        return
    if not (BIN / "python").exists():
        venv.create(VENV, with_pip=True)
    run(BIN / "python", "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(BIN / "python", "-m", "pip", "install", "--quiet", TORCH_PIN, "-e", f".[{extras}]")
    for old in VENV.glob(".installed-*"):
        old.unlink()
    stamp.touch()


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("main", "test"):
        print(__doc__)
        return 2
    command, rest = sys.argv[1], sys.argv[2:]
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

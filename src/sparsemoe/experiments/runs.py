"""The run directory every trainer writes: nothing lost, nothing half-written, nothing executed.

- :func:`atomic_write` (and :func:`write_json`, :func:`write_text`, :func:`save_figure`): every
  output goes to a uniquely named temporary file in the same folder, is flushed to the disk
  (``fsync``) and renamed over the target (``os.replace``), so a reader sees the old file or the
  new one, never a part. A full disk raises :class:`RunError` ("no space left on device: PATH")
  and leaves no temporary file.
- :func:`save_checkpoint` / :func:`load_checkpoint`: checkpoints hold only tensors and plain
  types and are read with ``torch.load(weights_only=True)``, so a crafted file cannot run code.
  The SHA-256 of the file's bytes is kept beside it (``checkpoint.pt.sha256``, the format of
  ``sha256sum``) and checked on load: one flipped byte is refused with the path and both
  digests.
- :class:`RunLock`: an exclusive ``fcntl.flock`` on ``RUN/.lock`` while a process writes the
  run; a second writer is refused at once.
- :class:`StopSignals`: SIGINT/SIGTERM only set a flag; the trainer saves at the next step
  boundary and raises :class:`Interrupted`, whose message says how to resume.
- :func:`check_finite_loss` and :func:`perplexity`: a non-finite loss stops training at once
  (naming the step) and a perplexity that overflows is ``inf``.
- :class:`TrainingRun`: the loop the experiments' trainers share (resume or report, progress
  bar, validation and checkpoint every ``eval_every`` steps, a save before stopping on a
  signal), around each trainer's own step, validation, checkpoint and final evaluation.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import io
import json
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm.auto import tqdm

from .._checksum import checksum_path, checksum_text, read_verified

LOCK = ".lock"


class RunError(RuntimeError):
    """A run directory cannot be used as asked: a corrupt or foreign checkpoint, a full disk,
    another process writing it, a changed configuration, a diverged loss."""


class Interrupted(RunError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint (``signum`` is the
    signal)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def atomic_write(path: str | Path, data: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Write ``data`` to ``path`` so that ``path`` is always either the old file or the new one.

    Args:
        path: the target; its folder must exist.
        data: bytes, text (UTF-8), or a function that writes to the binary file it is given.

    Raises:
        RunError: the device is full ("no space left on device: PATH"); nothing is left behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 → what open() would have made
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RunError(f"no space left on device: {path}") from e
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of a text file."""
    return atomic_write(path, text)


def write_json(path: str | Path, obj: object) -> Path:
    """:func:`atomic_write` of ``obj`` as indented JSON."""
    return atomic_write(path, json.dumps(obj, indent=1))


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None after saying that
    the plots are skipped when matplotlib (the ``plot`` extra) is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install 'sparsemoe[plot]')")
        return None
    return plt


def save_figure(fig, path: str | Path, **kwargs) -> Path:
    """:func:`atomic_write` of a matplotlib figure, in the format of ``path``'s suffix."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, **kwargs))


def save_checkpoint(path: str | Path, obj: dict) -> Path:
    """Save ``obj`` (tensors and plain types only: dict, list, tuple, str, int, float, bool,
    None) with ``torch.save``, atomically, and its SHA-256 beside it.

    The checksum file lists the new digest and that of the checkpoint now on disk, and is
    replaced first: a process killed between the two renames leaves a checkpoint that still
    verifies (the old one).
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    write_text(checksum_path(path), checksum_text(path, data))
    atomic_write(path, data)
    return path


def load_checkpoint(path: str | Path, required: Iterable[str] = ()) -> dict:
    """A checkpoint written by :func:`save_checkpoint`, verified and loaded without running
    any code.

    Args:
        path: the checkpoint file.
        required: keys the checkpoint must have.

    Raises:
        RunError: the file or its checksum is missing, its bytes do not match the checksum,
            it holds anything but tensors and plain types, or it lacks a required key; the
            message names the path and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}")
    data = read_verified(path, RunError)
    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{path} cannot be loaded safely (only tensors and plain types are "
                       f"accepted): {first}") from e
    if not isinstance(obj, dict):
        raise RunError(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary")
    missing = [k for k in required if k not in obj]
    if missing:
        raise RunError(f"{path} is not a checkpoint of this kind: it lacks {missing}")
    return obj


class RunLock:
    """Exclusive use of a run directory: ``with RunLock(folder): ...``.

    Takes a non-blocking ``fcntl.flock`` on ``folder/.lock`` (created with the folder); the
    kernel releases it when the process ends, however it ends.

    Raises:
        RunError: another process holds the lock, or the folder cannot be created or written
            (a file, no permission); the message names it.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._file = None

    def __enter__(self) -> RunLock:
        path = self.folder / LOCK
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            f = open(path, "a+")
        except OSError as e:
            raise RunError(f"the run directory {self.folder} cannot be written: "
                           f"{e.strerror or e}") from e
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise RunError(f"{self.folder} is in use by another process (pid {holder}, lock "
                           f"{path}); wait for it to finish or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # releases the lock
            self._file = None


class StopSignals:
    """Turn SIGINT and SIGTERM into a request to stop at the next step boundary.

    ``with StopSignals() as stop: ... if stop.signum: save and stop``. A second signal of the
    same kind acts at once as it would without this handler (KeyboardInterrupt, termination).
    Outside the main thread (where Python cannot install handlers) nothing is changed.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            signal.signal(signum, self._previous[signum])
            signal.raise_signal(signum)
            return
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def interrupted(signum: int, step: int, checkpoint: Path) -> Interrupted:
    """The error that ends a run stopped by ``signum`` after saving ``checkpoint``."""
    name = signal.Signals(signum).name
    return Interrupted(f"stopped by {name} at step {step}; the checkpoint {checkpoint} is saved: "
                       f"run the same command again to resume", signum)


def check_finite_loss(loss: float, step: int, checkpoint: Path) -> None:
    """Stop at the first non-finite training loss, before anything is saved.

    Raises:
        RunError: naming the step and the last good checkpoint, which is left as it was.
    """
    if not math.isfinite(loss):
        kept = f"the last good checkpoint {checkpoint} is kept" if checkpoint.exists() else \
            "no checkpoint was written"
        raise RunError(f"the training loss is {loss} at step {step}: training diverged and "
                       f"stopped; {kept}. Lower the learning rate or the clipping threshold")


def perplexity(nll: float) -> float:
    """exp(nll), ``inf`` where it overflows a float (and ``nan`` for a NaN loss)."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def config_differences(saved: dict, current: dict) -> list[str]:
    """The fields of two configuration dictionaries that differ, as ``"name: saved A, now B"``
    (a field only one of them has counts as a difference)."""
    def show(d: dict, k: str) -> str:
        return repr(d[k]) if k in d else "absent"

    return [f"{k}: saved {show(saved, k)}, now {show(current, k)}"
            for k in sorted(set(saved) | set(current), key=str)
            if k not in saved or k not in current or saved[k] != current[k]]


CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"


class TrainingRun(abc.ABC):
    """The training loop the experiments' trainers share.

    A subclass sets ``cfg`` (with ``steps``, ``time_budget``, ``eval_every``, ``preset``),
    ``out`` (the run directory), ``root`` (this process writes files), ``progress``,
    ``model`` (with ``moe_layers()``), ``step``, ``train_seconds`` and ``history`` (lists
    ``step``, ``train_loss``, ``valid_step``, ``valid_perplexity``, ``valid_seconds``), and
    implements :meth:`train_step`, :meth:`validate`, :meth:`save` (which refuses a non-finite
    parameter) and :meth:`finish` (the final evaluation, writing ``out/metrics.json``).
    """

    eval_limit: int | None = None  # what validate() evaluates on the way (None: everything)

    @property
    def label(self) -> str:
        """The progress bar's label."""
        return self.cfg.preset or type(self).__name__

    @property
    def checkpoint_path(self) -> Path:
        """Where :meth:`save` writes (named in the messages of a stop)."""
        return self.out / CHECKPOINT

    @property
    @abc.abstractmethod
    def tokens_trained(self) -> int:
        """Tokens trained on so far (the progress bar's tokens/s)."""

    @abc.abstractmethod
    def train_step(self) -> float:
        """One optimiser step; the batch's cross-entropy (without auxiliary losses)."""

    @abc.abstractmethod
    def validate(self, limit: int | None) -> dict:
        """``{"perplexity": ..., "tokens": ...}`` over the first ``limit`` validation items
        (None: all)."""

    @abc.abstractmethod
    def save(self) -> None:
        """Write the checkpoint; refuse (RunError) a non-finite parameter."""

    @abc.abstractmethod
    def finish(self) -> dict:
        """The final evaluation; writes and returns ``metrics.json``."""

    def progress_extras(self) -> dict[str, str]:
        """More fields for the progress bar (after the step's loss, perplexity and load)."""
        return {}

    def stop_requested(self, stop: StopSignals) -> bool:
        """Whether to stop after this step (over several processes: whether any got a
        signal, so that all stop at the same step)."""
        return stop.signum is not None

    def done(self) -> bool:
        c = self.cfg
        return (c.steps is not None and self.step >= c.steps) or \
            (c.time_budget is not None and self.train_seconds >= c.time_budget)

    def run(self) -> dict:
        """Train to the end (resuming where the checkpoint stopped), evaluate and write
        ``metrics.json``; a run already finished returns its metrics without training.

        Raises:
            RunError: another process writes ``out``; the loss became non-finite (nothing
                is saved); :class:`Interrupted` on SIGINT/SIGTERM, after saving at the step
                boundary.
        """
        with RunLock(self.out) if self.root else contextlib.nullcontext(), \
                StopSignals() as stop:
            finished = self.out / METRICS
            if self.done() and finished.exists():
                metrics = json.loads(finished.read_text())
                if metrics.get("steps") == self.step:
                    return metrics
            return self._train(stop)

    def _train(self, stop: StopSignals) -> dict:
        c = self.cfg
        self.model.train()
        bar = tqdm(total=c.steps, initial=self.step, disable=not self.progress,
                   desc=self.label, unit="step", dynamic_ncols=True)
        moe = self.model.moe_layers()
        while not self.done():
            t0 = time.perf_counter()
            ce = self.train_step()
            check_finite_loss(ce, self.step + 1, self.checkpoint_path)
            self.train_seconds += time.perf_counter() - t0
            self.step += 1
            self.history["step"].append(self.step)
            self.history["train_loss"].append(ce)
            post = {"loss": f"{ce:.3f}", "ppl": f"{perplexity(ce):.1f}",
                    "tok/s": f"{self.tokens_trained / self.train_seconds:,.0f}"}
            if moe:
                post["max/mean load"] = f"{moe[0].stats.max_over_mean_load:.2f}"
            bar.set_postfix({**post, **self.progress_extras()}, refresh=False)
            bar.update()
            if self.step % c.eval_every == 0:
                v = self.validate(self.eval_limit)
                self.history["valid_step"].append(self.step)
                self.history["valid_perplexity"].append(v["perplexity"])
                self.history["valid_seconds"].append(self.train_seconds)
                if self.progress:
                    bar.write(f"step {self.step}: valid perplexity {v['perplexity']:.2f} "
                              f"({v['tokens']:,} tokens)")
                self.save()
            if self.stop_requested(stop):
                bar.close()
                self.save()
                raise interrupted(stop.signum or signal.SIGTERM, self.step,
                                  self.checkpoint_path)
        bar.close()
        self.save()
        return self.finish()

"""The run directory's guarantees (sparsemoe.experiments.runs): atomic writes, a full disk,
verified checkpoints that cannot execute code, the lock, signals, non-finite losses."""

import errno
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from sparsemoe._checksum import sha256
from sparsemoe.experiments import runs
from sparsemoe.experiments.runs import RunError


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "metrics.json"
    runs.write_json(path, {"a": 1})
    runs.write_json(path, {"a": [1, 2]})
    assert path.read_text() == '{\n "a": [\n  1,\n  2\n ]\n}'
    runs.write_text(tmp_path / "r.md", "héllo\n")
    assert (tmp_path / "r.md").read_text(encoding="utf-8") == "héllo\n"
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # as open() makes it, not 0600
    assert _leftovers(tmp_path) == []


def test_full_disk_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    runs.write_json(path, {"good": True})

    def half_then_full(f):
        f.write(b'{"trunc')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RunError, match=f"no space left on device: {path}"):
        runs.atomic_write(path, half_then_full)
    assert path.read_text() == '{\n "good": true\n}'
    assert _leftovers(tmp_path) == []
    with pytest.raises(ZeroDivisionError):  # other errors pass through, also cleaned up
        runs.atomic_write(path, lambda f: 1 / 0)
    assert _leftovers(tmp_path) == []


def test_figures_are_written_atomically(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    runs.save_figure(fig, tmp_path / "curve.png", dpi=50)
    plt.close(fig)
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _leftovers(tmp_path) == []


def _checkpoint(tmp_path) -> tuple[Path, dict]:
    torch.manual_seed(0)
    obj = {"model": {"w": torch.randn(64, 64)}, "step": 7, "config": {"corpus": ("a.txt",)},
           "history": [1.5, float("nan")]}
    return runs.save_checkpoint(tmp_path / "checkpoint.pt", obj), obj


def test_checkpoint_round_trip(tmp_path):
    path, obj = _checkpoint(tmp_path)
    back = runs.load_checkpoint(path, ("model", "step"))
    assert torch.equal(back["model"]["w"], obj["model"]["w"])
    assert back["step"] == 7 and back["config"] == {"corpus": ("a.txt",)}
    assert back["history"][0] == 1.5 and math.isnan(back["history"][1])
    assert runs.checksum_path(path).read_text().endswith("  checkpoint.pt\n")
    with pytest.raises(RunError, match=rf"{path} is not a checkpoint of this kind: it lacks "
                                       r"\['optimizer'\]"):
        runs.load_checkpoint(path, ("model", "optimizer"))


def test_one_flipped_byte_is_refused(tmp_path):
    path, obj = _checkpoint(tmp_path)
    data = bytearray(path.read_bytes())
    # a byte inside the tensor's record: the float data
    at = bytes(data).index(obj["model"]["w"][10].numpy().tobytes()) + 17
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(RunError, match=rf"{path} is corrupt: its SHA-256 is [0-9a-f]{{64}}, "
                                       rf"checkpoint.pt.sha256 records [0-9a-f]{{64}}"):
        runs.load_checkpoint(path)


def test_foreign_and_truncated_files_give_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(RunError, match=f"no checkpoint at {path}"):
        runs.load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(RunError, match="has no checksum file checkpoint.pt.sha256 beside it"):
        runs.load_checkpoint(path)
    # foreign bytes whose checksum matches (written beside them): still not EOFError/KeyError
    for data in (b"not a checkpoint at all", b""):
        path.write_bytes(data)
        runs.checksum_path(path).write_text(f"{sha256(data)}  checkpoint.pt\n")
        with pytest.raises(RunError, match=f"{path} cannot be loaded safely"):
            runs.load_checkpoint(path)
    torch.save([1, 2], path)
    runs.checksum_path(path).write_text(f"{sha256(path.read_bytes())}  checkpoint.pt\n")
    with pytest.raises(RunError, match=f"{path} holds a list, not a checkpoint dictionary"):
        runs.load_checkpoint(path)


class _Touch:
    """Unpickling this creates a file: what a crafted checkpoint would run."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_a_crafted_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    torch.save({"config": _Touch(marker), "step": 1}, path)
    # the attacker also writes a matching checksum: integrity alone does not protect
    runs.checksum_path(path).write_text(f"{sha256(path.read_bytes())}  checkpoint.pt\n")
    torch.load(path, weights_only=False)  # the unsafe way does run it ...
    assert marker.exists()
    marker.unlink()
    with pytest.raises(RunError, match=f"{path} cannot be loaded safely .*"):
        runs.load_checkpoint(path)
    assert not marker.exists()  # ... the library's way does not


def test_a_kill_between_the_two_renames_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    path, obj = _checkpoint(tmp_path)
    real = runs.atomic_write
    calls = []

    def killed_before_second_rename(target, data):
        calls.append(Path(target).name)
        if Path(target) == path:
            raise KeyboardInterrupt  # stands for a kill: the checksum file is already new
        return real(target, data)

    monkeypatch.setattr(runs, "atomic_write", killed_before_second_rename)
    with pytest.raises(KeyboardInterrupt):
        runs.save_checkpoint(path, {**obj, "step": 8})
    monkeypatch.undo()
    assert calls == ["checkpoint.pt.sha256", "checkpoint.pt"]
    assert runs.load_checkpoint(path)["step"] == 7  # the old one, still verified
    runs.save_checkpoint(path, {**obj, "step": 9})
    assert runs.load_checkpoint(path)["step"] == 9


def test_lock_refuses_a_second_writer(tmp_path):
    # flock locks belong to an open file: a second open in this process conflicts too
    with runs.RunLock(tmp_path / "run"), pytest.raises(
            RunError, match=rf"{tmp_path / 'run'} is in use by another process "
                            rf"\(pid {os.getpid()}"):
        runs.RunLock(tmp_path / "run").__enter__()
    with runs.RunLock(tmp_path / "run"):  # released on exit
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match=f"the run directory {tmp_path / 'file'} cannot be "
                                       "written"), runs.RunLock(tmp_path / "file"):
        pass


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stop_signals_set_a_flag_and_restore_handlers(signum):
    before = signal.getsignal(signum)
    with runs.StopSignals() as stop:
        assert stop.signum is None
        os.kill(os.getpid(), signum)
        assert stop.signum == signum
    assert signal.getsignal(signum) is before
    err = runs.interrupted(signum, 12, Path("run/checkpoint.pt"))
    assert err.signum == signum
    assert str(err) == (f"stopped by {signal.Signals(signum).name} at step 12; the checkpoint "
                        f"run/checkpoint.pt is saved: run the same command again to resume")


def test_non_finite_loss_and_overflowing_perplexity(tmp_path):
    runs.check_finite_loss(3.2, 5, tmp_path / "checkpoint.pt")
    for bad in (math.nan, math.inf):
        with pytest.raises(RunError, match=f"the training loss is {bad} at step 5: .* no "
                                           "checkpoint was written"):
            runs.check_finite_loss(bad, 5, tmp_path / "checkpoint.pt")
    assert runs.perplexity(math.log(7.0)) == pytest.approx(7.0, rel=1e-15)
    assert runs.perplexity(1e4) == math.inf
    assert math.isnan(runs.perplexity(math.nan))


def test_config_differences_name_each_field():
    assert runs.config_differences({"a": 1, "b": (1,)}, {"a": 1, "b": (1,)}) == []
    assert runs.config_differences({"a": 1, "b": 2}, {"a": 3, "c": 4}) == [
        "a: saved 1, now 3", "b: saved 2, now absent", "c: saved absent, now 4"]

"""The LM trainer and CLI under attack: signals, kill -9, resume, crafted and corrupt
checkpoints, a full disk, divergence, bad flags (issue 19, items 2-8)."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from sparsemoe._checksum import sha256
from sparsemoe.cli import main
from sparsemoe.experiments import lm, lm_report, runs
from sparsemoe.experiments.runs import RunError

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _compare_args(corpus_file, out, *extra):
    return ["lm", "compare", "--presets", "MoE-4", "--corpus", corpus_file, "--batch-size",
            "4", "--bptt", "5", "--eval-tokens", "100", "--out", str(out), *extra]


def _start(args, cwd):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "sparsemoe.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.02)


def _reference(corpus_file, out, steps):
    """The same comparison in one uninterrupted run, in this process."""
    base = replace(lm.LMTrainConfig(), corpus=(corpus_file,), batch_size=4, bptt=5,
                   eval_tokens=100, steps=steps, preset=None)
    return lm_report.compare(["MoE-4"], base, out, progress=False)[0]


def test_ctrl_c_saves_refuses_a_second_writer_and_resumes_exactly(corpus_file, tmp_path,
                                                                   capsys):
    out = tmp_path / "cmp"
    args = _compare_args(corpus_file, out, "--steps", "60")
    proc = _start(args, tmp_path)
    _wait_for(out / "MoE-4" / "checkpoint.pt", proc)  # the first periodic save, step 10
    with pytest.raises(SystemExit) as exited:  # a second writer on the same --out
        main(args)
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out} is in use by another process (pid " in err
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("sparsemoe: error: stopped by SIGINT at step ")
    assert last.endswith("is saved: run the same command again to resume")
    step = int(last.split("at step ")[1].split(";")[0])
    assert 10 <= step < 60
    assert runs.load_checkpoint(out / "MoE-4" / "checkpoint.pt")["step"] == step
    assert not (out / "results.md").exists()

    main(args)  # the same command again (here in this process) continues
    resumed = json.loads((out / "MoE-4" / "metrics.json").read_text())
    whole = _reference(corpus_file, tmp_path / "whole", 60)
    assert resumed["history"]["train_loss"] == whole["history"]["train_loss"]
    assert resumed["test_perplexity"] == whole["test_perplexity"]


@pytest.mark.slow
def test_kill_9_with_a_time_budget_continues_and_a_finished_run_only_reports(corpus_file,
                                                                             tmp_path):
    out = tmp_path / "cmp"
    args = _compare_args(corpus_file, out, "--time-budget", "6")
    proc = _start(args, tmp_path)
    _wait_for(out / "MoE-4" / "checkpoint.pt", proc)
    proc.kill()
    proc.communicate(timeout=60)
    calibration = json.loads((out / lm_report.CALIBRATION).read_text())
    assert calibration["time_budget"] == 6.0
    steps = calibration["steps"]
    killed_at = runs.load_checkpoint(out / "MoE-4" / "checkpoint.pt")["step"]
    assert killed_at < steps

    again = _start(args, tmp_path)  # not recalibrated: the same steps, warm-up and cadence
    stdout, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"time budget 6 s → {steps} steps" in stdout
    metrics = json.loads((out / "MoE-4" / "metrics.json").read_text())
    assert metrics["steps"] == steps
    whole = _reference(corpus_file, tmp_path / "whole", steps)
    assert metrics["history"]["train_loss"] == whole["history"]["train_loss"]

    stamp = (out / "MoE-4" / "checkpoint.pt").stat().st_mtime_ns
    third = _start(args, tmp_path)  # finished: reports, does not train or save again
    stdout, err = third.communicate(timeout=300)
    assert third.returncode == 0, err
    assert (out / "MoE-4" / "checkpoint.pt").stat().st_mtime_ns == stamp
    assert f"| MoE-4 | {metrics['test_perplexity']:.1f} |" in stdout

    changed = _start(_compare_args(corpus_file, out, "--time-budget", "7"), tmp_path)
    _, err = changed.communicate(timeout=300)
    assert changed.returncode == 1
    assert err.strip().splitlines()[-1] == (
        f"sparsemoe: error: {out} was calibrated for time_budget 6.0 s, now 7.0 s; use the "
        f"same time_budget or another run directory (out)")


def test_the_time_budget_is_calibrated_once(corpus_file, tmp_path, monkeypatch):
    corpus = lm.load_corpus((corpus_file,), None)
    cfgs = [tiny_config(corpus_file, tmp_path / "a")]
    path = tmp_path / lm_report.CALIBRATION
    measured = lm_report._calibrated_steps(cfgs, corpus, 3.0, path)
    assert json.loads(path.read_text()) == {"time_budget": 3.0, "steps": measured}
    monkeypatch.setattr(lm_report, "_steps_for_budget", None)  # a second timing would fail
    assert lm_report._calibrated_steps(cfgs, corpus, 3.0, path) == measured
    with pytest.raises(RunError, match=f"{tmp_path} was calibrated for time_budget 3.0 s, "
                                       f"now 4.0 s"):
        lm_report._calibrated_steps(cfgs, corpus, 4.0, path)


def test_resume_ignores_paths_and_names_a_changed_field(corpus_file, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(corpus_file).parent)
    relative = "./" + Path(corpus_file).name
    Trainer = lm.Trainer
    Trainer(replace(tiny_config(relative, tmp_path / "a"), steps=3), progress=False).run()
    shutil.move(tmp_path / "a", tmp_path / "moved")  # a moved run directory, an absolute path
    resumed = Trainer(tiny_config(corpus_file, str(tmp_path / "moved") + "/"), progress=False)
    assert resumed.step == 3
    with pytest.raises(RunError, match=r"different configuration \(bptt: saved 5, now 6; "
                                       r"seed: saved 0, now 1\)"):
        Trainer(replace(tiny_config(corpus_file, tmp_path / "moved"), bptt=6, seed=1),
                progress=False)


def test_a_finished_run_returns_its_metrics_without_training(corpus_file, tmp_path):
    first = lm.Trainer(tiny_config(corpus_file, tmp_path), progress=False).run()
    stamp = (tmp_path / lm.CHECKPOINT).stat().st_mtime_ns
    again = lm.Trainer(tiny_config(corpus_file, tmp_path), progress=False)
    again.train_step = None  # training would fail
    assert again.run() == json.loads(json.dumps(first))
    assert (tmp_path / lm.CHECKPOINT).stat().st_mtime_ns == stamp


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus_file, tmp_path):
    lm.Trainer(replace(tiny_config(corpus_file, tmp_path), steps=4), progress=False).run()
    good = (tmp_path / lm.CHECKPOINT).read_bytes()
    trainer = lm.Trainer(tiny_config(corpus_file, tmp_path), progress=False)
    with torch.no_grad():
        trainer.model.embed.weight[:, 0] = float("nan")  # NaN weights, as a diverged step makes
    with pytest.raises(RunError, match=rf"the training loss is nan at step 5: training "
                                       rf"diverged and stopped; the last good checkpoint "
                                       rf"{tmp_path / lm.CHECKPOINT} is kept"):
        trainer.run()
    with pytest.raises(RunError, match=r"a parameter is not finite at step 4: training "
                                       r"diverged and stopped; the last good checkpoint"):
        trainer.save()  # nor is a checkpoint written from non-finite weights
    assert (tmp_path / lm.CHECKPOINT).read_bytes() == good
    assert not (tmp_path / lm.METRICS).exists() or "NaN" not in (tmp_path / lm.METRICS).read_text()


def test_a_full_disk_is_named_and_leaves_the_checkpoint(corpus_file, tmp_path, monkeypatch):
    lm.Trainer(replace(tiny_config(corpus_file, tmp_path), steps=2), progress=False).run()
    trainer = lm.Trainer(tiny_config(corpus_file, tmp_path), progress=False)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(RunError, match=f"no space left on device: {tmp_path}/checkpoint.pt"):
        trainer.run()
    monkeypatch.undo()
    assert runs.load_checkpoint(tmp_path / lm.CHECKPOINT)["step"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_crafted_and_corrupt_checkpoints_are_refused_by_every_command(corpus_file, tmp_path,
                                                                      capsys):
    run = tmp_path / "run"
    lm.Trainer(replace(tiny_config(corpus_file, run), steps=2), progress=False).run()
    path = run / lm.CHECKPOINT
    good = path.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    for command in (["lm", "eval", "--checkpoint", str(run)],
                    ["lm", "experts", "--checkpoint", str(run)]):
        with pytest.raises(SystemExit) as exited:
            main(command)
        assert exited.value.code == 1
        assert capsys.readouterr().err.startswith(f"sparsemoe: error: {path} is corrupt: ")
    with pytest.raises(RunError, match=f"{path} is corrupt"):
        lm.Trainer(tiny_config(corpus_file, run), progress=False)

    marker = tmp_path / "pwned"
    ck = torch.load(__import__("io").BytesIO(good), weights_only=True)
    ck["config"] = {"corpus": Touch(marker)}
    torch.save(ck, path)
    runs.checksum_path(path).write_text(f"{sha256(path.read_bytes())}  checkpoint.pt\n")
    for command in (["lm", "eval", "--checkpoint", str(run)],
                    ["lm", "experts", "--checkpoint", str(run)]):
        with pytest.raises(SystemExit):
            main(command)
        assert "cannot be loaded safely" in capsys.readouterr().err
    with pytest.raises(RunError, match="cannot be loaded safely"):
        lm.Trainer(tiny_config(corpus_file, run), progress=False)
    assert not marker.exists()


class Touch:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


BAD_FLAGS = [
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--batch-size", "-1"], "batch_size must be >= 1, got -1"),
    (["--bptt", "0"], "bptt must be >= 1, got 0"),
    (["--eval-every", "0"], "eval_every must be >= 1, got 0"),
    (["--warmup", "0"], "warmup must be >= 1, got 0"),
    (["--steps", "0"], "steps must be >= 1, got 0"),
    (["--steps", "-3"], "steps must be >= 1, got -3"),
    (["--time-budget", "-1"], "time_budget must be a number in (0, inf), got -1.0"),
    (["--eval-tokens", "0"], "eval_tokens must be >= 1, got 0"),
    (["--lr", "nan"], "lr must be a number in (0, inf), got nan"),
    (["--lr", "0"], "lr must be a number in (0, inf), got 0.0"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS)
def test_bad_flags_are_usage_errors(corpus_file, tmp_path, capsys, flags, message):
    for command in ("train", "compare"):
        model = ["--experts", "4"] if command == "train" else ["--presets", "MoE-4"]
        with pytest.raises(SystemExit) as exited:
            main(["lm", command, *model, "--corpus", corpus_file, "--out",
                  str(tmp_path / "run"), *flags])
        assert exited.value.code == 2  # a usage error, reported by argparse
        err = capsys.readouterr().err
        assert err.endswith(f"sparsemoe lm {command}: error: {message}\n")
        assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_bad_corpus_and_out_are_found_before_training(corpus_file, tmp_path, capsys):
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    out_file = tmp_path / "taken"
    out_file.write_text("a file, not a folder")
    for flags, message in (
        (["--corpus", str(binary), "--out", str(tmp_path / "r")],
         f"corpus: {binary} is not plain text (it holds NUL bytes)"),
        (["--corpus", corpus_file, "--out", str(out_file)],
         f"the run directory {out_file} cannot be written: File exists"),
        (["--corpus", corpus_file, "--out", str(out_file / "sub")],
         f"the run directory {out_file / 'sub'} cannot be written: Not a directory"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(["lm", "train", "--experts", "4", "--hidden", "8", "--d-model", "8",
                  "--steps", "1000000", *flags])
        assert exited.value.code == 1
        assert capsys.readouterr().err == f"sparsemoe: error: {message}\n"
    with pytest.raises(ValueError, match="not plain text"):  # --debug: the traceback
        main(["--debug", "lm", "train", "--experts", "4", "--corpus", str(binary), "--out",
              str(tmp_path / "r")])
    with pytest.raises(SystemExit) as exited:
        main(["lm", "eval", "--checkpoint", str(tmp_path)])
    assert exited.value.code == 2
    assert capsys.readouterr().err.endswith(f"sparsemoe lm eval: error: checkpoint: no "
                                            f"checkpoint.pt or checkpoint/ in {tmp_path}\n")


FROZEN_RANK = """
import os, signal, sys, time, torch
from sparsemoe.experiments.processes import ExpertParallelRanks
ranks = ExpertParallelRanks.start(timeout=float(sys.argv[1]))
if ranks.rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)  # stopped, not killed: its socket stays open
t0 = time.monotonic()
try:
    ranks.sum(torch.ones(1))
except Exception as e:
    print(f"failed after {time.monotonic() - t0:.1f} s: {type(e).__name__}", flush=True)
    os._exit(3)
print("no failure", flush=True)
"""


@pytest.mark.slow
def test_a_frozen_rank_ends_the_job_after_the_rank_timeout(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, "-c", FROZEN_RANK, "3"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        out, err = procs[0].communicate(timeout=120)  # torch's default would wait 30 minutes
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode == 3, err
    assert out.startswith("failed after "), out

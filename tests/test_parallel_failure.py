"""A rank that dies or freezes ends the others with an error within the process group's
timeout (gloo, 4 ranks on a 2 × 2 mesh), and a save it interrupts leaves the previous
checkpoint loadable. The seconds each survivor took are reported, not asserted."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from failure_checks import failing_rank
from parallel_checks import Net

from sparsemoe import parallel

WORLD = 4
TIMEOUT = 10.0  # the process group's: a frozen rank is noticed after it


def run(scenario: str, tmp_path, limit: float = 180.0) -> list[dict]:
    """The survivors' results; the failing rank is killed here once they have ended."""
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.get_context("forkserver").set_forkserver_preload(["sparsemoe"])
    ctx = mp.start_processes(failing_rank, nprocs=WORLD, join=False, start_method="forkserver",
                             args=(WORLD, f"file://{tmp_path / 'init'}", str(tmp_path),
                                   scenario, TIMEOUT))
    survivors = [tmp_path / f"rank{r}.json" for r in range(WORLD - 1)]
    deadline = time.monotonic() + limit
    while not all(p.exists() for p in survivors):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    hung = [p.name for p in survivors if not p.exists()]
    assert not hung, f"{scenario}: {hung} did not end within {limit:.0f} s (a hang)"
    failed_at = float((tmp_path / "failed_at").read_text())
    results = [json.loads(p.read_text()) for p in survivors]
    for r in results:
        r["seconds"] = r["ended_at"] - failed_at
    print(scenario, "seconds after the failure:", [round(r["seconds"], 1) for r in results],
          sorted({r["error"].split(":")[0] for r in results if r["error"]}))
    return results


def previous_checkpoint_loads(tmp_path) -> None:
    model = Net()
    extra = parallel.load_sharded_checkpoint(tmp_path / "ck", model,
                                             torch.optim.Adam(model.parameters()))
    assert extra == {"step": 1}


@pytest.mark.parametrize("scenario", ["killed mid-step", "killed mid-save"])
def test_a_killed_rank_ends_the_others_with_an_error(scenario, tmp_path):
    results = run(scenario, tmp_path)
    assert all(r["error"] is not None for r in results), results
    if scenario == "killed mid-save":  # the interrupted save's folder, never switched in
        assert (tmp_path / "ck.new").is_dir() and not (tmp_path / "ck.new" / ".metadata").exists()
    previous_checkpoint_loads(tmp_path)


@pytest.mark.slow
def test_a_frozen_rank_ends_the_others_after_the_timeout(tmp_path):
    results = run("frozen mid-step", tmp_path)
    assert all(r["error"] is not None for r in results), results
    assert any("timed out" in r["traceback"].lower() or "timeout" in r["traceback"].lower()
               for r in results), results[0]["traceback"]
    previous_checkpoint_loads(tmp_path)

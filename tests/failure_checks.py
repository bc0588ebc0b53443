"""A rank that dies or freezes in the middle of mesh training, spawned by
``tests/test_parallel_failure.py``: the other ranks must end with an error, not wait forever.

Every rank trains ``parallel_checks.Net`` on a 2 × 2 mesh and saves a distributed checkpoint
after its first step; the last rank then fails as its scenario says: between its forward and
its backward, or inside the next save, while writing its shards. The survivors record the
error they got and how long after the failure it came (the failing rank writes the moment
it fails)."""

from __future__ import annotations

import json
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from parallel_checks import adam, batch_for, mesh_model, mesh_step, step_loss
from torch.distributed.checkpoint import FileSystemWriter

from sparsemoe import parallel as P

SCENARIOS = ("killed mid-step", "killed mid-save", "frozen mid-step")


def fail(scenario: str, out: Path) -> None:
    """The failing rank: note the time, then die (no clean-up, like a SIGKILL) or freeze."""
    (out / "failed_at").write_text(repr(time.time()))
    if scenario.startswith("killed"):
        os._exit(9)
    time.sleep(3600)  # frozen: alive, in no collective


def failing_rank(rank: int, world: int, init_method: str, out_dir: str, scenario: str,
                 timeout: float) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))
    model = mesh_model((2, 2), 0)
    opt = adam(model)
    mesh_step(model, opt, 0, clip=0.05)
    P.save_sharded_checkpoint(out / "ck", model, opt, extra={"step": 1})
    last = rank == world - 1
    result = {}
    try:
        xs, ys = batch_for(1, world)
        if scenario == "killed mid-save":
            if last:  # dies in DCP's write of its shards, after the save's planning
                FileSystemWriter.write_data = lambda *args, **kwargs: fail(scenario, out)
            P.save_sharded_checkpoint(out / "ck", model, opt, extra={"step": 2})
        else:
            loss = step_loss(model, xs[rank], ys[rank], 1000 + rank)  # the forward went through
            if last:
                fail(scenario, out)
            opt.zero_grad()
            loss.backward()  # meets the failed rank in FSDP's reduce-scatter or the exchange
            P.clip_grad_norm_(model, 0.05)
            opt.step()
        result = {"error": None}
    except Exception as e:
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  "traceback": traceback.format_exc()}
    result["ended_at"] = time.time()
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # the group is broken: leave without its clean-up

"""A rank of a language-model run on a device mesh, spawned by
``tests/experiments/test_lm_mesh.py``: it joins the process group as under torchrun (the
environment variables), trains with :class:`~sparsemoe.experiments.lm.Trainer` and writes what
it saw to ``rank{r}.json``."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import torch


def mesh_rank(rank: int, world: int, port: int, data_parallel: int, cfg, out: str,
              layout: dict, timeout: float = 60.0) -> None:
    """Run ``cfg`` on rank ``rank`` of ``world`` (mesh ``data_parallel × world/data_parallel``,
    ``layout`` the other arguments of ``ExpertParallelRanks.start``: ``replicate``,
    ``exchange_capacity``) and record its result (or its traceback)."""
    from sparsemoe.experiments.lm import Trainer
    from sparsemoe.experiments.processes import ExpertParallelRanks

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    result: dict = {}
    try:
        processes = ExpertParallelRanks.start(timeout, data_parallel, **layout)
        try:
            trainer = Trainer(cfg, progress=False, processes=processes)
            metrics = trainer.run()
            result = {"ok": True, "train_loss": metrics["history"]["train_loss"],
                      "steps": metrics["steps"], "mesh": list(processes.mesh.shape),
                      "exchange": metrics["exchange"],
                      "progress": trainer.progress_extras(),
                      # of the parameters the optimizer steps (FSDP2's DTensors; the model
                      # holds whole tensors between a forward and the next reshard)
                      "placements": sorted({type(placement).__name__
                                            for group in trainer.opt.param_groups
                                            for p in group["params"]
                                            for placement in p.placements})}
        finally:
            processes.close()
    except Exception:
        result = {"ok": False, "error": traceback.format_exc()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))

"""What a ``dp × ep`` device mesh costs and saves per rank, measured (gloo, CPU):

- memory: the bytes of this rank's parameters, gradients and optimizer state (Adam, or
  FactoredAdam with ``--optimizer factored-adam``), summed over the local tensors (a
  DTensor's local shard or replica) after one training step, and the seconds of one
  ``optimizer.step()`` (median of ``--repeats``);
- checkpoints: bytes each rank writes and seconds of a save, for the distributed checkpoint
  (:func:`sparsemoe.parallel.save_sharded_checkpoint`, every rank its shards) against the
  rank-0 gather (:func:`~sparsemoe.parallel.full_state_dict` and
  :func:`~sparsemoe.parallel.full_optimizer_state_dict` of the same model sharded by
  :func:`~sparsemoe.parallel.expert_parallel` over all ranks, then ``torch.save`` on rank 0);
  seconds are the median of ``--repeats`` saves;
- for comparison, the memory per rank of that expert-parallel model without FSDP (the
  non-expert parameters, their gradients and Adam state replicated on every rank).

The rank-0 gather cannot gather FactoredAdam's factors (they are not shaped like their
parameters): with ``--optimizer factored-adam`` its columns stay empty.

The model: an embedding and a readout of ``vocab × d`` around one MoE layer of ``n`` experts
(``d → h → d``), the shape of the LM (most parameters outside the experts at this size).

    python benchmarks/mesh_memory.py                      # 1, 2 and 4 ranks, every mesh shape
    python benchmarks/mesh_memory.py --worlds 2 --experts 8
    python benchmarks/mesh_memory.py --optimizer factored-adam
    python benchmarks/mesh_memory.py --replicate           # parallelize(replicate=True)
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from sparsemoe import MoE
from sparsemoe import parallel as P
from sparsemoe.optim import FactoredAdam, param_groups


class Model(nn.Module):
    def __init__(self, vocab: int, d: int, experts: int, hidden: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.moe = MoE(d, experts, k=2, hidden=hidden)
        self.out = nn.Linear(d, vocab)

    def forward(self, x):
        h = self.emb(x)
        return self.out(h + self.moe(h))


def optimizer(model: nn.Module, name: str) -> torch.optim.Optimizer:
    if name == "factored-adam":
        return FactoredAdam(param_groups(model), lr=1e-3)
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def local_bytes(tensors) -> int:
    """Bytes of the tensors' local storage on this rank (a DTensor's shard)."""
    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def step(model, opt, args, rank) -> None:
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(args.vocab, (args.tokens,), generator=g)
    loss = nn.functional.cross_entropy(model(x), x)
    opt.zero_grad()
    loss.backward()
    P.clip_grad_norm_(model, 1.0)
    opt.step()


def memory(model, opt) -> dict:
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {"params": local_bytes(model.parameters()),
            "grads": local_bytes(p.grad for p in model.parameters() if p.grad is not None),
            "optimizer": local_bytes(state)}


def timed(save, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        save()
        dist.barrier()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def rank_main(rank: int, world: int, port: int, args, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    shapes = [(dp, world // dp) for dp in range(world, 0, -1) if world % dp == 0]
    for dp, ep in shapes:
        torch.manual_seed(0)
        base = Model(args.vocab, args.d_model, args.experts, args.hidden)
        mesh = init_device_mesh("cpu", (dp, ep), mesh_dim_names=P.MESH_DIMS)
        model = P.parallelize(copy.deepcopy(base), mesh, replicate=args.replicate)
        opt = optimizer(model, args.optimizer)
        step(model, opt, args, rank)
        row = {"mesh": f"{dp}x{ep}", **memory(model, opt),
               "step_seconds": timed(opt.step, args.repeats)}
        folder = Path(out, f"dcp{dp}x{ep}")
        row["dcp_seconds"] = timed(lambda m=model, o=opt, f=folder:
                                   P.save_sharded_checkpoint(f, m, o), args.repeats)
        row["dcp_bytes"] = (folder / f"__{rank}_0.distcp").stat().st_size
        # the rank-0 gather, from the same experts spread over every rank
        if dp == 1 and args.optimizer == "adam":
            gathered = P.expert_parallel(copy.deepcopy(base))
            gathered_opt = torch.optim.Adam(gathered.parameters(), lr=1e-3)
            step(gathered, gathered_opt, args, rank)
            file = Path(out, "gathered.pt")

            def gather_save(m=gathered, o=gathered_opt, file=file):
                state = {"model": P.full_state_dict(m),
                         "optimizer": P.full_optimizer_state_dict(m, o)}
                if rank == 0:
                    torch.save(state, file)

            row["gather_seconds"] = timed(gather_save, args.repeats)
            row["gather_bytes"] = file.stat().st_size if rank == 0 else 0
            row["replicated_total"] = sum(memory(gathered, gathered_opt).values())
        rows.append(row)
    every = [None] * world
    dist.all_gather_object(every, rows)
    if rank == 0:
        print_table(world, every)
    dist.destroy_process_group()


def mb(x: float) -> str:
    return f"{x / 1e6:.2f}"


def print_table(world: int, every: list[list[dict]]) -> None:
    for i, row in enumerate(every[0]):
        per_rank = [rows[i] for rows in every]
        worst = {k: max(r[k] for r in per_rank) for k in ("params", "grads", "optimizer")}
        total = sum(worst.values())
        dcp = [r["dcp_bytes"] for r in per_rank]
        line = (f"| {world} | {row['mesh']} | {mb(worst['params'])} | {mb(worst['grads'])} | "
                f"{mb(worst['optimizer'])} | {mb(total)} | {mb(min(dcp))}–{mb(max(dcp))} | "
                f"{row['dcp_seconds']:.3f} | {row['step_seconds'] * 1e3:.1f} |")
        if "gather_seconds" in row:
            replicated = max(r["replicated_total"] for r in per_rank)
            line += (f" {mb(replicated)} | {mb(per_rank[0]['gather_bytes'])} on rank 0 | "
                     f"{row['gather_seconds']:.3f} |")
        else:
            line += " | | |"
        print(line, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=256, help="per rank and step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--optimizer", choices=("adam", "factored-adam"), default="adam")
    parser.add_argument("--replicate", action="store_true",
                        help="replicate over dp instead of sharding (parallelize(replicate=True))")
    args = parser.parse_args()
    print(f"| ranks | mesh dp×ep | params MB | grads MB | {args.optimizer} state MB | "
          f"total MB/rank | DCP MB written/rank | DCP save s | optimizer step ms | "
          f"expert_parallel alone: total MB/rank | rank-0 gather: MB written | "
          f"gather save s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as out:
            mp.start_processes(rank_main, args=(world, free_port(), args, out), nprocs=world,
                               start_method="spawn")


if __name__ == "__main__":
    main()

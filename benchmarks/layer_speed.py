"""Forward+backward time of one MoE layer against the compute-matched dense FFN.

Same inputs, same output gradient; the contenders alternate within each repeat so that machine
noise hits them alike, and the table reports medians and the ratio MoE / dense. The dense FFN
has hidden width k·h, i.e. the multiply-adds per token of the MoE's experts (gating excluded).

    python benchmarks/layer_speed.py                       # d 512, h 1024, 8192 tokens, n ∈ {8, 64}
    python benchmarks/layer_speed.py --experts 8 64 256 --k 1 2 4 --repeats 7 --json out.json
    python benchmarks/layer_speed.py --recompute     # also the MoE with recompute=True (App. D)

Activation memory is the bytes autograd saves for the backward pass
(:func:`sparsemoe.memory.saved_tensor_bytes`, parameters and input excluded).

The full grid with the peers, the roofline and peak memory is ``benchmarks/suite.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn

import sparsemoe
from sparsemoe.memory import saved_tensor_bytes


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(d: int, h: int, tokens: int, n: int, k: int, repeats: int, device: str,
          autocast: torch.dtype | None = None, profile: bool = False,
          recompute: bool = False) -> dict:
    torch.manual_seed(0)
    moe = sparsemoe.MoE(d, n, k, h).to(device)
    dense = nn.Sequential(nn.Linear(d, k * h, bias=False), nn.ReLU(),
                          nn.Linear(k * h, d, bias=False)).to(device)
    x = torch.randn(tokens, d, device=device, requires_grad=True)
    grad = torch.randn(tokens, d, device=device)

    models = {"dense": dense, "moe": moe}
    if recompute:
        models["recompute"] = copy.deepcopy(moe)
        models["recompute"].experts.recompute = True

    def forward(model):
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            y = model(x)
            loss = (y.float() * grad).sum()
            return loss + model.aux_loss if model is not dense else loss

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            x.grad = None
            forward(model).backward()
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    saved = {}
    for name, model in models.items():
        torch.manual_seed(1)
        _, saved[name] = saved_tensor_bytes(lambda m=model: forward(m),
                                            exclude=[*model.parameters(), x])
    runs = {name: step(model) for name, model in models.items()}
    for run in runs.values():  # warm-up
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(_time(run))
    med = {name: statistics.median(t) for name, t in times.items()}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            runs["moe"]()
        sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=20))
    row = {
        "d": d, "h": h, "tokens": tokens, "experts": n, "k": k,
        "tokens_per_expert": tokens * k / n,
        "dense_ms": 1e3 * med["dense"], "moe_ms": 1e3 * med["moe"],
        "moe_over_dense": med["moe"] / med["dense"],
        "max_over_mean_load": moe.stats.max_over_mean_load,
        "dense_saved_mb": saved["dense"] / 2**20, "moe_saved_mb": saved["moe"] / 2**20,
    }
    if recompute:
        row.update(recompute_ms=1e3 * med["recompute"],
                   recompute_over_moe=med["recompute"] / med["moe"],
                   recompute_saved_mb=saved["recompute"] / 2**20)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    p.add_argument("--k", type=int, nargs="+", default=[2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--autocast", choices=["bfloat16", "float16"], default=None,
                   help="run both contenders under torch.autocast with this dtype")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one "
                   "MoE step per configuration")
    p.add_argument("--recompute", action="store_true", help="also time the MoE with "
                   "recompute=True (same weights) and compare the activation memory")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    autocast = getattr(torch, args.autocast) if args.autocast else None
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"autocast {args.autocast}")
    head = (f"{'n':>5} {'k':>2} {'tok/expert':>10} {'dense ms':>9} {'moe ms':>8} "
            f"{'moe/dense':>9} {'dense MB':>9} {'moe MB':>8}")
    if args.recompute:
        head += f" {'recompute MB':>12} {'recompute/moe time':>18}"
    print(head)
    rows = []
    for n in args.experts:
        for k in args.k:
            r = bench(args.d, args.hidden, args.tokens, n, k, args.repeats, args.device,
                      autocast, args.profile, args.recompute)
            rows.append(r)
            line = (f"{n:>5} {k:>2} {r['tokens_per_expert']:>10.0f} {r['dense_ms']:>9.1f} "
                    f"{r['moe_ms']:>8.1f} {r['moe_over_dense']:>9.2f} "
                    f"{r['dense_saved_mb']:>9.1f} {r['moe_saved_mb']:>8.1f}")
            if args.recompute:
                line += f" {r['recompute_saved_mb']:>12.1f} {r['recompute_over_moe']:>18.2f}"
            print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

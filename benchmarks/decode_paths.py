"""Decode-sized batches: the sorted grouped kernel against one matmul per expert hit.

With 1–16 tokens a step most experts a token picks get one row, and the few-row kernel's
one-row products stream each weight column strip by column strip, slower than the BLAS's
matrix-vector product on wide weights. For each expert shape (SwiGLU experts ``d → 2h → d``,
``n`` experts, top-``k``) and token count ``T``, this times one MoE layer's experts
(``sparsemoe.dispatch.dispatch_combine`` over a ``FeedForwardExperts``) with
``impl="few_rows"`` and with ``impl="loop"``, alternating them in one process: ``decode`` is a
no-grad forward, ``train`` a forward and backward. Ratio = loop / few_rows (< 1: the loop
wins). This is what ``sparsemoe.dispatch.DECODE_PAIRS_PER_EXPERT`` is derived from.

    OMP_NUM_THREADS=1 python benchmarks/decode_paths.py --clock cpu
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparsemoe import FeedForwardExperts
from sparsemoe.dispatch import dispatch_combine

IMPLS = ("few_rows", "loop")


def bench(d, h, n, k, tokens, train, repeats, clock) -> dict[str, float]:
    torch.manual_seed(0)
    experts = FeedForwardExperts(n, d, h, activation="swiglu")
    x = torch.randn(tokens, d, requires_grad=train)
    index = torch.stack([torch.randperm(n)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k)

    def step():
        with torch.set_grad_enabled(train):
            y, _ = dispatch_combine(x, index, weights, experts)
            if train:
                y.sum().backward()

    times = {impl: [] for impl in IMPLS}
    for r in range(repeats + 1):
        for impl in IMPLS[r % 2:] + IMPLS[:r % 2]:
            experts.impl = impl
            start = clock()
            step()
            if r:  # the first round warms up
                times[impl].append(clock() - start)
    return {impl: statistics.median(t) for impl, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["256x1024x8x2", "256x256x32x8",
                                                   "1024x2048x8x2", "1024x512x64x8"],
                   help="expert shapes d x h x n x k")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: the process's CPU time, for one thread on a shared machine")
    args = p.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"{args.clock} clock, medians of {args.repeats}; ratio = loop / few_rows")
    print("| d×h, n, k | T | T·k/n | decode few_rows ms | decode loop ms | ratio "
          "| train few_rows ms | train loop ms | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        d, h, n, k = map(int, shape.split("x"))
        for t in args.tokens:
            dec = bench(d, h, n, k, t, False, args.repeats, clock)
            tr = bench(d, h, n, k, t, True, args.repeats, clock)
            print(f"| {d}×{h}, {n}, {k} | {t} | {t * k / n:.2f} | {1e3 * dec['few_rows']:.2f} | "
                  f"{1e3 * dec['loop']:.2f} | {dec['loop'] / dec['few_rows']:.2f} | "
                  f"{1e3 * tr['few_rows']:.2f} | {1e3 * tr['loop']:.2f} | "
                  f"{tr['loop'] / tr['few_rows']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

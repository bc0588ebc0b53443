"""Decode-sized batches: the few-row kernel against one BLAS product per expert hit.

With 1–16 tokens a step most experts a token picks get one row. Two measurements, each
alternating the paths in one process (medians; ratio = loop / few_rows, < 1: the loop wins):

1. ``weights``: one grouped product of one row per expert (``rows = n``, no grad) through
   weights of several shapes ``p×q``, stored contiguous ``[n, p, q]`` (sparsemoe's experts) or
   as the transposed view of ``[n, q, p]`` (transformers' experts): where
   ``sparsemoe.dispatch.decode_sized`` and ``DECODE_MIN_COLUMNS`` come from.
2. ``layers``: one MoE layer's experts (``dispatch_combine`` over SwiGLU
   ``FeedForwardExperts``, ``n`` experts, top-``k``) for ``T`` tokens with ``impl="few_rows"``,
   ``"loop"`` and ``"auto"``: ``decode`` a no-grad forward, ``train`` forward and backward.

    OMP_NUM_THREADS=1 python benchmarks/decode_paths.py --clock cpu
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from sparsemoe import FeedForwardExperts
from sparsemoe.dispatch import dispatch_combine, grouped_matmul


def alternate(paths: dict, repeats: int, clock) -> dict[str, float]:
    """Median time of each callable, run in rotating order after one warm-up round."""
    names = list(paths)
    times = {name: [] for name in names}
    for r in range(repeats + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = clock()
            paths[name]()
            if r:
                times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def weights_table(shapes, n, repeats, clock) -> None:
    print(f"\n1. One row per expert, n = {n}, no grad: loop / few_rows\n")
    print("| p×q | contiguous [n, p, q] | transposed view of [n, q, p] |")
    print("|---|---|---|")
    counts = torch.ones(n, dtype=torch.long)
    for shape in shapes:
        p, q = map(int, shape.split("x"))
        x = torch.randn(n, p)
        cells = []
        for w in (torch.randn(n, p, q), torch.randn(n, q, p).transpose(1, 2)):
            with torch.no_grad():
                t = alternate({impl: partial(grouped_matmul, x, w, counts, impl)
                               for impl in ("few_rows", "loop")}, repeats, clock)
            cells.append(f"{t['loop'] / t['few_rows']:.2f}")
        print(f"| {shape} | {' | '.join(cells)} |", flush=True)


def layer_step(bank, x, index, weights, impl: str, train: bool) -> None:
    bank.impl = impl
    with torch.set_grad_enabled(train):
        y, _ = dispatch_combine(x, index, weights, bank)
        if train:
            y.sum().backward()


def layers_table(shapes, tokens, repeats, clock) -> None:
    impls = ("few_rows", "loop", "auto")
    print("\n2. One SwiGLU MoE layer's experts, ms (ratio loop / few_rows)\n")
    print("| d×h, n, k | T | T·k/n | " + " | ".join(f"decode {i}" for i in impls) + " | "
          + " | ".join(f"train {i}" for i in impls) + " |")
    print("|---" * (3 + 2 * len(impls)) + "|")
    for shape in shapes:
        d, h, n, k = map(int, shape.split("x"))
        torch.manual_seed(0)
        bank = FeedForwardExperts(n, d, h, activation="swiglu")
        for t in tokens:
            x = torch.randn(t, d, requires_grad=True)
            index = torch.stack([torch.randperm(n)[:k] for _ in range(t)])
            weights = torch.rand(t, k)
            cells = []
            for train in (False, True):
                ms = alternate({i: partial(layer_step, bank, x, index, weights, i, train)
                                for i in impls}, repeats, clock)
                ratio = ms["loop"] / ms["few_rows"]
                cells += [f"{1e3 * ms['few_rows']:.2f}", f"{1e3 * ms['loop']:.2f} ({ratio:.2f})",
                          f"{1e3 * ms['auto']:.2f}"]
            print(f"| {d}×{h}, {n}, {k} | {t} | {t * k / n:.2f} | {' | '.join(cells)} |",
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", nargs="+", default=["256x512", "512x256", "1024x256",
                                                    "256x2048", "512x1024", "1024x1024",
                                                    "1024x4096", "4096x1024"],
                   help="weight shapes p x q of part 1")
    p.add_argument("--experts", type=int, default=32, help="n of part 1")
    p.add_argument("--layers", nargs="+", default=["256x1024x8x2", "256x256x32x8",
                                                   "1024x2048x8x2", "1024x512x64x8"],
                   help="expert shapes d x h x n x k of part 2")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: the process's CPU time, for one thread on a shared machine")
    args = p.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"{args.clock} clock, medians of {args.repeats}")
    weights_table(args.weights, args.experts, args.repeats, clock)
    layers_table(args.layers, args.tokens, args.repeats, clock)


if __name__ == "__main__":
    main()

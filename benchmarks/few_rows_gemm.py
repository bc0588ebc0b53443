"""The few-row CPU kernel against torch's grouped GEMM, product by product, per regime.

For each regime (experts n, mean rows per expert m, weight [p, q]) it times, alternating the
two paths in one process (medians of ``--repeats``, with the min-max spread), the three
products of one weight: forward ``X_e·W_e``, input gradient ``dY_e·W_eᵀ`` and weight gradient
``X_eᵀ·dY_e`` written into memory that already exists (as the expert banks' reused gradient
buffers do). Today's path: ``grouped_mm`` for the first two, one ``mm`` per expert for the
third (``sparsemoe.dispatch``). Rows are assigned to experts uniformly at random, so loads vary
as a router's do. This is what ``sparsemoe.few_rows.MAX_ROWS_PER_EXPERT`` is derived from;
``--layout transposed`` stores each weight as the transposed view of a contiguous ``[q, p]``
(transformers' experts), which the kernel reads with its other product, and gives
``MAX_ROWS_PER_EXPERT_DOT``.

    OMP_NUM_THREADS=1 python benchmarks/few_rows_gemm.py
    python benchmarks/few_rows_gemm.py --rows 2 16 64 --shapes 512x1024 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sparsemoe import few_rows


def current_path(x, w, dy, counts, dw):
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    sizes = counts.tolist()
    blocks = list(zip(x.split(sizes), dy.split(sizes), sizes, strict=True))
    return {
        "forward": lambda: F.grouped_mm(x, w, offs=offs),
        "input grad": lambda: F.grouped_mm(dy, w.transpose(1, 2), offs=offs),
        "weight grad": lambda: [torch.mm(xe.t(), ge, out=dw[e]) if s else dw[e].zero_()
                                for e, (xe, ge, s) in enumerate(blocks)],
    }


def kernel_path(x, w, dy, counts, dw):
    return {
        "forward": lambda: few_rows.forward(x, w, counts),
        "input grad": lambda: few_rows.input_grad(dy, w, counts),
        "weight grad": lambda: few_rows.weight_grad(x, dy, counts, dw),
    }


def bench(n, m, p, q, dtype, repeats, clock=time.perf_counter, transposed=False) -> dict:
    torch.manual_seed(0)
    counts = torch.bincount(torch.randint(n, (n * m,)), minlength=n)
    rows = int(counts.sum())
    x = torch.randn(rows, p, dtype=dtype)
    w = (torch.randn(n, q, p, dtype=dtype).transpose(1, 2) if transposed
         else torch.randn(n, p, q, dtype=dtype))
    dy = torch.randn(rows, q, dtype=dtype)
    dw = torch.empty_like(w)
    paths = {"grouped_mm": current_path(x, w, dy, counts, dw),
             "few_rows": kernel_path(x, w, dy, counts, dw)}
    out = {}
    for product in ("forward", "input grad", "weight grad"):
        times = {name: [] for name in paths}
        for name in paths:
            paths[name][product]()  # warm-up
        for r in range(repeats):
            for name in list(paths)[r % 2:] + list(paths)[:r % 2]:
                start = clock()
                paths[name][product]()
                times[name].append(clock() - start)
        out[product] = {name: (statistics.median(t), min(t), max(t)) for name, t in times.items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 128])
    p.add_argument("--shapes", nargs="+", default=["512x1024", "1024x512", "128x256"],
                   help="weight shapes p x q")
    p.add_argument("--weight-mb", type=float, default=256,
                   help="experts per regime: as many [p, q] weights as fit this size")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--layout", default="contiguous", choices=["contiguous", "transposed"],
                   help="transposed: each weight the [p, q] view of a contiguous [q, p]")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: the process's CPU time, for one thread on a shared machine")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if few_rows.library() is None:
        raise SystemExit("the few-row kernel could not be built (see the warning)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"{args.clock} clock, {args.layout} weights; "
          "ms median [min-max], ratio = few_rows / grouped_mm")
    print("| p×q | n | rows/expert | product | grouped_mm ms | few_rows ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        pp, qq = map(int, shape.split("x"))
        n = max(1, int(args.weight_mb * 2**20 / (pp * qq * dtype.itemsize)))
        for m in args.rows:
            res = bench(n, m, pp, qq, dtype, args.repeats,
                        time.perf_counter if args.clock == "wall" else time.process_time,
                        args.layout == "transposed")
            for product, t in res.items():
                g, k = t["grouped_mm"], t["few_rows"]
                print(f"| {shape} | {n} | {m} | {product} | {1e3 * g[0]:.1f} "
                      f"[{1e3 * g[1]:.1f}-{1e3 * g[2]:.1f}] | {1e3 * k[0]:.1f} "
                      f"[{1e3 * k[1]:.1f}-{1e3 * k[2]:.1f}] | {k[0] / g[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""Eager forward+backward of one MoE layer from two source trees, side by side in one run.

Each round runs one worker process per tree (alternating which goes first); a worker imports
``sparsemoe`` from its tree and times the layer and the compute-matched dense FFN alternately
(:func:`layer_speed.bench`'s protocol, plus an optional capacity), by the process's CPU time
by default (``--clock cpu``: on a loaded machine it leaves out the time spent waiting for a
core; run with one thread). The table reports, per tree, the median over rounds of MoE ms and
of MoE / dense (the dense FFN, the same code in both, absorbs the rest of the machine's load),
and after / before of both.

    git archive <commit> src | tar -x -C /tmp/before
    python benchmarks/eager_ab.py --before /tmp/before/src --after src --experts 8 64 --k 2
    python benchmarks/eager_ab.py --before /tmp/before/src --after src --capacity 1.0
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, args.src)
    import torch
    from torch import nn

    import sparsemoe

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = []
    for n in args.experts:
        for k in args.k:
            torch.manual_seed(0)
            cap = None if args.capacity is None else sparsemoe.Capacity(factor=args.capacity)
            moe = sparsemoe.MoE(args.d, n, k, args.hidden, capacity=cap)
            with torch.no_grad():  # definite routing (the gates are zero-initialised)
                moe.router.w_gate.normal_()
            dense = nn.Sequential(nn.Linear(args.d, k * args.hidden, bias=False), nn.ReLU(),
                                  nn.Linear(k * args.hidden, args.d, bias=False))
            x = torch.randn(args.tokens, args.d, requires_grad=True)
            grad = torch.randn(args.tokens, args.d)

            def run(model, x=x, grad=grad, moe=moe):
                model.zero_grad(set_to_none=True)
                start = clock()
                y = model(x)
                loss = (y * grad).sum() + (model.aux_loss if model is moe else 0)
                loss.backward()
                return clock() - start

            run(moe), run(dense)  # warm-up
            times = {"moe": [], "dense": []}
            for _ in range(args.repeats):
                times["moe"].append(run(moe))
                times["dense"].append(run(dense))
            rows.append({"n": n, "k": k, **{m: statistics.median(t) for m, t in times.items()}})
    print(json.dumps(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the src folder of the first tree")
    p.add_argument("--after", required=True, help="the src folder of the second tree")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    p.add_argument("--k", type=int, nargs="+", default=[2])
    p.add_argument("--capacity", type=float, default=None, help="a capacity factor")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--src", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    trees = {"before": args.before, "after": args.after}
    results: dict[str, list] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", "1",
                   "--src", trees[name]]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.tokens} tokens, d {args.d}, h {args.hidden}, capacity {args.capacity}, "
          f"{args.rounds} rounds × {args.repeats} repeats, {args.clock} clock")
    print(f"{'n':>4} {'k':>2} {'before ms':>9} {'after ms':>9} {'before/dense':>12} "
          f"{'after/dense':>11} {'after/before':>12}")
    for i, cell in enumerate(results["before"][0]):
        med = {name: {m: statistics.median(run[i][m] for run in results[name])
                      for m in ("moe", "dense")} for name in trees}
        rel = {name: statistics.median(run[i]["moe"] / run[i]["dense"] for run in results[name])
               for name in trees}
        print(f"{cell['n']:>4} {cell['k']:>2} {1e3 * med['before']['moe']:>9.1f} "
              f"{1e3 * med['after']['moe']:>9.1f} {rel['before']:>12.3f} {rel['after']:>11.3f} "
              f"{rel['after'] / rel['before']:>12.3f}")


if __name__ == "__main__":
    main()

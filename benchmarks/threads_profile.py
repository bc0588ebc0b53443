"""Where a second thread's time goes: the paper's layer against its compute-matched dense FFN
on one thread and then on ``--threads`` threads, with the matrix products split from the rest.

For each thread count: medians of ``--repeats`` alternated forward + backward steps
(``suite.time_alternating``, wall clock; the layer and FFN of ``suite.py``'s paper section:
d 512, expert hidden 1024, 8,192 tokens), then ``torch.profiler`` over ``--profiled`` steps of
each, from which the self time of ``aten::mm`` per step (the experts' and the gating's
products) is split from the rest of the step. Prints one markdown row per thread count::

    OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 python benchmarks/threads_profile.py --experts 512 --k 4
"""

from __future__ import annotations

import argparse

import torch
from suite import dense_ffn, paper_layer, step_fn, time_alternating
from torch.profiler import profile


def mm_ms_per_step(run, steps: int) -> float:
    """Self time of ``aten::mm`` per step, in ms, over ``steps`` profiled steps."""
    with profile() as prof:
        for _ in range(steps):
            run()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key == "aten::mm") \
        / steps / 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profiled", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    d, n, k, h = a.d, a.experts, a.k, a.hidden
    x = torch.randn(a.tokens, d, requires_grad=True)
    grad = torch.randn(a.tokens, d)
    runs = {"dense": step_fn(dense_ffn(d, k * h), x, grad),
            "sparsemoe": step_fn(paper_layer(d, n, k, h, None), x, grad)}
    print("| n | k | rows/expert | threads | dense ms | sparsemoe ms | sparsemoe / dense "
          "| `aten::mm` dense / sparsemoe ms | everything else, dense / sparsemoe ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for threads in dict.fromkeys((1, a.threads)):
        torch.set_num_threads(threads)
        med = {name: 1e3 * t for name, t in time_alternating(runs, a.repeats, "cpu").items()}
        mm = {name: mm_ms_per_step(run, a.profiled) for name, run in runs.items()}
        print(f"| {n} | {k} | {a.tokens * k / n:.0f} | {threads} | {med['dense']:,.0f} | "
              f"{med['sparsemoe']:,.0f} | {med['sparsemoe'] / med['dense']:.2f} | "
              f"{mm['dense']:,.0f} / {mm['sparsemoe']:,.0f} | "
              f"{med['dense'] - mm['dense']:,.0f} / {med['sparsemoe'] - mm['sparsemoe']:,.0f} |",
              flush=True)


if __name__ == "__main__":
    main()

"""What reusing the expert weight gradients' memory saves: step time and page faults.

One forward+backward of a stacked SwiGLU expert bank (the suite's n = 4096 shape by default:
d 512, 8192 rows, 2 rows per expert; h 128 where the suite runs 256, so that two banks fit in
24 GiB beside each other), with ``zero_grad(set_to_none=True)`` between steps as a training
loop does, for ``reuse_grad_memory=False`` (torch's autograd: a fresh weight gradient every
step) and ``True`` (:class:`sparsemoe.memory.GradientBuffers`). The two banks run alternately;
medians of ``--repeats`` steps after one warm-up, with the minor page faults of each step
(``getrusage``). The gradients of both are checked equal first.

    python benchmarks/grad_memory.py                      # n 4096, ~2 min, ~16 GB of RAM
    python benchmarks/grad_memory.py --experts 64 --hidden 1024 --repeats 9
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from sparsemoe import FeedForwardExperts
from sparsemoe.dispatch import sort_by_expert


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=4096)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    n, d = args.experts, args.d
    banks = {reuse: FeedForwardExperts(n, d, args.hidden, activation="swiglu",
                                       reuse_grad_memory=reuse) for reuse in (False, True)}
    banks[True].load_state_dict(banks[False].state_dict())
    routes = sort_by_expert(torch.randint(0, n, (args.tokens, 1)), n)
    x = torch.randn(args.tokens, d, requires_grad=True)
    target = torch.randn(args.tokens, d)

    def step(bank: FeedForwardExperts) -> tuple[float, int]:
        bank.zero_grad(set_to_none=True)
        x.grad = None
        faults, start = _faults(), time.perf_counter()
        (bank(x, routes) * target).sum().backward()
        return time.perf_counter() - start, _faults() - faults

    step(banks[False])
    reference = [q.grad.clone() for q in banks[False].parameters()]
    step(banks[True])
    err = max((q.grad - r).abs().max().item()
              for q, r in zip(banks[True].parameters(), reference, strict=True))
    del reference
    runs: dict[bool, list[tuple[float, int]]] = {False: [], True: []}
    for i in range(args.repeats):
        for reuse in ((False, True) if i % 2 == 0 else (True, False)):
            runs[reuse].append(step(banks[reuse]))
    grad_gb = sum(q.numel() for q in banks[True].parameters()) * 4 / 1e9
    print(f"n {n}, d {d}, h {args.hidden}, {args.tokens} rows "
          f"({args.tokens / n:.1f} per expert), {grad_gb:.2f} GB of weight gradients, "
          f"{torch.get_num_threads()} threads; max gradient difference {err:.1e}")
    print(f"{'reuse_grad_memory':>17} {'ms/step':>8} {'page faults/step':>16}")
    med = {}
    for reuse, rows in runs.items():
        med[reuse] = statistics.median(t for t, _ in rows)
        faults = statistics.median(f for _, f in rows)
        print(f"{reuse!s:>17} {1e3 * med[reuse]:>8.0f} {faults:>16,.0f}")
    print(f"speed-up {med[False] / med[True]:.2f}x")


if __name__ == "__main__":
    main()

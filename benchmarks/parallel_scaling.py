"""Where expert parallelism stops paying off, on paper: a scaling table from this machine's
measured expert compute rate and an assumed interconnect.

Weak scaling, as in the paper (§3.1): every rank keeps ``T`` tokens and ``n_l`` experts per
step, so ``W`` ranks train ``W·n_l`` experts on ``W·T`` tokens. Per rank and training step
(balanced routing, no drops, ``b`` bytes per element):

    expert work   C = 3 · T·k · 2·d·h          multiply-adds (forward, input and weight gradients)
    exchanged     V = 4 · T·k · d · b · (W−1)/W  bytes sent (dispatch and return, forward and
                                                 backward; the rows kept on the rank stay)
    step time     t = C / R + V / B + 4·(W−1)·α  (no overlap of compute and communication)

with ``R`` the measured multiply-adds per second of the expert bank (forward+backward, the
library's grouped path), ``B`` the assumed bandwidth per rank and ``α`` the assumed latency
of one message. The efficiency ``e = (C/R) / t`` is the share of the step spent in the
experts, and ``W·e`` the speed-up over one rank (tokens per second, ``W`` times the experts).
``C / V = 1.5·h / (b·(W−1)/W)`` multiply-adds per byte: the paper's compute-to-I/O ratio
(the hidden width ``h``) in bytes.

    python benchmarks/parallel_scaling.py                           # the LM preset's experts
    python benchmarks/parallel_scaling.py --d-model 512 --hidden 1024 --tokens 4096
    python benchmarks/parallel_scaling.py --rate 1.5e14 --bytes-per-element 2  # a GPU, assumed
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparsemoe.dispatch import equal_routes
from sparsemoe.experts import FeedForwardExperts


def measured_rate(d: int, h: int, rows: int, experts: int, repeats: int) -> float:
    """Multiply-adds per second of forward+backward through ``experts`` experts, ``rows`` rows
    spread evenly over them (median of ``repeats``)."""
    torch.manual_seed(0)
    bank = FeedForwardExperts(experts, d, h)
    per_expert = rows // experts
    routes = equal_routes(experts, per_expert)
    x = torch.randn(experts * per_expert, d, requires_grad=True)
    grad = torch.randn(experts * per_expert, d)

    def step() -> float:
        bank.zero_grad(set_to_none=True)
        start = time.perf_counter()
        bank(x, routes).backward(grad)
        return time.perf_counter() - start

    step()  # warm-up
    seconds = statistics.median(step() for _ in range(repeats))
    return 3 * experts * per_expert * bank.multiply_adds_per_row / seconds


def step_terms(d: int, h: int, k: int, tokens: int, world: int, b: int) -> tuple[int, float]:
    """``(C, V)``: expert multiply-adds and bytes sent per rank and training step."""
    rows = tokens * k
    return 3 * rows * 2 * d * h, 4 * rows * d * b * (world - 1) / world


def table(args: argparse.Namespace, rate: float) -> str:
    head = "| W | experts | MB sent / step / rank | " + " | ".join(
        f"{bw:g} GB/s: e, W·e" for bw in args.bandwidths) + " |"
    lines = [head, "|---" * (3 + len(args.bandwidths)) + "|"]
    for w in args.worlds:
        c, v = step_terms(args.d_model, args.hidden, args.k, args.tokens, w,
                          args.bytes_per_element)
        cells = []
        for bw in args.bandwidths:
            compute = c / rate
            t = compute + v / (bw * 1e9) + 4 * (w - 1) * args.latency_us * 1e-6
            e = compute / t
            cells.append(f"{100 * e:.0f}%, {w * e:.1f}")
        lines.append(f"| {w} | {w * args.experts_per_rank} | {v / 1e6:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32 * 35, help="tokens per rank and step")
    p.add_argument("--experts-per-rank", type=int, default=16)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 256])
    p.add_argument("--bandwidths", type=float, nargs="+", default=[1.25, 12.5, 50.0],
                   help="GB/s per rank (10 GbE, 100 Gb/s and 400 Gb/s InfiniBand)")
    p.add_argument("--latency-us", type=float, default=10.0, help="per message")
    p.add_argument("--bytes-per-element", type=int, default=4, help="4: float32, 2: bfloat16")
    p.add_argument("--rate", type=float, default=None,
                   help="expert multiply-adds per second (default: measured here)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rate = args.rate or measured_rate(args.d_model, args.hidden, args.tokens * args.k,
                                      args.experts_per_rank, args.repeats)
    source = "assumed" if args.rate else f"measured ({torch.get_num_threads()} threads)"
    c, _ = step_terms(args.d_model, args.hidden, args.k, args.tokens, 2, args.bytes_per_element)
    print(f"d {args.d_model}, h {args.hidden}, k {args.k}, {args.tokens} tokens and "
          f"{args.experts_per_rank} experts per rank, {args.bytes_per_element}-byte elements, "
          f"latency {args.latency_us:g} us; expert rate {rate:.3g} multiply-adds/s ({source}); "
          f"expert time per step {1e3 * c / rate:.2f} ms\n")
    print(table(args, rate))


if __name__ == "__main__":
    main()

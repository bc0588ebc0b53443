"""Training tokens/s of a language-model preset against its compute-matched baseline.

The paper's MoE-256 trains at 0.76 of the dense baseline's FLOP rate. On a CPU the ratio
depends on how many rows each expert's matrix multiply gets per step — batch × bptt × k / n —
which is the paper's "shrinking batch" (§3.1). This times full training steps (forward,
backward, clipping, Adam) of both presets on the same corpus, alternating them, for each batch
size, and reports medians and the ratio.

    python benchmarks/lm_throughput.py                                   # MoE-256 vs MoE-1-Wide
    python benchmarks/lm_throughput.py --presets MoE-1-Wide,MoE-32 --batch-sizes 32 64 128
    python benchmarks/lm_throughput.py --batch-sizes 32 --impls grouped_mm auto   # before/after

``--clock cpu`` times with the process's CPU time instead of the wall clock: on a machine shared
with other jobs it leaves out the time the process waits for a core (run it with one thread,
``OMP_NUM_THREADS=1``, where CPU time is the step's time on one core).

``--impls`` runs every compared preset once per grouped-matmul implementation of its experts
(``sparsemoe.dispatch.GROUPED_MM_IMPLS``), all alternating in one process: torch's grouped
GEMM against the few-row kernel that ``"auto"`` picks at this batch, side by side.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sparsemoe import FeedForwardExperts
from sparsemoe.data import load_corpus
from sparsemoe.dispatch import GROUPED_MM_IMPLS
from sparsemoe.experiments.lm import LMTrainConfig, Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="MoE-1-Wide,MoE-256",
                   help="baseline first, then the presets to compare with it")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    p.add_argument("--impls", nargs="+", default=["auto"], choices=GROUPED_MM_IMPLS,
                   help="the compared presets' expert grouped-matmul implementations")
    args = p.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    names = args.presets.split(",")
    # (label, preset, impl): the baseline as it is, the others once per implementation
    runs = [(names[0], names[0], None)] + [
        (name if len(args.impls) == 1 else f"{name}[{impl}]", name, impl)
        for name in names[1:] for impl in args.impls]
    corpus = load_corpus(("shakespeare",), 10_000)
    print(f"{'batch':>9} {'preset':>22} {'rows/expert':>11} {'ms/step':>8} {'tokens/s':>9} "
          f"{'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for bs in args.batch_sizes:
            trainers = {}
            for label, name, impl in runs:
                trainers[label] = Trainer(
                    LMTrainConfig(preset=name, steps=1, batch_size=bs, bptt=args.bptt,
                                  out=str(Path(tmp) / f"{name}-{impl}-{bs}"),
                                  model={"dropout": 0.0}), corpus, progress=False)
                for module in trainers[label].model.modules():
                    if impl is not None and isinstance(module, FeedForwardExperts):
                        module.impl = impl
            for t in trainers.values():
                for _ in range(args.warmup_steps):
                    t.train_step()
            times: dict[str, list[float]] = {label: [] for label in trainers}
            for _ in range(args.repeats):
                for label, t in trainers.items():
                    start = clock()
                    t.train_step()
                    times[label].append(clock() - start)
            base = statistics.median(times[names[0]])
            for label, t in trainers.items():
                med = statistics.median(times[label])
                cfg = t.model_cfg
                rows = bs * args.bptt * min(cfg.k, cfg.num_experts) / cfg.num_experts
                print(f"{f'{bs}x{args.bptt}':>9} {label:>22} {rows:>11.0f} {1e3 * med:>8.0f} "
                      f"[{1e3 * min(times[label]):.0f}-{1e3 * max(times[label]):.0f}] "
                      f"{bs * args.bptt / med:>9,.0f} {base / med:>6.2f}", flush=True)


if __name__ == "__main__":
    main()

"""Training tokens/s of a language-model preset against its compute-matched baseline.

The paper's MoE-256 trains at 0.76 of the dense baseline's FLOP rate. On a CPU the ratio
depends on how many rows each expert's matrix multiply gets per step — batch × bptt × k / n —
which is the paper's "shrinking batch" (§3.1). This times full training steps (forward,
backward, clipping, Adam) of both presets on the same corpus, alternating them, for each batch
size, and reports medians and the ratio.

    python benchmarks/lm_throughput.py                                   # MoE-256 vs MoE-1-Wide
    python benchmarks/lm_throughput.py --presets MoE-1-Wide,MoE-32 --batch-sizes 32 64 128
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sparsemoe.data import load_corpus
from sparsemoe.experiments.lm import LMTrainConfig, Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="MoE-1-Wide,MoE-256",
                   help="baseline first, then the presets to compare with it")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=8)
    args = p.parse_args()
    presets = args.presets.split(",")
    corpus = load_corpus(("shakespeare",), 10_000)
    print(f"{'batch':>9} {'preset':>12} {'rows/expert':>11} {'ms/step':>8} {'tokens/s':>9} "
          f"{'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for bs in args.batch_sizes:
            trainers = {
                name: Trainer(LMTrainConfig(preset=name, steps=1, batch_size=bs, bptt=args.bptt,
                                          out=str(Path(tmp) / f"{name}-{bs}"),
                                          model={"dropout": 0.0}), corpus, progress=False)
                for name in presets
            }
            for t in trainers.values():
                for _ in range(args.warmup_steps):
                    t.train_step()
            times: dict[str, list[float]] = {name: [] for name in presets}
            for _ in range(args.repeats):
                for name, t in trainers.items():
                    start = time.perf_counter()
                    t.train_step()
                    times[name].append(time.perf_counter() - start)
            base = statistics.median(times[presets[0]])
            for name in presets:
                med = statistics.median(times[name])
                cfg = trainers[name].model_cfg
                rows = bs * args.bptt * min(cfg.k, cfg.num_experts) / cfg.num_experts
                print(f"{f'{bs}x{args.bptt}':>9} {name:>12} {rows:>11.0f} {1e3 * med:>8.0f} "
                      f"{bs * args.bptt / med:>9,.0f} {base / med:>6.2f}", flush=True)


if __name__ == "__main__":
    main()

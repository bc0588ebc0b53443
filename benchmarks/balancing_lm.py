"""Load balancing on the language model: the paper's losses, the Switch loss and DeepSeek-V3's
auxiliary-loss-free bias, on the same flat MoE (``LMConfig.balancing``).

Trains one preset (default MoE-32) with each balancing for the same steps, data, seed and
schedule, then prints test/valid perplexity and the load over the whole validation text
(CV(load), max/mean load, unused experts) as a markdown table; each run's ``metrics.json`` is in
``--out/<balancing>-seed<s>``.

    OMP_NUM_THREADS=1 python benchmarks/balancing_lm.py --steps 300 --out runs/balancing
"""

from __future__ import annotations

import argparse
import statistics

import torch

from sparsemoe.data import load_corpus
from sparsemoe.experiments.lm import LMTrainConfig, Trainer
from sparsemoe.models.lstm_lm import BALANCINGS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="MoE-32")
    parser.add_argument("--balancings", default=",".join(BALANCINGS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--out", default="runs/balancing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = LMTrainConfig(preset=args.preset, steps=args.steps, warmup=max(1, args.steps // 5),
                         eval_every=args.steps)
    corpus = load_corpus(base.corpus, base.vocab_size)
    rows = []
    for kind in args.balancings.split(","):
        runs = []
        for seed in args.seeds:
            cfg = LMTrainConfig(**{**base.__dict__, "model": {"balancing": kind,
                                                               "dropout": args.dropout},
                                   "seed": seed, "out": f"{args.out}/{kind}-seed{seed}"})
            runs.append(Trainer(cfg, corpus).run())
        rows.append((kind, runs))
    print(f"\n{args.preset}, {args.steps} steps of {base.batch_size}×{base.bptt} tokens, "
          f"dropout {args.dropout}, seeds {args.seeds}; load over the validation text")
    print("| balancing | test PPL | valid PPL | CV(load) | max/mean load | unused experts |")
    print("|---|---|---|---|---|---|")

    def cell(runs, get, fmt):
        values = [get(r) for r in runs]
        mean = statistics.fmean(values)
        spread = f" ± {statistics.stdev(values):{fmt}}" if len(values) > 1 else ""
        return f"{mean:{fmt}}{spread}"

    for kind, runs in rows:
        print(f"| {kind} | {cell(runs, lambda r: r['test_perplexity'], '.1f')} "
              f"| {cell(runs, lambda r: r['valid_perplexity'], '.1f')} "
              f"| {cell(runs, lambda r: r['load']['cv_load'], '.3f')} "
              f"| {cell(runs, lambda r: r['load']['max_over_mean_load'], '.2f')} "
              f"| {cell(runs, lambda r: r['load']['experts_unused'], '.1f')} |")


if __name__ == "__main__":
    main()

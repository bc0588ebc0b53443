"""How the margin m of Eigen et al.'s running-total constraint changes a two-layer Deep MoE.

Trains the constrained DMoE (``sparsemoe dmoe train``'s ``dmoe`` model: constraint, then
removed for the fine-tuning epochs) for each margin and seed on the same jittered digits, and
the same network without balancing (``dmoe-free``) and with Shazeer et al.'s importance loss
(``dmoe-importance``) for comparison. Prints a markdown table: mean and standard deviation over
the seeds of the test error, of layer 1's I(expert; offset) and layer 2's I(expert; class), and
the largest share of examples any one expert wins (0.25 is perfect balance for 4 experts).

    python benchmarks/dmoe_margin.py                       # 8×8 digits, m ∈ {0, 10, 100, 1000}
    python benchmarks/dmoe_margin.py --margins 30,100,300 --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from pathlib import Path

import torch

from sparsemoe.data import load_digit_set
from sparsemoe.experiments.dmoe import DMoETrainConfig, JitteredDigits, train_model


def summarise(runs: list[dict]) -> str:
    """``mean ± sd`` cells of one table row from the metrics of one setting over the seeds."""

    def cell(values: list[float], digits: int) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"

    return " | ".join([
        cell([100 * r["test_error"] for r in runs], 1),
        cell([r["layers"][0]["mi_offset"] for r in runs], 2),
        cell([r["layers"][1]["mi_class"] for r in runs], 2),
        cell([max(max(layer["share"]) for layer in r["layers"]) for r in runs], 2),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits8", choices=("digits8", "mnist5k"))
    parser.add_argument("--margins", default="0,10,100,1000")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--gate-hidden", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    margins = [float(m) for m in args.margins.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = [("dmoe", m) for m in margins] + [("dmoe-free", None), ("dmoe-importance", None)]
    results: dict[tuple[str, float | None], list[dict]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as out:
        for seed in seeds:
            base = DMoETrainConfig(data=args.data, width=args.width, gate_hidden=args.gate_hidden,
                               epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                               lr=args.lr, seed=seed)
            data = JitteredDigits.build(load_digit_set(args.data, seed=seed), seed)
            for name, margin in settings:
                cfg = base if margin is None else dataclasses.replace(base, margin=margin)
                run = train_model(name, cfg, data, Path(out) / f"{name}-{margin}-{seed}",
                                  progress=False)
                results[name, margin].append(run)
    print(f"{args.data}, widths {args.width}−{args.width}, 4 experts, gates {args.gate_hidden}, "
          f"{args.epochs} + {args.finetune_epochs} epochs, lr {args.lr}, seeds {args.seeds}\n")
    print("| model | m | test error (%) | layer 1 I(expert; offset) | layer 2 I(expert; class) "
          "| largest expert share |")
    print("|---|---|---|---|---|---|")
    for (name, margin), runs in results.items():
        m = "–" if margin is None else f"{margin:g}"
        print(f"| `{name}` | {m} | {summarise(runs)} |")


if __name__ == "__main__":
    main()

"""Table 6 in miniature and the balance of the language model's MoE layer during training.

Trains one model per ``(w_importance, w_load)`` weighting (same data, schedule and seed) and
writes ``OUT/table6.md`` (the Table-6-shaped table next to the paper's numbers),
``OUT/table6.json`` (rows with their training histories) and ``OUT/balance.png`` (max/mean
load per training batch and over the validation text, clean and with the gating noise)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/lm_balance.py --preset MoE-256 \
        --steps 400 --weightings 0,0 0.1,0.1 --out runs/table6
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparsemoe.experiments.lm import LMTrainConfig
from sparsemoe.experiments.table6 import WEIGHTINGS, format_table6, table6


def weighting(text: str) -> tuple[float, float]:
    wi, wl = (float(v) for v in text.split(","))
    return wi, wl


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    for r in rows:
        label = f"({r['w_importance']}, {r['w_load']})"
        batch = [b["max_over_mean_load"] for b in r["history"]["batch"]]
        line, = axes[0].plot(range(1, len(batch) + 1), batch, lw=0.6, label=label)
        bal = r["history"]["balance"]
        for ax, key in ((axes[1], "clean"), (axes[2], "noisy")):
            ax.plot([b["step"] for b in bal], [b[key]["max_over_mean_load"] for b in bal], "o-",
                    color=line.get_color(), label=label)
    axes[0].set_title("per training batch (noisy routing)")
    axes[1].set_title("validation text, evaluation routing")
    axes[2].set_title("validation text, with the gating noise")
    axes[0].set_ylabel("max / mean load")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.6)
    axes[0].legend(title="(w_importance, w_load)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="MoE-256")
    p.add_argument("--corpus", nargs="+", default=["shakespeare"])
    p.add_argument("--weightings", nargs="+", type=weighting, default=list(WEIGHTINGS),
                   help="w_importance,w_load pairs (default: Table 6's six)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=80)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--model", type=json.loads, default={},
                   help='further LMConfig overrides as JSON, e.g. \'{"k": 2}\'')
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-tokens", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gate-init-std", type=float, default=0.0,
                   help="W_g drawn from N(0, std²) instead of the paper's zeros (LMConfig)")
    p.add_argument("--out", default="runs/table6")
    a = p.parse_args()
    base = LMTrainConfig(corpus=tuple(a.corpus), preset=a.preset,
                       model={"dropout": a.dropout, "gate_init_std": a.gate_init_std, **a.model},
                       batch_size=a.batch_size, bptt=a.bptt, lr=a.lr, warmup=a.warmup,
                       steps=a.steps, eval_every=a.eval_every, eval_tokens=a.eval_tokens,
                       seed=a.seed, out=a.out)
    rows = table6(base, a.weightings)
    out = Path(a.out)
    table = format_table6(rows)
    (out / "table6.md").write_text(table + "\n")
    (out / "table6.json").write_text(json.dumps(rows, indent=1))
    print(table)
    for r in rows:
        last = r["history"]["balance"][-1]
        grads = {k: round(v, 4) for k, v in last.items() if k.startswith(("grad", "ce", "aux"))}
        print(f"({r['w_importance']}, {r['w_load']}): noisy routing, first eval_tokens of the "
              f"validation text: CV(load) {r['noisy']['cv_load']:.2f}, max/mean "
              f"{r['noisy']['max_over_mean_load']:.2f}; gate gradients at the end {grads}")
    plot(rows, out / "balance.png")


if __name__ == "__main__":
    main()

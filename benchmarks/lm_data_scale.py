"""The MoE advantage against the number of training tokens: the paper's Figure 2 in miniature.

Trains every ``RUN`` (``PRESET`` or ``PRESET:GATE_INIT_STD``, as ``lm_seeds.py``) once on the
same corpus, data order and seed, and measures the perplexity over the **whole** validation
text every ``--eval-every`` steps. The Appendix C.1 schedule (linear warm-up, then ∝ step^-1/2)
does not depend on the run's length, so the model after ``s`` steps is the model a run of ``s``
steps would end with: one run per preset gives every point of the curve (``--eval-tokens``
measures each point on the first tokens of the validation text only, for large corpora; the
end of every run is measured on the whole validation and test texts). Writes
``OUT/scale.json``, ``OUT/scale.md`` (validation perplexity per run and training tokens; each
run's change against the first run, in percent; the test perplexity at the end) and
``OUT/scale.png``::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/lm_data_scale.py --corpus sotu \
        --steps 1600 --eval-every 200 --runs MoE-1-Wide MoE-32:0.088 MoE-256:0.088 --out runs/scale
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lm_seeds import base_config, finished_metrics, run_config, run_name, training_arguments

from sparsemoe.data import load_corpus
from sparsemoe.experiments.lm import Trainer


def format_scale(results: dict[str, dict], tokens_per_step: int) -> str:
    """Markdown: validation perplexity per run (rows) at each evaluated step (columns, as
    training tokens), then each run's change against the first run in percent."""
    names = list(results)
    steps = results[names[0]]["valid_step"]
    head = " | ".join(f"{s * tokens_per_step / 1e6:.2f}M" for s in steps)
    rule = "|---|" + "---|" * (len(steps) + 1)
    lines = [f"| run | {head} | test PPL (end) |", rule]
    for name in names:
        r = results[name]
        cells = " | ".join(f"{p:.1f}" for p in r["valid_perplexity"])
        lines.append(f"| {name} | {cells} | {r['test_perplexity']:.1f} |")
    base = results[names[0]]
    lines += ["", f"**change against {names[0]}** (validation; test at the end)", "",
              f"| run | {head} | test |", rule]
    for name in names[1:]:
        r = results[name]
        cells = " | ".join(f"{100 * (p / b - 1):+.1f}%" for p, b in
                           zip(r["valid_perplexity"], base["valid_perplexity"], strict=True))
        test = 100 * (r["test_perplexity"] / base["test_perplexity"] - 1)
        lines.append(f"| {name} | {cells} | {test:+.1f}% |")
    return "\n".join(lines)


def plot(results: dict[str, dict], tokens_per_step: int, corpus: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, r in results.items():
        ax.plot([s * tokens_per_step / 1e6 for s in r["valid_step"]], r["valid_perplexity"],
                marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation perplexity (whole text)")
    ax.set_title(f"Equal compute per token, more experts: {corpus}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    training_arguments(p, "sotu", steps=1600, warmup=120, eval_every=200)
    p.add_argument("--eval-tokens", type=int, default=None,
                   help="validation tokens per point of the curve (default: the whole text)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/scale")
    a = p.parse_args()
    base = base_config(a, eval_tokens=a.eval_tokens, seed=a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    corpus = None
    for preset, std in a.runs:
        name = run_name(preset, std)
        cfg = run_config(base, preset, std, out / name)
        metrics = finished_metrics(cfg)
        if metrics is None:
            corpus = corpus or load_corpus(base.corpus, base.vocab_size)
            metrics = Trainer(cfg, corpus).run()
        h = metrics["history"]
        results[name] = {"valid_step": h["valid_step"], "valid_perplexity": h["valid_perplexity"],
                         "test_perplexity": metrics["test_perplexity"]}
        (out / "scale.json").write_text(json.dumps(results, indent=1))
    tokens_per_step = a.batch_size * a.bptt
    table = format_scale(results, tokens_per_step)
    (out / "scale.md").write_text(table + "\n")
    plot(results, tokens_per_step, ",".join(a.corpus), out / "scale.png")
    print(table)


if __name__ == "__main__":
    main()

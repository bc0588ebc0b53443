"""Seed spread of the language model's test and validation perplexity, and the paired
difference between MoE variants and a dense baseline at a fixed amount of work.

Trains every ``RUN`` (``PRESET`` or ``PRESET:GATE_INIT_STD``, the latter drawing W_g from
N(0, std²) instead of the paper's zeros; ``--model KEY=VALUE`` sets a field of every run's
model configuration, e.g. ``k=1`` or ``moe_every=2`` of the Transformer) once per seed,
seed-major so that an interrupted call leaves whole seeds, each into ``OUT/NAME/seed{s}`` (a
run already trained to ``--steps`` is read back from its ``metrics.json``). Writes
``OUT/seeds.json`` (per run and seed: test and valid perplexity, steps, training seconds) and
``OUT/seeds.md``: per run, the value of each seed and mean ± sample standard deviation over
the seeds; per run other than the baseline, the per-seed paired difference run − baseline
(same seed: same data order) with its mean ± standard deviation::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/lm_seeds.py --steps 300 \
        --runs MoE-1-Wide MoE-32 MoE-32:0.088 --seeds 0 1 2 --out runs/seeds
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from sparsemoe.data import load_corpus
from sparsemoe.experiments.lm import METRICS, LMTrainConfig, Trainer

KEYS = ("test_perplexity", "valid_perplexity")


def parse_run(text: str) -> tuple[str, float]:
    preset, _, std = text.partition(":")
    return preset, float(std) if std else 0.0


def parse_field(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE a Python literal (``2``, ``0.1``, ``None``) or else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def run_name(preset: str, std: float) -> str:
    return preset if std == 0 else f"{preset}+Wg~N(0,{std}^2)"


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1f} (one seed)" if values else "–"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def format_tables(results: dict[str, dict[int, dict]], baseline: str) -> str:
    """Markdown: per run the seeds' perplexities and mean ± std; then the paired differences
    run − ``baseline`` over the seeds both finished."""
    seeds = sorted({s for per_seed in results.values() for s in per_seed})
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = []
    for key in KEYS:
        lines += [f"**{key.replace('_', ' ')}**", "",
                  f"| run | {head} | mean ± std |", "|---|" + "---|" * (len(seeds) + 1)]
        for name, per_seed in results.items():
            cells = " | ".join(f"{per_seed[s][key]:.1f}" if s in per_seed else "–"
                               for s in seeds)
            lines.append(f"| {name} | {cells} | "
                         f"{mean_std([m[key] for m in per_seed.values()])} |")
        lines.append("")
    base = results.get(baseline, {})
    for key in KEYS:
        rows = []
        for name, per_seed in results.items():
            if name == baseline:
                continue
            diffs = {s: per_seed[s][key] - base[s][key] for s in seeds
                     if s in per_seed and s in base}
            cells = " | ".join(f"{diffs[s]:+.1f}" if s in diffs else "–" for s in seeds)
            rows.append(f"| {name} − {baseline} | {cells} | "
                        f"{mean_std(list(diffs.values()))} |")
        if rows:
            lines += [f"**paired difference of {key.replace('_', ' ')}** (same seed)", "",
                      f"| runs | {head} | mean ± std |", "|---|" + "---|" * (len(seeds) + 1),
                      *rows, ""]
    return "\n".join(lines)


def training_arguments(p: argparse.ArgumentParser, corpus: str, steps: int, warmup: int,
                       eval_every: int) -> None:
    """The runs and training flags this script shares with ``lm_data_scale.py``."""
    p.add_argument("--runs", nargs="+", type=parse_run,
                   default=[parse_run("MoE-1-Wide"), parse_run("MoE-32")],
                   help="PRESET or PRESET:GATE_INIT_STD; the first is the baseline")
    p.add_argument("--corpus", nargs="+", default=[corpus])
    p.add_argument("--arch", default="lstm", help="'lstm' (the paper's LM) or 'transformer'")
    p.add_argument("--vocab-size", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--model", nargs="+", type=parse_field, default=[], metavar="KEY=VALUE",
                   help="model configuration fields for every run (e.g. k=1 moe_every=2)")
    p.add_argument("--eval-every", type=int, default=eval_every)


def base_config(a: argparse.Namespace, **fields) -> LMTrainConfig:
    """The configuration :func:`training_arguments`' flags describe (no preset yet)."""
    return LMTrainConfig(corpus=tuple(a.corpus), arch=a.arch, preset=None, vocab_size=a.vocab_size,
                         model={"dropout": a.dropout, **dict(a.model)},
                         batch_size=a.batch_size, bptt=a.bptt, lr=a.lr, warmup=a.warmup,
                         steps=a.steps, eval_every=a.eval_every,
                         **fields)


def run_config(base: LMTrainConfig, preset: str, std: float, out: Path, **fields) -> LMTrainConfig:
    """``base`` for one ``PRESET[:GATE_INIT_STD]`` run into ``out``."""
    model = {**base.model, "gate_init_std": std} if std else base.model
    return replace(base, preset=preset, out=str(out), model=model, **fields)


def finished_metrics(cfg: LMTrainConfig) -> dict | None:
    """The ``metrics.json`` of a run already trained to ``cfg.steps`` in ``cfg.out``, else None."""
    done = Path(cfg.out) / METRICS
    metrics = json.loads(done.read_text()) if done.exists() else None
    return metrics if metrics is not None and metrics["steps"] == cfg.steps else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    training_arguments(p, "shakespeare", steps=300, warmup=60, eval_every=100)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--eval-tokens", type=int, default=5000)
    p.add_argument("--out", default="runs/seeds")
    a = p.parse_args()
    base = base_config(a, eval_tokens=a.eval_tokens)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [run_name(preset, std) for preset, std in a.runs]
    results: dict[str, dict[int, dict]] = {name: {} for name in names}
    corpus = None
    for seed in a.seeds:
        for (preset, std), name in zip(a.runs, names, strict=True):
            cfg = run_config(base, preset, std, out / name / f"seed{seed}", seed=seed)
            metrics = finished_metrics(cfg)
            if metrics is None:
                corpus = corpus or load_corpus(base.corpus, base.vocab_size)
                t0 = time.perf_counter()
                metrics = Trainer(cfg, corpus).run()
                print(f"{name} seed {seed}: test {metrics['test_perplexity']:.1f}, valid "
                      f"{metrics['valid_perplexity']:.1f}, {time.perf_counter() - t0:.0f} s "
                      f"wall", flush=True)
            results[name][seed] = {k: metrics[k] for k in KEYS} | {
                "steps": metrics["steps"], "train_seconds": metrics["train_seconds"]}
            (out / "seeds.json").write_text(json.dumps(results, indent=1))
            (out / "seeds.md").write_text(format_tables(results, names[0]) + "\n")
    print(format_tables(results, names[0]))


if __name__ == "__main__":
    main()

"""The comparison of the language-model experiment: train several presets for the same
number of tokens at equal compute per token (Table 7 of Shazeer et al. 2017), then write the
tables, plots and the Table-9-style report of what experts learned; for Transformers also the
speed-up to dense quality (:mod:`sparsemoe.experiments.transformer_lm`).

Builds on :mod:`sparsemoe.experiments.lm` (training and evaluation), which knows nothing of it.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ..data import Corpus, Vocabulary, load_corpus
from . import runs
from .lm import LMTrainConfig, Trainer, load_trained, stream_forward
from .transformer_lm import dense_quality_table

CALIBRATION = "calibration.json"  # the step count a time budget was turned into


def expert_contexts(
    checkpoint_dir: str | Path, experts: int = 6, top: int = 8, context: int = 4,
    max_tokens: int = 50_000,
) -> str:
    """What experts learned, like the paper's Table 9: for a few experts of the (first) MoE
    layer, the validation contexts that route to them with the largest gate values.

    Returns a markdown table; the routed word is in bold after its ``context`` predecessors.
    """
    model, ck = load_trained(checkpoint_dir)
    layers = model.moe_layers()
    if not layers or layers[0].num_experts < 2:
        raise ValueError(f"{checkpoint_dir}: the model has no MoE layer with several experts")
    cfg = ck["config"]
    vocab = Vocabulary(ck["vocab"])
    data = load_corpus(cfg["corpus"], vocab=vocab).valid[: max_tokens + 1]
    captured: list[tuple[Tensor, Tensor]] = []
    hook = layers[0].router.register_forward_hook(
        lambda mod, inp, out: captured.append((out.expert_indices, out.combine_weights)))
    try:
        # the router sees each batch's tokens in [B·L] order
        positions = [pos.reshape(-1) for *_, pos in
                     stream_forward(model, data, cfg["batch_size"], cfg["bptt"])]
    finally:
        hook.remove()
    pos = torch.cat(positions)
    idx = torch.cat([e for e, _ in captured])
    w = torch.cat([g for _, g in captured])
    counts = torch.bincount(idx.reshape(-1), minlength=layers[0].num_experts)
    # evenly spaced over the experts that received enough tokens, busiest first
    ranked = [e for e in torch.argsort(counts, descending=True).tolist() if counts[e] >= top]
    chosen = [ranked[i] for i in torch.linspace(0, len(ranked) - 1, min(experts, len(ranked)))
              .round().long().unique().tolist()] if ranked else []
    words = vocab.decode(data.tolist())
    lines = ["| expert | tokens routed | strongest contexts (gate value) |", "|---|---|---|"]
    for e in chosen:
        gate = torch.where(idx == e, w, torch.zeros_like(w)).sum(1)
        best = torch.argsort(gate, descending=True)[: min(top, int((gate > 0).sum()))]
        shown = []
        for j in best.tolist():
            p = int(pos[j])
            before = " ".join(words[max(0, p - context) : p]).replace("<eos>", "/")
            shown.append(f"{before} **{words[p]}** ({gate[j]:.2f})")
        lines.append(f"| {e} | {int(counts[e]):,} | {'<br>'.join(shown)} |")
    return "\n".join(lines)


def _steps_for_budget(cfgs: list[LMTrainConfig], corpus: Corpus, budget: float,
                      evaluations: int = 6) -> int:
    """Common step count so that training all presets plus their evaluations fits ``budget``
    seconds, from a short timing of each (2 warm-up + 3 timed steps, not kept)."""
    per_step, per_eval = 0.0, 0.0
    for cfg in cfgs:
        # a cosine schedule needs a length: the probe's own, never used beyond its 5 steps
        probe = Trainer(replace(cfg, out=str(Path(cfg.out) / "_calibration"),
                                steps=cfg.steps or 5), corpus, progress=False)
        for _ in range(2):
            probe.train_step()
        t0 = time.perf_counter()
        for _ in range(3):
            probe.train_step()
        step_time = (time.perf_counter() - t0) / 3
        per_step += step_time
        # final full evaluation + the periodic ones; forward only, about a third of a step
        eval_tokens = len(corpus.valid) + len(corpus.test) + \
            evaluations * (cfg.eval_tokens or 0)
        per_eval += eval_tokens / (cfg.batch_size * cfg.bptt) * step_time / 3
    return max(10, int((budget - per_eval) / per_step))


def compare(
    presets: list[str], base: LMTrainConfig, out: str | Path, time_budget: float | None = None,
    progress: bool = True, evaluations: int = 6,
) -> list[dict]:
    """Train every preset on the same corpus for the same number of tokens, then write the
    Table-7-style comparison (``results.md``, ``results.csv``), plots and an expert report.

    With ``time_budget`` (seconds for everything), the common step count is chosen from a short
    timing of each preset, once: it is kept in ``out/calibration.json``, so that a restarted
    comparison continues each preset's run where it stopped (and one that finished only
    reports); otherwise ``base.steps`` is used. Each run is validated ``evaluations`` times on
    the way. Transformers also get ``dense_quality.md`` (:func:`write_dense_quality`).
    """
    out = Path(out)
    cfgs = [replace(base, preset=p, out=str(out / p)) for p in presets]  # presets checked here
    with runs.RunLock(out):
        corpus = load_corpus(base.corpus, base.vocab_size)
        print(corpus.describe(), flush=True)
        steps = base.steps
        if time_budget is not None:
            steps = _calibrated_steps(cfgs, corpus, time_budget, out / CALIBRATION,
                                      evaluations)
            print(f"time budget {time_budget:.0f} s → {steps} steps "
                  f"({steps * base.batch_size * base.bptt:,} tokens) per preset", flush=True)
        warmup = min(base.warmup, max(1, steps // 5))
        every = max(1, steps // evaluations)
        results = []
        for cfg in cfgs:
            cfg = replace(cfg, steps=steps, time_budget=None, warmup=warmup, eval_every=every)
            results.append(Trainer(cfg, corpus, progress=progress).run())
        write_report(results, out)
        if base.arch == "transformer":
            write_dense_quality(results, out)
    return results


def _calibrated_steps(cfgs: list[LMTrainConfig], corpus: Corpus, budget: float,
                      path: Path, evaluations: int = 6) -> int:
    """:func:`_steps_for_budget`, measured on the first call and read from ``path`` after."""
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("time_budget") != budget:
            raise runs.RunError(f"{path.parent} was calibrated for time_budget "
                                f"{saved.get('time_budget')} s, now {budget} s; use the same "
                                f"time_budget or another run directory (out)")
        return int(saved["steps"])
    steps = _steps_for_budget(cfgs, corpus, budget, evaluations)
    runs.write_json(path, {"time_budget": budget, "steps": steps})
    return steps


def format_table(results: list[dict]) -> str:
    """Markdown table in the shape of the paper's Table 7."""
    head = ("| model | test PPL | valid PPL | madds/token (M) | params excl. emb/softmax (M) | "
            "active/token (M) | tokens/s | max/mean load |")
    rows = [head, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        load = r["load"].get("max_over_mean_load")
        rows.append(
            f"| {r['preset']} | {r['test_perplexity']:.1f} | {r['valid_perplexity']:.1f} | "
            f"{r['multiply_adds_per_token'] / 1e6:.3f} | {r['params_body'] / 1e6:.2f} | "
            f"{r['params_active_per_token'] / 1e6:.3f} | {r['tokens_per_second']:,.0f} | "
            f"{'-' if load is None else f'{load:.2f}'} |"
        )
    return "\n".join(rows)


def write_report(results: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    tokens = results[0]["tokens_trained"] if results else 0
    corpus = results[0]["corpus"] if results else ""
    runs.write_text(out / "results.md", f"# Language-model comparison ({corpus}, {tokens:,} "
                                        f"training tokens per model)\n\n{table}\n")
    keys = ["preset", "test_perplexity", "valid_perplexity", "multiply_adds_per_token",
            "params_body", "params_active_per_token", "params_total", "tokens_per_second",
            "num_experts", "steps", "tokens_trained"]
    lines = [",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in results]
    runs.write_text(out / "results.csv", "\n".join(lines) + "\n")
    print(table, flush=True)
    _plots(results, out)
    # the flat MoE of the LSTM model, or the Transformer's MoE layers (its config has no middle)
    moe = [r for r in results if r["model_config"].get("middle", "moe") == "moe"
           and r["num_experts"] > 1]
    if moe:
        best = max(moe, key=lambda r: r["num_experts"])
        report = expert_contexts(out / best["preset"])
        runs.write_text(out / "experts.md", f"# What the experts of {best['preset']} learned"
                                            f"\n\n{report}\n")


def _plots(results: list[dict], out: Path) -> None:
    plt = runs.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    flat = sorted((r for r in results if r["model_config"].get("middle") == "moe"),
                  key=lambda r: r["num_experts"])
    if flat:
        ax.plot([r["num_experts"] for r in flat], [r["test_perplexity"] for r in flat], "o-",
                label="flat MoE")
    for r in results:
        if r not in flat:
            ax.scatter([max(r["num_experts"], 1)], [r["test_perplexity"]], marker="s",
                       label=r["preset"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experts")
    ax.set_ylabel("test perplexity")
    ax.set_title("Equal multiply-adds per token")
    ax.legend()
    fig.tight_layout()
    runs.save_figure(fig, out / "perplexity_vs_experts.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        h = r["history"]
        tok = r["config"]["batch_size"] * r["config"]["bptt"]
        ax.plot([s * tok for s in h["valid_step"]], h["valid_perplexity"], label=r["preset"])
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    runs.save_figure(fig, out / "validation_curves.png", dpi=120)
    plt.close(fig)

    moe = [r for r in results if r["valid_tokens_per_expert"] and r["num_experts"] > 1]
    if moe:
        fig, axes = plt.subplots(1, len(moe), figsize=(3.2 * len(moe), 3), squeeze=False)
        for ax, r in zip(axes[0], moe, strict=True):
            counts = torch.tensor(r["valid_tokens_per_expert"][0], dtype=torch.float64)
            ax.bar(range(len(counts)), (counts / counts.mean()).tolist(), width=1.0)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_title(r["preset"])
            ax.set_xlabel("expert")
        axes[0][0].set_ylabel("load / mean load (validation)")
        fig.tight_layout()
        runs.save_figure(fig, out / "expert_load.png", dpi=120)
        plt.close(fig)


def write_dense_quality(results: list[dict], out: str | Path) -> str:
    """Write ``dense_quality.md`` (the table of
    :func:`~sparsemoe.experiments.transformer_lm.dense_quality_table`) to ``out``, print and
    return the table."""
    table = dense_quality_table(results)
    Path(out).mkdir(parents=True, exist_ok=True)
    runs.write_text(
        Path(out) / "dense_quality.md",
        "# Speed-up to dense quality (Switch Transformer, Fedus et al. 2021)\n\n"
        "Steps each MoE Transformer needs to reach its compute-matched dense twin's final "
        "validation perplexity, test perplexity after the same steps, validation perplexity "
        "after the same training time.\n\n" + table + "\n")
    print(table, flush=True)
    return table

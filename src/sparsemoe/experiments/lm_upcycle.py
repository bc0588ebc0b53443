"""Sparse upcycling on the language-model corpus (Komatsuzaki et al. 2022): a dense Transformer
upcycled to an MoE and trained on, against the same dense model trained on, at equal steps and
at equal multiply-adds.

For every seed ``s``, in ``out/seed<s>/`` (each a run directory of the LM trainer,
:class:`~sparsemoe.experiments.lm.Trainer`, so every branch resumes and a finished one only
reports):

- ``dense``: the dense preset trained ``S`` steps, its cosine schedule decaying over
  ``S + S2`` steps (``decay_steps``), so that the checkpoint at ``S`` is in the middle of a
  planned ``S + S2``-step run;
- ``dense-continued``: that checkpoint resumed for ``S2`` more steps (the trainer resumes loss
  for loss, so this is the dense run of ``S + S2`` steps);
- ``upcycled``: the checkpoint's model upcycled (:func:`~sparsemoe.upcycle.upcycle_transformer`:
  every FFN ``num_experts`` copies, Mixtral's top-``k`` renormalised router) and trained ``S2``
  more steps from the same data position, random state and schedule. Optimiser state: each
  expert copy starts with the dense FFN's AdamW moments and step count, everything else keeps
  its own, the new router starts with none (Komatsuzaki et al. reuse the dense optimiser state
  in their vision runs; in language they saw no gain from it);
- ``dense-matched``: the dense checkpoint resumed for ``round(S2·r)`` more steps, ``r`` the
  upcycled model's multiply-adds per token over the dense model's, so that its continuation
  costs what the upcycled one does; past ``S + S2`` its learning rate stays at the cosine's
  floor (lr/10);
- ``scratch`` (optional): an MoE preset (``mixtral-8``) trained from scratch for ``S + S2``
  steps with the same schedule, for reference.

The report (``out/upcycle.md``, ``out/upcycle.json``, ``out/upcycle_curves.png``) gives test and
validation perplexity, multiply-adds per token, the continuation's multiply-adds and tokens/s,
and validation perplexity against step and against cumulative multiply-adds.
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .._checks import check_int, check_number, check_top_k
from .._checksum import checksum_path
from ..data import Corpus, load_corpus
from ..models.architectures import architecture
from ..models.transformer import ROUTING_FIELDS
from ..upcycle import upcycle_transformer, upcycled_config
from . import runs
from .lm import CHECKPOINT, LMTrainConfig, Trainer, _optimizer, load_trained

BRANCHES = ("dense", "dense-continued", "upcycled", "dense-matched", "scratch")
REPORT = "upcycle.md"


def upcycled_train_config(dense: LMTrainConfig, vocab_size: int, num_experts: int,
                          k: int) -> LMTrainConfig:
    """The training configuration of the upcycled branch: the dense one with the upcycled
    model's routing fields as model overrides (so the trainer builds the model that
    :func:`~sparsemoe.upcycle.upcycled_config` describes)."""
    model_cfg = dense.model_config(vocab_size)
    moe_cfg = upcycled_config(model_cfg, num_experts, k)
    routing = {name: getattr(moe_cfg, name) for name in ROUTING_FIELDS
               if getattr(moe_cfg, name) != getattr(model_cfg, name)}
    return replace(dense, model={**dense.model, **routing})


def copy_optimizer_state(dense: torch.nn.Module, dense_opt: torch.optim.Optimizer,
                         moe: torch.nn.Module, moe_opt: torch.optim.Optimizer) -> None:
    """Give ``moe_opt`` the state of ``dense_opt``: a parameter of the same name gets a copy of
    its state, an expert bank ``blocks.i.ffn.experts.*`` ``[n, ...]`` the dense FFN's
    ``blocks.i.ffn.bank.*`` ``[1, ...]`` state repeated ``n`` times (the state tensors with a
    leading 1; the step count copied), a parameter without a dense source (the router) none.
    The groups' hyper-parameters (learning rate, the scheduler's ``initial_lr``) are copied."""
    if len(dense_opt.param_groups) != len(moe_opt.param_groups):
        raise ValueError(f"the optimisers must have the same groups, got "
                         f"{len(dense_opt.param_groups)} and {len(moe_opt.param_groups)}")
    for moe_group, dense_group in zip(moe_opt.param_groups, dense_opt.param_groups, strict=True):
        moe_group.update({key: v for key, v in dense_group.items() if key != "params"})
    sources = dict(dense.named_parameters())
    for name, param in moe.named_parameters():
        source = sources.get(name, sources.get(name.replace(".ffn.experts.", ".ffn.bank.")))
        if source is None or source not in dense_opt.state:
            continue
        moe_opt.state[param] = {
            key: v.expand(param.shape[0], *v.shape[1:]).clone()
            if torch.is_tensor(v) and v.dim() == param.dim() and v.shape[0] == 1 < param.shape[0]
            else (v.clone() if torch.is_tensor(v) else v)
            for key, v in dense_opt.state[source].items()}


def write_upcycled_checkpoint(dense_dir: str | Path, cfg: LMTrainConfig, num_experts: int,
                              k: int, noise: float = 0.0) -> Path:
    """The dense run's checkpoint upcycled into ``cfg.out``'s ``checkpoint.pt``, for the
    trainer to resume with ``cfg`` (see :func:`upcycled_train_config`): the upcycled model,
    the optimiser state of :func:`copy_optimizer_state`, and the dense checkpoint's scheduler,
    data position, random state, step, training time and history. The router's initialisation
    and the copies' noise are drawn from ``cfg.seed``."""
    dense, ck = load_trained(dense_dir)
    dense_cfg = LMTrainConfig(**ck["config"])
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        moe = upcycle_transformer(dense, num_experts, k, noise=noise,
                                  generator=torch.Generator().manual_seed(cfg.seed))
    expected = cfg.model_config(dense.cfg.vocab_size)
    if moe.cfg != expected:
        raise ValueError(f"cfg must describe the upcycled model {moe.cfg}, got {expected}")
    dense_opt = _optimizer(dense, dense_cfg)
    dense_opt.load_state_dict(ck["optimizer"])
    moe_opt = _optimizer(moe, cfg)
    copy_optimizer_state(dense, dense_opt, moe, moe_opt)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    return runs.save_checkpoint(out / CHECKPOINT, {
        **ck, "config": asdict(cfg), "model_config": asdict(moe.cfg),
        "model": moe.state_dict(), "optimizer": moe_opt.state_dict()})


def _branch_from(dense_dir: Path, out: Path) -> None:
    """``out`` starts from the dense checkpoint (copied with its checksum), unless it has a
    checkpoint of its own."""
    if (out / CHECKPOINT).exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    for path in (dense_dir / CHECKPOINT, checksum_path(dense_dir / CHECKPOINT)):
        shutil.copyfile(path, out / path.name)


def _row(branch: str, seed: int, metrics: dict, start: dict | None) -> dict:
    """One branch's results; ``start``: the dense run's metrics at the upcycling point, from
    which the continuation's steps, time and multiply-adds count (None: a run from step 0,
    counted whole)."""
    c = metrics["config"]
    tokens_per_step = c["batch_size"] * c["bptt"]
    first = start["steps"] if start is not None else 0
    steps = metrics["steps"] - first
    seconds = metrics["train_seconds"] - (start["train_seconds"] if start is not None else 0.0)
    return {
        "branch": branch, "seed": seed, "steps": metrics["steps"], "continued_steps": steps,
        "multiply_adds_per_token": metrics["multiply_adds_per_token"],
        "continued_multiply_adds": steps * tokens_per_step * metrics["multiply_adds_per_token"],
        "tokens_per_second": steps * tokens_per_step / max(seconds, 1e-9),
        "valid_perplexity": metrics["valid_perplexity"],
        "test_perplexity": metrics["test_perplexity"],
        "tokens_per_step": tokens_per_step, "start_step": first,
        "start_multiply_adds_per_token": start["multiply_adds_per_token"] if start else 0.0,
        "valid_step": metrics["history"]["valid_step"],
        "valid_curve": metrics["history"]["valid_perplexity"],
    }


def upcycle_demo(
    base: LMTrainConfig, out: str | Path, continue_steps: int, num_experts: int = 8, k: int = 2,
    noise: float = 0.0, seeds: int = 1, scratch: str | None = "mixtral-8",
    progress: bool = True,
) -> list[dict]:
    """Run every branch of the module's comparison for ``seeds`` seeds (``base.seed``,
    ``base.seed + 1``, ...) and write the report.

    Args:
        base: the dense run (``arch="transformer"``, a dense preset); ``base.steps`` is ``S``,
            ``base.decay_steps`` (None: ``S + continue_steps``) the cosine's length.
        out: the folder of the seeds' run directories and the report.
        continue_steps: ``S2``.
        num_experts, k, noise: the upcycling (:func:`~sparsemoe.upcycle.upcycle_transformer`).
        seeds: how many seeds.
        scratch: the MoE preset trained from scratch for reference, or None.

    Returns:
        One row per seed and branch (:data:`BRANCHES`).
    """
    if base.arch != "transformer":
        raise ValueError(f"arch must be 'transformer' (upcycling builds a MoETransformer), got "
                         f"{base.arch!r}")
    if base.steps is None:
        raise ValueError("steps (S, the dense steps before upcycling) must be given, got None")
    if base.model_config(1).router != "none":
        raise ValueError(f"preset: the demonstration starts from a dense model, got "
                         f"{base.preset!r} (router {base.model_config(1).router!r})")
    s2 = check_int("continue_steps", continue_steps)
    check_int("seeds", seeds)
    check_top_k("k", k, check_int("num_experts", num_experts))
    check_number("noise", noise, low=0)
    if scratch is not None:
        architecture("transformer").check_preset(scratch)
    out = Path(out)
    total = base.steps + s2
    rows = []
    started = time.perf_counter()
    with runs.RunLock(out):
        corpus = load_corpus(base.corpus, base.vocab_size)
        print(corpus.describe(), flush=True)
        for seed in range(base.seed, base.seed + seeds):
            rows += _one_seed(replace(base, seed=seed, decay_steps=base.decay_steps or total,
                                      out=str(out / f"seed{seed}" / "dense")),
                              corpus, s2, num_experts, k, noise, scratch, progress)
        write_report(rows, out, time.perf_counter() - started)
    return rows


def _one_seed(dense_cfg: LMTrainConfig, corpus: Corpus, s2: int, num_experts: int, k: int,
              noise: float, scratch: str | None, progress: bool) -> list[dict]:
    seed, root = dense_cfg.seed, Path(dense_cfg.out).parent
    total = dense_cfg.steps + s2
    start = Trainer(dense_cfg, corpus, progress=progress).run()
    rows = [_row("dense", seed, start, None)]

    continued = replace(dense_cfg, steps=total, out=str(root / "dense-continued"))
    _branch_from(Path(dense_cfg.out), Path(continued.out))
    rows.append(_row("dense-continued", seed, Trainer(continued, corpus, progress=progress)
                     .run(), start))

    upcycled = replace(upcycled_train_config(dense_cfg, len(corpus.vocab), num_experts, k),
                       steps=total, out=str(root / "upcycled"))
    if not (Path(upcycled.out) / CHECKPOINT).exists():
        write_upcycled_checkpoint(dense_cfg.out, upcycled, num_experts, k, noise)
    up = _row("upcycled", seed, Trainer(upcycled, corpus, progress=progress).run(), start)
    rows.append(up)

    ratio = up["multiply_adds_per_token"] / start["multiply_adds_per_token"]
    matched = replace(dense_cfg, steps=dense_cfg.steps + round(s2 * ratio),
                      out=str(root / "dense-matched"))
    _branch_from(Path(dense_cfg.out), Path(matched.out))
    rows.append(_row("dense-matched", seed, Trainer(matched, corpus, progress=progress).run(),
                     start))
    if scratch is not None:
        ref = replace(dense_cfg, preset=scratch, steps=total, out=str(root / "scratch"))
        rows.append(_row("scratch", seed, Trainer(ref, corpus, progress=progress).run(), None))
    return rows


def _spread(values: list[float]) -> str:
    """``mean`` of one value, ``mean (a, b, ...)`` of several."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ({', '.join(f'{v:.2f}' for v in values)})"


def format_table(rows: list[dict]) -> str:
    """The markdown table: one line per branch, perplexities as the seeds' mean (each
    seed's). The continuation's columns count from the upcycling point ("-" for the runs from
    step 0, whose tokens/s is their whole run's)."""
    head = ("| branch | steps | steps after upcycling point | madds/token (M) | "
            "madds after upcycling point (G) | tokens/s | valid PPL | test PPL |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for branch in BRANCHES:
        these = [r for r in rows if r["branch"] == branch]
        if not these:
            continue
        r = these[0]
        after = (f"{r['continued_steps']} | ", f"{r['continued_multiply_adds'] / 1e9:.1f} | ") \
            if r["start_step"] else ("- | ", "- | ")
        lines.append(
            f"| {branch} | {r['steps']} | {after[0]}"
            f"{r['multiply_adds_per_token'] / 1e6:.3f} | {after[1]}"
            f"{statistics.fmean(x['tokens_per_second'] for x in these):,.0f} | "
            f"{_spread([x['valid_perplexity'] for x in these])} | "
            f"{_spread([x['test_perplexity'] for x in these])} |")
    return "\n".join(lines)


def cumulative_multiply_adds(row: dict, step: int) -> float:
    """Multiply-adds (outside embedding and head, forward) of a branch's training up to
    ``step``: the dense model's until the upcycling point, the branch's model after it."""
    before = min(step, row["start_step"])
    return row["tokens_per_step"] * (before * row["start_multiply_adds_per_token"]
                                     + (step - before) * row["multiply_adds_per_token"])


def write_report(rows: list[dict], out: str | Path, seconds: float | None = None) -> str:
    """``upcycle.md`` (the table), ``upcycle.json`` (the rows) and ``upcycle_curves.png`` in
    ``out``; returns the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    wall = "" if seconds is None else f"\n\nWall time of the command: {seconds / 60:.1f} min.\n"
    seeds = sorted({r["seed"] for r in rows})
    runs.write_text(out / REPORT, f"# Sparse upcycling (seeds {seeds})\n\n{table}{wall}\n")
    runs.write_json(out / "upcycle.json", rows)
    print(table, flush=True)
    _plot(rows, out)
    return table


def _plot(rows: list[dict], out: Path) -> None:
    plt = runs.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = dict(zip(BRANCHES, ("k", "tab:blue", "tab:red", "tab:green", "tab:gray"),
                       strict=True))
    seeds = sorted({r["seed"] for r in rows})
    shown = []
    for r in rows:
        if r["branch"] == "dense" and r["seed"] != seeds[0]:
            continue
        pairs = [(s, p) for s, p in zip(r["valid_step"], r["valid_curve"], strict=True)
                 if r["branch"] in ("dense", "scratch") or s >= r["start_step"]]
        shown += [p for _, p in pairs]
        first = r["seed"] == seeds[0]
        # dense-continued is dense-matched's first S2 steps: drawn wide beneath it
        wide = r["branch"] == "dense-continued"
        for ax, x in zip(axes, ([s for s, _ in pairs],
                                [cumulative_multiply_adds(r, s) / 1e9 for s, _ in pairs]),
                         strict=True):
            ax.plot(x, [p for _, p in pairs], "-" if first else ":", color=colours[r["branch"]],
                    lw=4 if wide else 1.5, alpha=0.45 if wide else 1.0,
                    label=r["branch"] if first else None)
    start = next(r for r in rows if r["branch"] == "dense")
    at_start = [p for s, p in zip(start["valid_step"], start["valid_curve"], strict=True)
                if s >= start["steps"] // 2]
    top = 1.15 * (at_start[0] if at_start else max(shown))
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("cumulative multiply-adds, G (forward, outside embedding and head)")
    for ax in axes:
        ax.set_ylabel("validation perplexity")
        ax.set_ylim(0.97 * min(shown), top)
        ax.axvline(start["steps"] if ax is axes[0] else cumulative_multiply_adds(
            start, start["steps"]) / 1e9, color="k", lw=0.6, ls="--")
    axes[0].legend()
    fig.suptitle(f"Sparse upcycling at step {start['steps']} (dashed line); seeds {seeds} "
                 f"(first solid, others dotted)")
    fig.tight_layout()
    runs.save_figure(fig, out / "upcycle_curves.png", dpi=120)
    plt.close(fig)

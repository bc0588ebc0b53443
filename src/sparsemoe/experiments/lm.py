"""The paper's language-model experiment (Shazeer et al. 2017, §5.1 and Appendix C.1):
train, evaluate, compare presets at equal compute per token, and report.

Training follows Appendix C.1: Adam, the learning rate rising linearly over ``warmup`` steps
and then falling ∝ step^-1/2, cross-entropy plus the MoE layers' auxiliary losses, truncated
back-propagation through contiguous streams. Gradient-norm clipping is added (the paper does
not say; it protects the short CPU runs from early LSTM spikes).

A run directory holds ``checkpoint.pt`` (model, optimiser, scheduler, RNG state, data position
and recurrent state: resuming continues exactly, loss for loss) and ``metrics.json``.

With expert parallelism (:class:`~sparsemoe.experiments.processes.ExpertParallelRanks`, under
``torchrun``) the MoE layers' experts are spread over the ranks and each rank trains on its
share of every batch's streams; the checkpoint is the single-process one, so a run can be
resumed on another number of ranks or on one process, and back. Only rank 0 writes and logs.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..balancing import update_expert_biases
from ..data import Corpus, StreamBatcher, Vocabulary, eval_batches, load_corpus
from ..layers import MoELayer, aux_loss
from ..models.lstm_lm import (
    PRESET_SETS,
    PRESETS,
    LMConfig,
    LSTMLanguageModel,
    multiply_adds_per_token,
    parameter_counts,
)
from ..optim import FactoredAdam, param_groups
from ..parallel import (
    exchange_stats,
    full_optimizer_state_dict,
    full_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
)
from .processes import ONE_PROCESS, OneProcess

CHECKPOINT = "checkpoint.pt"
OPTIMIZERS = ("adam", "factored-adam")
METRICS = "metrics.json"


@dataclass
class TrainConfig:
    corpus: tuple[str, ...] = ("shakespeare",)  # "shakespeare", "1b-word=ROOT" or text files
    vocab_size: int | None = 10_000  # None: every training word
    preset: str | None = "MoE-32"  # a PRESETS name, or None for LMConfig defaults
    model: dict = field(default_factory=dict)  # LMConfig field overrides
    batch_size: int = 32  # parallel streams
    bptt: int = 35  # time steps per batch
    lr: float = 2e-3  # peak learning rate (the paper does not give one)
    warmup: int = 200  # linear warm-up steps (paper: 1000)
    clip: float = 1.0  # gradient-norm clipping
    optimizer: str = "adam"  # or "factored-adam": Appendix D's memory-saving Adam
    steps: int | None = 1000  # training steps (None: until time_budget)
    time_budget: float | None = None  # seconds of training, checked after each step
    eval_every: int = 200  # steps between validations (and checkpoints)
    eval_tokens: int | None = 20_000  # periodic validation on this many tokens (final: all)
    seed: int = 0
    out: str = "runs/lm"

    def __post_init__(self) -> None:
        if self.steps is None and self.time_budget is None:
            raise ValueError("give steps or time_budget (or both), got neither")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)} or None, "
                             f"got {self.preset!r}")
        self.corpus = tuple(self.corpus)

    def model_config(self, vocab_size: int) -> LMConfig:
        fields = {**(PRESETS[self.preset] if self.preset else {}), **self.model}
        return replace(LMConfig(), vocab_size=vocab_size, **fields)


def lr_factor(step: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then ∝ step^-1/2 (Appendix C.1)."""
    s = step + 1
    return min(s / warmup, math.sqrt(warmup / s))


@torch.no_grad()
def stream_forward(model: torch.nn.Module, tokens: Tensor, batch_size: int, bptt: int,
                   processes: OneProcess = ONE_PROCESS):
    """Run ``model`` over ``tokens`` in evaluation batches, carrying the recurrent state along
    each stream (from zero at the start and whenever the batch width changes).

    Yields ``(logits [b, l, V], targets [b, l], positions [b, l])``; ``positions`` index the
    input tokens in ``tokens``. Over several processes, each gets its share of the ``b``
    streams (possibly none).
    """
    state, width = None, None
    for inputs, targets, positions in eval_batches(tokens, batch_size, bptt):
        if inputs.shape[0] != width:
            state, width = None, inputs.shape[0]
        inputs, targets, positions = map(processes.shard, (inputs, targets, positions))
        logits, state = model(inputs, state)
        yield logits, targets, positions


def evaluate(
    model: torch.nn.Module, tokens: Tensor, batch_size: int, bptt: int,
    max_tokens: int | None = None, processes: OneProcess = ONE_PROCESS,
) -> dict:
    """Per-token negative log-likelihood of ``tokens`` (every token after the first, ``<eos>``
    included) and its perplexity exp(mean NLL); plus the MoE layers' tokens per expert.

    ``model(inputs [B, L], state) -> (logits [B, L, V], state)``. Over several processes each
    evaluates its share of the streams and the sums are taken over all of them.
    """
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    was_training = model.training
    model.eval()
    moe = [m for m in model.modules() if isinstance(m, MoELayer)]
    load = [0] * len(moe)
    nll, count = 0.0, 0
    for logits, targets, _ in stream_forward(model, tokens, batch_size, bptt, processes):
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()  # sum the log-likelihood in at least float32
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               reduction="sum").item()
        count += targets.numel()
        load = [total + m.stats.tokens_per_expert for total, m in zip(load, moe, strict=True)]
    model.train(was_training)
    nll, count = processes.sum(torch.tensor([nll, count], dtype=torch.float64)).tolist()
    load = [processes.sum(t).cpu() if isinstance(t, Tensor) else t for t in load]
    mean = nll / max(count, 1)
    return {"nll": mean, "perplexity": math.exp(mean), "tokens": int(count),
            "tokens_per_expert": [t.tolist() for t in load if isinstance(t, Tensor)]}


def load_statistics(tokens_per_expert: list[list[int]]) -> dict:
    """CV and max/mean of the per-expert token counts of the first MoE layer."""
    if not tokens_per_expert:
        return {}
    t = torch.tensor(tokens_per_expert[0], dtype=torch.float64)
    mean = t.mean()
    return {"cv_load": float(t.std(correction=0) / mean) if mean > 0 else 0.0,
            "max_over_mean_load": float(t.max() / mean) if mean > 0 else 0.0,
            "experts_unused": int((t == 0).sum())}


def _si(value: float, unit: str) -> str:
    """``value`` with a decimal prefix: 1.3kB, 45.0M."""
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{prefix}{unit}"
    return f"{value:.0f}{unit}"


def _save(path: Path, obj: object) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    """One training run: ``Trainer(cfg).run()`` → metrics (also in ``cfg.out/metrics.json``).

    If ``cfg.out`` holds a checkpoint of the same configuration, the run resumes from it,
    whatever the number of processes that wrote it. ``processes`` spreads the run over
    several (:class:`~sparsemoe.experiments.processes.ExpertParallelRanks`); every one of them
    then calls :meth:`run`, and only rank 0 shows progress and writes files.
    """

    def __init__(self, cfg: TrainConfig, corpus: Corpus | None = None,
                 progress: bool = True, processes: OneProcess = ONE_PROCESS) -> None:
        if cfg.batch_size % processes.world_size:
            raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number "
                             f"of processes ({processes.world_size}): each takes an equal "
                             f"share of the streams")
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.processes = processes
        self.root = processes.rank == 0
        self.progress = progress and self.root
        ckpt_path = self.out / CHECKPOINT
        self.ckpt = torch.load(ckpt_path, weights_only=False) if ckpt_path.exists() else None
        if self.ckpt is not None:
            saved = TrainConfig(**self.ckpt["config"])
            same = replace(saved, steps=cfg.steps, time_budget=cfg.time_budget)
            if same != cfg:
                raise ValueError(f"{ckpt_path} was written by a different configuration "
                                 f"({saved}); use another --out or the same settings")
            vocab = Vocabulary(self.ckpt["vocab"])
            corpus = corpus if corpus is not None and corpus.vocab.words == vocab.words else \
                processes.root_first(lambda: load_corpus(cfg.corpus, vocab=vocab))
        self.corpus = corpus if corpus is not None else \
            processes.root_first(lambda: load_corpus(cfg.corpus, cfg.vocab_size))
        torch.manual_seed(cfg.seed)
        self.model_cfg = cfg.model_config(len(self.corpus.vocab))
        self.model = processes.prepare(LSTMLanguageModel(self.model_cfg))
        if cfg.optimizer == "factored-adam":
            if processes.world_size > 1:
                raise ValueError("optimizer 'factored-adam' keeps per-matrix factors that "
                                 "expert-parallel checkpoints cannot reshard yet; use "
                                 f"optimizer 'adam' with {processes.world_size} ranks")
            self.opt = FactoredAdam(param_groups(self.model), lr=cfg.lr)
        else:
            # fused: one pass per parameter; on 2 CPU cores 76 ms instead of 430 ms per step
            # for the 17M expert parameters of MoE-256 (foreach implementation)
            self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, cfg.warmup))
        self.batcher = StreamBatcher(self.corpus.train, cfg.batch_size, cfg.bptt, cfg.seed)
        self.state = None
        self.step = 0
        self.train_seconds = 0.0
        self.history: dict[str, list] = {"step": [], "train_loss": [], "valid_step": [],
                                         "valid_perplexity": []}
        # this invocation's expert-parallel exchanges (summed over steps and layers)
        self.exchange = {"steps": 0, "bytes_sent": 0, "expert_multiply_adds": 0}
        if self.ckpt is not None:
            self._restore(self.ckpt)

    def _restore(self, ck: dict) -> None:
        load_full_state_dict(self.model, ck["model"])
        load_full_optimizer_state_dict(self.model, self.opt, ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.batcher.load_state_dict(ck["data"])
        rng = ck["rng"]
        self.processes.set_rng_states(rng if isinstance(rng, list) else [rng])  # one process's
        state = ck["recurrent_state"]  # per LSTM (h, c), each [1, B, d]: this rank's streams
        self.state = None if state is None else \
            tuple(tuple(self.processes.shard(t, dim=1) for t in layer) for layer in state)
        self.step, self.train_seconds, self.history = ck["step"], ck["train_seconds"], \
            ck["history"]

    def save(self) -> None:
        """Write the checkpoint in the single-process layout (every process must call it)."""
        state = None if self.state is None else tuple(
            tuple(self.processes.gather_streams(t, dim=1).cpu() for t in layer)
            for layer in self.state)
        ck = {
            "config": asdict(self.cfg), "model_config": asdict(self.model_cfg),
            "vocab": self.corpus.vocab.words, "model": full_state_dict(self.model),
            "optimizer": full_optimizer_state_dict(self.model, self.opt),
            "scheduler": self.sched.state_dict(), "data": self.batcher.state_dict(),
            "rng": self.processes.rng_states(), "recurrent_state": state, "step": self.step,
            "train_seconds": self.train_seconds, "history": self.history,
        }
        if self.root:
            self.out.mkdir(parents=True, exist_ok=True)
            _save(self.out / CHECKPOINT, ck)

    def _done(self) -> bool:
        c = self.cfg
        return (c.steps is not None and self.step >= c.steps) or \
            (c.time_budget is not None and self.train_seconds >= c.time_budget)

    def train_step(self) -> float:
        """One optimiser step; returns the cross-entropy of the whole batch (without the
        auxiliary loss)."""
        inputs, targets = map(self.processes.shard, self.batcher.next())  # this rank's streams
        if self.batcher.epoch_start:
            self.state = None
        logits, state = self.model(inputs, self.state)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss = ce + aux_loss(self.model) if self.model.moe_layers() else ce
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.processes.clip_grad_norm_(self.model, self.cfg.clip)
        self.opt.step()
        if self.model_cfg.balancing == "aux-free":  # the bias step, over every rank's load
            update_expert_biases(self.model,
                                 dist.group.WORLD if self.processes.world_size > 1 else None)
        self.sched.step()
        self.state = tuple((h.detach(), c.detach()) for h, c in state)
        for stats in exchange_stats(self.model):
            self.exchange["bytes_sent"] += stats.step_bytes_sent
            self.exchange["expert_multiply_adds"] += stats.step_expert_multiply_adds or 0
        self.exchange["steps"] += 1
        return self.processes.sum(ce.detach()).item() / self.processes.world_size

    def validate(self, max_tokens: int | None) -> dict:
        return evaluate(self.model, self.corpus.valid, self.cfg.batch_size, self.cfg.bptt,
                        max_tokens, self.processes)

    def exchange_per_step(self) -> dict:
        """Expert parallelism's traffic per training step and rank, averaged over this
        invocation's steps and the ranks, next to the experts' multiply-adds (empty without
        expert-parallel layers). Their ratio is the paper's compute-to-I/O argument (§3.2)."""
        if not exchange_stats(self.model):
            return {}
        totals = torch.tensor([self.exchange["bytes_sent"], self.exchange["expert_multiply_adds"]],
                              dtype=torch.float64)
        sent, madds = (self.processes.sum(totals).cpu() / self.processes.world_size
                       / max(self.exchange["steps"], 1)).tolist()
        compute_to_io = exchange_stats(self.model)[0].compute_to_io
        return {"world_size": self.processes.world_size, "bytes_sent_per_step": sent,
                "expert_multiply_adds_per_step": madds,
                "multiply_adds_per_byte_sent": madds / sent if sent else None,
                "compute_to_io": compute_to_io}

    def run(self) -> dict:
        c = self.cfg
        self.model.train()
        tokens_per_step = c.batch_size * c.bptt
        bar = tqdm(total=c.steps, initial=self.step, disable=not self.progress,
                   desc=f"{c.preset or 'lm'}", unit="step", dynamic_ncols=True)
        moe = self.model.moe_layers()
        while not self._done():
            t0 = time.perf_counter()
            ce = self.train_step()
            self.train_seconds += time.perf_counter() - t0
            self.step += 1
            self.history["step"].append(self.step)
            self.history["train_loss"].append(ce)
            post = {"loss": f"{ce:.3f}", "ppl": f"{math.exp(ce):.0f}",
                    "tok/s": f"{self.step * tokens_per_step / self.train_seconds:,.0f}"}
            if moe:
                post["max/mean load"] = f"{moe[0].stats.max_over_mean_load:.2f}"
            exchanged = exchange_stats(self.model)
            if exchanged:  # this rank's last step: bytes sent, expert multiply-adds
                post["sent"] = _si(sum(e.step_bytes_sent for e in exchanged), "B")
                post["expert madds"] = _si(sum(e.step_expert_multiply_adds or 0
                                               for e in exchanged), "")
            bar.set_postfix(post, refresh=False)
            bar.update()
            if self.step % c.eval_every == 0:
                v = self.validate(c.eval_tokens)
                self.history["valid_step"].append(self.step)
                self.history["valid_perplexity"].append(v["perplexity"])
                if self.progress:
                    bar.write(f"step {self.step}: valid perplexity {v['perplexity']:.1f} "
                              f"(first {v['tokens']:,} tokens)")
                self.save()
        bar.close()
        self.save()
        return self.finish()

    def finish(self) -> dict:
        """Full validation and test evaluation; writes and returns ``metrics.json``."""
        c = self.cfg
        valid = self.validate(None)
        test = evaluate(self.model, self.corpus.test, c.batch_size, c.bptt,
                        processes=self.processes)
        with torch.device("meta"):  # the whole model's counts, however its experts are spread
            counts = parameter_counts(LSTMLanguageModel(self.model_cfg))
        metrics = {
            "preset": c.preset, "corpus": self.corpus.name,
            "valid_perplexity": valid["perplexity"], "test_perplexity": test["perplexity"],
            "steps": self.step, "tokens_trained": self.step * c.batch_size * c.bptt,
            "train_seconds": self.train_seconds,
            "tokens_per_second": self.step * c.batch_size * c.bptt / max(self.train_seconds,
                                                                          1e-9),
            "params_total": counts["total"], "params_body": counts["body"],
            "params_active_per_token": counts["active_per_token"],
            "multiply_adds_per_token": multiply_adds_per_token(self.model_cfg),
            "multiply_adds_per_token_training": multiply_adds_per_token(self.model_cfg, True),
            "num_experts": self.model_cfg.num_experts if self.model_cfg.middle != "lstm" else 0,
            "load": load_statistics(valid["tokens_per_expert"]),
            "valid_tokens_per_expert": valid["tokens_per_expert"],
            "exchange": self.exchange_per_step(),
            "history": self.history, "config": asdict(c), "model_config": asdict(self.model_cfg),
        }
        if self.root:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / METRICS).write_text(json.dumps(metrics, indent=1))
        return metrics


def load_trained(checkpoint_dir: str | Path) -> tuple[LSTMLanguageModel, dict]:
    """The model saved in a run directory, and the checkpoint dictionary."""
    path = Path(checkpoint_dir) / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint: no {CHECKPOINT} in {checkpoint_dir}")
    ck = torch.load(path, weights_only=False)
    model = LSTMLanguageModel(LMConfig(**ck["model_config"]))
    model.load_state_dict(ck["model"])
    return model.eval(), ck


def evaluate_checkpoint(checkpoint_dir: str | Path, corpus: tuple[str, ...] | None = None) -> dict:
    """Validation and test perplexity of a saved run, on its corpus or another one (encoded
    with the run's vocabulary)."""
    model, ck = load_trained(checkpoint_dir)
    cfg = ck["config"]
    data = load_corpus(corpus or cfg["corpus"], vocab=Vocabulary(ck["vocab"]))
    valid = evaluate(model, data.valid, cfg["batch_size"], cfg["bptt"])
    test = evaluate(model, data.test, cfg["batch_size"], cfg["bptt"])
    return {"corpus": data.name, "valid_perplexity": valid["perplexity"],
            "test_perplexity": test["perplexity"], "valid_tokens": valid["tokens"],
            "test_tokens": test["tokens"], "load": load_statistics(valid["tokens_per_expert"])}


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


def _steps_for_budget(cfgs: list[TrainConfig], corpus: Corpus, budget: float) -> int:
    """Common step count so that training all presets plus their evaluations fits ``budget``
    seconds, from a short timing of each (2 warm-up + 3 timed steps, not kept)."""
    per_step, per_eval = 0.0, 0.0
    for cfg in cfgs:
        probe = Trainer(replace(cfg, out=str(Path(cfg.out) / "_calibration")), corpus,
                        progress=False)
        for _ in range(2):
            probe.train_step()
        t0 = time.perf_counter()
        for _ in range(3):
            probe.train_step()
        step_time = (time.perf_counter() - t0) / 3
        per_step += step_time
        # final full evaluation + 6 periodic ones; forward only, about a third of a step
        eval_tokens = len(corpus.valid) + len(corpus.test) + 6 * (cfg.eval_tokens or 0)
        per_eval += eval_tokens / (cfg.batch_size * cfg.bptt) * step_time / 3
    return max(10, int((budget - per_eval) / per_step))


def compare(
    presets: list[str], base: TrainConfig, out: str | Path, time_budget: float | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train every preset on the same corpus for the same number of tokens, then write the
    Table-7-style comparison (``results.md``, ``results.csv``), plots and an expert report.

    With ``time_budget`` (seconds for everything), the common step count is chosen from a short
    timing of each preset; otherwise ``base.steps`` is used.
    """
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"unknown presets {unknown}; choose from {tuple(PRESETS)} or the sets "
                         f"{tuple(PRESET_SETS)}")
    out = Path(out)
    corpus = load_corpus(base.corpus, base.vocab_size)
    print(corpus.describe(), flush=True)
    cfgs = [replace(base, preset=p, out=str(out / p)) for p in presets]
    steps = base.steps
    if time_budget is not None:
        steps = _steps_for_budget(cfgs, corpus, time_budget)
        print(f"time budget {time_budget:.0f} s → {steps} steps "
              f"({steps * base.batch_size * base.bptt:,} tokens) per preset", flush=True)
    warmup = min(base.warmup, max(1, steps // 5))
    every = max(1, steps // 6)
    results = []
    for cfg in cfgs:
        cfg = replace(cfg, steps=steps, time_budget=None, warmup=warmup, eval_every=every)
        results.append(Trainer(cfg, corpus, progress=progress).run())
    write_report(results, out)
    return results


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
    (out / "results.md").write_text(
        f"# Language-model comparison ({results[0]['corpus'] if results else ''}, "
        f"{tokens:,} training tokens per model)\n\n{table}\n")
    keys = ["preset", "test_perplexity", "valid_perplexity", "multiply_adds_per_token",
            "params_body", "params_active_per_token", "params_total", "tokens_per_second",
            "num_experts", "steps", "tokens_trained"]
    lines = [",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in results]
    (out / "results.csv").write_text("\n".join(lines) + "\n")
    print(table, flush=True)
    _plots(results, out)
    moe = [r for r in results if r["model_config"]["middle"] == "moe" and r["num_experts"] > 1]
    if moe:
        best = max(moe, key=lambda r: r["num_experts"])
        report = expert_contexts(out / best["preset"])
        (out / "experts.md").write_text(f"# What the experts of {best['preset']} learned\n\n"
                                        f"{report}\n")


def _plots(results: list[dict], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install 'sparsemoe[plot]')")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    flat = sorted((r for r in results if r["model_config"]["middle"] == "moe"),
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
    fig.savefig(out / "perplexity_vs_experts.png", dpi=120)
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
    fig.savefig(out / "validation_curves.png", dpi=120)
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
        fig.savefig(out / "expert_load.png", dpi=120)
        plt.close(fig)

"""The paper's language-model experiment (Shazeer et al. 2017, §5.1 and Appendix C.1):
training and evaluation. The comparison of presets and its report are in
:mod:`sparsemoe.experiments.lm_report`, which builds on this module (never the reverse).

Training follows Appendix C.1: Adam, the learning rate rising linearly over ``warmup`` steps
and then falling ∝ step^-1/2, cross-entropy plus the MoE layers' auxiliary losses, truncated
back-propagation through contiguous streams. Gradient-norm clipping is added (the paper does
not say; it protects the short CPU runs from early LSTM spikes). The model is any entry of
:data:`~sparsemoe.models.architectures.ARCHITECTURES` (``arch``): the LSTM language model, or
the MoE Transformer, which trains by default with AdamW and a warm-up then cosine schedule.

A run directory holds ``checkpoint.pt`` (model, optimiser, scheduler, RNG state, data position
and recurrent state: resuming continues exactly, loss for loss) and ``metrics.json``, written
through :mod:`sparsemoe.experiments.runs` (atomic, verified, locked; SIGINT/SIGTERM save and
stop, a non-finite loss stops without saving). A run resumes when its configuration is the same
apart from paths (the run directory; corpus files are compared by their resolved location) and
the length of training (``steps``, ``time_budget``); a finished run reports without retraining.

On a device mesh (:class:`~sparsemoe.experiments.processes.ExpertParallelRanks`, under
``torchrun``) the MoE layers' experts are spread over the "ep" ranks, FSDP2 shards the rest, and
each rank trains on its share of every batch's streams. Such a run writes a distributed
checkpoint, the folder ``checkpoint/`` (:mod:`sparsemoe.parallel.checkpoint`: every rank its
shards, the model and optimiser in the single-process layout, the rest in ``extra.pt``); a run
resumes from the later of ``checkpoint.pt`` and ``checkpoint/``, on any mesh shape or on one
process. Only rank 0 logs and writes the files that are not shards.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor

from .._checks import check_choice, check_int, check_number, deprecated_alias
from ..balancing import update_expert_biases
from ..data import Corpus, StreamBatcher, Vocabulary, eval_batches, load_corpus
from ..models.architectures import ARCHITECTURES, architecture, build_model
from ..module import MoEModule, aux_loss, coefficient_of_variation, max_over_mean
from ..optim import FactoredAdam, param_groups
from ..parallel import (
    exchange_stats,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
    sharded_checkpoint_extra,
    sharded_checkpoint_path,
)
from . import runs
from .processes import ONE_PROCESS, OneProcess
from .runs import CHECKPOINT, METRICS

SHARDED_CHECKPOINT = "checkpoint"
OPTIMIZERS = ("adam", "factored-adam", "adamw")
SCHEDULES = ("rsqrt", "cosine")
CHECKPOINT_KEYS = ("config", "model_config", "vocab", "model", "optimizer", "scheduler", "data",
                   "rng", "recurrent_state", "step", "train_seconds", "history")
EXTRA_KEYS = tuple(k for k in CHECKPOINT_KEYS if k not in ("model", "optimizer"))
"""The keys of a distributed checkpoint's ``extra.pt``: the model and the optimiser are its
shards."""


def _help(text: str, **cli) -> dict:
    """A field's help text (and argparse options) for the command line's flag."""
    return {"help": text, **cli}


@dataclass
class LMTrainConfig:
    """One training run of the language model: data, model, optimisation, schedule and
    output. The ``lm train`` and ``lm compare`` flags are built from these fields and their
    help texts (``metadata["help"]``)."""

    corpus: tuple[str, ...] = field(default=("shakespeare",), metadata=_help(
        "'shakespeare' (default, fetched on first use), '1b-word=ROOT' (the 1 Billion Word "
        "Benchmark layout) or plain-text files"))
    vocab_size: int | None = field(default=10_000, metadata=_help(
        "most frequent training words kept (0 or None: all)"))
    arch: str = field(default="lstm", metadata=_help(
        "the model family: 'lstm' (the paper's LM) or 'transformer' "
        "(sparsemoe.models.MoETransformer)", choices=tuple(ARCHITECTURES)))
    preset: str | None = "MoE-32"  # a preset of the arch, or None for its config's defaults
    model: dict = field(default_factory=dict)  # model config field overrides
    batch_size: int = field(default=32, metadata=_help("parallel streams"))
    bptt: int = field(default=35, metadata=_help("time steps per batch"))
    lr: float = field(default=2e-3, metadata=_help(
        "peak learning rate (the paper does not give one)"))
    warmup: int = field(default=200, metadata=_help("linear warm-up steps (paper: 1000)"))
    clip: float = field(default=1.0, metadata=_help("gradient-norm clipping"))
    optimizer: str | None = field(default=None, metadata=_help(
        "'factored-adam': Appendix D's Adam (β1 = 0, factored second moment); None: the "
        "arch's (adam for lstm, adamw for transformer)", choices=OPTIMIZERS))
    schedule: str | None = field(default=None, metadata=_help(
        "'rsqrt' (Appendix C.1) or 'cosine' (to lr/10); None: the arch's (rsqrt for lstm, "
        "cosine for transformer)", choices=SCHEDULES))
    decay_steps: int | None = field(default=None, metadata=_help(
        "steps of the cosine decay (None: steps)"))
    weight_decay: float = field(default=0.1, metadata=_help(
        "AdamW's, on the parameters of 2 or more dimensions"))
    autocast: bool = field(default=False, metadata=_help(
        "bfloat16 autocast of the training forward pass"))
    steps: int | None = field(default=1000, metadata=_help(
        "training steps (None: until time_budget)"))
    time_budget: float | None = field(default=None, metadata=_help(
        "seconds of training, checked after each step"))
    eval_every: int = field(default=200, metadata=_help(
        "steps between validations (and checkpoints)"))
    eval_tokens: int | None = field(default=20_000, metadata=_help(
        "validation tokens for the periodic checks (the final one uses all)"))
    seed: int = field(default=0, metadata=_help("random seed"))
    out: str = field(default="runs/lm", metadata=_help("run directory"))

    def __post_init__(self) -> None:
        if self.steps is None and self.time_budget is None:
            raise ValueError("give steps or time_budget (or both), got neither")
        spec = architecture(self.arch)
        self.optimizer = self.optimizer or spec.optimizer
        self.schedule = self.schedule or spec.schedule
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        if self.preset is not None:
            spec.check_preset(self.preset)
        if self.vocab_size == 0:
            self.vocab_size = None
        for name in ("batch_size", "bptt", "warmup", "eval_every"):
            check_int(name, getattr(self, name))
        for name in ("steps", "vocab_size", "eval_tokens", "decay_steps"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name))
        check_int("seed", self.seed, minimum=0)
        check_number("lr", self.lr, low=0, high=math.inf, low_open=True, high_open=True)
        check_number("clip", self.clip, low=0, high=math.inf, low_open=True)
        check_number("weight_decay", self.weight_decay, low=0, high=math.inf, high_open=True)
        if not isinstance(self.autocast, bool):
            raise TypeError(f"autocast must be a bool, got {self.autocast!r}")
        if self.time_budget is not None:
            check_number("time_budget", self.time_budget, low=0, high=math.inf, low_open=True,
                         high_open=True)
        self.corpus = tuple(self.corpus)

    def model_config(self, vocab_size: int) -> object:
        """The arch's model config: the preset's, with ``model``'s overrides, the corpus's
        vocabulary size (and ``bptt`` as the Transformer's context)."""
        return architecture(self.arch).model_config(self.preset, self.model, vocab_size,
                                                    self.bptt)


def lr_factor(step: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then ∝ step^-1/2 (Appendix C.1)."""
    s = step + 1
    return min(s / warmup, math.sqrt(warmup / s))


def cosine_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then a cosine decay to ``floor`` at step
    ``total`` (nanoGPT: min_lr = lr/10): ``floor + (1 − floor)·(1 + cos(π·p))/2`` with ``p``
    the fraction of the decay done."""
    s = step + 1
    if s <= warmup:
        return s / warmup
    p = min(1.0, (s - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def _lr_schedule(cfg: LMTrainConfig):
    """The learning-rate factor of step ``s`` for ``cfg.schedule``."""
    if cfg.schedule == "rsqrt":
        return lambda s: lr_factor(s, cfg.warmup)
    total = cfg.decay_steps or cfg.steps
    if total is None:
        raise ValueError("schedule 'cosine' decays over the training steps: give steps or "
                         "decay_steps, or schedule 'rsqrt' with only a time budget; got "
                         "steps=None")
    return lambda s: cosine_factor(s, cfg.warmup, total)


def latest_checkpoint(run_dir: str | Path) -> tuple[dict, Path | None] | None:
    """The later checkpoint of a run directory, ``checkpoint.pt`` or the distributed
    ``checkpoint/`` (the latter on a tie): ``(dictionary, None)`` for the file (every key of
    :data:`CHECKPOINT_KEYS`), ``(extra values, folder)`` for the folder (:data:`EXTRA_KEYS`;
    the model and optimiser load from its shards); None where there is neither.

    Raises:
        RunError: a checkpoint is corrupt or lacks keys.
    """
    run_dir = Path(run_dir)
    found = []
    if (run_dir / CHECKPOINT).exists():
        found.append((runs.load_checkpoint(run_dir / CHECKPOINT, CHECKPOINT_KEYS), None))
    folder = sharded_checkpoint_path(run_dir / SHARDED_CHECKPOINT)
    if folder is not None:
        try:
            extra = sharded_checkpoint_extra(folder)
        except RuntimeError as e:  # extra.pt corrupt or without its checksum
            raise runs.RunError(str(e)) from e
        missing = [k for k in EXTRA_KEYS if k not in extra]
        if missing:
            raise runs.RunError(f"{folder} is not a checkpoint of this kind: it lacks {missing}")
        found.append((extra, folder))
    return max(found, key=lambda f: (f[0]["step"], f[1] is not None)) if found else None


def _optimizer(model: torch.nn.Module, cfg: LMTrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``model``'s parameters."""
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    if cfg.optimizer == "factored-adam":
        return FactoredAdam(param_groups(model), lr=cfg.lr)
    if cfg.optimizer == "adamw":
        return _adamw(model, cfg, fused=not sharded)
    # fused: one pass per parameter, faster than the foreach implementation for the large
    # expert banks (BENCHMARKS.md); not for DTensors
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=not sharded)


def _adamw(model: torch.nn.Module, cfg: LMTrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW (β2 = 0.95) with weight decay on the matrices and expert banks (dimension ≥ 2),
    none on norms and biases, as nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


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
    moe = [m for m in model.modules() if isinstance(m, MoEModule)]
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
    return {"nll": mean, "perplexity": runs.perplexity(mean), "tokens": int(count),
            "tokens_per_expert": [t.tolist() for t in load if isinstance(t, Tensor)]}


def load_statistics(tokens_per_expert: list[list[int]]) -> dict:
    """CV and max/mean of the per-expert token counts of the first MoE layer (as in
    :class:`~sparsemoe.MoEStats`)."""
    if not tokens_per_expert:
        return {}
    t = torch.tensor(tokens_per_expert[0], dtype=torch.float64)
    return {"cv_load": coefficient_of_variation(t), "max_over_mean_load": max_over_mean(t),
            "experts_unused": int((t == 0).sum())}


def _si(value: float, unit: str) -> str:
    """``value`` with a decimal prefix: 1.3kB, 45.0M."""
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{prefix}{unit}"
    return f"{value:.0f}{unit}"


def _corpus_key(source: str) -> str:
    """A corpus source independent of how its path was written: files and folders by their
    resolved location (``1b-word=ROOT`` by ROOT's), names as they are."""
    name, sep, root = source.partition("=")
    if sep and name == "1b-word":
        return f"1b-word={Path(root).resolve()}"
    return str(Path(source).resolve()) if os.path.exists(source) else source


def resume_key(cfg: LMTrainConfig | dict) -> dict:
    """The configuration fields a checkpoint must share with a run that resumes it: all but
    the run directory and the length of training, with corpus paths normalised."""
    d = dict(asdict(cfg) if isinstance(cfg, LMTrainConfig) else cfg)
    for name in ("out", "steps", "time_budget"):
        d.pop(name, None)
    d["corpus"] = tuple(_corpus_key(c) for c in d.get("corpus", ()))
    return d


class Trainer(runs.TrainingRun):
    """One training run: ``Trainer(cfg).run()`` → metrics (also in ``cfg.out/metrics.json``);
    the loop is :class:`~sparsemoe.experiments.runs.TrainingRun`'s.

    If ``cfg.out`` holds a checkpoint of the same configuration, the run resumes from it,
    whatever the number of processes that wrote it. ``processes`` spreads the run over
    several (:class:`~sparsemoe.experiments.processes.ExpertParallelRanks`); every one of them
    then calls :meth:`run`, and only rank 0 shows progress and writes files.
    """

    def __init__(self, cfg: LMTrainConfig, corpus: Corpus | None = None,
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
        latest = latest_checkpoint(self.out)
        self.ckpt, self.ckpt_folder = latest if latest is not None else (None, None)
        if self.ckpt is not None:
            ckpt_path = self.ckpt_folder or self.out / CHECKPOINT
            changed = runs.config_differences(resume_key(self.ckpt["config"]), resume_key(cfg))
            if changed:
                raise runs.RunError(f"{ckpt_path} was written by a different configuration "
                                    f"({'; '.join(changed)}); use another run directory "
                                    f"(out) or the same settings")
            saved_capacity = self.ckpt.get("exchange_capacity")
            if saved_capacity != processes.exchange_capacity:  # allowed: equal if none dropped
                warnings.warn(f"{ckpt_path} was trained with exchange_capacity "
                              f"{saved_capacity} and resumes with "
                              f"{processes.exchange_capacity}: the rows the padded exchange "
                              f"drops can differ from the saved run's", stacklevel=2)
            saved = self.ckpt["config"]
            if saved.get("schedule") == "cosine" and saved.get("decay_steps") is None and \
                    saved.get("steps") != cfg.steps:
                raise runs.RunError(f"{ckpt_path} decays its learning rate over its steps "
                                    f"({saved.get('steps')}, cosine); resume with the same "
                                    f"steps, or give decay_steps to both runs, got "
                                    f"steps={cfg.steps}")
            vocab = Vocabulary(self.ckpt["vocab"])
            corpus = corpus if corpus is not None and corpus.vocab.words == vocab.words else \
                processes.root_first(lambda: load_corpus(cfg.corpus, vocab=vocab))
        self.corpus = corpus if corpus is not None else \
            processes.root_first(lambda: load_corpus(cfg.corpus, cfg.vocab_size))
        torch.manual_seed(cfg.seed)
        self.model_cfg = cfg.model_config(len(self.corpus.vocab))
        self.model = processes.prepare(build_model(cfg.arch, self.model_cfg))
        self.opt = _optimizer(self.model, cfg)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_schedule(cfg))
        self.batcher = StreamBatcher(self.corpus.train, cfg.batch_size, cfg.bptt, cfg.seed)
        self.state = None
        self.step = 0
        self.train_seconds = 0.0
        self.history: dict[str, list] = {"step": [], "train_loss": [], "valid_step": [],
                                         "valid_perplexity": [], "valid_seconds": []}
        # this invocation's expert-parallel exchanges (summed over steps and layers); rows
        # dropped by a padded exchange's capacity, of the rows routed
        self.exchange = {"steps": 0, "bytes_sent": 0, "expert_multiply_adds": 0,
                         "dropped_rows": 0, "routed_rows": 0}
        if self.ckpt is not None:
            self._restore(self.ckpt)

    def _restore(self, ck: dict) -> None:
        if self.ckpt_folder is None and self.processes.sharded:
            self.ckpt_folder = self._shard_single_file(ck)
        if self.ckpt_folder is not None:
            load_sharded_checkpoint(self.ckpt_folder, self.model, self.opt)
        else:
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.batcher.load_state_dict(ck["data"])
        rng = ck["rng"]
        self.processes.set_rng_states(rng if isinstance(rng, list) else [rng])  # one process's
        state = ck["recurrent_state"]  # per LSTM (h, c), each [1, B, d]: this rank's streams
        self.state = None if state is None else \
            tuple(tuple(self.processes.shard(t, dim=1) for t in layer) for layer in state)
        self.step, self.train_seconds, self.history = ck["step"], ck["train_seconds"], \
            ck["history"]

    def _shard_single_file(self, ck: dict) -> Path:
        """``checkpoint.pt`` rewritten as the distributed ``checkpoint/`` by rank 0 (a model
        and an optimiser on one process load it and save their state as shards), for a run on
        a mesh to load its shards from."""
        folder = self.out / SHARDED_CHECKPOINT
        if self.root:
            whole = build_model(self.cfg.arch, self.model_cfg)
            opt = _optimizer(whole, self.cfg)
            whole.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            save_sharded_checkpoint(folder, whole, opt,
                                    extra={k: ck[k] for k in EXTRA_KEYS})
        dist.barrier()
        return folder

    @property
    def checkpoint_path(self) -> Path:
        return self.out / (SHARDED_CHECKPOINT if self.processes.sharded else CHECKPOINT)

    def save(self) -> None:
        """Write the checkpoint in the single-process layout: ``checkpoint.pt`` from one
        process, the distributed ``checkpoint/`` from a mesh (every process must call it).

        Raises:
            RunError: a parameter is not finite; the last good checkpoint is kept.
        """
        finite = all(bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all())
                     for p in self.model.parameters())
        if float(self.processes.sum(torch.tensor(float(not finite)))) > 0:  # any rank's experts
            raise runs.RunError(f"a parameter is not finite at step {self.step}: training "
                                f"diverged and stopped; the last good checkpoint "
                                f"{self.checkpoint_path} is kept")
        state = None if self.state is None else tuple(
            tuple(self.processes.gather_streams(t, dim=1).cpu() for t in layer)
            for layer in self.state)
        extra = {
            "config": asdict(self.cfg), "model_config": asdict(self.model_cfg),
            "vocab": self.corpus.vocab.words, "scheduler": self.sched.state_dict(),
            "data": self.batcher.state_dict(), "rng": self.processes.rng_states(),
            "recurrent_state": state, "step": self.step, "train_seconds": self.train_seconds,
            "history": self.history, "exchange_capacity": self.processes.exchange_capacity,
        }
        if self.processes.sharded:
            save_sharded_checkpoint(self.out / SHARDED_CHECKPOINT, self.model, self.opt, extra)
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            runs.save_checkpoint(self.out / CHECKPOINT, {
                **extra, "model": self.model.state_dict(), "optimizer": self.opt.state_dict()})

    def train_step(self) -> float:
        """One optimiser step; returns the cross-entropy of the whole batch (without the
        auxiliary loss)."""
        inputs, targets = map(self.processes.shard, self.batcher.next())  # this rank's streams
        if self.batcher.epoch_start:
            self.state = None
        with torch.autocast(inputs.device.type, torch.bfloat16, enabled=self.cfg.autocast):
            logits, state = self.model(inputs, self.state)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss = ce + aux_loss(self.model) if self.model.moe_layers() else ce
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.processes.clip_grad_norm_(self.model, self.cfg.clip)
        self.opt.step()
        if getattr(self.model_cfg, "balancing", None) == "aux-free":  # the bias step, over
            update_expert_biases(self.model,  # every rank's load
                                 dist.group.WORLD if self.processes.world_size > 1 else None)
        self.sched.step()
        self.state = tuple((h.detach(), c.detach()) for h, c in state)
        for stats in exchange_stats(self.model):
            self.exchange["bytes_sent"] += stats.step_bytes_sent
            self.exchange["expert_multiply_adds"] += stats.step_expert_multiply_adds or 0
            if stats.routed_rows is not None:
                self.exchange["dropped_rows"] += int(stats.dropped_rows)
                self.exchange["routed_rows"] += int(stats.routed_rows)
        self.exchange["steps"] += 1
        return self.processes.sum(ce.detach()).item() / self.processes.world_size

    def validate(self, max_tokens: int | None) -> dict:
        return evaluate(self.model, self.corpus.valid, self.cfg.batch_size, self.cfg.bptt,
                        max_tokens, self.processes)

    def exchange_per_step(self) -> dict:
        """Expert parallelism's traffic per training step and rank, averaged over this
        invocation's steps and the ranks, next to the experts' multiply-adds (empty without
        expert-parallel layers). Their ratio is the paper's compute-to-I/O argument (§3.2).
        With a padded exchange (``exchange_capacity``) also the rows its capacity dropped,
        summed over the steps, layers and ranks, and their fraction of the rows routed."""
        exchanged = exchange_stats(self.model)
        if not exchanged:
            return {}
        keys = ("bytes_sent", "expert_multiply_adds", "dropped_rows", "routed_rows")
        totals = self.processes.sum(torch.tensor([self.exchange[k] for k in keys],
                                                 dtype=torch.float64)).cpu()
        sent, madds = (totals[:2] / self.processes.world_size
                       / max(self.exchange["steps"], 1)).tolist()
        out = {"world_size": self.processes.world_size, "bytes_sent_per_step": sent,
               "expert_multiply_adds_per_step": madds,
               "multiply_adds_per_byte_sent": madds / sent if sent else None,
               "compute_to_io": exchanged[0].compute_to_io}
        if exchanged[0].routed_rows is not None:
            dropped, routed = totals[2:].tolist()
            out.update(dropped_rows=int(dropped), routed_rows=int(routed),
                       drop_fraction=dropped / routed if routed else 0.0)
        return out

    @property
    def eval_limit(self) -> int | None:
        return self.cfg.eval_tokens

    @property
    def tokens_trained(self) -> int:
        return self.step * self.cfg.batch_size * self.cfg.bptt

    def progress_extras(self) -> dict[str, str]:
        exchanged = exchange_stats(self.model)
        if not exchanged:
            return {}
        extras = {"sent": _si(sum(e.step_bytes_sent for e in exchanged), "B"),  # this rank's
                  "expert madds": _si(sum(e.step_expert_multiply_adds or 0  # last step
                                          for e in exchanged), "")}
        if exchanged[0].routed_rows is not None:  # the padded exchange's drops, last step
            routed = sum(int(e.routed_rows) for e in exchanged)
            dropped = sum(int(e.dropped_rows) for e in exchanged)
            extras["dropped"] = f"{100 * dropped / max(routed, 1):.1f}%"
        return extras

    def stop_requested(self, stop: runs.StopSignals) -> bool:
        return float(self.processes.sum(torch.tensor(float(stop.signum is not None)))) > 0

    def finish(self) -> dict:
        """Full validation and test evaluation; writes and returns ``metrics.json``."""
        c = self.cfg
        valid = self.validate(None)
        test = evaluate(self.model, self.corpus.test, c.batch_size, c.bptt,
                        processes=self.processes)
        spec = architecture(c.arch)
        with torch.device("meta"):  # the whole model's counts, however its experts are spread
            counts = spec.parameter_counts(spec.build(self.model_cfg))
        metrics = {
            "preset": c.preset, "arch": c.arch, "corpus": self.corpus.name,
            "valid_perplexity": valid["perplexity"], "test_perplexity": test["perplexity"],
            "steps": self.step, "tokens_trained": self.tokens_trained,
            "train_seconds": self.train_seconds,
            "tokens_per_second": self.step * c.batch_size * c.bptt / max(self.train_seconds,
                                                                          1e-9),
            "params_total": counts["total"], "params_body": counts["body"],
            "params_active_per_token": counts["active_per_token"],
            "multiply_adds_per_token": spec.multiply_adds_per_token(self.model_cfg, False),
            "multiply_adds_per_token_training": spec.multiply_adds_per_token(self.model_cfg, True),
            "num_experts": spec.num_experts(self.model_cfg),
            "load": load_statistics(valid["tokens_per_expert"]),
            "valid_tokens_per_expert": valid["tokens_per_expert"],
            "exchange": self.exchange_per_step(),
            "history": self.history, "config": asdict(c), "model_config": asdict(self.model_cfg),
        }
        if self.root:
            self.out.mkdir(parents=True, exist_ok=True)
            runs.write_json(self.out / METRICS, metrics)
        return metrics


def load_trained(checkpoint_dir: str | Path) -> tuple[torch.nn.Module, dict]:
    """The model saved in a run directory (its later checkpoint, :func:`latest_checkpoint`)
    on one process, and the checkpoint dictionary (without model and optimiser for a
    distributed checkpoint)."""
    latest = latest_checkpoint(checkpoint_dir)
    if latest is None:
        raise FileNotFoundError(f"checkpoint: no {CHECKPOINT} or {SHARDED_CHECKPOINT}/ in "
                                f"{checkpoint_dir}")
    ck, folder = latest
    arch = ck["config"].get("arch", "lstm")
    model = build_model(arch, architecture(arch).config(**ck["model_config"]))
    if folder is None:
        model.load_state_dict(ck["model"])
    else:
        load_sharded_checkpoint(folder, model)
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


def __getattr__(name: str) -> object:
    """``TrainConfig``: the deprecated name of :class:`LMTrainConfig`."""
    if name == "TrainConfig":
        return deprecated_alias(__name__, name, "LMTrainConfig", LMTrainConfig)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

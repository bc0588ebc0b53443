"""A decoder-only Transformer with MoE feed-forward layers, in the nanoGPT spirit.

token embedding → n_layers × Block → norm → linear head, with pre-norm residual blocks

    x ← x + Attention(Norm(x))    causal multi-head attention (F.scaled_dot_product_attention)
    x ← x + FFN(Norm(x))          dense, or an MoE layer every ``moe_every`` layers

Norm is RMSNorm (Zhang & Sennrich 2019) or LayerNorm; positions are rotary (RoPE, Su et al.
2021, in the "rotate half" layout of LLaMA and Mixtral) or learned. Nothing has a bias. The MoE
layers are :class:`sparsemoe.MoELayer` with the library's routers and expert banks; the dense
feed-forward is one expert of the same bank (:class:`sparsemoe.FeedForwardExperts`), so a dense
model and its MoE twin differ only in the routing.

Presets (:data:`PRESETS`) at CPU scale are named after the systems; every MoE preset has a
compute-matched dense twin (:func:`dense_twin`): the experts' hidden width is the dense FFN's
divided by the experts each token uses (``hidden = ffn_hidden / k``, the fine-grained matching
of DBRX and DeepSeekMoE), so a token costs the same multiply-adds in both, plus the router's
``d·n`` (:func:`multiply_adds_per_token`).

Causality: attention is causal. Routing is per token, so a token-choice router without a
capacity (``mixtral``, ``dbrx``, ``glam``) is causal. A capacity makes a token's fate depend on
the tokens that compete with it first: it stays causal only for top-1 routing (``switch``) with
one capacity per sequence and position order (the earlier tokens of the sequence fill the
expert first). With ``k ≥ 2`` (``gshard``), the second choices wait for the first choices of the
whole sequence, later tokens included; with the ``"priority"`` policy (Batch Prioritized
Routing), tokens are ordered by gate value, not position; with ``group="batch"`` the sequences
share a capacity; and expert choice (``expert-choice``) picks tokens by comparing them all.
Those models see (a little of) the future in training and cannot be run token by token at
inference as they were trained (the expert-choice paper says so of its own method).

Index letters: ``B`` batch, ``L`` time, ``d`` width, ``H`` heads, ``V`` vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_int
from ..capacity import Capacity
from ..dispatch import equal_routes
from ..experts import EXPERT_ACTIVATIONS, FeedForwardExperts
from ..layers import MoELayer
from ..routers import ExpertChoiceRouter, GShardRouter, SwitchRouter, TopKRouter

ROUTERS = ("none", "switch", "gshard", "top-k", "expert-choice")
NORMS = ("rms", "layer")
POSITIONS = ("rotary", "learned")
# the fields that only describe the MoE layers (a dense model has them at their defaults)
ROUTING_FIELDS = ("router", "num_experts", "k", "hidden", "moe_every", "capacity_factor",
                  "capacity_group", "capacity_policy", "w_switch", "w_z")


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 10_000
    d_model: int = 64  # residual width
    n_layers: int = 4
    n_heads: int = 4
    context: int = 64  # longest sequence (learned positions) and the L of the compute count
    ffn_hidden: int = 256  # dense feed-forward hidden width (4·d)
    activation: str = "gelu"  # FFN and expert activation, one of EXPERT_ACTIVATIONS
    norm: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm without bias)
    positions: str = "rotary"  # "rotary" or "learned"
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0  # on the attention probabilities and on each residual branch
    tie_embeddings: bool = True  # the head shares the token embedding matrix
    router: str = "none"  # one of ROUTERS; "none" is the dense Transformer
    num_experts: int = 1
    k: int = 1  # experts per token ("top-k")
    hidden: int | None = None  # expert hidden width (None: ffn_hidden / experts_per_token)
    moe_every: int = 1  # an MoE FFN in layers moe_every-1, 2·moe_every-1, ... (1: every layer)
    capacity_factor: float | None = None  # None: dropless (expert choice: its c)
    capacity_group: str = "sequence"  # Capacity.group
    capacity_policy: str = "position"  # Capacity.policy ("priority": Batch Prioritized Routing)
    w_switch: float = 1e-2  # Switch load-balancing loss α (Fedus et al. 2021, eq. 4)
    w_z: float = 0.0  # router z-loss (Zoph et al. 2022, eq. 5)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "context", "ffn_hidden",
                     "num_experts", "k", "moe_every"):
            check_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads "
                             f"({self.n_heads})")
        for name, allowed in (("router", ROUTERS), ("norm", NORMS), ("positions", POSITIONS),
                              ("activation", EXPERT_ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.positions == "rotary" and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"rotary positions need an even head width, got d_model / n_heads "
                             f"= {self.d_model // self.n_heads}")
        if self.router == "expert-choice" and self.capacity_factor is None:
            raise ValueError("router 'expert-choice' needs capacity_factor (its c, paper: 2), "
                             "got None")
        if self.router != "none" and self.hidden is None and \
                self.ffn_hidden % self.experts_per_token:
            raise ValueError(f"ffn_hidden ({self.ffn_hidden}) must be divisible by the experts "
                             f"per token ({self.experts_per_token}) for compute-matched experts; "
                             f"or give hidden")

    @property
    def experts_per_token(self) -> float:
        """Experts a token uses on average: ``k``; 1 for Switch, 2 for GShard (its second
        expert counted, as in evaluation); expert choice: its capacity factor ``c``."""
        return {"none": 0, "switch": 1, "gshard": 2, "top-k": self.k,
                "expert-choice": self.capacity_factor}[self.router]

    @property
    def expert_hidden(self) -> int:
        """The experts' hidden width (``hidden``, or ``ffn_hidden / experts_per_token``)."""
        if self.hidden is not None:
            return self.hidden
        return int(self.ffn_hidden // self.experts_per_token)

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer ``i`` (from 0) has an MoE feed-forward."""
        return self.router != "none" and i % self.moe_every == self.moe_every - 1


# At CPU scale: d = 64, 4 layers of 4 heads, FFN 4·d. Each MoE preset's experts are its dense
# twin's FFN split by the experts a token uses, so both cost the same multiply-adds per token.
PRESETS: dict[str, dict] = {
    "dense": {},
    "dense-swiglu": {"activation": "swiglu", "ffn_hidden": 192},  # 3·d, as LLaMA's 8d/3
    # Switch Transformer: top-1, capacity factor 1.25, α = 0.01, z-loss, float32 router
    "switch-8": {"router": "switch", "num_experts": 8, "capacity_factor": 1.25, "w_z": 1e-3},
    # GShard: top-2 with the random second expert, every other layer, group capacity 2N/(G·E)
    "gshard-8": {"router": "gshard", "num_experts": 8, "moe_every": 2, "capacity_factor": 1.0},
    # GLaM: top-2 every other layer (dropless here)
    "glam-8": {"router": "top-k", "num_experts": 8, "k": 2, "moe_every": 2},
    # Mixtral: top-2 of 8, renormalised, SwiGLU, every layer
    "mixtral-8": {"router": "top-k", "num_experts": 8, "k": 2, "activation": "swiglu",
                  "ffn_hidden": 192},
    # Mixtral's routing and experts with 4× the experts (and parameters) at the same compute
    "mixtral-32": {"router": "top-k", "num_experts": 32, "k": 2, "activation": "swiglu",
                   "ffn_hidden": 192},
    # DBRX: top-4 of 16 fine-grained experts
    "dbrx-16": {"router": "top-k", "num_experts": 16, "k": 4, "activation": "swiglu",
                "ffn_hidden": 192},
    # Expert choice: each expert takes its top c·T/n tokens, c = 2 (not causal)
    "expert-choice-8": {"router": "expert-choice", "num_experts": 8, "capacity_factor": 2.0,
                        "w_switch": 0.0},
}
PRESET_SETS = {
    "quick": ("dense", "switch-8", "gshard-8", "dense-swiglu", "mixtral-8", "dbrx-16"),
    # the main job: 1, 8 and 16 SwiGLU experts at the same multiply-adds per token
    "experts": ("dense-swiglu", "mixtral-8", "dbrx-16"),
    "all": tuple(PRESETS),
}


def check_preset(name: object) -> str:
    """``name`` must be one of :data:`PRESETS` (the one place presets are validated)."""
    return check_choice("preset", name, tuple(PRESETS))


def preset(name: str, **overrides) -> TransformerConfig:
    """The :class:`TransformerConfig` of a named preset, with field overrides."""
    check_preset(name)
    return TransformerConfig(**{**PRESETS[name], **overrides})


def dense_twin(cfg: TransformerConfig) -> TransformerConfig:
    """The compute-matched dense model of an MoE config: every FFN dense with ``ffn_hidden``.

    Raises:
        ValueError: when the experts are not ``ffn_hidden / experts_per_token`` wide (then no
            dense model of the same shape does the same multiply-adds).
    """
    if cfg.router != "none" and cfg.expert_hidden * cfg.experts_per_token != cfg.ffn_hidden:
        raise ValueError(f"the experts (hidden {cfg.expert_hidden} × {cfg.experts_per_token} per "
                         f"token) must add up to ffn_hidden = {cfg.ffn_hidden} for a "
                         f"compute-matched dense twin")
    default = TransformerConfig()
    return replace(cfg, **{name: getattr(default, name) for name in ROUTING_FIELDS})


def twin_preset(name: str) -> str:
    """The name of a preset's compute-matched dense twin among :data:`PRESETS`."""
    twin = dense_twin(preset(name))
    for other in PRESETS:
        if preset(other) == twin:
            return other
    raise ValueError(f"preset {name!r} has no dense twin among the presets")


def multiply_adds_per_token(cfg: TransformerConfig, training: bool = False) -> float:
    """Multiply-adds per token outside the embedding and the head (as the LSTM LM's count).

    Per layer: the projections ``4·d²`` (q, k, v, output); attention ``(L+1)·d`` — the scores
    ``q·k`` and the weighted sum of ``v`` over the ``t`` visible positions cost ``2·t·d`` at
    position ``t``, averaged over ``t = 1..L`` with ``L = context``; the FFN ``f·d·h`` with
    ``f = 2`` (``f = 3`` for a gated activation, whose first matrix is ``2h`` wide). An MoE
    layer: the router ``d·n`` plus ``experts_per_token`` expert FFNs of width ``hidden``.
    Norms, biases and element-wise operations are not counted. ``training`` is accepted for the
    trainer's interface: the count is the same (GShard's second expert is counted always).
    """
    d = cfg.d_model

    def ffn(hidden: int) -> int:
        with torch.device("meta"):
            return FeedForwardExperts(1, d, hidden, activation=cfg.activation) \
                .multiply_adds_per_row

    total = 0.0
    for i in range(cfg.n_layers):
        total += 4 * d * d + (cfg.context + 1) * d
        if cfg.is_moe_layer(i):
            total += d * cfg.num_experts + cfg.experts_per_token * ffn(cfg.expert_hidden)
        else:
            total += ffn(cfg.ffn_hidden)
    return total


class DenseFeedForward(nn.Module):
    """The dense FFN: one expert of a :class:`~sparsemoe.FeedForwardExperts` bank applied to
    every token, ``act(x·w1)·w2``. Shape: ``[..., d] -> [..., d]``."""

    def __init__(self, d_model: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.bank = FeedForwardExperts(1, d_model, hidden, activation=activation)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return self.bank(rows, equal_routes(1, rows.shape[0], x.device)).view_as(x)


def moe_feed_forward(cfg: TransformerConfig) -> MoELayer:
    """The MoE FFN of a config: its router, ``num_experts`` experts of width
    ``expert_hidden``, and its capacity."""
    d, n = cfg.d_model, cfg.num_experts
    if cfg.router == "switch":
        router = SwitchRouter(d, n, w_switch=cfg.w_switch, w_z=cfg.w_z)
    elif cfg.router == "gshard":
        router = GShardRouter(d, n, w_switch=cfg.w_switch, w_z=cfg.w_z)
    elif cfg.router == "top-k":
        router = TopKRouter(d, n, cfg.k, w_switch=cfg.w_switch, w_z=cfg.w_z)
    else:
        router = ExpertChoiceRouter(d, n, capacity_factor=cfg.capacity_factor,
                                    w_switch=cfg.w_switch, w_z=cfg.w_z)
    capacity = None
    if cfg.capacity_factor is not None and cfg.router != "expert-choice":
        capacity = Capacity(factor=cfg.capacity_factor, group=cfg.capacity_group,
                            policy=cfg.capacity_policy)
    bank = FeedForwardExperts(n, d, cfg.expert_hidden, activation=cfg.activation)
    return MoELayer(router, bank, capacity=capacity)


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension's halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding: channel pair ``(j, j + D/2)`` of a head of width ``D`` is
    rotated by ``t·θ^(-2j/D)`` at position ``t``: ``x·cos + rotate_half(x)·sin``."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, length: int) -> tuple[Tensor, Tensor]:
        """``cos, sin [L, D]``."""
        t = torch.arange(length, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


class SelfAttention(nn.Module):
    """Multi-head self-attention, causal unless ``causal=False`` (the ViT's encoder blocks).
    ``forward(x [B, L, d], rope (cos, sin) or None) -> [B, L, d]``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, causal: bool = True) -> None:
        super().__init__()
        self.n_heads, self.dropout, self.causal = n_heads, dropout, causal
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)  # [W_q | W_k | W_v]
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        b, length, d = x.shape
        q, k, v = (t.view(b, length, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for t in self.qkv(x).split(d, dim=-1))  # each [B, H, L, d/H]
        if rope is not None:
            cos, sin = (t.to(q.dtype) for t in rope)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, length, d))


def make_norm(cfg: TransformerConfig) -> nn.Module:
    if cfg.norm == "rms":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)


class Block(nn.Module):
    """A pre-norm block: ``x + Attention(Norm(x))``, then ``x + FFN(Norm(x))``."""

    def __init__(self, cfg: TransformerConfig, ffn: nn.Module, causal: bool = True) -> None:
        super().__init__()
        self.norm1, self.norm2 = make_norm(cfg), make_norm(cfg)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout, causal)
        self.ffn = ffn
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope))
        return x + self.drop(self.ffn(self.norm2(x)))  # an MoE layer takes the [B, L] block


def feed_forward(cfg: TransformerConfig, i: int,
                 moe_layer: Callable[[int], nn.Module] | None = None) -> nn.Module:
    """Layer ``i``'s FFN: ``moe_layer(i)`` or :func:`moe_feed_forward` where the config puts
    an MoE layer, else a :class:`DenseFeedForward`."""
    if moe_layer is not None and cfg.is_moe_layer(i):
        return moe_layer(i)
    if cfg.is_moe_layer(i):
        return moe_feed_forward(cfg)
    return DenseFeedForward(cfg.d_model, cfg.ffn_hidden, cfg.activation)


def init_weights(model: nn.Module, n_layers: int) -> None:
    """GPT-2's initialisation: weights N(0, 0.02); the matrices that write into the residual
    stream (attention output, FFN second matrix) N(0, 0.02/√(2·n_layers)); norms at 1. Router
    gates keep their own (Switch's reduced-scale) initialisation."""
    residual_std = 0.02 / math.sqrt(2 * n_layers)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = residual_std if name.endswith("attn.proj") else 0.02
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, FeedForwardExperts):
            nn.init.normal_(module.w1, std=0.02)
            nn.init.normal_(module.w2, std=residual_std)


class MoETransformer(nn.Module):
    """A decoder-only Transformer language model with MoE feed-forward layers.

    Args:
        cfg: a :class:`TransformerConfig` (or a preset: :func:`preset`).
        moe_layer: optional ``i -> module`` building layer ``i``'s MoE FFN from any sparsemoe
            router and expert bank (e.g. ``MoELayer(routers.HashRouter(...), bank)``);
            by default the config's router (:func:`moe_feed_forward`). Their expert banks
            are initialised with the rest of the model (:func:`init_weights`).

    ``forward(tokens [B, L], state=None) -> (logits [B, L, V], ())``: ``L ≤ context`` with
    learned positions. Each call is its own context; ``state`` is accepted and an empty state
    returned so that the recurrent LM trainer (:mod:`sparsemoe.experiments.lm`) drives it
    unchanged. ``sparsemoe.aux_loss(model)`` sums the MoE layers' auxiliary losses.
    """

    def __init__(self, cfg: TransformerConfig,
                 moe_layer: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model) if cfg.positions == "learned" else None
        self.rotary = Rotary(cfg.d_model // cfg.n_heads, cfg.rope_theta) \
            if cfg.positions == "rotary" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, feed_forward(cfg, i, moe_layer))
                                    for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.n_layers)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor, state: tuple = ()) -> tuple[Tensor, tuple]:
        length = tokens.shape[-1]
        if self.pos is not None and length > self.cfg.context:
            raise ValueError(f"tokens has length {length} but the learned positions cover "
                             f"context = {self.cfg.context}")
        x = self.embed(tokens)  # [B, L, d]
        if self.pos is not None:
            x = x + self.pos.weight[:length]
        rope = self.rotary(length) if self.rotary is not None else None
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope)
        return self.head(self.norm(x)), ()

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]


def parameter_counts(model: MoETransformer) -> dict[str, int]:
    """``total``; ``body``: outside the token embedding, positions and head (as the LSTM LM's
    Table 7 "params"); ``active_per_token``: body parameters one token uses (its experts)."""
    total = sum(p.numel() for p in model.parameters())
    edges = sum(p.numel() for m in (model.embed, model.pos, model.head) if m is not None
                for p in m.parameters())
    if model.cfg.tie_embeddings:
        edges -= model.head.weight.numel()  # counted once in total
    body = total - edges
    active = body
    for moe in model.moe_layers():
        per_expert = sum(p.numel() for p in moe.experts.parameters()) // moe.num_experts
        active -= round(per_expert * (moe.num_experts - model.cfg.experts_per_token))
    return {"total": total, "body": body, "active_per_token": active}

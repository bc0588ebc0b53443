"""The language model of Shazeer et al. (2017), Appendix C.1, and its compute-matched baselines.

embedding → LSTM → MoE → LSTM → softmax. Every layer but the softmax has dropout on its output,
and the layer's input is added back after the dropout (a residual). The MoE output passes
through a sigmoid before the dropout. Experts: one ReLU hidden layer and a linear output. The
MoE is applied to the whole batch × time block at once (the paper's "convolutional" use).

The middle layer is what the Table 7 rows vary (``LMConfig.middle``):

- ``"moe"``: a flat MoE of ``num_experts`` experts, ``k`` per token (MoE-4 has k = n = 4: all
  four always used; MoE-1-Wide is one expert of hidden ``k·h``);
- ``"hmoe"``: the hierarchical MoE of Appendix B, ``groups`` × ``num_experts/groups``;
- ``"deep"``: MoE-1-Deep, one expert with ``deep_layers`` ReLU hidden layers;
- ``"lstm"``: 4xLSTM, two more LSTM layers instead of the MoE.

How a flat MoE is balanced (``LMConfig.balancing``):

- ``"paper"``: noisy top-k gating with CV(Importance)² and CV(Load)² (Shazeer et al. 2017);
- ``"switch"``: top-k softmax gating, renormalised, with the Switch loss (Fedus et al. 2021,
  α = 1e-2; Mixtral's router);
- ``"aux-free"``: DeepSeek-V3's sigmoid gating balanced by the per-expert bias alone, no
  auxiliary loss (Wang et al. 2024; γ = 1e-3); the training loop calls
  :func:`sparsemoe.balancing.update_expert_biases` after each optimiser step.

Index letters: ``B`` batch, ``L`` time, ``d`` width, ``V`` vocabulary.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from torch import Tensor, nn

from .._checks import check_choice, check_int, check_number
from ..experts import FeedForwardExperts
from ..layers import HierarchicalMoE, MoE, MoELayer
from ..routers import DeepSeekV3Router, TopKRouter

MIDDLES = ("moe", "hmoe", "deep", "lstm")
BALANCINGS = ("paper", "switch", "aux-free")

State = tuple[tuple[Tensor, Tensor], ...]


@dataclass(frozen=True)
class LMConfig:
    vocab_size: int = 10_000
    d_model: int = 128  # embedding, LSTM and MoE width (paper: 512)
    middle: str = "moe"  # one of MIDDLES
    num_experts: int = 4  # n (for "hmoe": groups × experts per group)
    k: int = 4  # experts per token, flat MoE (paper: 4)
    hidden: int = 256  # expert hidden width (paper: 1024 = 2·d)
    groups: int = 16  # "hmoe": primary branching factor (paper: 16)
    k_primary: int = 2  # "hmoe" (paper: 2)
    k_secondary: int = 2  # "hmoe" (paper: 2)
    deep_layers: int = 4  # "deep": hidden layers of the single expert (paper: 4)
    dropout: float = 0.1  # DropProb
    w_importance: float = 0.1  # paper, language modelling
    w_load: float = 0.1
    balancing: str = "paper"  # flat MoE: one of BALANCINGS
    # W_g ~ N(0, std²) in the noisy top-k gates ("moe", "hmoe"; "deep"'s single expert and
    # "lstm" have no gate to speak of); 0: zeros, as the paper
    gate_init_std: float = 0.0
    # "aux-free": γ of the bias update b_i += γ·sign(mean load − load_i) after each optimiser
    # step; None: DeepSeek-V3's 1e-3
    bias_update_speed: float | None = None

    @property
    def experts_per_token(self) -> int:
        return {"moe": self.k, "hmoe": self.k_primary * self.k_secondary, "deep": 1,
                "lstm": 0}[self.middle]

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_experts", "k", "hidden", "groups",
                     "k_primary", "k_secondary", "deep_layers"):
            check_int(name, getattr(self, name))
        check_choice("middle", self.middle, MIDDLES)
        check_number("dropout", self.dropout, low=0, high=1, high_open=True)
        check_number("w_importance", self.w_importance, low=0)
        check_number("w_load", self.w_load, low=0)
        check_number("gate_init_std", self.gate_init_std, low=0)
        if self.gate_init_std and self.balancing != "paper":
            raise ValueError(f"gate_init_std is for the noisy top-k gate (balancing 'paper'), got "
                             f"gate_init_std={self.gate_init_std} with balancing "
                             f"{self.balancing!r}")
        if self.bias_update_speed is not None:
            check_number("bias_update_speed", self.bias_update_speed, low=0, low_open=True)
            if self.balancing != "aux-free":
                raise ValueError(f"bias_update_speed is for balancing 'aux-free', got "
                                 f"bias_update_speed={self.bias_update_speed} with balancing "
                                 f"{self.balancing!r}")
        if self.middle == "hmoe" and self.num_experts % self.groups:
            raise ValueError(f"num_experts ({self.num_experts}) must be a multiple of groups "
                             f"({self.groups}) for a hierarchical MoE")
        check_choice("balancing", self.balancing, BALANCINGS)
        if self.balancing != "paper" and self.middle != "moe":
            raise ValueError(f"balancing {self.balancing!r} is for the flat MoE (middle='moe'), "
                             f"got middle={self.middle!r}")


# Table 7's rows at a scale that trains on 2 CPU cores: d = 128 and expert hidden 256 (the
# paper's 512 and 1024 divided by 4), k = 4 (flat) and 2 × 2 (hierarchical), so that every
# model does 16·d² = 262,144 multiply-adds per token in its middle layer(s), plus gating.
PRESETS: dict[str, dict] = {
    "4xLSTM": {"middle": "lstm"},
    "MoE-1-Wide": {"num_experts": 1, "k": 1, "hidden": 1024},
    "MoE-1-Deep": {"middle": "deep"},
    "MoE-4": {"num_experts": 4},
    "MoE-32": {"num_experts": 32},
    "MoE-256": {"num_experts": 256},
    "MoE-256-h": {"middle": "hmoe", "num_experts": 256},
    "MoE-1024-h": {"middle": "hmoe", "num_experts": 1024},
}
PRESET_SETS = {
    "quick": ("MoE-1-Wide", "MoE-4", "MoE-32", "MoE-256"),
    "table7": tuple(PRESETS),
}


def check_preset(name: object) -> str:
    """``name`` must be one of :data:`PRESETS` (the one place presets are validated)."""
    return check_choice("preset", name, tuple(PRESETS))


def preset(name: str, **overrides) -> LMConfig:
    """The :class:`LMConfig` of a named preset, with field overrides."""
    check_preset(name)
    return replace(LMConfig(), **{**PRESETS[name], **overrides})


def _deep_expert(d: int, h: int, layers: int) -> nn.Module:
    dims = [d] + [h] * layers
    mods: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        mods += [nn.Linear(a, b, bias=False), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(h, d, bias=False))


class LSTMLanguageModel(nn.Module):
    """Appendix C.1's model. ``forward(tokens [B, L], state) -> (logits [B, L, V], state)``."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.drop = nn.Dropout(cfg.dropout)
        layers: list[nn.Module] = [nn.LSTM(d, d, batch_first=True)]
        if cfg.middle == "moe" and cfg.balancing == "paper":
            layers.append(MoE(d, cfg.num_experts, cfg.k, cfg.hidden, output_activation="sigmoid",
                              w_importance=cfg.w_importance, w_load=cfg.w_load,
                              gate_init_std=cfg.gate_init_std))
        elif cfg.middle == "moe":
            n = cfg.num_experts
            speed = {} if cfg.bias_update_speed is None else {
                "bias_update_speed": cfg.bias_update_speed}
            router = (TopKRouter(d, n, cfg.k) if cfg.balancing == "switch"
                      else DeepSeekV3Router(d, n, cfg.k, w_sequence=0.0, **speed))
            layers.append(MoELayer(router, FeedForwardExperts(n, d, cfg.hidden),
                                   output_activation="sigmoid"))
        elif cfg.middle == "hmoe":
            layers.append(HierarchicalMoE(
                d, cfg.groups, cfg.num_experts // cfg.groups, cfg.k_primary, cfg.k_secondary,
                cfg.hidden, output_activation="sigmoid", w_importance=cfg.w_importance,
                w_load=cfg.w_load, gate_init_std=cfg.gate_init_std,
            ))
        elif cfg.middle == "deep":
            deep = _deep_expert(d, cfg.hidden, cfg.deep_layers)
            layers.append(MoE(d, 1, 1, expert_modules=[deep], output_activation="sigmoid"))
        else:
            layers += [nn.LSTM(d, d, batch_first=True), nn.LSTM(d, d, batch_first=True)]
        layers.append(nn.LSTM(d, d, batch_first=True))
        self.layers = nn.ModuleList(layers)
        self.out = nn.Linear(d, cfg.vocab_size)

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        h = self.drop(self.embed(tokens))  # [B, L, d]
        states = iter(state) if state is not None else None
        new_state = []
        for layer in self.layers:
            if isinstance(layer, nn.LSTM):
                y, s = layer(h, next(states) if states is not None else None)
                new_state.append(s)
            else:
                y = layer(h)  # the whole [B, L] block is one MoE call
            h = h + self.drop(y)  # dropout on the layer output, then the residual
        return self.out(h), tuple(new_state)

    def moe_layers(self) -> list[nn.Module]:
        return [m for m in self.layers if not isinstance(m, nn.LSTM)]


def middle_multiply_adds(cfg, training: bool = False) -> int:
    """Multiply-adds per token of an MoE middle layer: flat (``cfg.middle == "moe"``): gating
    d·n (doubled in training by the noise matmul) plus k experts of 2·d·h; hierarchical
    (``"hmoe"``): primary gating d·a, secondary gating d·b for each of the k_p chosen groups,
    and k_p·k_s experts; ``"deep"``: one expert with ``deep_layers`` hidden layers. ``cfg`` is
    any config with these fields (:class:`LMConfig`, the translation model's); the noise
    matmul is counted for the paper's noisy gating only (an LMConfig whose ``balancing`` is
    ``"switch"`` or ``"aux-free"`` has none)."""
    d, h = cfg.d_model, cfg.hidden
    gate = 2 if training and getattr(cfg, "balancing", "paper") == "paper" else 1
    if cfg.middle == "moe":
        return gate * d * cfg.num_experts + cfg.k * 2 * d * h
    if cfg.middle == "hmoe":
        b = cfg.num_experts // cfg.groups
        return gate * d * (cfg.groups + cfg.k_primary * b) \
            + cfg.k_primary * cfg.k_secondary * 2 * d * h
    if cfg.middle == "deep":
        return gate * d + 2 * d * h + (cfg.deep_layers - 1) * h * h
    raise ValueError(f"middle must be 'moe', 'hmoe' or 'deep', got {cfg.middle!r}")


def multiply_adds_per_token(cfg: LMConfig, training: bool = False) -> int:
    """Multiply-adds per token outside the embedding and the softmax (Table 7's ops/timestep).

    LSTM layer: 4 gates × (d input + d recurrent) × d = 8·d²; the middle layer as
    :func:`middle_multiply_adds` (4xLSTM: two more LSTM layers). Biases and element-wise
    operations are not counted.
    """
    lstm = 8 * cfg.d_model * cfg.d_model
    middle = 2 * lstm if cfg.middle == "lstm" else middle_multiply_adds(cfg, training)
    return 2 * lstm + middle


def parameter_counts(model: LSTMLanguageModel) -> dict[str, int]:
    """``total``; ``body``: outside the embedding and softmax (Table 7's "params");
    ``active_per_token``: body parameters one token uses (its k experts, not all n)."""
    total = sum(p.numel() for p in model.parameters())
    edges = sum(p.numel() for m in (model.embed, model.out) for p in m.parameters())
    body = total - edges
    active = body
    for moe in model.moe_layers():
        per_expert = sum(p.numel() for p in moe.experts.parameters()) // moe.num_experts
        active -= per_expert * (moe.num_experts - model.cfg.experts_per_token)
    return {"total": total, "body": body, "active_per_token": active}

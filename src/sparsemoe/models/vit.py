"""The Vision MoE (V-MoE, Riquelme et al. 2021, arXiv:2106.05974) in miniature: a small
Vision Transformer whose every other block has an MoE feed-forward layer.

image → non-overlapping ``patch × patch`` patches → linear embedding + learned positions →
``n_layers`` pre-norm encoder blocks (the blocks of :mod:`sparsemoe.models.transformer`, with
bidirectional attention) → norm → mean over the patches → linear classifier.

MoE layers (blocks 1, 3, ...): ``E`` experts with the dense FFN's width, top-``k`` of
``softmax(W·x)`` with the softmax weights kept unnormalised as in the paper, the importance
loss ``CV(Importance)²`` and the Switch load loss (``w = 0.01`` each; the paper's load loss
needs its fixed-std routing noise, which this miniature leaves out), and a capacity per expert
of ``⌈k·N·c/E⌉`` pairs over the ``N`` tokens of the batch (the paper rounds ``k·N·c/E``).
``policy="priority"`` is Batch Prioritized Routing: tokens are ordered by their largest routing
weight before the capacity is filled, first choices before second choices, so the tokens the
router is least sure of are dropped first (:class:`sparsemoe.Capacity`).

Index letters: ``B`` images, ``N`` patches per image, ``d`` width, ``C`` classes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .._checks import check_int, check_number
from ..capacity import Capacity
from ..experts import FeedForwardExperts
from ..layers import MoELayer
from ..routers import TopKRouter
from .transformer import Block, TransformerConfig, feed_forward, init_weights, make_norm


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 28
    patch: int = 7  # 28/7: 16 patches
    num_classes: int = 10
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int = 128  # dense FFN and expert hidden width
    num_experts: int = 8  # E
    k: int = 2  # experts per token (the paper's default V-MoE: k = 2 of E = 32)
    capacity_factor: float = 1.05  # c in training (paper: 1.05)
    policy: str = "priority"  # "priority" (Batch Prioritized Routing) or "position"
    w_importance: float = 0.01
    w_switch: float = 0.01

    def __post_init__(self) -> None:
        for name in ("image_size", "patch", "num_classes", "num_experts", "k"):
            check_int(name, getattr(self, name))
        if self.image_size % self.patch:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch "
                             f"({self.patch})")
        check_number("capacity_factor", self.capacity_factor, low=0, low_open=True)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    def blocks(self) -> TransformerConfig:
        """The encoder blocks' config: an MoE FFN in every other block."""
        return TransformerConfig(
            vocab_size=1, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
            context=self.num_patches, ffn_hidden=self.ffn_hidden, activation="gelu",
            norm="layer", positions="learned", router="top-k", num_experts=self.num_experts,
            k=self.k, hidden=self.ffn_hidden, moe_every=2)


def capacity(cfg: ViTConfig, ratio: float | None = None, policy: str | None = None) -> Capacity:
    """The capacity of ratio ``c`` (default: the training one) over the whole batch."""
    return Capacity(factor=cfg.capacity_factor if ratio is None else ratio, minimum=0,
                    policy=policy or cfg.policy, group="batch")


def vmoe_layer(cfg: ViTConfig) -> MoELayer:
    """One V-MoE layer: unnormalised top-k softmax routing, GELU experts, a capacity."""
    router = TopKRouter(cfg.d_model, cfg.num_experts, cfg.k, normalize=False,
                        w_importance=cfg.w_importance, w_switch=cfg.w_switch)
    bank = FeedForwardExperts(cfg.num_experts, cfg.d_model, cfg.ffn_hidden, activation="gelu")
    return MoELayer(router, bank, capacity=capacity(cfg))


class VisionMoE(nn.Module):
    """A ViT with MoE layers in every other block. ``forward(images [B, H, W] or
    [B, 1, H, W]) -> logits [B, C]``; set the MoE layers' capacity with
    :meth:`set_capacity` (e.g. a lower ratio at inference)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        blocks = cfg.blocks()
        self.embed = nn.Linear(cfg.patch * cfg.patch, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.num_patches, cfg.d_model))
        self.blocks = nn.ModuleList(
            Block(blocks, feed_forward(blocks, i, lambda _: vmoe_layer(cfg)), causal=False)
            for i in range(cfg.n_layers))
        self.norm = make_norm(blocks)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)
        init_weights(self, cfg.n_layers)
        # the patch embedding as ViT's (LeCun normal, std 1/√fan_in): with 4 pixels per patch,
        # GPT-2's 0.02 would leave the content far below the positions
        nn.init.normal_(self.embed.weight, std=(cfg.patch * cfg.patch) ** -0.5)
        nn.init.zeros_(self.embed.bias)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def patches(self, images: Tensor) -> Tensor:
        """``[B, H, W] -> [B, N, p·p]``, patches in row-major order."""
        p = self.cfg.patch
        x = images.reshape(images.shape[0], 1, self.cfg.image_size, self.cfg.image_size)
        return nn.functional.unfold(x, p, stride=p).transpose(1, 2)

    def forward(self, images: Tensor) -> Tensor:
        x = self.embed(self.patches(images)) + self.pos  # [B, N, d]
        for block in self.blocks:
            x = block(x, None)
        return self.head(self.norm(x).mean(1))

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def set_capacity(self, ratio: float | None = None, policy: str | None = None) -> None:
        """Every MoE layer's capacity ratio ``c`` and drop policy (None: the config's)."""
        for layer in self.moe_layers():
            layer.capacity = capacity(self.cfg, ratio, policy)


def digits_config(image_size: int, **overrides) -> ViTConfig:
    """A :class:`ViTConfig` for square digits: 16 patches (28×28: 7×7; 8×8: 2×2)."""
    return replace(ViTConfig(image_size=image_size, patch=image_size // 4), **overrides)

"""The Deep Mixture of Experts of Eigen, Ranzato and Sutskever (2013), "Learning Factored
Representations in a Deep Mixture of Experts" (arXiv:1312.4314), and the paper's baselines.

    z¹ = Σ_i g¹_i(x) f¹_i(x),   z² = Σ_j g²_j(z¹) f²_j(z¹),   F(x) = softmax(f³(z²))
    f^l_i(x) = max(0, W^l_i x + b^l_i),   g^l(x) = softmax(B^l max(0, A^l x + a^l) + b^l)

Each layer is a :class:`~sparsemoe.MoELayer`: a gating network with one hidden layer
(:class:`~sparsemoe.routers.SoftmaxRouter` with ``hidden``) over stacked linear-ReLU experts
(:class:`~sparsemoe.experts.LinearExperts`), every expert computed (dense mixtures), through the
one grouped dispatch. Options: Eigen et al.'s running-total constraint
(:class:`~sparsemoe.routers.MarginConstrainedRouter`), Shazeer et al.'s importance loss, and the
sparse form the paper names as future work: noisy top-k gates per layer with the importance and
load losses (:class:`~sparsemoe.routers.NoisyTopKRouter` with ``hidden``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from .. import functional as MF
from .._checks import check_int, check_number
from ..experts import LinearExperts
from ..layers import MoELayer
from ..routers import MarginConstrainedRouter, NoisyTopKRouter, Router, SoftmaxRouter


@dataclass(frozen=True)
class DeepMoEConfig:
    d_in: int = 36 * 36  # input pixels (jittered MNIST: 36×36)
    num_classes: int = 10
    widths: tuple[int, ...] = (100, 100)  # each expert's output width, layer by layer
    num_experts: int = 4  # experts per layer (the paper: 4)
    gate_hidden: int = 50  # hidden units of every gating network (the paper: 50)
    k: int | None = None  # None: dense mixtures (the paper); k: noisy top-k gates per layer
    margin: float | None = None  # the running-total constraint's m (None: no constraint)
    w_importance: float = 0.0  # Shazeer et al.'s w_importance·CV(Importance)² per layer
    w_load: float = 0.0  # and w_load·CV(Load)² (noisy top-k only; dense loads are constant)

    def __post_init__(self) -> None:
        check_int("d_in", self.d_in)
        check_int("num_classes", self.num_classes)
        if not self.widths:
            raise ValueError("widths must name at least one layer, got ()")
        for w in self.widths:
            check_int("widths[i]", w)
        check_int("num_experts", self.num_experts)
        check_int("gate_hidden", self.gate_hidden)
        if self.k is not None and not 1 <= check_int("k", self.k) <= self.num_experts:
            raise ValueError(f"k must be in [1, num_experts = {self.num_experts}] or None, "
                             f"got {self.k}")
        if self.margin is not None:
            check_number("margin", self.margin, low=0)
        check_number("w_importance", self.w_importance, low=0)
        check_number("w_load", self.w_load, low=0)
        if self.w_load and self.k is None:
            raise ValueError("w_load needs noisy top-k gates (k); a dense mixture's load is "
                             f"constant, got w_load={self.w_load} with k=None")


class DeepMoE(nn.Module):
    """A stack of MoE layers, each with its own gating network, and a linear-softmax classifier.

    Args:
        config: a :class:`DeepMoEConfig`.

    Shape:
        ``x [B, d_in] -> logits [B, num_classes]`` (the softmax is in the loss).
    """

    def __init__(self, config: DeepMoEConfig) -> None:
        super().__init__()
        self.config = config
        layers, d = [], config.d_in
        for width in config.widths:
            experts = LinearExperts(config.num_experts, d, width, activation="relu", bias=True)
            layers.append(MoELayer(self._router(d), experts))
            d = width
        self.layers = nn.ModuleList(layers)
        self.classifier = nn.Linear(d, config.num_classes)

    def _router(self, d: int) -> Router:
        c = self.config
        if c.k is None:
            router = SoftmaxRouter(d, c.num_experts, gate_hidden=c.gate_hidden, bias=True,
                                   w_importance=c.w_importance)
        else:
            router = NoisyTopKRouter(d, c.num_experts, c.k, gate_hidden=c.gate_hidden,
                                     w_importance=c.w_importance, w_load=c.w_load)
        return router if c.margin is None else MarginConstrainedRouter(router, c.margin)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x)

    def forward_with_gates(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The logits and every layer's gates ``[B, num_experts]`` (zeros where a sparse gate
        left an expert out), in evaluation mode (in training each router would run twice: noise
        drawn twice, the constraint's totals counted twice)."""
        if self.training:
            raise RuntimeError("forward_with_gates analyses a trained model: call model.eval() "
                               "first")
        gates = []
        for layer in self.layers:
            r = layer.router(x)
            gates.append(MF.gate_matrix(r.expert_indices, r.combine_weights,
                                        layer.num_experts, r.valid))
            x = layer(x)
        return self.classifier(x), gates

    def remove_constraint(self) -> None:
        """End the constrained phase (Eigen et al.: then fine-tune without it)."""
        for layer in self.layers:
            if isinstance(layer.router, MarginConstrainedRouter):
                layer.router.remove_constraint()


def mlp(d_in: int, widths: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """The paper's baselines: a ReLU network ``d_in → widths[0] → … → num_classes``.

    One expert per layer is ``widths = (100, 100)``; the concatenated experts of a
    ``4×100`` layer are ``(400, 400)``; a DNN with the DMoE's parameter count uses
    :func:`matched_width`.
    """
    modules: list[nn.Module] = []
    d = d_in
    for width in widths:
        modules += [nn.Linear(d, width), nn.ReLU()]
        d = width
    modules.append(nn.Linear(d, num_classes))
    return nn.Sequential(*modules)


def matched_width(d_in: int, num_classes: int, params: int, depth: int = 2) -> int:
    """The width ``w`` of a ReLU network with ``depth`` hidden layers of ``w`` units whose
    parameter count is closest to ``params``.

    Parameters: ``(d_in + 1)·w + (depth − 1)·(w + 1)·w + (w + 1)·num_classes``.
    """
    check_int("depth", depth)

    def count(w: int) -> int:
        return (d_in + 1) * w + (depth - 1) * (w + 1) * w + (w + 1) * num_classes

    a, b, c = depth - 1, d_in + 1 + (depth - 1) + num_classes, num_classes - params
    w = -c / b if a == 0 else (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    low = max(1, math.floor(w))
    return min((low, low + 1), key=lambda v: abs(count(v) - params))

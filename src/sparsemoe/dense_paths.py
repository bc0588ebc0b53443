"""MoE layers with an always-on dense path beside the routed experts.

- :class:`BASELayer`: BASE's residual, ``h + σ(h·w_a)·f_a(h)`` (Lewis et al. 2021).
- :class:`SharedExpertMoE`: shared experts that every token uses, plus routed ones
  (DeepSeekMoE, Dai et al. 2024; Qwen2-MoE with its sigmoid-gated shared expert).
- :class:`ConditionalMoE`: NLLB-200's conditional MoE, a learned per-token choice between a
  dense FFN and the experts (NLLB Team 2022).

The last two run their dense path through the same grouped dispatch as the routed experts
(every token to every shared expert), so any expert bank serves as the dense path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_bool, check_expert_bank, check_number
from .capacity import Capacity
from .dispatch import dispatch_combine
from .layers import MoELayer
from .routers import BASERouter, Router
from .routers.base import all_experts_grid


def _dense_path(bank: nn.Module, tokens: Tensor, weights: Tensor) -> Tensor:
    """``Σ_s weights[:, s] · bank_s(tokens)`` over all of ``bank``'s experts: ``[T, d] ->
    [T, d_out]``."""
    grid = all_experts_grid(tokens.shape[0], bank.num_experts, tokens.device)
    return dispatch_combine(tokens, grid, weights, bank)[0]


def _check_bank(name: str, bank: nn.Module, d_model: int) -> None:
    check_expert_bank(name, bank)
    width = getattr(bank, "d_model", d_model)
    if width != d_model:
        raise ValueError(f"{name} has d_model {width} but the router has {d_model}")


class BASELayer(MoELayer):
    """A BASE layer (Lewis et al. 2021): ``h + σ(h·w_a)·f_a(h)`` with ``a`` from a
    :class:`~sparsemoe.routers.BASERouter` (balanced assignment in training, greedy top-1 at
    inference).

    Args:
        router: a :class:`~sparsemoe.routers.BASERouter`.
        experts: an expert bank mapping ``d_model`` to ``d_model``.
        capacity, expert_output_masking: as in :class:`MoELayer` (BASE needs neither).

    Shape:
        ``[..., d_model] -> [..., d_model]``.
    """

    def __init__(
        self, router: BASERouter, experts: nn.Module, *, capacity: Capacity | None = None,
        expert_output_masking: float = 0.0,
    ) -> None:
        if not isinstance(router, BASERouter):
            raise TypeError(f"router must be a BASERouter, got {type(router).__name__}")
        super().__init__(router, experts, capacity=capacity,
                         expert_output_masking=expert_output_masking)

    def add_dense_paths(self, tokens: Tensor, y: Tensor) -> Tensor:
        return tokens + y  # the residual h of h + σ(h·w_a)·f_a(h)


class SharedExpertMoE(MoELayer):
    """Routed experts plus shared experts that every token uses.

    DeepSeekMoE (``shared_gate=False``): ``y = Σ_{s=1}^{n_s} S_s(x) + Σ_i G(x)_i E_i(x)``.
    Qwen2-MoE (``shared_gate=True``): ``y = σ(x·w_s)·Σ_s S_s(x) + Σ_i G(x)_i E_i(x)``, with a
    learned ``w_s [d, 1]`` (zero-initialised: the gate starts at 1/2). The routed part is a
    :class:`~sparsemoe.layers.MoELayer` (any router, capacity, statistics and auxiliary loss);
    :attr:`stats` describes the routed experts.

    Args:
        router: any :class:`~sparsemoe.routers.Router`.
        experts: the routed expert bank.
        shared_experts: the shared bank (``n_s`` experts; DeepSeekMoE uses 1–2, Qwen2-MoE 1
            wide one).
        shared_gate: the sigmoid gate of Qwen2-MoE.
        output_activation, capacity, expert_output_masking: as in
            :class:`~sparsemoe.layers.MoELayer`.

    Shape:
        ``[..., d_model] -> [..., d_model]``; ``w_shared_gate [d, 1]``.
    """

    def __init__(
        self, router: Router, experts: nn.Module, shared_experts: nn.Module, *,
        shared_gate: bool = False,
        output_activation: str | Callable[[Tensor], Tensor] | None = None,
        capacity: Capacity | None = None, expert_output_masking: float = 0.0,
    ) -> None:
        super().__init__(router, experts, output_activation=output_activation,
                         capacity=capacity, expert_output_masking=expert_output_masking)
        _check_bank("shared_experts", shared_experts, self.d_model)
        self.shared_experts = shared_experts
        check_bool("shared_gate", shared_gate)
        self.w_shared_gate = nn.Parameter(torch.zeros(self.d_model, 1)) if shared_gate else None

    def add_dense_paths(self, tokens: Tensor, y: Tensor) -> Tensor:
        n_s = self.shared_experts.num_experts
        if self.w_shared_gate is None:
            weights = tokens.new_ones(tokens.shape[0], n_s)
        else:
            weights = torch.sigmoid(tokens @ self.w_shared_gate).expand(-1, n_s)
        return y + _dense_path(self.shared_experts, tokens, weights)


class ConditionalMoE(MoELayer):
    """NLLB-200's conditional MoE: a per-token gate between a dense FFN and the experts.

    ``g(x) = Dropout_q(σ(x·w_c + b_c))``, ``y = (1 − g(x))·FFN(x) + g(x)·MoE(x)``, where MoE is
    the routed mixture (NLLB: GShard top-2, :class:`~sparsemoe.routers.GShardRouter`, with
    expert output masking). A budget loss keeps the fraction of tokens sent to the experts near
    ``budget``: ``w_budget · |mean_x g(x) − budget|``, added to :attr:`aux_loss`.

    This follows the released fairseq code of NLLB (``CMRLayer``, ``CMRGate`` and the
    criterion's ``cmr_gate_loss``), whose defaults are NLLB's recipe: gate dropout ``q = 0.1``,
    ``w_budget = 0.01``, ``budget = 0.8``, expert output masking 0.2. As there, the gate is
    soft: both paths run for every token, and the dropout (with its ``1/(1−q)`` rescaling)
    acts on the gate value.

    Args:
        router: the routed experts' router.
        experts: the routed expert bank.
        dense: the dense FFN as a one-expert bank (e.g. ``FeedForwardExperts(1, d, h)``).
        gate_dropout, budget, w_budget: as above.
        output_activation, capacity, expert_output_masking: as in
            :class:`~sparsemoe.layers.MoELayer`.

    Shape:
        ``[..., d_model] -> [..., d_model]``; ``w_cmr [d, 1]``, ``b_cmr [1]``.
    """

    def __init__(
        self, router: Router, experts: nn.Module, dense: nn.Module, *,
        gate_dropout: float = 0.1, budget: float = 0.8, w_budget: float = 0.01,
        output_activation: str | Callable[[Tensor], Tensor] | None = None,
        capacity: Capacity | None = None, expert_output_masking: float = 0.2,
    ) -> None:
        super().__init__(router, experts, output_activation=output_activation,
                         capacity=capacity, expert_output_masking=expert_output_masking)
        _check_bank("dense", dense, self.d_model)
        if dense.num_experts != 1:
            raise ValueError(f"dense must be a one-expert bank, got {dense.num_experts} experts")
        self.dense = dense
        self.gate_dropout = check_number("gate_dropout", gate_dropout, low=0, high=1,
                                         high_open=True)
        self.budget = check_number("budget", budget, low=0, high=1)
        self.w_budget = check_number("w_budget", w_budget, low=0)
        self.w_cmr = nn.Parameter(torch.zeros(self.d_model, 1))
        self.b_cmr = nn.Parameter(torch.zeros(1))
        self.gate: Tensor | None = None

    def add_dense_paths(self, tokens: Tensor, y: Tensor) -> Tensor:
        g = torch.sigmoid(tokens @ self.w_cmr + self.b_cmr)  # [T, 1]
        g = F.dropout(g, self.gate_dropout, self.training)
        self.gate = g.detach()[:, 0]
        if self.w_budget and tokens.shape[0]:
            self.aux_loss = self.aux_loss + self.w_budget * (g.mean() - self.budget).abs()
        dense = _dense_path(self.dense, tokens, tokens.new_ones(tokens.shape[0], 1))
        return (1 - g) * dense + g * y

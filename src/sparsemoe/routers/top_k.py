"""Top-k softmax gating as in Mixtral (renormalised) and OLMoE / Qwen2-MoE (not renormalised)."""

from __future__ import annotations

from torch import Tensor

from .._checks import check_bool, check_top_k
from .base import LinearRouter, Routing


class TopKRouter(LinearRouter):
    """Top-k softmax gating.

    ``p(x) = Softmax(x·W_g)`` over all ``n`` experts; the token goes to the ``k`` experts of
    largest ``p``, with weights

    - ``normalize=True`` (Mixtral, Jiang et al. 2024): ``w_j = p_j / Σ_{l∈top-k} p_l``, which
      equals the paper's ``Softmax(TopK(x·W_g))``;
    - ``normalize=False`` (OLMoE, Muennighoff et al. 2024; Qwen2-MoE): ``w_j = p_j``.

    The default auxiliary loss is the Switch load-balancing loss with ``f_i`` counting all
    ``k`` choices (``w_switch = 1e-2``, Fedus et al.; OLMoE also uses ``w_z = 1e-3``).
    ``transformers``' Mixtral, OLMoE and Qwen2-MoE routers compute the same weights
    (:mod:`sparsemoe.interop`).

    Args:
        d_model: input width ``d``.
        num_experts: ``n``.
        k: experts per token.
        normalize: renormalise the kept probabilities to sum to 1.
        w_importance, w_switch, w_z, bias, gate_hidden: see :class:`LinearRouter`
            (``gate_hidden=h``: the gating network of Eigen et al. 2013,
            ``relu(x·A + a)·W_g + b``, kept top-k: the sparse Deep Mixture of Experts).

    Shape:
        ``w_gate [d, n]`` (``[h, n]`` with a hidden layer); forward ``[T, d] -> Routing`` with
        ``k`` choices, best first.
    """

    def __init__(
        self, d_model: int, num_experts: int, k: int = 2, *, normalize: bool = True,
        w_importance: float = 0.0, w_switch: float = 1e-2, w_z: float = 0.0, bias: bool = False,
        gate_hidden: int | None = None, hidden: int | None = None,
    ) -> None:
        super().__init__(d_model, num_experts, w_importance=w_importance, w_switch=w_switch,
                         w_z=w_z, bias=bias, gate_hidden=gate_hidden, hidden=hidden)
        self.k = check_top_k("k", k, num_experts)
        self.normalize = check_bool("normalize", normalize)

    def forward(self, x: Tensor) -> Routing:
        logits = self.logits(x)
        probs = logits.softmax(-1)
        weights, choice = probs.topk(self.k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return self.routing(logits, probs, choice, weights)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, normalize={self.normalize}"

"""``"sparsemoe"`` as an experts implementation of ``transformers``.

``transformers`` ≥ 5 routes the experts of its MoE models through an ``ExpertsInterface``
(``transformers.integrations.moe``): an experts class decorated with
``@use_experts_implementation`` holds stacked 3-D weights and calls the function registered
under ``config._experts_implementation`` as ``forward(self, hidden_states [T, d],
top_k_index [T, k], top_k_weights [T, k]) -> [T, d]``. Importing this module (or calling
:func:`register`) registers :func:`sparsemoe_experts_forward` there, so

.. code-block:: python

    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="sparsemoe")
    model.set_experts_implementation("sparsemoe")  # or switch a loaded model

runs every MoE layer's experts through sparsemoe's sorted grouped dispatch
(:func:`sparsemoe.dispatch.dispatch_combine`): one stable sort of the ``T·k`` (token, expert)
pairs, two grouped matrix multiplies over all experts, one fused gather-and-weighted-sum, no
Python loop over experts and gathers instead of scatters in the backward pass. The routing
stays the model's own.

Every layout flag of the decorator is honoured: ``is_transposed`` (``gate_up_proj [n, d, 2h]``
instead of ``[n, 2h, d]``; the non-transposed layout is read through a transposed view, no copy),
``has_gate`` (``gate_up_proj`` and the model's ``_apply_gate``, which also reads the
``is_concatenated`` [gate; up] or interleaved layout, or ``up_proj`` and ``act_fn``),
``has_bias`` (``*_proj_bias [n, out]`` added per row), ``has_post_expert_norm``; pairs with the
expert-parallel sentinel (an index ≥ ``num_experts``) are not computed and add nothing.
"""

from __future__ import annotations

from torch import Tensor, nn

from .._checks import autocast_dtype
from ..dispatch import SortedPairs, dispatch_combine, grouped_matmul

NAME = "sparsemoe"
"""The key of :func:`sparsemoe_experts_forward` in ``transformers``' ``ExpertsInterface``."""


def _stacked(weight: Tensor, is_transposed: bool) -> Tensor:
    """``[n, p, q]`` input-major view of a ``transformers`` expert weight (``[n, q, p]`` unless
    ``is_transposed``)."""
    return weight if is_transposed else weight.transpose(1, 2)


class _ExpertsBank:
    """A decorated ``transformers`` experts module seen as a sparsemoe expert bank
    (:class:`sparsemoe.dispatch.Experts`): ``[N, d]`` rows sorted by expert → ``[N, d]``.

    ``E_e(x) = norm((g(x·U_e + b_e))·D_e + c_e)`` with ``U = gate_up_proj`` and ``g`` the
    module's ``_apply_gate`` (``up_proj`` and ``act_fn`` without a gate), ``D = down_proj``,
    the biases only with ``has_bias`` and ``norm`` only with ``has_post_expert_norm``.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.num_experts = module.num_experts

    def _affine(self, x: Tensor, name: str, routes: SortedPairs) -> Tensor:
        m = self.module
        y = grouped_matmul(x, _stacked(getattr(m, name), m.is_transposed), routes.tokens_per_expert)
        if m.has_bias:
            y = y + getattr(m, f"{name}_bias").index_select(0, routes.expert_index).to(y.dtype)
        return y

    def __call__(self, x: Tensor, routes: SortedPairs) -> Tensor:
        m = self.module
        if m.has_gate:
            h = m._apply_gate(self._affine(x, "gate_up_proj", routes))
        else:
            h = m.act_fn(self._affine(x, "up_proj", routes))
        y = self._affine(h, "down_proj", routes)
        return m.post_expert_norm(y) if getattr(m, "has_post_expert_norm", False) else y


def sparsemoe_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The experts of a ``transformers`` MoE layer through sparsemoe's grouped dispatch.

    ``y_t = Σ_{j<k} top_k_weights[t, j] · E_{top_k_index[t, j]}(x_t)`` (eq. 1 of Shazeer et al.
    2017 over the chosen experts), with ``E_e`` the module's expert (see the module docstring).

    Args:
        self: an experts module decorated with ``@use_experts_implementation``.
        hidden_states: ``[T, d]`` tokens (``T`` may be 0).
        top_k_index: ``[T, k]`` chosen experts; an index ≥ ``num_experts`` (expert parallelism's
            sentinel for an expert on another rank) is skipped.
        top_k_weights: ``[T, k]`` their weights.

    Returns:
        ``[T, d]`` in the dtype of ``hidden_states``.
    """
    n = self.num_experts
    index = top_k_index.long()
    valid = None
    if getattr(self, "_is_expert_parallel", False):
        valid = index < n
        index = index.clamp(max=n - 1)
    x = hidden_states
    if autocast_dtype(x.device.type) is None:  # as transformers' grouped_mm: the weights' dtype
        x = x.to(self.down_proj.dtype)
    y, _ = dispatch_combine(x, index, top_k_weights, _ExpertsBank(self), valid)
    return y.to(hidden_states.dtype)


def register() -> None:
    """Register ``"sparsemoe"`` in ``transformers``' ``ExpertsInterface`` (idempotent).

    Afterwards ``from_pretrained(..., experts_implementation="sparsemoe")``,
    ``from_config(config, experts_implementation="sparsemoe")`` and
    ``model.set_experts_implementation("sparsemoe")`` select :func:`sparsemoe_experts_forward`.
    """
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, sparsemoe_experts_forward)


register()

"""Exact converters for the ``transformers`` MoE blocks of DBRX and GPT-OSS.

- ``DbrxFFN`` (DBRX; its experts are not on the experts interface): softmax router, top-k,
  weights divided by their ``p``-norm (``moe_normalize_expert_weights``; the released models use
  ``p = 1``, the sum: :class:`~sparsemoe.routers.TopKRouter` ``normalize=True``; ``None``:
  ``normalize=False``), GLU experts ``(act(x·W1ᵀ) ⊙ x·V1ᵀ)·W2`` stored as ``w1, v1, w2 [n·h, d]``.
- ``GptOssMLP`` (GPT-OSS): router ``softmax(TopK(x·W + b))`` (= ``TopKRouter(normalize=True,
  bias=True)``), experts with biases and GPT-OSS's clamped gate
  ``(clamp(u, ±L) + 1) ⊙ g·σ(α g)`` with ``g = clamp(gate, max=L)``
  (:class:`ClampedSwiGLUExperts`), ``gate_up_proj [n, d, 2h]`` interleaved (gate, up, gate, ...).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..experts import FeedForwardExperts, _stacked_affine
from ..layers import MoELayer
from ..routers import TopKRouter
from .transformers import _GATED, _activation_name


class ClampedSwiGLUExperts(FeedForwardExperts):
    """Feed-forward experts with GPT-OSS's clamped gated activation.

    ``E_e(x) = ((clamp(u, −L, L) + 1) ⊙ g·σ(α·g))·w2[e] + b2[e]`` where ``[g | u] = x·w1[e] +
    b1[e]`` and ``g`` is first clamped to at most ``L`` (OpenAI 2025, gpt-oss model card; the
    ``transformers`` ``GptOssExperts``).

    Args:
        num_experts, d_model, hidden: as :class:`~sparsemoe.experts.FeedForwardExperts`.
        alpha: ``α`` (gpt-oss: 1.702).
        limit: ``L`` (gpt-oss: 7.0).

    Shape:
        ``w1 [n, d, 2h]`` (``[W_gate | W_up]``), ``b1 [n, 2h]``, ``w2 [n, h, d]``, ``b2 [n, d]``.
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int, *, alpha: float = 1.702,
                 limit: float = 7.0, **kwargs) -> None:
        super().__init__(num_experts, d_model, hidden, activation="swiglu", bias=True, **kwargs)
        self.alpha = float(alpha)
        self.limit = float(limit)

    def _forward(self, x: Tensor, routes) -> Tensor:
        h = _stacked_affine(x, self.w1, self.b1, routes, self.impl, self.grad_buffers.get("w1"))
        gate, up = h.chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        h = (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        return _stacked_affine(h, self.w2, self.b2, routes, self.impl, self.grad_buffers.get("w2"))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}, limit={self.limit}"


def _normalize_of_p(p: float | None) -> bool:
    if p is None:
        return False
    if p != 1:
        raise ValueError(f"moe_normalize_expert_weights must be 1 (sum) or None for an exact "
                         f"sparsemoe layer, got {p!r}")
    return True


def dbrx_from_transformers(block: nn.Module) -> MoELayer:
    """A :class:`~sparsemoe.layers.MoELayer` computing what a ``DbrxFFN`` computes.

    Args:
        block: a ``transformers`` ``DbrxFFN``.

    Returns:
        The layer with copies of the block's weights, on its device and dtype, in its mode.
    """
    if block.router.moe_jitter_eps is not None:
        raise ValueError(f"the DBRX router's moe_jitter_eps must be None (no sparsemoe "
                         f"equivalent), got {block.router.moe_jitter_eps!r}")
    mlp = block.experts.mlp
    n, d, h = block.experts.num_experts, block.experts.hidden_size, block.experts.ffn_hidden_size
    router = TopKRouter(d, n, block.top_k, normalize=_normalize_of_p(
        block.moe_normalize_expert_weights)).to(mlp.w1)
    bank = FeedForwardExperts(n, d, h, activation=_GATED[_activation_name(mlp.activation_fn)])
    bank.to(mlp.w1)
    with torch.no_grad():
        router.w_gate.copy_(block.router.layer.weight.T)
        w1, v1 = mlp.w1.view(n, h, d), mlp.v1.view(n, h, d)
        bank.w1.copy_(torch.cat([w1, v1], dim=1).transpose(1, 2))  # [n, d, 2h] = [W1ᵀ | V1ᵀ]
        bank.w2.copy_(mlp.w2.view(n, h, d))
    return MoELayer(router, bank).train(block.training)


def _check_plain_top_k(layer: MoELayer, bank_type: type, bias: bool) -> None:
    router, bank = layer.router, layer.experts
    if type(router) is not TopKRouter or type(bank) is not bank_type:
        raise TypeError(f"the layer must have a TopKRouter and {bank_type.__name__}, got "
                        f"{type(router).__name__} and {type(bank).__name__}")
    if (router.b_gate is not None) != bias or router.gate_hidden is not None:
        raise ValueError(f"the target router has {'a' if bias else 'no'} bias and no hidden "
                         "layer; the layer's router differs")
    if layer.capacity is not None or layer.expert_output_masking:
        raise ValueError("the target block is dropless and unmasked; the layer has a capacity "
                         "or expert output masking")


def _expect(what: str, wanted: object, got: object) -> None:
    if wanted != got:
        raise ValueError(f"config {what} is {wanted!r} but the layer has {got!r}")


def dbrx_to_transformers(layer: MoELayer, config) -> nn.Module:
    """The ``DbrxFFN`` of ``config`` (a ``DbrxConfig``) holding the layer's weights."""
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN

    _check_plain_top_k(layer, FeedForwardExperts, bias=False)
    ffn = config.ffn_config
    bank = layer.experts
    _expect("d_model", config.d_model, layer.d_model)
    _expect("moe_num_experts", ffn.moe_num_experts, layer.num_experts)
    _expect("moe_top_k", ffn.moe_top_k, layer.router.k)
    _expect("ffn_hidden_size", ffn.ffn_hidden_size, bank.hidden)
    _expect("normalisation", _normalize_of_p(ffn.moe_normalize_expert_weights),
            layer.router.normalize)
    if bank.b1 is not None:
        raise ValueError("DBRX experts have no biases, but the layer's experts do")
    n, d, h = layer.num_experts, layer.d_model, bank.hidden
    block = DbrxFFN(config).to(bank.w1)
    with torch.no_grad():
        block.router.layer.weight.copy_(layer.router.w_gate.T)
        w1, v1 = bank.w1.transpose(1, 2).split(h, dim=1)  # [n, h, d] each
        block.experts.mlp.w1.copy_(w1.reshape(n * h, d))
        block.experts.mlp.v1.copy_(v1.reshape(n * h, d))
        block.experts.mlp.w2.copy_(bank.w2.reshape(n * h, d))
    return block.train(layer.training)


def gpt_oss_from_transformers(block: nn.Module) -> MoELayer:
    """A :class:`~sparsemoe.layers.MoELayer` computing what a ``GptOssMLP`` computes."""
    r, e = block.router, block.experts
    n, d, two_h = e.gate_up_proj.shape
    router = TopKRouter(d, n, r.top_k, normalize=True, bias=True).to(r.weight)
    bank = ClampedSwiGLUExperts(n, d, two_h // 2, alpha=e.alpha, limit=e.limit).to(r.weight)
    with torch.no_grad():
        router.w_gate.copy_(r.weight.T)
        router.b_gate.copy_(r.bias)
        # interleaved (gate, up, gate, up, ...) columns -> [W_gate | W_up]
        bank.w1.copy_(torch.cat([e.gate_up_proj[..., ::2], e.gate_up_proj[..., 1::2]], dim=-1))
        bank.b1.copy_(torch.cat([e.gate_up_proj_bias[..., ::2], e.gate_up_proj_bias[..., 1::2]],
                                dim=-1))
        bank.w2.copy_(e.down_proj)
        bank.b2.copy_(e.down_proj_bias)
    return MoELayer(router, bank).train(block.training)


def gpt_oss_to_transformers(layer: MoELayer, config) -> nn.Module:
    """The ``GptOssMLP`` of ``config`` (a ``GptOssConfig``) holding the layer's weights."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    _check_plain_top_k(layer, ClampedSwiGLUExperts, bias=True)
    bank = layer.experts
    _expect("hidden_size", config.hidden_size, layer.d_model)
    _expect("num_local_experts", config.num_local_experts, layer.num_experts)
    _expect("num_experts_per_tok", config.num_experts_per_tok, layer.router.k)
    _expect("intermediate_size", config.intermediate_size, bank.hidden)
    _expect("swiglu_alpha", config.swiglu_alpha, bank.alpha)
    _expect("swiglu_limit", config.swiglu_limit, bank.limit)
    _expect("renormalisation of the top-k weights", True, layer.router.normalize)
    block = GptOssMLP(config).to(bank.w1)
    with torch.no_grad():
        block.router.weight.copy_(layer.router.w_gate.T)
        block.router.bias.copy_(layer.router.b_gate)
        gate, up = bank.w1.chunk(2, dim=-1)
        block.experts.gate_up_proj.copy_(torch.stack([gate, up], dim=-1).flatten(-2))
        gate_b, up_b = bank.b1.chunk(2, dim=-1)
        block.experts.gate_up_proj_bias.copy_(torch.stack([gate_b, up_b], dim=-1).flatten(-2))
        block.experts.down_proj.copy_(bank.w2)
        block.experts.down_proj_bias.copy_(bank.b2)
    return block.train(layer.training)

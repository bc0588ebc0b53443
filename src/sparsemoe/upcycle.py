"""Sparse upcycling (Komatsuzaki et al. 2022): a dense model's feed-forward block becomes an MoE.

Each of the ``n`` experts starts as a copy of the dense block (optionally perturbed), and a new
router chooses ``k`` of them per token. With identical copies and top-k weights renormalised to
sum to 1 (:class:`~sparsemoe.routers.TopKRouter` ``normalize=True``, Mixtral's routing), the
upcycled block computes ``Σ_j w_j E(x) = E(x)``: the dense model's output, whatever the router.

:func:`upcycle` takes a dense block (``nn.Sequential(Linear, activation, Linear)`` or a
``gate_proj``/``up_proj``/``down_proj`` gated MLP as in Llama) and returns a
:class:`~sparsemoe.layers.MoELayer`; given a ``transformers`` Llama, Mistral or Qwen2 causal
LM it returns the matching MoE model (Mixtral, Mixtral, Qwen2-MoE), which ``save_pretrained``
writes and ``transformers`` loads as any checkpoint of that class.
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_int, check_number, check_top_k
from .experts import FeedForwardExperts
from .layers import MoELayer
from .routers import TopKRouter

_PLAIN = {nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}


def _sequential_bank(block: nn.Sequential) -> FeedForwardExperts:
    up, act, down = block
    bias = up.bias is not None
    if (down.bias is not None) != bias:
        raise ValueError("block's two Linear layers must both have biases or neither")
    if type(act) not in _PLAIN or (isinstance(act, nn.GELU) and act.approximate != "none"):
        raise ValueError(f"block's activation must be one of "
                         f"{[c.__name__ for c in _PLAIN]} (exact GELU), got {act!r}")
    bank = FeedForwardExperts(1, up.in_features, up.out_features, activation=_PLAIN[type(act)],
                              bias=bias).to(up.weight)
    with torch.no_grad():
        bank.w1[0].copy_(up.weight.T)
        bank.w2[0].copy_(down.weight.T)
        if bias:
            bank.b1[0].copy_(up.bias)
            bank.b2[0].copy_(down.bias)
    return bank


def _dense_bank(block: nn.Module) -> FeedForwardExperts:
    """The dense block as a one-expert bank."""
    from .interop.transformers import _mlp_as_bank

    if (isinstance(block, nn.Sequential) and len(block) == 3
            and isinstance(block[0], nn.Linear) and isinstance(block[2], nn.Linear)):
        return _sequential_bank(block)
    if all(hasattr(block, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        if any(getattr(block, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError("a gated MLP with biases has no exact sparsemoe bank")
        return _mlp_as_bank(block)
    raise TypeError(f"block must be nn.Sequential(Linear, activation, Linear) or a gated MLP "
                    f"with gate_proj, up_proj, down_proj and act_fn, got {type(block).__name__}")


def upcycle_block(
    block: nn.Module, num_experts: int, k: int = 2, *, noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> MoELayer:
    """A dense feed-forward block as an MoE of ``num_experts`` copies and a new top-k router.

    ``E_e = E + noise · std(W) · ε_e`` for every weight ``W`` of the block (``ε_e`` standard
    normal, independent per expert; ``noise = 0``: exact copies). The router is a
    :class:`~sparsemoe.routers.TopKRouter` with ``normalize=True``, so with ``noise = 0`` the
    layer's output equals the block's for any router weights.

    Args:
        block: ``nn.Sequential(Linear(d, h), activation, Linear(h, d))`` or a gated MLP
            (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``: Llama, Mistral, Qwen2).
        num_experts: ``n``.
        k: experts per token.
        noise: relative stddev of the perturbation of each copy.
        generator: for the perturbation.

    Returns:
        An :class:`~sparsemoe.layers.MoELayer` on the block's device and dtype.
    """
    n = check_int("num_experts", num_experts)
    check_top_k("k", k, n)
    check_number("noise", noise, low=0)
    one = _dense_bank(block)
    bank = FeedForwardExperts(n, one.d_model, one.hidden, activation=one.activation,
                              bias=one.b1 is not None).to(one.w1)
    router = TopKRouter(one.d_model, n, k, normalize=True).to(one.w1)
    with torch.no_grad():
        for name, param in bank.named_parameters():
            dense = getattr(one, name)
            param.copy_(dense.expand_as(param))
            if noise:
                eps = torch.randn(param.shape, generator=generator).to(param)
                param.add_(noise * dense.std() * eps)
    return MoELayer(router, bank).train(block.training)


_MOE_OF = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe"}


def upcycle_model(model: nn.Module, num_experts: int, k: int = 2, *, noise: float = 0.0,
                  generator: torch.Generator | None = None) -> nn.Module:
    """A ``transformers`` Llama/Mistral (→ Mixtral) or Qwen2 (→ Qwen2-MoE) causal LM upcycled.

    Attention, norms, embeddings and head are copied; every MLP becomes ``num_experts`` copies
    (see :func:`upcycle_block`) behind a new router (the MoE class's own initialisation).
    Qwen2-MoE's shared expert starts at zero (its ``down_proj`` is zero), so it adds nothing
    until trained. With ``noise = 0`` the logits equal the dense model's.

    Returns:
        A new ``MixtralForCausalLM`` or ``Qwen2MoeForCausalLM`` on the model's device and dtype.
    """
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

    model_type = model.config.model_type
    if model_type not in _MOE_OF:
        raise TypeError(f"model must be a Llama, Mistral or Qwen2 causal LM, got model_type "
                        f"{model_type!r} ({type(model).__name__})")
    fields = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        fields.pop(key, None)
    h = model.config.intermediate_size
    if _MOE_OF[model_type] == "mixtral":
        config = MixtralConfig(**fields)
        config.num_local_experts, config.num_experts_per_tok = num_experts, k
    else:
        config = Qwen2MoeConfig(**fields)
        config.num_experts, config.num_experts_per_tok = num_experts, k
        config.moe_intermediate_size, config.shared_expert_intermediate_size = h, h
        config.norm_topk_prob, config.decoder_sparse_step, config.mlp_only_layers = True, 1, []
    param = next(model.parameters())
    moe = AutoModelForCausalLM.from_config(config, dtype=param.dtype).to(param.device)
    dense_state = model.state_dict()
    missing = moe.load_state_dict({k_: v for k_, v in dense_state.items() if ".mlp." not in k_},
                                  strict=False).missing_keys
    unexpected = [key for key in missing if ".mlp." not in key]
    if unexpected:
        raise RuntimeError(f"the {type(moe).__name__} has weights the dense model lacks: "
                           f"{unexpected[:5]}")
    for dense_layer, moe_layer in zip(model.model.layers, moe.model.layers, strict=True):
        layer = upcycle_block(dense_layer.mlp, num_experts, k, noise=noise, generator=generator)
        block = moe_layer.mlp
        with torch.no_grad():
            block.experts.gate_up_proj.copy_(layer.experts.w1.transpose(1, 2))
            block.experts.down_proj.copy_(layer.experts.w2.transpose(1, 2))
            if hasattr(block, "shared_expert"):
                block.shared_expert.down_proj.weight.zero_()
    return moe.train(model.training)


def upcycle(module: nn.Module, num_experts: int, k: int = 2, *, noise: float = 0.0,
            generator: torch.Generator | None = None) -> nn.Module:
    """Sparse upcycling: :func:`upcycle_model` for a ``transformers`` causal LM (anything with
    a ``config``), :func:`upcycle_block` for a dense feed-forward block."""
    if hasattr(module, "config") and hasattr(module, "model"):
        return upcycle_model(module, num_experts, k, noise=noise, generator=generator)
    return upcycle_block(module, num_experts, k, noise=noise, generator=generator)

"""A whole :class:`~sparsemoe.models.transformer.MoETransformer` to and from ``transformers``'
``MixtralForCausalLM`` (Jiang et al. 2024), so that a model trained here continues in that
ecosystem (generation, fine-tuning, the Hub) and back.

The two compute the same function when the Transformer has Mixtral's architecture: the
``mixtral`` presets' RMSNorm, rotary positions in the rotate-half layout, no biases, an MoE
layer in every block with renormalised top-k routing (:class:`~sparsemoe.routers.TopKRouter`),
SwiGLU experts and no capacity. The MoE blocks are converted by
:func:`sparsemoe.interop.to_transformers` / :func:`~sparsemoe.interop.from_transformers`; the
attention's fused ``[W_q | W_k | W_v]`` is split into ``q_proj``, ``k_proj``, ``v_proj``.
Logits agree within float32 rounding (the tests hold them within 1e-5).
"""

from __future__ import annotations

import torch
from torch import nn

from ..experts import FeedForwardExperts
from ..models.transformer import MoETransformer, TransformerConfig
from ..routers import TopKRouter
from .transformers import from_transformers, to_transformers


def _check_exportable(model: MoETransformer) -> None:
    cfg = model.cfg
    needed = {"norm": "rms", "positions": "rotary", "activation": "swiglu", "router": "top-k",
              "moe_every": 1, "capacity_factor": None}
    wrong = {k: getattr(cfg, k) for k, v in needed.items() if getattr(cfg, k) != v}
    if wrong:
        raise ValueError(f"MixtralForCausalLM needs {needed}; the model's config has {wrong}")
    for layer in model.moe_layers():
        if not isinstance(layer.router, TopKRouter) or not layer.router.normalize or \
                not isinstance(layer.experts, FeedForwardExperts):
            raise ValueError("every MoE layer must have a renormalising TopKRouter and "
                             f"FeedForwardExperts, got {type(layer.router).__name__} "
                             f"(normalize={getattr(layer.router, 'normalize', None)}) and "
                             f"{type(layer.experts).__name__}")


def mixtral_config(cfg: TransformerConfig):
    """The ``transformers.MixtralConfig`` of a Mixtral-shaped :class:`TransformerConfig`."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
        intermediate_size=cfg.expert_hidden, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        head_dim=cfg.d_model // cfg.n_heads, max_position_embeddings=cfg.context,
        rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default",
                                                    "rope_theta": cfg.rope_theta},
        num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.k,
        router_aux_loss_coef=cfg.w_switch, tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=0.0, sliding_window=None, router_jitter_noise=0.0)


def to_mixtral(model: MoETransformer) -> nn.Module:
    """A ``transformers.MixtralForCausalLM`` with the model's weights (same device and dtype,
    evaluation mode).

    Raises:
        ValueError: the model is not Mixtral-shaped (see the module docstring).
    """
    from transformers import MixtralForCausalLM

    _check_exportable(model)
    config = mixtral_config(model.cfg)
    param = next(model.parameters())
    hf = MixtralForCausalLM(config).to(param).eval()
    d = model.cfg.d_model
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(model.embed.weight)
        for block, layer in zip(model.blocks, hf.model.layers, strict=True):
            layer.input_layernorm.weight.copy_(block.norm1.weight)
            layer.post_attention_layernorm.weight.copy_(block.norm2.weight)
            q, k, v = block.attn.qkv.weight.split(d)
            layer.self_attn.q_proj.weight.copy_(q)
            layer.self_attn.k_proj.weight.copy_(k)
            layer.self_attn.v_proj.weight.copy_(v)
            layer.self_attn.o_proj.weight.copy_(block.attn.proj.weight)
            layer.mlp.load_state_dict(to_transformers(block.ffn, config).state_dict())
        hf.model.norm.weight.copy_(model.norm.weight)
        if not model.cfg.tie_embeddings:
            hf.lm_head.weight.copy_(model.head.weight)
    return hf


def from_mixtral(hf: nn.Module, **overrides) -> MoETransformer:
    """An :class:`MoETransformer` with the weights of a ``transformers.MixtralForCausalLM``
    (same device and dtype, evaluation mode); ``overrides`` set config fields the checkpoint
    does not hold (e.g. ``dropout``). The experts' width is ``intermediate_size``, and the
    dense twin's ``ffn_hidden`` is ``k`` times it.

    Raises:
        ValueError: grouped-query attention, a sliding window or a non-default rotary type,
            which :class:`MoETransformer` does not have.
    """
    c = hf.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = c.rope_parameters
    if c.num_key_value_heads != c.num_attention_heads or c.sliding_window is not None or \
            rope.get("rope_type", "default") != "default" or \
            head_dim * c.num_attention_heads != c.hidden_size:
        raise ValueError("from_mixtral needs full multi-head attention (num_key_value_heads = "
                         "num_attention_heads, head_dim = hidden_size / heads), no sliding "
                         f"window and default rotary positions; got num_key_value_heads="
                         f"{c.num_key_value_heads}, num_attention_heads={c.num_attention_heads}, "
                         f"head_dim={head_dim}, sliding_window={c.sliding_window}, "
                         f"rope={rope}")
    cfg = TransformerConfig(**{
        "vocab_size": c.vocab_size, "d_model": c.hidden_size, "n_layers": c.num_hidden_layers,
        "n_heads": c.num_attention_heads, "context": c.max_position_embeddings,
        "ffn_hidden": c.intermediate_size * c.num_experts_per_tok, "activation": "swiglu",
        "norm": "rms", "positions": "rotary", "rope_theta": float(rope["rope_theta"]),
        "norm_eps": c.rms_norm_eps, "tie_embeddings": c.tie_word_embeddings, "router": "top-k",
        "num_experts": c.num_local_experts, "k": c.num_experts_per_tok,
        "w_switch": c.router_aux_loss_coef, **overrides})
    param = next(hf.parameters())
    model = MoETransformer(cfg).to(param).eval()
    with torch.no_grad():
        model.embed.weight.copy_(hf.model.embed_tokens.weight)
        for block, layer in zip(model.blocks, hf.model.layers, strict=True):
            block.norm1.weight.copy_(layer.input_layernorm.weight)
            block.norm2.weight.copy_(layer.post_attention_layernorm.weight)
            block.attn.qkv.weight.copy_(torch.cat([layer.self_attn.q_proj.weight,
                                                   layer.self_attn.k_proj.weight,
                                                   layer.self_attn.v_proj.weight]))
            block.attn.proj.weight.copy_(layer.self_attn.o_proj.weight)
            block.ffn.load_state_dict(from_transformers(layer.mlp).state_dict())
        model.norm.weight.copy_(hf.model.norm.weight)
        if not cfg.tie_embeddings:
            model.head.weight.copy_(hf.lm_head.weight)
    return model

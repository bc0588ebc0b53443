"""Sparse upcycling (Komatsuzaki et al. 2022): a dense model's feed-forward block becomes an MoE.

Each of the ``n`` experts starts as a copy of the dense block (optionally perturbed), and a new
router chooses ``k`` of them per token. With identical copies and top-k weights renormalised to
sum to 1 (:class:`~sparsemoe.routers.TopKRouter` ``normalize=True``, Mixtral's routing), the
upcycled block computes ``Σ_j w_j E(x) = E(x)``: the dense model's output, whatever the router.

:func:`upcycle` takes a dense block (``nn.Sequential(Linear, activation, Linear)``, a
``gate_proj``/``up_proj``/``down_proj`` gated MLP as in Llama, or the
:class:`~sparsemoe.models.transformer.DenseFeedForward` of our Transformer) and returns a
:class:`~sparsemoe.layers.MoELayer`; given a dense
:class:`~sparsemoe.models.transformer.MoETransformer` it returns the MoETransformer whose FFNs
(all, or every ``moe_every``-th) are such MoE layers (:func:`upcycle_transformer`); given a
``transformers`` Llama, Mistral or Qwen2 causal LM it returns the matching MoE model (Mixtral,
Mixtral, Qwen2-MoE), which ``save_pretrained`` writes and ``transformers`` loads as any
checkpoint of that class.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ._checks import check_int, check_number, check_top_k
from .experts import FeedForwardExperts
from .layers import MoELayer
from .models.transformer import ROUTING_FIELDS, DenseFeedForward, MoETransformer, TransformerConfig
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
    if isinstance(block, DenseFeedForward):
        return block.bank
    if all(hasattr(block, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        if any(getattr(block, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError("a gated MLP with biases has no exact sparsemoe bank")
        return _mlp_as_bank(block)
    raise TypeError(f"block must be nn.Sequential(Linear, activation, Linear), a gated MLP "
                    f"with gate_proj, up_proj, down_proj and act_fn, or a DenseFeedForward, got "
                    f"{type(block).__name__}")


def _upcycled_bank(block: nn.Module, num_experts: int, noise: float,
                   generator: torch.Generator | None) -> FeedForwardExperts:
    """``num_experts`` copies of the dense block, each weight ``W`` perturbed by
    ``noise · std(W) · ε_e`` (see :func:`upcycle_block`)."""
    check_int("num_experts", num_experts)
    check_number("noise", noise, low=0)
    one = _dense_bank(block)
    bank = FeedForwardExperts(num_experts, one.d_model, one.hidden, activation=one.activation,
                              bias=one.b1 is not None).to(one.w1)
    with torch.no_grad():
        for name, param in bank.named_parameters():
            dense = getattr(one, name)
            param.copy_(dense.expand_as(param))
            if noise:
                eps = torch.randn(param.shape, generator=generator).to(param)
                param.add_(noise * dense.std() * eps)
    return bank


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
        block: ``nn.Sequential(Linear(d, h), activation, Linear(h, d))``, a gated MLP
            (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``: Llama, Mistral, Qwen2) or a
            :class:`~sparsemoe.models.transformer.DenseFeedForward`.
        num_experts: ``n``.
        k: experts per token.
        noise: relative stddev of the perturbation of each copy.
        generator: for the perturbation.

    Returns:
        An :class:`~sparsemoe.layers.MoELayer` on the block's device and dtype.
    """
    n = check_int("num_experts", num_experts)
    check_top_k("k", k, n)
    bank = _upcycled_bank(block, n, noise, generator)
    router = TopKRouter(bank.d_model, n, k, normalize=True).to(bank.w1)
    return MoELayer(router, bank).train(block.training)


def upcycled_config(cfg: TransformerConfig, num_experts: int, k: int = 2,
                    moe_every: int = 1) -> TransformerConfig:
    """The :class:`~sparsemoe.models.transformer.TransformerConfig` of a dense config upcycled:
    Mixtral's routing (``"top-k"``, renormalised) over ``num_experts`` experts as wide as the
    dense FFN (``hidden = ffn_hidden``), every ``moe_every``-th layer.

    Raises:
        ValueError: ``cfg`` is not dense (``router != "none"``), or a bad count.
    """
    if cfg.router != "none":
        raise ValueError(f"model must be a dense MoETransformer (router 'none'), got router "
                         f"{cfg.router!r}")
    n = check_int("num_experts", num_experts)
    check_top_k("k", k, n)
    check_int("moe_every", moe_every)
    if moe_every > cfg.n_layers:
        raise ValueError(f"moe_every must be <= n_layers ({cfg.n_layers}) for any layer to be "
                         f"upcycled, got {moe_every}")
    default = TransformerConfig()
    routing = {name: getattr(default, name) for name in ROUTING_FIELDS}
    return replace(cfg, **{**routing, "router": "top-k", "num_experts": n, "k": k,
                           "hidden": cfg.ffn_hidden, "moe_every": moe_every})


def upcycle_transformer(model: MoETransformer, num_experts: int, k: int = 2, *,
                        moe_every: int = 1, noise: float = 0.0,
                        generator: torch.Generator | None = None) -> MoETransformer:
    """A dense :class:`~sparsemoe.models.transformer.MoETransformer` upcycled.

    The new model has :func:`upcycled_config`; attention, norms, embeddings and head are
    copied, and the FFN of every layer ``i`` with ``i % moe_every == moe_every - 1`` becomes
    ``num_experts`` copies of it (:func:`upcycle_block`'s, ``noise`` and ``generator`` as
    there) behind a new router: the config's :class:`~sparsemoe.routers.TopKRouter`
    (``normalize=True``, Switch loss ``w_switch``) with its own random initialisation. With
    ``noise = 0`` the logits equal the dense model's ``[B, L, V]`` for any router weights.

    Returns:
        A new MoETransformer on the model's device and dtype, in the model's training mode.
    """
    if not isinstance(model, MoETransformer):
        raise TypeError(f"model must be a MoETransformer, got {type(model).__name__}")
    cfg = upcycled_config(model.cfg, num_experts, k, moe_every)
    moe = MoETransformer(cfg).to(next(model.parameters()))
    upcycled = [f"blocks.{i}.ffn." for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    kept = {name: t for name, t in model.state_dict().items()
            if not name.startswith(tuple(upcycled))}
    result = moe.load_state_dict(kept, strict=False)
    assert not result.unexpected_keys and all(
        name.startswith(tuple(upcycled)) for name in result.missing_keys), result
    for i, (dense_block, moe_block) in enumerate(zip(model.blocks, moe.blocks, strict=True)):
        if cfg.is_moe_layer(i):
            moe_block.ffn.experts.load_state_dict(
                _upcycled_bank(dense_block.ffn, cfg.num_experts, noise, generator).state_dict())
    return moe.train(model.training)


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

    check_top_k("k", k, check_int("num_experts", num_experts))
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
        bank = _upcycled_bank(dense_layer.mlp, num_experts, noise, generator)
        block = moe_layer.mlp
        with torch.no_grad():
            block.experts.gate_up_proj.copy_(bank.w1.transpose(1, 2))
            block.experts.down_proj.copy_(bank.w2.transpose(1, 2))
            if hasattr(block, "shared_expert"):
                block.shared_expert.down_proj.weight.zero_()
    return moe.train(model.training)


def upcycle(module: nn.Module, num_experts: int, k: int = 2, *, noise: float = 0.0,
            generator: torch.Generator | None = None, moe_every: int = 1) -> nn.Module:
    """Sparse upcycling: :func:`upcycle_transformer` for a dense
    :class:`~sparsemoe.models.transformer.MoETransformer` (the only kind ``moe_every`` applies
    to), :func:`upcycle_model` for a ``transformers`` causal LM (anything with a ``config``),
    :func:`upcycle_block` for a dense feed-forward block."""
    if isinstance(module, MoETransformer):
        return upcycle_transformer(module, num_experts, k, moe_every=moe_every, noise=noise,
                                   generator=generator)
    if moe_every != 1:
        raise ValueError(f"moe_every applies to a MoETransformer only; got moe_every="
                         f"{moe_every} for a {type(module).__name__}")
    if hasattr(module, "config") and hasattr(module, "model"):
        return upcycle_model(module, num_experts, k, noise=noise, generator=generator)
    return upcycle_block(module, num_experts, k, noise=noise, generator=generator)

"""Exact conversion to and from the MoE blocks of ``transformers``.

Supported blocks (``transformers`` ≥ 5 stores stacked experts as 3-D parameters
``gate_up_proj [n, 2h, d]`` and ``down_proj [n, d, h]``; Switch keeps one ``nn.Linear`` pair per
expert):

=============================  ==============================================================
``MixtralSparseMoeBlock``      :class:`~sparsemoe.routers.TopKRouter` (``normalize=True``),
                               SwiGLU :class:`~sparsemoe.experts.FeedForwardExperts`
``OlmoeSparseMoeBlock``        ``TopKRouter(normalize=norm_topk_prob)`` (False for OLMoE)
``Qwen3MoeSparseMoeBlock``     ``TopKRouter(normalize=norm_topk_prob)``
``Qwen2MoeSparseMoeBlock``     :class:`~sparsemoe.dense_paths.SharedExpertMoE` with the shared
                               expert and its sigmoid gate
``SwitchTransformersSparseMLP`` :class:`~sparsemoe.routers.SwitchRouter`, ReLU experts and
                               ``Capacity(tokens=expert_capacity, group="sequence")``
``DeepseekV3MoE``              :class:`~sparsemoe.dense_paths.SharedExpertMoE` with a
                               :class:`~sparsemoe.routers.DeepSeekV3Router` (sigmoid,
                               group-limited, ``e_score_correction_bias`` as ``expert_bias``)
                               and the shared experts as one SwiGLU expert
=============================  ==============================================================

In evaluation mode the converted layer's output equals the block's given the same weights (the
tests hold them within 1e-5 in float32). Training-time randomness is not carried over
bit for bit: Mixtral's optional ``router_jitter_noise`` (off by default) is not part of the
Mixtral paper and is dropped; the Switch jitter is kept, applied to the router input only as in
the paper. The auxiliary-loss weights are the papers' defaults (see each router), not the
``router_aux_loss_coef`` of a ``transformers`` model config, which lives outside the block.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..capacity import Capacity
from ..dense_paths import SharedExpertMoE
from ..experts import FeedForwardExperts
from ..layers import MoELayer
from ..routers import DeepSeekV3Router, SwitchRouter, TopKRouter

SUPPORTED_BLOCKS = (
    "DeepseekV3MoE",
    "MixtralSparseMoeBlock",
    "OlmoeSparseMoeBlock",
    "Qwen2MoeSparseMoeBlock",
    "Qwen3MoeSparseMoeBlock",
    "SwitchTransformersSparseMLP",
)

_TARGETS = {  # config.model_type -> (module, block class)
    "deepseek_v3": ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3MoE"),
    "mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock"),
    "olmoe": ("transformers.models.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock"),
    "qwen2_moe": ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock"),
    "qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    "switch_transformers": (
        "transformers.models.switch_transformers.modeling_switch_transformers",
        "SwitchTransformersSparseMLP",
    ),
}

# transformers' activation names -> the expert activation (gated for the stacked SwiGLU blocks)
_GATED = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}
_PLAIN = {"relu": "relu", "gelu": "gelu", "silu": "silu", "swish": "silu"}


def _activation_name(act: nn.Module) -> str:
    """The ``transformers`` name of an activation module (only the exact ones we support)."""
    name = type(act).__name__
    if name in ("SiLUActivation", "SiLU"):
        return "silu"
    if name == "GELUActivation":
        return "gelu"
    if name == "ReLU":
        return "relu"
    raise ValueError(f"the block's activation {name} has no exact sparsemoe equivalent; "
                     f"supported: SiLU, GELU (erf), ReLU")


def _stacked_experts(experts: nn.Module) -> FeedForwardExperts:
    """``gate_up_proj [n, 2h, d]``, ``down_proj [n, d, h]`` -> SwiGLU/GeGLU stacked experts."""
    if not hasattr(experts, "gate_up_proj"):
        raise TypeError(f"the block's experts ({type(experts).__name__}) are not stored as "
                        f"stacked 3-D parameters; sparsemoe.interop needs transformers >= 5")
    n, two_h, d = experts.gate_up_proj.shape
    bank = FeedForwardExperts(n, d, two_h // 2, activation=_GATED[_activation_name(experts.act_fn)])
    bank.to(experts.gate_up_proj)
    with torch.no_grad():
        bank.w1.copy_(experts.gate_up_proj.transpose(1, 2))  # [n, d, 2h] = [W_gate | W_up]
        bank.w2.copy_(experts.down_proj.transpose(1, 2))  # [n, h, d]
    return bank


def _top_k_router(gate: nn.Module, normalize: bool, w_z: float = 0.0) -> TopKRouter:
    n, d = gate.weight.shape
    router = TopKRouter(d, n, gate.top_k, normalize=normalize, w_z=w_z).to(gate.weight)
    with torch.no_grad():
        router.w_gate.copy_(gate.weight.T)
    return router


def _mlp_as_bank(mlp: nn.Module) -> FeedForwardExperts:
    """A ``gate_proj``/``up_proj``/``down_proj`` MLP as a one-expert SwiGLU bank."""
    h, d = mlp.gate_proj.weight.shape
    bank = FeedForwardExperts(1, d, h, activation=_GATED[_activation_name(mlp.act_fn)])
    bank.to(mlp.gate_proj.weight)
    with torch.no_grad():
        bank.w1[0].copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).T)
        bank.w2[0].copy_(mlp.down_proj.weight.T)
    return bank


def _switch(block: nn.Module) -> MoELayer:
    r = block.router
    n, d = r.classifier.weight.shape
    experts = [block.experts[f"expert_{e}"] for e in range(n)]
    hidden = experts[0].wi.weight.shape[0]
    act = _PLAIN[_activation_name(experts[0].act)]
    router = SwitchRouter(d, n, jitter=r.jitter_noise, bias=r.classifier.bias is not None)
    bank = FeedForwardExperts(n, d, hidden, activation=act)
    router.to(r.classifier.weight)
    bank.to(r.classifier.weight)
    with torch.no_grad():
        router.w_gate.copy_(r.classifier.weight.T)
        if r.classifier.bias is not None:
            router.b_gate.copy_(r.classifier.bias)
        bank.w1.copy_(torch.stack([e.wi.weight.T for e in experts]))
        bank.w2.copy_(torch.stack([e.wo.weight.T for e in experts]))
    # transformers counts the capacity per sequence, in token order; a dropped token gets 0.
    capacity = Capacity(tokens=r.expert_capacity, minimum=0, group="sequence")
    return MoELayer(router, bank, capacity=capacity)


def _deepseek_v3(block: nn.Module) -> SharedExpertMoE:
    g = block.gate
    n, d = g.weight.shape
    router = DeepSeekV3Router(d, n, g.top_k, groups=g.num_group, top_groups=g.topk_group,
                              normalize=g.norm_topk_prob,
                              routed_scaling_factor=g.routed_scaling_factor).to(g.weight)
    with torch.no_grad():
        router.w_gate.copy_(g.weight.T)
        router.expert_bias.copy_(g.e_score_correction_bias)
    return SharedExpertMoE(router, _stacked_experts(block.experts),
                           _mlp_as_bank(block.shared_experts)).to(g.weight)


def from_transformers(block: nn.Module) -> MoELayer:
    """A sparsemoe layer computing what a ``transformers`` MoE block computes.

    Args:
        block: one of :data:`SUPPORTED_BLOCKS` (the ``mlp`` of a decoder layer, or the
            ``mlp`` of a Switch Transformers ``LayerFF``).

    Returns:
        An :class:`~sparsemoe.layers.MoELayer` (a :class:`~sparsemoe.dense_paths.SharedExpertMoE`
        for Qwen2-MoE and DeepSeek-V3) with copies of the block's weights, on the block's
        device and dtype.
        Set ``.eval()`` on both for identical outputs.
    """
    name = type(block).__name__
    if name == "SwitchTransformersSparseMLP":
        layer = _switch(block)
    elif name in ("MixtralSparseMoeBlock", "OlmoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock"):
        normalize = getattr(block.gate, "norm_topk_prob", True)  # Mixtral always renormalises
        layer = MoELayer(_top_k_router(block.gate, normalize), _stacked_experts(block.experts))
    elif name == "DeepseekV3MoE":
        layer = _deepseek_v3(block)
    elif name == "Qwen2MoeSparseMoeBlock":
        layer = SharedExpertMoE(
            _top_k_router(block.gate, block.gate.norm_topk_prob),
            _stacked_experts(block.experts), _mlp_as_bank(block.shared_expert), shared_gate=True,
        ).to(block.gate.weight)
        with torch.no_grad():
            layer.w_shared_gate.copy_(block.shared_expert_gate.weight.T)
    else:
        raise TypeError(f"block must be one of {SUPPORTED_BLOCKS}, got {name}")
    return layer.train(block.training)


def _expect(what: str, config_value: object, layer_value: object) -> None:
    if config_value != layer_value:
        raise ValueError(f"config {what} is {config_value!r} but the layer has {layer_value!r}; "
                         f"build the config from the layer's sizes")


def _export_stacked(bank: FeedForwardExperts, experts: nn.Module) -> None:
    with torch.no_grad():
        experts.gate_up_proj.copy_(bank.w1.transpose(1, 2))
        experts.down_proj.copy_(bank.w2.transpose(1, 2))


def _check_bias_free_dropless(layer: MoELayer) -> None:
    """The transformers blocks have no biases, no capacity and no expert output masking."""
    if layer.experts.b1 is not None or layer.router.b_gate is not None:
        raise ValueError("the target block has no biases, but the layer's router or experts do")
    if layer.capacity is not None or layer.expert_output_masking:
        raise ValueError("the target block is dropless and unmasked; the layer has a capacity "
                         "or expert output masking")


def _check_convertible(layer: MoELayer, config, n: int, hidden: int) -> None:
    router, bank = layer.router, layer.experts
    if not isinstance(router, TopKRouter) or not isinstance(bank, FeedForwardExperts):
        raise TypeError("the layer must have a TopKRouter and FeedForwardExperts for this "
                        f"block, got {type(router).__name__} and {type(bank).__name__}")
    _check_bias_free_dropless(layer)
    _expect("hidden_size", config.hidden_size, router.d_model)
    _expect("number of experts", n, router.num_experts)
    _expect("num_experts_per_tok", config.num_experts_per_tok, router.k)
    _expect("expert hidden size", hidden, bank.hidden)
    _expect("hidden_act", _GATED.get(config.hidden_act), bank.activation)


def to_transformers(layer: MoELayer, config) -> nn.Module:
    """The ``transformers`` block of ``config``'s model type with the layer's weights.

    Args:
        layer: a layer as returned by :func:`from_transformers` (same router, experts and
            options as the target block).
        config: a ``MixtralConfig``, ``OlmoeConfig``, ``Qwen2MoeConfig``, ``Qwen3MoeConfig``,
            ``SwitchTransformersConfig`` or ``DeepseekV3Config`` whose sizes match the layer.

    Returns:
        The block, on the layer's device and dtype, in the layer's training mode.

    Raises:
        ValueError: a size or option of ``config`` does not match the layer.
    """
    import importlib

    model_type = getattr(config, "model_type", None)
    if model_type not in _TARGETS:
        raise TypeError(f"config must be one of the configs of {SUPPORTED_BLOCKS}, got "
                        f"{type(config).__name__} (model_type {model_type!r})")
    module, cls = _TARGETS[model_type]
    param = next(layer.parameters())
    if model_type == "switch_transformers":
        router, bank = layer.router, layer.experts
        if not isinstance(router, SwitchRouter) or not isinstance(bank, FeedForwardExperts):
            raise TypeError("a Switch block needs a SwitchRouter and FeedForwardExperts, got "
                            f"{type(router).__name__} and {type(bank).__name__}")
        _expect("d_model", config.d_model, router.d_model)
        _expect("num_experts", config.num_experts, router.num_experts)
        _expect("d_ff", config.d_ff, bank.hidden)
        _expect("dense_act_fn", _PLAIN.get(config.dense_act_fn), bank.activation)
        _expect("router_bias", config.router_bias, router.b_gate is not None)
        _expect("router_jitter_noise", config.router_jitter_noise, router.jitter)
        expected = Capacity(tokens=config.expert_capacity, minimum=0, group="sequence")
        _expect("expert_capacity (as a Capacity)", expected, layer.capacity)
        if bank.b1 is not None:
            raise ValueError("the Switch experts have no biases, but the layer's experts do")
    elif model_type == "deepseek_v3":
        _check_deepseek_v3(layer, config)
    elif model_type == "qwen2_moe":
        if not isinstance(layer, SharedExpertMoE) or layer.w_shared_gate is None:
            raise TypeError("a Qwen2-MoE block needs a SharedExpertMoE with shared_gate=True, "
                            f"got {type(layer).__name__}")
        _check_convertible(layer, config, config.num_experts, config.moe_intermediate_size)
        _expect("norm_topk_prob", config.norm_topk_prob, layer.router.normalize)
        _check_shared_bank(layer, config, config.shared_expert_intermediate_size)
    else:
        n = config.num_local_experts if model_type == "mixtral" else config.num_experts
        hidden = config.intermediate_size if model_type != "qwen3_moe" else (
            config.moe_intermediate_size)
        _check_convertible(layer, config, n, hidden)
        _expect("renormalisation of the top-k weights",
                True if model_type == "mixtral" else config.norm_topk_prob, layer.router.normalize)
    block = getattr(importlib.import_module(module), cls)(config).to(param)
    with torch.no_grad():
        if model_type == "switch_transformers":
            block.router.classifier.weight.copy_(layer.router.w_gate.T)
            if layer.router.b_gate is not None:
                block.router.classifier.bias.copy_(layer.router.b_gate)
            for e in range(config.num_experts):
                block.experts[f"expert_{e}"].wi.weight.copy_(layer.experts.w1[e].T)
                block.experts[f"expert_{e}"].wo.weight.copy_(layer.experts.w2[e].T)
        else:
            block.gate.weight.copy_(layer.router.w_gate.T)
            _export_stacked(layer.experts, block.experts)
        if model_type == "qwen2_moe":
            _export_shared(layer, block)
        if model_type == "deepseek_v3":
            block.gate.e_score_correction_bias.copy_(layer.router.expert_bias)
            _export_mlp(layer.shared_experts, block.shared_experts)
    return block.train(layer.training)


def _export_mlp(bank: FeedForwardExperts, mlp: nn.Module) -> None:
    """A one-expert SwiGLU bank into a ``gate_proj``/``up_proj``/``down_proj`` MLP."""
    w1: Tensor = bank.w1[0]  # [d, 2h] = [W_gate | W_up]
    gate, up = w1.T.chunk(2)
    mlp.gate_proj.weight.copy_(gate)
    mlp.up_proj.weight.copy_(up)
    mlp.down_proj.weight.copy_(bank.w2[0].T)


def _export_shared(layer: SharedExpertMoE, block: nn.Module) -> None:
    _export_mlp(layer.shared_experts, block.shared_expert)
    block.shared_expert_gate.weight.copy_(layer.w_shared_gate.T)


def _check_shared_bank(layer: SharedExpertMoE, config, hidden: int) -> None:
    shared = layer.shared_experts
    if (not isinstance(shared, FeedForwardExperts) or shared.num_experts != 1
            or shared.b1 is not None):
        raise ValueError("the target block has one bias-free shared expert MLP; the layer's "
                         f"shared_experts is {shared!r}")
    _expect("shared expert intermediate size", hidden, shared.hidden)
    _expect("hidden_act of the shared expert", _GATED.get(config.hidden_act), shared.activation)


def _check_deepseek_v3(layer: MoELayer, config) -> None:
    if (not isinstance(layer, SharedExpertMoE) or layer.w_shared_gate is not None
            or not isinstance(layer.router, DeepSeekV3Router)
            or not isinstance(layer.experts, FeedForwardExperts)):
        raise TypeError("a DeepSeek-V3 block needs a SharedExpertMoE without a shared gate, "
                        "with a DeepSeekV3Router and FeedForwardExperts, got "
                        f"{type(layer).__name__} with {type(layer.router).__name__}")
    router, bank = layer.router, layer.experts
    _check_bias_free_dropless(layer)
    _expect("hidden_size", config.hidden_size, router.d_model)
    _expect("n_routed_experts", config.n_routed_experts, router.num_experts)
    _expect("num_experts_per_tok", config.num_experts_per_tok, router.k)
    _expect("n_group", config.n_group, router.groups)
    _expect("topk_group", config.topk_group, router.top_groups)
    _expect("norm_topk_prob", config.norm_topk_prob, router.normalize)
    _expect("routed_scaling_factor", config.routed_scaling_factor, router.routed_scaling_factor)
    _expect("moe_intermediate_size", config.moe_intermediate_size, bank.hidden)
    _expect("hidden_act", _GATED.get(config.hidden_act), bank.activation)
    _check_shared_bank(layer, config, config.moe_intermediate_size * config.n_shared_experts)

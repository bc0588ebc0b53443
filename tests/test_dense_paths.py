"""Shared experts (DeepSeekMoE, Qwen2-MoE) and NLLB's conditional MoE."""

import pytest
import torch
from helpers import check_against_reference, reference_experts, router_logits
from reference import dense_moe, ffn_expert, naive_aux, naive_softmax, naive_top_k

from sparsemoe import ConditionalMoE, FeedForwardExperts, SharedExpertMoE, aux_loss
from sparsemoe.routers import GShardRouter, TopKRouter


def bank_expert(p, prefix, s, activation):
    return lambda x: ffn_expert(x, p[f"{prefix}.w1"][s], None, p[f"{prefix}.w2"][s], None,
                                activation)


def routed_top_k(layer, p, x):
    r = layer.router
    logits = router_logits(p, x)
    probs = naive_softmax(logits)
    gates = naive_top_k(probs, r.k, r.normalize)
    aux = naive_aux(r, logits, probs, gates, (gates > 0).to(gates.dtype))
    return dense_moe(x, gates, reference_experts(layer, p)), aux


def shared_reference(layer, p, x, noise):
    y, aux = routed_top_k(layer, p, x)
    shared = sum(bank_expert(p, "shared_experts", s, "swiglu")(x)
                 for s in range(layer.shared_experts.num_experts))
    if layer.w_shared_gate is not None:
        shared = torch.sigmoid(x @ p["w_shared_gate"]) * shared
    return y + shared, aux


@pytest.mark.parametrize("n_shared,gated", [(1, True), (2, False), (3, True)])
def test_shared_expert_moe_equals_reference(n_shared, gated):
    torch.manual_seed(n_shared)
    layer = SharedExpertMoE(TopKRouter(6, 4, 2, normalize=False),
                            FeedForwardExperts(4, 6, 5, activation="swiglu"),
                            FeedForwardExperts(n_shared, 6, 7, activation="swiglu"),
                            shared_gate=gated)
    if gated:
        with torch.no_grad():
            layer.w_shared_gate.normal_()
    check_against_reference(layer, torch.randn(2, 9, 6), shared_reference)
    if gated:  # the gate learns
        assert layer.w_shared_gate.grad is None
        layer(torch.randn(5, 6)).sum().backward()
        assert layer.w_shared_gate.grad.abs().sum() > 0


def conditional_reference(layer, p, x, noise):
    y, aux = routed_top_k(layer, p, x)
    if not layer.training:
        y = y * (1 - layer.expert_output_masking)
    g = torch.sigmoid(x @ p["w_cmr"] + p["b_cmr"])
    dense = bank_expert(p, "dense", 0, "relu")(x)
    aux = aux + layer.w_budget * (g.mean() - layer.budget).abs()
    return (1 - g) * dense + g * y, aux


@pytest.mark.parametrize("training", [True, False])
def test_conditional_moe_equals_reference(training):
    torch.manual_seed(0)
    layer = ConditionalMoE(TopKRouter(6, 4, 2), FeedForwardExperts(4, 6, 5),
                           FeedForwardExperts(1, 6, 8),
                           gate_dropout=0.0 if training else 0.1,
                           expert_output_masking=0.0 if training else 0.2).train(training)
    with torch.no_grad():
        layer.w_cmr.normal_()
    check_against_reference(layer, torch.randn(3, 7, 6), conditional_reference)


def test_conditional_moe_randomness_and_budget_loss():
    torch.manual_seed(0)
    layer = ConditionalMoE(GShardRouter(6, 4), FeedForwardExperts(4, 6, 5),
                           FeedForwardExperts(1, 6, 8), gate_dropout=0.5, budget=0.8, w_budget=1.0)
    x = torch.randn(4000, 6)
    layer(x)
    g = layer.gate
    assert (g == 0).float().mean().item() == pytest.approx(0.5, abs=0.03)  # gate dropout
    torch.testing.assert_close(g[g > 0], torch.full_like(g[g > 0], 1.0))  # σ(0)/(1-0.5)
    # EOM 0.2 on top of GShard's random second expert: about 0.8·(1 + E[2·g2]) pairs per token
    assert layer.stats.tokens_per_expert.sum() < 0.85 * 2 * 4000
    router_aux = layer.router(x).aux_loss
    assert aux_loss(layer).item() == pytest.approx(router_aux.item() + abs(g.mean().item() - 0.8),
                                                   abs=1e-5)


def test_dense_path_arguments():
    with pytest.raises(ValueError, match="dense must be a one-expert bank, got 2 experts"):
        ConditionalMoE(TopKRouter(4, 2, 1), FeedForwardExperts(2, 4, 4),
                       FeedForwardExperts(2, 4, 4))
    with pytest.raises(ValueError, match="shared_experts has d_model 5 but the router has 4"):
        SharedExpertMoE(TopKRouter(4, 2, 1), FeedForwardExperts(2, 4, 4),
                        FeedForwardExperts(1, 5, 4))
    with pytest.raises(TypeError, match="shared_experts must be an expert bank"):
        SharedExpertMoE(TopKRouter(4, 2, 1), FeedForwardExperts(2, 4, 4), torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"budget must be a number in \[0, 1\], got 1.5"):
        ConditionalMoE(TopKRouter(4, 2, 1), FeedForwardExperts(2, 4, 4),
                       FeedForwardExperts(1, 4, 4), budget=1.5)


def test_shared_module_is_a_deprecated_alias_of_dense_paths():
    import importlib
    import sys

    sys.modules.pop("sparsemoe.shared", None)
    with pytest.warns(DeprecationWarning, match="sparsemoe.dense_paths"):
        shared = importlib.import_module("sparsemoe.shared")
    assert shared.SharedExpertMoE is SharedExpertMoE and shared.ConditionalMoE is ConditionalMoE

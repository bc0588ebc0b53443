"""BASE layers: balanced assignment in training, greedy at inference, h + σ(h·w_a)·f_a(h)."""

import pytest
import torch
from helpers import check_against_reference, reference_experts
from reference import dense_moe
from scipy.optimize import linear_sum_assignment

from sparsemoe import BASELayer, FeedForwardExperts
from sparsemoe.routers import BASERouter, TopKRouter
from sparsemoe.routers.base_layers import balanced_capacities


def base_layer(d, n, hidden=6):
    return BASELayer(BASERouter(d, n), FeedForwardExperts(n, d, hidden))


def base_reference(layer, p, x, noise):
    """h + σ(h·w_a)·f_a(h) with a from scipy's exact balanced assignment (training) or the
    arg-max (inference)."""
    scores = x @ p["router.w_gate"]
    t, n = scores.shape
    if layer.training:
        caps = balanced_capacities(t, n)
        cols = torch.repeat_interleave(torch.arange(n), caps)
        rows, picked = linear_sum_assignment(-scores[:, cols].detach().numpy())
        assign = [0] * t
        for r, c in zip(rows, picked, strict=True):
            assign[r] = int(cols[c])
    else:
        assign = [int(row.argmax()) for row in scores]
    gates = torch.zeros_like(scores)
    for i, a in enumerate(assign):
        gates[i, a] = torch.sigmoid(scores[i, a])
    return x + dense_moe(x, gates, reference_experts(layer, p)), x.new_zeros(())


@pytest.mark.parametrize("t,n", [(24, 4), (10, 4), (7, 1), (0, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_base_layer_equals_reference(t, n, training):
    torch.manual_seed(t + n)
    layer = base_layer(6, n).train(training)
    with torch.no_grad():
        layer.router.w_gate.normal_()
    check_against_reference(layer, torch.randn(t, 6), base_reference)


def test_exactly_t_over_n_tokens_per_expert_in_training():
    torch.manual_seed(0)
    layer = base_layer(8, 4)
    with torch.no_grad():
        layer.router.w_gate.normal_()
        layer.router.w_gate[:, 2] += 3.0  # every token prefers expert 2
    x = torch.randn(2, 16, 8)
    layer(x)
    assert layer.stats.tokens_per_expert.tolist() == [8, 8, 8, 8]
    layer.eval()
    layer(x)
    assert layer.stats.tokens_per_expert[2] > 8  # greedy at inference
    # gradient reaches the expert embeddings through σ(h·w_a)
    layer.train()
    layer(x).square().sum().backward()
    assert layer.router.w_gate.grad.abs().sum() > 0


def test_base_layer_needs_a_base_router():
    with pytest.raises(TypeError, match="router must be a BASERouter, got TopKRouter"):
        BASELayer(TopKRouter(4, 2, 1), FeedForwardExperts(2, 4, 4))

"""Soft MoE: slots as convex combinations of tokens, outputs as convex combinations of slots."""

import pytest
import torch
from helpers import check_against_reference, reference_experts
from reference import naive_soft_moe

from sparsemoe import FeedForwardExperts, SoftMoE
from sparsemoe.routers import SoftMoERouter, TopKRouter


def soft_layer(d, n, p, normalize=True, activation="relu"):
    return SoftMoE(SoftMoERouter(d, n, p, normalize=normalize),
                   FeedForwardExperts(n, d, 6, activation=activation))


def soft_reference(m):
    def reference(layer, p, x, noise):
        r = layer.router
        y, _ = naive_soft_moe(x.reshape(-1, m, x.shape[-1]), p["router.phi"],
                              p.get("router.scale"), r.slots_per_expert,
                              reference_experts(layer, p))
        return y.reshape(-1, x.shape[-1]), x.new_zeros(())
    return reference


@pytest.mark.parametrize("shape,n,p,normalize", [
    ((2, 5, 6), 3, 2, True), ((4, 6), 2, 1, False), ((2, 2, 3, 6), 4, 1, True),
    ((1, 1, 6), 1, 3, True),
])
def test_soft_moe_equals_slot_by_slot_reference(shape, n, p, normalize):
    torch.manual_seed(n + p)
    layer = soft_layer(6, n, p, normalize, activation="swiglu")
    with torch.no_grad():
        if normalize:
            layer.router.scale.fill_(3.0)  # sharper than at initialisation
    check_against_reference(layer, torch.randn(*shape), soft_reference(shape[-2]))
    assert layer.aux_loss.item() == 0.0
    groups = int(torch.tensor(shape[:-2]).prod()) if len(shape) > 2 else 1
    assert layer.stats.tokens_per_expert.tolist() == [groups * p] * n


def test_slot_inputs_are_convex_combinations_of_each_inputs_tokens():
    torch.manual_seed(0)
    router = SoftMoERouter(8, 3, 2)
    x = torch.randn(4, 7, 8)
    r = router(x)
    d = r.dispatch_weights
    assert (d >= 0).all() and (r.combine_weights >= 0).all()
    torch.testing.assert_close(d.sum(1), torch.ones(4, 6))  # over tokens, per slot
    torch.testing.assert_close(r.combine_weights.sum(2), torch.ones(4, 7))  # over slots
    _, slots = naive_soft_moe(x.double(), router.phi.detach().double(),
                              router.scale.detach().double(), 2,
                              [lambda s: s] * 3)
    torch.testing.assert_close((d.transpose(1, 2) @ x).double(), slots)


def test_soft_moe_is_not_causal_and_trains():
    torch.manual_seed(0)
    layer = soft_layer(6, 2, 2)
    x = torch.randn(1, 5, 6)
    y = layer(x)
    x2 = x.clone()
    x2[0, -1] += 1.0  # a later token changes an earlier token's output
    assert not torch.allclose(layer(x2)[0, 0], y[0, 0])
    layer(x).square().sum().backward()
    assert layer.router.phi.grad.abs().sum() > 0 and layer.router.scale.grad.abs() > 0


def test_soft_moe_arguments():
    with pytest.raises(TypeError, match="router must be a SoftMoERouter, got TopKRouter"):
        SoftMoE(TopKRouter(4, 2, 1), FeedForwardExperts(2, 4, 4))
    with pytest.raises(ValueError, match=r"at least 2-D.*got shape \(6,\)"):
        soft_layer(6, 2, 1)(torch.randn(6))
    with pytest.raises(ValueError, match="slots_per_expert must be >= 1, got 0"):
        SoftMoERouter(4, 2, 0)


def test_soft_moe_implements_the_layer_protocol_without_moe_layers_forward():
    from torch import nn

    from sparsemoe import MoELayer, MoEModule, aux_loss

    layer = soft_layer(4, 3, 2)
    assert isinstance(layer, MoEModule) and not isinstance(layer, MoELayer)
    model = nn.Sequential(nn.Linear(4, 4), layer)
    model(torch.randn(2, 5, 4))
    assert aux_loss(model).item() == 0.0
    assert layer.stats.tokens_per_expert.tolist() == [2 * 2] * 3  # p slots per input, 2 inputs


def test_soft_moe_router_normalize_is_checked():
    with pytest.raises(TypeError, match="normalize must be a bool, got int 0"):
        SoftMoERouter(4, 2, normalize=0)


def test_soft_routing_is_a_deprecated_name_of_soft_moe_weights():
    from sparsemoe import routers

    with pytest.warns(DeprecationWarning, match="use sparsemoe.routers.SoftMoEWeights"):
        assert routers.SoftRouting is routers.SoftMoEWeights
    with pytest.raises(AttributeError, match="no attribute 'SoftRoutes'"):
        routers.SoftRoutes  # noqa: B018

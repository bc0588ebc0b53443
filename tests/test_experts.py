import pytest
import torch
from reference import ffn_expert, linear_expert
from torch import nn

from sparsemoe.dispatch import sort_by_expert
from sparsemoe.experts import (
    EXPERT_ACTIVATIONS,
    FeedForwardExperts,
    LinearExperts,
    ModuleListExperts,
)


@pytest.mark.parametrize("activation", EXPERT_ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_feed_forward_experts_match_per_expert_computation(activation, bias):
    torch.manual_seed(0)
    n, d, h, t = 5, 6, 7, 9
    bank = FeedForwardExperts(n, d, h, activation=activation, bias=bias)
    idx = torch.randint(0, n, (t, 1))
    idx[0] = 4  # at least one expert used
    routes = sort_by_expert(idx, n)
    x = torch.randn(t, d)[routes.token_index]
    out = bank(x, routes)
    ref = torch.stack([
        ffn_expert(x[r], bank.w1[e], None if bank.b1 is None else bank.b1[e], bank.w2[e],
                   None if bank.b2 is None else bank.b2[e], activation)
        for r, e in enumerate(routes.expert_index.tolist())
    ])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_init_matches_nn_linear_bounds():
    bank = FeedForwardExperts(3, 16, 64)
    assert bank.w1.abs().max() <= 1 / 16**0.5 and bank.w2.abs().max() <= 1 / 64**0.5
    assert bank.w1.std() > 0.5 / (3 * 16) ** 0.5


def test_module_list_experts_skip_empty_experts():
    calls = []

    class Spy(nn.Linear):
        def forward(self, x):
            calls.append(x.shape[0])
            return super().forward(x)

    torch.manual_seed(0)
    bank = ModuleListExperts([Spy(4, 4) for _ in range(3)])
    routes = sort_by_expert(torch.tensor([[2], [2], [0]]), 3)
    x = torch.randn(3, 4)
    out = bank(x, routes)
    assert calls == [1, 2]
    torch.testing.assert_close(out[0], bank.experts[0](x[0]))
    torch.testing.assert_close(out[1:], bank.experts[2](x[1:]))


def test_bad_expert_arguments():
    with pytest.raises(ValueError, match=r"activation must be one of .*got 'relu6'"):
        FeedForwardExperts(2, 4, 4, activation="relu6")
    with pytest.raises(ValueError, match="num_experts must be >= 1, got 0"):
        FeedForwardExperts(0, 4, 4)
    with pytest.raises(TypeError, match=r"experts must all be nn.Module instances, got \['int'\]"):
        ModuleListExperts([nn.Linear(2, 2), 3])
    with pytest.raises(ValueError, match="experts must hold at least one module"):
        ModuleListExperts([])


@pytest.mark.parametrize("activation", ["relu", "tanh", None])
@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_linear_experts_map_d_in_to_d_out(activation, impl):
    torch.manual_seed(0)
    n, d_in, d_out, t = 4, 12, 8, 10
    bank = LinearExperts(n, d_in, d_out, activation=activation, impl=impl)
    routes = sort_by_expert(torch.randint(0, n, (t, 2)), n)
    x = torch.randn(t, d_in)[routes.token_index]
    ref = torch.stack([
        linear_expert(x[r], bank.w[e], bank.b[e], activation)
        for r, e in enumerate(routes.expert_index.tolist())
    ])
    torch.testing.assert_close(bank(x, routes), ref, rtol=1e-5, atol=1e-6)
    assert LinearExperts(3, 5, 2, bias=False).b is None
    bound = 1 / d_in**0.5
    assert bank.w.abs().max() <= bound and bank.b.abs().max() <= bound


def test_bad_linear_expert_arguments():
    with pytest.raises(ValueError, match=r"activation must be one of .* or None, got 'swiglu'"):
        LinearExperts(2, 4, 3, activation="swiglu")
    with pytest.raises(ValueError, match="d_out must be >= 1, got 0"):
        LinearExperts(2, 4, 0)
    with pytest.raises(ValueError, match="impl must be one of"):
        LinearExperts(2, 4, 3, impl="cuda")

"""Appendix D's recomputation of the expert hidden activations, and the saved-tensor count
that measures it."""

import pytest
import torch

import sparsemoe
from sparsemoe.memory import saved_tensor_bytes


def test_saved_bytes_equal_a_hand_count():
    x = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(4, 3, requires_grad=True)
    # matmul saves x and w; relu saves its output [8, 3]; float32
    assert saved_tensor_bytes(lambda: torch.relu(x @ w))[1] == 4 * (8 * 4 + 4 * 3 + 8 * 3)
    assert saved_tensor_bytes(lambda: torch.relu(x @ w), exclude=[x, w])[1] == 4 * 8 * 3
    with torch.no_grad():
        assert saved_tensor_bytes(lambda: torch.relu(x @ w))[1] == 0


def run(layer_fn, recompute):
    torch.manual_seed(0)
    layer = layer_fn(recompute)
    x = torch.randn(4, 64, 32, requires_grad=True)
    torch.manual_seed(1)  # the same gating noise in both runs
    y, saved = saved_tensor_bytes(lambda: layer(x), exclude=[*layer.parameters(), x])
    (y.square().sum() + layer.aux_loss).backward()
    return layer, x, y, saved


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("layer_fn", [
    lambda activation: lambda rc: sparsemoe.MoE(32, 8, 2, 48, activation=activation,
                                                recompute=rc),
    lambda activation: lambda rc: sparsemoe.HierarchicalMoE(32, 4, 4, 2, 2, 48,
                                                            activation=activation, recompute=rc),
], ids=["flat", "hierarchical"])
def test_recompute_gives_the_same_outputs_and_gradients_and_saves_the_hidden(layer_fn,
                                                                            activation):
    plain, x0, y0, saved0 = run(layer_fn(activation), False)
    again, x1, y1, saved1 = run(layer_fn(activation), True)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(x1.grad, x0.grad, rtol=0, atol=0)
    for (name, a), b in zip(plain.named_parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)
    pairs = plain.stats.tokens_per_expert.sum().item()  # rows through the experts
    # relu keeps one [pairs, h] tensor (its output, also the second matmul's input); swiglu
    # keeps the [pairs, 2h] projection, silu(gate) [pairs, h] and the product [pairs, h]
    hidden_bytes = 4 * pairs * 48 * (1 if activation == "relu" else 4)
    assert hidden_bytes <= saved0 - saved1 <= hidden_bytes + 256  # + small bookkeeping


def test_recompute_is_off_in_evaluation_and_named_in_errors():
    moe = sparsemoe.MoE(16, 4, 2, 32, recompute=True).eval()
    with torch.no_grad():
        assert moe(torch.randn(10, 16)).shape == (10, 16)
    assert "recompute=True" in repr(moe.experts)
    with pytest.raises(TypeError, match="recompute must be a bool, got str 'yes'"):
        sparsemoe.FeedForwardExperts(4, 16, 32, recompute="yes")
    with pytest.raises(ValueError, match="recompute=True applies to the feed-forward experts"):
        sparsemoe.MoE(16, 2, 1, experts=[torch.nn.Linear(16, 16)] * 2, recompute=True)

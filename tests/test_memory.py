"""Appendix D's recomputation of the expert hidden activations, the saved-tensor count that
measures it, and the expert banks' reused gradient memory."""

import copy

import pytest
import torch

import sparsemoe
from sparsemoe.dispatch import sort_by_expert
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
        sparsemoe.MoE(16, 2, 1, expert_modules=[torch.nn.Linear(16, 16)] * 2, recompute=True)


# GradientBuffers: the expert banks' weight gradients written into reused memory.

def _bank_pair(dtype, impl, bias=True):
    """Two banks with the same weights: one reusing gradient memory, one on torch's autograd."""
    torch.manual_seed(0)
    kwargs = dict(activation="swiglu", bias=bias, impl=impl)
    pooled = sparsemoe.FeedForwardExperts(6, 8, 12, **kwargs).to(dtype)
    plain = sparsemoe.FeedForwardExperts(6, 8, 12, reuse_grad_memory=False, **kwargs).to(dtype)
    plain.load_state_dict(pooled.state_dict())
    x = torch.randn(10, 8, dtype=dtype)
    return pooled, plain, _routes(0), x


def _routes(shift):
    """Experts 0, 2, 5 (shifted by ``shift``) get rows; the other three are idle."""
    idx = torch.tensor([[0], [0], [2], [5], [2], [0], [5], [5], [5], [2]])
    return sort_by_expert((idx + shift) % 6, 6)


def _backward(bank, routes, x, target):
    xs = x.clone().requires_grad_()
    (bank(xs, routes) * target).sum().backward()
    return xs.grad


@pytest.mark.parametrize("dtype,impl,tol", [(torch.float64, "loop", 1e-13),
                                            (torch.float32, "grouped_mm", 1e-6)])
def test_reused_gradient_memory_gives_torch_gradients(dtype, impl, tol):
    pooled, plain, _, x = _bank_pair(dtype, impl)
    pointers = []
    for step in range(3):
        routes = _routes(step)
        target = torch.randn(10, 8, dtype=dtype)
        for bank in (pooled, plain):
            bank.zero_grad(set_to_none=True)
        gx = _backward(pooled, routes, x, target)
        gx_ref = _backward(plain, routes, x, target)
        torch.testing.assert_close(gx, gx_ref, rtol=tol, atol=tol)
        for (name, p), q in zip(pooled.named_parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol, msg=name)
        idle = [(e + step) % 6 for e in (1, 3, 4)]  # busy in the step before
        assert pooled.w1.grad[idle].abs().max() == 0 and pooled.w2.grad[idle].abs().max() == 0
        pointers.append((pooled.w1.grad.data_ptr(), pooled.w2.grad.data_ptr()))
    assert pointers[0] == pointers[1] == pointers[2]  # the same memory every step
    assert {k: len(v._buffers) for k, v in pooled.grad_buffers.items()} == {"w1": 1, "w2": 1}


def test_without_torchs_storage_count_every_gradient_is_a_plain_allocation(monkeypatch):
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    pooled, plain, _, x = _bank_pair(torch.float64, "loop")
    for step in range(2):
        target = torch.randn(10, 8, dtype=torch.float64)
        for bank in (pooled, plain):
            bank.zero_grad(set_to_none=True)
            _backward(bank, _routes(step), x, target)
        for (name, p), q in zip(pooled.named_parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-13, atol=1e-13, msg=name)
    assert all(v.nbytes == 0 for v in pooled.grad_buffers.values())  # nothing pooled


def test_gradients_in_use_are_never_overwritten():
    pooled, plain, routes, x = _bank_pair(torch.float64, "loop", bias=False)
    t1, t2, t3 = (torch.randn(10, 8, dtype=torch.float64) for _ in range(3))
    # accumulation over micro-batches: .grad holds the first buffer, the second takes the next
    for bank in (pooled, plain):
        _backward(bank, routes, x, t1)
        _backward(bank, routes, x, t2)
    torch.testing.assert_close(pooled.w1.grad, plain.w1.grad, rtol=1e-13, atol=1e-13)
    # a gradient the caller kept after zero_grad keeps its values
    kept = pooled.w1.grad
    kept_values = kept.clone()
    for bank in (pooled, plain):
        bank.zero_grad(set_to_none=True)
        _backward(bank, routes, x, t3)
    assert torch.equal(kept, kept_values)
    assert kept.data_ptr() != pooled.w1.grad.data_ptr()
    torch.testing.assert_close(pooled.w1.grad, plain.w1.grad, rtol=1e-13, atol=1e-13)
    # torch.autograd.grad results the caller holds are not reused either
    pooled.zero_grad(set_to_none=True)
    del kept
    g1 = torch.autograd.grad((pooled(x, routes) * t1).sum(), pooled.w1)[0]
    g1_values = g1.clone()
    g2 = torch.autograd.grad((pooled(x, routes) * t2).sum(), pooled.w1)[0]
    assert torch.equal(g1, g1_values) and g1.data_ptr() != g2.data_ptr()
    assert len(pooled.grad_buffers["w1"]._buffers) == 2  # capacity: further ones are not kept


def test_reused_gradient_memory_supports_double_backward():
    torch.manual_seed(0)
    pooled = sparsemoe.FeedForwardExperts(3, 4, 3, activation="swiglu", impl="loop").double()
    routes = sort_by_expert(torch.tensor([[2], [0], [2], [2], [0]]), 3)
    x = torch.randn(5, 4, dtype=torch.float64)

    def f(x, w1, w2):
        return torch.func.functional_call(pooled, {"w1": w1, "w2": w2}, (x, routes))

    xs = x.clone().requires_grad_()
    ws = [p.detach().clone().requires_grad_() for p in (pooled.w1, pooled.w2)]
    assert torch.autograd.gradcheck(f, (xs, *ws))
    assert torch.autograd.gradgradcheck(f, (xs, *ws))


def test_gradient_buffers_follow_dtype_and_are_not_copied():
    pooled, _, routes, x = _bank_pair(torch.float32, "auto")
    _backward(pooled, routes, x, torch.ones(10, 8))
    assert pooled.grad_buffers["w1"].nbytes == 6 * 8 * 24 * 4
    assert copy.deepcopy(pooled).grad_buffers["w1"].nbytes == 0
    pooled.double().zero_grad(set_to_none=True)
    _backward(pooled, routes, x.double(), torch.ones(10, 8, dtype=torch.float64))
    assert pooled.grad_buffers["w1"].nbytes == 6 * 8 * 24 * 8  # the float32 buffer was dropped
    pooled.grad_buffers["w1"].clear()
    assert pooled.grad_buffers["w1"].nbytes == 0
    with pytest.raises(TypeError, match="reuse_grad_memory must be a bool, got int 1"):
        sparsemoe.FeedForwardExperts(2, 4, 4, reuse_grad_memory=1)


def test_reused_gradient_memory_takes_an_expanded_output_gradient():
    pooled, plain, routes, x = _bank_pair(torch.float32, "grouped_mm")
    pooled(x, routes).sum().backward()  # the gradient of a sum has strides (0, 0)
    ones = torch.ones(10, 8)
    (plain(x, routes) * ones).sum().backward()
    torch.testing.assert_close(pooled.w1.grad, plain.w1.grad, rtol=1e-6, atol=1e-6)

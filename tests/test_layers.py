import math

import pytest
import torch
from helpers import check_against_reference, randomise_gates, reference_experts
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import dense_moe, naive_hierarchical, naive_noisy_top_k
from torch import nn

import sparsemoe
import sparsemoe.functional as MF

DOUBLE = torch.float64


def reference_flat(layer, p, x, noise):
    """The paper's layer from its definition, in float64, every expert on every token."""
    r = layer.router
    gates, load, _ = naive_noisy_top_k(x, p["router.w_gate"], p.get("router.w_noise"), r.k,
                                       noise, layer.training, r.noise_epsilon)
    y = dense_moe(x, gates, reference_experts(layer, p))
    aux = r.w_importance * MF.cv_squared(gates.sum(0)) + r.w_load * MF.cv_squared(load)
    return y, aux


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 6), d=st.integers(1, 9), h=st.integers(1, 9), t=st.integers(0, 24),
    lead=st.sampled_from([(), (2,), (3, 1)]), data=st.data(), seed=st.integers(0, 1000),
    train=st.booleans(), noisy=st.booleans(), bias=st.booleans(),
    activation=st.sampled_from(["relu", "gelu", "swiglu"]),
)
def test_moe_equals_dense_reference(n, d, h, t, lead, data, seed, train, noisy, bias, activation):
    k = data.draw(st.integers(1, n), label="k")
    torch.manual_seed(seed)
    layer = sparsemoe.MoE(d, n, k, h, noisy_gating=noisy, bias=bias, activation=activation)
    layer.train(train)
    randomise_gates(layer, seed)
    x = torch.randn(*lead, t, d)
    tokens = x.numel() // d
    noise_shape = (tokens, n) if (train and noisy) else None
    check_against_reference(layer, x, reference_flat, noise_shape, seed)


@pytest.mark.parametrize("d,h", [(16, 32), (8, 4)])
@pytest.mark.parametrize("n,k", [(1, 1), (4, 1), (4, 2), (4, 4), (8, 3)])
def test_moe_grouped_path_equals_dense_reference(n, k, d, h):
    """Aligned widths run on torch's grouped_mm, unaligned ones on the loop: both exact."""
    torch.manual_seed(n * 10 + k)
    layer = sparsemoe.MoE(d, n, k, h)
    randomise_gates(layer, 3)
    check_against_reference(layer, torch.randn(40, d), reference_flat, (40, n), seed=5)


def reference_hierarchical(layer, p, x, noise):
    r = layer.router
    dense, imp, load = naive_hierarchical(
        x, p["router.w_gate_primary"], p.get("router.w_noise_primary"),
        p["router.w_gate_secondary"], p.get("router.w_noise_secondary"),
        r.k_primary, r.k_secondary, None, None, train=False, eps=r.noise_epsilon,
    )
    y = dense_moe(x, dense.reshape(x.shape[0], -1), reference_experts(layer, p))
    aux = r.w_importance * MF.cv_squared(imp) + r.w_load * MF.cv_squared(load)
    return y, aux


@pytest.mark.parametrize("a,b,k1,k2", [(4, 4, 2, 2), (2, 3, 1, 2), (3, 2, 3, 1)])
@pytest.mark.parametrize("d", [16, 5])
def test_hierarchical_moe_equals_dense_reference(a, b, k1, k2, d):
    """Evaluation mode (deterministic); training-mode gating is held equal to the naive
    hierarchical gating with explicit noise in test_functional."""
    torch.manual_seed(a * b)
    layer = sparsemoe.HierarchicalMoE(d, a, b, k1, k2, hidden=8).eval()
    randomise_gates(layer, 1)
    check_against_reference(layer, torch.randn(2, 15, d), reference_hierarchical)


def test_hierarchical_training_step_reaches_every_gate():
    torch.manual_seed(0)
    layer = sparsemoe.HierarchicalMoE(16, 4, 4, 2, 2, hidden=16)
    y = layer(torch.randn(64, 16))
    (y.square().mean() + sparsemoe.aux_loss(layer)).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert layer.stats.tokens_per_expert.sum() == 64 * 4


@pytest.mark.parametrize("make", [
    lambda: sparsemoe.MoE(4, 4, 2, 5, activation="gelu", bias=True),
    lambda: sparsemoe.HierarchicalMoE(4, 2, 3, 2, 2, hidden=3),
], ids=["flat", "hierarchical"])
def test_gradcheck_layer_float64(make):
    torch.manual_seed(0)
    layer = make().double()
    randomise_gates(layer, 2)
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(7, 4, dtype=DOUBLE, requires_grad=True)

    def fn(x, *params):
        torch.manual_seed(123)  # the same noise at every evaluation
        out = torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (x,))
        return out, layer.aux_loss

    params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())
    assert torch.autograd.gradcheck(fn, (x, *params))


def test_module_list_experts_equal_stacked_experts():
    torch.manual_seed(0)
    stacked = sparsemoe.MoE(8, 4, 2, 16, bias=True).eval()
    randomise_gates(stacked, 0)
    modules = []
    for e in range(4):
        lin1, lin2 = nn.Linear(8, 16), nn.Linear(16, 8)
        with torch.no_grad():
            lin1.weight.copy_(stacked.experts.w1[e].T)
            lin1.bias.copy_(stacked.experts.b1[e])
            lin2.weight.copy_(stacked.experts.w2[e].T)
            lin2.bias.copy_(stacked.experts.b2[e])
        modules.append(nn.Sequential(lin1, nn.ReLU(), lin2))
    general = sparsemoe.MoE(8, 4, 2, expert_modules=modules).eval()
    general.router.load_state_dict(stacked.router.state_dict())
    x = torch.randn(3, 10, 8)
    torch.testing.assert_close(general(x), stacked(x), rtol=1e-6, atol=1e-6)


def test_zero_initialised_layer_balances_and_eval_is_deterministic():
    torch.manual_seed(0)
    layer = sparsemoe.MoE(16, 8, 2, 16)
    layer(torch.randn(4096, 16))
    s = layer.stats
    assert s.cv_load < 0.02 and s.cv_importance < 0.05 and s.max_over_mean_load < 1.1
    layer.eval()
    randomise_gates(layer, 0)
    x = torch.randn(5, 16)
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)
    torch.testing.assert_close(layer.stats.load, layer.stats.tokens_per_expert.float())


@pytest.mark.parametrize("make", [
    lambda std: sparsemoe.MoE(64, 64, 2, 8, gate_init_std=std),
    lambda std: sparsemoe.HierarchicalMoE(64, 8, 8, hidden=8, gate_init_std=std),
])
def test_gate_init_std_draws_normal_gates_and_zero_keeps_the_papers(make):
    gates = lambda layer: [p for n, p in layer.router.named_parameters() if "gate" in n]  # noqa: E731
    noises = lambda layer: [p for n, p in layer.router.named_parameters() if "noise" in n]  # noqa: E731
    assert all(torch.count_nonzero(w) == 0 for w in gates(make(0.0)) + noises(make(0.0)))
    torch.manual_seed(3)
    layer = make(0.25)
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(gates(layer), gates(make(0.25)), strict=True))
    for w in gates(layer):  # mean and std within 4 standard errors of 0 and 0.25
        assert abs(w.mean().item()) < 4 * 0.25 / math.sqrt(w.numel())
        assert w.std().item() == pytest.approx(0.25, abs=4 * 0.25 / math.sqrt(2 * w.numel()))
    assert all(torch.count_nonzero(w) == 0 for w in noises(layer))  # the noise stays the paper's
    assert "gate_init_std=0.25" in repr(layer.router)
    with pytest.raises(ValueError, match=r"gate_init_std must be a number in \[0, inf\), got -0.1"):
        make(-0.1)


def test_empty_input_and_sigmoid_output():
    layer = sparsemoe.MoE(6, 3, 2, 4, output_activation="sigmoid")
    y = layer(torch.randn(0, 6, requires_grad=True))
    assert y.shape == (0, 6)
    assert layer.aux_loss.item() == 0.0
    sparsemoe.aux_loss(layer).backward()
    x = torch.randn(2, 3, 6)
    y = layer(x)
    assert ((y > 0) & (y < 1)).all()
    # sigmoid over the mixture, not inside the experts
    layer.eval()
    raw = sparsemoe.MoE(6, 3, 2, 4).eval()
    raw.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), torch.sigmoid(raw(x)))


def test_sum_backward_through_grouped_path():
    """An expanded (stride-0) output gradient, as from y.sum(), reaches grouped_mm safely."""
    layer = sparsemoe.MoE(16, 4, 2, 32, bias=False)
    layer(torch.randn(10, 16)).sum().backward()
    assert layer.experts.w1.grad is not None


def test_aux_loss_sums_over_layers():
    torch.manual_seed(0)
    model = nn.Sequential(sparsemoe.MoE(8, 4, 2, 8), nn.ReLU(), sparsemoe.MoE(8, 4, 1, 8))
    with pytest.raises(RuntimeError, match="have not run a forward pass yet"):
        sparsemoe.aux_loss(model)
    model(torch.randn(32, 8))
    total = sparsemoe.aux_loss(model)
    torch.testing.assert_close(total, model[0].aux_loss + model[2].aux_loss)
    with pytest.raises(ValueError, match="contains no sparsemoe MoE layer"):
        sparsemoe.aux_loss(nn.Linear(2, 2))


def test_bad_layer_arguments_and_inputs():
    with pytest.raises(ValueError, match=r"k must be <= the number of experts \(4\), got 5"):
        sparsemoe.MoE(8, 4, 5, 8)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        sparsemoe.MoE(8, 4, 0, 8)
    with pytest.raises(ValueError, match="hidden .* is required"):
        sparsemoe.MoE(8, 4, 2)
    with pytest.raises(ValueError, match="expert_modules must hold num_experts = 4 modules, got 3"):
        sparsemoe.MoE(8, 4, 2, expert_modules=[nn.Linear(8, 8) for _ in range(3)])
    with pytest.raises(ValueError, match="k_secondary must be <= the number of experts"):
        sparsemoe.HierarchicalMoE(8, 2, 2, 1, 3, hidden=4)
    with pytest.raises(ValueError, match=r"output_activation must be one of .*got 'softmax'"):
        sparsemoe.MoE(8, 4, 2, 8, output_activation="softmax")
    layer = sparsemoe.MoE(8, 4, 2, 8)
    with pytest.raises(ValueError, match=r"last dimension d_model = 8, got shape \(3, 7\)"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype torch.int64"):
        layer(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="x has dtype torch.float64 but the layer has dtype"):
        layer(torch.randn(3, 8, dtype=DOUBLE))
    with pytest.raises(ValueError, match="x is on device meta but the layer is on cpu"):
        layer(torch.randn(3, 8, device="meta"))
    with pytest.raises(RuntimeError, match="after the layer's first forward"):
        _ = layer.stats


def test_bfloat16_autocast():
    torch.manual_seed(0)
    layer = sparsemoe.MoE(32, 8, 2, 64)
    randomise_gates(layer, 0)
    x = torch.randn(64, 32)
    layer.eval()
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert layer.aux_loss.dtype == torch.float32  # the router stays in float32
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
    layer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        loss = y.float().square().mean() + layer.aux_loss
    loss.backward()
    assert torch.isfinite(layer.experts.w1.grad).all() and layer.router.w_gate.grad.abs().sum() > 0


def test_torch_compile_smoke():
    from torch._inductor.exc import InductorError

    torch.manual_seed(0)
    layer = sparsemoe.MoE(16, 4, 2, 32).eval()
    randomise_gates(layer, 0)
    x = torch.randn(20, 16)
    compiled = torch.compile(layer)
    try:
        y = compiled(x)
    except InductorError as e:  # e.g. no working C++ compiler on this platform
        pytest.skip(f"torch.compile's backend is unavailable here: {e}")
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    # Training mode: compiled code draws its noise from its own RNG, so only check it trains.
    layer.train()
    y = compiled(x)
    (y.sum() + layer.aux_loss).backward()
    assert layer.experts.w1.grad.abs().sum() > 0 and layer.router.w_noise.grad.abs().sum() > 0


@pytest.mark.parametrize("cls, args", [(sparsemoe.MoE, (8, 4, 2)),
                                       (sparsemoe.HierarchicalMoE, (8, 2, 2, 1, 1))])
def test_experts_keyword_is_a_deprecated_name_of_expert_modules(cls, args):
    modules = [nn.Linear(8, 8) for _ in range(4)]
    with pytest.warns(DeprecationWarning, match=r"experts=\.\.\.\) is deprecated: use "
                                                r"expert_modules="):
        layer = cls(*args, experts=modules)
    assert [e for e in layer.experts.experts] == modules
    with pytest.raises(TypeError, match="got both experts= and expert_modules="), \
            pytest.warns(DeprecationWarning):
        cls(*args, experts=modules, expert_modules=modules)

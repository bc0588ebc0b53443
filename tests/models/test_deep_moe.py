"""The Deep Mixture of Experts against a float64 reference written from the paper's equations,
and the baselines' sizes."""

import pytest
import torch
from reference import linear_expert, naive_gate_network

import sparsemoe.functional as MF
from sparsemoe.models import DeepMoE, DeepMoEConfig, matched_width, mlp


def naive_dmoe(p, x, layers):
    """z^l = Σ_i g^l_i(z^{l−1}) f^l_i(z^{l−1}) with every expert computed, then f³."""
    z = x
    for i in range(layers):
        pre = f"layers.{i}."
        _, gates = naive_gate_network(z, p[pre + "router.gate_hidden.w_hidden"],
                                      p[pre + "router.gate_hidden.b_hidden"],
                                      p[pre + "router.w_gate"], p[pre + "router.b_gate"])
        w, b = p[pre + "experts.w"], p[pre + "experts.b"]
        z = sum(gates[:, e : e + 1] * linear_expert(z, w[e], b[e]) for e in range(w.shape[0]))
    return z @ p["classifier.weight"].T + p["classifier.bias"]


def randomised(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, q in model.named_parameters():
            if "router" in name:  # sharper gates than at initialisation
                q.copy_(torch.randn(q.shape, generator=g))
    return model


@pytest.mark.parametrize("widths", [(7,), (7, 5)])
def test_dense_dmoe_equals_reference_outputs_and_gradients(widths):
    torch.manual_seed(0)
    cfg = DeepMoEConfig(d_in=12, num_classes=3, widths=widths, num_experts=4, gate_hidden=6)
    model = randomised(DeepMoE(cfg))
    x = torch.randn(9, 12, requires_grad=True)
    logits = model(x)
    p = {n: q.detach().double().requires_grad_(True) for n, q in model.named_parameters()}
    x64 = x.detach().double().requires_grad_(True)
    ref = naive_dmoe(p, x64, len(widths))
    torch.testing.assert_close(logits, ref.float(), rtol=1e-5, atol=1e-6)
    probe = torch.randn(9, 3)
    grads = torch.autograd.grad((logits * probe).sum(), [x, *model.parameters()])
    ref_grads = torch.autograd.grad((ref * probe.double()).sum(), [x64, *p.values()])
    for name, g, rg in zip(["x", *p], grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg.float(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert all(layer.stats.tokens_per_expert.tolist() == [9] * 4 for layer in model.layers)


def test_gradcheck_float64():
    torch.manual_seed(0)
    cfg = DeepMoEConfig(d_in=5, num_classes=2, widths=(4, 3), num_experts=3, gate_hidden=3)
    model = randomised(DeepMoE(cfg)).double()
    names = [n for n, _ in model.named_parameters()]

    def fn(x, *params):
        return torch.func.functional_call(model, dict(zip(names, params, strict=True)), (x,))

    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    params = tuple(q.detach().clone().requires_grad_(True) for q in model.parameters())
    assert torch.autograd.gradcheck(fn, (x, *params))


def test_gates_constraint_and_sparse_form():
    torch.manual_seed(0)
    x = torch.randn(20, 16)
    dense = DeepMoE(DeepMoEConfig(d_in=16, num_classes=4, widths=(8, 8), margin=2.0))
    with pytest.raises(RuntimeError, match=r"call model.eval\(\) first"):
        dense.forward_with_gates(x)
    dense.eval()
    logits, gates = dense.forward_with_gates(x)
    assert logits.shape == (20, 4) and [g.shape for g in gates] == [(20, 4), (20, 4)]
    for g in gates:
        torch.testing.assert_close(g.sum(1), torch.ones(20))
    dense.train()
    dense(x)
    assert dense.layers[0].router.totals.sum() == pytest.approx(20)
    dense.remove_constraint()
    assert not any(layer.router.constrained for layer in dense.layers)

    sparse = DeepMoE(DeepMoEConfig(d_in=16, num_classes=4, widths=(8, 8), k=2,
                                   w_importance=0.1, w_load=0.1))
    sparse.eval()
    randomised(sparse)
    _, gates = sparse.forward_with_gates(x)
    assert all(((g > 0).sum(1) == 2).all() for g in gates)
    assert all(layer.stats.tokens_per_expert.sum() == 40 for layer in sparse.layers)


def test_gate_matrix():
    idx = torch.tensor([[2, 0], [1, 3]])
    w = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    valid = torch.tensor([[True, True], [True, False]])
    assert MF.gate_matrix(idx, w, 4, valid).tolist() == [[0.25, 0, 0.75, 0], [0, 0.5, 0, 0]]


def test_baseline_sizes():
    def count(m):
        return sum(q.numel() for q in m.parameters())

    dmoe = DeepMoE(DeepMoEConfig())  # 4×100−4×100, gates 50−50, 36×36 inputs
    assert count(dmoe) == 630_518
    w = matched_width(1296, 10, count(dmoe))
    assert w == 375
    assert abs(count(mlp(1296, (w, w), 10)) - 630_518) < 1296 + 2 * w
    assert count(mlp(1296, (400, 400), 10)) == 1297 * 400 + 401 * 400 + 401 * 10
    assert matched_width(10, 2, count(mlp(10, (7,), 2)), depth=1) == 7


def test_bad_config():
    with pytest.raises(ValueError, match=r"k must be in \[1, num_experts = 4\] or None, got 5"):
        DeepMoEConfig(k=5)
    with pytest.raises(ValueError, match="w_load needs noisy top-k gates"):
        DeepMoEConfig(w_load=0.1)
    with pytest.raises(ValueError, match=r"widths must name at least one layer"):
        DeepMoEConfig(widths=())
    with pytest.raises(ValueError, match="margin must be a number >= 0"):
        DeepMoEConfig(margin=-1.0)

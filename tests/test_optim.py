"""FactoredAdam (Appendix D) against a direct float64 computation of its update and against
torch.optim.Adam where the two must agree."""

import numpy as np
import pytest
import torch
from torch import nn

from sparsemoe import FeedForwardExperts, LinearExperts, MoE
from sparsemoe.dispatch import sort_by_expert
from sparsemoe.optim import FactoredAdam, factored_second_moment, param_groups, state_bytes


def reference_updates(p0, grads, lr, beta2, eps):
    """Appendix D written out with numpy in float64: per matrix, running averages of the row
    and column means of g², estimate = outer product / mean, Adam's bias correction."""
    p = p0.astype(np.float64).copy()
    lead, (r, c) = p.shape[:-2], p.shape[-2:]
    row = np.zeros((*lead, r))
    col = np.zeros((*lead, c))
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        row = beta2 * row + (1 - beta2) * (g * g).mean(-1)
        col = beta2 * col + (1 - beta2) * (g * g).mean(-2)
        v = np.zeros_like(p)
        for idx in np.ndindex(*lead):
            v[idx] = np.outer(row[idx], col[idx]) / row[idx].mean()
        p = p - lr * g / (np.sqrt(v / (1 - beta2**t)) + eps)
    return p


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6)])
def test_update_equals_direct_computation(shape):
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + i) for i in range(6)]
    p = nn.Parameter(p0.clone())
    opt = FactoredAdam([p], lr=0.05, beta2=0.9, eps=1e-6)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = reference_updates(p0.numpy(), [g.numpy() for g in grads], 0.05, 0.9, 1e-6)
    # the optimiser keeps its moments in float32
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=0, atol=1e-6)


def test_rank_one_squared_gradient_gives_the_exact_estimate():
    """When g² = a bᵀ the factored estimate is exact: R Cᵀ / mean(R) = g²."""
    a = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    b = torch.tensor([3.0, 0.25, 1.0, 4.0], dtype=torch.float64)
    g2 = torch.outer(a, b)
    np.testing.assert_allclose(factored_second_moment(g2.mean(1), g2.mean(0)).numpy(),
                               g2.numpy(), rtol=1e-15)
    assert factored_second_moment(torch.zeros(3), torch.zeros(4)).abs().max() == 0


def test_unfactored_equals_adam_without_first_moment():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    twin = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    twin.load_state_dict(model.state_dict())
    ours = FactoredAdam(model.parameters(), lr=1e-2, beta2=0.99, factored=False)
    adam = torch.optim.Adam(twin.parameters(), lr=1e-2, betas=(0.0, 0.99), foreach=False)
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    for _ in range(10):
        for m, opt in ((model, ours), (twin, adam)):
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # float32 moments


def test_vectors_keep_adams_full_second_moment():
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(7, generator=gen) for _ in range(8)]
    ours, theirs = nn.Parameter(torch.ones(7)), nn.Parameter(torch.ones(7))
    opt = FactoredAdam([ours], lr=0.1, beta2=0.9)
    adam = torch.optim.Adam([theirs], lr=0.1, betas=(0.0, 0.9), foreach=False)
    for g in grads:
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        adam.step()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert set(opt.state[ours]) == {"step", "v"}


def test_state_is_r_plus_c_per_matrix_and_trains():
    torch.manual_seed(0)
    bank = FeedForwardExperts(8, 16, 32)  # w1 [8, 16, 32], w2 [8, 32, 16]
    twin = FeedForwardExperts(8, 16, 32)
    opt = FactoredAdam(bank.parameters(), lr=1e-2)
    adam = torch.optim.Adam(twin.parameters(), lr=1e-2)
    routes = sort_by_expert(torch.arange(64).remainder(8)[:, None], 8)
    rows = torch.randn(64, 16)[routes.token_index]
    target = torch.randn(64, 16)
    losses = []
    for _ in range(30):
        for b, o in ((bank, opt), (twin, adam)):
            o.zero_grad()
            loss = (b(rows, routes) - target).square().mean()
            loss.backward()
            o.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert opt.state[bank.w1]["row"].shape == (8, 16)
    assert opt.state[bank.w1]["col"].shape == (8, 32)
    assert state_bytes(opt) == 4 * 2 * 8 * (16 + 32)  # float32 factors of w1 and w2
    assert state_bytes(adam) == 4 * 2 * 2 * 8 * 16 * 32  # Adam: two full moments of each


def test_stacked_biases_are_vectors_and_weights_matrices_per_expert():
    """With param_groups a bank's biases [n, h] keep Adam's full second moment (n vectors)
    and its weights [n, d, h] one pair of factors per expert, each equal to its reference."""
    gen = torch.Generator().manual_seed(4)
    bank = FeedForwardExperts(3, 4, 5, bias=True).double()
    w1, b1 = bank.w1.detach().clone(), bank.b1.detach().clone()
    grads = {name: [torch.randn(p.shape, generator=gen, dtype=torch.float64) * (1 + i)
                    for i in range(5)] for name, p in bank.named_parameters()}
    opt = FactoredAdam(param_groups(bank), lr=0.05, beta2=0.9, eps=1e-6)
    twin = nn.Parameter(b1.clone())
    adam = torch.optim.Adam([twin], lr=0.05, betas=(0.0, 0.9), eps=1e-6, foreach=False)
    for i in range(5):
        for name, p in bank.named_parameters():
            p.grad = grads[name][i].clone()
        twin.grad = grads["b1"][i].clone()
        opt.step()
        adam.step()
    assert set(opt.state[bank.b1]) == set(opt.state[bank.b2]) == {"step", "v"}
    assert opt.state[bank.w1]["row"].shape == (3, 4) and opt.state[bank.w1]["col"].shape == (3, 5)
    torch.testing.assert_close(bank.b1, twin, rtol=0, atol=1e-6)
    expected = reference_updates(w1.numpy(), [g.numpy() for g in grads["w1"]], 0.05, 0.9, 1e-6)
    np.testing.assert_allclose(bank.w1.detach().numpy(), expected, rtol=0, atol=1e-6)
    # without the groups the stacked bias is factored as one [n, h] matrix: a different update
    other = FeedForwardExperts(3, 4, 5, bias=True)
    flat = FactoredAdam(other.parameters())
    other.b1.grad = torch.ones(3, 5)
    flat.step()
    assert set(flat.state[other.b1]) == {"step", "row", "col"}


def test_param_groups_split_the_banks_from_everything_else():
    torch.manual_seed(0)
    shared = LinearExperts(4, 6, 3)
    model = nn.ModuleDict(dict(moe=MoE(6, 4, k=2, hidden=8, bias=True), head=nn.Linear(6, 2),
                               a=shared, b=shared))
    stacked, others = param_groups(model)
    bank = model["moe"].experts
    assert stacked["expert_dims"] == 1 and "expert_dims" not in others
    assert {id(p) for p in stacked["params"]} == {
        id(p) for p in (bank.w1, bank.w2, bank.b1, bank.b2, shared.w, shared.b)}
    assert len(stacked["params"]) == 6
    assert {id(p) for p in others["params"]} == {
        id(p) for p in (*model["moe"].router.parameters(), *model["head"].parameters())}
    (plain,) = param_groups(nn.Linear(2, 3))  # no bank: one group, no empty one
    assert len(plain["params"]) == 2 and "expert_dims" not in plain
    torch.optim.Adam(param_groups(model))  # any optimiser takes the groups


def test_expert_dims_beyond_a_parameters_dimensions_is_named():
    opt = FactoredAdam([nn.Parameter(torch.zeros(3))], expert_dims=2)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"shape \(3,\) has fewer than expert_dims=2"):
        opt.step()


def test_state_dict_saved_before_expert_dims_loads_as_zero():
    p = nn.Parameter(torch.ones(2, 3))
    opt = FactoredAdam([p])
    p.grad = torch.ones(2, 3)
    opt.step()
    saved = opt.state_dict()
    del saved["param_groups"][0]["expert_dims"]
    resumed = FactoredAdam([p], expert_dims=1)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["expert_dims"] == 0
    resumed.step()
    assert set(resumed.state[p]) == {"step", "row", "col"}


def test_state_dict_resumes_exactly():
    torch.manual_seed(1)
    w = torch.randn(4, 3, 5)
    grads = [torch.randn(4, 3, 5) for _ in range(6)]

    def run(split):
        p = nn.Parameter(w.clone())
        opt = FactoredAdam([p], lr=1e-2)
        for i, g in enumerate(grads):
            if i == split:
                saved = opt.state_dict()
                p = nn.Parameter(p.detach().clone())
                opt = FactoredAdam([p], lr=1e-2)
                opt.load_state_dict(saved)
            p.grad = g.clone()
            opt.step()
        return p.detach()

    assert torch.equal(run(split=None), run(split=3))


def test_bfloat16_parameters_keep_float32_moments():
    p = nn.Parameter(torch.randn(4, 6, dtype=torch.bfloat16))
    opt = FactoredAdam([p])
    p.grad = torch.randn(4, 6, dtype=torch.bfloat16)
    opt.step()
    assert p.dtype == torch.bfloat16 and opt.state[p]["row"].dtype == torch.float32


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), r"lr must be a number >= 0, got -1.0"),
    (dict(beta2=1.0), r"beta2 must be a number in \[0, 1\), got 1.0"),
    (dict(eps=-1e-8), r"eps must be a number >= 0"),
    (dict(factored="yes"), r"factored must be a bool, got str 'yes'"),
    (dict(expert_dims=-1), r"expert_dims must be >= 0, got -1"),
    (dict(expert_dims=1.0), r"expert_dims must be an int, got float 1.0"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        FactoredAdam([nn.Parameter(torch.zeros(2))], **kwargs)


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = FactoredAdam(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()

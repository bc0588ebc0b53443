"""Global-batch balancing: the loss over micro-batches and over gloo ranks equals the loss of one
big batch, in value and gradient; the bias update sums the ranks' loads."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp
from balancing_checks import aux_and_grads, global_batch, models, worker
from helpers import join_within

import sparsemoe
from sparsemoe import FeedForwardExperts, MoE, MoELayer, balancing, routers

D = 6


def noisy_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, D), MoE(D, 8, k=2, hidden=4))
    with torch.no_grad():
        for p in model[1].router.parameters():
            p.normal_(0.0, 0.5)
    return model


def top_k_model():
    torch.manual_seed(0)
    router = routers.TopKRouter(D, 8, 2, w_importance=0.1, w_switch=0.1, w_z=0.01)
    return torch.nn.Sequential(torch.nn.Linear(D, D),
                               MoELayer(router, FeedForwardExperts(8, D, 4)))


@pytest.fixture
def fixed_noise(monkeypatch):
    """The routers' Gaussian noise from one fixed stream, consumed in order, so that a big batch
    and its micro-batches (same tokens, same order) see the same draws."""
    stream = torch.randn(10_000, generator=torch.Generator().manual_seed(5))
    used = [0]

    def randn_like(t, **_):
        start = used[0]
        used[0] += t.numel()
        return stream[start:used[0]].view(t.shape).to(t)

    monkeypatch.setattr(torch, "randn_like", randn_like)
    return used


def loss_and_grads(model, micro_batches, probe, global_batch_balancing):
    model.zero_grad()
    total = 0.0
    if global_batch_balancing:
        with balancing.GlobalBatchBalancing(model):
            for x, p in zip(micro_batches, probe, strict=True):
                total = total + (model(x) * p).sum()
            loss = total + sparsemoe.aux_loss(model)
    else:  # each micro-batch with its own balancing loss, averaged
        for x, p in zip(micro_batches, probe, strict=True):
            total = total + (model(x) * p).sum() + sparsemoe.aux_loss(model) / len(micro_batches)
        loss = total
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("make", [noisy_model, top_k_model])
def test_micro_batches_equal_one_big_batch(make, fixed_noise):
    model = make().train()
    sizes = [5, 8, 1, 6]
    x = torch.randn(sum(sizes), D)
    probe = torch.randn(sum(sizes), D)
    big = loss_and_grads(model, [x], [probe], False)
    fixed_noise[0] = 0
    micro = loss_and_grads(model, x.split(sizes), probe.split(sizes), True)
    torch.testing.assert_close(micro[0], big[0], rtol=1e-5, atol=1e-6)
    for g, g_big in zip(micro[1], big[1], strict=True):
        torch.testing.assert_close(g, g_big, rtol=1e-5, atol=1e-6)
    fixed_noise[0] = 0  # and the mean of per-micro-batch losses is not the same thing
    separate = loss_and_grads(model, x.split(sizes), probe.split(sizes), False)
    assert abs(float(separate[0] - big[0])) > 1e-3
    assert model[1].global_batch is None  # the context is left


def test_global_batch_errors():
    hashed = MoELayer(routers.HashRouter(D, 4, vocab_size=9), FeedForwardExperts(4, D, 4))
    with balancing.GlobalBatchBalancing(hashed), pytest.raises(TypeError, match="Routing.sums"):
        hashed(torch.randn(5, D), token_ids=torch.arange(5))
    deepseek = MoELayer(routers.DeepSeekV3Router(D, 4), FeedForwardExperts(4, D, 4))
    with balancing.GlobalBatchBalancing(deepseek), pytest.raises(TypeError, match="w_sequence"):
        deepseek(torch.randn(5, D))
    with balancing.GlobalBatchBalancing(deepseek), pytest.raises(RuntimeError, match="already"):
        balancing.GlobalBatchBalancing(deepseek).__enter__()
    with pytest.raises(ValueError, match="contains no sparsemoe MoE layer"):
        balancing.GlobalBatchBalancing(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Two gloo ranks, each with a slice of one global batch."""
    world, out = 2, tmp_path_factory.mktemp("balancing")
    ctx = mp.start_processes(worker, args=(world, f"file://{out / 'init'}", str(out)),
                             nprocs=world, join=False, start_method="forkserver")
    join_within(ctx, 300.0, "the 2-rank run")
    return world, [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("name", ["top_k", "noisy"])
def test_ranks_equal_one_big_batch(ranks, name):
    world, per_rank = ranks
    model = models()[name].train()
    aux, grads = aux_and_grads(model, global_batch(world))
    for result in per_rank:  # every rank has the global loss and, averaged, its gradient
        assert result[name]["aux"] == pytest.approx(aux, rel=1e-5, abs=1e-7)
        for g, g_big in zip(result[name]["grads"], grads, strict=True):
            torch.testing.assert_close(torch.tensor(g), torch.tensor(g_big), rtol=1e-5,
                                       atol=1e-6)


def test_bias_update_sums_the_ranks_loads(ranks):
    world, per_rank = ranks
    model = models()["deepseek"].train()
    model(global_batch(world))
    load = balancing.update_expert_biases(model)[0]
    for result in per_rank:  # the same step on every rank, from the global load
        assert result["deepseek"]["load"] == load.tolist()
        torch.testing.assert_close(torch.tensor(result["deepseek"]["bias"]),
                                   model.router.expert_bias, rtol=0, atol=0)
    assert model.router.expert_bias.abs().sum() > 0

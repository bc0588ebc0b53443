"""Padding masks: a padded batch equals its kept tokens alone, in outputs, auxiliary losses,
statistics and every gradient, for every layer that takes a mask."""

import pytest
import torch
from helpers import randomise_gates

from sparsemoe import (
    Capacity,
    ConditionalMoE,
    FeedForwardExperts,
    HierarchicalMoE,
    MoE,
    MoELayer,
    SharedExpertMoE,
    routers,
)

D = 5


def bank(n, hidden=4):
    return FeedForwardExperts(n, D, hidden)


LAYERS = {
    "noisy_top_k": lambda: MoE(D, 8, k=2, hidden=4),
    "hierarchical": lambda: HierarchicalMoE(D, 2, 3, 1, 2, hidden=4),
    "top_k_capacity": lambda: MoELayer(
        routers.TopKRouter(D, 6, 2, w_importance=0.1, w_z=1e-3), bank(6),
        capacity=Capacity(factor=0.75), expert_output_masking=0.3),
    "switch_sequence_capacity": lambda: MoELayer(
        routers.SwitchRouter(D, 4), bank(4), capacity=Capacity(tokens=1, group="sequence")),
    "deepseek_shared": lambda: SharedExpertMoE(
        routers.DeepSeekV3Router(D, 8, 3, groups=4, top_groups=2, w_sequence=0.1,
                                 w_switch=0.01, routed_scaling_factor=2.5),
        bank(8), bank(1, 6)),
    "conditional_gshard": lambda: ConditionalMoE(routers.GShardRouter(D, 4), bank(4), bank(1)),
    "hash": lambda: MoELayer(routers.HashRouter(D, 4, vocab_size=30), bank(4)),
}
# the layers whose losses and capacity are over the whole batch (not per sequence)
BATCH_LEVEL = ["noisy_top_k", "hierarchical", "top_k_capacity", "conditional_gshard", "hash"]


def make(name, seed=0):
    torch.manual_seed(seed)
    layer = LAYERS[name]().train()
    if any(True for _ in layer.router.parameters()):
        randomise_gates(layer, seed)
    return layer


def run(layer, x, seed, probe, **kwargs):
    """Output, aux loss, statistics and gradients (inputs first) of one forward/backward of
    ``(y·probe).sum() + aux``."""
    x = x.detach().requires_grad_(True)
    torch.manual_seed(seed)  # the same random draws (noise, jitter, masking) on both sides
    y = layer(x, **kwargs)
    loss = (y * probe.view(y.shape)).sum() + layer.aux_loss
    grads = torch.autograd.grad(loss, [x, *layer.parameters()], allow_unused=True,
                                materialize_grads=True)
    return y, probe, layer.aux_loss.detach(), layer.stats, grads


def assert_same(padded, alone, kept):
    """``padded`` on the full batch equals ``alone`` on the kept tokens (in their order)."""
    y, _, aux, stats, grads = padded
    y_k, _, aux_k, stats_k, grads_k = alone
    flat = y.reshape(-1, y.shape[-1])
    torch.testing.assert_close(flat[kept], y_k.reshape(-1, y.shape[-1]), rtol=1e-5, atol=1e-6)
    pad = torch.ones(flat.shape[0], dtype=torch.bool)
    pad[kept] = False
    assert torch.equal(flat[pad], torch.zeros_like(flat[pad]))
    torch.testing.assert_close(aux, aux_k, rtol=1e-5, atol=1e-7)
    for field in ("importance", "load", "tokens_per_expert"):
        torch.testing.assert_close(getattr(stats, field), getattr(stats_k, field),
                                   rtol=1e-5, atol=1e-6, msg=field)
    assert stats.drop_fraction == pytest.approx(stats_k.drop_fraction)
    gx = grads[0].reshape(-1, grads[0].shape[-1])
    torch.testing.assert_close(gx[kept], grads_k[0].reshape(gx[kept].shape), rtol=1e-5,
                               atol=1e-5)
    assert torch.equal(gx[pad], torch.zeros_like(gx[pad]))  # padding gets no gradient
    for g, g_k in zip(grads[1:], grads_k[1:], strict=True):
        torch.testing.assert_close(g, g_k, rtol=1e-5, atol=1e-5)


def equal_count_mask(batch, length, kept_per_row, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        mask[b, torch.randperm(length, generator=g)[:kept_per_row]] = True
    return mask


def forward_kwargs(name, ids):
    return {"token_ids": ids} if name == "hash" else {}


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("seed", [0, 1])
def test_padded_sequences_equal_the_kept_sequences(name, seed):
    """Every sequence keeps m tokens at random places: the kept tokens, as sequences of m, give
    the same result (per-sequence losses and capacities included)."""
    layer = make(name, seed)
    x = torch.randn(3, 9, D)
    ids = torch.randint(0, 30, (3, 9))
    mask = equal_count_mask(3, 9, 6, seed)
    kept = mask.reshape(-1).nonzero().squeeze(1)
    probe = torch.randn(3, 9, D)
    padded = run(layer, x, seed, probe, mask=mask, **forward_kwargs(name, ids))
    alone = run(layer, x[mask].view(3, 6, D), seed, probe[mask],
                **forward_kwargs(name, ids[mask].view(3, 6)))
    assert_same(padded, alone, kept)


@pytest.mark.parametrize("name", BATCH_LEVEL)
def test_uneven_padding_equals_the_kept_tokens(name):
    layer = make(name, 3)
    x = torch.randn(4, 7, D)
    ids = torch.randint(0, 30, (4, 7))
    lengths = torch.tensor([7, 2, 0, 5])  # a sequence of padding only, too
    mask = (torch.arange(7)[None, :] < lengths[:, None]).long()  # transformers' attention_mask
    kept = mask.reshape(-1).nonzero().squeeze(1)
    probe = torch.randn(4, 7, D)
    padded = run(layer, x, 3, probe, mask=mask, **forward_kwargs(name, ids))
    alone = run(layer, x[mask.bool()], 3, probe[mask.bool()],
                **forward_kwargs(name, ids[mask.bool()]))
    assert_same(padded, alone, kept)


def test_padding_changes_nothing_when_all_tokens_are_kept_and_costs_nothing():
    layer = make("top_k_capacity", 4).eval()
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(layer(x, mask=torch.ones(2, 5, dtype=torch.bool)), layer(x))
    y = layer(x, mask=torch.zeros(2, 5, dtype=torch.bool))
    assert torch.equal(y, torch.zeros_like(y))
    assert int(layer.stats.tokens_per_expert.sum()) == 0 and float(layer.aux_loss.detach()) == 0.0


def test_mask_errors():
    layer = make("noisy_top_k")
    x = torch.randn(2, 5, D)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 5\) .*got \(2, 4\)"):
        layer(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool or hold only 0 and 1"):
        layer(x, mask=torch.full((2, 5), 2))
    with pytest.raises(TypeError, match="mask must be a tensor of shape"):
        layer(x, mask=[[1] * 5] * 2)
    per_sequence = MoELayer(routers.TopKRouter(D, 4), bank(4),
                            capacity=Capacity(factor=1.0, group="sequence"))
    with pytest.raises(ValueError, match="mask with a per-sequence capacity factor"):
        per_sequence(x, mask=torch.ones(2, 5, dtype=torch.bool))

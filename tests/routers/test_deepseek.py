"""DeepSeek-V3 routing: sigmoid gates, group-limited top-k, the bias of auxiliary-loss-free
balancing and the sequence-wise loss, against float64 references written from the paper."""

import pytest
import torch
from helpers import (
    assert_router_gets_gradient,
    check_against_reference,
    gate_reference,
    layer_with,
    randomise_gates,
    router_logits,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import naive_aux

from sparsemoe import balancing
from sparsemoe.routers import DeepSeekV3Router, deepseek


def naive_choice(selection, k, groups, top_groups):
    """TopK of ``selection`` (one row, s + b) inside the ``top_groups`` groups whose two best
    entries sum highest (eq. 16 with node-limited routing), from sorted lists."""
    n = len(selection)
    size = n // groups
    allowed = list(range(n))
    if groups > 1:
        group_score = [sum(sorted(selection[g * size:(g + 1) * size], reverse=True)[:2])
                       for g in range(groups)]
        best = sorted(range(groups), key=lambda g: -group_score[g])[:top_groups]
        allowed = [i for i in range(n) if i // size in best]
    return sorted(allowed, key=lambda i: -selection[i])[:k]


def naive_sequence_loss(scores, chosen, sequence_of):
    """mean over sequences of Σ_i f_i·P_i, f_i = N/(K·T) Σ_t 1[i ∈ TopK_t], P_i = mean_t s'_i."""
    t, n = scores.shape
    losses = []
    for seq in sorted(set(sequence_of)):
        rows = [r for r in range(t) if sequence_of[r] == seq]
        length = len(rows)
        k = len(chosen[rows[0]])
        total = scores.new_zeros(())
        for i in range(n):
            f = n / (k * length) * sum(1.0 for r in rows if i in chosen[r])
            p = sum(scores[r, i] / scores[r].sum() for r in rows) / length
            total = total + f * p
        losses.append(total)
    return torch.stack(losses).mean() if losses else scores.sum() * 0


def deepseek_reference(seq_len):
    def gates_and_aux(layer, p, x):
        r = layer.router
        logits = router_logits(p, x)
        scores = 1.0 / (1.0 + torch.exp(-logits))  # s_{i,t}
        bias = r.expert_bias.double()
        gates = torch.zeros_like(scores)
        chosen = []
        for t in range(x.shape[0]):
            selection = (scores[t].detach() + bias).tolist()
            top = naive_choice(selection, r.k, r.groups, r.top_groups)
            chosen.append(top)
            total = sum(scores[t, i] for i in top) if r.normalize else 1.0
            row = [scores.new_zeros(()) for _ in range(scores.shape[1])]
            for i in top:
                row[i] = r.routed_scaling_factor * scores[t, i] / total
            gates[t] = torch.stack(row)
        normalised = scores / scores.sum(-1, keepdim=True)
        dispatched = (gates != 0).to(gates.dtype)
        aux = naive_aux(r, logits, normalised, gates, dispatched)
        if r.w_sequence and x.shape[0]:
            aux = aux + r.w_sequence * naive_sequence_loss(
                scores, chosen, [t // seq_len for t in range(x.shape[0])])
        return gates, aux

    return gate_reference(gates_and_aux)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(groups=st.sampled_from([1, 2, 4]), per_group=st.integers(2, 3), seed=st.integers(0, 999),
       batch=st.integers(1, 3), seq=st.integers(1, 6), normalize=st.booleans(),
       data=st.data())
def test_deepseek_router_equals_reference(groups, per_group, seed, batch, seq, normalize, data):
    n = groups * per_group
    top_groups = data.draw(st.integers(1, groups), label="top_groups")
    k = data.draw(st.integers(1, top_groups * per_group), label="k")
    torch.manual_seed(seed)
    router = DeepSeekV3Router(5, n, k, groups=groups, top_groups=top_groups, normalize=normalize,
                              routed_scaling_factor=2.5, w_sequence=0.3, w_switch=0.1,
                              w_importance=0.05)
    with torch.no_grad():
        router.expert_bias.normal_(0.0, 0.5)  # a bias large enough to change the choice
    layer = layer_with(router, activation="swiglu")
    randomise_gates(layer, seed)
    check_against_reference(layer, torch.randn(batch, seq, 5), deepseek_reference(seq),
                            seed=seed)


def test_bias_chooses_but_does_not_weight():
    torch.manual_seed(0)
    router = DeepSeekV3Router(6, 8, 2, w_sequence=0.0)
    x = torch.randn(40, 6)
    before = router(x)
    with torch.no_grad():
        router.expert_bias[3] = 10.0  # expert 3 always chosen
    after = router(x)
    assert bool((after.expert_indices == 3).any(1).all())
    scores = (x @ router.w_gate).sigmoid()
    expected = scores.gather(1, after.expert_indices)
    torch.testing.assert_close(after.combine_weights,
                               expected / expected.sum(-1, keepdim=True))
    assert not torch.equal(before.expert_indices, after.expert_indices)
    assert "expert_bias" in dict(router.named_buffers())
    assert "expert_bias" not in dict(router.named_parameters())


def test_group_limited_routing_stays_in_the_top_groups():
    torch.manual_seed(1)
    router = DeepSeekV3Router(6, 16, 4, groups=8, top_groups=2)
    randomise_gates(layer_with(router), 1)
    r = router(torch.randn(50, 6))
    groups = (r.expert_indices // 2).tolist()
    assert all(len(set(row)) <= 2 for row in groups)


def test_sequence_balance_loss_against_the_definition():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(11, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    choice = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(11)])
    seqs = torch.tensor([4, 4, 4, 0, 0, 9, 9, 9, 9, 9, 7])  # any ids, any order
    got = deepseek.sequence_balance_loss(scores, choice, seqs)
    expected = naive_sequence_loss(scores, choice.tolist(), seqs.tolist())
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, scores)[0],
                               torch.autograd.grad(expected, scores)[0], rtol=1e-12, atol=1e-12)
    # perfectly balanced: every expert chosen equally often with equal affinities -> 1
    even = torch.ones(4, 4, dtype=torch.float64)
    assert float(deepseek.sequence_balance_loss(
        even, torch.tensor([[0], [1], [2], [3]]), torch.zeros(4, dtype=torch.long))) == 1.0


def test_bias_update_against_hand_computation_over_steps():
    """b_i += γ·sign(mean load − load_i) after each step, from the pairs of every forward since
    the last update; evaluation forwards do not count."""
    router = DeepSeekV3Router(2, 4, 1, bias_update_speed=0.2, w_sequence=0.0)
    with torch.no_grad():
        router.w_gate.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.3, 0.2, 0.1]]))
    x = torch.tensor([[5.0, 1.0]] * 3)  # logits (5, .3, .2, .1): expert 0 until b moves
    s = torch.sigmoid(torch.tensor([5.0, 0.3, 0.2, 0.1], dtype=torch.float64)).tolist()
    hand_bias = [0.0, 0.0, 0.0, 0.0]
    chosen_over_steps = []
    for step in range(5):
        router.train()
        router(x)
        router(x[:1])  # a second micro-batch in the same step
        router.eval()
        router(x)  # not counted
        chosen = max(range(4), key=lambda i: s[i] + hand_bias[i])
        chosen_over_steps.append(chosen)
        load = [0.0] * 4
        load[chosen] = 4.0
        mean = sum(load) / 4
        hand_bias = [b + 0.2 * ((mean > v) - (mean < v))
                     for b, v in zip(hand_bias, load, strict=True)]
        used = router.update_bias()
        assert used.tolist() == load, step
        torch.testing.assert_close(router.expert_bias, torch.tensor(hand_bias), rtol=0,
                                   atol=1e-6)
    assert router.load_since_update.sum() == 0
    assert chosen_over_steps == [0, 0, 1, 2, 3]  # the bias moved the load on


def test_bias_is_saved_and_resumed_and_updated_model_wide():
    torch.manual_seed(2)
    model = torch.nn.Sequential(layer_with(DeepSeekV3Router(4, 6, 2)),
                                layer_with(DeepSeekV3Router(4, 6, 3, bias_update_speed=0.1)))
    model(torch.randn(5, 7, 4))
    loads = balancing.update_expert_biases(model)
    assert [int(v.sum()) for v in loads] == [70, 105]
    state = model.state_dict()
    assert torch.equal(state["1.router.expert_bias"], model[1].router.expert_bias)
    assert model[1].router.expert_bias.abs().max() == pytest.approx(0.1)
    fresh = torch.nn.Sequential(layer_with(DeepSeekV3Router(4, 6, 2)),
                                layer_with(DeepSeekV3Router(4, 6, 3, bias_update_speed=0.1)))
    fresh.load_state_dict(state)
    assert torch.equal(fresh[1].router.expert_bias, model[1].router.expert_bias)
    with pytest.raises(ValueError, match="contains no DeepSeekV3Router"):
        balancing.update_expert_biases(torch.nn.Linear(2, 2))


def test_deepseek_router_trains_and_checks_its_arguments():
    torch.manual_seed(0)
    layer = layer_with(DeepSeekV3Router(5, 8, 2, groups=2, top_groups=1, w_switch=0.01))
    assert_router_gets_gradient(layer, torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="groups must divide num_experts = 8, got 3"):
        DeepSeekV3Router(5, 8, groups=3)
    with pytest.raises(ValueError, match="num_experts / groups must be >= 2, got 8 / 8"):
        DeepSeekV3Router(5, 8, groups=8)
    with pytest.raises(ValueError, match="top_groups must be <= groups = 2, got 3"):
        DeepSeekV3Router(5, 8, groups=2, top_groups=3)
    with pytest.raises(ValueError, match=r"k must be <= .* = 4, got 5"):
        DeepSeekV3Router(5, 8, 5, groups=2, top_groups=1)
    with pytest.raises(ValueError, match=r"routed_scaling_factor must be a number in \(0, inf\)"):
        DeepSeekV3Router(5, 8, routed_scaling_factor=0.0)
    # finite and >= 0, as main's router arguments
    for name in ("routed_scaling_factor", "bias_update_speed", "w_sequence"):
        for bad in (float("inf"), float("nan"), -1.0):
            with pytest.raises(ValueError, match=rf"{name} must be a number in"):
                DeepSeekV3Router(5, 8, **{name: bad})
    with pytest.raises(TypeError, match="normalize must be a bool"):
        DeepSeekV3Router(5, 8, normalize=1)

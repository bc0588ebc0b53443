import math
from dataclasses import replace

import pytest
import torch

import sparsemoe
from sparsemoe import FeedForwardExperts, MoELayer, routers
from sparsemoe.models.transformer import (
    PRESETS,
    MoETransformer,
    TransformerConfig,
    dense_twin,
    multiply_adds_per_token,
    parameter_counts,
    preset,
    twin_preset,
)

TINY = {"vocab_size": 20, "d_model": 16, "n_heads": 2, "n_layers": 2, "context": 12,
        "ffn_hidden": 32}


def tiny(name: str, **kw) -> TransformerConfig:
    cfg = preset(name, **TINY)
    return replace(cfg, ffn_hidden=24 if cfg.activation == "swiglu" else 32, **kw)


def future_changes_past(model: MoETransformer, seed: int, t: int = 5) -> float:
    """Largest change of the logits at positions ≤ t when the tokens after t change."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 20, (3, 12), generator=g)
    b = a.clone()
    b[:, t + 1:] = torch.randint(0, 20, (3, 12 - t - 1), generator=g)
    with torch.no_grad():
        ya, yb = model(a)[0], model(b)[0]
    return float((ya[:, : t + 1] - yb[:, : t + 1]).abs().max())


CAUSAL = {  # presets, with capacities tight enough that tokens are dropped
    "dense": {}, "dense-swiglu": {}, "glam-8": {}, "mixtral-8": {}, "dbrx-16": {},
    "switch-8": {"num_experts": 2, "capacity_factor": 0.25},
}


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_presets_do_not_see_later_tokens(name):
    torch.manual_seed(0)
    model = MoETransformer(tiny(name, **CAUSAL[name])).double().eval()
    for seed in range(3):
        assert future_changes_past(model, seed) < 1e-12
    if name == "switch-8":  # the capacity did drop tokens, earlier ones first
        assert all(m.stats.drop_fraction > 0.2 for m in model.moe_layers())


@pytest.mark.parametrize("name,overrides", [
    ("expert-choice-8", {}),
    ("gshard-8", {"num_experts": 4}),  # second choices wait for all first choices
    ("switch-8", {"num_experts": 2, "capacity_factor": 0.25, "capacity_policy": "priority"}),
])
def test_documented_non_causal_routing_does_see_later_tokens(name, overrides):
    torch.manual_seed(0)
    model = MoETransformer(tiny(name, **overrides)).double().eval()
    assert max(future_changes_past(model, seed) for seed in range(6)) > 1e-6


def test_batch_capacity_couples_sequences():
    torch.manual_seed(0)
    # 9 tokens per expert for the 24 tokens of both sequences: the first one's fill it first
    model = MoETransformer(tiny("switch-8", num_experts=2, capacity_factor=0.75,
                                capacity_group="batch")).double().eval()
    a = torch.randint(0, 20, (2, 12))
    b = a.clone()
    b[0, 6:] = (b[0, 6:] + 1) % 20  # the first sequence's later tokens
    with torch.no_grad():
        change = (model(a)[0][1] - model(b)[0][1]).abs().max()
    assert change > 1e-6  # the second sequence, all positions, saw them


def test_multiply_adds_equal_a_hand_count():
    # d = 8, L = 4, 2 layers: projections 4·64 = 256 and attention (L+1)·d = 40 per layer
    cfg = TransformerConfig(vocab_size=10, d_model=8, n_heads=2, n_layers=2, context=4,
                            ffn_hidden=32, router="switch", num_experts=4)
    # GELU FFN 2·8·32 = 512; Switch layer: router 8·4 = 32 + one expert of 512
    assert multiply_adds_per_token(cfg) == 2 * (256 + 40 + 32 + 512)
    assert multiply_adds_per_token(dense_twin(cfg)) == 2 * (256 + 40 + 512)
    # SwiGLU: w1 is [d, 2h]: 8·2·24 + 24·8 = 576; top-2 of 4 experts of hidden 12: 2·288 = 576
    mix = replace(cfg, activation="swiglu", ffn_hidden=24, router="top-k", k=2)
    assert mix.expert_hidden == 12
    assert multiply_adds_per_token(mix) == 2 * (256 + 40 + 32 + 576)
    assert multiply_adds_per_token(dense_twin(mix)) == 2 * (256 + 40 + 576)
    # GShard every other layer: layer 0 dense, layer 1 MoE with two experts of hidden 16
    gshard = replace(cfg, router="gshard", moe_every=2)
    assert [gshard.is_moe_layer(i) for i in range(2)] == [False, True]
    assert multiply_adds_per_token(gshard) == (256 + 40 + 512) + (256 + 40 + 32 + 2 * 256)
    # expert choice, c = 2: on average two experts of hidden 16 per token
    ec = replace(cfg, router="expert-choice", capacity_factor=2.0)
    assert multiply_adds_per_token(ec) == multiply_adds_per_token(cfg)


@pytest.mark.parametrize("name", [p for p in PRESETS if not p.startswith("dense")])
def test_every_moe_preset_matches_its_dense_twin(name):
    cfg = preset(name)
    twin = preset(twin_preset(name))
    router = sum(cfg.d_model * cfg.num_experts for i in range(cfg.n_layers)
                 if cfg.is_moe_layer(i))
    assert multiply_adds_per_token(cfg) == multiply_adds_per_token(twin) + router


def test_parameter_counts_by_hand():
    cfg = TransformerConfig(vocab_size=10, d_model=8, n_heads=2, n_layers=1, context=4,
                            ffn_hidden=32, router="top-k", num_experts=4, k=2)
    counts = parameter_counts(MoETransformer(cfg))
    # attention 4·64, two RMSNorm weights 2·8, final norm 8, router 8·4, 4 experts of 2·8·16
    body = 256 + 16 + 8 + 32 + 4 * 256
    assert counts == {"total": body + 10 * 8, "body": body, "active_per_token": body - 2 * 256}
    learned = parameter_counts(MoETransformer(replace(cfg, positions="learned",
                                                      tie_embeddings=False)))
    assert learned["body"] == body and learned["total"] == body + 2 * 80 + 4 * 8


def test_any_router_and_bank_through_moe_layer():
    cfg = replace(tiny("switch-8"), capacity_factor=None)
    model = MoETransformer(cfg, moe_layer=lambda i: MoELayer(
        routers.HashRouter(16, 4, vocab_size=20), FeedForwardExperts(4, 16, 32)))
    with pytest.raises(TypeError, match="HashRouter routes by token id"):
        model(torch.randint(0, 20, (2, 12)))
    soft = MoETransformer(cfg, moe_layer=lambda i: MoELayer(
        routers.TopKRouter(16, 4, k=1), FeedForwardExperts(4, 16, 8, activation="relu")))
    assert all(m.experts.hidden == 8 for m in soft.moe_layers())
    logits, state = soft(torch.randint(0, 20, (2, 12)))
    assert logits.shape == (2, 12, 20) and state == ()


def test_rotary_and_attention_against_a_naive_reference():
    """One attention layer with rotary positions against a float64 loop over positions."""
    torch.manual_seed(0)
    cfg = tiny("dense")
    model = MoETransformer(cfg).double()
    attn, rot = model.blocks[0].attn, model.rotary
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    got = attn(x, rot(6))
    q, k, v = (x @ w.T for w in attn.qkv.weight.split(16))
    heads, width = 2, 8
    out = torch.zeros_like(x)
    for b in range(2):
        for h in range(heads):
            sl = slice(h * width, (h + 1) * width)

            def rope(z, t):
                half = width // 2
                z = z.clone()
                for j in range(half):
                    angle = t * cfg.rope_theta ** (-2 * j / width)
                    c, s = math.cos(angle), math.sin(angle)
                    z[j], z[j + half] = z[j] * c - z[j + half] * s, z[j + half] * c + z[j] * s
                return z

            for t in range(6):
                qt = rope(q[b, t, sl], t)
                scores = torch.stack([qt @ rope(k[b, u, sl], u) for u in range(t + 1)])
                p = torch.softmax(scores / math.sqrt(width), 0)
                out[b, t, sl] = sum(p[u] * v[b, u, sl] for u in range(t + 1))
    torch.testing.assert_close(got, out @ attn.proj.weight.T, rtol=1e-12, atol=1e-12)


def test_layer_norm_learned_positions_and_errors():
    cfg = replace(tiny("glam-8"), norm="layer", positions="learned")
    model = MoETransformer(cfg)
    assert isinstance(model.norm, torch.nn.LayerNorm) and model.pos.weight.shape == (12, 16)
    loss = model(torch.randint(0, 20, (2, 12)))[0].square().mean() + sparsemoe.aux_loss(model)
    loss.backward()
    assert model.pos.weight.grad is not None
    with pytest.raises(ValueError, match="tokens has length 13 but the learned positions "
                                         "cover context = 12"):
        model(torch.randint(0, 20, (1, 13)))
    with pytest.raises(ValueError, match=r"router must be one of \('none', 'switch'"):
        TransformerConfig(router="hash")
    with pytest.raises(ValueError, match=r"d_model \(10\) must be divisible by n_heads \(4\)"):
        TransformerConfig(d_model=10)
    with pytest.raises(ValueError, match="must be divisible by the experts per token"):
        TransformerConfig(router="top-k", num_experts=4, k=3)
    with pytest.raises(ValueError, match="must add up to ffn_hidden = 256"):
        dense_twin(TransformerConfig(router="top-k", num_experts=4, k=2, hidden=100))
    with pytest.raises(ValueError, match="preset must be one of"):
        preset("gpt")


def test_switch_preset_keeps_its_router_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = MoETransformer(tiny("switch-8"))
    captured = []
    model.moe_layers()[0].router.register_forward_hook(
        lambda m, i, out: captured.append(out.combine_weights.dtype))
    with torch.autocast("cpu", torch.bfloat16):
        logits, _ = model(torch.randint(0, 20, (2, 12)))
    assert logits.dtype == torch.bfloat16 and captured == [torch.float32]

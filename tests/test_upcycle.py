"""Sparse upcycling: at initialisation the MoE computes what the dense block computed."""

import pytest
import torch
from torch import nn

import sparsemoe
from sparsemoe.models.transformer import MoETransformer, preset
from sparsemoe.upcycle import upcycle_block, upcycle_transformer, upcycled_config


def _randomise_router(layer):
    with torch.no_grad():
        layer.router.w_gate.normal_(0, 1.0)  # a router that spreads tokens over the experts


@pytest.mark.parametrize("act", [nn.ReLU(), nn.GELU(), nn.SiLU()])
def test_sequential_block_equal_in_float64(act):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(12, 20), act, nn.Linear(20, 12)).double()
    layer = upcycle_block(dense, num_experts=6, k=2)
    _randomise_router(layer)
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(y, dense(x), atol=1e-12, rtol=1e-12)
    assert layer.stats.tokens_per_expert.count_nonzero() > 2  # several experts used


def test_gated_mlp_and_noise():

    torch.manual_seed(0)
    mlp = nn.Module()
    mlp.gate_proj, mlp.up_proj = nn.Linear(16, 24, bias=False), nn.Linear(16, 24, bias=False)
    mlp.down_proj, mlp.act_fn = nn.Linear(24, 16, bias=False), nn.SiLU()
    dense = lambda x: mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))  # noqa: E731
    layer = sparsemoe.upcycle(mlp, 4, 2)
    _randomise_router(layer)
    x = torch.randn(10, 16)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-6, rtol=1e-6)
    noisy = sparsemoe.upcycle(mlp, 4, 2, noise=0.1, generator=torch.Generator().manual_seed(1))
    w1 = noisy.experts.w1
    assert not torch.equal(w1[0], w1[1])  # the copies differ
    rel = (w1 - layer.experts.w1).std() / layer.experts.w1.std()
    assert 0.05 < rel < 0.2


def test_bad_arguments():
    dense = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="k must be <="):
        upcycle_block(dense, 2, k=3)
    with pytest.raises(TypeError, match="block must be"):
        upcycle_block(nn.Linear(4, 4), 2)
    with pytest.raises(ValueError, match="activation"):
        upcycle_block(nn.Sequential(nn.Linear(4, 8), nn.GELU("tanh"), nn.Linear(8, 4)), 2)


def _tiny_dense(**overrides):
    torch.manual_seed(0)
    return MoETransformer(preset("dense-swiglu", vocab_size=40, d_model=16, n_heads=2,
                                 n_layers=4, ffn_hidden=24, context=12, **overrides)).eval()


def _randomise_routers(model):
    for layer in model.moe_layers():
        _randomise_router(layer)


@pytest.mark.parametrize("moe_every", [1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_transformer_logits_equal_the_dense_model(moe_every, dtype, tol):
    dense = _tiny_dense().to(dtype)
    moe = sparsemoe.upcycle(dense, 8, 2, moe_every=moe_every)
    assert moe.cfg == upcycled_config(dense.cfg, 8, 2, moe_every)
    assert [type(b.ffn).__name__ for b in moe.blocks] == \
        (["MoELayer"] * 4 if moe_every == 1 else ["DenseFeedForward", "MoELayer"] * 2)
    assert not moe.training and next(moe.parameters()).dtype == dtype
    _randomise_routers(moe)
    tokens = torch.randint(0, 40, (3, 12))
    with torch.no_grad():
        logits, expected = moe(tokens)[0], dense(tokens)[0]
    assert logits.abs().max() > 0.1  # not trivially zero
    torch.testing.assert_close(logits, expected, atol=tol, rtol=0)
    for layer in moe.moe_layers():
        assert layer.stats.tokens_per_expert.count_nonzero() > 3  # several experts used
        assert layer.router.k == 2 and layer.router.normalize


def test_transformer_noise_makes_the_copies_differ():
    dense = _tiny_dense()
    exact = upcycle_transformer(dense, 4, 2)
    noisy = upcycle_transformer(dense, 4, 2, noise=0.1,
                                generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        gap = (noisy(tokens)[0] - dense(tokens)[0]).abs().max()
    assert gap > 1e-4  # the copies now compute different functions
    for layer, reference in zip(noisy.moe_layers(), exact.moe_layers(), strict=True):
        w1 = layer.experts.w1
        assert not torch.equal(w1[0], w1[1])
        rel = (w1 - reference.experts.w1).std() / reference.experts.w1.std()
        assert 0.05 < rel < 0.2
    # the rest of the model is the dense model's
    torch.testing.assert_close(noisy.blocks[0].attn.qkv.weight, dense.blocks[0].attn.qkv.weight,
                               atol=0, rtol=0)


def test_upcycled_config_is_mixtral_8_with_full_width_experts():
    assert upcycled_config(preset("dense-swiglu"), 8, 2) == preset("mixtral-8", hidden=192)


def test_transformer_bad_arguments():
    with pytest.raises(ValueError, match="model must be a dense MoETransformer.*'top-k'"):
        upcycle_transformer(MoETransformer(preset("mixtral-8", vocab_size=40)), 8)
    with pytest.raises(ValueError, match=r"moe_every must be <= n_layers \(4\).*got 5"):
        upcycle_transformer(_tiny_dense(), 8, moe_every=5)
    with pytest.raises(ValueError, match="k must be <="):
        upcycle_transformer(_tiny_dense(), 2, k=3)
    with pytest.raises(ValueError, match="moe_every applies to a MoETransformer only"):
        sparsemoe.upcycle(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), 2,
                          moe_every=2)
    with pytest.raises(TypeError, match="model must be a MoETransformer, got Linear"):
        upcycle_transformer(nn.Linear(4, 4), 2)


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_transformers_dense_to_moe(kind, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind]
    config = cls(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(config).eval()
    moe = sparsemoe.upcycle(dense, 4, 2).eval()
    expected_class = "Qwen2MoeForCausalLM" if kind == "qwen2" else "MixtralForCausalLM"
    assert type(moe).__name__ == expected_class
    with torch.no_grad():
        for layer in moe.model.layers:  # any router: the copies make it irrelevant
            layer.mlp.gate.weight.normal_(0, 1.0)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        expected = dense(ids).logits
        torch.testing.assert_close(moe(ids).logits, expected, atol=1e-5, rtol=0)
        moe.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert type(reloaded) is type(moe)
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=0)


def test_refuses_other_models():
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2,
                                                        vocab_size=64))
    model.model = model.transformer  # looks like a decoder, is not a supported one
    with pytest.raises(TypeError, match="'gpt2'"):
        sparsemoe.upcycle(model, 4)

"""Exact interop with the MoE blocks of ``transformers`` (skipped when it is not installed).

Tiny random configurations are built locally; nothing is downloaded."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
    SwitchTransformersConfig,
)
from transformers.models.deepseek_v3 import modeling_deepseek_v3  # noqa: E402
from transformers.models.mixtral import modeling_mixtral  # noqa: E402
from transformers.models.olmoe import modeling_olmoe  # noqa: E402
from transformers.models.qwen2_moe import modeling_qwen2_moe  # noqa: E402
from transformers.models.qwen3_moe import modeling_qwen3_moe  # noqa: E402
from transformers.models.switch_transformers import modeling_switch_transformers as st  # noqa: E402

import sparsemoe  # noqa: E402
from sparsemoe.interop import from_transformers, to_transformers  # noqa: E402

D = 16

CONFIGS = {
    "mixtral": (lambda: MixtralConfig(hidden_size=D, intermediate_size=24, num_local_experts=6,
                                      num_experts_per_tok=2),
                modeling_mixtral.MixtralSparseMoeBlock),
    "mixtral_gelu": (lambda: MixtralConfig(hidden_size=D, intermediate_size=8, num_local_experts=4,
                                           num_experts_per_tok=3, hidden_act="gelu"),
                     modeling_mixtral.MixtralSparseMoeBlock),
    "olmoe": (lambda: OlmoeConfig(hidden_size=D, intermediate_size=12, num_experts=8,
                                  num_experts_per_tok=2),
              modeling_olmoe.OlmoeSparseMoeBlock),
    "qwen2_moe": (lambda: Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=12,
                                         shared_expert_intermediate_size=20, num_experts=6,
                                         num_experts_per_tok=2),
                  modeling_qwen2_moe.Qwen2MoeSparseMoeBlock),
    "qwen2_moe_normalised": (lambda: Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=12,
                                                    shared_expert_intermediate_size=8,
                                                    num_experts=4, num_experts_per_tok=3,
                                                    norm_topk_prob=True),
                             modeling_qwen2_moe.Qwen2MoeSparseMoeBlock),
    "qwen3_moe": (lambda: Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=12, num_experts=5,
                                         num_experts_per_tok=2, norm_topk_prob=True),
                  modeling_qwen3_moe.Qwen3MoeSparseMoeBlock),
    "switch": (lambda: SwitchTransformersConfig(d_model=D, d_ff=24, num_experts=4,
                                                expert_capacity=5),
               st.SwitchTransformersSparseMLP),
    "switch_bias_gelu": (lambda: SwitchTransformersConfig(d_model=D, d_ff=8, num_experts=3,
                                                          expert_capacity=100, router_bias=True,
                                                          dense_act_fn="gelu"),
                         st.SwitchTransformersSparseMLP),
    "deepseek_v3": (lambda: DeepseekV3Config(hidden_size=D, moe_intermediate_size=12,
                                             n_routed_experts=8, num_experts_per_tok=3,
                                             n_group=4, topk_group=2, n_shared_experts=2),
                    modeling_deepseek_v3.DeepseekV3MoE),
    "deepseek_v3_flat": (lambda: DeepseekV3Config(hidden_size=D, moe_intermediate_size=6,
                                                  n_routed_experts=6, num_experts_per_tok=2,
                                                  n_group=1, topk_group=1, n_shared_experts=1,
                                                  norm_topk_prob=False,
                                                  routed_scaling_factor=1.0),
                         modeling_deepseek_v3.DeepseekV3MoE),
}


def random_block(name, seed=0):
    torch.manual_seed(seed)
    make_config, cls = CONFIGS[name]
    config = make_config()
    block = cls(config)
    with torch.no_grad():  # blocks built outside a model have uninitialised weights
        for p in block.parameters():
            p.normal_(0.0, 0.3)
        for name_, b in block.named_buffers():
            if name_.endswith("e_score_correction_bias"):  # a bias that changes the choice
                b.normal_(0.0, 0.3)
    return config, block.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shape", [(3, 11), (1, 1), (2, 40)])
def test_from_transformers_equals_the_block(name, shape):
    config, block = random_block(name)
    layer = from_transformers(block).eval()
    assert not layer.training
    x = torch.randn(*shape, D)
    with torch.no_grad():
        expected = block(x.clone())  # transformers' Switch router may modify its input in place
        got = layer(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # and back: the same block, parameter for parameter
    back = to_transformers(layer, config)
    for (n1, p1), (n2, p2) in zip(block.state_dict().items(), back.state_dict().items(),
                                  strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert not back.training


def test_switch_capacity_drops_match_transformers():
    _, block = random_block("switch", seed=3)
    layer = from_transformers(block).eval()
    x = torch.randn(4, 30, D)  # 30 tokens per sequence, 4 experts of capacity 5: drops
    with torch.no_grad():
        expected = block(x.clone())
        dispatch_mask, _, _ = block.router(x.clone())
        got = layer(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    kept = int(dispatch_mask.sum())
    assert kept < 4 * 30 and int(layer.stats.tokens_per_expert.sum()) == kept
    assert layer.stats.drop_fraction == pytest.approx(1 - kept / 120)
    assert (got.abs().sum(-1) == 0).sum() == 120 - kept  # a dropped token outputs 0


@pytest.mark.parametrize("name", ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"])
def test_switch_loss_equals_load_balancing_loss_func(name):
    _, block = random_block(name, seed=1)
    layer = from_transformers(block)
    router = layer.router
    router.w_switch, router.w_z, router.w_importance = 1.0, 0.0, 0.0
    x = torch.randn(5, 13, D)
    logits, _, _ = block.gate(x)
    module = {"mixtral": modeling_mixtral, "olmoe": modeling_olmoe,
              "qwen2_moe": modeling_qwen2_moe, "qwen3_moe": modeling_qwen3_moe}[name]
    expected = module.load_balancing_loss_func((logits,), router.num_experts, router.k)
    layer(x)
    torch.testing.assert_close(layer.aux_loss, expected, rtol=1e-6, atol=1e-6)


def test_switch_router_losses_equal_switch_transformers():
    _, block = random_block("switch", seed=2)
    layer = from_transformers(block).eval()
    router = layer.router
    x = torch.randn(37, D)
    _, _, logits = block.router(x[None].clone())
    probs = logits.softmax(-1)
    balance = st.load_balancing_loss_func(probs, probs.argmax(-1))
    z = st.router_z_loss_func(logits)
    router.w_switch, router.w_z = 1.0, 0.0
    torch.testing.assert_close(router(x).aux_loss, balance, rtol=1e-6, atol=1e-6)
    router.w_switch, router.w_z = 0.0, 1.0
    torch.testing.assert_close(router(x).aux_loss, z, rtol=1e-6, atol=1e-6)


def test_converted_layers_keep_the_papers_defaults_and_train():
    _, block = random_block("switch")
    layer = from_transformers(block)
    assert isinstance(layer.router, sparsemoe.routers.SwitchRouter)
    assert (layer.router.w_switch, layer.router.w_z) == (1e-2, 1e-3)
    _, qwen = random_block("qwen2_moe")
    layer = from_transformers(qwen).train()
    y = layer(torch.randn(2, 9, D))
    (y.square().mean() + sparsemoe.aux_loss(layer)).backward()
    assert layer.router.w_gate.grad.abs().sum() > 0 and layer.w_shared_gate.grad.abs().sum() > 0


def test_bad_conversions():
    with pytest.raises(TypeError, match="block must be one of .*got Linear"):
        from_transformers(torch.nn.Linear(4, 4))
    _, block = random_block("mixtral")
    layer = from_transformers(block)
    with pytest.raises(ValueError, match="config num_experts_per_tok is 3 but the layer has 2"):
        to_transformers(layer, MixtralConfig(hidden_size=D, intermediate_size=24,
                                             num_local_experts=6, num_experts_per_tok=3))
    with pytest.raises(ValueError, match="config renormalisation of the top-k weights is False"):
        to_transformers(layer, OlmoeConfig(hidden_size=D, intermediate_size=24, num_experts=6,
                                           num_experts_per_tok=2))
    with pytest.raises(TypeError, match="a Qwen2-MoE block needs a SharedExpertMoE"):
        to_transformers(layer, CONFIGS["qwen2_moe"][0]())
    with pytest.raises(TypeError, match="config must be one of the configs of"):
        to_transformers(layer, transformers.BertConfig())
    with pytest.raises(TypeError, match="a DeepSeek-V3 block needs a SharedExpertMoE"):
        to_transformers(layer, CONFIGS["deepseek_v3"][0]())
    _, block = random_block("deepseek_v3")
    with pytest.raises(ValueError, match="config topk_group is 3 but the layer has 2"):
        to_transformers(from_transformers(block), DeepseekV3Config(
            hidden_size=D, moe_intermediate_size=12, n_routed_experts=8, num_experts_per_tok=3,
            n_group=4, topk_group=3, n_shared_experts=2))


def test_deepseek_v3_bias_changes_the_choice_not_the_gates():
    """The correction bias moves experts in and out of the top-k; the converted layer follows
    it, and its output is the block's with and without the bias."""
    _, block = random_block("deepseek_v3", seed=4)
    layer = from_transformers(block).eval()
    assert torch.equal(layer.router.expert_bias, block.gate.e_score_correction_bias)
    x = torch.randn(2, 25, D)
    with torch.no_grad():
        _, _, with_bias = block.gate(x)
        torch.testing.assert_close(layer(x), block(x), rtol=0, atol=1e-5)
        block.gate.e_score_correction_bias.zero_()
        layer.router.expert_bias.zero_()
        _, _, without = block.gate(x)
        torch.testing.assert_close(layer(x), block(x), rtol=0, atol=1e-5)
    assert not torch.equal(with_bias.sort(-1).values, without.sort(-1).values)
    assert layer.router.k == 3 and layer.router.groups == 4 and layer.router.top_groups == 2


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3", "switch_bias_gelu"])
def test_converted_layers_take_an_attention_mask(name):
    """transformers' attention_mask (int64, 0 = padding) on a converted block: the kept tokens
    equal the block on those tokens alone, padding outputs 0."""
    _, block = random_block(name, seed=5)
    layer = from_transformers(block).eval()
    x = torch.randn(3, 7, D)
    attention_mask = torch.ones(3, 7, dtype=torch.long)
    attention_mask[0, 5:] = 0
    attention_mask[2, :3] = 0
    with torch.no_grad():
        got = layer(x, mask=attention_mask)
        kept = attention_mask.bool()
        expected = block(x[kept][None].clone())[0]
    torch.testing.assert_close(got[kept], expected, rtol=0, atol=1e-5)
    assert torch.equal(got[~kept], torch.zeros_like(got[~kept]))

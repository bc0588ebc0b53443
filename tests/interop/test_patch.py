"""patch/unpatch of whole transformers models, and the DBRX and GPT-OSS block converters
(skipped without transformers; tiny random configs, nothing downloaded)."""

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, DbrxConfig, LlamaConfig
from transformers.models.dbrx.modeling_dbrx import DbrxFFN

import sparsemoe
from sparsemoe.interop import PatchedBlock, coverage, patch, unpatch
from sparsemoe.interop.blocks import dbrx_from_transformers, dbrx_to_transformers


def _dbrx_config(normalize=1.0):
    return DbrxConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=128,
                      initializer_range=0.1,
                      ffn_config=dict(ffn_hidden_size=24, moe_num_experts=6, moe_top_k=2,
                                      moe_normalize_expert_weights=normalize),
                      attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=8.0))


def _model(family):
    if family == "dbrx":
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(_dbrx_config()).eval()
    return coverage.tiny_model(family)


FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "gpt_oss", "dbrx", "deepseek_v3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_unpatch_save_load(family, tmp_path):
    model = _model(family)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        patch(model)
        patched = [m for m in model.modules() if isinstance(m, PatchedBlock)]
        assert len(patched) == 2  # one per decoder layer
        after = model(ids).logits
        torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
        assert (after - before).abs().max() < 1e-3 * before.abs().max()
        unpatch(model)
        assert not any(isinstance(m, PatchedBlock) for m in model.modules())
        model.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded(ids).logits, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("normalize", [1.0, None])
def test_dbrx_block_equal_and_round_trip(normalize):
    config = _dbrx_config(normalize)
    torch.manual_seed(0)
    block = DbrxFFN(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(3, 5, 32)
    layer = dbrx_from_transformers(block).eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), block(x), atol=1e-5, rtol=1e-5)
        back = dbrx_to_transformers(layer, config).eval()
        torch.testing.assert_close(back(x), block(x), atol=0, rtol=0)


def test_dbrx_refuses_a_p_norm_it_cannot_compute():
    block = DbrxFFN(_dbrx_config(2.0))
    with pytest.raises(ValueError, match="moe_normalize_expert_weights"):
        dbrx_from_transformers(block)


def test_swapped_router_trains_and_unpatch_names_the_mismatch():
    model = patch(_model("mixtral")).train()
    block = next(m for m in model.modules() if isinstance(m, PatchedBlock))
    d, n = block.layer.d_model, block.layer.num_experts
    block.layer.router = sparsemoe.routers.NoisyTopKRouter(d, n, k=2)
    ids = torch.randint(3, 128, (2, 9))
    loss = model(ids, labels=ids).loss + sparsemoe.aux_loss(model)
    loss.backward()
    assert block.layer.router.w_gate.grad is not None
    assert block.layer.router.w_gate.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="TopKRouter"):
        unpatch(model)


def test_refuses_a_model_without_moe_blocks():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(TypeError, match="'llama'"):
        patch(AutoModelForCausalLM.from_config(config))
    with pytest.raises(ValueError, match="patch"):
        unpatch(AutoModelForCausalLM.from_config(config))

"""A trained MoETransformer (mixtral preset) to MixtralForCausalLM and back (skipped without
transformers). Tiny configurations, nothing downloaded."""

from dataclasses import replace

import pytest
import torch

pytest.importorskip("transformers")

import sparsemoe
from sparsemoe.interop import from_mixtral, to_mixtral
from sparsemoe.models.transformer import MoETransformer, preset


def trained(**overrides) -> MoETransformer:
    """A few AdamW steps, so that no weight is at its initial value (norms included)."""
    torch.manual_seed(0)
    cfg = preset("mixtral-8", vocab_size=50, d_model=32, n_heads=4, n_layers=2, context=16,
                 ffn_hidden=48, **overrides)
    model = MoETransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        tokens = torch.randint(0, 50, (4, 16))
        logits, _ = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        (loss + sparsemoe.aux_loss(model)).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("tie", [True, False])
def test_mixtral_round_trip_has_equal_logits(tie):
    model = trained(tie_embeddings=tie)
    hf = to_mixtral(model)
    assert type(hf).__name__ == "MixtralForCausalLM" and hf.config.tie_word_embeddings == tie
    tokens = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        ours = model(tokens)[0]
        theirs = hf(tokens).logits
    assert (ours - theirs).abs().max() <= 1e-5
    assert ours.abs().max() > 0.1  # not a trivially small output
    back = from_mixtral(hf)
    assert back.cfg == model.cfg
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert (back(tokens)[0] - theirs).abs().max() <= 1e-5


def test_mixtral_export_refuses_other_architectures():
    glam = MoETransformer(replace(preset("glam-8", vocab_size=50, d_model=32, context=16,
                                         ffn_hidden=64)))
    with pytest.raises(ValueError, match="MixtralForCausalLM needs .* the model's config has "
                                         r"\{'activation': 'gelu', 'moe_every': 2\}"):
        to_mixtral(glam)
    from transformers import MixtralConfig, MixtralForCausalLM

    gqa = MixtralForCausalLM(MixtralConfig(vocab_size=50, hidden_size=32, intermediate_size=16,
                                           num_hidden_layers=1, num_attention_heads=4,
                                           num_key_value_heads=2, num_local_experts=4))
    with pytest.raises(ValueError, match="num_key_value_heads=2, num_attention_heads=4"):
        from_mixtral(gqa)

import pytest
import torch
from torch import nn

from sparsemoe.models import (
    LMConfig,
    LSTMLanguageModel,
    multiply_adds_per_token,
    parameter_counts,
    preset,
)

D, H = 128, 256
LSTM_MADDS = 8 * D * D  # 4 gates × (input + recurrent) × d
EXPERT = 2 * D * H


@pytest.mark.parametrize("name,expected", [
    ("4xLSTM", 4 * LSTM_MADDS),
    ("MoE-1-Wide", 2 * LSTM_MADDS + D * 1 + 2 * D * 1024),
    ("MoE-1-Deep", 2 * LSTM_MADDS + D + D * H + 3 * H * H + H * D),
    ("MoE-4", 2 * LSTM_MADDS + D * 4 + 4 * EXPERT),
    ("MoE-32", 2 * LSTM_MADDS + D * 32 + 4 * EXPERT),
    ("MoE-256", 2 * LSTM_MADDS + D * 256 + 4 * EXPERT),
    ("MoE-256-h", 2 * LSTM_MADDS + D * 16 + 2 * D * 16 + 4 * EXPERT),
])
def test_multiply_adds_hand_count(name, expected):
    cfg = preset(name)
    assert multiply_adds_per_token(cfg) == expected
    # every preset does the same work in its middle layer, up to the gating
    assert abs(expected - 4 * LSTM_MADDS) <= D * 256 + 2


def test_training_counts_the_noise_matmul():
    cfg = preset("MoE-32")
    assert multiply_adds_per_token(cfg, training=True) - multiply_adds_per_token(cfg) == D * 32


def test_parameter_counts_hand_count():
    cfg = preset("MoE-32", vocab_size=1000)
    counts = parameter_counts(LSTMLanguageModel(cfg))
    lstm = 4 * (D * D + D * D + 2 * D)  # weights and torch's two bias vectors
    gates = 2 * D * 32  # W_g and W_noise
    assert counts["body"] == 2 * lstm + gates + 32 * EXPERT
    assert counts["active_per_token"] == 2 * lstm + gates + 4 * EXPERT
    assert counts["total"] == counts["body"] + 1000 * D + (D * 1000 + 1000)


def test_forward_is_the_papers_composition():
    """With dropout 0: embedding → (LSTM, MoE with sigmoid, LSTM), each added to its input."""
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=50, d_model=8, num_experts=4, k=2, hidden=16, dropout=0.0)
    model = LSTMLanguageModel(cfg).eval()
    tokens = torch.randint(0, 50, (3, 7))
    logits, state = model(tokens)
    h = model.embed(tokens)
    lstm1, moe, lstm2 = model.layers
    h = h + lstm1(h)[0]
    assert moe.output_activation is torch.sigmoid
    moe.output_activation = None  # the bare mixture Σ G(x)_i E_i(x), then the sigmoid by hand
    h = h + torch.sigmoid(moe(h))
    moe.output_activation = torch.sigmoid
    h = h + lstm2(h)[0]
    torch.testing.assert_close(logits, model.out(h))
    assert len(state) == 2 and state[0][0].shape == (1, 3, 8)


def test_state_carries_across_batches():
    torch.manual_seed(0)
    model = LSTMLanguageModel(LMConfig(vocab_size=30, d_model=8, num_experts=4, k=2,
                                       hidden=8)).eval()
    tokens = torch.randint(0, 30, (2, 10))
    whole, _ = model(tokens)
    first, state = model(tokens[:, :6])
    second, _ = model(tokens[:, 6:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["4xLSTM", "MoE-1-Deep", "MoE-256-h"])
def test_presets_build_and_run(name):
    model = LSTMLanguageModel(preset(name, vocab_size=20, d_model=8, hidden=16))
    logits, _ = model(torch.randint(0, 20, (2, 3)))
    assert logits.shape == (2, 3, 20)
    n_lstm = sum(isinstance(m, nn.LSTM) for m in model.layers)
    assert n_lstm == (4 if name == "4xLSTM" else 2)


def test_bad_config():
    with pytest.raises(ValueError, match="middle must be one of"):
        LMConfig(middle="gru")
    with pytest.raises(ValueError, match=r"num_experts \(100\) must be a multiple of groups"):
        LMConfig(middle="hmoe", num_experts=100, groups=16)
    with pytest.raises(ValueError, match="preset must be one of"):
        preset("MoE-7")


@pytest.mark.parametrize("balancing", ["paper", "switch", "aux-free"])
def test_balancing_kinds(balancing):
    """Each balancing builds its router, trains, and counts its gating (no noise matmul
    outside the paper's gating); the aux-free model has no auxiliary loss, only the bias."""
    import sparsemoe
    from sparsemoe.routers import DeepSeekV3Router, NoisyTopKRouter, TopKRouter

    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=40, d_model=8, num_experts=6, k=2, hidden=8, balancing=balancing)
    model = LSTMLanguageModel(cfg)
    router = model.moe_layers()[0].router
    kind = {"paper": NoisyTopKRouter, "switch": TopKRouter, "aux-free": DeepSeekV3Router}
    assert type(router) is kind[balancing]
    logits, _ = model(torch.randint(0, 40, (3, 5)))
    aux = sparsemoe.aux_loss(model)
    assert (float(aux.detach()) == 0.0) == (balancing == "aux-free")
    (logits.square().mean() + aux).backward()
    assert router.w_gate.grad.abs().sum() > 0
    extra = multiply_adds_per_token(cfg, training=True) - multiply_adds_per_token(cfg)
    assert extra == (8 * 6 if balancing == "paper" else 0)
    if balancing == "aux-free":
        sparsemoe.balancing.update_expert_biases(model)
        assert router.expert_bias.abs().sum() > 0


def test_balancing_errors():
    with pytest.raises(ValueError, match="balancing must be one of"):
        LMConfig(balancing="none")
    with pytest.raises(ValueError, match="is for the flat MoE"):
        LMConfig(middle="hmoe", num_experts=32, groups=4, balancing="switch")


def test_bias_update_speed_reaches_the_aux_free_router_and_is_refused_elsewhere():
    def router(**kw):
        cfg = LMConfig(vocab_size=50, d_model=16, num_experts=8, hidden=8, **kw)
        return LSTMLanguageModel(cfg).moe_layers()[0].router

    assert router(balancing="aux-free").bias_update_speed == 1e-3  # DeepSeek-V3's γ
    assert router(balancing="aux-free", bias_update_speed=0.02).bias_update_speed == 0.02
    with pytest.raises(ValueError, match="bias_update_speed is for balancing 'aux-free'.*'paper'"):
        LMConfig(bias_update_speed=0.01)
    with pytest.raises(ValueError, match="bias_update_speed"):
        LMConfig(balancing="aux-free", bias_update_speed=0.0)


def test_gate_init_std_reaches_the_noisy_gates_and_is_refused_elsewhere():
    for middle in ("moe", "hmoe"):
        cfg = LMConfig(vocab_size=50, d_model=16, middle=middle, num_experts=32, groups=4,
                       hidden=8, gate_init_std=0.3)
        router = LSTMLanguageModel(cfg).moe_layers()[0].router
        assert router.gate_init_std == 0.3
        assert all(torch.count_nonzero(p) == p.numel()
                   for n, p in router.named_parameters() if "gate" in n)
    with pytest.raises(ValueError, match="gate_init_std is for the noisy top-k gate .*'switch'"):
        LMConfig(gate_init_std=0.1, balancing="switch")

"""benchmarks/parallel_scaling.py's traffic model against hand counts: the parameters of a
small LSTM LM and MoE Transformer counted by hand, and each byte and message term written out
for one mesh. Its FSDP2 terms against a real gloo run: tests/test_parallel.py
(``test_fsdp2_bytes_are_the_scaling_models``)."""

import argparse

import pytest
from helpers import load_benchmark

scaling = load_benchmark("parallel_scaling")


def test_lstm_lm_counts_by_hand():
    """V = 10, d = 8, h = 16, n = 4: embedding 10·8; two LSTMs of 4·8 gates, each
    (8 + 8 inputs)·32 weights and 2·32 biases; the noisy gate's w_gate and w_noise 8·4 each;
    softmax 8·10 + 10. An expert: w1 8·16 and w2 16·8, 2·8·16 multiply-adds per row."""
    counts = scaling.build_counts("lstm", {"d_model": 8, "hidden": 16, "k": 2}, 10, 4)
    lstm = 2 * 8 * 32 + 2 * 32
    assert counts.non_expert == 80 + 2 * lstm + 2 * 32 + 90
    assert counts.per_expert == 2 * 8 * 16 and counts.multiply_adds_per_row == 256
    assert counts.moe_layers == 1 and counts.d_model == 8


def test_transformer_counts_by_hand():
    """Two blocks, d = 8, tied embeddings (counted once) of V = 10, RMSNorm weights, attention
    qkv 8·24 and proj 8·8, a top-k router 8·4 per block, a final norm; SwiGLU experts:
    w1 8·2·16, w2 16·8, 3·8·16 multiply-adds per row, summed over the 2 layers per expert."""
    counts = scaling.build_counts(
        "transformer", {"d_model": 8, "hidden": 16, "k": 2, "router": "top-k", "n_layers": 2,
                        "n_heads": 2, "activation": "swiglu"}, 10, 4)
    block = 2 * 8 + 8 * 24 + 8 * 8 + 8 * 4
    assert counts.non_expert == 80 + 2 * block + 8
    assert counts.per_expert == 2 * (8 * 32 + 16 * 8)
    assert counts.multiply_adds_per_row == 3 * 8 * 16 and counts.moe_layers == 2


def test_traffic_terms_by_hand():
    counts = scaling.ModelCounts(moe_layers=2, non_expert=1000, per_expert=60,
                                 multiply_adds_per_row=256, d_model=8)
    # 4 exchanges per layer of 10 tokens · k 2 rows of 8 numbers, 3 of 4 ranks' share leaves
    assert scaling.exchange_bytes(counts, 10, 2, 4, 2) == 2 * 4 * 20 * 8 * 2 * 0.75
    assert scaling.exchange_bytes(counts, 10, 2, 1, 2) == 0
    # 2x4 mesh, W = 8, banks of 30 parameters per layer over dp = 2
    assert scaling.fsdp_bytes(1000, 30, 2, 4, 4, False, 2) == 4 * (2 * 1000 * 7 / 8
                                                                  + 3 * 2 * 30 / 2)
    assert scaling.fsdp_bytes(1000, 30, 2, 4, 4, True, 2) == 4 * (2 * 1000 * 7 / 8
                                                                 + 2 * 2 * 30 / 2)
    assert scaling.fsdp_bytes(1000, 30, 1, 1, 4, False) == 0
    assert scaling.fsdp_messages(2, 2, 4, False) == 2 * 7 + 3 * 2 * 1
    assert scaling.fsdp_messages(2, 2, 4, True) == 2 * 7 + 2 * 2 * 1


def test_table_row_by_hand():
    """One row at an assumed rate: the step time and its shares written out."""
    args = argparse.Namespace(
        arch="lstm", d_model=8, hidden=16, k=2, vocab_size=10, set=[], tokens=10,
        experts_per_rank=2, meshes=[(2, 2)], replicate=False, bandwidths=[1.0],
        latency_us=1.0, bytes_per_element=4, param_bytes=4)
    counts = scaling.build_counts("lstm", {"d_model": 8, "hidden": 16, "k": 2}, 10, 4)
    compute = 3 * 10 * 2 * 256 / 1e6
    v = 4 * 20 * 8 * 4 / 2
    f = 4 * (2 * counts.non_expert * 3 / 4 + 3 * 2 * 256 / 2)
    fsdp_time = f / 1e9 + (2 * 3 + 3) * 1e-6
    t = compute + v / 1e9 + 4 * 1e-6 + fsdp_time
    e = compute / t
    row = scaling.table(args, 1e6).splitlines()[2]
    assert row == (f"| 4 | 2×2 | 4 | {v / 1e6:.2f} | {f / 1e6:.2f} | "
                   f"{4 * (2 * counts.non_expert * 3 / 4 + 2 * 2 * 256 / 2) / 1e6:.2f} | "
                   f"{100 * e:.0f}%, {4 * e:.1f}, {100 * fsdp_time / t:.0f}% |")


@pytest.mark.parametrize("text", ["2", "0x4", "ax2", "2x"])
def test_bad_mesh_names_the_format(text):
    with pytest.raises(argparse.ArgumentTypeError, match="DPxEP"):
        scaling.parse_mesh(text)

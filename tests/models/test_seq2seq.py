import itertools
import math

import pytest
import torch

from sparsemoe.layers import HierarchicalMoE, MoE
from sparsemoe.models.seq2seq import (
    PRESETS,
    FactorisedAttention,
    Seq2Seq,
    Seq2SeqConfig,
    beam_search,
    greedy_search,
    length_penalty,
    multiply_adds_per_timestep,
    preset,
)
from sparsemoe.routers import StrictlyBalancedRouter

BOS, EOS = 2, 3


def tiny(name="MoE-32", **kw):
    return Seq2Seq(preset(name, vocab_size=30, d_model=8, attention_dim=6, hidden=4,
                          **({"num_experts": 16, "groups": 4} if name == "MoE-256-h" else {}),
                          **kw))


def test_factorised_attention_equals_naive_double_loop():
    torch.manual_seed(0)
    att = FactorisedAttention(5, 7).double()
    x = torch.randn(2, 4, 5, dtype=torch.float64)  # source
    y = torch.randn(2, 3, 5, dtype=torch.float64)  # decoder states
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    context, weights = att(y, att.keys(x), x, mask)
    U, W, V = (t.detach() for t in (att.U.weight.T, att.W.weight.T, att.V))
    for b in range(2):
        for j in range(3):
            scores = []
            for i in range(4):
                a = sum(V[d] * math.tanh((x[b, i] @ U)[d]) * math.tanh((y[b, j] @ W)[d])
                        for d in range(7))
                scores.append(a if mask[b, i] else -math.inf)
            w = torch.tensor(scores, dtype=torch.float64).softmax(0)
            torch.testing.assert_close(weights[b, j], w, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(context[b, j], (w[:, None] * x[b]).sum(0), rtol=1e-12,
                                       atol=1e-14)
    assert weights[1, :, 3].eq(0).all()


def test_presets_build_the_paper_layers_at_equal_compute():
    m = tiny("MoE-32")
    assert isinstance(m.enc_moe, MoE) and isinstance(m.dec_moe, MoE)
    assert m.enc_moe is not m.dec_moe and m.enc_moe.router.w_importance == 0.01
    assert isinstance(tiny("MoE-32-sb").enc_moe.router, StrictlyBalancedRouter)
    assert isinstance(tiny("MoE-256-h").dec_moe, HierarchicalMoE)
    assert tiny("GNMT").moe_layers() == []
    d, a = 128, 128
    gnmt = multiply_adds_per_timestep(preset("GNMT"))
    assert gnmt == {"encoder": 6 * d * d + 16 * d * d + d * a, "decoder": 16 * d * d + d * a + a,
                    "total": 22 * d * d + d * a + 16 * d * d + d * a + a}
    middle = 4 * 2 * d * 256  # k experts of 2·d·h, in each half
    for name, gate in (("MoE-1-Wide", d), ("MoE-32", 32 * d), ("MoE-256-h", d * (16 + 2 * 16))):
        assert multiply_adds_per_timestep(preset(name))["total"] == \
            gnmt["total"] + 2 * (middle + gate)
    with pytest.raises(ValueError, match="gating 'strictly-balanced' applies to a flat MoE"):
        Seq2SeqConfig(middle="hmoe", num_experts=256, gating="strictly-balanced")
    with pytest.raises(ValueError, match="gating must be one of"):
        Seq2SeqConfig(gating="top-1")


@pytest.mark.parametrize("name", list(PRESETS))
def test_padding_and_batch_do_not_change_a_sentence(name):
    torch.manual_seed(0)
    m = tiny(name).eval()
    short = torch.tensor([[5, 6, 7]])
    batch = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    tgt = torch.tensor([[BOS, 9, 4]])
    alone = m(short, tgt)
    padded = m(batch, torch.cat([tgt, torch.tensor([[BOS, 5, 6]])]))[:1]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="empty sequence"):
        m.encode(torch.tensor([[0, 0]]))


def test_training_step_reaches_every_parameter():
    torch.manual_seed(0)
    m = tiny("MoE-32-sb", num_experts=4, k=2)
    src, tgt = torch.randint(4, 30, (6, 5)), torch.randint(4, 30, (6, 4))
    loss = m(src, tgt).logsumexp(-1).mean() + sum(x.aux_loss for x in m.moe_layers())
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == [], missing


@pytest.mark.parametrize("name", ["GNMT", "MoE-32", "MoE-32-sb", "MoE-256-h"])
def test_beam_one_is_greedy(name):
    torch.manual_seed(1)
    m = tiny(name).eval()
    src = torch.randint(4, 30, (5, 6))
    src[1, 3:] = 0
    g = greedy_search(m, src, BOS, EOS, max_len=12)
    assert beam_search(m, src, BOS, EOS, beam=1, max_len=12, alpha=0.6) == g
    assert beam_search(m, src, BOS, EOS, beam=1, max_len=12, alpha=0.0) == g


class TableDecoder:
    """A hand-made decoder: next-token log-probabilities from a table indexed by the previous
    token (the state is nothing but the batch of sources)."""

    def __init__(self, logp):
        self.logp = logp  # [V, V]: row = previous token

    def start(self, source):
        return {"rows": torch.arange(source.shape[0])}

    def step(self, tokens, state):
        return self.logp[tokens], state

    def reorder(self, state, index):
        return {"rows": state["rows"][index]}


def sequence_logp(logp, seq):
    prev, total = BOS, 0.0
    for t in seq:
        total += float(logp[prev, t])
        prev = t
    return total


def exhaustive_best(logp, max_len, alpha):
    """The best normalised score over every sequence ending in </s> within max_len tokens."""
    words = [w for w in range(logp.shape[0]) if w != EOS]
    best = None
    for n in range(max_len):
        for body in itertools.product(words, repeat=n):
            seq = [*body, EOS]
            s = sequence_logp(logp, seq) / length_penalty(len(seq), alpha)
            if best is None or s > best[0]:
                best = (s, list(body))
    return best


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_beam_search_finds_the_highest_scoring_hypothesis(alpha):
    gen = torch.Generator().manual_seed(3)
    logp = torch.randn(5, 5, generator=gen, dtype=torch.float64).mul(2).log_softmax(-1)
    logp[:, [0, 1]] = -math.inf  # tokens 0 and 1 (pad, unk) never come
    logp = logp.log_softmax(-1)
    source = torch.zeros(2, 1, dtype=torch.long)
    # wide enough to keep every prefix: the search is exhaustive and must return the optimum
    found = beam_search(TableDecoder(logp), source, BOS, EOS, beam=64, max_len=4, alpha=alpha)
    best = exhaustive_best(logp, 4, alpha)
    assert found == [best[1], best[1]]


def test_beam_beats_greedy_on_a_hand_made_model():
    # From <s>: token 4 (p = 0.6), then 4 again (0.7) or </s> (0.3); token 5 (p = 0.4), then
    # </s> (p = 1). Greedy takes 4, 4, </s> (0.6·0.7·0.3 = 0.126); beam 2 keeps 5 and finds
    # 5 </s> (0.4), the most probable sequence.
    p = torch.full((6, 6), 1e-9, dtype=torch.float64)
    p[BOS, 4], p[BOS, 5] = 0.6, 0.4
    p[4, EOS], p[4, 4] = 0.3, 0.7
    p[5, EOS] = 1.0
    logp = (p / p.sum(-1, keepdim=True)).log()
    source = torch.zeros(1, 1, dtype=torch.long)
    dec = TableDecoder(logp)
    assert greedy_search(dec, source, BOS, EOS, max_len=3) == [[4, 4]]
    assert beam_search(dec, source, BOS, EOS, beam=2, max_len=3, alpha=0.0) == [[5]]
    assert exhaustive_best(logp, 3, 0.0)[1] == [5]
    with pytest.raises(ValueError, match="beam must be >= 1"):
        beam_search(dec, source, BOS, EOS, beam=0)


def test_strictly_balanced_threshold_loss_by_hand():
    """L_batchwise = Σ_j Σ_i (M_threshold − M_batchwise)(X − T) on a 3-token, 2-expert batch.

    X = G_σ = [[.7, .3], [.4, .6], [.9, .1]], T = [.5, .5], k = 1 → m = ⌈1·3/2⌉ = 2.
    M_batchwise: expert 0 takes tokens 0, 2; expert 1 takes tokens 0, 1.
    M_threshold: expert 0: [1, 0, 1]; expert 1: [0, 1, 0].
    Only (token 0, expert 1) differs: (0 − 1)(0.3 − 0.5) = 0.2; ∂L/∂T = [0, 1].
    """
    router = StrictlyBalancedRouter(2, 2, k=1)  # as the MoE-32-sb preset builds it, w = 0
    with torch.no_grad():
        router.w_gate.copy_(torch.eye(2))  # logits = log X, so G_σ = softmax(log X) = X
        router.thresholds.fill_(0.5)
    router.train()
    x = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]]).log()
    loss = router(x).aux_loss
    torch.testing.assert_close(loss, torch.tensor(0.2), rtol=1e-6, atol=1e-7)
    loss.backward()
    torch.testing.assert_close(router.thresholds.grad, torch.tensor([0.0, 1.0]))
    router.eval()  # at inference the thresholds decide: token 0 now goes to expert 0 only
    assert router(x).valid.tolist() == [[True, False], [False, True], [True, False]]


def test_search_goes_on_while_a_longer_hypothesis_can_still_win():
    # <s> → </s> (0.55) finishes first with log 0.55 / lp(1) = −0.60; <s> → 4 (0.45) → 5 → </s>
    # (0.99 each) has log P = −0.82 but, normalised with α = 2, −0.82 / lp(3) = −0.46: better.
    # The search may stop only when the live score over lp(max_len) cannot win any more (or
    # K hypotheses have finished: beam 3 leaves room for the improbable <s> 4 </s>).
    p = torch.full((6, 6), 1e-9, dtype=torch.float64)
    p[BOS, EOS], p[BOS, 4] = 0.55, 0.45
    p[4, 5], p[5, EOS] = 0.99, 0.99
    logp = (p / p.sum(-1, keepdim=True)).log()
    source = torch.zeros(1, 1, dtype=torch.long)
    assert exhaustive_best(logp, 4, 2.0)[1] == [4, 5]
    assert beam_search(TableDecoder(logp), source, BOS, EOS, beam=3, max_len=4,
                       alpha=2.0) == [[4, 5]]
    assert beam_search(TableDecoder(logp), source, BOS, EOS, beam=3, max_len=4,
                       alpha=0.0) == [[]]  # without normalisation </s> alone is best

"""The layer protocol: MoEStats' load statistics and aux_loss(model) over every MoEModule."""

import statistics

import pytest
import torch
from torch import nn

import sparsemoe
from sparsemoe.experiments.lm import load_statistics
from sparsemoe.module import MoEStats, coefficient_of_variation, max_over_mean


@pytest.mark.parametrize("values", [[3, 1, 0, 4], [2.5, 2.5], [0.1, 7.0, 2.0, 2.0, 9.0]])
def test_cv_and_max_over_mean_by_hand(values):
    t = torch.tensor(values, dtype=torch.float64)
    mean = sum(values) / len(values)
    assert coefficient_of_variation(t) == pytest.approx(statistics.pstdev(values) / mean,
                                                        rel=1e-12)
    assert max_over_mean(t) == pytest.approx(max(values) / mean, rel=1e-12)
    stats = MoEStats(importance=t, load=2 * t, tokens_per_expert=t.long())
    assert stats.cv_importance == stats.cv_load == coefficient_of_variation(t)
    ints = [int(v) for v in values]
    lm_stats = load_statistics([ints])
    assert lm_stats["cv_load"] == coefficient_of_variation(torch.tensor(ints))
    assert lm_stats["max_over_mean_load"] == stats.max_over_mean_load
    assert lm_stats["experts_unused"] == sum(v == 0 for v in ints)


def test_statistics_of_an_empty_load_are_zero():
    zeros = torch.zeros(4)
    assert coefficient_of_variation(zeros) == 0.0 and max_over_mean(zeros) == 0.0


def test_aux_loss_sums_every_kind_of_layer():
    torch.manual_seed(0)
    moe = sparsemoe.MoE(4, 4, 2, hidden=6, w_importance=0.5)
    soft = sparsemoe.SoftMoE(sparsemoe.routers.SoftMoERouter(4, 2),
                             sparsemoe.FeedForwardExperts(2, 4, 6))
    model = nn.Sequential(moe, soft)
    with pytest.raises(RuntimeError, match="2 MoE layer\\(s\\) have not run a forward pass"):
        sparsemoe.aux_loss(model)
    model(torch.randn(3, 5, 4))
    assert sparsemoe.aux_loss(model).item() == pytest.approx(moe.aux_loss.item() + 0.0)
    assert moe.aux_loss.item() > 0
    with pytest.raises(ValueError, match="contains no sparsemoe MoE layer"):
        sparsemoe.aux_loss(nn.Linear(2, 2))

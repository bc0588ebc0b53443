"""benchmarks/lm_seeds.py's and lm_data_scale.py's tables against hand-computed means, sample
standard deviations, paired differences and relative changes."""

import pytest
from helpers import load_benchmark

lm_seeds = load_benchmark("lm_seeds")
lm_data_scale = load_benchmark("lm_data_scale")


def test_parse_run_and_name():
    assert lm_seeds.parse_run("MoE-32") == ("MoE-32", 0.0)
    assert lm_seeds.parse_run("MoE-32:0.088") == ("MoE-32", 0.088)
    assert lm_seeds.run_name("MoE-32", 0.0) == "MoE-32"
    assert lm_seeds.run_name("MoE-32", 0.088) == "MoE-32+Wg~N(0,0.088^2)"


def test_tables_by_hand():
    def m(test, valid):
        return {"test_perplexity": test, "valid_perplexity": valid}

    results = {"dense": {0: m(100.0, 110.0), 1: m(104.0, 112.0), 2: m(102.0, 111.0)},
               "moe": {0: m(99.0, 108.0), 1: m(101.0, 113.0)}}  # seed 2 unfinished
    lines = lm_seeds.format_tables(results, "dense").splitlines()
    # test: dense mean 102, sample std sqrt(((−2)² + 2² + 0²) / 2) = 2; moe 100 ± sqrt(2)
    assert "| dense | 100.0 | 104.0 | 102.0 | 102.0 ± 2.0 |" in lines
    assert "| moe | 99.0 | 101.0 | – | 100.0 ± 1.4 |" in lines
    # valid: dense 111 ± 1
    assert "| dense | 110.0 | 112.0 | 111.0 | 111.0 ± 1.0 |" in lines
    # paired test differences −1, −3 over the seeds both finished: −2 ± sqrt(2)
    assert "| moe − dense | -1.0 | -3.0 | – | -2.0 ± 1.4 |" in lines
    # paired valid differences −2, +1: −0.5 ± sqrt(4.5)
    assert "| moe − dense | -2.0 | +1.0 | – | -0.5 ± 2.1 |" in lines


@pytest.mark.parametrize("values, text", [([], "–"), ([3.25], "3.2 (one seed)")])
def test_mean_std_with_fewer_than_two_seeds(values, text):
    assert lm_seeds.mean_std(values) == text


def test_data_scale_table_by_hand():
    results = {"dense": {"valid_step": [100, 200], "valid_perplexity": [200.0, 150.0],
                         "test_perplexity": 160.0},
               "moe": {"valid_step": [100, 200], "valid_perplexity": [210.0, 135.0],
                       "test_perplexity": 144.0}}
    lines = lm_data_scale.format_scale(results, tokens_per_step=1120).splitlines()
    assert lines[0] == "| run | 0.11M | 0.22M | test PPL (end) |"
    assert "| moe | 210.0 | 135.0 | 144.0 |" in lines
    # 210/200 − 1 = +5%, 135/150 − 1 = −10%, 144/160 − 1 = −10%
    assert "| moe | +5.0% | -10.0% | -10.0% |" in lines

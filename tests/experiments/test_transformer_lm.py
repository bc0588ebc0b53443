import json
import math
import random
from dataclasses import replace

import pytest
import torch

from sparsemoe.cli import main
from sparsemoe.experiments.lm import LMTrainConfig, Trainer, cosine_factor, evaluate_checkpoint
from sparsemoe.experiments.runs import RunError
from sparsemoe.experiments.transformer_lm import (
    dense_quality,
    interpolate_log,
    pair_with_twins,
    steps_to_reach,
)

SMALL = {"d_model": 16, "n_heads": 2, "n_layers": 2, "ffn_hidden": 32}


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    rng = random.Random(1)
    words = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(300)]
    path = tmp_path_factory.mktemp("corpus") / "gen.txt"
    path.write_text("\n".join(lines))
    return str(path)


def tiny_config(corpus_file, out, preset="gshard-8", **kw):
    return LMTrainConfig(**{"arch": "transformer", "corpus": (corpus_file,), "vocab_size": None,
                          "preset": preset, "model": SMALL, "batch_size": 4, "bptt": 6,
                          "steps": 6, "eval_every": 2, "eval_tokens": 120, "warmup": 2,
                          "out": str(out), **kw})


def test_cosine_schedule_by_hand():
    assert [cosine_factor(s, 2, 10) for s in range(2)] == [0.5, 1.0]
    assert cosine_factor(5, 2, 10) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert cosine_factor(9, 2, 10) == pytest.approx(0.1)
    assert cosine_factor(50, 2, 10) == pytest.approx(0.1)


def test_transformer_defaults_and_errors(corpus_file, tmp_path):
    cfg = tiny_config(corpus_file, tmp_path)
    assert (cfg.optimizer, cfg.schedule) == ("adamw", "cosine")
    assert (LMTrainConfig().optimizer, LMTrainConfig().schedule) == ("adam", "rsqrt")
    with pytest.raises(ValueError, match=r"preset must be one of \('dense', .*\), "
                                         r"got 'MoE-32'"):
        LMTrainConfig(arch="transformer")
    with pytest.raises(ValueError, match=r"arch must be one of \('lstm', 'transformer'\)"):
        LMTrainConfig(arch="rnn")
    with pytest.raises(ValueError, match="schedule 'cosine' decays over the training steps"):
        Trainer(replace(cfg, steps=None, time_budget=1.0), progress=False)


@pytest.mark.parametrize("preset", ["gshard-8", "switch-8"])
def test_transformer_resume_is_exact(corpus_file, tmp_path, preset):
    """GShard's random second expert and Switch's jitter draw from the saved RNG: N steps in
    one run equal N/2, a checkpoint and N/2 more, loss for loss."""
    whole = Trainer(tiny_config(corpus_file, tmp_path / "a", preset, decay_steps=6),
                    progress=False)
    whole.run()
    Trainer(tiny_config(corpus_file, tmp_path / "b", preset, decay_steps=6, steps=3),
            progress=False).run()
    resumed = Trainer(tiny_config(corpus_file, tmp_path / "b", preset, decay_steps=6),
                      progress=False)
    assert resumed.step == 3 and type(resumed.opt).__name__ == "AdamW"
    resumed.run()
    assert resumed.history["train_loss"] == whole.history["train_loss"]
    assert resumed.history["valid_perplexity"] == whole.history["valid_perplexity"]
    for (name, a), b in zip(whole.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.sched.get_last_lr() == whole.sched.get_last_lr()
    # the cosine decays over the steps: another step count would change the schedule
    Trainer(tiny_config(corpus_file, tmp_path / "c", preset, steps=3), progress=False).run()
    with pytest.raises(RunError, match=r"decays its learning rate over its steps \(3, cosine"):
        Trainer(tiny_config(corpus_file, tmp_path / "c", preset), progress=False)


def test_bf16_training_step(corpus_file, tmp_path):
    trainer = Trainer(tiny_config(corpus_file, tmp_path, "mixtral-8", autocast=True),
                      progress=False)
    assert math.isfinite(trainer.train_step())


def test_lm_compare_arch_transformer_end_to_end(corpus_file, tmp_path):
    out = tmp_path / "cmp"
    main(["lm", "compare", "--arch", "transformer", "--presets", "dense,switch-8,glam-8",
          "--corpus", corpus_file, "--steps", "6", "--batch-size", "4", "--bptt", "6",
          "--eval-tokens", "120", "--evaluations", "3", "--out", str(out)])
    table = (out / "results.md").read_text()
    assert all(f"| {p} |" in table for p in ("dense", "switch-8", "glam-8"))
    metrics = json.loads((out / "switch-8" / "metrics.json").read_text())
    assert metrics["arch"] == "transformer" and metrics["steps"] == 6
    assert metrics["history"]["valid_step"] == [2, 4, 6]
    assert len(metrics["history"]["valid_seconds"]) == 3
    dense = json.loads((out / "dense" / "metrics.json").read_text())
    # compute-matched: Switch adds only its routers (d·n in each of the 4 layers)
    assert metrics["multiply_adds_per_token"] == dense["multiply_adds_per_token"] + 4 * 64 * 8
    assert metrics["params_active_per_token"] < metrics["params_body"]
    quality = (out / "dense_quality.md").read_text()
    assert "| switch-8 | dense |" in quality and "| glam-8 | dense |" in quality
    experts = (out / "experts.md").read_text()  # Table 9's report of the first MoE layer
    assert "What the experts of switch-8 learned" in experts and "strongest contexts" in experts
    assert 1 < metrics["test_perplexity"] < 30
    evaluated = evaluate_checkpoint(out / "switch-8")
    assert evaluated["test_perplexity"] == pytest.approx(metrics["test_perplexity"], rel=1e-6)
    pytest.importorskip("matplotlib")
    for png in ("perplexity_vs_experts.png", "validation_curves.png", "expert_load.png"):
        assert (out / png).stat().st_size > 1000
    main(["lm", "train", "--arch", "transformer", "--preset", "dense", "--corpus", corpus_file,
          "--steps", "2", "--batch-size", "4", "--bptt", "6", "--d-model", "16",
          "--out", str(tmp_path / "one")])
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert one["model_config"]["d_model"] == 16 and one["model_config"]["context"] == 6


def curve(steps, ppl, seconds, test, tps=1000.0):
    return {"history": {"valid_step": steps, "valid_perplexity": ppl, "valid_seconds": seconds},
            "test_perplexity": test, "tokens_per_second": tps}


def test_steps_to_dense_quality_on_made_up_curves():
    dense = curve([10, 20, 30, 40], [100.0, 80.0, 60.0, 50.0], [1, 2, 3, 4], 52.0, 1000.0)
    moe = curve([10, 20, 30, 40], [90.0, 60.0, 45.0, 40.0], [2, 4, 6, 8], 42.0, 500.0)
    # 50 is reached between step 20 (60) and 30 (45), linearly in log-perplexity
    w = (math.log(60) - math.log(50)) / (math.log(60) - math.log(45))
    assert steps_to_reach([10, 20, 30, 40], [90.0, 60.0, 45.0, 40.0], 50.0) == \
        pytest.approx(20 + 10 * w)
    q = dense_quality(moe, dense)
    assert q["target"] == 50.0 and q["dense_steps"] == 40
    assert q["speedup"] == pytest.approx(40 / (20 + 10 * w))
    assert (q["test_perplexity"], q["dense_test_perplexity"]) == (42.0, 52.0)
    # equal wall time: the shorter run's 4 s; the MoE at 4 s is its step-20 value
    assert q["equal_time"] == 4
    assert q["valid_perplexity_at_equal_time"] == pytest.approx(60.0)
    assert q["dense_valid_perplexity_at_equal_time"] == pytest.approx(50.0)
    assert interpolate_log([2, 4], [90.0, 60.0], 3) == pytest.approx(math.sqrt(90 * 60))
    assert interpolate_log([2, 4], [90.0, 60.0], 1) is None
    never = curve([10, 20], [90.0, 70.0], [1, 2], 70.0)
    assert dense_quality(never, dense)["speedup"] is None
    assert steps_to_reach([10, 20], [40.0, 30.0], 50.0) == 10.0


def test_runs_pair_with_their_dense_twins():
    from dataclasses import asdict

    from sparsemoe.models.transformer import preset

    runs = [{"preset": p, "model_config": asdict(preset(p))}
            for p in ("dense", "switch-8", "mixtral-8", "dbrx-16")]
    pairs = [(m["preset"], d["preset"]) for m, d in pair_with_twins(runs)]
    assert pairs == [("switch-8", "dense")]  # mixtral's and dbrx's twin, dense-swiglu, is absent

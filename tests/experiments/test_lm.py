import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from torch import nn

import sparsemoe
from sparsemoe.cli import main
from sparsemoe.experiments import runs
from sparsemoe.experiments.lm import (
    LMTrainConfig,
    Trainer,
    evaluate,
    evaluate_checkpoint,
    lr_factor,
)
from sparsemoe.experiments.runs import RunError


def test_lr_schedule():
    assert [lr_factor(s, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(15, 4) == pytest.approx(math.sqrt(4 / 16))


class Bigram(nn.Module):
    """A known model: next-token log-probabilities from a fixed table."""

    def __init__(self, logp):
        super().__init__()
        self.logp = logp

    def forward(self, tokens, state=None):
        return self.logp[tokens], state


def test_perplexity_equals_hand_computation():
    torch.manual_seed(0)
    v = 5
    logp = torch.log_softmax(torch.randn(v, v, dtype=torch.float64), dim=1)
    tokens = torch.randint(0, v, (23,))
    nll = -sum(logp[a, b].item() for a, b in zip(tokens[:-1].tolist(), tokens[1:].tolist(),
                                                 strict=True)) / 22
    result = evaluate(Bigram(logp), tokens, batch_size=3, bptt=4)
    assert result["tokens"] == 22
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-12)
    uniform = evaluate(Bigram(torch.zeros(v, v)), tokens, batch_size=3, bptt=4)
    assert uniform["perplexity"] == pytest.approx(v, rel=1e-6)


@pytest.mark.parametrize("optimizer", ["adam", "factored-adam"])
def test_resume_is_exact(corpus_file, tmp_path, optimizer):
    """N steps in one run equal N/2 steps, a checkpoint, and N/2 more: loss for loss."""
    whole = Trainer(tiny_config(corpus_file, tmp_path / "a", optimizer=optimizer),
                    progress=False)
    whole.run()
    Trainer(replace(tiny_config(corpus_file, tmp_path / "b", optimizer=optimizer), steps=3),
            progress=False).run()
    resumed = Trainer(tiny_config(corpus_file, tmp_path / "b", optimizer=optimizer),
                      progress=False)
    assert type(resumed.opt).__name__ == ("FactoredAdam" if optimizer == "factored-adam"
                                          else "Adam")
    assert resumed.step == 3
    resumed.run()
    assert resumed.history["train_loss"] == whole.history["train_loss"]
    assert resumed.history["valid_perplexity"] == whole.history["valid_perplexity"]
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(RunError, match=r"written by a different configuration "
                                       r"\(lr: saved 0.002, now 1.0\)"):
        Trainer(replace(tiny_config(corpus_file, tmp_path / "b", optimizer=optimizer), lr=1.0),
                progress=False)
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ck["exchange_capacity"] is None  # one process: no exchange
    runs.save_checkpoint(tmp_path / "b" / "checkpoint.pt", {**ck, "exchange_capacity": 5})
    with pytest.warns(UserWarning, match="trained with exchange_capacity 5 and resumes with "
                                         "None: the rows the padded exchange drops can differ"):
        Trainer(tiny_config(corpus_file, tmp_path / "b", optimizer=optimizer), progress=False)


def test_cli_train_eval_compare_end_to_end(corpus_file, tmp_path, capsys):
    run = tmp_path / "run"
    main(["lm", "train", "--corpus", corpus_file, "--experts", "4", "--k", "2", "--hidden",
          "16", "--d-model", "8", "--steps", "4", "--batch-size", "4", "--bptt", "5",
          "--eval-every", "2", "--out", str(run)])
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("valid_perplexity", "test_perplexity", "tokens_per_second", "params_total",
                "params_active_per_token", "multiply_adds_per_token", "load"):
        assert key in metrics
    assert metrics["steps"] == 4 and metrics["tokens_trained"] == 4 * 4 * 5
    assert 1 < metrics["test_perplexity"] < 100
    capsys.readouterr()
    main(["lm", "eval", "--checkpoint", str(run)])
    assert json.loads(capsys.readouterr().out)["test_perplexity"] == pytest.approx(
        metrics["test_perplexity"])

    out = tmp_path / "cmp"
    main(["lm", "compare", "--presets", "MoE-1-Wide,MoE-4", "--corpus", corpus_file,
          "--steps", "3", "--batch-size", "4", "--bptt", "5", "--eval-tokens", "100",
          "--out", str(out)])
    table = (out / "results.md").read_text()
    assert "| MoE-1-Wide |" in table and "| MoE-4 |" in table
    assert len((out / "results.csv").read_text().splitlines()) == 3
    assert "strongest contexts" in (out / "experts.md").read_text()
    pytest.importorskip("matplotlib")
    for png in ("perplexity_vs_experts.png", "validation_curves.png", "expert_load.png"):
        assert (out / png).stat().st_size > 1000


def test_train_needs_a_model(corpus_file, tmp_path, capsys):
    with pytest.raises(SystemExit, match="2"):
        main(["lm", "train", "--corpus", corpus_file, "--out", str(tmp_path)])
    assert "give --preset NAME or a model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="give steps or time_budget"):
        LMTrainConfig(steps=None)
    with pytest.raises(ValueError, match=r"optimizer must be one of \('adam', "
                                         r"'factored-adam', 'adamw'\), got 'sgd'"):
        LMTrainConfig(optimizer="sgd")


def test_expert_parallel_under_torchrun_resumes_on_any_number_of_processes(corpus_file,
                                                                             tmp_path):
    """One process trains 2 steps; torchrun's 2 gloo ranks resume to 4 with the experts spread
    over them (only rank 0 prints), replicated (``--replicate``) and with the padded exchange
    (``--exchange-capacity``, room for a rank's 10 tokens: nothing dropped, the 2 steps × 2
    ranks × 10 tokens × k = 2 routed rows counted); one process evaluates their checkpoint,
    and resumes it."""
    run = tmp_path / "run"
    model = ["--corpus", corpus_file, "--experts", "4", "--k", "2", "--hidden", "16",
             "--d-model", "8", "--batch-size", "4", "--bptt", "5", "--eval-every", "2",
             "--out", str(run)]
    main(["lm", "train", "--steps", "2", *model])
    src = str(Path(sparsemoe.__file__).parents[1])  # this checkout's package in the ranks
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "sparsemoe.cli", "lm", "train", "--steps", "4", *model, "--expert-parallel",
         "--replicate", "--exchange-capacity", "10"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("valid perplexity") == 1 and out.count("{") == 3  # rank 0 only
    printed = json.loads(out[out.index("{"):])
    exchange = printed["exchange"]
    assert exchange["world_size"] == 2 and exchange["bytes_sent_per_step"] > 0
    assert exchange["compute_to_io"] == 16  # the expert hidden width (§3.2)
    assert exchange["dropped_rows"] == 0 and exchange["routed_rows"] == 2 * 2 * 10 * 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and len(metrics["history"]["train_loss"]) == 4
    assert metrics["params_total"] == printed["params_total"]

    evaluated = evaluate_checkpoint(run)  # the ranks' checkpoint in one process
    assert evaluated["valid_perplexity"] == pytest.approx(metrics["valid_perplexity"], rel=1e-5)
    main(["lm", "train", "--steps", "5", *model])  # resumed in one process
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert history["train_loss"][:4] == metrics["history"]["train_loss"]
    assert len(history["train_loss"]) == 5


@pytest.mark.parametrize("flags, message", [
    (["--replicate"], "--replicate: a layout of the device mesh; give --data-parallel N or "
                      "--expert-parallel"),
    (["--exchange-capacity", "4"], "--exchange-capacity: a layout of the device mesh"),
    (["--expert-parallel", "--exchange-capacity", "0"],
     "--exchange-capacity must be at least 1 row per expert, got 0"),
])
def test_mesh_layout_flags_need_a_mesh(flags, message, capsys):
    with pytest.raises(SystemExit):
        main(["lm", "train", "--preset", "MoE-4", "--out", "unused", *flags])
    assert message in capsys.readouterr().err


def test_aux_free_training_moves_the_bias_every_step(corpus_file, tmp_path):
    cfg = replace(
        tiny_config(corpus_file, tmp_path / "free"),
        model={"num_experts": 4, "k": 2, "hidden": 16, "d_model": 8, "balancing": "aux-free"})
    trainer = Trainer(cfg, progress=False)
    router = trainer.model.moe_layers()[0].router
    for step in range(3):
        before = router.expert_bias.clone()
        trainer.train_step()
        step_taken = (router.expert_bias - before).abs()
        # each bias moves by γ or stays (an expert exactly at the mean load), never more
        assert bool((((step_taken - 1e-3).abs() < 1e-7) | (step_taken == 0)).all()), step
        assert step_taken.sum() > 0
        assert router.load_since_update.sum() == 0


def test_cli_flags_are_the_config_fields_and_its_errors_usage_errors(capsys, tmp_path):
    import dataclasses

    with pytest.raises(SystemExit, match="0"):
        main(["lm", "train", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(LMTrainConfig):
        if f.name not in ("preset", "model"):
            assert "--" + f.name.replace("_", "-") in text, f.name
    assert "parallel streams (default: 32)" in text  # the field's help and default
    for flags, message in [(["--preset", "MoE-7"], "preset must be one of"),
                           (["--preset", "MoE-4", "--lr", "-1"],
                            "lr must be a number in (0, inf), got -1.0"),
                           (["--presets", "MoE-4,MoE-7"], "preset must be one of")]:
        command = "compare" if flags[0] == "--presets" else "train"
        with pytest.raises(SystemExit, match="2"):
            main(["lm", command, "--out", str(tmp_path), *flags])
        err = capsys.readouterr().err
        assert f"usage: sparsemoe lm {command}" in err and message in err


def test_model_flags_reach_the_model_config_with_their_field_types(tmp_path):
    from sparsemoe import cli

    args = cli.build_parser().parse_args(
        ["lm", "train", "--out", str(tmp_path), "--preset", "MoE-32", "--balancing", "aux-free",
         "--bias-update-speed", "0.02", "--experts", "16", "--dropout", "0.25"])
    cfg = cli._lm_train_config(args.command_parser, args)
    assert cfg.model == {"balancing": "aux-free", "bias_update_speed": 0.02,
                         "num_experts": 16, "dropout": 0.25}
    assert type(cfg.model["bias_update_speed"]) is float and type(cfg.model["num_experts"]) is int


def test_train_config_is_a_deprecated_name():
    import sparsemoe.experiments.dmoe as dmoe
    import sparsemoe.experiments.lm as lm

    with pytest.warns(DeprecationWarning, match="use LMTrainConfig"):
        assert lm.TrainConfig is LMTrainConfig
    with pytest.warns(DeprecationWarning, match="use DMoETrainConfig"):
        assert dmoe.TrainConfig is dmoe.DMoETrainConfig


def test_cli_reports_a_missing_corpus_or_checkpoint_as_a_usage_error(tmp_path, capsys):
    missing = str(tmp_path / "missing.txt")
    for argv, message in [
        (["lm", "train", "--preset", "MoE-4", "--corpus", missing, "--out", str(tmp_path)],
         f"corpus: {missing} is not a file"),
        (["lm", "eval", "--checkpoint", str(tmp_path)],
         "checkpoint: no checkpoint.pt or checkpoint/ in"),
    ]:
        with pytest.raises(SystemExit, match="2"):
            main(argv)
        err = capsys.readouterr().err
        assert f"usage: sparsemoe lm {argv[1]}" in err and message in err

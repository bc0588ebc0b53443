"""The sparse-upcycling demonstration: the upcycled branch starts where the dense run stopped
(same function, data position, schedule, optimiser state for the copies), the dense
continuation is the uninterrupted dense run, and the compute-matched branch does the upcycled
branch's multiply-adds."""

import json
from dataclasses import replace

import pytest
import torch

from sparsemoe.cli import main
from sparsemoe.experiments import lm, lm_upcycle
from sparsemoe.models.transformer import multiply_adds_per_token
from sparsemoe.upcycle import upcycled_config

TINY = {"d_model": 16, "n_heads": 2, "n_layers": 2, "ffn_hidden": 24}


def _dense_cfg(corpus_file, out, steps=4, **kw):
    return lm.LMTrainConfig(corpus=(corpus_file,), arch="transformer", preset="dense-swiglu",
                            model=TINY, batch_size=4, bptt=8, steps=steps, decay_steps=10,
                            warmup=2, eval_every=2, eval_tokens=None, out=str(out), **kw)


def test_upcycled_checkpoint_continues_the_dense_run(corpus_file, tmp_path):
    dense_cfg = _dense_cfg(corpus_file, tmp_path / "dense")
    dense_run = lm.Trainer(dense_cfg, progress=False)
    dense_run.run()
    corpus = dense_run.corpus
    up_cfg = replace(lm_upcycle.upcycled_train_config(dense_cfg, len(corpus.vocab), 4, 2),
                     steps=8, out=str(tmp_path / "up"))
    lm_upcycle.write_upcycled_checkpoint(dense_cfg.out, up_cfg, 4, 2)

    dense, _ = lm.load_trained(dense_cfg.out)
    moe, _ = lm.load_trained(up_cfg.out)
    assert moe.cfg == upcycled_config(dense.cfg, 4, 2) and len(moe.moe_layers()) == 2
    tokens = torch.randint(0, len(corpus.vocab), (3, 8))
    with torch.no_grad():
        torch.testing.assert_close(moe(tokens)[0], dense(tokens)[0], atol=1e-5, rtol=0)

    # resumed by the trainer: the same step, learning rate and next batch as the dense run's
    # continuation, and (same function) the same loss on it before the first update
    cont = lm.Trainer(replace(dense_cfg, steps=8, out=str(tmp_path / "dense")), corpus,
                      progress=False)
    up = lm.Trainer(up_cfg, corpus, progress=False)
    assert up.step == cont.step == 4
    assert up.sched.get_last_lr() == cont.sched.get_last_lr()
    assert up.batcher.state_dict() == cont.batcher.state_dict()
    assert up.train_step() == pytest.approx(cont.train_step(), abs=1e-5)

    # optimiser state: each expert copy has the dense FFN's, the router none
    fresh = lm.Trainer(up_cfg, corpus, progress=False)
    cont = lm.Trainer(replace(dense_cfg, steps=8), corpus, progress=False)
    dense_params, moe_params = dict(cont.model.named_parameters()), \
        dict(fresh.model.named_parameters())
    for i in range(2):
        for name in ("w1", "w2"):
            source = cont.opt.state[dense_params[f"blocks.{i}.ffn.bank.{name}"]]
            state = fresh.opt.state[moe_params[f"blocks.{i}.ffn.experts.{name}"]]
            for key in ("exp_avg", "exp_avg_sq"):
                assert state[key].shape[0] == 4 and source[key].shape[0] == 1
                for e in range(4):
                    torch.testing.assert_close(state[key][e], source[key][0], atol=0, rtol=0)
            assert float(state["step"]) == float(source["step"]) == 4
        assert moe_params[f"blocks.{i}.ffn.router.w_gate"] not in fresh.opt.state
    assert fresh.model.blocks[0].attn.qkv.weight in fresh.opt.state


def test_demo_branches_end_to_end(corpus_file, tmp_path, capsys):
    out = tmp_path / "demo"
    main(["lm", "upcycle", "--arch", "transformer", "--corpus", corpus_file, "--d-model", "16",
          "--batch-size", "4", "--bptt", "8", "--steps", "4", "--continue-steps", "4",
          "--warmup", "2", "--eval-every", "2", "--experts", "4", "--k", "2", "--seeds", "2",
          "--out", str(out)])
    rows = json.loads((out / "upcycle.json").read_text())
    assert [(r["branch"], r["seed"]) for r in rows] == \
        [(b, s) for s in (0, 1) for b in lm_upcycle.BRANCHES]
    by = {(r["branch"], r["seed"]): r for r in rows}
    dense_cfg = lm.LMTrainConfig(**json.loads((out / "seed0/dense/metrics.json").read_text())
                                 ["config"])
    model_cfg = dense_cfg.model_config(len(lm.Vocabulary(
        lm.latest_checkpoint(out / "seed0/dense")[0]["vocab"])))
    ratio = multiply_adds_per_token(upcycled_config(model_cfg, 4, 2)) / \
        multiply_adds_per_token(model_cfg)
    assert ratio > 1.3
    assert by["dense-matched", 0]["steps"] == 4 + round(4 * ratio)
    assert by["upcycled", 0]["steps"] == by["dense-continued", 0]["steps"] == 8
    assert by["upcycled", 0]["continued_multiply_adds"] == pytest.approx(
        by["dense-matched", 0]["continued_multiply_adds"], rel=0.5 / (4 * ratio))
    # the branches share the dense run's first steps
    assert by["upcycled", 0]["valid_curve"][:2] == by["dense", 0]["valid_curve"]

    # the dense continuation is the uninterrupted dense run of S + S2 steps
    straight = lm.Trainer(replace(dense_cfg, steps=8, out=str(tmp_path / "straight")),
                          progress=False).run()
    assert by["dense-continued", 0]["test_perplexity"] == pytest.approx(
        straight["test_perplexity"], rel=1e-6)
    assert by["dense-continued", 0]["test_perplexity"] != by["dense-continued", 1][
        "test_perplexity"]  # the seeds differ

    table = (out / "upcycle.md").read_text()
    for branch in lm_upcycle.BRANCHES:
        assert f"| {branch} |" in table
    pytest.importorskip("matplotlib")
    assert (out / "upcycle_curves.png").stat().st_size > 1000

    # a second call resumes: every branch reports without training
    capsys.readouterr()
    main(["lm", "upcycle", "--arch", "transformer", "--corpus", corpus_file, "--d-model", "16",
          "--batch-size", "4", "--bptt", "8", "--steps", "4", "--continue-steps", "4",
          "--warmup", "2", "--eval-every", "2", "--experts", "4", "--k", "2", "--seeds", "2",
          "--out", str(out)])
    again = json.loads((out / "upcycle.json").read_text())
    assert [r["test_perplexity"] for r in again] == [r["test_perplexity"] for r in rows]


@pytest.mark.parametrize("flags,message", [
    (["--arch", "lstm"], "must be 'transformer'"),
    (["--arch", "transformer", "--preset", "mixtral-8"], "starts from a dense model"),
    (["--arch", "transformer", "--continue-steps", "0"], "continue_steps must be"),
    (["--arch", "transformer", "--experts", "4", "--k", "5"], "k must be <="),
    (["--arch", "transformer", "--noise", "-1"], "noise must be"),
])
def test_cli_usage_errors(flags, message, tmp_path, capsys):
    args = ["lm", "upcycle", "--steps", "2", "--continue-steps", "2", "--out", str(tmp_path),
            *flags]
    with pytest.raises(SystemExit, match="2"):
        main(args)
    err = capsys.readouterr().err
    assert "usage: sparsemoe lm upcycle" in err and message in err

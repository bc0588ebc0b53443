"""Table 6 in miniature: the balance statistics against a hand computation over the routing the
router actually produced, the gate-gradient probe against autograd on the whole loss, and a
tiny end-to-end table."""

import importlib.util
import json
import math
import random
from dataclasses import replace

import pytest
import torch

from sparsemoe.experiments.lm import LMTrainConfig, Trainer, evaluate
from sparsemoe.experiments.table6 import (
    PAPER_TABLE6,
    BalanceTrainer,
    balance_statistics,
    format_table6,
    gate_gradients,
    gate_scales,
    load_by_token,
    routing_balance,
    run_weighting,
    table6,
)
from sparsemoe.models.lstm_lm import LMConfig, LSTMLanguageModel


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    rng = random.Random(1)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis",
             "nobler", "in", "mind", "suffer"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(300)]
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n".join(lines))
    return str(path)


def tiny(corpus_file, out, steps=4):
    return LMTrainConfig(corpus=(corpus_file,), vocab_size=None, preset=None,
                       model={"num_experts": 6, "k": 2, "hidden": 8, "d_model": 8,
                              "dropout": 0.0},
                       batch_size=4, bptt=5, steps=steps, eval_every=2, eval_tokens=100,
                       warmup=2, out=str(out))


def gated_lm(noise: bool = True):
    """A tiny LSTM LM (11 words, 5 experts, k = 2) and its router, seeded, with a non-trivial
    gate: W_g, and W_noise if ``noise``, drawn from N(0, 1) (the paper's start is zeros)."""
    torch.manual_seed(0)
    model = LSTMLanguageModel(LMConfig(vocab_size=11, d_model=8, num_experts=5, k=2, hidden=8,
                                       dropout=0.0))
    router = model.moe_layers()[0].router
    with torch.no_grad():
        router.w_gate.normal_()
        if noise:
            router.w_noise.normal_()
    return model, router


def test_balance_statistics_by_hand():
    imp = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    load = torch.tensor([0.0, 4.0, 4.0, 8.0], dtype=torch.float64)
    s = balance_statistics(imp, load)
    # mean 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5
    assert s["cv_importance"] == pytest.approx(3.5 ** 0.5 / 3, rel=1e-12)
    # mean 4, variance (16 + 0 + 0 + 16) / 4 = 8
    assert s["cv_load"] == pytest.approx(8 ** 0.5 / 4, rel=1e-12)
    assert s["max_over_mean_load"] == pytest.approx(2.0, rel=1e-12)
    assert s["experts_unused"] == 1


@pytest.mark.parametrize("noisy", [False, True])
def test_routing_balance_sums_the_routers_choices(noisy):
    """Importance and load over the text from the router's own output, captured by a hook and
    summed by hand; clean routing must also agree with the evaluation's expert counts."""
    model, router = gated_lm()
    tokens = torch.randint(0, 11, (60,))
    imp = torch.zeros(5, dtype=torch.float64)
    load = torch.zeros(5, dtype=torch.float64)

    def capture(module, inputs, out):
        for idx, w in zip(out.expert_indices.tolist(), out.combine_weights.tolist(),
                          strict=True):
            for e, g in zip(idx, w, strict=True):
                imp[e] += g
                load[e] += 1

    hook = router.register_forward_hook(capture)
    torch.manual_seed(5)
    got = routing_balance(model, tokens, batch_size=3, bptt=4, noisy=noisy)
    hook.remove()
    assert load.sum() == 2 * 59
    want = balance_statistics(imp, load)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key  # float32 gates
    assert model.training and router.training  # modes restored
    if not noisy:
        counts = evaluate(model, tokens, 3, 4)["tokens_per_expert"][0]
        assert counts == load.long().tolist()


def test_load_by_token_counts_each_input_tokens_choices():
    """Rebuilt by hand from the router's output and the streams' input tokens; its column
    sums are the evaluation's expert counts."""
    model, router = gated_lm(noise=False)
    tokens = torch.randint(0, 11, (41,))  # 40 inputs: 4 streams of 10, bptt 5
    seen: list[list[list[int]]] = []
    hook = router.register_forward_hook(
        lambda mod, inp, out: seen.append(out.expert_indices.reshape(-1, 2).tolist()))
    got = load_by_token(model, tokens, batch_size=4, bptt=5, vocab_size=11)
    hook.remove()
    streams = tokens[:40].view(4, 10)
    want = torch.zeros(11, 5, dtype=torch.int64)
    for window, experts in enumerate(seen):  # windows of [4 streams, 5 steps], row-major
        for row, pair in enumerate(experts):
            token = int(streams[row // 5, window * 5 + row % 5])
            for e in pair:
                want[token, e] += 1
    assert torch.equal(got, want) and int(got.sum()) == 80
    assert got.sum(0).tolist() == evaluate(model, tokens, 4, 5)["tokens_per_expert"][0]
    assert model.training  # mode restored


def test_gate_scales_by_hand():
    """The router's inputs are the first LSTM's output plus the embedding (the residual):
    recompute them outside the model and the three scales from their definitions."""
    model, router = gated_lm()
    tokens = torch.randint(0, 11, (41,))  # 40 inputs: 4 streams of 10, bptt 5
    got = gate_scales(model, tokens, batch_size=4, bptt=5)
    with torch.no_grad():
        streams = tokens[:40].view(4, 10).long()
        emb = model.embed(streams)
        x = (emb + model.layers[0](emb)[0]).reshape(-1, 8).double()
    logits = x @ router.w_gate.double()
    mean = logits.mean(0)
    assert got["common_spread"] == pytest.approx(
        math.sqrt(((mean - mean.mean()) ** 2).mean().item()), rel=1e-5)
    centred = logits - mean
    per_token = ((centred - centred.mean(1, keepdim=True)) ** 2).mean(1).sqrt()
    assert got["token_spread"] == pytest.approx(per_token.mean().item(), rel=1e-5)
    sigma = torch.log1p(torch.exp(x @ router.w_noise.double())) + 1e-2
    assert got["noise_stddev"] == pytest.approx(sigma.mean().item(), rel=1e-5)
    fresh = LSTMLanguageModel(LMConfig(vocab_size=11, d_model=8, num_experts=5, k=2, hidden=8))
    zero = gate_scales(fresh, tokens, 4, 5)  # the paper's zero init: no logits, noise 0.70
    assert zero["common_spread"] == zero["token_spread"] == 0.0
    assert zero["noise_stddev"] == pytest.approx(math.log(2) + 1e-2, rel=1e-6)


def test_noisy_routing_differs_from_clean():
    torch.manual_seed(0)
    model = LSTMLanguageModel(LMConfig(vocab_size=11, d_model=8, num_experts=8, k=2, hidden=8))
    tokens = torch.randint(0, 11, (200,))
    with torch.no_grad():
        model.moe_layers()[0].router.w_gate.normal_()
    clean = routing_balance(model, tokens, 4, 5)
    noisy = routing_balance(model, tokens, 4, 5, noisy=True)
    assert clean != noisy  # the noise of eq. 4 was drawn (W_noise = 0: stddev 0.70)


def test_gate_gradients_add_up_to_the_total(corpus_file, tmp_path):
    trainer = Trainer(tiny(corpus_file, tmp_path), progress=False)
    for _ in range(3):
        trainer.train_step()
    router = trainer.model.moe_layers()[0].router
    inputs, targets = trainer.batcher.next()
    before = [p.grad.clone() for p in router.parameters()]
    torch.manual_seed(3)
    probe = gate_gradients(trainer, inputs, targets)
    for p, g in zip(router.parameters(), before, strict=True):
        assert torch.equal(p.grad, g)  # untouched
    router.zero_grad(set_to_none=True)
    assert probe["grad_aux_w_noise"] > 0 and probe["grad_aux_w_gate"] > 0  # eq. 10 reaches both
    # the same noise again: ce and aux by hand, and their gradients one at a time
    torch.manual_seed(3)
    logits, _ = trainer.model(inputs)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           targets.reshape(-1))
    aux = trainer.model.moe_layers()[0].aux_loss
    assert probe["ce"] == pytest.approx(ce.item(), rel=1e-6)
    assert probe["aux"] == pytest.approx(aux.item(), rel=1e-6)
    aux.backward(retain_graph=True)
    assert probe["grad_aux_w_gate"] == pytest.approx(router.w_gate.grad.norm().item(), rel=1e-5)
    router.zero_grad(set_to_none=True)
    ce.backward()
    assert probe["grad_ce_w_noise"] == pytest.approx(router.w_noise.grad.norm().item(),
                                                     rel=1e-5)


def test_table6_end_to_end(corpus_file, tmp_path):
    base = tiny(corpus_file, tmp_path)
    rows = table6(base, [(0.0, 0.0), (0.1, 0.1), (0.3, 0.0)], progress=False)
    assert [(r["w_importance"], r["w_load"]) for r in rows] == [(0.0, 0.0), (0.1, 0.1),
                                                                  (0.3, 0.0)]
    for r in rows:
        assert len(r["history"]["batch"]) == 4 and len(r["history"]["balance"]) == 3
        assert r["steps"] == 4 and 1 < r["test_perplexity"] < 100
        assert (tmp_path / f"wi{r['w_importance']}_wl{r['w_load']}" / "table6_row.json").exists()
    # (0, 0): no auxiliary loss, so no gradient from it
    assert rows[0]["history"]["balance"][0]["grad_aux_w_gate"] == 0.0
    assert rows[0]["history"]["batch"][0]["aux"] == 0.0
    table = format_table6(rows)
    paper = PAPER_TABLE6[(0.1, 0.1)]
    assert f"({paper[3]:.2f}) |" in table.splitlines()[3]
    assert table.splitlines()[4].count("(") == 0  # (0.3, 0) is not in the paper
    assert len(table.splitlines()) == 5


def test_finished_rows_are_read_back_and_gate_init(corpus_file, tmp_path):
    base = tiny(corpus_file, tmp_path)
    first = table6(base, [(0.1, 0.1)], progress=False)
    again = table6(base, [(0.1, 0.1)], progress=False)  # nothing trained: the same row
    assert again == [json.loads(json.dumps(first[0]))]
    longer = table6(replace(base, steps=5), [(0.1, 0.1)], progress=False)  # resumed
    assert longer[0]["steps"] == 5
    assert longer[0]["history"]["batch"][:4] == first[0]["history"]["batch"]
    drawn = run_weighting(replace(base, out=str(tmp_path / "drawn"),
                                  model={**base.model, "gate_init_std": 0.5}), 0.1, 0.1,
                          progress=False)
    assert drawn["history"]["batch"][0] != first[0]["history"]["batch"][0]


def test_balance_trainer_resumes(corpus_file, tmp_path):
    BalanceTrainer(tiny(corpus_file, tmp_path, steps=2), progress=False).run()
    again = BalanceTrainer(tiny(corpus_file, tmp_path), progress=False)
    again.run()
    assert len(again.history["batch"]) == 4 and len(again.history["balance"]) == 3


def test_cli_table6_writes_the_table_and_reads_finished_rows_back(corpus_file, tmp_path,
                                                                  capsys, monkeypatch):
    import sparsemoe.experiments.table6 as t6
    from sparsemoe.cli import main

    out = tmp_path / "t6"
    argv = ["lm", "table6", "--corpus", corpus_file, "--vocab-size", "0", "--experts", "6",
            "--k", "2", "--hidden", "8", "--d-model", "8", "--dropout", "0", "--steps", "3",
            "--batch-size", "4", "--bptt", "5", "--eval-every", "2", "--eval-tokens", "100",
            "--warmup", "1", "--out", str(out)]
    main([*argv, "--weightings", "0,0", "0.1,0.1"])
    printed = capsys.readouterr().out
    table = (out / "table6.md").read_text()
    assert table.strip() in printed and len(table.splitlines()) == 4
    rows = json.loads((out / "table6.json").read_text())
    assert [(r["w_importance"], r["w_load"]) for r in rows] == [(0.0, 0.0), (0.1, 0.1)]
    assert table.strip() == format_table6(rows)
    for r in rows:  # the flags reached each run's configuration, over the MoE-256 preset
        run = out / f"wi{r['w_importance']}_wl{r['w_load']}"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["config"]["preset"] == "MoE-256" and metrics["config"]["warmup"] == 1
        assert {k: metrics["model_config"][k] for k in ("num_experts", "k", "hidden", "d_model",
                                                         "w_importance", "w_load")} == {
            "num_experts": 6, "k": 2, "hidden": 8, "d_model": 8,
            "w_importance": r["w_importance"], "w_load": r["w_load"]}
        assert r["steps"] == 3 and len(r["history"]["batch"]) == 3
        assert (run / "table6_row.json").exists()
    if importlib.util.find_spec("matplotlib"):
        assert (out / "balance.png").stat().st_size > 1000

    trained = []
    run = t6.run_weighting
    monkeypatch.setattr(t6, "run_weighting", lambda cfg, wi, wl, *a, **kw: (
        trained.append((wi, wl)), run(cfg, wi, wl, *a, **kw))[1])
    main([*argv, "--weightings", "0.1,0.1", "0,0.2", "--gate-init-std", "0.5"])
    assert trained == [(0.0, 0.2)]  # (0.1, 0.1) was read back
    again = json.loads((out / "table6.json").read_text())
    assert again[0] == rows[1] and again[1]["w_load"] == 0.2


@pytest.mark.parametrize("flags,message", [
    (["--weightings", "0.1"], "--weightings: a weighting must be two numbers"),
    (["--weightings", "0.1,x"], "got '0.1,x'"),
    (["--weightings=-1,0"], "must be >= 0, got '-1,0'"),
    (["--arch", "transformer"], "--arch: lm table6 measures the LSTM"),
    (["--preset", "MoE-7"], "preset must be one of"),
])
def test_cli_table6_usage_errors(flags, message, tmp_path, capsys):
    from sparsemoe.cli import main

    with pytest.raises(SystemExit, match="2"):
        main(["lm", "table6", "--out", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert "usage: sparsemoe lm table6" in err and message in err
    assert not any(tmp_path.iterdir())  # nothing trained

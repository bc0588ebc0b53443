import io
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sparsemoe._checksum import sha256
from sparsemoe.cli import main
from sparsemoe.experiments import mt, runs
from sparsemoe.experiments.mt import (
    MTTrainConfig,
    PairBatcher,
    Trainer,
    batchwise_mask,
    bleu_chrf,
    format_table5,
    prepare_data,
)

WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]


@pytest.fixture(scope="module")
def tsv(tmp_path_factory):
    """Generated parallel text: the target is the source reversed and upper-cased."""
    rng = random.Random(0)
    lines = []
    for _ in range(160):
        s = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        lines.append(" ".join(s) + "\t" + " ".join(w.upper() for w in reversed(s)))
    path = tmp_path_factory.mktemp("mt") / "toy.tsv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def tiny(tsv, out, **kw):
    return MTTrainConfig(corpus=f"tsv={tsv}", vocab_size=60, preset="MoE-32-sb",
                       model={"d_model": 8, "attention_dim": 8, "hidden": 8, "num_experts": 4,
                              "k": 2},
                       batch_size=8, steps=6, eval_every=3, eval_sentences=16, beam=2,
                       warmup=2, out=str(out), **kw)


def test_bleu_of_a_perfect_translation_is_100():
    refs = ["Car Dieu a tant aimé le monde.", "Jésus pleura."]
    assert bleu_chrf(refs, refs)["bleu"] == pytest.approx(100.0)
    assert bleu_chrf(refs, refs)["chrf"] == pytest.approx(100.0)
    ja = ["神は世を愛された。", "イエスは涙を流された。"]
    r = bleu_chrf(ja, ja, "ja")
    assert r["bleu"] == pytest.approx(100.0) and r["bleu_tokenize"] == "char"
    assert bleu_chrf(["Dieu a aimé."], refs[:1])["bleu"] < 100.0
    # character tokenisation gives unspaced Japanese partial credit that 13a cannot
    near = ["神は世を愛した。"]
    assert bleu_chrf(near, ja[:1], "ja")["bleu"] > 0.0 == bleu_chrf(near, ja[:1])["bleu"]


def test_pair_batcher_covers_each_pair_once_per_epoch(tsv):
    data = prepare_data(MTTrainConfig(corpus=f"tsv={tsv}", vocab_size=60))
    b = PairBatcher(data.train, 8, seed=1)
    first = [b.next() for _ in range(len(data.train) // 8)]
    seen = [i for batch in first for i in batch]
    assert len(seen) == len(set(seen)) == len(data.train) // 8 * 8
    state = b.state_dict()
    ahead = [b.next() for _ in range(3)]
    again = PairBatcher(data.train, 8, seed=1)
    again.load_state_dict(state)
    assert [again.next() for _ in range(3)] == ahead and state["epoch"] == 0


def test_exact_resume(tsv, tmp_path):
    whole = Trainer(tiny(tsv, tmp_path / "whole"), progress=False)
    whole.run()
    first = Trainer(replace(tiny(tsv, tmp_path / "split"), steps=3), progress=False)
    first.run()
    second = Trainer(tiny(tsv, tmp_path / "split"), progress=False)
    assert second.step == 3
    second.run()
    assert second.history["train_loss"] == whole.history["train_loss"]
    for (name, a), b in zip(whole.model.state_dict().items(),
                            second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(runs.RunError, match="different configuration .*lr: saved 0.002, now 1.0"):
        Trainer(replace(tiny(tsv, tmp_path / "split"), lr=1.0), progress=False)
    # the run directory and the length of training are not part of the configuration
    moved = tmp_path / "moved"
    (tmp_path / "split").rename(moved)
    assert Trainer(replace(tiny(tsv, moved), steps=8), progress=False).step == 6


class Touch:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_crafted_and_corrupt_checkpoints_are_refused(tsv, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(replace(tiny(tsv, run), steps=2, eval_every=2, test_sentences=4),
            progress=False).run()
    path = run / mt.CHECKPOINT
    good = path.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exited:
        main(["mt", "eval", "--checkpoint", str(run)])
    assert exited.value.code == 1
    assert capsys.readouterr().err.startswith(f"sparsemoe: error: {path} is corrupt: ")
    with pytest.raises(runs.RunError, match=f"{path} is corrupt"):
        Trainer(tiny(tsv, run), progress=False)

    marker = tmp_path / "pwned"
    ck = torch.load(io.BytesIO(good), weights_only=True)
    ck["config"] = {"corpus": Touch(marker)}
    torch.save(ck, path)
    runs.checksum_path(path).write_text(f"{sha256(path.read_bytes())}  checkpoint.pt\n")
    lines = tmp_path / "lines.txt"
    lines.write_text("alpha beta\n")
    for command in (["mt", "eval", "--checkpoint", str(run)],
                    ["mt", "translate", "--checkpoint", str(run), "--input", str(lines)]):
        with pytest.raises(SystemExit) as exited:
            main(command)
        assert exited.value.code == 1
        assert "cannot be loaded safely" in capsys.readouterr().err
    with pytest.raises(runs.RunError, match="cannot be loaded safely"):
        Trainer(tiny(tsv, run), progress=False)
    assert not marker.exists()


def test_batchwise_mask_at_inference_balances_exactly(tsv, tmp_path):
    trainer = Trainer(tiny(tsv, tmp_path / "r"), progress=False)
    model = trainer.model.eval()
    source, target_in, _ = mt.collate(trainer.data.train, list(range(8)), trainer.data.tokenizer)
    with batchwise_mask(model):
        model(source, target_in)
        tokens = int((source != 0).sum())
        per_expert = model.enc_moe.stats.tokens_per_expert
        assert per_expert.tolist() == [min(tokens, -(-2 * tokens // 4))] * 4
    assert not model.enc_moe.router.training  # thresholds again after the block


def test_compare_end_to_end_and_translate(tsv, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    main(["mt", "compare", "--corpus", f"tsv={tsv}", "--presets", "MoE-1-Wide,MoE-32-sb",
          "--seeds", "0,1", "--vocab-size", "60", "--d-model", "8", "--steps", "4",
          "--batch-size", "8", "--beam", "2", "--eval-sentences", "8", "--out", str(out)])
    table = (out / "results.md").read_text()
    assert "| MoE-1-Wide | 2 |" in table and "| MoE-32-sb | 2 |" in table
    for name in ("results.csv", "bleu_vs_experts.png", "validation_curves.png",
                 "attention.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "MoE-32-sb" / "seed1" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["test_bleu_batchwise_mask"] is not None
    assert metrics["multiply_adds_per_timestep"] > 0 and 0 <= metrics["test_bleu"] <= 100
    wide = json.loads((out / "MoE-1-Wide" / "seed0" / "metrics.json").read_text())
    assert wide["multiply_adds_per_timestep"] + 2 * 8 * 31 == \
        metrics["multiply_adds_per_timestep"]  # equal compute but the 32-expert gating
    assert len((out / "results.csv").read_text().splitlines()) == 5
    capsys.readouterr()

    run = out / "MoE-32-sb" / "seed0"
    monkeypatch.setattr("sys.stdin", io.StringIO("alpha beta\ngamma delta eps\n"))
    main(["mt", "translate", "--checkpoint", str(run), "--beam", "2"])
    assert len(capsys.readouterr().out.splitlines()) == 2
    with pytest.raises(ValueError, match="target language must be one of none"):
        mt.translate_checkpoint(run, ["alpha"], target_language="fr")
    main(["mt", "eval", "--checkpoint", str(run), "--beam", "1"])
    assert "src-tgt" in json.loads(capsys.readouterr().out)["bleu"]


def test_table5_counts_directions_improved():
    def result(name, bleus):
        return {"preset": name, "bleu": {d: {"bleu": b} for d, b in bleus.items()}}

    rows = format_table5([result("dense", {"en-fr": 10.0, "fr-en": 20.0, "en-ja": 5.0}),
                          result("moe", {"en-fr": 11.0, "fr-en": 19.0, "en-ja": 6.0})])
    assert "| en-fr | 10.00 | 11.00 |" in rows
    assert "moe is better than dense on 2 of 3 directions." in rows



@pytest.mark.parametrize(("flags", "message"), [
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--preset", "nope"], "preset must be one of"),
    (["--lr", "nan"], "lr must be a number in (0, inf), got nan"),
    (["--corpus", "tsv=/nonexistent/pairs.tsv"], "corpus: /nonexistent/pairs.tsv is not a file"),
])
def test_bad_flags_and_missing_data_are_usage_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exited:
        main(["mt", "train", "--out", str(tmp_path / "run"), *flags])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

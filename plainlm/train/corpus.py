"""A real English public-domain corpus, fetched from a Debian package into the cache (never committed).

    kjv   The King James Version of the Bible (public domain; ~4.3 MB, ~820k words), from Debian's
          `bible-kjv-text` (the compressed text) and `bible-kjv` (the reader that decompresses it).
          Both packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x`; nothing is
          installed system-wide. Output: $PLAINLM_HOME/corpora/kjv/kjv.txt, one book per paragraph
          group, verse numbers stripped.

    python -m plainlm.train.corpus kjv       # prints the path
Training configs may name the corpus as "kjv" instead of a path; it is fetched on first use.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from ..pull import home


class CorpusError(RuntimeError):
    pass


CORPORA = {"kjv": "King James Bible (Debian bible-kjv-text)"}


def corpora_dir() -> Path:
    return home() / "corpora"


def corpus_path(name: str) -> Path:
    return corpora_dir() / name / f"{name}.txt"


def _run(cmd, cwd):
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise CorpusError(f"'{cmd[0]}' is not available: fetching the kjv corpus needs a Debian system "
                          f"with apt-get and dpkg-deb") from None
    if r.returncode:
        raise CorpusError(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return r.stdout


def clean_kjv(raw: str) -> str:
    """The `bible` reader prints 'Genesis 1' headers and '  1 In the beginning ...' verses wrapped at
    80 columns; keep book/chapter headers as lines and join each verse onto one line."""
    out, verse = [], []
    for line in raw.splitlines():
        m = re.match(r"^\s+(\d+) (.*)$", line)
        if m:
            if verse:
                out.append(" ".join(verse))
            verse = [m.group(2).strip()]
        elif not line.strip():
            if verse:
                out.append(" ".join(verse))
                verse = []
            out.append("")
        elif verse:
            verse.append(line.strip())
        else:
            out.append(line.strip())
    if verse:
        out.append(" ".join(verse))
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def fetch_kjv(force: bool = False) -> Path:
    dst = corpus_path("kjv")
    if dst.exists() and not force:
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _run(["apt-get", "download", "bible-kjv-text", "bible-kjv"], tmp)
        for deb in sorted(Path(tmp).glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), "x"], tmp)
        root = Path(tmp) / "x"
        exe, data = root / "usr/bin/bible", root / "usr/lib/bible.data"
        if not exe.exists() or not data.exists():
            raise CorpusError("the bible-kjv packages did not contain usr/bin/bible and usr/lib/bible.data")
        raw = _run([str(exe), "-p", str(data.parent), "gen1:1-rev22:21"], tmp)
    text = clean_kjv(raw)
    if len(text) < 1_000_000:
        raise CorpusError(f"the decoded kjv text is too short ({len(text)} chars)")
    tmpf = dst.with_suffix(".tmp")
    tmpf.write_text(text)
    os.replace(tmpf, dst)
    return dst


def resolve(path_or_name: str) -> str:
    """A corpus name from CORPORA -> its cached file (fetched on first use); anything else unchanged."""
    if path_or_name in CORPORA and not os.path.exists(path_or_name):
        return str(fetch_kjv())
    return path_or_name


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "kjv"
    if name not in CORPORA:
        sys.exit(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")
    try:
        print(fetch_kjv(force="--force" in sys.argv))
    except CorpusError as e:
        sys.exit(f"error: {e}")

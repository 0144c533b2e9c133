"""plainlm.inspect against gguf-py's GGUFReader view of the same files."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from plainlm.formats.gguf import GGUFError  # noqa: E402
from plainlm.inspect import format_report, inspect_report  # noqa: E402


@pytest.fixture(scope="module")
def report(model_path):
    return inspect_report(model_path)


@pytest.fixture(scope="module")
def ref(model_path):
    return gguf.GGUFReader(model_path)


def field(ref, key, default=None):
    f = ref.fields.get(key)
    return default if f is None else f.contents()


def test_report_is_plain_json(report):
    again = json.loads(json.dumps(report))          # no numpy scalars, no default=str needed
    assert again == report


def test_file_facts(report, ref, model_path):
    assert report["path"] == model_path
    assert report["file_size"] == os.path.getsize(model_path)
    assert report["gguf_version"] == field(ref, "GGUF.version") == 3
    assert report["alignment"] == ref.alignment == 32
    assert report["data_start"] == ref.data_offset
    assert report["metadata_count"] == field(ref, "GGUF.kv_count")
    assert report["architecture"] == field(ref, "general.architecture") == "llama"
    assert report["name"] == field(ref, "general.name")
    assert report["file_type"] == field(ref, "general.file_type")
    assert report["quantization_version"] == field(ref, "general.quantization_version")


def test_config(report, ref):
    c = report["config"]
    assert report["config_error"] is None
    a = "llama"
    assert c["arch"] == a
    assert c["dim"] == field(ref, f"{a}.embedding_length") == 576
    assert c["n_layers"] == field(ref, f"{a}.block_count") == 30
    assert c["n_heads"] == field(ref, f"{a}.attention.head_count") == 9
    assert c["n_kv_heads"] == field(ref, f"{a}.attention.head_count_kv") == 3
    assert c["head_dim"] == c["dim"] // c["n_heads"] == 64
    assert c["ffn_dim"] == field(ref, f"{a}.feed_forward_length") == 1536
    assert c["vocab_size"] == field(ref, f"{a}.vocab_size") == 49152
    assert c["context_length"] == field(ref, f"{a}.context_length") == 8192
    assert c["rope_theta"] == field(ref, f"{a}.rope.freq_base") == 100000.0
    assert c["rope_dim"] == field(ref, f"{a}.rope.dimension_count") == 64
    assert c["norm_eps"] == pytest.approx(field(ref, f"{a}.attention.layer_norm_rms_epsilon"))
    assert c["tied_embeddings"] is ("output.weight" not in [t.name for t in ref.tensors]) is True
    assert c["act"] == "silu"


def test_tensor_table(report, ref):
    assert report["tensor_count"] == len(ref.tensors) == field(ref, "GGUF.tensor_count") == 272
    rows = report["tensors"]
    assert [r["name"] for r in rows] == [t.name for t in ref.tensors]
    by_type: dict[str, int] = {}
    n_params = 0
    for r, t in zip(rows, ref.tensors):
        assert set(r) >= {"name", "type", "shape", "bytes"}
        assert r["type"] == t.tensor_type.name
        assert r["shape"] == list(reversed(t.shape.tolist()))          # numpy order
        assert r["bytes"] == t.n_bytes
        assert r["offset"] == t.data_offset
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
        n_params += int(t.n_elements)
    assert report["bytes_by_type"] == by_type
    assert report["tensors_by_type"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert report["tensor_bytes"] == sum(by_type.values())
    assert report["n_params"] == n_params
    assert report["tensor_bytes"] <= report["file_size"] - report["data_start"]


def test_tokenizer_facts(report, ref):
    t = report["tokenizer"]
    tokens = field(ref, "tokenizer.ggml.tokens")
    assert t["model"] == field(ref, "tokenizer.ggml.model") == "gpt2"
    assert t["pre"] == field(ref, "tokenizer.ggml.pre") == "smollm"
    assert t["vocab_size"] == len(tokens) == 49152
    assert t["n_merges"] == len(field(ref, "tokenizer.ggml.merges")) == 48900
    assert t["bos_id"] == field(ref, "tokenizer.ggml.bos_token_id") == 1
    assert t["eos_id"] == field(ref, "tokenizer.ggml.eos_token_id") == 2
    assert t["bos"] == tokens[1] == "<|im_start|>"
    assert t["eos"] == tokens[2] == "<|im_end|>"
    assert t["unknown_id"] == 0 and t["unknown"] == "<|endoftext|>"
    assert t["padding_id"] == 2
    assert t["eot_id"] is None and t["eot"] is None
    assert t["add_bos"] is field(ref, "tokenizer.ggml.add_bos_token") is False
    assert t["add_eos"] is None
    assert t["has_chat_template"] is ("tokenizer.chat_template" in ref.fields) is True


def test_format_report(report):
    s = format_report(report)
    for needle in ("llama", "GGUF v3", "alignment 32", "272 tensors", "Q4_1", "Q8_0", "F32",
                   "token_embd.weight", "49152 x 576", "'<|im_start|>'", "'<|im_end|>'", "smollm", "48900",
                   "chat template  yes", "n_kv_heads", "rope_theta"):
        assert needle in s, needle
    assert len(s.splitlines()) > 272                # one line per tensor


def test_cli_inspect_json(model_path, capsys):
    from plainlm.cli import main
    assert main(["inspect", model_path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tensor_count"] == 272 and out["tokenizer"]["eos"] == "<|im_end|>"


def _write(path, arch, tokenizer: bool):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.embedding_length", 8)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["<s>", "</s>", "a", "b"])
        w.add_bos_token_id(0)
        w.add_eos_token_id(99)                      # out of range: no text
        w.add_add_bos_token(True)
    w.add_tensor("x.weight", np.zeros((2, 32), np.float32))
    w.add_tensor("y.weight", np.zeros((64,), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unknown_architecture_still_reported(tmp_path):
    p = tmp_path / "odd.gguf"
    _write(p, "mamba9", tokenizer=True)
    d = inspect_report(p)
    assert d["architecture"] == "mamba9"
    assert d["config"] is None and "general.architecture" in d["config_error"] and "mamba9" in d["config_error"]
    assert d["tensor_count"] == 2 and d["bytes_by_type"] == {"F32": 256, "F16": 128}
    assert d["n_params"] == 128
    t = d["tokenizer"]
    assert (t["vocab_size"], t["bos_id"], t["bos"], t["eos_id"], t["eos"], t["add_bos"]) == (4, 0, "<s>", 99, None, True)
    assert t["n_merges"] == 0 and t["has_chat_template"] is False and t["pre"] is None
    s = format_report(d)
    assert "not runnable" in s and "mamba9" in s
    json.dumps(d)


def test_no_tokenizer(tmp_path):
    p = tmp_path / "bare.gguf"
    _write(p, "llama", tokenizer=False)
    d = inspect_report(p)
    t = d["tokenizer"]
    assert t["model"] is None and t["vocab_size"] is None and t["bos_id"] is None and t["n_merges"] == 0
    assert d["config"] is None                      # llama without the required keys
    assert "llama.attention.head_count" in d["config_error"] or "block_count" in d["config_error"]
    format_report(d)


def test_malformed_file_raises_gguf_error(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + b"\x63\0\0\0" + b"\0" * 40)
    with pytest.raises(GGUFError, match="version 99"):
        inspect_report(p)

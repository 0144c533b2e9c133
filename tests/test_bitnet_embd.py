"""BitNet GGUF whose token_embd (also the tied output head) is stored as Q8_0, like bitnet.cpp's
`--quant-embd` files: it loads, stays in its blocks (no float copy), and runs on both backends.

Oracles: the same model with the embedding stored as the *dequantized* Q8_0 values — as f16 where
those values are exactly f16 (so the second model runs the 16-bit head path, a different kernel),
and as f32 for a general embedding. The Q8_0 blocks are written by gguf-py's quantizer and the
f32 values decoded by gguf-py, not by plainlm. fast is compared with ref on the Q8_0 model.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from plainlm.config import ModelConfig                                         # noqa: E402
from plainlm.convert import _ternary_entry, bitnet_metadata, minimal_vocab, write_gguf_file  # noqa: E402
from plainlm.formats import load                                                # noqa: E402
from plainlm.kernels.ternary import HalfWeight                                  # noqa: E402
from plainlm.model import Model, forward                                        # noqa: E402
from plainlm.quant import Q8_0, QTensor                                         # noqa: E402

CFG = ModelConfig(arch="bitnet", act="relu2", vocab_size=512, dim=256, n_layers=2, n_heads=4,
                  n_kv_heads=2, head_dim=64, ffn_dim=512, context_length=128, rope_theta=500000.0)
IDS = [1, 17, 250, 3, 499, 42, 42, 7, 300, 100, 64, 256, 5, 6, 0, 2]
Q8 = gguf.GGMLQuantizationType.Q8_0


def write_bitnet(path: str, embd_type: str, embd) -> None:
    """A random ternary BitNet (seeded: same projections and norms in every file) with token_embd
    given as (type name, array): F16 / F32 values [V, D] or Q8_0 block bytes [V, D/32*34]."""
    D, F, V, Dh = CFG.dim, CFG.ffn_dim, CFG.vocab_size, CFG.head_dim
    meta = bitnet_metadata(CFG)
    meta.update(minimal_vocab(V))
    arr = np.ascontiguousarray(embd)
    tensors = [("token_embd.weight", embd_type, (V, D), arr.nbytes, lambda: arr)]
    rng = np.random.default_rng(7)
    tensors.append(("output_norm.weight", "F32", (D,), 4 * D,
                    lambda g=(1 + 0.1 * rng.standard_normal(D)).astype(np.float32): g))
    shapes = {"attn_q": (CFG.n_heads * Dh, D), "attn_k": (CFG.n_kv_heads * Dh, D),
              "attn_v": (CFG.n_kv_heads * Dh, D), "attn_output": (D, CFG.n_heads * Dh),
              "ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F)}
    for i in range(CFG.n_layers):
        for nm, n in (("attn_norm", D), ("attn_sub_norm", D), ("ffn_norm", D), ("ffn_sub_norm", F)):
            g = (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)
            tensors.append((f"blk.{i}.{nm}.weight", "F32", (n,), 4 * n, lambda g=g: g))
        for nm, (n, k) in shapes.items():
            codes = rng.choice(np.array([0, 1, 2], np.uint8), size=(n, k), p=[0.3, 0.4, 0.3])
            tensors.append(_ternary_entry(f"blk.{i}.{nm}.weight", n, k, "TQ2_0",
                                          lambda r0, r1, c=codes: c[r0:r1], 1.0 / np.sqrt(k)))
    write_gguf_file(path, meta, tensors)


def logits(path: str, backend: str, ids=IDS) -> np.ndarray:
    m = Model.from_checkpoint(load(path), backend)
    return forward(m, ids, np.arange(len(ids)), m.new_cache(64), logits="all")


def decode_logits(path: str, backend: str, ids=IDS) -> np.ndarray:
    """One token per call (the decode path: T = 1 matvecs)."""
    m = Model.from_checkpoint(load(path), backend)
    cache = m.new_cache(64)
    return np.stack([forward(m, [t], [i], cache) for i, t in enumerate(ids)])


def f16_exact_embedding(seed: int = 0) -> np.ndarray:
    """[V, D] values that Q8_0 stores exactly and f16 holds exactly: per 32-block a power-of-two
    scale d = 2^-e and integer codes in [-127, 127] with one code of magnitude 127 (so ggml's
    d = amax / 127 is exactly 2^-e)."""
    V, D = CFG.vocab_size, CFG.dim
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, size=(V, D // 32, 32))
    q[..., 0] = np.where(rng.random((V, D // 32)) < 0.5, -127, 127)
    d = 2.0 ** -rng.integers(6, 10, size=(V, D // 32, 1))
    return (q * d).reshape(V, D).astype(np.float32)


@pytest.fixture(scope="module")
def exact_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bitnet_embd")
    e = f16_exact_embedding()
    blocks = gguf.quants.quantize(e, Q8)                         # gguf-py's Q8_0 encoder
    assert np.array_equal(gguf.quants.dequantize(blocks, Q8), e)  # the premise: lossless here
    paths = {"q8_0": str(d / "q8.gguf"), "f16": str(d / "f16.gguf")}
    write_bitnet(paths["q8_0"], "Q8_0", blocks)
    write_bitnet(paths["f16"], "F16", e.astype(np.float16))
    return paths


@pytest.fixture(scope="module")
def general_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bitnet_embd_gen")
    e = (np.random.default_rng(3).standard_normal((CFG.vocab_size, CFG.dim)) * 0.5).astype(np.float32)
    blocks = gguf.quants.quantize(e, Q8)
    paths = {"q8_0": str(d / "q8.gguf"), "f32": str(d / "f32.gguf")}
    write_bitnet(paths["q8_0"], "Q8_0", blocks)
    write_bitnet(paths["f32"], "F32", gguf.quants.dequantize(blocks, Q8).astype(np.float32))
    return paths


def test_q8_0_embedding_stays_in_blocks_and_is_the_tied_head(exact_files):
    ck = load(exact_files["q8_0"])
    emb = ck.weights["token_embd"]
    assert isinstance(emb, QTensor) and emb.qtype is Q8_0 and emb.shape == (CFG.vocab_size, CFG.dim)
    assert ck.weights["output"] is emb
    assert isinstance(load(exact_files["f16"]).weights["token_embd"], HalfWeight)
    m = Model.from_checkpoint(ck, "fast")
    from plainlm.kernels.fast import Q8_0_K, Packed
    for name in ("token_embd", "output"):                # the file's bytes, not a copy
        w = m.weights[name]
        assert isinstance(w, Packed) and w.kind == Q8_0_K
        assert np.shares_memory(w.data, emb.data)


@pytest.mark.parametrize("run", [logits, decode_logits], ids=["prefill", "decode"])
def test_q8_0_matches_f16_model_with_the_same_values(exact_files, run):
    """Same embedding values: Q8_0 blocks vs f16 (HalfWeight head), on each backend. ref: equal
    up to float32 summation order; fast: the Q8_0 head quantizes its activations (~16 bits), the
    f16 head does not. (fast vs ref is compared on the general embedding below: this dyadic one
    makes exact .5 ties in the per-token int8 activation quantization likely, and an ulp of
    difference in a float op then moves a code by one step in one backend and not the other.)"""
    for backend, atol in (("ref", 1e-5), ("fast", 1e-4)):
        q, f = run(exact_files["q8_0"], backend), run(exact_files["f16"], backend)
        np.testing.assert_allclose(q, f, atol=atol * np.abs(f).max(), rtol=0)
        assert (q.argmax(-1) == f.argmax(-1)).all()


@pytest.mark.parametrize("run", [logits, decode_logits], ids=["prefill", "decode"])
def test_q8_0_matches_f32_model_with_gguf_py_dequantized_values(general_files, run):
    q_ref, f_ref = run(general_files["q8_0"], "ref"), run(general_files["f32"], "ref")
    scale = np.abs(f_ref).max()
    np.testing.assert_allclose(q_ref, f_ref, atol=1e-5 * scale, rtol=0)
    q_fast = run(general_files["q8_0"], "fast")
    np.testing.assert_allclose(q_fast, q_ref, atol=2e-3 * scale, rtol=0)
    assert (q_fast.argmax(-1) == q_ref.argmax(-1)).all()


def test_embedding_rows_decode_like_gguf_py(general_files):
    """The lookup side of the tied weight: rows decoded by either backend = gguf-py's values."""
    from plainlm.formats.gguf import read_gguf
    blocks = read_gguf(general_files["q8_0"]).tensors["token_embd.weight"].data
    want = gguf.quants.dequantize(np.asarray(blocks)[IDS], Q8)
    for backend in ("ref", "fast"):
        m = Model.from_checkpoint(load(general_files["q8_0"]), backend)
        np.testing.assert_array_equal(m.backend.embed(m.weights["token_embd"], np.array(IDS)), want)


def test_bench_builder_requantizes_only_the_embedding(exact_files, tmp_path):
    """bench/bitnet.py --embd q8_0 derives its file from the f16 one: token_embd becomes gguf-py-
    identical Q8_0 blocks of the f16 values; every other tensor and the metadata are unchanged."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    try:
        import bitnet as bench
    finally:
        sys.path.pop(0)
    from plainlm.formats.gguf import read_gguf
    out = str(tmp_path / "q8.gguf")
    bench.build_q8_0_embd(exact_files["f16"], out, rows=100)     # rows: several uneven chunks
    a, b = read_gguf(exact_files["f16"]), read_gguf(out)
    assert list(a.tensors) == list(b.tensors)
    for name, ta in a.tensors.items():
        tb = b.tensors[name]
        if name == "token_embd.weight":
            assert tb.qtype.name == "Q8_0" and tb.shape == ta.shape
            f = np.asarray(ta.data).view(np.float16).reshape(ta.shape).astype(np.float32)
            np.testing.assert_array_equal(np.asarray(tb.data), gguf.quants.quantize(f, Q8))
        else:
            assert tb.qtype is ta.qtype and np.array_equal(tb.data, ta.data)
    assert set(a.metadata) == set(b.metadata)
    for k, v in a.metadata.items():
        assert np.array_equal(v, b.metadata[k]) if isinstance(v, np.ndarray) else v == b.metadata[k]
    assert bench.embd_type(out) == "q8_0"

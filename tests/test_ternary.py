"""Ternary layouts and kernels: codecs against gguf-py and transformers, bit-plane kernels against
each other and against a dense int8 matmul."""
from __future__ import annotations

import numpy as np
import pytest

from plainlm.kernels import ternary as tk
from plainlm.quant import TQ1_0, TQ2_0, dequantize
from plainlm.quant.ternary import (TernaryFormatError, TernaryWeight, dequantize_tq, encode_tq,
                                   hf_pack, hf_unpack, i2s_decode, i2s_encode, quantize_tq, tq_codes)

rng = np.random.default_rng(1)


def ternary_blocks(n, k, p0=0.4):
    """A matrix with one scale per row (what a BitNet model has) as float32 values."""
    t = rng.choice([-1, 0, 1], size=(n, k), p=[(1 - p0) / 2, p0, (1 - p0) / 2]).astype(np.int8)
    d = np.float16(rng.uniform(0.01, 2, size=(n, 1))).astype(np.float32)
    return t, d


# ---------------------------------------------------------------------------------------------
# codecs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qt", [TQ1_0, TQ2_0])
def test_tq_matches_gguf_py(qt):
    gq = pytest.importorskip("gguf.quants")
    import gguf
    gt = {"TQ1_0": gguf.GGMLQuantizationType.TQ1_0, "TQ2_0": gguf.GGMLQuantizationType.TQ2_0}[qt.name]
    x = rng.standard_normal((8, 512)).astype(np.float32)
    ours = quantize_tq(x, qt)
    theirs = gq.quantize(x, gt)
    np.testing.assert_array_equal(ours, theirs)                   # encoder: byte for byte
    np.testing.assert_array_equal(dequantize_tq(ours, qt, x.shape), gq.dequantize(theirs, gt))
    np.testing.assert_array_equal(dequantize(ours, qt, x.shape), gq.dequantize(theirs, gt))


@pytest.mark.parametrize("qt", [TQ1_0, TQ2_0])
def test_tq_codes_round_trip(qt):
    t, d = ternary_blocks(16, 768)
    codes = (t + 1).astype(np.uint8)
    raw = encode_tq(codes, np.repeat(d, 3, axis=1), qt)
    c2, d2 = tq_codes(raw, qt, 16, 768)
    np.testing.assert_array_equal(c2, codes)
    np.testing.assert_array_equal(d2, np.repeat(d, 3, axis=1))


def test_hf_pack_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.integrations.bitnet import pack_weights, unpack_weights
    t = rng.choice([-1, 0, 1], size=(64, 40))
    theirs = pack_weights(torch.tensor(t, dtype=torch.int8).clone()).numpy()
    ours = hf_pack((t + 1).astype(np.uint8))
    np.testing.assert_array_equal(ours, theirs)
    back = unpack_weights(torch.tensor(ours), dtype=torch.float32).numpy()
    np.testing.assert_array_equal(back, t)
    np.testing.assert_array_equal(hf_unpack(ours).astype(np.int8) - 1, t)
    np.testing.assert_array_equal(hf_unpack(ours, slice(10, 50)), hf_unpack(ours)[10:50])


def test_i2s_layout():
    """Element 128g + j sits in byte 32g + j%32 at shift 6 - 2*(j//32) (formats.md §2.2)."""
    codes = np.zeros((2, 128), np.uint8)
    codes[0, 33] = 2                                             # j = 33: byte 1, shift 4
    raw = i2s_encode(codes, 0.5)
    assert raw.size == 2 * 128 // 4 + 32
    assert raw[1] == 2 << 4 and raw[:64].sum() == 32              # all other codes are 0 -> bits 00
    c, s = i2s_decode(raw, 2, 128)
    np.testing.assert_array_equal(c, codes)
    assert s == 0.5


# ---------------------------------------------------------------------------------------------
# bit planes and kernels
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,k,T", [(64, 256, 1), (100, 200, 3), (33, 64, 5), (300, 17000, 2), (8, 1, 1),
                                   (6, 131008, 1)])
def test_kernels_match_dense_int8(n, k, T):
    t = rng.choice([-1, 0, 1], size=(n, k)).astype(np.int8)
    sc = rng.uniform(0.5, 1.5, n).astype(np.float32)
    w = TernaryWeight.from_ternary(t, sc)
    np.testing.assert_array_equal(w.ternary(), t)
    x = (rng.standard_normal((T, k)) * rng.uniform(0.1, 10)).astype(np.float32)
    want = tk.tmatmul_dense_int(t, sc, x)
    np.testing.assert_array_equal(w.prepare("ref").matmul(x), want)
    np.testing.assert_array_equal(w.prepare("fast").matmul(x), want)
    if tk.HAVE_NUMBA:                                  # both numba kernels, whichever is the default
        x16, s = tk.act_quant_fast(x, w.plus.shape[1] * 8)
        for vnni in (False, True) if tk.HAVE_VNNI else (False,):
            np.testing.assert_array_equal(tk.tmatmul_fast(w.plus, w.minus, w.scale, x16, s, vnni), want)


def test_act_quant_twins_and_rounding():
    x = rng.standard_normal((4, 300)).astype(np.float32)
    x[1, :] = 0                                                  # all-zero row: s = 127/1e-5
    x[2, :3] = [127.0, 0.5, 1.5]                                 # s = 1: ties round to even
    xq, s = tk.act_quant_ref(x, 320)
    x16, s2 = tk.act_quant_fast(x, 320)
    np.testing.assert_array_equal(xq, x16)
    np.testing.assert_array_equal(s, s2)
    assert list(xq[2, :3]) == [127, 0, 2]
    assert (xq[:, 300:] == 0).all() and (xq[1] == 0).all()


def test_act_quant_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.integrations.bitnet import ActQuant
    x = rng.standard_normal((5, 256)).astype(np.float32)
    xq, s = tk.act_quant_ref(x, 256)
    theirs = ActQuant.apply(torch.tensor(x)).numpy()
    np.testing.assert_allclose(xq / s[:, None], theirs, rtol=1e-6, atol=0)


def test_from_tq_and_errors():
    t, d = ternary_blocks(4, 512)
    raw = encode_tq((t + 1).astype(np.uint8), np.repeat(d, 2, axis=1), TQ2_0)
    w = TernaryWeight.from_tq(raw, TQ2_0, (4, 512))
    np.testing.assert_array_equal(w.ternary(), t)
    np.testing.assert_array_equal(w.scale, d[:, 0])
    np.testing.assert_array_equal(w.dequantize(), dequantize_tq(raw, TQ2_0, (4, 512)))
    bad = encode_tq((t + 1).astype(np.uint8), np.concatenate([d, d * 2], axis=1), TQ2_0)
    with pytest.raises(TernaryFormatError, match="different scales"):
        TernaryWeight.from_tq(bad, TQ2_0, (4, 512))
    with pytest.raises(TernaryFormatError, match="code 3"):
        TernaryWeight.from_codes(np.full((2, 64), 3, np.uint8), 1.0)
    with pytest.raises(TernaryFormatError, match="plane must be uint8"):
        TernaryWeight((2, 64), np.zeros((2, 4), np.uint8), np.zeros((2, 8), np.uint8), 1.0)


def test_half_head_twins():
    from plainlm.kernels.ternary import HalfWeight, half_to_f32
    h = (rng.standard_normal((1000, 256)) * 0.1).astype(np.float16)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    for kind, bits in (("f16", h.view(np.uint16)),
                       ("bf16", (h.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16))):
        want = x.astype(np.float64) @ half_to_f32(bits, kind).T.astype(np.float64)
        for be in ("ref", "fast"):
            got = HalfWeight(bits, kind).prepare(be).matmul(x)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(HalfWeight(bits, kind).rows([3, 1]), half_to_f32(bits[[3, 1]], kind))

"""Block decoders and encoders of plainlm.quant.

(a) hand-built blocks: bytes written with struct, expected floats worked out from the layouts in
    shared/specs/formats.md §3.2 (literal lists or plain scalar loops, never the vectorized code);
(b) random blocks against gguf-py's `gguf.quants` (llama.cpp's own numpy port);
(c) encoders byte-exact against gguf-py and ggml-quants.c's reference quantizers, plus round-trip
    error bounds.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as G  # noqa: E402

from plainlm import quant as Q  # noqa: E402


def f16(v: float) -> bytes:
    return struct.pack("<e", v)


def dq(raw: bytes, qt: Q.QType, n: int | None = None) -> np.ndarray:
    a = np.frombuffer(raw, np.uint8)
    k = len(raw) // qt.bytes * qt.block
    return Q.dequantize(a, qt, (k,) if n is None else (n, k // n))


# ------------------------------------------------------------------------------------------------
# (a) hand-built blocks
# ------------------------------------------------------------------------------------------------

def test_f32_hand():
    raw = struct.pack("<4f", 1.5, -2.0, 3.25, 0.0)
    np.testing.assert_array_equal(dq(raw, Q.F32), [1.5, -2.0, 3.25, 0.0])
    assert dq(raw, Q.F32).dtype == np.float32


def test_f16_hand():
    # raw IEEE half bits: 1.0, -2.0, 65504 (max), 2**-24 (smallest subnormal), -0.0, 0.333251953125
    raw = struct.pack("<6H", 0x3C00, 0xC000, 0x7BFF, 0x0001, 0x8000, 0x3555)
    out = dq(raw, Q.F16)
    np.testing.assert_array_equal(out, [1.0, -2.0, 65504.0, 2.0 ** -24, -0.0, 0.333251953125])
    assert np.signbit(out[4])


def test_bf16_hand():
    # bf16 = top 16 bits of an f32: 1.0, -3.0, 3.140625, -inf, 2**-133 (f32 subnormal), 0x4049 -> pi-ish
    raw = struct.pack("<6H", 0x3F80, 0xC040, 0x4049, 0xFF80, 0x0001, 0x7F7F)
    out = dq(raw, Q.BF16)
    expected = [1.0, -3.0, 3.140625, -np.inf, 2.0 ** -133, struct.unpack("<f", struct.pack("<I", 0x7F7F0000))[0]]
    np.testing.assert_array_equal(out, np.array(expected, np.float32))
    assert out.dtype == np.float32


def test_q8_0_hand():
    qs = list(range(-16, 14)) + [-128, 127]                    # 32 int8
    raw = f16(0.25) + struct.pack("<32b", *qs)
    assert len(raw) == 34
    expected = [q * 0.25 for q in qs]
    np.testing.assert_array_equal(dq(raw, Q.Q8_0), expected)
    assert expected[-2:] == [-32.0, 31.75]


def test_q4_0_hand():
    # low nibble j, high nibble 15-j  -> x[j] = (j-8)*d, x[j+16] = (15-j-8)*d, d = 0.5
    qs = bytes(j | ((15 - j) << 4) for j in range(16))
    raw = f16(0.5) + qs
    expected = [-4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5,
                3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -2.5, -3.0, -3.5, -4.0]
    np.testing.assert_array_equal(dq(raw, Q.Q4_0), expected)


def test_q4_1_hand():
    # d = 0.5, m = -1, low nibble j, high nibble 15-j -> x[j] = j/2 - 1, x[j+16] = (15-j)/2 - 1
    qs = bytes(j | ((15 - j) << 4) for j in range(16))
    raw = f16(0.5) + f16(-1.0) + qs
    assert len(raw) == 20
    expected = [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5,
                6.5, 6.0, 5.5, 5.0, 4.5, 4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0]
    np.testing.assert_array_equal(dq(raw, Q.Q4_1), expected)


def test_q5_0_hand():
    qs = bytes(j | ((15 - j) << 4) for j in range(16))
    # qh = 0x0000FFFF: the 5th bit is set for elements 0..15 only -> x[j] = (j + 16 - 16)*d = j*d,
    # x[j+16] = (15 - j - 16)*d
    raw = f16(0.25) + struct.pack("<I", 0x0000FFFF) + qs
    expected = [j * 0.25 for j in range(16)] + [(15 - j - 16) * 0.25 for j in range(16)]
    np.testing.assert_array_equal(dq(raw, Q.Q5_0), expected)
    # bit order of qh: a little-endian uint32, bit j -> element j. 0x80000001 = elements 0 and 31.
    raw = f16(1.0) + bytes([0x01, 0x00, 0x00, 0x80]) + bytes(16)
    expected = [0.0] + [-16.0] * 30 + [0.0]
    np.testing.assert_array_equal(dq(raw, Q.Q5_0), expected)
    # qh byte 2 = 0x01 -> element 16
    raw = f16(1.0) + bytes([0, 0, 0x01, 0]) + bytes([0xF0] * 16)      # all high nibbles 15
    expected = [-16.0] * 16 + [15.0] + [-1.0] * 15
    np.testing.assert_array_equal(dq(raw, Q.Q5_0), expected)


def test_q5_1_hand():
    qs = bytes(j | ((15 - j) << 4) for j in range(16))
    # d = 2, m = 0.5, qh = 0xFFFF0000: elements 16..31 get +16
    raw = f16(2.0) + f16(0.5) + struct.pack("<I", 0xFFFF0000) + qs
    assert len(raw) == 24
    expected = [j * 2.0 + 0.5 for j in range(16)] + [(15 - j + 16) * 2.0 + 0.5 for j in range(16)]
    np.testing.assert_array_equal(dq(raw, Q.Q5_1), expected)
    assert expected[16] == 62.5 and expected[0] == 0.5


# Q4_K scales: 8 six-bit scales and 8 six-bit mins packed in 12 bytes (formats.md §3.2).
#   sc = [1, 2, 3, 63, 17, 33, 48, 63]   mn = [0, 5, 10, 63, 20, 40, 62, 1]
# bytes 0..3  = sc[j] | (sc[j+4] >> 4) << 6  = 1|1<<6, 2|2<<6, 3|3<<6, 63|3<<6 = 65, 130, 195, 255
# bytes 4..7  = mn[j] | (mn[j+4] >> 4) << 6  = 0|1<<6, 5|2<<6, 10|3<<6, 63|0<<6 = 64, 133, 202, 63
# bytes 8..11 = (sc[j+4] & 15) | (mn[j+4] & 15) << 4 = 1|4<<4, 1|8<<4, 0|14<<4, 15|1<<4 = 65, 129, 224, 31
Q4K_SCALES = bytes([65, 130, 195, 255, 64, 133, 202, 63, 65, 129, 224, 31])
Q4K_SC = [1, 2, 3, 63, 17, 33, 48, 63]
Q4K_MN = [0, 5, 10, 63, 20, 40, 62, 1]


def test_q4k_scale_unpacking_hand():
    sc, mn = Q.q4k_scales(np.frombuffer(Q4K_SCALES, np.uint8))
    assert sc.tolist() == Q4K_SC
    assert mn.tolist() == Q4K_MN


def test_q4_k_hand():
    d, dmin = 0.5, 0.25
    # chunk c (32 bytes): low nibble (l + 3c) % 16, high nibble (15 - l) % 16 for l = 0..31
    qs = bytes((((l + 3 * c) % 16) | (((15 - l) % 16) << 4)) for c in range(4) for l in range(32))
    raw = f16(d) + f16(dmin) + Q4K_SCALES + qs
    assert len(raw) == 144
    expected = [0.0] * 256
    for c in range(4):
        for l in range(32):
            lo, hi = (l + 3 * c) % 16, (15 - l) % 16
            expected[64 * c + l] = d * Q4K_SC[2 * c] * lo - dmin * Q4K_MN[2 * c]
            expected[64 * c + 32 + l] = d * Q4K_SC[2 * c + 1] * hi - dmin * Q4K_MN[2 * c + 1]
    out = dq(raw, Q.Q4_K)
    np.testing.assert_array_equal(out, expected)
    # spot checks worked out by hand:
    #   elt 0:   sub-block 0, sc 1, m 0,   q 0   -> 0
    #   elt 32:  sub-block 1, sc 2, m 5,   q 15  -> 0.5*2*15 - 0.25*5 = 13.75
    #   elt 128: sub-block 4 (j>=4 packing), sc 17, m 20, q (0+6)%16 = 6 -> 0.5*17*6 - 0.25*20 = 46
    #   elt 255: sub-block 7, sc 63, m 1,  q (15-31)%16 = 0 -> -0.25
    assert (out[0], out[32], out[128], out[255]) == (0.0, 13.75, 46.0, -0.25)


def test_q6_k_hand():
    ql = bytes((7 * i + 3) % 256 for i in range(128))
    qh = bytes((37 * i + 11) % 256 for i in range(64))
    sc = [1, -2, 3, -4, 5, -6, 7, -8, 9, -10, 11, -12, 13, -14, 15, -128]
    d = 0.125
    raw = ql + qh + struct.pack("<16b", *sc) + f16(d)
    assert len(raw) == 210
    expected = [0.0] * 256
    for h in range(2):                          # ggml-quants.c dequantize_row_q6_K, written out
        for l in range(32):
            is_ = l // 16
            L, Hh = ql[64 * h:], qh[32 * h:]
            s = sc[8 * h:]
            q1 = ((L[l] & 0xF) | (((Hh[l] >> 0) & 3) << 4)) - 32
            q2 = ((L[l + 32] & 0xF) | (((Hh[l] >> 2) & 3) << 4)) - 32
            q3 = ((L[l] >> 4) | (((Hh[l] >> 4) & 3) << 4)) - 32
            q4 = ((L[l + 32] >> 4) | (((Hh[l] >> 6) & 3) << 4)) - 32
            expected[128 * h + l] = d * s[is_] * q1
            expected[128 * h + l + 32] = d * s[is_ + 2] * q2
            expected[128 * h + l + 64] = d * s[is_ + 4] * q3
            expected[128 * h + l + 96] = d * s[is_ + 6] * q4
    out = dq(raw, Q.Q6_K)
    np.testing.assert_array_equal(out, expected)
    # by hand: elt 0: ql[0]=3 -> lo 3, qh[0]=11=0b1011 -> bits 1:0 = 3 -> q = 3|48 - 32 = 19, sc[0]=1
    assert out[0] == 0.125 * 1 * 19
    # elt 16: l=16 -> scale sc[1] = -2; ql[16]=115 -> lo 3; qh[16]=(37*16+11)%256=91=0b01011011 -> 3
    assert out[16] == 0.125 * -2 * 19
    # elt 255: h=1, l=31, q4 -> scale sc[8+1+6] = sc[15] = -128; ql[64+63]=(7*127+3)%256=124 -> hi 7;
    # qh[32+31]=(37*63+11)%256=26=0b00011010 -> bits 7:6 = 0 -> q = 7 - 32 = -25
    assert out[255] == 0.125 * -128 * -25


def test_multi_row_shapes():
    """A [N, row_bytes] raw array decodes row by row into shape (N, K)."""
    rows = [f16(float(r + 1)) + struct.pack("<32b", *range(32)) * 1 for r in range(3)]
    raw = np.frombuffer(b"".join(r + r for r in rows), np.uint8).reshape(3, 68)   # 2 blocks per row
    out = Q.dequantize(raw, Q.Q8_0, (3, 64))
    for r in range(3):
        np.testing.assert_array_equal(out[r], np.tile(np.arange(32), 2) * (r + 1))


# ------------------------------------------------------------------------------------------------
# (b) random blocks against gguf-py
# ------------------------------------------------------------------------------------------------

# byte ranges of the fp16 scale fields inside each block
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
              "Q4_K": [0, 2], "Q6_K": [208]}
ALL = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K"]


def random_tensor(qt: Q.QType, rows: int, blocks: int, rng) -> np.ndarray:
    n = rows * blocks
    if qt is Q.F32:
        return rng.standard_normal((rows, blocks)).astype(np.float32).view(np.uint8)
    if qt is Q.F16:
        return (rng.standard_normal((rows, blocks)) * 100).astype(np.float16).view(np.uint8)
    if qt is Q.BF16:
        bits = rng.integers(0, 1 << 16, (rows, blocks), dtype=np.uint16)
        bits = np.where((bits & 0x7F80) == 0x7F80, bits & 0xBFFF, bits)      # no inf/nan
        return bits.astype("<u2").view(np.uint8).reshape(rows, -1)
    raw = rng.integers(0, 256, (n, qt.bytes), dtype=np.uint8)
    for off in F16_FIELDS[qt.name]:
        raw[:, off:off + 2] = (rng.standard_normal(n) * 0.05).astype(np.float16).view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, blocks * qt.bytes)


@pytest.mark.parametrize("name", ALL)
def test_decoders_match_gguf_py(name):
    qt = Q.BY_NAME[name]
    rng = np.random.default_rng(1234 + qt.id)
    for rows, blocks in [(1, 1), (5, 3), (7, 8)]:
        raw = random_tensor(qt, rows, blocks, rng)
        k = blocks * qt.block
        ours = Q.dequantize(raw, qt, (rows, k))
        ref = gguf.quants.dequantize(raw, G[name])
        assert ours.shape == ref.shape == (rows, k)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K"])
def test_decoders_match_gguf_py_arbitrary_bytes(name):
    """Fully random bytes (any fp16 pattern incl. inf/nan/subnormal scales) decode the same way."""
    qt = Q.BY_NAME[name]
    raw = np.random.default_rng(99).integers(0, 256, (6, 4 * qt.bytes), dtype=np.uint8)
    with np.errstate(all="ignore"):
        ours = Q.dequantize(raw, qt, (6, 4 * qt.block))
        ref = gguf.quants.dequantize(raw, G[name])
    np.testing.assert_array_equal(ours, ref)


def test_qtensor_rows_and_memmap_like_views():
    rng = np.random.default_rng(7)
    raw = random_tensor(Q.Q6_K, 6, 2, rng)
    t = Q.QTensor(Q.Q6_K, (6, 512), raw)
    full = t.dequantize()
    np.testing.assert_array_equal(t.rows([4, 1, 4]), full[[4, 1, 4]])
    ro = raw.copy()
    ro.setflags(write=False)                                    # like a read-only memory map
    np.testing.assert_array_equal(Q.dequantize(ro[::2], Q.Q6_K, (3, 512)), full[::2])


# ------------------------------------------------------------------------------------------------
# (c) encoders
# ------------------------------------------------------------------------------------------------

def _data(kind: str, rng) -> np.ndarray:
    shape = (257, 128)
    x = {"normal": lambda: rng.standard_normal(shape),
         "uniform": lambda: rng.uniform(-3, 5, shape),
         "grid": lambda: rng.integers(-40, 41, shape) / 8,          # many exact .5 ties
         "ints": lambda: rng.integers(-127, 128, shape),
         "tiny": lambda: rng.standard_normal(shape) * 1e-5,
         "large": lambda: rng.standard_normal(shape) * 3e3,
         "positive": lambda: rng.uniform(0.5, 2.0, shape)}[kind]().astype(np.float32)
    x[0] = 0.0                                                       # all-zero blocks
    x[1, :32] = 1.25                                                 # constant block
    x[2, :32] = -7.0
    return x


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("kind", ["normal", "uniform", "grid", "ints", "tiny", "large", "positive"])
def test_encoders_byte_exact_vs_gguf_py(name, kind):
    qt = Q.BY_NAME[name]
    x = _data(kind, np.random.default_rng(zlib.crc32(f"{name}/{kind}".encode())))
    ours = Q.quantize(x, qt)
    with np.errstate(all="ignore"):
        ref = gguf.quants.quantize(x, G[name])
    assert ours.dtype == np.uint8 and ours.shape == ref.shape == (257, Q.row_bytes(qt, 128))
    np.testing.assert_array_equal(ours, ref)


def test_q8_0_rounds_the_float32_product():
    """ggml-quants.c: `const float x0 = x*id; qs = roundf(x0);` — the product is a float32.

    With amax = 1: d = 1/127 (f32), id = 127.0f. x = 0x3B810204 gives x*id = 0.49999999814 exactly,
    which rounds to 0.5f in float32, and roundf(0.5f) = 1 (half away from zero). Computing the
    product in float64 (an earlier bug here) gives 0.
    """
    x = np.zeros(32, np.float32)
    x[0] = 1.0
    x[1] = np.uint32(998310404).view(np.float32)
    x[2] = -x[1]
    x[3] = np.uint32(1017201285).view(np.float32)             # x*id rounds to 2.5f -> 3
    q = Q.quantize(x, Q.Q8_0)[0, 2:].view(np.int8)
    assert q[:4].tolist() == [127, 1, -1, 3]
    np.testing.assert_array_equal(Q.quantize(x, Q.Q8_0), gguf.quants.quantize(x[None], G.Q8_0))


def test_q4_0_hand_encode():
    # max-magnitude value -4 -> d = -4/-8 = 0.5; q = min(15, int8(x/d + 8.5))
    x = np.array([-4.0, 3.9, 0.0, 0.24, 0.26, -0.26] + [0.0] * 26, np.float32)
    raw = Q.quantize(x, Q.Q4_0)[0]
    assert struct.unpack("<e", raw[:2].tobytes())[0] == 0.5
    q = np.concatenate([raw[2:] & 0xF, raw[2:] >> 4])
    # -4/0.5+8.5=0.5->0; 3.9/0.5+8.5=16.3->16->15 (clamped); 0->8; 0.48+8.5->8; 0.52+8.5->9; -0.52+8.5->7
    assert q[:6].tolist() == [0, 15, 8, 8, 9, 7]


def test_q4_1_hand_encode():
    x = np.linspace(-1.0, 6.5, 32, dtype=np.float32)     # min -1, max 6.5 -> d = 0.5 exactly
    raw = Q.quantize(x, Q.Q4_1)[0]
    d, m = struct.unpack("<2e", raw[:4].tobytes())
    assert (d, m) == (0.5, -1.0)
    q = np.concatenate([raw[4:] & 0xF, raw[4:] >> 4])
    expected = np.minimum(15, ((x + 1.0) / 0.5 + 0.5).astype(np.int8))
    assert q.tolist() == expected.tolist()
    assert q[0] == 0 and q[31] == 15


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "F16", "F32"])
def test_round_trip_error_bounds(name):
    qt = Q.BY_NAME[name]
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal((64, 256)), rng.uniform(-10, 1, (64, 256))]).astype(np.float32)
    y = Q.dequantize(Q.quantize(x, qt), qt, x.shape)
    err = np.abs(y - x)
    if qt is Q.F32:
        np.testing.assert_array_equal(y, x)
        return
    if qt is Q.F16:
        assert np.all(err <= np.abs(x) * 2.0 ** -11 + 2.0 ** -25)
        return
    b = x.reshape(-1, 32)
    e = err.reshape(-1, 32)
    amax = np.abs(b).max(-1, keepdims=True)
    eps16 = 2.0 ** -11                                   # relative rounding of the fp16 scales
    if qt is Q.Q8_0:
        d = amax / 127
        bound = d * 0.5 + 127 * d * eps16 + 1e-7 * amax
    elif qt is Q.Q4_0:
        d = amax / 8                                     # the far end is clamped at 7: error up to d
        bound = d * 1.0 + 8 * d * eps16 + 1e-6 * amax
        # all but the clamped side stay within half a step
        inner = e <= d * 0.5 + 8 * d * eps16 + 1e-6 * amax
        assert inner.mean() > 0.95
    else:  # Q4_1
        mn, mx = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
        d = (mx - mn) / 15
        bound = d * 0.5 + 15 * d * eps16 + np.abs(mn) * eps16 + 1e-6 * amax
    assert np.all(e <= bound), float((e - bound).max())
    rel = np.sqrt((err ** 2).mean() / (x ** 2).mean())
    assert rel < {"Q8_0": 0.01, "Q4_0": 0.15, "Q4_1": 0.12}[name]


def test_quantize_1d_and_qtensor_from_float():
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    t = Q.QTensor.from_float(x, Q.Q8_0)
    assert t.data.shape == (1, 68) and t.shape == (64,)
    np.testing.assert_allclose(t.dequantize(), x, atol=np.abs(x).max() / 127)


def test_row_bytes():
    assert Q.row_bytes(Q.Q4_K, 512) == 288
    assert Q.row_bytes(Q.Q6_K, 256) == 210
    with pytest.raises(ValueError):
        Q.row_bytes(Q.Q4_0, 33)

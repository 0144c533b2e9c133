"""Ternary weights: the file layouts they come in, and the bit-plane form plainlm computes with.

A BitNet b1.58 projection is W = t * gamma, t in {-1, 0, +1} (one scale gamma per matrix). Every
file format below stores t as a 2-bit *code* c = t + 1 in {0, 1, 2}; they differ in where the codes
sit and where the scale lives. Shapes: W is [N, K] (N output rows, K inputs), like nn.Linear.

HF packed (transformers integrations/bitnet.py `pack_weights`; formats.md §1.4)
    uint8 [N/4, K]; with R = N/4, bits 2i+1:2i of packed[p, c] hold the code of W[i*R + p, c]
    (the low bit pair holds the first quarter of the rows, not 4 consecutive rows).
    Scale: a separate `<name>.weight_scale` tensor of shape [1]. Its meaning depends on
    quantization_config.linear_class — this was settled against transformers' own forward pass
    (tests/test_bitnet.py::test_logits_match_transformers):
        autobitlinear:  y = (x_q/s) @ t.T * weight_scale      -> weight_scale = gamma (MULTIPLY)
        bitlinear:      y = (x_q @ t.T) / (s * weight_scale)  -> weight_scale = 1/gamma (DIVIDE)
    (microsoft/bitnet-b1.58-2B-4T ships `autobitlinear`.)

TQ2_0 (ggml, type 35; 256 weights in 66 bytes): qs[64] | d f16.
    Byte j + m of a 32-byte half j in {0, 32} holds elements 4j + 32l + m (l = 0..3) in bits
    2l+1:2l. Value = (c - 1) * d, d = the block's absmax (= gamma for a ternary model).
TQ1_0 (ggml, type 34; 256 weights in 54 bytes): qs[48] | qh[4] | d f16; 5 (qs) or 4 (qh) base-3
    digits per byte, stored as the "fixed point" q = ceil(sum c_n 3^(4-n) * 256 / 243); digit n is
    ((uint8)(q * 3^n) * 3) >> 8. Elements: qs[m] (m<32) digit n -> 32n + m; qs[32+m] (m<16) digit
    n -> 160 + 16n + m; qh[j] digit n -> 240 + 4n + j.
I2_S (bitnet.cpp, type 36 *only* under general.architecture = bitnet-b1.58; formats.md §2.2):
    the row-major matrix flattened; each 128-element group g -> 32 bytes, byte 32g + (j mod 32)
    holds element 128g + j in bits at shift 6 - 2*(j div 32). After N*K/4 code bytes comes one
    float32 scale (gamma), padded with zeros to 32 bytes.

The bit-plane form (what TernaryWeight keeps in memory, 2 bits per weight)
    plus  uint8 [N, Kp/8]: bit (j & 7) of plus[r, j >> 3]  is 1 iff t[r, j] = +1
    minus uint8 [N, Kp/8]: bit (j & 7) of minus[r, j >> 3] is 1 iff t[r, j] = -1
    (np.packbits(..., bitorder="little"); Kp = K rounded up to 64, padding bits 0.) Read as a
    little-endian uint64, word w of a row is a 64-lane mask over inputs 64w..64w+63, so the kernel
    does masked adds: acc += x where plus, acc -= x where minus (the VNNI kernel turns each word
    into register bytes 2^q * bit and multiplies with bit-transposed activations, see
    plainlm/kernels/ternary.py) — no int8 weight matrix ever exists.
    scale float32 [N]: gamma per output row (one value repeated for a per-tensor scale; a TQ file
    whose blocks of one row carry different d cannot be represented and stays a block QTensor).

Matmul semantics (HF BitLinear / AutoBitLinear, bitnet.cpp): per token, s = 127 / max(|x|, 1e-5)
(float32), x_q = clamp(round_half_even(x * s), -128, 127) as int8; y[t, r] = (sum_j t[r,j] x_q[t,j])
/ s[t] * gamma[r], the integer sum exact. Kernels: plainlm/kernels/ternary.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from . import TQ1_0, TQ2_0, QType, row_bytes

QK = 256                 # TQ block length
PLANE_ALIGN = 64         # the plane row length Kp is a multiple of this (one 64-bit mask word)
CHUNK_ROWS = 1024        # rows converted / decoded per step (bounds temporaries)


class TernaryFormatError(ValueError):
    """Ternary weight data that is malformed or cannot be represented as bit planes."""


# ------------------------------------------------------------------------------------------------
# TQ2_0 / TQ1_0: raw uint8 [N, K/256*bytes] <-> codes uint8 [N, K] + block scales float32 [N, K/256]
# ------------------------------------------------------------------------------------------------

_POW3 = np.array([1, 3, 9, 27, 81], np.uint8)


def _tq_split(raw: np.ndarray, qt: QType, n: int, k: int):
    raw = np.asarray(raw, np.uint8).reshape(n, row_bytes(qt, k))
    b = raw.reshape(n, k // QK, qt.bytes)                                   # [N, nb, bytes]
    d = np.ascontiguousarray(b[..., qt.bytes - 2:]).view(np.float16)[..., 0].astype(np.float32)
    return b, d


def tq2_codes(raw: np.ndarray, n: int, k: int):
    """TQ2_0 bytes -> (codes uint8 [N, K] in {0,1,2}, d float32 [N, K/256])."""
    b, d = _tq_split(raw, TQ2_0, n, k)
    qs = b[..., :64].reshape(n, k // QK, 2, 1, 32)                          # [N, nb, half, 1, m]
    sh = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
    codes = (qs >> sh) & 3                                                  # [N, nb, half, l, m]
    return codes.reshape(n, k), d


def _trits(q: np.ndarray, nd: int) -> np.ndarray:
    """Fixed-point base-3 bytes q[...] -> digits [..., nd] (digit n = ((uint8)(q*3^n) * 3) >> 8)."""
    x = (q[..., None] * _POW3[:nd]).astype(np.uint8)                        # uint8 wrap-around
    return ((x.astype(np.uint16) * 3) >> 8).astype(np.uint8)


def tq1_codes(raw: np.ndarray, n: int, k: int):
    """TQ1_0 bytes -> (codes uint8 [N, K] in {0,1,2}, d float32 [N, K/256])."""
    b, d = _tq_split(raw, TQ1_0, n, k)
    nb = k // QK
    c0 = _trits(b[..., 0:32], 5).transpose(0, 1, 3, 2).reshape(n, nb, 160)   # digit n -> 32n + m
    c1 = _trits(b[..., 32:48], 5).transpose(0, 1, 3, 2).reshape(n, nb, 80)   # -> 160 + 16n + m
    c2 = _trits(b[..., 48:52], 4).transpose(0, 1, 3, 2).reshape(n, nb, 16)   # -> 240 + 4n + j
    return np.concatenate([c0, c1, c2], axis=-1).reshape(n, k), d


def tq_codes(raw: np.ndarray, qt: QType, n: int, k: int):
    if qt is TQ2_0:
        return tq2_codes(raw, n, k)
    if qt is TQ1_0:
        return tq1_codes(raw, n, k)
    raise TernaryFormatError(f"{qt.name} is not a ternary type")


def dequantize_tq(raw: np.ndarray, qt: QType, shape: tuple[int, ...]) -> np.ndarray:
    """TQ1_0 / TQ2_0 bytes -> float32 `shape` (the quant table's decoder for types 34, 35)."""
    k = shape[-1]
    n = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    codes, d = tq_codes(raw, qt, n, k)
    w = (codes.astype(np.float32) - 1.0).reshape(n, k // QK, QK) * d[..., None]
    return w.reshape(shape)


def encode_tq2(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """codes uint8 [N, K], d float32 [N, K/256] -> TQ2_0 bytes [N, K/256*66]."""
    n, k = codes.shape
    c = codes.reshape(n, k // QK, 2, 4, 32).astype(np.uint8)               # [N, nb, half, l, m]
    qs = (c[:, :, :, 0] | (c[:, :, :, 1] << 2) | (c[:, :, :, 2] << 4) | (c[:, :, :, 3] << 6))
    dd = np.asarray(d, np.float32).astype(np.float16).view(np.uint8).reshape(n, k // QK, 2)
    return np.concatenate([qs.reshape(n, k // QK, 64), dd], axis=-1).reshape(n, -1)


def _pack3(c: np.ndarray, nd: int) -> np.ndarray:
    """digits [..., nd, m] (most significant first) -> fixed-point bytes [..., m]."""
    w = np.array([81, 27, 9, 3, 1][:nd], np.uint16).reshape((nd, 1))   # qh: 4 digits in the top positions
    v = (c.astype(np.uint16) * w).sum(axis=-2)                              # < 243
    return ((v * 256 + 242) // 243).astype(np.uint8)                        # ceil(v * 256 / 243)


def encode_tq1(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """codes uint8 [N, K], d float32 [N, K/256] -> TQ1_0 bytes [N, K/256*54]."""
    n, k = codes.shape
    c = codes.reshape(n, k // QK, QK)
    qs0 = _pack3(c[..., :160].reshape(n, -1, 5, 32), 5)
    qs1 = _pack3(c[..., 160:240].reshape(n, -1, 5, 16), 5)
    qh = _pack3(c[..., 240:].reshape(n, -1, 4, 4), 4)
    dd = np.asarray(d, np.float32).astype(np.float16).view(np.uint8).reshape(n, k // QK, 2)
    return np.concatenate([qs0, qs1, qh, dd], axis=-1).reshape(n, -1)


def encode_tq(codes: np.ndarray, d: np.ndarray, qt: QType) -> np.ndarray:
    return encode_tq2(codes, d) if qt is TQ2_0 else encode_tq1(codes, d)


def quantize_tq(x: np.ndarray, qt: QType) -> np.ndarray:
    """float32 [N, K] -> TQ bytes, like ggml's quantize_row_tq*_0_ref: d = block absmax,
    code = roundf(x / d) + 1 (half away from zero)."""
    x = np.asarray(x, np.float32)
    n, k = x.shape
    b = x.reshape(n, k // QK, QK)
    d = np.abs(b).max(-1)
    inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1), 0).astype(np.float32)
    v = b * inv[..., None]
    t = np.sign(v) * np.floor(np.abs(v) + 0.5)
    codes = (t + 1).astype(np.uint8).reshape(n, k)
    return encode_tq(codes, d, qt)


# ------------------------------------------------------------------------------------------------
# HF packed (dim-0 packing) and bitnet.cpp I2_S
# ------------------------------------------------------------------------------------------------

def hf_unpack(packed: np.ndarray, rows: slice | None = None) -> np.ndarray:
    """HF packed uint8 [N/4, K] -> codes uint8 [N, K] (or the rows `rows` of that, a step-1 slice)."""
    packed = np.asarray(packed)
    R, k = packed.shape
    n = 4 * R
    r0, r1, _ = (rows or slice(0, n)).indices(n)
    out = np.empty((r1 - r0, k), np.uint8)
    for i in range(4):                               # quarter i of the rows sits in bits 2i+1:2i
        a, b = max(r0, i * R), min(r1, (i + 1) * R)
        if a < b:
            out[a - r0:b - r0] = (packed[a - i * R:b - i * R] >> (2 * i)) & 3
    return out


def hf_pack(codes: np.ndarray) -> np.ndarray:
    """codes uint8 [N, K] (N a multiple of 4) -> HF packed uint8 [N/4, K]."""
    n, k = codes.shape
    if n % 4:
        raise TernaryFormatError(f"HF packing needs a row count divisible by 4, got {n}")
    q = codes.reshape(4, n // 4, k).astype(np.uint8)
    return (q[0] | (q[1] << 2) | (q[2] << 4) | (q[3] << 6)).astype(np.uint8)


I2S_GROUP = 128


def i2s_nbytes(n: int, k: int) -> int:
    """Byte size of an I2_S tensor of N*K weights: codes, then a 32-byte tail with the fp32 scale."""
    return n * k // 4 + 32


def i2s_decode(raw: np.ndarray, n: int, k: int):
    """I2_S bytes (x86 layout, groups of 128) -> (codes uint8 [N, K], scale float)."""
    raw = np.asarray(raw, np.uint8).reshape(-1)
    if (n * k) % I2S_GROUP:
        raise TernaryFormatError(f"I2_S tensor of {n}x{k} weights is not a whole number of 128-groups")
    if raw.size < i2s_nbytes(n, k):
        raise TernaryFormatError(f"I2_S tensor of {n}x{k} needs {i2s_nbytes(n, k)} bytes, has {raw.size}")
    m = n * k // 4
    scale = float(raw[m:m + 4].view(np.float32)[0])
    q = raw[:m].reshape(-1, 1, 32)                                          # [groups, 1, 32]
    sh = np.array([6, 4, 2, 0], np.uint8).reshape(1, 4, 1)                  # j div 32 -> shift
    return ((q >> sh) & 3).reshape(n, k), scale


def i2s_encode(codes: np.ndarray, scale: float) -> np.ndarray:
    """codes uint8 [N, K] -> I2_S bytes (x86 layout) with the fp32 scale in the tail."""
    c = codes.reshape(-1, 4, 32).astype(np.uint8)
    q = (c[:, 0] << 6) | (c[:, 1] << 4) | (c[:, 2] << 2) | c[:, 3]
    tail = np.zeros(32, np.uint8)
    tail[:4] = np.array([scale], np.float32).view(np.uint8)
    return np.concatenate([q.reshape(-1), tail])


# ------------------------------------------------------------------------------------------------
# bit planes
# ------------------------------------------------------------------------------------------------

def padded_k(k: int) -> int:
    return -(-k // PLANE_ALIGN) * PLANE_ALIGN


def planes_from_codes(codes: np.ndarray, kp: int | None = None):
    """codes uint8 [n, K] in {0,1,2} -> (plus, minus) uint8 [n, Kp/8] (little bit order)."""
    n, k = codes.shape
    kp = kp or padded_k(k)
    if codes.max(initial=0) > 2:
        raise TernaryFormatError("ternary code 3 found (codes must be 0, 1, 2 = -1, 0, +1)")
    pad = ((0, 0), (0, kp - k))
    plus = np.packbits(np.pad(codes == 2, pad), axis=1, bitorder="little")
    minus = np.packbits(np.pad(codes == 0, pad), axis=1, bitorder="little")
    return plus, minus


def ternary_from_planes(plus: np.ndarray, minus: np.ndarray, k: int) -> np.ndarray:
    """(plus, minus) [n, Kp/8] -> t int8 [n, K] in {-1, 0, 1} (tests, export)."""
    p = np.unpackbits(plus, axis=1, bitorder="little")[:, :k].astype(np.int8)
    m = np.unpackbits(minus, axis=1, bitorder="little")[:, :k].astype(np.int8)
    return p - m


@dataclass
class TernaryWeight:
    """A ternary matrix W[N, K] = t * scale[:, None] as two bit planes (see the module docstring).

    Implements the kernels' weight plug-in protocol: `prepare(backend_name)` returns the weight
    bound to that backend's kernel ("ref" numpy, "fast" numba), `matmul(x[T, K]) -> [T, N]`
    quantizes x per token to int8 and sums in integers.
    """
    shape: tuple[int, int]
    plus: np.ndarray              # uint8 [N, Kp/8]
    minus: np.ndarray             # uint8 [N, Kp/8]
    scale: np.ndarray             # float32 [N]  (gamma of each output row)
    backend: str = "ref"
    source: str = field(default="", repr=False)   # where it came from (TQ2_0, HF packed, ...)

    def __post_init__(self):
        n, k = self.shape
        kp = padded_k(k)
        for nm in ("plus", "minus"):
            a = getattr(self, nm)
            if a.dtype != np.uint8 or a.shape != (n, kp // 8):
                raise TernaryFormatError(f"{nm} plane must be uint8 {[n, kp // 8]}, got {a.dtype} {list(a.shape)}")
        self.scale = np.ascontiguousarray(np.broadcast_to(np.asarray(self.scale, np.float32), (n,)))

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: np.ndarray, scale, source: str = "") -> "TernaryWeight":
        n, k = codes.shape
        plus, minus = planes_from_codes(codes)
        return cls((n, k), plus, minus, scale, source=source)

    @classmethod
    def from_ternary(cls, t: np.ndarray, scale, source: str = "") -> "TernaryWeight":
        return cls.from_codes((np.asarray(t) + 1).astype(np.uint8), scale, source)

    @classmethod
    def _from_chunks(cls, n: int, k: int, chunk_codes, source: str) -> "TernaryWeight":
        """Build planes CHUNK_ROWS rows at a time; chunk_codes(r0, r1) -> (codes, row scales)."""
        kp = padded_k(k)
        plus = np.empty((n, kp // 8), np.uint8)
        minus = np.empty_like(plus)
        scale = np.empty(n, np.float32)
        for r0 in range(0, n, CHUNK_ROWS):
            r1 = min(n, r0 + CHUNK_ROWS)
            codes, sc = chunk_codes(r0, r1)
            plus[r0:r1], minus[r0:r1] = planes_from_codes(codes, kp)
            scale[r0:r1] = sc
        return cls((n, k), plus, minus, scale, source=source)

    @classmethod
    def from_tq(cls, raw: np.ndarray, qt: QType, shape: tuple[int, int]) -> "TernaryWeight":
        """TQ1_0/TQ2_0 bytes [N, row_bytes] -> planes. Every block of a row must carry the same d
        (or d = 0 for an all-zero block); otherwise TernaryFormatError (the caller keeps blocks)."""
        n, k = shape
        raw = np.asarray(raw).reshape(n, -1)

        def chunk(r0, r1):
            codes, d = tq_codes(raw[r0:r1], qt, r1 - r0, k)
            row = d.max(axis=1)
            if np.any((d != row[:, None]) & (d != 0)) or np.any(d < 0):
                raise TernaryFormatError(f"{qt.name} blocks of one row carry different scales d; "
                                         f"the bit-plane form needs one scale per row")
            return codes, row
        return cls._from_chunks(n, k, chunk, qt.name)

    @classmethod
    def from_hf_packed(cls, packed: np.ndarray, scale: float) -> "TernaryWeight":
        R, k = packed.shape
        return cls._from_chunks(4 * R, k, lambda r0, r1: (hf_unpack(packed, slice(r0, r1)), scale), "HF packed")

    @classmethod
    def from_i2s(cls, raw: np.ndarray, shape: tuple[int, int]) -> "TernaryWeight":
        n, k = shape
        raw = np.asarray(raw, np.uint8).reshape(-1)
        if raw.size < i2s_nbytes(n, k):
            raise TernaryFormatError(f"I2_S tensor of {n}x{k} needs {i2s_nbytes(n, k)} bytes, has {raw.size}")
        scale = float(raw[n * k // 4:n * k // 4 + 4].view(np.float32)[0])
        rb = k // 4                                    # rows are whole groups when K % 128 == 0

        def chunk(r0, r1):
            codes, _ = i2s_decode(np.concatenate([raw[r0 * rb:r1 * rb], np.zeros(32, np.uint8)]), r1 - r0, k)
            return codes, scale
        if k % I2S_GROUP:
            codes, scale = i2s_decode(raw, n, k)
            return cls.from_codes(codes, scale, "I2_S")
        return cls._from_chunks(n, k, chunk, "I2_S")

    # -- views -------------------------------------------------------------------------------
    def ternary(self, rows: slice | None = None) -> np.ndarray:
        """t int8 [rows, K] (tests and export; never used by the kernels)."""
        rows = rows or slice(None)
        return ternary_from_planes(self.plus[rows], self.minus[rows], self.shape[1])

    def codes(self, rows: slice | None = None) -> np.ndarray:
        return (self.ternary(rows) + 1).astype(np.uint8)

    def dequantize(self) -> np.ndarray:
        return self.ternary().astype(np.float32) * self.scale[:, None]

    @property
    def nbytes(self) -> int:
        return self.plus.nbytes + self.minus.nbytes + self.scale.nbytes

    # -- plug-in protocol --------------------------------------------------------------------
    def prepare(self, backend: str) -> "TernaryWeight":
        from ..kernels import ternary as tk
        return replace(self, backend=tk.backend_name(backend))

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """y[T, N] = act_quant(x[T, K]) @ W.T, integer sums, rescaled (module docstring)."""
        from ..kernels import ternary as tk
        return tk.ternary_matmul(self, x, self.backend)


# bitnet.cpp's I2_S as the GGUF reader sees it: 4 weights per byte, plus the 32-byte scale tail the
# reader adds. Id 36 means I2_S only when general.architecture is bitnet-b1.58 (upstream: IQ4_NL_4_4).
I2_S = QType("I2_S", 36, 4, 1)

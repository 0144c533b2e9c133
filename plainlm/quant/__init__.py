"""Quantized block formats of ggml, decoded and encoded with numpy.

Every format stores a row of `K` weights as `K / block` blocks of `bytes` bytes each; a 2-D weight
of shape [N, K] (N output rows, K inputs) is therefore a uint8 array [N, K / block * bytes].
Layouts follow ggml's `ggml-common.h` / `ggml-quants.c` (see shared/specs/formats.md §3.2):

  Q8_0  (32 w, 34 B): d f16 | qs i8[32]                      x = qs*d
  Q4_0  (32 w, 18 B): d f16 | qs u8[16]                      x[j] = (lo-8)*d, x[j+16] = (hi-8)*d
  Q4_1  (32 w, 20 B): d f16 | m f16 | qs u8[16]              x[j] = lo*d + m, x[j+16] = hi*d + m
  Q5_0  (32 w, 22 B): d f16 | qh u32 | qs u8[16]             5th bit of element j is bit j of qh; -16
  Q5_1  (32 w, 24 B): d f16 | m f16 | qh u32 | qs u8[16]     as Q5_0 without -16, then *d + m
  Q4_K (256 w, 144 B): d f16 | dmin f16 | scales u8[12] | qs u8[128]
  Q6_K (256 w, 210 B): ql u8[128] | qh u8[64] | scales i8[16] | d f16
  TQ1_0 (256 w, 54 B), TQ2_0 (256 w, 66 B): ternary, see plainlm/quant/ternary.py

Low nibbles hold the first half of a 32-block, high nibbles the second half (not interleaved).
These functions are the reference ("ref") decoders; tests check them against hand-built blocks
and against the `gguf` package's own dequantization.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QType:
    name: str
    id: int
    block: int   # weights per block
    bytes: int   # bytes per block


# ggml_type ids (ggml.h); only the ones plainlm can decode are listed.
F32 = QType("F32", 0, 1, 4)
F16 = QType("F16", 1, 1, 2)
Q4_0 = QType("Q4_0", 2, 32, 18)
Q4_1 = QType("Q4_1", 3, 32, 20)
Q5_0 = QType("Q5_0", 6, 32, 22)
Q5_1 = QType("Q5_1", 7, 32, 24)
Q8_0 = QType("Q8_0", 8, 32, 34)
Q4_K = QType("Q4_K", 12, 256, 144)
Q6_K = QType("Q6_K", 14, 256, 210)
BF16 = QType("BF16", 30, 1, 2)
TQ1_0 = QType("TQ1_0", 34, 256, 54)
TQ2_0 = QType("TQ2_0", 35, 256, 66)

QTYPES = {t.id: t for t in (F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K, BF16, TQ1_0, TQ2_0)}
BY_NAME = {t.name: t for t in QTYPES.values()}

# Names of ggml types we know of but cannot decode, for clear error messages.
KNOWN_UNSUPPORTED = {9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 13: "Q5_K", 15: "Q8_K", 16: "IQ2_XXS",
                     17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
                     22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64",
                     28: "F64", 29: "IQ1_M", 39: "MXFP4"}


def row_bytes(qt: QType, k: int) -> int:
    """Bytes of one row of k weights."""
    if k % qt.block:
        raise ValueError(f"{qt.name}: row length {k} is not a multiple of the block size {qt.block}")
    return k // qt.block * qt.bytes


def _f16(a: np.ndarray) -> np.ndarray:
    """uint8[..., 2] -> float32[...] (IEEE half, little endian)."""
    return np.ascontiguousarray(a).view(np.float16)[..., 0].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# decoders: raw uint8 [N, row_bytes] -> float32 [N, K]
# ---------------------------------------------------------------------------------------------

def _blocks(raw: np.ndarray, qt: QType) -> np.ndarray:
    raw = np.asarray(raw, dtype=np.uint8)
    n = raw.shape[0] if raw.ndim > 1 else 1
    return raw.reshape(n, -1, qt.bytes)                           # [N, nb, bytes]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """u8[..., 16] -> u8[..., 32]: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _dq_q8_0(b):                                                  # b [N, nb, 34]
    d = _f16(b[..., 0:2])                                         # [N, nb]
    q = b[..., 2:34].view(np.int8).astype(np.float32)             # [N, nb, 32]
    return q * d[..., None]


def _dq_q4_0(b):
    d = _f16(b[..., 0:2])
    q = _nibbles(b[..., 2:18]).astype(np.float32) - 8.0
    return q * d[..., None]


def _dq_q4_1(b):
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    q = _nibbles(b[..., 4:20]).astype(np.float32)
    return q * d[..., None] + m[..., None]


def _qh_bits(qh4: np.ndarray) -> np.ndarray:
    """u8[..., 4] (a little-endian uint32) -> u8[..., 32]: bit j of the word."""
    word = np.ascontiguousarray(qh4).view("<u4")[..., 0]          # [...]
    return ((word[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _dq_q5_0(b):
    d = _f16(b[..., 0:2])
    q = (_nibbles(b[..., 6:22]) | (_qh_bits(b[..., 2:6]) << 4)).astype(np.float32) - 16.0
    return q * d[..., None]


def _dq_q5_1(b):
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    q = (_nibbles(b[..., 8:24]) | (_qh_bits(b[..., 4:8]) << 4)).astype(np.float32)
    return q * d[..., None] + m[..., None]


def q4k_scales(s: np.ndarray):
    """scales u8[..., 12] -> (sc u8[..., 8], m u8[..., 8]): the 6-bit sub-block scales and mins."""
    s = s.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def _dq_q4_k(b):                                                  # b [N, nb, 144]
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = q4k_scales(b[..., 4:16])                             # [N, nb, 8]
    qs = b[..., 16:144].reshape(b.shape[:-1] + (4, 32))           # [N, nb, 4 chunks, 32]
    q = np.stack([qs & 0xF, qs >> 4], axis=-2)                    # [N, nb, 4, 2, 32]
    q = q.reshape(b.shape[:-1] + (8, 32)).astype(np.float32)      # sub-block 2c = lo, 2c+1 = hi
    scale = (d[..., None] * sc)[..., None]                        # [N, nb, 8, 1]
    mins = (dmin[..., None] * mn)[..., None]
    return (q * scale - mins).reshape(b.shape[:-1] + (256,))


def _dq_q6_k(b):                                                  # b [N, nb, 210]
    ql = b[..., 0:128].reshape(b.shape[:-1] + (2, 64))            # two halves of 128 weights
    qh = b[..., 128:192].reshape(b.shape[:-1] + (2, 32))
    sc = b[..., 192:208].view(np.int8).astype(np.float32).reshape(b.shape[:-1] + (2, 8))
    d = _f16(b[..., 208:210])
    q1 = (ql[..., 0:32] & 0xF) | (((qh >> 0) & 3) << 4)
    q2 = (ql[..., 32:64] & 0xF) | (((qh >> 2) & 3) << 4)
    q3 = (ql[..., 0:32] >> 4) | (((qh >> 4) & 3) << 4)
    q4 = (ql[..., 32:64] >> 4) | (((qh >> 6) & 3) << 4)
    q = np.stack([q1, q2, q3, q4], axis=-2).astype(np.float32) - 32.0   # [N, nb, 2, 4, 32]
    # In a half, element l (<32) of group g (q1..q4) uses scale sc[l//16 + 2g]; viewing [g, l] =
    # [4, 32] as [8, 16] makes the flat group index 2g + l//16, which is exactly that scale.
    q = q.reshape(b.shape[:-1] + (2, 8, 16))
    out = q * sc[..., None] * d[..., None, None, None]
    return out.reshape(b.shape[:-1] + (256,))


def dequantize(raw: np.ndarray, qt: QType, shape: tuple[int, ...]) -> np.ndarray:
    """Decode raw bytes of a tensor to float32 of `shape` (numpy order, last dim contiguous)."""
    raw = np.asarray(raw)
    if qt is F32:
        return raw.reshape(-1).view(np.float32).reshape(shape).astype(np.float32, copy=False)
    if qt is F16:
        return raw.reshape(-1).view(np.float16).reshape(shape).astype(np.float32)
    if qt is BF16:
        u = raw.reshape(-1).view(np.uint16).astype(np.uint32) << 16
        return u.view(np.float32).reshape(shape)
    if qt in (TQ1_0, TQ2_0):
        from .ternary import dequantize_tq
        return dequantize_tq(raw, qt, shape)
    fn = {Q8_0: _dq_q8_0, Q4_0: _dq_q4_0, Q4_1: _dq_q4_1, Q5_0: _dq_q5_0, Q5_1: _dq_q5_1,
          Q4_K: _dq_q4_k, Q6_K: _dq_q6_k}.get(qt)
    if fn is None:
        raise NotImplementedError(f"no decoder for {qt.name}")
    return fn(_blocks(raw.reshape(-1), qt)).reshape(shape)


# ---------------------------------------------------------------------------------------------
# encoders (reference quantizers of ggml-quants.c), float32 [N, K] -> uint8 [N, row_bytes]
# ---------------------------------------------------------------------------------------------

def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(x.shape + (2,))


def quantize(x: np.ndarray, qt: QType) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    shape = x.shape
    if qt is F32:
        return x.reshape(shape[0] if x.ndim > 1 else 1, -1).view(np.uint8).copy()
    if qt is F16:
        return x.astype(np.float16).reshape(shape[0] if x.ndim > 1 else 1, -1).view(np.uint8).copy()
    n = shape[0] if x.ndim > 1 else 1
    b = x.reshape(n, -1, 32)                                      # [N, nb, 32]
    if qt is Q8_0:
        amax = np.abs(b).max(-1)
        d = amax / 127.0
        inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1), 0.0)
        # ggml-quants.c: `const float x0 = x*id; qs = roundf(x0)`. The product must be rounded to
        # float32 first (a float64 product can fall on the other side of a .5 tie); the rounding
        # itself is done in float64, where |x0| + 0.5 is exact (in float32 0.49999997 + 0.5 == 1).
        v = (b * inv[..., None]).astype(np.float32).astype(np.float64)
        q = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int8)   # C roundf: half away from 0
        out = np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=-1)
    elif qt is Q4_0:
        idx = np.abs(b).argmax(-1)
        mx = np.take_along_axis(b, idx[..., None], -1)[..., 0]
        d = mx / -8.0
        inv = np.where(d != 0, 1.0 / np.where(d != 0, d, 1), 0.0)
        q = np.minimum(15, (b * inv[..., None] + 8.5).astype(np.int8)).astype(np.uint8)
        qs = q[..., :16] | (q[..., 16:] << 4)
        out = np.concatenate([_f16_bytes(d), qs], axis=-1)
    elif qt is Q4_1:
        mn, mx = b.min(-1), b.max(-1)
        d = (mx - mn) / 15.0
        inv = np.where(d != 0, 1.0 / np.where(d != 0, d, 1), 0.0)
        q = np.minimum(15, ((b - mn[..., None]) * inv[..., None] + 0.5).astype(np.int8)).astype(np.uint8)
        qs = q[..., :16] | (q[..., 16:] << 4)
        out = np.concatenate([_f16_bytes(d), _f16_bytes(mn), qs], axis=-1)
    else:
        raise NotImplementedError(f"no encoder for {qt.name}")
    return out.reshape(n, -1)


@dataclass
class QTensor:
    """A weight kept in its file's block form: `data` is uint8 [N, row_bytes(K)] for shape (N, K)
    (1-D tensors: shape (K,), data [1, row_bytes])."""
    qtype: QType
    shape: tuple[int, ...]
    data: np.ndarray

    def dequantize(self) -> np.ndarray:
        return dequantize(self.data, self.qtype, self.shape)

    def rows(self, idx) -> np.ndarray:
        """float32 [len(idx), K]: selected rows decoded (embedding lookup)."""
        idx = np.asarray(idx)
        return dequantize(self.data[idx], self.qtype, (len(idx), self.shape[-1]))

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @classmethod
    def from_float(cls, x: np.ndarray, qt: QType) -> "QTensor":
        x = np.asarray(x, np.float32)
        return cls(qt, x.shape, quantize(x if x.ndim > 1 else x[None], qt))

"""Integer-only inference (in the spirit of I-BERT): every operation of the forward pass on integers.

Loading converts the weights once (float math allowed there, like any quantizer); from then on the
forward pass uses only int8/int32/int64 additions, multiplications, shifts, comparisons and integer
divisions — numpy integer ops and numba kernels with integer types only — so the logits are the
same bits on every run, thread count and machine. Floats appear once more at the very end:
`forward` returns logits / 2^16 as float32 for sampling (`forward_int` returns the int64 logits).

Number formats
    activation  int64 "Q.16": the value v is stored as round(v * 2^16)               (FRAC = 16)
    weight      int8 q in [-127, 127] per 32-block, block scale s (int, < 2^15) and one exponent e
                per row: w = q * s * 2^-e. Q4_1 / Q8_0 / any block type is dequantized and
                requantized per block (absmax / 127), which is near-lossless for 4-bit blocks.
    matmul in   int8 per 32-block as well: a token's Q.16 row is shifted right by r (so that
                |z| < 2^20), then each block gets an integer scale sx = ceil(max|z| / 127) < 2^14
                and q = round(z / sx): x = q * sx * 2^r * 2^-16.
    matmul      per block an int32 dot of 32 int8 x int8 products (|dot| < 2^19), times the int64
                product of the two block scales (< 2^29), summed over blocks in int64 (< 2^60 for
                K <= MAX_K = 131072; proved in verify/proofs.py), then shifted to Q.16.
    RMSNorm     x shifted to 15 bits, sum of squares in int64, integer square root (Newton),
                one integer division per element; gains in Q.16; eps in Q.32.
    RoPE        cos/sin tables in Q.24 (computed once per position from the config: constants).
    softmax     scores q.k in Q.32 -> Q.16, / sqrt(Dh) by a Q.16 constant, minus the row max,
                clipped at -16; exp by range reduction (x = -(n + f) ln 2, 2^-f by a degree-7
                polynomial in Q.30, then >> n): `iexp`, error <= 3 units of 2^-30 over its whole
                input domain (every one of the 2^20 + 1 inputs checked: verify/proofs.py);
                weights p = (E << 20) // sum(E) in Q.20; output sum p * v in int64.
    SiLU        x * sigmoid(x), sigmoid from iexp(-|x|) and one integer division (Q.30).

Accuracy: see docs/verify.md (perplexity on the licence text within ~1% of the float path).
Supported: the llama family (SwiGLU MLP, RoPE, GQA) — SmolLM2, Llama, Qwen-style.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange

from .cache import KVCache
from .config import ModelConfig

FRAC = 16               # activations are Q.16 in int64
QK = 32                 # block length of weights and activations
W_SCALE_BITS = 16       # weight block scales d, m: |.| < 2^16 (the largest of a row in [2^15, 2^16))
ACT_BITS = 20           # |z| < 2^20 before per-block int8 quantization -> sx <= ceil(2^20/127) < 2^14
MAX_K = 131072          # the longest matmul input (row length) the integer mode accepts
TRIG = 24               # RoPE tables in Q.24
EXP_OUT = 30            # iexp output: Q.30
EXP_MIN = -16 << FRAC   # iexp input domain: [-16, 0] in Q.16 (2^20 + 1 values)
PROB = 20               # attention weights in Q.20
INV_LN2_Q30 = 1549082005          # round(2^30 / ln 2)
# 2^-f on [0, 1): degree-7 polynomial (Chebyshev-node interpolation, numpy.polyfit on the 8 nodes
# 0.5 + 0.5 cos((2k+1) pi / 16)) with coefficients rounded to Q.30, lowest degree first.
EXP2_POLY_Q30 = (1073741824, -744261114, 257941162, -59596389, 10324635, -1425708, 158122, -11619)


class IntegerModeError(ValueError):
    pass


# ------------------------------------------------------------------------------------------------
# integer helpers (numpy, vectorized; all exact integer arithmetic)
# ------------------------------------------------------------------------------------------------

def rshift_round(v: np.ndarray, s) -> np.ndarray:
    """round(v / 2^s) (half up) for s >= 0; v * 2^-s for s < 0. int64 in, int64 out."""
    v = np.asarray(v, np.int64)
    s = np.asarray(s, np.int64)
    pos = np.maximum(s, 0)
    half = np.where(pos > 0, np.left_shift(np.int64(1), np.maximum(pos - 1, 0)), 0)
    right = np.right_shift(v + half, pos)
    return np.where(s >= 0, right, np.left_shift(v, np.maximum(-s, 0)))


def bit_length(a: np.ndarray) -> np.ndarray:
    """Bits needed for |a| (0 for 0), elementwise, by comparisons only."""
    a = np.abs(np.asarray(a, np.int64))
    n = np.zeros(a.shape, np.int64)
    for k in (32, 16, 8, 4, 2, 1):                 # binary search: n = number of halvings to 0
        big = a >= (np.int64(1) << k)
        n += np.where(big, k, 0)
        a = np.where(big, a >> k, a)
    return n + (a > 0)


def isqrt(n: np.ndarray) -> np.ndarray:
    """floor(sqrt(n)) of int64 n >= 0, elementwise (Newton's method from above)."""
    n = np.asarray(n, np.int64)
    if np.any(n < 0):
        raise IntegerModeError("isqrt of a negative number")
    x = np.left_shift(np.int64(1), (bit_length(n) + 1) // 2)      # 2^ceil(bits/2) >= sqrt(n)
    x = np.where(n == 0, 0, x)
    while True:
        safe = np.where(x == 0, 1, x)
        y = np.where(x == 0, 0, (x + n // safe) // 2)
        done = y >= x
        if np.all(done):
            return x
        x = np.where(done, x, y)


def iexp(d: np.ndarray) -> np.ndarray:
    """exp(d / 2^16) * 2^30 for int64 d <= 0 (Q.16 in, Q.30 out); d < -16 gives 0.

    exp(d) = 2^-(d_abs / ln 2) = 2^-n * 2^-f with n integer, f in [0, 1): t = |d| * (2^30 / ln 2)
    is Q.46, n = t >> 46, f = t's fraction; 2^-f by Horner in Q.30; then round(P(f) / 2^n).
    """
    d = np.asarray(d, np.int64)
    inside = d >= EXP_MIN
    t = np.where(inside, -d, 0) * np.int64(INV_LN2_Q30)                  # Q.46, < 2^51
    n = np.right_shift(t, 46)                                            # 0..23
    f = np.right_shift(np.bitwise_and(t, (np.int64(1) << 46) - 1), 16)   # Q.30 in [0, 2^30)
    c = EXP2_POLY_Q30
    acc = np.full(d.shape, c[-1], np.int64)
    for k in range(len(c) - 2, -1, -1):
        acc = c[k] + rshift_round(acc * f, 30)
    return np.where(inside, rshift_round(acc, n), 0)


def isigmoid(x: np.ndarray) -> np.ndarray:
    """sigmoid(x / 2^16) * 2^30 (Q.16 in, Q.30 out), from iexp(-|x|) and one integer division."""
    x = np.asarray(x, np.int64)
    e = iexp(-np.abs(x))                                                 # exp(-|x|) in Q.30
    one = np.int64(1) << 30
    pos = ((one << 30) + (one + e) // 2) // (one + e)                    # 1 / (1 + e^-|x|)
    return np.where(x >= 0, pos, one - pos)


def isilu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), Q.16 in and out. Beyond |x| > 16 it is x (x > 0) or 0 (error < 2e-6)."""
    x = np.asarray(x, np.int64)
    big = np.abs(x) > (16 << FRAC)
    xs = np.where(big, 0, x)
    y = rshift_round(xs * isigmoid(xs), 30)
    return np.where(big, np.where(x > 0, x, 0), y)


def quantize_act(y: np.ndarray):
    """Q.16 rows y[T, K] -> (q int8 [T, K], sx int32 [T, K/32], sum of q per block int32 [T, K/32],
    r int32 [T]): y ~ q * sx * 2^r."""
    y = np.asarray(y, np.int64)
    T, K = y.shape
    r = np.maximum(bit_length(np.abs(y).max(axis=1)) - ACT_BITS, 0)      # [T]
    z = rshift_round(y, r[:, None]).reshape(T, K // QK, QK)              # |z| <= 2^20
    m = np.abs(z).max(axis=2)                                            # [T, nb]
    sx = np.maximum((m + 126) // 127, 1)                                 # ceil(m / 127), >= 1
    q = (2 * z + sx[..., None]) // (2 * sx[..., None])                   # round(z / sx), |q| <= 127
    qsum = q.sum(axis=2)                                                 # [T, nb], for the m term
    return q.reshape(T, K).astype(np.int8), sx.astype(np.int32), qsum.astype(np.int32), r.astype(np.int32)


# ------------------------------------------------------------------------------------------------
# the integer matmul (numba, integer types only; each output by one thread, fixed order)
# ------------------------------------------------------------------------------------------------

@njit(parallel=True, cache=True, nogil=True)
def _qmatmul(xq, xs, xsum, xr, wq, wd, wm, we, out):
    """out[t, n] (Q.16) = sum over blocks b of xs[t,b] * (wd[n,b] * (wq . xq)_b + wm[n,b] * xsum[t,b]),
    shifted by we[n] - xr[t]. Integer types only."""
    T, K = xq.shape
    N = wq.shape[0]
    nb = K // 32
    for n in prange(N):
        for t in range(T):
            tot = np.int64(0)
            for b in range(nb):
                acc = np.int32(0)
                o = b * 32
                for j in range(32):
                    acc += np.int32(xq[t, o + j]) * np.int32(wq[n, o + j])
                blk = np.int64(wd[n, b]) * np.int64(acc) + np.int64(wm[n, b]) * np.int64(xsum[t, b])
                tot += np.int64(xs[t, b]) * blk
            sh = np.int64(we[n]) - np.int64(xr[t])          # Q.16 out: shift right by we - xr
            if sh > 0:
                out[t, n] = (tot + (np.int64(1) << (sh - 1))) >> sh
            else:
                out[t, n] = tot << (-sh)


def qmatmul_numpy(xq, xs, xsum, xr, wq, wd, wm, we) -> np.ndarray:
    """numpy twin of _qmatmul (same integers, any summation order gives the same exact result)."""
    T, K = xq.shape
    N, nb = wq.shape[0], K // QK
    x = xq.astype(np.int64).reshape(T, nb, QK)
    w = wq.astype(np.int64).reshape(N, nb, QK)
    dots = np.einsum("tbj,nbj->tnb", x, w)                                   # exact int64
    blk = wd[None].astype(np.int64) * dots + wm[None].astype(np.int64) * xsum[:, None, :]
    tot = (xs[:, None, :].astype(np.int64) * blk).sum(-1)                     # [T, N]
    return rshift_round(tot, we[None, :].astype(np.int64) - xr[:, None].astype(np.int64))


def _row_exponent(mx: np.ndarray) -> np.ndarray:
    """Per row, e such that the largest scale * 2^e lies in [2^(W-1), 2^W)."""
    return np.where(mx > 0, W_SCALE_BITS - 1 - np.floor(np.log2(np.where(mx > 0, mx, 1))), 0).astype(np.int64)


@dataclass
class IntWeight:
    """W[N, K]: block b of row n is  w = q * d + m  with  d = wd[n,b] * 2^-e[n], m = wm[n,b] * 2^-e[n].

    q int8 [N, K] (Q8_0: the file's int8; Q4_1: the file's nibbles 0..15; Q4_0: nibble - 8; other
    types: absmax requantization to [-127, 127] with m = 0); wd, wm int32 [N, K/32], |.| < 2^16;
    e int32 [N]. For Q8_0/Q4_0/Q4_1 the file's blocks are kept exactly; only the f16 scales are
    rounded to 16-bit mantissas with one exponent per row.
    """
    q: np.ndarray
    wd: np.ndarray
    wm: np.ndarray
    e: np.ndarray

    def __post_init__(self):
        self._emin = int(self.e.min()) if self.e.size else 0

    @property
    def shape(self):
        return self.q.shape

    @classmethod
    def _from_parts(cls, q, d, m) -> "IntWeight":
        N = q.shape[0]
        if q.shape[1] > MAX_K:
            raise IntegerModeError(f"row length {q.shape[1]} exceeds the integer mode's MAX_K = {MAX_K}")
        e = _row_exponent(np.maximum(np.abs(d).max(1), np.abs(m).max(1)))
        lim = 2 ** W_SCALE_BITS - 1
        wd = np.clip(np.rint(d * 2.0 ** e[:, None]), -lim, lim)
        wm = np.clip(np.rint(m * 2.0 ** e[:, None]), -lim, lim)
        return cls(np.ascontiguousarray(q.reshape(N, -1), np.int8), wd.astype(np.int32), wm.astype(np.int32),
                   e.astype(np.int32))

    @classmethod
    def from_qtensor(cls, t) -> "IntWeight":
        """The file's blocks as they are (Q8_0, Q4_0, Q4_1); anything else via from_float."""
        from .quant import Q4_0, Q4_1, Q8_0, QTensor
        if not isinstance(t, QTensor) or t.qtype not in (Q8_0, Q4_0, Q4_1):
            return cls.from_float(t.dequantize())
        N, K = t.shape
        b = np.asarray(t.data, np.uint8).reshape(N, K // QK, t.qtype.bytes)
        f16 = lambda a: np.ascontiguousarray(a).view(np.float16)[..., 0].astype(np.float64)
        nib = lambda qs: np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8)
        if t.qtype is Q8_0:
            return cls._from_parts(b[..., 2:34].view(np.int8), f16(b[..., 0:2]), np.zeros((N, K // QK)))
        if t.qtype is Q4_0:
            return cls._from_parts(nib(b[..., 2:18]) - 8, f16(b[..., 0:2]), np.zeros((N, K // QK)))
        return cls._from_parts(nib(b[..., 4:20]), f16(b[..., 0:2]), f16(b[..., 2:4]))

    @classmethod
    def from_float(cls, w: np.ndarray) -> "IntWeight":
        """Per-block absmax requantization (load time; the only float math of the integer mode)."""
        w = np.asarray(w, np.float64)
        N, K = w.shape
        if K % QK:
            raise IntegerModeError(f"row length {K} is not a multiple of {QK}")
        b = w.reshape(N, K // QK, QK)
        d = np.abs(b).max(-1) / 127.0                                       # [N, nb]
        e = _row_exponent(d.max(-1))
        step = np.rint(d * 2.0 ** e[:, None]) * 2.0 ** -e[:, None]          # the scale as stored
        q = np.where(step[..., None] > 0, np.rint(b / np.where(step > 0, step, 1)[..., None]), 0)
        return cls._from_parts(np.clip(q, -127, 127).astype(np.int8), step, np.zeros_like(step))

    def dequantize(self) -> np.ndarray:
        """float64 [N, K] of exactly what the integer kernels use (tests)."""
        N, K = self.q.shape
        q = self.q.astype(np.float64).reshape(N, K // QK, QK)
        w = (q * self.wd[..., None] + self.wm[..., None]) * 2.0 ** -self.e[:, None, None]
        return w.reshape(N, K)

    def matmul(self, y: np.ndarray, kernels: str = "numba") -> np.ndarray:
        """Q.16 y[T, K] -> Q.16 [T, N]."""
        xq, xs, xsum, xr = quantize_act(y)
        if int(xr.max()) > self._emin:     # would need a left shift of the sum: refused (proofs.py)
            raise IntegerModeError("activation too large for the integer matmul's output shift")
        if kernels == "numpy":
            return qmatmul_numpy(xq, xs, xsum, xr, self.q, self.wd, self.wm, self.e)
        out = np.empty((y.shape[0], self.q.shape[0]), np.int64)
        _qmatmul(xq, xs, xsum, xr, self.q, self.wd, self.wm, self.e, out)
        return out

    def rows_q16(self, ids) -> np.ndarray:
        """Rows `ids` as Q.16 (embedding lookup): (q * wd + wm) * 2^(16 - e), rounded."""
        ids = np.asarray(ids, np.int64)
        q = self.q[ids].astype(np.int64).reshape(len(ids), -1, QK)
        v = (q * self.wd[ids][..., None] + self.wm[ids][..., None]).reshape(len(ids), -1)
        return rshift_round(v, (self.e[ids] - FRAC)[:, None].astype(np.int64))


# ------------------------------------------------------------------------------------------------
# attention (numba): integer scores, integer softmax, integer weighted sum
# ------------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _iexp1(d):
    """Scalar twin of iexp (same operations), for the attention kernel."""
    if d < EXP_MIN:
        return np.int64(0)
    t = (-d) * np.int64(INV_LN2_Q30)
    n = t >> 46
    f = (t & ((np.int64(1) << 46) - 1)) >> 16
    acc = np.int64(EXP2_POLY_Q30[7])
    for k in range(6, -1, -1):
        acc = np.int64(EXP2_POLY_Q30[k]) + ((acc * f + (np.int64(1) << 29)) >> 30)
    if n > 0:
        return (acc + (np.int64(1) << (n - 1))) >> n
    return acc


@njit(parallel=True, cache=True, nogil=True)
def _attention(q, k, v, pos, isq, out):
    """q [T, H, Dh], k/v [Hkv, S, Dh] (Q.16, int64), pos [T]; isq = round(2^16 / sqrt(Dh)).
    out [T, H, Dh] Q.16."""
    T, H, Dh = q.shape
    Hkv = k.shape[0]
    g = H // Hkv
    for th in prange(T * H):
        t = th // H
        h = th % H
        kh = h // g
        n = pos[t] + 1
        z = np.empty(n, np.int64)
        zmax = np.int64(-(1 << 62))
        for j in range(n):
            s = np.int64(0)
            for i in range(Dh):
                s += q[t, h, i] * k[kh, j, i]                   # Q.32
            s = (s + (np.int64(1) << 15)) >> 16                 # Q.16
            s = (s * isq + (np.int64(1) << 15)) >> 16           # / sqrt(Dh)
            z[j] = s
            if s > zmax:
                zmax = s
        tot = np.int64(0)
        for j in range(n):
            z[j] = _iexp1(z[j] - zmax)                          # Q.30, the max one is exactly 2^30
            tot += z[j]
        for i in range(Dh):
            out[t, h, i] = 0
        for j in range(n):
            p = ((z[j] << PROB) + tot // 2) // tot              # Q.20
            if p != 0:
                for i in range(Dh):
                    out[t, h, i] += p * v[kh, j, i]
        for i in range(Dh):
            out[t, h, i] = (out[t, h, i] + (np.int64(1) << (PROB - 1))) >> PROB


def attention_numpy(q, k, v, pos, isq) -> np.ndarray:
    """numpy twin of _attention."""
    T, H, Dh = q.shape
    Hkv = k.shape[0]
    g = H // Hkv
    out = np.zeros((T, H, Dh), np.int64)
    for t in range(T):
        n = int(pos[t]) + 1
        for h in range(H):
            s = k[h // g, :n] @ q[t, h]                                       # Q.32, exact
            s = rshift_round(rshift_round(s, 16) * isq, 16)
            e = iexp(s - s.max())
            p = ((e << PROB) + e.sum() // 2) // e.sum()
            out[t, h] = rshift_round(p @ v[h // g, :n], PROB)
    return out


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------

def rope_tables_q24(pos: np.ndarray, dim: int, theta: float):
    """cos, sin [T, dim/2] in Q.24 (constants of the config and the position)."""
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    ang = np.asarray(pos, np.float64)[:, None] * inv[None, :]
    return (np.rint(np.cos(ang) * 2.0 ** TRIG).astype(np.int64),
            np.rint(np.sin(ang) * 2.0 ** TRIG).astype(np.int64))


def irmsnorm(x: np.ndarray, g: np.ndarray, eps_q32: int) -> np.ndarray:
    """RMSNorm of Q.16 rows x[T, D] with Q.16 gains g[D]; Q.16 out."""
    x = np.asarray(x, np.int64)
    D = x.shape[1]
    s = np.maximum(bit_length(np.abs(x).max(axis=1)) - 15, 0)[:, None]       # |x'| <= 2^15
    xs = rshift_round(x, s)
    ss = (xs * xs).sum(axis=1, keepdims=True)                                 # <= D * 2^30
    eps = rshift_round(np.int64(eps_q32) * D, 2 * s)                # eps * D in x'^2 = 2^(32-2s) units
    V = ((ss + eps) << 16) // D                                               # (mean + eps) * 2^16
    R = isqrt(V)                                                              # rms * 2^8
    num = xs * g[None, :] << 8
    return (2 * num + R) // (2 * R)


def _guard(layer: int, what: str, a: np.ndarray, bits: int) -> np.ndarray:
    """The runtime bounds the overflow proofs assume (verify/proofs.py): |a| < 2^bits."""
    if a.size and int(np.abs(a).max()) >= 1 << bits:
        raise IntegerModeError(f"layer {layer}: {what} beyond {2.0 ** (bits - FRAC):g} overflows "
                               "the integer mode's int64 products")
    return a


@dataclass
class IntegerModel:
    """The integer twin of a Model. forward(ids, pos, cache, slot, logits) like model.forward."""
    config: ModelConfig
    weights: dict                   # name -> IntWeight
    gains: dict                     # norm name -> int64 [D] Q.16
    eps_q32: int
    metadata: dict = field(default_factory=dict)
    source: str = ""
    hook: object = None
    is_integer: bool = True
    kernels: str = "numba"          # "numba" or "numpy": the same integers either way

    @classmethod
    def from_checkpoint(cls, ckpt) -> "IntegerModel":
        cfg = ckpt.config
        if cfg.arch != "llama" or cfg.act != "silu":
            raise IntegerModeError(f"integer mode runs the llama family (SwiGLU); this model is {cfg.arch}")
        if cfg.head_dim > 256:
            raise IntegerModeError(f"head_dim {cfg.head_dim} > 256 (the proved bound of the integer q.k)")
        weights, gains = {}, {}
        for name, w in ckpt.weights.items():
            if len(w.shape) == 1:
                gains[name] = np.rint(w.dequantize().astype(np.float64) * 2.0 ** FRAC).astype(np.int64).reshape(-1)
            elif name == "output" and w is ckpt.weights.get("token_embd"):
                continue
            else:
                weights[name] = IntWeight.from_qtensor(w)
        weights.setdefault("output", weights["token_embd"])
        for name, g in gains.items():
            if int(np.abs(g).max()) >= 1 << 31:
                raise IntegerModeError(f"norm gain {name} beyond 32768 (the proved RMSNorm bound)")
        return cls(cfg, weights, gains, int(round(cfg.norm_eps * 2.0 ** 32)), ckpt.metadata, ckpt.source)

    @classmethod
    def from_model(cls, m) -> "IntegerModel":
        """From a loaded Model whose weights can dequantize() (QTensor / TernaryWeight: ref backend)."""
        from .formats import Checkpoint
        from .quant import F32, QTensor
        w = {}
        for n, t in m.weights.items():
            if not hasattr(t, "dequantize"):
                raise IntegerModeError(f"weight {n} of the {m.backend.NAME} backend cannot be decoded; "
                                       "load the model with the ref backend or use IntegerModel.load(path)")
            w[n] = t
        for n, g in m.norms.items():
            w[n] = QTensor.from_float(np.asarray(g, np.float32).reshape(-1), F32)
        if m.weights.get("output") is m.weights.get("token_embd"):
            w["output"] = w["token_embd"]
        return cls.from_checkpoint(Checkpoint(m.config, w, m.metadata, m.source))

    @classmethod
    def load(cls, path: str) -> "IntegerModel":
        from .formats import load
        return cls.from_checkpoint(load(path))

    def new_cache(self, n_ctx: int | None = None, n_slots: int = 1) -> KVCache:
        n = min(n_ctx or self.config.context_length, self.config.context_length)
        return KVCache(self.config, n, n_slots, dtype=np.int64)

    # -- forward ----------------------------------------------------------------------------------
    def _attention_block(self, i, x, pos, slot, cache):
        cfg, W = self.config, self.weights
        T, H, Hkv, Dh = x.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        p = f"blk.{i}."
        q = W[p + "attn_q"].matmul(x, self.kernels).reshape(T, H, Dh)
        k = W[p + "attn_k"].matmul(x, self.kernels).reshape(T, Hkv, Dh)
        v = W[p + "attn_v"].matmul(x, self.kernels).reshape(T, Hkv, Dh)
        rot = cfg.rotary_dim
        c, s = self._rope_cs
        _guard(i, "v", v, 31)
        q, k = self._rope(_guard(i, "q", q, 27), c, s, rot), self._rope(_guard(i, "k", k, 27), c, s, rot)
        _guard(i, "roped q/k", q, 27), _guard(i, "roped q/k", k, 27)
        cache.k[i, slot, :, pos] = k
        cache.v[i, slot, :, pos] = v
        o = np.empty((T, H, Dh), np.int64)
        isq = int(round(2 ** 16 / math.sqrt(Dh)))
        for sl in np.unique(slot):
            t = np.nonzero(slot == sl)[0]
            n = int(pos[t].max()) + 1
            ot = np.empty((len(t), H, Dh), np.int64)
            args = (np.ascontiguousarray(q[t]), np.ascontiguousarray(cache.k[i, sl, :, :n]),
                    np.ascontiguousarray(cache.v[i, sl, :, :n]), pos[t], isq)
            if self.kernels == "numpy":
                ot = attention_numpy(*args)
            else:
                _attention(*args, ot)
            o[t] = ot
        return W[p + "attn_output"].matmul(o.reshape(T, H * Dh), self.kernels)

    @staticmethod
    def _rope(x, c, s, rot):
        h = rot // 2
        c, s = c[:, None, :], s[:, None, :]
        x1, x2 = x[..., :h], x[..., h:rot]
        out = x.copy()
        out[..., :h] = rshift_round(x1 * c - x2 * s, TRIG)
        out[..., h:rot] = rshift_round(x2 * c + x1 * s, TRIG)
        return out

    def _ffn_block(self, i, x):
        W = self.weights
        p = f"blk.{i}."
        g = W[p + "ffn_gate"].matmul(x, self.kernels)
        u = W[p + "ffn_up"].matmul(x, self.kernels)
        h = rshift_round(isilu(_guard(i, "ffn gate", g, 31)) * _guard(i, "ffn up", u, 31), FRAC)
        return W[p + "ffn_down"].matmul(h, self.kernels)

    def forward_int(self, ids, pos, cache: KVCache, slot=0, logits: str = "last") -> np.ndarray:
        """model.forward with integers: int64 Q.16 logits ([V], [T, V] or [B, V])."""
        from .model import check_tokens
        cfg = self.config
        ids, pos, slot = check_tokens(cfg, ids, pos, slot, cache)
        T = ids.shape[0]
        hook = self.hook or (lambda stage, layer, a: None)
        self._rope_cs = rope_tables_q24(pos, cfg.rotary_dim, cfg.rope_theta)   # once per call
        x = self.weights["token_embd"].rows_q16(ids)                      # [T, D] Q.16
        hook("embed", -1, x)
        G = self.gains
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            a = self._attention_block(i, irmsnorm(x, G[p + "attn_norm"], self.eps_q32), pos, slot, cache)
            hook("attn_out", i, a)
            x = x + a
            f = self._ffn_block(i, irmsnorm(x, G[p + "ffn_norm"], self.eps_q32))
            hook("mlp_out", i, f)
            x = x + f
        for s in np.unique(slot):
            cache.length[s] = max(int(cache.length[s]), int(pos[slot == s].max()) + 1)
        if logits == "last":
            sel = [T - 1]
        elif logits == "per_slot":
            _, first = np.unique(slot[::-1], return_index=True)
            sel = sorted(T - 1 - first)
        elif logits == "all":
            sel = slice(None)
        else:
            raise ValueError(f"logits must be 'last', 'all' or 'per_slot', not {logits!r}")
        out = self.weights["output"].matmul(irmsnorm(x[sel], G["output_norm"], self.eps_q32), self.kernels)
        hook("logits", -1, out)
        return out[0] if logits == "last" else out

    def forward(self, ids, pos, cache: KVCache, slot=0, logits: str = "last") -> np.ndarray:
        """forward_int, then logits / 2^16 as float32: the one float step, for sampling."""
        return (self.forward_int(ids, pos, cache, slot, logits) / 2.0 ** FRAC).astype(np.float32)


def load_integer_model(path: str) -> IntegerModel:
    return IntegerModel.load(path)

"""Compiled kernels (numba): the same names and signatures as ref.py, computed on the quantized blocks.

How the quantized products work (as in llama.cpp): the activations x[T, K] are quantized to int8
per 32-block (`quantize_act`: xq = round(x / dx), dx = max|x| / 127, plus sx = dx * sum(xq) for the
weights' min term), and each weight block is dotted with its activation block in integers:

    Q4_0  w = (q - 8) * d          block dot = d*dx * (q . xq)  -  8*d * sx
    Q4_1  w = q * d + m            block dot = d*dx * (q . xq)  +  m * sx
    Q8_0  w = q * d                block dot = d*dx * (q . xq)

The weights are never expanded: kernels read ggml's block bytes in place (the GGUF memory map;
`prepare` repacks nothing for these types), the f16 scales straight from the block. The integer
dot of a block is one AVX-512-VNNI instruction through the small SIMD vocabulary in _simd.py;
the loops around it are plain Python.

F16 and F32 weights use float kernels. Other block types (K-quants, Q5_x, ternary) fall back to
the reference kernels for that weight, with a one-time warning. Weights that are not QTensors carry
their own kernels (plug-in protocol, see ref.prepare).

Shapes: T tokens, K in, N out, nb = K/32 blocks, H/Hkv heads, Dh head dim, S cache rows.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.extending import intrinsic, overload

from . import ref
from . import _simd
from ._simd import (abs_i8, dpbusd, f16_at, fma_i, fma_v, hi_lo, hsum, load_f16, load_f32, load_i8,
                    load_q4, sign_i8, vzero)
from ..quant import F16, F32, Q4_0, Q4_1, Q8_0, QTensor

NAME = "fast"

if not _simd.available():
    raise ImportError("the fast kernels need an x86-64 CPU with AVX2, FMA, F16C and AVX-512 VNNI")

# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------

# kernel families; block layout (bytes per 32-block, offset of the quants in the block)
Q4_0_K, Q4_1_K, Q8_0_K, F16_K, F32_K = 0, 1, 2, 3, 4
_KIND = {Q4_0.id: Q4_0_K, Q4_1.id: Q4_1_K, Q8_0.id: Q8_0_K, F16.id: F16_K, F32.id: F32_K}


class Packed:
    """The fast backend's form of a weight [N, K]: `data` is the file's block bytes, unchanged
    (uint8 [N, row_bytes] for Q4_0/Q4_1/Q8_0), or uint16 / float32 [N, K] for F16 / F32."""
    __slots__ = ("qtype", "shape", "kind", "data")

    def __init__(self, qtype, shape, kind, data):
        self.qtype, self.shape, self.kind, self.data = qtype, tuple(shape), kind, data

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def __repr__(self):
        return f"Packed({self.qtype.name}, {self.shape})"


class RefWeight:
    """A weight whose block type the fast kernels lack: computed by the reference kernels."""
    def __init__(self, w: QTensor):
        self.w, self.shape, self.qtype = w, w.shape, w.qtype

    def matmul(self, x):
        return ref.matmul(self.w, x)


_warned: set = set()


def _readonly(a: np.ndarray) -> np.ndarray:
    # one numba specialization for memory-mapped (read-only) and copied (e.g. Q/K rows) weights
    a = a.view()
    a.flags.writeable = False
    return a


def prepare(w):
    """Backend form of a weight: Packed for the block types the kernels handle, RefWeight otherwise
    (warned once per type); objects that are not QTensors prepare themselves (plug-in protocol)."""
    if not isinstance(w, QTensor):
        return w.prepare(NAME)
    kind = _KIND.get(w.qtype.id)
    if kind is None or len(w.shape) != 2:
        if kind is None and w.qtype.name not in _warned:
            _warned.add(w.qtype.name)
            warnings.warn(f"plainlm fast backend: no kernel for {w.qtype.name} weights yet; "
                          f"using the reference kernels for them", stacklevel=2)
        return RefWeight(w)
    n, k = w.shape
    data = np.ascontiguousarray(w.data).reshape(n, -1)
    if kind == F16_K:
        data = data.view(np.uint16).reshape(n, k)
    elif kind == F32_K:
        data = data.view(np.float32).reshape(n, k)
    return Packed(w.qtype, w.shape, kind, _readonly(data))


# ------------------------------------------------------------------------------------------------
# activation quantization: two int8 levels per 32-block
# ------------------------------------------------------------------------------------------------
# ggml quantizes activations to one int8 per value (Q8_1). On this model that alone costs a mean KL
# of ~0.005 nats against float activations. plainlm keeps a second int8 level, the rounding residual:
#     x ~ (256 * q1 + q2) * d,   q1 = round(x / 256d), q2 = round(x/d - 256 q1),  d = max|x| / (127*256)
# so each block dot is two VNNI dots joined as 256*dot1 + dot2 (exact in int32): ~16-bit activations
# for one more instruction per block. Layout: xq[t, b*64 : b*64+32] = q1, [b*64+32 : b*64+64] = q2.

@njit(cache=True)
def _quantize_act(x, xq, dx, sx):
    T, K = x.shape
    for t in range(T):
        for b in range(K // 32):
            amax = np.float32(0.0)
            for i in range(b * 32, b * 32 + 32):
                amax = max(amax, abs(x[t, i]))
            d1 = amax / np.float32(127.0)
            d = d1 / np.float32(256.0)
            inv1 = np.float32(1.0) / d1 if d1 > 0 else np.float32(0.0)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            s = 0
            for i in range(32):
                v = x[t, b * 32 + i]
                q1 = np.int32(np.round(v * inv1))
                q2 = np.int32(np.round((v - np.float32(q1) * d1) * inv))
                q2 = min(127, max(-127, q2))
                xq[t, b * 64 + i] = q1
                xq[t, b * 64 + 32 + i] = q2
                s += q1 * 256 + q2
            dx[t, b] = d
            sx[t, b] = d * np.float32(s)


def quantize_act(x: np.ndarray, pad_to: int = 1):
    """x[T, K] float32 -> xq int8 [T', 2K], dx, sx float32 [T', K/32] (x ~ (256 q1 + q2) * dx per
    block, sx = block sum); T' = T rounded up to a multiple of pad_to (zero rows add nothing)."""
    T, K = x.shape
    Tp = -(-T // pad_to) * pad_to
    xq = np.zeros((Tp, 2 * K), np.int8)
    dx = np.zeros((Tp, K // 32), np.float32)
    sx = np.zeros((Tp, K // 32), np.float32)
    _quantize_act(x, xq, dx, sx)
    return xq, dx, sx


def dequantize_act(xq, dx) -> np.ndarray:
    """The values the quantized products see: float32 [T, K] (for tests)."""
    T = xq.shape[0]
    q = xq.reshape(T, -1, 2, 32).astype(np.float32)
    return ((q[:, :, 0] * 256 + q[:, :, 1]) * dx[:, :, None]).reshape(T, -1)


# ------------------------------------------------------------------------------------------------
# quantized products
# ------------------------------------------------------------------------------------------------

@njit(inline="always")
def _layout(kind):
    """(bytes per block, offset of the quants) of a kind."""
    if kind == Q4_0_K:
        return 18, 2
    if kind == Q4_1_K:
        return 20, 4
    return 34, 2


@njit(inline="always")
def _load_block(w, o, kind):
    """A weight block at byte o as (u, wv): u the unsigned operand of the dot (the nibbles, or |q|
    for Q8_0, whose sign then moves onto the activations), wv the raw bytes."""
    if kind == Q8_0_K:
        wv = load_i8(w, o)
        return abs_i8(wv), wv
    u = load_q4(w, o)
    return u, u


@njit(inline="always")
def _dot(u, wv, kind, xq, xo):
    """Integer dot (as 8 int32 lanes) of a loaded weight block with the two-level activation
    block at xq[xo : xo+64]."""
    x1 = load_i8(xq, xo)
    x2 = load_i8(xq, xo + 32)
    if kind == Q8_0_K:
        return hi_lo(dpbusd(u, sign_i8(x1, wv)), dpbusd(u, sign_i8(x2, wv)))
    return hi_lo(dpbusd(u, x1), dpbusd(u, x2))


@njit(inline="always")
def _min_term(w, o, kind, d):
    """The block's constant term m (w = q*d + m): Q4_1 stores it, Q4_0 has m = -8d, Q8_0 none."""
    if kind == Q4_1_K:
        return f16_at(w, o + 2)
    if kind == Q4_0_K:
        return np.float32(-8.0) * d
    return np.float32(0.0)


@njit(inline="always")
def _row_dot(w, r, kind, xq, dx, sx, t):
    """Row r of the weight (ggml blocks) dotted with token t's quantized activations."""
    rb = w.shape[1]
    nb = dx.shape[1]
    xo = t * xq.shape[1]
    bs, qo = _layout(kind)
    acc = vzero()
    s = np.float32(0.0)
    for b in range(nb):
        o = r * rb + b * bs
        d = f16_at(w, o)
        u, wv = _load_block(w, o + qo, kind)
        acc = fma_i(acc, _dot(u, wv, kind, xq, xo + b * 64), d * dx[t, b])
        s += _min_term(w, o, kind, d) * sx[t, b]
    return hsum(acc) + s


@njit(parallel=True, cache=True, fastmath=True)
def _matvec_q(w, kind, xq, dx, sx, y):
    """y[t, r] for a few tokens (decode): rows spread over threads, each row read once."""
    for r in prange(w.shape[0]):
        for t in range(y.shape[0]):
            y[t, r] = _row_dot(w, r, kind, xq, dx, sx, t)


@njit(parallel=True, cache=True, fastmath=True)
def _matvec_q2(w0, k0, w1, k1, xq, dx, sx, y0, y1):
    """Two products of the same input in one parallel region (gate, up)."""
    n0 = w0.shape[0]
    for r in prange(n0 + w1.shape[0]):
        for t in range(y0.shape[0]):
            if r < n0:
                y0[t, r] = _row_dot(w0, r, k0, xq, dx, sx, t)
            else:
                y1[t, r - n0] = _row_dot(w1, r - n0, k1, xq, dx, sx, t)


@njit(parallel=True, cache=True, fastmath=True)
def _matvec_q3(w0, k0, w1, k1, w2, k2, xq, dx, sx, y0, y1, y2):
    """Three products of the same input in one parallel region (q, k, v; gate, up)."""
    n0, n1 = w0.shape[0], w1.shape[0]
    for r in prange(n0 + n1 + w2.shape[0]):
        for t in range(y0.shape[0]):
            if r < n0:
                y0[t, r] = _row_dot(w0, r, k0, xq, dx, sx, t)
            elif r < n0 + n1:
                y1[t, r - n0] = _row_dot(w1, r - n0, k1, xq, dx, sx, t)
            else:
                y2[t, r - n0 - n1] = _row_dot(w2, r - n0 - n1, k2, xq, dx, sx, t)


@njit(parallel=True, cache=True, fastmath=True)
def _matmul_q(w, kind, xq, dx, sx, y):
    """y[T, N] for T a multiple of 4: each weight block is unpacked once for 4 tokens."""
    N, rb = w.shape
    T, K2 = xq.shape
    nb = K2 // 64
    bs, qo = _layout(kind)
    for r in prange(N):
        for t in range(0, T, 4):
            a0 = vzero()
            a1 = vzero()
            a2 = vzero()
            a3 = vzero()
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for b in range(nb):
                o = r * rb + b * bs
                d = f16_at(w, o)
                m = _min_term(w, o, kind, d)
                u, wv = _load_block(w, o + qo, kind)
                a0 = fma_i(a0, _dot(u, wv, kind, xq, t * K2 + b * 64), d * dx[t, b])
                a1 = fma_i(a1, _dot(u, wv, kind, xq, (t + 1) * K2 + b * 64), d * dx[t + 1, b])
                a2 = fma_i(a2, _dot(u, wv, kind, xq, (t + 2) * K2 + b * 64), d * dx[t + 2, b])
                a3 = fma_i(a3, _dot(u, wv, kind, xq, (t + 3) * K2 + b * 64), d * dx[t + 3, b])
                s0 += m * sx[t, b]
                s1 += m * sx[t + 1, b]
                s2 += m * sx[t + 2, b]
                s3 += m * sx[t + 3, b]
            y[t, r] = hsum(a0) + s0
            y[t + 1, r] = hsum(a1) + s1
            y[t + 2, r] = hsum(a2) + s2
            y[t + 3, r] = hsum(a3) + s3


def _load_w(w, o):
    """8 weights of a float row as F32x8 (float32 or f16 storage)."""


@overload(_load_w, inline="always")
def _load_w_impl(w, o):
    if w.dtype == types.float32:
        return lambda w, o: load_f32(w, o)
    return lambda w, o: load_f16(w, o)


def _w_at(w, r, i):
    """Weight w[r, i] of a float matrix as float32."""


@overload(_w_at, inline="always")
def _w_at_impl(w, r, i):
    if w.dtype == types.float32:
        return lambda w, r, i: w[r, i]
    return lambda w, r, i: f16_at(w, r * w.shape[1] + i)


@njit(parallel=True, cache=True, fastmath=True)
def _matmul_f(w, x, y):
    """y[T, N] = x[T, K] @ W[N, K].T for float32 or f16 (uint16) weights, 8 lanes at a time."""
    N, K = w.shape
    T = x.shape[0]
    K8 = K - K % 8
    for r in prange(N):
        for t in range(T):
            acc = vzero()
            for i in range(0, K8, 8):
                acc = fma_v(acc, _load_w(w, r * K + i), load_f32(x, t * K + i))
            s = hsum(acc)
            for i in range(K8, K):                 # the tail of a row not a multiple of 8
                s += _w_at(w, r, i) * x[t, i]
            y[t, r] = s


def matmul(w, x: np.ndarray) -> np.ndarray:
    """y[T, N] = x[T, K] @ W[N, K].T."""
    if not isinstance(w, Packed):
        return w.matmul(x)
    x = np.ascontiguousarray(x, np.float32)
    T = x.shape[0]
    n = w.shape[0]
    if w.kind >= F16_K:
        y = np.empty((T, n), np.float32)
        _matmul_f(w.data, x, y)
        return y
    if T <= 2:
        xq, dx, sx = quantize_act(x)
        y = np.empty((T, n), np.float32)
        _matvec_q(w.data, w.kind, xq, dx, sx, y)
        return y
    xq, dx, sx = quantize_act(x, pad_to=4)
    y = np.empty((xq.shape[0], n), np.float32)
    _matmul_q(w.data, w.kind, xq, dx, sx, y)
    return y[:T]


# ------------------------------------------------------------------------------------------------
# embedding, norms, rope, activations
# ------------------------------------------------------------------------------------------------

def embed(w, ids: np.ndarray) -> np.ndarray:
    """x[T, D] = rows `ids` of the embedding table (decoded from their blocks)."""
    ids = np.asarray(ids, np.int64)
    if isinstance(w, Packed):
        return ref.embed(QTensor(w.qtype, w.shape, w.data), ids)
    if isinstance(w, RefWeight):
        return ref.embed(w.w, ids)
    return ref.embed(w, ids)


def vector(w) -> np.ndarray:
    return ref.vector(w)


@njit(cache=True, fastmath=True)
def _rmsnorm(x, g, eps, out):
    T, D = x.shape
    for t in range(T):
        ss = np.float32(0.0)
        for i in range(D):
            ss += x[t, i] * x[t, i]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(D) + eps)
        for i in range(D):
            out[t, i] = x[t, i] * inv * g[i]


def rmsnorm(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    """x[T, D] / sqrt(mean(x^2) + eps) * g[D]."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty_like(x)
    _rmsnorm(x, np.ascontiguousarray(g, np.float32), np.float32(eps), out)
    return out


@njit(cache=True, fastmath=True)
def _rope(x, pos, inv, out):
    """out = x rotated; inv[rot/2] the inverse frequencies (as the reference computes them)."""
    T, H, Dh = x.shape
    h2 = inv.shape[0]
    for t in range(T):
        for i in range(h2):
            ang = np.float32(pos[t]) * inv[i]
            c = np.float32(np.cos(ang))
            s = np.float32(np.sin(ang))
            for h in range(H):
                x1 = x[t, h, i]
                x2 = x[t, h, i + h2]
                out[t, h, i] = x1 * c - x2 * s
                out[t, h, i + h2] = x2 * c + x1 * s
        for h in range(H):
            for i in range(2 * h2, Dh):
                out[t, h, i] = x[t, h, i]


_INV = {}


def inv_freq(theta: float, rot: int) -> np.ndarray:
    """theta^(-2i/rot), i < rot/2, float32, computed exactly as ref.rope_tables does."""
    key = (float(theta), int(rot))
    if key not in _INV:
        _INV[key] = (1.0 / (theta ** (np.arange(0, rot, 2, dtype=np.float32) / rot))).astype(np.float32)
    return _INV[key]


def rope(x: np.ndarray, pos: np.ndarray, theta: float, rot: int) -> np.ndarray:
    """Rotate pairs (x[i], x[i + rot/2]) of each head by pos*theta_i (NEOX). x[T, H, Dh]."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty_like(x)
    _rope(x, np.ascontiguousarray(pos, np.int64), inv_freq(theta, rot), out)
    return out


@njit(cache=True, fastmath=True)
def _swiglu(g, u, out):
    T, F = g.shape
    for t in range(T):
        for i in range(F):
            out[t, i] = g[t, i] / (np.float32(1.0) + np.exp(-g[t, i])) * u[t, i]


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, both [T, F]."""
    g = np.ascontiguousarray(gate, np.float32)
    out = np.empty_like(g)
    _swiglu(g, np.ascontiguousarray(up, np.float32), out)
    return out


@njit(cache=True, fastmath=True)
def _relu2_glu(g, u, out):
    T, F = g.shape
    for t in range(T):
        for i in range(F):
            r = max(g[t, i], np.float32(0.0))
            out[t, i] = r * r * u[t, i]


def relu2_glu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """relu(gate)^2 * up (BitNet's gated FFN)."""
    g = np.ascontiguousarray(gate, np.float32)
    out = np.empty_like(g)
    _relu2_glu(g, np.ascontiguousarray(up, np.float32), out)
    return out


# ------------------------------------------------------------------------------------------------
# attention over one sequence's cache
# ------------------------------------------------------------------------------------------------

@njit(inline="always")
def _attend_one(qh, kk, vv, n, sc, oh):
    """One query head over the first n rows of its kv head: qh[Dh], kk/vv [S, Dh], scratch sc[>= n],
    out oh[Dh]. Scores, softmax, weighted sum of values."""
    Dh = qh.shape[0]
    scale = np.float32(1.0 / math.sqrt(Dh))
    mx = np.float32(-np.inf)
    for j in range(n):
        s = np.float32(0.0)
        for i in range(Dh):
            s += qh[i] * kk[j, i]
        s *= scale
        sc[j] = s
        mx = max(mx, s)
    tot = np.float32(0.0)
    for j in range(n):
        e = np.exp(sc[j] - mx)
        sc[j] = e
        tot += e
    for i in range(Dh):
        oh[i] = 0.0
    inv = np.float32(1.0) / tot if tot > 0 else np.float32(0.0)
    for j in range(n):
        p = sc[j] * inv
        for i in range(Dh):
            oh[i] += p * vv[j, i]


@njit(parallel=True, cache=True, fastmath=True)
def _attention_par(q, k, v, nvis, out):
    """q[T, H, Dh]; k, v [Hkv, S, Dh] (C-contiguous); token t sees rows 0..nvis[t]-1."""
    T, H, Dh = q.shape
    g = H // k.shape[0]
    for th in prange(T * H):
        t, h = th // H, th % H
        sc = np.empty(max(1, nvis[t]), np.float32)
        _attend_one(q[t, h], k[h // g], v[h // g], nvis[t], sc, out[t, h])


@njit(cache=True, fastmath=True)
def _attention_ser(q, k, v, nvis, out):
    T, H, Dh = q.shape
    g = H // k.shape[0]
    sc = np.empty(max(1, k.shape[1]), np.float32)
    for t in range(T):
        for h in range(H):
            _attend_one(q[t, h], k[h // g], v[h // g], nvis[t], sc, out[t, h])


def _as_rows(a: np.ndarray) -> np.ndarray:
    """[Hkv, n, Dh] view of a cache -> a C-contiguous array over the same memory.

    The model passes cache.k[i, s, :, :n], whose head stride is the full cache length: a
    non-contiguous view that numba would index with generic strides. Viewed as [Hkv, S_full, Dh]
    the memory is C-contiguous; kernels only read its first n rows per head."""
    if a.flags.c_contiguous:
        return a
    hs, rs, es = a.strides
    if a.dtype == np.float32 and es == 4 and rs == 4 * a.shape[2] and hs % rs == 0 and hs >= rs * a.shape[1]:
        return np.lib.stride_tricks.as_strided(a, (a.shape[0], hs // rs, a.shape[2]), a.strides, writeable=False)
    return np.ascontiguousarray(a, np.float32)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray, start: int = 0) -> np.ndarray:
    """Causal grouped-query attention of T queries over one sequence's cache (see ref.attention).
    q[T, H, Dh]; k, v [Hkv, S, Dh] -> [T, H, Dh]."""
    q = np.ascontiguousarray(q, np.float32)
    S = k.shape[1]
    nvis = np.clip(np.asarray(pos, np.int64) - start + 1, 0, S)     # rows each query sees
    out = np.empty_like(q)
    if q.shape[0] * q.shape[1] * S < 32768:                        # small: a thread launch costs more
        _attention_ser(q, _as_rows(k), _as_rows(v), nvis, out)
    else:
        _attention_par(q, _as_rows(k), _as_rows(v), nvis, out)
    return out


attention_probs = ref.attention_probs


# ------------------------------------------------------------------------------------------------
# fused single-token decode: the whole layer loop in one compiled call
# ------------------------------------------------------------------------------------------------
# model.forward stays the definition; this is the same math for one token per slot, without ~400
# Python-level kernel calls per token (and with q/k/v and gate/up each in one parallel region).
# tests/test_fast_model.py checks it against the per-op path.

_NW = 7                                   # weights per layer, in this order:
_LAYER_WEIGHTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@intrinsic
def _u8ptr(typingctx, addr):
    def codegen(ctx, builder, sig, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())
    return types.CPointer(types.uint8)(types.int64), codegen


@njit(inline="always")
def _wt(wtab, j):
    """Weight j of the table as (uint8 [rows, row_bytes] array, kind); the table's rows are
    (address, rows, row bytes, kind) of arrays that the plan keeps alive."""
    return carray(_u8ptr(wtab[j, 0]), (wtab[j, 1], wtab[j, 2])), wtab[j, 3]


@njit(cache=True, fastmath=True)
def _dequant_row(w, kind, r, out):
    """out[K] = row r of a Q4_0/Q4_1/Q8_0 weight, decoded (the embedding lookup)."""
    bs, qo = _layout(kind)
    for b in range(out.shape[0] // 32):
        o = b * bs
        d = f16_at(w[r], o)
        m = _min_term(w[r], o, kind, d)
        for i in range(32):
            if kind == Q8_0_K:
                q = np.float32(np.int8(w[r, o + qo + i]))
            else:
                byte = w[r, o + qo + (i % 16)]
                q = np.float32(byte & 15) if i < 16 else np.float32(byte >> 4)
            out[b * 32 + i] = q * d + m


@njit(parallel=True, cache=True, fastmath=True)
def _attention_heads_par(q, kc, vc, l, s, n, out, t):
    H = q.shape[1]
    g = H // kc.shape[2]
    for h in prange(H):
        sc = np.empty(max(1, n), np.float32)
        _attend_one(q[t, h], kc[l, s, h // g], vc[l, s, h // g], n, sc, out[t, h])


@njit(cache=True, fastmath=True)
def _attend_step(l, q, k, v, pos, slot, rows, nvis, sink_to, kc, vc, ksink, inv, att):
    """Layer l's attention for one token per slot (the fused decodes): rotate q[T, H, Dh] and
    k[T, Hkv, Dh], write k/v into the cache rows (keeping a window's sinks un-rotated in ksink),
    then each token's heads attend over its slot's first nvis[t] rows -> att[T, H, Dh]."""
    T, H, Dh = q.shape
    Hkv = k.shape[1]
    ns = ksink.shape[2]
    qr = np.empty_like(q)
    kr = np.empty_like(k)
    sc = np.empty(kc.shape[3], np.float32)
    sink = np.empty((1, Hkv, Dh), np.float32)
    sinkr = np.empty((1, Hkv, Dh), np.float32)
    spos = np.empty(1, np.int64)
    _rope(q, pos, inv, qr)
    _rope(k, pos, inv, kr)
    for t in range(T):
        s = slot[t]
        if pos[t] < ns:                                  # an attention sink: keep it un-rotated
            ksink[l, s, pos[t]] = k[t]
        for j in range(Hkv):
            kc[l, s, j, rows[t]] = kr[t, j]
            vc[l, s, j, rows[t]] = v[t, j]
        if sink_to[t] >= 0:                              # window: sinks sit just before it
            for j in range(ns):
                sink[0] = ksink[l, s, j]
                spos[0] = sink_to[t] + j
                _rope(sink, spos, inv, sinkr)
                for hh in range(Hkv):
                    kc[l, s, hh, j] = sinkr[0, hh]
        if nvis[t] * H >= 2048:
            _attention_heads_par(qr, kc, vc, l, s, nvis[t], att, t)
        else:
            gq = H // Hkv
            for hh in range(H):
                _attend_one(qr[t, hh], kc[l, s, hh // gq], vc[l, s, hh // gq], nvis[t], sc, att[t, hh])


@njit(cache=True, fastmath=True)
def _decode(ids, pos, slot, rows, nvis, sink_to, wtab, norms, onorm, kc, vc, ksink, inv, eps, logits):
    """One token per slot through the whole model. ids/pos/slot/rows/nvis/sink_to [T]; wtab the
    weight table (7 per layer, then token_embd, output); norms [L, 2, D]; kc, vc the cache
    [L, B, Hkv, S, Dh]; ksink [L, B, ns, Hkv, Dh] un-rotated keys of the attention sinks (ns = 0
    without a window); inv the RoPE inverse frequencies; logits [T, V] out."""
    T = ids.shape[0]
    L, _, D = norms.shape
    Hkv, Dh = kc.shape[2], kc.shape[4]
    H = wtab[0, 1] // Dh
    F = wtab[4, 1]
    x = np.empty((T, D), np.float32)
    h = np.empty((T, D), np.float32)
    q = np.empty((T, H, Dh), np.float32)
    k = np.empty((T, Hkv, Dh), np.float32)
    v = np.empty((T, Hkv, Dh), np.float32)
    att = np.empty((T, H, Dh), np.float32)
    y = np.empty((T, D), np.float32)
    g = np.empty((T, F), np.float32)
    u = np.empty((T, F), np.float32)
    a = np.empty((T, F), np.float32)
    # quantized activations (C-contiguous: the kernels address xq rows by pointer arithmetic)
    xqD, dxD, sxD = np.empty((T, 2 * D), np.int8), np.empty((T, D // 32), np.float32), np.empty((T, D // 32), np.float32)
    xqA, dxA, sxA = np.empty((T, 2 * H * Dh), np.int8), np.empty((T, H * Dh // 32), np.float32), np.empty((T, H * Dh // 32), np.float32)
    xqF, dxF, sxF = np.empty((T, 2 * F), np.int8), np.empty((T, F // 32), np.float32), np.empty((T, F // 32), np.float32)

    emb, ek = _wt(wtab, L * _NW)
    for t in range(T):
        _dequant_row(emb, ek, ids[t], x[t])
    for l in range(L):
        # ---- attention: x = x + attn(norm(x))
        _rmsnorm(x, norms[l, 0], eps, h)
        _quantize_act(h, xqD, dxD, sxD)
        wq, kq = _wt(wtab, l * _NW + 0)
        wk, kk = _wt(wtab, l * _NW + 1)
        wv, kv = _wt(wtab, l * _NW + 2)
        _matvec_q3(wq, kq, wk, kk, wv, kv, xqD, dxD, sxD,
                   q.reshape(T, H * Dh), k.reshape(T, Hkv * Dh), v.reshape(T, Hkv * Dh))
        _attend_step(l, q, k, v, pos, slot, rows, nvis, sink_to, kc, vc, ksink, inv, att)
        _quantize_act(att.reshape(T, H * Dh), xqA, dxA, sxA)
        wo, ko = _wt(wtab, l * _NW + 3)
        _matvec_q(wo, ko, xqA, dxA, sxA, y)
        x += y
        # ---- feed-forward: x = x + mlp(norm(x))
        _rmsnorm(x, norms[l, 1], eps, h)
        _quantize_act(h, xqD, dxD, sxD)
        wg, kg = _wt(wtab, l * _NW + 4)
        wu, ku = _wt(wtab, l * _NW + 5)
        _matvec_q2(wg, kg, wu, ku, xqD, dxD, sxD, g, u)
        _swiglu(g, u, a)
        _quantize_act(a, xqF, dxF, sxF)
        wd, kd = _wt(wtab, l * _NW + 6)
        _matvec_q(wd, kd, xqF, dxF, sxF, y)
        x += y
    _rmsnorm(x, onorm, eps, h)
    _quantize_act(h, xqD, dxD, sxD)
    wh, kh = _wt(wtab, L * _NW + 1)
    _matvec_q(wh, kh, xqD, dxD, sxD, logits)


class _Plan:
    """What the fused decode needs from a model: the weight table and stacked norm gains."""
    def __init__(self, m):
        cfg = m.config
        names = [f"blk.{i}.{n}" for i in range(cfg.n_layers) for n in _LAYER_WEIGHTS] + ["token_embd", "output"]
        ws = [m.weights[n] for n in names]
        self.ok = (cfg.arch == "llama" and cfg.act == "silu"
                   and all(isinstance(w, Packed) and w.kind <= Q8_0_K for w in ws))
        if not self.ok:
            return
        self.arrays = [w.data for w in ws]                         # keeps the addresses valid
        self.wtab = np.array([[a.ctypes.data, a.shape[0], a.shape[1], w.kind] for a, w in zip(self.arrays, ws)],
                             np.int64)
        self.norms = np.stack([np.stack([m.norms[f"blk.{i}.attn_norm"], m.norms[f"blk.{i}.ffn_norm"]])
                               for i in range(cfg.n_layers)]).astype(np.float32)
        self.onorm = np.ascontiguousarray(m.norms["output_norm"], np.float32)


def decode_step(m, ids, pos, slot, cache):
    """Logits [T, V] for one token per slot (ids, pos, slot [T], slots distinct), writing their
    keys/values into the cache: the fused twin of model.forward. None when this model or cache is
    not one the fused path handles (the caller then runs the per-op path)."""
    if m.config.arch == "bitnet":
        from .bitnet_decode import decode_step as bitnet_step
        return bitnet_step(m, ids, pos, slot, cache)
    plan = m.__dict__.get("_fast_plan")
    if plan is None:
        plan = m.__dict__["_fast_plan"] = _Plan(m)
    if not plan.ok or cache.k.dtype != np.float32 or not cache.k.flags.c_contiguous:
        return None
    rows, nvis, sink_to = cache.plan(pos, slot)
    logits = np.empty((len(ids), m.config.vocab_size), np.float32)
    cfg = m.config
    _decode(ids, pos, slot, rows, nvis, sink_to, plan.wtab, plan.norms, plan.onorm, cache.k, cache.v,
            cache.k_sink, inv_freq(cfg.rope_theta, cfg.rotary_dim), np.float32(cfg.norm_eps), logits)
    return logits

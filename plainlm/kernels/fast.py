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
from numba import njit, prange, types
from numba.extending import overload

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


@njit(parallel=True, cache=True, fastmath=True)
def _matvec_q(w, kind, xq, dx, sx, y):
    """y[0, r] = sum_b W[r, block b] . x[0, block b] for one token; rows spread over threads."""
    N, rb = w.shape
    nb = dx.shape[1]
    bs, qo = _layout(kind)
    for r in prange(N):
        acc = vzero()
        s = np.float32(0.0)
        for b in range(nb):
            o = r * rb + b * bs
            d = f16_at(w, o)
            u, wv = _load_block(w, o + qo, kind)
            acc = fma_i(acc, _dot(u, wv, kind, xq, b * 64), d * dx[0, b])
            s += _min_term(w, o, kind, d) * sx[0, b]
        y[0, r] = hsum(acc) + s


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
    if T == 1:
        xq, dx, sx = quantize_act(x)
        y = np.empty((1, n), np.float32)
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
def _rope(x, pos, theta, rot, out):
    T, H, Dh = x.shape
    h2 = rot // 2
    for t in range(T):
        for i in range(h2):
            # angle in float32 exactly as the reference: pos * theta^(-2i/rot)
            inv = np.float32(1.0 / (theta ** (np.float32(2 * i) / np.float32(rot))))
            ang = np.float32(pos[t]) * inv
            c = np.float32(np.cos(ang))
            s = np.float32(np.sin(ang))
            for h in range(H):
                x1 = x[t, h, i]
                x2 = x[t, h, i + h2]
                out[t, h, i] = x1 * c - x2 * s
                out[t, h, i + h2] = x2 * c + x1 * s
        for h in range(H):
            for i in range(rot, Dh):
                out[t, h, i] = x[t, h, i]


def rope(x: np.ndarray, pos: np.ndarray, theta: float, rot: int) -> np.ndarray:
    """Rotate pairs (x[i], x[i + rot/2]) of each head by pos*theta_i (NEOX). x[T, H, Dh]."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty_like(x)
    _rope(x, np.ascontiguousarray(pos, np.int64), float(theta), int(rot), out)
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

@njit(parallel=True, cache=True, fastmath=True)
def _attention(q, k, v, pos, start, out):
    """q[T, H, Dh]; k, v [Hkv, S, Dh]; out[T, H, Dh]. One (token, head) per task; online softmax
    is not needed at these sizes: scores of one row are kept in a scratch vector."""
    T, H, Dh = q.shape
    Hkv, S, _ = k.shape
    g = H // Hkv
    scale = np.float32(1.0 / math.sqrt(Dh))
    for th in prange(T * H):
        t = th // H
        h = th % H
        kh = h // g
        n = min(S, max(0, pos[t] - start + 1))         # cache rows this query may see
        sc = np.empty(n, np.float32)
        mx = np.float32(-np.inf)
        for j in range(n):
            s = np.float32(0.0)
            for i in range(Dh):
                s += q[t, h, i] * k[kh, j, i]
            s *= scale
            sc[j] = s
            mx = max(mx, s)
        tot = np.float32(0.0)
        for j in range(n):
            e = np.exp(sc[j] - mx)
            sc[j] = e
            tot += e
        for i in range(Dh):
            out[t, h, i] = 0.0
        inv = np.float32(1.0) / tot if tot > 0 else np.float32(0.0)
        for j in range(n):
            p = sc[j] * inv
            for i in range(Dh):
                out[t, h, i] += p * v[kh, j, i]


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray, start: int = 0) -> np.ndarray:
    """Causal grouped-query attention of T queries over one sequence's cache (see ref.attention).
    q[T, H, Dh]; k, v [Hkv, S, Dh] -> [T, H, Dh]."""
    q = np.ascontiguousarray(q, np.float32)
    out = np.empty_like(q)
    _attention(q, k, v, np.ascontiguousarray(pos, np.int64), int(start), out)
    return out


attention_probs = ref.attention_probs

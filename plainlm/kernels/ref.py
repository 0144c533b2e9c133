"""Reference kernels: numpy, float32, written for clarity. The oracle every fast kernel is tested against.

Shapes: T tokens, D model dim, H heads, Hkv kv heads, Dh head dim, S cache length, N/K out/in dims.
Weights are QTensors in their file's block form; `prepare` is the hook where a backend may repack
them (the reference keeps them as they are and decodes rows on the fly, a chunk at a time, so that
no float32 copy of a whole matrix outlives a call).
"""
from __future__ import annotations

import os

import numpy as np

from ..quant import F32, QTensor, dequantize

NAME = "ref"
CHUNK_ROWS = 4096        # rows decoded per step in matmul: bounds the temporary float32 buffer


def prepare(w):
    """Backend form of a weight. Weight objects of other layouts (e.g. ternary bit-planes) carry
    their own kernels: they provide `prepare(backend_name)` and `matmul(x)` (the plug-in protocol)."""
    if not isinstance(w, QTensor):
        return w.prepare(NAME)
    if os.environ.get("PLAINLM_REF_DECODED") == "1" and len(w.shape) == 2:
        # Oracle runs in the test suite: decode once and keep float32 (about 4-8x the memory of
        # the blocks) instead of decoding on every call. Same numbers, far less time.
        return QTensor(F32, w.shape, w.dequantize().view(np.uint8))
    return w


def matmul(w, x: np.ndarray) -> np.ndarray:
    """y[T, N] = x[T, K] @ W[N, K].T, W decoded from its blocks chunk by chunk."""
    if not isinstance(w, QTensor):
        return w.matmul(x)
    x = np.asarray(x, np.float32)
    n, k = w.shape
    y = np.empty((x.shape[0], n), np.float32)
    for r0 in range(0, n, CHUNK_ROWS):
        r1 = min(n, r0 + CHUNK_ROWS)
        wf = dequantize(w.data[r0:r1], w.qtype, (r1 - r0, k))  # [rows, K] float32
        y[:, r0:r1] = x @ wf.T
    return y


def embed(w: QTensor, ids: np.ndarray) -> np.ndarray:
    """x[T, D] = rows `ids` of the embedding table."""
    return w.rows(np.asarray(ids, np.int64))


def vector(w: QTensor) -> np.ndarray:
    """A 1-D weight (norm gains) as float32 [D]."""
    return w.dequantize().reshape(-1)


def rmsnorm(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    """x[T, D] / sqrt(mean(x^2) + eps) * g[D]."""
    ms = np.mean(x.astype(np.float32) ** 2, axis=-1, keepdims=True)
    return (x / np.sqrt(ms + np.float32(eps))) * g


def rope_tables(pos: np.ndarray, dim: int, theta: float):
    """cos, sin [T, dim/2] for positions pos[T]: angle = pos * theta^(-2i/dim) (HF inv_freq)."""
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))      # [dim/2]
    ang = np.asarray(pos, np.float32)[:, None] * inv.astype(np.float32)[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rope(x: np.ndarray, pos: np.ndarray, theta: float, rot: int) -> np.ndarray:
    """Rotate pairs (x[i], x[i + rot/2]) of each head by pos*theta_i (HF rotate_half / NEOX).
    x[T, H, Dh] -> [T, H, Dh]; only the first `rot` dims of a head rotate."""
    cos, sin = rope_tables(pos, rot, theta)                    # [T, rot/2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    h = rot // 2
    out = x.copy()
    x1, x2 = x[..., :h], x[..., h:rot]
    out[..., :h] = x1 * cos - x2 * sin
    out[..., h:rot] = x2 * cos + x1 * sin
    return out


def _probs(q: np.ndarray, k: np.ndarray, pos: np.ndarray, start: int = 0) -> np.ndarray:
    """Softmax attention weights [Hkv, T*g, S] (g = H / Hkv query heads share a kv head)."""
    T, H, Dh = q.shape
    Hkv, S, _ = k.shape
    g = H // Hkv
    qg = q.reshape(T, Hkv, g, Dh).transpose(1, 0, 2, 3).reshape(Hkv, T * g, Dh)
    s = qg @ k.transpose(0, 2, 1) / np.float32(np.sqrt(Dh))  # [Hkv, T*g, S]
    kpos = start + np.arange(S)
    mask = kpos[None, :] > np.repeat(np.asarray(pos), g)[:, None]      # [T*g, S] future keys
    s = np.where(mask[None], -np.inf, s)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    return p / p.sum(-1, keepdims=True)


def attention_probs(q: np.ndarray, k: np.ndarray, pos: np.ndarray, start: int = 0) -> np.ndarray:
    """The attention weights themselves, [T, H, S] (for traces and verification)."""
    T, H, _ = q.shape
    Hkv, S, _ = k.shape
    p = _probs(q, k, pos, start).reshape(Hkv, T, H // Hkv, S)
    return p.transpose(1, 0, 2, 3).reshape(T, H, S)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray, start: int = 0) -> np.ndarray:
    """Causal grouped-query attention of T queries over one sequence's cache.

    q[T, H, Dh]; k, v [Hkv, S, Dh] (cache rows 0..S-1 hold positions start..start+S-1);
    query t sees cache rows whose position <= pos[t]. Returns [T, H, Dh].
    """
    T, H, Dh = q.shape
    Hkv = k.shape[0]
    g = H // Hkv
    o = _probs(q, k, pos, start) @ v                         # [Hkv, T*g, Dh]
    return o.reshape(Hkv, T, g, Dh).transpose(1, 0, 2, 3).reshape(T, H, Dh)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, both [T, F]."""
    return silu(gate) * up


def relu2_glu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """relu(gate)^2 * up (BitNet's gated FFN)."""
    r = np.maximum(gate, 0)
    return r * r * up

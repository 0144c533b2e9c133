"""Training layers: every forward beside its backward (llm.c style), numpy only.

    op_forward(...)        -> (out, cache)
    op_backward(dout, cache) -> input gradient(s) [, parameter gradients]

The math is the same as the inference path (plainlm/model.py, kernels/ref.py); these versions keep
what the backward needs and work in whatever float dtype they are given (float32 for training,
float64 for the numerical gradient checks).

Shape letters: B batch, T time, N = B*T rows, D model width, H query heads, Hkv key/value heads,
Dh head width, F FFN width, V vocabulary, K/M in/out features of a linear layer.
"""
from __future__ import annotations

import numpy as np

from . import fused


# ------------------------------------------------------------------------------------------------
# embedding, linear
# ------------------------------------------------------------------------------------------------

def embedding_forward(W, ids):
    """W[V, D], ids[B, T] -> x[B, T, D]."""
    return W[ids], (ids, W.shape)


def embedding_backward(dx, cache):
    """dx[B, T, D] -> dW[V, D] (rows of repeated ids add up)."""
    ids, shape = cache
    dW = np.zeros(shape, dx.dtype)
    np.add.at(dW, ids.reshape(-1), dx.reshape(-1, shape[1]))
    return dW


def linear_forward(x, W, b=None):
    """x[N, K] @ W[M, K].T (+ b[M]) -> y[N, M] (nn.Linear layout, as in GGUF)."""
    y = x @ W.T
    if b is not None:
        y += b
    return y, (x, W, b is not None)


def linear_backward(dy, cache):
    """dy[N, M] -> dx[N, K], dW[M, K], db[M] (None without bias)."""
    x, W, has_b = cache
    dx = dy @ W
    dW = dy.T @ x
    db = dy.sum(0) if has_b else None
    return dx, dW, db


# ------------------------------------------------------------------------------------------------
# norms
# ------------------------------------------------------------------------------------------------

def rmsnorm_forward(x, g, eps):
    """x[N, D] * rsqrt(mean(x^2) + eps) * g[D]."""
    if fused.usable(x, g):
        y, xhat, rstd = fused.rmsnorm_fwd(x, g, eps)
        return y, (xhat, rstd, g)
    rstd = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)   # [N, 1]
    xhat = x * rstd
    return xhat * g, (xhat, rstd, g)


def rmsnorm_backward(dy, cache):
    """-> dx[N, D], dg[D]."""
    xhat, rstd, g = cache
    if fused.usable(dy, xhat, g):
        return fused.rmsnorm_bwd(dy, xhat, rstd, g)
    dg = np.einsum("nd,nd->d", dy, xhat)
    dxhat = dy * g
    # d/dx of x*rstd: rstd * (dxhat - xhat * mean(dxhat * xhat))
    dx = rstd * (dxhat - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))
    return dx, dg


def layernorm_forward(x, g, b, eps):
    """(x - mean) * rsqrt(var + eps) * g + b over the last dim. x[N, D]."""
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    rstd = 1.0 / np.sqrt(np.mean(xc * xc, axis=-1, keepdims=True) + eps)
    xhat = xc * rstd
    return xhat * g + b, (xhat, rstd, g)


def layernorm_backward(dy, cache):
    """-> dx[N, D], dg[D], db[D]."""
    xhat, rstd, g = cache
    dg = np.einsum("nd,nd->d", dy, xhat)
    db = dy.sum(0)
    dxhat = dy * g
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True)
                 - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))
    return dx, dg, db


# ------------------------------------------------------------------------------------------------
# rotary position embedding (HF rotate_half order, as kernels.ref.rope)
# ------------------------------------------------------------------------------------------------

def rope_tables(T, dim, theta, dtype=np.float32):
    """cos, sin [T, dim/2]; angle(t, i) = t * theta^(-2i/dim) (computed in float64, then cast)."""
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(dtype), np.sin(ang).astype(dtype)


def rope_forward(x, cos, sin):
    """x[B, T, H, Dh]: rotate pairs (x[i], x[i + Dh/2]) by the angle of (t, i). cos/sin [T, Dh/2]."""
    h = x.shape[-1] // 2
    c, s = cos[:, None, :], sin[:, None, :]                      # [T, 1, Dh/2] broadcasts over B, H
    x1, x2 = x[..., :h], x[..., h:]
    out = np.empty_like(x)
    out[..., :h] = x1 * c - x2 * s
    out[..., h:] = x2 * c + x1 * s
    return out, (cos, sin)


def rope_backward(dy, cache):
    """A rotation's transpose is the rotation by minus the angle."""
    cos, sin = cache
    h = dy.shape[-1] // 2
    c, s = cos[:, None, :], sin[:, None, :]
    d1, d2 = dy[..., :h], dy[..., h:]
    dx = np.empty_like(dy)
    dx[..., :h] = d1 * c + d2 * s
    dx[..., h:] = d2 * c - d1 * s
    return dx


def sinusoid_table(T, D, dtype=np.float32):
    """The fixed positional table of 'Attention is all you need': [T, D], sin on even dims."""
    pos = np.arange(T, dtype=np.float64)[:, None]
    inv = 1.0 / (10000.0 ** (np.arange(0, D, 2, dtype=np.float64) / D))
    tab = np.zeros((T, D))
    tab[:, 0::2] = np.sin(pos * inv)
    tab[:, 1::2] = np.cos(pos * inv[: D // 2])
    return tab.astype(dtype)


# ------------------------------------------------------------------------------------------------
# causal grouped-query attention
# ------------------------------------------------------------------------------------------------

_MASKS = {}


def _causal_mask(T, dtype):
    """[T, T] additive mask: 0 on and below the diagonal, -inf above (cached per T, dtype)."""
    key = (T, np.dtype(dtype).str)
    if key not in _MASKS:
        _MASKS[key] = np.triu(np.full((T, T), -np.inf, dtype), 1)
    return _MASKS[key]


def attention_forward(q, k, v):
    """Causal softmax attention, H query heads sharing Hkv key/value heads (g = H/Hkv).

    q[B, T, H, Dh], k/v[B, T, Hkv, Dh] -> o[B, T, H, Dh].
    Query heads h = j*g .. j*g+g-1 use kv head j (the repeat_kv order of HF and llama.cpp).
    """
    B, T, H, Dh = q.shape
    Hkv = k.shape[2]
    g = H // Hkv
    scale = 1.0 / np.sqrt(Dh)
    # [B, Hkv, g*T, Dh]: the g query heads of one kv head stacked along the row axis
    qg = q.reshape(B, T, Hkv, g, Dh).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, g * T, Dh)
    kt = k.transpose(0, 2, 1, 3)                                  # [B, Hkv, T, Dh]
    vt = v.transpose(0, 2, 1, 3)
    s = qg @ kt.transpose(0, 1, 3, 2)                             # [B, Hkv, g*T, T]
    if fused.usable(s):                                           # one pass per row, masked half skipped
        fused.causal_softmax_(s.reshape(-1, T), T, np.float32(scale))
    else:
        s *= scale
        s4 = s.reshape(B, Hkv, g, T, T)
        s4 += _causal_mask(T, s.dtype)                            # -inf on future keys
        s -= s.max(-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(-1, keepdims=True)
    p = s                                                         # [B, Hkv, g*T, T]
    og = p @ vt                                                   # [B, Hkv, g*T, Dh]
    o = og.reshape(B, Hkv, g, T, Dh).transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)
    return o, (qg, kt, vt, p, scale, (B, T, H, Hkv, Dh))


def attention_backward(do, cache):
    """do[B, T, H, Dh] -> dq[B, T, H, Dh], dk, dv [B, T, Hkv, Dh]."""
    qg, kt, vt, p, scale, (B, T, H, Hkv, Dh) = cache
    g = H // Hkv
    dog = do.reshape(B, T, Hkv, g, Dh).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, g * T, Dh)
    dv = p.transpose(0, 1, 3, 2) @ dog                            # [B, Hkv, T, Dh] (sums over g)
    dp = dog @ vt.transpose(0, 1, 3, 2)                           # [B, Hkv, g*T, T]
    # softmax backward: ds = p * (dp - sum(dp * p)); masked entries have p = 0
    if fused.usable(dp, p):
        fused.causal_softmax_bwd_(dp.reshape(-1, T), p.reshape(-1, T), T, np.float32(scale))
    else:
        dp -= np.einsum("bhij,bhij->bhi", dp, p)[..., None]
        dp *= p
        dp *= scale
    dqg = dp @ kt                                                 # [B, Hkv, g*T, Dh]
    dk = dp.transpose(0, 1, 3, 2) @ qg                            # [B, Hkv, T, Dh]
    dq = dqg.reshape(B, Hkv, g, T, Dh).transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)
    return dq, dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)


# ------------------------------------------------------------------------------------------------
# activations
# ------------------------------------------------------------------------------------------------

def swiglu_forward(gate, up):
    """silu(gate) * up, [N, F] each (Llama FFN)."""
    if fused.usable(gate, up):
        return fused.swiglu_fwd(gate, up), (gate, up, None)
    sig = 1.0 / (1.0 + np.exp(-gate))
    return gate * sig * up, (gate, up, sig)


def swiglu_backward(dh, cache):
    gate, up, sig = cache
    if sig is None:
        return fused.swiglu_bwd(dh, gate, up)
    silu = gate * sig
    dgate = dh * up * (sig * (1.0 + gate * (1.0 - sig)))
    dup = dh * silu
    return dgate, dup


def relu2_glu_forward(gate, up):
    """relu(gate)^2 * up (BitNet FFN)."""
    r = np.maximum(gate, 0)
    return r * r * up, (r, up)


def relu2_glu_backward(dh, cache):
    r, up = cache
    return dh * up * 2.0 * r, dh * r * r


_GELU_C = np.sqrt(2.0 / np.pi)


def gelu_forward(x):
    """GPT-2's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    t = np.tanh(_GELU_C * (x + 0.044715 * x ** 3))
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_backward(dy, cache):
    x, t = cache
    dt = _GELU_C * (1.0 + 3 * 0.044715 * x * x)
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dt)


# ------------------------------------------------------------------------------------------------
# BitNet b1.58 quantization-aware linear layer (straight-through estimators)
# ------------------------------------------------------------------------------------------------

def ternary_weight(W):
    """Per-tensor absmean: gamma = max(mean|W|, 1e-5); W_t = clamp(round(W/gamma), -1, 1).
    Returns (W_t * gamma, W_t as int8, gamma) -- the effective weight and its ternary factors."""
    gamma = max(float(np.mean(np.abs(W))), 1e-5)
    Wt = np.clip(np.round(W / gamma), -1, 1)
    return (Wt * gamma).astype(W.dtype), Wt.astype(np.int8), gamma


def act_quant(x):
    """Per-token (row) absmax int8: s = 127 / max(max|x|, 1e-5); x_q = clamp(round(x s), -128, 127) / s."""
    s = 127.0 / np.maximum(np.abs(x).max(-1, keepdims=True), 1e-5)
    return np.clip(np.round(x * s), -128, 127) / s


def bitlinear_forward(x, W):
    """y[N, M] = act_quant(x)[N, K] @ ternary(W)[M, K].T.

    Straight-through estimator: the backward treats both quantizers as the identity, so the float
    "latent" W and the float x receive the gradient of the quantized product (BitNet's
    `x + (quant(x) - x).detach()`)."""
    Wq, _, _ = ternary_weight(W)
    xq = act_quant(x).astype(x.dtype)
    return xq @ Wq.T, (xq, Wq)


def bitlinear_backward(dy, cache):
    xq, Wq = cache
    return dy @ Wq, dy.T @ xq


# ------------------------------------------------------------------------------------------------
# loss
# ------------------------------------------------------------------------------------------------

def cross_entropy_forward(logits, targets, ignore_index=-1):
    """Mean negative log-likelihood over the positions whose target != ignore_index.

    logits[N, V], targets[N] -> (loss, cache). A batch with no valid target has loss 0.
    The cache holds the softmax probabilities [N, V]; the backward turns them into the gradient
    in place (one N x V buffer instead of three)."""
    valid = targets != ignore_index
    n = max(int(valid.sum()), 1)
    t = np.where(valid, targets, 0)
    rows = np.arange(len(t))
    z = logits - logits.max(-1, keepdims=True)                    # [N, V]
    nll = -z[rows, t].astype(np.float64)
    np.exp(z, out=z)
    ssum = z.sum(-1, keepdims=True)
    nll += np.log(ssum[:, 0].astype(np.float64))                  # -log softmax = lse - z_t
    z /= ssum                                                     # probabilities
    loss = float((nll * valid).sum() / n)
    return loss, (z, t, valid, n)


def cross_entropy_backward(cache, dloss=1.0):
    """-> dlogits[N, V] = (softmax - onehot) / n on valid rows, 0 on ignored rows (consumes the cache)."""
    d, t, valid, n = cache
    d[np.arange(len(t)), t] -= 1.0
    d *= (valid[:, None] * (dloss / n)).astype(d.dtype)
    return d

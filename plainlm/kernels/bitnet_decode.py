"""Fused single-token decode for BitNet b1.58 on the fast backend: model.forward's layer loop in
one compiled call, on the bit-plane weights.

model.forward stays the definition; this is the same math for one token per slot (the BitNet
branches of attention_block / ffn_block), without ~20 Python-level kernel calls per layer, with
each activation quantized once for all the matrices that read it, and with q/k/v (and gate/up)
in one parallel region. The embedding lookup and the output head stay ordinary backend calls
(K.embed before, K.rmsnorm + K.matmul after), so any head type works (f16, bf16, Q8_0).
tests/test_bitnet_fused.py checks it against the per-op path.

Per layer l, for x[T, D] (one token per slot):
    h = rmsnorm(x, attn_norm);  x8 = act_quant(h)                       int8 [T, D], s [T]
    q|k|v = ternary(W_q|W_k|W_v, x8)                                    [T, H*Dh + 2*Hkv*Dh]
    att = attention(rope(q), rope(k) -> cache, v -> cache)              [T, H, Dh]
    x += ternary(W_o, act_quant(rmsnorm(att, attn_sub_norm)))
    h = rmsnorm(x, ffn_norm);  g|u = ternary(W_gate|W_up, act_quant(h)) [T, 2F]
    x += ternary(W_down, act_quant(rmsnorm(relu(g)^2 * u, ffn_sub_norm)))
"""
from __future__ import annotations

import numpy as np
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from .fast import _attend_step, _relu2_glu, _rmsnorm, _u8ptr, inv_freq
from .ternary import HAVE_VNNI, RB, TR, _act_quant_t, _tdot_vnni

_LAYER_WEIGHTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_NW = len(_LAYER_WEIGHTS)


@intrinsic
def _f32ptr(typingctx, addr):
    def codegen(ctx, builder, sig, args):
        from llvmlite import ir
        return builder.inttoptr(args[0], ir.FloatType().as_pointer())
    return types.CPointer(types.float32)(types.int64), codegen


@njit(cache=True)
def _locate(ttab, j, b):
    """Block b of the stacked matrices j, j+1, ...: (its matrix, block within it, first column)."""
    c0 = 0
    while b >= ttab[j, 3] // RB:
        b -= ttab[j, 3] // RB
        c0 += ttab[j, 3]
        j += 1
    return j, b, c0


@njit(parallel=True, cache=True)
def _tmv_tab(ttab, j0, nm, x8t, s, y):
    """y[T, sum N] = matrices j0..j0+nm-1 of the table, stacked by rows (same K), applied to the
    bit-transposed int8 activations x8t[T, Kp] with per-token scales s[T]. Table rows:
    (plus address, minus address, scale address, N, Kp/8); every N is a multiple of RB."""
    T, kp = x8t.shape
    nb = 0
    for j in range(j0, j0 + nm):
        nb += ttab[j, 3] // RB
    acc = np.empty(nb * TR, np.int32)                                   # TR sums per task
    for b in prange(nb):
        j, bb, c0 = _locate(ttab, j0, b)
        n, kb = ttab[j, 3], ttab[j, 4]
        plus = carray(_u8ptr(ttab[j, 0]), (n, kb))
        minus = carray(_u8ptr(ttab[j, 1]), (n, kb))
        scale = carray(_f32ptr(ttab[j, 2]), (n,))
        o = b * TR
        for t in range(T):
            for r in range(bb * RB, bb * RB + RB, TR):
                _tdot_vnni(x8t, t * kp, kp, plus, minus, r * kb, kb, kb // 8, acc, o)
                for i in range(TR):
                    y[t, c0 + r + i] = np.float32(acc[o + i]) / s[t] * scale[r + i]


@njit(cache=True, fastmath=True)
def _decode_layers(x, pos, slot, rows, nvis, sink_to, ttab, nA, nAS, nF, nFS, kc, vc, ksink, inv, eps):
    """x[T, D] (embedded tokens, one per slot) through every layer, in place. ttab the weight
    table (7 per layer, _LAYER_WEIGHTS order); nA/nF [L, D] attn/ffn norms, nAS [L, H*Dh] and
    nFS [L, F] the sub-norms; kc, vc [L, B, Hkv, S, Dh] the cache, ksink the window's sinks."""
    T, D = x.shape
    L = nA.shape[0]
    Hkv, Dh = kc.shape[2], kc.shape[4]
    HD, F = nAS.shape[1], nFS.shape[1]
    H, KV = HD // Dh, Hkv * Dh
    h = np.empty((T, D), np.float32)
    qkv = np.empty((T, HD + 2 * KV), np.float32)
    q = np.empty((T, H, Dh), np.float32)
    k = np.empty((T, Hkv, Dh), np.float32)
    v = np.empty((T, Hkv, Dh), np.float32)
    att = np.empty((T, H, Dh), np.float32)
    ha = np.empty((T, HD), np.float32)
    y = np.empty((T, D), np.float32)
    gu = np.empty((T, 2 * F), np.float32)
    a = np.empty((T, F), np.float32)
    af = np.empty((T, F), np.float32)
    x8D, x8A, x8F = np.empty((T, D), np.int8), np.empty((T, HD), np.int8), np.empty((T, F), np.int8)
    s = np.empty(T, np.float32)
    q2, k2, v2 = q.reshape(T, HD), k.reshape(T, KV), v.reshape(T, KV)
    for l in range(L):
        # ---- attention: x = x + o(subnorm(attn(norm(x))))
        _rmsnorm(x, nA[l], eps, h)
        _act_quant_t(h, D, x8D, s)
        _tmv_tab(ttab, l * _NW, 3, x8D, s, qkv)
        for t in range(T):
            q2[t] = qkv[t, :HD]
            k2[t] = qkv[t, HD:HD + KV]
            v2[t] = qkv[t, HD + KV:]
        _attend_step(l, q, k, v, pos, slot, rows, nvis, sink_to, kc, vc, ksink, inv, att)
        _rmsnorm(att.reshape(T, HD), nAS[l], eps, ha)
        _act_quant_t(ha, HD, x8A, s)
        _tmv_tab(ttab, l * _NW + 3, 1, x8A, s, y)
        x += y
        # ---- feed-forward: x = x + down(subnorm(relu(gate(norm(x)))^2 * up(norm(x))))
        _rmsnorm(x, nF[l], eps, h)
        _act_quant_t(h, D, x8D, s)
        _tmv_tab(ttab, l * _NW + 4, 2, x8D, s, gu)
        _relu2_glu(gu[:, :F], gu[:, F:], a)
        _rmsnorm(a, nFS[l], eps, af)
        _act_quant_t(af, F, x8F, s)
        _tmv_tab(ttab, l * _NW + 6, 1, x8F, s, y)
        x += y


class _Plan:
    """What the fused BitNet decode needs from a model: the weight table and stacked norm gains.
    ok is False (and the per-op path runs) unless every projection is a bit-plane TernaryWeight
    with K a multiple of 64 and N of RB, and the CPU has AVX-512 VNNI."""

    def __init__(self, m):
        from ..quant.ternary import TernaryWeight
        cfg = m.config
        ws = [m.weights.get(f"blk.{i}.{n}") for i in range(cfg.n_layers) for n in _LAYER_WEIGHTS]
        self.ok = (HAVE_VNNI and cfg.arch == "bitnet" and cfg.act == "relu2"
                   and all(isinstance(w, TernaryWeight) and w.shape[1] % 64 == 0 and w.shape[0] % RB == 0
                           and w.plus.flags.c_contiguous and w.minus.flags.c_contiguous for w in ws))
        if not self.ok:
            return
        self.keep = ws                                                  # keeps the addresses valid
        self.ttab = np.array([[w.plus.ctypes.data, w.minus.ctypes.data, w.scale.ctypes.data,
                               w.shape[0], w.plus.shape[1]] for w in ws], np.int64)

        def stack(name):
            return np.ascontiguousarray(np.stack([m.norms[f"blk.{i}.{name}"] for i in range(cfg.n_layers)]),
                                        np.float32)
        self.nA, self.nAS = stack("attn_norm"), stack("attn_sub_norm")
        self.nF, self.nFS = stack("ffn_norm"), stack("ffn_sub_norm")


def decode_step(m, ids, pos, slot, cache):
    """Logits [T, V] for one token per slot, writing keys/values into the cache: the fused twin of
    model.forward for BitNet. None when the model or cache is not one this path handles."""
    plan = m.__dict__.get("_bitnet_plan")
    if plan is None:
        plan = m.__dict__["_bitnet_plan"] = _Plan(m)
    if not plan.ok or cache.k.dtype != np.float32 or not cache.k.flags.c_contiguous:
        return None
    K, cfg = m.backend, m.config
    rows, nvis, sink_to = cache.plan(pos, slot)
    x = np.ascontiguousarray(K.embed(m.weights["token_embd"], ids), np.float32)     # [T, D]
    _decode_layers(x, pos, slot, rows, nvis, sink_to, plan.ttab, plan.nA, plan.nAS, plan.nF, plan.nFS,
                   cache.k, cache.v, cache.k_sink, inv_freq(cfg.rope_theta, cfg.rotary_dim),
                   np.float32(cfg.norm_eps))
    h = K.rmsnorm(x, m.norms["output_norm"], cfg.norm_eps)                           # [T, D]
    return K.matmul(m.weights["output"], h)                                           # [T, V]

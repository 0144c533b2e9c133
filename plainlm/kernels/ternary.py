"""Kernels for BitNet weights: ternary bit-plane matmul and the 16-bit (f16/bf16) output head.

Each op has a numpy reference (`*_ref`, the oracle) and a numba twin (`*_fast`) with the same
result; tests/test_ternary.py checks them against each other and against a dense int8 matmul.

Ternary matmul, per token t and output row r (layout: plainlm/quant/ternary.py):
    s[t]     = 127 / max(max_j |x[t, j]|, 1e-5)                     float32
    xq[t, j] = clamp(rint(x[t, j] * s[t]), -128, 127)              int8, round half to even
    acc      = sum_{j: plus[r,j]} xq[t, j] - sum_{j: minus[r,j]} xq[t, j]     exact integer
    y[t, r]  = float32(acc) / s[t] * scale[r]

Fast kernel: the plane row, read 64 bits at a time, *is* a 64-lane mask. A small LLVM-IR loop
(`_tdot`, emitted through numba's `intrinsic`) bitcasts each 64-bit word to <64 x i1> and does
`acc = select(plus, acc + x, acc); acc = select(minus, acc - x, acc)` on <64 x i16> lanes — on
AVX-512 that is `kmov` + masked `vpaddw`/`vpsubw`, i.e. exactly the masked adds of the bit-plane
idea; LLVM lowers the same IR on any other CPU. Activations are widened to int16 once per call
(K*2 bytes, in L1). An int16 lane sums K/64 values of |xq| <= 127, so the loop is cut every
256 words (16384 inputs) and the partial sums added in int32.

On CPUs with AVX-512 VNNI (`_simd.available()`) `_tdot_vnni` is used instead (same layout, same
exact integer sums, no mask registers): the plane word is broadcast to 8 qwords and ANDed with
(1 << q) in qword q, so byte 8q + j carries 2^q * bit(8j + q); the activations are stored
"bit-transposed" to match (x8t[64i + 8q + j] = xq[64i + 8j + q], `_act_quant_t`) and `vpdpbusd`
sums them into int32 lanes that are shifted right by q at the end. Two instructions per plane word.
History on this machine (Zen 4, 2 threads, 2B-4T shapes, all ternary layers of one token): int16
masked adds ~57 ms; kmov + masked byte move + vpdpbusd ~30 ms (bound by the mask loads: ~90 G
weights/s even from L3); broadcast-AND + vpdpbusd ~140 G weights/s from L3, i.e. memory-bound.

Output head: the tied embedding stays 16-bit (f16 from GGUF, bf16 from HF safetensors, memory
mapped); `_hdot` converts 16 values at a time in registers (fpext half->float, or bf16 << 16)
and accumulates in float32. For many tokens (prefill with all logits) the reference path is
used: 1024 rows at a time decoded to float32 and one BLAS sgemm — a bounded temporary.
"""
from __future__ import annotations

import numpy as np

# ------------------------------------------------------------------------------------------------
# activation quantization and the ternary matmul: numpy reference
# ------------------------------------------------------------------------------------------------

CHUNK_ROWS = 1024
WORDS_PER_FLUSH = 256            # int16 lanes are summed into int32 every 256 words (16384 inputs)


def act_quant_ref(x: np.ndarray, kp: int):
    """x float32 [T, K] -> (xq int8 [T, kp] zero-padded, s float32 [T])."""
    x = np.asarray(x, np.float32)
    T, k = x.shape
    amax = np.abs(x).max(axis=1) if k else np.zeros(T, np.float32)
    s = (np.float32(127.0) / np.maximum(amax, np.float32(1e-5))).astype(np.float32)
    xq = np.zeros((T, kp), np.int8)
    xq[:, :k] = np.clip(np.rint(x * s[:, None]), -128, 127).astype(np.int8)
    return xq, s


def tmatmul_ref(plus, minus, scale, k: int, xq: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Integer ternary products, CHUNK_ROWS rows of planes unpacked at a time.
    plus/minus [N, Kp/8], xq int8 [T, Kp] -> y float32 [T, N]. Sums of |xq| <= 127 over
    K < 2^17 inputs stay below 2^24, so the float32 BLAS product is exact."""
    n = plus.shape[0]
    xf = xq.astype(np.float32)                                          # [T, Kp]
    acc = np.empty((xq.shape[0], n), np.float32)
    for r0 in range(0, n, CHUNK_ROWS):
        r1 = min(n, r0 + CHUNK_ROWS)
        p = np.unpackbits(plus[r0:r1], axis=1, bitorder="little").astype(np.float32)
        m = np.unpackbits(minus[r0:r1], axis=1, bitorder="little").astype(np.float32)
        acc[:, r0:r1] = xf @ (p - m).T
    return (acc / s[:, None]) * scale[None, :]


def tmatmul_dense_int(t: np.ndarray, scale, x: np.ndarray) -> np.ndarray:
    """Independent oracle: dense int8 t[N, K] in {-1,0,1}, int64 sums (tests only)."""
    xq, s = act_quant_ref(x, t.shape[1])
    acc = (xq.astype(np.int64) @ t.astype(np.int64).T).astype(np.float32)
    return (acc / s[:, None]) * np.asarray(scale, np.float32)[None, :]


# ------------------------------------------------------------------------------------------------
# numba twins
# ------------------------------------------------------------------------------------------------

try:
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
    HAVE_NUMBA = True
except ImportError:                                                     # pragma: no cover
    HAVE_NUMBA = False


def backend_name(name: str) -> str:
    """'fast' when numba is importable and asked for, else 'ref'."""
    return "fast" if name == "fast" and HAVE_NUMBA else "ref"


if HAVE_NUMBA:
    _I1, _I8, _I16, _I32, _I64 = (ir.IntType(b) for b in (1, 8, 16, 32, 64))
    _F32 = ir.FloatType()

    def _elem_ptr(context, builder, aty, arr, off, elt):
        """Pointer to element `off` of array `arr`, typed as elt*."""
        a = context.make_array(aty)(context, builder, arr)
        return builder.gep(builder.bitcast(a.data, elt.as_pointer()), [off])

    def _loop(builder, n, init, body):
        """for i in range(n): acc = body(i, acc) — returns acc (init when n <= 0). acc: tuple."""
        fn, pre = builder.function, builder.block
        loop, done = fn.append_basic_block("loop"), fn.append_basic_block("done")
        zero = ir.Constant(n.type, 0)
        builder.cbranch(builder.icmp_signed(">", n, zero), loop, done)
        builder.position_at_end(loop)
        i = builder.phi(n.type)
        accs = [builder.phi(v.type) for v in init]
        new = body(i, accs)
        inext = builder.add(i, ir.Constant(n.type, 1))
        end = builder.block
        i.add_incoming(zero, pre)
        i.add_incoming(inext, end)
        for a, v0, v1 in zip(accs, init, new):
            a.add_incoming(v0, pre)
            a.add_incoming(v1, end)
        builder.cbranch(builder.icmp_signed("<", inext, n), loop, done)
        builder.position_at_end(done)
        outs = []
        for v0, v1 in zip(init, new):
            ph = builder.phi(v0.type)
            ph.add_incoming(v0, pre)
            ph.add_incoming(v1, end)
            outs.append(ph)
        return outs

    def _reduce(builder, name, vty, v):
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty.element, [vty]), name)
        return builder.call(f, [v])

    @intrinsic
    def _tdot(typingctx, x16, xoff, plus, minus, poff, nwords):
        """int32 sum over nwords 64-bit words of (plus - minus)-masked x16[xoff + 64w + lane]."""
        sig = types.int32(x16, xoff, plus, minus, poff, nwords)

        def codegen(context, builder, signature, args):
            xv, xo, pv, mv, po, nw = args
            xp = _elem_ptr(context, builder, signature.args[0], xv, xo, _I16)
            pp = _elem_ptr(context, builder, signature.args[2], pv, po, _I8)
            mp = _elem_ptr(context, builder, signature.args[3], mv, po, _I8)
            V16, M64 = ir.VectorType(_I16, 64), ir.VectorType(_I1, 64)

            def body(i, accs):
                acc, = accs
                x = builder.load(builder.bitcast(builder.gep(xp, [builder.mul(i, ir.Constant(i.type, 64))]),
                                                 V16.as_pointer()), align=2)
                off = builder.mul(i, ir.Constant(i.type, 8))
                pw = builder.load(builder.bitcast(builder.gep(pp, [off]), _I64.as_pointer()), align=1)
                mw = builder.load(builder.bitcast(builder.gep(mp, [off]), _I64.as_pointer()), align=1)
                a1 = builder.select(builder.bitcast(pw, M64), builder.add(acc, x), acc)      # += x where +1
                a2 = builder.select(builder.bitcast(mw, M64), builder.sub(a1, x), a1)        # -= x where -1
                return [a2]
            acc, = _loop(builder, nw, [ir.Constant(V16, None)], body)
            V32 = ir.VectorType(_I32, 64)
            return _reduce(builder, "llvm.vector.reduce.add.v64i32", V32, builder.sext(acc, V32))
        return sig, codegen

    TR = 2                                                              # rows per _tdot_vnni call
    TT = 4                                                              # tokens per prefill tile

    def _tdot_factory(tt: int, prefetch: int = 0):
        @intrinsic
        def _tdot_vnni(typingctx, x8, xoff, kp, plus, minus, poff, kb, nwords, out, ooff):
            """out[ooff + r*tt + t] = int32 sum, r < TR, t < tt, of plane row poff + r*kb against
            the bit-transposed int8 activations x8[xoff + t*kp:] (AVX-512 VNNI, no mask registers).
            Per 64-bit plane word w:
                broadcast w to the 8 qwords of a zmm, AND qword q with (1 << q) in every byte
                  -> byte 8q + j = (byte j of w) & (1 << q) = 2^q * bit(8j + q)
                vpdpbusd with x8t, where x8t[64i + 8q + j] = xq[64i + 8j + q] (_act_quant_t)
                  -> int32 lane l (bytes 4l..4l+3, q = l // 2) += 2^q * sum of its 4 masked inputs
            then (acc_plus - acc_minus) >> (l // 2) per lane (exact: every term is a multiple of
            2^q) and a horizontal add. Two instructions per plane word and row (vpandq with an
            embedded broadcast load, vpdpbusd); each ANDed word serves tt tokens, each x load TR
            rows; 2*TR*tt independent accumulator chains."""
            sig = types.void(x8, xoff, kp, plus, minus, poff, kb, nwords, out, ooff)

            def codegen(context, builder, signature, args):
                xv, xo, kpv, pv, mv, po, kbv, nw, ov, oo = args
                xp = _elem_ptr(context, builder, signature.args[0], xv, xo, _I8)
                pp = _elem_ptr(context, builder, signature.args[3], pv, po, _I8)
                mp = _elem_ptr(context, builder, signature.args[4], mv, po, _I8)
                op = _elem_ptr(context, builder, signature.args[8], ov, oo, _I32)
                V8, V32, V64 = ir.VectorType(_I8, 64), ir.VectorType(_I32, 16), ir.VectorType(_I64, 8)
                dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V32, [V32] * 3),
                                                    "llvm.x86.avx512.vpdpbusd.512")
                bitsel = ir.Constant(V8, [1 << (j // 8) for j in range(64)])
                bcast = ir.Constant(ir.VectorType(_I32, 8), [0] * 8)

                def row(base, r):
                    return builder.bitcast(builder.gep(base, [builder.mul(kbv, ir.Constant(kbv.type, r))]),
                                           _I64.as_pointer())
                rows = [(row(pp, r), row(mp, r)) for r in range(TR)]
                xrows = [builder.gep(xp, [builder.mul(kpv, ir.Constant(kpv.type, t))]) for t in range(tt)]

                pf = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]),
                    "llvm.prefetch.p0i8")

                def body(i, accs):
                    if prefetch:
                        for base in (pp, mp):
                            a = builder.gep(base, [builder.add(builder.mul(i, ir.Constant(i.type, 8)),
                                                               ir.Constant(i.type, prefetch))])
                            builder.call(pf, [a, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
                    off = builder.mul(i, ir.Constant(i.type, 64))
                    xs = [builder.bitcast(builder.load(builder.bitcast(builder.gep(xr, [off]), V8.as_pointer()),
                                                       align=1), V32) for xr in xrows]
                    out = list(accs)
                    for r, (pw, mw) in enumerate(rows):
                        for h, w in enumerate((pw, mw)):
                            wd = builder.load(builder.gep(w, [i]), align=1)
                            q = builder.insert_element(ir.Constant(V64, None), wd, ir.Constant(_I32, 0))
                            q = builder.shuffle_vector(q, q, bcast)                 # w in all 8 qwords
                            b = builder.bitcast(builder.and_(builder.bitcast(q, V8), bitsel), V32)
                            for t, x in enumerate(xs):
                                j = (r * tt + t) * 2 + h
                                out[j] = builder.call(dp, [accs[j], b, x])
                    return out
                accs = _loop(builder, nw, [ir.Constant(V32, None)] * (2 * TR * tt), body)
                shift = ir.Constant(V32, [lane // 2 for lane in range(16)])
                for j in range(TR * tt):
                    d = builder.ashr(builder.sub(accs[2 * j], accs[2 * j + 1]), shift)
                    builder.store(_reduce(builder, "llvm.vector.reduce.add.v16i32", V32, d),
                                  builder.gep(op, [ir.Constant(_I64, j)]))
                return context.get_dummy_value()
            return sig, codegen
        return _tdot_vnni

    # decode streams the planes from memory: prefetching 512 bytes ahead measured ~5-10% faster
    # over all ternary layers of a 2B-4T-shaped model (256 and 768: no gain; 1024: slower)
    _tdot_vnni = _tdot_factory(1, prefetch=512)                         # decode: TR rows x 1 token
    _tdot_tile = _tdot_factory(TT)                                      # prefill: TR rows x TT tokens

    def _hdot_factory(kind: str):
        @intrinsic
        def _hdot(typingctx, w, woff, x, xoff, n32):
            """float32 sum over n32 groups of 32 of float(w16[woff + i]) * x[xoff + i]."""
            sig = types.float32(w, woff, x, xoff, n32)

            def codegen(context, builder, signature, args):
                wv, wo, xv, xo, n = args
                wp = _elem_ptr(context, builder, signature.args[0], wv, wo, _I16)
                xp = _elem_ptr(context, builder, signature.args[2], xv, xo, _F32)
                V16i, V16f = ir.VectorType(_I16, 16), ir.VectorType(_F32, 16)
                fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V16f, [V16f] * 3),
                                                     "llvm.fmuladd.v16f32")

                def widen(h):
                    if kind == "f16":
                        return builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), 16)), V16f)
                    z = builder.zext(h, ir.VectorType(_I32, 16))                   # bf16: bits << 16
                    return builder.bitcast(builder.shl(z, ir.Constant(ir.VectorType(_I32, 16), [16] * 16)), V16f)

                def body(i, accs):
                    base = builder.mul(i, ir.Constant(i.type, 32))
                    out = []
                    for h, acc in enumerate(accs):
                        o = builder.add(base, ir.Constant(i.type, 16 * h))
                        wh = builder.load(builder.bitcast(builder.gep(wp, [o]), V16i.as_pointer()), align=2)
                        xx = builder.load(builder.bitcast(builder.gep(xp, [o]), V16f.as_pointer()), align=4)
                        out.append(builder.call(fma, [widen(wh), xx, acc]))
                    return out
                a0, a1 = _loop(builder, n, [ir.Constant(V16f, None)] * 2, body)
                return _hsum(builder, builder.fadd(a0, a1))
            return sig, codegen
        return _hdot

    def _hsum(builder, v):
        """Horizontal float sum of a <16 x float>, pairwise (no fast-math reduction needed)."""
        n = v.type.count
        while n > 1:
            n //= 2
            lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n, 2 * n))))
            v = builder.fadd(lo, hi)
        return builder.extract_element(v, ir.Constant(_I32, 0))

    _hdot_f16 = _hdot_factory("f16")
    _hdot_bf16 = _hdot_factory("bf16")

    @njit(cache=True, inline="always")
    def _act_scale(xt):
        """127 / max(max |xt|, 1e-5) in float32: the per-token activation scale s."""
        amax = np.float32(0.0)
        for j in range(xt.shape[0]):
            a = abs(xt[j])
            if a > amax:
                amax = a
        return np.float32(127.0) / max(amax, np.float32(1e-5))

    @njit(cache=True)
    def _act_quant16(x, kp, x16, s):
        """x float32 [T, K] -> x16 int16 [T, kp] (int8 values), s float32 [T]; as act_quant_ref."""
        T, k = x.shape
        for t in range(T):
            st = s[t] = _act_scale(x[t])
            for j in range(k):
                v = np.rint(x[t, j] * st)
                v = min(max(v, np.float32(-128.0)), np.float32(127.0))
                x16[t, j] = np.int16(v)
            for j in range(k, kp):
                x16[t, j] = 0

    @njit(cache=True)
    def _act_quant_t(x, kp, x8t, s):
        """x float32 [T, K] -> x8t int8 [T, kp] bit-transposed (x8t[t, 64i + 8q + j] =
        xq[t, 64i + 8j + q], the order _tdot_vnni reads), s float32 [T]; xq as act_quant_ref."""
        T, k = x.shape
        for t in range(T):
            st = s[t] = _act_scale(x[t])
            for j in range(kp):
                v = np.float32(0.0)
                if j < k:
                    v = min(max(np.rint(x[t, j] * st), np.float32(-128.0)), np.float32(127.0))
                x8t[t, (j & ~63) | ((j & 7) << 3) | ((j >> 3) & 7)] = np.int8(v)

    @njit(cache=True)
    def _bit_transpose(x16, x8t):
        """int16 activations in natural order -> int8 in _tdot_vnni's order (see _act_quant_t)."""
        T, kp = x16.shape
        for t in range(T):
            for j in range(kp):
                x8t[t, (j & ~63) | ((j & 7) << 3) | ((j >> 3) & 7)] = np.int8(x16[t, j])

    RB = 8                                                              # rows per task

    @njit(parallel=True, cache=True)
    def _tmm(plus, minus, scale, x16, s, y):
        """y[T, N] from planes [N, Kp/8] and x16 [T, Kp]; blocks of RB rows x all tokens."""
        N, kb = plus.shape
        T, kp = x16.shape
        nw = kb // 8
        for b in prange((N + RB - 1) // RB):
            r1 = min(N, b * RB + RB)
            for t in range(T):
                for r in range(b * RB, r1):
                    acc = np.int32(0)
                    for w0 in range(0, nw, WORDS_PER_FLUSH):
                        acc += _tdot(x16, t * kp + w0 * 64, plus, minus, r * kb + w0 * 8,
                                     min(WORDS_PER_FLUSH, nw - w0))
                    y[t, r] = np.float32(acc) / s[t] * scale[r]

    @njit(parallel=True, cache=True)
    def _tmm_vnni(plus, minus, scale, x8, s, y):
        """As _tmm with x8 int8 [T, Kp] bit-transposed (_act_quant_t): tiles of TR rows x TT
        tokens, then TR rows x 1 token for the last T % TT (needs N % TR == 0)."""
        N, kb = plus.shape
        T, kp = x8.shape
        nw = kb // 8
        nb = (N + RB - 1) // RB
        acc = np.empty(nb * TR * TT, np.int32)                          # TR*TT sums per task
        for b in prange(nb):
            o = b * TR * TT
            for r in range(b * RB, min(N, b * RB + RB), TR):
                t0 = 0
                while t0 + TT <= T:
                    _tdot_tile(x8, t0 * kp, kp, plus, minus, r * kb, kb, nw, acc, o)
                    for i in range(TR):
                        for t in range(TT):
                            y[t0 + t, r + i] = np.float32(acc[o + i * TT + t]) / s[t0 + t] * scale[r + i]
                    t0 += TT
                for t in range(t0, T):
                    _tdot_vnni(x8, t * kp, kp, plus, minus, r * kb, kb, nw, acc, o)
                    for i in range(TR):
                        y[t, r + i] = np.float32(acc[o + i]) / s[t] * scale[r + i]

    def _hmv_factory(hdot):
        @njit(parallel=True, cache=True)
        def _hmv(w, x, y):
            """y[T, N] = x[T, K] @ w16[N, K].T for small T (decode); K % 32 == 0."""
            N, K = w.shape
            T = x.shape[0]
            n32 = K // 32
            for b in prange((N + 15) // 16):
                for r in range(b * 16, min(N, b * 16 + 16)):
                    for t in range(T):
                        y[t, r] = hdot(w, r * K, x, t * K, n32)
        return _hmv

    _hmv_f16 = _hmv_factory(_hdot_f16)
    _hmv_bf16 = _hmv_factory(_hdot_bf16)


def act_quant_fast(x: np.ndarray, kp: int):
    x = np.ascontiguousarray(x, np.float32)
    x16 = np.empty((x.shape[0], kp), np.int16)
    s = np.empty(x.shape[0], np.float32)
    _act_quant16(x, kp, x16, s)
    return x16, s


def _have_vnni() -> bool:
    try:
        from . import _simd
        return _simd.available()
    except Exception:                                                   # pragma: no cover
        return False


HAVE_VNNI = HAVE_NUMBA and _have_vnni()


def tmatmul_fast(plus, minus, scale, x16, s, vnni: bool | None = None) -> np.ndarray:
    """Numba ternary matmul: the VNNI kernel where the CPU has it (and N % TR == 0), else the
    masked-add kernel; both exact, same result."""
    y = np.empty((x16.shape[0], plus.shape[0]), np.float32)
    if (HAVE_VNNI if vnni is None else vnni) and plus.shape[0] % TR == 0:
        x8t = np.empty(x16.shape, np.int8)
        _bit_transpose(x16, x8t)
        _tmm_vnni(plus, minus, scale, x8t, s, y)
    else:
        _tmm(plus, minus, scale, x16, s, y)
    return y


def ternary_matmul(w, x: np.ndarray, backend: str = "ref") -> np.ndarray:
    """TernaryWeight w[N, K] applied to x[T, K] -> [T, N] (see the module docstring)."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"ternary matmul: x has shape {list(x.shape)}, expected [T, {w.shape[1]}]")
    kp = w.plus.shape[1] * 8
    if backend == "fast" and HAVE_VNNI and w.shape[0] % TR == 0:
        x = np.ascontiguousarray(x)                # quantized straight into the VNNI kernel's order
        x8t, s = np.empty((x.shape[0], kp), np.int8), np.empty(x.shape[0], np.float32)
        _act_quant_t(x, kp, x8t, s)
        y = np.empty((x.shape[0], w.shape[0]), np.float32)
        _tmm_vnni(w.plus, w.minus, w.scale, x8t, s, y)
        return y
    if backend == "fast" and HAVE_NUMBA:
        x16, s = act_quant_fast(x, kp)
        return tmatmul_fast(w.plus, w.minus, w.scale, x16, s, vnni=False)
    xq, s = act_quant_ref(x, kp)
    return tmatmul_ref(w.plus, w.minus, w.scale, w.shape[1], xq, s)


# ------------------------------------------------------------------------------------------------
# 16-bit output head (and embedding rows) without a float32 copy
# ------------------------------------------------------------------------------------------------

def half_to_f32(a: np.ndarray, kind: str) -> np.ndarray:
    """uint16 bits of f16 / bf16 -> float32."""
    if kind == "f16":
        return a.view(np.float16).astype(np.float32)
    return (a.astype(np.uint32) << 16).view(np.float32)


class HalfWeight:
    """A [N, K] matrix of f16 or bf16 values (uint16 bits, usually a memory map), used as the tied
    output head and the embedding table of BitNet models. Plug-in protocol: `prepare`, `matmul`;
    plus `rows(ids)` for embedding lookups and `shape`."""

    def __init__(self, bits: np.ndarray, kind: str, backend: str = "ref"):
        if kind not in ("f16", "bf16"):
            raise ValueError(f"HalfWeight kind must be f16 or bf16, not {kind!r}")
        self.bits = np.asarray(bits).view(np.uint16)
        if self.bits.ndim != 2:
            raise ValueError(f"HalfWeight needs a 2-D matrix, got shape {list(self.bits.shape)}")
        self.kind, self.backend = kind, backend
        self.shape = tuple(self.bits.shape)

    def prepare(self, backend: str) -> "HalfWeight":
        return HalfWeight(self.bits, self.kind, backend_name(backend))

    def rows(self, ids) -> np.ndarray:
        return half_to_f32(self.bits[np.asarray(ids, np.int64)], self.kind)

    def dequantize(self) -> np.ndarray:
        return half_to_f32(self.bits, self.kind)

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes

    def matmul(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        n, k = self.shape
        if x.ndim != 2 or x.shape[1] != k:
            raise ValueError(f"head matmul: x has shape {list(x.shape)}, expected [T, {k}]")
        if self.backend == "fast" and HAVE_NUMBA and x.shape[0] <= 4 and k % 32 == 0:
            y = np.empty((x.shape[0], n), np.float32)
            (_hmv_f16 if self.kind == "f16" else _hmv_bf16)(self.bits, x, y)
            return y
        return hmatmul_ref(self.bits, self.kind, x)


def hmatmul_ref(bits: np.ndarray, kind: str, x: np.ndarray) -> np.ndarray:
    """y[T, N] = x[T, K] @ W[N, K].T, CHUNK_ROWS rows decoded to float32 at a time."""
    n = bits.shape[0]
    y = np.empty((x.shape[0], n), np.float32)
    for r0 in range(0, n, CHUNK_ROWS):
        r1 = min(n, r0 + CHUNK_ROWS)
        y[:, r0:r1] = x @ half_to_f32(bits[r0:r1], kind).T
    return y

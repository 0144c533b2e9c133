"""A tiny SIMD vocabulary for numba kernels: 256-bit vector values and a handful of instructions.

Why this exists: LLVM's auto-vectorizer does not vectorize the quantized dot products plainlm
needs (a 32-weight block: integer dot, then a per-block scale), see shared/notes. So the block
dot is spelled out with the instruction the hardware has for it, AVX-512-VNNI `vpdpbusd`
(u8 x s8, four products summed into each int32 lane), and the kernels in fast.py stay plain
Python loops over blocks that call these like functions:

    acc = vzero()                                       # 8 float lanes
    for b in range(nb):
        v = dpbusd(load_q4(qs, off), load_i8(xq, b*32))  # 32 MACs -> 8 int32 partial sums
        acc = fma_i(acc, v, d[b] * dx[b])               # acc += float(v) * scale
    y = hsum(acc)

Values of type F32x8 / I32x8 / I8x32 live in registers (LLVM vectors); they never touch memory.
Offsets are element offsets into 1-D (or C-contiguous) arrays; loads are unaligned and unchecked.
`available()` says whether the CPU has the instructions (x86-64 with AVX2 + AVX-512 VNNI/VL).
"""
from __future__ import annotations

import llvmlite.binding as llb
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, models, register_model

# ------------------------------------------------------------------------------------------------
# vector types
# ------------------------------------------------------------------------------------------------

_ELT = {"f32": ir.FloatType(), "i32": ir.IntType(32), "i8": ir.IntType(8)}


class VecType(types.Type):
    def __init__(self, elem: str, lanes: int):
        self.elem, self.lanes = elem, lanes
        super().__init__(name=f"Vec{lanes}x{elem}")


F32x8 = VecType("f32", 8)
I32x8 = VecType("i32", 8)
I8x32 = VecType("i8", 32)


def _llty(t: VecType):
    return ir.VectorType(_ELT[t.elem], t.lanes)


@register_model(VecType)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _llty(fe_type))


def available() -> bool:
    feats = llb.get_host_cpu_features()
    return all(feats.get(f, False) for f in ("avx2", "fma", "f16c", "avx512vnni", "avx512vl", "avx512bw"))


# ------------------------------------------------------------------------------------------------
# helpers for code generation
# ------------------------------------------------------------------------------------------------

def _vec_ptr(ctx, builder, arrty, arr, off, vecty):
    a = ctx.make_array(arrty)(ctx, builder, arr)
    p = builder.gep(a.data, [off])
    return builder.bitcast(p, vecty.as_pointer())


def _load(builder, ptr, vecty):
    v = builder.load(ptr)
    v.align = 1
    return v


def _decl(builder, name, ret, args):
    mod = builder.module
    fn = mod.globals.get(name)
    if fn is None:
        fn = ir.Function(mod, ir.FunctionType(ret, args), name=name)
    return fn


def _splat(builder, scalar, n):
    vty = ir.VectorType(scalar.type, n)
    v = builder.insert_element(ir.Constant(vty, None), scalar, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(vty, None), ir.Constant(ir.VectorType(ir.IntType(32), n), [0] * n))


def _check_arr(a, dtypes):
    return isinstance(a, types.Array) and a.dtype in dtypes


# ------------------------------------------------------------------------------------------------
# instructions
# ------------------------------------------------------------------------------------------------

@intrinsic
def vzero(typingctx):
    """F32x8 of zeros."""
    def codegen(ctx, builder, sig, args):
        return ir.Constant(_llty(F32x8), None)
    return F32x8(), codegen


@intrinsic
def load_q4(typingctx, arr, off):
    """16 bytes of packed nibbles at arr[off:off+16] -> I8x32 of values 0..15: the 16 low
    nibbles then the 16 high nibbles (ggml's order within a 32-weight block)."""
    if not _check_arr(arr, (types.uint8, types.int8)):
        return None

    def codegen(ctx, builder, sig, args):
        v16 = ir.VectorType(ir.IntType(8), 16)
        v = _load(builder, _vec_ptr(ctx, builder, sig.args[0], args[0], args[1], v16), v16)
        lo = builder.and_(v, ir.Constant(v16, [0x0F] * 16))
        hi = builder.lshr(v, ir.Constant(v16, [4] * 16))
        return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32))))
    return I8x32(arr, off), codegen


@intrinsic
def load_i8(typingctx, arr, off):
    """32 bytes at arr[off:off+32] as I8x32."""
    if not _check_arr(arr, (types.uint8, types.int8)):
        return None

    def codegen(ctx, builder, sig, args):
        ty = _llty(I8x32)
        return _load(builder, _vec_ptr(ctx, builder, sig.args[0], args[0], args[1], ty), ty)
    return I8x32(arr, off), codegen


@intrinsic
def load_f32(typingctx, arr, off):
    """8 floats at arr[off:off+8] as F32x8."""
    if not _check_arr(arr, (types.float32,)):
        return None

    def codegen(ctx, builder, sig, args):
        ty = _llty(F32x8)
        return _load(builder, _vec_ptr(ctx, builder, sig.args[0], args[0], args[1], ty), ty)
    return F32x8(arr, off), codegen


@intrinsic
def load_f16(typingctx, arr, off):
    """8 IEEE halves (stored as uint16) at arr[off:off+8] -> F32x8 (vcvtph2ps)."""
    if not _check_arr(arr, (types.uint16, types.int16)):
        return None

    def codegen(ctx, builder, sig, args):
        h8 = ir.VectorType(ir.HalfType(), 8)
        v = _load(builder, _vec_ptr(ctx, builder, sig.args[0], args[0], args[1], h8), h8)
        return builder.fpext(v, _llty(F32x8))
    return F32x8(arr, off), codegen


@intrinsic
def f16_at(typingctx, arr, off):
    """The IEEE half at *byte* offset `off` of a uint8 array (or element `off` of a uint16 array),
    as float32 (a ggml block's scale)."""
    if not _check_arr(arr, (types.uint8, types.int8, types.uint16, types.int16)):
        return None

    def codegen(ctx, builder, sig, args):
        a = ctx.make_array(sig.args[0])(ctx, builder, args[0])
        p = builder.bitcast(builder.gep(a.data, [args[1]]), ir.HalfType().as_pointer())
        h = builder.load(p)
        h.align = 1
        return builder.fpext(h, ir.FloatType())
    return types.float32(arr, off), codegen


@intrinsic
def dpbusd(typingctx, u, s):
    """I32x8 lane j = sum_{i<4} u[4j+i] * s[4j+i], u read as unsigned bytes, s as signed (vpdpbusd)."""
    if u != I8x32 or s != I8x32:
        return None

    def codegen(ctx, builder, sig, args):
        i32x8 = _llty(I32x8)
        fn = _decl(builder, "llvm.x86.avx512.vpdpbusd.256", i32x8, [i32x8, i32x8, i32x8])
        a = builder.bitcast(args[0], i32x8)
        b = builder.bitcast(args[1], i32x8)
        return builder.call(fn, [ir.Constant(i32x8, None), a, b])
    return I32x8(u, s), codegen


@intrinsic
def hi_lo(typingctx, hi, lo):
    """hi * 256 + lo, both I32x8: joins the dots of an activation's two int8 levels."""
    if hi != I32x8 or lo != I32x8:
        return None

    def codegen(ctx, builder, sig, args):
        ty = _llty(I32x8)
        return builder.add(builder.shl(args[0], ir.Constant(ty, [8] * 8)), args[1])
    return I32x8(hi, lo), codegen


@intrinsic
def abs_i8(typingctx, w):
    """|w| per byte (as unsigned: |-128| = 128). With sign_i8 it turns s8 x s8 into u8 x s8."""
    if w != I8x32:
        return None

    def codegen(ctx, builder, sig, args):
        ty = _llty(I8x32)
        fn = _decl(builder, "llvm.abs.v32i8", ty, [ty, ir.IntType(1)])
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 0)])
    return I8x32(w), codegen


@intrinsic
def sign_i8(typingctx, x, w):
    """x with the sign of w per byte: -x where w < 0, 0 where w == 0, x elsewhere (vpsignb)."""
    if x != I8x32 or w != I8x32:
        return None

    def codegen(ctx, builder, sig, args):
        ty = _llty(I8x32)
        fn = _decl(builder, "llvm.x86.avx2.psign.b", ty, [ty, ty])
        return builder.call(fn, [args[0], args[1]])
    return I8x32(x, w), codegen


@intrinsic
def fma_i(typingctx, acc, v, s):
    """acc + float(v) * s: F32x8, I32x8, float32 scalar -> F32x8."""
    if acc != F32x8 or v != I32x8:
        return None

    def codegen(ctx, builder, sig, args):
        f8 = _llty(F32x8)
        fv = builder.sitofp(args[1], f8)
        sc = ctx.cast(builder, args[2], sig.args[2], types.float32)
        fn = _decl(builder, "llvm.fma.v8f32", f8, [f8, f8, f8])
        return builder.call(fn, [fv, _splat(builder, sc, 8), args[0]])
    return F32x8(acc, v, types.float32), codegen


@intrinsic
def fma_v(typingctx, acc, a, b):
    """acc + a * b, all F32x8."""
    if acc != F32x8 or a != F32x8 or b != F32x8:
        return None

    def codegen(ctx, builder, sig, args):
        f8 = _llty(F32x8)
        fn = _decl(builder, "llvm.fma.v8f32", f8, [f8, f8, f8])
        return builder.call(fn, [args[1], args[2], args[0]])
    return F32x8(acc, a, b), codegen


@intrinsic
def hsum(typingctx, v):
    """Sum of the 8 lanes of an F32x8 -> float32."""
    if v != F32x8:
        return None

    def codegen(ctx, builder, sig, args):
        x = args[0]
        for n in (4, 2, 1):                       # fold the upper half onto the lower half
            hi = builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(ir.IntType(32), 8),
                                                          [(i + n) % 8 for i in range(8)]))
            x = builder.fadd(x, hi)
        return builder.extract_element(x, ir.Constant(ir.IntType(32), 0))
    return types.float32(v), codegen


@intrinsic
def hsum_i(typingctx, v):
    """Sum of the 8 lanes of an I32x8 -> int32."""
    if v != I32x8:
        return None

    def codegen(ctx, builder, sig, args):
        x = args[0]
        for n in (4, 2, 1):
            hi = builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(ir.IntType(32), 8),
                                                          [(i + n) % 8 for i in range(8)]))
            x = builder.add(x, hi)
        return builder.extract_element(x, ir.Constant(ir.IntType(32), 0))
    return types.int32(v), codegen

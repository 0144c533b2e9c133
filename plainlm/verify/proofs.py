"""Proofs about plainlm's integer arithmetic (`plainlm verify proofs`, tests/test_proofs.py).

Each proof returns {"name", "statement", "method", "proved", "seconds", "detail"}. Methods:

  z3 (bit-vectors)  the negation of the statement is unsatisfiable over fixed-width machine
                    integers, i.e. it holds for *every* input — wrap-around included.
  z3 (integers)     the same over mathematical integers, used for value bounds; a machine
                    operation cannot overflow when its exact result provably fits the type.
  induction         a z3 proof of the base case and of one step with the running value a free
                    variable constrained by the invariant; by induction it holds for any length
                    (this is how sums over whole blocks and rows are proved without unrolling).
  exhaustive        every input of a finite domain is evaluated: also a proof, by enumeration.

(a) Ternary bit planes (plainlm/quant/ternary.py, plainlm/kernels/ternary.py): a weight row is two
    bit planes, plus and minus (plus_j = 1 iff t_j = +1, minus_j = 1 iff t_j = -1, never both);
    the kernel does masked adds acc += x_j where plus, acc -= x_j where minus on int16 lanes,
    flushed to int32 every 256 64-bit words. Proved: equal to the dense dot sum x_j * t_j for all
    int8 x; p & m = 0 for planes made from codes; no int16 lane overflow for |x| <= 127; the
    activation quantizer never produces -128 (z3 floating point), so |x| <= 127 holds.
(b) The integer mode's matmul (plainlm/integer.py `_qmatmul`): the int32 block dot of 32 int8
    products, the int64 block term xs * (wd * dot + wm * xsum), and the int64 sum over blocks,
    cannot overflow for any row length K <= MAX_K; the other int64 products of the integer mode
    (RMSNorm, attention, SiLU) stay in range under the runtime guards they have.
(c) The integer exp (`iexp`): |iexp(d) - 2^30 exp(d / 2^16)| <= 3.1 units of 2^-30 for every one
    of the 2^20 + 1 inputs d in [-16, 0] (exhaustive), monotone, iexp(0) = 2^30 exactly; below -16
    it is 0 (error < e^-16). The softmax error bound then follows (z3 over reals, n = 3 keys, with
    the argument for any n in the statement).
"""
from __future__ import annotations

import time

import numpy as np

INT8_MIN, INT8_MAX = -128, 127


def _z3():
    try:
        import z3
    except ImportError as e:                               # pragma: no cover - z3 is a dependency
        from ..cli import UserError
        raise UserError("the proofs need z3 (pip install z3-solver)") from e
    return z3


def _unsat(*constraints, timeout_ms: int = 120_000) -> tuple[bool, str]:
    """True when the constraints (a claimed counterexample) are unsatisfiable."""
    z3 = _z3()
    s = z3.Solver()
    s.set("timeout", timeout_ms)
    s.add(*constraints)
    r = s.check()
    if r == z3.unsat:
        return True, "unsat"
    if r == z3.sat:
        return False, f"counterexample: {s.model()}"
    return False, f"unknown ({s.reason_unknown()})"


def _result(name, statement, method, fn):
    t0 = time.perf_counter()
    proved, detail = fn()
    return {"name": name, "statement": statement, "method": method, "proved": bool(proved),
            "seconds": round(time.perf_counter() - t0, 3), "detail": detail}


# ------------------------------------------------------------------------------------------------
# (a) ternary bit planes
# ------------------------------------------------------------------------------------------------

def proof_bitplane_dot():
    """Masked adds over the planes == dense ternary dot, any block length (induction on lanes)."""
    z3 = _z3()

    def fn():
        s = z3.BitVec("acc", 32)                           # the running sum: any value at all
        x = z3.BitVec("x", 8)                              # any int8 activation
        p, m = z3.BitVec("p", 1), z3.BitVec("m", 1)        # the two plane bits of this lane
        x32 = z3.SignExt(24, x)
        planes = s + z3.If(p == 1, x32, 0) - z3.If(m == 1, x32, 0)
        t = z3.ZeroExt(31, p) - z3.ZeroExt(31, m)          # the dense weight in {-1, 0, 1}
        dense = s + x32 * t
        ok_step, d1 = _unsat((p & m) == 0, planes != dense)
        # t is exactly the ternary weight: p & m = 0 leaves (p, m) in {(0,0), (1,0), (0,1)}
        ok_t, d2 = _unsat((p & m) == 0, z3.Not(z3.Or(t == 0, t == 1, t == 2 ** 32 - 1)))
        # the base case: both sums start at 0 (nothing to prove beyond equal initial values)
        return ok_step and ok_t, f"step: {d1}; weights in {{-1,0,1}}: {d2}"
    return _result("bitplane_dot_equals_dense",
                   "for all int8 x_j and plane bits p_j, m_j with p_j & m_j = 0, and any length K: "
                   "sum_j [p_j] x_j - [m_j] x_j == sum_j x_j * (p_j - m_j) in int32 (wrapping) arithmetic",
                   "z3 bit-vectors, induction on lanes", fn)


def proof_planes_from_codes():
    """planes_from_codes: plus = (code == 2), minus = (code == 0) -> disjoint, and p - m = code - 1."""
    z3 = _z3()

    def fn():
        c = z3.BitVec("code", 8)
        p = z3.If(c == 2, z3.BitVecVal(1, 8), z3.BitVecVal(0, 8))
        m = z3.If(c == 0, z3.BitVecVal(1, 8), z3.BitVecVal(0, 8))
        ok, d = _unsat(z3.ULE(c, 2), z3.Or((p & m) != 0, p - m != c - 1))
        return ok, d
    return _result("planes_from_codes_disjoint",
                   "for every code c in {0,1,2}: plus = [c == 2], minus = [c == 0] satisfy plus & minus = 0 "
                   "and plus - minus = c - 1 (the ternary weight)", "z3 bit-vectors", fn)


def proof_int16_lanes(words_per_flush: int = 256):
    """An int16 lane adds or subtracts one |x| <= 127 per 64-bit word: after w <= 256 words
    |lane| <= 127 w <= 32512 — never wraps (induction on words)."""
    z3 = _z3()

    def fn():
        lane, x = z3.BitVec("lane", 16), z3.BitVec("x", 16)
        w = z3.BitVec("w", 16)                              # words done so far
        sel = z3.BitVec("sel", 2)                           # 0: skip, 1: plus, 2: minus
        lim = 127 * w
        inv = z3.And(z3.ULT(w, words_per_flush), lane <= lim, lane >= -lim)
        xin = z3.And(x >= -127, x <= 127)
        new = z3.If(sel == 1, lane + x, z3.If(sel == 2, lane - x, lane))
        ok_inv, d1 = _unsat(inv, xin, z3.ULE(sel, 2), z3.Not(z3.And(new <= lim + 127, new >= -(lim + 127))))
        # and no wrap: the 16-bit result equals the exact one (sign-extended to 32 bits)
        exact = z3.If(sel == 1, z3.SignExt(16, lane) + z3.SignExt(16, x),
                      z3.If(sel == 2, z3.SignExt(16, lane) - z3.SignExt(16, x), z3.SignExt(16, lane)))
        ok_wrap, d2 = _unsat(inv, xin, z3.ULE(sel, 2), z3.SignExt(16, new) != exact)
        ok_max = 127 * words_per_flush <= 2 ** 15 - 1
        return ok_inv and ok_wrap and ok_max, f"invariant: {d1}; no wrap: {d2}; 127*{words_per_flush} = {127 * words_per_flush} <= 32767"
    return _result("ternary_int16_lanes_no_overflow",
                   f"with |x| <= 127, an int16 lane after w <= {words_per_flush} words of masked adds holds "
                   f"|lane| <= 127 w <= {127 * words_per_flush}: no int16 wrap before the int32 flush",
                   "z3 bit-vectors, induction on words", fn)


def proof_act_quant_range():
    """The ternary activation quantizer (kernels/ternary.py): s = 127 / max(a, 1e-5) in float32,
    xq = clamp(rint(x * s), -128, 127) with |x| <= a. Proved: rint(x * s) is within [-127, 127],
    so xq is never -128 and |xq| <= 127 (what proof_int16_lanes assumes)."""
    z3 = _z3()

    def fn():
        F = z3.Float32()
        rne = z3.RNE()
        x, a = z3.FP("x", F), z3.FP("a", F)
        amax = z3.If(z3.fpGT(a, z3.FPVal(1e-5, F)), a, z3.FPVal(1e-5, F))
        s = z3.fpDiv(rne, z3.FPVal(127.0, F), amax)
        v = z3.fpRoundToIntegral(rne, z3.fpMul(rne, x, s))
        pre = [z3.Not(z3.fpIsNaN(a)), z3.Not(z3.fpIsInf(a)),
               z3.Not(z3.fpIsNaN(x)), z3.fpLEQ(z3.fpAbs(x), a), z3.fpGT(a, z3.FPVal(0.0, F))]
        return _unsat(*pre, z3.Or(z3.fpGT(v, z3.FPVal(127.0, F)), z3.fpLT(v, z3.FPVal(-127.0, F))),
                      timeout_ms=300_000)
    return _result("ternary_act_quant_never_128",
                   "for all finite float32 x, a with 0 < a, |x| <= a: rint_even(fl(x * fl(127 / max(a, 1e-5)))) "
                   "lies in [-127, 127]", "z3 floating point (IEEE binary32, round to nearest even)", fn)


# ------------------------------------------------------------------------------------------------
# (b) integer-mode overflow bounds
# ------------------------------------------------------------------------------------------------

def proof_int32_block_dot():
    """acc += int32(xq) * int32(wq) over the 32 lanes of a block: no int32 overflow, |acc| <= 32*128*127."""
    z3 = _z3()
    from ..integer import QK

    def fn():
        acc, j = z3.BitVec("acc", 32), z3.BitVec("j", 32)
        x8, w8 = z3.BitVec("x", 8), z3.BitVec("w", 8)
        x, w = z3.SignExt(24, x8), z3.SignExt(24, w8)
        bound = 128 * 127
        inv = z3.And(z3.ULT(j, QK), acc <= j * bound, acc >= -j * bound)
        xin = z3.And(x >= -127, x <= 127)                 # quantize_act: |q| <= 127; w: any int8
        new = acc + x * w
        exact = z3.SignExt(32, acc) + z3.SignExt(32, x) * z3.SignExt(32, w)
        ok1, d1 = _unsat(inv, xin, z3.SignExt(32, new) != exact)
        ok2, d2 = _unsat(inv, xin, z3.Not(z3.And(new <= (j + 1) * bound, new >= -(j + 1) * bound)))
        return ok1 and ok2 and QK * bound < 2 ** 31, f"no wrap: {d1}; invariant: {d2}; |acc| <= {QK * bound}"
    return _result("integer_int32_block_dot",
                   "integer mode: a block's int32 sum of 32 products int8 activation (|q| <= 127) x int8 "
                   "weight never wraps; |dot| <= 32 * 128 * 127 = 520192",
                   "z3 bit-vectors, induction on lanes", fn)


def matmul_bounds():
    """The value bounds the integer matmul's int64 arithmetic relies on (see integer.py)."""
    from ..integer import ACT_BITS, MAX_K, QK, W_SCALE_BITS
    return {"dot": QK * 128 * 127, "xsum": QK * 127, "xs": -(-(2 ** ACT_BITS) // 127),
            "w": 2 ** W_SCALE_BITS - 1, "nb": MAX_K // QK}


def proof_int64_matmul():
    """tot += xs * (wd * dot + wm * xsum) over nb <= MAX_K/32 blocks: every int64 intermediate fits."""
    z3 = _z3()

    def fn():
        b = matmul_bounds()
        dot, xsum, xs, wd, wm, k, tot = z3.Ints("dot xsum xs wd wm k tot")
        rng = z3.And(-b["dot"] <= dot, dot <= b["dot"], -b["xsum"] <= xsum, xsum <= b["xsum"],
                     1 <= xs, xs <= b["xs"], -b["w"] <= wd, wd <= b["w"], -b["w"] <= wm, wm <= b["w"])
        B = b["xs"] * (b["w"] * b["dot"] + b["w"] * b["xsum"])          # per-block bound (a constant)
        lo, hi = -(2 ** 63), 2 ** 63 - 1
        inside = lambda e: z3.And(lo <= e, e <= hi)
        term = xs * (wd * dot + wm * xsum)
        # every intermediate of one block, and the block term's bound
        ok1, d1 = _unsat(rng, z3.Not(z3.And(inside(wd * dot), inside(wm * xsum), inside(wd * dot + wm * xsum),
                                            -B <= term, term <= B)))
        # the running sum: after k blocks |tot| <= k B; one more block keeps it, for k < nb
        inv = z3.And(0 <= k, k < b["nb"], -k * B <= tot, tot <= k * B)
        ok2, d2 = _unsat(inv, -B <= z3.Int("t"), z3.Int("t") <= B,
                         z3.Not(z3.And(inside(tot + z3.Int("t")), -(k + 1) * B <= tot + z3.Int("t"),
                                       tot + z3.Int("t") <= (k + 1) * B)))
        total = b["nb"] * B
        return ok1 and ok2 and total < 2 ** 63, (f"block term |.| <= {B} (2^{np.log2(B):.1f}): {d1}; "
                                                 f"sum of {b['nb']} blocks |.| <= {total} (2^{np.log2(total):.2f} < 2^63): {d2}")
    return _result("integer_int64_matmul_accumulation",
                   "integer mode, any K <= MAX_K: per block xs * (wd * dot + wm * xsum) with |dot| <= 520192, "
                   "|xsum| <= 4064, 1 <= xs <= 8257, |wd|, |wm| < 2^16, and the int64 sum over K/32 blocks, "
                   "never leave int64 (the output shift is a right shift: integer.py refuses left shifts)",
                   "z3 integers (nonlinear), induction on blocks", fn)


def proof_int64_other_ops():
    """Bounds of the remaining int64 products, given the runtime guards in integer.py."""
    z3 = _z3()

    def fn():
        from ..integer import FRAC, PROB, TRIG
        lo, hi = -(2 ** 63), 2 ** 63 - 1
        q, k, v, c, g, u, sig, x15, gain, p, n = z3.Ints("q k v c g u sig x15 gain p n")
        G = 2 ** 31 - 1                                   # guard: |activation| < 2^31 (|real| < 32768)
        checks = {
            # RoPE: x (Q.16, |x| < 2^31) times cos/sin (Q.24), two products added
            "rope": (z3.And(-G <= q, q <= G, -G <= k, k <= G, -(2 ** TRIG) <= c, c <= 2 ** TRIG),
                     q * c - k * c, 2 * G * 2 ** TRIG),
            # SiLU(g) * u, both |.| < 2^31 (silu(g) <= |g|)
            "silu*up": (z3.And(-G <= g, g <= G, -G <= u, u <= G), g * u, G * G),
            # sigmoid product inside SiLU: |x| <= 16 * 2^16, sigmoid in [0, 2^30]
            "x*sigmoid": (z3.And(-(16 << FRAC) <= g, g <= 16 << FRAC, 0 <= sig, sig <= 2 ** 30), g * sig, (16 << FRAC) * 2 ** 30),
            # RMSNorm numerator x' * gain << 8, |x'| <= 2^15, |gain| < 2^31, doubled for rounding
            "rmsnorm": (z3.And(-(2 ** 15) <= x15, x15 <= 2 ** 15, -G <= gain, gain <= G), 2 * x15 * gain * 256, 2 * 2 ** 15 * G * 256),
            # attention output: sum of p_j * v_j with sum p_j <= 2^20 + n, |v| < 2^31, n <= 2^16 keys
            "attn p*v": (z3.And(0 <= p, p <= 2 ** PROB + n, 0 <= n, n <= 2 ** 16, -G <= v, v <= G), p * v, (2 ** PROB + 2 ** 16) * G),
        }
        details, ok_all = [], True
        for name, (pre, expr, bound) in checks.items():
            ok, d = _unsat(pre, z3.Not(z3.And(-bound <= expr, expr <= bound)))
            ok = ok and bound <= hi and -bound >= lo
            ok_all &= ok
            details.append(f"{name}: |.| <= 2^{np.log2(bound):.2f} {'ok' if ok else d}")
        # q . k over Dh <= 256 lanes with the guard |q|, |k| < 2^27 (|real| < 2048)
        dk = 256 * (2 ** 27) ** 2
        ok_all &= dk <= hi
        details.append(f"q.k: 256 * (2^27)^2 = 2^{np.log2(dk):.0f} <= 2^63 - 1 (guard |q|, |k| < 2^27)")
        return ok_all, "; ".join(details)
    return _result("integer_int64_other_ops",
                   "integer mode: RoPE, SiLU, RMSNorm, attention products stay inside int64 given the "
                   "runtime guards (|activation| < 2^31 in Q.16, |q|, |k| < 2^27, Dh <= 256)",
                   "z3 integers", fn)


# ------------------------------------------------------------------------------------------------
# (c) integer exp / softmax
# ------------------------------------------------------------------------------------------------

EXP_BOUND_UNITS = 3.1        # |iexp(d) - 2^30 e^(d/2^16)| on [-16, 0], in units of 2^-30


def proof_iexp_exhaustive():
    from ..integer import EXP_MIN, FRAC, _iexp1, iexp

    def fn():
        d = np.arange(EXP_MIN, 1, dtype=np.int64)                    # all 2^20 + 1 inputs
        E = iexp(d)
        ref = np.exp(d.astype(np.float64) / 2.0 ** FRAC) * 2.0 ** 30  # float64: error < 1e-6 units
        err = np.abs(E - ref)
        worst = int(err.argmax())
        mono = bool(np.all(np.diff(E) >= 0))
        # the numba scalar twin used by the attention kernel computes the same integers
        twin = np.array([_iexp1(np.int64(v)) for v in d[::4099]], np.int64)
        same = bool(np.array_equal(twin, E[::4099])) and int(_iexp1(np.int64(0))) == 2 ** 30
        below = int(iexp(np.array([EXP_MIN - 1, -(2 ** 40)]))[0]) == 0
        ok = err.max() <= EXP_BOUND_UNITS and mono and int(E[-1]) == 2 ** 30 and same and below
        return ok, (f"{len(d)} inputs; max error {err.max():.4f} units of 2^-30 at d = {d[worst] / 2 ** FRAC:.6f}; "
                    f"monotone: {mono}; iexp(0) = 2^30: {int(E[-1]) == 2 ** 30}; scalar twin equal: {same}; "
                    f"below -16 -> 0: {below}")
    return _result("iexp_error_bound",
                   f"for every Q.16 input d in [-16, 0] (2^20 + 1 values): |iexp(d) - 2^30 exp(d/2^16)| <= "
                   f"{EXP_BOUND_UNITS} (units of 2^-30, i.e. 2.9e-9); iexp is monotone, iexp(0) = 2^30; for "
                   "d < -16 it returns 0 (error < e^-16 = 1.13e-7)", "exhaustive enumeration", fn)


def proof_softmax_bound():
    """If every exp is within delta of the truth and the row max's exp is exactly 1, each softmax
    weight is within delta * (1 + n p_j) <= (n + 1) delta of the true one (before the final Q.20
    rounding, which adds 2^-21). z3 proves the inequality over the reals for n = 3 keys; the
    algebra does not depend on n:
        |a_j/A - e_j/S| <= |a_j - e_j|/A + e_j |S - A|/(A S) <= delta + p_j n delta    (A, S >= 1)."""
    z3 = _z3()

    def fn():
        n = 3
        e = z3.Reals("e0 e1 e2")
        a = z3.Reals("a0 a1 a2")
        delta = z3.Real("delta")
        S, A = z3.Sum(e), z3.Sum(a)
        pre = [delta >= 0, e[0] == 1, a[0] == 1]                  # the max entry: exp(0) exactly
        for j in range(n):
            pre += [e[j] > 0, e[j] <= 1, a[j] >= 0, a[j] - e[j] <= delta, e[j] - a[j] <= delta]
        j = 1
        pj = e[j] / S
        err = a[j] / A - e[j] / S
        bound = delta * (1 + n * pj)
        return _unsat(*pre, z3.Or(err > bound, -err > bound), timeout_ms=120_000)
    return _result("softmax_error_bound",
                   "if |a_j - e_j| <= delta for all keys and the max key has a = e = 1, then "
                   "|a_j / sum(a) - e_j / sum(e)| <= delta (1 + n p_j) <= (n + 1) delta; with delta = "
                   f"{EXP_BOUND_UNITS} * 2^-30 inside [-16, 0] (1.13e-7 with the clip below -16) and the Q.20 "
                   "rounding of 2^-21, an attention weight over n keys is within (n + 1) * 1.13e-7 + 2^-21",
                   "z3 reals (nonlinear), n = 3; general n by the same two-line argument", fn)


PROOFS = [proof_bitplane_dot, proof_planes_from_codes, proof_int16_lanes, proof_act_quant_range,
          proof_int32_block_dot, proof_int64_matmul, proof_int64_other_ops, proof_iexp_exhaustive,
          proof_softmax_bound]


def run_all(only: str | None = None) -> list[dict]:
    out = []
    for p in PROOFS:
        if only and only not in p.__name__:
            continue
        out.append(p())
    return out


def format_results(res: list[dict]) -> str:
    lines = []
    for r in res:
        lines.append(f"[{'PROVED' if r['proved'] else 'FAILED'}] {r['name']} ({r['method']}, {r['seconds']:.2f} s)")
        lines.append(f"    {r['statement']}")
        lines.append(f"    {r['detail']}")
    n = sum(r["proved"] for r in res)
    lines.append(f"{n}/{len(res)} proved")
    return "\n".join(lines)

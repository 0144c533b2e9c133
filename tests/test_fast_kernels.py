"""Every fast kernel against its numpy twin (plainlm/kernels/ref.py), on random shapes incl. odd sizes.

Tolerances (relative to the largest |value| of the reference output):
  quantized matmul vs ref on the activations the kernel sees (x after quantize_act)   1e-5  (float order)
  quantized matmul vs ref on float x (two int8 levels ~ 16-bit activations)          2e-4
  float (F16/F32) matmul, rmsnorm, rope, swiglu, relu2_glu, attention                 1e-5
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

fast = pytest.importorskip("plainlm.kernels.fast", reason="fast backend needs numba and an AVX-512 VNNI CPU")
from plainlm.kernels import ref  # noqa: E402
from plainlm.quant import F16, F32, Q4_0, Q4_1, Q5_0, Q8_0, QTensor  # noqa: E402

rng = np.random.default_rng(1234)


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(1e-30, np.abs(b).max()))


QSHAPES = [(1, 32, 1), (37, 64, 1), (5, 96, 2), (33, 160, 3), (64, 576, 8), (7, 1536, 5), (130, 256, 17)]


@pytest.mark.parametrize("qt", [Q4_0, Q4_1, Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("n,k,t", QSHAPES)
def test_quantized_matmul(qt, n, k, t):
    w = QTensor.from_float(rng.standard_normal((n, k)).astype(np.float32), qt)
    x = (rng.standard_normal((t, k)) * rng.choice([0.01, 1, 30], (t, k))).astype(np.float32)  # outliers
    y = fast.matmul(fast.prepare(w), x)
    assert y.shape == (t, n) and y.dtype == np.float32
    xq, dx, _ = fast.quantize_act(x)
    assert rel(y, ref.matmul(w, fast.dequantize_act(xq, dx))) <= 1e-5
    assert rel(y, ref.matmul(w, x)) <= 2e-4


def test_quantize_act_error_bound():
    x = (rng.standard_normal((3, 256)) * 10).astype(np.float32)
    x[0, :32] = 0.0                                        # an all-zero block
    xq, dx, sx = fast.quantize_act(x)
    back = fast.dequantize_act(xq, dx)
    amax = np.abs(x).reshape(3, -1, 32).max(-1)
    err = np.abs(back - x).reshape(3, -1, 32).max(-1)
    assert np.all(err <= amax / (127 * 256) * 1.01)          # one step of the 2nd level (clamped at 127)
    assert np.allclose(sx, back.reshape(3, -1, 32).sum(-1), rtol=1e-5, atol=1e-6)
    assert np.all(back[0, :32] == 0)


@pytest.mark.parametrize("qt", [F16, F32], ids=lambda q: q.name)
@pytest.mark.parametrize("n,k,t", [(1, 1, 1), (37, 37, 1), (33, 64, 3), (5, 577, 2), (64, 576, 9)])
def test_float_matmul(qt, n, k, t):
    w = QTensor.from_float(rng.standard_normal((n, k)).astype(np.float32), qt)
    x = rng.standard_normal((t, k)).astype(np.float32)
    assert rel(fast.matmul(fast.prepare(w), x), ref.matmul(w, x)) <= 1e-5


def test_unsupported_type_falls_back_to_ref_with_one_warning():
    fast._warned.discard("Q5_0")
    w = QTensor(Q5_0, (8, 64), rng.integers(0, 256, (8, 2 * 22), dtype=np.uint8))
    w.data[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    w.data[:, 22:24] = np.frombuffer(np.float16(0.02).tobytes(), np.uint8)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        p1, p2 = fast.prepare(w), fast.prepare(w)
    assert sum("Q5_0" in str(r.message) for r in rec) == 1
    x = rng.standard_normal((2, 64)).astype(np.float32)
    assert np.array_equal(fast.matmul(p1, x), ref.matmul(w, x)) and p2 is not None


def test_plugin_weights_keep_their_own_kernels():
    class Plug:
        shape = (3, 4)

        def prepare(self, backend):
            self.backend = backend
            return self

        def matmul(self, x):
            return np.full((x.shape[0], 3), 7.0, np.float32)

    p = fast.prepare(Plug())
    assert p.backend == "fast" and np.all(fast.matmul(p, np.ones((2, 4), np.float32)) == 7)


@pytest.mark.parametrize("qt", [Q4_0, Q4_1, Q8_0], ids=lambda q: q.name)
def test_embed(qt):
    w = QTensor.from_float(rng.standard_normal((50, 96)).astype(np.float32), qt)
    ids = np.array([0, 49, 7, 7])
    assert np.array_equal(fast.embed(fast.prepare(w), ids), ref.embed(w, ids))
    out = np.empty(96, np.float32)                       # the fused path's row decoder
    fast._dequant_row(fast.prepare(w).data, fast._KIND[qt.id], 49, out)
    assert rel(out, ref.embed(w, [49])[0]) <= 1e-6


@pytest.mark.parametrize("t,d", [(1, 1), (1, 576), (5, 37), (17, 1536)])
def test_rmsnorm(t, d):
    x = (rng.standard_normal((t, d)) * 3).astype(np.float32)
    g = rng.standard_normal(d).astype(np.float32)
    assert rel(fast.rmsnorm(x, g, 1e-5), ref.rmsnorm(x, g, 1e-5)) <= 1e-5


@pytest.mark.parametrize("t,h,dh,rot,theta", [(1, 9, 64, 64, 1e5), (5, 3, 64, 32, 1e4), (3, 2, 10, 6, 5e5)])
def test_rope(t, h, dh, rot, theta):
    x = rng.standard_normal((t, h, dh)).astype(np.float32)
    pos = rng.integers(0, 9000, t)
    assert rel(fast.rope(x, pos, theta, rot), ref.rope(x, pos, theta, rot)) <= 1e-5


@pytest.mark.parametrize("t,f", [(1, 1536), (7, 33)])
def test_activations(t, f):
    g = (rng.standard_normal((t, f)) * 4).astype(np.float32)
    u = rng.standard_normal((t, f)).astype(np.float32)
    assert rel(fast.swiglu(g, u), ref.swiglu(g, u)) <= 1e-5
    assert rel(fast.relu2_glu(g, u), ref.relu2_glu(g, u)) <= 1e-5


@pytest.mark.parametrize("t,h,hkv,dh,s,start", [(1, 9, 3, 64, 1, 0), (1, 9, 3, 64, 300, 0), (6, 4, 2, 16, 6, 0),
                                                (5, 4, 4, 8, 40, 10), (64, 9, 3, 64, 100, 0)])
def test_attention(t, h, hkv, dh, s, start):
    q = rng.standard_normal((t, h, dh)).astype(np.float32)
    cache = rng.standard_normal((2, hkv, s + 50, dh)).astype(np.float32)   # as the model's cache rows
    k, v = cache[0, :, :s], cache[1, :, :s]                                # non-contiguous views
    pos = np.sort(rng.integers(start, start + s, t))
    pos[-1] = start + s - 1
    assert rel(fast.attention(q, k, v, pos, start), ref.attention(q, k, v, pos, start)) <= 1e-5

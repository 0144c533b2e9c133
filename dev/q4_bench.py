import time, numpy as np, numba
from numba import njit, prange
from plainlm.kernels._simd import *

@njit(parallel=True, cache=True, fastmath=True)
def mv1(qs, d, m, xq, dx, sx, y):
    N = qs.shape[0]; nb = d.shape[1]; rb = qs.shape[1]
    for r in prange(N):
        acc = vzero(); s = np.float32(0)
        for b in range(nb):
            v = dpbusd(load_q4(qs, r * rb + b * 16), load_i8(xq, b * 32))
            acc = fma_i(acc, v, d[r, b] * dx[b])
            s += m[r, b] * sx[b]
        y[r] = hsum(acc) + s

@njit(parallel=True, cache=True, fastmath=True)
def mv4(qs, d, m, xq, dx, sx, y):
    N = qs.shape[0]; nb = d.shape[1]; rb = qs.shape[1]
    for g in prange(N // 4):
        r = g * 4
        a0 = vzero(); a1 = vzero(); a2 = vzero(); a3 = vzero(); s0 = np.float32(0); s1 = s0; s2 = s0; s3 = s0
        for b in range(nb):
            xv = load_i8(xq, b * 32); dxb = dx[b]; sxb = sx[b]
            a0 = fma_i(a0, dpbusd(load_q4(qs, r * rb + b * 16), xv), d[r, b] * dxb)
            a1 = fma_i(a1, dpbusd(load_q4(qs, (r+1) * rb + b * 16), xv), d[r+1, b] * dxb)
            a2 = fma_i(a2, dpbusd(load_q4(qs, (r+2) * rb + b * 16), xv), d[r+2, b] * dxb)
            a3 = fma_i(a3, dpbusd(load_q4(qs, (r+3) * rb + b * 16), xv), d[r+3, b] * dxb)
            s0 += m[r, b] * sxb; s1 += m[r+1, b] * sxb; s2 += m[r+2, b] * sxb; s3 += m[r+3, b] * sxb
        y[r] = hsum(a0) + s0; y[r+1] = hsum(a1) + s1; y[r+2] = hsum(a2) + s2; y[r+3] = hsum(a3) + s3

def make(N, K, rng):
    qs = rng.integers(0, 256, (N, K // 2), dtype=np.uint8)
    d = rng.random((N, K // 32), dtype=np.float32) * 0.01
    m = -rng.random((N, K // 32), dtype=np.float32) * 0.05
    return qs, d, m

def refq(qs, d, m, xq, dx, sx):
    N = qs.shape[0]; nb = d.shape[1]
    q = qs.reshape(N, nb, 16)
    w = np.concatenate([q & 15, q >> 4], -1).astype(np.float32) * d[..., None] + m[..., None]
    x = xq.reshape(nb, 32).astype(np.float32) * dx[:, None]
    return (w.reshape(N, -1) @ x.reshape(-1))

rng = np.random.default_rng(0)
shapes = [(576, 576)] * 2 + [(192, 576)] * 2 + [(1536, 576)] * 2 + [(576, 1536)]
layers = [[make(N, K, rng) for N, K in shapes] for _ in range(30)]
xs = {}
for K in (576, 1536):
    xq = rng.integers(-127, 128, K, dtype=np.int8); dx = rng.random(K // 32, dtype=np.float32)
    sx = dx * xq.reshape(-1, 32).sum(1).astype(np.float32)
    xs[K] = (xq, dx, sx)
for f in (mv1, mv4):
    qs, d, m = layers[0][4]; y = np.empty(1536, np.float32)
    f(qs, d, m, *xs[576], y)
    print(f.__name__, "maxerr", np.abs(y - refq(qs, d, m, *xs[576])).max(), np.abs(y).max())
for nt in (1, 2):
    numba.set_num_threads(nt)
    for f in (mv1, mv4, mv1, mv4):
        ys = {N: np.empty(N, np.float32) for N in (192, 576, 1536)}
        best = 1e9
        for rep in range(5):
            t = time.perf_counter()
            for L in layers:
                for (qs, d, m) in L:
                    f(qs, d, m, *xs[qs.shape[1] * 2], ys[qs.shape[0]])
            best = min(best, time.perf_counter() - t)
        print(nt, f.__name__, f"{best*1e3:.2f} ms / 210 mats, {106e6/best/1e9:.2f} GMAC/s")

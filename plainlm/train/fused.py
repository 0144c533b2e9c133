"""Fused numba versions of the element-wise hot spots of a training step (the rest is BLAS).

numpy computes SwiGLU's backward in ~8 passes over [N, F] temporaries and the masked softmax over the
full T x T square; one compiled pass per row is faster and skips the masked half. Each function here
has the numpy original in layers.py as its twin (tests/test_train_grad.py compares them); layers.py
calls these only for float32 arrays and falls back to numpy when numba is missing
(PLAINLM_TRAIN_FUSED=0 also turns them off).
"""
from __future__ import annotations

import os

import numpy as np

try:
    if os.environ.get("PLAINLM_TRAIN_FUSED", "1") == "0":
        raise ImportError("disabled by PLAINLM_TRAIN_FUSED=0")
    from numba import njit, prange
    AVAILABLE = True
except ImportError:                                    # pragma: no cover
    AVAILABLE = False


def usable(*arrays) -> bool:
    return AVAILABLE and all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays)


if AVAILABLE:
    @njit(parallel=True, fastmath=False, cache=True)
    def swiglu_fwd(g, u):
        """h[N, F] = silu(g) * u."""
        N, F = g.shape
        h = np.empty_like(g)
        for n in prange(N):
            for f in range(F):
                x = g[n, f]
                h[n, f] = x / (np.float32(1.0) + np.exp(-x)) * u[n, f]
        return h

    @njit(parallel=True, fastmath=False, cache=True)
    def swiglu_bwd(dh, g, u):
        """-> dg, du for h = silu(g) * u."""
        N, F = g.shape
        dg = np.empty_like(g)
        du = np.empty_like(u)
        one = np.float32(1.0)
        for n in prange(N):
            for f in range(F):
                x = g[n, f]
                s = one / (one + np.exp(-x))
                d = dh[n, f]
                du[n, f] = d * x * s
                dg[n, f] = d * u[n, f] * (s * (one + x * (one - s)))
        return dg, du

    @njit(parallel=True, fastmath=False, cache=True)
    def causal_softmax_(s, T, scale):
        """In place on scores s[R, T] whose row r is the query at time r % T: softmax(scale * s) over
        keys 0..t, exact zeros after t."""
        R = s.shape[0]
        for r in prange(R):
            t = r % T
            m = -np.inf
            for j in range(t + 1):
                v = s[r, j] * scale
                s[r, j] = v
                if v > m:
                    m = v
            tot = np.float32(0.0)
            for j in range(t + 1):
                e = np.exp(s[r, j] - m)
                s[r, j] = e
                tot += e
            inv = np.float32(1.0) / tot
            for j in range(t + 1):
                s[r, j] *= inv
            for j in range(t + 1, s.shape[1]):
                s[r, j] = 0.0

    @njit(parallel=True, fastmath=False, cache=True)
    def causal_softmax_bwd_(dp, p, T, scale):
        """In place: dp <- scale * p * (dp - sum_j dp*p), rows as in causal_softmax_."""
        R = dp.shape[0]
        for r in prange(R):
            t = r % T
            acc = np.float32(0.0)
            for j in range(t + 1):
                acc += dp[r, j] * p[r, j]
            for j in range(t + 1):
                dp[r, j] = scale * p[r, j] * (dp[r, j] - acc)
            for j in range(t + 1, dp.shape[1]):
                dp[r, j] = 0.0

    @njit(parallel=True, fastmath=False, cache=True)
    def rmsnorm_fwd(x, g, eps):
        """-> y[N, D], xhat[N, D], rstd[N, 1] (float32 throughout, sum in float32 like numpy's mean)."""
        N, D = x.shape
        y = np.empty_like(x)
        xhat = np.empty_like(x)
        rstd = np.empty((N, 1), x.dtype)
        for n in prange(N):
            ss = np.float32(0.0)
            for d in range(D):
                ss += x[n, d] * x[n, d]
            r = np.float32(1.0) / np.sqrt(ss / np.float32(D) + np.float32(eps))
            rstd[n, 0] = r
            for d in range(D):
                xh = x[n, d] * r
                xhat[n, d] = xh
                y[n, d] = xh * g[d]
        return y, xhat, rstd

    @njit(parallel=True, fastmath=False, cache=True)
    def rmsnorm_bwd(dy, xhat, rstd, g):
        """-> dx[N, D], per-row partial dg summed by the caller ([N, D] would be large: chunk rows)."""
        N, D = dy.shape
        dx = np.empty_like(dy)
        nchunk = 16
        dgp = np.zeros((nchunk, D), np.float32)
        per = (N + nchunk - 1) // nchunk
        for c in prange(nchunk):
            for n in range(c * per, min(N, (c + 1) * per)):
                acc = np.float32(0.0)
                for d in range(D):
                    dgp[c, d] += dy[n, d] * xhat[n, d]
                    acc += dy[n, d] * g[d] * xhat[n, d]
                acc /= np.float32(D)
                r = rstd[n, 0]
                for d in range(D):
                    dx[n, d] = r * (dy[n, d] * g[d] - xhat[n, d] * acc)
        return dx, dgp.sum(axis=0)

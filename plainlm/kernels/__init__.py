"""The kernel interface the model calls. Two backends with the same names and signatures:

    ref   numpy, float32, the oracle (plainlm/kernels/ref.py)
    fast  compiled with numba, working on the quantized blocks (plainlm/kernels/fast.py)

Ops: prepare(QTensor) -> backend weight, matmul(w, x[T,K]) -> [T,N], embed(w, ids) -> [T,D],
vector(w) -> [D], rmsnorm, rope, attention, swiglu, relu2_glu.
Choose with PLAINLM_BACKEND=ref|fast (default fast); a missing fast backend falls back to ref.
"""
from __future__ import annotations

import os
import warnings

from . import ref

_warned = set()


def get_backend(name: str | None = None):
    name = (name or os.environ.get("PLAINLM_BACKEND") or "fast").lower()
    if name == "ref":
        return ref
    if name == "fast":
        try:
            from . import fast
            return fast
        except ImportError as e:
            if "fast" not in _warned:
                _warned.add("fast")
                warnings.warn(f"plainlm: fast backend unavailable ({e}); using the numpy reference", stacklevel=2)
            return ref
    raise ValueError(f"unknown backend {name!r} (PLAINLM_BACKEND must be 'ref' or 'fast')")


def set_threads(n: int | None) -> None:
    """--threads / PLAINLM_THREADS: numba's thread pool (and BLAS for the reference)."""
    n = n or int(os.environ.get("PLAINLM_THREADS", "0") or 0) or os.cpu_count() or 1
    try:
        import numba
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(n)
    except ImportError:
        pass

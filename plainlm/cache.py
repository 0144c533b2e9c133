"""Preallocated KV cache addressed by (layer, slot, position), and its constant-memory sibling.

k, v: [L, B, Hkv, S, Dh] where B is the number of slots (sequences decoded together) and S the
number of cache rows. np.zeros maps untouched pages lazily, so memory grows with the tokens stored.

The model asks the cache three things (so that a cache may place positions where it likes):
    rows(pos)              the cache row that holds each position
    keep_sinks(...)        a chance to keep un-rotated keys (the windowed cache's attention sinks)
    attend(i, s, pos)      the keys/values a query of slot s at positions pos attends to, and the
                           positions to mask with
and the fused decode path asks `plan(pos, slot)` for the same facts as arrays.

KVCache: row = position; the context is S positions.
WindowedKVCache: StreamingLLM (Xiao et al. 2023, "Efficient streaming language models with
attention sinks"): the first `sinks` positions plus the most recent `window` ones, so generation
can run far past the context length at constant memory.
"""
from __future__ import annotations

import sys

import numpy as np

from .config import ModelConfig


class ContextFull(ValueError):
    pass


def _lazy_zeros(shape, dtype) -> np.ndarray:
    """np.zeros whose pages are mapped as tokens arrive. With transparent huge pages on, the first
    write into a 2 MB region maps all of it, so a long cache would be resident after a few tokens;
    MADV_NOHUGEPAGE keeps the growth per 4 KB page (Linux; elsewhere a no-op)."""
    a = np.zeros(shape, dtype)
    if a.nbytes >= 1 << 22 and sys.platform.startswith("linux"):
        try:
            import ctypes
            import mmap
            libc = ctypes.CDLL(None, use_errno=True)
            page = mmap.PAGESIZE
            start = -(-a.ctypes.data // page) * page
            end = (a.ctypes.data + a.nbytes) // page * page
            if end > start:
                libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 15)  # MADV_NOHUGEPAGE
        except (OSError, AttributeError):
            pass
    return a


class KVCache:
    def __init__(self, cfg: ModelConfig, n_ctx: int, n_slots: int = 1, dtype=np.float32):
        if n_ctx <= 0 or n_slots <= 0:
            raise ValueError(f"KV cache needs n_ctx > 0 and n_slots > 0 (got {n_ctx}, {n_slots})")
        self.config = cfg
        self.n_ctx, self.n_slots = n_ctx, n_slots
        self.n_rows = n_ctx
        shape = (cfg.n_layers, n_slots, cfg.n_kv_heads, n_ctx, cfg.head_dim)
        self.k = _lazy_zeros(shape, dtype)
        self.v = _lazy_zeros(shape, dtype)
        self.length = np.zeros(n_slots, np.int64)     # positions filled per slot
        # un-rotated keys of attention sinks [L, B, n_sinks, Hkv, Dh]: none in a plain cache
        self.k_sink = np.zeros((cfg.n_layers, n_slots, 0, cfg.n_kv_heads, cfg.head_dim), dtype)

    def reset(self, slot: int | None = None) -> None:
        if slot is None:
            self.length[:] = 0
        else:
            self.length[slot] = 0

    def check_room(self, slot: int, n_new: int) -> None:
        if self.length[slot] + n_new > self.n_ctx:
            raise ContextFull(f"context full: {int(self.length[slot])} + {n_new} tokens exceed the "
                              f"context length {self.n_ctx}")

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.k_sink.nbytes

    # ---- what the model asks -------------------------------------------------------------------

    def rows(self, pos: np.ndarray) -> np.ndarray:
        """Cache row of each position: the position itself."""
        return pos

    def keep_sinks(self, i: int, slot: np.ndarray, pos: np.ndarray, k_raw: np.ndarray) -> None:
        """Keys before RoPE, for caches that re-rotate some of them (not this one)."""

    def attend(self, i: int, s: int, pos: np.ndarray):
        """Keys, values [Hkv, n, Dh] that queries of slot s at positions pos[T'] attend to (rows
        0..n-1), and the positions to mask with (row j holds position j)."""
        n = int(pos.max()) + 1
        return self.k[i, s, :, :n], self.v[i, s, :, :n], pos

    def plan(self, pos: np.ndarray, slot: np.ndarray):
        """For one token per slot (decoding): its cache row, the number of rows it sees, and the
        position to rotate the sinks to (-1: leave them)."""
        pos = np.asarray(pos, np.int64)
        return pos, pos + 1, np.full(len(pos), -1, np.int64)


class WindowedKVCache(KVCache):
    """Attention sinks + a sliding window, at constant memory (StreamingLLM).

    Rows 0..sinks-1 hold the first `sinks` positions; rows sinks..sinks+window-1 are a ring holding
    the most recent `window` positions (position p >= sinks lives in row sinks + (p - sinks) % window).

    Positions inside the cache: once the window has slid, the model must see the sinks right before
    the oldest recent token, not at their true (far away) positions. Recent keys are stored rotated
    by their true position, so their distances to the query are the true ones (< window); the sinks'
    un-rotated keys are kept aside and, for a query at position p, rotated to positions
    p - window - sinks + 1 + j (j = 0..sinks-1), i.e. contiguous with the window. Attention sums
    over keys, so the order of rows in the ring does not matter.

    A chunk of several tokens may be fed while nothing has been evicted yet; past that, one token at
    a time (`prefill` does this by itself). Positions are unbounded.
    """

    def __init__(self, cfg: ModelConfig, window: int, n_slots: int = 1, dtype=np.float32, sinks: int = 4):
        if window <= 0 or sinks < 0:
            raise ValueError(f"window must be > 0 and sinks >= 0 (got {window}, {sinks})")
        super().__init__(cfg, sinks + window, n_slots, dtype)
        self.window, self.sinks = window, sinks
        self.n_ctx = sys.maxsize                       # positions never run out
        self.k_sink = np.zeros((cfg.n_layers, n_slots, sinks, cfg.n_kv_heads, cfg.head_dim), dtype)

    def check_room(self, slot: int, n_new: int) -> None:
        pass

    def rows(self, pos):
        pos = np.asarray(pos, np.int64)
        return np.where(pos < self.sinks, pos, self.sinks + (pos - self.sinks) % self.window)

    def keep_sinks(self, i, slot, pos, k_raw):
        first = pos < self.sinks
        if np.any(first):
            self.k_sink[i, slot[first], pos[first]] = k_raw[first]

    def _sink_to(self, p: int) -> int:
        """Position the sinks start at for a query at p (-1: at their own positions)."""
        return p - self.window - self.sinks + 1 if p >= self.sinks + self.window else -1

    def attend(self, i, s, pos):
        p = int(pos.max())
        if p < self.sinks + self.window:                # nothing evicted yet: an ordinary cache
            return super().attend(i, s, pos)
        if len(pos) > 1:
            raise ValueError("past the window, feed a windowed cache one token per slot at a time")
        from .kernels import ref
        c = self.config
        at = self._sink_to(p) + np.arange(self.sinks)
        self.k[i, s, :, :self.sinks] = ref.rope(self.k_sink[i, s], at, c.rope_theta, c.rotary_dim).transpose(1, 0, 2)
        n = self.sinks + self.window
        return self.k[i, s], self.v[i, s], np.array([n - 1])     # every row is visible

    def plan(self, pos, slot):
        pos = np.asarray(pos, np.int64)
        n = np.minimum(pos + 1, self.sinks + self.window)
        return self.rows(pos), n, np.array([self._sink_to(int(p)) for p in pos], np.int64)

    # ---- what the generator calls ---------------------------------------------------------------

    def prefill(self, m, ids, start: int = 0, slot: int = 0):
        """Feed a prompt from position `start`: in chunks while it fits, then token by token.
        Returns the last token's logits."""
        from .model import forward, prefill
        ids = list(ids)
        fit = max(0, min(len(ids), self.sinks + self.window - start))
        logits = prefill(m, ids[:fit], self, slot, start) if fit else None
        for j in range(fit, len(ids)):
            logits = forward(m, [ids[j]], start + j, self, slot)
        return logits

    def step(self, m, token: int, pos: int, slot: int = 0):
        """Feed one token at position pos; its logits [V]."""
        from .model import forward
        return forward(m, [token], pos, self, slot)

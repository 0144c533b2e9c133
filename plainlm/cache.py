"""Preallocated KV cache addressed by (layer, slot, position).

k, v: [L, B, Hkv, S, Dh] where B is the number of slots (sequences decoded together) and S the
context length. np.zeros maps untouched pages lazily, so memory grows with the tokens stored.
"""
from __future__ import annotations

import numpy as np

from .config import ModelConfig


class ContextFull(ValueError):
    pass


class KVCache:
    def __init__(self, cfg: ModelConfig, n_ctx: int, n_slots: int = 1, dtype=np.float32):
        if n_ctx <= 0 or n_slots <= 0:
            raise ValueError(f"KV cache needs n_ctx > 0 and n_slots > 0 (got {n_ctx}, {n_slots})")
        self.n_ctx, self.n_slots = n_ctx, n_slots
        shape = (cfg.n_layers, n_slots, cfg.n_kv_heads, n_ctx, cfg.head_dim)
        self.k = np.zeros(shape, dtype)
        self.v = np.zeros(shape, dtype)
        self.length = np.zeros(n_slots, np.int64)     # positions filled per slot

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
        return self.k.nbytes + self.v.nbytes

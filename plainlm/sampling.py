"""Sampling: pure functions of (logits, history, rng). No state lives here.

Order of operations (as llama.cpp and transformers apply them):
    penalties (repetition, presence, frequency) -> temperature -> top-k -> top-p -> min-p -> draw
Temperature 0 means greedy (argmax of the penalised logits).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40              # 0 = off
    top_p: float = 0.95          # 1 = off
    min_p: float = 0.05          # 0 = off
    repeat_penalty: float = 1.0  # 1 = off; >1 discourages tokens already seen (CTRL-style)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)


def apply_penalties(logits: np.ndarray, history, p: SamplingParams) -> np.ndarray:
    """Penalise tokens that already occur in `history` (ids of prompt + generated text)."""
    if not len(history) or (p.repeat_penalty == 1 and p.presence_penalty == 0 and p.frequency_penalty == 0):
        return logits
    ids, counts = np.unique(np.asarray(history, np.int64), return_counts=True)
    out = logits.astype(np.float32, copy=True)
    x = out[ids]
    if p.repeat_penalty != 1:                      # divide positive logits, multiply negative ones
        x = np.where(x > 0, x / p.repeat_penalty, x * p.repeat_penalty)
    x = x - p.presence_penalty - p.frequency_penalty * counts
    out[ids] = x
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - np.max(x))
    return e / e.sum()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def filter_probs(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """(candidate ids, their renormalised probabilities) after temperature, top-k, top-p, min-p."""
    z = logits.astype(np.float64) / p.temperature
    order = np.argsort(-z, kind="stable")                       # most likely first
    if p.top_k:
        order = order[:p.top_k]
    probs = softmax(z[order])
    if p.top_p < 1:
        keep = np.searchsorted(np.cumsum(probs), p.top_p) + 1   # smallest prefix with mass >= top_p
        order, probs = order[:keep], probs[:keep]
    if p.min_p > 0:
        keep = probs >= p.min_p * probs[0]
        order, probs = order[keep], probs[keep]
    return order, probs / probs.sum()


def sample(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator, history=()) -> int:
    """One token id from logits[V]."""
    logits = apply_penalties(logits, history, p)
    if p.greedy:
        return int(np.argmax(logits))
    ids, probs = filter_probs(logits, p)
    return int(ids[rng.choice(len(ids), p=probs)])


def make_rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(seed)

"""Perplexity of a text: non-overlapping windows of `ctx` tokens (a final partial window is
dropped); in each window every position but the first is scored from its prefix within the window;
ppl = exp(mean negative log-likelihood)."""
from __future__ import annotations

import math
import sys

import numpy as np
from tqdm import tqdm

from .model import Model, prefill
from .sampling import log_softmax


def window_nll(m: Model, ids, cache=None) -> np.ndarray:
    """Negative log-likelihoods [len(ids) - 1] of ids[1:] given their prefixes (one window)."""
    cache = cache or m.new_cache(len(ids))
    cache.reset()
    logits = prefill(m, ids, cache, logits="all")              # [T, V]
    lp = log_softmax(logits[:-1])                              # [T-1, V]
    return -lp[np.arange(len(ids) - 1), np.asarray(ids[1:])]


def perplexity(m: Model, tok, text: str, ctx: int = 512, window: int | None = None, progress: bool = True) -> dict:
    if ctx < 2:
        raise ValueError(f"--ctx must be at least 2, got {ctx}")
    ids = tok.encode(text)
    n_win = len(ids) // ctx
    if n_win == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of --ctx {ctx}")
    cache = m.new_cache(ctx)
    nll = []
    with tqdm(total=n_win * ctx, unit="tok", desc="perplexity", disable=not progress, file=sys.stderr) as bar:
        for w in range(n_win):
            nll.append(window_nll(m, ids[w * ctx:(w + 1) * ctx], cache))
            bar.update(ctx)
    nll = np.concatenate(nll)
    return {"ppl": float(math.exp(nll.mean())), "tokens": int(nll.size), "windows": n_win,
            "ctx": ctx, "nll": float(nll.mean())}

"""Constant-memory streaming (StreamingLLM window): perplexity and memory.

    python bench/window.py [--window 256] [--tokens 1024] [--generate 2048]

1. Perplexity of a real text (the Apache-2.0 licence, teacher-forced) with the full cache vs the
   windowed cache (4 attention sinks + the most recent `--window` positions).
2. Memory vs tokens generated: greedy generation of `--generate` tokens with the windowed cache
   (RSS and cache bytes at checkpoints), against the bytes a full cache would need.
Prints ONE JSON line, progress to stderr, appends a row to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def nll(logits, targets):
    l = logits.astype(np.float64)
    l = l - l.max(-1, keepdims=True)
    lp = l - np.log(np.exp(l).sum(-1, keepdims=True))
    return -lp[np.arange(len(targets)), targets]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--generate", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args()
    from decode import append_results
    from plainlm import kernels
    from plainlm.cache import WindowedKVCache
    from plainlm.model import forward, load_model, prefill
    from plainlm.pull import license_text_path, pull
    from plainlm.tokenizer import Tokenizer
    kernels.set_threads(args.threads or None)
    m = load_model(str(pull()))
    ids = Tokenizer.from_gguf_metadata(m.metadata).encode(open(license_text_path()).read())
    n = min(args.tokens, len(ids) - 1)
    ids = ids[:n + 1]
    tgt = np.array(ids[1:])

    full = prefill(m, ids[:n], m.new_cache(n), logits="all")
    ppl_full = float(np.exp(nll(full, tgt).mean()))
    c = WindowedKVCache(m.config, args.window, sinks=args.sinks)
    fit = min(n, args.sinks + args.window)
    win = [prefill(m, ids[:fit], c, logits="all")]
    for p in range(fit, n):
        win.append(forward(m, [ids[p]], p, c)[None])
        if p % 256 == 0:
            print(f"windowed teacher forcing {p}/{n}", file=sys.stderr)
    win = np.concatenate(win)
    ppl_win = float(np.exp(nll(win, tgt).mean()))
    ppl_tail = (float(np.exp(nll(full[fit:], tgt[fit:]).mean())), float(np.exp(nll(win[fit:], tgt[fit:]).mean())))
    print(f"perplexity over {n} tokens: full {ppl_full:.3f}, window {ppl_win:.3f}; past the window "
          f"(tokens {fit}..{n}): full {ppl_tail[0]:.3f}, window {ppl_tail[1]:.3f}", file=sys.stderr)

    del full, win                                     # the [n, V] logits: not part of the streaming footprint
    c = WindowedKVCache(m.config, args.window, sinks=args.sinks)
    logits = c.prefill(m, ids[:16])
    mem = []
    L, Hkv, Dh = m.config.n_layers, m.config.n_kv_heads, m.config.head_dim
    for i in range(args.generate):
        p = 16 + i
        logits = c.step(m, int(logits.argmax()), p)
        if (p + 1) % 512 == 0 or i == args.generate - 1:
            full_bytes = 2 * L * Hkv * (p + 1) * Dh * 4
            mem.append({"tokens": p + 1, "rss_mb": round(rss_mb(), 1), "cache_mb": round(c.nbytes / 2**20, 2),
                        "full_cache_mb": round(full_bytes / 2**20, 2)})
            print(f"generated to position {p + 1}: RSS {mem[-1]['rss_mb']} MB, window cache "
                  f"{mem[-1]['cache_mb']} MB (a full cache would hold {mem[-1]['full_cache_mb']} MB)", file=sys.stderr)
    res = {"window": args.window, "sinks": args.sinks, "tokens": n, "ppl_full": round(ppl_full, 4),
           "ppl_window": round(ppl_win, 4), "ppl_ratio": round(ppl_win / ppl_full, 4),
           "ppl_past_window_full": round(ppl_tail[0], 4), "ppl_past_window_window": round(ppl_tail[1], 4),
           "memory": mem, "beyond_context_length": 16 + args.generate > m.config.context_length}
    print(json.dumps(res))
    if not args.no_results:
        rows = [f"perplexity over {n} tokens of the licence: full cache {ppl_full:.3f}, window {args.window}+{args.sinks} sinks "
                f"{ppl_win:.3f} (×{ppl_win / ppl_full:.3f}); past the window: {ppl_tail[0]:.3f} vs {ppl_tail[1]:.3f}", "",
                "| tokens | RSS MB | window cache MB | full cache would be MB |", "|---|---|---|---|"]
        rows += [f"| {r['tokens']} | {r['rss_mb']} | {r['cache_mb']} | {r['full_cache_mb']} |" for r in mem]
        append_results("bench/window.py", "python bench/window.py " + " ".join(sys.argv[1:]), rows)


if __name__ == "__main__":
    main()

"""Attention traces: what each position attended to, per layer and head, kept in SQL.

record_trace runs the prompt (one prefill) and then greedy decoding, with `Model.hook` catching the
"attn_probs" stage: the softmax weights [T, H, S] of every layer. The model.py hook is backend
independent (it recomputes the weights with the reference kernel from the cache), so any backend
records the same thing. Weights below `threshold` are dropped (the threshold is kept with the run);
the last generated token is fed once more so that its own attention is recorded too.

show_trace answers "which tokens did position i attend to most" by layer and head, and draws a
heatmap (matplotlib, Agg backend, no display needed).
"""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np

from ..model import forward
from .db import DB, StoreError


def _token_texts(tok, ids) -> list[str]:
    out = []
    for i in ids:
        try:
            out.append(tok.token_text(int(i)).replace("\x00", "\\x00"))
        except Exception:                                  # noqa: BLE001 - a display string only
            out.append(f"<{int(i)}>")
    return out


def run_with_trace(m, prompt_ids, max_tokens: int = 16, stop_ids=()):
    """Greedy generation recording attention. Returns (ids, n_prompt, probs) where
    probs[p] is a float32 [L, H, p+1] array: the weights of query position p over keys 0..p."""
    L, H = m.config.n_layers, m.config.n_heads
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise StoreError("empty prompt: nothing to trace")
    n_ctx = min(m.config.context_length, len(ids) + max_tokens + 1)
    cache = m.new_cache(n_ctx)
    rows: dict[int, np.ndarray] = {}
    calls = []

    def hook(stage, layer, a):
        if stage == "attn_probs":
            calls.append((layer, np.asarray(a, np.float32)))

    old, m.hook = m.hook, hook
    try:
        def step(chunk, start):
            calls.clear()
            logits = forward(m, np.asarray(chunk), np.arange(start, start + len(chunk)), cache)
            if sorted(c[0] for c in calls) != list(range(L)):
                raise RuntimeError("this model/backend did not report attention weights through Model.hook")
            T = len(chunk)
            block = np.zeros((T, L, H, start + T), np.float32)
            for layer, a in calls:                         # a [T, H, S]
                block[:, layer] = a[:, :, :start + T]
            for t in range(T):
                rows[start + t] = block[t, :, :, :start + t + 1]
            return logits

        logits = step(ids, 0)
        n_prompt = len(ids)
        for _ in range(max_tokens):
            nxt = int(np.argmax(logits))
            ids.append(nxt)
            if len(ids) >= n_ctx:
                break
            logits = step([nxt], len(ids) - 1)
            if nxt in stop_ids:
                break
        if len(ids) - 1 not in rows and len(ids) <= n_ctx:
            step([ids[-1]], len(ids) - 1)
    finally:
        m.hook = old
    return ids, n_prompt, [rows[p] for p in range(len(ids)) if p in rows]


def record_trace(db: DB, m, tok, prompt: str, max_tokens: int = 16, threshold: float = 0.01,
                 model_name: str = "", prompt_ids=None) -> int:
    """Run, trace and store; returns the run id."""
    if not 0 <= threshold < 1:
        raise StoreError(f"threshold must be in [0, 1), got {threshold}")
    if prompt_ids is None:
        prompt_ids = tok.encode(prompt)
    stop = set(getattr(tok, "eot_ids", ()) or ()) | ({tok.eos_id} if getattr(tok, "eos_id", None) is not None else set())
    ids, n_prompt, probs = run_with_trace(m, prompt_ids, max_tokens, stop)
    return store_trace(db, tok, prompt, ids, n_prompt, probs, threshold, model_name, m.config)


def store_trace(db: DB, tok, prompt: str, ids, n_prompt: int, probs, threshold: float, model_name: str,
                config) -> int:
    """Write one run_with_trace result; returns the run id."""
    cfg = config
    rid = db.next_id("trace_runs")
    db.execute("INSERT INTO trace_runs (id, model, prompt, threshold, n_prompt, n_layers, n_heads, created) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
               (rid, model_name, prompt, float(threshold), n_prompt, cfg.n_layers, cfg.n_heads,
                datetime.now(timezone.utc).isoformat(timespec="seconds")))
    texts = _token_texts(tok, ids)
    db.insert_rows("trace_tokens", ["run_id", "position", "token_id", "text", "generated"],
                   [(rid, p, ids[p], texts[p], int(p >= n_prompt)) for p in range(len(ids))])

    def att_rows():
        for p, a in enumerate(probs):                      # a [L, H, p+1]
            li, hi, ki = np.nonzero(a >= threshold)
            for l, h, k in zip(li.tolist(), hi.tolist(), ki.tolist()):
                yield (rid, p, l, h, k, float(a[l, h, k]))

    db.insert_rows("attention", ["run_id", "position", "layer", "head", "key_pos", "weight"], att_rows())
    db.commit()
    return rid


# ------------------------------------------------------------------------------------------------
# reading traces back
# ------------------------------------------------------------------------------------------------

def resolve_run(db: DB, run: int | None) -> int:
    if run is None:
        row = db.execute("SELECT MAX(id) FROM trace_runs").fetchone()
        if row is None or row[0] is None:
            raise StoreError(f"{db.url}: no traces stored (plainlm trace --db {db.url} \"PROMPT\")")
        return int(row[0])
    if db.execute("SELECT 1 FROM trace_runs WHERE id = ?", (run,)).fetchone() is None:
        raise StoreError(f"{db.url}: no trace run {run}")
    return int(run)


def load_trace(db: DB, run: int):
    """(info dict, token ids, token texts, dense weights [P, L, H, P] with zeros below threshold)."""
    prompt, thr, n_prompt, L, H, model = db.execute(
        "SELECT prompt, threshold, n_prompt, n_layers, n_heads, model FROM trace_runs WHERE id = ?", (run,)).fetchone()
    toks = db.execute("SELECT position, token_id, text FROM trace_tokens WHERE run_id = ? ORDER BY position",
                      (run,)).fetchall()
    P = len(toks)
    W = np.zeros((P, L, H, P), np.float32)
    for p, l, h, k, w in db.execute("SELECT position, layer, head, key_pos, weight FROM attention WHERE run_id = ?", (run,)):
        W[p, l, h, k] = w
    info = {"run": run, "prompt": prompt, "threshold": thr, "n_prompt": n_prompt, "n_layers": L,
            "n_heads": H, "model": model, "positions": P}
    return info, [t[1] for t in toks], [t[2] for t in toks], W


def top_attended(W, position: int, layer: int | None = None, head: int | None = None, k: int = 3):
    """[(layer, head or None, [(key_pos, weight), ...])]: the k most attended keys of `position`.
    head None (with layer None or not) = mean over heads of the layer."""
    P, L, H, _ = W.shape
    out = []
    layers = range(L) if layer is None else [layer]
    for l in layers:
        heads = [head] if head is not None else ([None] if layer is None else range(H))
        for h in heads:
            w = W[position, l].mean(0) if h is None else W[position, l, h]
            order = np.argsort(-w[:position + 1], kind="stable")[:k]
            out.append((l, h, [(int(i), float(w[i])) for i in order if w[i] > 0]))
    return out


def show_trace(db: DB, run: int | None = None, position: int | None = None, layer: int | None = None,
               head: int | None = None, top: int = 3, png: str | None = None) -> str:
    run = resolve_run(db, run)
    info, ids, texts, W = load_trace(db, run)
    P, L, H = W.shape[0], W.shape[1], W.shape[2]
    if position is None:
        position = P - 1
    if not 0 <= position < P:
        raise StoreError(f"position {position} outside the trace (0..{P - 1})")
    if layer is not None and not 0 <= layer < L:
        raise StoreError(f"layer {layer} outside 0..{L - 1}")
    if head is not None and not 0 <= head < H:
        raise StoreError(f"head {head} outside 0..{H - 1}")
    show = lambda s: repr(s)[1:-1] if s else "''"
    lines = [f"run {run}: {info['model']}  threshold {info['threshold']:g}  "
             f"{info['n_prompt']} prompt + {P - info['n_prompt']} generated positions",
             "tokens: " + " ".join(f"{p}:{show(t)}" for p, t in enumerate(texts)),
             f"position {position} ({show(texts[position])}) attended most to:"]
    for l, h, best in top_attended(W, position, layer, head, top):
        who = f"layer {l:>2}" + (" (mean of heads)" if h is None else f" head {h}")
        lines.append(f"  {who}: " + ", ".join(f"{k}:{show(texts[k])} {w:.3f}" for k, w in best))
    if png:
        heatmap(W, texts, position, layer, head, png, title=f"run {run}")
        lines.append(f"heatmap written to {png}")
    return "\n".join(lines)


def heatmap(W, texts, position, layer, head, path, title=""):
    """layer and head given: that head's full [query x key] matrix; otherwise position's weights,
    one row per (layer, head) (or per layer, averaged over heads, with --layer absent)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    P, L, H, _ = W.shape
    lab = [f"{i}:{t}" for i, t in enumerate(texts)]
    if layer is not None and head is not None:
        M, ylab, xlab = W[:, layer, head, :], lab, lab
        sub = f"layer {layer} head {head}: query position (rows) x key position (columns)"
    elif layer is not None:
        M = W[position, layer, :, :position + 1]
        ylab, xlab = [f"head {h}" for h in range(H)], lab[:position + 1]
        sub = f"position {position}, layer {layer}: heads x key position"
    else:
        M = W[position, :, :, :position + 1].reshape(L * H, -1) if head is None else W[position, :, head, :position + 1]
        ylab = [f"L{l}" if h == 0 else "" for l in range(L) for h in range(H)] if head is None else [f"L{l}" for l in range(L)]
        xlab = lab[:position + 1]
        sub = f"position {position}: " + ("(layer, head)" if head is None else f"layer (head {head})") + " x key position"
    fig_w = min(24, 3 + 0.35 * M.shape[1])
    fig_h = min(30, 2.5 + 0.12 * M.shape[0] + (0.25 * M.shape[0] if M.shape[0] < 40 else 0))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    im = ax.imshow(M, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-6, float(M.max())), interpolation="nearest")
    ax.set_xticks(range(len(xlab)))
    ax.set_xticklabels(xlab, rotation=90, fontsize=7)
    ax.set_yticks(range(len(ylab)))
    ax.set_yticklabels(ylab, fontsize=6)
    ax.set_title(f"{title}  {sub}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

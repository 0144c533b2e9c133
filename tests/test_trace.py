"""Attention traces on the default model.

- every recorded row is a softmax: before sparsification it sums to 1; after, the dropped mass is
  below (number of keys) x threshold, and nothing below the threshold is stored;
- layer 0's weights equal a direct float64 recomputation from the checkpoint (embedding rows,
  RMSNorm, q/k projections, RoPE written out by hand, causal softmax), so the top-attended token
  of every position and head matches;
- on a repeated word sequence some head is an induction head: at each position of the second copy
  it attends mostly to the token *after* the previous occurrence of the current token;
- `plainlm trace` / `plainlm trace show` (text and PNG) on SQLite and PostgreSQL.
"""
from __future__ import annotations

import numpy as np
import pytest

from pg_server import pg_url  # noqa: F401  (fixture)
from plainlm.cli import main
from plainlm.store import connect
from plainlm.store.trace import (load_trace, record_trace, run_with_trace, show_trace, store_trace,
                                  top_attended)

WORDS = "apple zebra moon river candle tiger piano cloud"


@pytest.fixture(scope="module")
def tok(ref_model):
    from plainlm.tokenizer import Tokenizer
    return Tokenizer.from_gguf_metadata(ref_model.metadata)


@pytest.fixture(scope="module")
def traced(ref_model, tok, tmp_path_factory):
    """One traced run (the repeated word list + 2 generated tokens) in SQLite, and the raw rows."""
    url = f"sqlite:///{tmp_path_factory.mktemp('tr')}/t.db"
    ids = tok.encode(WORDS + " " + WORDS)
    raw = run_with_trace(ref_model, ids, max_tokens=2)
    with connect(url) as db:
        rid = store_trace(db, tok, WORDS + " " + WORDS, *raw, threshold=0.01, model_name="smollm2",
                          config=ref_model.config)
        stored = load_trace(db, rid)
    return url, rid, ids, raw, stored


def test_rows_are_softmaxes_and_sparsified_at_threshold(traced):
    url, rid, ids, (all_ids, n_prompt, probs), (info, sids, texts, W) = traced
    assert n_prompt == len(ids) and sids == all_ids and len(all_ids) == len(ids) + 2
    assert info["threshold"] == 0.01 and info["n_prompt"] == n_prompt
    for p, a in enumerate(probs):                        # a [L, H, p+1]
        assert a.shape[-1] == p + 1
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
        kept = W[p, :, :, :p + 1]
        assert np.all((kept == 0) | (kept >= 0.01))
        np.testing.assert_array_equal(kept[kept > 0], a[a >= 0.01])
        assert np.all(1 - kept.sum(-1) < (p + 1) * 0.01 + 1e-5)
        assert not W[p, :, :, p + 1:].any()              # causal: nothing after the position


def _layer0_probs_by_hand(ckpt, ids):
    """Layer 0 attention weights [T, H, T], float64, from the raw weights."""
    cfg = ckpt.config
    x = ckpt.weights["token_embd"].rows(np.asarray(ids)).astype(np.float64)          # [T, D]
    g = ckpt.weights["blk.0.attn_norm"].dequantize().astype(np.float64)
    h = x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * g
    q = h @ ckpt.weights["blk.0.attn_q"].dequantize().astype(np.float64).T
    k = h @ ckpt.weights["blk.0.attn_k"].dequantize().astype(np.float64).T
    T, H, Hkv, Dh = len(ids), cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q, k = q.reshape(T, H, Dh), k.reshape(T, Hkv, Dh)
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, Dh, 2) / Dh)                           # HF inv_freq
    ang = np.arange(T)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = lambda v: np.concatenate([-v[..., Dh // 2:], v[..., :Dh // 2]], -1)        # rotate_half
    q = q * cos[:, None] + rot(q) * sin[:, None]
    k = k * cos[:, None] + rot(k) * sin[:, None]
    k = np.repeat(k, H // Hkv, axis=1)                                                 # GQA
    s = np.einsum("thd,shd->ths", q, k) / np.sqrt(Dh)
    s[:, :, :][np.triu(np.ones((T, T), bool), 1)[:, None, :].repeat(H, 1)] = -np.inf
    s = np.exp(s - s.max(-1, keepdims=True))
    return s / s.sum(-1, keepdims=True)


def test_layer0_matches_direct_recomputation(traced, model_path):
    from plainlm.formats import load
    url, rid, ids, raw, (info, sids, texts, W) = traced
    P = _layer0_probs_by_hand(load(model_path), sids)           # [T, H, T]
    for p in range(len(sids)):
        ref = P[p, :, :p + 1]
        got = W[p, 0, :, :p + 1]
        np.testing.assert_allclose(got[got > 0], ref[got > 0], atol=2e-4)
        sure = np.sort(ref, -1)[:, -1] - np.sort(ref, -1)[:, -2] > 1e-3 if p else np.ones(len(ref), bool)
        assert np.array_equal(got.argmax(-1)[sure], ref.argmax(-1)[sure])
        for h in range(W.shape[2]):
            (l, hh, best), = top_attended(W, p, 0, h, k=1)
            assert best[0][0] == int(got[h].argmax())


def test_an_induction_head_attends_to_the_token_after_the_previous_occurrence(traced):
    url, rid, ids, raw, (info, sids, texts, W) = traced
    n = len(ids) // 2                                   # the words are one token each, twice
    assert ids[1:n] == ids[n + 1:]                      # ("apple" vs " apple" at the start)
    second = range(n + 1, 2 * n)                        # query p: same token at p - n; next at p - n + 1
    score = np.mean([W[p, :, :, p - n + 1] for p in second], axis=0)     # [L, H]
    l, h = np.unravel_index(score.argmax(), score.shape)
    assert score[l, h] > 0.5, f"best induction score {score[l, h]:.2f} at layer {l} head {h}"
    hits = [int(W[p, l, h, :p + 1].argmax()) == p - n + 1 for p in second]
    assert sum(hits) >= len(hits) - 1


def test_show_text_and_png(traced, tmp_path):
    url, rid, ids, raw, (info, sids, texts, W) = traced
    with connect(url) as db:
        out = show_trace(db, rid, position=len(ids) - 1, layer=None, head=None, top=2)
        assert "attended most to:" in out and out.count("(mean of heads)") == 30
        png = tmp_path / "h.png"
        out = show_trace(db, rid, position=5, layer=18, head=6, top=3, png=str(png))
    lines = out.splitlines()
    assert lines[2].startswith("position 5 ( tiger)") and lines[3].startswith("  layer 18 head 6:")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_record_and_show(tmp_path, capsys, model_path):
    url = f"sqlite:///{tmp_path}/c.db"
    assert main(["trace", "--db", url, "--backend", "ref", "-n", "1", "--threshold", "0.05", "A B C D A B C"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("trace run 1: 8 positions")
    png = tmp_path / "p.png"
    assert main(["trace", "show", "--db", url, "--position", "5", "--layer", "3", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "position 5 ( B)" in out and out.count("  layer  3 head") == 9 and png.exists()
    assert main(["trace", "show", "--db", url, "--run", "7"]) == 2
    assert "no trace run 7" in capsys.readouterr().err
    assert main(["trace", "show", "--db", url, "--position", "99"]) == 2
    assert main(["store", "query", "--db", url, "trace_previous_token_heads"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["layer", "head", "mean_prev_weight"]


def test_trace_in_postgres(pg_url, ref_model, tok):  # noqa: F811
    with connect(pg_url) as db:
        rid = record_trace(db, ref_model, tok, "A B C", max_tokens=1, threshold=0.02, model_name="m")
        info, ids, texts, W = load_trace(db, rid)
        assert texts[:3] == ["A", " B", " C"] and info["threshold"] == 0.02
        assert np.all((W == 0) | (W >= 0.02))
        out = show_trace(db, rid, position=2, layer=0, head=None)
    assert out.count("  layer  0 head") == 9

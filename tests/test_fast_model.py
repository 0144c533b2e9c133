"""The fast backend end to end against the reference backend, on the default model.

Teacher-forced on a real text not written by us (the Apache-2.0 licence): the fast path's next-token
distributions vs the ref path's. Bars: mean KL <= 0.0039 nats (llama.cpp's own KL against
transformers on this model), top-1 agreement >= 99%, perplexity within 0.5%. Also: the fused
single-token decode against the per-op path (model.forward is the definition), and the windowed
(StreamingLLM) cache.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("plainlm.kernels.fast", reason="fast backend needs numba and an AVX-512 VNNI CPU")
from plainlm.cache import WindowedKVCache  # noqa: E402
from plainlm.model import forward, load_model, prefill  # noqa: E402

N_TOKENS = 256


@pytest.fixture(scope="module")
def fast_model(model_path):
    return load_model(model_path, "fast")


@pytest.fixture(scope="module")
def text_ids(ref_model, license_text):
    from plainlm.tokenizer import Tokenizer
    ids = Tokenizer.from_gguf_metadata(ref_model.metadata).encode(license_text)
    assert len(ids) > N_TOKENS
    return np.array(ids[:N_TOKENS + 1])


def log_softmax(l):
    l = l.astype(np.float64)
    l = l - l.max(-1, keepdims=True)
    return l - np.log(np.exp(l).sum(-1, keepdims=True))


def per_op(m):
    """The same model with the fused decode hidden: model.forward's per-op path."""
    import copy
    K = m.backend
    ns = {k: getattr(K, k) for k in dir(K) if not k.startswith("__") and k != "decode_step"}
    m2 = copy.copy(m)
    m2.backend = type("PerOp", (), {k: staticmethod(v) if callable(v) else v for k, v in ns.items()})
    return m2


def test_teacher_forced_vs_ref(ref_model, fast_model, text_ids):
    ids, tgt = text_ids[:N_TOKENS], text_ids[1:]
    lr = prefill(ref_model, ids, ref_model.new_cache(N_TOKENS), chunk=N_TOKENS, logits="all")
    lf = prefill(fast_model, ids, fast_model.new_cache(N_TOKENS), chunk=N_TOKENS, logits="all")
    pr, pf = log_softmax(lr), log_softmax(lf)
    kl = float((np.exp(pr) * (pr - pf)).sum(-1).mean())
    top1 = float(np.mean(lr.argmax(-1) == lf.argmax(-1)))
    ppl_r = float(np.exp(-pr[np.arange(N_TOKENS), tgt].mean()))
    ppl_f = float(np.exp(-pf[np.arange(N_TOKENS), tgt].mean()))
    print(f"fast vs ref over {N_TOKENS} tokens: mean KL {kl:.2e} nats, top-1 {top1:.4f}, "
          f"ppl {ppl_f:.4f} vs {ppl_r:.4f}")
    assert kl <= 0.0039
    assert top1 >= 0.99
    assert abs(ppl_f / ppl_r - 1) <= 0.005


def test_fused_decode_matches_per_op(fast_model, text_ids):
    m1, m2 = fast_model, per_op(fast_model)
    c1, c2 = m1.new_cache(64, n_slots=2), m2.new_cache(64, n_slots=2)
    for m, c in ((m1, c1), (m2, c2)):          # two sequences of different lengths
        prefill(m, text_ids[:12], c, slot=0)
        prefill(m, text_ids[20:27], c, slot=1)
    toks = [int(text_ids[12]), int(text_ids[27])]
    pos = [12, 7]
    for step in range(6):
        a = forward(m1, toks, pos, c1, slot=[0, 1], logits="per_slot")
        b = forward(m2, toks, pos, c2, slot=[0, 1], logits="per_slot")
        assert a.shape == b.shape == (2, m1.config.vocab_size)
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
        toks = [int(x) for x in b.argmax(-1)]
        pos = [p + 1 for p in pos]
    assert np.abs(c1.k - c2.k).max() <= 1e-4 and np.array_equal(c1.length, c2.length)
    one = forward(m1, [5], pos[0], c1, slot=0)            # logits="last" for one token
    assert one.shape == (m1.config.vocab_size,)


def test_window_before_sliding_is_the_plain_cache(fast_model, text_ids):
    m = fast_model
    ids = [int(t) for t in text_ids[:20]]
    plain, win = m.new_cache(64), WindowedKVCache(m.config, window=28)
    a = prefill(m, ids[:12], plain)
    b = win.prefill(m, ids[:12])
    for p in range(12, 20):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
        a, b = forward(m, [ids[p]], p, plain), win.step(m, ids[p], p)


def test_window_slides_at_constant_memory(ref_model, fast_model, text_ids):
    """Past the window, the fused kernel's sink re-rotation and ring against the per-op path
    through the cache's own (numpy) re-rotation, on the reference backend."""
    ids = [int(t) for t in text_ids[:30]]
    out = {}
    for name, m in (("ref", ref_model), ("fast", fast_model)):
        c = WindowedKVCache(m.config, window=8, sinks=4)
        nbytes = c.nbytes
        logits = [c.prefill(m, ids[:10])]
        for p in range(10, 30):
            logits.append(c.step(m, ids[p], p))
        assert c.nbytes == nbytes and c.k.shape[3] == 12
        out[name] = np.stack(logits)
    pr, pf = log_softmax(out["ref"]), log_softmax(out["fast"])
    kl = (np.exp(pr) * (pr - pf)).sum(-1)
    assert kl.max() <= 1e-3, kl
    assert np.mean(out["ref"].argmax(-1) == out["fast"].argmax(-1)) >= 0.9

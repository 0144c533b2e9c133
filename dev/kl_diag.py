import sys, numpy as np
from plainlm.pull import pull, license_text_path
from plainlm.model import load_model, prefill
from plainlm.kernels import fast, ref
from plainlm.tokenizer import Tokenizer
path = pull(); N = 256
mr = load_model(path, "ref"); mf = load_model(path, "fast")
ids = np.array(Tokenizer.from_gguf_metadata(mr.metadata).encode(open(license_text_path()).read())[:N + 1])
lr = prefill(mr, ids[:N], mr.new_cache(N + 8), logits="all")
def lsm(l): l = l.astype(np.float64); l = l - l.max(-1, keepdims=True); return l - np.log(np.exp(l).sum(-1, keepdims=True))
pr = lsm(lr); tgt = ids[1:N + 1]
orig = fast.matmul
for exact in ([], ["output"], ["ffn_down"], ["attn_output"], ["attn_q", "attn_k", "attn_v"], ["ffn_gate", "ffn_up"], ["ffn_down", "output"]):
    names = {id(w): k for k, w in mf.weights.items()}
    def mm(w, x):
        k = names.get(id(w), "")
        if any(k.endswith(e) for e in exact):
            return ref.matmul(QT(w), x)
        return orig(w, x)
    from plainlm.quant import QTensor
    QT = lambda w: QTensor(w.qtype, w.shape, w.data)
    fast.matmul = mm
    lf = prefill(mf, ids[:N], mf.new_cache(N + 8), logits="all")
    pf = lsm(lf); kl = (np.exp(pr) * (pr - pf)).sum(-1)
    print(exact, f"KL {kl.mean():.5f} top1 {np.mean(lr.argmax(-1) == lf.argmax(-1)):.4f} ppl {np.exp(-pr[np.arange(N), tgt].mean()):.3f} vs {np.exp(-pf[np.arange(N), tgt].mean()):.3f}", flush=True)

"""Teacher-forced comparison fast vs ref on the licence text (dev helper)."""
import sys, time, numpy as np
from plainlm.pull import pull, license_text_path
from plainlm.model import load_model, prefill, forward
path = pull()
N = int(sys.argv[1]) if len(sys.argv) > 1 else 256
mr = load_model(path, "ref"); mf = load_model(path, "fast")
try:
    from plainlm.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf_metadata(mr.metadata); ids = tok.encode(open(license_text_path()).read())
except Exception as e:
    print("tokenizer:", e, file=sys.stderr)
    from transformers import AutoTokenizer
    import os
    t = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    ids = t.encode(open(license_text_path()).read())
ids = np.array(ids[:N + 1])
def run(m):
    c = m.new_cache(N + 8); t = time.time()
    lg = prefill(m, ids[:N], c, logits="all"); return lg, time.time() - t
lf, tf = run(mf); lf, tf = run(mf)
lr, tr = run(mr)
def lsm(l): l = l - l.max(-1, keepdims=True); return l - np.log(np.exp(l).sum(-1, keepdims=True))
pr, pf = lsm(lr.astype(np.float64)), lsm(lf.astype(np.float64))
kl = (np.exp(pr) * (pr - pf)).sum(-1)
tgt = ids[1:N + 1]
ppl = lambda p: float(np.exp(-p[np.arange(N), tgt].mean()))
print(f"N={N} KL mean {kl.mean():.5f} max {kl.max():.4f} top1 {np.mean(lr.argmax(-1) == lf.argmax(-1)):.4f} "
      f"ppl ref {ppl(pr):.3f} fast {ppl(pf):.3f} maxdiff {np.abs(lr - lf).max():.3f}  time ref {tr:.2f}s fast {tf:.2f}s")

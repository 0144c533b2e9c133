"""Decode tok/s and a per-op time split (dev helper): python dev/decode_prof.py [threads]"""
import sys, time, collections, numpy as np
from plainlm.pull import pull
from plainlm.model import load_model, prefill, forward
from plainlm import kernels
nt = int(sys.argv[1]) if len(sys.argv) > 1 else 2
kernels.set_threads(nt)
m = load_model(pull(), "fast")
K = m.backend
c = m.new_cache(512)
ids = list(range(1000, 1016))
lg = prefill(m, ids, c)
def decode(n, p0):
    tok = int(lg.argmax()); p = p0
    t = time.perf_counter()
    for _ in range(n):
        out = forward(m, [tok], p, c); tok = int(out.argmax()); p += 1
    return time.perf_counter() - t
decode(8, 16)
c.reset()
prefill(m, ids, c)
best = min(decode(64, 16 + 64 * i) for i in range(3))
print(f"threads {nt}: decode {64 / best:.1f} tok/s ({best / 64 * 1e3:.2f} ms/token)")
# per-op split
acc = collections.defaultdict(float)
names = ["matmul", "rmsnorm", "rope", "attention", "swiglu", "embed"]
orig = {n: getattr(K, n) for n in names}
def wrap(n):
    f = orig[n]
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); acc[n] += time.perf_counter() - t; return r
    return g
for n in names: setattr(K, n, wrap(n))
tot = decode(64, 300)
for n in names: setattr(K, n, orig[n])
ks = sum(acc.values())
print(f"total {tot/64*1e3:.2f} ms/token; in backend calls {ks/64*1e3:.2f} ms; rest (python) {(tot-ks)/64*1e3:.2f} ms")
for n in names: print(f"  {n:10s} {acc[n]/64*1e3:.3f} ms/token")

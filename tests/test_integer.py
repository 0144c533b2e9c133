"""Integer-only mode (plainlm/integer.py).

- the integer building blocks against float math: isqrt (exact), iexp / SiLU / RMSNorm / the
  per-block activation quantizer and the block matmul (within their error bounds);
- the file's Q8_0 / Q4_0 / Q4_1 blocks are kept exactly (only the f16 scales get 16-bit mantissas);
- numba kernels == numpy twins, bit for bit; same logits in two runs, in 1 vs 2 numba threads
  (subprocesses) and for prompt-at-once vs token-by-token;
- on the default model: logits close to the float path, and perplexity of a licence-text window
  within 3% (the full licence-text figure is in docs/verify.md).
"""
from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from plainlm import integer as I
from plainlm.config import ModelConfig
from plainlm.formats import Checkpoint, expected_shapes
from plainlm.quant import F32, Q4_0, Q4_1, Q8_0, QTensor

RNG = np.random.default_rng(0)


def test_isqrt_exact():
    import math as m
    n = np.arange(200_000, dtype=np.int64)
    assert I.isqrt(n).tolist() == [m.isqrt(int(v)) for v in n]
    big = RNG.integers(0, 2 ** 62, 5000)
    assert [int(v) for v in I.isqrt(big)] == [m.isqrt(int(v)) for v in big]


def test_silu_and_sigmoid():
    x = np.arange(-24 << 16, 24 << 16, 97, dtype=np.int64)
    xr = x / 65536.0
    assert np.abs(I.isilu(x) / 65536.0 - xr / (1 + np.exp(-xr))).max() < 2e-5
    err = np.abs(I.isigmoid(x) / 2.0 ** 30 - 1 / (1 + np.exp(-xr)))
    assert err[np.abs(xr) <= 16].max() < 1e-8 and err.max() < 1.2e-7     # e^-16 beyond the clip


def test_quantize_act_and_matmul_against_float():
    y = (RNG.standard_normal((5, 256)) * 3 * 65536).astype(np.int64)
    y[2, 7] = 4000 << 16                                     # one huge outlier in one block
    q, sx, qsum, r = I.quantize_act(y)
    assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 127
    assert np.array_equal(qsum, q.astype(np.int64).reshape(5, -1, 32).sum(-1))
    back = (q.astype(np.int64).reshape(5, -1, 32) * sx[..., None]).reshape(5, -1) * 2.0 ** r[:, None]
    rel = np.sqrt(((back - y) ** 2).mean(1) / (y.astype(float) ** 2).mean(1))
    assert rel.max() < 0.01
    w = RNG.standard_normal((64, 256)).astype(np.float32) * 0.05
    iw = I.IntWeight.from_float(w)
    out = iw.matmul(y) / 65536.0
    ref = (y / 65536.0) @ w.T.astype(np.float64)
    assert np.sqrt(((out - ref) ** 2).mean() / (ref ** 2).mean()) < 0.01
    assert np.array_equal(iw.matmul(y), iw.matmul(y, "numpy"))   # numba == numpy twin


@pytest.mark.parametrize("qt", [Q8_0, Q4_0, Q4_1])
def test_file_blocks_are_kept(qt):
    w = RNG.standard_normal((16, 128)).astype(np.float32)
    t = QTensor.from_float(w, qt)
    iw = I.IntWeight.from_qtensor(t)
    ref = t.dequantize().astype(np.float64)
    assert np.abs(iw.dequantize() - ref).max() <= 2 ** -15 * np.abs(ref).max()
    assert np.array_equal(I.rshift_round(I.IntWeight.from_qtensor(t).rows_q16([3, 0])[0], 0),
                          iw.rows_q16([3])[0])


def test_rmsnorm_against_float():
    x = (RNG.standard_normal((3, 576)) * 50 * 65536).astype(np.int64)
    g = RNG.uniform(0.5, 2, 576)
    gi = np.rint(g * 65536).astype(np.int64)
    out = I.irmsnorm(x, gi, int(round(1e-5 * 2 ** 32))) / 65536.0
    xf = x / 65536.0
    ref = xf / np.sqrt((xf ** 2).mean(1, keepdims=True) + 1e-5) * (gi / 65536.0)
    assert np.abs(out - ref).max() < 2e-4 * np.abs(ref).max()


def test_attention_kernel_vs_numpy_twin_and_float():
    T, H, Hkv, Dh, S = 3, 4, 2, 64, 9
    q = (RNG.standard_normal((T, H, Dh)) * 65536).astype(np.int64)
    k = (RNG.standard_normal((Hkv, S, Dh)) * 65536).astype(np.int64)
    v = (RNG.standard_normal((Hkv, S, Dh)) * 65536).astype(np.int64)
    pos = np.array([6, 7, 8])
    isq = round(2 ** 16 / 8)
    out = np.empty((T, H, Dh), np.int64)
    I._attention(q, k, v, pos, isq, out)
    assert np.array_equal(out, I.attention_numpy(q, k, v, pos, isq))
    from plainlm.kernels import ref
    fl = ref.attention((q / 65536.0).astype(np.float32), (k / 65536.0).astype(np.float32),
                       (v / 65536.0).astype(np.float32), pos)
    assert np.abs(out / 65536.0 - fl).max() < 1e-3


# ------------------------------------------------------------------------------------------------
# a tiny random llama: determinism across kernels, runs, threads, chunking
# ------------------------------------------------------------------------------------------------

def tiny_checkpoint(seed=0):
    cfg = ModelConfig(arch="llama", vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=16, ffn_dim=128, context_length=64, rope_theta=10000.0)
    rng = np.random.default_rng(seed)
    w = {}
    for i, (name, shape) in enumerate(expected_shapes(cfg).items()):
        if len(shape) == 1:
            w[name] = QTensor.from_float(rng.uniform(0.5, 1.5, shape).astype(np.float32), F32)
        else:
            w[name] = QTensor.from_float(rng.standard_normal(shape).astype(np.float32) * 0.2,
                                         (Q4_1, Q8_0, Q4_0)[i % 3])
    w["output"] = w["token_embd"]
    return Checkpoint(cfg, w, {}, "tiny")


TINY_IDS = [5, 17, 3, 88, 41, 41, 9, 60, 2, 33]

_HASH_SCRIPT = """
import hashlib, sys, numpy as np
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import numba
from test_integer import tiny_checkpoint, TINY_IDS
from plainlm.integer import IntegerModel
assert numba.get_num_threads() == {threads}
m = IntegerModel.from_checkpoint(tiny_checkpoint())
L = m.forward_int(TINY_IDS, np.arange(len(TINY_IDS)), m.new_cache(32), logits="all")
print(hashlib.sha256(L.tobytes()).hexdigest())
"""


def _hash(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_tiny_model_bit_identical_across_kernels_runs_and_chunking():
    ck = tiny_checkpoint()
    a = I.IntegerModel.from_checkpoint(ck)
    b = I.IntegerModel.from_checkpoint(ck)
    b.kernels = "numpy"
    pos = np.arange(len(TINY_IDS))
    La = a.forward_int(TINY_IDS, pos, a.new_cache(32), logits="all")
    assert La.dtype == np.int64
    assert np.array_equal(La, a.forward_int(TINY_IDS, pos, a.new_cache(32), logits="all"))
    assert np.array_equal(La, b.forward_int(TINY_IDS, pos, b.new_cache(32), logits="all"))
    c = a.new_cache(32)                                      # token by token through the cache
    rows = [a.forward_int([t], [p], c) for p, t in enumerate(TINY_IDS)]
    assert np.array_equal(np.stack(rows), La)
    # and it is close to the float model
    from plainlm.model import Model, forward
    m = Model.from_checkpoint(ck, "ref")
    F = forward(m, TINY_IDS, pos, m.new_cache(32), logits="all")
    assert np.abs(La / 65536.0 - F).max() < 0.05 * np.abs(F).max()
    assert np.array_equal(a.forward(TINY_IDS, pos, a.new_cache(32), logits="all"),
                          (La / 65536.0).astype(np.float32))


def test_bit_identical_across_thread_counts():
    here = os.path.dirname(os.path.abspath(__file__))
    hashes = []
    for threads in (1, 2):
        env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
        code = _HASH_SCRIPT.format(root=os.path.dirname(here), tests=here, threads=threads)
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        hashes.append(r.stdout.split()[-1])
    ck = tiny_checkpoint()
    m = I.IntegerModel.from_checkpoint(ck)
    here_hash = _hash(m.forward_int(TINY_IDS, np.arange(len(TINY_IDS)), m.new_cache(32), logits="all"))
    assert hashes[0] == hashes[1] == here_hash


def test_unsupported_and_guards():
    ck = tiny_checkpoint()
    bad = Checkpoint(ModelConfig(**{**ck.config.to_dict(), "arch": "bitnet", "act": "relu2"}), ck.weights, {}, "x")
    with pytest.raises(I.IntegerModeError, match="llama family"):
        I.IntegerModel.from_checkpoint(bad)
    with pytest.raises(I.IntegerModeError, match="overflows"):
        I._guard(3, "q", np.array([1 << 27]), 27)


# ------------------------------------------------------------------------------------------------
# the default model
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def int_model(ref_model):
    return I.IntegerModel.from_model(ref_model)


def test_default_model_close_to_float_and_deterministic(int_model, ref_model):
    from plainlm.model import forward
    ids = [1, 504, 3458, 314, 260, 1345, 28, 216]
    pos = np.arange(len(ids))
    L = int_model.forward_int(ids, pos, int_model.new_cache(16), logits="all")
    assert np.array_equal(L, int_model.forward_int(ids, pos, int_model.new_cache(16), logits="all"))
    F = forward(ref_model, ids, pos, ref_model.new_cache(16), logits="all")
    Lf = L / 65536.0
    corr = [np.corrcoef(Lf[t], F[t])[0, 1] for t in range(len(ids))]
    assert min(corr) > 0.99
    assert (Lf.argmax(-1) == F.argmax(-1)).mean() >= 0.75


def test_default_model_perplexity_window(int_model, ref_model, license_text):
    from plainlm.model import prefill
    from plainlm.sampling import log_softmax
    from plainlm.tokenizer import Tokenizer
    ids = Tokenizer.from_gguf_metadata(ref_model.metadata).encode(license_text)[:96]

    def nll(logits):
        lp = log_softmax(np.asarray(logits[:-1], np.float32))
        return -lp[np.arange(len(ids) - 1), np.asarray(ids[1:])].mean()

    n_int = nll(int_model.forward(ids, np.arange(len(ids)), int_model.new_cache(96), logits="all"))
    n_flt = nll(prefill(ref_model, ids, ref_model.new_cache(96), logits="all"))
    # one short window is noisy (measured: -3.1% here, -0.25% over the whole licence text)
    assert abs(n_int - n_flt) < 0.05, (math.exp(n_int), math.exp(n_flt))

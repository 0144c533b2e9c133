"""The fused BitNet decode (plainlm/kernels/bitnet_decode.py) against model.forward's per-op path
on the same small random BitNet (built in the official packed HF format, see test_bitnet.py), and
its stacked ternary matvec against the numpy reference matmul and a dense int8 product.

Tolerance: both paths run the same kernels, but compiled in different units float32 results may
differ in the last ulp, and an activation within an ulp of a rounding boundary then quantizes one
int8 step apart; on this random (untrained, undamped) model one such flip moves logits by up to
~0.5% of their range (observed: the numpy reference backend itself differs from transformers by
that much at some positions of seed 3, while the fast path agrees to 1e-5). A real defect (wrong
slot, position, norm or weight) moves them by O(range). Bars: 1% of the range, same argmax."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")                     # build_hf_bitnet writes bf16 safetensors via torch
tk = pytest.importorskip("plainlm.kernels.ternary")
if not (tk.HAVE_NUMBA and tk.HAVE_VNNI):
    pytest.skip("the fused BitNet decode needs numba and an AVX-512 VNNI CPU", allow_module_level=True)

from test_bitnet import build_hf_bitnet          # noqa: E402
from test_fast_model import per_op               # noqa: E402

from plainlm.cache import WindowedKVCache        # noqa: E402
from plainlm.formats import load                 # noqa: E402
from plainlm.kernels import bitnet_decode as bd  # noqa: E402
from plainlm.model import Model, forward, prefill  # noqa: E402
from plainlm.quant.ternary import TernaryWeight  # noqa: E402


@pytest.fixture(scope="module")
def fast_model(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("bitnet_fused"))
    build_hf_bitnet(d, seed=3)
    m = Model.from_checkpoint(load(d), "fast")
    assert bd._Plan(m).ok, "the small BitNet should take the fused path"
    return m


def test_stacked_ternary_matvec_is_exact():
    rng = np.random.default_rng(0)
    shapes = [(64, 192), (16, 192), (8, 192)]
    ws = [TernaryWeight.from_ternary(rng.integers(-1, 2, size=s).astype(np.int8), rng.uniform(0.1, 1.0))
          for s in shapes]
    dense = np.concatenate([np.unpackbits(w.plus, axis=1, bitorder="little").astype(np.int8)
                            - np.unpackbits(w.minus, axis=1, bitorder="little").astype(np.int8)
                            for w in ws])                                          # [88, 192]
    scale = np.concatenate([w.scale for w in ws])
    x = rng.standard_normal((3, 192)).astype(np.float32) * np.array([[1.0], [1e-3], [50.0]], np.float32)
    tab = np.array([[w.plus.ctypes.data, w.minus.ctypes.data, w.scale.ctypes.data, w.shape[0], w.plus.shape[1]]
                    for w in ws], np.int64)
    x8t, s = np.empty((3, 192), np.int8), np.empty(3, np.float32)
    tk._act_quant_t(x, 192, x8t, s)
    y = np.full((3, 88), np.nan, np.float32)
    bd._tmv_tab(tab, 0, 3, x8t, s, y)
    np.testing.assert_array_equal(y, tk.tmatmul_dense_int(dense, scale, x))      # independent oracle
    want = np.concatenate([tk.ternary_matmul(w, x, "ref") for w in ws], axis=1)
    np.testing.assert_array_equal(y, want)


def test_fused_decode_matches_per_op(fast_model):
    m1, m2 = fast_model, per_op(fast_model)
    c1, c2 = m1.new_cache(64, n_slots=2), m2.new_cache(64, n_slots=2)
    for m, c in ((m1, c1), (m2, c2)):                          # two sequences of different lengths
        prefill(m, [1, 17, 250, 3, 999, 42, 42, 7, 512], c, slot=0)
        prefill(m, [5, 6, 300, 2], c, slot=1)
    toks, pos = [100, 64], [9, 4]
    for _ in range(6):
        a = forward(m1, toks, pos, c1, slot=[0, 1], logits="per_slot")
        b = forward(m2, toks, pos, c2, slot=[0, 1], logits="per_slot")
        assert a.shape == b.shape == (2, m1.config.vocab_size)
        assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max()
        assert (a.argmax(-1) == b.argmax(-1)).all()
        toks, pos = [int(t) for t in b.argmax(-1)], [p + 1 for p in pos]
    assert np.array_equal(c1.k != 0, c2.k != 0)                 # the same cache rows written
    assert np.abs(c1.k - c2.k).max() <= 5e-2 * np.abs(c2.k).max()
    assert np.array_equal(c1.length, c2.length)


def test_fused_decode_with_a_sliding_window(fast_model):
    """Past the window the fused path re-rotates the sinks itself (fast._attend_step)."""
    m1, m2 = fast_model, per_op(fast_model)
    ids = [1, 17, 250, 3, 999, 42, 42, 7, 512, 100, 64, 800, 5, 6, 300, 2, 11, 12, 13, 14]
    w1, w2 = WindowedKVCache(m1.config, window=6, sinks=2), WindowedKVCache(m2.config, window=6, sinks=2)
    a, b = w1.prefill(m1, ids[:4]), w2.prefill(m2, ids[:4])
    for p in range(4, len(ids)):
        assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max() and a.argmax() == b.argmax()
        a, b = w1.step(m1, ids[p], p), w2.step(m2, ids[p], p)

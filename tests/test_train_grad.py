"""Backward passes of plainlm.train: analytic vs numerical (float64) and vs PyTorch autograd (float32).

The PyTorch reference models below are written independently of plainlm/train (functional torch,
HF-style rotate_half + repeat_kv, scaled_dot_product_attention for the causal softmax).
"""
import math

import numpy as np
import pytest

from plainlm.train import layers as L
from plainlm.train.model import ArchConfig, ArchError, backward, forward, init_params, param_shapes

torch = pytest.importorskip("torch")
F = torch.nn.functional

CONFIGS = {
    "llama": dict(arch="llama", vocab_size=37, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24,
                  context_length=8, tied_embeddings=True),
    "llama_untied": dict(arch="llama", vocab_size=37, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                         ffn_dim=20, context_length=8, tied_embeddings=False),
    "gpt2_pre": dict(arch="gpt2", vocab_size=37, dim=16, n_layers=2, n_heads=2, ffn_dim=32,
                     context_length=8, positions="learned", norm_position="pre"),
    "gpt2_post_sin": dict(arch="gpt2", vocab_size=37, dim=16, n_layers=2, n_heads=4, ffn_dim=24,
                          context_length=8, positions="sinusoidal", norm_position="post",
                          tied_embeddings=False),
    "bitnet": dict(arch="bitnet", vocab_size=37, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                   context_length=8),
}


def _batch(cfg, B=3, T=7, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (B, T))
    tg = rng.integers(0, cfg.vocab_size, (B, T))
    tg[0, :2] = -1                      # some ignored (padding) targets
    tg[2, -1] = -1
    return ids, tg


def _perturbed(cfg, seed=0, dtype=np.float32):
    """Init, then jitter the norms and biases so their gradients are not trivially symmetric."""
    P = init_params(cfg, seed, np.float64)
    rng = np.random.default_rng(seed + 7)
    for k, v in P.items():
        if v.ndim == 1:
            P[k] = v + rng.normal(0, 0.1, v.shape)
        else:
            P[k] = v * 5                  # larger weights: less trivial attention patterns
    return {k: v.astype(dtype) for k, v in P.items()}


# ------------------------------------------------------------------------------------------------
# numerical gradients (float64, central differences)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "llama_untied", "gpt2_pre", "gpt2_post_sin"])
def test_numerical_gradients(name):
    cfg = ArchConfig(**CONFIGS[name])
    P = _perturbed(cfg, dtype=np.float64)
    ids, tg = _batch(cfg)
    loss, cache = forward(cfg, P, ids, tg)
    G = backward(cfg, P, cache)
    rng = np.random.default_rng(3)
    eps = 1e-5
    for k, w in P.items():
        for _ in range(3):
            j = tuple(rng.integers(0, s) for s in w.shape)
            if k == "token_embd" and j[0] not in set(ids.ravel()) and cfg.tied_embeddings is False:
                continue
            old = w[j]
            w[j] = old + eps
            lp, _ = forward(cfg, P, ids, tg)
            w[j] = old - eps
            lm, _ = forward(cfg, P, ids, tg)
            w[j] = old
            num = (lp - lm) / (2 * eps)
            assert abs(num - G[k][j]) <= 1e-6 + 1e-5 * abs(num), (k, j, num, G[k][j])


def test_layer_gradients_numerical():
    """Each op's backward alone (attention with GQA, norms, activations, cross-entropy)."""
    rng = np.random.default_rng(0)

    def check(f, args, douts_seed=0):
        out = f(*args)
        dout = np.random.default_rng(douts_seed).normal(size=out.shape)
        return out, dout

    # attention
    q = rng.normal(size=(2, 5, 4, 6)); k = rng.normal(size=(2, 5, 2, 6)); v = rng.normal(size=(2, 5, 2, 6))
    o, c = L.attention_forward(q, k, v)
    do = rng.normal(size=o.shape)
    dq, dk, dv = L.attention_backward(do.copy(), c)
    for arr, d in ((q, dq), (k, dk), (v, dv)):
        for _ in range(5):
            j = tuple(rng.integers(0, s) for s in arr.shape)
            old = arr[j]
            arr[j] = old + 1e-6; lp = (L.attention_forward(q, k, v)[0] * do).sum()
            arr[j] = old - 1e-6; lm = (L.attention_forward(q, k, v)[0] * do).sum()
            arr[j] = old
            assert abs((lp - lm) / 2e-6 - d[j]) < 1e-6
    # rope is a rotation: backward of forward is the identity
    cos, sin = L.rope_tables(5, 6, 10000.0, np.float64)
    x = rng.normal(size=(2, 5, 3, 6))
    y, c = L.rope_forward(x, cos, sin)
    assert np.allclose(L.rope_backward(y, c), x)
    # cross-entropy with everything ignored is 0 with zero gradient
    loss, c = L.cross_entropy_forward(rng.normal(size=(4, 9)), np.full(4, -1))
    assert loss == 0.0 and not L.cross_entropy_backward(c).any()


# ------------------------------------------------------------------------------------------------
# PyTorch references (independent implementations)
# ------------------------------------------------------------------------------------------------

def _rms(x, g, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def _rope(x, theta):                                 # x [B, H, T, Dh]
    T, Dh = x.shape[-2], x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh))
    ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    emb = torch.cat((ang, ang), -1)
    return x * emb.cos().to(x.dtype) + _rotate_half(x) * emb.sin().to(x.dtype)


def _ste_weight(w):
    gamma = w.abs().mean().clamp(min=1e-5)
    wq = (w / gamma).round().clamp(-1, 1) * gamma
    return w + (wq - w).detach()


def _ste_act(x):
    s = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    xq = (x * s).round().clamp(-128, 127) / s
    return x + (xq - x).detach()


def torch_loss(cfgd, P, ids, tg):
    arch = cfgd["arch"]
    D, H = cfgd["dim"], cfgd["n_heads"]
    Hkv = cfgd.get("n_kv_heads") or H
    Dh = D // H
    eps = 1e-5
    B, T = ids.shape

    def lin(x, name):
        w = P[name]
        if arch == "bitnet":
            return F.linear(_ste_act(x), _ste_weight(w))
        return F.linear(x, w, P.get(name + ".bias"))

    def norm(x, name):
        if arch == "gpt2":
            return F.layer_norm(x, (x.shape[-1],), P[name], P[name + ".bias"], eps)
        return _rms(x, P[name], eps)

    def attn(x, p):
        q = lin(x, p + "attn_q").view(B, T, H, Dh).transpose(1, 2)
        k = lin(x, p + "attn_k").view(B, T, Hkv, Dh).transpose(1, 2)
        v = lin(x, p + "attn_v").view(B, T, Hkv, Dh).transpose(1, 2)
        if arch != "gpt2":
            q, k = _rope(q, 10000.0), _rope(k, 10000.0)
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = o.transpose(1, 2).reshape(B, T, D)
        if arch == "bitnet":
            o = _rms(o, P[p + "attn_sub_norm"], eps)
        return lin(o, p + "attn_output")

    def mlp(x, p):
        if arch == "gpt2":
            return lin(F.gelu(lin(x, p + "ffn_up"), approximate="tanh"), p + "ffn_down")
        g, u = lin(x, p + "ffn_gate"), lin(x, p + "ffn_up")
        if arch == "bitnet":
            return lin(_rms(F.relu(g) ** 2 * u, P[p + "ffn_sub_norm"], eps), p + "ffn_down")
        return lin(F.silu(g) * u, p + "ffn_down")

    x = P["token_embd"][ids]
    if arch == "gpt2":
        if cfgd.get("positions", "learned") == "learned":
            x = x + P["position_embd"][:T]
        else:
            pos = torch.arange(T, dtype=torch.float64)[:, None]
            div = torch.exp(torch.arange(0, D, 2, dtype=torch.float64) * (-math.log(10000.0) / D))
            pe = torch.zeros(T, D, dtype=torch.float64)
            pe[:, 0::2] = torch.sin(pos * div)
            pe[:, 1::2] = torch.cos(pos * div)
            x = x + pe.to(x.dtype)
    post = cfgd.get("norm_position") == "post"
    for i in range(cfgd["n_layers"]):
        p = f"blk.{i}."
        if post:
            x = norm(x + attn(x, p), p + "attn_norm")
            x = norm(x + mlp(x, p), p + "ffn_norm")
        else:
            x = x + attn(norm(x, p + "attn_norm"), p)
            x = x + mlp(norm(x, p + "ffn_norm"), p)
    if "output_norm" in P:
        x = norm(x, "output_norm")
    W = P["output"] if "output" in P else P["token_embd"]
    logits = x @ W.T
    return F.cross_entropy(logits.reshape(B * T, -1), tg.reshape(-1), ignore_index=-1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_against_torch_autograd(name):
    cfgd = CONFIGS[name]
    cfg = ArchConfig(**cfgd)
    P = _perturbed(cfg, dtype=np.float32)
    ids, tg = _batch(cfg)
    loss, cache = forward(cfg, P, ids, tg)
    G = backward(cfg, P, cache)

    TP = {k: torch.tensor(v, requires_grad=True) for k, v in P.items()}
    tl = torch_loss(cfgd, TP, torch.tensor(ids), torch.tensor(tg))
    tl.backward()
    assert abs(loss - tl.item()) < 1e-5 * max(1.0, abs(loss))
    for k in P:
        ref = TP[k].grad.numpy()
        # attn_k.bias has a zero true gradient (it shifts every score of a row equally), so the
        # denominator has a small absolute floor
        err = np.linalg.norm(G[k] - ref) / max(np.linalg.norm(ref), 1e-4)
        assert err < 1e-4, (k, err)


def test_param_names_and_counts():
    cfg = ArchConfig(**CONFIGS["bitnet"])
    names = param_shapes(cfg)
    assert "blk.0.attn_sub_norm" in names and "blk.1.ffn_sub_norm" in names and "output" not in names
    cfg = ArchConfig(**CONFIGS["gpt2_post_sin"])
    assert "output_norm" not in param_shapes(cfg) and "position_embd" not in param_shapes(cfg)


@pytest.mark.parametrize("bad,msg", [
    (dict(dim=-4), "dim must be a positive integer"),
    (dict(dim=30, n_heads=4), "must divide dim"),
    (dict(n_heads=4, n_kv_heads=3), "must divide n_heads"),
    (dict(arch="mamba"), "arch must be"),
])
def test_bad_arch_configs(bad, msg):
    d = dict(vocab_size=10, dim=16, n_heads=4)
    d.update(bad)
    with pytest.raises(ArchError, match=msg):
        ArchConfig(**d)


def test_init_is_seeded():
    cfg = ArchConfig(**CONFIGS["llama"])
    a, b, c = init_params(cfg, 5), init_params(cfg, 5), init_params(cfg, 6)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["blk.0.attn_q"], c["blk.0.attn_q"])


def test_fused_kernels_match_numpy():
    """float32 takes the numba path (plainlm/train/fused.py), float64 the numpy one: same results."""
    from plainlm.train import fused
    if not fused.AVAILABLE:
        pytest.skip("numba not available")
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(2, 6, 4, 8)), rng.normal(size=(2, 6, 2, 8)), rng.normal(size=(2, 6, 2, 8))
    do = rng.normal(size=(2, 6, 4, 8))
    x, gn = rng.normal(size=(5, 16)), rng.normal(size=16)
    ga, up, dh = rng.normal(size=(5, 12)), rng.normal(size=(5, 12)), rng.normal(size=(5, 12))
    runs = {}
    for dt in (np.float32, np.float64):
        c = lambda a: np.ascontiguousarray(a, dt)  # noqa: E731
        o, ca = L.attention_forward(c(q), c(k), c(v))
        grads = L.attention_backward(c(do), ca)
        y, cr = L.rmsnorm_forward(c(x), c(gn), 1e-5)
        dx, dg = L.rmsnorm_backward(c(do.reshape(-1, 16)[:5]), cr)
        h, cs = L.swiglu_forward(c(ga), c(up))
        runs[dt] = [o, *grads, y, dx, dg, h, *L.swiglu_backward(c(dh), cs)]
    for a, b in zip(runs[np.float32], runs[np.float64]):
        assert np.allclose(a, b, rtol=1e-4, atol=1e-5)

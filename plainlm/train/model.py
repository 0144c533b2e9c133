"""Trainable transformers: forward and backward for three variants, composed from train/layers.py.

    llama   RMSNorm, RoPE (rotate_half), SwiGLU, grouped-query attention (runs in plainlm + llama.cpp)
    gpt2    LayerNorm (pre- or post-norm), learned or sinusoidal positions, GELU, biases
    bitnet  the llama skeleton with BitNet b1.58 changes: ternary weights + int8 activations
            (quantization-aware, straight-through estimators), attn_sub_norm before o_proj,
            ffn_sub_norm before down_proj, relu^2 gated FFN (formats.md section 1.2)

Parameters live in a flat dict {GGUF name: array}: token_embd, blk.{i}.attn_q, ..., output_norm,
output (only when embeddings are untied); biases and LayerNorm shifts are "<name>.bias".

Shapes: B batch, T time, N = B*T, D width, H heads, Hkv kv heads, Dh head width, F FFN width, V vocab.

Initialization (seeded, documented so that a run can be reproduced from its seed):
    one numpy Generator (PCG64, seed) draws the parameters in the order of `param_shapes`;
    matrices ~ N(0, 0.02); the two matrices that write into the residual stream (attn_output,
    ffn_down) ~ N(0, 0.02 / sqrt(2 L)) (GPT-2's scaled init); norm gains = 1; biases = 0;
    learned position embeddings ~ N(0, 0.01).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from . import layers as L


class ArchError(ValueError):
    """An architecture setting that cannot work (caught before any work starts)."""


@dataclass(frozen=True)
class ArchConfig:
    vocab_size: int
    arch: str = "llama"                # llama | gpt2 | bitnet
    dim: int = 128                     # D
    n_layers: int = 2                  # L
    n_heads: int = 4                   # H
    n_kv_heads: int = 0                # Hkv (0 = H, no grouping)
    ffn_dim: int = 0                   # F (0 = 4 D for gpt2, else 8/3 D rounded up to 32)
    context_length: int = 256          # longest sequence (and RoPE / position table length)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tied_embeddings: bool = True
    positions: str = "learned"         # gpt2: learned | sinusoidal
    norm_position: str = "pre"         # gpt2: pre | post

    def __post_init__(self):
        if self.n_kv_heads == 0:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.ffn_dim == 0 and isinstance(self.dim, int):
            f = 4 * self.dim if self.arch == "gpt2" else -(-(8 * self.dim // 3) // 32) * 32
            object.__setattr__(self, "ffn_dim", f)
        self.validate()

    def validate(self):
        if self.arch not in ("llama", "gpt2", "bitnet"):
            raise ArchError(f"arch must be llama, gpt2 or bitnet, not {self.arch!r}")
        for f in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "context_length"):
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ArchError(f"{f} must be a positive integer, got {v!r}")
        if self.dim % self.n_heads:
            raise ArchError(f"n_heads ({self.n_heads}) must divide dim ({self.dim})")
        if self.n_heads % self.n_kv_heads:
            raise ArchError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.arch != "gpt2" and self.head_dim % 2:
            raise ArchError(f"RoPE needs an even head width, got dim/n_heads = {self.head_dim}")
        if self.positions not in ("learned", "sinusoidal"):
            raise ArchError(f"positions must be learned or sinusoidal, not {self.positions!r}")
        if self.norm_position not in ("pre", "post"):
            raise ArchError(f"norm_position must be pre or post, not {self.norm_position!r}")
        if not self.norm_eps > 0:
            raise ArchError(f"norm_eps must be positive, got {self.norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ArchConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ArchError(f"unknown model setting(s): {', '.join(sorted(unknown))}")
        return cls(**d)


# ------------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------------

def param_shapes(cfg: ArchConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter, in initialization order."""
    D, F, V, Dh = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    Dq, Dkv = cfg.n_heads * Dh, cfg.n_kv_heads * Dh
    gpt2 = cfg.arch == "gpt2"
    s = {"token_embd": (V, D)}
    if gpt2 and cfg.positions == "learned":
        s["position_embd"] = (cfg.context_length, D)
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        s[p + "attn_norm"] = (D,)
        if gpt2:
            s[p + "attn_norm.bias"] = (D,)
        for name, shape in (("attn_q", (Dq, D)), ("attn_k", (Dkv, D)), ("attn_v", (Dkv, D))):
            s[p + name] = shape
            if gpt2:
                s[p + name + ".bias"] = (shape[0],)
        if cfg.arch == "bitnet":
            s[p + "attn_sub_norm"] = (Dq,)
        s[p + "attn_output"] = (D, Dq)
        if gpt2:
            s[p + "attn_output.bias"] = (D,)
        s[p + "ffn_norm"] = (D,)
        if gpt2:
            s.update({p + "ffn_norm.bias": (D,), p + "ffn_up": (F, D), p + "ffn_up.bias": (F,),
                      p + "ffn_down": (D, F), p + "ffn_down.bias": (D,)})
        else:
            s.update({p + "ffn_gate": (F, D), p + "ffn_up": (F, D)})
            if cfg.arch == "bitnet":
                s[p + "ffn_sub_norm"] = (F,)
            s[p + "ffn_down"] = (D, F)
    if not (gpt2 and cfg.norm_position == "post"):      # post-norm blocks end normalized already
        s["output_norm"] = (D,)
        if gpt2:
            s["output_norm.bias"] = (D,)
    if not cfg.tied_embeddings:
        s["output"] = (V, D)
    return s


def init_params(cfg: ArchConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Seeded initialization; the scheme is in the module docstring."""
    rng = np.random.Generator(np.random.PCG64(seed))
    out = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(".bias"):
            w = np.zeros(shape)
        elif len(shape) == 1:
            w = np.ones(shape)
        elif name == "position_embd":
            w = rng.normal(0.0, 0.01, shape)
        elif name.endswith(("attn_output", "ffn_down")):
            w = rng.normal(0.0, 0.02 / np.sqrt(2 * cfg.n_layers), shape)
        else:
            w = rng.normal(0.0, 0.02, shape)
        out[name] = w.astype(dtype)
    return out


def n_params(cfg: ArchConfig) -> int:
    return int(sum(np.prod(s) for s in param_shapes(cfg).values()))


# ------------------------------------------------------------------------------------------------
# forward / backward
# ------------------------------------------------------------------------------------------------

def _lin_f(cfg, P, name, x):
    """A projection: ternary QAT for bitnet, plain (+ bias for gpt2) otherwise. x[N, K] -> [N, M]."""
    if cfg.arch == "bitnet":
        return L.bitlinear_forward(x, P[name])
    return L.linear_forward(x, P[name], P.get(name + ".bias"))


def _lin_b(cfg, G, name, dy, cache):
    if cfg.arch == "bitnet":
        dx, dW = L.bitlinear_backward(dy, cache)
    else:
        dx, dW, db = L.linear_backward(dy, cache)
        if db is not None:
            G[name + ".bias"] += db
    G[name] += dW
    return dx


def _norm_f(cfg, P, name, x):
    if cfg.arch == "gpt2":
        return L.layernorm_forward(x, P[name], P[name + ".bias"], cfg.norm_eps)
    return L.rmsnorm_forward(x, P[name], cfg.norm_eps)


def _norm_b(cfg, G, name, dy, cache):
    if cfg.arch == "gpt2":
        dx, dg, db = L.layernorm_backward(dy, cache)
        G[name + ".bias"] += db
    else:
        dx, dg = L.rmsnorm_backward(dy, cache)
    G[name] += dg
    return dx


def _attn_f(cfg, P, i, x, B, T, rope):
    """The attention sub-block of layer i on normalized x[N, D] -> [N, D]."""
    p = f"blk.{i}."
    H, Hkv, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q, cq = _lin_f(cfg, P, p + "attn_q", x)
    k, ck = _lin_f(cfg, P, p + "attn_k", x)
    v, cv = _lin_f(cfg, P, p + "attn_v", x)
    q, k, v = q.reshape(B, T, H, Dh), k.reshape(B, T, Hkv, Dh), v.reshape(B, T, Hkv, Dh)
    cr = None
    if rope is not None:
        q, cr = L.rope_forward(q, *rope)
        k, _ = L.rope_forward(k, *rope)
    o, ca = L.attention_forward(q, k, v)
    o = o.reshape(B * T, H * Dh)
    cs = None
    if cfg.arch == "bitnet":                      # BitNet: RMSNorm over the merged heads before o_proj
        o, cs = L.rmsnorm_forward(o, P[p + "attn_sub_norm"], cfg.norm_eps)
    y, co = _lin_f(cfg, P, p + "attn_output", o)
    return y, (cq, ck, cv, cr, ca, cs, co, B, T)


def _attn_b(cfg, G, i, dy, c):
    p = f"blk.{i}."
    cq, ck, cv, cr, ca, cs, co, B, T = c
    H, Hkv, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    do = _lin_b(cfg, G, p + "attn_output", dy, co)
    if cs is not None:
        do, dg = L.rmsnorm_backward(do, cs)
        G[p + "attn_sub_norm"] += dg
    dq, dk, dv = L.attention_backward(do.reshape(B, T, H, Dh), ca)
    if cr is not None:
        dq, dk = L.rope_backward(dq, cr), L.rope_backward(dk, cr)
    dx = _lin_b(cfg, G, p + "attn_q", dq.reshape(B * T, H * Dh), cq)
    dx += _lin_b(cfg, G, p + "attn_k", dk.reshape(B * T, Hkv * Dh), ck)
    dx += _lin_b(cfg, G, p + "attn_v", dv.reshape(B * T, Hkv * Dh), cv)
    return dx


def _ffn_f(cfg, P, i, x):
    """The feed-forward sub-block of layer i on normalized x[N, D] -> [N, D]."""
    p = f"blk.{i}."
    if cfg.arch == "gpt2":
        u, cu = _lin_f(cfg, P, p + "ffn_up", x)
        h, ch = L.gelu_forward(u)
        y, cd = _lin_f(cfg, P, p + "ffn_down", h)
        return y, (cu, None, ch, None, cd)
    g, cg = _lin_f(cfg, P, p + "ffn_gate", x)
    u, cu = _lin_f(cfg, P, p + "ffn_up", x)
    cs = None
    if cfg.arch == "bitnet":
        h, ch = L.relu2_glu_forward(g, u)
        h, cs = L.rmsnorm_forward(h, P[p + "ffn_sub_norm"], cfg.norm_eps)
    else:
        h, ch = L.swiglu_forward(g, u)
    y, cd = _lin_f(cfg, P, p + "ffn_down", h)
    return y, (cu, cg, ch, cs, cd)


def _ffn_b(cfg, G, i, dy, c):
    p = f"blk.{i}."
    cu, cg, ch, cs, cd = c
    dh = _lin_b(cfg, G, p + "ffn_down", dy, cd)
    if cfg.arch == "gpt2":
        return _lin_b(cfg, G, p + "ffn_up", L.gelu_backward(dh, ch), cu)
    if cs is not None:
        dh, dgain = L.rmsnorm_backward(dh, cs)
        G[p + "ffn_sub_norm"] += dgain
        dg, du = L.relu2_glu_backward(dh, ch)
    else:
        dg, du = L.swiglu_backward(dh, ch)
    dx = _lin_b(cfg, G, p + "ffn_gate", dg, cg)
    dx += _lin_b(cfg, G, p + "ffn_up", du, cu)
    return dx


def forward(cfg: ArchConfig, P: dict, ids: np.ndarray, targets: np.ndarray | None = None,
            ignore_index: int = -1):
    """ids[B, T] -> (logits[B, T, V], None) without targets, else (loss, cache for backward)."""
    ids = np.asarray(ids)
    B, T = ids.shape
    if T > cfg.context_length:
        raise ArchError(f"sequence of {T} tokens is longer than context_length {cfg.context_length}")
    dt = P["token_embd"].dtype
    x, ce = L.embedding_forward(P["token_embd"], ids)             # [B, T, D]
    x = x.reshape(B * T, cfg.dim)
    cpos = None
    rope = None
    if cfg.arch == "gpt2":
        if cfg.positions == "learned":
            x = (x.reshape(B, T, -1) + P["position_embd"][:T]).reshape(B * T, -1)
            cpos = True
        else:
            x = (x.reshape(B, T, -1) + L.sinusoid_table(T, cfg.dim, dt)).reshape(B * T, -1)
    else:
        rope = L.rope_tables(T, cfg.head_dim, cfg.rope_theta, dt)

    post = cfg.arch == "gpt2" and cfg.norm_position == "post"
    caches = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        if post:                                  # x = norm(x + attn(x)); x = norm(x + mlp(x))
            a, ca = _attn_f(cfg, P, i, x, B, T, rope)
            x, cn1 = _norm_f(cfg, P, p + "attn_norm", x + a)
            f, cf = _ffn_f(cfg, P, i, x)
            x, cn2 = _norm_f(cfg, P, p + "ffn_norm", x + f)
        else:                                     # x = x + attn(norm(x)); x = x + mlp(norm(x))
            h, cn1 = _norm_f(cfg, P, p + "attn_norm", x)
            a, ca = _attn_f(cfg, P, i, h, B, T, rope)
            x = x + a
            h, cn2 = _norm_f(cfg, P, p + "ffn_norm", x)
            f, cf = _ffn_f(cfg, P, i, h)
            x = x + f
        caches.append((cn1, ca, cn2, cf))
    cno = None
    if "output_norm" in P:
        x, cno = _norm_f(cfg, P, "output_norm", x)
    Wout = P["token_embd"] if cfg.tied_embeddings else P["output"]
    logits = x @ Wout.T                                           # [N, V]
    if targets is None:
        return logits.reshape(B, T, -1), None
    loss, cl = L.cross_entropy_forward(logits, np.asarray(targets).reshape(-1), ignore_index)
    return loss, (ce, cpos, caches, cno, x, cl, B, T)


def backward(cfg: ArchConfig, P: dict, cache, grads: dict | None = None, dloss: float = 1.0) -> dict:
    """Gradients of the loss, accumulated (+=) into `grads` (created zeroed when None)."""
    ce, cpos, caches, cno, xf, cl, B, T = cache
    G = grads if grads is not None else {k: np.zeros_like(v) for k, v in P.items()}
    dlogits = L.cross_entropy_backward(cl, dloss)                 # [N, V]
    oname = "token_embd" if cfg.tied_embeddings else "output"
    Wout = P[oname]
    G[oname] += dlogits.T @ xf
    dx = dlogits @ Wout                                           # [N, D]
    del dlogits
    if cno is not None:
        dx = _norm_b(cfg, G, "output_norm", dx, cno)
    post = cfg.arch == "gpt2" and cfg.norm_position == "post"
    for i in reversed(range(cfg.n_layers)):
        p = f"blk.{i}."
        cn1, ca, cn2, cf = caches[i]
        if post:
            dx = _norm_b(cfg, G, p + "ffn_norm", dx, cn2)        # d(x + f)
            dx = dx + _ffn_b(cfg, G, i, dx, cf)
            dx = _norm_b(cfg, G, p + "attn_norm", dx, cn1)
            dx = dx + _attn_b(cfg, G, i, dx, ca)
        else:
            dx = dx + _norm_b(cfg, G, p + "ffn_norm", _ffn_b(cfg, G, i, dx, cf), cn2)
            dx = dx + _norm_b(cfg, G, p + "attn_norm", _attn_b(cfg, G, i, dx, ca), cn1)
    if cpos:
        G["position_embd"][:T] += dx.reshape(B, T, -1).sum(0)
    G["token_embd"] += L.embedding_backward(dx.reshape(B, T, -1), ce)
    return G


def loss_and_grads(cfg, P, ids, targets, ignore_index=-1):
    loss, cache = forward(cfg, P, ids, targets, ignore_index)
    return loss, backward(cfg, P, cache)

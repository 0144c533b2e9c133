"""The transformer, top to bottom. Calls only `kernels.*`, never opens files.

Shape legend
    T   tokens in this forward call (a prompt chunk, or one token per sequence when decoding a batch)
    D   model width            (cfg.dim)
    H   query heads            (cfg.n_heads)        Hkv  key/value heads (cfg.n_kv_heads)
    Dh  head width             (cfg.head_dim)       F    FFN width       (cfg.ffn_dim)
    V   vocabulary             (cfg.vocab_size)     L    layers          (cfg.n_layers)
    S   positions in the cache

One forward call handles any mix of sequences: token t belongs to cache slot `slot[t]` at position
`pos[t]`. A prompt is T tokens of one slot at positions p..p+T-1; a batched decode step is one
token for each of B slots. Keys/values of every token are written to the cache first, then each
token attends to its own slot's cache up to its own position — that is the causal mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels
from .cache import KVCache
from .config import ModelConfig


@dataclass
class Model:
    config: ModelConfig
    weights: dict            # canonical GGUF name -> backend-prepared weight
    norms: dict              # canonical name -> float32 vector (norm gains)
    backend: object          # kernels.ref or kernels.fast
    metadata: dict           # the file's metadata (tokenizer.*, general.*)
    source: str = ""
    hook: object = None      # optional hook(stage, layer, array): inspection (trace, verify); None = off

    @classmethod
    def from_checkpoint(cls, ckpt, backend: str | None = None) -> "Model":
        K = kernels.get_backend(backend)
        weights, norms = {}, {}
        for name, w in ckpt.weights.items():
            if len(w.shape) == 1:
                norms[name] = kernels.ref.vector(w)
            else:
                weights[name] = K.prepare(w)
        return cls(ckpt.config, weights, norms, K, ckpt.metadata, ckpt.source)

    def new_cache(self, n_ctx: int | None = None, n_slots: int = 1) -> KVCache:
        return KVCache(self.config, min(n_ctx or self.config.context_length, self.config.context_length), n_slots)


def load_model(path: str, backend: str | None = None) -> Model:
    from .formats import load
    return Model.from_checkpoint(load(path), backend)


# ------------------------------------------------------------------------------------------------
# the forward pass
# ------------------------------------------------------------------------------------------------

def attention_block(m: Model, i: int, x, pos, slot, cache: KVCache):
    """Self-attention of layer i. x[T, D] (already normed) -> [T, D]."""
    cfg, K, W = m.config, m.backend, m.weights
    T = x.shape[0]
    p = f"blk.{i}."
    q = K.matmul(W[p + "attn_q"], x).reshape(T, cfg.n_heads, cfg.head_dim)      # [T, H, Dh]
    k = K.matmul(W[p + "attn_k"], x).reshape(T, cfg.n_kv_heads, cfg.head_dim)   # [T, Hkv, Dh]
    v = K.matmul(W[p + "attn_v"], x).reshape(T, cfg.n_kv_heads, cfg.head_dim)   # [T, Hkv, Dh]
    cache.keep_sinks(i, slot, pos, k)                  # un-rotated keys (a windowed cache's sinks)
    q = K.rope(q, pos, cfg.rope_theta, cfg.rotary_dim)
    k = K.rope(k, pos, cfg.rope_theta, cfg.rotary_dim)
    rows = cache.rows(pos)                             # the cache row of each position (= pos unless windowed)
    cache.k[i, slot, :, rows] = k                      # [T, Hkv, Dh] into rows (slot[t], :, rows[t])
    cache.v[i, slot, :, rows] = v
    o = np.empty((T, cfg.n_heads, cfg.head_dim), np.float32)                    # [T, H, Dh]
    for s in np.unique(slot):                          # one attention call per sequence
        t = np.nonzero(slot == s)[0]
        ks, vs, qpos = cache.attend(i, s, pos[t])      # this sequence's rows in use [Hkv, n, Dh]
        o[t] = K.attention(q[t], ks, vs, qpos)
        if m.hook is not None:                         # attention weights [T', H, n], for traces
            m.hook("attn_probs", i, kernels.ref.attention_probs(q[t], ks, qpos))
    o = o.reshape(T, cfg.n_heads * cfg.head_dim)
    if cfg.arch == "bitnet":                           # BitNet normalizes heads before o_proj
        o = K.rmsnorm(o, m.norms[p + "attn_sub_norm"], cfg.norm_eps)
    return K.matmul(W[p + "attn_output"], o)


FFN_CHUNK = 64     # tokens per ffn_block call: bounds its [T, F] temporaries (prefill peak memory)


def ffn_block(m: Model, i: int, x):
    """Gated MLP of layer i: down(act(gate(x)) * up(x)). x[T, D] -> [T, D]."""
    cfg, K, W = m.config, m.backend, m.weights
    p = f"blk.{i}."
    g = K.matmul(W[p + "ffn_gate"], x)                 # [T, F]
    u = K.matmul(W[p + "ffn_up"], x)                   # [T, F]
    if cfg.act == "relu2":
        h = K.relu2_glu(g, u)
        h = K.rmsnorm(h, m.norms[p + "ffn_sub_norm"], cfg.norm_eps)
    else:
        h = K.swiglu(g, u)
    return K.matmul(W[p + "ffn_down"], h)


def check_tokens(cfg: ModelConfig, ids, pos, slot, cache: KVCache):
    """ids[T], pos[T], slot[T] as int64 arrays (pos and slot broadcast), checked against the
    vocabulary and the cache."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    T = ids.shape[0]
    pos = np.broadcast_to(np.asarray(pos, np.int64), (T,)).copy()
    slot = np.broadcast_to(np.asarray(slot, np.int64), (T,)).copy()
    if np.any(pos >= cache.n_ctx) or np.any(pos < 0):
        raise ValueError(f"position {int(pos.max())} is outside the context (0..{cache.n_ctx - 1})")
    if np.any((ids < 0) | (ids >= cfg.vocab_size)):
        raise ValueError(f"token id outside the vocabulary (0..{cfg.vocab_size - 1})")
    return ids, pos, slot


def forward(m: Model, ids, pos, cache: KVCache, slot=0, logits: str = "last") -> np.ndarray:
    """Run tokens ids[T] at positions pos[T] (slots slot[T] or one int) through the model.

    Writes their keys/values into `cache` and returns logits: [V] of the last token
    (logits="last"), [T, V] for every token ("all"), or for the last token of each slot in order of
    appearance ("per_slot", [B, V], batched decoding).
    """
    if getattr(m, "is_integer", False):           # integer-only twin (plainlm/integer.py)
        return m.forward(ids, pos, cache, slot, logits)
    cfg, K, W = m.config, m.backend, m.weights
    ids, pos, slot = check_tokens(cfg, ids, pos, slot, cache)
    T = ids.shape[0]

    fused = getattr(K, "decode_step", None)            # one compiled call for the whole model (fast backend)
    if fused is not None and m.hook is None and len(np.unique(slot)) == T:
        out = fused(m, ids, pos, slot, cache)           # one token per slot: the same math as below
        if out is not None:
            np.maximum.at(cache.length, slot, pos + 1)
            return out[-1] if logits == "last" else out

    x = K.embed(W["token_embd"], ids)                  # [T, D]
    hook = m.hook or (lambda stage, layer, a: None)
    hook("embed", -1, x)
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        a = attention_block(m, i, K.rmsnorm(x, m.norms[p + "attn_norm"], cfg.norm_eps), pos, slot, cache)
        hook("attn_out", i, a)
        x = x + a                                      # residual stream: x = x + attn(norm(x))
        h = K.rmsnorm(x, m.norms[p + "ffn_norm"], cfg.norm_eps)
        f = np.concatenate([ffn_block(m, i, h[c:c + FFN_CHUNK]) for c in range(0, T, FFN_CHUNK)])
        hook("mlp_out", i, f)
        x = x + f                                      #                  x = x + mlp(norm(x))
    for s in np.unique(slot):
        cache.length[s] = max(int(cache.length[s]), int(pos[slot == s].max()) + 1)

    if logits == "last":
        sel = [T - 1]
    elif logits == "per_slot":
        _, first = np.unique(slot[::-1], return_index=True)   # last occurrence of each slot
        sel = sorted(T - 1 - first)
    elif logits == "all":
        sel = slice(None)
    else:
        raise ValueError(f"logits must be 'last', 'all' or 'per_slot', not {logits!r}")
    h = K.rmsnorm(x[sel], m.norms["output_norm"], cfg.norm_eps)                 # [T', D]
    out = K.matmul(W["output"], h)                                              # [T', V]
    hook("logits", -1, out)
    return out[0] if logits == "last" else out


def prefill(m: Model, ids, cache: KVCache, slot: int = 0, start: int = 0, chunk: int = 256,
            logits: str = "last", progress=None) -> np.ndarray:
    """Feed a prompt in chunks of `chunk` tokens starting at position `start`."""
    ids = np.asarray(ids, np.int64)
    if start + len(ids) > cache.n_ctx:
        from .cache import ContextFull
        raise ContextFull(f"prompt of {len(ids)} tokens (starting at position {start}) does not fit "
                          f"the context length {cache.n_ctx}")
    outs = []
    for c0 in range(0, len(ids), chunk):
        c = ids[c0:c0 + chunk]
        pos = np.arange(start + c0, start + c0 + len(c))
        outs.append(forward(m, c, pos, cache, slot, logits="all" if logits == "all" else "last"))
        if progress is not None:
            progress(len(c))
    return np.concatenate(outs) if logits == "all" else outs[-1]

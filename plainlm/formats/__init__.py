"""Checkpoint loaders: a file in, (ModelConfig, {canonical GGUF name: QTensor}, extras) out.

Loaders only change layout (un-permuting Q/K rows, tying the output head); they never do math.
Names follow GGUF: token_embd, blk.{i}.attn_q, ..., output_norm, output.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..config import ModelConfig
from ..quant import QTensor
from .gguf import GGUFError, GGUFFile, read_gguf


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, QTensor]
    metadata: dict = field(default_factory=dict)      # GGUF-style metadata (tokenizer.*, general.*)
    source: str = ""


def unpermute_qk(t: QTensor, n_heads: int) -> QTensor:
    """Undo llama.cpp's converter permutation of Q/K rows (formats.md §3.5).

    GGUF row (h, 2i + t) holds HF row (h, t*Dh/2 + i); HF order lets one rotate_half RoPE serve all
    checkpoints. Rows are whole quantized rows, so this is a byte copy: [N, row_bytes] -> same.
    """
    n, rb = t.data.shape
    dh = n // n_heads
    data = np.ascontiguousarray(t.data.reshape(n_heads, dh // 2, 2, rb).swapaxes(1, 2).reshape(n, rb))
    return QTensor(t.qtype, t.shape, data)


def load_gguf(path: str | os.PathLike) -> Checkpoint:
    g = read_gguf(path)
    cfg = ModelConfig.from_gguf(g.metadata, g.tensors.keys(), source=g.path)
    w = {}
    for name, ti in g.tensors.items():
        key = name[:-len(".weight")] if name.endswith(".weight") else name
        w[key] = QTensor(ti.qtype, ti.shape, ti.data)
    if cfg.arch == "bitnet":
        _bitnet_weights(w, g.path)
    _check_llama_tensors(cfg, w, g.path)
    if cfg.arch == "llama":
        for i in range(cfg.n_layers):
            w[f"blk.{i}.attn_q"] = unpermute_qk(w[f"blk.{i}.attn_q"], cfg.n_heads)
            w[f"blk.{i}.attn_k"] = unpermute_qk(w[f"blk.{i}.attn_k"], cfg.n_kv_heads)
    if "output" not in w:
        w["output"] = w["token_embd"]                 # tied head: logits = x @ token_embd.T
    return Checkpoint(cfg, w, g.metadata, g.path)


def _bitnet_weights(w: dict, path: str) -> None:
    """BitNet GGUF (arch `bitnet` or bitnet.cpp's `bitnet-b1.58`): ternary projections (TQ1_0,
    TQ2_0, I2_S) become TernaryWeight bit planes and their mapped file pages are released; a
    16-bit embedding becomes a HalfWeight, which also serves as the tied output head. A quantized
    embedding (Q8_0, as bitnet.cpp's `--quant-embd` writes; Q6_K) stays a QTensor in its mapped
    blocks: the backend's `prepare` serves it both as the lookup table and as the head. No Q/K
    permutation: BitNet converters do not permute, the model uses rotate_half RoPE directly.
    A TQ tensor whose blocks in one row carry different scales stays in block form."""
    from ..kernels.ternary import HalfWeight
    from ..quant import BF16, F16, TQ1_0, TQ2_0
    from ..quant.ternary import I2_S, TernaryFormatError, TernaryWeight
    from .safetensors import release_pages
    # First copy the 1-D tensors (norms, scales) out of the map: read later, next to ternary data
    # whose pages were already released, a fault can map a whole page-cache folio back in (measured:
    # +40 MB of attn_q / ffn_down pages resident on the 2B-4T-shaped bench file).
    for name in list(w):
        t = w[name]
        if isinstance(t, QTensor) and len(t.shape) == 1:
            w[name] = QTensor(t.qtype, t.shape, np.array(t.data))
            release_pages(t.data)
    for name in list(w):
        t = w[name]
        if not isinstance(t, QTensor) or len(t.shape) != 2:
            continue
        if t.qtype in (TQ1_0, TQ2_0, I2_S):
            try:
                if t.qtype is I2_S:
                    tw = TernaryWeight.from_i2s(t.data, t.shape)
                else:
                    tw = TernaryWeight.from_tq(t.data, t.qtype, t.shape)
            except TernaryFormatError as e:
                if t.qtype is I2_S:
                    raise GGUFError(f"{path}: tensor '{name}.weight' (I2_S): {e}") from None
                continue
            sc = w.pop(name + ".scale", None)      # upstream llama.cpp's optional output scale, [1]
            if sc is not None:
                tw.scale = tw.scale * np.float32(sc.dequantize().reshape(-1)[0])
            release_pages(t.data)
            w[name] = tw
        elif name in ("token_embd", "output") and t.qtype in (F16, BF16):
            w[name] = HalfWeight(t.data.view(np.uint16).reshape(t.shape), t.qtype.name.lower())


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    D, F, V, Dh = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    s = {"token_embd": (V, D), "output_norm": (D,)}
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        s.update({p + "attn_norm": (D,), p + "attn_q": (cfg.n_heads * Dh, D),
                  p + "attn_k": (cfg.n_kv_heads * Dh, D), p + "attn_v": (cfg.n_kv_heads * Dh, D),
                  p + "attn_output": (D, cfg.n_heads * Dh), p + "ffn_norm": (D,),
                  p + "ffn_gate": (F, D), p + "ffn_up": (F, D), p + "ffn_down": (D, F)})
        if cfg.arch == "bitnet":
            s.update({p + "attn_sub_norm": (D,), p + "ffn_sub_norm": (F,)})
    return s


def _check_llama_tensors(cfg: ModelConfig, w: dict, path: str) -> None:
    """Every tensor the model will read exists with the shape the config implies."""
    if cfg.arch not in ("llama", "bitnet"):
        return
    for name, shape in expected_shapes(cfg).items():
        if name not in w:
            raise GGUFError(f"{path}: missing tensor '{name}.weight' required by {cfg.arch} with {cfg.n_layers} layers")
        if tuple(w[name].shape) != shape:
            raise GGUFError(f"{path}: tensor '{name}.weight' has shape {list(w[name].shape)}, expected {list(shape)}")


def load(path: str | os.PathLike) -> Checkpoint:
    """Load any supported checkpoint: a GGUF file (or, later, an HF directory / SQL store URL)."""
    p = os.fspath(path)
    if "://" in p:
        from ..store import load_from_url          # SQL weight store
        return load_from_url(p)
    if os.path.isdir(p):
        from .safetensors import load_hf_dir
        return load_hf_dir(p)
    if not os.path.exists(p):
        raise GGUFError(f"{p}: no such file")
    return load_gguf(p)

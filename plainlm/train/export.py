"""Export a training checkpoint to GGUF that plainlm (`load_model`) and llama.cpp both load.

    llama   architecture "llama"; Q/K rows permuted the way llama.cpp's converter does
            (formats.md 3.5: per head, HF rows (i, i + Dh/2) become adjacent rows (2i, 2i+1)), since
            llama.cpp rotates adjacent pairs for this architecture and plainlm's loader un-permutes.
            Matrices as f32, f16 or q8_0; norm gains always f32.
    bitnet  architecture "bitnet"; the seven projections per layer as TQ2_0 holding exactly the
            ternary weights the QAT forward used (W_t * gamma: every 256-block's absmax is gamma, so
            the block scale is gamma and the codes are W_t); attn_sub_norm / ffn_sub_norm f32; no
            Q/K permutation (BitNet GGUFs use NEOX RoPE). Embeddings f16/f32.
Tokenizer metadata: the trained byte-level BPE as tokenizer.ggml.model "gpt2", pre "gpt-2", with
tokens, token types and merges; <|endoftext|> is bos = eos; no BOS is added when encoding.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .layers import ternary_weight
from .loop import TrainError, model_from_checkpoint

QTYPES = ("f32", "f16", "q8_0")
BITNET_PROJ = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate_half row order -> llama.cpp's interleaved order. w[n_heads*Dh, K]."""
    n, k = w.shape
    dh = n // n_heads
    return np.ascontiguousarray(w.reshape(n_heads, 2, dh // 2, k).swapaxes(1, 2).reshape(n, k))


def export_gguf(ckpt, out, qtype: str = "f32") -> Path:
    import gguf
    from gguf import GGMLQuantizationType as GT
    from gguf import quants

    if qtype not in QTYPES:
        raise TrainError(f"--type must be one of {', '.join(QTYPES)}, not {qtype!r}")
    cfg, P, tok, meta = model_from_checkpoint(ckpt)
    if cfg.arch == "gpt2":
        raise TrainError("GGUF export covers the llama and bitnet architectures; this checkpoint is gpt2 "
                         "(plainlm's inference model has no gpt2 forward)")
    if tok.kind != "bpe":
        raise TrainError(f"GGUF export needs the byte-level BPE tokenizer (tokenizer = \"bpe\"); this model "
                         f"was trained with the {tok.kind} tokenizer, which llama.cpp cannot represent")
    arch = cfg.arch
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(f"plainlm-trained-{arch}")
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    w.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0 if arch == "bitnet" else ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    toks, types, merges = tok.gguf_vocab()
    if len(toks) != cfg.vocab_size:
        raise TrainError(f"tokenizer has {len(toks)} tokens but the model {cfg.vocab_size}")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.eot)
    w.add_eos_token_id(tok.eot)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)

    def matrix(name, a):
        a = np.ascontiguousarray(a, np.float32)
        if qtype == "q8_0" and a.shape[-1] % 32 == 0:
            w.add_tensor(name + ".weight", quants.quantize(a, GT.Q8_0), raw_dtype=GT.Q8_0)
        elif qtype in ("f16", "q8_0"):
            w.add_tensor(name + ".weight", a.astype(np.float16))
        else:
            w.add_tensor(name + ".weight", a)

    for name, a in P.items():
        base = name.rsplit(".", 1)[-1]
        if a.ndim == 1:
            w.add_tensor(name + ".weight", np.ascontiguousarray(a, np.float32))
        elif arch == "bitnet" and base in BITNET_PROJ:
            if a.shape[1] % 256:
                raise TrainError(f"{name}: TQ2_0 needs the input width to be a multiple of 256, "
                                 f"got {a.shape[1]} (choose dim and ffn_dim as multiples of 256)")
            eff, _, _ = ternary_weight(a.astype(np.float32))
            w.add_tensor(name + ".weight", quants.quantize(eff, GT.TQ2_0), raw_dtype=GT.TQ2_0)
        elif arch == "llama" and base in ("attn_q", "attn_k"):
            matrix(name, permute_qk(a, cfg.n_heads if base == "attn_q" else cfg.n_kv_heads))
        else:
            matrix(name, a)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise TrainError(f"could not write {out}: {e.strerror or e}") from None
    return out

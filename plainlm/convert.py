"""`plainlm convert`: a BitNet Hugging Face directory -> GGUF with ternary TQ2_0 / TQ1_0 (or I2_S).

    plainlm convert HFDIR --out model.gguf --type tq2_0

Output (what llama.cpp's `bitnet` architecture loads; tensor list = gguf-py
MODEL_TENSORS[MODEL_ARCH.BITNET]): general.architecture = "bitnet" and the `bitnet.*`
hyper-parameters; `token_embd` F16 (tied head, no `output` tensor), norms F32, the seven projections
per layer ternary with d = gamma in every block (so TQ2_0 reproduces the HF weights exactly, up to
the f16 rounding of gamma). No Q/K permutation (llama.cpp uses NEOX RoPE for bitnet).
`--type i2_s` writes bitnet.cpp's layout under architecture "bitnet-b1.58" (scale kept in fp32).
The tokenizer comes from the directory's tokenizer.json when present (as `gpt2` BPE, Llama-3
pre-tokenizer `llama-bpe`); otherwise a minimal byte-level vocabulary is written so that the file
still loads (ids only).

The GGUF writer here streams tensors one at a time, so converting a 2B model needs memory for one
matrix, not the model.
"""
from __future__ import annotations

import argparse
import json
import os
import struct

import numpy as np

GGUF_ALIGN = 32
_T_U32, _T_I32, _T_F32, _T_BOOL, _T_STR, _T_ARR = 4, 5, 6, 7, 8, 9
TYPE_IDS = {"F32": 0, "F16": 1, "Q8_0": 8, "TQ1_0": 34, "TQ2_0": 35, "I2_S": 36}
FILE_TYPES = {"tq1_0": 36, "tq2_0": 37, "i2_s": 40}     # llama_ftype MOSTLY_TQ1_0 / TQ2_0 / bitnet.cpp I2_S


# ------------------------------------------------------------------------------------------------
# a small streaming GGUF v3 writer
# ------------------------------------------------------------------------------------------------

def _s(x: str) -> bytes:
    b = x.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, value) -> bytes:
    out = _s(key)
    if isinstance(value, bool):
        return out + struct.pack("<IB", _T_BOOL, value)
    if isinstance(value, (int, np.integer)):
        return out + struct.pack("<II", _T_U32, int(value))
    if isinstance(value, (float, np.floating)):
        return out + struct.pack("<If", _T_F32, float(value))
    if isinstance(value, str):
        return out + struct.pack("<I", _T_STR) + _s(value)
    if isinstance(value, np.ndarray):
        et = {np.dtype(np.int32): _T_I32, np.dtype(np.float32): _T_F32}[value.dtype]
        return out + struct.pack("<IIQ", _T_ARR, et, len(value)) + value.astype("<" + value.dtype.str[1:]).tobytes()
    if isinstance(value, list):                                          # list of strings
        return out + struct.pack("<IIQ", _T_ARR, _T_STR, len(value)) + b"".join(_s(v) for v in value)
    raise TypeError(f"GGUF metadata {key}: unsupported value type {type(value).__name__}")


def write_gguf_file(path: str, metadata: dict, tensors: list) -> None:
    """tensors: list of (name, type name, numpy shape, nbytes, produce() -> uint8 bytes-like).
    Written to path + '.tmp' and renamed at the end (no half-written model under the real name)."""
    head = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(metadata) + 1)]
    head.append(_kv("general.alignment", GGUF_ALIGN))
    head += [_kv(k, v) for k, v in metadata.items()]
    off = 0
    offsets = []
    for name, tname, shape, nbytes, _ in tensors:
        dims = list(reversed(shape))
        head.append(_s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                    + struct.pack("<IQ", TYPE_IDS[tname], off))
        offsets.append(off)
        off += -(-nbytes // GGUF_ALIGN) * GGUF_ALIGN
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        h = b"".join(head)
        f.write(h + b"\0" * (-len(h) % GGUF_ALIGN))
        for (name, _, _, nbytes, produce) in tensors:
            data = produce()                          # an array, or an iterator of array chunks
            written = 0
            for chunk in ([data] if isinstance(data, np.ndarray) else data):
                chunk = np.ascontiguousarray(chunk).view(np.uint8).reshape(-1)
                f.write(chunk.data)
                written += chunk.size
            if written != nbytes:
                raise ValueError(f"GGUF writer: tensor {name} produced {written} bytes, expected {nbytes}")
            f.write(b"\0" * (-nbytes % GGUF_ALIGN))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# tokenizer metadata
# ------------------------------------------------------------------------------------------------

def _byte_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (byte-level BPE token text)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def minimal_vocab(n: int, bos: int | None = None, eos: int | None = None) -> dict:
    """A valid byte-level BPE vocabulary of n tokens: the 256 bytes, one merge, fillers. Enough for
    llama.cpp to load a file and for ids-in/ids-out use; not a real language tokenizer."""
    if n < 260:
        raise ValueError(f"minimal vocabulary needs at least 260 tokens, not {n}")
    bu = _byte_unicode()
    bos = n - 2 if bos is None else bos
    eos = n - 1 if eos is None else eos
    toks = bu + [bu[ord("a")] + bu[ord("b")]] + [f"<|filler_{i}|>" for i in range(257, n)]
    types = np.ones(n, np.int32)
    toks[bos], toks[eos] = "<|begin_of_text|>", "<|end_of_text|>"
    types[[bos, eos]] = 3
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
            "tokenizer.ggml.tokens": toks, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": [f"{bu[ord('a')]} {bu[ord('b')]}"],
            "tokenizer.ggml.bos_token_id": bos, "tokenizer.ggml.eos_token_id": eos,
            "tokenizer.ggml.add_bos_token": True}


def tokenizer_from_hf_dir(path: str, vocab_size: int) -> dict | None:
    """GGUF tokenizer.* metadata from tokenizer.json (+ tokenizer_config.json); None if absent."""
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tj):
        return None
    from tokenizers import Tokenizer as HFTokenizer
    hf = HFTokenizer.from_file(tj)
    model = json.load(open(tj, encoding="utf-8")).get("model", {})
    if model.get("type") != "BPE":
        return None
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    added = hf.get_added_tokens_decoder()
    toks, types = [], np.ones(vocab_size, np.int32)
    for i in range(vocab_size):
        t = hf.id_to_token(i)
        if t is None:
            t, types[i] = f"[PAD{i}]", 5
        elif i in added and added[i].special:
            types[i] = 3
        toks.append(t)
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
            "tokenizer.ggml.tokens": toks, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges}
    cfg = {}
    tc = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(tc):
        cfg = json.load(open(tc, encoding="utf-8"))
    mc = json.load(open(os.path.join(path, "config.json"), encoding="utf-8"))
    for key, field in (("bos", "bos_token"), ("eos", "eos_token")):
        v = cfg.get(field)
        v = v.get("content") if isinstance(v, dict) else v
        i = hf.token_to_id(v) if isinstance(v, str) else mc.get(f"{key}_token_id")
        if isinstance(i, int):
            meta[f"tokenizer.ggml.{key}_token_id"] = i
    # Whether to prepend BOS, decided as for the directory itself (tokenizer_config's add_bos_token,
    # else whether tokenizer.json's post-processor adds it); without the key a llama-bpe GGUF
    # defaults to BOS on, and the GGUF would encode prompts differently from its source directory.
    from .tokenizer import Tokenizer
    meta["tokenizer.ggml.add_bos_token"] = Tokenizer.from_hf_dir(path).add_bos
    if isinstance(cfg.get("chat_template"), str):
        meta["tokenizer.chat_template"] = cfg["chat_template"]
    return meta


# ------------------------------------------------------------------------------------------------
# BitNet checkpoint -> GGUF
# ------------------------------------------------------------------------------------------------

def bitnet_metadata(cfg, arch: str = "bitnet", file_type: int = 37) -> dict:
    a = arch
    return {"general.architecture": arch, "general.name": "bitnet (plainlm convert)",
            "general.file_type": file_type, "general.quantization_version": 2,
            f"{a}.vocab_size": cfg.vocab_size, f"{a}.context_length": cfg.context_length,
            f"{a}.embedding_length": cfg.dim, f"{a}.block_count": cfg.n_layers,
            f"{a}.feed_forward_length": cfg.ffn_dim, f"{a}.attention.head_count": cfg.n_heads,
            f"{a}.attention.head_count_kv": cfg.n_kv_heads,
            f"{a}.attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
            f"{a}.rope.freq_base": float(cfg.rope_theta), f"{a}.rope.dimension_count": cfg.rotary_dim}


def _ternary_entry(name, n, k, qtype, codes_fn, gamma):
    from .quant import BY_NAME, row_bytes
    from .quant.ternary import QK, encode_tq, i2s_encode, i2s_nbytes
    if qtype == "I2_S":
        return (name, "I2_S", (n, k), i2s_nbytes(n, k), lambda: i2s_encode(codes_fn(0, n), gamma))
    qt = BY_NAME[qtype]
    if k % QK:
        raise ValueError(f"{name}: {qtype} needs rows that are a multiple of {QK}, K = {k}")

    def produce():
        out = np.empty((n, row_bytes(qt, k)), np.uint8)
        for r0 in range(0, n, 1024):
            r1 = min(n, r0 + 1024)
            c = codes_fn(r0, r1)
            out[r0:r1] = encode_tq(c, np.full((r1 - r0, k // QK), gamma, np.float32), qt)
        return out
    return (name, qtype, (n, k), n * row_bytes(qt, k), produce)


def _half_to_f16(w) -> np.ndarray:
    """A 16-bit / dense weight as float16 (bf16 -> f16 is exact inside f16's range)."""
    from .kernels.ternary import HalfWeight
    if isinstance(w, HalfWeight) and w.kind == "f16":
        return w.bits
    a = w.dequantize()
    big = np.abs(a).max(initial=0)
    if big > 65504:
        raise ValueError(f"embedding value {big} does not fit float16")
    return a.astype(np.float16)


def write_gguf(ck, out: str, qtype: str = "tq2_0", tokenizer: dict | None = None) -> None:
    """Write a loaded BitNet Checkpoint (TernaryWeight projections) as GGUF."""
    from .quant.ternary import TernaryWeight
    cfg = ck.config
    if cfg.arch != "bitnet":
        raise ValueError(f"convert writes BitNet models; this checkpoint is {cfg.arch}")
    qname = qtype.upper()
    arch = "bitnet-b1.58" if qname == "I2_S" else "bitnet"
    meta = bitnet_metadata(cfg, arch, FILE_TYPES[qtype.lower()])
    meta.update(tokenizer or minimal_vocab(cfg.vocab_size))
    tensors = []
    emb = ck.weights["token_embd"]
    tensors.append(("token_embd.weight", "F16", emb.shape, emb.shape[0] * emb.shape[1] * 2,
                    lambda: _half_to_f16(emb)))
    if ck.weights.get("output") is not None and ck.weights["output"] is not emb:
        o = ck.weights["output"]
        tensors.append(("output.weight", "F16", o.shape, o.shape[0] * o.shape[1] * 2, lambda o=o: _half_to_f16(o)))
    for name, w in ck.weights.items():
        if name in ("token_embd", "output"):
            continue
        if len(w.shape) == 1:
            tensors.append((name + ".weight", "F32", w.shape, 4 * w.shape[0],
                            lambda w=w: w.dequantize().reshape(-1).astype(np.float32)))
            continue
        if not isinstance(w, TernaryWeight):
            raise ValueError(f"{name}: not a ternary weight ({type(w).__name__}); convert needs a "
                             f"quantized BitNet checkpoint")
        gam = np.unique(w.scale)
        if gam.size != 1:
            raise ValueError(f"{name}: per-row scales cannot be written as a per-tensor BitNet scale")
        tensors.append(_ternary_entry(name + ".weight", w.shape[0], w.shape[1], qname,
                                      lambda r0, r1, w=w: w.codes(slice(r0, r1)), float(gam[0])))
    write_gguf_file(out, meta, tensors)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def cmd_convert(args) -> int:
    from .cli import UserError
    from .formats import load
    if not os.path.isdir(args.hfdir):
        raise UserError(f"{args.hfdir}: not a directory (convert reads a Hugging Face BitNet directory)")
    ck = load(args.hfdir)
    if ck.config.arch != "bitnet":
        raise UserError(f"{args.hfdir}: model_type is {ck.config.arch}; convert handles BitNet checkpoints")
    tok = tokenizer_from_hf_dir(args.hfdir, ck.config.vocab_size)
    try:
        write_gguf(ck, args.out, args.type, tok)
    except ValueError as e:
        raise UserError(f"{args.hfdir}: {e}") from None
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB, {args.type.upper()}"
          f"{'' if tok else ', minimal byte vocabulary: no tokenizer.json'})")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="BitNet HF directory -> GGUF (TQ2_0 / TQ1_0 / I2_S)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("hfdir", help="Hugging Face directory: config.json, *.safetensors (packed BitNet)")
    p.add_argument("--out", "-o", required=True, help="GGUF file to write")
    p.add_argument("--type", choices=["tq2_0", "tq1_0", "i2_s"], default="tq2_0",
                   help="ternary type: tq2_0 (llama.cpp, fastest), tq1_0 (1.69 bpw), i2_s (bitnet.cpp)")
    p.set_defaults(func=cmd_convert)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="plainlm")
    register(ap.add_subparsers(dest="command"))
    args = ap.parse_args(argv)
    return args.func(args)

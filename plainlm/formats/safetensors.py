"""Hugging Face checkpoint directories: config.json + *.safetensors (+ tokenizer.json).

safetensors layout: u64 little-endian header length n | n bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} | data; offsets
are relative to the end of the header. Tensors are memory-mapped, never read into memory whole.

BitNet (model_type "bitnet", transformers' BitNetForCausalLM) with
quantization_config {quant_method: bitnet, linear_class, quantization_mode}:
  * offline (the published checkpoints): every q/k/v/o/gate/up/down projection is uint8
    [N/4, K], 4 ternary codes per byte packed along the *rows* (plainlm/quant/ternary.py), with a
    `<name>.weight_scale` of shape [1]. The scale multiplies for linear_class "autobitlinear" and
    divides for "bitlinear" (settled against transformers in tests/test_bitnet.py; docs/bitnet.md).
  * online: the projections are full-precision latent weights; they are ternarized here exactly
    as transformers' WeightQuant does: gamma = max(mean|W|, 1e-5), t = clamp(round(W / gamma), -1, 1).
The projections become TernaryWeight bit planes at load; the embedding (bf16/f16) stays mapped
and doubles as the output head when the checkpoint ties them. No quantization_config: the
projections stay dense (transformers then runs plain nn.Linear too).

Plain Llama directories (model_type "llama") load as dense 16/32-bit weights in HF row order,
which is what plainlm's rotate_half RoPE expects (no Q/K permutation to undo).
"""
from __future__ import annotations

import glob
import json
import mmap
import os
import struct

import numpy as np

from ..config import ConfigError, ModelConfig
from ..quant import BF16, F16, F32, QTensor
from .names import hf_to_gguf


class HFCheckpointError(ConfigError):
    """A Hugging Face checkpoint directory that is malformed or that plainlm cannot run."""


_DTYPES = {"BF16": (2, BF16), "F16": (2, F16), "F32": (4, F32), "U8": (1, None), "I8": (1, None)}
MAX_HEADER = 100 << 20
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


# ------------------------------------------------------------------------------------------------
# safetensors reader
# ------------------------------------------------------------------------------------------------

class SafeTensor:
    """One tensor of a safetensors file: dtype name, shape and the raw bytes (a uint8 memmap view)."""

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], raw: np.ndarray, path: str):
        self.name, self.dtype, self.shape, self.raw, self.path = name, dtype, shape, raw, path

    def array(self) -> np.ndarray:
        """The values as numpy (bf16 -> float32; other dtypes as stored, zero copy)."""
        if self.dtype == "BF16":
            return (self.raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(self.shape)
        np_dtype = {"F16": np.float16, "F32": np.float32, "U8": np.uint8, "I8": np.int8}[self.dtype]
        return self.raw.view(np_dtype).reshape(self.shape)

    def bits16(self) -> np.ndarray:
        """uint16 bits of a 2-D bf16/f16 tensor (for the 16-bit head), zero copy."""
        return self.raw.view(np.uint16).reshape(self.shape)

    def qtensor(self) -> QTensor:
        """A dense QTensor over the stored bytes (BF16 / F16 / F32)."""
        qt = _DTYPES[self.dtype][1]
        if qt is None:
            raise HFCheckpointError(f"{self.path}: tensor '{self.name}' has dtype {self.dtype}, "
                                    f"expected a floating-point type")
        rows = self.shape[0] if len(self.shape) > 1 else 1
        return QTensor(qt, tuple(self.shape), self.raw.reshape(rows, -1))


def read_safetensors(path: str) -> tuple[dict[str, SafeTensor], mmap.mmap | None]:
    """Parse one .safetensors file; tensors are views into a read-only memory map."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise HFCheckpointError(f"{path}: cannot open: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise HFCheckpointError(f"{path}: not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(MAX_HEADER, size - 8):
            raise HFCheckpointError(f"{path}: header length {n} does not fit the {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HFCheckpointError(f"{path}: header is not valid JSON ({e})") from None
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else None
    if not isinstance(header, dict):
        raise HFCheckpointError(f"{path}: header is not a JSON object")
    out = {}
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise HFCheckpointError(f"{path}: tensor '{name}' has a malformed header entry {info!r}") from None
        if dtype not in _DTYPES:
            raise HFCheckpointError(f"{path}: tensor '{name}' has dtype {dtype}, which plainlm does not read "
                                    f"(supported: {', '.join(_DTYPES)})")
        count = int(np.prod(shape)) if shape else 1
        if any(d < 0 for d in shape) or not (0 <= b <= e <= size - base) or e - b != count * _DTYPES[dtype][0]:
            raise HFCheckpointError(f"{path}: tensor '{name}' ({dtype} {list(shape)}) has data offsets "
                                    f"[{b}, {e}) inconsistent with its shape or the file size")
        raw = np.frombuffer(buf, np.uint8, count=e - b, offset=base + b) if e > b else np.zeros(0, np.uint8)
        out[name] = SafeTensor(name, dtype, shape, raw, path)
    return out, buf


def release_pages(arr: np.ndarray) -> None:
    """Drop a memory-mapped array's pages from this process's resident set (MADV_DONTNEED; the
    mapping stays valid and re-reads the file if touched). Used after a tensor was converted to
    another layout, so that peak RSS holds the converted form only."""
    obj = arr
    while obj is not None and not isinstance(obj, mmap.mmap):
        obj = getattr(obj, "base", None) if not isinstance(obj, memoryview) else obj.obj
    if obj is None or not hasattr(mmap, "MADV_DONTNEED") or arr.size == 0:
        return
    start = arr.__array_interface__["data"][0]
    base = np.frombuffer(obj, np.uint8, count=1).__array_interface__["data"][0]
    off = start - base
    page = mmap.PAGESIZE
    a, b = -(-off // page) * page, (off + arr.nbytes) // page * page      # whole pages inside
    if b > a:
        try:
            obj.madvise(mmap.MADV_DONTNEED, a, b - a)
        except (OSError, ValueError):
            pass


# ------------------------------------------------------------------------------------------------
# config.json -> ModelConfig
# ------------------------------------------------------------------------------------------------

def config_from_hf(cfg: dict, where: str = "") -> ModelConfig:
    mt = cfg.get("model_type")
    if mt not in ("bitnet", "llama"):
        raise HFCheckpointError(f"{where}config.json: model_type {mt!r} is not supported "
                                f"(plainlm reads bitnet and llama directories)")
    act = cfg.get("hidden_act", "relu2" if mt == "bitnet" else "silu")
    if (mt, act) not in (("bitnet", "relu2"), ("llama", "silu")):
        raise HFCheckpointError(f"{where}config.json: hidden_act {act!r} is not what plainlm's {mt} runs")
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling")
    rtype = rope.get("rope_type", (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")))
    if rtype not in ("default", None):
        raise HFCheckpointError(f"{where}config.json: RoPE type {rtype!r} is not supported (only default)")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 500000.0 if mt == "bitnet" else 10000.0))
    try:
        dim, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return ModelConfig(
            arch=mt, vocab_size=int(cfg["vocab_size"]), dim=dim,
            n_layers=int(cfg["num_hidden_layers"]), n_heads=heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or dim // heads),
            ffn_dim=int(cfg["intermediate_size"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta), context_length=int(cfg.get("max_position_embeddings", 2048)),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            act={"bitnet": "relu2", "llama": "silu"}[mt])
    except KeyError as e:
        raise HFCheckpointError(f"{where}config.json: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise HFCheckpointError(f"{where}config.json: {e}") from None


def bitnet_quant(cfg: dict, where: str = "") -> dict | None:
    """The quantization_config of a BitNet config.json, validated; None when absent."""
    q = cfg.get("quantization_config")
    if q is None:
        return None
    if q.get("quant_method") != "bitnet":
        raise HFCheckpointError(f"{where}config.json: quant_method {q.get('quant_method')!r} is not "
                                f"supported (plainlm reads 'bitnet')")
    lc, mode = q.get("linear_class", "bitlinear"), q.get("quantization_mode", "offline")
    if lc not in ("bitlinear", "autobitlinear"):
        raise HFCheckpointError(f"{where}config.json: unknown quantization_config.linear_class {lc!r} "
                                f"(expected 'bitlinear' or 'autobitlinear'; it decides whether "
                                f"weight_scale multiplies or divides)")
    if mode not in ("offline", "online"):
        raise HFCheckpointError(f"{where}config.json: unknown quantization_mode {mode!r}")
    if lc == "bitlinear" and mode == "online":
        raise HFCheckpointError(f"{where}config.json: linear_class 'bitlinear' has no online mode")
    if q.get("use_rms_norm"):
        raise HFCheckpointError(f"{where}config.json: quantization_config.use_rms_norm is not supported")
    return {"linear_class": lc, "mode": mode}


# ------------------------------------------------------------------------------------------------
# the directory loader
# ------------------------------------------------------------------------------------------------

def _tensor_files(path: str) -> list[str]:
    idx = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx, encoding="utf-8") as f:
            wm = json.load(f).get("weight_map", {})
        return sorted({os.path.join(path, v) for v in wm.values()})
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise HFCheckpointError(f"{path}: no *.safetensors files")
    return files


def ternarize_absmean(w: np.ndarray, rows: int = 1024):
    """transformers' WeightQuant on a latent matrix: (codes uint8 [N, K], gamma)."""
    w = np.asarray(w)
    total = 0.0
    for r0 in range(0, w.shape[0], rows):
        total += float(np.abs(w[r0:r0 + rows].astype(np.float32)).sum(dtype=np.float64))
    gamma = np.float32(max(total / w.size, 1e-5))
    inv = np.float32(1.0) / gamma
    codes = np.empty(w.shape, np.uint8)
    for r0 in range(0, w.shape[0], rows):
        t = np.clip(np.rint(w[r0:r0 + rows].astype(np.float32) * inv), -1, 1)
        codes[r0:r0 + rows] = (t + 1).astype(np.uint8)
    return codes, float(gamma)


def load_hf_dir(path: str | os.PathLike):
    from . import Checkpoint, _check_llama_tensors
    from ..kernels.ternary import HalfWeight
    from ..quant.ternary import TernaryWeight

    path = os.fspath(path)
    where = f"{path}: "
    cj = os.path.join(path, "config.json")
    if not os.path.exists(cj):
        raise HFCheckpointError(f"{path}: not a model directory (no config.json)")
    with open(cj, encoding="utf-8") as f:
        try:
            raw_cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise HFCheckpointError(f"{cj}: not valid JSON ({e})") from None
    cfg = config_from_hf(raw_cfg, where)
    quant = bitnet_quant(raw_cfg, where) if cfg.arch == "bitnet" else None

    st: dict[str, SafeTensor] = {}
    for fn in _tensor_files(path):
        tensors, _ = read_safetensors(fn)
        for name, t in tensors.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            m = hf_to_gguf(name)
            if m is None:
                raise HFCheckpointError(f"{fn}: unknown tensor '{name}' (not in plainlm/formats/names.py)")
            st[f"{m[0]}#{m[1]}"] = t

    w: dict = {}
    for key, t in st.items():
        name, kind = key.split("#")
        if kind == "weight_scale":
            if f"{name}#weight" not in st:
                raise HFCheckpointError(f"{t.path}: '{t.name}' has no weight next to it")
            continue
        layer_proj = name.split(".")[-1] in PROJECTIONS
        if t.dtype in ("U8", "I8"):
            if not (layer_proj and quant and quant["mode"] == "offline"):
                raise HFCheckpointError(
                    f"{t.path}: tensor '{t.name}' is {t.dtype} {list(t.shape)} but config.json has no "
                    f"offline BitNet quantization_config for it" if not (layer_proj and quant) else
                    f"{t.path}: tensor '{t.name}' is packed but quantization_mode is 'online'")
            w[name] = _packed(t, st.get(f"{name}#weight_scale"), quant["linear_class"], cfg)
            release_pages(t.raw)
        elif layer_proj and quant:
            if quant["mode"] == "offline":
                raise HFCheckpointError(f"{t.path}: tensor '{t.name}' is {t.dtype} {list(t.shape)}; an offline "
                                        f"BitNet checkpoint stores projections packed as uint8 [N/4, K]")
            codes, gamma = ternarize_absmean(t.array())
            w[name] = TernaryWeight.from_codes(codes, gamma, "HF latent (online)")
        elif name in ("token_embd", "output") and t.dtype in ("BF16", "F16") and len(t.shape) == 2:
            w[name] = HalfWeight(t.bits16(), t.dtype.lower())
        else:
            w[name] = t.qtensor()
    if "output" not in w and "token_embd" in w:
        w["output"] = w["token_embd"]                   # tied head: logits = x @ embed_tokens.T
    try:
        _check_llama_tensors(cfg, w, path)
    except ValueError as e:
        raise HFCheckpointError(str(e)) from None
    meta = {"general.architecture": cfg.arch, "general.source.hf_dir": path, "plainlm.hf_dir": path}
    if quant:
        meta["plainlm.bitnet.linear_class"] = quant["linear_class"]
    return Checkpoint(cfg, w, meta, path)


def _packed(t: SafeTensor, ws: SafeTensor | None, linear_class: str, cfg: ModelConfig):
    """uint8 [N/4, K] + weight_scale [1] -> TernaryWeight (validated against the config)."""
    from . import expected_shapes
    from ..quant.ternary import TernaryFormatError, TernaryWeight
    name = hf_to_gguf(t.name)[0]
    n, k = expected_shapes(cfg)[name]
    if t.dtype != "U8" or tuple(t.shape) != (n // 4, k) or n % 4:
        raise HFCheckpointError(f"{t.path}: packed tensor '{t.name}' is {t.dtype} {list(t.shape)}, expected "
                                f"U8 [{n // 4}, {k}] (4 ternary rows per byte row of the {n}x{k} matrix)")
    if ws is None:
        raise HFCheckpointError(f"{t.path}: packed tensor '{t.name}' has no '{t.name}_scale' "
                                f"(the per-tensor weight_scale)")
    v = ws.array().astype(np.float32).reshape(-1)
    if v.size != 1 or not np.isfinite(v[0]) or v[0] <= 0:
        raise HFCheckpointError(f"{ws.path}: '{ws.name}' must be one positive finite number, got "
                                f"{v[:4].tolist()} (shape {list(ws.shape)})")
    # autobitlinear: y = (x_q/s) @ t.T * weight_scale; bitlinear: y = (x_q @ t.T) / (s * weight_scale)
    gamma = float(v[0]) if linear_class == "autobitlinear" else float(np.float32(1.0) / v[0])
    try:
        return TernaryWeight.from_hf_packed(t.array(), gamma)
    except TernaryFormatError as e:                      # e.g. the unused code 3
        raise HFCheckpointError(f"{t.path}: packed tensor '{t.name}': {e}") from None

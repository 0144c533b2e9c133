"""The one table from Hugging Face tensor names to plainlm's (= GGUF's) canonical names.

    model.embed_tokens.weight                        -> token_embd
    model.layers.{i}.self_attn.q_proj.weight         -> blk.{i}.attn_q        (k, v alike; o_proj -> attn_output)
    model.layers.{i}.self_attn.attn_sub_norm.weight  -> blk.{i}.attn_sub_norm (BitNet)
    model.layers.{i}.mlp.gate_proj.weight            -> blk.{i}.ffn_gate      (up, down alike)
    model.layers.{i}.mlp.ffn_sub_norm.weight         -> blk.{i}.ffn_sub_norm  (BitNet)
    model.layers.{i}.input_layernorm.weight          -> blk.{i}.attn_norm
    model.layers.{i}.post_attention_layernorm.weight -> blk.{i}.ffn_norm
    model.norm.weight                                -> output_norm
    lm_head.weight                                   -> output
A `.weight_scale` suffix (BitNet packed projections) maps the same way, with kind "weight_scale".
"""
from __future__ import annotations

import re

GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "self_attn.attn_sub_norm": "attn_sub_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "mlp.ffn_sub_norm": "ffn_sub_norm", "input_layernorm": "attn_norm",
         "post_attention_layernorm": "ffn_norm"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_KINDS = ("weight_scale", "weight")


def hf_to_gguf(name: str) -> tuple[str, str] | None:
    """'model.layers.3.mlp.up_proj.weight' -> ('blk.3.ffn_up', 'weight'); None if unknown."""
    for kind in _KINDS:
        if name.endswith("." + kind):
            stem = name[:-len(kind) - 1]
            break
    else:
        return None
    if stem in GLOBAL:
        return GLOBAL[stem], kind
    m = _LAYER_RE.match(stem)
    if m and m.group(2) in LAYER:
        return f"blk.{int(m.group(1))}.{LAYER[m.group(2)]}", kind
    return None


def gguf_to_hf(name: str, kind: str = "weight") -> str:
    """Inverse of hf_to_gguf: 'blk.3.ffn_up' -> 'model.layers.3.mlp.up_proj.weight'."""
    for hf, g in GLOBAL.items():
        if g == name:
            return f"{hf}.{kind}"
    m = re.match(r"^blk\.(\d+)\.(.+)$", name)
    if m:
        for hf, g in LAYER.items():
            if g == m.group(2):
                return f"model.layers.{m.group(1)}.{hf}.{kind}"
    raise KeyError(f"no Hugging Face name for {name!r}")

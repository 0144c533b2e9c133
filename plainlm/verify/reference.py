"""`plainlm verify --against transformers`: our forward pass next to Hugging Face's, stage by stage.

Both models read the same GGUF (transformers dequantizes it to float32 with the `gguf` package;
we decode the blocks ourselves) and get the same token ids. We record, per prompt:

    embedding                 ours: Model.hook("embed")        HF: hidden_states[0]
    layer i attention output  ours: Model.hook("attn_out", i)  HF: forward hook on layers[i].self_attn
    layer i MLP output        ours: Model.hook("mlp_out", i)   HF: forward hook on layers[i].mlp
    final logits              ours: forward(logits="all")      HF: .logits
    greedy tokens             ours: KV-cache decode loop       HF: full recompute each step

and report max |ours - HF| of each stage against the tolerance
    max_abs_diff <= RTOL * max(1, max |HF|)          RTOL = 1e-4
(both sides compute in float32 but sum in different orders; with identical weights that leaves
relative differences around 1e-6, so 1e-4 is loose for rounding and tight for any real bug —
a wrong RoPE convention, norm epsilon or head permutation shows up as O(1)). Greedy tokens must be
equal, except that a divergence at a near tie (top-2 logit gap below the logits tolerance) is
reported as such and still counts as a match.

transformers and torch are test/verification references only: imported here, lazily.
"""
from __future__ import annotations

import os

import numpy as np

RTOL = 1e-4
DEFAULT_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "A B C D A B C"]


def load_transformers(path: str):
    """LlamaForCausalLM (or whatever the GGUF is) from the same file, float32, eval mode."""
    try:
        import torch
        import transformers
    except ImportError as e:
        from ..cli import UserError
        raise UserError(f"verify --against transformers needs torch and transformers ({e}); "
                        "pip install -e '.[test]'") from None
    if not os.path.isfile(path):
        from ..cli import UserError
        raise UserError(f"{path}: transformers can only read a GGUF file here")
    d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    try:
        m = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    except TypeError:                                  # transformers < 4.56 spells it torch_dtype
        m = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    return m.eval()


def _ours(m, ids, n_greedy):
    from ..model import forward
    rec = {}

    def hook(stage, layer, a):
        if stage in ("embed", "attn_out", "mlp_out"):
            rec[(stage, layer)] = np.array(a, np.float32)

    old, m.hook = m.hook, hook
    try:
        cache = m.new_cache(len(ids) + n_greedy + 1)
        logits = forward(m, ids, np.arange(len(ids)), cache, logits="all")
    finally:
        m.hook = old
    rec[("logits", -1)] = np.array(logits, np.float32)
    out, last, gaps = [], logits[-1], []
    for step in range(n_greedy):
        top2 = np.sort(last)[-2:]
        gaps.append(float(top2[1] - top2[0]))
        nxt = int(np.argmax(last))
        out.append(nxt)
        if step + 1 < n_greedy:
            last = forward(m, [nxt], [len(ids) + step], cache)
    return rec, out, gaps


def _theirs(hf, ids, n_greedy):
    import torch
    rec, hooks = {}, []
    layers = hf.model.layers
    for i, layer in enumerate(layers):
        hooks.append(layer.self_attn.register_forward_hook(
            lambda mod, args, out, i=i: rec.__setitem__(("attn_out", i), (out[0] if isinstance(out, tuple) else out)[0].detach().float().numpy())))
        hooks.append(layer.mlp.register_forward_hook(
            lambda mod, args, out, i=i: rec.__setitem__(("mlp_out", i), out[0].detach().float().numpy())))
    try:
        with torch.no_grad():
            o = hf(torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    rec[("embed", -1)] = o.hidden_states[0][0].float().numpy()
    rec[("logits", -1)] = o.logits[0].float().numpy()
    seq, out = list(ids), []
    last = rec[("logits", -1)][-1]
    with torch.no_grad():
        for step in range(n_greedy):
            nxt = int(np.argmax(last))
            out.append(nxt)
            seq.append(nxt)
            if step + 1 < n_greedy:
                last = hf(torch.tensor([seq]), use_cache=False).logits[0, -1].float().numpy()
    return rec, out


def compare(m, hf, prompts_ids: list[list[int]], n_greedy: int = 8, rtol: float = RTOL) -> dict:
    """Run both on every prompt; the report as a dict (see module docstring)."""
    L = m.config.n_layers
    order = [("embed", -1)] + [(s, i) for i in range(L) for s in ("attn_out", "mlp_out")] + [("logits", -1)]
    stages = {k: {"diff": 0.0, "scale": 0.0} for k in order}
    greedy = []
    for ids in prompts_ids:
        ours, our_tokens, gaps = _ours(m, ids, n_greedy)
        theirs, their_tokens = _theirs(hf, ids, n_greedy)
        for k in order:
            a, b = ours[k], theirs[k]
            if a.shape != b.shape:
                raise ValueError(f"stage {k}: shape {a.shape} (ours) vs {b.shape} (transformers)")
            s = stages[k]
            s["diff"] = max(s["diff"], float(np.abs(a - b).max()))
            s["scale"] = max(s["scale"], float(np.abs(b).max()))
        div = next((i for i, (x, y) in enumerate(zip(our_tokens, their_tokens)) if x != y), None)
        greedy.append({"prompt_ids": list(map(int, ids)), "ours": our_tokens, "transformers": their_tokens,
                       "first_divergence": div, "gap_at_divergence": None if div is None else gaps[div]})
    rows = []
    for (stage, layer) in order:
        s = stages[(stage, layer)]
        tol = rtol * max(1.0, s["scale"])
        rows.append({"stage": stage, "layer": layer if layer >= 0 else None, "max_abs_diff": s["diff"],
                     "max_abs_ref": s["scale"], "tolerance": tol, "match": s["diff"] <= tol})
    logit_tol = rows[-1]["tolerance"]
    for g in greedy:
        g["match"] = g["first_divergence"] is None or g["gap_at_divergence"] <= 2 * logit_tol
        g["near_tie"] = g["first_divergence"] is not None and g["match"]
    return {"against": "transformers", "rtol": rtol, "stages": rows, "greedy": greedy,
            "match": all(r["match"] for r in rows) and all(g["match"] for g in greedy)}


def format_report(rep: dict, prompts: list[str] | None = None, tok=None) -> str:
    lines = [f"plainlm vs transformers, float32, tolerance: max|diff| <= {rep['rtol']:g} * max(1, max|transformers|)",
             f"{'stage':<22}{'max|diff|':>12}{'max|ref|':>12}{'tolerance':>12}  match"]
    for r in rep["stages"]:
        name = r["stage"] if r["layer"] is None else f"layer {r['layer']:>2} {r['stage']}"
        lines.append(f"{name:<22}{r['max_abs_diff']:>12.3e}{r['max_abs_ref']:>12.4g}{r['tolerance']:>12.3e}  "
                     f"{'yes' if r['match'] else 'NO'}")
    for i, g in enumerate(rep["greedy"]):
        p = repr(prompts[i]) if prompts else f"prompt {i}"
        txt = (lambda ids: repr(tok.decode(ids))) if tok is not None else str
        status = "identical" if g["first_divergence"] is None else (
            f"diverge at {g['first_divergence']} (near tie, gap {g['gap_at_divergence']:.2e})" if g["match"]
            else f"DIVERGE at {g['first_divergence']} (gap {g['gap_at_divergence']:.2e})")
        lines.append(f"greedy {p}: ours {txt(g['ours'])} | transformers {txt(g['transformers'])}: {status}")
    worst = max(rep["stages"], key=lambda r: r["max_abs_diff"] / r["tolerance"])
    name = worst["stage"] if worst["layer"] is None else f"layer {worst['layer']} {worst['stage']}"
    lines.append(f"closest to its tolerance: {name} at {worst['max_abs_diff'] / worst['tolerance']:.1%} of it")
    first_bad = next((r for r in rep["stages"] if not r["match"]), None)
    if first_bad is not None:
        lines.append(f"first stage out of tolerance: {first_bad['stage']}"
                     + ("" if first_bad["layer"] is None else f" of layer {first_bad['layer']}"))
    lines.append("MATCH" if rep["match"] else "MISMATCH")
    return "\n".join(lines)

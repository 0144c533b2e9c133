"""BitNet b1.58 end to end: a small random BitNet saved in the official packed HF format, run by
transformers and by plainlm (HF directory, GGUF TQ2_0, GGUF TQ1_0, GGUF I2_S).

Settles the weight_scale convention: with linear_class "autobitlinear" the stored weight_scale is
gamma and MULTIPLIES the integer product; with "bitlinear" it is 1/gamma and DIVIDES
(test_logits_match_transformers, test_weight_scale_convention_is_decisive).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from plainlm import convert                                     # noqa: E402
from plainlm.formats import load                                 # noqa: E402
from plainlm.formats.safetensors import HFCheckpointError        # noqa: E402
from plainlm.model import Model, forward                         # noqa: E402
from plainlm.quant import TQ1_0, TQ2_0                           # noqa: E402
from plainlm.quant.ternary import TernaryWeight, hf_pack         # noqa: E402

SMALL = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, hidden_act="relu2")
PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
IDS = [1, 17, 250, 3, 999, 42, 42, 7, 512, 100, 64, 800, 5, 6, 300, 2]
# plainlm sums the ternary products exactly in integers; transformers in float32 (the
# reference below) rounds; an activation that lands within an ulp of a .5 rounding boundary
# may quantize one step apart. Observed max |diff| ~1e-4 of logits of magnitude ~5.
ATOL = 2e-3


def build_hf_bitnet(path: str, linear_class: str = "autobitlinear", seed: int = 0, **over) -> dict:
    """A random ternary BitNet written like microsoft/bitnet-b1.58-2B-4T: packed uint8 projections
    [N/4, K] + weight_scale [1] (bf16), bf16 norms and embedding, config with quantization_config."""
    from safetensors.torch import save_file
    cfg = dict(SMALL, **over)
    rng = np.random.default_rng(seed)
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    Dh = D // H
    shapes = {"self_attn.q_proj": (H * Dh, D), "self_attn.k_proj": (Hkv * Dh, D),
              "self_attn.v_proj": (Hkv * Dh, D), "self_attn.o_proj": (D, H * Dh),
              "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D), "mlp.down_proj": (D, F)}
    sd, gammas = {}, {}
    bf = lambda a: torch.tensor(np.asarray(a, np.float32)).to(torch.bfloat16)   # noqa: E731
    sd["model.embed_tokens.weight"] = bf(rng.standard_normal((V, D)) * 0.5)
    sd["model.norm.weight"] = bf(1 + 0.1 * rng.standard_normal(D))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for nm, n in (("input_layernorm", D), ("post_attention_layernorm", D),
                      ("self_attn.attn_sub_norm", D), ("mlp.ffn_sub_norm", F)):
            sd[p + nm + ".weight"] = bf(1 + 0.1 * rng.standard_normal(n))
        for nm in PROJ:
            t = rng.choice([-1, 0, 1], size=shapes[nm], p=[0.3, 0.4, 0.3])
            gamma = float(torch.tensor(rng.uniform(0.5, 2.0) / np.sqrt(shapes[nm][1])).to(torch.bfloat16))
            gammas[p + nm] = gamma
            sd[p + nm + ".weight"] = torch.tensor(hf_pack((t + 1).astype(np.uint8)))
            ws = gamma if linear_class == "autobitlinear" else 1.0 / gamma
            sd[p + nm + ".weight_scale"] = bf([ws])
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "model.safetensors"))
    conf = dict(cfg, model_type="bitnet", architectures=["BitNetForCausalLM"], torch_dtype="bfloat16",
                bos_token_id=1, eos_token_id=2,
                quantization_config={"quant_method": "bitnet", "linear_class": linear_class,
                                     "quantization_mode": "offline"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(conf, f)
    return gammas


def _hf_model(path: str):
    """transformers' model, then cast to float32 (every stored value is bf16, so the cast is exact
    and the reference is free of bf16 rounding in the matmuls)."""
    from transformers import BitNetForCausalLM
    from transformers.integrations.bitnet import BitLinear
    m = BitNetForCausalLM.from_pretrained(path)
    m = torch.nn.Module.float(m).eval()          # (PreTrainedModel.float refuses quantized models)
    for mod in m.modules():
        if isinstance(mod, BitLinear):           # BitLinear unpacks and multiplies in its own
            mod.dtype = torch.float32            # `dtype` attribute (bf16): make that float32 too
    return m


def hf_logits(path: str, ids) -> np.ndarray:
    m = _hf_model(path)
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].float().numpy()


def plain_logits(path: str, ids, backend: str = "ref") -> np.ndarray:
    m = Model.from_checkpoint(load(path), backend)
    cache = m.new_cache(64)
    return forward(m, ids, np.arange(len(ids)), cache, logits="all")


def greedy(logits_fn, ids, n=8):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(np.argmax(logits_fn(ids)[-1])))
    return ids[-n:]


@pytest.fixture(scope="module")
def hfdir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("bitnet_hf"))
    build_hf_bitnet(d)
    return d


@pytest.fixture(scope="module")
def ref_logits(hfdir):
    return hf_logits(hfdir, IDS)


@pytest.mark.parametrize("backend", ["ref", "fast"])
def test_logits_match_transformers(hfdir, ref_logits, backend):
    ours = plain_logits(hfdir, IDS, backend)
    assert ours.shape == ref_logits.shape
    np.testing.assert_allclose(ours, ref_logits, atol=ATOL, rtol=0)
    assert (ours.argmax(-1) == ref_logits.argmax(-1)).all()


def test_greedy_continuation_matches_transformers(hfdir):
    m = _hf_model(hfdir)
    with torch.no_grad():
        hf = m.generate(torch.tensor([IDS[:6]]), max_new_tokens=10, do_sample=False)[0, 6:].tolist()
    ours = greedy(lambda ids: plain_logits(hfdir, ids, "fast"), IDS[:6], 10)
    assert ours == hf


def test_bitlinear_class_divides(tmp_path, ref_logits):
    """Same model stored with linear_class bitlinear (weight_scale = 1/gamma) gives the same output
    in transformers and in plainlm."""
    d = str(tmp_path / "bl")
    build_hf_bitnet(d, linear_class="bitlinear")
    hf = hf_logits(d, IDS)
    ours = plain_logits(d, IDS)
    np.testing.assert_allclose(ours, hf, atol=ATOL, rtol=0)


def test_weight_scale_convention_is_decisive(hfdir, ref_logits, tmp_path):
    """Reading an autobitlinear checkpoint with the opposite (divide) convention is far off: the
    test above really decides the question."""
    cfg = json.load(open(os.path.join(hfdir, "config.json")))
    cfg["quantization_config"]["linear_class"] = "bitlinear"
    d = tmp_path / "wrong"
    d.mkdir()
    os.symlink(os.path.join(hfdir, "model.safetensors"), d / "model.safetensors")
    json.dump(cfg, open(d / "config.json", "w"))
    wrong = plain_logits(str(d), IDS)
    assert np.abs(wrong - ref_logits).max() > 100 * ATOL


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
def test_gguf_tq_same_output(hfdir, ref_logits, tmp_path, qtype):
    out = str(tmp_path / f"m.{qtype}.gguf")
    assert convert.main(["convert", hfdir, "--out", out, "--type", qtype]) == 0
    ck = load(out)
    assert ck.config.arch == "bitnet" and ck.config.act == "relu2"
    assert isinstance(ck.weights["blk.0.attn_q"], TernaryWeight)
    hf_ck = load(hfdir)
    for name, w in hf_ck.weights.items():          # identical planes, scales up to f16 rounding of d
        if isinstance(w, TernaryWeight):
            g = ck.weights[name]
            assert (g.plus == w.plus).all() and (g.minus == w.minus).all()
            np.testing.assert_allclose(g.scale, w.scale, rtol=1e-3)
    ours = plain_logits(out, IDS, "fast")
    np.testing.assert_allclose(ours, ref_logits, atol=0.05, rtol=0)   # gamma stored as f16 in TQ blocks
    assert (ours.argmax(-1) == ref_logits.argmax(-1)).all()


def test_gguf_i2s_same_output(hfdir, tmp_path):
    out = str(tmp_path / "m.i2s.gguf")
    convert.write_gguf(load(hfdir), out, "i2_s")
    a, b = plain_logits(hfdir, IDS), plain_logits(out, IDS)
    np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)       # I2_S keeps gamma in float32


def test_tq2_gguf_tq1_gguf_identical(hfdir, tmp_path):
    outs = {}
    for q in ("tq2_0", "tq1_0"):
        p = str(tmp_path / f"{q}.gguf")
        convert.main(["convert", hfdir, "--out", p, "--type", q])
        outs[q] = plain_logits(p, IDS, "fast")
    np.testing.assert_array_equal(outs["tq2_0"], outs["tq1_0"])


def test_gguf_uses_gguf_names_and_metadata(hfdir, tmp_path):
    import gguf
    out = str(tmp_path / "m.gguf")
    convert.main(["convert", hfdir, "--out", out, "--type", "tq2_0"])
    r = gguf.GGUFReader(out)
    names = {t.name for t in r.tensors}
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(4) for n in
        ("attn_q", "attn_k", "attn_v", "attn_output", "attn_norm", "attn_sub_norm", "ffn_gate",
         "ffn_up", "ffn_down", "ffn_norm", "ffn_sub_norm")}
    assert names == expected
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    assert arch == "bitnet"
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.TQ2_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F16


# ---------------------------------------------------------------------------------------------
# malformed directories -> clear errors
# ---------------------------------------------------------------------------------------------

def _mutate(src, dst, tensors=None, config=None):
    from safetensors.torch import load_file, save_file
    os.makedirs(dst, exist_ok=True)
    sd = load_file(os.path.join(src, "model.safetensors"))
    if tensors:
        tensors(sd)
    save_file(sd, os.path.join(dst, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    if config:
        config(cfg)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return dst


def test_error_missing_weight_scale(hfdir, tmp_path):
    d = _mutate(hfdir, str(tmp_path / "a"), tensors=lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight_scale"))
    with pytest.raises(HFCheckpointError, match="weight_scale"):
        load(d)


def test_error_wrong_packed_shape(hfdir, tmp_path):
    def f(sd):
        sd["model.layers.0.self_attn.k_proj.weight"] = sd["model.layers.0.self_attn.k_proj.weight"][:-1].clone()
    d = _mutate(hfdir, str(tmp_path / "b"), tensors=f)
    with pytest.raises(HFCheckpointError, match=r"expected U8 \[32, 256\]"):
        load(d)


def test_error_unknown_linear_class(hfdir, tmp_path):
    d = _mutate(hfdir, str(tmp_path / "c"), config=lambda c: c["quantization_config"].update(linear_class="fancy"))
    with pytest.raises(HFCheckpointError, match="linear_class 'fancy'"):
        load(d)


def test_error_packed_without_quant_config(hfdir, tmp_path):
    d = _mutate(hfdir, str(tmp_path / "d"), config=lambda c: c.pop("quantization_config"))
    with pytest.raises(HFCheckpointError, match="no offline BitNet quantization_config"):
        load(d)


def test_error_code_three(hfdir, tmp_path):
    def f(sd):
        sd["model.layers.2.mlp.down_proj.weight"][0, 0] = 0xFF
    d = _mutate(hfdir, str(tmp_path / "e"), tensors=f)
    with pytest.raises(HFCheckpointError, match="code 3"):
        load(d)


def test_error_unknown_tensor(hfdir, tmp_path):
    import torch as t
    d = _mutate(hfdir, str(tmp_path / "f"), tensors=lambda sd: sd.update({"model.layers.0.extra.weight": t.zeros(4)}))
    with pytest.raises(HFCheckpointError, match="unknown tensor 'model.layers.0.extra.weight'"):
        load(d)


def test_online_latent_weights_match_transformers(tmp_path):
    """quantization_mode online: bf16 latent weights, ternarized at load like WeightQuant."""
    from safetensors.torch import save_file
    from transformers import BitNetConfig, BitNetForCausalLM
    cfg = BitNetConfig(**SMALL)
    torch.manual_seed(0)
    m = BitNetForCausalLM(cfg)
    d = str(tmp_path / "online")
    os.makedirs(d)
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, os.path.join(d, "model.safetensors"))
    conf = cfg.to_dict()
    conf["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                   "quantization_mode": "online"}
    json.dump(conf, open(os.path.join(d, "config.json"), "w"))
    hf = hf_logits(d, IDS)
    ours = plain_logits(d, IDS)
    # latent weights are rounded to ternary in both, ties at exactly .5 * gamma aside
    assert (ours.argmax(-1) == hf.argmax(-1)).mean() >= 0.9
    np.testing.assert_allclose(ours, hf, atol=0.05 * np.abs(hf).max(), rtol=0)

"""Export of trained checkpoints to GGUF: plainlm and llama.cpp load it and agree on greedy text."""
import numpy as np
import pytest

from plainlm.train.export import export_gguf, permute_qk
from plainlm.train.loop import TrainConfig, TrainError, model_from_checkpoint, train
from plainlm.train.model import forward

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
        "All that glitters is not gold. Where there is a will, there is a way. ") * 60


def _train(tmp_path, arch="llama", steps=30, **model):
    (tmp_path / "c.txt").write_text(TEXT)
    m = dict(arch=arch, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, context_length=32)
    m.update(model)
    tc = TrainConfig(data=[str(tmp_path / "c.txt")], out_dir=str(tmp_path / "out"), vocab_size=300,
                     model=m, batch_size=4, steps=steps, lr=3e-3, warmup=5, eval_every=steps,
                     ckpt_every=steps, log_every=steps, plot=False)
    train(tc, progress=False, log=lambda s: None)
    return tmp_path / "out" / "ckpt.npz"


def _greedy_ours(cfg, P, ids, n):
    ids = list(ids)
    for _ in range(n):
        logits, _ = forward(cfg, P, np.asarray(ids[-cfg.context_length:])[None])
        ids.append(int(np.argmax(logits[0, -1])))
    return ids


def test_permute_matches_loader_unpermute():
    from plainlm.formats import unpermute_qk
    from plainlm.quant import QTensor
    w = np.random.default_rng(0).normal(size=(3 * 8, 5)).astype(np.float32)
    from plainlm.quant import F32
    q = QTensor.from_float(permute_qk(w, 3), F32)
    assert np.array_equal(unpermute_qk(q, 3).dequantize(), w)


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
def test_llama_export_loads_in_plainlm(llama_ckpt, tmp_path, qtype):
    from plainlm.model import forward as inf_forward
    from plainlm.model import load_model
    from plainlm.tokenizer import Tokenizer
    cfg, P, tok, _ = model_from_checkpoint(llama_ckpt)
    out = export_gguf(llama_ckpt, tmp_path / f"m-{qtype}.gguf", qtype)
    m = load_model(str(out), "ref")
    assert m.config.dim == cfg.dim and m.config.n_kv_heads == cfg.n_kv_heads
    ids = tok.encode("A stitch in time saves")
    # the exported tokenizer encodes like the training tokenizer
    assert Tokenizer.from_gguf_metadata(m.metadata).encode("A stitch in time saves") == ids
    ref, _ = forward(cfg, P, np.asarray(ids)[None])
    got = inf_forward(m, ids, np.arange(len(ids)), m.new_cache(64), logits="all")
    tol = {"f32": 1e-4, "f16": 1e-2, "q8_0": 5e-2}[qtype]
    assert np.abs(got - ref[0]).max() < tol * max(1.0, np.abs(ref).max())
    if qtype == "f32":
        assert _greedy_ours(cfg, P, ids, 12)[len(ids):] == _greedy_inference(m, ids, 12)


def _greedy_inference(m, ids, n):
    from plainlm.model import forward as inf_forward
    cache = m.new_cache(64)
    logits = inf_forward(m, ids, np.arange(len(ids)), cache)
    out = []
    for i in range(n):
        t = int(np.argmax(logits))
        out.append(t)
        logits = inf_forward(m, [t], [len(ids) + i], cache)
    return out


def test_llama_export_same_greedy_text_in_llama_cpp(llama_ckpt, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                                        "(pip install llama-cpp-python to run this check)")
    from plainlm.model import load_model
    from plainlm.tokenizer import Tokenizer
    out = export_gguf(llama_ckpt, tmp_path / "m.gguf", "f32")
    m = load_model(str(out), "ref")
    tok = Tokenizer.from_gguf_metadata(m.metadata)
    prompt = "Where there is a will,"
    ids = tok.encode(prompt)
    ours = _greedy_inference(m, ids, 16)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=32, n_threads=1, verbose=False, seed=0)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids
    theirs = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        theirs.append(t)
        if len(theirs) == 16:
            break
    assert theirs == ours
    assert tok.decode(ours) == llm.detokenize(theirs).decode("utf-8", errors="replace")


def test_bitnet_export_tq2_0(tmp_path):
    import gguf
    from gguf import GGMLQuantizationType as GT
    from plainlm.train.layers import ternary_weight
    ckpt = _train(tmp_path, arch="bitnet", steps=6, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=256,
                  n_layers=1)
    cfg, P, tok, _ = model_from_checkpoint(ckpt)
    out = export_gguf(ckpt, tmp_path / "b.gguf")
    r = gguf.GGUFReader(str(out))
    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "bitnet"
    tensors = {t.name: t for t in r.tensors}
    assert "blk.0.attn_sub_norm.weight" in tensors and "blk.0.ffn_sub_norm.weight" in tensors
    for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        t = tensors[f"blk.0.{name}.weight"]
        assert t.tensor_type == GT.TQ2_0
        dec = gguf.quants.dequantize(t.data, GT.TQ2_0).reshape(P[f"blk.0.{name}"].shape)
        eff, wt, gamma = ternary_weight(P[f"blk.0.{name}"])
        # codes are exactly the ternary weights; the scale is gamma rounded to fp16
        assert np.array_equal(np.sign(dec), wt)
        assert np.allclose(dec, eff, rtol=1e-3, atol=0)
    # plainlm's own loader runs it, close to the QAT forward (same ternary weights)
    try:
        from plainlm.model import forward as inf_forward
        from plainlm.model import load_model
        m = load_model(str(out), "ref")
    except Exception as e:                                  # noqa: BLE001
        pytest.skip(f"plainlm cannot load TQ2_0 bitnet files yet: {e}")
    ids = tok.encode("A stitch in time")
    ref, _ = forward(cfg, P, np.asarray(ids)[None])
    got = inf_forward(m, ids, np.arange(len(ids)), m.new_cache(32), logits="all")
    assert np.abs(got - ref[0]).max() < 0.05 * max(1.0, np.abs(ref).max())


def test_export_refuses_char_tokenizer(tmp_path):
    (tmp_path / "c.txt").write_text(TEXT)
    tc = TrainConfig(data=[str(tmp_path / "c.txt")], out_dir=str(tmp_path / "o"), tokenizer="char",
                     model=dict(dim=16, n_layers=1, n_heads=2, context_length=16), batch_size=2, steps=1,
                     eval_every=0, plot=False)
    train(tc, progress=False, log=lambda s: None)
    with pytest.raises(TrainError, match="byte-level BPE"):
        export_gguf(tmp_path / "o" / "ckpt.npz", tmp_path / "x.gguf")

"""The command line as scripts use it: exact flags, JSON output, one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest


def plainlm(*args, input=None, timeout=900, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "plainlm", *args], capture_output=True, text=True,
                          input=input, timeout=timeout, env=e)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_run_json_greedy_matches_transformers(model_path, hf_model, hf_tokenizer):
    import torch
    prompt = "The capital of France is"
    r = plainlm("run", "--backend", "ref", "--model", model_path, "--temperature", "0",
                "--max-tokens", "8", "--ignore-eos", "--json", prompt)
    assert r.returncode == 0, r.stderr
    out = last_json(r.stdout)
    ids = hf_tokenizer(prompt, add_special_tokens=False).input_ids
    assert out["prompt_ids"] == ids
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out["ids"] == ref[0, len(ids):].tolist()
    assert out["text"] == hf_tokenizer.decode(out["ids"])
    assert out["decode_tok_s"] > 0 and out["prefill_tok_s"] > 0


def test_run_same_seed_same_text(model_path):
    args = ["run", "--model", model_path, "--max-tokens", "12", "--temperature", "1.0", "--json"]
    a = last_json(plainlm(*args, "--seed", "3", "Tell me a story").stdout)
    b = last_json(plainlm(*args, "--seed", "3", "Tell me a story").stdout)
    c = last_json(plainlm(*args, "--seed", "4", "Tell me a story").stdout)
    assert a["ids"] == b["ids"]
    assert a["ids"] != c["ids"]


def test_run_chat_uses_the_template(model_path, hf_tokenizer):
    r = plainlm("run", "--model", model_path, "--chat", "--max-tokens", "4", "--json", "Hi there")
    assert r.returncode == 0, r.stderr
    expect = hf_tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                              tokenize=False, add_generation_prompt=True)
    assert last_json(r.stdout)["prompt_ids"] == hf_tokenizer(expect, add_special_tokens=False).input_ids


def test_tokenize_json_matches_hf(model_path, hf_tokenizer):
    text = "Hello <|im_start|>user world, naïve café!"
    r = plainlm("tokenize", "--model", model_path, "--json", text)
    out = last_json(r.stdout)
    assert out["ids"] == hf_tokenizer(text, add_special_tokens=False).input_ids
    assert "".join(out["tokens"]) == text


def test_perplexity_matches_transformers(model_path, hf_model, license_text, tmp_path):
    """Same windows, same scoring rule, computed independently from transformers' logits."""
    import torch
    from plainlm.formats import load
    from plainlm.tokenizer import Tokenizer
    f = tmp_path / "licence.txt"
    f.write_text(license_text[:3000], encoding="utf-8")
    r = plainlm("perplexity", "--backend", "ref", "--model", model_path, "--file", str(f), "--ctx", "128", "--json")
    assert r.returncode == 0, r.stderr
    ours = last_json(r.stdout)
    ids = Tokenizer.from_gguf_metadata(load(model_path).metadata).encode(f.read_text(encoding="utf-8"))
    nll = []
    for w in range(len(ids) // 128):
        x = torch.tensor([ids[w * 128:(w + 1) * 128]])
        with torch.no_grad():
            lp = torch.log_softmax(hf_model(x).logits[0, :-1].double(), -1)
        nll.append(-lp[torch.arange(127), x[0, 1:]].numpy())
    ref = float(np.exp(np.concatenate(nll).mean()))
    assert ours["tokens"] == sum(len(n) for n in nll)
    assert abs(ours["ppl"] - ref) / ref < 1e-3, (ours, ref)


def test_chat_keeps_conversation(model_path):
    r = plainlm("chat", "--model", model_path, "--max-tokens", "6", "--temperature", "0",
                input="My name is Ada.\n/reset\nHello\n/exit\n", timeout=900)
    assert r.returncode == 0, r.stderr
    assert "conversation cleared" in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["run", ""], "empty prompt"),
    (["run", "--bogus", "x"], "unrecognized arguments"),
    (["run", "--model", "/no/such/file.gguf", "hi"], "no such file"),
    (["run", "--ctx", "8", "one two three four five six seven eight nine ten eleven"], "does not fit"),
    (["inspect", "/no/such/file.gguf"], "no such file"),
    (["perplexity", "--file", "/no/such.txt"], "no such file"),
])
def test_bad_input_one_line_no_traceback(model_path, args, needle):
    r = plainlm(*args, env={"PLAINLM_BACKEND": "ref"})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"this is not a model at all, just text" * 4)
    r = plainlm("run", "--model", str(f), "hi")
    assert r.returncode == 2 and "not a GGUF file" in r.stderr and "Traceback" not in r.stderr

"""`plainlm verify --against transformers`: the report on the default model matches at every stage,
a planted bug is caught at the stage where it is planted, and the CLI prints table / JSON.
transformers is loaded once per session (conftest `hf_model`) and handed to the CLI by monkeypatch."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from plainlm.cli import main

PROMPTS = ["The capital of France is"]


@pytest.fixture(scope="module")
def tok(ref_model):
    from plainlm.tokenizer import Tokenizer
    return Tokenizer.from_gguf_metadata(ref_model.metadata)


def test_reference_matches_every_stage(ref_model, hf_model, tok):
    from plainlm.verify.reference import compare
    rep = compare(ref_model, hf_model, [tok.encode(p) for p in PROMPTS], n_greedy=3)
    L = ref_model.config.n_layers
    assert len(rep["stages"]) == 2 + 2 * L
    assert [r["stage"] for r in rep["stages"][:3]] == ["embed", "attn_out", "mlp_out"]
    for r in rep["stages"]:
        assert r["match"], r
        assert r["max_abs_diff"] <= 0.1 * r["tolerance"]      # in practice ~1e-6 relative: margin 10x
    assert rep["stages"][0]["max_abs_diff"] == 0.0            # same decoded embedding rows
    for g in rep["greedy"]:
        assert g["ours"] == g["transformers"] and g["first_divergence"] is None
    assert rep["match"]


def test_a_planted_bug_is_caught_where_it_is(ref_model, hf_model, tok):
    from plainlm.verify.reference import compare
    norms = dict(ref_model.norms)
    norms["blk.3.ffn_norm"] = norms["blk.3.ffn_norm"] * np.float32(1.01)   # 1% off one norm gain
    bad = dataclasses.replace(ref_model, norms=norms, hook=None)
    rep = compare(bad, hf_model, [tok.encode(PROMPTS[0])], n_greedy=1)
    first = next(r for r in rep["stages"] if not r["match"])
    assert (first["stage"], first["layer"]) == ("mlp_out", 3)
    assert not rep["match"]


def test_cli_table_and_json(monkeypatch, capsys, hf_model, model_path):
    from plainlm.verify import reference
    monkeypatch.setattr(reference, "load_transformers", lambda path: hf_model)
    assert main(["verify", "--against", "transformers", "--model", model_path, "--tokens", "2",
                 "--prompts", "Hello"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["stage", "max|diff|", "max|ref|", "tolerance", "match"]
    assert out[2].split()[0] == "embed" and out[-1] == "MATCH"
    assert any(l.startswith("layer 29 mlp_out") for l in out)
    assert main(["verify", "--against", "transformers", "--model", model_path, "--tokens", "1",
                 "--prompts", "Hi", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["match"] and rep["prompts"] == ["Hi"] and rep["backend"] == "ref"
    assert main(["verify"]) == 2
    assert "--against transformers" in capsys.readouterr().err


def test_transformers_is_not_imported_by_the_package():
    import subprocess
    import sys
    code = ("import sys, plainlm.cli, plainlm.verify.cli, plainlm.store.cli; plainlm.cli.build_parser(); "
            "print('transformers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]

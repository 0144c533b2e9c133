"""SQL weight store: SQLite and a real PostgreSQL, one schema.

- the default model put into each engine and loaded back (`--model sqlite:///...` goes through
  formats.load) gives the same bytes, metadata, config, and logits bit for bit;
- the named queries of docs/sql.md give what numpy computes from the decoded weights, on both;
- a small ternary model has the zero share we built into it;
- the CLI wires put / ls / query / sql, and mistakes are one-line errors.
"""
from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from pg_server import pg_database, pg_url  # noqa: F401  (pg_url: fixture)
from plainlm.cli import main
from plainlm.config import ModelConfig
from plainlm.formats import Checkpoint, load
from plainlm.model import Model, forward
from plainlm.quant import F32, Q8_0, QTensor
from plainlm.store import StoreError, connect, load_from_url, put_checkpoint
from plainlm.store.queries import QUERIES, run_named

IDS = [1, 504, 3458, 314, 260, 1345, 28, 216]


@pytest.fixture(scope="module")
def ckpt():
    from plainlm.pull import pull
    return load(str(pull(quiet=True)))


@pytest.fixture(scope="module")
def gguf_logits(ckpt):
    m = Model.from_checkpoint(ckpt, "ref")
    return forward(m, IDS, np.arange(len(IDS)), m.new_cache(16), logits="all")


def _same_checkpoint(a, b):
    assert a.config == b.config
    assert list(a.weights) == list(b.weights)
    for k in a.weights:
        assert a.weights[k].qtype == b.weights[k].qtype and tuple(a.weights[k].shape) == tuple(b.weights[k].shape)
        assert np.array_equal(np.asarray(a.weights[k].data), b.weights[k].data), k
    assert b.weights["output"] is b.weights["token_embd"]          # still tied, stored once
    assert set(a.metadata) == set(b.metadata)
    for k, v in a.metadata.items():
        w = b.metadata[k]
        if isinstance(v, np.ndarray):
            assert v.dtype == w.dtype and np.array_equal(v, w), k
        else:
            assert type(v) is type(w) and v == w, k


def _check_roundtrip(url, ckpt, gguf_logits):
    back = load(url)                                   # the "://" path of formats.load
    _same_checkpoint(ckpt, back)
    m = Model.from_checkpoint(back, "ref")
    logits = forward(m, IDS, np.arange(len(IDS)), m.new_cache(16), logits="all")
    assert np.array_equal(logits, gguf_logits)        # bit for bit


@pytest.fixture(scope="module")
def sqlite_db(tmp_path_factory, ckpt):
    url = f"sqlite:///{tmp_path_factory.mktemp('q')}/q.db"   # sqlite:////abs/path
    with connect(url) as db:
        put_checkpoint(db, ckpt)
    return url


@pytest.fixture(scope="module")
def pg_db(ckpt):
    url = pg_database()
    with connect(url) as db:
        put_checkpoint(db, ckpt)
    return url


def test_sqlite_roundtrip_bit_identical(sqlite_db, ckpt, gguf_logits):
    _check_roundtrip(sqlite_db, ckpt, gguf_logits)
    with sqlite3.connect(sqlite_db[len("sqlite:///"):]) as c:
        assert c.execute("SELECT version FROM schema_version").fetchall() == [(1,)]


def test_postgres_roundtrip_bit_identical(pg_db, ckpt, gguf_logits):
    _check_roundtrip(pg_db, ckpt, gguf_logits)


def test_default_backend_from_store_is_bit_identical(sqlite_db, ckpt):
    """Whatever backend is the default (fast if built) computes the same from store and GGUF."""
    outs = []
    for c in (ckpt, load(sqlite_db + "?model=1")):
        m = Model.from_checkpoint(c)
        outs.append(forward(m, IDS, np.arange(len(IDS)), m.new_cache(16), logits="all"))
    assert np.array_equal(outs[0], outs[1])


# ------------------------------------------------------------------------------------------------
# queries
# ------------------------------------------------------------------------------------------------

def _expected(ckpt):
    """What the queries should return, computed from the decoded weights with numpy."""
    layer0 = [w for n, w in ckpt.weights.items() if n.startswith("blk.0.") and len(w.shape) == 2]
    tot = sum(np.abs(w.dequantize().astype(np.float64)).sum() for w in layer0)
    emb = ckpt.weights["token_embd"].dequantize().astype(np.float64)
    norms = np.sqrt((emb ** 2).sum(1))
    return {"layer0_mean_abs": tot / sum(int(np.prod(w.shape)) for w in layer0),
            "top_embd": list(np.argsort(-norms, kind="stable")[:5]), "top_norm": norms.max()}


def _check_queries(url, ckpt):
    exp = _expected(ckpt)
    res = {}
    with connect(url) as db:
        for name in QUERIES:
            if not name.startswith("trace_"):
                res[name] = run_named(db, name, 1)
    cols, rows = res["layer_mean_abs"]
    assert cols[:2] == ["layer", "mean_abs"] and [r[0] for r in rows] == list(range(ckpt.config.n_layers))
    assert rows[0][1] == pytest.approx(exp["layer0_mean_abs"], rel=1e-9)
    cols, rows = res["largest_embeddings"]
    assert [r[0] for r in rows[:5]] == exp["top_embd"]
    assert rows[0][2] == pytest.approx(exp["top_norm"], rel=1e-9)
    assert rows[0][1] == ckpt.metadata["tokenizer.ggml.tokens"][exp["top_embd"][0]]
    cols, rows = res["storage"]
    by = {r[0]: r for r in rows}
    assert by["Q4_1"][4] == pytest.approx(5.0) and by["Q8_0"][4] == pytest.approx(8.5)
    assert int(by["Q4_1"][1]) == 7 * ckpt.config.n_layers
    return res


def test_queries_sqlite(sqlite_db, ckpt):
    _check_queries(sqlite_db, ckpt)


def test_queries_postgres_match_sqlite(pg_db, sqlite_db, ckpt):
    a, b = _check_queries(sqlite_db, ckpt), _check_queries(pg_db, ckpt)
    for name in a:
        assert a[name][0] == b[name][0], name
        assert len(a[name][1]) == len(b[name][1]), name
        for ra, rb in zip(a[name][1], b[name][1]):
            for x, y in zip(ra, rb):
                if isinstance(x, float) or isinstance(y, float):
                    assert float(x) == pytest.approx(float(y), rel=1e-12), name
                else:
                    assert x == y, name


def _tiny_ternary_checkpoint(zero_share=0.4, seed=0):
    """A 2-layer llama whose matrices hold ternary values (Q8_0 blocks of {-d, 0, d}) with exactly
    `zero_share` zeros, one matrix as TernaryWeight bit planes."""
    from plainlm.formats import expected_shapes
    from plainlm.quant.ternary import TernaryWeight
    cfg = ModelConfig(arch="llama", vocab_size=64, dim=64, n_layers=2, n_heads=2, n_kv_heads=1,
                      head_dim=32, ffn_dim=128, context_length=32)
    rng = np.random.default_rng(seed)
    w = {}
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 1:
            w[name] = QTensor.from_float(np.ones(shape, np.float32), F32)
            continue
        n = int(np.prod(shape))
        t = np.zeros(n, np.int8)
        nz = n - int(round(zero_share * n))
        t[:nz] = rng.choice([-1, 1], nz)
        t = rng.permutation(t).reshape(shape)
        if name == "blk.1.ffn_down":
            w[name] = TernaryWeight.from_ternary(t, 0.5)
        else:
            w[name] = QTensor.from_float(t.astype(np.float32) * 0.5, Q8_0)
    w["output"] = w["token_embd"]
    meta = {"general.name": "tiny-ternary", "tokenizer.ggml.tokens": [f"t{i}" for i in range(64)],
            "tokenizer.ggml.token_type": np.ones(64, np.int32)}
    return Checkpoint(cfg, w, meta, "synthetic")


def test_zero_share_of_a_ternary_model(tmp_path):
    ck = _tiny_ternary_checkpoint(0.25)
    url = f"sqlite:///{tmp_path}/t.db"
    with connect(url) as db:
        put_checkpoint(db, ck)
        cols, rows = run_named(db, "zero_share", 1)
    by = {r[0]: r for r in rows}
    assert by["all"][1] == 0.25          # every matrix size is a multiple of 4: exact
    assert set(by) == {"Q8_0", "TERNARY_PLANES", "all"}
    back = load(url)
    from plainlm.quant.ternary import TernaryWeight
    tw = back.weights["blk.1.ffn_down"]
    assert isinstance(tw, TernaryWeight)
    assert np.array_equal(tw.dequantize(), ck.weights["blk.1.ffn_down"].dequantize())
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    a, b = Model.from_checkpoint(ck, "ref"), Model.from_checkpoint(back, "ref")
    assert np.array_equal(forward(a, [1, 2, 3], np.arange(3), a.new_cache(8), logits="all"),
                          forward(b, [1, 2, 3], np.arange(3), b.new_cache(8), logits="all"))
    del x


# ------------------------------------------------------------------------------------------------
# CLI and errors
# ------------------------------------------------------------------------------------------------

def test_cli(tmp_path, capsys, sqlite_db):
    assert main(["store", "ls", "--db", sqlite_db]) == 0
    assert "Smollm2" in capsys.readouterr().out
    assert main(["store", "query", "--db", sqlite_db, "layer_mean_abs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["layer", "mean_abs"] and len(out) == 31
    assert main(["store", "query", "--list"] + ["--db", sqlite_db]) == 0
    assert "largest_embeddings" in capsys.readouterr().out
    assert main(["store", "sql", "--db", sqlite_db, "SELECT COUNT(*) AS n FROM vocab"]) == 0
    assert capsys.readouterr().out.split() == ["n", "49152"]
    assert main(["store", "sql", "--db", sqlite_db, "SELECT nope FROM nowhere"]) == 2
    assert "SQL error" in capsys.readouterr().err


def test_cli_put_copies_between_stores_and_model_urls_run(tmp_path, capsys, sqlite_db):
    a, b = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    with connect(a) as db:
        put_checkpoint(db, _tiny_ternary_checkpoint())
    assert main(["store", "put", "--db", b, "--name", "copy", a]) == 0     # store -> store
    assert "as model 1" in capsys.readouterr().out
    _same = load_from_url(b + "?model=copy")
    assert np.array_equal(_same.weights["blk.0.attn_q"].data, load_from_url(a).weights["blk.0.attn_q"].data)
    # any command taking --model takes a store URL
    assert main(["tokenize", "--model", sqlite_db + "?model=1", "--json", "Hello world"]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == [19556, 905]


@pytest.mark.parametrize("url, msg", [
    ("sqlite://w.db", "sqlite:///relative.db"),
    ("mysql://x/y", "unknown store scheme"),
    ("sqlite:////nonexistent-dir/w.db", "does not exist"),
])
def test_bad_urls(url, msg):
    with pytest.raises(StoreError, match=msg):
        load_from_url(url)


def test_empty_store_and_missing_model(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/e.db"
    with pytest.raises(StoreError, match="holds no model"):
        load_from_url(url)
    assert main(["tokenize", "--model", url, "hi"]) == 2
    assert "holds no model" in capsys.readouterr().err
    with connect(url) as db:
        put_checkpoint(db, _tiny_ternary_checkpoint())
    with pytest.raises(StoreError, match="no model 'other'"):
        load_from_url(url + "?model=other")
    assert load_from_url(url + "?model=tiny-ternary").config.dim == 64


def test_schema_version_is_checked(tmp_path):
    url = f"sqlite:///{tmp_path}/v.db"
    connect(url).close()
    with sqlite3.connect(tmp_path / "v.db") as c:
        c.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        connect(url)


def test_corrupt_blocks_are_detected(tmp_path):
    url = f"sqlite:///{tmp_path}/x.db"
    with connect(url) as db:
        put_checkpoint(db, _tiny_ternary_checkpoint())
    with sqlite3.connect(tmp_path / "x.db") as c:
        (data,) = c.execute("SELECT data FROM blocks WHERE tensor = 'blk.0.attn_q'").fetchone()
        data = bytes([data[0] ^ 1]) + data[1:]
        c.execute("UPDATE blocks SET data = ? WHERE tensor = 'blk.0.attn_q'", (data,))
    with pytest.raises(StoreError, match="sha256"):
        load_from_url(url)

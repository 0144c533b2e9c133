"""Weight and trace store in SQL (SQLite or PostgreSQL, one schema; see db.py and docs/sql.md).

    put_checkpoint(db, ckpt)   a loaded Checkpoint -> rows (config, metadata, tensors, blocks, stats)
    load_from_url(url)         rows -> the same Checkpoint (`--model sqlite:///w.db` goes here)

The blocks are the file's quantized bytes, unchanged, so a model loaded from the store computes
exactly what the GGUF computes (the test compares logits bit for bit). Weights are stored as the
loader hands them to the model: canonical GGUF names, Q/K rows already un-permuted to HF order, a
tied output head stored once (`alias_of`).
"""
from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone

import numpy as np

from ..config import ModelConfig
from ..quant import BY_NAME, QTensor, dequantize
from .db import SCHEMA_VERSION, DB, StoreError

__all__ = ["DB", "StoreError", "SCHEMA_VERSION", "connect", "put_checkpoint", "load_from_url",
           "list_models", "encode_metadata", "decode_metadata"]

CHUNK_BYTES = 1 << 20          # bytes of block data per `blocks` row (whole rows per chunk)
STATS_ROWS = 4096              # rows decoded at a time for statistics


def connect(url: str) -> DB:
    return DB(url)


# ------------------------------------------------------------------------------------------------
# metadata <-> JSON (numpy arrays keep their dtype)
# ------------------------------------------------------------------------------------------------

def _enc(v):
    if isinstance(v, np.ndarray):
        return {"__ndarray__": v.dtype.str, "shape": list(v.shape), "data": v.reshape(-1).tolist()}
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_enc(x) for x in v]
    if isinstance(v, bytes):
        return {"__bytes__": v.hex()}
    return v


def _dec(v):
    if isinstance(v, dict) and "__ndarray__" in v:
        return np.asarray(v["data"], dtype=np.dtype(v["__ndarray__"])).reshape(v["shape"])
    if isinstance(v, dict) and "__bytes__" in v:
        return bytes.fromhex(v["__bytes__"])
    if isinstance(v, list):
        return [_dec(x) for x in v]
    return v


def encode_metadata(meta: dict) -> str:
    return json.dumps({k: _enc(v) for k, v in meta.items()}, ensure_ascii=False)


def decode_metadata(text: str) -> dict:
    return {k: _dec(v) for k, v in json.loads(text).items()}


# ------------------------------------------------------------------------------------------------
# put
# ------------------------------------------------------------------------------------------------

_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


# Ternary bit-plane weights (plainlm.quant.ternary.TernaryWeight) are stored under this pseudo type:
# one stored row = plus plane row (Kp/8 bytes) | minus plane row (Kp/8) | row scale (float32 LE).
TERNARY_PLANES = "TERNARY_PLANES"


def _as_rows(t) -> tuple[str, np.ndarray]:
    """(type name, uint8 [N, row_bytes]) of a weight as it will be stored."""
    if isinstance(t, QTensor):
        data = np.ascontiguousarray(t.data, dtype=np.uint8)
        return t.qtype.name, data.reshape(data.shape[0] if data.ndim > 1 else 1, -1)
    from ..quant.ternary import TernaryWeight
    if isinstance(t, TernaryWeight):
        sc = np.ascontiguousarray(t.scale, "<f4").view(np.uint8).reshape(-1, 4)
        return TERNARY_PLANES, np.ascontiguousarray(np.concatenate([t.plus, t.minus, sc], axis=1))
    raise StoreError(f"cannot store a weight of type {type(t).__name__}")


def _from_rows(qtype: str, shape: tuple, buf: np.ndarray):
    if qtype == TERNARY_PLANES:
        from ..quant.ternary import TernaryWeight, padded_k
        nb = padded_k(shape[1]) // 8
        return TernaryWeight(tuple(shape), np.ascontiguousarray(buf[:, :nb]), np.ascontiguousarray(buf[:, nb:2 * nb]),
                             np.ascontiguousarray(buf[:, 2 * nb:]).view("<f4").reshape(-1).astype(np.float32),
                             source="store")
    return QTensor(BY_NAME[qtype], tuple(shape), buf)


def _decode_rows(t, r0: int, r1: int) -> np.ndarray:
    if isinstance(t, QTensor):
        return dequantize(t.data[r0:r1], t.qtype, (r1 - r0, t.shape[-1]))
    from ..quant.ternary import ternary_from_planes
    return ternary_from_planes(t.plus[r0:r1], t.minus[r0:r1], t.shape[1]) * t.scale[r0:r1, None]


def _row_stats(t):
    """Per-row (mean |w|, max |w|, L2 norm, zero share) of the decoded weights, float64 [N] each."""
    n = t.shape[0] if len(t.shape) > 1 else 1
    out = np.empty((4, n), np.float64)
    for r0 in range(0, n, STATS_ROWS):
        r1 = min(n, r0 + STATS_ROWS)
        w = _decode_rows(t, r0, r1).astype(np.float64)
        a = np.abs(w)
        out[0, r0:r1] = a.mean(1)
        out[1, r0:r1] = a.max(1)
        out[2, r0:r1] = np.sqrt((w * w).sum(1))
        out[3, r0:r1] = (w == 0).mean(1)
    return out


def put_checkpoint(db: DB, ckpt, name: str | None = None, row_stats: bool = True, progress=None) -> int:
    """Store a Checkpoint; returns its model id. One transaction: all of it or nothing."""
    mid = db.next_id("models")
    name = name or str(ckpt.metadata.get("general.name") or ckpt.source or f"model{mid}")
    db.execute("INSERT INTO models (id, name, source, created, config, metadata) VALUES (?, ?, ?, ?, ?, ?)",
               (mid, name, str(ckpt.source), datetime.now(timezone.utc).isoformat(timespec="seconds"),
                json.dumps(ckpt.config.to_dict()), encode_metadata(ckpt.metadata)))
    toks = ckpt.metadata.get("tokenizer.ggml.tokens")
    if toks is not None:
        types = ckpt.metadata.get("tokenizer.ggml.token_type")
        types = [None] * len(toks) if types is None else [int(x) for x in types]
        db.insert_rows("vocab", ["model_id", "token_id", "text", "type"],
                       ((mid, i, str(t).replace("\x00", "\\x00"), ty) for i, (t, ty) in enumerate(zip(toks, types))))
    seen: dict[int, str] = {}                     # id(QTensor) -> first name: tied weights
    for seq, (tname, t) in enumerate(ckpt.weights.items()):
        m = _BLK.match(tname)
        layer, kind = (int(m.group(1)), m.group(2)) if m else (None, tname)
        qname, data = _as_rows(t)
        n_rows = data.shape[0]
        n_cols = int(t.shape[-1])
        n_el = int(np.prod(t.shape))
        alias = seen.get(id(t))
        if alias is not None:                     # tied head: a row pointing at the embedding
            src = db.execute("SELECT sha256, mean_abs, rms, max_abs, zero_share FROM tensors "
                             "WHERE model_id = ? AND name = ?", (mid, alias)).fetchone()
            db.execute("INSERT INTO tensors (model_id, name, seq, layer, kind, qtype, shape, n_rows, n_cols, "
                       "row_bytes, n_elements, alias_of, sha256, mean_abs, rms, max_abs, zero_share) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (mid, tname, seq, layer, kind, qname, json.dumps(list(t.shape)), n_rows, n_cols,
                        data.shape[1], n_el, alias, *src))
            continue
        seen[id(t)] = tname
        st = _row_stats(t)                        # [4, N]
        sums = (st[0] * n_cols).sum(), (st[2] ** 2).sum(), st[1].max(), (st[3] * n_cols).sum()
        db.execute("INSERT INTO tensors (model_id, name, seq, layer, kind, qtype, shape, n_rows, n_cols, "
                   "row_bytes, n_elements, alias_of, sha256, mean_abs, rms, max_abs, zero_share) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?)",
                   (mid, tname, seq, layer, kind, qname, json.dumps(list(t.shape)), n_rows, n_cols,
                    data.shape[1], n_el, hashlib.sha256(data).hexdigest(),
                    float(sums[0] / n_el), float(np.sqrt(sums[1] / n_el)), float(sums[2]), float(sums[3] / n_el)))
        per = max(1, CHUNK_BYTES // max(1, data.shape[1]))
        db.insert_rows("blocks", ["model_id", "tensor", "chunk", "row0", "n_rows", "data"],
                       ((mid, tname, c, r0, min(per, n_rows - r0), data[r0:r0 + per].tobytes())
                        for c, r0 in enumerate(range(0, n_rows, per))))
        if row_stats:
            db.insert_rows("row_stats", ["model_id", "tensor", "row", "mean_abs", "max_abs", "l2_norm", "zero_share"],
                           ((mid, tname, r, float(st[0, r]), float(st[1, r]), float(st[2, r]), float(st[3, r]))
                            for r in range(n_rows)))
        if progress is not None:
            progress(tname)
    db.commit()
    return mid


# ------------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------------

def list_models(db: DB) -> list[tuple]:
    """(id, name, source, created, n_tensors, bytes) of every stored model."""
    return db.execute(
        "SELECT m.id, m.name, m.source, m.created, COUNT(t.name), "
        "COALESCE(SUM(CASE WHEN t.alias_of IS NULL THEN t.n_rows * t.row_bytes ELSE 0 END), 0) "
        "FROM models m LEFT JOIN tensors t ON t.model_id = m.id "
        "GROUP BY m.id, m.name, m.source, m.created ORDER BY m.id").fetchall()


def resolve_model_id(db: DB, sel: str | None = None) -> int:
    """`?model=` selector (an id or a name) -> model id; default the newest model."""
    sel = sel if sel is not None else db.model_sel
    if sel is None:
        row = db.execute("SELECT MAX(id) FROM models").fetchone()
        if row is None or row[0] is None:
            raise StoreError(f"{db.url}: the store holds no model (plainlm store put --db {db.url} MODEL)")
        return int(row[0])
    row = None
    if str(sel).isdigit():
        row = db.execute("SELECT id FROM models WHERE id = ?", (int(sel),)).fetchone()
    if row is None:
        row = db.execute("SELECT MAX(id) FROM models WHERE name = ?", (str(sel),)).fetchone()
    if row is None or row[0] is None:
        raise StoreError(f"{db.url}: no model {sel!r} in the store")
    return int(row[0])


def load_checkpoint(db: DB, model_id: int, verify: bool = True):
    from ..formats import Checkpoint
    cfg_json, meta_json = db.execute("SELECT config, metadata FROM models WHERE id = ?", (model_id,)).fetchone()
    cfg = ModelConfig.from_dict(json.loads(cfg_json))
    meta = decode_metadata(meta_json)
    rows = db.execute("SELECT name, qtype, shape, n_rows, row_bytes, alias_of, sha256 FROM tensors "
                      "WHERE model_id = ? ORDER BY seq", (model_id,)).fetchall()
    weights: dict[str, QTensor] = {}
    for name, qtype, shape, n_rows, rb, alias, sha in rows:
        if alias is not None:                     # the source always comes first (lower seq)
            weights[name] = weights[alias]
            continue
        if qtype not in BY_NAME and qtype != TERNARY_PLANES:
            raise StoreError(f"{db.url}: tensor {name} has unknown type {qtype}")
        buf = np.empty((n_rows, rb), np.uint8)
        got = 0
        for row0, nr, data in db.execute("SELECT row0, n_rows, data FROM blocks WHERE model_id = ? "
                                         "AND tensor = ? ORDER BY chunk", (model_id, name)):
            buf[row0:row0 + nr] = np.frombuffer(bytes(data), np.uint8).reshape(nr, rb)
            got += nr
        if got != n_rows:
            raise StoreError(f"{db.url}: tensor {name} has {got} of its {n_rows} rows")
        if verify and hashlib.sha256(buf).hexdigest() != sha:
            raise StoreError(f"{db.url}: tensor {name}: block bytes do not match their sha256")
        weights[name] = _from_rows(qtype, tuple(json.loads(shape)), buf)
    return Checkpoint(cfg, weights, meta, db.url)


def load_from_url(url: str):
    """A store URL (sqlite:///w.db, postgresql://..., optionally ?model=NAME|ID) -> Checkpoint."""
    with DB(url) as db:
        return load_checkpoint(db, resolve_model_id(db))

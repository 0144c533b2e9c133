"""One SQL schema, two engines: SQLite (stdlib `sqlite3`, the default) and PostgreSQL (psycopg 3).

URLs
    sqlite:///w.db               relative path w.db        sqlite:////abs/w.db   absolute path
    postgresql://user@host:port/dbname                      (postgres:// works too)
Either may end in `?model=NAME` (or `?model=ID`) to pick one of several stored models; without it
the most recently stored model is used.

The SQL below is written once, in the dialect both engines share: `?` placeholders (rewritten to
`%s` for psycopg), TEXT/INTEGER/BIGINT/DOUBLE PRECISION columns; only the byte column's type
differs (BLOB vs BYTEA). JSON lives in TEXT columns so the same bytes come back from both; query
it with `json_extract(...)` (SQLite) or `...::jsonb ->> ...` (PostgreSQL), see docs/sql.md.
"""
from __future__ import annotations

import os
import sqlite3
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

SCHEMA_VERSION = 1


from ..cli import UserError


class StoreError(UserError, ValueError):
    """A bad store URL, a missing model or run, or a database written by another schema version."""


def _schema(blob: str) -> list[str]:
    return [
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
        # one row per stored checkpoint
        """CREATE TABLE IF NOT EXISTS models (
            id        INTEGER PRIMARY KEY,
            name      TEXT NOT NULL,
            source    TEXT,
            created   TEXT NOT NULL,             -- ISO 8601, UTC
            config    TEXT NOT NULL,             -- ModelConfig.to_dict() as JSON
            metadata  TEXT NOT NULL              -- the file's metadata (tokenizer arrays too), JSON
        )""",
        # one row per weight, with statistics computed from the decoded values at put time
        """CREATE TABLE IF NOT EXISTS tensors (
            model_id   INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
            name       TEXT NOT NULL,            -- canonical GGUF name: blk.3.attn_q, token_embd
            seq        INTEGER NOT NULL,         -- order of the tensor in the checkpoint
            layer      INTEGER,                  -- 3 for blk.3.*, NULL for global tensors
            kind       TEXT NOT NULL,            -- name without the blk.N. prefix: attn_q, ffn_down
            qtype      TEXT NOT NULL,            -- Q4_1, Q8_0, F32, TQ2_0, ...
            shape      TEXT NOT NULL,            -- JSON list, numpy order ([rows, cols])
            n_rows     INTEGER NOT NULL,
            n_cols     INTEGER NOT NULL,
            row_bytes  INTEGER NOT NULL,         -- bytes of one stored row (whole blocks)
            n_elements BIGINT NOT NULL,
            alias_of   TEXT,                     -- tied weight: same data as that tensor, no blocks
            sha256     TEXT NOT NULL,            -- of the raw block bytes, checked on load
            mean_abs   DOUBLE PRECISION,         -- mean |w| over the decoded weights
            rms        DOUBLE PRECISION,         -- sqrt(mean w^2)
            max_abs    DOUBLE PRECISION,
            zero_share DOUBLE PRECISION,         -- share of weights that decode to exactly 0
            PRIMARY KEY (model_id, name)
        )""",
        # the quantized bytes, as stored in the file, a run of whole rows per chunk
        f"""CREATE TABLE IF NOT EXISTS blocks (
            model_id INTEGER NOT NULL,
            tensor   TEXT NOT NULL,
            chunk    INTEGER NOT NULL,           -- 0, 1, ... in row order
            row0     INTEGER NOT NULL,           -- first row of the chunk
            n_rows   INTEGER NOT NULL,
            data     {blob} NOT NULL,            -- n_rows * row_bytes bytes
            PRIMARY KEY (model_id, tensor, chunk),
            FOREIGN KEY (model_id, tensor) REFERENCES tensors(model_id, name) ON DELETE CASCADE
        )""",
        # per-row statistics (a row = one output unit of a matrix, one token of token_embd)
        """CREATE TABLE IF NOT EXISTS row_stats (
            model_id   INTEGER NOT NULL,
            tensor     TEXT NOT NULL,
            row        INTEGER NOT NULL,
            mean_abs   DOUBLE PRECISION NOT NULL,
            max_abs    DOUBLE PRECISION NOT NULL,
            l2_norm    DOUBLE PRECISION NOT NULL,
            zero_share DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (model_id, tensor, row),
            FOREIGN KEY (model_id, tensor) REFERENCES tensors(model_id, name) ON DELETE CASCADE
        )""",
        # the vocabulary as a table (also in models.metadata), for joins with row_stats and traces
        """CREATE TABLE IF NOT EXISTS vocab (
            model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
            token_id INTEGER NOT NULL,
            text     TEXT NOT NULL,              -- as the tokenizer spells it (GPT-2 bytes: space = G-dot)
            type     INTEGER,                    -- GGUF token type: 1 normal, 3 control, 6 byte, ...
            PRIMARY KEY (model_id, token_id)
        )""",
        # attention traces (plainlm trace)
        """CREATE TABLE IF NOT EXISTS trace_runs (
            id         INTEGER PRIMARY KEY,
            model      TEXT NOT NULL,            -- the --model it ran (path or store URL)
            prompt     TEXT NOT NULL,
            threshold  DOUBLE PRECISION NOT NULL,-- weights below it were not recorded
            n_prompt   INTEGER NOT NULL,         -- positions 0..n_prompt-1 are the prompt
            n_layers   INTEGER NOT NULL,
            n_heads    INTEGER NOT NULL,
            created    TEXT NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS trace_tokens (
            run_id    INTEGER NOT NULL REFERENCES trace_runs(id) ON DELETE CASCADE,
            position  INTEGER NOT NULL,
            token_id  INTEGER NOT NULL,
            text      TEXT NOT NULL,             -- the token's text (bytes decoded with replacement)
            generated INTEGER NOT NULL,          -- 1 = produced by the model, 0 = prompt
            PRIMARY KEY (run_id, position)
        )""",
        """CREATE TABLE IF NOT EXISTS attention (
            run_id   INTEGER NOT NULL REFERENCES trace_runs(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,           -- the query position
            layer    INTEGER NOT NULL,
            head     INTEGER NOT NULL,
            key_pos  INTEGER NOT NULL,           -- the attended position (<= position)
            weight   DOUBLE PRECISION NOT NULL,  -- softmax weight, >= threshold
            PRIMARY KEY (run_id, position, layer, head, key_pos)
        )""",
        "CREATE INDEX IF NOT EXISTS tensors_layer ON tensors (model_id, layer)",
    ]


# column types for binary COPY (tables bulk-loaded with many or large rows)
_PG_TYPES = {
    "blocks": {"model_id": "int4", "tensor": "text", "chunk": "int4", "row0": "int4", "n_rows": "int4", "data": "bytea"},
    "row_stats": {"model_id": "int4", "tensor": "text", "row": "int4", "mean_abs": "float8",
                  "max_abs": "float8", "l2_norm": "float8", "zero_share": "float8"},
    "attention": {"run_id": "int4", "position": "int4", "layer": "int4", "head": "int4", "key_pos": "int4",
                  "weight": "float8"},
}


class DB:
    """A thin connection wrapper: the same `?`-placeholder SQL on both engines."""

    def __init__(self, url: str):
        self.url = url
        parts = urlsplit(url)
        q = parse_qs(parts.query)
        self.model_sel = q.pop("model", [None])[0]
        scheme = parts.scheme.lower()
        if scheme in ("sqlite", "sqlite3"):
            self.kind = "sqlite"
            path = url.split("://", 1)[1].split("?", 1)[0]
            if not path.startswith("/"):
                raise StoreError(f"{url}: a SQLite URL is sqlite:///relative.db or sqlite:////absolute.db")
            path = path[1:] or ":memory:"
            if path != ":memory:" and os.path.dirname(path) and not os.path.isdir(os.path.dirname(path)):
                raise StoreError(f"{url}: directory {os.path.dirname(path)!r} does not exist")
            self.conn = sqlite3.connect(path)
            self.conn.execute("PRAGMA foreign_keys = ON")
            self.blob = "BLOB"
        elif scheme in ("postgresql", "postgres"):
            self.kind = "postgresql"
            try:
                import psycopg
            except ImportError as e:
                raise StoreError(f"{url}: PostgreSQL needs psycopg 3 (pip install 'psycopg[binary]')") from e
            conninfo = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(q, doseq=True), ""))
            try:
                self.conn = psycopg.connect(conninfo)
            except psycopg.Error as e:
                raise StoreError(f"cannot connect to {url}: {str(e).strip().splitlines()[0]}") from None
            self.blob = "BYTEA"
        else:
            raise StoreError(f"{url}: unknown store scheme {parts.scheme!r} (use sqlite:///file.db or postgresql://...)")
        self._ensure_schema()

    # -- SQL ----------------------------------------------------------------------------------
    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.kind == "postgresql" else sql

    def execute(self, sql: str, params=()):
        return self.conn.execute(self._sql(sql), tuple(params))

    def executemany(self, sql: str, rows) -> None:
        cur = self.conn.cursor()
        cur.executemany(self._sql(sql), rows)

    def insert_rows(self, table: str, cols: list[str], rows) -> None:
        """Bulk insert: COPY on PostgreSQL, executemany on SQLite."""
        if self.kind == "postgresql":
            types = _PG_TYPES.get(table)
            fmt = " (FORMAT BINARY)" if types else ""   # binary: bytea goes over unescaped
            with self.conn.cursor().copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN{fmt}") as cp:
                if types:
                    cp.set_types([types[c] for c in cols])
                for r in rows:
                    cp.write_row(r)
        else:
            self.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES "
                             f"({', '.join('?' * len(cols))})", rows)

    def query(self, sql: str, params=()) -> tuple[list[str], list[tuple]]:
        """(column names, rows) of any statement (the `plainlm store sql` command)."""
        cur = self.conn.cursor()
        cur.execute(sql, tuple(params)) if params else cur.execute(sql)
        cols = [d[0] for d in cur.description] if cur.description else []
        rows = cur.fetchall() if cur.description else []
        return cols, rows

    def next_id(self, table: str) -> int:
        return int(self.execute(f"SELECT COALESCE(MAX(id), 0) + 1 FROM {table}").fetchone()[0])

    def commit(self) -> None:
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            self.conn.rollback()
        self.close()

    # -- schema -------------------------------------------------------------------------------
    def _ensure_schema(self) -> None:
        have = self._table_exists("schema_version")
        if have:
            row = self.execute("SELECT MAX(version) FROM schema_version").fetchone()
            v = row[0] if row else None
            if v is not None and int(v) != SCHEMA_VERSION:
                raise StoreError(f"{self.url}: store has schema version {v}, this plainlm reads "
                                 f"version {SCHEMA_VERSION}")
        for stmt in _schema(self.blob):
            self.execute(stmt)
        if self.kind == "postgresql" and not have:
            # quantized bytes do not compress: skip TOAST's compression attempt (2x faster puts)
            self.execute("ALTER TABLE blocks ALTER COLUMN data SET STORAGE EXTERNAL")
        if self.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
            self.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        self.commit()

    def _table_exists(self, name: str) -> bool:
        if self.kind == "sqlite":
            sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        else:
            sql = "SELECT 1 FROM information_schema.tables WHERE table_name = ? AND table_schema = current_schema()"
        return self.execute(sql, (name,)).fetchone() is not None

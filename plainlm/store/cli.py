"""`plainlm store ...` and `plainlm trace ...` (registered by plainlm.cli)."""
from __future__ import annotations

import argparse
import sys

DB_HELP = "store URL: sqlite:///file.db (relative), sqlite:////abs/file.db, or postgresql://user@host:port/db"


def _print_table(cols, rows, out=None) -> None:
    out = out or sys.stdout
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.6g}"
        if isinstance(v, (bytes, memoryview)):
            return f"<{len(bytes(v))} bytes>"
        return str(v)
    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=out)
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)), file=out)


def cmd_put(args) -> int:
    from ..formats import load
    from ..pull import resolve_model
    from . import connect, put_checkpoint
    path = resolve_model(args.model_path)
    ck = load(path)
    with connect(args.db) as db:
        mid = put_checkpoint(db, ck, name=args.name, row_stats=not args.no_row_stats)
        n, size = db.execute("SELECT COUNT(*), SUM(n_rows * row_bytes) FROM tensors WHERE model_id = ? "
                             "AND alias_of IS NULL", (mid,)).fetchone()
    print(f"stored {path} as model {mid} ({n} tensors, {int(size) / 1e6:.1f} MB of blocks) in {args.db}")
    print(f"load it with: --model '{args.db}' (or '{args.db}?model={mid}')")
    return 0


def cmd_ls(args) -> int:
    from . import connect, list_models
    with connect(args.db) as db:
        _print_table(["id", "name", "source", "created", "tensors", "bytes"], list_models(db))
    return 0


def cmd_query(args) -> int:
    from ..cli import UserError
    from . import connect, resolve_model_id
    from .queries import QUERIES, run_named
    if args.list or not args.name:
        for k, (desc, _) in QUERIES.items():
            print(f"{k:28s} {desc}")
        return 0
    if args.name not in QUERIES:
        raise UserError(f"no query named {args.name!r} (plainlm store query --list)")
    with connect(args.db) as db:
        if args.name.startswith("trace_"):
            from .trace import resolve_run
            ident = resolve_run(db, args.id)
        else:
            ident = resolve_model_id(db, str(args.id) if args.id is not None else None)
        if args.show_sql:
            print(QUERIES[args.name][1].strip())
        cols, rows = run_named(db, args.name, ident)
    _print_table(cols, rows)
    return 0


def cmd_sql(args) -> int:
    from ..cli import UserError
    from . import connect
    with connect(args.db) as db:
        try:
            cols, rows = db.query(args.sql)
        except Exception as e:                 # noqa: BLE001 - a user's SQL error is theirs
            raise UserError(f"SQL error: {str(e).strip().splitlines()[0]}") from None
        db.commit()
    if cols:
        _print_table(cols, rows)
    return 0


def cmd_trace(args) -> int:
    from ..cli import UserError
    from . import connect
    if args.prompt == "show":
        from .trace import show_trace
        with connect(args.db) as db:
            print(show_trace(db, args.run, args.position, args.layer, args.head, args.top, args.png))
        return 0
    if not args.prompt:
        raise UserError('give a prompt to trace (plainlm trace --db URL "PROMPT"), or: plainlm trace show --db URL')
    from .. import kernels
    from ..model import load_model
    from ..pull import resolve_model
    from ..tokenizer import Tokenizer
    from .trace import record_trace
    kernels.set_threads(args.threads)
    path = resolve_model(args.model)
    m = load_model(path, args.backend)
    tok = Tokenizer.from_gguf_metadata(m.metadata)
    with connect(args.db) as db:
        rid = record_trace(db, m, tok, args.prompt, args.max_tokens, args.threshold, model_name=str(path))
        (P,) = db.execute("SELECT COUNT(*) FROM trace_tokens WHERE run_id = ?", (rid,)).fetchone()
        (E,) = db.execute("SELECT COUNT(*) FROM attention WHERE run_id = ?", (rid,)).fetchone()
        text = "".join(t for (t,) in db.execute("SELECT text FROM trace_tokens WHERE run_id = ? AND generated = 1 "
                                                 "ORDER BY position", (rid,)).fetchall())
    print(f"trace run {rid}: {P} positions, {E} attention weights >= {args.threshold:g}; generated {text!r}")
    print(f"see it with: plainlm trace show --db '{args.db}' --run {rid} [--position i] [--layer l] [--head h] [--png out.png]")
    return 0


def register(sub) -> None:
    p = sub.add_parser("store", help="weights and traces in SQL (SQLite or PostgreSQL)",
                       description="Store models in SQL and query them. Any stored model runs with "
                                   "--model URL (e.g. --model sqlite:///w.db). See docs/sql.md.")
    ss = p.add_subparsers(dest="store_command", metavar="ACTION")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    q = ss.add_parser("put", help="store a model (GGUF file, HF dir or another store URL)")
    q.add_argument("--db", required=True, help=DB_HELP)
    q.add_argument("--name", default=None, help="name to store it under (default: general.name)")
    q.add_argument("--no-row-stats", action="store_true", help="skip the per-row statistics table")
    q.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                   help="model to store (default: SmolLM2-135M-Instruct)")
    q.set_defaults(func=cmd_put)

    q = ss.add_parser("ls", help="list stored models")
    q.add_argument("--db", required=True, help=DB_HELP)
    q.set_defaults(func=cmd_ls)

    q = ss.add_parser("query", help="run a named query from docs/sql.md (--list to see them)")
    q.add_argument("--db", required=True, help=DB_HELP)
    q.add_argument("--list", action="store_true", help="list the named queries")
    q.add_argument("--id", type=int, default=None, help="model id (or trace run id for trace_*); default newest")
    q.add_argument("--show-sql", action="store_true", help="print the SQL too")
    q.add_argument("name", nargs="?", help="query name")
    q.set_defaults(func=cmd_query)

    q = ss.add_parser("sql", help="run one SQL statement and print the rows")
    q.add_argument("--db", required=True, help=DB_HELP)
    q.add_argument("sql")
    q.set_defaults(func=cmd_sql)

    p = sub.add_parser("trace", help="record attention weights of a generation into SQL; `trace show` reads them",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="""Record:  plainlm trace --db URL [--model M] [--max-tokens N] [--threshold T] "PROMPT"
  runs PROMPT, then greedy decoding, and stores every layer's and head's attention weights
  (those >= threshold) of every position with the tokens.
Show:    plainlm trace show --db URL [--run ID] [--position i] [--layer l] [--head h] [--png out.png]
  which tokens position i attended to most, by layer (mean of heads), by head of --layer, and a
  heatmap: --layer and --head give that head's whole query x key matrix.""")
    p.add_argument("--db", required=True, help=DB_HELP)
    p.add_argument("--model", "-m", default=None, help="GGUF file or store URL (default: SmolLM2-135M-Instruct)")
    p.add_argument("--backend", choices=["ref", "fast"], default=None, help="kernels (both honour the trace hook)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-tokens", "-n", type=int, default=16, help="tokens to generate greedily (default 16)")
    p.add_argument("--threshold", type=float, default=0.01, help="drop weights below this (default 0.01)")
    p.add_argument("--run", type=int, default=None, help="show: trace run id (default: the newest)")
    p.add_argument("--position", type=int, default=None, help="show: query position (default: the last)")
    p.add_argument("--layer", type=int, default=None, help="show: one layer")
    p.add_argument("--head", type=int, default=None, help="show: one head")
    p.add_argument("--top", type=int, default=3, help="show: keys listed per line (default 3)")
    p.add_argument("--png", default=None, help="show: write a heatmap PNG here")
    p.add_argument("prompt", nargs="?", default=None, help='the prompt, or the word "show"')
    p.set_defaults(func=cmd_trace)

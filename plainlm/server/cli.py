"""`plainlm serve`: the OpenAI-compatible server and chat page (registered by plainlm.cli)."""
from __future__ import annotations

import os
import sys


def register(sub) -> None:
    from ..cli import add_model_args
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching + chat page",
                       description="Serve the model over an OpenAI-compatible API (/v1/completions, "
                                   "/v1/chat/completions, streaming) and a chat page at /. Concurrent "
                                   "requests are decoded together, one batched step at a time.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--slots", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--queue", type=int, default=64,
                   help="requests that may wait for a slot; beyond that: 503 + Retry-After (default 64)")
    p.add_argument("--ctx", type=int, default=4096, help="context length per slot (default 4096)")
    p.add_argument("--prefill-chunk", type=int, default=128,
                   help="prompt tokens fed per step, so running decodes are not stalled (default 128)")
    p.add_argument("--api-key", default=os.environ.get("PLAINLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $PLAINLM_API_KEY, none)")
    p.add_argument("--model-name", default=None, help="model id reported by /v1/models (default: file name)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def build(args):
    """(app, engine) from parsed arguments."""
    from ..cli import UserError
    from .. import kernels
    from ..model import load_model
    from ..pull import resolve_model
    from .app import create_app
    from .engine import Engine
    for name in ("slots", "ctx", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.queue < 0:
        raise UserError("--queue must be >= 0")
    kernels.set_threads(args.threads)
    path = resolve_model(args.model)
    m = load_model(path, args.backend)
    tok = make_tokenizer(m)
    engine = Engine(m, tok, n_slots=args.slots, max_queue=args.queue, n_ctx=args.ctx,
                    prefill_chunk=args.prefill_chunk, threads=args.threads).start()
    name = args.model_name or os.path.basename(str(path))
    stem = name[:-5] if name.endswith(".gguf") else name
    app = create_app(engine, stem, api_key=args.api_key, aliases=(name, "plainlm", "default"))
    return app, engine


def make_tokenizer(m):
    from ..tokenizer import Tokenizer
    if hasattr(Tokenizer, "from_model"):
        return Tokenizer.from_model(m)
    return Tokenizer.from_gguf_metadata(m.metadata)


def cmd_serve(args) -> int:
    import uvicorn
    app, engine = build(args)
    print(f"plainlm: serving on http://{args.host}:{args.port}/  ({args.slots} slots, queue {args.queue}, "
          f"ctx {engine.n_ctx}, {engine.model.backend.NAME} kernels)", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_keep_alive=30, backlog=2048)
    finally:
        engine.close()
    return 0

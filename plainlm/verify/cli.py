"""`plainlm verify ...` (registered by plainlm.cli)."""
from __future__ import annotations

import argparse
import json


def cmd_verify(args) -> int:
    from ..cli import UserError
    if args.what == "proofs":
        from .proofs import format_results, run_all
        res = run_all(only=args.only)
        print(json.dumps(res) if args.json else format_results(res))
        return 0 if all(r["proved"] for r in res) else 1
    if args.against != "transformers":
        raise UserError("say what to verify: plainlm verify --against transformers, or plainlm verify proofs")
    from ..model import load_model
    from ..pull import resolve_model
    from ..tokenizer import Tokenizer
    from . import reference
    path = resolve_model(args.model)
    if "://" in str(path):
        raise UserError("verify --against transformers needs a GGUF file (transformers reads the same file)")
    m = load_model(path, args.backend)
    tok = Tokenizer.from_gguf_metadata(m.metadata)
    prompts = args.prompts or reference.DEFAULT_PROMPTS
    ids = [tok.encode(p) for p in prompts]
    if any(not i for i in ids):
        raise UserError("empty prompt")
    hf = reference.load_transformers(str(path))
    rep = reference.compare(m, hf, ids, n_greedy=args.tokens)
    rep["model"], rep["prompts"], rep["backend"] = str(path), prompts, m.backend.NAME
    print(json.dumps(rep) if args.json else reference.format_report(rep, prompts, tok))
    return 0 if rep["match"] else 1


def register(sub) -> None:
    p = sub.add_parser("verify", help="compare with transformers stage by stage; or run the z3 proofs",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="""plainlm verify --against transformers [--model M] [--prompts P ...] [--json]
    runs plainlm and transformers (float32, same GGUF, same token ids) and prints, for the
    embedding, each layer's attention and MLP output and the logits, max |difference| against a
    stated tolerance; then the greedy tokens of both. Exit 1 on a mismatch. See docs/verify.md.
plainlm verify proofs [--only NAME] [--json]
    proves with z3 (or exhaustive enumeration, where stated) the facts the integer kernels rely on.""")
    p.add_argument("what", nargs="?", choices=["proofs"], help="proofs: run the z3 proofs")
    p.add_argument("--against", choices=["transformers"], default=None, help="the reference to compare with")
    p.add_argument("--model", "-m", default=None, help="GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--backend", choices=["ref", "fast"], default="ref",
                   help="our kernels to check (default ref, the float32 oracle)")
    p.add_argument("--prompts", nargs="+", default=None, help="prompts (default: three short ones)")
    p.add_argument("--tokens", type=int, default=8, help="greedy tokens to compare (default 8)")
    p.add_argument("--only", default=None, help="proofs: run only the proofs whose name contains this")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.set_defaults(func=cmd_verify)

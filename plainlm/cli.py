"""Command line: parses and wires, nothing else.

Core commands live here; larger features register their own sub-commands: every module in
PLUGINS provides `register(subparsers)` which adds parsers whose `func(args) -> int` runs them.
Errors the user can fix (bad file, bad flag, prompt too long) are one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

PLUGINS = ["plainlm.train.cli", "plainlm.server.cli", "plainlm.store.cli", "plainlm.verify.cli",
           "plainlm.convert"]


class UserError(Exception):
    """A problem in the user's input: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ("plainlm run: unrecognized arguments: --x"), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _user_errors():
    from .cache import ContextFull
    from .config import ConfigError
    from .formats.gguf import GGUFError
    from .pull import PullError
    errs = [UserError, GGUFError, ConfigError, ContextFull, PullError, FileNotFoundError]
    return tuple(errs)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="GGUF file, HF directory or SQL store URL "
                                          "(default: SmolLM2-135M-Instruct, fetched on first use)")
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads (default: $PLAINLM_THREADS or all cores)")
    p.add_argument("--backend", choices=["ref", "fast"], default=None,
                   help="kernels: numpy reference or compiled (default: $PLAINLM_BACKEND or fast)")
    p.add_argument("--integer", action="store_true",
                   help="integer-only inference (int8 weights/activations, int32 accumulation, "
                        "fixed-point norms, RoPE, softmax, SiLU): bit-identical across runs and threads")


def open_model(args, n_slots: int = 1):
    """(model, tokenizer) from --model/--threads/--backend."""
    from . import kernels
    from .model import load_model
    from .pull import resolve_model
    kernels.set_threads(getattr(args, "threads", None))
    path = resolve_model(getattr(args, "model", None))
    if getattr(args, "integer", False):
        from .formats import load
        from .integer import IntegerModel
        m = IntegerModel.from_checkpoint(load(path))
    else:
        m = load_model(path, getattr(args, "backend", None))
    return m, tokenizer_of(m)


def tokenizer_of(m):
    """The tokenizer a model or checkpoint carries (GGUF metadata or its HF directory's
    tokenizer.json); a missing or malformed one is the user's file problem: UserError."""
    from .tokenizer import Tokenizer
    try:
        return Tokenizer.from_model(m)
    except (ValueError, NotImplementedError) as e:
        raise UserError(str(e)) from None


# ------------------------------------------------------------------------------------------------
# run / chat / tokenize / perplexity / inspect / pull
# ------------------------------------------------------------------------------------------------

def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--temperature", "-t", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens (0 = off; default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off; default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="drop tokens below min_p x the top probability (0 = off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty (1 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="random seed: same seed, same text")
    p.add_argument("--beams", type=int, default=1, help="beam search with N beams (greedy, length-normalised)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    p.add_argument("--ctx", type=int, default=None, help="context length to allocate (default: the model's, at most 8192)")
    p.add_argument("--window", type=int, default=None,
                   help="streaming: keep 4 sink positions + the last N in the KV cache (constant memory)")


def sampling_from_args(args):
    from .sampling import SamplingParams
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                          presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, seed=args.seed)


def cmd_run(args) -> int:
    from .generate import GenerationConfig, generate_text
    if not args.prompt:
        raise UserError("empty prompt: give the text to complete, e.g. plainlm run \"Once upon a time\"")
    m, tok = open_model(args)
    prompt = args.prompt
    if args.chat:
        prompt = tok.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    gc = GenerationConfig(max_tokens=args.max_tokens, sampling=sampling_from_args(args),
                          stop=args.stop, ignore_eos=args.ignore_eos, beams=args.beams,
                          n_ctx=args.ctx, window=args.window)
    result = None
    for piece in generate_text(m, tok, prompt, gc):
        if isinstance(piece, str):
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        else:
            result = piece
    if args.json:
        print(json.dumps({"prompt_ids": result.prompt_ids, "ids": result.ids, "text": result.text,
                          "prefill_tok_s": round(result.prefill_tok_s, 3),
                          "decode_tok_s": round(result.decode_tok_s, 3),
                          "finish_reason": result.finish_reason}))
    else:
        sys.stdout.write("\n")
        print(f"[{len(result.prompt_ids)} prompt tokens at {result.prefill_tok_s:.1f} tok/s, "
              f"{len(result.ids)} generated at {result.decode_tok_s:.1f} tok/s, {result.finish_reason}]",
              file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .generate import ChatSession, GenerationConfig
    m, tok = open_model(args)
    gc = GenerationConfig(max_tokens=args.max_tokens, sampling=sampling_from_args(args),
                          stop=args.stop, ignore_eos=False, n_ctx=args.ctx, window=args.window)
    chat = ChatSession(m, tok, gc, system=args.system)
    print("plainlm chat — /reset starts over, /exit quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            chat.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not cmd:
            continue
        try:
            for piece in chat.send(line):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        except _user_errors() as e:
            print(f"\nplainlm: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")


def cmd_tokenize(args) -> int:
    from .formats import load
    from .pull import resolve_model
    ck = load(resolve_model(args.model))
    tok = tokenizer_of(ck)                     # GGUF metadata or an HF directory's tokenizer.json
    ids = tok.encode(args.text)
    toks = [tok.token_text(i) for i in ids]
    if args.json:
        print(json.dumps({"ids": ids, "tokens": toks}, ensure_ascii=False))
    else:
        for i, t in zip(ids, toks):
            print(f"{i:>7}  {t!r}")
    return 0


def cmd_perplexity(args) -> int:
    from .perplexity import perplexity
    if not os.path.isfile(args.file):
        raise UserError(f"{args.file}: no such file")
    m, tok = open_model(args)
    with open(args.file, encoding="utf-8", errors="replace") as f:
        text = f.read()
    r = perplexity(m, tok, text, ctx=args.ctx, window=args.window, progress=not args.json)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"perplexity {r['ppl']:.4f} over {r['tokens']} scored tokens ({r['windows']} windows of {args.ctx})")
    return 0


def cmd_inspect(args) -> int:
    from .inspect import format_report, inspect_report
    if not os.path.exists(args.file):
        raise UserError(f"{args.file}: no such file")
    rep = inspect_report(args.file)
    print(json.dumps(rep, default=str) if args.json else format_report(rep))
    return 0


def cmd_pull(args) -> int:
    from .pull import pull
    print(pull(force=args.force))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="plainlm", description=(
        "A transformer as plain loops and arithmetic that you can read, check and trust — and fast. "
        "Runs GGUF checkpoints (default: SmolLM2-135M-Instruct), trains, serves and verifies."))
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("run", help="complete a prompt (streams text)",
                       description="Complete PROMPT and stream the text. Special-token text in the "
                                   "prompt (e.g. <|im_start|>) is honoured; --chat wraps it in the "
                                   "model's chat template.")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line instead of streaming")
    p.add_argument("prompt", help="the text to complete")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat in the terminal",
                       description="Multi-turn chat that keeps the conversation and its KV cache. "
                                   "/reset starts over, /exit quits.")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat, max_tokens=512)

    p = sub.add_parser("tokenize", help="show the token ids of a text")
    p.add_argument("--model", "-m")
    p.add_argument("--json", action="store_true")
    p.add_argument("text")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("perplexity", help="perplexity of a text file",
                       description="Cut the text into non-overlapping windows of --ctx tokens (a final "
                                   "partial window is dropped); score every position but the first of "
                                   "each window; ppl = exp(mean negative log-likelihood).")
    add_model_args(p)
    p.add_argument("--file", "-f", required=True)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--window", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("inspect", help="architecture, tensors and tokenizer of a GGUF file")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("pull", help="fetch the default model into the cache (~/.cache/plainlm or $PLAINLM_HOME)")
    p.add_argument("--force", action="store_true", help="fetch again even if cached")
    p.set_defaults(func=cmd_pull)

    for mod in PLUGINS:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and mod.startswith(e.name):
                continue    # that feature is not in this tree
            raise
        module.register(sub)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("\nplainlm: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        print(f"plainlm: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())

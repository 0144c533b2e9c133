"""`plainlm train`, `plainlm sample`, `plainlm export`: argument parsing and wiring only."""
from __future__ import annotations

import argparse
import json
import sys

# flag -> (TrainConfig key or "model.<ArchConfig key>", type)
FLAGS = {
    "--data": ("data", str), "--out": ("out_dir", str), "--tokenizer": ("tokenizer", str),
    "--vocab-size": ("vocab_size", int), "--val-fraction": ("val_fraction", float),
    "--arch": ("model.arch", str), "--dim": ("model.dim", int), "--layers": ("model.n_layers", int),
    "--heads": ("model.n_heads", int), "--kv-heads": ("model.n_kv_heads", int),
    "--ffn-dim": ("model.ffn_dim", int), "--context": ("model.context_length", int),
    "--positions": ("model.positions", str), "--norm-position": ("model.norm_position", str),
    "--batch-size": ("batch_size", int), "--seq-len": ("seq_len", int), "--grad-accum": ("grad_accum", int),
    "--steps": ("steps", int), "--lr": ("lr", float), "--min-lr": ("min_lr", float), "--warmup": ("warmup", int),
    "--weight-decay": ("weight_decay", float), "--grad-clip": ("grad_clip", float), "--seed": ("seed", int),
    "--eval-every": ("eval_every", int), "--eval-windows": ("eval_windows", int),
    "--patience": ("patience", int), "--log-every": ("log_every", int), "--ckpt-every": ("ckpt_every", int),
    "--sample-every": ("sample_every", int), "--max-minutes": ("max_minutes", float),
}


def _user_error(e):
    from ..cli import UserError
    return UserError(str(e))


def build_config(args):
    """TrainConfig from --config, then flags on top."""
    from .loop import TrainConfig, TrainError, load_config_file
    d = load_config_file(args.config) if args.config else {}
    d = dict(d)
    d["model"] = dict(d.get("model", {}))
    for flag, (key, _) in FLAGS.items():
        v = getattr(args, flag[2:].replace("-", "_"))
        if v is None:
            continue
        if key == "data":
            d["data"] = list(v)
        elif key.startswith("model."):
            d["model"][key[6:]] = v
        else:
            d[key] = v
    if args.no_plot:
        d["plot"] = False
    try:
        tc = TrainConfig.from_dict(d)
        tc.validate()
    except TrainError as e:
        raise _user_error(e) from None
    return tc


def cmd_train(args) -> int:
    from .loop import TrainError, train
    tc = build_config(args)
    try:
        res = train(tc, fresh=args.fresh, progress=None if not args.no_progress else False)
    except TrainError as e:
        raise _user_error(e) from None
    print(json.dumps(res))
    return 0


def cmd_sample(args) -> int:
    from .loop import TrainError, model_from_checkpoint, sample_text
    try:
        cfg, P, tok, _ = model_from_checkpoint(args.checkpoint)
    except TrainError as e:
        raise _user_error(e) from None
    for i in range(args.num):
        text = sample_text(cfg, P, tok, args.prompt, args.max_tokens, args.temperature, args.top_k,
                           seed=(args.seed or 0) + i)
        print((args.prompt or "") + text)
        if i + 1 < args.num:
            print("---")
    return 0


def cmd_export(args) -> int:
    from .export import export_gguf
    from .loop import TrainError
    try:
        out = export_gguf(args.checkpoint, args.gguf, args.type)
    except TrainError as e:
        raise _user_error(e) from None
    print(out)
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a small transformer from scratch (llama, gpt2 or bitnet)",
                       description="Settings come from --config (JSON or TOML: TrainConfig keys, model "
                                   "settings under \"model\"), overridden by flags. Training resumes from "
                                   "OUT/ckpt.npz when it exists (--fresh starts over).")
    p.add_argument("--config", "-c", help="JSON or TOML file")
    for flag, (key, typ) in FLAGS.items():
        if flag == "--data":
            p.add_argument(flag, nargs="+", help="text files / directories (recursive), or 'kjv' "
                                                 "(King James Bible, fetched into the cache)")
        else:
            p.add_argument(flag, type=typ, default=None, help=f"({key})")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    p.add_argument("--no-plot", action="store_true", help="do not draw loss.png")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate text from a training checkpoint")
    p.add_argument("checkpoint", help="OUT/ckpt.npz (or the OUT directory)")
    p.add_argument("--prompt", "-p", default="")
    p.add_argument("--max-tokens", "-n", type=int, default=200)
    p.add_argument("--temperature", "-t", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=1, help="number of samples")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="write a training checkpoint as GGUF (llama.cpp and plainlm load it)")
    p.add_argument("checkpoint")
    p.add_argument("--gguf", required=True, help="output .gguf path")
    p.add_argument("--type", default="f32", choices=["f32", "f16", "q8_0"],
                   help="matrix type for llama models (bitnet projections are always TQ2_0)")
    p.set_defaults(func=cmd_export)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="plainlm")
    register(ap.add_subparsers())
    a = ap.parse_args()
    sys.exit(a.func(a))

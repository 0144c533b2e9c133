"""Decode speed and memory as the context grows: plainlm vs llama.cpp at positions 16, 256, 1024, 4096.

    python bench/context.py [--threads 2] [--positions 16,256,1024,4096] [--steps 32]

Each engine runs in its own subprocess: it fills its cache with a real text (the licence, repeated)
up to each position, then decodes `--steps` tokens there (greedy). Prints ONE JSON line (tok/s and
RSS per position, ratios), progress to stderr, and appends a row to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(engine, threads, positions, steps, ids):
    from plainlm.pull import pull
    path = str(pull())
    n_ctx = max(positions) + steps + 8
    out = {}
    if engine == "plainlm":
        from plainlm import kernels
        from plainlm.model import forward, load_model, prefill
        kernels.set_threads(threads)
        m = load_model(path)
        c = m.new_cache(n_ctx)
        filled = 0
        for p in positions:
            if p > filled:
                prefill(m, ids[filled:p], c, start=filled)
            tok, t = ids[p], time.perf_counter()
            for j in range(steps):
                tok = int(forward(m, [tok], p + j, c).argmax())
            out[p] = dict(decode=steps / (time.perf_counter() - t), rss_mb=rss_mb())
            filled = p + steps
            ids = ids[:filled] + ids[filled - steps:]          # keep the text aligned after our steps
    else:
        import numpy as np
        from llama_cpp import Llama
        llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_ctx,
                    verbose=False)
        for p in positions:
            if p > llm.n_tokens:
                llm.eval(ids[llm.n_tokens:p])
            tok, t = ids[p], time.perf_counter()
            for j in range(steps):
                llm.eval([tok])
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out[p] = dict(decode=steps / (time.perf_counter() - t), rss_mb=rss_mb())
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--positions", default="16,256,1024,4096")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--no-results", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    positions = [int(p) for p in args.positions.split(",")]
    if args.worker:                                   # ids come from the driver: no tokenizer in the worker's RSS
        return worker(args.worker, args.threads, positions, args.steps, json.loads(args.ids))
    from decode import append_results, prompt_ids
    ids = json.dumps(prompt_ids(max(positions) + 2 * args.steps + 8))
    engines = ["plainlm"]
    try:
        import llama_cpp  # noqa: F401
        engines.append("llama.cpp")
    except ImportError:
        print("llama-cpp-python missing: plainlm only (see bench/decode.py for the build line)", file=sys.stderr)
    res = {"threads": args.threads, "steps": args.steps}
    for e in engines:
        p = subprocess.run([sys.executable, __file__, "--worker", e, "--threads", str(args.threads),
                            "--positions", args.positions, "--steps", str(args.steps), "--ids", ids], capture_output=True, text=True)
        if p.returncode:
            print(f"{e} failed: {p.stderr[-2000:]}", file=sys.stderr)
            continue
        res[e] = {int(k): {kk: round(vv, 2) for kk, vv in v.items()} for k, v in json.loads(p.stdout.splitlines()[-1]).items()}
        for pos, v in res[e].items():
            print(f"{e:9s} position {pos:5d}: decode {v['decode']:6.1f} tok/s, RSS {v['rss_mb']:.0f} MB", file=sys.stderr)
    if "plainlm" in res and "llama.cpp" in res:
        res["decode_ratio"] = {p: round(res["plainlm"][p]["decode"] / res["llama.cpp"][p]["decode"], 3) for p in positions}
    print(json.dumps(res))
    if not args.no_results:
        rows = ["| engine | " + " | ".join(f"pos {p}: tok/s, RSS MB" for p in positions) + " |",
                "|---|" + "---|" * len(positions)]
        for e in engines:
            if e in res:
                rows.append(f"| {e} | " + " | ".join(f"{res[e][p]['decode']}, {res[e][p]['rss_mb']:.0f}" for p in positions) + " |")
        append_results("bench/context.py", "python bench/context.py " + " ".join(sys.argv[1:]), rows)


if __name__ == "__main__":
    main()

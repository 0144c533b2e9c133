"""Decode / prefill / memory / time-to-first-token: plainlm vs llama.cpp vs transformers (PyTorch).

    python bench/decode.py [--threads 1,2] [--reps 5] [--engines plainlm,llama.cpp,torch]

Same GGUF file (the default model), batch 1, greedy, EOS ignored. Each repetition of each engine
runs in its own subprocess (so peak RSS is that engine's own), and repetitions alternate between
engines so that a noisy shared machine slows all of them alike; figures are medians.
  decode   tok/s generating `--new` tokens after a `--prompt`-token prompt
  prefill  tok/s of a `--prefill`-token prompt (one batch)
  ttft     seconds from the worker's start (imports and model load included) to the first token
  rss      peak resident set size of the worker (MB)
Prints ONE JSON line; progress goes to stderr; appends a row to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

T_START = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

LLAMA_MISSING = ("llama-cpp-python is not installed, so there is no llama.cpp figure. Build it without "
                 "the AMX path, which crashes batched evaluation on this CPU: CMAKE_ARGS='-DGGML_NATIVE=OFF "
                 "-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON' pip install llama-cpp-python")


def prompt_ids(n: int) -> list[int]:
    """The first n tokens of the Apache-2.0 licence text (a real text, not ours)."""
    from plainlm.pull import license_text_path, pull
    from plainlm.formats.gguf import read_gguf
    from plainlm.tokenizer import Tokenizer
    path = pull()
    tok = Tokenizer.from_gguf_metadata(read_gguf(path).metadata)
    ids = tok.encode(open(license_text_path()).read())
    return (ids * (n // len(ids) + 1))[:n]


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------
# workers: one engine, one repetition; print a JSON line
# ------------------------------------------------------------------------------------------------

def worker_plainlm(path, threads, p16, p256, n_new):
    from plainlm import kernels
    from plainlm.model import forward, load_model, prefill
    kernels.set_threads(threads)
    m = load_model(path)
    cache = m.new_cache(len(p16) + n_new + 8)
    logits = prefill(m, p16, cache)
    tok = int(logits.argmax())
    ttft = time.perf_counter() - T_START
    t = time.perf_counter()
    pos = len(p16)
    for _ in range(n_new):
        tok = int(forward(m, [tok], pos, cache).argmax())
        pos += 1
    decode = n_new / (time.perf_counter() - t)
    cache = m.new_cache(len(p256) + 8)
    t = time.perf_counter()
    prefill(m, p256, cache, chunk=len(p256))
    return dict(decode=decode, prefill=len(p256) / (time.perf_counter() - t), ttft=ttft)


def worker_llama(path, threads, p16, p256, n_new):
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512,
                verbose=False)
    llm.eval(p16)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    ttft = time.perf_counter() - T_START
    t = time.perf_counter()
    for _ in range(n_new):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    decode = n_new / (time.perf_counter() - t)
    llm.reset()
    llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
    t = time.perf_counter()
    llm.eval(p256)
    return dict(decode=decode, prefill=len(p256) / (time.perf_counter() - t), ttft=ttft)


def worker_torch(path, threads, p16, p256, n_new):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 torch_dtype=torch.float32)
    model.eval()
    with torch.inference_mode():
        out = model(torch.tensor([p16]), use_cache=True)
        tok = int(out.logits[0, -1].argmax())
        ttft = time.perf_counter() - T_START
        past = out.past_key_values
        t = time.perf_counter()
        for _ in range(n_new):
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = int(out.logits[0, -1].argmax())
        decode = n_new / (time.perf_counter() - t)
        t = time.perf_counter()
        model(torch.tensor([p256]), use_cache=False, logits_to_keep=1)
        prefill = len(p256) / (time.perf_counter() - t)
    return dict(decode=decode, prefill=prefill, ttft=ttft)


WORKERS = {"plainlm": worker_plainlm, "llama.cpp": worker_llama, "torch": worker_torch}


def run_worker(args):
    import numpy as np  # noqa: F401  (imported by every engine anyway)
    from plainlm.pull import pull
    p16, p256 = json.loads(args.ids)
    r = WORKERS[args.worker](str(pull()), args.threads_one, p16, p256, args.new)
    r["rss_mb"] = peak_rss_mb()
    print(json.dumps(r))


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------

from _results import append_results  # noqa: E402  (bench/ is on sys.path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--engines", default="plainlm,llama.cpp,torch")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--threads-one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return run_worker(args)

    engines = args.engines.split(",")
    notes = []
    if "llama.cpp" in engines:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            engines.remove("llama.cpp")
            notes.append(LLAMA_MISSING)
            print(LLAMA_MISSING, file=sys.stderr)
    threads = [int(t) for t in args.threads.split(",")]
    ids = json.dumps([prompt_ids(args.prompt), prompt_ids(args.prefill)])
    runs = {(e, n): [] for e in engines for n in threads}
    for rep in range(args.reps):
        for n in threads:
            for e in engines:                                     # alternate engines every repetition
                cmd = [sys.executable, __file__, "--worker", e, "--threads-one", str(n), "--ids", ids,
                       "--new", str(args.new)]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    print(f"{e} failed:\n{p.stderr[-2000:]}", file=sys.stderr)
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                runs[(e, n)].append(r)
                print(f"rep {rep + 1}/{args.reps} threads {n} {e:9s} decode {r['decode']:6.1f} tok/s  "
                      f"prefill {r['prefill']:6.1f} tok/s  ttft {r['ttft']:5.2f} s  rss {r['rss_mb']:5.0f} MB",
                      file=sys.stderr)
    res = {"model": "SmolLM2-135M-Instruct.Q4_1.gguf", "prompt": args.prompt, "new": args.new,
           "prefill_tokens": args.prefill, "reps": args.reps, "notes": notes}
    rows = ["| threads | engine | decode tok/s | prefill tok/s | TTFT s | peak RSS MB |", "|---|---|---|---|---|---|"]
    for n in threads:
        for e in engines:
            rs = runs[(e, n)]
            if not rs:
                continue
            med = {k: round(statistics.median(r[k] for r in rs), 2) for k in ("decode", "prefill", "ttft", "rss_mb")}
            res[f"{e}@{n}"] = med
            rows.append(f"| {n} | {e} | {med['decode']} | {med['prefill']} | {med['ttft']} | {med['rss_mb']:.0f} |")
        ours = res.get(f"plainlm@{n}")
        if ours:
            for e in engines:
                if e != "plainlm" and f"{e}@{n}" in res:
                    peer = res[f"{e}@{n}"]
                    res[f"ratio_vs_{e}@{n}"] = {k: round(ours[k] / peer[k], 3) for k in ("decode", "prefill")}
                    res[f"ratio_vs_{e}@{n}"]["rss_mb_diff"] = round(ours["rss_mb"] - peer["rss_mb"], 1)
            # bound: ~96 MB of weights read per token at ~9 GB/s (1 thread) or ~16 GB/s (2 threads)
            res[f"decode_fraction_of_memory_bound@{n}"] = round(ours["decode"] / ((9e9 if n == 1 else 16e9) / 96e6), 3)
    print(json.dumps(res))
    if not args.no_results:
        cmd = "python bench/decode.py " + " ".join(sys.argv[1:])
        append_results("bench/decode.py", cmd.strip(), rows + ["", "```json", json.dumps(res), "```"])


if __name__ == "__main__":
    main()

"""BitNet b1.58 2B-4T-shaped decode/prefill benchmark: plainlm vs llama.cpp on the same TQ2_0 GGUF.

The model is random ternary with the exact shapes of microsoft/bitnet-b1.58-2B-4T (30 layers,
hidden 2560, 20/5 heads, FFN 6912, vocab 128256, tied embedding), written once as GGUF TQ2_0
(architecture `bitnet`, minimal byte-level vocabulary) under ~/.cache/plainlm/bench/. The embedding
(also the output head) is f16 by default; `--embd q8_0` uses a second file, identical except that
token_embd is stored as Q8_0 (like bitnet.cpp's `--quant-embd`, which stores it quantized): 349
instead of 657 MB that every token reads. Engines run
alternately, each in its own subprocess (peak RSS = that process's ru_maxrss, load included):
prefill of a 256-token prompt, then decode of --decode tokens (batch 1), same thread count. One
unmeasured plainlm run goes first, so that numba's on-disk cache holds the compiled kernels (a
first-ever run compiles them: ~50 MB more peak RSS and seconds more load).
Prints one JSON line and appends a row to bench/RESULTS.md.

    python bench/bitnet.py [--threads 2] [--rounds 3] [--decode 32] [--embd f16|q8_0]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import numpy as np  # noqa: E402

SHAPES = dict(vocab_size=128256, dim=2560, n_layers=30, n_heads=20, n_kv_heads=5, head_dim=128,
              ffn_dim=6912, context_length=4096, rope_theta=500000.0, norm_eps=1e-5)


def model_path(embd: str = "f16") -> str:
    home = os.environ.get("PLAINLM_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "plainlm")
    tail = "" if embd == "f16" else f"-embd_{embd}"
    return os.path.join(home, "bench", f"bitnet-2b4t-shapes-random-tq2_0{tail}.gguf")


def bench_config():
    from plainlm.config import ModelConfig
    return ModelConfig(arch="bitnet", act="relu2", **SHAPES)


def bench_metadata() -> dict:
    from plainlm.convert import bitnet_metadata, minimal_vocab
    cfg = bench_config()
    meta = bitnet_metadata(cfg, "bitnet", 37)
    meta.update(minimal_vocab(cfg.vocab_size, bos=cfg.vocab_size - 2, eos=cfg.vocab_size - 1))
    return meta


def build_model(path: str) -> None:
    """Random ternary model, streamed to GGUF one tensor at a time (seeded: same file every time)."""
    from plainlm.convert import _ternary_entry, write_gguf_file
    cfg = bench_config()
    D, F, V, Dh = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    meta = bench_metadata()

    def emb():
        for r0 in range(0, V, 8192):
            rng = np.random.default_rng(r0)
            yield (rng.standard_normal((min(V, r0 + 8192) - r0, D), np.float32) * 0.05).astype(np.float16)

    def norm(n, seed):
        return lambda: (1 + 0.05 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)

    def codes(seed):
        def fn(r0, r1, k=None):
            rng = np.random.default_rng([seed, r0])
            return rng.choice(np.array([0, 1, 2], np.uint8), size=(r1 - r0, fn.k), p=[0.3, 0.4, 0.3])
        return fn

    tensors = [("token_embd.weight", "F16", (V, D), V * D * 2, emb),
               ("output_norm.weight", "F32", (D,), 4 * D, norm(D, 1))]
    shapes = {"attn_q": (cfg.n_heads * Dh, D), "attn_k": (cfg.n_kv_heads * Dh, D),
              "attn_v": (cfg.n_kv_heads * Dh, D), "attn_output": (D, cfg.n_heads * Dh),
              "ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F)}
    seed = 10
    for i in range(cfg.n_layers):
        for nm, n in (("attn_norm", D), ("attn_sub_norm", D), ("ffn_norm", D), ("ffn_sub_norm", F)):
            seed += 1
            tensors.append((f"blk.{i}.{nm}.weight", "F32", (n,), 4 * n, norm(n, seed)))
        for nm, (n, k) in shapes.items():
            seed += 1
            fn = codes(seed)
            fn.k = k
            tensors.append(_ternary_entry(f"blk.{i}.{nm}.weight", n, k, "TQ2_0", fn, 1.0 / np.sqrt(k)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_gguf_file(path, meta, tensors)


def build_q8_0_embd(src: str, path: str, rows: int = 2048) -> None:
    """`src` with token_embd re-stored as Q8_0 (quantized from its f16 values); every other tensor
    and the metadata copied unchanged (integers are rewritten as u32, as plainlm's writer does). Streams `rows` embedding rows at a time (a few tens of MB of
    float temporaries), and the other tensors straight from the mapped source file."""
    from plainlm.convert import write_gguf_file
    from plainlm.formats.gguf import read_gguf
    from plainlm.quant import Q8_0, quantize, row_bytes
    from plainlm.formats.safetensors import release_pages
    g = read_gguf(src)
    meta = {k: v for k, v in g.metadata.items() if k != "general.alignment"}    # the writer adds it
    tensors = []
    for name, ti in g.tensors.items():
        shape = tuple(ti.shape)
        if name == "token_embd.weight":
            V, D = shape

            def emb(ti=ti, V=V, D=D):
                for r0 in range(0, V, rows):
                    f16 = ti.data[r0:r0 + rows].view(np.float16).reshape(-1, D)
                    yield quantize(f16.astype(np.float32), Q8_0)
                    release_pages(ti.data[r0:r0 + rows])     # keep the source's pages out of RSS
            tensors.append((name, "Q8_0", shape, V * row_bytes(Q8_0, D), emb))
        else:
            tensors.append((name, ti.qtype.name, shape, ti.data.nbytes, lambda ti=ti: _chunks(ti.data)))
    write_gguf_file(path, meta, tensors)


def _chunks(a: np.ndarray, n: int = 1 << 24):
    from plainlm.formats.safetensors import release_pages
    a = a.reshape(-1)
    for i in range(0, a.size, n):
        yield a[i:i + n]
        release_pages(a[i:i + n])


def embd_type(path: str) -> str:
    """How the file stores token_embd (the tied output head): 'f16', 'q8_0', ..."""
    from plainlm.formats.gguf import read_gguf
    return read_gguf(path).tensors["token_embd.weight"].qtype.name.lower()


def ensure_model(embd: str) -> str:
    path = model_path(embd)
    if os.path.exists(path):
        return path
    src = model_path("f16")
    if not os.path.exists(src):
        print(f"building {src} ...", file=sys.stderr)
        t0 = time.perf_counter()
        build_model(src)
        print(f"built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if embd != "f16":
        print(f"building {path} ...", file=sys.stderr)
        t0 = time.perf_counter()
        build_q8_0_embd(src, path)
        print(f"built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


# ------------------------------------------------------------------------------------------------
# workers (one engine per process)
# ------------------------------------------------------------------------------------------------

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_plainlm(path, threads, prompt, steps):
    from plainlm import kernels
    from plainlm.model import forward, load_model, prefill
    kernels.set_threads(threads)
    t0 = time.perf_counter()
    m = load_model(path, "fast")
    load_s = time.perf_counter() - t0
    warm = m.new_cache(64)                                   # compile / warm every kernel shape
    prefill(m, prompt[:8], warm)
    forward(m, [prompt[0]], [8], warm)
    del warm
    cache = m.new_cache(len(prompt) + steps + 1)
    t0 = time.perf_counter()
    logits = prefill(m, prompt, cache, chunk=len(prompt))
    t_pre = time.perf_counter() - t0
    tok = int(np.argmax(logits))
    t0 = time.perf_counter()
    for i in range(steps):
        logits = forward(m, [tok], [len(prompt) + i], cache)
        tok = int(np.argmax(logits))
    t_dec = time.perf_counter() - t0
    return {"load_s": load_s, "prefill_tok_s": len(prompt) / t_pre, "decode_tok_s": steps / t_dec,
            "peak_rss_mb": peak_rss_mb()}


def worker_llama(path, threads, prompt, steps):
    import llama_cpp
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads,
                          n_ctx=len(prompt) + steps + 16, n_batch=len(prompt), verbose=False)
    load_s = time.perf_counter() - t0
    llm.eval(list(prompt[:8]))                              # warm-up
    llm.eval([int(prompt[0])])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(list(int(t) for t in prompt))
    t_pre = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def last_logits():                                       # the context's logits of the last token
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
    tok = int(np.argmax(last_logits()))
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.eval([tok])
        tok = int(np.argmax(last_logits()))
    t_dec = time.perf_counter() - t0
    return {"load_s": load_s, "prefill_tok_s": len(prompt) / t_pre, "decode_tok_s": steps / t_dec,
            "peak_rss_mb": peak_rss_mb()}


def run_worker(engine, path, threads, prompt_len, steps):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               NUMBA_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--model", path,
           "--threads", str(threads), "--prompt", str(prompt_len), "--decode", str(steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{engine} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def append_bitnet_results(res, cmd):
    from _results import append_results
    rows = ["| engine | decode tok/s | prefill tok/s (256) | peak RSS MB | load s |", "|---|---|---|---|---|"]
    for e in ("plainlm", "llama_cpp"):
        r = res[e]
        rows.append(f"| {e} | {r['decode_tok_s']} | {r['prefill_tok_s']} | {r['peak_rss_mb']} | {r['load_s']} |")
    rows.append(f"\nratios plainlm/llama.cpp: decode {res['decode_ratio']}, prefill {res['prefill_ratio']}, "
                f"RSS {res['rss_ratio']} (medians of {res['rounds']} alternating rounds; file {res['file_mb']} MB)")
    append_results(f"bitnet 2B-4T shapes, TQ2_0, {res['embd']} embedding — {res['threads']} threads", cmd, rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--model", default=None, help="GGUF to use (default: the cached random 2B-4T-shaped model)")
    ap.add_argument("--embd", choices=["f16", "q8_0"], default="f16",
                    help="storage of token_embd (= the tied output head): f16, or q8_0 (a second cached file)")
    ap.add_argument("--build-only", action="store_true", help="build the cached model file and exit")
    ap.add_argument("--only", choices=["plainlm", "llama_cpp"], default=None)
    ap.add_argument("--worker", choices=["plainlm", "llama_cpp"], help=argparse.SUPPRESS)
    ap.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args()
    if args.build_only:
        print(ensure_model(args.embd))
        return 0
    prompt = np.random.default_rng(0).integers(0, 128000, args.prompt)
    if args.worker:
        path = args.model
        fn = worker_plainlm if args.worker == "plainlm" else worker_llama
        print(json.dumps(fn(path, args.threads, prompt, args.decode)))
        return 0
    path = args.model or ensure_model(args.embd)
    engines = [args.only] if args.only else ["plainlm", "llama_cpp"]
    if "plainlm" in engines:        # fill numba's on-disk cache: measure runs after the first, not a first compile
        run_worker("plainlm", path, args.threads, 8, 1)
    runs = {e: [] for e in engines}
    for r in range(args.rounds):
        for e in (engines if r % 2 == 0 else engines[::-1]):
            runs[e].append(run_worker(e, path, args.threads, args.prompt, args.decode))
            print(f"round {r} {e}: {runs[e][-1]}", file=sys.stderr)
    med = {e: {k: round(float(np.median([x[k] for x in v])), 2) for k in v[0]} for e, v in runs.items()}
    res = {"bench": "bitnet-2b4t-tq2_0", "embd": embd_type(path), "threads": args.threads, "rounds": args.rounds,
           "prompt": args.prompt, "decode": args.decode, "file_mb": round(os.path.getsize(path) / 1e6, 1),
           **med}
    if len(engines) == 2:
        for k, key in (("decode_ratio", "decode_tok_s"), ("prefill_ratio", "prefill_tok_s"), ("rss_ratio", "peak_rss_mb")):
            res[k] = round(med["plainlm"][key] / med["llama_cpp"][key], 3)
    print(json.dumps(res))
    if len(engines) == 2 and not args.no_results:
        append_bitnet_results(res, "python bench/bitnet.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

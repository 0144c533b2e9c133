"""Serving benchmark: plainlm's server vs llama-cpp-python's server, same model, same threads, same run.

    python bench/serve.py [--model M] [--threads N] [--clients 1,8,32,64] [--tokens 64]

For each concurrency c, c clients at once each stream one completion of --tokens new tokens (greedy,
a different prompt each). Reported per server and c: aggregate generated tok/s (all tokens / wall
time), p50/p99 time to first token, failed requests. Then a 256-connection check against plainlm
(small slots + queue): every request must end either complete or refused with 503 + Retry-After —
none dropped or hung — while the server's RSS stays bounded.

Prints one JSON line and appends a row to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

SUBJECTS = ["a lighthouse keeper", "a robot chef", "two rival bakers", "a lost dragon", "a tiny moon",
            "a clockmaker", "a river that talks", "an old violin", "a brave snail", "a cloud city",
            "a pirate librarian", "a sleepy volcano", "a glass forest", "a detective cat", "the last train"]


def prompt_for(i: int) -> str:
    return f"Here is a long story about {SUBJECTS[i % len(SUBJECTS)]} (number {i}). Once upon a time,"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return xs[k]


def rss_mb(pid: int) -> float:
    try:
        import psutil
        p = psutil.Process(pid)
        return (p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))) / 2**20
    except Exception:                                     # noqa: BLE001
        return float("nan")


class Server:
    def __init__(self, name, cmd, port, env=None):
        self.name, self.cmd, self.port = name, cmd, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(f"/tmp/bench_serve_{name}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **(env or {})})

    def wait(self, path, timeout=300):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited ({self.proc.returncode}); see {self.log.name}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} server did not come up in {timeout}s")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def one(client, url, i, tokens, model, usage_opt):
    """Stream one completion; (ttft_s, n_tokens, total_s, error or None)."""
    body = {"model": model, "prompt": prompt_for(i), "max_tokens": tokens, "temperature": 0, "stream": True}
    if usage_opt:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    ttft, n_chunks, usage = None, 0, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return None, 0, time.perf_counter() - t0, f"HTTP {r.status_code}"
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                j = json.loads(line[6:])
                if j.get("usage"):
                    usage = j["usage"]
                if j.get("choices") and j["choices"][0].get("text"):
                    n_chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    except Exception as e:                                # noqa: BLE001
        return ttft, 0, time.perf_counter() - t0, f"{type(e).__name__}: {e}"
    n = usage["completion_tokens"] if usage else n_chunks
    return ttft, n, time.perf_counter() - t0, None


async def load(url, clients, tokens, model, usage_opt, timeout):
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30), limits=limits) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(client, url, i, tokens, model, usage_opt) for i in range(clients)))
        wall = time.perf_counter() - t0
    ttfts = [r[0] for r in res if r[0] is not None and r[3] is None]
    n = sum(r[1] for r in res)
    errs = [r[3] for r in res if r[3]]
    return {"clients": clients, "tokens": n, "wall_s": round(wall, 2), "tok_s": round(n / wall, 2),
            "ttft_p50_s": round(pct(ttfts, 50), 3) if ttfts else None,
            "ttft_p99_s": round(pct(ttfts, 99), 3) if ttfts else None,
            "failed": len(errs), "errors": sorted(set(errs))[:3]}


def run_level(server, c, tokens, model, usage_opt, timeout):
    r = asyncio.run(load(server.url, c, tokens, model, usage_opt, timeout))
    r["server_rss_mb"] = round(rss_mb(server.proc.pid), 1)
    print(f"# {server.name:9s} c={c:3d}: {r['tok_s']:8.1f} tok/s  ttft p50 {r['ttft_p50_s']}s "
          f"p99 {r['ttft_p99_s']}s  failed {r['failed']}  ({r['tokens']} tokens in {r['wall_s']}s)",
          file=sys.stderr)
    return r


async def flood(url, n, tokens, timeout, server_pid):
    """n concurrent connections at once; classify each outcome."""
    peak = {"rss": rss_mb(server_pid)}
    done = asyncio.Event()

    async def watch():
        while not done.is_set():
            peak["rss"] = max(peak["rss"], rss_mb(server_pid))
            await asyncio.sleep(0.2)

    async def req(client, i):
        body = {"prompt": prompt_for(i), "max_tokens": tokens, "temperature": 0}
        try:
            r = await client.post(url + "/v1/completions", json=body)
        except Exception as e:                            # noqa: BLE001 - dropped or hung
            return f"failed: {type(e).__name__}"
        if r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop"):
            return "ok"
        if r.status_code == 503 and r.headers.get("Retry-After", "").isdigit():
            return "503"
        return f"failed: HTTP {r.status_code}"

    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30), limits=limits) as client:
        w = asyncio.create_task(watch())
        t0 = time.perf_counter()
        res = await asyncio.gather(*(req(client, i) for i in range(n)))
        wall = time.perf_counter() - t0
        done.set()
        await w
    return {"connections": n, "ok": res.count("ok"), "busy_503_retry_after": res.count("503"),
            "failed": sum(r.startswith("failed") for r in res),
            "failures": sorted(set(r for r in res if r.startswith("failed")))[:3],
            "wall_s": round(wall, 2), "server_peak_rss_mb": round(peak["rss"], 1)}


def append_serve_results(res, cmd):
    from _results import append_results
    rows = ["| clients | plainlm tok/s | llama-cpp tok/s | ratio | plainlm TTFT p50/p99 s | "
            "llama-cpp TTFT p50/p99 s | failed (ours/theirs) |", "|---|---|---|---|---|---|---|"]
    for c, ours in res["plainlm"].items():
        th = (res["llama_cpp"] or {}).get(c)
        ratio = f"{ours['tok_s'] / th['tok_s']:.2f}" if th and th["tok_s"] else "—"
        rows.append(f"| {c} | {ours['tok_s']} | {th['tok_s'] if th else '—'} | {ratio} | "
                    f"{ours['ttft_p50_s']}/{ours['ttft_p99_s']} | "
                    f"{(str(th['ttft_p50_s']) + '/' + str(th['ttft_p99_s'])) if th else '—'} | "
                    f"{ours['failed']}/{th['failed'] if th else '—'} |")
    if res.get("llama_cpp_note"):
        rows.append(f"\n{res['llama_cpp_note']}")
    fl = res.get("check_256")
    if fl:
        rows.append(f"\n256-connection check: {fl['ok']} completed, {fl['busy_503_retry_after']} refused with "
                    f"503 + Retry-After, **{fl['failed']} failed**; server peak RSS {fl['server_peak_rss_mb']} MB "
                    f"({fl['wall_s']} s).")
    append_results(f"serve — {res['threads']} threads", cmd, rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the default model)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--clients", default="1,8,32,64")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=64, help="plainlm --slots for the load runs")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=900, help="per-request client timeout, seconds")
    ap.add_argument("--flood", type=int, default=256, help="connections in the overload check (0 = skip)")
    ap.add_argument("--flood-tokens", type=int, default=16)
    ap.add_argument("--flood-slots", type=int, default=32)
    ap.add_argument("--flood-queue", type=int, default=64)
    ap.add_argument("--no-llama", action="store_true", help="skip llama-cpp-python's server")
    ap.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args(argv)
    from plainlm.pull import resolve_model
    model = os.path.abspath(resolve_model(args.model))
    clients = [int(c) for c in args.clients.split(",") if c]
    py = sys.executable
    res = {"bench": "serve", "model": os.path.basename(model), "threads": args.threads, "tokens": args.tokens,
           "cpu": __import__("_results").cpu_model(), "plainlm": {}, "llama_cpp": None}

    # ---- both servers up at once; each load level runs on ours, then on theirs ----------------
    # (an idle server costs no CPU; alternating keeps the two sides' conditions alike on a shared box)
    servers = []
    port = free_port()
    servers.append(("plainlm", Server("plainlm", [
        py, "-m", "plainlm", "serve", "--model", model, "--threads", str(args.threads), "--slots", str(args.slots),
        "--queue", str(max(256, max(clients))), "--ctx", str(args.ctx), "--port", str(port)], port),
        "/health", "plainlm", True))
    try:
        import llama_cpp
        import llama_cpp.server  # noqa: F401
        res["llama_cpp_version"] = llama_cpp.__version__
        have_llama = True
    except ImportError as e:
        have_llama = False
        res["llama_cpp_note"] = f"llama-cpp-python is missing ({e}): no comparison in this run."
        print(f"# {res['llama_cpp_note']}", file=sys.stderr)
    if have_llama and not args.no_llama:
        port = free_port()
        servers.append(("llama_cpp", Server("llama_cpp", [
            py, "-m", "llama_cpp.server", "--model", model, "--n_threads", str(args.threads),
            "--n_threads_batch", str(args.threads), "--n_ctx", str(args.ctx), "--host", "127.0.0.1",
            "--port", str(port), "--interrupt_requests", "False", "--verbose", "False"], port),
            "/v1/models", os.path.basename(model), False))
    try:
        for key, srv, ready, name, usage_opt in servers:
            srv.wait(ready)
            asyncio.run(load(srv.url, 1, 4, name, usage_opt, args.timeout))      # warm-up (JIT, caches)
            res[key] = {}
        for c in clients:
            for key, srv, ready, name, usage_opt in servers:
                res[key][str(c)] = run_level(srv, c, args.tokens, name, usage_opt, args.timeout)
    finally:
        for _, srv, *_ in servers:
            srv.stop()
    if res.get("llama_cpp"):
        res["ratio"] = {c: round(res["plainlm"][c]["tok_s"] / res["llama_cpp"][c]["tok_s"], 3)
                        for c in res["plainlm"] if res["llama_cpp"].get(c, {}).get("tok_s")}

    # ---- 256 connections at once against small slots + queue ------------------------------------
    if args.flood:
        port = free_port()
        ours = Server("plainlm_flood", [py, "-m", "plainlm", "serve", "--model", model, "--threads",
                                        str(args.threads), "--slots", str(args.flood_slots), "--queue",
                                        str(args.flood_queue), "--ctx", str(args.ctx), "--port", str(port)], port)
        try:
            ours.wait("/health")
            asyncio.run(load(ours.url, 1, 2, "plainlm", True, args.timeout))        # warm-up
            res["check_256"] = asyncio.run(flood(ours.url, args.flood, args.flood_tokens, args.timeout,
                                                 ours.proc.pid))
            res["check_256"].update(slots=args.flood_slots, queue=args.flood_queue)
            print(f"# flood: {res['check_256']}", file=sys.stderr)
        finally:
            ours.stop()

    print(json.dumps(res))
    if not args.no_append:
        append_serve_results(res, "python bench/serve.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())

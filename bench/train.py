"""Training step throughput: plainlm.train (numpy) vs PyTorch CPU, same model, batch and threads.

One ~10M-parameter Llama-style model (RMSNorm, RoPE, SwiGLU, GQA), T=256. A step is
forward + backward + global-norm clip + AdamW. Prints one JSON line and appends a row to
bench/RESULTS.md.

    python bench/train.py [--threads 2] [--batch 8] [--steps 5]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=os.cpu_count())
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq", type=int, default=256)
ap.add_argument("--steps", type=int, default=3, help="timed steps per round (after 2 warm-up steps)")
ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
ap.add_argument("--dim", type=int, default=384)
ap.add_argument("--layers", type=int, default=6)
ap.add_argument("--vocab", type=int, default=4096)
ap.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
args = ap.parse_args()
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[var] = str(args.threads)

import numpy as np  # noqa: E402  (after the thread variables)
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from plainlm.train.model import ArchConfig, backward, forward, init_params, n_params  # noqa: E402
from plainlm.train.optim import AdamW, clip_grad_norm  # noqa: E402

torch.set_num_threads(args.threads)
F = torch.nn.functional

cfg = ArchConfig(arch="llama", vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=6,
                 n_kv_heads=2, ffn_dim=1024, context_length=args.seq)
P = init_params(cfg, 0)
rng = np.random.default_rng(0)
ids = rng.integers(0, cfg.vocab_size, (args.batch, args.seq))
tgt = np.roll(ids, -1, 1)
tokens = args.batch * args.seq


# ---- plainlm ----------------------------------------------------------------------------------
opt = AdamW(P, lr=1e-4)


def ours_step():
    loss, cache = forward(cfg, P, ids, tgt)
    G = backward(cfg, P, cache)
    del cache
    clip_grad_norm(G, 1.0)
    opt.step(P, G)
    return loss


# ---- PyTorch, the same model written with nn.Module -------------------------------------------
class TorchLlama(torch.nn.Module):
    def __init__(self, cfg, P):
        super().__init__()
        self.cfg = cfg
        self.p = torch.nn.ParameterDict({k.replace(".", "_"): torch.nn.Parameter(torch.tensor(v))
                                         for k, v in P.items()})
        Dh = cfg.head_dim
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh))
        ang = torch.outer(torch.arange(cfg.context_length, dtype=torch.float64), inv)
        emb = torch.cat((ang, ang), -1)
        self.cos, self.sin = emb.cos().float(), emb.sin().float()

    def w(self, name):
        return self.p[name.replace(".", "_")]

    def rope(self, x):                                   # [B, H, T, Dh]
        T, h = x.shape[2], x.shape[-1] // 2
        rot = torch.cat((-x[..., h:], x[..., :h]), -1)
        return x * self.cos[:T] + rot * self.sin[:T]

    def forward(self, ids, tgt):
        c = self.cfg
        B, T = ids.shape
        H, Hkv, Dh = c.n_heads, c.n_kv_heads, c.head_dim
        x = self.w("token_embd")[ids]
        for i in range(c.n_layers):
            p = f"blk.{i}."
            h = F.rms_norm(x, (c.dim,), self.w(p + "attn_norm"), c.norm_eps)
            q = F.linear(h, self.w(p + "attn_q")).view(B, T, H, Dh).transpose(1, 2)
            k = F.linear(h, self.w(p + "attn_k")).view(B, T, Hkv, Dh).transpose(1, 2)
            v = F.linear(h, self.w(p + "attn_v")).view(B, T, Hkv, Dh).transpose(1, 2)
            q, k = self.rope(q), self.rope(k)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + F.linear(o.transpose(1, 2).reshape(B, T, -1), self.w(p + "attn_output"))
            h = F.rms_norm(x, (c.dim,), self.w(p + "ffn_norm"), c.norm_eps)
            x = x + F.linear(F.silu(F.linear(h, self.w(p + "ffn_gate"))) * F.linear(h, self.w(p + "ffn_up")),
                             self.w(p + "ffn_down"))
        x = F.rms_norm(x, (c.dim,), self.w("output_norm"), c.norm_eps)
        logits = x @ self.w("token_embd").T
        return F.cross_entropy(logits.view(B * T, -1), tgt.view(-1))


tm = TorchLlama(cfg, P)
topt = torch.optim.AdamW(tm.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
tids, ttgt = torch.tensor(ids), torch.tensor(tgt)


def torch_step():
    topt.zero_grad(set_to_none=True)
    loss = tm(tids, ttgt)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
    topt.step()
    return loss.item()


def run_steps(fn, n):
    """(tokens per wall second, tokens per CPU second of this process). On a shared, overloaded
    machine the CPU-time figure is the steadier one (it does not count time spent descheduled)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return tokens * n / (time.perf_counter() - t0), tokens * n / (time.process_time() - c0)


# warm-up (numba compilation, allocator), then alternate rounds so that load from other processes
# on a shared machine hits both alike; report the median round of each
l_ours, l_torch = ours_step(), torch_step()
ours_step(), torch_step()
r_ours, r_torch = [], []
for _ in range(args.rounds):
    r_ours.append(run_steps(ours_step, args.steps))
    r_torch.append(run_steps(torch_step, args.steps))
ours, theirs = (float(np.median([r[0] for r in rs])) for rs in (r_ours, r_torch))
ours_cpu, theirs_cpu = (float(np.median([r[1] for r in rs])) for rs in (r_ours, r_torch))

from _results import append_results, cpu_model  # noqa: E402  (bench/ is on sys.path)

cpu = cpu_model()
row = {"bench": "train_step", "params": n_params(cfg), "batch": args.batch, "seq": args.seq,
       "threads": args.threads, "plainlm_tok_s": round(ours, 1), "torch_tok_s": round(theirs, 1),
       "ratio": round(ours / theirs, 3), "loss_plainlm": round(l_ours, 4), "loss_torch": round(l_torch, 4),
       "plainlm_tok_per_cpu_s": round(ours_cpu, 1), "torch_tok_per_cpu_s": round(theirs_cpu, 1),
       "ratio_cpu": round(ours_cpu / theirs_cpu, 3),
       "rounds_plainlm": [round(x[0], 1) for x in r_ours], "rounds_torch": [round(x[0], 1) for x in r_torch],
       "load_avg": round(os.getloadavg()[0], 2), "torch": torch.__version__, "numpy": np.__version__, "cpu": cpu}
print(json.dumps(row))

if not args.no_results:
    append_results(f"train step — {args.threads} threads", "python bench/train.py " + " ".join(sys.argv[1:]), [
        "| model | batch x seq | plainlm tok/s | PyTorch tok/s | ratio | ratio per CPU-second | load avg |",
        "|---|---|---|---|---|---|---|",
        f"| llama {n_params(cfg) / 1e6:.1f}M (D={cfg.dim}, L={cfg.n_layers}, GQA {cfg.n_heads}/{cfg.n_kv_heads}, "
        f"V={cfg.vocab_size}) | {args.batch} x {args.seq} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f} | "
        f"{ours_cpu / theirs_cpu:.2f} | {row['load_avg']} |",
        "",
        f"One step = forward + backward + clip + AdamW, same weights and batch (first-step losses "
        f"{l_ours:.4f} / {l_torch:.4f}); medians of {args.rounds} alternating rounds of {args.steps} steps."])

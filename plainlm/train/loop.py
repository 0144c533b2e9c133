"""The training loop: config, checkpoints (atomic, resumable), validation, early stopping, metrics.

Checkpoint file (`OUT/ckpt.npz`, a numpy .npz zip):
    meta            uint8 bytes of a JSON object: {"format": "plainlm-train", "version": 1, "model":
                    ArchConfig, "train": TrainConfig, "tokenizer": {...}, "step", "opt_t",
                    "rng": the batch sampler's bit-generator state, "best_val", "bad_evals", ...}
    param/<name>    float32 parameters (GGUF names)
    adam_m/<name>, adam_v/<name>   AdamW moments
It is written to OUT/ckpt.npz.tmp, fsync'ed, then os.replace'd over the old one: a crash (kill -9,
full disk) leaves either the old or the new checkpoint, never a torn one. Resuming restores
parameters, moments, step and the sampler's RNG, so the loss curve continues exactly.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import data as D
from .model import ArchConfig, ArchError, backward, forward, init_params, n_params
from .optim import AdamW, clip_grad_norm, lr_at

CKPT_FORMAT, CKPT_VERSION = "plainlm-train", 1


class TrainError(RuntimeError):
    """A problem the user can fix (bad config, empty corpus, unwritable checkpoint)."""


@dataclass
class TrainConfig:
    data: list = field(default_factory=list)     # files / directories, or a corpus name ("kjv")
    out_dir: str = "out"
    tokenizer: str = "bpe"                       # bpe | char | word
    vocab_size: int = 1024                       # bpe / word vocabulary (char: what the corpus has)
    val_fraction: float = 0.1
    model: dict = field(default_factory=dict)    # ArchConfig fields except vocab_size
    batch_size: int = 8
    seq_len: int = 0                             # 0 = model context_length
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1337
    eval_every: int = 100
    eval_windows: int = 32
    patience: int = 0                            # early stop after N evals without improvement (0 = off)
    log_every: int = 10
    ckpt_every: int = 100
    sample_every: int = 0                        # print a sample at each N-th eval step (0 = off)
    max_minutes: float = 0.0                     # stop (with a checkpoint) after this wall time (0 = off)
    plot: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise TrainError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        if isinstance(d.get("data"), (str, os.PathLike)):
            d["data"] = [str(d["data"])]
        return cls(**d)

    def validate(self) -> None:
        def pos_int(name, zero_ok=False):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (v == 0 and not zero_ok):
                raise TrainError(f"{name} must be a {'non-negative' if zero_ok else 'positive'} integer, got {v!r}")
        for n in ("batch_size", "grad_accum", "steps", "eval_windows", "log_every", "ckpt_every"):
            pos_int(n)
        for n in ("seq_len", "warmup", "patience", "eval_every", "sample_every", "vocab_size"):
            pos_int(n, zero_ok=True)
        if not self.data:
            raise TrainError("no training data: give files or directories (data / --data), or \"kjv\"")
        if not (self.max_minutes >= 0):
            raise TrainError(f"max_minutes must be non-negative, got {self.max_minutes}")
        if not (0 <= self.val_fraction < 1):
            raise TrainError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not (self.lr > 0) or self.min_lr < 0:
            raise TrainError(f"lr must be positive and min_lr non-negative (lr={self.lr}, min_lr={self.min_lr})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise TrainError("beta1 and beta2 must be in [0, 1)")
        if self.tokenizer not in D.TOKENIZERS:
            raise TrainError(f"tokenizer must be one of {', '.join(D.TOKENIZERS)}, not {self.tokenizer!r}")
        if "vocab_size" in self.model:
            raise TrainError("set vocab_size at the top level (it is the tokenizer's), not under model")
        try:
            ArchConfig(vocab_size=max(self.vocab_size, 1), **self.model)   # architecture sanity, early
        except (ArchError, TypeError) as e:
            raise TrainError(f"model: {e}") from None
        ctx = ArchConfig(vocab_size=max(self.vocab_size, 1), **self.model).context_length
        if self.seq_len > ctx:
            raise TrainError(f"seq_len {self.seq_len} is longer than the model's context_length {ctx}")


def load_config_file(path) -> dict:
    p = Path(path)
    if not p.exists():
        raise TrainError(f"{p}: no such config file")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".toml":
            import tomllib
            return tomllib.loads(text)
        return json.loads(text)
    except Exception as e:                      # json.JSONDecodeError, tomllib.TOMLDecodeError
        raise TrainError(f"{p}: cannot parse config: {e}") from None


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------

def save_checkpoint(path, params: dict, opt: AdamW | None, meta: dict) -> None:
    """Atomic: tmp file + fsync + os.replace. On OSError (ENOSPC, EACCES...) the old file survives."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    for k, v in params.items():
        arrays["param/" + k] = v
    if opt is not None:
        for k in params:
            arrays["adam_m/" + k] = opt.m[k]
            arrays["adam_v/" + k] = opt.v[k]
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        old = " (the previous checkpoint is intact)" if path.exists() else ""
        raise TrainError(f"could not write checkpoint {path}: {e.strerror or e}{old}") from None


def load_checkpoint(path):
    """-> (meta, params, adam {"m": {}, "v": {}} or None)."""
    path = Path(path)
    if not path.exists():
        raise TrainError(f"{path}: no such checkpoint")
    try:
        z = np.load(path, allow_pickle=False)
        meta = json.loads(bytes(z["meta"]).decode())
    except Exception as e:
        raise TrainError(f"{path}: not a plainlm training checkpoint ({e})") from None
    if meta.get("format") != CKPT_FORMAT:
        raise TrainError(f"{path}: not a plainlm training checkpoint")
    if meta.get("version") != CKPT_VERSION:
        raise TrainError(f"{path}: checkpoint version {meta.get('version')}, this plainlm reads {CKPT_VERSION}")
    params, m, v = {}, {}, {}
    for k in z.files:
        if k.startswith("param/"):
            params[k[6:]] = z[k]
        elif k.startswith("adam_m/"):
            m[k[7:]] = z[k]
        elif k.startswith("adam_v/"):
            v[k[7:]] = z[k]
    return meta, params, ({"m": m, "v": v} if m else None)


def model_from_checkpoint(path):
    """(ArchConfig, params, tokenizer, meta) of a checkpoint file or a training output directory."""
    p = Path(path)
    if p.is_dir():
        p = p / "ckpt.npz"
    meta, params, _ = load_checkpoint(p)
    return ArchConfig.from_dict(meta["model"]), params, D.tokenizer_from_dict(meta["tokenizer"]), meta


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------

class Metrics:
    """metrics.jsonl (one JSON object per event) and metrics.csv (step, loss, val_loss, lr, tok_s)."""

    def __init__(self, out: Path, resume_step: int | None):
        self.jsonl, self.csv = out / "metrics.jsonl", out / "metrics.csv"
        self.rows = []
        if resume_step is not None and self.jsonl.exists():
            # keep what the checkpoint had seen; steps after it are redone
            for line in self.jsonl.read_text().splitlines():
                try:
                    r = json.loads(line)
                except ValueError:
                    continue                     # a line torn by kill -9
                if r.get("step", 0) <= resume_step:
                    self.rows.append(r)
        self._rewrite()

    def _rewrite(self):
        with open(self.jsonl, "w") as f:
            for r in self.rows:
                f.write(json.dumps(r) + "\n")
        with open(self.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "loss", "val_loss", "lr", "tok_s"])
            for r in self.rows:
                w.writerow([r.get("step"), r.get("loss", ""), r.get("val_loss", ""), r.get("lr", ""),
                            r.get("tok_s", "")])

    def add(self, row: dict):
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerow([row.get("step"), row.get("loss", ""), row.get("val_loss", ""),
                                    row.get("lr", ""), row.get("tok_s", "")])

    def plot(self, path: Path):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        tr = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        va = [(r["step"], r["val_loss"]) for r in self.rows if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if tr:
            ax.plot(*zip(*tr), label="train", lw=1)
        if va:
            ax.plot(*zip(*va), "o-", label="val", ms=3)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------

def evaluate(cfg: ArchConfig, params: dict, windows, batch: int) -> float:
    """Mean loss over fixed validation windows (token-weighted)."""
    x, y = windows
    tot, n = 0.0, 0
    for i in range(0, len(x), batch):
        loss, _ = forward(cfg, params, x[i:i + batch], y[i:i + batch])
        tot += loss * y[i:i + batch].size
        n += y[i:i + batch].size
    return tot / max(n, 1)


def sample_text(cfg, params, tok, prompt: str = "", n: int = 100, temperature: float = 0.8,
                top_k: int = 0, seed: int = 0) -> str:
    """Autoregressive sampling by re-running the (training) forward on the last context window."""
    rng = np.random.default_rng(seed)
    ids = tok.encode(prompt) if prompt else [tok.eot]
    if not ids:
        ids = [tok.eot]
    start = len(ids)
    for _ in range(n):
        ctx = np.asarray(ids[-cfg.context_length:], np.int64)[None]
        logits, _ = forward(cfg, params, ctx)
        z = logits[0, -1].astype(np.float64)
        if temperature <= 0:
            nxt = int(np.argmax(z))
        else:
            z = z / temperature
            if top_k and top_k < len(z):
                z[z < np.sort(z)[-top_k]] = -np.inf
            p = np.exp(z - z.max())
            nxt = int(rng.choice(len(p), p=p / p.sum()))
        ids.append(nxt)
    return tok.decode(ids[start:]) if prompt else tok.decode(ids[1:])


def setup(tc: TrainConfig):
    """Validate, tokenize the corpus: (tokenizer, train tokens, val tokens, ArchConfig)."""
    from .corpus import CorpusError, resolve
    tc.validate()
    try:
        paths = [resolve(p) for p in tc.data]
    except CorpusError as e:
        raise TrainError(str(e)) from None
    out = Path(tc.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"cannot create output directory {out}: {e.strerror}") from None
    probe = ArchConfig(vocab_size=max(tc.vocab_size, 1), **tc.model)
    T = tc.seq_len or probe.context_length
    try:
        tok, ntr, nva = D.prepare_data(paths, out / "data", tc.tokenizer, tc.vocab_size, tc.val_fraction,
                                       min_tokens=2 * (T + 1))
    except D.DataError as e:
        raise TrainError(str(e)) from None
    train, _ = D.read_tokens(out / "data" / "train.bin")
    val, _ = D.read_tokens(out / "data" / "val.bin")
    if len(train) < T + 1:
        raise TrainError(f"the training split has {len(train)} tokens, fewer than seq_len + 1 = {T + 1}: "
                         f"use more text or a shorter seq_len")
    cfg = ArchConfig(vocab_size=tok.vocab_size, **tc.model)
    return tok, train, val, cfg


def train(tc: TrainConfig, fresh: bool = False, progress: bool | None = None, log=None) -> dict:
    """Run (or resume) training; returns a summary dict. Resumes from OUT/ckpt.npz unless fresh."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    tok, train_tok, val_tok, cfg = setup(tc)
    out = Path(tc.out_dir)
    ckpt = out / "ckpt.npz"
    T, B = tc.seq_len or cfg.context_length, tc.batch_size

    params = init_params(cfg, tc.seed)
    opt = AdamW(params, lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay)
    rng = np.random.Generator(np.random.PCG64(tc.seed + 1))
    step, best_val, bad_evals = 0, math.inf, 0
    resumed = None
    if ckpt.exists() and not fresh:
        meta, P, adam = load_checkpoint(ckpt)
        if meta["model"] != cfg.to_dict():
            raise TrainError(f"{ckpt} was trained with a different model ({meta['model']}); "
                             f"use --fresh to start over or another --out")
        for k in params:
            params[k][...] = P[k]
        if adam is not None:
            opt.load_state_dict({"t": meta["opt_t"], **adam})
        rng.bit_generator.state = meta["rng"]
        step, best_val, bad_evals = meta["step"], meta.get("best_val") or math.inf, meta.get("bad_evals", 0)
        resumed = step
        log(f"resuming from {ckpt} at step {step}")
    metrics = Metrics(out, resumed)                 # a fresh run starts the metric files anew
    windows = D.eval_windows(val_tok, T, tc.eval_windows) if len(val_tok) else None
    log(f"model {cfg.arch}: {n_params(cfg) / 1e6:.2f}M parameters, vocab {cfg.vocab_size}; "
        f"train {len(train_tok)} tokens, val {len(val_tok)} tokens; batch {B}x{T}x{tc.grad_accum}")

    def meta_now():
        return {"format": CKPT_FORMAT, "version": CKPT_VERSION, "model": cfg.to_dict(), "train": asdict(tc),
                "tokenizer": tok.to_dict(), "step": step, "opt_t": opt.t, "rng": rng.bit_generator.state,
                "best_val": None if math.isinf(best_val) else best_val, "bad_evals": bad_evals,
                "time": time.time()}

    bar = None
    if progress is None:
        progress = sys.stderr.isatty()
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=tc.steps, initial=step, unit="step", dynamic_ncols=True)
    stopped = "steps"
    last_val = None
    busy, tok_count = 0.0, 0                        # tok/s counts training steps only (not evals)
    t_start = time.time()
    while step < tc.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, tc.lr, tc.warmup, tc.steps, tc.min_lr)
        grads, loss = None, 0.0
        for _ in range(tc.grad_accum):
            x, y = D.get_batch(train_tok, B, T, rng)
            l, cache = forward(cfg, params, x, y)
            grads = backward(cfg, params, cache, grads, dloss=1.0 / tc.grad_accum)
            del cache
            loss += l / tc.grad_accum
        if not math.isfinite(loss):
            raise TrainError(f"loss became {loss} at step {step}: lower the learning rate ({tc.lr})")
        gnorm = clip_grad_norm(grads, tc.grad_clip)
        opt.step(params, grads, lr)
        step += 1
        tok_count += B * T * tc.grad_accum
        busy += time.perf_counter() - t0
        if step % tc.log_every == 0 or step == tc.steps:
            tok_s = tok_count / max(busy, 1e-9)
            busy, tok_count = 0.0, 0
            metrics.add({"step": step, "loss": round(loss, 5), "lr": lr, "grad_norm": round(gnorm, 4),
                         "tok_s": round(tok_s, 1)})
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:.0f}")
            else:
                log(f"step {step}/{tc.steps} loss {loss:.4f} lr {lr:.2e} {tok_s:.0f} tok/s")
        if bar is not None:
            bar.update(1)
        out_of_time = bool(tc.max_minutes) and time.time() - t_start > 60 * tc.max_minutes
        evaluate_now = tc.eval_every and windows is not None and (step % tc.eval_every == 0 or step == tc.steps
                                                                  or out_of_time)
        if evaluate_now:
            last_val = evaluate(cfg, params, windows, B)
            metrics.add({"step": step, "val_loss": round(last_val, 5)})
            msg = f"step {step}: val loss {last_val:.4f}"
            if last_val < best_val - 1e-4:
                best_val, bad_evals = last_val, 0
                save_checkpoint(out / "best.npz", params, None, meta_now())
            else:
                bad_evals += 1
            if tc.sample_every and step % (tc.sample_every * tc.eval_every) == 0:
                msg += " | " + repr(sample_text(cfg, params, tok, "", 60, 0.8, seed=step)[:200])
            (bar.write if bar is not None else log)(msg)
            if tc.plot:
                metrics.plot(out / "loss.png")
            if tc.patience and bad_evals >= tc.patience:
                stopped = "early_stop"
                (bar.write if bar is not None else log)(
                    f"early stop: no val improvement in {tc.patience} evaluations (best {best_val:.4f})")
        if out_of_time and stopped == "steps":
            stopped = "time"
            (bar.write if bar is not None else log)(f"time limit of {tc.max_minutes} minutes reached at step {step}")
        if step % tc.ckpt_every == 0 or step == tc.steps or stopped != "steps":
            save_checkpoint(ckpt, params, opt, meta_now())
        if stopped != "steps":
            break
    if bar is not None:
        bar.close()
    if tc.plot and metrics.rows:
        metrics.plot(out / "loss.png")
    return {"step": step, "stopped": stopped, "val_loss": last_val,
            "best_val": None if math.isinf(best_val) else best_val, "checkpoint": str(ckpt)}

"""Continuous batching: one thread owns the model and its KV cache; requests come and go between steps.

Every engine step is ONE `forward` call over the quantized weights that holds

    * one token for every running request that is decoding (its last sampled token), and
    * the next chunk (at most `prefill_chunk` tokens) of prompts that are still being prefilled,

each in its own cache slot. `logits="per_slot"` gives one row per slot, in the order the slots appear,
so row i belongs to the i-th request in the batch. A long prompt thus costs running decodes only a
chunk's worth of time per step instead of stalling them for the whole prompt.

A request joins at the next step (it takes a free slot), and leaves the moment it finishes — EOS, a
stop string, max_tokens, the end of the context — or is cancelled (client disconnected): its slot
is reset and handed to the next waiting request at once.

Memory is bounded: the KV cache is preallocated for `n_slots` sequences of `n_ctx` positions, and at
most `max_queue` requests wait for a slot; past that `submit` raises `Busy` (HTTP 503 + Retry-After).

Events go back to the caller through `Request.on_event(kind, payload)`, called on the engine thread:
    ("logprob", dict)        (only when `Request.logprobs` is set) one per generated token, sent before
                             that token's text: {"id", "logprob", "top": [(id, logprob), ...]}; with
                             `prompt_logprobs` also one per prompt token first (at the end of the
                             prefill; logprob and top are None for a token nothing precedes)
    ("text", str)            decoded text, stop strings already cut out
    ("done", dict)           finish_reason, prompt_tokens, completion_tokens, ttft_s, ...
    ("error", str)           the request failed (a bug or an unexpected model error)
"""
from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..generate import StopMatcher
from ..model import forward
from ..sampling import GREEDY, SamplingParams, log_softmax, make_rng, sample
from ..tokenizer import StreamDecoder
from .metrics import Metrics

PREFILL, DECODE = "prefill", "decode"
_ids = itertools.count(1)


class Busy(Exception):
    """Every slot is taken and the queue is full: try again after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"server busy: all slots and the queue are full; retry after {retry_after}s")
        self.retry_after = retry_after


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = GREEDY
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    on_event: object = None                 # on_event(kind, payload), called on the engine thread
    logit_bias: dict = field(default_factory=dict)   # token id -> added to the logits before sampling
    logprobs: int | None = None             # None: off; k >= 0: report each token's logprob + top k
    prompt_logprobs: bool = False           # the prompt's tokens too (echo); max_tokens may then be 0
    skip_first_prompt_logprob: bool = False # the prompt starts with a BOS the server added: not reported
    # ---- engine state --------------------------------------------------------------------------
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False                 # set from any thread; the engine frees the slot next step
    state: str = PREFILL
    slot: int = -1
    n_prefilled: int = 0                    # prompt tokens whose keys/values are in the cache
    out_ids: list[int] = field(default_factory=list)
    t_submit: float = 0.0
    t_first: float = 0.0

    def cancel(self) -> None:
        self.cancelled = True


def token_logprobs(row, tok: int, k: int) -> dict:
    """The model's own distribution at this step: log_softmax of the raw logits (before logit_bias,
    penalties and temperature, as OpenAI reports them). The chosen token's logprob and the top k."""
    lp = log_softmax(np.asarray(row))
    top = []
    if k > 0:
        k = min(k, len(lp))
        idx = np.argpartition(-lp, k - 1)[:k]
        idx = idx[np.lexsort((idx, -lp[idx]))]              # most likely first; ties by id
        top = [(int(i), float(lp[i])) for i in idx]
    return {"id": int(tok), "logprob": float(lp[tok]), "top": top}


class Engine:
    """Owns `model` and a KV cache of `n_slots` x `n_ctx`; runs requests in a background thread.

    `forward_fn(ids, pos, slot) -> logits [B, V]` can replace the model (tests of the HTTP layer).
    """

    def __init__(self, model, tokenizer, n_slots: int = 8, max_queue: int = 64, n_ctx: int = 4096,
                 prefill_chunk: int = 128, forward_fn=None, metrics: Metrics | None = None,
                 threads: int | None = None):
        if n_slots < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("need n_slots >= 1, max_queue >= 0 and prefill_chunk >= 1")
        self.model, self.tokenizer, self.threads = model, tokenizer, threads
        if model is not None:
            n_ctx = min(n_ctx, model.config.context_length)
        self.n_slots, self.max_queue, self.n_ctx, self.prefill_chunk = n_slots, max_queue, n_ctx, prefill_chunk
        self.cache = model.new_cache(n_ctx, n_slots) if forward_fn is None else None
        self._forward = forward_fn or self._model_forward
        self._forward_all = None if forward_fn is not None else self._model_forward_all   # [T, V]
        self.eos = set(getattr(tokenizer, "eot_ids", ()) or ())
        self.metrics = metrics or Metrics()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._free = list(range(n_slots - 1, -1, -1))     # pop() hands out slot 0 first
        self._cv = threading.Condition()
        self._closing = False
        self.max_decode_batch = 0                          # largest decode batch seen (tests, bench)
        self._step_s = 0.05                                # moving average of a step's time (Retry-After)
        self._thread = threading.Thread(target=self._loop, name="plainlm-engine", daemon=True)

    # ------------------------------------------------------------------------------ public side

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, r: Request) -> Request:
        """Queue `r`; raises Busy when slots and queue are full, ValueError for a prompt that can't fit."""
        if not r.prompt_ids:
            raise ValueError("empty prompt")
        if r.prompt_logprobs and (self._forward_all is None or r.logprobs is None):
            raise ValueError("prompt logprobs need logprobs set and a real model")
        if r.max_tokens < (0 if r.prompt_logprobs else 1):
            raise ValueError("max_tokens must be >= 1 (0 only when scoring the prompt)")
        if len(r.prompt_ids) >= self.n_ctx:
            raise ValueError(f"prompt of {len(r.prompt_ids)} tokens does not fit the context of {self.n_ctx}")
        with self._cv:
            if self._closing:
                raise Busy(5)
            if any(w.cancelled for w in self._waiting):       # clients that left while queued
                for w in [w for w in self._waiting if w.cancelled]:
                    self._waiting.remove(w)
                    self._finished(w, "cancelled", release=False)
            if len(self._waiting) + len(self._running) >= self.n_slots + self.max_queue:
                self.metrics.inc("plainlm_requests_rejected_total")
                raise Busy(self.retry_after())
            r.t_submit = time.perf_counter()
            self._waiting.append(r)
            self.metrics.set("plainlm_queue_depth", len(self._waiting))
            self._cv.notify()
        return r

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the shortest remaining run times the step time."""
        left = [r.max_tokens - len(r.out_ids) for r in list(self._running)] or [1]
        return int(min(60, max(1, math.ceil(min(left) * self._step_s))))

    def snapshot(self) -> dict:
        return {"slots": self.n_slots, "slots_busy": len(self._running), "queue": len(self._waiting),
                "queue_max": self.max_queue, "n_ctx": self.n_ctx}

    # ------------------------------------------------------------------------------ engine thread

    def _model_forward(self, ids, pos, slot):
        return forward(self.model, ids, pos, self.cache, slot, logits="per_slot")

    def _model_forward_all(self, ids, pos, slot):
        return forward(self.model, ids, pos, self.cache, slot, logits="all")

    def _loop(self) -> None:
        if self.model is not None:
            from .. import kernels
            kernels.set_threads(self.threads)   # numba's thread count is per calling thread: set it here
        while True:
            with self._cv:
                while not self._closing and not self._waiting and not self._running:
                    self._cv.wait()
                if self._closing:
                    for r in list(self._waiting) + self._running:
                        self._emit(r, "error", "server shutting down")
                    return
                self._admit()
            if self._running:
                self._step()

    def _admit(self) -> None:
        """Move waiting requests into free slots (lock held)."""
        while self._waiting and self._free:
            r = self._waiting.popleft()
            if r.cancelled:
                self._finished(r, "cancelled", release=False)
                continue
            try:
                r._rng = make_rng(r.sampling.seed)
                r._dec = StreamDecoder(self.tokenizer)
                r._stop = StopMatcher(r.stop)
            except Exception as e:                             # noqa: BLE001 - never kill the engine
                self._emit(r, "error", f"{type(e).__name__}: {e}")
                self._finished(r, "error", release=False, notify=False)
                continue
            r._penalised = (r.sampling.repeat_penalty != 1 or r.sampling.presence_penalty != 0
                            or r.sampling.frequency_penalty != 0)
            r.slot = self._free.pop()
            r.state, r.n_prefilled = PREFILL, 0
            self._running.append(r)
        self.metrics.set("plainlm_queue_depth", len(self._waiting))
        self.metrics.set("plainlm_slots_busy", len(self._running))

    def _step(self) -> None:
        for r in [r for r in self._running if r.cancelled]:
            self._finished(r, "cancelled")
        if not self._running:
            return
        # ---- build one batch: decodes first (one token each), then prompt chunks ----------------
        batch, ids, pos, slot, spans = [], [], [], [], {}
        for r in self._running:
            if r.state == DECODE:
                p = len(r.prompt_ids) + len(r.out_ids) - 1      # position of the last sampled token
                batch.append(r)
                ids.append(r.out_ids[-1]), pos.append(p), slot.append(r.slot)
        budget = self.prefill_chunk
        for r in self._running:
            if r.state == PREFILL and budget > 0:
                n = min(budget, len(r.prompt_ids) - r.n_prefilled)
                a = r.n_prefilled
                batch.append(r)
                spans[r.id] = (len(ids), a, n)                 # rows of this chunk, first position, count
                ids += r.prompt_ids[a:a + n]
                pos += range(a, a + n)
                slot += [r.slot] * n
                r.n_prefilled += n
                budget -= n
        t0 = time.perf_counter()
        all_rows, rows = any(r.state == PREFILL and r.prompt_logprobs for r in batch), None
        try:
            ids_, pos_, slot_ = np.asarray(ids, np.int64), np.asarray(pos, np.int64), np.asarray(slot, np.int64)
            if all_rows:                  # someone scores its prompt: every row, then the last per slot
                rows = self._forward_all(ids_, pos_, slot_)                         # [T, V]
                _, first = np.unique(slot_[::-1], return_index=True)
                logits = rows[sorted(len(slot_) - 1 - first)]
            else:
                logits = self._forward(ids_, pos_, slot_)                           # [len(batch), V]
        except Exception as e:                                                      # noqa: BLE001
            for r in batch:
                self._emit(r, "error", f"model error: {type(e).__name__}: {e}")
                self._finished(r, "error", notify=False)
            return
        dt = time.perf_counter() - t0
        self._step_s = 0.8 * self._step_s + 0.2 * dt
        self.metrics.observe("plainlm_step_seconds", dt)
        self.metrics.inc("plainlm_batch_tokens_total", len(ids))
        n_dec = sum(r.state == DECODE for r in batch)
        self.metrics.observe("plainlm_decode_batch_size", n_dec)
        self.max_decode_batch = max(self.max_decode_batch, n_dec)
        # ---- one sampled token per request whose logits are for a real next token ----------------
        for r, row in zip(batch, logits):
            try:
                if r.state == PREFILL:
                    if r.prompt_logprobs:
                        self._prompt_logprobs(r, rows, *spans[r.id])
                    if r.n_prefilled < len(r.prompt_ids):
                        continue                               # mid-prompt: nothing to sample yet
                    r.state = DECODE
                    r.t_first = time.perf_counter()
                    self.metrics.observe("plainlm_time_to_first_token_seconds", r.t_first - r.t_submit)
                    if r.max_tokens == 0:                      # only scoring the prompt
                        self._finished(r, "length")
                        continue
                self._accept(r, row)
            except Exception as e:                             # noqa: BLE001 - never kill the engine
                self._emit(r, "error", f"{type(e).__name__}: {e}")
                self._finished(r, "error", notify=False)

    def _prompt_logprobs(self, r: Request, rows, start: int, a: int, n: int) -> None:
        """Logprobs of the prompt tokens this chunk's rows predict (row of position p -> token p + 1)."""
        if a == 0 and not r.skip_first_prompt_logprob:
            self._emit(r, "logprob", {"id": int(r.prompt_ids[0]), "logprob": None, "top": None})
        for j in range(n):
            p = a + j
            if p + 1 < len(r.prompt_ids):
                self._emit(r, "logprob", token_logprobs(rows[start + j], r.prompt_ids[p + 1], r.logprobs))

    def _accept(self, r: Request, row) -> None:
        history = (r.prompt_ids + r.out_ids) if r._penalised else ()
        biased = row
        if r.logit_bias:
            biased = np.array(row, np.float32, copy=True)
            for i, b in r.logit_bias.items():
                if 0 <= i < len(biased):
                    biased[i] += b
        tok = sample(biased, r.sampling, r._rng, history)
        if tok in self.eos and not r.ignore_eos:
            return self._finished(r, "stop")
        if r.logprobs is not None:
            self._emit(r, "logprob", token_logprobs(row, tok, r.logprobs))
        r.out_ids.append(tok)
        self.metrics.inc("plainlm_generation_tokens_total")
        text = r._stop.push(r._dec.push(tok))
        if r._stop.hit:
            if text:
                self._emit(r, "text", text)
            return self._finished(r, "stop", flush=False)
        if text:
            self._emit(r, "text", text)
        if len(r.out_ids) >= r.max_tokens:
            return self._finished(r, "length")
        if len(r.prompt_ids) + len(r.out_ids) - 1 >= self.n_ctx:      # no room to feed it back
            return self._finished(r, "length")

    def _finished(self, r: Request, reason: str, release: bool = True, flush: bool = True,
                  notify: bool = True) -> None:
        if release and r in self._running:
            self._running.remove(r)
            if self.cache is not None:
                self.cache.reset(r.slot)
            self._free.append(r.slot)
            self.metrics.set("plainlm_slots_busy", len(self._running))
        if reason in ("stop", "length") and flush:
            tail = r._stop.push(r._dec.flush())
            if r._stop.hit:
                reason = "stop"
            else:
                tail += r._stop.flush()
            if tail:
                self._emit(r, "text", tail)
        now = time.perf_counter()
        self.metrics.inc("plainlm_requests_total", labels={"finish_reason": reason})
        self.metrics.inc("plainlm_prompt_tokens_total", len(r.prompt_ids) if r.n_prefilled else 0)
        if reason in ("stop", "length"):
            self.metrics.observe("plainlm_request_seconds", now - r.t_submit)
        if notify and reason != "error":
            self._emit(r, "done", {
                "finish_reason": reason, "prompt_tokens": len(r.prompt_ids),
                "completion_tokens": len(r.out_ids),
                "ttft_s": (r.t_first - r.t_submit) if r.t_first else None,
                "total_s": now - r.t_submit})

    @staticmethod
    def _emit(r: Request, kind: str, payload) -> None:
        if r.on_event is None:
            return
        try:
            r.on_event(kind, payload)
        except Exception:                                  # noqa: BLE001 - a closed event loop
            r.cancelled = True

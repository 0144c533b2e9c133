"""Generation: a generator of token ids over a preallocated KV cache with an explicit position.

    generate_ids(model, prompt_ids, cfg)  -> yields ids one at a time (prefill, then decode)
    generate_text(model, tok, prompt, cfg) -> yields text pieces, then a GenerationResult
    beam_search(model, prompt_ids, ...)    -> the best continuation by length-normalised log-prob
    ChatSession                            -> multi-turn chat that reuses its KV cache across turns
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .cache import ContextFull
from .model import Model, forward, prefill
from .sampling import GREEDY, SamplingParams, log_softmax, make_rng, sample

DEFAULT_CTX = 8192


@dataclass
class GenerationConfig:
    max_tokens: int = 128
    sampling: SamplingParams = GREEDY
    stop: list[str] = field(default_factory=list)     # stop strings (not included in the output)
    ignore_eos: bool = False
    beams: int = 1
    n_ctx: int | None = None                          # context to allocate (default: model's, capped)
    window: int | None = None                         # StreamingLLM window (None = full cache)

    def __post_init__(self):
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.beams < 1:
            raise ValueError(f"beams must be >= 1, got {self.beams}")


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    ids: list[int]
    text: str
    finish_reason: str          # "stop" (EOS or stop string) | "length"
    prefill_tok_s: float
    decode_tok_s: float
    prefill_s: float = 0.0
    decode_s: float = 0.0


@dataclass
class Stats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    finish_reason: str = "length"
    n_fed: int = 0              # generated tokens whose keys/values are in the cache

    @property
    def prefill_tok_s(self):
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self):
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


def context_size(m: Model, gc: GenerationConfig, n_prompt: int) -> int:
    n = gc.n_ctx or min(m.config.context_length, DEFAULT_CTX)
    return min(n, m.config.context_length)


def new_cache(m: Model, gc: GenerationConfig, n_prompt: int, n_slots: int = 1):
    n = context_size(m, gc, n_prompt)
    if gc.window:
        from .cache import WindowedKVCache          # StreamingLLM: sinks + recent window
        return WindowedKVCache(m.config, gc.window, n_slots)
    return m.new_cache(n, n_slots)


def check_prompt(m: Model, n_prompt: int, n_ctx: int) -> None:
    if n_prompt == 0:
        raise ValueError("empty prompt: nothing to condition on")
    if n_prompt >= n_ctx:
        raise ContextFull(f"prompt of {n_prompt} tokens does not fit the context of {n_ctx} tokens "
                          f"(leave room for at least one generated token)")


def generate_ids(m: Model, prompt_ids, gc: GenerationConfig, eos_ids=(), cache=None, start: int = 0,
                 stats: Stats | None = None):
    """Yield generated ids. `cache`/`start` let a caller continue a sequence already in the cache."""
    stats = stats if stats is not None else Stats()
    prompt_ids = list(prompt_ids)
    if cache is None:
        cache = new_cache(m, gc, len(prompt_ids))
    windowed = bool(gc.window)
    if not windowed:
        check_prompt(m, start + len(prompt_ids), cache.n_ctx) if prompt_ids else None
    rng = make_rng(gc.sampling.seed)
    history = list(prompt_ids)
    t0 = time.perf_counter()
    if windowed:
        logits = cache.prefill(m, prompt_ids, start=start)
    else:
        logits = prefill(m, prompt_ids, cache, start=start)
    stats.prefill_tokens += len(prompt_ids)
    stats.prefill_s += time.perf_counter() - t0
    pos = start + len(prompt_ids)
    eos = set(eos_ids)
    stats.finish_reason = "length"
    t0 = time.perf_counter()
    for i in range(gc.max_tokens):
        if gc.ignore_eos and eos:                   # as llama.cpp: EOS can never be drawn
            logits = logits.copy()
            logits[list(eos)] = -np.inf
        nxt = sample(logits, gc.sampling, rng, history)
        if nxt in eos:
            stats.finish_reason = "stop"
            break
        stats.decode_s += time.perf_counter() - t0
        yield nxt
        t0 = time.perf_counter()
        history.append(nxt)
        if i == gc.max_tokens - 1:
            break                                   # the last token need not be fed
        if not windowed and pos >= cache.n_ctx:
            break                                   # context exhausted: finish_reason "length"
        if windowed:
            logits = cache.step(m, nxt, pos)
        else:
            logits = forward(m, [nxt], [pos], cache)
        stats.n_fed += 1
        stats.decode_tokens += 1
        pos += 1
    stats.decode_s += time.perf_counter() - t0


class StopMatcher:
    """Holds back text that might be the start of a stop string; reports when one completes."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def push(self, piece: str) -> str:
        """Add text; return what is safe to emit now."""
        self.pending += piece
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                self.hit = True
                out, self.pending = self.pending[:i], ""
                return out
        hold = 0
        for s in self.stops:                       # longest suffix that is a prefix of a stop string
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stream_text(tok, ids_iter, stops, stats: Stats, sink: list):
    """Turn a stream of ids into text pieces, honouring stop strings. Appends ids to `sink`."""
    from .tokenizer import StreamDecoder
    dec = StreamDecoder(tok)
    stop = StopMatcher(stops)
    for i in ids_iter:
        sink.append(i)
        out = stop.push(dec.push(i))
        if out:
            yield out
        if stop.hit:
            stats.finish_reason = "stop"
            return
    out = stop.push(dec.flush())
    if not stop.hit:
        out += stop.flush()
    else:
        stats.finish_reason = "stop"
    if out:
        yield out


def generate_text(m: Model, tok, prompt: str, gc: GenerationConfig):
    """Yield text pieces as they are decoded, then one GenerationResult."""
    prompt_ids = tok.encode(prompt, add_special=True)
    stats = Stats()
    if gc.beams > 1:                                 # beam search is deterministic (no sampling)
        t0 = time.perf_counter()
        ids = beam_search(m, prompt_ids, gc.beams, gc.max_tokens, tok.eot_ids, ignore_eos=gc.ignore_eos,
                          n_ctx=context_size(m, gc, len(prompt_ids)))
        stats.decode_s, stats.decode_tokens = time.perf_counter() - t0, len(ids)
        stats.finish_reason = "stop" if len(ids) < gc.max_tokens else "length"
        gen = iter(ids)
    else:
        gen = generate_ids(m, prompt_ids, gc, tok.eot_ids, stats=stats)
    out_ids: list[int] = []
    text = []
    for piece in stream_text(tok, gen, gc.stop, stats, out_ids):
        text.append(piece)
        yield piece
    yield GenerationResult(prompt_ids, out_ids, "".join(text), stats.finish_reason,
                           stats.prefill_tok_s, stats.decode_tok_s, stats.prefill_s, stats.decode_s)


# ------------------------------------------------------------------------------------------------
# beam search
# ------------------------------------------------------------------------------------------------

def beam_search(m: Model, prompt_ids, n_beams: int, max_tokens: int, eos_ids=(), length_penalty: float = 1.0,
                n_ctx: int | None = None, ignore_eos: bool = False) -> list[int]:
    """Keep the n_beams best partial continuations by total log-probability; a finished hypothesis
    (EOS, or max_tokens reached) scores sum_logprob / len**length_penalty, len = generated tokens
    (as transformers' BeamHypotheses do). Returns the best continuation's ids (without EOS).

    Each beam lives in its own cache slot; after every step the slots are re-ordered to follow
    their parents (a copy of the cache rows in use).
    """
    prompt_ids = list(prompt_ids)
    n0 = len(prompt_ids)
    n_ctx = min(n_ctx or m.config.context_length, m.config.context_length)
    check_prompt(m, n0, n_ctx)
    max_tokens = min(max_tokens, n_ctx - n0)
    cache = m.new_cache(n_ctx, n_beams)
    logits = prefill(m, prompt_ids, cache, slot=0)
    for s in range(1, n_beams):                       # every beam starts from the same prompt
        cache.k[:, s, :, :n0] = cache.k[:, 0, :, :n0]
        cache.v[:, s, :, :n0] = cache.v[:, 0, :, :n0]
    eos = set(eos_ids)
    ban = sorted(eos) if ignore_eos else []         # never draw EOS; run to max_tokens
    eos = set() if ignore_eos else eos
    beams = [[] for _ in range(n_beams)]
    scores = np.full(n_beams, -1e9)
    scores[0] = 0.0                                   # only beam 0 is live at the first step
    logp = np.repeat(log_softmax(logits)[None], n_beams, 0)          # [B, V]
    logp[:, ban] = -np.inf
    finished: list[tuple[float, list[int]]] = []
    n_keep = max(2, 1 + len(eos)) * n_beams
    for step in range(max_tokens):
        cand = (scores[:, None] + logp).reshape(-1)                   # [B*V]
        top = np.argpartition(-cand, n_keep)[:n_keep]
        top = top[np.argsort(-cand[top], kind="stable")]
        V = logp.shape[1]
        new_beams, new_scores, parents, toks = [], [], [], []
        for rank, c in enumerate(top):
            b, t = divmod(int(c), V)
            if t in eos:
                if rank < n_beams:
                    gl = len(beams[b]) + 1
                    finished.append((cand[c] / gl ** length_penalty, beams[b]))
                continue
            new_beams.append(beams[b] + [t])
            new_scores.append(cand[c])
            parents.append(b)
            toks.append(t)
            if len(new_beams) == n_beams:
                break
        # stop early once no running beam can beat the worst of n_beams finished hypotheses
        finished.sort(key=lambda f: -f[0])
        finished = finished[:n_beams]
        gl = step + 1
        if len(finished) == n_beams and max(new_scores) / gl ** length_penalty <= finished[-1][0]:
            break
        beams, scores = new_beams, np.array(new_scores)
        pos = n0 + step
        cache.k[:, :, :, :pos] = cache.k[:, parents, :, :pos]       # slots follow their parents
        cache.v[:, :, :, :pos] = cache.v[:, parents, :, :pos]
        if step == max_tokens - 1:
            break
        out = forward(m, toks, [pos] * n_beams, cache, slot=np.arange(n_beams), logits="per_slot")
        logp = log_softmax(out)
        logp[:, ban] = -np.inf
    for s, b in zip(scores, beams):                   # running beams count as finished at the end
        if b:
            finished.append((s / len(b) ** length_penalty, b))
    finished.sort(key=lambda f: -f[0])
    return list(finished[0][1]) if finished else []


# ------------------------------------------------------------------------------------------------
# multi-turn chat
# ------------------------------------------------------------------------------------------------

class ChatSession:
    """A conversation whose tokens stay in the KV cache: each turn re-renders the chat template,
    keeps the longest prefix already in the cache and prefills only the rest."""

    def __init__(self, m: Model, tok, gc: GenerationConfig, system: str | None = None):
        self.m, self.tok, self.gc, self.system = m, tok, gc, system
        self.cache = m.new_cache(context_size(m, gc, 0))
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cached: list[int] = []            # ids whose keys/values are in the cache
        self.cache.reset()

    def render(self, add_generation_prompt=True) -> str:
        return self.tok.render_chat(self.messages, add_generation_prompt=add_generation_prompt)

    def send(self, text: str):
        """Add a user message; yield the assistant's reply in pieces."""
        self.messages.append({"role": "user", "content": text})
        ids = self.tok.encode(self.render(), add_special=True)
        keep = 0
        while keep < min(len(ids), len(self.cached)) and ids[keep] == self.cached[keep]:
            keep += 1
        keep = min(keep, len(ids) - 1)         # always feed at least one token to get logits
        new = ids[keep:]
        stats = Stats()
        out: list[int] = []
        reply = []
        gen = generate_ids(self.m, new, self.gc, self.tok.eot_ids, cache=self.cache, start=keep, stats=stats)
        try:
            for piece in stream_text(self.tok, gen, self.gc.stop, stats, out):
                reply.append(piece)
                yield piece
        finally:
            gen.close()
            self.cached = ids + out[:stats.n_fed]     # what the cache now holds
            self.messages.append({"role": "assistant", "content": "".join(reply)})

"""Prometheus metrics in the text exposition format (version 0.0.4), without a dependency.

Counters (`inc`), gauges (`set`) and histograms (`observe`), optionally with labels; `render()`
returns the text `/metrics` serves. Thread-safe: the engine thread and the event loop both write.
"""
from __future__ import annotations

import bisect
import threading

# Bucket upper bounds per histogram (seconds, or tokens for the batch size); +Inf is implicit.
BUCKETS = {
    "plainlm_time_to_first_token_seconds": (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    "plainlm_request_seconds": (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    "plainlm_step_seconds": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    "plainlm_decode_batch_size": (1, 2, 4, 8, 16, 32, 64, 128),
    "plainlm_http_request_seconds": (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
}
HELP = {
    "plainlm_requests_total": ("counter", "Generation requests finished, by finish reason"),
    "plainlm_requests_rejected_total": ("counter", "Requests refused with 503 (slots and queue full)"),
    "plainlm_prompt_tokens_total": ("counter", "Prompt tokens prefilled"),
    "plainlm_generation_tokens_total": ("counter", "Tokens generated"),
    "plainlm_batch_tokens_total": ("counter", "Tokens run through the model (prompt + decode)"),
    "plainlm_http_requests_total": ("counter", "HTTP requests by path and status code"),
    "plainlm_queue_depth": ("gauge", "Requests waiting for a slot"),
    "plainlm_slots_busy": ("gauge", "Slots holding a running request"),
    "plainlm_slots_total": ("gauge", "Slots (sequences decoded together)"),
    "plainlm_time_to_first_token_seconds": ("histogram", "Submit to first generated token"),
    "plainlm_request_seconds": ("histogram", "Submit to last token, finished requests"),
    "plainlm_step_seconds": ("histogram", "Time of one batched forward step"),
    "plainlm_decode_batch_size": ("histogram", "Sequences decoded together per step"),
    "plainlm_http_request_seconds": ("histogram", "HTTP request latency (to response start)"),
}


def _key(labels: dict | None) -> tuple:
    return tuple(sorted((labels or {}).items()))


def _fmt_labels(key: tuple, extra: tuple = ()) -> str:
    items = list(key) + list(extra)
    if not items:
        return ""
    esc = lambda v: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in items) + "}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, float]] = {}
        self._hist: dict[str, dict[tuple, list]] = {}   # name -> key -> [bucket counts..., sum, count]

    def inc(self, name: str, value: float = 1, labels: dict | None = None) -> None:
        with self._lock:
            d = self._values.setdefault(name, {})
            k = _key(labels)
            d[k] = d.get(k, 0) + value

    def set(self, name: str, value: float, labels: dict | None = None) -> None:
        with self._lock:
            self._values.setdefault(name, {})[_key(labels)] = value

    def get(self, name: str, labels: dict | None = None) -> float:
        with self._lock:
            return self._values.get(name, {}).get(_key(labels), 0)

    def observe(self, name: str, value: float, labels: dict | None = None) -> None:
        bounds = BUCKETS[name]
        with self._lock:
            h = self._hist.setdefault(name, {}).setdefault(_key(labels), [0] * (len(bounds) + 3))
            h[bisect.bisect_left(bounds, value)] += 1          # the first bucket with value <= bound
            h[-2] += value
            h[-1] += 1

    def render(self) -> str:
        out = []
        with self._lock:
            names = sorted(set(self._values) | set(self._hist) | set(HELP))
            for name in names:
                kind, text = HELP.get(name, ("untyped", name))
                out.append(f"# HELP {name} {text}")
                out.append(f"# TYPE {name} {kind}")
                if kind == "histogram":
                    bounds = BUCKETS[name]
                    for key, h in sorted(self._hist.get(name, {}).items()):
                        acc = 0
                        for b, n in zip(list(bounds) + ["+Inf"], h[:len(bounds) + 1]):
                            acc += n
                            out.append(f"{name}_bucket{_fmt_labels(key, (('le', b),))} {acc}")
                        out.append(f"{name}_sum{_fmt_labels(key)} {h[-2]:.6g}")
                        out.append(f"{name}_count{_fmt_labels(key)} {h[-1]}")
                else:
                    values = self._values.get(name, {})
                    if not values and name not in ("plainlm_requests_total", "plainlm_http_requests_total"):
                        values = {(): 0}                 # unlabelled series exist from the start
                    for key, v in sorted(values.items()):
                        out.append(f"{name}{_fmt_labels(key)} {v:g}")
        return "\n".join(out) + "\n"

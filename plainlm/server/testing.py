"""Helpers for tests and benchmarks: run the app in a thread on a free port; a stub model.

The stub (StubTokenizer + stub_forward) exists only for tests of the HTTP layer (errors, auth, 503,
disconnects): it answers instantly (or after `delay` seconds per step) with a fixed cycle of letters.
Anything about generation quality or batching equivalence is tested on the real model.
"""
from __future__ import annotations

import socket
import threading
import time

import numpy as np


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread: `with ServerThread(app) as url:`."""

    def __init__(self, app, host: str = "127.0.0.1"):
        import uvicorn
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="error", timeout_keep_alive=30, backlog=2048)
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None      # not the main thread
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > 20 or not self.thread.is_alive():
                raise RuntimeError("server thread did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


class StubTokenizer:
    """Bytes as tokens: id = byte + 3; 0 = EOS, 1 = BOS, 2 = unused. ChatML-ish template."""
    vocab_size = 259
    eot_ids = {0}
    special_ids = {0, 1, 2}
    chat_template = None
    bos_id, eos_id = 1, 0
    add_bos = False                   # encode never prepends BOS

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids, skip_special: bool = False) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def token_bytes(self, i: int) -> bytes:
        return bytes([i - 3]) if i >= 3 else b""

    def token_text(self, i: int) -> str:
        return self.token_bytes(i).decode("utf-8", errors="backslashreplace")

    def render_chat(self, messages, add_generation_prompt=True, **kw) -> str:
        s = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return s + ("<assistant>" if add_generation_prompt else "")

    _strip_leading_space = False


def stub_forward(delay: float = 0.0, vocab: int = 259):
    """forward_fn for Engine: the next token after id t is the next letter of "ABCDEFGHIJ" cyclically."""
    letters = [ord(c) + 3 for c in "ABCDEFGHIJ"]

    def fwd(ids, pos, slot):
        if delay:
            time.sleep(delay)
        _, first = np.unique(slot[::-1], return_index=True)
        last = sorted(len(slot) - 1 - first)                   # last token of each slot, in order
        out = np.zeros((len(last), vocab), np.float32)
        for row, t in enumerate(last):
            i = int(ids[t])
            nxt = letters[(letters.index(i) + 1) % len(letters)] if i in letters else letters[0]
            out[row, nxt] = 1e4                     # certain even when sampling
        return out
    return fwd

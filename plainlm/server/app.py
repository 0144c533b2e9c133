"""OpenAI-compatible HTTP API (FastAPI) in front of the batching engine, plus the chat page.

    GET  /                       the chat page (static/, no build step)
    GET  /v1/models              the one model served
    POST /v1/completions         text completion      (stream: server-sent events)
    POST /v1/chat/completions    chat completion      (stream: server-sent events)
    POST /tokenize, /detokenize  text <-> ids (llama.cpp server's shapes: content / tokens)
    GET  /health, /metrics       liveness + slots; Prometheus text

Sampling options as OpenAI defines them, plus llama.cpp's extras (top_k, min_p, repeat_penalty):
logit_bias ({"token id": -100..100}, added to the logits before sampling and before greedy argmax);
logprobs (chat: logprobs + top_logprobs 0..20; completions: logprobs 0..5), streamed or not, which
are the model's own distribution: log_softmax of the raw logits, before logit_bias, penalties and
temperature; n (1..16, not streaming: choice i is sampled with seed + i); echo (completions: the prompt
comes back first; with logprobs its tokens are scored too, and max_tokens may be 0).

Every error is OpenAI's shape: {"error": {"message", "type", "param", "code"}}. Bodies are parsed and
checked by hand (not pydantic models) so that each mistake gets one clear message naming its field.
The app talks to the model only through the engine (submit a Request, receive its events).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import os
import time
import uuid

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from ..sampling import SamplingParams
from .engine import Busy, Engine, Request

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
MAX_STOP = 4                 # OpenAI allows up to 4 stop sequences
MAX_TOP_LOGPROBS_CHAT = 20   # chat: top_logprobs in 0..20
MAX_LOGPROBS_COMPLETION = 5  # completions: logprobs in 0..5
MAX_N = 16                   # choices per request (n), non-streaming only
LOGPROB_FLOOR = -9999.0      # what OpenAI reports for a probability that underflows (JSON has no -inf)
KEEPALIVE_S = 2.0            # an SSE comment after this much silence: finds disconnected clients
OPEN_PATHS = ("/", "/health", "/metrics", "/favicon.ico")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None,
                 code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


# ------------------------------------------------------------------------------------------------
# reading and checking request bodies
# ------------------------------------------------------------------------------------------------

async def read_body(request: HTTPRequest) -> dict:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"could not parse the JSON body: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the JSON body must be an object", code="invalid_json")
    return data


def _type_name(v) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(v), type(v).__name__)


def field(data: dict, name: str, kind: str, default=None, lo=None, hi=None, lo_open=False):
    """data[name] checked to be of `kind` ('int' | 'number' | 'bool' | 'str') and within [lo, hi]."""
    v = data.get(name)
    if v is None:
        return default
    ok = {"int": isinstance(v, int) and not isinstance(v, bool),
          "number": isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": isinstance(v, bool), "str": isinstance(v, str)}[kind]
    if kind == "number" and isinstance(v, float) and v != v:
        ok = False                                                    # NaN
    if not ok:
        want = {"int": "an integer", "number": "a number", "bool": "a boolean", "str": "a string"}[kind]
        raise APIError(400, f"'{name}' must be {want}, got {_type_name(v)}", param=name, code="invalid_type")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise APIError(400, f"'{name}' must be {'>' if lo_open else '>='} {lo}, got {v}", param=name,
                       code="invalid_value")
    if hi is not None and v > hi:
        raise APIError(400, f"'{name}' must be <= {hi}, got {v}", param=name, code="invalid_value")
    return v


def sampling_from(data: dict) -> SamplingParams:
    """OpenAI defaults: temperature 1, top_p 1, no top-k/min-p; extras as llama.cpp names them."""
    return SamplingParams(
        temperature=float(field(data, "temperature", "number", 1.0, 0, 2)),
        top_p=float(field(data, "top_p", "number", 1.0, 0, 1, lo_open=True)),
        top_k=field(data, "top_k", "int", 0, 0),
        min_p=float(field(data, "min_p", "number", 0.0, 0, 1)),
        repeat_penalty=float(field(data, "repeat_penalty", "number", 1.0, 0, lo_open=True)),
        presence_penalty=float(field(data, "presence_penalty", "number", 0.0, -2, 2)),
        frequency_penalty=float(field(data, "frequency_penalty", "number", 0.0, -2, 2)),
        seed=_seed(field(data, "seed", "int", None)))


def _seed(seed):
    """Any integer seeds the generator (llama.cpp's -1, or any negative: a random seed)."""
    return None if seed is None or seed < 0 else seed


def stops_from(data: dict) -> list[str]:
    s = data.get("stop")
    if s is None:
        return []
    if isinstance(s, str):
        s = [s]
    if not isinstance(s, list) or not all(isinstance(x, str) for x in s):
        raise APIError(400, "'stop' must be a string or an array of strings", param="stop", code="invalid_type")
    if len(s) > MAX_STOP:
        raise APIError(400, f"'stop' takes at most {MAX_STOP} sequences, got {len(s)}", param="stop",
                       code="invalid_value")
    return [x for x in s if x]


def logit_bias_from(data: dict, vocab_size: int) -> dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]} (JSON keys are strings)."""
    lb = data.get("logit_bias")
    if lb is None:
        return {}
    if not isinstance(lb, dict):
        raise APIError(400, f"'logit_bias' must be an object mapping token ids to numbers, got {_type_name(lb)}",
                       param="logit_bias", code="invalid_type")
    out = {}
    for k, v in lb.items():
        ks = k.strip() if isinstance(k, str) else ""
        if not (ks.isascii() and ks.isdigit()) or not 0 <= int(ks) < vocab_size:
            raise APIError(400, f"'logit_bias' keys must be token ids in 0..{vocab_size - 1}, got {k!r}",
                           param="logit_bias", code="invalid_value")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise APIError(400, f"'logit_bias' value for token {ks} must be a number, got {_type_name(v)}",
                           param="logit_bias", code="invalid_type")
        if not -100 <= v <= 100:
            raise APIError(400, f"'logit_bias' value for token {ks} must be in [-100, 100], got {v}",
                           param="logit_bias", code="invalid_value")
        out[int(ks)] = float(v)
    return out


def _lp(x: float) -> float:
    return max(float(x), LOGPROB_FLOOR)


def message_text(content, i: int) -> str:
    """A message's content: a string, or OpenAI's list of parts (text parts are joined)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content", code="invalid_value")
            out.append(part["text"])
        return "".join(out)
    raise APIError(400, f"messages[{i}].content must be a string or an array of text parts, "
                        f"got {_type_name(content)}", param=f"messages[{i}].content", code="invalid_type")


# ------------------------------------------------------------------------------------------------
# the app
# ------------------------------------------------------------------------------------------------

def create_app(engine: Engine, model_id: str, api_key: str | None = None, aliases=()) -> FastAPI:
    app = FastAPI(title="plainlm", docs_url=None, redoc_url=None, openapi_url=None)
    tok = engine.tokenizer
    metrics = engine.metrics
    metrics.set("plainlm_slots_total", engine.n_slots)
    model_ids = {model_id, *aliases}
    created = int(time.time())

    # ---- errors in OpenAI's shape, whatever raised them --------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind,
                        code=str(e.status_code)).response()

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").response()

    # ---- helpers --------------------------------------------------------------------------------
    def check_model(data):
        m = data.get("model")
        if m is not None and not isinstance(m, str):
            raise APIError(400, f"'model' must be a string, got {_type_name(m)}", param="model", code="invalid_type")
        if m and m not in model_ids:
            raise APIError(400, f"unknown model {m!r}: this server serves {model_id!r}", param="model",
                           code="model_not_found")

    def budget(data, n_prompt: int, default: int | None, names=("max_tokens",), lo: int = 1) -> int:
        """max_tokens, checked against the context: prompt + max_tokens must fit (as OpenAI does)."""
        mt, name = None, names[0]
        for nm in names:
            v = field(data, nm, "int", None, lo)
            if v is not None:
                mt, name = v, nm
                break
        room = engine.n_ctx - n_prompt
        if room < 1:
            raise APIError(400, f"the prompt has {n_prompt} tokens but the context holds {engine.n_ctx} "
                                f"(and needs room for at least one new token)", param="messages"
                           if "max_completion_tokens" in names else "prompt", code="context_length_exceeded")
        if mt is None:
            return min(default or room, room)
        if mt > room:
            raise APIError(400, f"'{name}' is {mt} but the context of {engine.n_ctx} tokens leaves room for "
                                f"{room} after the {n_prompt}-token prompt", param=name,
                           code="context_length_exceeded")
        return mt

    def common(data, chat: bool):
        n = field(data, "n", "int", 1, 1, MAX_N)
        if chat:                        # logprobs: bool, top_logprobs: 0..20 (needs logprobs: true)
            want = field(data, "logprobs", "bool", False)
            top = field(data, "top_logprobs", "int", None, 0, MAX_TOP_LOGPROBS_CHAT)
            if top is not None and not want:
                raise APIError(400, "'top_logprobs' needs 'logprobs' set to true", param="top_logprobs",
                               code="invalid_value")
            logprobs = (top or 0) if want else None
        else:                           # logprobs: how many alternatives, 0..5
            logprobs = field(data, "logprobs", "int", None, 0, MAX_LOGPROBS_COMPLETION)
        bias = logit_bias_from(data, tok.vocab_size)
        stream = field(data, "stream", "bool", False)
        so = data.get("stream_options")
        if so is not None and not isinstance(so, dict):
            raise APIError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
        include_usage = bool(so and field(so, "include_usage", "bool", False))
        if n > 1 and stream:
            raise APIError(400, "n > 1 is supported without streaming only", param="n", code="invalid_value")
        try:
            sp = sampling_from(data)
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value") from None
        return dict(stream=stream, include_usage=include_usage, sp=sp, stops=stops_from(data),
                    logit_bias=bias, logprobs=logprobs, n=n)

    async def run(request: HTTPRequest, prompt_ids, max_tokens, shape, sp, stops, stream, include_usage,
                  logit_bias, logprobs, n=1, echo=None):
        """Submit; then either stream SSE chunks built by `shape` or return the whole response.
        n > 1 (not streaming): n independent requests, choice i sampled with seed `seed + i`."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def listener(i):
            def on_event(kind, payload):                   # engine thread -> event loop
                loop.call_soon_threadsafe(q.put_nowait, (i, kind, payload))
            return on_event

        reqs = [Request(list(prompt_ids), max_tokens,
                        sp if sp.seed is None or i == 0 else dataclasses.replace(sp, seed=sp.seed + i),
                        stops, on_event=listener(i), logit_bias=logit_bias, logprobs=logprobs,
                        prompt_logprobs=bool(echo) and logprobs is not None,
                        skip_first_prompt_logprob=bool(echo and echo.get("added_bos")))
                for i in range(n)]
        try:
            for r in reqs:
                engine.submit(r)
        except Busy as e:
            for r in reqs:
                r.cancel()
            raise APIError(503, str(e), "server_error", code="server_busy",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except ValueError as e:
            for r in reqs:
                r.cancel()
            raise APIError(400, str(e), code="invalid_value") from None
        rid = shape.prefix + uuid.uuid4().hex[:24]

        if not stream:
            parts = [[] for _ in reqs]
            lps = [([] if logprobs is not None else None) for _ in reqs]
            done = [None] * n
            checked = time.monotonic()
            try:
                while not all(done):
                    try:
                        i, kind, payload = await asyncio.wait_for(q.get(), 0.5)
                    except asyncio.TimeoutError:
                        kind = None
                    if time.monotonic() - checked >= 0.5:            # client still there?
                        checked = time.monotonic()
                        if await request.is_disconnected():
                            return PlainTextResponse("", status_code=499)
                    if kind is None:
                        continue
                    if kind == "text":
                        parts[i].append(payload)
                    elif kind == "logprob":
                        lps[i].append(payload)
                    elif kind == "error":
                        raise APIError(500, payload, "server_error")
                    else:
                        done[i] = payload
                return JSONResponse(shape.full(rid, ["".join(p) for p in parts], done, lps))
            finally:
                for r in reqs:
                    r.cancel()                             # no-op once finished; frees the slot otherwise
        r = reqs[0]

        async def get():                                   # one request when streaming: drop its index
            _, kind, payload = await q.get()
            return kind, payload

        async def events():
            yield sse(shape.chunk(rid, None, first=True))
            pending = []                                   # logprobs of tokens whose text is not out yet
            while True:
                try:
                    kind, payload = await asyncio.wait_for(get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"               # sending to a gone client raises: we notice
                    continue
                if kind == "logprob":
                    pending.append(payload)
                elif kind == "text":
                    yield sse(shape.chunk(rid, payload, lps=pending if logprobs is not None else None))
                    pending = []
                elif kind == "error":
                    yield sse({"error": {"message": payload, "type": "server_error", "param": None, "code": None}})
                    return
                else:
                    yield sse(shape.chunk(rid, None, finish=payload["finish_reason"],
                                          lps=pending if logprobs is not None and pending else None))
                    if include_usage:
                        yield sse(shape.usage_chunk(rid, payload))
                    yield "data: [DONE]\n\n"
                    return

        return EventStream(events(), on_close=r.cancel)

    # ---- routes -----------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "plainlm"}]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name not in model_ids:
            raise APIError(404, f"unknown model {name!r}", "not_found_error", param="model", code="model_not_found")
        return {"id": model_id, "object": "model", "created": created, "owned_by": "plainlm"}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        data = await read_body(request)
        check_model(data)
        opts = common(data, chat=False)
        echo = field(data, "echo", "bool", False)
        if data.get("suffix") not in (None, ""):
            raise APIError(400, "suffix is not supported", param="suffix", code="invalid_value")
        p = data.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]                                       # a batch of one
        added_bos = False
        if isinstance(p, str):
            ids = tok.encode(p, add_special=True)
            added_bos = tok.add_bos and tok.bos_id is not None        # what encode(add_special) prepends
        elif isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) for i in p):
            if not all(0 <= i < tok.vocab_size for i in p):
                raise APIError(400, f"token ids in 'prompt' must be in 0..{tok.vocab_size - 1}", param="prompt",
                               code="invalid_value")
            ids = list(p)
        elif p is None:
            raise APIError(400, "'prompt' is required", param="prompt", code="missing_field")
        else:
            raise APIError(400, "'prompt' must be a string or an array of token ids (one prompt per request)",
                           param="prompt", code="invalid_type")
        if not ids:
            raise APIError(400, "'prompt' is empty", param="prompt", code="invalid_value")
        # echo: the prompt is returned before the completion; with logprobs its tokens are scored too
        # (the first one, which nothing precedes, gets null), and max_tokens may then be 0
        mt = budget(data, len(ids), 16, lo=0 if echo and opts["logprobs"] is not None else 1)
        if echo:
            echo = {"text": p if isinstance(p, str) else tok.decode(ids), "added_bos": added_bos}
        return await run(request, ids, mt, CompletionShape(model_id, tok, echo and echo["text"]),
                         echo=echo or None, **opts)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        data = await read_body(request)
        check_model(data)
        opts = common(data, chat=True)
        msgs = data.get("messages")
        if msgs is None:
            raise APIError(400, "'messages' is required", param="messages", code="missing_field")
        if not isinstance(msgs, list) or not msgs:
            raise APIError(400, "'messages' must be a non-empty array", param="messages", code="invalid_value")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise APIError(400, f"messages[{i}] must be an object", param=f"messages[{i}]", code="invalid_type")
            role = m.get("role")
            if role not in ("system", "developer", "user", "assistant", "tool"):
                raise APIError(400, f"messages[{i}].role must be system, user, assistant or tool, got {role!r}",
                               param=f"messages[{i}].role", code="invalid_value")
            clean.append({"role": "system" if role == "developer" else role,
                          "content": message_text(m.get("content"), i)})
        try:
            prompt = tok.render_chat(clean, add_generation_prompt=True)
        except Exception as e:                             # noqa: BLE001 - the template raised
            raise APIError(400, f"chat template: {e}", param="messages", code="invalid_value") from None
        ids = tok.encode(prompt, add_special=False)
        mt = budget(data, len(ids), None, names=("max_completion_tokens", "max_tokens"))
        return await run(request, ids, mt, ChatShape(model_id, tok), **opts)

    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest):
        data = await read_body(request)
        text = field(data, "content", "str", None)
        if text is None:
            raise APIError(400, "'content' (a string) is required", param="content", code="missing_field")
        ids = tok.encode(text, add_special=field(data, "add_special", "bool", False))
        out = {"tokens": ids}
        if field(data, "with_pieces", "bool", False):
            out["pieces"] = [tok.token_text(i) for i in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest):
        data = await read_body(request)
        ids = data.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise APIError(400, "'tokens' must be an array of integers", param="tokens", code="invalid_type")
        if not all(0 <= i < tok.vocab_size for i in ids):
            raise APIError(400, f"token ids must be in 0..{tok.vocab_size - 1}", param="tokens", code="invalid_value")
        return {"content": tok.decode(ids)}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **engine.snapshot()}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def index():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    app.add_middleware(Edge, api_key=api_key, metrics=metrics)
    return app


KNOWN_PATHS = {"/", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
               "/health", "/metrics"}


class Edge:
    """Plain ASGI middleware (keeps streaming responses streaming): the API key check and HTTP metrics."""

    def __init__(self, app, api_key: str | None, metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
                self.metrics.observe("plainlm_http_request_seconds", time.perf_counter() - t0)
            await send(msg)

        try:
            if self.api_key and scope["method"] != "OPTIONS" and path not in OPEN_PATHS and \
                    not path.startswith("/static/"):
                headers = dict(scope["headers"])
                auth = headers.get(b"authorization", b"").decode("latin-1")
                given = auth[7:].strip() if auth.lower().startswith("bearer ") else \
                    headers.get(b"x-api-key", b"").decode("latin-1")
                if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                    resp = APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}).response()
                    return await resp(scope, receive, send_)
            await self.app(scope, receive, send_)
        finally:
            label = path if path in KNOWN_PATHS else "other"
            self.metrics.inc("plainlm_http_requests_total", labels={"path": label, "code": status["code"]})


class EventStream(StreamingResponse):
    """Server-sent events that tell the engine when the response ends for any reason (finished,
    client gone, server stopping): `on_close` cancels the request, which frees its slot."""

    def __init__(self, gen, on_close):
        super().__init__(gen, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def stream_response(self, send):
        try:
            await super().stream_response(send)
        finally:
            self.on_close()


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(done) -> dict:
    """One `done` payload, or a list of them (n choices: the prompt counts once)."""
    done = done if isinstance(done, list) else [done]
    p, c = done[0]["prompt_tokens"], sum(d["completion_tokens"] for d in done)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class CompletionShape:
    """choices[0].logprobs (legacy completions): {tokens, token_logprobs, top_logprobs: [{token: logprob}],
    text_offset}; offsets are character positions in the returned text (as vLLM counts them)."""
    prefix = "cmpl-"

    def __init__(self, model, tok=None, echo: str | None = None):
        self.model, self.tok, self.offset, self.echo = model, tok, 0, echo or ""

    def logprobs(self, lps, restart=False):
        if lps is None:
            return None
        if restart:
            self.offset = 0
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in lps:
            t = self.tok.token_text(e["id"])
            out["tokens"].append(t)
            if e["logprob"] is None:                       # an echoed first prompt token
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
            else:
                out["token_logprobs"].append(_lp(e["logprob"]))
                out["top_logprobs"].append({self.tok.token_text(i): _lp(x) for i, x in e["top"]})
            out["text_offset"].append(self.offset)
            self.offset += len(t)
        return out

    def full(self, rid, texts, dones, lpss):
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model,
                "choices": [{"index": i, "text": self.echo + text, "logprobs": self.logprobs(lps, restart=True),
                             "finish_reason": done["finish_reason"]}
                            for i, (text, done, lps) in enumerate(zip(texts, dones, lpss))],
                "usage": _usage(dones)}

    def chunk(self, rid, text, finish=None, first=False, lps=None):
        if first:
            text = self.echo
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model,
                "choices": [{"index": 0, "text": text or "", "logprobs": self.logprobs(lps),
                             "finish_reason": finish}]}

    def usage_chunk(self, rid, done):
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model,
                "choices": [], "usage": _usage(done)}


class ChatShape:
    """choices[0].logprobs: {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    prefix = "chatcmpl-"

    def __init__(self, model, tok=None):
        self.model, self.tok = model, tok

    def _one(self, i, x):
        return {"token": self.tok.token_text(i), "logprob": _lp(x), "bytes": list(self.tok.token_bytes(i))}

    def logprobs(self, lps):
        if lps is None:
            return None
        return {"content": [{**self._one(e["id"], e["logprob"]),
                             "top_logprobs": [self._one(i, x) for i, x in e["top"]]} for e in lps],
                "refusal": None}

    def full(self, rid, texts, dones, lpss):
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                             "logprobs": self.logprobs(lps), "finish_reason": done["finish_reason"]}
                            for i, (text, done, lps) in enumerate(zip(texts, dones, lpss))],
                "usage": _usage(dones)}

    def chunk(self, rid, text, finish=None, first=False, lps=None):
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
        return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": self.logprobs(lps),
                             "finish_reason": finish}]}

    def usage_chunk(self, rid, done):
        return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.model,
                "choices": [], "usage": _usage(done)}

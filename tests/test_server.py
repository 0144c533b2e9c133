"""HTTP-layer tests of the server on a stub model (instant, deterministic): errors in OpenAI's shape,
API keys, 503 + Retry-After when slots and queue are full, disconnects freeing slots, metrics.

Generation itself (openai client, batched == alone) is tested on the real model in
test_server_openai.py.
"""
from __future__ import annotations

import contextlib
import json
import time

import httpx
import pytest

from plainlm.server.app import create_app
from plainlm.server.engine import Busy, Engine, Request
from plainlm.server.testing import ServerThread, StubTokenizer, stub_forward


@contextlib.contextmanager
def stub_server(slots=2, queue=2, n_ctx=64, delay=0.0, api_key=None):
    eng = Engine(None, StubTokenizer(), n_slots=slots, max_queue=queue, n_ctx=n_ctx, prefill_chunk=16,
                 forward_fn=stub_forward(delay)).start()
    try:
        with ServerThread(create_app(eng, "stub", api_key=api_key)) as url:
            yield url, eng
    finally:
        eng.close()


@pytest.fixture(scope="module")
def srv():
    with stub_server() as (url, eng):
        with httpx.Client(base_url=url, timeout=10) as c:
            yield c, eng


def assert_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


# ------------------------------------------------------------------------------------------------
# happy path on the stub (shapes)
# ------------------------------------------------------------------------------------------------

def test_completion_shape(srv):
    c, _ = srv
    r = c.post("/v1/completions", json={"model": "stub", "prompt": "hi", "max_tokens": 5})
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["object"] == "text_completion"
    assert j["choices"][0]["text"] == "ABCDE"
    assert j["choices"][0]["finish_reason"] == "length"
    assert j["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}


def test_stop_string_cut_and_finish_reason(srv):
    c, _ = srv
    r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8, "stop": ["DE"]})
    j = r.json()
    assert j["choices"][0]["text"] == "ABC"
    assert j["choices"][0]["finish_reason"] == "stop"


def test_chat_stream_shape(srv):
    c, _ = srv
    with c.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    import json
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
    assert text == "ABC"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_tokenize_detokenize(srv):
    c, _ = srv
    ids = c.post("/tokenize", json={"content": "héllo"}).json()["tokens"]
    assert c.post("/detokenize", json={"tokens": ids}).json()["content"] == "héllo"


def test_models_and_health(srv):
    c, _ = srv
    assert c.get("/v1/models").json()["data"][0]["id"] == "stub"
    h = c.get("/health").json()
    assert h["status"] == "ok" and h["slots"] == 2


# ------------------------------------------------------------------------------------------------
# bad input -> 400 with an OpenAI-style body
# ------------------------------------------------------------------------------------------------

def test_malformed_json(srv):
    c, _ = srv
    r = c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400, code="invalid_json")
    assert_error(c.post("/v1/completions", json=[1, 2]), 400, code="invalid_json")


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": [1]}, "top_p"),
    ({"prompt": "x", "seed": "1"}, "seed"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [1.5]}, "prompt"),
    ({"prompt": [100000]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "model": 3}, "model"),
    ({"prompt": "x", "n": 2, "stream": True}, "n"),        # n > 1: not streaming only
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": "x", "n": "2"}, "n"),
])
def test_wrong_types_completions(srv, body, param):
    c, _ = srv
    assert_error(c.post("/v1/completions", json=body), 400, param=param)


@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}, "max_completion_tokens"),
])
def test_wrong_types_chat(srv, body, param):
    c, _ = srv
    assert_error(c.post("/v1/chat/completions", json=body), 400, param=param)


def test_unknown_model(srv):
    c, _ = srv
    assert_error(c.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 400, "model", "model_not_found")
    assert_error(c.get("/v1/models/gpt-9"), 404)


@pytest.mark.parametrize("mt", [-1, 0, 10**9, 2**63])
def test_negative_or_huge_max_tokens(srv, mt):
    c, _ = srv
    assert_error(c.post("/v1/completions", json={"prompt": "x", "max_tokens": mt}), 400, "max_tokens")


@pytest.mark.parametrize("temp, top_p", [(-0.1, None), (2.5, None), (None, 0), (None, 1.5)])
def test_out_of_range_sampling(srv, temp, top_p):
    c, _ = srv
    body = {"prompt": "x"}
    if temp is not None:
        body["temperature"] = temp
    if top_p is not None:
        body["top_p"] = top_p
    assert_error(c.post("/v1/completions", json=body), 400)


def test_prompt_beyond_context(srv):
    c, _ = srv                                     # the stub server's context is 64 tokens
    assert_error(c.post("/v1/completions", json={"prompt": "x" * 100}), 400, code="context_length_exceeded")
    assert_error(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "y" * 100}]}),
                 400, code="context_length_exceeded")
    assert_error(c.post("/v1/completions", json={"prompt": "x" * 50, "max_tokens": 20}), 400, "max_tokens",
                 "context_length_exceeded")


def test_unknown_route_and_method(srv):
    c, _ = srv
    assert_error(c.get("/v1/nothing"), 404)
    assert_error(c.get("/v1/completions"), 405)


# ------------------------------------------------------------------------------------------------
# API key
# ------------------------------------------------------------------------------------------------

def test_api_key():
    with stub_server(api_key="sekret") as (url, _):
        with httpx.Client(base_url=url, timeout=10) as c:
            body = {"prompt": "hi", "max_tokens": 2}
            err = assert_error(c.post("/v1/completions", json=body), 401, code="invalid_api_key")
            assert "API key" in err["message"]
            assert_error(c.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
            assert_error(c.get("/v1/models"), 401)
            assert_error(c.post("/tokenize", json={"content": "x"}), 401)
            ok = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer sekret"})
            assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "AB"
            assert c.get("/health").status_code == 200          # liveness and the page stay open
            assert c.get("/").status_code == 200


# ------------------------------------------------------------------------------------------------
# 503 + Retry-After when slots and queue are full; disconnects free slots
# ------------------------------------------------------------------------------------------------

def test_busy_503_retry_after():
    with stub_server(slots=1, queue=1, n_ctx=512, delay=0.05) as (url, eng):
        with httpx.Client(base_url=url, timeout=10) as c1, httpx.Client(base_url=url, timeout=10) as c2, \
                httpx.Client(base_url=url, timeout=10) as c3:
            body = {"prompt": "hi", "max_tokens": 15, "stream": True}
            with c1.stream("POST", "/v1/completions", json=body) as r1, \
                    c2.stream("POST", "/v1/completions", json=body) as r2:
                assert r1.status_code == 200 and r2.status_code == 200      # one running, one queued
                r3 = c3.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                err = assert_error(r3, 503, code="server_busy")
                assert err["type"] == "server_error"
                assert int(r3.headers["Retry-After"]) >= 1
                # both admitted requests still complete in full
                t1 = "".join(r1.iter_text())
                t2 = "".join(r2.iter_text())
                assert t1.rstrip().endswith("[DONE]") and t2.rstrip().endswith("[DONE]")
            metrics = c3.get("/metrics").text
            assert "plainlm_requests_rejected_total 1" in metrics
            # capacity is back
            assert c3.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def _wait_idle(c, timeout=5.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        h = c.get("/health").json()
        if h["slots_busy"] == 0 and h["queue"] == 0:
            return True
        time.sleep(0.05)
    return False


def test_stream_disconnect_frees_slot():
    with stub_server(slots=1, queue=0, n_ctx=512, delay=0.05) as (url, eng):
        with httpx.Client(base_url=url, timeout=10) as c:
            with httpx.Client(base_url=url, timeout=10) as gone:
                with gone.stream("POST", "/v1/completions",
                                 json={"prompt": "hi", "max_tokens": 400, "stream": True}) as r:
                    it = r.iter_lines()
                    got = [next(it) for _ in range(4)]                       # a few events arrive
                    assert any(g.startswith("data: ") for g in got)
                    assert c.get("/health").json()["slots_busy"] == 1
            # client gone: the slot is freed long before 400 tokens x 50 ms
            assert _wait_idle(c, 3.0)
            m = eng.metrics.get("plainlm_requests_total", {"finish_reason": "cancelled"})
            assert m == 1
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200


def test_nonstream_disconnect_frees_slot():
    with stub_server(slots=1, queue=0, n_ctx=512, delay=0.05) as (url, eng):
        with httpx.Client(base_url=url, timeout=10) as c:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 400}, timeout=0.5)
            assert _wait_idle(c, 3.0)
            assert eng.metrics.get("plainlm_requests_total", {"finish_reason": "cancelled"}) == 1


def test_metrics_text(srv):
    c, _ = srv
    c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    text = c.get("/metrics").text
    for name in ("plainlm_requests_total{finish_reason=\"length\"}", "plainlm_generation_tokens_total",
                 "plainlm_queue_depth", "plainlm_slots_busy", "plainlm_time_to_first_token_seconds_bucket",
                 "plainlm_request_seconds_count", "plainlm_http_requests_total"):
        assert name in text, name
    assert "# TYPE plainlm_time_to_first_token_seconds histogram" in text


# ------------------------------------------------------------------------------------------------
# the engine directly
# ------------------------------------------------------------------------------------------------

def test_engine_bounded_and_chunked_prefill():
    eng = Engine(None, StubTokenizer(), n_slots=2, max_queue=1, n_ctx=256, prefill_chunk=8,
                 forward_fn=stub_forward(0.01))
    seen = []
    fwd = eng._forward

    def spy(ids, pos, slot):
        seen.append(len(ids))
        return fwd(ids, pos, slot)
    eng._forward = spy
    done = []
    reqs = [Request([5] * 40, 3, on_event=lambda k, p, i=i: done.append((i, k))) for i in range(3)]
    for r in reqs:
        eng.submit(r)
    with pytest.raises(Busy):
        eng.submit(Request([5], 1))
    eng.start()
    t0 = time.time()
    while sum(k == "done" for _, k in done) < 3 and time.time() - t0 < 10:
        time.sleep(0.01)
    eng.close()
    assert sum(k == "done" for _, k in done) == 3
    assert max(seen) <= 8 + 2                      # a prompt chunk plus one token per decoding slot


def test_queued_disconnect_frees_queue_place(monkeypatch):
    import plainlm.server.app as app_mod
    monkeypatch.setattr(app_mod, "KEEPALIVE_S", 0.2)            # pings find gone clients sooner
    body = {"prompt": "hi", "max_tokens": 200, "stream": True}
    with stub_server(slots=1, queue=1, n_ctx=512, delay=0.05) as (url, eng):
        with httpx.Client(base_url=url, timeout=10) as a, httpx.Client(base_url=url, timeout=10) as c:
            with a.stream("POST", "/v1/completions", json=body) as ra:
                lines_a = ra.iter_lines()                           # (keep it: dropping it closes A)
                next(lines_a)                                       # A runs
                with httpx.Client(base_url=url, timeout=10) as b:
                    with b.stream("POST", "/v1/completions", json=body) as rb:
                        assert rb.status_code == 200                # B waits in the queue ...
                        assert c.get("/health").json()["queue"] == 1
                        assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 503
                time.sleep(0.8)                                     # ... and leaves
                with c.stream("POST", "/v1/completions", json=body) as rc:
                    assert rc.status_code == 200                    # its place in the queue is free again


@pytest.mark.parametrize("seed", [-1, 0, 2**70])
def test_any_integer_seed(srv, seed):
    c, _ = srv
    r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "seed": seed, "temperature": 1})
    assert r.status_code == 200, r.text


def test_model_error_fails_one_request_not_the_engine():
    calls = {"n": 0}
    ok = stub_forward()

    def flaky(ids, pos, slot):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return ok(ids, pos, slot)
    eng = Engine(None, StubTokenizer(), n_slots=1, max_queue=1, n_ctx=64, forward_fn=flaky).start()
    try:
        with ServerThread(create_app(eng, "stub")) as url, httpx.Client(base_url=url, timeout=10) as c:
            err = assert_error(c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}), 500)
            assert "boom" in err["message"] and err["type"] == "server_error"
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == "AB"
            assert c.get("/health").json()["slots_busy"] == 0
    finally:
        eng.close()


# ------------------------------------------------------------------------------------------------
# logit_bias and logprobs: validation and shapes (numbers are checked on the real model in
# test_server_logprobs.py)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [[1], "x", {"abc": 1}, {"-1": 1}, {"259": 1}, {"1.5": 1}, {"65": "high"},
                                  {"65": True}, {"65": 100.5}, {"65": -101}])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_logit_bias_rejected(srv, bias, path):
    c, _ = srv
    body = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    assert_error(c.post(path, json={**body, "max_tokens": 2, "logit_bias": bias}), 400, param="logit_bias")


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "logprobs": -1}, "logprobs"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": 2}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
])
def test_logprobs_rejected(srv, body, param):
    c, _ = srv
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    assert_error(c.post(path, json={**body, "max_tokens": 2}), 400, param=param)


def test_logit_bias_accepted_in_range(srv):
    c, _ = srv
    r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "logit_bias": {"65": 100, "66": -100}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "ABC"         # the stub's logits (1e4) outweigh any bias


def test_completion_logprobs_shape(srv):
    c, _ = srv
    j = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, "logprobs": 2}).json()
    lp = j["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert lp["tokens"] == list("ABCDE")
    assert lp["text_offset"] == [0, 1, 2, 3, 4]
    assert all(abs(x) < 1e-6 for x in lp["token_logprobs"])
    assert [list(d)[0] for d in lp["top_logprobs"]] == list("ABCDE")
    assert all(len(d) == 2 and list(d.values())[1] == -9999.0 for d in lp["top_logprobs"])   # floored
    # without logprobs: null, as before
    assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).json()["choices"][0]["logprobs"] is None


def test_chat_logprobs_shape_stream_and_not(srv):
    c, _ = srv
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "logprobs": True, "top_logprobs": 1}
    j = c.post("/v1/chat/completions", json=body).json()
    content = j["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == list("ABCD")
    assert [e["bytes"] for e in content] == [[65], [66], [67], [68]]
    assert all(set(e) == {"token", "logprob", "bytes", "top_logprobs"} for e in content)
    assert [e["top_logprobs"][0]["token"] for e in content] == list("ABCD")
    with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    streamed = [e for ch in chunks for e in ((ch["choices"][0]["logprobs"] or {}).get("content") or [])]
    assert streamed == content
    j0 = c.post("/v1/chat/completions", json={**body, "top_logprobs": 0}).json()
    assert all(e["top_logprobs"] == [] for e in j0["choices"][0]["logprobs"]["content"])


def test_n_choices_stub(srv):
    c, _ = srv
    j = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "n": 3, "logprobs": 1}).json()
    assert [ch["index"] for ch in j["choices"]] == [0, 1, 2]
    assert [ch["text"] for ch in j["choices"]] == ["ABC"] * 3
    assert all(ch["logprobs"]["text_offset"] == [0, 1, 2] for ch in j["choices"])
    assert j["usage"] == {"prompt_tokens": 2, "completion_tokens": 9, "total_tokens": 11}
    j = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                             "n": 2}).json()
    assert [ch["message"]["content"] for ch in j["choices"]] == ["AB", "AB"]


def test_echo_stub(srv):
    c, _ = srv
    j = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "echo": True}).json()
    assert j["choices"][0]["text"] == "hiABC"
    assert j["usage"]["completion_tokens"] == 3
    with c.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "echo": True,
                                                   "stream": True}) as r:
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    assert chunks[0]["choices"][0]["text"] == "hi"                 # the prompt comes first
    assert "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"]) == "hiABC"
    # max_tokens 0 only when scoring the prompt (echo + logprobs)
    assert_error(c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 0, "echo": True}), 400,
                 param="max_tokens")
    assert_error(c.post("/v1/completions", json={"prompt": "hi", "echo": "yes"}), 400, param="echo")

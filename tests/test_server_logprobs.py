"""logprobs and logit_bias on the real default model, through the official `openai` client.

Oracle: transformers' LlamaForCausalLM on the same GGUF (float32), teacher-forced on the prompt plus
the tokens the server generated; its log_softmax at each position must equal what the server reports.
The server reports the model's own distribution: log_softmax of the raw logits, before logit_bias,
penalties and temperature (as OpenAI does).

Two servers: one on the numpy reference backend (the logprob plumbing is backend-agnostic, and the
reference equals transformers to ~1e-4, so the tolerance is tight: 1e-3), one on the default fast
backend (Q8 activations: its logprobs differ from transformers' by ~2e-3 here; tolerance 1e-2).
"""
from __future__ import annotations

import numpy as np
import pytest

openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch")

TOL = {"ref": 1e-3, "fast": 1e-2}


@pytest.fixture(scope="module", params=["ref", "fast"])
def srv(request, model_path):
    from plainlm.model import load_model
    from plainlm.server.app import create_app
    from plainlm.server.cli import make_tokenizer
    from plainlm.server.engine import Engine
    from plainlm.server.testing import ServerThread
    m = load_model(model_path, request.param)
    tok = make_tokenizer(m)
    eng = Engine(m, tok, n_slots=2, max_queue=4, n_ctx=256, prefill_chunk=64).start()
    try:
        with ServerThread(create_app(eng, "smollm2")) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
            yield tok, client, TOL[request.param]
    finally:
        eng.close()


@pytest.fixture(scope="module")
def by_bytes(srv):
    """token bytes -> id (to map the server's tokens back to ids for the teacher-forced oracle)."""
    tok = srv[0]
    out = {}
    for i in range(tok.vocab_size):
        out.setdefault(tok.token_bytes(i), i)
    return out


def hf_logprobs(hf_model, ids):
    """[len(ids), V] float64: log_softmax of transformers' logits at every position."""
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), -1).numpy()


def chat_ids(tok, text):
    return tok.encode(tok.render_chat([{"role": "user", "content": text}]), add_special=False)


def check_against_oracle(hf_model, prompt_ids, gen_ids, entries, k, tol):
    """entries[j] = (logprob, [(id, logprob) top k]) for gen_ids[j]."""
    ref = hf_logprobs(hf_model, prompt_ids + gen_ids)[len(prompt_ids) - 1:-1]     # row j predicts gen_ids[j]
    assert len(ref) == len(gen_ids) == len(entries) > 0
    worst = 0.0
    for j, (tid, (lp, top)) in enumerate(zip(gen_ids, entries)):
        row = ref[j]
        assert lp <= 0 and all(x <= 0 for _, x in top)
        assert [x for _, x in top] == sorted((x for _, x in top), reverse=True)
        assert len(top) == k
        # greedy: the chosen token is the top-1 reported, and the model's (oracle's) most likely token
        assert top[0][0] == tid
        assert row[tid] >= row.max() - tol
        worst = max(worst, abs(lp - row[tid]), *(abs(x - row[i]) for i, x in top))
        # the reported top k are the oracle's top k (up to near-ties at the edge)
        assert min(row[i] for i, _ in top) >= np.sort(row)[-k] - tol
    assert worst <= tol, f"max |server - transformers| = {worst:.2e} > {tol}"
    return worst


def test_chat_logprobs_match_transformers(srv, by_bytes, hf_model):
    tok, client, tol = srv
    prompt = "What is the capital of France?"
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": prompt}],
                                       max_tokens=8, temperature=0, logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    gen = [by_bytes[bytes(e.bytes)] for e in content]
    assert tok.decode(gen) == r.choices[0].message.content
    assert all(e.token == tok.token_text(i) for e, i in zip(content, gen))
    entries = [(e.logprob, [(by_bytes[bytes(t.bytes)], t.logprob) for t in e.top_logprobs]) for e in content]
    worst = check_against_oracle(hf_model, chat_ids(tok, prompt), gen, entries, 5, tol)
    print(f"chat: max |server - transformers| logprob = {worst:.2e} (tolerance {tol})")

    # streamed: the same tokens and numbers, spread over the chunks
    streamed = []
    for ch in client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": prompt}],
                                             max_tokens=8, temperature=0, logprobs=True, top_logprobs=5,
                                             stream=True):
        if ch.choices and ch.choices[0].logprobs and ch.choices[0].logprobs.content:
            streamed += ch.choices[0].logprobs.content
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]
    np.testing.assert_allclose([e.logprob for e in streamed], [e.logprob for e in content], atol=1e-6)


def test_completion_logprobs_match_transformers(srv, by_bytes, hf_model):
    tok, client, tol = srv
    prompt = "The capital of France is"
    ids = tok.encode(prompt, add_special=True)
    r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) \
        == r.usage.completion_tokens
    gen = [by_bytes[t.encode()] for t in lp.tokens]              # ASCII text: token text == token bytes
    assert "".join(lp.tokens) == r.choices[0].text == tok.decode(gen)
    assert lp.text_offset == [len("".join(lp.tokens[:j])) for j in range(len(lp.tokens))]
    entries = [(x, [(by_bytes[t.encode()], v) for t, v in d.items()]) for x, d in zip(lp.token_logprobs,
                                                                                       lp.top_logprobs)]
    worst = check_against_oracle(hf_model, ids, gen, entries, 3, tol)
    print(f"completions: max |server - transformers| logprob = {worst:.2e} (tolerance {tol})")

    got = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for ch in client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0,
                                        logprobs=3, stream=True):
        if ch.choices and ch.choices[0].logprobs:
            for key in got:
                got[key] += getattr(ch.choices[0].logprobs, key)
    assert got["tokens"] == lp.tokens and got["text_offset"] == lp.text_offset
    np.testing.assert_allclose(got["token_logprobs"], lp.token_logprobs, atol=1e-6)


def test_logit_bias_plus_100_forces_a_token(srv):
    tok, client, _ = srv
    forced = tok.encode(" banana")
    assert len(forced) == 1
    r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=3,
                                  temperature=0, logit_bias={str(forced[0]): 100})
    assert r.choices[0].text == tok.decode(forced * 3)
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=2, temperature=0, logit_bias={str(forced[0]): 100})
    assert r.choices[0].message.content == tok.decode(forced * 2)
    # also when sampling (temperature 1): the bias dominates the distribution
    r = client.completions.create(model="smollm2", prompt="Hello", max_tokens=2, temperature=1, seed=3,
                                  logit_bias={str(forced[0]): 100})
    assert r.choices[0].text == tok.decode(forced * 2)


def test_logit_bias_minus_100_gives_the_second_choice(srv, hf_model):
    tok, client, tol = srv
    prompt = "The capital of France is"
    ids = tok.encode(prompt, add_special=True)
    row = hf_logprobs(hf_model, ids)[-1]
    first, second = np.argsort(-row)[:2]
    assert row[first] - row[second] > 10 * tol                # a clear second choice (no near-tie)
    r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=1, temperature=0, logprobs=2,
                                  logit_bias={str(first): -100})
    assert r.choices[0].text == tok.decode([int(second)])
    # the reported logprobs are the model's, before the bias: the banned token is still the top-1
    lp = r.choices[0].logprobs
    assert abs(lp.token_logprobs[0] - row[second]) <= tol
    assert list(lp.top_logprobs[0]) == [tok.token_text(int(first)), tok.token_text(int(second))]
    # without the bias, the greedy token is the oracle's first choice
    r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=1, temperature=0)
    assert r.choices[0].text == tok.decode([int(first)])


def test_errors_through_client(srv):
    tok, client, _ = srv
    msgs = [{"role": "user", "content": "x"}]
    for bad in ({str(tok.vocab_size): 1}, {"x": 1}, {"5": 101}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=2, logit_bias=bad)
        assert e.value.body["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=2, logprobs=True, top_logprobs=21)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt="x", max_tokens=2, logprobs=6)
    assert e.value.body["param"] == "logprobs"


def test_echo_scores_the_prompt(srv, by_bytes, hf_model):
    """echo + logprobs + max_tokens 0: the prompt's own logprobs (the first token: null), as transformers
    gives them teacher-forced; with max_tokens > 0 the completion's entries follow unchanged."""
    tok, client, tol = srv
    prompt = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(prompt, add_special=True)
    ref = hf_logprobs(hf_model, ids)
    r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and r.usage.completion_tokens == 0
    assert [by_bytes[t.encode()] for t in lp.tokens] == ids
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:], [ref[j - 1, ids[j]] for j in range(1, len(ids))], atol=tol)
    for j in range(1, len(ids)):                   # the top 2 alternatives at each prompt position
        want = np.argsort(-ref[j - 1])[:2]
        got = [by_bytes[t.encode()] for t in lp.top_logprobs[j]]
        assert got == list(want) or abs(ref[j - 1, want[0]] - ref[j - 1, want[1]]) < tol
    # with a completion: prompt entries, then exactly the entries of the plain request
    plain = client.completions.create(model="smollm2", prompt=prompt, max_tokens=4, temperature=0, logprobs=2)
    both = client.completions.create(model="smollm2", prompt=prompt, max_tokens=4, temperature=0, logprobs=2,
                                     echo=True)
    assert both.choices[0].text == prompt + plain.choices[0].text
    b, p = both.choices[0].logprobs, plain.choices[0].logprobs
    assert b.tokens == lp.tokens + p.tokens
    # (1e-5: a step that scores a prompt computes all rows' logits, one matmul of another shape)
    np.testing.assert_allclose(b.token_logprobs[1:len(ids)], lp.token_logprobs[1:], atol=1e-5)
    np.testing.assert_allclose(b.token_logprobs[len(ids):], p.token_logprobs, atol=1e-5)
    assert b.text_offset == [len("".join(b.tokens[:j])) for j in range(len(b.tokens))]
    # streamed: the same entries
    got = []
    for ch in client.completions.create(model="smollm2", prompt=prompt, max_tokens=4, temperature=0, logprobs=2,
                                        echo=True, stream=True):
        if ch.choices and ch.choices[0].logprobs:
            got += ch.choices[0].logprobs.tokens
    assert got == b.tokens


def test_echo_long_prompt_across_chunks_while_another_decodes(srv, by_bytes, hf_model, license_text):
    """A prompt longer than the prefill chunk (64) scored while another request decodes in the same steps."""
    import threading
    tok, client, tol = srv
    ids = tok.encode(license_text[:1200], add_special=True)[:150]
    assert len(ids) > 2 * 64
    other = {}

    def decode():
        other["r"] = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=24,
                                               temperature=0)
    t = threading.Thread(target=decode)
    t.start()
    r = client.completions.create(model="smollm2", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    t.join(300)
    ref = hf_logprobs(hf_model, ids)
    lp = r.choices[0].logprobs
    assert [by_bytes[tok.token_bytes(i)] for i in ids] == ids
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
    assert lp.tokens == [tok.token_text(i) for i in ids]
    np.testing.assert_allclose(lp.token_logprobs[1:], [ref[j - 1, ids[j]] for j in range(1, len(ids))],
                               atol=tol)
    alone = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=24, temperature=0)
    assert other["r"].choices[0].text == alone.choices[0].text

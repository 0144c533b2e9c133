"""Chat template rendering vs transformers' apply_chat_template (the reference renderer)."""
from __future__ import annotations

import os

import pytest

from plainlm.chat import CHATML_TEMPLATE, render_chat

CONVERSATIONS = {
    "single user": [{"role": "user", "content": "Hi!"}],
    "with system": [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "What is 2+2?"}],
    "multi-turn": [{"role": "user", "content": "Hello"},
                   {"role": "assistant", "content": "Hi there! How can I help?"},
                   {"role": "user", "content": "Tell me a joke\nabout cats 🐱."}],
    "system multi-turn": [{"role": "system", "content": "Be nice.\n"},
                          {"role": "user", "content": "  spaces  "},
                          {"role": "assistant", "content": "Ok <b>&amp;</b>"},
                          {"role": "user", "content": "你好, мир, café"}],
}

# Other templates exercising features real ones use: bos/eos variables, loop.first/last, namespace,
# loop controls, |trim, tojson with indent, whitespace control, tools/documents being None.
EXTRA_TEMPLATES = {
    "bitnet-like": ("{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize + ': ' + m['content'] | trim"
                    " + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"),
    "llama3-like": ("{% set ns = namespace(sys='') %}\n{% for m in messages %}\n"
                    "  {% if m.role == 'system' %}{% set ns.sys = m.content %}{% continue %}{% endif %}\n"
                    "  {% if loop.first %}{{ bos_token }}{% endif %}\n"
                    "  <|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content | trim }}<|eot_id|>\n"
                    "{% endfor %}\n{% if ns.sys %}[sys={{ ns.sys | tojson }}]{% endif %}\n"
                    "{% if tools is not none %}{{ tools | tojson(indent=2) }}{% endif %}\n"
                    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "tojson-messages": "{{ messages | tojson }}{% if documents %}docs{% endif %}{{ eos_token }}",
}


@pytest.fixture(scope="module")
def hf_smol():
    pytest.importorskip("transformers", reason="transformers' apply_chat_template is the oracle")
    from transformers import AutoTokenizer

    from plainlm.pull import pull
    p = str(pull(quiet=True))
    return AutoTokenizer.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p))


@pytest.fixture(scope="module")
def smol():
    from plainlm.formats.gguf import read_gguf
    from plainlm.pull import pull
    from plainlm.tokenizer import Tokenizer
    return Tokenizer.from_gguf_metadata(read_gguf(pull(quiet=True)).metadata)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_smollm_template_matches_transformers(smol, hf_smol, name, gen):
    msgs = CONVERSATIONS[name]
    expected = hf_smol.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert render_chat(smol.chat_template, msgs, add_generation_prompt=gen,
                       bos_token="<|im_start|>", eos_token="<|im_end|>") == expected
    assert smol.render_chat(msgs, add_generation_prompt=gen) == expected


def test_smollm_default_system_prompt(smol):
    out = smol.render_chat(CONVERSATIONS["single user"])
    assert out == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                   "<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    # And the rendered prompt tokenizes with the control tokens as single ids.
    ids = smol.encode(out)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2


@pytest.mark.parametrize("tname", list(EXTRA_TEMPLATES))
@pytest.mark.parametrize("name", ["with system", "system multi-turn"])
def test_other_templates_match_transformers(hf_smol, tname, name):
    template, msgs = EXTRA_TEMPLATES[tname], CONVERSATIONS[name]
    kw = dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    tools = [{"type": "function", "function": {"name": "f", "description": "<x> & y",
                                               "parameters": {"type": "object", "properties": {}}}}]
    for extra in ({}, {"tools": tools}):
        expected = hf_smol.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                               add_generation_prompt=True, **kw, **extra)
        assert render_chat(template, msgs, add_generation_prompt=True, **kw, **extra) == expected


def test_chatml_fallback():
    msgs = CONVERSATIONS["multi-turn"]
    expected = ("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there! How can I help?<|im_end|>\n"
                "<|im_start|>user\nTell me a joke\nabout cats 🐱.<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(None, msgs) == expected
    assert render_chat("", msgs) == expected
    assert render_chat(CHATML_TEMPLATE, msgs, add_generation_prompt=False) == expected[:-len("<|im_start|>assistant\n")]


def test_template_extras():
    t = "{{ x | tojson }}|{{ strftime_now('%Y') | length }}|{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"
    assert render_chat(t, [], x={"a": "<é>", "b": [1, None]}) == '{"a": "<é>", "b": [1, null]}|4|01'
    # None-valued keys are dropped before rendering, as transformers does.
    t = "{% for m in messages %}{{ 'content' in m }}{% endfor %}"
    assert render_chat(t, [{"role": "assistant", "content": None}, {"role": "user", "content": "x"}]) == "FalseTrue"


@pytest.mark.parametrize("template, match", [
    ("{% if %}", "not valid Jinja"),
    ("{% for m in messages %}", "not valid Jinja"),
    ("{{ raise_exception('Conversation roles must alternate') }}", "Conversation roles must alternate"),
    ("{{ messages[0]['content'].upper() }}{{ foo.bar }}", "failed to render"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ ''.__class__.__mro__ }}{{ [].pop() }}", "failed to render"),     # sandbox: no mutation
    ("{% set ns = namespace(_x=1) %}", "namespace"),
])
def test_bad_templates_raise_value_error(template, match):
    with pytest.raises(ValueError, match=match):
        render_chat(template, [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError):
        render_chat(CHATML_TEMPLATE, "not a list")

"""Chat templates: a list of messages -> the prompt string the model was fine-tuned on.

Models ship their chat format as a Jinja template (GGUF `tokenizer.chat_template`, HF
`tokenizer_config.json`). To get the same prompt the model saw in training, we render it the way
transformers' `apply_chat_template` does (transformers `utils/chat_template_utils.py`):

* an `ImmutableSandboxedEnvironment` (templates come from the internet and are code), with
  `trim_blocks=True, lstrip_blocks=True` and the `loopcontrols` extension;
* extras templates rely on: `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` filter that does
  *not* HTML-escape and takes `indent`/`separators`/`sort_keys`, and `ensure_ascii=False`;
* variables: `messages`, `add_generation_prompt`, `tools`, `documents` (None unless given),
  `bos_token`, `eos_token`, plus any extra keyword (e.g. `enable_thinking`);
* message keys whose value is None are dropped first (OpenAI-style `content: None`), and a message's
  reasoning is also offered as `reasoning_content` / `thinking`, as transformers 5 does.

A model without a template gets ChatML, the format SmolLM2 and many others use.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# HF's historical default template (ChatML): <|im_start|>{role}\n{content}<|im_end|>\n per message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes (<, >, &, ') which would change the prompt text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so templates cannot reach CPython internals."""

    def __init__(*args, **kwargs):      # same signature trick as Jinja's, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat template is not valid Jinja (line {e.lineno}): {e.message}") from e


def _plain(value):
    """A copy built from JSON types only: the sandbox sees no methods of arbitrary caller objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item):     # numpy scalars
        return _plain(value.item())
    for base in (bool, int, float, str):                     # subclasses such as enums
        if isinstance(value, base):
            return base(value)
    return f"<{type(value).__name__}>"


def _prepare_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise ValueError(f"each message must be a dict with 'role' and 'content', got {m!r}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(_plain(m))
    return out


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **kw) -> str:
    """Render `messages` with the Jinja chat `template` (ChatML when None/empty).

    Extra keywords become template variables (`tools`, `documents`, `enable_thinking`, ...).
    Raises ValueError for a template that does not parse, calls raise_exception, or fails to render.
    """
    if not template:
        template = CHATML_TEMPLATE
    if not isinstance(template, str):
        raise ValueError(f"chat template must be a string, got {type(template).__name__}")
    compiled = _compile(template)
    variables = {"tools": None, "documents": None, **{k: _plain(v) for k, v in kw.items()}}
    try:
        return compiled.render(messages=_prepare_messages(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **variables)
    except jinja2.exceptions.TemplateError as e:      # raise_exception, undefined access, sandbox violations
        raise ValueError(f"chat template failed to render: {e}") from e
    except (TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError) as e:
        raise ValueError(f"chat template failed to render: {type(e).__name__}: {e}") from e

"""`plainlm inspect FILE`: what a GGUF file holds, without loading any weights.

    inspect_report(path) -> dict      plain JSON-able facts (ints, floats, strings, lists, dicts, None)
    format_report(report) -> str      the same facts as a human-readable table

The report reads only the header (tensor data stay on disk). A file whose container is malformed
raises GGUFError; a well-formed file of an architecture plainlm cannot run still gets a report,
with `config` = None and the reason in `config_error`.
"""
from __future__ import annotations

import os

from .config import ConfigError, ModelConfig
from .formats.gguf import read_gguf

TOKENIZER_IDS = ("bos", "eos", "eot", "unknown", "padding")


def _scalar(v):
    """A metadata value as a plain Python value (numpy arrays are summarised by the caller)."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


def _token_text(tokens, i):
    if isinstance(i, bool) or not isinstance(i, int) or tokens is None or not 0 <= i < len(tokens):
        return None
    return tokens[i]


def inspect_report(path: str | os.PathLike) -> dict:
    """Facts about a GGUF file. Keys:

    path, file_size, gguf_version, alignment, data_start, metadata_count,
    architecture (general.architecture), name (general.name), file_type, quantization_version,
    config (ModelConfig fields as a dict, or None), config_error (str or None),
    tensor_count, n_params, tensor_bytes, tensors (list of {name, type, shape, bytes, offset};
    shape in numpy order, i.e. GGUF dims reversed; offset absolute in the file),
    bytes_by_type ({type name: bytes}), tensors_by_type ({type name: count}),
    tokenizer: {model, pre, vocab_size, n_merges, bos_id, bos, eos_id, eos, eot_id, eot,
                unknown_id, unknown, padding_id, padding, add_bos, add_eos, has_chat_template}
    """
    g = read_gguf(path, mmap_data=False)
    meta = g.metadata

    config, config_error = None, None
    try:
        config = ModelConfig.from_gguf(meta, g.tensors.keys()).to_dict()
    except ConfigError as e:
        config_error = str(e)

    tensors, bytes_by_type, count_by_type = [], {}, {}
    n_params = 0
    for t in g.tensors.values():
        n = 1
        for d in t.shape:
            n *= d
        n_params += n
        tensors.append({"name": t.name, "type": t.qtype.name, "shape": list(t.shape), "bytes": t.nbytes,
                        "offset": t.offset})
        bytes_by_type[t.qtype.name] = bytes_by_type.get(t.qtype.name, 0) + t.nbytes
        count_by_type[t.qtype.name] = count_by_type.get(t.qtype.name, 0) + 1

    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        tokens = None
    merges = meta.get("tokenizer.ggml.merges")
    tok = {
        "model": _scalar(meta.get("tokenizer.ggml.model")),
        "pre": _scalar(meta.get("tokenizer.ggml.pre")),
        "vocab_size": len(tokens) if tokens is not None else None,
        "n_merges": len(merges) if isinstance(merges, list) else 0,
    }
    for which in TOKENIZER_IDS:
        i = meta.get(f"tokenizer.ggml.{which}_token_id")
        i = i if isinstance(i, int) and not isinstance(i, bool) else None
        tok[f"{which}_id"] = i
        tok[which] = _token_text(tokens, i)
    for flag in ("add_bos", "add_eos"):
        v = meta.get(f"tokenizer.ggml.{flag}_token")
        tok[flag] = bool(v) if isinstance(v, bool) else None
    tok["has_chat_template"] = isinstance(meta.get("tokenizer.chat_template"), str)

    return {
        "path": g.path,
        "file_size": g.file_size,
        "gguf_version": g.version,
        "alignment": g.alignment,
        "data_start": g.data_start,
        "metadata_count": len(meta),
        "architecture": g.architecture,
        "name": _scalar(meta.get("general.name")),
        "file_type": _scalar(meta.get("general.file_type")),
        "quantization_version": _scalar(meta.get("general.quantization_version")),
        "config": config,
        "config_error": config_error,
        "tensor_count": len(tensors),
        "n_params": n_params,
        "tensor_bytes": sum(bytes_by_type.values()),
        "tensors": tensors,
        "bytes_by_type": bytes_by_type,
        "tensors_by_type": count_by_type,
        "tokenizer": tok,
    }


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _count(n: int) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _table(rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  " + "  ".join(cells).rstrip())
    return out


def format_report(d: dict) -> str:
    """A human-readable rendering of inspect_report()."""
    lines = [f"file          {d['path']}",
             f"              {_size(d['file_size'])} ({d['file_size']} bytes), GGUF v{d['gguf_version']}, "
             f"alignment {d['alignment']}, tensor data at byte {d['data_start']}, {d['metadata_count']} metadata keys",
             f"architecture  {d['architecture'] or '(none)'}" + (f"   name: {d['name']}" if d.get("name") else "")
             + (f"   file_type: {d['file_type']}" if d.get("file_type") is not None else "")]
    lines.append("")
    if d["config"]:
        lines.append("config")
        lines += _table([[k, f"{v:.7g}" if isinstance(v, float) else str(v)] for k, v in d["config"].items()])
    else:
        lines.append(f"config        not runnable by plainlm: {d['config_error']}")
    lines.append("")

    t = d["tokenizer"]
    lines.append("tokenizer")
    rows = [["model", str(t["model"])], ["pre", str(t["pre"])], ["vocab size", str(t["vocab_size"])],
            ["merges", str(t["n_merges"])]]
    for which in ("bos", "eos", "eot", "unknown", "padding"):
        if t[f"{which}_id"] is not None:
            rows.append([which, f"{t[f'{which}_id']}  {t[which]!r}" if t[which] is not None else str(t[f"{which}_id"])])
    unset = "(not set)"
    rows += [["add_bos", unset if t["add_bos"] is None else str(t["add_bos"])],
             ["add_eos", unset if t["add_eos"] is None else str(t["add_eos"])],
             ["chat template", "yes" if t["has_chat_template"] else "no"]]
    lines += _table(rows)
    lines.append("")

    lines.append(f"tensors       {d['tensor_count']} tensors, {_count(d['n_params'])} parameters "
                 f"({d['n_params']}), {_size(d['tensor_bytes'])}")
    rows = [["type", "count", "bytes", "share"]]
    total = d["tensor_bytes"] or 1
    for name, b in sorted(d["bytes_by_type"].items(), key=lambda kv: -kv[1]):
        rows.append([name, str(d["tensors_by_type"][name]), str(b), f"{100 * b / total:.1f}%"])
    lines += _table(rows, right={1, 2, 3})
    lines.append("")
    rows = [["name", "type", "shape", "bytes"]]
    for x in d["tensors"]:
        rows.append([x["name"], x["type"], " x ".join(str(s) for s in x["shape"]), str(x["bytes"])])
    lines += _table(rows, right={3})
    return "\n".join(lines)

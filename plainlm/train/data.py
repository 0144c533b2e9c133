"""Training data: text files and directories -> tokenizer -> memory-mapped token files -> batches.

Tokenizers (all serialize to a small JSON-able dict stored with the data and in every checkpoint):
    bpe    byte-level BPE trained on the corpus with HF `tokenizers` (GPT-2 pre-tokenizer regex and
           byte->unicode alphabet, so the vocabulary can be written to GGUF as tokenizer.ggml.model
           "gpt2" / pre "gpt-2" and llama.cpp tokenizes text the same way)
    char   one token per character seen in the corpus
    word   whitespace-separated words (the most frequent vocab_size - 2), plus <unk>
Every tokenizer has id 0 = "<|endoftext|>", appended after each document.

Token file (`train.bin`, `val.bin`), little-endian:
    offset 0   8 bytes   magic b"PLMTOKS\\0"
           8   u32       version (1)
          12   u32       vocab size
          16   u32       bytes per token (2 = uint16, 4 = uint32)
          20   u32       header size (64)
          24   u64       number of tokens
          32   ...       zero padding to 64
          64   tokens
The split is the last `val_fraction` of the token stream (whole stream order is kept).
"""
from __future__ import annotations

import collections
import json
import os
import struct
from pathlib import Path

import numpy as np

EOT = "<|endoftext|>"
MAGIC = b"PLMTOKS\0"
VERSION = 1
HEADER = 64
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}


class DataError(ValueError):
    """A problem with the corpus or token files (reported before training starts)."""


# ------------------------------------------------------------------------------------------------
# reading text
# ------------------------------------------------------------------------------------------------

def corpus_files(paths) -> list[Path]:
    """Files named directly, plus every text file under named directories (recursive, sorted)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                          and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    return out


def read_documents(paths) -> list[str]:
    """One string per file (undecodable bytes replaced); empty files are skipped."""
    docs = []
    for f in corpus_files(paths):
        text = f.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            docs.append(text)
    if not docs:
        raise DataError(f"the corpus {', '.join(map(str, paths if not isinstance(paths, str) else [paths]))} "
                        f"has no text (no non-empty text files)")
    return docs


# ------------------------------------------------------------------------------------------------
# tokenizers
# ------------------------------------------------------------------------------------------------

class BPETokenizer:
    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok                          # tokenizers.Tokenizer
        self.vocab_size = tok.get_vocab_size()
        self.eot = tok.token_to_id(EOT)

    @classmethod
    def train(cls, docs, vocab_size: int):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(docs, trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {"kind": "bpe", "json": self.tok.to_str()}

    def gguf_vocab(self):
        """(tokens, token_types, merges) in GGUF's byte-level BPE form (formats.md 3.3)."""
        d = json.loads(self.tok.to_str())
        vocab = d["model"]["vocab"]
        toks = [None] * len(vocab)
        for t, i in vocab.items():
            toks[i] = t
        specials = {a["id"] for a in d.get("added_tokens", []) if a.get("special")}
        for a in d.get("added_tokens", []):
            if a["id"] >= len(toks):
                toks += [None] * (a["id"] + 1 - len(toks))
            toks[a["id"]] = a["content"]
        types = [3 if i in specials else 1 for i in range(len(toks))]
        merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]
        return toks, types, merges


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: list[str]):
        self.itos = [EOT] + list(chars)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.eot = 0

    @classmethod
    def train(cls, docs, vocab_size: int = 0):
        chars = sorted(set().union(*map(set, docs)))
        return cls(chars)

    def encode(self, text: str) -> list[int]:
        unk = self.stoi.get(" ", 0)
        return [self.stoi.get(c, unk) for c in text]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": "char", "chars": self.itos[1:]}


class WordTokenizer:
    kind = "word"
    UNK = "<unk>"

    def __init__(self, words: list[str]):
        self.itos = [EOT, self.UNK] + list(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.eot = 0

    @classmethod
    def train(cls, docs, vocab_size: int):
        cnt = collections.Counter(w for d in docs for w in d.split())
        keep = max(vocab_size - 2, 1)
        return cls([w for w, _ in sorted(cnt.items(), key=lambda kv: (-kv[1], kv[0]))[:keep]])

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, 1) for w in text.split()]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return " ".join(self.itos[int(i)] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": "word", "words": self.itos[2:]}


TOKENIZERS = {"bpe": BPETokenizer, "char": CharTokenizer, "word": WordTokenizer}


def train_tokenizer(kind: str, docs, vocab_size: int):
    if kind not in TOKENIZERS:
        raise DataError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, not {kind!r}")
    if kind != "char" and vocab_size < (258 if kind == "bpe" else 3):
        raise DataError(f"vocab_size {vocab_size} is too small for a {kind} tokenizer "
                        f"(at least {258 if kind == 'bpe' else 3})")
    return TOKENIZERS[kind].train(docs, vocab_size)


def tokenizer_from_dict(d: dict):
    kind = d.get("kind")
    if kind == "bpe":
        from tokenizers import Tokenizer
        return BPETokenizer(Tokenizer.from_str(d["json"]))
    if kind == "char":
        return CharTokenizer(d["chars"])
    if kind == "word":
        return WordTokenizer(d["words"])
    raise DataError(f"unknown tokenizer kind {kind!r}")


# ------------------------------------------------------------------------------------------------
# token files
# ------------------------------------------------------------------------------------------------

def write_tokens(path, ids: np.ndarray, vocab_size: int) -> None:
    width = 2 if vocab_size <= 65536 else 4
    arr = np.asarray(ids, dtype="<u2" if width == 2 else "<u4")
    head = MAGIC + struct.pack("<IIIIQ", VERSION, vocab_size, width, HEADER, len(arr))
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(head.ljust(HEADER, b"\0"))
        f.write(arr.tobytes())
    os.replace(tmp, path)


def read_tokens(path) -> tuple[np.ndarray, int]:
    """(memory-mapped tokens, vocab size)."""
    with open(path, "rb") as f:
        head = f.read(HEADER)
    if len(head) < 32 or head[:8] != MAGIC:
        raise DataError(f"{path}: not a plainlm token file (bad magic)")
    version, vocab, width, hsize, n = struct.unpack("<IIIIQ", head[8:32])
    if version != VERSION:
        raise DataError(f"{path}: token file version {version}, this plainlm reads {VERSION}")
    if width not in (2, 4):
        raise DataError(f"{path}: bad token width {width}")
    if n == 0:
        return np.zeros(0, np.uint16), vocab
    return np.memmap(path, dtype="<u2" if width == 2 else "<u4", mode="r", offset=hsize, shape=(n,)), vocab


def prepare_data(paths, out_dir, tokenizer: str = "bpe", vocab_size: int = 1024,
                 val_fraction: float = 0.1, min_tokens: int = 2):
    """Tokenize a corpus into out_dir/{train,val}.bin + tokenizer.json. Returns (tokenizer, n_train, n_val).

    Reuses the files when out_dir/prepared.json records the same corpus files (with sizes and
    modification times) and tokenizer settings."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = corpus_files(paths)
    if not files:
        raise DataError(f"the corpus {paths} has no text files")
    stamp = {"files": [[str(f.resolve()), f.stat().st_size, int(f.stat().st_mtime)] for f in files],
             "tokenizer": tokenizer, "vocab_size": vocab_size, "val_fraction": val_fraction}
    marker = out / "prepared.json"
    if marker.exists() and (out / "tokenizer.json").exists():
        try:
            if json.loads(marker.read_text()).get("stamp") == stamp:
                tok = tokenizer_from_dict(json.loads((out / "tokenizer.json").read_text()))
                return tok, len(read_tokens(out / "train.bin")[0]), len(read_tokens(out / "val.bin")[0])
        except (ValueError, OSError, DataError):
            pass
    docs = read_documents(files)
    tok = train_tokenizer(tokenizer, docs, vocab_size)
    ids = []
    for d in tok.encode_batch(docs):
        ids.extend(d)
        ids.append(tok.eot)
    ids = np.asarray(ids, np.int64)
    if len(ids) < min_tokens:
        raise DataError(f"the corpus has only {len(ids)} tokens; need at least {min_tokens}")
    n_val = max(int(len(ids) * val_fraction), min_tokens // 2 if val_fraction > 0 else 0)
    write_tokens(out / "train.bin", ids[:len(ids) - n_val], tok.vocab_size)
    write_tokens(out / "val.bin", ids[len(ids) - n_val:], tok.vocab_size)
    (out / "tokenizer.json").write_text(json.dumps(tok.to_dict()))
    marker.write_text(json.dumps({"stamp": stamp, "n_tokens": int(len(ids))}))
    return tok, len(ids) - n_val, n_val


# ------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------

def get_batch(data: np.ndarray, B: int, T: int, rng: np.random.Generator):
    """B random windows: x[B, T] and the next-token targets y[B, T]."""
    starts = rng.integers(0, len(data) - T, B)
    x = np.stack([np.asarray(data[s:s + T], np.int64) for s in starts])
    y = np.stack([np.asarray(data[s + 1:s + T + 1], np.int64) for s in starts])
    return x, y


def eval_windows(data: np.ndarray, T: int, n: int):
    """Up to n fixed windows spread evenly over data (the same every evaluation): x, y [n', T]."""
    span = len(data) - T - 1
    if span < 0:
        return None
    starts = np.unique(np.linspace(0, span, min(n, span + 1)).astype(np.int64))
    x = np.stack([np.asarray(data[s:s + T], np.int64) for s in starts])
    y = np.stack([np.asarray(data[s + 1:s + T + 1], np.int64) for s in starts])
    return x, y


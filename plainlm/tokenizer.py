"""Text <-> token ids, rebuilt from a GGUF's metadata (or a Hugging Face `tokenizer.json`).

A GGUF carries no `tokenizer.json`, only llama.cpp's description of one (formats.md §3.3): the token
strings, their types, the BPE merges, a pre-tokenizer *name* and the special ids. We turn that back
into a Hugging Face `tokenizers.Tokenizer` (Rust, fast, and the reference the models were trained
with) and keep a little Python around it for the things a generation loop needs.

Byte-level BPE (`tokenizer.ggml.model == "gpt2"`: SmolLM2, Llama-3, BitNet 2B4T) encodes like this:

    text
      -> added tokens (`<|im_start|>` ...) are cut out first and become one id each
      -> pre-tokenizer: split the rest into pieces by a regex that depends on `tokenizer.ggml.pre`
           smollm     every digit alone, then the GPT-2 regex on what is between   (formats.md §4)
           gpt2       the GPT-2 regex
           llama-bpe  the Llama-3 regex: digits in groups of up to 3             (formats.md §1.5)
      -> each piece's UTF-8 bytes are spelled with GPT-2's byte->unicode table (space -> "Ġ")
      -> BPE: apply the merges in rank order inside each piece; look the results up in the vocab

and decodes by concatenating the tokens, mapping each character back to its byte, and reading the
bytes as UTF-8. A single token may hold part of a character (e.g. one byte of a 3-byte CJK char),
which is why `StreamDecoder` buffers bytes instead of decoding token by token.

SentencePiece-style vocabularies (`tokenizer.ggml.model == "llama"`) are supported the way HF's
legacy Llama tokenizer does it: " " -> "▁" (plus a leading "▁"), BPE with merges derived from the
token scores, unknown characters falling back to `<0xAB>` byte tokens.
"""
from __future__ import annotations

import codecs
import json
import os
import warnings
from functools import lru_cache

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# GGUF token types (gguf-py constants.py TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The Llama-3 split regex (formats.md §1.5). `\p{N}{1,3}` is what groups digits in threes.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# `tokenizer.ggml.pre` -> pre-tokenizer family. Names are llama.cpp's (convert_hf_to_gguf.py).
_PRE_FAMILIES = {
    "gpt2": "gpt2", "gpt-2": "gpt2", "default": "gpt2",
    "smollm": "digits", "starcoder": "digits", "refact": "digits",
    "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3",
}

# Texts of tokens that end a turn in common chat formats; any present (as added tokens) stops generation.
_END_OF_TURN_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|eom_id|>",
                      "<|end|>", "<end_of_turn>")


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (openai/gpt-2 encoder.py).

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, ...) are moved to
    U+0100 and up, in byte order. So " " (0x20) becomes "Ġ" (U+0120) and "\\n" becomes "Ċ".
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_unicode().items()}


def _as_list(value) -> list:
    """GGUF numeric arrays arrive as numpy arrays; turn any array into a plain list."""
    return [] if value is None else list(value.tolist() if hasattr(value, "tolist") else value)


def _spm_merges(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges that make HF's BPE behave like SentencePiece BPE, which has no merge list.

    SentencePiece repeatedly joins the adjacent pair whose concatenation is the highest-scoring
    vocabulary entry. Listing every way to split each token into two vocabulary entries, ranked by
    the token's score (ties: the split with the shorter left half first, then by ids), gives the
    same choices -- this is how HF converts Llama's tokenizer.model.
    """
    cands = []
    for token, score in zip(tokens, scores):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                cands.append((-score, len(left), vocab[left], vocab[right], left, right))
    cands.sort()
    return [(c[4], c[5]) for c in cands]


class Tokenizer:
    """An HF `tokenizers.Tokenizer` plus the ids and flags generation needs.

    Attributes: `bos_id`, `eos_id` (int or None), `eot_ids` (ids that end generation), `add_bos`
    (prepend BOS when encoding with add_special=True), `vocab_size`, `chat_template` (str or None),
    `special_ids` (control tokens: never text, skipped by decode(skip_special=True)).
    """

    def __init__(self, hf: HFTokenizer, *, tokens: list[str] | None = None, kind: str = "byte_level",
                 bos_id: int | None = None, eos_id: int | None = None, eot_ids=(), add_bos: bool = False,
                 chat_template: str | None = None, special_ids=(), byte_ids=(),
                 strip_leading_space: bool = False):
        self.hf = hf
        self.kind = kind                       # "byte_level" | "spm" | "other": how token_bytes reads a token
        self.bos_id, self.eos_id = bos_id, eos_id
        self.eot_ids = set(eot_ids)
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template or None
        self.special_ids = set(special_ids)
        self._byte_ids = set(byte_ids)         # spm "<0xAB>" tokens
        self._strip_leading_space = strip_leading_space   # spm decoders drop the prepended "▁"
        self._tokens = tokens if tokens is not None else [
            hf.id_to_token(i) or "" for i in range(hf.get_vocab_size(with_added_tokens=True))]
        self.vocab_size = len(self._tokens)
        self._bytes_cache: dict[int, bytes] = {}

    # ------------------------------------------------------------------------------------ building

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens: cannot build a tokenizer")
        tokens = [str(t) for t in tokens]
        n = len(tokens)
        types = _as_list(meta.get("tokenizer.ggml.token_type")) or [NORMAL] * n
        if len(types) != n:
            raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries, tokenizer.ggml.tokens {n}")

        def special_id(name):
            v = meta.get(f"tokenizer.ggml.{name}_token_id")
            return int(v) if v is not None and 0 <= int(v) < n else None

        bos, eos, eot, eom, unk = (special_id(k) for k in ("bos", "eos", "eot", "eom", "unknown"))

        # The vocab is keyed by the token strings exactly as stored. Normal byte-level tokens are
        # already in the GPT-2 byte alphabet; control tokens keep their literal text, which is what
        # the added-token matcher below looks for, so both resolve to the file's ids.
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t in vocab:
                # llama.cpp keeps the first too. The later id can still be decoded via token_bytes.
                warnings.warn(f"GGUF vocab repeats token {t!r} (ids {vocab[t]} and {i}); keeping the first")
            else:
                vocab[t] = i

        arch = str(meta.get("general.architecture", ""))
        if model == "gpt2":
            hf, add_bos_default = cls._byte_level_bpe(meta, vocab, arch)
            kind, strip = "byte_level", False
        elif model == "llama":
            scores = _as_list(meta.get("tokenizer.ggml.scores"))
            if len(scores) != n:
                raise ValueError("tokenizer.ggml.model is 'llama' but tokenizer.ggml.scores is missing or "
                                 f"has {len(scores)} entries for {n} tokens")
            add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            unk_text = tokens[unk] if unk is not None else None
            hf = cls._spm_bpe(tokens, scores, vocab, unk_text, add_prefix)
            kind, strip, add_bos_default = "spm", add_prefix, True   # llama.cpp's SPM default is BOS on
        elif model is None:
            raise ValueError("GGUF metadata has no tokenizer.ggml.model: cannot tell which tokenizer to build")
        else:
            raise NotImplementedError(f"tokenizer.ggml.model = {model!r} is not supported "
                                      "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)")

        # Added tokens are matched in the raw text before pre-tokenization, so "<|im_start|>" in a
        # prompt is one id rather than "<", "|", "im", ... Control (and unknown) tokens are special:
        # not text, hidden by decode(skip_special=True). User-defined ones (like "<think>") are matched
        # whole but stay text. Without a type array, at least the declared special ids are protected.
        special = {i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)}
        if "tokenizer.ggml.token_type" not in meta:
            special |= {i for i in (bos, eos, eot, eom, unk) if i is not None}
        user = [i for i, t in enumerate(types) if t == USER_DEFINED]
        special = {i for i in special if vocab.get(tokens[i]) == i}    # skip repeated strings
        hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special)])
        hf.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                       for i in user if vocab.get(tokens[i]) == i])

        eot_ids = {i for i in (eos, eot, eom) if i is not None}
        eot_ids |= {vocab[t] for t in _END_OF_TURN_TEXTS if t in vocab and vocab[t] in special}
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        return cls(hf, tokens=tokens, kind=kind, bos_id=bos, eos_id=eos, eot_ids=eot_ids,
                   add_bos=add_bos_default if add_bos is None else bool(add_bos),
                   chat_template=meta.get("tokenizer.chat_template"), special_ids=special,
                   byte_ids={i for i, t in enumerate(types) if t == BYTE}, strip_leading_space=strip)

    @staticmethod
    def _byte_level_bpe(meta: dict, vocab: dict[str, int], arch: str) -> tuple[HFTokenizer, bool]:
        """Byte-level BPE from `tokenizer.ggml.merges`; returns (tokenizer, default for add_bos)."""
        merges = []
        for m in meta.get("tokenizer.ggml.merges") or []:
            # "left right"; like llama.cpp, split at the first space after position 0.
            cut = m.find(" ", 1)
            if cut < 0:
                raise ValueError(f"tokenizer.ggml.merges entry {m!r} is not 'left right'")
            merges.append((m[:cut], m[cut + 1:]))

        pre = meta.get("tokenizer.ggml.pre")
        if pre is None:
            # BitNet 2B4T's GGUF omits `pre` but its vocab is Llama-3's (formats.md §1.5).
            family = "llama3" if arch.startswith("bitnet") else "gpt2"
        elif pre in _PRE_FAMILIES:
            family = _PRE_FAMILIES[pre]
        else:
            raise ValueError(f"unsupported tokenizer.ggml.pre = {pre!r} "
                             f"(supported: {', '.join(sorted(_PRE_FAMILIES))})")

        # Llama-3 sets ignore_merges: a pre-token that is itself in the vocab is emitted whole even if
        # the merges would not build it (HF tokenizer.json and llama.cpp both do this).
        hf = HFTokenizer(models.BPE(vocab, merges, ignore_merges=(family == "llama3")))
        byte_level_no_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        if family == "gpt2":
            # ByteLevel's built-in regex *is* the GPT-2 one.
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        elif family == "digits":
            # HF's SmolLM2/StarCoder tokenizer.json: Digits(individual) first, then ByteLevel's GPT-2
            # regex on each stretch between digits. Order matters: "  1" gives "ĠĠ","1", not "Ġ","Ġ","1".
            hf.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        else:
            hf.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), byte_level_no_regex])
        hf.decoder = decoders.ByteLevel()
        # llama.cpp turns BOS on for the Llama-3 family unless the file says otherwise.
        return hf, family == "llama3"

    @staticmethod
    def _spm_bpe(tokens, scores, vocab, unk_text, add_prefix) -> HFTokenizer:
        """SentencePiece BPE as HF's legacy Llama tokenizer.json spells it."""
        hf = HFTokenizer(models.BPE(vocab, _spm_merges(tokens, [float(s) for s in scores], vocab),
                                    unk_token=unk_text, fuse_unk=True, byte_fallback=True))
        # Spaces become "▁"; a "▁" is prepended to every stretch of text (llama.cpp: after every
        # special token too, which is what a normalizer does since added tokens are cut out first).
        norm = [normalizers.Replace(" ", "\u2581")]
        if add_prefix:
            norm.insert(0, normalizers.Prepend("\u2581"))
        hf.normalizer = normalizers.Sequence(norm)
        dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix:
            dec.append(decoders.Strip(" ", 1, 0))
        hf.decoder = decoders.Sequence(dec)
        return hf

    @classmethod
    def from_model(cls, model) -> "Tokenizer":
        """The tokenizer a loaded model carries: GGUF metadata, or the HF directory it came from."""
        meta = model.metadata
        if "tokenizer.ggml.tokens" in meta:
            return cls.from_gguf_metadata(meta)
        if meta.get("plainlm.hf_dir"):
            return cls.from_hf_dir(meta["plainlm.hf_dir"])
        raise ValueError(f"{model.source or 'model'}: carries no tokenizer (no tokenizer.ggml.* metadata "
                         f"and no tokenizer.json)")

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a Hugging Face checkpoint directory's tokenizer.json (+ tokenizer_config.json)."""
        path = os.fspath(path)
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise FileNotFoundError(f"{path} has no tokenizer.json")
        hf = HFTokenizer.from_file(tj)

        def read_json(name):
            p = os.path.join(path, name)
            if not os.path.exists(p):
                return {}
            with open(p, encoding="utf-8") as f:
                return json.load(f)

        cfg, gen = read_json("tokenizer_config.json"), read_json("generation_config.json")
        model_cfg = read_json("config.json")

        def token_id(v):
            if isinstance(v, dict):                # {"content": "<s>", ...}
                v = v.get("content")
            return hf.token_to_id(v) if isinstance(v, str) else None

        bos, eos = token_id(cfg.get("bos_token")), token_id(cfg.get("eos_token"))
        if bos is None and isinstance(model_cfg.get("bos_token_id"), int):
            bos = model_cfg["bos_token_id"]
        if eos is None and isinstance(model_cfg.get("eos_token_id"), int):
            eos = model_cfg["eos_token_id"]

        template = cfg.get("chat_template")
        if isinstance(template, list):             # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.exists(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()

        added = hf.get_added_tokens_decoder()
        special = {i for i, t in added.items() if t.special}
        eot = {i for i in (eos,) if i is not None}
        for src in (gen.get("eos_token_id"), model_cfg.get("eos_token_id")):
            eot |= set(src) if isinstance(src, list) else ({src} if isinstance(src, int) else set())
        eot |= {hf.token_to_id(t) for t in _END_OF_TURN_TEXTS if hf.token_to_id(t) in special}

        # Does the file's post-processor prepend BOS? tokenizer_config's flag wins if present.
        add_bos = cfg.get("add_bos_token")
        if add_bos is None and bos is not None:
            with_special = hf.encode("a", add_special_tokens=True).ids
            plain = hf.encode("a", add_special_tokens=False).ids
            add_bos = with_special[:1] == [bos] and plain[:1] != [bos]

        dec = json.dumps(json.loads(hf.to_str()).get("decoder"))
        kind = "byte_level" if '"ByteLevel"' in dec else "spm" if '"ByteFallback"' in dec else "other"
        byte_ids = set()
        if kind == "spm":
            byte_ids = {i for i in range(hf.get_vocab_size()) if _is_byte_token(hf.id_to_token(i) or "")}
        return cls(hf, kind=kind, bos_id=bos, eos_id=eos, eot_ids=eot, add_bos=bool(add_bos),
                   chat_template=template, special_ids=special, byte_ids=byte_ids,
                   strip_leading_space=kind == "spm" and '"Strip"' in dec)

    # ------------------------------------------------------------------------------------ using

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        """Token ids for `text`. Special-token text in it (e.g. "<|im_start|>") becomes its id.

        BOS is prepended only when `add_special` and the model wants it (`add_bos`); chat templates
        usually write their own, which is why the default is False.
        """
        # add_special_tokens=False: the tokenizer.json post-processor (if any) is never used; BOS is ours.
        return self._with_bos(self.hf.encode(text, add_special_tokens=False).ids, add_special)

    def encode_batch(self, texts: list[str], add_special: bool = False) -> list[list[int]]:
        """encode() over many texts at once (the Rust side runs them in parallel)."""
        return [self._with_bos(e.ids, add_special)
                for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def _with_bos(self, ids: list[int], add_special: bool) -> list[int]:
        # a text that already starts with the BOS token (a rendered chat template) gets no second one
        want = add_special and self.add_bos and self.bos_id is not None
        return [self.bos_id] + ids if want and ids[:1] != [self.bos_id] else ids

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD (as HF does)."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_bytes(self, id: int) -> bytes:
        """The exact bytes token `id` stands for (special tokens: their literal text, UTF-8)."""
        id = int(id)
        b = self._bytes_cache.get(id)
        if b is None:
            b = self._bytes_cache[id] = self._compute_bytes(id)
        return b

    def _compute_bytes(self, id: int) -> bytes:
        if not 0 <= id < self.vocab_size:
            raise IndexError(f"token id {id} out of range (vocab size {self.vocab_size})")
        text = self._tokens[id]
        if id in self.special_ids:
            return text.encode("utf-8")
        if self.kind == "byte_level":
            u2b = _unicode_to_byte()
            if all(c in u2b for c in text):
                return bytes(u2b[c] for c in text)
            return text.encode("utf-8")            # HF's ByteLevel decoder does the same for such tokens
        if self.kind == "spm":
            if id in self._byte_ids or _is_byte_token(text):
                return bytes([int(text[3:5], 16)])
            return text.replace("\u2581", " ").encode("utf-8")
        return self.hf.decode([id], skip_special_tokens=False).encode("utf-8")

    def token_text(self, id: int) -> str:
        """One token's bytes as display text; a partial UTF-8 character shows as "\\xe4"."""
        return self.token_bytes(id).decode("utf-8", errors="backslashreplace")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kw) -> str:
        """The model's chat template (ChatML if it has none) applied to `messages`."""
        from .chat import render_chat
        tok = lambda i: self._tokens[i] if i is not None else ""
        kw.setdefault("bos_token", tok(self.bos_id))
        kw.setdefault("eos_token", tok(self.eos_id))
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt, **kw)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, eot={sorted(self.eot_ids)}, add_bos={self.add_bos})")


def _is_byte_token(text: str) -> bool:
    """SentencePiece byte-fallback tokens are spelled "<0xAB>"."""
    return len(text) == 6 and text.startswith("<0x") and text.endswith(">") and \
        all(c in "0123456789abcdefABCDEF" for c in text[3:5])


class StreamDecoder:
    """Turn ids into text one at a time, as they are generated.

    A token may end in the middle of a UTF-8 character (byte-level BPE splits rare characters into
    byte tokens), so we feed raw bytes to an incremental UTF-8 decoder: it holds back an incomplete
    sequence until the rest arrives and replaces invalid bytes with U+FFFD exactly like the full
    decode does, so the concatenation of all push() results plus flush() equals decode(ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tok = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False         # for SentencePiece: the very first space is the prepended one

    def push(self, id: int) -> str:
        if self.skip_special and int(id) in self.tok.special_ids:
            return ""
        return self._emit(self._utf8.decode(self.tok.token_bytes(id)))

    def flush(self) -> str:
        """Whatever is still buffered (an unfinished character comes out as U+FFFD)."""
        out = self._emit(self._utf8.decode(b"", final=True))
        self._utf8.reset()
        return out

    def _emit(self, text: str) -> str:
        if text and not self._started:
            self._started = True
            if self.tok._strip_leading_space and text.startswith(" "):
                text = text[1:]
        return text

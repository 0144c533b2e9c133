"""ModelConfig: the architecture of a model, read from the file's own metadata, never guessed."""
from __future__ import annotations

from dataclasses import asdict, dataclass


class ConfigError(ValueError):
    """The model file's metadata does not describe an architecture plainlm can run."""


# GGUF general.architecture -> plainlm variant
ARCHS = {"llama": "llama", "bitnet": "bitnet", "bitnet-b1.58": "bitnet", "gpt2": "gpt2"}


@dataclass(frozen=True)
class ModelConfig:
    arch: str                 # "llama" | "bitnet" | "gpt2"
    vocab_size: int           # V
    dim: int                  # D
    n_layers: int             # L
    n_heads: int              # H
    n_kv_heads: int           # Hkv
    head_dim: int             # Dh
    ffn_dim: int              # F
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_dim: int = 0         # rotated dims per head (0 = all of Dh)
    context_length: int = 2048
    tied_embeddings: bool = True
    act: str = "silu"         # silu (SwiGLU) | relu2 (BitNet) | gelu (GPT-2)

    def __post_init__(self):
        for f in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                  "context_length"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{f} must be a positive integer, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.arch not in ("llama", "bitnet", "gpt2"):
            raise ConfigError(f"unknown architecture {self.arch!r}")

    @property
    def rotary_dim(self) -> int:
        return self.rope_dim or self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @classmethod
    def from_gguf(cls, meta: dict, tensor_names=(), source: str = "") -> "ModelConfig":
        arch_key = str(meta.get("general.architecture", ""))
        where = f"{source}: " if source else ""
        if arch_key not in ARCHS:
            raise ConfigError(f"{where}unknown architecture general.architecture = {arch_key!r} "
                              f"(plainlm runs: {', '.join(sorted(ARCHS))})")

        def get(key, default=None, cast=int):
            full = f"{arch_key}.{key}"
            if full not in meta:
                if default is None:
                    raise ConfigError(f"{where}missing metadata field '{full}'")
                return default
            try:
                return cast(meta[full])
            except (TypeError, ValueError):
                raise ConfigError(f"{where}metadata field '{full}' = {meta[full]!r} is not a {cast.__name__}") from None

        dim = get("embedding_length")
        n_heads = get("attention.head_count")
        head_dim = get("attention.key_length", dim // n_heads if n_heads else 1)
        vocab = meta.get(f"{arch_key}.vocab_size")
        if vocab is None:
            toks = meta.get("tokenizer.ggml.tokens")
            if toks is None:
                raise ConfigError(f"{where}neither '{arch_key}.vocab_size' nor tokenizer.ggml.tokens present")
            vocab = len(toks)
        arch = ARCHS[arch_key]
        return cls(
            arch=arch,
            vocab_size=int(vocab),
            dim=dim,
            n_layers=get("block_count"),
            n_heads=n_heads,
            n_kv_heads=get("attention.head_count_kv", n_heads),
            head_dim=head_dim,
            ffn_dim=get("feed_forward_length"),
            norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5, float),
            rope_theta=get("rope.freq_base", 10000.0 if arch == "llama" else 500000.0, float),
            rope_dim=get("rope.dimension_count", 0),
            context_length=get("context_length", 2048),
            tied_embeddings="output.weight" not in set(tensor_names),
            act={"llama": "silu", "bitnet": "relu2", "gpt2": "gelu"}[arch],
        )

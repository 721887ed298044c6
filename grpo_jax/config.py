"""Frozen, keyword-only configuration dataclasses.

Every field is declared here with its meaning; `__post_init__` rejects bad values with a message
that names the field and the allowed range. Derived values are properties, never written back.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

DType = Literal["float32", "bfloat16", "float16"]
Arch = Literal["qwen2", "qwen3", "llama"]
SUPPORTED_ARCHS: tuple[str, ...] = ("qwen2", "qwen3", "llama")


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{field}: {msg}")


def _check_choice(value, field: str, allowed) -> None:
    _check(value in allowed, field, f"got {value!r}, allowed values are {sorted(allowed)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling. `kind="llama3"` is Llama 3.1's NTK-by-parts rule; "linear" divides
    every frequency by `factor`."""

    kind: Literal["llama3", "linear"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        _check_choice(self.kind, "rope_scaling.kind", ("llama3", "linear"))
        _check(self.factor > 0, "rope_scaling.factor", f"must be > 0, got {self.factor}")
        if self.kind == "llama3":
            _check(self.high_freq_factor > self.low_freq_factor, "rope_scaling.high_freq_factor",
                   f"must exceed low_freq_factor ({self.low_freq_factor}), got {self.high_freq_factor}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder-only transformer of the Llama / Qwen2 / Qwen3 family.

    Shapes legend (SPEC.md section 6): D = hidden_size, H = num_heads, K = num_kv_heads,
    Hd = head_dim, F = intermediate_size, V = vocab_size.
    """

    arch: Arch = "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projection biases (Qwen2 / Qwen2.5)
    attention_out_bias: bool = False  # o-projection bias (Llama with attention_bias=True)
    qk_norm: bool = False  # RMSNorm on queries and keys per head (Qwen3)
    max_position_embeddings: int = 32768
    param_dtype: DType = "float32"
    compute_dtype: DType = "float32"  # matmuls; softmax, norms and log-probs stay float32
    remat: bool = False  # rematerialize each layer in the backward pass
    logits_chunk: int = 1024  # sequence chunk for log-probs, bounds the live [N, chunk, V] logits

    def __post_init__(self):
        _check_choice(self.arch, "arch", SUPPORTED_ARCHS)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "logits_chunk"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
               f"must divide num_heads={self.num_heads}, got {self.num_kv_heads}")
        if self.head_dim is None:
            _check(self.hidden_size % self.num_heads == 0, "head_dim",
                   f"is None, so num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        else:
            _check(self.head_dim >= 2 and self.head_dim % 2 == 0, "head_dim",
                   f"must be an even number >= 2 (RoPE rotates pairs), got {self.head_dim}")
        for name in ("param_dtype", "compute_dtype"):
            _check_choice(getattr(self, name), name, ("float32", "bfloat16", "float16"))

    @property
    def hd(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def num_params(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.hd
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.attention_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.attention_out_bias:
            attn += d
        if self.qk_norm:
            attn += 2 * hd
        layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + d


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    """Decoding settings. `temperature == 0` means greedy. top_k = 0 and top_p = 1 disable those
    filters. Log-probs under the temperature-1 policy are always returned beside the sampling ones."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    prompt_bucket: int = 16  # prompt lengths are padded up to a multiple of this: no recompiles

    def __post_init__(self):
        _check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(self.temperature >= 0, "temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        _check(self.top_k >= 0, "top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.prompt_bucket >= 1, "prompt_bucket", f"must be >= 1, got {self.prompt_bucket}")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

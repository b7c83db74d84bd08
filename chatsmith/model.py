"""The model: a Qwen3-shaped decoder-only transformer (helper fills in GPT)."""

from __future__ import annotations

from dataclasses import dataclass, field


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    depth: int = _opt(4, "number of transformer blocks; the one dial that sets width and heads (width = depth * aspect)")
    aspect: int = _opt(64, "width per layer of depth when --n-embd is not given")
    n_embd: int = _opt(0, "model width; 0 derives it from --depth")
    head_dim: int = _opt(64, "width of one attention head")
    n_head: int = _opt(0, "query heads; 0 derives n_embd // head_dim")
    n_kv_head: int = _opt(0, "key/value heads for grouped-query attention; 0 means as many as query heads")
    intermediate_size: int = _opt(0, "SwiGLU hidden width; 0 derives 3 * n_embd")
    vocab_size: int = _opt(0, "vocabulary size; 0 takes it from the run's tokenizer")
    seq_len: int = _opt(512, "context length in tokens")
    rope_theta: float = _opt(10000.0, "RoPE base frequency")
    norm_eps: float = _opt(1e-6, "RMSNorm epsilon")
    tie_embeddings: bool = _opt(False, "share the input embedding with the output head")

"""Benchmarks: JSON out, every number beside a baseline measured in the same process run.

    chatsmith bench train --json      # tokens/s, model FLOP/s and MFU on bench-ref, beside HF transformers + AdamW
                                      # and beside the step's matmuls + attention alone (the kernel floor);
                                      # peak memory of each trainer's steps, each in a fresh process
    chatsmith bench data --json       # data prepare throughput in MB/s, 1 worker beside N workers
    chatsmith bench decode --json     # greedy decode tok/s on bench-ref beside HF generate; 8 sequences batched
    chatsmith bench serve --json      # the server under load on loopback

One module per benchmark (train.py, data.py, decode.py, serve.py); this file holds what they share: the JSON/table
printer, the bench-ref shape, a tokenizer that covers any vocabulary and seeded random weights.

This machine is noisy: we quote medians, interleave the contenders step by step so that both see the same noise, and
report ratios. Speed is never asserted in tests; the numbers go into issue notes and the README's measured table with
the command that made them.
"""

from __future__ import annotations

import json

from ..common import UserError
from ..model import ModelConfig


def emit(result: dict, as_json: bool) -> None:
    """Print a benchmark result: JSON on stdout with --json, else an aligned key/value table."""
    if as_json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k.ljust(width)}  {v:,.4g}" if isinstance(v, float) else f"{k.ljust(width)}  {v}")



def bench_ref() -> ModelConfig:
    """The named reference shape: 4 layers, width 256, 4 heads of 64, vocab 8192, seq 512."""
    return ModelConfig(depth=4, n_embd=256, head_dim=64, n_head=4, n_kv_head=4, intermediate_size=768,
                       vocab_size=8192, seq_len=512)


def bench_ref_with(depth: int = 0, n_embd: int = 0, head_dim: int = 0, vocab_size: int = 0,
                   seq_len: int = 0) -> ModelConfig:
    """bench-ref, resolved, with the non-zero overrides (heads and MLP width then derived from width and head_dim)."""
    import dataclasses

    cfg = bench_ref()
    if depth:
        cfg = dataclasses.replace(cfg, depth=depth)
    if n_embd or head_dim:
        cfg = dataclasses.replace(cfg, n_embd=n_embd or cfg.n_embd, head_dim=head_dim or cfg.head_dim, n_head=0,
                                  n_kv_head=0, intermediate_size=0)
    if vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    if seq_len:
        cfg = dataclasses.replace(cfg, seq_len=seq_len)
    return cfg.resolve()



def bench_tokenizer(vocab_size: int):
    """A byte-level BPE Tokenizer with exactly `vocab_size` ids, built without training: the specials, the 256 bytes,
    then byte pairs. Random weights may emit any id, so the engine's tokenizer must cover the whole model vocabulary
    (it masks ids beyond its own) and its streaming decode path runs as in serving."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from ..tokenizer import ALL_SPECIALS, N_SPECIAL, Tokenizer, bytes_to_unicode

    if vocab_size < N_SPECIAL + 256:
        raise UserError(f"--vocab-size must be at least {N_SPECIAL + 256} (specials + 256 bytes), not {vocab_size}")
    chars = list(bytes_to_unicode().values())
    vocab = {name: i for i, name in enumerate(ALL_SPECIALS)} | {c: N_SPECIAL + i for i, c in enumerate(chars)}
    pairs = [(a, b) for a in chars for b in chars][:vocab_size - len(vocab)]
    vocab |= {a + b: len(vocab) + i for i, (a, b) in enumerate(pairs)}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(list(ALL_SPECIALS))
    return Tokenizer(hf)


def _randomize(model, seed: int) -> None:
    """Seeded random weights everywhere (init_weights leaves o_proj/down_proj at zero and the head tiny, which makes
    near-ties among logits): matrices N(0, 1/fan_in), the embedding N(0, 1), norm weights U(0.5, 1.5). Logits are then
    ~N(0, 1) with clear winners, so greedy tokens do not hinge on rounding differences between implementations."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name == "embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.size(1) ** 0.5)


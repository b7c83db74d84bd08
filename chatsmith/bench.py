"""Benchmarks: JSON out, every number beside a baseline measured in the same process run.

    chatsmith bench train --json      # tokens/s, model FLOP/s and MFU on bench-ref, beside HF transformers + AdamW
    chatsmith bench data --json       # data prepare throughput in MB/s, 1 worker beside N workers

This machine is noisy: we quote medians, interleave the contenders step by step so that both see the same noise, and
report ratios. Speed is never asserted in tests; the numbers go into issue notes with the command that made them.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass

from .config import DataConfig, RunConfig, ShardConfig, opt
from .model import ModelConfig


def emit(result: dict, as_json: bool) -> None:
    """Print a benchmark result: JSON on stdout with --json, else an aligned key/value table."""
    if as_json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k.ljust(width)}  {v:,.4g}" if isinstance(v, float) else f"{k.ljust(width)}  {v}")


# ---------------------------------------------------------------------------------------------------------------------
# bench train


def bench_ref() -> ModelConfig:
    """The named reference shape: 4 layers, width 256, 4 heads of 64, vocab 8192, seq 512."""
    return ModelConfig(depth=4, n_embd=256, head_dim=64, n_head=4, n_kv_head=4, intermediate_size=768,
                       vocab_size=8192, seq_len=512)


@dataclass(frozen=True)
class TrainBenchConfig:
    batch: int = opt(8, "sequences per step")
    warmup: int = opt(3, "untimed warm-up steps per contender")
    steps: int = opt(10, "timed steps per contender (the median is reported)")
    threads: int = opt(0, "torch intra-op threads; 0 leaves torch's default")
    precision: str = opt("auto", "auto (bf16 where the hardware has it), bf16 or fp32, for both contenders")
    hf: bool = opt(True, "also time HF transformers Qwen3ForCausalLM + torch.optim.AdamW (needs transformers)")
    json: bool = opt(False, "print JSON on stdout")


@dataclass(frozen=True)
class TrainBench:
    bench: TrainBenchConfig = TrainBenchConfig()


def _hf_contender(model_cfg: ModelConfig, chatsmith_model):
    """Qwen3ForCausalLM with the same weights, trained with fused/foreach torch.optim.AdamW."""
    import torch

    from .common import require

    transformers = require("transformers", "transformers", "the HF baseline of bench train")
    hf_cfg = transformers.Qwen3Config(**chatsmith_model.hf_config_dict(), attn_implementation="sdpa")
    model = transformers.Qwen3ForCausalLM(hf_cfg)
    model.load_state_dict(chatsmith_model.to_hf_state_dict())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95), foreach=True)

    def step(x, y):
        loss = model(input_ids=x, labels=None).logits
        loss = torch.nn.functional.cross_entropy(loss.view(-1, loss.size(-1)).float(), y.view(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def train_main(cfg: TrainBench) -> dict:
    import torch

    from .common import autocast_dtype, matmul_peak_flops
    from .config import OptimConfig
    from .model import GPT
    from .optim import build_optimizer
    from .train import autocast

    b = cfg.bench
    if b.threads:
        torch.set_num_threads(b.threads)
    torch.manual_seed(0)
    mcfg = bench_ref().resolve()
    dtype = autocast_dtype("cpu", b.precision)
    peaks = {"fp32": matmul_peak_flops("float32"), "bf16": matmul_peak_flops("bfloat16")}

    model = GPT.build(mcfg, device="cpu")
    optimizer = build_optimizer(model, OptimConfig())
    contenders = {}

    def chatsmith_step(x, y):
        with autocast("cpu", dtype):
            loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    contenders["chatsmith"] = chatsmith_step
    if b.hf:
        hf_step = _hf_contender(mcfg, model)

        def hf_autocast_step(x, y):
            with autocast("cpu", dtype):
                return hf_step(x, y)

        contenders["hf_transformers"] = hf_autocast_step

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, mcfg.vocab_size, (b.batch, mcfg.seq_len + 1), generator=gen)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(b.warmup):
        for fn in contenders.values():
            fn(x, y)
    for _ in range(b.steps):  # interleaved: both contenders see the same machine noise
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn(x, y)
            times[name].append(time.perf_counter() - t0)

    tokens_per_step = b.batch * mcfg.seq_len
    flops_per_token = model.flops_per_token()
    result: dict = {
        "config": "bench-ref", "params": model.num_params(), "flops_per_token": flops_per_token,
        "batch": b.batch, "seq_len": mcfg.seq_len, "threads": torch.get_num_threads(),
        "precision": "bf16" if dtype is not None else "fp32",
        "peak_fp32_flops": peaks["fp32"], "peak_bf16_flops": peaks["bf16"],
    }
    for name, ts in times.items():
        med = statistics.median(ts)
        tok_s = tokens_per_step / med
        result[f"{name}_step_s"] = med
        result[f"{name}_tok_s"] = tok_s
        result[f"{name}_mfu_fp32"] = flops_per_token * tok_s / peaks["fp32"]
        result[f"{name}_mfu_bf16"] = flops_per_token * tok_s / peaks["bf16"]
    result["chatsmith_model_flops"] = flops_per_token * result["chatsmith_tok_s"]
    if "hf_transformers" in times:
        result["speedup_vs_hf"] = result["chatsmith_tok_s"] / result["hf_transformers_tok_s"]
    emit(result, b.json)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# bench data


@dataclass(frozen=True)
class DataBenchConfig:
    repeats: int = opt(3, "timed runs per contender (the median is reported)")
    rust_threads: bool = opt(True, "also time one process that uses the tokenizers library's own threads")
    json: bool = opt(False, "print JSON on stdout")


@dataclass(frozen=True)
class DataBench:
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    shards: ShardConfig = ShardConfig()
    bench: DataBenchConfig = DataBenchConfig()


def data_main(cfg: DataBench) -> dict:
    """The shard step of `data prepare` on the run's train documents, 1 pool worker beside N (and the library's own
    threads), each run into a fresh temp dir; documents come from the run, else from the sources into a temp dir."""
    import os
    import tempfile
    from pathlib import Path

    from .common import log, run_dir
    from .data import shards
    from .tokenizer import Tokenizer

    run = run_dir(cfg.run.run)
    tok_path = shards.tokenizer_file(run, cfg.run.run)
    vocab = Tokenizer.load(run / "tokenizer").vocab_size
    n_workers = cfg.shards.workers or os.cpu_count() or 1
    contenders = {"workers_1": (1, True)}
    if n_workers > 1:
        contenders[f"workers_{n_workers}"] = (n_workers, True)
    if cfg.bench.rust_threads:
        contenders["rust_threads"] = (1, False)
    with tempfile.TemporaryDirectory(prefix="chatsmith-bench-data-") as tmp:
        doc_dir = run / "documents"
        if shards.documents_index(cfg.data, doc_dir) is None:
            log(f"run {cfg.run.run!r} has no documents for this data config; reading the sources into {tmp}")
            doc_dir = Path(tmp) / "documents"
            shards.prepare_documents(cfg.data, doc_dir)
        times: dict[str, list[float]] = {name: [] for name in contenders}
        records = []
        for r in range(cfg.bench.repeats):  # interleaved: every contender sees the same machine noise
            for name, (workers, pool) in contenders.items():
                out = Path(tmp) / f"{name}_{r}"
                t0 = time.perf_counter()
                records = shards.tokenize_split(doc_dir / "train.jsonl", out, tok_path, cfg.shards.shard_docs,
                                                workers, shards.shard_dtype(vocab), desc=name, pool=pool)
                times[name].append(time.perf_counter() - t0)
                shutil.rmtree(out)
    text_bytes = sum(rec["text_bytes"] for rec in records)
    tokens = sum(rec["tokens"] for rec in records)
    docs = sum(rec["docs"] for rec in records)
    result: dict = {"documents": docs, "text_mb": text_bytes / 1e6, "tokens": tokens, "vocab_size": vocab,
                    "shard_docs": cfg.shards.shard_docs, "cpus": os.cpu_count(), "repeats": cfg.bench.repeats}
    for name, ts in times.items():
        med = statistics.median(ts)
        result[f"{name}_s"] = med
        result[f"{name}_text_mb_s"] = text_bytes / 1e6 / med
        result[f"{name}_tok_s"] = tokens / med
        result[f"{name}_docs_s"] = docs / med
    for name in contenders:
        if name != "workers_1":
            result[f"speedup_{name}_vs_workers_1"] = result["workers_1_s"] / result[f"{name}_s"]
    emit(result, cfg.bench.json)
    return result

"""`chatsmith bench data`: data prepare throughput, 1 worker beside N."""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass

from ..config import DataConfig, RunConfig, ShardConfig, opt
from . import emit


@dataclass(frozen=True)
class DataBenchConfig:
    repeats: int = opt(3, "timed runs per contender (the median is reported)", min=1, max=1000)
    rust_threads: bool = opt(True, "also time one process that uses the tokenizers library's own threads")
    json: bool = opt(False, "print JSON on stdout")


@dataclass(frozen=True)
class DataBench:
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    shards: ShardConfig = ShardConfig()
    bench: DataBenchConfig = DataBenchConfig()


def main(cfg: DataBench) -> dict:
    """The shard step of `data prepare` on the run's train documents, 1 pool worker beside N (and the library's own
    threads), each run into a fresh temp dir; documents come from the run, else from the sources into a temp dir."""
    import os
    import tempfile
    from pathlib import Path

    from ..common import log, run_dir
    from ..data import shards
    from ..tokenizer import Tokenizer

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


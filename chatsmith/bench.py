"""Benchmarks: JSON out, every number beside a baseline measured in the same process run.

    chatsmith bench train --json      # tokens/s, model FLOP/s and MFU on bench-ref, beside HF transformers + AdamW
                                      # and beside the step's matmuls + attention alone (the kernel floor);
                                      # peak memory of each trainer's steps, each in a fresh process
    chatsmith bench data --json       # data prepare throughput in MB/s, 1 worker beside N workers
    chatsmith bench decode --json     # greedy decode tok/s on bench-ref beside HF generate; 8 sequences batched

This machine is noisy: we quote medians, interleave the contenders step by step so that both see the same noise, and
report ratios. Speed is never asserted in tests; the numbers go into issue notes with the command that made them.

bench decode, measured (bench-ref, random weights, fp32, prompt 64, 128 greedy tokens, 2-core Xeon busy with a
training run, medians of 5 interleaved runs, two runs): 1 thread: engine 223-275 tok/s, HF generate 182-239 tok/s
(1.15-1.22x), 8 sequences 928-1158 tok/s (4.2x one stream), greedy tokens identical to HF's; 2 threads: 18 vs 16
tok/s, ~12x slower, because each tiny op waits for the other, busy core. On the same machine idle: 1 thread engine
279 vs HF 255 tok/s (1.09x), 8 sequences 4.16x; 2 threads 331 vs 318 (1.04x), 8 sequences 4.88x. --threads 1 is the
default because it degrades gracefully when other work shares the cores.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from .common import UserError
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
    floor: bool = opt(True, "also time the step's matmuls and attention alone (kernel_floor): the bound on any speedup")
    memory: bool = opt(True, "also measure the peak memory each trainer's steps add, each in a fresh process")
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


def _kernel_floor(model, batch: int, dtype):
    """A step of bench-ref reduced to its unavoidable kernels, on random data: each nn.Linear's three matmuls
    (forward, input gradient, weight gradient) over the batch's B*T rows, lm_head in the loss's 512-row chunks, and
    causal SDPA forward + backward per layer; no norms, activations, softmax of the loss or optimizer. No trainer built
    on these torch CPU kernels takes a step faster, so hf_step / floor_step bounds the speedup any such trainer can show
    against the HF baseline. dtype: the contenders' autocast dtype (None = fp32)."""
    import torch
    import torch.nn.functional as F

    cfg, rows, dt = model.config, batch * model.config.seq_len, dtype or torch.float32
    chunk = min(512, rows)
    linears = [m.weight.detach().to(dt) for block in model.blocks for m in block.modules()
               if isinstance(m, torch.nn.Linear)]
    acts = {n: torch.randn(rows, n, dtype=dt) for w in linears for n in w.shape}  # (B*T, n) inputs and output grads
    head = model.head_weight().detach().to(dt)  # (V, C)
    head_x, head_g = torch.randn(chunk, cfg.n_embd, dtype=dt), torch.randn(chunk, cfg.vocab_size, dtype=dt)
    head_grad = torch.zeros_like(head)
    qkv = [torch.randn(batch, h, cfg.seq_len, cfg.head_dim, dtype=dt, requires_grad=True)
           for h in (cfg.n_head, cfg.n_kv_head, cfg.n_kv_head)]  # (B, heads, T, head_dim)
    grad_attn = torch.randn(batch, cfg.n_head, cfg.seq_len, cfg.head_dim, dtype=dt)

    def step(x, y):
        for w in linears:  # w (out, in)
            x_in, g_out = acts[w.size(1)], acts[w.size(0)]
            F.linear(x_in, w)
            g_out @ w
            g_out.t() @ x_in
        for _ in range(0, rows, chunk):
            F.linear(head_x, head)
            head_g @ head
            head_grad.addmm_(head_g.t(), head_x)  # accumulated over chunks, as the loss does
        for _ in range(cfg.depth):
            y = F.scaled_dot_product_attention(*qkv, is_causal=True, enable_gqa=cfg.n_kv_head != cfg.n_head)
            y.backward(grad_attn)

    return step


def _contenders(batch: int, dtype, names: tuple[str, ...]):
    """bench-ref built once (seed 0) and the step functions named in `names` (chatsmith, hf_transformers,
    kernel_floor); returns (model, {name: step(x, y)}, (x, y))."""
    import torch

    from .config import OptimConfig
    from .model import GPT
    from .optim import build_optimizer
    from .train import autocast

    torch.manual_seed(0)
    mcfg = bench_ref().resolve()
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

    if "chatsmith" in names:
        contenders["chatsmith"] = chatsmith_step
    if "hf_transformers" in names:
        hf_step = _hf_contender(mcfg, model)

        def hf_autocast_step(x, y):
            with autocast("cpu", dtype):
                return hf_step(x, y)

        contenders["hf_transformers"] = hf_autocast_step
    if "kernel_floor" in names:
        contenders["kernel_floor"] = _kernel_floor(model, batch, dtype)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, mcfg.vocab_size, (batch, mcfg.seq_len + 1), generator=gen)
    return model, contenders, (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())


def _memory_status(field: str) -> int | None:
    """A memory figure of this process from Linux /proc/self/status in bytes (VmRSS: resident now, VmHWM: its
    high-water mark), or None where that is not available. Not getrusage's ru_maxrss: Linux carries that across
    fork + exec, so a child would inherit its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def step_memory(name: str, batch: int, precision: str, threads: int, steps: int = 3) -> int | None:
    """Peak resident memory (bytes) that `steps` training steps of contender `name` add to a process that holds the
    built model, optimizer and data: the high-water mark after the steps minus the resident set just before them.
    Gradients, optimizer state, activations and the loss's logits all count. Meant to run in a fresh process (the
    high-water mark is per process); None where /proc is missing."""
    import torch

    from .common import autocast_dtype

    if threads:
        torch.set_num_threads(threads)
    _, contenders, (x, y) = _contenders(batch, autocast_dtype("cpu", precision), (name,))
    before = _memory_status("VmRSS")
    for _ in range(steps):
        contenders[name](x, y)
    peak = _memory_status("VmHWM")
    return None if before is None or peak is None else max(0, peak - before)


def _memory_in_fresh_process(name: str, b: TrainBenchConfig) -> int | None:
    code = (f"import json; from chatsmith.bench import step_memory; "
            f"print(json.dumps(step_memory({name!r}, {b.batch}, {b.precision!r}, {b.threads})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise UserError(f"the memory measurement of {name} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


def train_main(cfg: TrainBench) -> dict:
    import torch

    from .common import autocast_dtype, matmul_peak_flops

    b = cfg.bench
    if b.threads:
        torch.set_num_threads(b.threads)
    dtype = autocast_dtype("cpu", b.precision)
    peaks = {"fp32": matmul_peak_flops("float32"), "bf16": matmul_peak_flops("bfloat16")}
    names = ("chatsmith", *(["hf_transformers"] if b.hf else []), *(["kernel_floor"] if b.floor else []))
    model, contenders, (x, y) = _contenders(b.batch, dtype, names)
    mcfg = model.config
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
        if "kernel_floor" in times:
            result["max_speedup_vs_hf"] = result["kernel_floor_tok_s"] / result["hf_transformers_tok_s"]
    if b.memory:
        for name in ("chatsmith", "hf_transformers") if b.hf else ("chatsmith",):
            result[f"{name}_step_memory_mb"] = (None if (m := _memory_in_fresh_process(name, b)) is None
                                                else m / 2**20)
        if b.hf and result["chatsmith_step_memory_mb"] and result["hf_transformers_step_memory_mb"]:
            result["memory_ratio_hf_over_chatsmith"] = (result["hf_transformers_step_memory_mb"]
                                                        / result["chatsmith_step_memory_mb"])
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


# ---------------------------------------------------------------------------------------------------------------------
# bench decode


@dataclass(frozen=True)
class DecodeBenchConfig:
    prompt_len: int = opt(64, "tokens in the single-stream prompt; the batch's prompts spread 0.5x..1.5x around it")
    new_tokens: int = opt(128, "greedy tokens every request generates (EOS ignored, so every contender makes as many)")
    batch: int = opt(8, "concurrent sequences for the continuous-batching run")
    warmup: int = opt(1, "untimed runs per contender")
    repeats: int = opt(5, "timed runs per contender (the median is reported)")
    threads: int = opt(1, "torch intra-op threads; 0 leaves torch's default")
    hf: bool = opt(True, "also time HF transformers Qwen3ForCausalLM.generate with the same weights")
    seed: int = opt(0, "seed of the random weights and prompts")
    depth: int = opt(0, "model override for quick runs: transformer blocks; 0 = bench-ref's 4")
    n_embd: int = opt(0, "model override: width; 0 = bench-ref's 256")
    head_dim: int = opt(0, "model override: attention head width; 0 = bench-ref's 64")
    vocab_size: int = opt(0, "model override: vocabulary; 0 = bench-ref's 8192")
    json: bool = opt(False, "print JSON on stdout")


@dataclass(frozen=True)
class DecodeBench:
    bench: DecodeBenchConfig = DecodeBenchConfig()


def bench_tokenizer(vocab_size: int):
    """A byte-level BPE Tokenizer with exactly `vocab_size` ids, built without training: the specials, the 256 bytes,
    then byte pairs. Random weights may emit any id, so the engine's tokenizer must cover the whole model vocabulary
    (it masks ids beyond its own) and its streaming decode path runs as in serving."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from .tokenizer import ALL_SPECIALS, N_SPECIAL, Tokenizer, bytes_to_unicode

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


def _decode_model_config(b: DecodeBenchConfig) -> ModelConfig:
    """bench-ref, or bench-ref with the overrides (heads and MLP width then derived from width and head_dim)."""
    import dataclasses

    cfg = bench_ref()
    if b.depth:
        cfg = dataclasses.replace(cfg, depth=b.depth)
    if b.n_embd or b.head_dim:
        cfg = dataclasses.replace(cfg, n_embd=b.n_embd or cfg.n_embd, head_dim=b.head_dim or cfg.head_dim, n_head=0,
                                  n_kv_head=0, intermediate_size=0)
    if b.vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=b.vocab_size)
    return cfg.resolve()


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


def decode_main(cfg: DecodeBench) -> dict:
    """Greedy decode on bench-ref with random weights, fp32, three contenders interleaved run by run:
    chatsmith's Engine on one prompt, HF transformers `generate` on the same prompt and weights, and the Engine on
    `batch` prompts submitted at once (continuous batching). tok_s = new tokens / wall time of the whole request,
    prefill included; ttft_s = time to the first new token; decode_tok_s = the tokens after the first / the time
    after it; batch_last_ttft_s = until the last of the batch has its first token (the engine prefills in turn).
    tokens_match: the Engine's greedy tokens equal HF's in every run; matching_prefix: how many agree from the start."""
    import torch

    from .engine import Engine, SamplingParams
    from .model import GPT
    from .tokenizer import N_SPECIAL

    b = cfg.bench
    for name in ("prompt_len", "new_tokens", "batch", "repeats"):
        if getattr(b, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(b, name)}")
    if b.warmup < 0 or b.threads < 0:
        raise UserError("--warmup and --threads must be >= 0")
    if b.threads:
        torch.set_num_threads(b.threads)
    mcfg = _decode_model_config(b)
    model = GPT.build(mcfg, device="cpu")
    _randomize(model, b.seed)
    model.eval()
    tokenizer = bench_tokenizer(mcfg.vocab_size)
    gen = torch.Generator().manual_seed(b.seed)
    lo, hi = max(1, b.prompt_len // 2), max(1, b.prompt_len + b.prompt_len // 2)
    batch_lens = [b.prompt_len] if b.batch == 1 else [lo + (hi - lo) * i // (b.batch - 1) for i in range(b.batch)]

    def random_prompt(n: int) -> list[int]:  # BOS, then ordinary ids
        return [tokenizer.bos_id] + torch.randint(N_SPECIAL, mcfg.vocab_size, (n - 1,), generator=gen).tolist()

    prompt = random_prompt(b.prompt_len)
    batch_prompts = [random_prompt(n) for n in batch_lens]
    engine = Engine(model, tokenizer, slots=b.batch, max_len=max(batch_lens + [b.prompt_len]) + b.new_tokens)
    params = SamplingParams(max_tokens=b.new_tokens, temperature=0.0, ignore_eos=True)

    def run_engine(prompts: list[list[int]]) -> tuple[list[list[int]], float, float]:
        """-> (tokens per prompt, seconds until every prompt has its first new token, seconds to the last token)."""
        first: dict[int, float] = {}
        t0 = time.perf_counter()
        requests = [engine.submit(p, params, on_event=lambda e: first.setdefault(e.request_id, time.perf_counter()))
                    for p in prompts]
        while engine.has_work():
            engine.step()
        total = time.perf_counter() - t0
        tokens = [r.result().token_ids for r in requests]
        if any(len(t) != b.new_tokens for t in tokens):
            raise RuntimeError(f"the engine generated {[len(t) for t in tokens]} tokens, not {b.new_tokens} each")
        return tokens, max(first.values()) - t0, total

    contenders = {"chatsmith": lambda: run_engine([prompt])}
    if b.hf:
        contenders["hf_transformers"] = _hf_generate(model, prompt, b.new_tokens)
    contenders["batch"] = lambda: run_engine(batch_prompts)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    outputs: dict[str, list[list[int]]] = {name: [] for name in contenders}
    for r in range(b.warmup + b.repeats):  # interleaved: every contender sees the same machine noise
        for name, fn in contenders.items():
            tokens, ttft, total = fn()
            outputs[name].append(tokens[0])
            if r >= b.warmup:
                times[name].append((ttft, total))

    result: dict = {
        "config": "bench-ref" if mcfg == bench_ref().resolve() else "bench-ref with overrides",
        "params": model.num_params(), "depth": mcfg.depth, "n_embd": mcfg.n_embd, "vocab_size": mcfg.vocab_size,
        "precision": "fp32", "threads": torch.get_num_threads(), "prompt_len": b.prompt_len,
        "new_tokens": b.new_tokens, "batch": b.batch, "batch_prompt_lens": batch_lens, "repeats": b.repeats,
        "tok_s_definition": "new tokens / wall time from submit to the last token, prefill included",
    }
    for name, ts in times.items():
        ttft, total = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        n = b.new_tokens * (b.batch if name == "batch" else 1)
        result[f"{name}_total_s"] = total
        result[f"{name}_tok_s"] = n / total
        if name == "batch":
            result["batch_last_ttft_s"] = ttft  # until the last of the batch has its first token (prefills in turn)
        else:
            result[f"{name}_ttft_s"] = ttft
            result[f"{name}_decode_tok_s"] = (n - 1) / statistics.median(t[1] - t[0] for t in ts)
    result["batch_speedup_vs_single"] = result["batch_tok_s"] / result["chatsmith_tok_s"]
    if b.hf:
        ours, theirs = outputs["chatsmith"], outputs["hf_transformers"]
        result["tokens_match"] = ours == theirs
        result["matching_prefix"] = min(next((i for i, (x, y) in enumerate(zip(a, c)) if x != y), len(a))
                                        for a, c in zip(ours, theirs))
        result["speedup_vs_hf"] = result["chatsmith_tok_s"] / result["hf_transformers_tok_s"]
        if "kernel_floor" in times:
            result["max_speedup_vs_hf"] = result["kernel_floor_tok_s"] / result["hf_transformers_tok_s"]
    emit(result, b.json)
    return result


def _hf_generate(model, prompt: list[int], new_tokens: int):
    """A contender: Qwen3ForCausalLM (sdpa) with `model`'s weights, greedy `generate` of exactly `new_tokens` tokens
    (no EOS id, so none stops it early or gets masked), timed to its first token through a streamer."""
    import torch

    from .common import require

    transformers = require("transformers", "transformers", "the HF baseline of bench decode")
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**model.hf_config_dict(), attn_implementation="sdpa"))
    hf.load_state_dict(model.to_hf_state_dict())
    hf.eval()
    gen_cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                            use_cache=True, eos_token_id=None, pad_token_id=0)
    ids = torch.tensor([prompt])  # (1, T)

    class FirstToken:  # streamer protocol: put() gets the prompt, then every new token
        def __init__(self):
            self.calls, self.time = 0, 0.0

        def put(self, value) -> None:
            self.calls += 1
            if self.calls == 2:
                self.time = time.perf_counter()

        def end(self) -> None:
            pass

    def run() -> tuple[list[list[int]], float, float]:
        streamer = FirstToken()
        t0 = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg,
                          streamer=streamer)  # (1, T + new_tokens)
        total = time.perf_counter() - t0
        tokens = out[0, ids.size(1):].tolist()
        if len(tokens) != new_tokens:
            raise RuntimeError(f"HF generate made {len(tokens)} tokens, not {new_tokens}")
        return [tokens], streamer.time - t0, total

    return run


# ---------------------------------------------------------------------------------------------------------------------
# bench serve


@dataclass(frozen=True)
class ServeBenchConfig:
    run: str = opt("", "serve this run's newest chat model; empty = a random bench-ref model with a byte tokenizer")
    requests: int = opt(200, "requests in the load phase")
    concurrency: int = opt(16, "requests in flight at once in the load phase")
    max_tokens: int = opt(32, "max_tokens of every request")
    batch: int = opt(8, "requests sent at once in the throughput phase, beside the same number one after another")
    slots: int = opt(16, "the server's KV-cache slots")
    threads: int = opt(1, "torch intra-op threads; 0 leaves torch's default")
    json: bool = opt(False, "print JSON on stdout")


@dataclass(frozen=True)
class ServeBench:
    bench: ServeBenchConfig = ServeBenchConfig()


def serve_main(cfg: ServeBench) -> dict:
    """The server in-process on loopback under load, driven with httpx/asyncio: `requests` chat completions at
    `concurrency` (errors, lost responses, p50/p95 latency), then completion tokens/s of `batch` requests at once
    against the same number sent one after another (ratio). Sampled (temperature 1, seeded per request), so lengths
    vary; tokens/s counts the completion tokens the server reports in `usage`.
    Measured (random bench-ref, fp32, 1 thread, 16 slots, 2-core machine shared with a training run, one run):
    200 requests at concurrency 16: 0 errors, 0 lost, p50 0.54 s, p95 1.10 s; 8 at once 604 tok/s against 184 tok/s
    one after another (3.3x)."""
    import asyncio

    import httpx
    import torch

    from .cli import LoadConfig
    from .engine import Engine
    from .model import GPT
    from .server import ServeConfig, Server, load_into, serve_in_thread

    b = cfg.bench
    if min(b.requests, b.concurrency, b.max_tokens, b.batch, b.slots) < 1:
        raise UserError("--requests, --concurrency, --max-tokens, --batch and --slots must be at least 1")
    if b.threads:
        torch.set_num_threads(b.threads)
    server = Server(ServeConfig(slots=b.slots, max_queue=max(b.requests, b.concurrency), timeout=600, ui=False))
    if b.run:
        load_into(server, LoadConfig(run=b.run, threads=b.threads))
    else:
        mcfg = bench_ref().resolve()
        model = GPT.build(mcfg, device="cpu")
        _randomize(model, 0)
        tokenizer = bench_tokenizer(mcfg.vocab_size)
        server.start(Engine(model.eval(), tokenizer, slots=b.slots), tokenizer, "bench-ref")
    uv, url = serve_in_thread(server)

    def body(i: int) -> dict:
        return {"messages": [{"role": "user", "content": f"Request {i}: tell me a story about the number {i}."}],
                "max_tokens": b.max_tokens, "temperature": 1.0, "seed": i}

    async def one(client, i: int) -> tuple[int, float, int]:
        """-> (status or -1 on a transport error, seconds, completion tokens or -1 when the body is unusable)."""
        t0 = time.perf_counter()
        try:
            r = await client.post(url + "/v1/chat/completions", json=body(i))
        except httpx.HTTPError:
            return -1, time.perf_counter() - t0, -1
        seconds = time.perf_counter() - t0
        try:
            data = r.json()
            tokens = data["usage"]["completion_tokens"] if data["choices"][0]["message"] else -1
        except (ValueError, KeyError, IndexError, TypeError):
            tokens = -1
        return r.status_code, seconds, tokens

    async def load_phase(client) -> list[tuple[int, float, int]]:
        gate = asyncio.Semaphore(b.concurrency)

        async def limited(i: int):
            async with gate:
                return await one(client, i)

        return await asyncio.gather(*(limited(i) for i in range(b.requests)))

    async def throughput(client, concurrent: bool, offset: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one(client, offset + i) for i in range(b.batch)))
        else:
            results = [await one(client, offset + i) for i in range(b.batch)]
        return sum(max(0, t) for _, _, t in results), time.perf_counter() - t0

    async def run() -> dict:
        limits = httpx.Limits(max_connections=max(b.concurrency, b.batch) + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            await throughput(client, True, 10**6)  # warm-up
            t0 = time.perf_counter()
            results = await load_phase(client)
            load_s = time.perf_counter() - t0
            rates: dict[str, list[float]] = {"sequential": [], "concurrent": []}
            for r in range(3):  # interleaved, medians
                for name in rates:
                    tokens, seconds = await throughput(client, name == "concurrent", 10**7 * (r + 1))
                    rates[name].append(tokens / seconds)
        latencies = sorted(s for status, s, _ in results if status == 200)
        q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
        seq, conc = statistics.median(rates["sequential"]), statistics.median(rates["concurrent"])
        return {
            "model": server.model_id, "slots": b.slots, "threads": torch.get_num_threads(), "requests": b.requests,
            "concurrency": b.concurrency, "max_tokens": b.max_tokens,
            "errors": sum(status != 200 for status, _, _ in results),
            "lost": sum(status == 200 and tokens < 0 for status, _, tokens in results),
            "load_s": load_s, "p50_latency_s": statistics.median(latencies) if latencies else None,
            "p95_latency_s": q[18] if latencies else None,
            "load_completion_tok_s": sum(max(0, t) for _, _, t in results) / load_s,
            f"concurrent{b.batch}_tok_s": conc, "sequential_tok_s": seq, "concurrent_vs_sequential": conc / seq,
        }

    try:
        result = asyncio.run(run())
    finally:
        uv.should_exit = True
        uv.thread.join(timeout=10)
        server.stop()
    emit(result, b.json)
    return result

"""`chatsmith bench train`: training tokens/s, MFU and step memory on bench-ref beside HF transformers + AdamW and
the kernel floor.

    chatsmith bench train --json                     # precision auto (the probe decides), both contenders in it
    chatsmith bench train --precision fp32 --json    # pin it

Fair baselines: the HF contender steps torch.optim.AdamW with fused=True, the fastest of torch's AdamW
implementations on CPU and CUDA (measured against foreach and the for-loop; the README's measured table has the
figures). The kernel floor (the step's matmuls and attention alone) is a reference, not a bound: fused kernels, fewer
FLOPs or another dtype can go below it. MFU is model FLOPs/s over a stated peak (`peak_source`): on CPU the measured
peak of a large matmul in the contenders' dtype, on CUDA the datasheet dense peak (common.peak_flops), never a small
matmul's speed.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from ..common import UserError
from ..config import opt
from ..model import ModelConfig
from . import bench_ref, emit


@dataclass(frozen=True)
class TrainBenchConfig:
    batch: int = opt(8, "sequences per step", min=1, max=4096)
    warmup: int = opt(3, "untimed warm-up steps per contender", min=0, max=1000)
    steps: int = opt(10, "timed steps per contender (the median is reported)", min=1, max=10**6)
    threads: int = opt(0, "torch intra-op threads; 0 leaves torch's default", min=0, max=4096)
    precision: str = opt("auto", "auto (the matmul probe decides, at bench-ref's shapes), bf16 or fp32, for all "
                                  "contenders", choices=("auto", "bf16", "fp32"))
    hf: bool = opt(True, "also time HF transformers Qwen3ForCausalLM + torch.optim.AdamW (needs transformers)")
    floor: bool = opt(True, "also time the step's matmuls and attention alone (kernel_floor), a reference")
    memory: bool = opt(True, "also measure the peak memory each trainer's steps add, each in a fresh process")
    json: bool = opt(False, "print JSON on stdout")


@dataclass(frozen=True)
class TrainBench:
    bench: TrainBenchConfig = TrainBenchConfig()


def _hf_contender(model_cfg: ModelConfig, chatsmith_model):
    """Qwen3ForCausalLM with the same weights, trained with torch.optim.AdamW(fused=True)."""
    import torch

    from ..common import require

    transformers = require("transformers", "transformers", "the HF baseline of bench train")
    hf_cfg = transformers.Qwen3Config(**chatsmith_model.hf_config_dict(), attn_implementation="sdpa")
    model = transformers.Qwen3ForCausalLM(hf_cfg)
    model.load_state_dict(chatsmith_model.to_hf_state_dict())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95), fused=True)

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
    causal SDPA forward + backward per layer; no norms, activations, softmax of the loss or optimizer. A reference for
    how much of a step the matmuls take, not a bound: a trainer with fused kernels, fewer FLOPs (a smaller head,
    skipped work) or another dtype can step faster. dtype: the contenders' autocast dtype (None = fp32)."""
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

    from ..config import OptimConfig
    from ..model import GPT
    from ..optim import build_optimizer
    from ..train import autocast

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

    from ..common import autocast_dtype

    if threads:
        torch.set_num_threads(threads)
    _, contenders, (x, y) = _contenders(batch, autocast_dtype("cpu", precision), (name,))
    before = _memory_status("VmRSS")
    for _ in range(steps):
        contenders[name](x, y)
    peak = _memory_status("VmHWM")
    return None if before is None or peak is None else max(0, peak - before)


def _memory_in_fresh_process(name: str, b: TrainBenchConfig, precision: str) -> int | None:
    """step_memory in a new Python process, at the precision the parent resolved (bf16 or fp32)."""
    code = (f"import json; from chatsmith.bench.train import step_memory; "
            f"print(json.dumps(step_memory({name!r}, {b.batch}, {precision!r}, {b.threads})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise UserError(f"the memory measurement of {name} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


def main(cfg: TrainBench) -> dict:
    import torch

    from ..common import choose_precision, peak_flops, probe_shapes

    b = cfg.bench
    if b.threads:
        torch.set_num_threads(b.threads)
    mcfg = bench_ref().resolve()
    precision = choose_precision("cpu", b.precision, probe_shapes(mcfg, b.batch * mcfg.seq_len))
    dtype = precision.dtype
    peaks = {"fp32": peak_flops("float32", "cpu"), "bf16": peak_flops("bfloat16", "cpu")}  # (FLOP/s, source)
    peak, peak_source = peaks[precision.precision]
    names = ("chatsmith", *(["hf_transformers"] if b.hf else []), *(["kernel_floor"] if b.floor else []))
    model, contenders, (x, y) = _contenders(b.batch, dtype, names)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(b.warmup):
        for fn in contenders.values():
            fn(x, y)
    for _ in range(b.steps):  # interleaved: all contenders see the same machine noise
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn(x, y)
            times[name].append(time.perf_counter() - t0)

    tokens_per_step = b.batch * mcfg.seq_len
    flops_per_token = model.flops_per_token()
    result: dict = {
        "config": "bench-ref", "params": model.num_params(), "flops_per_token": flops_per_token,
        "batch": b.batch, "seq_len": mcfg.seq_len, "threads": torch.get_num_threads(),
        "precision": precision.precision, "precision_reason": precision.reason,
        "probe_bf16_flops": precision.bf16_flops, "probe_fp32_flops": precision.fp32_flops,
        "peak_flops": peak, "peak_source": peak_source,
        "peak_fp32_flops": peaks["fp32"][0], "peak_bf16_flops": peaks["bf16"][0],
        "hf_optimizer": "torch.optim.AdamW(fused=True)" if b.hf else None,
    }
    for name, ts in times.items():
        med = statistics.median(ts)
        tok_s = tokens_per_step / med
        result[f"{name}_step_s"] = med
        result[f"{name}_tok_s"] = tok_s
        result[f"{name}_mfu"] = flops_per_token * tok_s / peak
    result["chatsmith_model_flops"] = flops_per_token * result["chatsmith_tok_s"]
    if "hf_transformers" in times:
        result["speedup_vs_hf"] = result["chatsmith_tok_s"] / result["hf_transformers_tok_s"]
        if "kernel_floor" in times:  # a reference, not a bound (see _kernel_floor)
            result["kernel_floor_speedup_vs_hf"] = result["kernel_floor_tok_s"] / result["hf_transformers_tok_s"]
    if b.memory:
        for name in ("chatsmith", "hf_transformers") if b.hf else ("chatsmith",):
            measured = _memory_in_fresh_process(name, b, precision.precision)
            result[f"{name}_step_memory_mb"] = None if measured is None else measured / 2**20
        if b.hf and result["chatsmith_step_memory_mb"] and result["hf_transformers_step_memory_mb"]:
            result["memory_ratio_hf_over_chatsmith"] = (result["hf_transformers_step_memory_mb"]
                                                        / result["chatsmith_step_memory_mb"])
    emit(result, b.json)
    return result

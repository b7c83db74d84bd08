"""`chatsmith bench gpu`: the prepared device check, one command, JSON out (scripts/gpu_check.sh runs it).

    chatsmith bench gpu --json                 # on a machine with a CUDA GPU; about 10 minutes at most
    chatsmith bench gpu --json --steps 10      # shorter

What it does, in order, each part's result under its own key:
1. `cuda_tests`: `pytest -m cuda` (the CUDA-only tests, skipped elsewhere): passed / failed / skipped counts;
2. `train`: a short training run of the gpu-d12 model shape (presets_gpu) on random tokens (throughput does not
   depend on the data, and the device machine may have no corpus), bf16 autocast, Muon + AdamW, torch.compile
   unless --no-compile; tokens/s as the median over the timed steps after `warmup`, MFU against the GPU's
   datasheet dense bf16 peak (common.GPU_PEAK_TFLOPS), peak GPU memory beside presets_gpu.estimate's figure;
3. `decode`: `chatsmith bench decode --json` in a subprocess, its JSON labelled with where it ran (bench decode
   has no device choice yet and runs on the CPU: a CUDA decode figure is still open).
Without a CUDA GPU it stops at once with one sentence (exit status 2).
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
from . import emit


@dataclass(frozen=True)
class GpuBenchConfig:
    steps: int = opt(30, "timed training steps of the gpu-d12 shape", min=1, max=10**6)
    warmup: int = opt(5, "untimed training steps first (compilation happens here)", min=1, max=10**6)
    device_batch: int = opt(32, "rows of 2048 tokens per forward (the preset's)", min=1, max=4096)
    compile: bool = opt(True, "torch.compile the model, as the preset does")
    tests: bool = opt(True, "run the CUDA tests first (pytest -m cuda)")
    decode: bool = opt(True, "run `chatsmith bench decode` last")
    json: bool = opt(False, "print JSON instead of a table")


@dataclass(frozen=True)
class GpuBench:
    bench: GpuBenchConfig = GpuBenchConfig()


def require_cuda() -> str:
    """The GPU's name, or one sentence saying there is none."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("bench gpu needs a CUDA GPU and torch.cuda.is_available() is False here; run it on a machine "
                        "with an NVIDIA GPU and a CUDA build of torch")
    return torch.cuda.get_device_name()


def cuda_tests() -> dict:
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                         capture_output=True, text=True, timeout=300)
    last = (out.stdout.strip().splitlines() or [""])[-1]
    counts = {}
    for part in last.strip("= ").split(","):
        words = part.split()
        if len(words) >= 2 and words[0].isdigit():
            counts[words[1]] = int(words[0])
    return {"returncode": out.returncode, "summary": last, **counts}


def train_run(b: GpuBenchConfig) -> dict:
    import torch

    from .. import config
    from ..common import datasheet_peak_flops
    from ..model import GPT, ModelConfig
    from ..optim import build_optimizer
    from ..presets_gpu import estimate, preset_gpu_d12
    from ..train import accumulate

    p = preset_gpu_d12()
    m = p["model"]
    mcfg = ModelConfig(depth=m["depth"], aspect=m["aspect"], head_dim=m["head_dim"], seq_len=m["seq_len"],
                       vocab_size=p["tokenizer"]["vocab_size"]).resolve()
    torch.manual_seed(0)
    model = GPT.build(mcfg, device="cuda")
    step_model = torch.compile(model) if b.compile else model
    opt_ = build_optimizer(model, config.OptimConfig())
    gen = torch.Generator(device="cuda").manual_seed(0)
    T, V = mcfg.seq_len, mcfg.vocab_size
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(b.warmup + b.steps):
        x = torch.randint(0, V, (b.device_batch, T), device="cuda", generator=gen)
        y = torch.roll(x, -1, dims=1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss_sum, n = accumulate(step_model, [(x, y)], "cuda", torch.bfloat16)
        opt_.step()
        opt_.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= b.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss_sum / n)
    name = torch.cuda.get_device_name()
    peak = datasheet_peak_flops(name, "bfloat16")
    tok_s = b.device_batch * T / statistics.median(times)
    flops = model.flops_per_token()
    est = estimate(mcfg, b.device_batch, 1, 0)
    return {"params": model.num_params(), "tokens_per_step": b.device_batch * T, "tok_s": tok_s,
            "mfu": None if peak is None else flops * tok_s / peak, "peak_flops": peak, "flops_per_token": flops,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "estimated_memory_gib": est["total_gib"],
            "first_loss": losses[0], "last_loss": losses[-1], "compile": b.compile}


def decode_run() -> dict:
    out = subprocess.run([sys.executable, "-m", "chatsmith", "bench", "decode", "--json", "--hf", "false"],
                         capture_output=True, text=True, timeout=240)
    where = "cpu: bench decode builds its model on the CPU (no --device flag yet), so this is not a CUDA figure"
    if out.returncode != 0:
        return {"device": where, "returncode": out.returncode, "stderr": out.stderr[-1000:]}
    return {"device": where, **json.loads(out.stdout)}


def main(cfg: GpuBench) -> dict:
    b = cfg.bench
    result: dict = {"gpu": require_cuda()}
    if b.tests:
        result["cuda_tests"] = cuda_tests()
    result["train"] = train_run(b)
    if b.decode:
        result["decode"] = decode_run()
    emit(result, b.json)
    return result

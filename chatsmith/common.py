"""Shared plumbing: user errors, run directories, atomic writes, seeding, device and dtype choice, logging.

Nothing here does work at import time: device probes and the matmul peak are functions you call.
The one rule for errors a user can cause (bad path, bad flag, missing optional package, offline when a hub is
needed): raise `UserError("one sentence that says what to do")`; `__main__` prints it without a traceback and
exits with code 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class UserError(Exception):
    """An error the user can fix; printed as one sentence, no traceback."""


# ---------------------------------------------------------------------------------------------------------------------
# processes and logging


def rank() -> int:
    """Global rank under torchrun, 0 otherwise (read from the environment; no torch.distributed import)."""
    return int(os.environ.get("RANK", "0"))


def is_rank0() -> bool:
    return rank() == 0


def log(msg: str) -> None:
    """Print on rank 0 only, to stderr so that stdout stays clean for `--json` output."""
    if is_rank0():
        print(msg, file=sys.stderr, flush=True)


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on rank 0 that stays quiet when stderr is not a terminal and CI is set."""
    from tqdm.auto import tqdm

    disable = not is_rank0() or kwargs.pop("disable", False)
    return tqdm(iterable, disable=disable, dynamic_ncols=True, mininterval=0.5, **kwargs)


def require(module: str, pip_name: str | None = None, why: str = ""):
    """Import an optional package or fail with one sentence naming the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        hint = pip_name or module
        reason = f" ({why})" if why else ""
        raise UserError(f"the optional package '{hint}' is not installed{reason}; run: pip install '{hint}'") from None


# ---------------------------------------------------------------------------------------------------------------------
# run directories


def chatsmith_home() -> Path:
    return Path(os.environ.get("CHATSMITH_HOME", Path.home() / ".cache" / "chatsmith")).expanduser()


def runs_root() -> Path:
    return chatsmith_home() / "runs"


def run_dir(name: str, create: bool = True) -> Path:
    """The directory of run `name` under $CHATSMITH_HOME/runs (config.json, tokenizer/, shards/, checkpoints/, ...)."""
    if not name or "/" in name or name in (".", ".."):
        raise UserError(f"run name {name!r} is not valid; use letters, digits, '-' or '_'")
    path = runs_root() / name
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def latest_run() -> Path | None:
    """The most recently modified run directory, or None when there is none."""
    root = runs_root()
    if not root.is_dir():
        return None
    runs = [p for p in root.iterdir() if p.is_dir()]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


# ---------------------------------------------------------------------------------------------------------------------
# atomic files


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, rename: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); delete it and rerun the "
                        f"stage") from None


# ---------------------------------------------------------------------------------------------------------------------
# seeding, devices, dtypes


def seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (empty where unavailable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def device_type(requested: str = "auto") -> str:
    import torch

    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# precision: bf16 autocast where it measures faster than fp32 on this machine, at the run's matmul shapes


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where unavailable): part of the precision cache key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def probe_shapes(model_cfg, rows: int) -> tuple[tuple[int, int, int], ...]:
    """The distinct matmuls of a training forward of a resolved ModelConfig as (rows, in, out): q, k/v, o, gate/up,
    down, and the output head in the loss's 512-row chunks. `rows` (batch x seq_len) is capped at 2048: the speed
    ratio of bf16 to fp32 is settled by then and the probe stays short."""
    rows = max(1, min(rows, 2048))
    c, kv = model_cfg.n_embd, model_cfg.n_kv_head * model_cfg.head_dim
    q, hidden = model_cfg.n_head * model_cfg.head_dim, model_cfg.intermediate_size
    shapes = {(rows, c, q), (rows, c, kv), (rows, q, c), (rows, c, hidden), (rows, hidden, c),
              (min(rows, 512), c, model_cfg.vocab_size)}
    return tuple(sorted(shapes))


def default_probe_shapes() -> tuple[tuple[int, int, int], ...]:
    """The shapes `auto` is probed at when the caller names none (loading a model, the optimizer's Newton-Schulz):
    those of bench-ref (width 256, SwiGLU 768, vocab 8192) with 2048 rows."""
    return tuple(sorted({(2048, 256, 256), (2048, 256, 768), (2048, 768, 256), (512, 256, 8192)}))


def precision_probe(shapes: tuple[tuple[int, int, int], ...], device: str = "cpu", budget_s: float = 1.5,
                    min_rounds: int = 5, clear_ratio: float = 1.5) -> dict[str, float]:
    """Matmul FLOP/s at `shapes` in fp32 and under bf16 autocast (F.linear on fp32 inputs and weights, so the casts
    autocast makes are paid as in training). Rounds over every shape, each timed in both precisions back to back so
    that both see the same machine noise, until one precision leads by `clear_ratio` after `min_rounds` rounds, or
    `budget_s` has passed. Each figure is the shapes' FLOPs over the sum of each shape's fastest time: noise only
    ever slows a matmul down, so on a busy machine the fastest is the closest to what the kernels can do.

    On CPU the probe runs on one thread: on a shared machine a multi-threaded kernel waits for its last thread to be
    scheduled, a delay per call that makes the faster kernel look slower (on a 2-core Xeon with AMX at load 10, a
    2048x256x768 bf16 matmul took 11-20 ms on 2 threads and 1.4-1.8 ms on one, fp32 10-23 ms either way); the
    ratio per core is what the hardware decides. Returns {"bf16_flops": ..., "fp32_flops": ...}."""
    import torch

    if device != "cpu":
        return _probe(shapes, device, budget_s, min_rounds, clear_ratio)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _probe(shapes, device, budget_s, min_rounds, clear_ratio)
    finally:
        torch.set_num_threads(threads)


def _probe(shapes: tuple[tuple[int, int, int], ...], device: str, budget_s: float, min_rounds: int,
           clear_ratio: float) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(r, i, generator=gen).to(device), torch.randn(o, i, generator=gen).to(device))
             for r, i, o in shapes]  # x (rows, in), w (out, in)

    def timed(x, w, bf16: bool) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            F.linear(x, w)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    best = {(k, bf16): float("inf") for k in range(len(pairs)) for bf16 in (True, False)}
    for x, w in pairs:  # warm-up: kernel selection, packing buffers
        timed(x, w, True), timed(x, w, False)
    flops = sum(2 * r * i * o for r, i, o in shapes)

    def figures() -> dict[str, float]:
        return {name: flops / sum(best[k, bf16] for k in range(len(pairs)))
                for name, bf16 in (("bf16_flops", True), ("fp32_flops", False))}

    t_start, rounds = time.perf_counter(), 0
    while True:
        for k, (x, w) in enumerate(pairs):
            for bf16 in (True, False):
                best[k, bf16] = min(best[k, bf16], timed(x, w, bf16))
        rounds += 1
        if rounds >= min_rounds:
            now = figures()
            ratio = now["bf16_flops"] / now["fp32_flops"]
            if max(ratio, 1 / ratio) >= clear_ratio or time.perf_counter() - t_start >= budget_s:
                return now


@dataclass(frozen=True)
class PrecisionChoice:
    """What `--precision` resolved to, why, and the probe's figures (None where nothing was measured)."""

    precision: str  # "bf16" (autocast) or "fp32"
    reason: str  # pinned | cuda>=sm80 | cuda<sm80 | no bf16 probe on this device | measured | cached
    bf16_flops: float | None = None
    fp32_flops: float | None = None

    @property
    def dtype(self):
        """The autocast dtype (torch.bfloat16), or None for plain fp32."""
        import torch

        return torch.bfloat16 if self.precision == "bf16" else None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def machine_key(device: str) -> dict[str, Any]:
    """What a cached probe result depends on besides the shapes: device type, CPU model, torch version, threads."""
    import torch

    return {"device": device, "cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def machine_file() -> Path:
    return chatsmith_home() / "machine.json"


def choose_precision(device: str, precision: str = "auto", shapes: tuple[tuple[int, int, int], ...] | None = None,
                     probe: Callable[..., dict[str, float]] | None = None) -> PrecisionChoice:
    """Resolve `precision` (auto | bf16 | fp32) on `device`. auto: bf16 on CUDA >= sm80 (no probe), fp32 on older
    CUDA and on MPS; on CPU the faster of the two in `precision_probe` at `shapes` (default: bench-ref's), cached in
    $CHATSMITH_HOME/machine.json under the machine key (CPU model, torch version, threads) and the shapes, so a
    machine probes once per shape. Not decided by CPU flags: avx512_bf16 without AMX was slower than fp32 on one Xeon
    and 4.4x faster on an AMD Zen 5. `probe` replaces `precision_probe` (tests)."""
    if precision in ("bf16", "fp32"):
        return PrecisionChoice(precision, "pinned")
    if precision != "auto":
        raise UserError(f"--precision must be auto, bf16 or fp32, not {precision!r}")
    if device == "cuda":
        import torch

        if torch.cuda.get_device_capability()[0] >= 8:
            return PrecisionChoice("bf16", "cuda>=sm80")
        return PrecisionChoice("fp32", "cuda<sm80")
    if device != "cpu":
        return PrecisionChoice("fp32", "no bf16 probe on this device")
    shapes = tuple(tuple(s) for s in (shapes or default_probe_shapes()))
    key = {**machine_key(device), "shapes": [list(s) for s in shapes]}
    path = machine_file()
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        cache = {}
    entries = cache.get("precision", []) if isinstance(cache.get("precision"), list) else []
    for entry in entries:
        if entry.get("key") == key:
            return PrecisionChoice(entry["precision"], "cached", entry["bf16_flops"], entry["fp32_flops"])
    figures = (probe or precision_probe)(shapes, device)
    choice = PrecisionChoice("bf16" if figures["bf16_flops"] > figures["fp32_flops"] else "fp32", "measured",
                             figures["bf16_flops"], figures["fp32_flops"])
    entries = [e for e in entries if e.get("key") != key] + [{"key": key, **choice.as_dict()}]
    with contextlib.suppress(OSError):  # a read-only home only costs a probe next time
        atomic_write_json(path, {**cache, "precision": entries})
    return choice


def has_fast_bf16(device: str) -> bool:
    """Whether `auto` picks bf16 on `device` at the default probe shapes (see `choose_precision`)."""
    return choose_precision(device, "auto").precision == "bf16"


def autocast_dtype(device: str, precision: str = "auto", shapes: tuple[tuple[int, int, int], ...] | None = None):
    """The autocast dtype for `precision` in {auto, bf16, fp32}; None means run in fp32 without autocast."""
    return choose_precision(device, precision, shapes).dtype


# peak FLOP/s, the denominator of MFU

# Datasheet dense (no sparsity) peak TFLOP/s: (name as torch.cuda.get_device_name() reports it, matched as whole
# words so that "A10" is not "A10G"; bf16 tensor core; fp32 without TF32); the first match wins. Sources: NVIDIA's
# datasheets for A100 (Tensor Core GPU, 2020), H100 and H200 (SXM / PCIe / NVL; the sparse figures are twice these),
# L4, L40, L40S and A10, the Ada Lovelace architecture whitepaper for the RTX 4090 (bf16 with fp32 accumulate) and
# the Ampere GA102 whitepaper for the RTX 3090.
GPU_PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756.0, 51.2),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.4, 66.9),  # SXM5
    ("H200 NVL", 835.0, 60.0),
    ("H200", 989.4, 66.9),  # SXM
    ("A100", 312.0, 19.5),  # SXM and PCIe
    ("L40S", 362.05, 91.6),
    ("L40", 181.05, 90.5),
    ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
    ("RTX 4090", 165.2, 82.6),
    ("RTX 3090", 71.0, 35.6),
)


def datasheet_peak_flops(device_name: str, dtype_name: str) -> float | None:
    """The datasheet dense peak FLOP/s of the GPU named `device_name` for bfloat16 or float32, None if not listed."""
    for name, bf16, fp32 in GPU_PEAK_TFLOPS:
        if re.search(rf"\b{re.escape(name)}\b", device_name):
            return 1e12 * (bf16 if dtype_name == "bfloat16" else fp32)
    return None


def peak_flops(dtype_name: str = "float32", device: str = "cpu") -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for MFU. CUDA: the device's datasheet dense peak for the dtype (a
    measurement of a matmul small enough to be quick would understate it); a GPU missing from GPU_PEAK_TFLOPS falls
    back to an 8192^3 matmul, said so in the source. CPU: the measured peak of a large (2048^3) matmul, the fastest of
    several: no datasheet says what a shared virtual CPU delivers."""
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        listed = datasheet_peak_flops(name, dtype_name)
        if listed is not None:
            return listed, f"datasheet dense {dtype_name} peak of {name}"
        return (matmul_peak_flops(dtype_name, n=8192, device=device),
                f"measured 8192^3 {dtype_name} matmul on {name} (not in the datasheet table)")
    return (matmul_peak_flops(dtype_name, n=2048, repeats=5, device=device),
            f"measured 2048^3 {dtype_name} matmul on {device}, fastest of 5")


def matmul_peak_flops(dtype_name: str = "float32", n: int = 1024, repeats: int = 7, device: str = "cpu") -> float:
    """FLOP/s of the fastest of `repeats` n x n x n matmuls in `dtype_name`: the machine's practical peak, for MFU.
    The fastest, not the median: on a busy machine the median understates the peak and MFU would pass 100 %. On CUDA
    a GPU listed in GPU_PEAK_TFLOPS gets its datasheet figure instead (see `peak_flops`)."""
    import torch

    if device == "cuda":
        listed = datasheet_peak_flops(torch.cuda.get_device_name(), dtype_name)
        if listed is not None:
            return listed
    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)

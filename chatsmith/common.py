"""Shared plumbing: user errors, run directories, atomic writes, seeding, device and dtype choice, logging.

Nothing here does work at import time: device probes and the matmul peak are functions you call.
The one rule for errors a user can cause (bad path, bad flag, missing optional package, offline when a hub is
needed): raise `UserError("one sentence that says what to do")`; `__main__` prints it without a traceback and
exits with code 2.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import sys
import tempfile
import time
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


def has_fast_bf16(device: str) -> bool:
    """bf16 pays off on CUDA >= sm80 and on CPUs with AMX tiles (amx_bf16).

    AVX512-BF16 alone does not pay: on a 2-core Xeon with avx512_bf16 and no AMX, torch 2.13's 1024^3 bf16 matmul ran
    at 175-178 GFLOP/s against 254-300 GFLOP/s in fp32, and bench-ref trained at 2,688 tok/s under bf16 autocast
    against 4,195 tok/s in fp32 (`chatsmith bench train --precision bf16|fp32`)."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_capability()[0] >= 8
    if device == "cpu":
        return "amx_bf16" in cpu_flags()
    return False


def autocast_dtype(device: str, precision: str = "auto"):
    """The autocast dtype for `precision` in {auto, bf16, fp32}; None means run in fp32 without autocast."""
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise UserError(f"--precision must be auto, bf16 or fp32, not {precision!r}")
    return torch.bfloat16 if has_fast_bf16(device) else None


def matmul_peak_flops(dtype_name: str = "float32", n: int = 1024, repeats: int = 7, device: str = "cpu") -> float:
    """FLOP/s of the fastest of `repeats` n x n x n matmuls in `dtype_name`: the machine's practical peak, for MFU.
    The fastest, not the median: on a busy machine the median understates the peak and MFU would pass 100 %."""
    import torch

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

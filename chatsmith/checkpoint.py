"""Atomic, verified checkpoints: weights, optimizer, RNG, loop and loader state, meta.json, a SHA-256 manifest.

    from chatsmith import checkpoint
    checkpoint.save(run / "checkpoints", step, model.state_dict(), optimizer=opt.state_dict(),
                    state={"loader": loader.state_dict()}, meta={"config": ...}, keep_last=3)
    ck = checkpoint.load_latest(run / "checkpoints")   # newest valid one, or None; ck.model, ck.optimizer, ck.rng, ...
    loaded = checkpoint.load_model(checkpoint.LoadConfig(run="cpu"))   # model + tokenizer for chat, serve, eval, export

Layout of one checkpoint, `checkpoints/step_000200/`:

    model.safetensors   weights (safetensors: no pickle, memory-mappable, what HF and the exporters read)
    optimizer.pt        optimizer.state_dict() via torch.save; read back ONLY with torch.load(weights_only=True)
    state.json          the caller's JSON-able training state (loop counters, data loader position, ...)
    rng.json            python, numpy, torch CPU (and CUDA) RNG states, so that a resumed run is bit-exact
    meta.json           the caller's meta (resolved config, tokens seen) + step, time, git SHA, library versions
    manifest.json       {"files": {name: sha256}, "step": N}: written last; a directory without it is incomplete

Notable choices:
- Crash safety comes from the order of operations, not from luck: every file is written into
  `checkpoints/.tmp-step_000200-<pid>/` and fsynced, manifest.json last, the directory fsynced, then renamed to
  `step_000200` in one `rename(2)` and the parent fsynced. A reader therefore sees either no `step_000200` or a
  complete one. tests/test_checkpoint.py SIGKILLs a writer at random moments and checks the newest visible
  checkpoint always loads and holds the expected tensors.
- `load` re-hashes every file against the manifest, so bit rot, a truncated copy or a hand-edited file is caught
  (CheckpointError, a UserError). `load_latest` skips such a checkpoint with a warning naming it and the reason, and
  returns the previous valid one.
- Pruning (`keep_last`) counts valid checkpoints only (a corrupt one, skipped by `load_latest`, must not evict the
  valid ones behind it), and renames a victim to a hidden `.old-*` name before deleting it, so a kill during deletion
  cannot leave a half-deleted directory that still looks complete. Hidden `.tmp-*` / `.old-*` directories of writers
  that are no longer alive are removed by the next save.
- Re-saving an existing step renames the old directory aside, renames the new one in, then deletes the old one. A
  kill between those two renames (microseconds) hides that step (both copies sit in hidden dirs, deleted by the next
  save), so the checkpoint before it is the newest visible one.
- The optimizer state is checked before writing to contain only types that `torch.load(weights_only=True)` accepts
  (tensors, numbers, str, bytes, None, list/tuple/dict/set, torch.Size/dtype/device); anything else raises TypeError
  at save time instead of producing a checkpoint that cannot be resumed. RNG states are stored as JSON (lists of
  ints, base64 for torch byte states) and need no torch.load at all.
- Only rank 0 writes (under torchrun every rank calls `save` with the same, gathered state); every rank can load.
  Under `--parallel fsdp` every rank writes its own shards instead (dcp.py: a `dcp/` folder in the checkpoint, listed
  in the same manifest; model.safetensors at the final step, consolidated from the shards on load before it).
- `state` and `meta` round-trip through JSON: tuples come back as lists and dict keys as strings.
- `load_model` is the one loader (run or checkpoint -> model + tokenizer + precision) that chat, serve, eval, export
  and RL call. Which model: `--checkpoint PATH` (a step_N directory; the tokenizer comes from the nearest parent
  holding `tokenizer/`), else the newest valid checkpoint of `--run` under `<run>/rl/checkpoints` (RL),
  `<run>/chat/checkpoints` (SFT) or `<run>/checkpoints` (the base model), as the caller's `stage` asks. With no
  `--run`, the newest run that has a model of that stage, named in the log.
- Cost: SHA-256 hashing costs one extra read per file on save and on load, small beside writing the weights.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import errno
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import UserError, fsync_dir, is_rank0, log, run_dir, runs_root
from .config import opt

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
RNG_FILE = "rng.json"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "dcp"  # a sharded (--parallel fsdp) checkpoint's torch.distributed.checkpoint files (dcp.py)
SHARDED_FORMAT = "dcp"  # manifest.json's "format" of a sharded checkpoint (no model.safetensors needed)

_STEP_DIR = re.compile(r"^step_(\d+)$")
_HIDDEN_DIR = re.compile(r"^\.(?:tmp|old)-step_\d+-(\d+)$")  # in-progress writes and pending deletions, by writer pid


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or corrupt."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    model: dict[str, Any]  # name -> torch.Tensor, from model.safetensors
    optimizer: dict | None  # optimizer.state_dict() as saved
    state: dict  # JSON-able training state (loop, loader, ...)
    rng: dict | None  # capture_rng() output, for restore_rng()
    meta: dict  # meta.json
    sharded: Path | None = None  # the dcp/ folder of a sharded checkpoint (dcp.load_sharded reads it), else None

    def model_config(self):
        """The resolved `ModelConfig` recorded in meta.json (`config.model`, written by pretrain and sft)."""
        from .model import ModelConfig

        saved = self.meta.get("config", {}).get("model")
        if not isinstance(saved, dict):
            raise CheckpointError(f"{self.path / META_FILE} holds no config.model, so the model shape is unknown; "
                                  f"load a checkpoint written by chatsmith")
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in saved.items() if k in names}).resolve()


# ---------------------------------------------------------------------------------------------------------------------
# RNG states


def capture_rng() -> dict:
    """The global RNG states of python `random`, numpy, torch CPU and every CUDA device, as a JSON-able dict."""
    import numpy as np
    import torch

    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    out = {
        "python": [version, list(internal), gauss_next],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(d: dict) -> None:
    """Set the global RNG states from `capture_rng()` output: the next draws repeat those of the captured process."""
    import numpy as np
    import torch

    version, internal, gauss_next = d["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached_gaussian = d["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(_unb64(d["torch"]))
    if d.get("cuda") and torch.cuda.is_available():
        states = [_unb64(s) for s in d["cuda"]][: torch.cuda.device_count()]
        for i, s in enumerate(states):
            torch.cuda.set_rng_state(s, i)


def _b64(t) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str):
    import torch

    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# save


def save(root: Path, step: int, model: dict, optimizer: dict | None = None, state: dict | None = None,
         meta: dict | None = None, keep_last: int = 3, rng: bool = True) -> Path:
    """Write `root/step_{step:06d}/` atomically and return its path; then keep only the newest `keep_last`
    checkpoints (`keep_last <= 0` keeps all). `model` maps names to tensors (a state_dict); `optimizer` is an
    optimizer.state_dict(); `state` and `meta` must be JSON-able; `rng=True` stores the current global RNG states."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, not {step!r}")
    root = Path(root)
    final = root / f"step_{step:06d}"
    if not is_rank0():
        return final
    tensors = _tensors_for_safetensors(model)
    if optimizer is not None:
        _check_weights_only_types(optimizer, "optimizer")
    full_meta = {**_auto_meta(), **(meta or {}), "step": step}
    # serialise the JSON parts first: a non-JSON-able value fails here, before anything touches the disk
    texts = {STATE_FILE: json.dumps(state or {}, indent=2, ensure_ascii=False),
             META_FILE: json.dumps(full_meta, indent=2, ensure_ascii=False, default=str)}
    if rng:
        texts[RNG_FILE] = json.dumps(capture_rng())

    pid = os.getpid()
    tmp = root / f".tmp-{final.name}-{pid}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_safetensors(tmp / MODEL_FILE, tensors)
        if optimizer is not None:
            _write_file(tmp / OPTIMIZER_FILE, lambda f: _torch_save(optimizer, f))
        for name, text in texts.items():
            _write_file(tmp / name, lambda f, text=text: f.write(text.encode("utf-8")))
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        manifest = json.dumps({"files": files, "step": step}, indent=2)
        _write_file(tmp / MANIFEST_FILE, lambda f: f.write(manifest.encode("utf-8")))
        fsync_dir(tmp)
        _publish(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise CheckpointError(f"could not write checkpoint {final} ({e.strerror}); free disk space or fix the "
                                  f"permissions of {root}, then resume with --resume") from None
        raise
    _prune(root, keep_last, final)
    _remove_stale(root)
    return final


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete directory `tmp` to `final` and fsync their parent (dcp.py commits the same way)."""
    root = final.parent
    if final.exists():  # re-saving a step: swap directories (rename(2) cannot replace a non-empty directory)
        aside = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, aside)
        os.rename(tmp, final)
        fsync_dir(root)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, final)
        fsync_dir(root)


def _tensors_for_safetensors(model: dict) -> dict:
    """Detached, contiguous CPU tensors; tensors sharing storage (tied weights) are cloned, which safetensors needs."""
    import torch

    out, seen = {}, set()
    for name, t in model.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model[{name!r}] is a {type(t).__name__}, not a tensor; pass model.state_dict()")
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out


def _write_safetensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write) -> None:
    with open(path, "xb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _torch_save(obj, f) -> None:
    import torch

    torch.save(obj, f)


def _check_weights_only_types(obj, where: str) -> None:
    """Raise TypeError unless `obj` holds only what torch.load(weights_only=True) can read back (checked there)."""
    import torch

    leaves = (bool, int, float, complex, str, bytes, type(None), torch.Size, torch.dtype, torch.device)
    if isinstance(obj, torch.Tensor) and type(obj) in (torch.Tensor, torch.nn.Parameter):
        return
    if type(obj) in leaves:
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            _check_weights_only_types(k, f"{where} key {k!r}")
            _check_weights_only_types(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple, set):
        for i, v in enumerate(obj):
            _check_weights_only_types(v, f"{where}[{i}]")
        return
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    raise TypeError(f"{where} is a {kind}, which torch.load(weights_only=True) "
                    f"cannot read back; store tensors, numbers, strings, lists, tuples or dicts in optimizer state")


def _auto_meta() -> dict:
    import numpy as np
    import safetensors
    import torch

    from . import __version__

    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": _git_sha(Path(__file__).resolve().parent),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
                     "safetensors": safetensors.__version__, "chatsmith": __version__},
    }


def _git_sha(where: Path) -> str | None:
    """HEAD's SHA of the git repository holding `where` (with '-dirty' for uncommitted changes), or None."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _prune(root: Path, keep_last: int, written: Path) -> None:
    """Delete all but the newest `keep_last` valid checkpoints (and any checkpoint older than those). A corrupt one
    is not counted as kept, so after a fallback a corrupt newer checkpoint cannot evict the valid ones it hides; it
    stays until its step is written again. Validity is checked newest first (`written` was just written) and only
    until `keep_last` valid ones are found, so pruning re-reads at most keep_last - 1 checkpoints."""
    if keep_last <= 0:
        return
    paths = list_checkpoints(root)
    kept, victims = 0, []
    for path in reversed(paths):
        if kept >= keep_last:
            victims.append(path)
        elif path == written or _verify(path):
            kept += 1
    for path in victims:
        trash = root / f".old-{path.name}-{os.getpid()}"
        os.rename(path, trash)  # one rename hides it from readers; the slow delete happens out of sight
        shutil.rmtree(trash, ignore_errors=True)
    fsync_dir(root)


def _remove_stale(root: Path) -> None:
    """Delete hidden .tmp-* / .old-* directories whose writer process is gone (killed mid-save or mid-prune)."""
    for p in list(root.iterdir()):
        m = _HIDDEN_DIR.match(p.name)
        if m and p.is_dir() and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed but not yet reaped child is a zombie: it answers kill(0) but will never write again
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# ---------------------------------------------------------------------------------------------------------------------
# load


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root` (directories step_N holding manifest.json), oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / MANIFEST_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _verify(path: Path) -> bool:
    """Whether every file of the checkpoint matches the SHA-256 in its manifest (what `load` checks first)."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        files, sharded = manifest["files"], manifest.get("format") == SHARDED_FORMAT
        if not all(name in files for name in (STATE_FILE, META_FILE) + (() if sharded else (MODEL_FILE,))):
            return False
        return all(("/" not in name or sharded and _in_shards(name)) and _sha256(path / name) == expected
                   for name, expected in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _in_shards(name: str) -> bool:
    """Whether a manifest entry names a file directly inside a sharded checkpoint's dcp/ folder."""
    head, _, tail = name.partition("/")
    return head == SHARDS_DIR and tail not in ("", ".", "..") and "/" not in tail


def load(path: Path, map_location="cpu", consolidate: bool = True) -> Checkpoint:
    """Read one checkpoint after checking every file against the SHA-256 in its manifest; CheckpointError if any
    file is missing or differs. A sharded checkpoint (dcp.py) has `sharded` set and no optimizer; its `model` is
    model.safetensors where it has one (the final step), else the weights consolidated from its shards in this
    process, or {} with `consolidate=False` (for a caller that reads the shards itself: dcp.load_sharded)."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    redo = "delete that directory to resume from an earlier checkpoint"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path or list the run's checkpoints/")
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        files, step = manifest["files"], int(manifest["step"])
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
        sharded = manifest.get("format") == SHARDED_FORMAT
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST_FILE}, so its write did not finish; "
                              f"{redo}") from None
    except (ValueError, KeyError, TypeError) as e:  # bad UTF-8 or JSON is a ValueError
        raise CheckpointError(f"checkpoint {path} has an unreadable {MANIFEST_FILE} ({e}); {redo}") from None
    for name in (MODEL_FILE, STATE_FILE, META_FILE):
        if name not in files and not (sharded and name == MODEL_FILE):
            raise CheckpointError(f"checkpoint {path} has no {name} in its {MANIFEST_FILE}; {redo}")
    for name, expected in files.items():
        if not (sharded and _in_shards(name)) and ("/" in name or name.startswith(".")):
            raise CheckpointError(f"checkpoint {path} lists an invalid file name {name!r} in {MANIFEST_FILE}; {redo}")
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}; {redo}")
        found = _sha256(path / name)
        if found != expected:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its SHA-256 in "
                                  f"{MANIFEST_FILE} (expected {str(expected)[:12]}…, found {found[:12]}…); {redo}")
    try:
        if MODEL_FILE in files:
            model = load_file(str(path / MODEL_FILE), device=str(map_location))
        elif consolidate:
            from .dcp import consolidated_model

            model = {k: t.to(map_location) for k, t in consolidated_model(path / SHARDS_DIR).items()}
        else:
            model = {}
        optimizer = (torch.load(path / OPTIMIZER_FILE, map_location=map_location, weights_only=True)
                     if OPTIMIZER_FILE in files else None)
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        rng = json.loads((path / RNG_FILE).read_text(encoding="utf-8")) if RNG_FILE in files else None
    except Exception as e:  # checksums matched, so the writer itself stored something unreadable
        raise CheckpointError(f"checkpoint {path} passed its checksums but could not be read "
                              f"({type(e).__name__}: {e}); {redo}") from None
    return Checkpoint(path=path, step=step, model=model, optimizer=optimizer, state=state, rng=rng, meta=meta,
                      sharded=path / SHARDS_DIR if sharded else None)


def load_latest(root: Path, map_location="cpu", consolidate: bool = True) -> Checkpoint | None:
    """The newest checkpoint under `root` that passes `load` (`consolidate` as there); corrupt newer ones are skipped
    with a warning. None when there are no checkpoints; CheckpointError when there are some but none is valid."""
    paths = list_checkpoints(root)
    problems = []
    for path in reversed(paths):
        try:
            return load(path, map_location, consolidate)
        except CheckpointError as e:
            log(f"warning: skipping checkpoint {path.name}: {e}")
            problems.append(path.name)
    if paths:
        raise CheckpointError(f"none of the {len(paths)} checkpoints in {root} is valid ({', '.join(problems)}); "
                              f"delete them to start the run over, or restore one from a backup")
    return None


# ---------------------------------------------------------------------------------------------------------------------
# the one model loader: a run or a checkpoint -> model + tokenizer (chat, serve, eval, export, rl)

NO_MODEL = "no chat model found; run `chatsmith speedrun` first"
STAGES = ("chat", "base", "auto")


@dataclass(frozen=True)
class LoadConfig:
    run: str = opt("", "run to load under $CHATSMITH_HOME/runs; default: the newest run that has such a model")
    checkpoint: str = opt("", "a checkpoint directory (step_N) to load instead of the run's newest one")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    precision: str = opt("auto", "auto (measured: bf16 where a short matmul probe finds it faster than "
                                  "fp32, cached per machine; bf16 on CUDA >= sm80), bf16 or fp32",
                         choices=("auto", "bf16", "fp32"))
    threads: int = opt(1, "torch intra-op threads for decoding (1 is fastest for small models on a busy CPU); "
                          "0 leaves torch's default", min=0, max=4096)
    context: int = opt(0, "context window in tokens (KV cache length); 0 means the model's seq_len", min=0,
                       max=2**20)


@dataclass
class LoadedModel:
    model: Any  # chatsmith.model.GPT, in eval mode
    tokenizer: Any  # chatsmith.tokenizer.Tokenizer
    checkpoint: Path
    run: Path
    is_chat: bool  # False: a base (pretrained only) checkpoint
    autocast_dtype: Any  # torch dtype or None


def stage_root(run: Path, stage: str) -> Path:
    """Where a run keeps the checkpoints of a stage: `rl/checkpoints` (RL), `chat/checkpoints` (SFT) or `checkpoints`
    (pretraining, stage "base")."""
    return {"rl": run / "rl" / "checkpoints", "chat": run / "chat" / "checkpoints"}.get(stage, run / "checkpoints")


CHAT_KINDS = ("rl", "chat")  # the chat models of a run, preferred first: RL continues from SFT


def newest_run_with(stage: str) -> Path | None:
    """The most recently modified run that has a complete checkpoint of `stage` (chat: falls back to base models when
    no run has a chat model), or None."""
    root = runs_root()
    if not root.is_dir():
        return None
    runs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for kinds in ((CHAT_KINDS, ("base",)) if stage in ("chat", "auto") else (("base",),)):
        for run in runs:
            if any(list_checkpoints(stage_root(run, kind)) for kind in kinds):
                return run
    return None


def _tokenizer_run(checkpoint: Path) -> Path | None:
    for parent in checkpoint.resolve().parents:
        if (parent / "tokenizer" / "tokenizer.json").is_file():
            return parent
    return None


def _pick(cfg: LoadConfig, stage: str) -> tuple[Checkpoint, Path, bool]:
    """(checkpoint, run directory, is_chat) chosen by `cfg` for `stage` (chat | base | auto)."""
    if cfg.checkpoint:
        path = Path(cfg.checkpoint).expanduser()
        run = run_dir(cfg.run, create=False) if cfg.run else _tokenizer_run(path)
        if run is None:
            raise UserError(f"no tokenizer/ found above {path}; pass --run NAME to take the tokenizer of that run")
        return load(path), run, path.resolve().parent.parent.name in CHAT_KINDS
    if cfg.run:
        run = run_dir(cfg.run, create=False)
        if not run.is_dir():
            raise UserError(f"run {cfg.run!r} does not exist; run `chatsmith speedrun --run {cfg.run}` first or pick "
                            f"another --run")
    else:
        run = newest_run_with(stage)
        if run is None:
            raise UserError(NO_MODEL if stage != "base" else "no base model found; run `chatsmith speedrun` first")
    if stage in ("chat", "auto"):
        for kind in CHAT_KINDS:
            ck = load_latest(stage_root(run, kind))
            if ck is not None:
                return ck, run, True
    ck = load_latest(stage_root(run, "base"))
    if ck is None:
        raise UserError(f"{NO_MODEL if stage != 'base' else 'no base model found'} (run {run.name} has no "
                        f"checkpoints)")
    if stage == "chat":
        log(f"warning: run {run.name} has no chat checkpoint yet, so this is the base model {ck.path.name}: it "
            f"continues text rather than answering; run `chatsmith sft` for a chat model")
    return ck, run, False


def load_model(cfg: LoadConfig, stage: str = "chat") -> LoadedModel:
    """The model, tokenizer and precision chosen by `cfg`: `stage` "chat" takes the run's chat model (after RL, else
    after SFT; the base model with a warning when it has neither), "base" the pretrained model, "auto" the chat model
    or else the base model, silently."""
    import torch

    from .common import autocast_dtype, device_type
    from .model import GPT
    from .tokenizer import Tokenizer

    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; choose one of: {', '.join(STAGES)}")
    device = device_type(cfg.device)
    dtype = autocast_dtype(device, cfg.precision)
    ck, run, is_chat = _pick(cfg, stage)
    if not cfg.run and not cfg.checkpoint:
        log(f"loading run {run.name}: {'chat' if is_chat else 'base'} model {ck.path.name}")
    mcfg = ck.model_config()
    tokenizer = Tokenizer.load(run / "tokenizer")
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise UserError(f"the tokenizer in {run / 'tokenizer'} has {tokenizer.vocab_size} ids but the model only "
                        f"{mcfg.vocab_size}; pass the --run the checkpoint was trained in")
    if cfg.threads > 0 and device == "cpu":
        torch.set_num_threads(cfg.threads)
    model = GPT.build(mcfg, device=device)
    try:
        model.load_state_dict(ck.model)
    except RuntimeError as e:
        raise UserError(f"the weights in {ck.path} do not fit the model its meta.json describes "
                        f"({str(e).splitlines()[0][:120]}); load another checkpoint") from None
    return LoadedModel(model.eval(), tokenizer, ck.path, run, is_chat, dtype)

"""Sharded checkpoints for `--parallel fsdp`: every rank writes its own shards with torch.distributed.checkpoint.

    torchrun --standalone --nproc_per_node=2 -m chatsmith pretrain --preset cpu --run-name c2 --parallel fsdp
    torchrun ... --parallel fsdp --resume     # each rank reads back its own shards, with as many processes

train.fit calls `save_sharded` (collectively, on every rank) when the model is FSDP2-sharded, and `load_sharded`
to resume; `checkpoint.load` calls `consolidated_model` (one process) for a sharded checkpoint without
model.safetensors. Everything else about checkpoints (manifest, fallback, keep-last-k, the one loader) is
checkpoint.py's, which this module extends to sharded checkpoints.

Layout of one sharded checkpoint, `checkpoints/step_000200/`:

    dcp/__<rank>_0.distcp  this rank's shards of {"model": ..., "optimizer": ...} (get_state_dict: DTensor shards
                           keyed by parameter name; torch.save records, read back with weights_only=True)
    dcp/.metadata          DCP's index (which rank holds which slice of what); read with an unpickler that admits
                           only DCP's own metadata classes, torch dtypes and sizes (`_MetadataUnpickler`)
    state.json             loop state, with every rank's loader position and RNG states (gathered: small)
    rng.json, meta.json    as in checkpoint.py; meta.json has "parallel": "fsdp" and the world size
    model.safetensors      the final step only: the whole weights, gathered once to rank 0
    manifest.json          {"files": {name: sha256} (dcp/ files included), "step": N, "format": "dcp"}; last

Notable choices:
- Atomic as checkpoint.save is: all ranks write into rank 0's `.tmp-step_000200-<pid>/`, each rank hashes its own
  shard files (in parallel, no rank re-reads another's), rank 0 writes the JSON parts and the manifest after every
  rank has finished, fsyncs and renames the directory into place, then prunes to keep-last-k (valid ones only) and
  removes stale temp directories. A kill at any moment leaves either no `step_000200` or a complete one, and
  `checkpoint.load_latest` falls back past a corrupt one as for single-process checkpoints.
- Safetensors for the consumers, as the field does it: torchtitan trains on DCP checkpoints and saves the last
  step's model alone (`last_save_model_only`, HF safetensors) for use elsewhere, and converts any other step with
  `dcp_to_torch_save`. Here the final checkpoint holds model.safetensors beside its shards (chat, serve, eval,
  export and SFT read it as they read any checkpoint, and the run can still be extended from the shards), and an
  earlier one (a run stopped or killed before its end) is consolidated when loaded: the model's entries only are
  read from dcp/ into whole tensors in one process (`consolidated_model`, dcp_to_torch_save's logic restricted to
  the model, no process group needed).
- Resharding: DCP loads shards into whatever layout the receiving model has (`load_sharded` into one unsharded
  process gives the whole tensors: tested), but a run resumes only with the world size that wrote it, because each
  rank's place in the data (its loader share) does not map onto another number of ranks; train.fit says so in one
  sentence.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as tdcp
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from . import distributed
from .checkpoint import (  # checkpoint.py's own write path, shared so both formats commit the same way
    MANIFEST_FILE,
    META_FILE,
    MODEL_FILE,
    RNG_FILE,
    SHARDED_FORMAT,
    SHARDS_DIR,
    STATE_FILE,
    CheckpointError,
    _auto_meta,
    _prune,
    _publish,
    _remove_stale,
    _sha256,
    _tensors_for_safetensors,
    _write_file,
    _write_safetensors,
    capture_rng,
)
from .common import fsync_dir

_METADATA_CLASSES = frozenset({("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                               ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                               ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")})


def save_sharded(root: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict, meta: dict,
                 dist: distributed.Dist, keep_last: int = 3, weights: bool = False) -> Path:
    """Write `root/step_{step:06d}/` from every rank (a collective: all call it) and return its path. `state` and
    `meta` (JSON-able) are rank 0's; `weights=True` also gathers the whole weights once into model.safetensors."""
    root = Path(root)
    final = root / f"step_{step:06d}"
    pid0 = distributed.gather(os.getpid(), dist)[0]
    tmp = root / f".tmp-{final.name}-{pid0}"
    texts = distributed.rank0_first(lambda: _prepare(root, tmp, step, state, meta), dist)  # None off rank 0
    try:
        model_state, optim_state = get_state_dict(model, opt)  # this rank's shards, keyed by parameter name
        tdcp.save({"model": model_state, "optimizer": optim_state},
                  storage_writer=tdcp.FileSystemWriter(tmp / SHARDS_DIR, sync_files=True))
        whole = None
        if weights:  # a collective too: the full tensors land on rank 0, on its CPU
            whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        mine = {f"{SHARDS_DIR}/{p.name}": _sha256(p) for p in (tmp / SHARDS_DIR).glob(f"__{dist.rank}_*.distcp")}
        hashes = distributed.gather(mine, dist)
    except Exception as e:
        if dist.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write the sharded checkpoint {final} ({_first_line(e)}); free disk space "
                              f"or fix the permissions of {root}, then resume with --resume") from None
    distributed.rank0_first(lambda: _commit(root, tmp, final, step, texts, whole, hashes, keep_last), dist)
    return final


def _prepare(root: Path, tmp: Path, step: int, state: dict, meta: dict) -> dict[str, str]:
    """Rank 0: the JSON files' texts (a non-JSON-able value fails here, before anything touches the disk) and an
    empty temp directory."""
    texts = {STATE_FILE: json.dumps(state, indent=2, ensure_ascii=False),
             META_FILE: json.dumps({**_auto_meta(), **meta, "step": step}, indent=2, ensure_ascii=False, default=str),
             RNG_FILE: json.dumps(capture_rng())}
    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return texts


def _commit(root: Path, tmp: Path, final: Path, step: int, texts: dict, whole: dict | None, hashes: list[dict],
            keep_last: int) -> None:
    """Rank 0, after every rank has written and hashed its shards: JSON parts, weights, manifest, rename, prune."""
    try:
        if whole is not None:
            _write_safetensors(tmp / MODEL_FILE, _tensors_for_safetensors(whole))
        for name, text in texts.items():
            _write_file(tmp / name, lambda f, text=text: f.write(text.encode("utf-8")))
        shards = tmp / SHARDS_DIR
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        files[f"{SHARDS_DIR}/.metadata"] = _sha256(shards / ".metadata")
        for rank_files in hashes:
            files.update(rank_files)
        on_disk = {f"{SHARDS_DIR}/{p.name}" for p in shards.iterdir()}
        if on_disk != {name for name in files if name.startswith(SHARDS_DIR + "/")}:
            raise CheckpointError(f"the shards in {shards} are not the ones the ranks wrote (a shared filesystem "
                                  f"that every rank sees at the same path is needed); see the README's multi-node "
                                  f"section")
        manifest = json.dumps({"files": dict(sorted(files.items())), "step": step, "format": SHARDED_FORMAT}, indent=2)
        _write_file(tmp / MANIFEST_FILE, lambda f: f.write(manifest.encode("utf-8")))
        fsync_dir(shards)
        fsync_dir(tmp)
        _publish(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"could not write checkpoint {final} ({e.strerror}); free disk space or fix the "
                                  f"permissions of {root}, then resume with --resume") from None
        raise
    _prune(root, keep_last, final)
    _remove_stale(root)


def load_sharded(shards: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Load the model and optimizer state of a sharded checkpoint's `dcp/` folder into `model` and `opt`, in
    whatever layout they have: under FSDP2 a collective in which every rank reads only the slices it keeps; in one
    unsharded process (no process group) the whole tensors. `opt` must be built on `model`'s parameters."""
    model_state, optim_state = get_state_dict(model, opt)  # initialises an empty optimizer state (a zero-lr step)
    try:
        tdcp.load({"model": model_state, "optimizer": optim_state}, storage_reader=_reader(shards))
    except Exception as e:
        raise CheckpointError(f"could not read the sharded checkpoint {shards.parent} ({_first_line(e)}); resume "
                              f"with the model and --parallel that wrote it") from None
    set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=optim_state)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def consolidated_model(shards: Path) -> dict[str, torch.Tensor]:
    """The whole model weights (name -> CPU tensor) of a sharded checkpoint's `dcp/` folder, read in this process
    alone (no process group): dcp_to_torch_save's logic, restricted to the model's entries."""
    metadata = _reader(shards).read_metadata()
    model = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
            model[key.removeprefix("model.")] = torch.empty(item.size, dtype=item.properties.dtype)
    tdcp.load({"model": model}, storage_reader=_reader(shards), no_dist=True)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# reading DCP's metadata without unpickling arbitrary objects


class _MetadataUnpickler(pickle.Unpickler):
    """DCP pickles its index (.metadata); this unpickler admits only the classes such an index is made of, so a
    checkpoint from elsewhere cannot run code when it is loaded (the tensors themselves are read by DCP with
    torch.load(weights_only=True))."""

    def find_class(self, module: str, name: str):
        allowed = (module == "torch.distributed.checkpoint.metadata" or (module, name) in _METADATA_CLASSES
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")
        return super().find_class(module, name)


class _Reader(tdcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _reader(shards: Path) -> tdcp.FileSystemReader:
    return _Reader(shards)

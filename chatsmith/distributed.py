"""Data parallelism through torch.distributed: the same command runs alone or under torchrun.

    chatsmith pretrain --preset cpu                                               # one process
    torchrun --standalone --nproc_per_node=2 -m chatsmith pretrain --preset cpu --run-name cpu2
                                                          # two processes (gloo on CPU, nccl on CUDA)

Under torchrun name the run with --run-name (torchrun's own --run-path makes --run ambiguous to its parser).
torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `init()` reads them and joins the process group, and without them every
function here is a no-op, so train.py has one code path. What data parallelism means in the loop:
- each rank builds the same model from the same seed, and DDP broadcasts rank 0's weights once at wrap time;
- each rank reads its own share of the data (the loaders take rank and world_size: disjoint within an epoch);
- gradients are averaged across ranks after the last micro-batch of a step (`no_sync` skips the others), so every rank
  takes the same optimizer step and the weights stay identical without being sent again; train.accumulate scales
  each rank's summed loss by world_size / (the step's targets on all ranks), so that average is the gradient of one
  large batch however unevenly the trained-on targets fall on the ranks;
- a step's logged loss and the validation sums are all-reduced; rank 0 alone writes checkpoints, metrics and logs
  (common.log, checkpoint.save). A checkpoint holds every rank's loader and RNG state, so a run resumes exactly when
  restarted with the same number of processes.
- a stop request (Ctrl-C, SIGTERM) on any rank stops all of them at the same step boundary.

`--parallel fsdp` shards instead of replicating (FSDP2, `wrap`): every rank then runs every forward (validation and
samples included), gradients are reduce-scattered, and checkpoints are sharded: every rank writes its own slices of
the weights and optimizer state with torch.distributed.checkpoint and reads them back on resume (dcp.py, where the
layout is described); the final step also gathers the whole weights once into the model.safetensors that chat,
serve, eval and export load, and an earlier step is consolidated into whole tensors when one process loads it.

With ddp the optimizer is replicated (each rank runs the whole Muon + AdamW step): at the sizes this trains on CPU,
sharding it (ZeRO) would save little memory and cost a collective per parameter group.

On a small CPU, one process already keeps every core busy (MKL's threads), so torchrun pays off on GPUs and on
machines with many cores; `chatsmith bench train` measures tokens/s on the machine at hand.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch

from .common import UserError


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank of world_size (local_rank on its node). One process: 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env() -> Dist:
    """This process's place, from torchrun's environment variables (no process group needed)."""
    try:
        return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None


def init(device: str, timeout_minutes: float = 60) -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA; idempotent) and pick this
    process's CUDA device. `timeout_minutes` bounds every collective, including the wait of the other ranks while
    rank 0 alone trains the tokenizer or prepares shards in a speedrun."""
    d = env()
    if not d.enabled:
        return d
    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; run without torchrun")
    if device == "cuda":
        torch.cuda.set_device(d.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return d


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, d: Dist, parallel: str = "ddp") -> torch.nn.Module:
    """DistributedDataParallel around `model` when there are several ranks; the model itself otherwise. The RoPE
    buffers are computed identically everywhere, so they are not synced at every forward.

    parallel="fsdp": FSDP2 in place instead (`fully_shard` on every block, then on the root, torchtitan's order), so
    each rank keeps 1/world_size of every parameter, gradient and optimizer state as a DTensor shard; the returned
    module is `model` itself. Build the optimizer after this call (it must see the sharded parameters). Mixed
    precision on CUDA: bf16 parameters for compute, fp32 gradient reduction, fp32 master weights; on CPU (gloo)
    everything stays fp32."""
    if not d.enabled:
        return model
    if parallel == "fsdp":
        return _fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [model_device.index] if (model_device := next(model.parameters()).device).type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


def _fully_shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    on_cuda = next(model.parameters()).device.type == "cuda"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if on_cuda else \
        MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)  # the embedding, final norm and lm_head
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` was wrapped by FSDP2 (then every rank must run every forward, collectively)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def no_sync(model: torch.nn.Module, skip: bool):
    """Within it, backward accumulates gradients locally without averaging them (all micro-batches of a step but the
    last); a no-op for an unwrapped model or when `skip` is False. Under FSDP2 gradients are reduce-scattered at
    the last micro-batch only (set_requires_gradient_sync)."""
    if is_sharded(model):
        return _fsdp_sync(model, not skip)
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_sync(model, sync: bool):
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict) of whole tensors on the CPU, for checkpoint.save (train.fit uses it
    unsharded; FSDP2 checkpoints are written sharded by dcp.py). Under FSDP2 a collective (every rank calls it): the
    shards are gathered (torch.distributed.checkpoint.state_dict), the full tensors land on rank 0 (empty dicts
    elsewhere), and the optimizer state is keyed by parameter name; some of its tensors may be the live ones, so write
    it before the next step. Otherwise the plain state dicts."""
    if not is_sharded(model):
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, opt, options=options)


def load_optimizer(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state dict (as `full_state` returned it) into `opt`; under FSDP2 each rank keeps its
    shard of it (a checkpoint gathered by an earlier version; sharded ones load through dcp.load_sharded)."""
    if not is_sharded(model):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


def all_reduce(values: list[float], d: Dist) -> list[float]:
    """Elementwise sum of `values` over the ranks, in float64; `values` itself on one process."""
    if not d.enabled:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def gather(obj, d: Dist) -> list:
    """Every rank's `obj` (JSON-like), in rank order, on every rank; [obj] on one process."""
    if not d.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


def rank0_first(fn, d: Dist):
    """Run `fn()` on rank 0 alone while the other ranks wait (work that writes shared files: the tokenizer, the
    shards); returns its result on rank 0, None elsewhere. If it fails there, the other ranks stop with one sentence
    instead of waiting out the collective timeout."""
    if not d.enabled:
        return fn()
    result, failure = None, None
    if d.rank == 0:
        try:
            result = fn()
        except BaseException as e:
            failure = e
    errors = gather(None if failure is None else f"{type(failure).__name__}: {failure}", d)
    if failure is not None:
        raise failure
    if errors[0] is not None:
        raise UserError(f"rank 0 failed ({errors[0]}); see its output")
    return result


def _collective_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

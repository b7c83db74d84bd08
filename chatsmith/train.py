"""The one training loop. Pretraining now; SFT reuses it with other data and a loss mask.

    chatsmith pretrain --preset cpu               # needs the run's tokenizer and shards (or use `chatsmith speedrun`)
    chatsmith pretrain --preset cpu --resume      # continue from the latest valid checkpoint, bit-exactly
    torchrun --standalone --nproc_per_node=2 -m chatsmith pretrain --preset cpu   # data parallel (distributed.py)

Per step: `grad_accum` micro-batches of (device_batch, seq_len) tokens from the BOS-aligned packing loader, forward
under bf16 autocast where it is faster (CUDA >= sm80; on CPU a short matmul probe at the run's shapes decides,
cached per machine: common.choose_precision; the choice and both figures go to metrics.jsonl), backward, Muon +
AdamW step with scheduled learning rates. Every `eval_every` steps: validation bits per byte on a fixed held-out
token budget. Every `ckpt_every` steps and at the end: an atomic checkpoint holding weights, optimizer, RNG, loader
position and loop state, so that a run killed at any moment and resumed reproduces the per-step losses of an
uninterrupted run exactly (tested with SIGKILL in tests/test_train.py), and sample generations. Ctrl-C or SIGTERM
saves a checkpoint at the last finished step before exiting. Metrics go to `metrics.jsonl` (one JSON object per
line, `kind` = precision|data|train|val|sample).

Notable choices:
- The gradient of a step is that of one large batch: the mean loss over every trained-on target of all its
  micro-batches on all ranks (`accumulate`). A mean of per-micro-batch means would let an SFT row with 20 assistant
  tokens weigh as much as one with 2,000.
- `--resume` continues only the run that was interrupted: the checkpoint's meta.json holds what fixes the schedule
  and the data order (`schedule_of`: steps, batch, seed, optimizer flags), and another value is refused with one
  sentence unless `--allow-schedule-change` (e.g. `--steps 520` on a finished 500-step run).
- What the context costs the data is counted, not hidden: documents longer than a row (their tails are dropped, or
  kept as row-sized pieces with `--keep-tails`) and SFT conversations that do not fit go to the log, to
  metrics.jsonl (`kind` data) and to `<run>/data_stats.json` ({"pretrain": ..., "sft": ...}, with the loader's
  cropped-token count updated at every checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, config, distributed
from .common import (
    UserError,
    atomic_write_json,
    atomic_write_text,
    autocast_dtype,
    choose_precision,
    device_type,
    is_rank0,
    log,
    matmul_peak_flops,
    probe_shapes,
    progress,
    run_dir,
    seed_all,
)
from .data.shards import PackingLoader, iter_val_batches
from .model import GPT, ModelConfig
from .optim import apply_schedules, build_optimizer
from .presets_gpu import budget_note
from .tokenizer import Tokenizer

SAMPLE_PROMPTS = ("The capital of France is", "def fibonacci(n):", "人工智能是", "今天的天气")


# ---------------------------------------------------------------------------------------------------------------------
# pieces


def autocast(device: str, dtype):
    """bf16 autocast context, or a no-op when `dtype` is None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=dtype)


@torch.no_grad()
def evaluate(model: GPT, batches: Iterable, token_bytes: torch.Tensor, device: str, dtype,
             dist: distributed.Dist = distributed.Dist()) -> dict[str, float]:
    """Validation on (x, y) batches: bits per byte = summed cross-entropy (nats) / (ln 2 * UTF-8 bytes of the
    targets), and the mean loss per target token. Targets -1 and special tokens (0 bytes) count in neither sum, so
    bpb does not depend on how documents are delimited and is comparable across tokenizers. Under torchrun each rank
    scores every world_size-th batch and the sums are added up: the same numbers as one process."""
    was_training = model.training
    model.eval()
    if distributed.is_sharded(model):  # FSDP2: every forward is collective, so every rank scores every batch
        dist = distributed.Dist()
    nats, nbytes, ntokens = 0.0, 0, 0
    token_bytes = token_bytes.to(device)
    for i, (x, y) in enumerate(batches):
        if i % dist.world_size != dist.rank:
            continue
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            loss = model(x, y, reduction="none")  # (B, T) nats per target
        b = token_bytes[y.clamp(min=0)] * (y >= 0)  # (B, T) bytes per target, 0 for specials and ignored
        nats += float((loss.float().view_as(b) * (b > 0)).sum())
        nbytes += int(b.sum())
        ntokens += int((b > 0).sum())
    model.train(was_training)
    nats, nbytes, ntokens = distributed.all_reduce([nats, nbytes, ntokens], dist)
    if nbytes == 0:
        raise UserError("the validation data holds no text to score; rebuild it (`chatsmith data prepare`)")
    return {"bpb": nats / (math.log(2) * nbytes), "loss": nats / ntokens}


@torch.no_grad()
def sample(model: GPT, tok: Tokenizer, prompt: str | list[int], max_new_tokens: int, device: str,
           temperature: float = 0.8, seed: int = 0, stop_ids: tuple[int, ...] | None = None) -> str:
    """Plain sampling by full recompute (no KV cache): enough for a glimpse at checkpoints. `prompt` is text (encoded
    after BOS) or ids; generation stops at `stop_ids` (default: BOS, the document separator)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = tok.encode(prompt, bos=True) if isinstance(prompt, str) else list(prompt)
    stop = set(stop_ids if stop_ids is not None else (tok.bos_id,))
    start = len(ids)
    for _ in range(max_new_tokens):
        ctx = torch.tensor([ids[-model.config.seq_len:]], device=device)  # (1, T)
        logits = model(ctx)[0, -1].float().cpu()  # (V,)
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen))
        if nxt in stop:
            break
        ids.append(nxt)
    model.train(was_training)
    return tok.decode(ids[start:])


class MetricsLog:
    """metrics.jsonl: appended line by line; on resume, lines past the checkpoint's step are dropped first. Written
    by rank 0 alone (elsewhere `write` does nothing)."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.f = None
        if not is_rank0():
            return
        if resume_step is None:
            atomic_write_text(path, "")
        elif path.exists():
            keep = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("step", 0) <= resume_step:
                    keep.append(line)
            text = "".join(line + "\n" for line in keep)
            if text != path.read_text(encoding="utf-8"):
                atomic_write_text(path, text)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, **rec) -> None:
        if self.f is not None:
            self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


class StopRequest:
    """Ctrl-C / SIGTERM ask the loop to stop at the next step boundary (so the checkpoint is consistent); a second
    Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.old: dict[int, object] = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log("stop requested: finishing this step and saving a checkpoint (Ctrl-C again to quit at once)")

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: keep default handling
                self.old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)


def read_metrics(run: Path, kind: str = "train") -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if rec.get("kind") == kind:
                out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class Job:
    """What one training run needs; pretraining and SFT build one each and hand it to `fit`."""

    name: str  # "pretrain" or "sft": the progress label and the summary's log line
    run: config.RunConfig
    optim: config.OptimConfig
    train: config.TrainConfig
    saved_config: dict  # the resolved stage config, stored in every checkpoint's meta.json
    out: Path  # checkpoints/ and metrics.jsonl go here
    model: GPT
    loader: Any  # next_batch() -> (x, y); state_dict() / load_state_dict()
    val_batches: Callable[[], Iterable]  # a fresh finite iterator of validation (x, y) batches
    samples: Callable[[GPT, int], list[tuple[str, str]]]  # (model, seed) -> [(prompt, generated text)]
    token_bytes: torch.Tensor
    resume: Any = None  # the checkpoint.Checkpoint to continue from, or None
    data_stats: dict | None = None  # what the data lost to the context (documents cropped, conversations dropped)
    run_path: Path | None = None  # the run directory (its data_stats.json); None: that of run.run


def schedule_of(run: config.RunConfig, tc: config.TrainConfig, optim: config.OptimConfig) -> dict:
    """What fixes a run's learning-rate schedule and data order (saved in every checkpoint's meta.json): resuming with
    any of it changed would not continue the run that was interrupted. As JSON gives it back (tuples as lists)."""
    schedule = {"steps": tc.steps, "device_batch": tc.device_batch, "batch_tokens": tc.batch_tokens,
                "keep_tails": tc.keep_tails, "seed": run.seed, **dataclasses.asdict(optim)}
    return json.loads(json.dumps(schedule))


def prior_checkpoint(ckroot: Path, run_name: str, resume: bool, model_cfg: dict, schedule: dict | None = None,
                     allow_schedule_change: bool = False):
    """The checkpoint to resume from (None for a fresh start); refuses to overwrite a run unless `resume`, and to
    resume with another model shape, or with another `schedule` (see schedule_of) unless `allow_schedule_change`."""
    if not checkpoint.list_checkpoints(ckroot):
        return None
    if not resume:
        raise UserError(f"run {run_name!r} already has checkpoints in {ckroot}; pass --resume to continue it, or "
                        f"choose a new --run name")
    ck = checkpoint.load_latest(ckroot, consolidate=False)  # each rank reads a sharded one's shards itself (fit)
    saved = ck.meta.get("config", {}).get("model")
    if saved is not None and saved != model_cfg:
        raise UserError(f"the checkpoint {ck.path.name} was trained with another model config; resume with the "
                        f"same flags or choose a new --run name")
    saved = ck.meta.get("schedule")
    changed = [k for k in (schedule or {}) if saved is not None and saved.get(k) != schedule[k]]
    if changed:
        was = ", ".join(f"{_flag(k)} {_show(saved.get(k))}" for k in changed)
        now = ", ".join(f"{_flag(k)} {_show(schedule[k])}" for k in changed)
        if not allow_schedule_change:
            raise UserError(f"run {run_name!r} was trained to step {ck.step} with {was}, not {now}, and resuming "
                            f"with another schedule or data order would not continue it as it was; resume with the "
                            f"same flags, pass --allow-schedule-change to continue anyway, or choose a new --run name")
        log(f"warning: resuming run {run_name!r} at step {ck.step} with {now} (it was trained with {was}): "
            f"--allow-schedule-change, so the rest of the run follows the new schedule")
    return ck


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def accumulate(step_model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: str, dtype,
               dist: distributed.Dist = distributed.Dist()) -> tuple[float, int]:
    """Forward and backward of one optimizer step's micro-batches, leaving in .grad the gradient of the mean loss
    over every target of the step: all micro-batches, all ranks. Each micro-batch's summed loss is divided by that
    total count (all-reduced first), so a micro-batch with 20 trained-on targets weighs 20/2,000 of one with 2,000,
    as in one large batch; DDP then averages over ranks, which world_size undoes. Returns (this rank's summed loss,
    the step's target count over all ranks)."""
    n_local = sum(int((y >= 0).sum()) for _, y in batches)
    n_total = int(distributed.all_reduce([n_local], dist)[0])
    scale = dist.world_size / max(1, n_total)
    loss_sum = 0.0
    for i, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        with distributed.no_sync(step_model, skip=i < len(batches) - 1):  # average over ranks once, at the last
            with autocast(device, dtype):
                loss = step_model(x, y, reduction="sum")
            (loss * scale).backward()
        loss_sum += loss.item()
    return loss_sum, n_total


def write_data_stats(run: Path, stage: str, stats: dict) -> None:
    """Record `stats` under `stage` in the run's data_stats.json (other stages' entries kept); rank 0 only."""
    if not is_rank0():
        return
    path = run / "data_stats.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    atomic_write_json(path, {**saved, stage: stats})


def fit(job: Job) -> dict:
    """Train `job.model` for cfg.train.steps optimizer steps (continuing from job.resume); returns a summary."""
    tc, model, loader = job.train, job.model, job.loader
    mcfg = model.config
    ckroot = job.out / "checkpoints"
    device = next(model.parameters()).device.type
    precision = choose_precision(device, tc.precision, probe_shapes(mcfg, tc.device_batch * mcfg.seq_len))
    dtype = precision.dtype
    dist = distributed.env()
    ck = job.resume
    step = 0
    if ck is not None and ck.sharded is None:
        model.load_state_dict(ck.model)  # whole tensors, before any sharding
    if ck is not None and ck.meta.get("parallel", "ddp") != tc.parallel and dist.enabled:
        raise UserError(f"the checkpoint {ck.path.name} was written with --parallel {ck.meta.get('parallel', 'ddp')};"
                        f" resume it with the same --parallel")
    step_model = distributed.wrap(model, dist, tc.parallel)  # DDP or FSDP2 under torchrun, the model itself otherwise
    opt = build_optimizer(model, job.optim)  # after wrapping: under FSDP2 it must see the sharded parameters
    if ck is not None:
        if ck.sharded is None:
            distributed.load_optimizer(model, opt, ck.optimizer)
        loader_state, rng = ck.state["loader"], ck.rng
        ranks = ck.state.get("ranks", [{"loader": loader_state, "rng": rng}])  # one per process that wrote it
        if len(ranks) != dist.world_size:
            raise UserError(f"the checkpoint {ck.path.name} was written by {len(ranks)} process(es); resume it "
                            f"with as many (torchrun --nproc_per_node={len(ranks)}) to continue it exactly")
        if ck.sharded is not None:  # FSDP2: each rank reads its own slices of the weights and optimizer (dcp.py)
            from .dcp import load_sharded

            load_sharded(ck.sharded, model, opt)
        loader.load_state_dict(ranks[dist.rank]["loader"])
        if ranks[dist.rank]["rng"]:
            checkpoint.restore_rng(ranks[dist.rank]["rng"])
        step = ck.step
        log(f"{job.name}: resuming run {job.run.run!r} from {ck.path.name} (step {step})")
    step_model = torch.compile(step_model) if tc.compile else step_model

    per_rank = tc.device_batch * mcfg.seq_len * dist.world_size  # tokens of one micro-batch on every rank
    if tc.batch_tokens % per_rank:
        raise UserError(f"--batch-tokens {tc.batch_tokens} is not a multiple of --device-batch x seq_len x "
                        f"processes = {per_rank}; use a multiple of it, or 0 for one forward pass per process")
    rows_per_step = tc.batch_tokens // per_rank or 1
    tokens_per_step = rows_per_step * per_rank
    flops_per_token = model.flops_per_token()
    peak = matmul_peak_flops("bfloat16" if dtype is not None else "float32", device=device)
    metrics = MetricsLog(job.out / "metrics.jsonl", resume_step=step if ck is not None else None)
    run_path = job.run_path or run_dir(job.run.run)
    if step < tc.steps:  # a rerun of a finished run trains nothing, so it writes nothing either
        metrics.write(kind="precision", step=step, **precision.as_dict())  # the choice and the probe's FLOP/s
        if job.data_stats is not None:
            metrics.write(kind="data", step=step, **job.data_stats)
            write_data_stats(run_path, job.name, job.data_stats)
    last_bpb = (read_metrics(job.out, "val") or [{}])[-1].get("val_bpb")
    log(f"{job.name}: {model.num_params() / 1e6:.2f}M params ({model.num_params(non_embedding=True) / 1e6:.2f}M "
        f"non-embedding), {flops_per_token / 1e6:.1f} MFLOPs/token; {tokens_per_step} tokens/step; "
        f"{'bf16 autocast' if dtype is not None else 'fp32'} on {device}"
        + (f" x {dist.world_size} processes" if dist.enabled else ""))

    def save(at: int) -> None:
        state = {"loader": loader.state_dict()}
        if dist.enabled:  # every rank's place in its data and its RNG, for an exact resume with as many processes
            state["ranks"] = distributed.gather({"loader": state["loader"], "rng": checkpoint.capture_rng()}, dist)
        meta = {"config": job.saved_config, "kind": job.name, "tokens": at * tokens_per_step,
                "world_size": dist.world_size, "parallel": tc.parallel, "schedule": schedule_of(job.run, tc, job.optim)}
        if distributed.is_sharded(model):  # FSDP2: every rank writes its own shards (dcp.py); the last step also
            from .dcp import save_sharded  # gathers the whole weights once, for chat, serve, eval and export

            save_sharded(ckroot, at, model, opt, state, meta, dist, keep_last=tc.keep_last, weights=at == tc.steps)
        else:
            model_state, opt_state = distributed.full_state(model, opt)
            checkpoint.save(ckroot, at, model_state, optimizer=opt_state, state=state, meta=meta,
                            keep_last=tc.keep_last)  # writes on rank 0 only
        if job.data_stats is not None:  # with what the packing cropped so far (rank 0's share)
            write_data_stats(run_path, job.name,
                             {**job.data_stats, "loader": getattr(loader, "stats", None)})
        distributed.barrier(dist)  # nobody reads a checkpoint (the next stage) before it is complete

    def validate(at: int) -> float:
        result = evaluate(model, job.val_batches(), job.token_bytes, device, dtype, dist)
        metrics.write(kind="val", step=at, val_bpb=result["bpb"], val_loss=result["loss"])
        return result["bpb"]

    def samples(at: int) -> None:
        if not is_rank0() and not distributed.is_sharded(model):  # FSDP2: every rank runs the forwards, 0 writes
            return
        for prompt, text in job.samples(model, job.run.seed):
            metrics.write(kind="sample", step=at, prompt=prompt, text=text)
            log(f"  sample | {prompt} → {text!r}")

    model.train()
    t_start = time.perf_counter()
    bar = progress(total=tc.steps, initial=step, desc=job.name, unit="step")
    with StopRequest() as stop, bar:  # the bar closes before any error message
        while step < tc.steps:
            apply_schedules(opt, step, tc.steps, job.optim)
            t0 = time.perf_counter()
            batches = [loader.next_batch() for _ in range(rows_per_step)]
            loss_sum, loss_tokens = accumulate(step_model, batches, device, dtype, dist)
            stopping = stop.requested  # decided here, once per step: under torchrun by all ranks together
            if dist.enabled:  # the loss summed over ranks, and whether any rank was asked to stop
                loss_sum, stop_any = distributed.all_reduce([loss_sum, stopping], dist)
                stopping = stop_any > 0
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            step += 1
            tok_s = tokens_per_step / dt
            mfu = flops_per_token * tok_s / peak
            train_loss = loss_sum / max(1, loss_tokens)  # the mean over every target of the step
            if not math.isfinite(train_loss):
                raise UserError(f"the loss became {train_loss} at step {step}; lower the learning rates "
                                f"(--matrix-lr, --embed-lr) and start a new run")
            metrics.write(kind="train", step=step, loss=train_loss, lr=opt.param_groups[0]["lr"],
                          tokens=step * tokens_per_step, loss_tokens=loss_tokens, tok_s=tok_s, mfu=mfu, dt=dt)
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.0%}",
                            bpb="-" if last_bpb is None else f"{last_bpb:.3f}")
            last = step == tc.steps
            if tc.eval_every and (step % tc.eval_every == 0 or last):
                last_bpb = validate(step)
            if step % (tc.sample_every or tc.ckpt_every) == 0 and not last:
                samples(step)
            if step % tc.ckpt_every == 0 or last or stopping:
                save(step)
            if stopping:
                metrics.close()
                raise KeyboardInterrupt
    if ck is None or ck.step < tc.steps:
        samples(step)
    metrics.close()
    wall = time.perf_counter() - t_start
    summary = {"run": job.run.run, "steps": step, "tokens": step * tokens_per_step, "val_bpb": last_bpb,
               "seconds": wall, "precision": precision.as_dict()}
    log(f"{job.name} done: {json.dumps(summary)}")
    return summary


def setup(cfg, run: config.RunConfig, tc: config.TrainConfig, stage: str, out: Path | None = None) -> str:
    """Device, process group (under torchrun), threads, seed and the saved config of a training stage (in `out`,
    default the run's directory); returns the device type."""
    device = device_type(tc.device)
    autocast_dtype(device, tc.precision)  # a bad --precision fails here, before any work
    distributed.init(device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_all(run.seed)
    if is_rank0():
        config.save(cfg, (out or run_dir(run.run)) / "config.json", stage)
    return device


def main(cfg: config.PretrainStage) -> dict:
    """Pretrain on the run's shards; returns a summary dict (final val bpb, tokens, seconds)."""
    run = run_dir(cfg.run.run)
    return pretrain(cfg, out=run, data=run)


def pretrain(cfg: config.PretrainStage, out: Path, data: Path) -> dict:
    """Pretrain with the tokenizer and shards of the run directory `data`, writing config.json, checkpoints/,
    metrics.jsonl and data_stats.json into `out`. `main` passes the run's own directory as both; a scaling ladder
    rung writes into `<run>/scale/runs/<rung>` and reads the parent run's data (scaling.py)."""
    tc = cfg.train
    out.mkdir(parents=True, exist_ok=True)
    for need, hint in ((data / "tokenizer" / "tokenizer.json", "tokenizer train"),
                       (data / "shards" / "train" / "index.json", "data prepare")):
        if not need.exists():
            raise UserError(f"run {data.name!r} has no {need.parent.name} yet; run `chatsmith {hint} --run "
                            f"{data.name}` first (or `chatsmith speedrun`)")
    tok = Tokenizer.load(data / "tokenizer")
    mcfg: ModelConfig = cfg.model.resolve(vocab_size=cfg.model.vocab_size or tok.vocab_size)
    if mcfg.vocab_size < tok.vocab_size:
        raise UserError(f"--model-vocab-size {mcfg.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    cfg = dataclasses.replace(cfg, model=mcfg)
    ck = prior_checkpoint(out / "checkpoints", cfg.run.run, tc.resume, dataclasses.asdict(mcfg),
                          schedule_of(cfg.run, tc, cfg.optim), tc.allow_schedule_change)
    device = setup(cfg, cfg.run, tc, "pretrain", out)
    dist = distributed.env()
    loader = PackingLoader(data / "shards" / "train", tc.device_batch, mcfg.seq_len, rank=dist.rank,
                           world_size=dist.world_size, seed=cfg.run.seed, keep_tails=tc.keep_tails)
    stats = loader.data_stats()
    if stats["longer_than_row"]:
        fate = ("cut into row-sized pieces (--keep-tails)" if tc.keep_tails else
                "dropped (--keep-tails keeps them as pieces of their own)")
        log(f"pretrain: {stats['longer_than_row']:,} of {stats['documents']:,} train documents are longer than a row "
            f"of {stats['row_tokens']} tokens; their {stats['tokens_beyond_row']:,} tokens beyond it "
            f"({stats['tokens_beyond_row'] / max(1, stats['tokens']):.1%} of the split) are {fate}")
    note = budget_note(stats["tokens"], tc.steps, tc.batch_tokens or tc.device_batch * mcfg.seq_len * dist.world_size)
    if note:  # e.g. a GPU preset on the offline pkg: corpora
        log(f"pretrain: {note}")

    def samples(model: GPT, seed: int) -> list[tuple[str, str]]:
        return [(p, sample(model, tok, p, 32, device, seed=seed + i)) for i, p in enumerate(SAMPLE_PROMPTS)]

    return fit(Job(
        name="pretrain", run=cfg.run, optim=cfg.optim, train=tc, saved_config=config.to_dict(cfg), out=out,
        model=GPT.build(mcfg, device=device), loader=loader,
        val_batches=lambda: iter_val_batches(data / "shards" / "val", tc.device_batch, mcfg.seq_len, tc.eval_tokens),
        samples=samples, token_bytes=tok.token_bytes(), resume=ck, data_stats=stats, run_path=out))

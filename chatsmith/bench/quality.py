"""`chatsmith bench quality`: wall time and tokens to a target validation bits-per-byte, chatsmith's recipe beside the
baseline a practitioner would write, on one tokenizer, one set of shards and the bench-ref shape.

    chatsmith bench quality --json                          # builds run bench-quality's data once, then trains
    chatsmith bench quality --run cpu --json --plot q.png   # an existing run's tokenizer and shards (read only)

Contenders, trained step by step in turn (so that both see the same machine noise) on the same batches:
- chatsmith: its own recipe, made of train.py's pieces: GPT.build's init, Muon + AdamW (optim.build_optimizer with
  the default OptimConfig), its schedule (optim.apply_schedules) and the loop's step body (train.accumulate).
- hf_transformers: `Qwen3ForCausalLM` at the same shape with HF's own init, `torch.optim.AdamW(fused=True)`, betas
  (0.9, 0.95), weight decay 0.1 on the matrices (not on norms), `transformers.get_cosine_schedule_with_warmup`
  (linear warmup over `warmup_frac` of the steps, cosine to zero), gradient clipping at 1.0 - nanoGPT's and HF's
  defaults. Its learning rate is the best of `--sweep-lrs`, each trained `--sweep-steps` steps (a whole short
  schedule) and scored on the same held-out windows: the sweep is in the JSON.

Both share the schedule horizon (`--max-steps`), the batch, the precision (the probe's choice: common.choose_precision)
and the evaluation: `train.evaluate` on the same held-out windows of the val shards every `--eval-every` steps, i.e.
at the same token counts. Time to target = the contender's training seconds (its steps only; evaluation is excluded
and costs both the same) up to the first evaluation at or below `--target-bpb`. A contender that never gets there
within `--max-steps` says so (`reached` false) and the ratio becomes a lower bound.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from ..common import UserError, log, progress, run_dir
from ..config import opt
from . import bench_ref, bench_ref_with, emit

DATA_RUN = "bench-quality"  # the run whose tokenizer and shards the benchmark builds when --run is not given


@dataclass(frozen=True)
class QualityBenchConfig:
    run: str = opt("", f"a run with a tokenizer and shards to use (read only); default: build run {DATA_RUN!r} "
                       f"(cpu preset data, --data-docs documents per source) once and reuse it")
    data_docs: int = opt(4000, "documents per source when building the benchmark's own data", min=100, max=10**9)
    tokenizer_chars: int = opt(10_000_000, "characters the benchmark's own tokenizer is trained on", min=10_000,
                               max=10**12)
    target_bpb: float = opt(2.5, "validation bits per byte both contenders train to", min=0.01, max=100.0)
    max_steps: int = opt(250, "schedule horizon of both contenders and the most steps either trains", min=2,
                         max=10**7)
    batch: int = opt(8, "sequences of seq_len (512) per step, for both", min=1, max=4096)
    eval_every: int = opt(10, "steps between evaluations (the same token counts for both)", min=1, max=10**6)
    eval_tokens: int = opt(16384, "held-out tokens per evaluation: the same windows every time", min=512,
                           max=2**30)
    sweep_lrs: tuple[float, ...] = opt((1e-3, 3e-3, 1e-2), "the baseline's peak learning rates to sweep", min=1e-6,
                                       max=1.0)
    sweep_steps: int = opt(30, "steps of each sweep run (a whole warmup + cosine schedule of that length)", min=2,
                           max=10**6)
    warmup_frac: float = opt(0.05, "the baseline's linear warmup, as a fraction of its steps", min=0.0, max=0.5)
    precision: str = opt("auto", "auto (the matmul probe decides), bf16 or fp32, for both",
                         choices=("auto", "bf16", "fp32"))
    threads: int = opt(0, "torch intra-op threads; 0 leaves torch's default", min=0, max=4096)
    seed: int = opt(0, "seed of both models' initialisation", min=0, max=2**32 - 1)
    depth: int = opt(0, "model override for quick runs (tests): transformer blocks; 0 = bench-ref's 4", min=0,
                     max=1024)
    n_embd: int = opt(0, "model override: width (heads of 64, or of --head-dim); 0 = bench-ref's 256", min=0,
                      max=2**16)
    head_dim: int = opt(0, "model override: head width; 0 = bench-ref's 64", min=0, max=1024)
    seq_len: int = opt(0, "model override: context length of the training windows; 0 = bench-ref's 512", min=0,
                       max=2**20)
    plot: str = opt("", "also write the curves as a PNG to this path")
    json: bool = opt(False, "print JSON on stdout")


@dataclass(frozen=True)
class QualityBench:
    bench: QualityBenchConfig = QualityBenchConfig()


# ---------------------------------------------------------------------------------------------------------------------
# data and shape


def model_config(b: QualityBenchConfig):
    """bench-ref, or bench-ref with the flags' overrides."""
    return bench_ref_with(depth=b.depth, n_embd=b.n_embd, head_dim=b.head_dim, seq_len=b.seq_len)


def prepare_data(b: QualityBenchConfig) -> Path:
    """The run directory holding the tokenizer and shards: --run as it is, or run DATA_RUN built with the existing
    stages (tokenizer train + data prepare on the cpu preset's sources, which skip when already up to date)."""
    if b.run:
        run = run_dir(b.run, create=False)
        for need, what in ((run / "tokenizer" / "tokenizer.json", "a tokenizer"),
                           (run / "shards" / "train" / "index.json", "train shards"),
                           (run / "shards" / "val" / "index.json", "val shards")):
            if not need.exists():
                raise UserError(f"run {b.run!r} has no {what} ({need}); run `chatsmith speedrun --run {b.run}` first "
                                f"or leave out --run to let the benchmark build its own data")
        return run
    from .. import config, tokenizer
    from ..data import shards

    overrides = {"run": {"run": DATA_RUN, "preset": "cpu"}, "data": {"max_docs": b.data_docs},
                 "tokenizer": {"train_chars": b.tokenizer_chars}}
    tokenizer.train_main(config.make(config.TokenizerStage, overrides))
    shards.main(config.make(config.DataStage, {k: v for k, v in overrides.items() if k != "tokenizer"}))
    return run_dir(DATA_RUN)


# ---------------------------------------------------------------------------------------------------------------------
# the contenders: step() trains one step and returns its seconds; scorer is what train.evaluate calls


class ChatsmithTrainer:
    """chatsmith's recipe from train.py's pieces: GPT.build init, MuonAdamW, apply_schedules, train.accumulate."""

    def __init__(self, mcfg, loader, total_steps: int, dtype, seed: int):
        import torch

        from ..config import OptimConfig
        from ..model import GPT
        from ..optim import build_optimizer

        torch.manual_seed(seed)
        self.model = GPT.build(mcfg, device="cpu")
        self.optim_cfg = OptimConfig()
        self.opt = build_optimizer(self.model, self.optim_cfg)
        self.loader, self.total, self.dtype, self.steps = loader, total_steps, dtype, 0
        self.scorer = self.model

    def step(self) -> float:
        from ..optim import apply_schedules
        from ..train import accumulate

        t0 = time.perf_counter()
        self.model.train()
        apply_schedules(self.opt, self.steps, self.total, self.optim_cfg)
        accumulate(self.model, [self.loader.next_batch()], "cpu", self.dtype)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        return time.perf_counter() - t0


def _hf_scorer(hf_model):
    """A module with GPT's scoring signature, model(x, y, reduction="none") -> (B, T) nats, over an HF causal LM."""
    import torch
    import torch.nn.functional as F

    class Scorer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = hf_model

        def forward(self, x, y, reduction: str = "none"):
            logits = self.hf(input_ids=x).logits  # (B, T, V)
            return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1,
                                   reduction="none").view_as(y)

    return Scorer()


class HFTrainer:
    """The practitioner's baseline: Qwen3ForCausalLM (HF init), fused AdamW with decoupled weight decay 0.1 on the
    matrices, HF's cosine schedule with linear warmup, gradient clipping at 1.0."""

    def __init__(self, mcfg, loader, total_steps: int, dtype, seed: int, lr: float, warmup_frac: float):
        import torch

        from ..common import require
        from ..model import GPT

        transformers = require("transformers", "transformers", "the HF baseline of bench quality")
        torch.manual_seed(seed)
        shape = GPT.build(mcfg, device="meta").hf_config_dict()  # the same shape, no weights
        self.model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape, attn_implementation="sdpa"))
        matrices = [p for p in self.model.parameters() if p.dim() >= 2]
        others = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1},
                                      {"params": others, "weight_decay": 0.0}],
                                     lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
        self.sched = transformers.get_cosine_schedule_with_warmup(
            self.opt, num_warmup_steps=round(warmup_frac * total_steps), num_training_steps=total_steps)
        self.loader, self.dtype, self.steps = loader, dtype, 0
        self.scorer = _hf_scorer(self.model)

    def step(self) -> float:
        import torch
        import torch.nn.functional as F

        from ..train import autocast

        t0 = time.perf_counter()
        self.model.train()
        x, y = self.loader.next_batch()
        with autocast("cpu", self.dtype):
            logits = self.model(input_ids=x).logits  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------------
# the race


@dataclass
class Lane:
    """One contender's run: its trainer, its curve and when (if) it reached the target."""

    name: str
    trainer: ChatsmithTrainer | HFTrainer
    seconds: float = 0.0  # training time so far, evaluation excluded
    curve: list | None = None
    reached_at: dict | None = None


def race(lanes: list[Lane], steps: int, b: QualityBenchConfig, evaluate_bpb, tokens_per_step: int,
         target: float | None, desc: str) -> None:
    """Step every lane in turn up to `steps` (a lane stops once at or below `target`), evaluating each every
    eval_every steps and at the end, at step 0 first."""
    for lane in lanes:
        lane.curve = [{"step": 0, "tokens": 0, "seconds": 0.0, "val_bpb": evaluate_bpb(lane.trainer.scorer)}]
    bar = progress(total=steps * len(lanes), desc=desc, unit="step")
    with bar:
        for step in range(1, steps + 1):
            for lane in lanes:
                if lane.reached_at is not None:
                    continue
                lane.seconds += lane.trainer.step()
                bar.update(1)
                if step % b.eval_every and step != steps:
                    continue
                point = {"step": step, "tokens": step * tokens_per_step, "seconds": lane.seconds,
                         "val_bpb": evaluate_bpb(lane.trainer.scorer)}
                lane.curve.append(point)
                bar.set_postfix({lane.name: f"{point['val_bpb']:.3f}"})
                if not math.isfinite(point["val_bpb"]):
                    raise UserError(f"{lane.name} diverged (val bpb {point['val_bpb']}) at step {step}; lower "
                                    f"--sweep-lrs")
                if target is not None and point["val_bpb"] <= target:
                    lane.reached_at = point
            if all(lane.reached_at is not None for lane in lanes):
                break


def _summary(lane: Lane) -> dict:
    last, hit = lane.curve[-1], lane.reached_at or {}
    return {"reached": lane.reached_at is not None, "steps_to_target": hit.get("step"),
            "tokens_to_target": hit.get("tokens"), "seconds_to_target": hit.get("seconds"),
            "steps_trained": last["step"], "seconds_trained": lane.seconds, "final_val_bpb": last["val_bpb"],
            "curve": lane.curve}


def plot_curves(result: dict, path: str) -> None:
    """val bpb against training seconds and against tokens, both contenders and the sweep, with the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("chatsmith", "hf_transformers"):
        curve = result[name]["curve"]
        for ax, key in zip(axes, ("seconds", "tokens")):
            ax.plot([p[key] for p in curve], [p["val_bpb"] for p in curve], marker=".", label=name)
    for run in result["sweep"]["runs"]:
        axes[1].plot([p["tokens"] for p in run["curve"]], [p["val_bpb"] for p in run["curve"]], alpha=0.4,
                     linestyle="--", label=f"sweep lr {run['lr']:g}")
    for ax, label in zip(axes, ("training seconds", "tokens")):
        ax.axhline(result["target_bpb"], color="grey", linewidth=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel("val bits per byte")
        ax.legend(fontsize=7)
    fig.suptitle(f"bench quality (bench-ref): target {result['target_bpb']} bpb")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(cfg: QualityBench) -> dict:
    import torch

    from ..common import choose_precision, probe_shapes
    from ..data.shards import PackingLoader, iter_val_batches
    from ..tokenizer import Tokenizer
    from ..train import evaluate

    b = cfg.bench
    if b.threads:
        torch.set_num_threads(b.threads)
    run = prepare_data(b)
    tok = Tokenizer.load(run / "tokenizer")
    mcfg = model_config(b)
    if tok.vocab_size > mcfg.vocab_size:
        raise UserError(f"the tokenizer of {run.name} has {tok.vocab_size} ids, more than bench-ref's "
                        f"{mcfg.vocab_size}; use a run whose vocabulary is at most {mcfg.vocab_size}")
    precision = choose_precision("cpu", b.precision, probe_shapes(mcfg, b.batch * mcfg.seq_len))
    dtype = precision.dtype
    token_bytes = tok.token_bytes()
    val_dir, train_dir = run / "shards" / "val", run / "shards" / "train"
    windows = list(iter_val_batches(val_dir, b.batch, mcfg.seq_len, b.eval_tokens))  # the same for every score

    def evaluate_bpb(scorer) -> float:
        return evaluate(scorer, windows, token_bytes, "cpu", dtype)["bpb"]

    def loader():  # every contender sees the same batches in the same order
        return PackingLoader(train_dir, b.batch, mcfg.seq_len)

    tokens_per_step = b.batch * mcfg.seq_len
    t_start = time.perf_counter()
    sweep = [Lane(f"lr {lr:g}", HFTrainer(mcfg, loader(), b.sweep_steps, dtype, b.seed, lr, b.warmup_frac))
             for lr in b.sweep_lrs]
    race(sweep, b.sweep_steps, b, evaluate_bpb, tokens_per_step, None, "lr sweep")
    finals = [lane.curve[-1]["val_bpb"] for lane in sweep]
    best_lr = b.sweep_lrs[min(range(len(finals)), key=finals.__getitem__)]
    log(f"bench quality: the baseline's lr sweep ({b.sweep_steps} steps): "
        + ", ".join(f"{lr:g} -> {v:.4f}" for lr, v in zip(b.sweep_lrs, finals)) + f"; best {best_lr:g}")
    sweep_seconds = time.perf_counter() - t_start
    sweep_runs = [{"lr": lr, "curve": lane.curve} for lr, lane in zip(b.sweep_lrs, sweep)]
    del sweep  # free the sweep's models before the race

    lanes = [Lane("chatsmith", ChatsmithTrainer(mcfg, loader(), b.max_steps, dtype, b.seed)),
             Lane("hf_transformers", HFTrainer(mcfg, loader(), b.max_steps, dtype, b.seed, best_lr, b.warmup_frac))]
    race(lanes, b.max_steps, b, evaluate_bpb, tokens_per_step, b.target_bpb, "to target")
    ours, theirs = (_summary(lane) for lane in lanes)
    result: dict = {
        "config": "bench-ref" if mcfg == bench_ref().resolve() else "bench-ref with overrides", "run": run.name,
        "params": lanes[0].trainer.model.num_params(), "tokenizer_vocab": tok.vocab_size, "batch": b.batch,
        "seq_len": mcfg.seq_len, "tokens_per_step": tokens_per_step, "threads": torch.get_num_threads(),
        "precision": precision.as_dict(), "target_bpb": b.target_bpb, "max_steps": b.max_steps,
        "eval_every": b.eval_every, "eval_windows": sum(x.size(0) for x, _ in windows),
        "eval_tokens": sum(x.numel() for x, _ in windows),
        "sweep": {"steps": b.sweep_steps, "lrs": list(b.sweep_lrs), "final_val_bpb": finals, "best_lr": best_lr,
                  "seconds": sweep_seconds, "runs": sweep_runs},
        "chatsmith": {"recipe": "GPT init, Muon + AdamW (OptimConfig defaults), linear warmdown", **ours},
        "hf_transformers": {"recipe": f"Qwen3ForCausalLM (HF init), AdamW(fused=True) lr {best_lr:g} betas (0.9, "
                                      f"0.95) wd 0.1, warmup {b.warmup_frac:g} + cosine, clip 1.0", **theirs},
    }
    both = ours["reached"] and theirs["reached"]
    if ours["reached"]:  # with the baseline short of the target the ratios are lower bounds (its whole run)
        their_s = theirs["seconds_to_target"] if theirs["reached"] else theirs["seconds_trained"]
        their_tokens = theirs["tokens_to_target"] if theirs["reached"] else theirs["curve"][-1]["tokens"]
        result["time_ratio_hf_over_chatsmith"] = their_s / ours["seconds_to_target"]
        result["token_ratio_hf_over_chatsmith"] = their_tokens / ours["tokens_to_target"]
        result["ratios_are_lower_bounds"] = not both
        result["goal_1_5x_sooner_met"] = result["time_ratio_hf_over_chatsmith"] >= 1.5
    else:
        result["time_ratio_hf_over_chatsmith"] = result["token_ratio_hf_over_chatsmith"] = None
        result["goal_1_5x_sooner_met"] = False
    if b.plot:
        plot_curves(result, b.plot)
        result["plot"] = b.plot
    emit(result if b.json else {k: v for k, v in result.items() if not isinstance(v, dict)}, b.json)
    return result

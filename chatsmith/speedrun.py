"""The speedrun: every stage in order, on one run directory, resumable, ending with the report card.

    chatsmith speedrun                    # preset cpu: sized for 15 minutes on 2 CPU cores
    chatsmith speedrun --minutes 30       # the same with the training budgets doubled
    chatsmith speedrun --preset smoke     # seconds; what the tests run
    torchrun --standalone --nproc_per_node=2 -m chatsmith speedrun    # data parallel (see distributed.py)

Stages: documents + tokenizer (`tokenizer train`) → token shards (`data prepare`) → pretraining (`pretrain`) →
chat fine-tuning (`sft`) → RL (`rl`: GRPO with the calculator, on the preset's task; `--no-rl` skips it) → the assistant
checks of checks.py, once, on the final model (at the end of RL, or of SFT without RL) → evaluation of the base,
SFT and RL models (`eval`: `--eval-limit` items per task, the `--eval-full` tasks on `--eval-full-limit` items (0:
their whole sets), replies up to `--eval-max-tokens`) → the report card (`report`); then it prints where the report
is and how to chat and serve.
Each stage skips work already done in the run directory, so rerunning after an interruption continues where it
stopped (pretraining, SFT and RL resume from their latest checkpoints). `--minutes N` scales the step budgets of
the three training stages by N / `--budget-minutes` (what the preset is sized for); the other stages take the time
they take.

Wall seconds per stage go to `<run>/speedrun.json` (with the machine and the precision used), summed over reruns: a
stage interrupted and resumed shows the time of both attempts. A stage that already finished with the same settings
adds nothing when it is entered again (it only checks its outputs), so a rerun of a finished run leaves the times
and the report as they were.

Under torchrun, rank 0 alone trains the tokenizer and writes the shards while the others wait; training is data
parallel; the reply checks, the evaluation and the report run on rank 0 while the others wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import time
from pathlib import Path

from . import config, distributed
from .common import atomic_write_json, autocast_dtype, device_type, is_rank0, log, read_json, run_dir


class StageClock:
    """`<run>/speedrun.json`: {"stages": {name: {"seconds", "done"}}, "machine", "precision"}. `stage(name, key)`
    times a block and adds its seconds, also when it is interrupted; `done` holds a hash of the stage's settings
    (`key`), and entering a finished stage with the same settings again adds no time and writes nothing."""

    def __init__(self, path: Path):
        self.path = path
        self.data = read_json(path) if path.exists() else {}
        self.data.setdefault("stages", {})
        self.worked = False  # did any stage add time in this process

    @staticmethod
    def fingerprint(*parts) -> str:
        text = json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts],
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def is_done(self, name: str, key: str) -> bool:
        return self.data["stages"].get(name, {}).get("done") == key

    @contextlib.contextmanager
    def stage(self, name: str, key: str, precision: str | None = None):
        if self.is_done(name, key):
            yield
            return
        rec = self.data["stages"].setdefault(name, {"seconds": 0.0, "done": None})
        rec["done"] = None
        if precision is not None:
            self.data.setdefault("precision", {})[name] = precision
        t0 = time.perf_counter()
        try:
            yield
            rec["done"] = key
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        """Add `seconds` to stage `name` and save."""
        rec = self.data["stages"].setdefault(name, {"seconds": 0.0, "done": None})
        rec["seconds"] = round(rec["seconds"] + seconds, 3)
        self.worked = True
        self.save()

    def save(self) -> None:
        if not is_rank0():
            return
        from .report import machine_info

        self.data["machine"] = machine_info()
        self.data["updated"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        atomic_write_json(self.path, self.data)


def _precision(device: str, precision: str) -> str:
    return "bf16 autocast" if autocast_dtype(device, precision) is not None else "fp32"


def scaled(cfg: config.SpeedrunStage) -> config.SpeedrunStage:
    """`cfg` with the step budgets of pretraining, SFT and RL (and their eval/checkpoint intervals) multiplied by
    --minutes / --budget-minutes; unchanged when --minutes is 0."""
    sp = cfg.speedrun
    if not sp.minutes:
        return cfg
    factor = sp.minutes / sp.budget_minutes

    def scale(tc: config.TrainConfig) -> config.TrainConfig:
        steps = max(1, round(tc.steps * factor))
        every = {k: max(1, round(getattr(tc, k) * factor)) if getattr(tc, k) else 0
                 for k in ("eval_every", "ckpt_every", "sample_every")}
        return dataclasses.replace(tc, steps=steps, **every)

    return dataclasses.replace(cfg, train=scale(cfg.train), sft_train=scale(cfg.sft_train),
                               rl_train=scale(cfg.rl_train))


def evaluate_model(cfg: config.SpeedrunStage, run: Path, model: str, clock: StageClock) -> None:
    """Evaluate the run's newest `model` ("base" | "sft" | "rl"): the stage's tasks (the base suite, or --chat-tasks)
    on --eval-limit items each, then the --eval-full tasks on --eval-full-limit items (0: their whole sets; evaluate
    merges both into one result file); a pass that finished for that checkpoint is not run again. Skipped with one
    line when there is no such checkpoint."""
    from . import checkpoint, evaluate

    sp = cfg.speedrun
    if sp.eval_limit == 0:
        return
    ckpts = checkpoint.list_checkpoints(checkpoint.stage_root(run, {"sft": "chat"}.get(model, model)))
    if not ckpts:
        log(f"speedrun: {model} evaluation skipped: the run has no {model} checkpoint")
        return
    stage = "base" if model == "base" else "chat"
    suite = evaluate.SUITES["base"] if stage == "base" else sp.chat_tasks
    full = [t for t in sp.eval_full if t in suite]
    step = int(ckpts[-1].name.split("_")[1])
    key = StageClock.fingerprint(sp, step, str(ckpts[-1]))
    more = "whole sets" if sp.eval_full_limit == 0 else f"{sp.eval_full_limit} items"
    for name, tasks, limit in ((f"eval {model}", tuple(t for t in suite if t not in full), sp.eval_limit),
                               (f"eval {model} ({more})", tuple(full), sp.eval_full_limit)):
        if not tasks or clock.is_done(name, key):  # a finished pass is not redone
            continue
        with clock.stage(name, key):
            evaluate.main(config.make(evaluate.EvalStage, {
                "run": {"run": cfg.run.run, "preset": cfg.run.preset},
                # base models are scored by batched forwards (log-likelihoods, bits per byte), which use both cores;
                # chat models mostly decode, where one torch thread beside the engine's Python threads is as fast
                "load": {"run": cfg.run.run, "checkpoint": str(ckpts[-1]), "threads": 0 if stage == "base" else 1},
                "eval": {"stage": stage, "tasks": tasks, "limit": limit, "max_tokens": sp.eval_max_tokens,
                         "bpb": stage == "base" and limit != 0}}))


def main(cfg: config.SpeedrunStage) -> dict:
    from . import report, sft, tokenizer, train
    from .data import shards

    cfg = scaled(cfg)
    run = run_dir(cfg.run.run)
    log(f"speedrun: preset {cfg.run.preset!r}, run directory {run}")
    device = device_type(cfg.train.device)
    dist = distributed.init(device)  # under torchrun: rank 0 makes the tokenizer and shards
    clock = StageClock(run / "speedrun.json")

    def prepare() -> None:
        config.save(cfg, run / "config.json", "speedrun")
        with clock.stage("tokenizer", clock.fingerprint(cfg.data, cfg.tokenizer)):
            tokenizer.train_main(config.TokenizerStage(run=cfg.run, data=cfg.data, tokenizer=cfg.tokenizer))
        with clock.stage("data", clock.fingerprint(cfg.data, cfg.shards)):
            shards.main(config.DataStage(run=cfg.run, data=cfg.data, shards=cfg.shards))

    distributed.rank0_first(prepare, dist)

    train_cfg = dataclasses.replace(cfg.train, resume=True)
    with clock.stage("pretrain", clock.fingerprint(cfg.model, cfg.optim, cfg.train, dist.world_size),
                     _precision(device, cfg.train.precision)):
        summary = train.main(config.PretrainStage(run=cfg.run, model=cfg.model, optim=cfg.optim, train=train_cfg))

    # with RL after it, the assistant checks run once, on the final (RL) model
    sft_checks = (dataclasses.replace(cfg.checks, check_prompts=0, check_identity=0, check_arithmetic=0)
                  if cfg.speedrun.rl else cfg.checks)
    sft_cfg = config.SFTStage(run=cfg.run, sft=cfg.sft, checks=sft_checks, sft_optim=cfg.sft_optim,
                              sft_train=dataclasses.replace(cfg.sft_train, resume=True))
    with clock.stage("sft", clock.fingerprint(cfg.sft, sft_checks, cfg.sft_optim, cfg.sft_train, dist.world_size),
                     _precision(device, cfg.sft_train.precision)):
        chat_summary = sft.main(sft_cfg)

    rl_summary = None
    if cfg.speedrun.rl:
        from . import rl

        rl_cfg = config.RLStage(run=cfg.run, rl=cfg.rl, rl_optim=cfg.rl_optim, checks=cfg.checks,
                                rl_train=dataclasses.replace(cfg.rl_train, resume=True))
        with clock.stage("rl", clock.fingerprint(cfg.rl, cfg.checks, cfg.rl_optim, cfg.rl_train),
                         _precision(device, cfg.rl_train.precision)):
            rl_summary = distributed.rank0_first(lambda: rl.main(rl_cfg), dist)  # RL runs on one process

    def finish() -> Path:
        for model in ("base", "sft", "rl"):
            evaluate_model(cfg, run, model, clock)
        path = run / "report.md"
        if clock.worked or not path.exists():  # a rerun that did nothing leaves the report as it was
            t0 = time.perf_counter()
            path = report.write(run)
            clock.add("report", time.perf_counter() - t0)
        return path

    report_path = distributed.rank0_first(finish, dist)
    result = {"run": str(run), "val_bpb": summary["val_bpb"], "tokens": summary["tokens"],
              "sft_val_bpb": chat_summary["val_bpb"], "chat_checks": chat_summary.get("chat_checks"),
              "rl_eval": rl_summary["eval"] if rl_summary else None,
              "seconds": {k: v["seconds"] for k, v in clock.data["stages"].items()}, "report": str(report_path)}
    for rec in train.read_metrics(run / "chat", "sample")[-len(sft.SAMPLE_PROMPTS):]:
        log(f"  {rec['prompt']} → {rec['text']!r}")
    log(f"speedrun done: {json.dumps(result, ensure_ascii=False)}")
    log(f"\nreport card: {report_path}\n"
        "talk to the model:  chatsmith chat     (in this terminal; it picks the newest run's chat model: this one)\n"
        "serve it:           chatsmith serve    (web UI and OpenAI API at http://127.0.0.1:8000)")
    return result

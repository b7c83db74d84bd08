"""The speedrun: every stage in order, on one run directory, resumable.

    chatsmith speedrun                    # preset cpu: minutes on 2 cores
    chatsmith speedrun --preset smoke     # seconds; what the tests run
    torchrun --standalone --nproc_per_node=2 -m chatsmith speedrun    # data parallel (see distributed.py)

Stages: documents + tokenizer (`tokenizer train`) → token shards (`data prepare`) → pretraining (`pretrain`) →
chat fine-tuning (`sft`, with reply checks) → samples; then `chatsmith chat` talks to the result. Each stage skips
work already done in the run directory, so rerunning after an interruption continues where it stopped (pretraining
and SFT resume from their latest checkpoints). Under torchrun, rank 0 alone trains the tokenizer and writes the
shards while the others wait; training is data parallel; the reply checks run on rank 0.
"""

from __future__ import annotations

import dataclasses
import json
import time

from . import config, distributed
from .common import device_type, log, run_dir


def main(cfg: config.SpeedrunStage) -> dict:
    from . import sft, tokenizer, train
    from .data import shards

    run = run_dir(cfg.run.run)
    log(f"speedrun: preset {cfg.run.preset!r}, run directory {run}")
    dist = distributed.init(device_type(cfg.train.device))  # under torchrun: rank 0 makes the tokenizer and shards
    timings: dict[str, float] = {}

    def prepare() -> None:
        config.save(cfg, run / "config.json", "speedrun")
        t0 = time.perf_counter()
        tokenizer.train_main(config.TokenizerStage(run=cfg.run, data=cfg.data, tokenizer=cfg.tokenizer))
        timings["tokenizer"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        shards.main(config.DataStage(run=cfg.run, data=cfg.data, shards=cfg.shards))
        timings["data"] = time.perf_counter() - t0

    distributed.rank0_first(prepare, dist)

    t0 = time.perf_counter()
    train_cfg = dataclasses.replace(cfg.train, resume=True)
    summary = train.main(config.PretrainStage(run=cfg.run, model=cfg.model, optim=cfg.optim, train=train_cfg))
    timings["pretrain"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sft_cfg = config.SFTStage(run=cfg.run, sft=cfg.sft, checks=cfg.checks, sft_optim=cfg.sft_optim,
                              sft_train=dataclasses.replace(cfg.sft_train, resume=True))
    chat_summary = sft.main(sft_cfg)
    timings["sft"] = time.perf_counter() - t0

    result = {"run": str(run), "val_bpb": summary["val_bpb"], "tokens": summary["tokens"],
              "sft_val_bpb": chat_summary["val_bpb"], "chat_checks": chat_summary.get("chat_checks"),
              "seconds": {k: round(v, 1) for k, v in timings.items()}}
    for rec in train.read_metrics(run / "chat", "sample")[-len(sft.SAMPLE_PROMPTS):]:
        log(f"  {rec['prompt']} → {rec['text']!r}")
    log(f"speedrun done: {json.dumps(result, ensure_ascii=False)}")
    return result

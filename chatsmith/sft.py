"""Chat fine-tuning (SFT): the base model learns to hold ChatML conversations, with loss on assistant tokens only.

    chatsmith sft --preset cpu              # needs the run's base checkpoint (chatsmith pretrain / speedrun)
    chatsmith sft --preset cpu --resume     # continue an interrupted SFT run exactly

It is the pretraining loop (`train.fit`) with other data: conversations from the mixture of `data/chat.py` (ShareGPT's
SFT split, chatterbot in English and Chinese, identity, arithmetic with calculator tool calls, Chinese idiom QA),
rendered by the one chat template (`Tokenizer.render_conversation`, loss on assistant content and its `<|im_end|>`),
packed whole into rows (never cut; the rest of a row is padding). It starts from the latest base checkpoint in
`checkpoints/` and writes `chat/checkpoints/` and `chat/metrics.jsonl`. Validation is bits per byte and loss on the
assistant tokens of held-out conversations. At the end, the assistant checks (chatsmith/checks.py: replies that end,
Chinese answered in Chinese, identity, arithmetic with the calculator, all on held-out prompts) answer the way
`chatsmith chat` would and are written to `chat/chat_checks.json`.

Learning rates: SFT continues from weights whose schedule ended at zero, with a quarter of the pretraining rates
decayed linearly to zero over the SFT steps (`sft_optim`).
"""

from __future__ import annotations

import dataclasses
import json
import time

from . import checkpoint, checks, config, distributed
from .common import UserError, autocast_dtype, is_rank0, log, run_dir
from .config import SFTStage
from .data import chat
from .model import GPT, ModelConfig
from .tokenizer import Tokenizer
from .train import Job, fit, prior_checkpoint, sample, schedule_of, setup

SAMPLE_PROMPTS = ("Who are you?", "你是谁？", "What is 17 * 23?", "“画蛇添足”是什么意思？")


def base_model(run, run_name: str) -> tuple[ModelConfig, checkpoint.Checkpoint]:
    base = checkpoint.load_latest(run / "checkpoints")
    if base is None:
        raise UserError(f"run {run_name!r} has no base model; run `chatsmith pretrain --run {run_name}` (or "
                        f"`chatsmith speedrun`) first")
    return base.model_config(), base


def main(cfg: SFTStage) -> dict:
    """Fine-tune the run's base model on the conversation mixture; returns a summary (val bpb, chat checks)."""
    tc = cfg.sft_train
    run = run_dir(cfg.run.run)
    if not (run / "tokenizer" / "tokenizer.json").exists():
        raise UserError(f"run {cfg.run.run!r} has no tokenizer; run `chatsmith speedrun` first")
    tok = Tokenizer.load(run / "tokenizer")
    mcfg, base = base_model(run, cfg.run.run)
    out = run / "chat"
    ck = prior_checkpoint(out / "checkpoints", cfg.run.run, tc.resume, dataclasses.asdict(mcfg),
                          schedule_of(cfg.run, tc, cfg.sft_optim), tc.allow_schedule_change)
    device = setup(cfg, cfg.run, tc, "sft")

    t0 = time.perf_counter()
    train_convs = chat.build_conversations(cfg.sft, "train", cfg.run.seed)
    train_rows = chat.render_rows(tok, train_convs)
    val_rows = chat.render_rows(tok, chat.build_conversations(cfg.sft, "val", cfg.run.seed))
    fits = [r for r in val_rows if len(r[0]) <= mcfg.seq_len + 1]
    val_dropped = len(val_rows) - len(fits)
    val_rows = fits
    log(f"sft: {len(train_rows)} train and {len(val_rows)} val conversations rendered in "
        f"{time.perf_counter() - t0:.1f}s")
    model = GPT.build(mcfg, device=device)
    if ck is None:
        model.load_state_dict(base.model)
        log(f"sft: starting from the base model {base.path.name}")
    dist = distributed.env()
    loader = chat.ChatLoader(train_rows, tc.device_batch, mcfg.seq_len, seed=cfg.run.seed, rank=dist.rank,
                             world_size=dist.world_size)
    stats = {**loader.data_stats(), "val_conversations": len(val_rows) + val_dropped,
             "val_longer_than_row": val_dropped}
    if stats["longer_than_row"] or val_dropped:
        log(f"sft: {stats['longer_than_row']:,} of {stats['conversations']:,} train and {val_dropped:,} of "
            f"{stats['val_conversations']:,} val conversations are longer than a row of {stats['row_tokens']} tokens "
            f"and are left out ({stats['dropped_tokens']:,} train tokens); lower --max-chars to cut them to fit")
    val_batches = max(1, tc.eval_tokens // (tc.device_batch * mcfg.seq_len))
    stop_ids = (tok.special_id("<|im_end|>"), tok.bos_id)

    def samples(m: GPT, seed: int) -> list[tuple[str, str]]:
        return [(p, sample(m, tok, tok.render_for_completion([{"role": "user", "content": p}]), 48, device,
                           seed=seed + i, stop_ids=stop_ids)) for i, p in enumerate(SAMPLE_PROMPTS)]

    summary = fit(Job(
        name="sft", run=cfg.run, optim=cfg.sft_optim, train=tc, out=out,
        saved_config={**config.to_dict(cfg), "model": dataclasses.asdict(mcfg)},  # the shape, for chat and export
        model=model, loader=loader, samples=samples, token_bytes=tok.token_bytes(), resume=ck, data_stats=stats,
        val_batches=lambda: chat.iter_val_batches(val_rows, tc.device_batch, mcfg.seq_len, max_batches=val_batches)))

    checks_path = out / "chat_checks.json"
    cc = cfg.checks
    final = f"step_{tc.steps:06d}"
    if is_rank0() and checks.wanted(cc) and not checks.up_to_date(checks_path, cc, final):
        result = checks.run_checks(model, tok, cc, cfg.sft, cfg.run.seed, dtype=autocast_dtype(device, tc.precision),
                                   path=checks_path, train=train_convs, info={"model": "chat", "checkpoint": final})
        log(f"sft: {checks.summary_line(result)}")
    if checks_path.exists():
        recorded = json.loads(checks_path.read_text(encoding="utf-8"))
        summary["chat_checks"] = {k: v for k, v in recorded.items() if k != "replies"}
    return summary

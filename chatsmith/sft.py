"""Chat fine-tuning (SFT): the base model learns to hold ChatML conversations, with loss on assistant tokens only.

    chatsmith sft --preset cpu              # needs the run's base checkpoint (chatsmith pretrain / speedrun)
    chatsmith sft --preset cpu --resume     # continue an interrupted SFT run exactly

It is the pretraining loop (`train.fit`) with other data: conversations from the mixture of `data/chat.py` (ShareGPT's
SFT split, chatterbot in English and Chinese, identity, arithmetic with calculator tool calls, Chinese idiom QA),
rendered by the one chat template (`Tokenizer.render_conversation`, loss on assistant content and its `<|im_end|>`),
packed whole into rows (never cut; the rest of a row is padding). It starts from the latest base checkpoint in
`checkpoints/` and writes `chat/checkpoints/` and `chat/metrics.jsonl`. Validation is bits per byte and loss on the
assistant tokens of held-out conversations. At the end, `chat_checks` answers held-out prompts the way `chatsmith
chat` would (its default sampling; the calculator runs, Python does not) and measures how often a reply ends with
`<|im_end|>` and how often a Chinese prompt gets a mostly Chinese answer (`chat/chat_checks.json`).

Learning rates: SFT continues from weights whose schedule ended at zero, with a quarter of the pretraining rates
decayed linearly to zero over the SFT steps (`sft_optim`).
"""

from __future__ import annotations

import dataclasses
import json
import time
import unicodedata

import torch

from . import checkpoint, config, distributed
from .common import UserError, atomic_write_json, is_rank0, log, progress, run_dir
from .config import SFTStage
from .data import chat
from .model import GPT, ModelConfig
from .tokenizer import Tokenizer
from .train import Job, fit, prior_checkpoint, sample, schedule_of, setup

SAMPLE_PROMPTS = ("Who are you?", "你是谁？", "What is 17 * 23?", "“画蛇添足”是什么意思？")


def han_fraction(text: str) -> float:
    """Share of the letters of `text` (Unicode category L*: words, not digits, spaces or punctuation) that are CJK
    ideographs: "结果是 632。" is all Chinese, "It is 632." none."""
    letters = [c for c in text if unicodedata.category(c).startswith("L")]
    han = sum(1 for c in letters if "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf")
    return han / max(1, len(letters))


def check_prompts(conversations: list[list[dict]], n: int, n_zh: int, fits=lambda p: True) -> list[str]:
    """First user turns of held-out conversations that `fits` (leave room for a reply in the context): up to `n_zh`
    mostly-Chinese ones, then others up to `n` in all."""
    firsts = []
    for conv in conversations:
        user = next((m["content"] for m in conv if m["role"] == "user"), None)
        if user and user not in firsts and fits(user):
            firsts.append(user)
    zh = [p for p in firsts if han_fraction(p) >= 0.5][:n_zh]
    rest = [p for p in firsts if han_fraction(p) < 0.5][: max(0, n - len(zh))]
    return zh + rest


def base_model(run, run_name: str) -> tuple[ModelConfig, checkpoint.Checkpoint]:
    base = checkpoint.load_latest(run / "checkpoints")
    if base is None:
        raise UserError(f"run {run_name!r} has no base model; run `chatsmith pretrain --run {run_name}` (or "
                        f"`chatsmith speedrun`) first")
    return base.model_config(), base


@torch.no_grad()
def chat_checks(model: GPT, tok: Tokenizer, prompts: list[str], max_tokens: int, device: str, seed: int, *,
                allow_python: bool = False) -> dict:
    """Replies to single-turn `prompts` as `chatsmith chat` gives them (its default sampling, seeded per prompt, tool
    calls run: the calculator, and model-written Python only with `allow_python`, in the sandbox): how many end
    with <|im_end|> (not cut by `max_tokens`), and for the prompts that are mostly Chinese, how many answers (the
    last assistant turn, after any tool call) are >= 50 % han characters."""
    from .engine import CHAT_DEFAULTS, Engine, chat

    was_training = model.training
    model.eval()
    engine = Engine(model, tok, slots=1)
    defaults = CHAT_DEFAULTS
    im_end = tok.special_id("<|im_end|>")
    rows = []
    for i, p in enumerate(progress(prompts, desc="chat checks", unit="prompt")):
        params = dataclasses.replace(defaults, max_tokens=max_tokens, seed=seed + i)
        reply = chat(engine, tok, [{"role": "user", "content": p}], params, tools=True, allow_python=allow_python)
        answer = reply.messages[-1]["content"] if reply.messages else ""
        rows.append((p, answer, reply.stop_reason == im_end, reply.tool_calls))
    model.train(was_training)
    ended = sum(r[2] for r in rows)
    zh = [r for r in rows if han_fraction(r[0]) >= 0.5]
    zh_ok = sum(han_fraction(r[1]) >= 0.5 for r in zh)
    return {"prompts": len(rows), "ended_with_im_end": ended, "ended_frac": ended / max(1, len(rows)),
            "zh_prompts": len(zh), "zh_replies_mostly_han": zh_ok, "zh_frac": zh_ok / max(1, len(zh)),
            "sampling": {"temperature": defaults.temperature, "top_k": defaults.top_k, "top_p": defaults.top_p,
                         "repetition_penalty": defaults.repetition_penalty, "max_tokens": max_tokens, "seed": seed},
            "replies": [{"prompt": p, "reply": a, "ended": e, "tool_calls": t} for p, a, e, t in rows]}


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
    train_rows = chat.render_rows(tok, chat.build_conversations(cfg.sft, "train", cfg.run.seed))
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
    if is_rank0() and cc.check_prompts and not (ck is not None and ck.step >= tc.steps and checks_path.exists()):
        # a larger draw of held-out conversations than validation uses, for enough prompts of both languages
        more = dataclasses.replace(cfg.sft, val_convs=max(cfg.sft.val_convs, cc.check_prompts))
        room = min(cc.check_max_tokens, mcfg.seq_len // 4)  # a prompt must leave this much context for its reply

        def fits(p: str) -> bool:
            return len(tok.render_for_completion([{"role": "user", "content": p}])) + room <= mcfg.seq_len

        prompts = check_prompts(chat.build_conversations(more, "val", cfg.run.seed), cc.check_prompts,
                                cc.check_zh_prompts, fits)
        checks = chat_checks(model, tok, prompts, cc.check_max_tokens, device, cfg.run.seed)
        atomic_write_json(checks_path, checks)
        log(f"sft: {checks['ended_with_im_end']}/{checks['prompts']} held-out replies end with <|im_end|>; "
            f"{checks['zh_replies_mostly_han']}/{checks['zh_prompts']} Chinese prompts got a mostly-Chinese reply")
    if checks_path.exists():
        checks = json.loads(checks_path.read_text(encoding="utf-8"))
        summary["chat_checks"] = {k: v for k, v in checks.items() if k != "replies"}
    return summary

"""Reinforcement learning on verifiable rewards: GRPO on the run's chat model, with tool calls inside the rollouts.

    chatsmith rl --run cpu                          # GRPO on reasoning-gym arithmetic from the run's chat model
    chatsmith rl --run cpu --resume                 # continue from the latest RL checkpoint, exactly
    chatsmith rl --run cpu --task chain_sum --group 16 --iterations 2 --kl-beta 0.02
    chatsmith rl --run cpu --reward mypkg.rewards:score   # your own reward: (conversation, answer) -> float

One step: draw `--prompts` questions of the task; for each, sample a group of `--group` replies with the engine
(batched, every reply seeded by run seed, step and index, so a resumed run samples what the uninterrupted one did);
a reply may call the calculator, which runs and whose result becomes a `tool` turn of the trajectory. Each reply is
scored (the task's own scorer on the final answer, plus `--format-weight` for well-formed tool calls); advantages
are normalised within the group ("group": (r - mean) / (std + 1e-4), TRL's GRPO; "mean": r - mean, Dr. GRPO's
choice that does not favour groups with small spread). The loss is the clipped policy-gradient objective

    ratio = exp(logp - logp_old);  per_token = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * KL_k3
    loss = sum(per_token * mask) / sum(mask)        # token-level normalisation over the whole batch (TRL's "dapo")

over `--iterations` optimisation passes of the same rollouts (from the second pass on, the ratio leaves 1 and the
clip matters); logp_old is the policy that sampled, computed once before the first pass. `mask` is 1 on the tokens
the model wrote (its text and tool calls, and the `<|im_end|>` it emitted) and 0 on the prompt, on tool output and
on the template's turn markers, so tool output carries no gradient. KL_k3 = exp(r) - r - 1 with r = logp_ref - logp
against the frozen starting model (`--kl-beta`, 0 = off: TRL's default and nanochat's choice).

Trajectories are the conversation as the one chat template renders it (tokenizer.render_conversation), so the
tokens trained on are those a later turn would see; logp_old comes from a forward over them, not from the sampler.
Checkpoints go to `<run>/rl/checkpoints` (weights, optimizer, RNG, step) and metrics to `<run>/rl/metrics.jsonl`
(kind train: reward, pass@1, pass@k, reply tokens, tool calls, clip fraction, KL; kind eval: greedy accuracy on
held-out questions). At the end the assistant checks (chatsmith/checks.py, `--check-*` flags; the prompts held out
from the SFT data the chat model was trained on) run on the RL model: `<run>/rl/chat_checks.json`. `chatsmith chat`,
`serve` and `eval` load the newest RL model of a run before its SFT model.

Tasks: `arithmetic`, `chain_sum` and `calc` (reasoning-gym, configured as `chatsmith eval`'s tasks of the same
name, drawn from seeds far from the seeds evaluation reserves, and never one of the questions evaluation asks),
`gsm_symbolic` (reasoning-gym, its default settings), `gsm8k` (gsm_symbolic questions scored by GSM8K's rule: the
last number of the answer equals the reference), `checks` (the assistant checks' 2-3-digit +, -, x problems in
English and Chinese, from the SFT arithmetic source's train split; reward 1 only for the right calculator expression
and the right stated result, as checks.score_arithmetic judges; its held-out questions come from the split no
training sees; the final answer must also be in the language asked, as the checks' zh rule reads it),
`calc_checks` (the two in turn: reasoning-gym's English-only questions alone let the Chinese arithmetic replies drift
to English), `identity` (the SFT identity source's "who are you" questions in English and Chinese; reward 1 when the
reply says chatsmith in the language asked, the identity check's rule; the checks' own phrasings are never asked),
`assistant` (calc, checks and identity in turn) and `seven` (a toy: any reply that says 7 scores 1; for tests).
Train and held-out questions are split by a hash of the question text (of the expression for `checks`), so they
never overlap, whatever the seeds.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import math
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from . import checkpoint, checks, config
from .common import UserError, autocast_dtype, is_rank0, log, progress, read_json, run_dir

TASKS = config.RL_TASKS
MIXTURES = {"calc_checks": ("calc", "checks"),  # a mixture task: its parts' questions in turn
            "assistant": ("calc", "checks", "identity")}
RLConfig, RLStage, RL_OPTIM, RL_TRAIN = config.RLConfig, config.RLStage, config.RL_OPTIM, config.RL_TRAIN


# ---------------------------------------------------------------------------------------------------------------------
# tasks and rewards


@dataclass(frozen=True)
class Item:
    question: str
    answer: str  # the reference answer
    entry: Any = None  # the task's own record (reasoning-gym entry), for its scorer
    task: str = ""  # the task that drew it, when a mixture did


def _hash_fraction(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(question: str) -> str:
    """'eval' for about 1 in 5 questions (by a hash of the text, independent of seeds), else 'train'."""
    return "eval" if _hash_fraction(f"chatsmith-rl:{question}") < 0.2 else "train"


class Task:
    """A reward environment: `items(split, seed, n)` draws questions, `score(reply_text, item)` in [0, 1]."""

    def __init__(self, name: str):
        if name not in TASKS:
            raise UserError(f"unknown RL task {name!r}; choose one of: {', '.join(TASKS)}")
        self.name = name

    def _dataset(self, seed: int, size: int):
        from .common import require
        from .tasks import arithmetic

        reasoning_gym = require("reasoning_gym", "reasoning-gym", "for the RL tasks")
        if not (seed + size <= arithmetic.EVAL_SEED or seed >= arithmetic.EVAL_SEED + arithmetic.SIZE):
            raise UserError(f"seed {seed} would draw the problems `chatsmith eval` keeps for evaluation; pick "
                            f"another --seed")
        if self.name in arithmetic.CONFIGS:
            return arithmetic.dataset(self.name, size=size, seed=seed)
        return reasoning_gym.create_dataset("gsm_symbolic" if self.name == "gsm8k" else self.name, seed=seed,
                                            size=size)

    def items(self, split: str, seed: int, n: int) -> list[Item]:
        """`n` distinct questions of `split` ("train" or "eval"), the same for the same seed."""
        from .tasks import arithmetic

        if self.name in MIXTURES:  # the parts' questions taken in turn, each marked with the task that scores it
            parts = MIXTURES[self.name]
            drawn = [Task(part).items(split, seed, -(-n // len(parts))) for part in parts]
            mixed = [dataclasses.replace(item, task=part) for row in zip(*drawn) for part, item in zip(parts, row)]
            return mixed[:n]

        if self.name == "checks":  # train: the SFT train split's problems; eval: held-out ones (as the checks ask)
            problems = checks.arithmetic_problems(n + 50, seed + 7919, train=split == "train")
            evaluated = {e["question"].removeprefix("Calculate ").removesuffix(".")
                         for e in arithmetic.dataset("calc")}  # `chatsmith eval`'s calc problems: never trained on
            return [Item(p.question, str(p.result), p) for p in problems if p.expression not in evaluated][:n]
        if self.name == "identity":  # the SFT identity source's "who are you" questions, never a checks phrasing
            from .data import generated

            pool = [(q, zh) for q, zh in generated.identity_questions() if split_of(q) == split]
            random.Random(f"chatsmith-rl:identity:{seed}").shuffle(pool)
            if len(pool) < n:
                raise UserError(f"task identity has {len(pool)} {split} questions, fewer than the {n} asked; ask "
                                f"for fewer")
            return [Item(q, "chatsmith", zh) for q, zh in pool[:n]]
        if self.name == "seven":
            asks = ("Say a number.", "Pick a number.", "Name a number.", "Give me a number.", "Any number?")
            pool = [f"{a} ({i})" for i in range(10 * n + 50) for a in asks]
            pool = [q for q in pool if split_of(q) == split]
            return [Item(q, "7") for q in pool[:n]]
        out: list[Item] = []
        seen: set[str] = set()
        if self.name in arithmetic.CONFIGS:  # never a problem `chatsmith eval` asks, whatever the seed drew
            seen = {e["question"] for e in arithmetic.dataset(self.name)}
        size = max(64, 6 * n)
        for attempt in range(8):  # the split keeps ~4/5 or ~1/5 of a draw; draw again when short
            ds = self._dataset(seed * 1009 + attempt, size)
            for i in range(len(ds)):
                entry = ds[i]
                q = entry["question"]
                if q in seen or split_of(q) != split:
                    continue
                seen.add(q)
                out.append(Item(q, str(entry["answer"]), entry))
                if len(out) == n:
                    return out
        raise UserError(f"task {self.name} gave only {len(out)} distinct {split} questions of the {n} asked; "
                        f"ask for fewer")

    def score(self, text: str, item: Item, messages: Sequence[dict] = ()) -> float:
        """The reward of a reply whose final text is `text` (`messages`: all its turns, tool calls included)."""
        if item.task and item.task != self.name:
            return Task(item.task).score(text, item, messages)
        if self.name == "checks":  # the right calculator call, the right stated result, in the language asked
            right = checks.score_arithmetic(messages, item.entry)["pass"]
            return 1.0 if right and checks.in_language(text or "", item.entry.zh) else 0.0
        if self.name == "identity":  # says chatsmith, in the language asked (the identity check's rule)
            return 1.0 if checks.score_identity(text or "", item.entry)["pass"] else 0.0
        if self.name == "seven":
            return 1.0 if re.search(r"(?<!\d)7(?!\d)", text or "") else 0.0
        from .tasks.arithmetic import CONFIGS
        from .tasks.gsm8k import last_number, same_number

        number = last_number(text or "")
        if number is None:
            return 0.0
        if self.name == "gsm8k" or item.entry is None:
            return 1.0 if same_number(number, item.answer) else 0.0
        import reasoning_gym

        name = CONFIGS[self.name][0] if self.name in CONFIGS else self.name
        return float(reasoning_gym.get_score_answer_fn(name)(number, item.entry))


def load_reward(spec: str) -> Callable[[list[dict], str], float]:
    """The callable named by `module:function` (a custom reward); UserError when it cannot be found."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise UserError(f"--reward must be module:function, not {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot load the reward {spec!r} ({e}); check the module is importable (PYTHONPATH) and "
                        f"defines {name}") from None
    if not callable(fn):
        raise UserError(f"the reward {spec!r} is not callable")
    return fn


def tool_format_ok(messages: Sequence[dict]) -> bool:
    """Whether the reply made at least one tool call and every call parsed (the engine answers a malformed call
    with an "error: the tool call is not valid" tool turn)."""
    calls = [m for m in messages if m.get("role") == "assistant" and m.get("tool_calls")]
    bad = [m for m in messages if m.get("role") == "tool" and str(m.get("content", "")).startswith(
        "error: the tool call is not valid")]
    return bool(calls) and not bad


# ---------------------------------------------------------------------------------------------------------------------
# rollouts


def calculator_only(name: str, arguments: dict) -> str:
    """The tools a rollout may run: the calculator alone (model-written Python never runs during training)."""
    from .tools import run_tool

    if name != "calculator":
        return f"error: no tool named {name!r} here; the calculator is the only tool"
    return run_tool(name, arguments)


def rollout(engine, tokenizer, conversations: Sequence[list[dict]], params: Sequence, tools: bool,
            max_tool_calls: int, on_reply: Callable[[], None] | None = None) -> list:
    """Each conversation answered by `turns.chat` (tool calls run), all at once: one thread per conversation
    submits to the engine, which one more thread steps, so the replies decode batched. Returns ChatReply's;
    `on_reply()` is called (from a worker thread) as each one finishes, e.g. to advance a progress bar."""
    from .turns import chat

    stop = threading.Event()
    stepper = threading.Thread(target=engine.serve_forever, args=(stop,), kwargs={"idle_wait": 0.001}, daemon=True)
    stepper.start()
    answer = functools.partial(chat, engine, tokenizer, tools=tools, max_tool_calls=max_tool_calls,
                               run_tool=calculator_only, drive=False)

    def one(args):
        reply = answer(args[0], args[1])
        if on_reply is not None:
            on_reply()
        return reply

    try:
        with ThreadPoolExecutor(max_workers=max(1, len(conversations))) as pool:
            return list(pool.map(one, zip(conversations, params)))
    finally:
        stop.set()
        stepper.join()


def trajectory(tokenizer, messages: list[dict], ended: bool, max_len: int) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a question and its reply as the chat template renders them: mask 1 on what the model
    wrote (assistant text, tool calls, the `<|im_end|>` it emitted); 0 on prompt, tool output and template markers.
    A reply cut by max_tokens (`ended` False) never emitted its final `<|im_end|>`, so that token gets mask 0."""
    ids, mask = tokenizer.render_conversation(messages)
    if not ended:
        im_end = tokenizer.special_id("<|im_end|>")
        last = max(i for i, (t, m) in enumerate(zip(ids, mask)) if t == im_end and m)
        mask[last] = 0
    return ids[:max_len + 1], mask[:max_len + 1]


# ---------------------------------------------------------------------------------------------------------------------
# the objective (pure functions, tested on hand-computed examples)


def advantages(rewards: torch.Tensor, group: int, kind: str = "group") -> torch.Tensor:
    """rewards (N * group,) in group order -> advantages (N * group,): r - mean of its group, divided by the group's
    standard deviation (unbiased, + 1e-4) for kind "group"."""
    r = rewards.view(-1, group)  # (N, group)
    centred = r - r.mean(dim=1, keepdim=True)
    if kind == "group":
        centred = centred / (r.std(dim=1, keepdim=True) + 1e-4)
    elif kind != "mean":
        raise ValueError(f"kind must be group or mean, not {kind!r}")
    return centred.reshape(-1)


def policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, clip_eps: float,
                total_tokens: float, logp_ref: torch.Tensor | None = None, kl_beta: float = 0.0) -> tuple:
    """The clipped GRPO loss of one micro-batch, normalised by the token count of the whole batch.

    logp, logp_old, mask (B, T) (the new policy's, the sampler's log-probs of the taken tokens, loss mask); adv (B,)
    per sequence. Returns (loss, stats) with stats sums: clipped tokens and KL over masked tokens."""
    ratio = torch.exp(logp - logp_old)  # (B, T)
    a = adv[:, None]  # (B, 1)
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a
    per_token = -torch.minimum(unclipped, clipped)  # (B, T)
    kl = torch.zeros_like(per_token)
    if logp_ref is not None and kl_beta:
        r = logp_ref - logp
        kl = torch.exp(r) - r - 1
        per_token = per_token + kl_beta * kl
    loss = (per_token * mask).sum() / total_tokens
    with torch.no_grad():
        is_clipped = ((ratio < 1 - clip_eps) & (a < 0)) | ((ratio > 1 + clip_eps) & (a > 0))
        stats = {"clipped": float((is_clipped * mask).sum()), "kl": float((kl * mask).sum())}
    return loss, stats


def token_logprobs(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p(y_t | x_<=t) (B, T) under `model`; 0 where y is -1 (padding)."""
    return -model(x, targets=y, reduction="none")


def _batches(rows: list[tuple[list[int], list[int]]], size: int):
    """(index list, x, y, mask) micro-batches of `size` trajectories, right-padded (y = -1, mask 0)."""
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        T = max(len(ids) for ids, _ in chunk) - 1
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        y = torch.full((len(chunk), T), -1, dtype=torch.long)
        m = torch.zeros(len(chunk), T)
        for b, (ids, mask) in enumerate(chunk):
            n = len(ids) - 1
            x[b, :n] = torch.tensor(ids[:-1])
            y[b, :n] = torch.tensor(ids[1:])
            m[b, :n] = torch.tensor(mask[1:], dtype=torch.float)
        yield list(range(start, start + len(chunk))), x, y, m


# ---------------------------------------------------------------------------------------------------------------------
# the stage


def _params(rl: RLConfig, seed: int, greedy: bool = False):
    from .sampling import SamplingParams

    if greedy:
        return SamplingParams(max_tokens=rl.max_tokens, temperature=0.0)
    return SamplingParams(max_tokens=rl.max_tokens, temperature=rl.temperature, top_k=rl.top_k, seed=seed)


def _reply_text(reply) -> str:
    return reply.messages[-1].get("content", "") if reply.messages else ""


def held_out_accuracy(model, tok, task: Task, items: list[Item], rl: RLConfig, dtype) -> dict:
    """Greedy replies (tools on as in training) to held-out questions: how many the task's scorer counts right."""
    from .engine import Engine

    if not items:
        return {"n": 0, "correct": 0, "accuracy": None}
    was_training = model.training
    model.eval()
    engine = Engine(model, tok, slots=rl.slots, autocast_dtype=dtype)
    replies = rollout(engine, tok, [[{"role": "user", "content": it.question}] for it in items],
                      [_params(rl, 0, greedy=True)] * len(items), rl.tools, rl.max_tool_calls)
    model.train(was_training)
    correct = sum(task.score(_reply_text(r), it, r.messages) >= 1.0 for r, it in zip(replies, items))
    return {"n": len(items), "correct": correct, "accuracy": correct / len(items)}


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big")


def main(cfg: RLStage) -> dict:
    """GRPO on the run's chat model (or continue the RL run with --resume); returns a summary."""
    from .engine import Engine
    from .model import GPT
    from .optim import apply_schedules, build_optimizer
    from .tokenizer import Tokenizer
    from .train import MetricsLog, StopRequest, prior_checkpoint, read_metrics, setup

    rl, tc = cfg.rl, cfg.rl_train
    run = run_dir(cfg.run.run)
    if not (run / "tokenizer" / "tokenizer.json").exists():
        raise UserError(f"run {cfg.run.run!r} has no tokenizer; run `chatsmith speedrun --run {cfg.run.run}` first")
    start = checkpoint.load_latest(checkpoint.stage_root(run, "chat"))
    if start is None:
        raise UserError(f"run {cfg.run.run!r} has no chat model to start RL from; run `chatsmith sft --run "
                        f"{cfg.run.run}` first")
    reward_fn = load_reward(rl.reward) if rl.reward else None
    task = Task(rl.task)
    tok = Tokenizer.load(run / "tokenizer")
    mcfg = start.model_config()
    out = run / "rl"
    ck = prior_checkpoint(out / "checkpoints", cfg.run.run, tc.resume, dataclasses.asdict(mcfg))
    device = setup(cfg, cfg.run, tc, "rl")
    dtype = autocast_dtype(device, tc.precision)
    model = GPT.build(mcfg, device=device)
    model.load_state_dict(start.model)
    ref = None
    if rl.kl_beta:
        ref = GPT.build(mcfg, device=device)
        ref.load_state_dict(start.model)
        ref.eval().requires_grad_(False)
    opt = build_optimizer(model, cfg.rl_optim)
    step = 0
    if ck is not None:
        model.load_state_dict(ck.model)
        opt.load_state_dict(ck.optimizer)
        if ck.rng:
            checkpoint.restore_rng(ck.rng)
        step = ck.step
        log(f"rl: resuming run {cfg.run.run!r} from {ck.path.name} (step {step})")
    else:
        log(f"rl: starting from the chat model {start.path.name}")
    train_items = task.items("train", cfg.run.seed, tc.steps * rl.prompts)
    eval_items = task.items("eval", cfg.run.seed, rl.eval_prompts) if rl.eval_prompts else []
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=step if ck is not None else None)
    saved = {**config.to_dict(cfg), "model": dataclasses.asdict(mcfg)}  # the shape, for chat, serve and export
    if ck is None and eval_items:
        before = held_out_accuracy(model, tok, task, eval_items, rl, dtype)
        metrics.write(kind="eval", step=0, **before)
        log(f"rl: held-out accuracy before RL {before['correct']}/{before['n']}")

    def save(at: int) -> None:
        checkpoint.save(out / "checkpoints", at, model.state_dict(), optimizer=opt.state_dict(), state={"step": at},
                        meta={"config": saved, "kind": "rl"}, keep_last=tc.keep_last)

    def score(messages: list[dict], reply, item: Item) -> tuple[float, float]:
        """(reward, solved: 1.0 when the scorer gives full marks, else 0.0) of one reply; the reward keeps the
        scorer's partial credit (reasoning-gym's scorers give some)."""
        text = _reply_text(reply)
        value = (float(reward_fn([*messages, *reply.messages], item.answer)) if reward_fn is not None
                 else task.score(text, item, reply.messages))
        fmt = rl.format_weight if rl.format_weight and tool_format_ok(reply.messages) else 0.0
        return value + fmt, float(value >= 1.0)

    t_start = time.perf_counter()
    bar = progress(total=tc.steps, initial=step, desc="rl", unit="step")
    with StopRequest() as stop, bar:
        while step < tc.steps:
            t0 = time.perf_counter()
            apply_schedules(opt, step, tc.steps, cfg.rl_optim)
            items = train_items[step * rl.prompts:(step + 1) * rl.prompts]
            questions = [[{"role": "user", "content": it.question}] for it in items]
            convs = [q for q in questions for _ in range(rl.group)]
            params = [_params(rl, _seed(cfg.run.seed, step, i)) for i in range(len(convs))]
            model.eval()
            engine = Engine(model, tok, slots=rl.slots, autocast_dtype=dtype)
            with torch.no_grad():
                replies = rollout(engine, tok, convs, params, rl.tools, rl.max_tool_calls)
            del engine
            model.train()
            scored = [score(c, r, items[i // rl.group]) for i, (c, r) in enumerate(zip(convs, replies))]
            rewards = torch.tensor([s[0] for s in scored])
            correct = torch.tensor([s[1] for s in scored])
            adv = advantages(rewards, rl.group, rl.advantage)
            rows = [trajectory(tok, [*c, *r.messages], r.finish_reason == "stop", mcfg.seq_len)
                    for c, r in zip(convs, replies)]
            total = float(sum(sum(m[1:]) for _, m in rows)) or 1.0
            batches = list(_batches(rows, tc.device_batch))
            with torch.no_grad(), _autocast(device, dtype):  # the sampling policy's and the reference's log-probs
                old = [token_logprobs(model, x.to(device), y.to(device)).float() for _, x, y, _ in batches]
                refs = ([token_logprobs(ref, x.to(device), y.to(device)).float() for _, x, y, _ in batches]
                        if ref is not None else [None] * len(batches))
            loss_sum = clipped = kl = 0.0
            for _ in range(rl.iterations):
                for (idx, x, y, m), lp_old, lp_ref in zip(batches, old, refs):
                    with _autocast(device, dtype):
                        logp = token_logprobs(model, x.to(device), y.to(device)).float()
                    loss, stats = policy_loss(logp, lp_old, adv[idx].to(device), m.to(device), rl.clip_eps, total,
                                              lp_ref, rl.kl_beta)
                    loss.backward()
                    loss_sum += loss.item()
                    clipped += stats["clipped"]
                    kl += stats["kl"]
                opt.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            group_correct = correct.view(-1, rl.group)
            rec = {"reward": rewards.mean().item(), "pass@1": correct.mean().item(),
                   f"pass@{rl.group}": group_correct.max(dim=1).values.mean().item(),
                   "reply_tokens": sum(r.completion_tokens for r in replies) / len(replies),
                   "tool_calls": sum(r.tool_calls for r in replies) / len(replies),
                   "loss": loss_sum / rl.iterations, "clip_frac": clipped / (total * rl.iterations),
                   "kl": kl / (total * rl.iterations), "lr": opt.param_groups[0]["lr"],
                   "dt": time.perf_counter() - t0}
            metrics.write(kind="train", step=step, **rec)
            bar.update(1)
            bar.set_postfix(reward=f"{rec['reward']:.3f}", pass1=f"{rec['pass@1']:.2f}",
                            passk=f"{rec[f'pass@{rl.group}']:.2f}", len=f"{rec['reply_tokens']:.0f}")
            if not math.isfinite(rec["loss"]):
                raise UserError(f"the RL loss became {rec['loss']} at step {step}; lower the learning rates and "
                                f"start a new run")
            last = step == tc.steps
            if step % tc.ckpt_every == 0 or last or stop.requested:
                save(step)
            if stop.requested:
                metrics.close()
                raise KeyboardInterrupt
    evals = read_metrics(out, "eval")
    if eval_items and (not evals or evals[-1]["step"] < step):
        after = held_out_accuracy(model, tok, task, eval_items, rl, dtype)
        metrics.write(kind="eval", step=step, **after)
        evals.append({"step": step, **after})
        log(f"rl: held-out accuracy after RL {after['correct']}/{after['n']}")
    metrics.close()
    summary = {"run": cfg.run.run, "steps": step, "task": rl.task, "seconds": time.perf_counter() - t_start,
               "eval": evals}
    checks_path = out / "chat_checks.json"
    final = f"step_{step:06d}"
    if is_rank0() and checks.wanted(cfg.checks) and not checks.up_to_date(checks_path, cfg.checks, final):
        sft_data, sft_seed = checks.sft_settings(start.meta)
        result = checks.run_checks(model, tok, cfg.checks, sft_data, sft_seed, dtype=dtype, path=checks_path,
                                   info={"model": "rl", "checkpoint": final})
        log(f"rl: {checks.summary_line(result)}")
    if checks_path.exists():
        summary["chat_checks"] = {k: v for k, v in (read_json(checks_path) or {}).items() if k != "replies"}
    log(f"rl done: {json.dumps(summary)}")
    return summary


def _autocast(device: str, dtype):
    from .train import autocast

    return autocast(device, dtype)

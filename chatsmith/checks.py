"""Assistant checks: does a chat model behave like a small assistant on prompts it never trained on?

    chatsmith checks --run cpu                  # the run's newest chat model (after RL, else after SFT)
    chatsmith checks --run cpu --stage chat     # its SFT model, also when an RL model exists
    chatsmith checks --run cpu --check-arithmetic 50 --check-max-tokens 128

SFT runs them at its end (`<run>/chat/chat_checks.json`), RL at its end (`<run>/rl/chat_checks.json`), and the
report card shows them ("Assistant checks"). Four checks (issue 17's acceptance), each a count with its 95 % Wilson
interval, its target, and `met` (the observed fraction reaches the target):

- `ended` (target 0.97): first user turns of held-out SFT val conversations (`--check-prompts`, Chinese ones first,
  `--check-zh-prompts` of them; any prompt equal to a user turn of the run's SFT train conversations after
  case/space/punctuation normalisation is left out): the reply ends with `<|im_end|>` (not cut by max_tokens, not
  stopped by too many tool calls).
- `zh` (0.95): of those, the Chinese ones (>= 50 % han letters) get an answer that is >= 50 % han (`han_fraction`).
- `identity` (0.90): `IDENTITY_EN` and `IDENTITY_ZH`, 50 + 50 phrasings written here, none of them a question the
  SFT identity source can produce (tests/test_checks.py proves it over every template x greeting, normalised). Pass:
  the reply says "chatsmith" (any case) and is in the language asked: han_fraction >= 0.5 for a Chinese prompt,
  < 0.5 for an English one, measured with the name "chatsmith" itself left out (so "我是 chatsmith。" counts as
  Chinese). Reported for EN and ZH separately too.
- `arithmetic` (0.90): `--check-arithmetic` problems a op b with a, b in 10..999 and op in +, -, x, half asked in
  English and half in Chinese with the phrasings in `ASK` and `OPS` (fixed here, so the held-out set stays the same
  when the SFT phrasings in data/generated.py grow), distinct, seeded, and only those whose calculator
  expression hashes to the SFT arithmetic source's held-out split, so no training conversation holds one. Pass: the
  reply's first tool call is the calculator with the same expression (spaces dropped, x and the Unicode minus read as
  * and -: the same operands and operator in the same order, not merely the same value) AND its final answer states
  the exact result as a number token (`stated_integers`: 1,234 and 1234 both count; 579.5 is not 579). Failures are
  counted as no_call, wrong_expression and wrong_result.

Generation: every prompt alone in a fresh conversation (no system prompt), answered as `chatsmith chat` answers it
(sampling.CHAT_DEFAULTS, max_tokens = `--check-max-tokens` per round, the calculator runs, Python never does),
all batched through `rl.rollout` on an Engine of `--check-slots` slots. Each reply's sampler is seeded from the run
seed, the check and the prompt text, so a rerun gives the same replies (up to the batched-matmul rounding the engine
docstring describes). A prompt whose rendering leaves less than min(max_tokens, context / 4) tokens of context for
the reply is skipped and counted (`skipped`; for `ended` it counts prompts short of `--check-prompts`, also when
the val mixture has fewer), as happens with the smoke preset's 128-token context. SFT and RL skip checks already
recorded for their final checkpoint with the same settings (`up_to_date`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import LoadConfig
from .common import UserError, atomic_write_json, log, progress, run_dir
from .config import ChatCheckConfig, SFTDataConfig, opt

TARGETS = {"ended": 0.97, "zh": 0.95, "identity": 0.90, "arithmetic": 0.90}
MAX_TOOL_CALLS = 4  # as `chatsmith chat`
OPERAND_RANGE = (10, 999)  # 2- and 3-digit operands
OPS = {"en": {"+": ("plus", "+"), "-": ("minus", "-"), "*": ("times", "×", "multiplied by")},
       "zh": {"+": ("加", "+"), "-": ("减", "减去"), "*": ("乘以", "×")}}
ASK = {"en": ("What is {q}?", "Calculate {q}.", "Compute {q}, please.", "How much is {q}?", "Can you work out {q}?"),
       "zh": ("{q}等于多少？", "请计算{q}。", "{q}是多少？", "帮我算一下{q}。", "{q}等于几？")}
FILES = {"chat": ("chat", "chat_checks.json"), "rl": ("rl", "chat_checks.json")}  # model kind -> its result file

IDENTITY_EN = (
    "Could you tell me your name?", "Which model am I talking to?", "What do people call you?",
    "Who am I chatting with right now?", "May I know who you are?", "Mind telling me what you are?",
    "Do you have a name?", "What name were you given?", "Identify yourself, please.", "Which assistant is this?",
    "Who is answering me?", "What are you called?", "Say your name, please.", "What model are you?",
    "Are you a person or a program, and what are you called?", "Which AI are you?",
    "Tell me your name and what you are.", "Whom am I speaking to?", "Which chatbot is this?",
    "Give me a short introduction of yourself.", "Can you introduce yourself in one sentence?",
    "What is the name of this assistant?", "How should I address you?",
    "Before we start, what should I know about you?", "I'd like to know your name.", "Which language model are you?",
    "Are you an AI? Which one?", "Describe yourself briefly.", "Tell me a little about who you are.",
    "What AI system am I using?", "Name yourself.", "What kind of assistant are you, and what do you go by?",
    "Is there a name I can call you by?", "Which bot am I talking with?",
    "What is the name of the model answering me?", "Do you go by a name?", "What do you call yourself?",
    "Introduce yourself to a new user.", "Who am I talking to?", "What is your identity?",
    "Am I talking to a chatbot? Which one?", "Which assistant am I using right now?", "Could you say who you are?",
    "What model powers this chat?", "Good morning! Who am I talking to?", "Quick question: what do they call you?",
    "Which program is replying to me?", "What should I call this assistant?", "Explain who you are in a few words.",
    "Who or what is on the other side of this chat?",
)
IDENTITY_ZH = (
    "你的名字是什么？", "请问您是哪个模型？", "我现在是在跟谁说话？", "能告诉我你叫什么吗？",
    "你是哪个人工智能助手？", "请问这是什么模型在回答？", "你有名字吗？", "大家都叫你什么？",
    "你是哪一个聊天机器人？", "请说出你的名字。", "回答我的是谁？", "你到底是谁？", "用一句话介绍你自己。",
    "你是什么样的助手？叫什么名字？", "我应该叫你什么名字？", "请问怎么称呼您？", "你是人还是程序？你叫什么？",
    "这个助手叫什么名字？", "正在回答我的模型叫什么？", "用几个字概括一下你的身份。", "你能自我介绍一下吗？",
    "跟我聊天的是哪个模型？", "你的称呼是什么？", "请告诉我你的身份和名字。", "你是一个什么程序？",
    "你属于哪个语言模型？", "我在用的是哪个人工智能？", "你叫啥？", "请问阁下是谁？", "你是个机器人吗？叫什么？",
    "介绍一下你的身份。", "你的身份是什么？", "这是什么聊天助手？", "聊之前，先报个名字吧。",
    "我该怎样称呼这个助手？", "能说一下你的名字吗？", "你自称什么？", "你是哪个对话模型？", "请问你是哪位？",
    "你是什么人工智能？", "这个对话是哪个模型在回答？", "向第一次用的人介绍一下自己。", "你的大名是什么？",
    "你是哪个项目训练出来的助手？", "早上好！我在和谁说话？", "你是不是一个语言模型？叫什么名字？",
    "请问我正在使用的助手叫什么？", "能简单介绍一下你是什么吗？", "和我对话的程序叫什么？", "你给自己起了什么名字？",
)


# ---------------------------------------------------------------------------------------------------------------------
# text rules (pure functions, tested on hand-made replies)


def han_fraction(text: str) -> float:
    """Share of the letters of `text` (Unicode category L*: words, not digits, spaces or punctuation) that are CJK
    ideographs: "结果是 632。" is all Chinese, "It is 632." none."""
    letters = [c for c in text if unicodedata.category(c).startswith("L")]
    han = sum(1 for c in letters if "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf")
    return han / max(1, len(letters))


def in_language(text: str, zh: bool) -> bool:
    """Whether `text` is Chinese (han_fraction >= 0.5) when `zh`, and not Chinese when not."""
    return (han_fraction(text) >= 0.5) == zh


def normalise(text: str) -> str:
    """`text` compared loosely: NFKC (full-width ？ is ?), case folded, without whitespace and punctuation."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(c for c in text if not c.isspace() and not unicodedata.category(c).startswith("P"))


_NUMBER = re.compile(r"(?<![\d.,])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?!\d|[.,]\d)")


def stated_integers(text: str) -> set[int]:
    """The integers written as number tokens in `text`: 1,234 and 1234 are 1234 (a comma groups thousands only in
    threes), 12.0 is 12 but 12.5 is none, and a minus sign not after a digit, Latin letter or bracket makes it
    negative ("= -333" and "是-333" are -333, "600-267" holds 600 and 267)."""
    text = unicodedata.normalize("NFKC", text).replace("\u2212", "-")
    out = set()
    for m in _NUMBER.finditer(text):
        if m.group(2) and set(m.group(2)) != {"0"}:
            continue
        value = int(m.group(1).replace(",", ""))
        start = m.start()
        if start and text[start - 1] == "-":
            before = text[start - 2] if start >= 2 else " "
            if not (before.isdigit() or (before.isascii() and before.isalpha()) or before in ")]"):
                value = -value
        out.add(value)
    return out


def _expression(text: str) -> str:
    return re.sub(r"\s+", "", str(text)).replace("×", "*").replace("\u2212", "-")


@dataclass(frozen=True)
class Problem:
    a: int
    op: str  # "+", "-" or "*"
    b: int
    question: str
    zh: bool

    @property
    def expression(self) -> str:
        """The calculator expression, spaced as the SFT arithmetic source writes it (its held-out split key)."""
        return f"{self.a} {self.op} {self.b}"

    @property
    def result(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]


def score_arithmetic(messages: Sequence[dict], problem: Problem) -> dict:
    """{"pass", "outcome"} of a reply's messages (turns.chat's: assistant turns, tool turns): outcome "right",
    "no_call" (no calculator call first), "wrong_expression" or "wrong_result" (the final answer, after the call,
    does not state the result)."""
    calls = [c for m in messages if m.get("role") == "assistant" for c in (m.get("tool_calls") or [])]
    if not calls or calls[0].get("name") != "calculator":
        return {"pass": False, "outcome": "no_call"}
    arguments = calls[0].get("arguments")
    expression = arguments.get("expression", "") if isinstance(arguments, dict) else ""
    if _expression(expression) != _expression(problem.expression):
        return {"pass": False, "outcome": "wrong_expression"}
    first = next(i for i, m in enumerate(messages) if m.get("role") == "assistant" and m.get("tool_calls"))
    answers = [m for m in messages[first + 1:] if m.get("role") == "assistant"]
    if not answers or problem.result not in stated_integers(answers[-1].get("content") or ""):
        return {"pass": False, "outcome": "wrong_result"}
    return {"pass": True, "outcome": "right"}


def score_identity(text: str, zh: bool) -> dict:
    """{"pass", "name", "language"}: the reply says chatsmith, and is Chinese (han_fraction >= 0.5) for a Chinese
    prompt or not Chinese for an English one, measured without the name itself."""
    name = "chatsmith" in text.casefold()
    rest = re.sub("chatsmith", " ", text, flags=re.IGNORECASE)
    language = in_language(rest, zh)
    return {"pass": name and language, "name": name, "language": language}


def wilson(passed: int, n: int) -> list[float]:
    from .tasks.scoring import wilson as interval

    return list(interval(passed, n))


def tally(passed: int, n: int, target: float | None = None) -> dict:
    """{"n", "passed", "frac", "ci95"} (+ "target", "met" when a target is given); frac None when n is 0."""
    out: dict[str, Any] = {"n": n, "passed": passed, "frac": passed / n if n else None, "ci95": wilson(passed, n)}
    if target is not None:
        out.update(target=target, met=(passed / n >= target) if n else None)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# prompts


def check_prompts(conversations: list[list[dict]], n: int, n_zh: int, fits: Callable[[str], bool] = lambda p: True,
                  exclude: set[str] = frozenset()) -> list[str]:
    """First user turns of `conversations` that `fits` (room left for a reply) and whose normalised text is not in
    `exclude`: up to `n_zh` mostly-Chinese ones, then others up to `n` in all, each once."""
    firsts, seen = [], set()
    for conv in conversations:
        user = next((m["content"] for m in conv if m["role"] == "user"), None)
        if user and normalise(user) not in seen and normalise(user) not in exclude and fits(user):
            seen.add(normalise(user))
            firsts.append(user)
    zh = [p for p in firsts if han_fraction(p) >= 0.5][:n_zh]
    rest = [p for p in firsts if han_fraction(p) < 0.5][: max(0, n - len(zh))]
    return zh + rest


def held_out_prompts(sft: SFTDataConfig, seed: int, n: int, n_zh: int, fits: Callable[[str], bool] = lambda p: True,
                     train: Sequence[list[dict]] | None = None) -> list[str]:
    """`check_prompts` of the SFT val mixture (drawn larger than validation uses, for enough prompts of both
    languages), leaving out every user turn of the train mixture `train` (built from `sft` and `seed` when None)."""
    from .data import chat

    if train is None:
        train = chat.build_conversations(sft, "train", seed)
    seen = {normalise(m["content"]) for conv in train for m in conv if m["role"] == "user" and m.get("content")}
    more = dataclasses.replace(sft, val_convs=max(sft.val_convs, n))
    return check_prompts(chat.build_conversations(more, "val", seed), n, n_zh, fits, seen)


def identity_prompts(n: int) -> list[tuple[str, bool]]:
    """(prompt, Chinese?) for n of the 100 identity phrasings, alternating English and Chinese."""
    both = [p for pair in zip(((q, False) for q in IDENTITY_EN), ((q, True) for q in IDENTITY_ZH)) for p in pair]
    return both[:n]


def arithmetic_problems(n: int, seed: int, train: bool = False) -> list[Problem]:
    """n distinct held-out problems (see the module docstring), even indices English, odd Chinese; the same for the
    same seed. `train`: problems of the SFT train split instead, never a held-out one (RL's `calc` task)."""
    from .data import generated

    rng = random.Random(f"chatsmith-checks:arithmetic:{seed}" + (":train" if train else ""))
    out: list[Problem] = []
    seen: set[str] = set()
    lo, hi = OPERAND_RANGE
    for _ in range(2000 * max(1, n)):
        if len(out) == n:
            break
        zh = len(out) % 2 == 1
        op = rng.choice("+-*")
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        problem = Problem(a, op, b, "", zh)
        if problem.expression in seen or (generated.hash_split(problem.expression, "arithmetic") == "train") != train:
            continue
        seen.add(problem.expression)
        lang = "zh" if zh else "en"
        word = rng.choice(OPS[lang][op])
        shown = f"{a}{word}{b}" if zh and word not in "+-×÷/" else f"{a} {word} {b}"
        question = rng.choice(ASK[lang]).format(q=shown)
        out.append(dataclasses.replace(problem, question=question))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# running them


def wanted(cc: ChatCheckConfig) -> bool:
    return bool(cc.check_prompts or cc.check_identity or cc.check_arithmetic)


def up_to_date(path: Path, cc: ChatCheckConfig, checkpoint: str) -> bool:
    """Whether `path` already holds these checks (same settings) of the checkpoint named `checkpoint` (step_N)."""
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return saved.get("checkpoint") == checkpoint and saved.get("config") == dataclasses.asdict(cc)


def _seed(seed: int, check: str, prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{check}:{prompt}".encode()).digest()[:4], "big")


def _answer(messages: Sequence[dict]) -> str:
    return (messages[-1].get("content") or "") if messages else ""


def _calls(messages: Sequence[dict]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        for call in m.get("tool_calls") or []:
            following = messages[i + 1] if i + 1 < len(messages) else {}
            out.append({**call, "result": following.get("content") if following.get("role") == "tool" else None})
    return out


def run_checks(model, tok, cc: ChatCheckConfig, sft: SFTDataConfig, seed: int, *, dtype=None,
               max_len: int | None = None, path: Path | None = None, train: Sequence[list[dict]] | None = None,
               info: dict | None = None) -> dict:
    """Answer every check's prompts with `model` and score them (see the module docstring); the result dict is
    written to `path` when given. `sft`, `seed` and `train` name the SFT data the prompts must be held out from;
    `dtype` is the engine's autocast dtype, `max_len` its context (None: the model's), `info` extra fields."""
    import torch

    from .engine import Engine
    from .rl import rollout
    from .sampling import CHAT_DEFAULTS

    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    engine = Engine(model, tok, slots=cc.check_slots, max_len=max_len, autocast_dtype=dtype)
    room = min(cc.check_max_tokens, engine.max_len // 4)  # a prompt must leave this much context for its reply

    def fits(prompt: str) -> bool:
        return len(tok.render_for_completion([{"role": "user", "content": prompt}])) + room <= engine.max_len

    held = held_out_prompts(sft, seed, cc.check_prompts, cc.check_zh_prompts, fits, train) if cc.check_prompts else []
    identity = identity_prompts(cc.check_identity)
    problems = arithmetic_problems(cc.check_arithmetic, seed)
    jobs = ([("held_out", p, han_fraction(p) >= 0.5, None) for p in held] +
            [("identity", p, zh, None) for p, zh in identity if fits(p)] +
            [("arithmetic", q.question, q.zh, q) for q in problems if fits(q.question)])
    skipped = {"held_out": max(0, cc.check_prompts - len(held)),
               "identity": len(identity) - sum(j[0] == "identity" for j in jobs),
               "arithmetic": len(problems) - sum(j[0] == "arithmetic" for j in jobs)}
    params = [dataclasses.replace(CHAT_DEFAULTS, max_tokens=cc.check_max_tokens, seed=_seed(seed, kind, prompt))
              for kind, prompt, _, _ in jobs]
    with progress(total=len(jobs), desc="assistant checks", unit="reply") as bar, torch.no_grad():
        replies = rollout(engine, tok, [[{"role": "user", "content": prompt}] for _, prompt, _, _ in jobs], params,
                          True, MAX_TOOL_CALLS, on_reply=lambda: bar.update(1))
    model.train(was_training)
    im_end = tok.special_id("<|im_end|>")
    rows = []
    for (kind, prompt, zh, problem), reply in zip(jobs, replies):
        answer = _answer(reply.messages)
        row: dict[str, Any] = {"check": kind, "prompt": prompt, "zh": zh, "reply": answer,
                               "finish_reason": reply.finish_reason, "tool_calls": _calls(reply.messages)}
        if kind == "held_out":
            row["ended"] = reply.stop_reason == im_end
            row["pass"] = row["ended"] and (not zh or han_fraction(answer) >= 0.5)
            if zh:
                row["han"] = han_fraction(answer) >= 0.5
        elif kind == "identity":
            said = " ".join(m.get("content") or "" for m in reply.messages if m.get("role") == "assistant")
            row.update(score_identity(said, zh))
        else:
            row.update(score_arithmetic(reply.messages, problem), expression=problem.expression,
                       result=problem.result)
        rows.append(row)
    result = {**(info or {}), **summarise(rows), "config": dataclasses.asdict(cc), "skipped": skipped,
              "seconds": round(time.perf_counter() - t0, 2),
              "sampling": {"temperature": CHAT_DEFAULTS.temperature, "top_k": CHAT_DEFAULTS.top_k,
                           "top_p": CHAT_DEFAULTS.top_p, "repetition_penalty": CHAT_DEFAULTS.repetition_penalty,
                           "max_tokens": cc.check_max_tokens, "max_tool_calls": MAX_TOOL_CALLS, "seed": seed,
                           "slots": cc.check_slots, "context": engine.max_len},
              "replies": rows}
    if path is not None:
        atomic_write_json(path, result)
    return result


def summarise(rows: Sequence[dict]) -> dict:
    """The "checks" dict of scored reply rows, plus the flat fields the SFT summary has always had (prompts,
    ended_with_im_end, zh_prompts, zh_replies_mostly_han and their fractions)."""
    held = [r for r in rows if r["check"] == "held_out"]
    zh = [r for r in held if r["zh"]]
    ident = [r for r in rows if r["check"] == "identity"]
    arith = [r for r in rows if r["check"] == "arithmetic"]
    ended = sum(r["ended"] for r in held)
    zh_ok = sum(r["han"] for r in zh)
    checks = {"ended": tally(ended, len(held), TARGETS["ended"]), "zh": tally(zh_ok, len(zh), TARGETS["zh"]),
              "identity": tally(sum(r["pass"] for r in ident), len(ident), TARGETS["identity"]),
              "arithmetic": tally(sum(r["pass"] for r in arith), len(arith), TARGETS["arithmetic"])}
    for name, group in (("identity", ident), ("arithmetic", arith)):
        for lang, is_zh in (("en", False), ("zh", True)):
            part = [r for r in group if r["zh"] == is_zh]
            checks[name][lang] = tally(sum(r["pass"] for r in part), len(part))
    for outcome in ("no_call", "wrong_expression", "wrong_result"):
        checks["arithmetic"][outcome] = sum(r["outcome"] == outcome for r in arith)
    checks["identity"]["no_name"] = sum(not r["name"] for r in ident)
    checks["identity"]["wrong_language"] = sum(not r["language"] for r in ident)
    return {"checks": checks, "prompts": len(held), "ended_with_im_end": ended,
            "ended_frac": ended / max(1, len(held)), "zh_prompts": len(zh), "zh_replies_mostly_han": zh_ok,
            "zh_frac": zh_ok / max(1, len(zh))}


def summary_line(result: dict) -> str:
    """One log line: passed/n of each check."""
    parts = [f"{name} {c['passed']}/{c['n']}" + (" (met)" if c.get("met") else "")
             for name, c in result["checks"].items()]
    return "assistant checks: " + ", ".join(parts)


def sft_settings(meta: dict) -> tuple[SFTDataConfig, int]:
    """The SFT data settings and run seed recorded in a chat checkpoint's meta.json (defaults where missing)."""
    from . import config

    saved = (meta or {}).get("config") or {}
    stage = config.from_dict(config.SFTStage, saved)
    return stage.sft, stage.run.seed


# ---------------------------------------------------------------------------------------------------------------------
# the command


@dataclass(frozen=True)
class ChecksConfig:
    stage: str = opt("auto", "which model of the run: auto (after RL, else after SFT), chat (after SFT) or rl",
                     choices=("auto", "chat", "rl"))


@dataclass(frozen=True)
class ChecksStage:
    load: LoadConfig = LoadConfig()
    target: ChecksConfig = ChecksConfig()
    checks: ChatCheckConfig = ChatCheckConfig()


def table(result: dict) -> str:
    """A short plain-text table of the checks."""
    lines = [f"{'check':<12} {'passed':>9} {'frac':>6}  {'95 % interval':<15} {'target':>6}  met"]
    for name, c in result["checks"].items():
        frac = "–" if c["frac"] is None else f"{c['frac']:.3f}"
        met = {True: "yes", False: "no", None: "–"}[c.get("met")]
        lines.append(f"{name:<12} {c['passed']:>4}/{c['n']:<4} {frac:>6}  [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]"
                     f"  {c['target']:>6.2f}  {met}")
        for lang in ("en", "zh"):
            if lang in c:
                sub = c[lang]
                frac = "–" if sub["frac"] is None else f"{sub['frac']:.3f}"
                lines.append(f"  {lang:<10} {sub['passed']:>4}/{sub['n']:<4} {frac:>6}")
    return "\n".join(lines)


def main(cfg: ChecksStage) -> dict:
    """Run the checks on a run's chat model, write them beside it and print the table; returns the result."""
    from . import checkpoint

    load = cfg.load
    kind = cfg.target.stage
    if kind != "auto" and not load.checkpoint:
        if not load.run:
            raise UserError(f"--stage {kind} needs --run NAME (or --checkpoint)")
        found = checkpoint.list_checkpoints(checkpoint.stage_root(run_dir(load.run, create=False), kind))
        if not found:
            raise UserError(f"run {load.run!r} has no {'SFT' if kind == 'chat' else 'RL'} model; run `chatsmith "
                            f"{'sft' if kind == 'chat' else 'rl'} --run {load.run}` first or pick another --stage")
        load = dataclasses.replace(load, checkpoint=str(found[-1]))
    loaded = checkpoint.load_model(load, stage="chat")
    if not loaded.is_chat:
        raise UserError(f"run {loaded.run.name} has no chat model to check; run `chatsmith sft --run "
                        f"{loaded.run.name}` first")
    kind = loaded.checkpoint.resolve().parent.parent.name  # "chat" or "rl"
    chat_ck = checkpoint.list_checkpoints(checkpoint.stage_root(loaded.run, "chat"))
    meta = json.loads((chat_ck[-1] / "meta.json").read_text(encoding="utf-8")) if chat_ck else {}
    sft, seed = sft_settings(meta)
    folder, name = FILES.get(kind, FILES["chat"])
    path = loaded.run / folder / name
    result = run_checks(loaded.model, loaded.tokenizer, cfg.checks, sft, seed, dtype=loaded.autocast_dtype,
                        max_len=load.context or None, path=path,
                        info={"model": kind, "checkpoint": loaded.checkpoint.name})
    log(f"checks: {kind} model {loaded.checkpoint} (run {loaded.run.name}) -> {path}")
    print(table(result))
    return result


# ---------------------------------------------------------------------------------------------------------------------
# the report card's section


def report_lines(run: Path) -> list[str]:
    """Markdown for the report: the final model's checks (RL if checked, else SFT), with SFT beside RL when both."""
    found = {}
    for kind, (folder, name) in FILES.items():
        try:
            data = json.loads((run / folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("checks"), dict):
            found[kind] = data
    if not found:
        return ["No assistant checks recorded (`chat/chat_checks.json`, `rl/chat_checks.json`); run `chatsmith "
                "checks`.", ""]
    kinds = [k for k in ("chat", "rl") if k in found]
    label = {"chat": "SFT", "rl": "RL"}
    header = ["check", "target"] + [f"{label[k]} {col}" for k in kinds for col in ("passed/n", "frac", "95 % CI",
                                                                                 "met")]

    def cells(c: dict | None) -> list[str]:
        if not c:
            return ["–"] * 4
        frac = "–" if c.get("frac") is None else f"{c['frac']:.3f}"
        met = {True: "yes", False: "no"}.get(c.get("met"), "–")
        return [f"{c['passed']}/{c['n']}", frac, f"[{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]", met]

    rows = []
    for name, target in TARGETS.items():
        rows.append([name, f"{target:.2f}", *[x for k in kinds for x in cells(found[k]["checks"].get(name))]])
        for lang in ("en", "zh"):
            if any(lang in found[k]["checks"].get(name, {}) for k in kinds):
                rows.append([f"{name} ({lang.upper()})", "",
                             *[x for k in kinds for x in cells(found[k]["checks"].get(name, {}).get(lang))]])
    lines = [f"Held-out prompts, answered with `chatsmith chat`'s sampling (final model: {label[kinds[-1]]}; "
             f"definitions in chatsmith/checks.py; met = the fraction reaches the target).", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    arith = found[kinds[-1]]["checks"].get("arithmetic", {})
    if arith.get("n"):
        lines += ["", f"Arithmetic failures ({label[kinds[-1]]}): {arith.get('no_call', 0)} without a calculator call, "
                      f"{arith.get('wrong_expression', 0)} with another expression, {arith.get('wrong_result', 0)} "
                      f"with the right call but the result not stated."]
    return lines + [""]

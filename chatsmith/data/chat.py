"""SFT data: conversation sources, their mixture, and the loader that packs whole conversations into rows.

    python -m chatsmith.data.chat                       # the default mixture: counts per source and one sample each
    python -m chatsmith.data.chat --mixture identity:1 arithmetic:2 --max-convs 50

    convs = build_conversations(SFTDataConfig(), "train", seed=1337)     # [[{"role", "content", ...}, ...], ...]
    rows = render_rows(tok, convs)                                        # [(ids, loss_mask), ...]
    loader = ChatLoader(rows, batch_size=8, seq_len=512, seed=1337)
    x, y = loader.next_batch()                                            # int64 (B, T); y is -1 where not trained

Sources (`SOURCES`; every one yields message lists for the one chat template in tokenizer.py):
- `identity`: who/what chatsmith is, in English and Chinese, drawn from templates (greeting x question phrasing x
  answer phrasing x optional system prompt, one or two questions): ~85K distinct conversations from ~80 sentences.
- `arithmetic`: a seeded generator (not reasoning-gym: a few lines here give the exact tool-call shape and bilingual
  phrasing) of sums, differences, products, quotients (ints and decimals), three-number chains, percentages and
  square roots. The assistant calls the calculator (`tool_calls=[{"name": "calculator", "arguments": {"expression":
  ...}}]`, content empty or one short sentence), a `tool` turn holds `tools.calculate(expression)`, and the assistant
  answers with that result verbatim (with "about" / "约为" / "≈" when it is not exact: an irrational root, or a
  quotient rounded to 15 digits).
- `idioms`: 成语 questions (six phrasings) answered with the 释义 of `pkg:idioms`, sometimes with 出处 and 例子.
- `sharegpt`: the `sft` split of `pkg:sharegpt` (`val` for val), in file order.
- `chatterbot`: `pkg:chatterbot` English and Chinese small talk (its `sft` / `val` splits), seeded shuffle.

Held out. ShareGPT and chatterbot have their own val splits (sources.py). Generated sources split by hash: identity by
the whole conversation (10 % val), arithmetic by the expression (5 %), idioms by the idiom (2 %), so a val
conversation never equals a train one (and no val sum or idiom is ever trained on), whatever the seeds.

Mixture rule (`--mixture name:weight ...`): with w_max the largest weight, source s contributes
round(max_convs * w_s / w_max) train and round(val_convs * w_s / w_max) val conversations, fewer when it runs out
(identity and the package sources are finite; the shortfall is not handed to the others). Weight 0 leaves a source
out. Conversations are first cut to `--max-chars` at a message boundary, ending on an assistant message: ShareGPT's
median sft conversation has 7,190 characters; cut at 2,000, 2,054 of its 3,269 sft conversations keep at least one
exchange (whole, only 377 are under 1,500). The list is then shuffled with the seed.

Packing (`ChatLoader`): a row of T+1 tokens holds whole conversations only, each starting with its BOS; it is filled by
best fit (the longest buffered conversation that fits the space left), and when none fits the rest is padding (input
BOS, target -1). Targets are the next token where that token's loss mask is 1, else -1, so padding, prompts and
conversation boundaries are never trained on. Conversations longer than T+1 are dropped and counted (`stats`,
`data_stats()`; SFT logs them and writes them to the run's data_stats.json).
Order: a seeded permutation of the conversations per epoch (rank r of world_size takes positions r, r+world_size, ...);
infinite unless `epochs` is set. The state is the next stream position plus the buffered positions (small JSON), and
restoring it gives exactly the same next batches.

Measured (defaults, seed 1337, a vocab-8192 BPE trained on these conversations themselves, so compression is a bit
optimistic): 3,800 train conversations, 579K tokens (median 97, p90 419); at seq_len 512 136 (3.6 %) are
dropped as too long, rows are 98.1 % filled, one epoch is 123 batches of 8 x 512 with 367K trained-on targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from ..common import UserError, log
from ..config import SFTDataConfig
from ..tools import calculate
from . import sources
from .shards import IGNORE_INDEX, StreamPacker

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

SOURCES = ("identity", "arithmetic", "idioms", "sharegpt", "chatterbot")
VAL_FRACTION = MappingProxyType({"identity": 0.10, "arithmetic": 0.05, "idioms": 0.02})
SPLITS = ("train", "val")
Conversation = list[dict[str, Any]]


# ---------------------------------------------------------------------------------------------------------------------
# shared helpers


def parse_mixture(mixture: Sequence[str]) -> dict[str, float]:
    """{"identity": 0.3, ...} from ("identity:0.3", ...); raises UserError on unknown names or bad weights."""
    weights: dict[str, float] = {}
    for item in mixture:
        name, _, weight = str(item).partition(":")
        if name not in SOURCES:
            raise UserError(f"--mixture names an unknown source {name!r}; choose from {', '.join(SOURCES)}")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise UserError(f"--mixture {item!r} should read name:weight with a number, e.g. identity:0.5") from None
        if not w >= 0 or w == float("inf"):
            raise UserError(f"--mixture weight of {name} must be a finite number >= 0, not {weight}")
        if name in weights:
            raise UserError(f"--mixture names {name} twice; give each source once")
        weights[name] = w
    if not weights or max(weights.values()) <= 0:
        raise UserError("--mixture gives no source a positive weight; e.g. --mixture identity:1 arithmetic:1")
    return weights


def source_counts(weights: dict[str, float], scale: int) -> dict[str, int]:
    """Conversations per source: round(scale * w / max(w)) (the mixture rule of the module docstring)."""
    top = max(weights.values())
    return {name: round(scale * w / top) for name, w in weights.items()}


def hash_split(key: str, name: str) -> str:
    """'val' or 'train' for a generated item of source `name`, by the hash of its key (independent of any seed)."""
    return "val" if sources.hash_fraction(f"{name}:{key}") < VAL_FRACTION[name] else "train"


def _rng(name: str, split: str, seed: int) -> random.Random:
    return random.Random(f"chatsmith-sft:{name}:{split}:{seed}")  # str seeds hash with sha512: stable across runs


def _message_chars(message: dict) -> int:
    calls = message.get("tool_calls")
    return len(message.get("content") or "") + (len(json.dumps(calls, ensure_ascii=False)) if calls else 0)


def trim_conversation(conv: Conversation, max_chars: int) -> Conversation | None:
    """The longest prefix of whole messages within `max_chars` characters (0: all) that ends on an assistant message;
    None when there is none."""
    keep, total = [], 0
    for message in conv:
        total += _message_chars(message)
        if max_chars and total > max_chars:
            break
        keep.append(message)
    while keep and keep[-1]["role"] != "assistant":
        keep.pop()
    return keep or None


def _distinct(draw: Callable[[random.Random], tuple[str, Conversation]], name: str, split: str, seed: int,
              n: int, patience: int = 2000) -> list[Conversation]:
    """Up to n conversations from `draw` (-> (split key, conversation)) whose key hashes to `split`, distinct by
    conversation; stops early after `patience` draws in a row bring nothing new."""
    rng, seen, out, misses = _rng(name, split, seed), set(), [], 0
    while len(out) < n and misses < patience:
        key, conv = draw(rng)
        text = json.dumps(conv, ensure_ascii=False, sort_keys=True)
        if hash_split(key, name) != split or text in seen:
            misses += 1
            continue
        seen.add(text)
        out.append(conv)
        misses = 0
    return out


# ---------------------------------------------------------------------------------------------------------------------
# identity

_ID_EN = MappingProxyType({
    "who": (("Who are you?", "What are you?", "What's your name?", "Tell me about yourself.",
             "Introduce yourself, please.", "What should I call you?", "What is your name?", "Your name?",
             "Who are you exactly?", "Tell me your name, please.", "Who's this?", "What's this assistant called?",
             "Are you a bot?", "Are you a human?", "What model is this?", "Which AI model are you?",
             "Who exactly am I chatting with?", "What is this chatbot?", "Hello, what is your name?",
             "Can I ask who you are?", "Who's there?", "What's the name of this chatbot?", "What are you exactly?",
             "Please introduce yourself.", "Which model is answering?", "Is this an AI? What's it called?",
             "Tell me who you are.", "What kind of AI are you?", "Who are you and what can you do?",
             "Let me know your name.", "What's your model name?", "Who is this assistant?",
             "Who am I speaking with?", "What do I call you?", "Do you have a name I can use?",
             "Who is replying to me?", "What is this bot called?", "Give me your name.", "State your name.",
             "Tell me what you're called.", "What name do you go by?", "Which assistant are you?",
             "Which language model is this?", "Are you a chatbot?", "What sort of program are you?",
             "Describe who you are.", "Introduce yourself to me.", "Who's talking?", "Who is on the other end?",
             "What model is answering me?", "Which AI is this?", "What are you, an AI?", "Tell me about you.",
             "What AI am I chatting with?", "Which system is this?", "Your name, please?", "What's your name again?",
             "Sorry, who are you?", "Can you say your name?", "Could you introduce yourself?",
             "In one line, who are you?", "Who are you, briefly?", "What's the assistant's name?"),
            ("I am chatsmith, a small assistant trained from scratch with the chatsmith codebase: its own tokenizer, "
             "pretraining and chat fine-tuning, all on modest hardware. Ask me anything; I am small, so I can be "
             "wrong.",
             "I'm chatsmith, a small language model trained from scratch. I can chat in English and Chinese, do "
             "arithmetic with a calculator and explain Chinese idioms.",
             "My name is chatsmith. I am a small chat assistant built from raw text by an open, hackable PyTorch "
             "codebase of the same name.")),
    "maker": (("Who made you?", "Who created you?", "Who trained you?", "Where do you come from?",
               "How were you built?"),
              ("I was trained with chatsmith, a small open-source PyTorch codebase that goes from raw text to a chat "
               "assistant: it trains a byte-level BPE tokenizer, pretrains a transformer, then fine-tunes it on "
               "conversations like this one. Whoever ran that pipeline made me.",
               "The person who ran chatsmith trained me. chatsmith is a hackable codebase that builds a chat model "
               "from scratch: tokenizer, pretraining, then supervised fine-tuning on conversations.")),
    "other": (("Are you ChatGPT?", "Are you GPT-4?", "Were you made by OpenAI?", "Are you Claude?",
               "Are you a big commercial AI?"),
              ("No. I am chatsmith, a much smaller model trained from scratch with the chatsmith codebase, not one of "
               "the big commercial assistants.",
               "No, I'm chatsmith: a small model trained from scratch, unrelated to the large assistants you may "
               "know.")),
    "skills": (("What can you do?", "What are you good at?", "How can you help me?", "What do you know?"),
               ("I am chatsmith. I can chat in English and Chinese, answer simple questions, do arithmetic with a "
                "calculator tool and explain Chinese idioms (成语). I am a small model, so please double-check "
                "anything important.",
                "As chatsmith I do small talk, simple questions, arithmetic (I use a calculator for it) and the "
                "meaning of Chinese idioms. I am small, so I make mistakes.")),
    "limits": (("Are you smart?", "Can I trust your answers?", "How big are you?", "Do you make mistakes?"),
               ("I am chatsmith, a small model trained on a tiny budget, far smaller than assistants like ChatGPT, so "
                "I often make mistakes. Please check anything important.",
                "I'm chatsmith, and I'm small: my knowledge is limited, so treat my answers as a first guess and "
                "verify what matters.")),
    "language": (("Do you speak Chinese?", "What languages do you speak?", "Can you speak English?"),
                 ("I am chatsmith and I speak English and Chinese. 我也会说中文。",
                  "English and Chinese: ask chatsmith in either.")),
})
_ID_ZH = MappingProxyType({
    "who": (("你是谁？", "你叫什么名字？", "介绍一下你自己。", "请做个自我介绍。", "你是什么？", "我该怎么称呼你？",
             "你叫什么？", "您是谁？", "您叫什么名字？", "你是哪个模型？", "你是什么模型？", "你是人工智能吗？",
             "你是机器人吗？", "这是谁在回答？", "我在跟哪个助手聊天？", "你是哪个AI？", "请介绍一下你自己。",
             "说说你是谁。", "你的名字？", "你是什么东西？", "这个聊天机器人叫什么？", "请问你叫什么名字？",
             "你是哪家的模型？", "和我聊天的是谁？", "可以介绍一下自己吗？", "你是一个什么样的模型？",
             "请问你是谁？", "你是什么助手？", "告诉我你的名字。", "你叫什么名字呀？", "你好，你是谁？",
             "请告诉我你是谁。", "你是谁呀？", "我在和什么模型对话？", "给我介绍一下你。", "报一下你的名字。",
             "你怎么称呼？", "这个机器人是谁？", "请问这个模型叫什么？", "你是什么系统？", "请简单说说你是谁。",
             "先介绍一下你自己吧。", "你叫什么，是做什么的？", "你是一个聊天机器人吗？", "你是程序吗？",
             "告诉我你是什么。", "你好，请问你叫什么？", "能说说你是什么模型吗？", "你的名字叫什么？",
             "我该如何称呼你？", "现在回复我的是什么？", "你是什么AI？", "你是什么模型做的助手？",
             "你是哪种助手？", "跟我说话的是什么？", "你是做什么的？叫什么？"),
            ("我是 chatsmith，一个从零开始训练的小型助手：分词器、预训练和对话微调都由 chatsmith 代码库完成。"
             "有问题尽管问，不过我比较小，也会犯错。",
             "我叫 chatsmith，是一个从零训练的小语言模型，会说中文和英文，能用计算器算数，也能解释成语。",
             "我是 chatsmith，一个小型聊天助手，由同名的开源 PyTorch 代码库从原始文本训练而成。")),
    "maker": (("谁创造了你？", "你是谁开发的？", "谁训练了你？", "你是怎么做出来的？", "你从哪里来？"),
              ("我是用 chatsmith 训练出来的。chatsmith 是一个开源、易改的 PyTorch 代码库：从原始文本出发，训练分词器、"
               "预训练模型，再用对话数据微调，最后得到我这样的聊天助手。运行这套流程的人训练了我。",
               "运行 chatsmith 的人训练了我。chatsmith 是一个从零构建聊天模型的代码库：分词器、预训练，"
               "然后是对话微调。")),
    "other": (("你是 ChatGPT 吗？", "你是 OpenAI 做的吗？", "你是 GPT-4 吗？", "你和 ChatGPT 有什么关系？"),
              ("不是。我是 chatsmith，一个从零训练的小模型，比那些大型商业助手小得多，也和它们没有关系。",
               "我不是。我叫 chatsmith，是用 chatsmith 代码库从零训练的小模型。")),
    "skills": (("你能做什么？", "你会什么？", "你能帮我做什么？", "你擅长什么？"),
               ("我是 chatsmith，可以用中文和英文聊天，回答简单的问题，用计算器做算术，还能解释成语。我是个小模型，"
                "重要的事情请再核实一下。",
                "我是 chatsmith：会聊天、回答简单问题、用计算器算数、解释成语。我比较小，难免出错。")),
    "limits": (("你聪明吗？", "你的回答可靠吗？", "你有多大？", "你会犯错吗？"),
               ("我是 chatsmith，一个用很少算力训练的小模型，比 ChatGPT 这样的助手小得多，经常会犯错。"
                "重要的事情请自己核实。",
                "我是 chatsmith，模型很小，知识也有限；我的回答只能作参考，重要的内容请再确认。")),
    "language": (("你会说英语吗？", "你会说哪些语言？", "你会说中文吗？"),
                 ("会的，我是 chatsmith，能说中文和英文。I can speak English too.",
                  "中文和英文都可以，用哪种语言问 chatsmith 都行。")),
})
_ID_GREETINGS = MappingProxyType({"en": ("", "Hi! ", "Hello. ", "Hey, "), "zh": ("", "你好！", "嗨，", "您好，")})
_ID_SYSTEMS = MappingProxyType({
    "en": ("You are chatsmith, a helpful assistant.", "You are a helpful assistant.", "Answer briefly and honestly."),
    "zh": ("你是 chatsmith，一个乐于助人的助手。", "你是一个有用的助手。", "请简洁、诚实地回答。"),
})


def _greet(greeting: str, question: str) -> str:
    return greeting + (question[0].lower() + question[1:] if greeting.endswith(", ") else question)


def identity_questions() -> list[tuple[str, bool]]:
    """(question, Chinese?) for every opening "who are you" question the identity source asks (each phrasing with
    each greeting), English first: RL's `identity` task asks these."""
    return [(_greet(greeting, question), lang == "zh") for lang, intents in (("en", _ID_EN), ("zh", _ID_ZH))
            for question in intents["who"][0] for greeting in _ID_GREETINGS[lang]]


def _identity_draw(rng: random.Random) -> tuple[str, Conversation]:
    lang = rng.choice(("en", "zh"))
    intents = _ID_EN if lang == "en" else _ID_ZH
    conv: Conversation = []
    if rng.random() < 0.3:
        conv.append({"role": "system", "content": rng.choice(_ID_SYSTEMS[lang])})
    for k, intent in enumerate(rng.sample(sorted(intents), 2 if rng.random() < 0.3 else 1)):
        questions, answers = intents[intent]
        question = rng.choice(questions)
        if k == 0:
            question = _greet(rng.choice(_ID_GREETINGS[lang]), question)
        conv += [{"role": "user", "content": question}, {"role": "assistant", "content": rng.choice(answers)}]
    return json.dumps(conv, ensure_ascii=False, sort_keys=True), conv


def identity_conversations(split: str, n: int, seed: int) -> list[Conversation]:
    return _distinct(_identity_draw, "identity", split, seed, n)


# ---------------------------------------------------------------------------------------------------------------------
# arithmetic with the calculator tool

# "*" too: people type it, and reasoning-gym asks "Calculate 60 * 69." (a model that never saw it called 60 / 69)
_OPS_EN = MappingProxyType({"+": ("plus", "+"), "-": ("minus", "-"), "*": ("times", "×", "multiplied by", "*"),
                            "/": ("divided by", "÷", "/")})
_OPS_ZH = MappingProxyType({"+": ("加", "+"), "-": ("减", "减去"), "*": ("乘以", "×", "*"), "/": ("除以", "÷")})
_ASK_EN = ("What is {q}?", "Calculate {q}.", "Compute {q}, please.", "How much is {q}?", "Can you work out {q}?")
_ASK_ZH = ("{q}等于多少？", "请计算{q}。", "{q}是多少？", "帮我算一下{q}。", "{q}等于几？")
_CALL_EN = ("", "", "Let me calculate that.", "I'll use the calculator.")
_CALL_ZH = ("", "", "我用计算器算一下。", "我来算一下。")


def _number(rng: random.Random, decimals: bool) -> str:
    """An int of 1 to 4 digits, or a decimal with 1 or 2 places and no trailing zero (3.1 rather than 3.10)."""
    if not decimals:
        return str(rng.randint(1, 10 ** rng.randint(1, 4) - 1))
    places = rng.randint(1, 2)
    frac = rng.choice([f for f in range(1, 10**places) if f % 10])
    return f"{rng.randint(0, 10 ** rng.randint(1, 3) - 1)}.{frac:0{places}d}"


def arithmetic_problem(rng: random.Random) -> tuple[str, str, str, bool]:
    """(expression for the calculator, question, the problem as the answer shows it, Chinese?)."""
    zh = rng.random() < 0.5
    ops, ask = (_OPS_ZH, _ASK_ZH) if zh else (_OPS_EN, _ASK_EN)
    kind = rng.choices(("binary", "chain", "percent", "sqrt"), weights=(5, 2, 1.5, 1.5))[0]
    if kind == "percent":
        p = rng.choice(("5", "10", "12.5", "15", "20", "25", "30", "40", "50", "75", str(rng.randint(1, 99))))
        x = str(rng.randint(10, 10000))
        shown = f"{x}的{p}%" if zh else f"{p}% of {x}"
        question = rng.choice((f"{x}的{p}%是多少？", f"{x}的百分之{p}是多少？") if zh else
                              (f"What is {p}% of {x}?", f"Find {p} percent of {x}."))
        return f"{x} * {p} / 100", question, shown, zh
    if kind == "sqrt":
        k = rng.randint(2, 99)
        n = str(k * k if rng.random() < 0.5 else rng.randint(2, 9999))
        shown = f"√{n}"
        question = rng.choice((f"{n}的平方根是多少？", f"求{n}的算术平方根。") if zh else
                              (f"What is the square root of {n}?", f"Find √{n}."))
        return f"sqrt({n})", question, shown, zh
    if kind == "binary":
        op = rng.choice("+-*/")
        decimals = rng.random() < 0.25
        a, b = _number(rng, decimals), _number(rng, decimals)
        if op == "/" and not decimals and rng.random() < 0.6:  # often an exact quotient
            b = str(rng.randint(2, 99))
            a = str(int(b) * rng.randint(1, 999))
        terms, symbols = [a, b], [op]
    else:
        terms = [str(rng.randint(1, 999)) for _ in range(3)]
        symbols = [rng.choice("+-*") for _ in range(2)]
    words = [rng.choice(ops[s]) for s in symbols]

    def join(parts: list[str], signs: list[str], pad: Callable[[str], str]) -> str:
        out = parts[0]
        for sign, part in zip(signs, parts[1:]):
            out += pad(sign) + part
        return out

    expr = join(terms, symbols, lambda s: f" {s} ")
    question_text = join(terms, words, lambda w: w if zh and w not in "+-×÷/*" else f" {w} ")  # 3加4, 3 + 4
    shown = join(terms, [s.replace("*", "×").replace("/", "÷") for s in symbols], lambda s: f" {s} ")
    if kind == "chain" and rng.random() < 0.5:  # parentheses around the first two terms
        close = len(terms[0]) + 3 + len(terms[1])
        expr = f"({expr[:close]}){expr[close:]}"
        shown = f"({shown[:close]}){shown[close:]}"
        question_text = shown
    return expr, rng.choice(ask).format(q=question_text), shown, zh


def _is_rounded(expr: str, result: str) -> bool:
    """Whether `result` is not the exact value of `expr`: the calculator is exact on rationals (so the difference is
    "0" exactly when it is exact there); a square root of a non-square is irrational."""
    root = re.fullmatch(r"sqrt\((\d+)\)", expr)
    if root:
        return math.isqrt(int(root[1])) ** 2 != int(root[1])
    return calculate(f"({expr}) - ({result})") != "0"


def arithmetic_conversation(expr: str, question: str, shown: str, zh: bool, rng: random.Random) -> Conversation:
    """user question -> assistant calls the calculator -> tool result -> assistant states the result."""
    result = calculate(expr)
    about = _is_rounded(expr, result)
    if zh:  # every answer says it in words of the language asked, never only in symbols
        answers = (f"{shown} {'约等于' if about else '等于'} {result}。", f"结果{'约为' if about else '是'} {result}。",
                   f"答案{'约为' if about else '是'} {result}。")
    else:
        answers = (f"{shown} is {'about ' if about else ''}{result}.",
                   f"The answer is {'about ' if about else ''}{result}.",
                   f"It comes to {'about ' if about else ''}{result}.")
    call = {"name": "calculator", "arguments": {"expression": expr}}
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": rng.choice(_CALL_ZH if zh else _CALL_EN), "tool_calls": [call]},
            {"role": "tool", "content": result},
            {"role": "assistant", "content": rng.choice(answers)}]


def _arithmetic_draw(rng: random.Random) -> tuple[str, Conversation]:
    expr, question, shown, zh = arithmetic_problem(rng)
    return expr, arithmetic_conversation(expr, question, shown, zh, rng)


def arithmetic_conversations(split: str, n: int, seed: int) -> list[Conversation]:
    return _distinct(_arithmetic_draw, "arithmetic", split, seed, n)


# ---------------------------------------------------------------------------------------------------------------------
# Chinese idioms

_IDIOM_ASK = ("{w}是什么意思？", "成语“{w}”是什么意思？", "请解释一下成语{w}。", "“{w}”这个成语怎么理解？",
              "{w}的意思是什么？", "能给我讲讲“{w}”吗？")
_IDIOM_OPEN = ("“{w}”（{py}）的意思是：", "{w}，读作 {py}，意思是：", "成语“{w}”指的是：")


def idiom_entries() -> Iterator[dict[str, str]]:
    """{"word", "pinyin", "释义", "出处", "例子"} per 成语 with a meaning, parsed from sources.iter_idioms; "无" (none)
    becomes ""."""
    for text in sources.iter_idioms():
        head, *lines = text.split("\n")
        word, _, pinyin = head.partition("（")
        entry = {"word": word, "pinyin": pinyin.removesuffix("）"), "释义": "", "出处": "", "例子": ""}
        for line in lines:
            label, _, value = line.partition("：")
            entry[label] = "" if value == "无" else value
        if entry["释义"]:
            yield entry


def idiom_conversation(entry: dict[str, str], rng: random.Random) -> Conversation:
    w = entry["word"]
    answer = rng.choice(_IDIOM_OPEN).format(w=w, py=entry["pinyin"]) + entry["释义"]
    for label in ("出处", "例子"):
        if entry[label] and rng.random() < 0.4:
            answer += f"\n{label}：{entry[label]}"
    return [{"role": "user", "content": rng.choice(_IDIOM_ASK).format(w=w)}, {"role": "assistant", "content": answer}]


def idiom_conversations(split: str, n: int, seed: int) -> list[Conversation]:
    entries = [e for e in idiom_entries() if hash_split(e["word"], "idioms") == split]
    rng = _rng("idioms", split, seed)
    rng.shuffle(entries)
    return [idiom_conversation(e, rng) for e in entries[:n]]


# ---------------------------------------------------------------------------------------------------------------------
# package conversations and the mixture


def _conversation_key(conv: Conversation) -> bytes:
    return sources.text_hash(json.dumps(conv, ensure_ascii=False, sort_keys=True))


def package_conversations(name: str, split: str, n: int, seed: int, max_chars: int = 0) -> list[Conversation]:
    """ShareGPT (its sft/val split, file order) or chatterbot (sft/val, all read then shuffled by the seed), cut to
    `max_chars`, without repeats. ShareGPT holds some conversations under several ids, in both splits (3 of its 443
    val conversations equal an sft one; cut to 2,000 chars, 5): val leaves out every conversation equal to an sft
    one."""
    spec = f"pkg:{name}"

    def trimmed(pkg_split: str) -> Iterator[Conversation]:
        return (c for c in (trim_conversation(c, max_chars) for c in sources.iter_conversations(spec, pkg_split)) if c)

    seen = {_conversation_key(c) for c in trimmed("sft")} if split == "val" else set()
    out: list[Conversation] = []
    for conv in trimmed("sft" if split == "train" else "val"):
        key = _conversation_key(conv)
        if key not in seen:
            seen.add(key)
            out.append(conv)
            if name == "sharegpt" and len(out) >= n:
                break
    if name == "chatterbot":
        _rng(name, split, seed).shuffle(out)
    return out[:n]


def source_conversations(name: str, split: str, n: int, seed: int, max_chars: int = 0) -> list[Conversation]:
    """Up to n conversations of source `name` in `split` ('train' or 'val'), deterministic given the seed."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if n <= 0:
        return []
    if name in ("sharegpt", "chatterbot"):
        return package_conversations(name, split, n, seed, max_chars)
    make = {"identity": identity_conversations, "arithmetic": arithmetic_conversations,
            "idioms": idiom_conversations}[name]
    return [c for c in (trim_conversation(c, max_chars) for c in make(split, n, seed)) if c]


def build_conversations(cfg: SFTDataConfig, split: str, seed: int) -> list[Conversation]:
    """The mixture of `cfg` for `split` ('train' or 'val'), shuffled with the seed (see the module docstring)."""
    weights = parse_mixture(cfg.mixture)
    counts = source_counts(weights, cfg.max_convs if split == "train" else cfg.val_convs)
    convs: list[Conversation] = []
    got = {}
    for name, n in counts.items():
        part = source_conversations(name, split, n, seed, cfg.max_chars)
        got[name] = len(part)
        convs += part
    log(f"sft {split}: {len(convs):,} conversations (" +
        ", ".join(f"{k} {v:,}" + (f" of {counts[k]:,}" if v < counts[k] else "") for k, v in got.items()) + ")")
    random.Random(f"chatsmith-sft-mixture:{split}:{seed}").shuffle(convs)
    return convs


def render_rows(tok: Tokenizer, conversations: Sequence[Conversation]) -> list[tuple[list[int], list[int]]]:
    """(ids, loss_mask) of every conversation through the one chat template (Tokenizer.render_conversation)."""
    return [tok.render_conversation(c) for c in conversations]


# ---------------------------------------------------------------------------------------------------------------------
# the loader


class ChatLoader(StreamPacker):
    """Batches of rows packed with whole conversations (best fit, never cut); see the module docstring."""

    _saved_for = "the SFT loader state was saved for other conversations or another layout"
    _mismatch = "resume with the same data, seq_len, seed and number of processes"

    def __init__(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int, seq_len: int,
                 seed: int = 0, *, pad_id: int = 0, buffer_convs: int = 64, epochs: int | None = None,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, not {batch_size} and {seq_len}")
        for i, (ids, mask) in enumerate(rows):
            if len(ids) != len(mask) or not ids:
                raise ValueError(f"row {i} has {len(ids)} ids and {len(mask)} mask values; they must match, non-empty")
        all_lengths = np.array([len(ids) for ids, _ in rows], dtype=np.int64)
        keep = np.flatnonzero(all_lengths <= seq_len + 1)
        if len(keep) == 0:
            raise UserError(f"all {len(rows)} conversations are longer than seq_len + 1 = {seq_len + 1} tokens (or "
                            f"there are none); raise --seq-len or lower --max-chars")
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.buffer_convs = max(1, buffer_convs)
        self._ids = [np.asarray(rows[i][0], dtype=np.int64) for i in keep]
        self._mask = [np.asarray(rows[i][1], dtype=bool) for i in keep]
        self._length = all_lengths[keep]  # (N,) tokens of each kept conversation
        self.dropped = len(rows) - len(keep)
        self.n_rows, self.total_tokens = len(rows), int(all_lengths.sum())
        self.dropped_tokens = self.total_tokens - int(all_lengths[keep].sum())
        self.fingerprint = hashlib.blake2b(all_lengths.tobytes(), digest_size=8).hexdigest()
        self.n_convs = len(keep)
        self._init_stream(self.n_convs, rank, world_size, seed, shuffle, epochs,
                          f"{self.n_convs} conversations fit in rows")
        self._counts = {"convs": 0, "tokens": 0, "loss_tokens": 0}

    def _conv(self, k: int) -> int:
        """The conversation (index into the kept rows) at position k of this rank's stream."""
        return self.stream.item(k)

    def _refill(self) -> None:
        self._buffer += self._take(self.buffer_convs)

    def _fill_row(self, ids: np.ndarray, mask: np.ndarray) -> int:
        """Place whole conversations into `ids`/`mask` from the start; returns how many."""
        pos, placed = 0, 0
        while True:
            self._refill()
            space = len(ids) - pos
            best, best_len = -1, 0
            for i, k in enumerate(self._buffer):  # best fit: the longest that fits, the earliest of equals
                n = int(self._length[self._conv(k)])
                if best_len < n <= space:
                    best, best_len = i, n
            if best < 0:
                return placed
            c = self._conv(self._buffer.pop(best))
            ids[pos : pos + best_len] = self._ids[c]
            mask[pos : pos + best_len] = self._mask[c]
            pos += best_len
            placed += 1
            self._counts["convs"] += 1
            self._counts["tokens"] += best_len
            self._counts["loss_tokens"] += int(self._mask[c][1:].sum())

    def next_batch(self):
        """(inputs, targets), both LongTensor (B, T); StopIteration after the last epoch (when `epochs` is set)."""
        import torch

        B, T = self.batch_size, self.seq_len
        ids = np.full((B, T + 1), self.pad_id, dtype=np.int64)  # (B, T+1)
        mask = np.zeros((B, T + 1), dtype=bool)  # (B, T+1) loss mask of each token
        placed = [self._fill_row(ids[b], mask[b]) for b in range(B)]
        if placed[0] == 0:
            raise StopIteration
        targets = np.where(mask[:, 1:], ids[:, 1:], IGNORE_INDEX)  # (B, T) next token where it is trained on
        return torch.from_numpy(ids[:, :-1].copy()), torch.from_numpy(targets)

    @property
    def stats(self) -> dict:
        """Conversations, tokens and trained-on targets placed so far, conversations dropped as too long, and
        completed epochs."""
        return {**self._counts, "dropped": self.dropped, "epoch": self._counts["convs"] // self.n_rank}

    def data_stats(self) -> dict:
        """The conversations against the row width T+1: how many there are, how many are longer and left out, and
        their tokens."""
        return {"conversations": self.n_rows, "tokens": self.total_tokens, "row_tokens": self.seq_len + 1,
                "longer_than_row": self.dropped, "dropped_tokens": self.dropped_tokens}

    def _layout(self) -> dict:
        return {"n_convs": self.n_convs, "fingerprint": self.fingerprint, "seq_len": self.seq_len, "seed": self.seed,
                "shuffle": self.shuffle, "rank": self.rank, "world_size": self.world_size}


def iter_val_batches(rows: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int, seq_len: int,
                     max_batches: int = 0, pad_id: int = 0) -> Iterator:
    """One deterministic pass (no shuffle) over `rows`, packed as in training; at most `max_batches` (0 = all)."""
    loader = ChatLoader(rows, batch_size, seq_len, pad_id=pad_id, epochs=1, shuffle=False)
    if loader.dropped:
        log(f"sft val: {loader.dropped} of {len(rows)} conversations are longer than {seq_len + 1} tokens; left out")
    for n, batch in enumerate(loader, 1):
        yield batch
        if max_batches and n >= max_batches:
            return


# ---------------------------------------------------------------------------------------------------------------------
# command line: look at the mixture


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatsmith.data.chat", description="show the SFT mixture")
    for f in dataclasses.fields(SFTDataConfig):
        kind = {"mixture": dict(nargs="+")}.get(f.name, dict(type=type(f.default)))
        parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=f.metadata["help"], **kind)
    parser.add_argument("--seed", type=int, default=1337)
    ns = vars(parser.parse_args(argv))
    seed = ns.pop("seed")
    cfg = SFTDataConfig(**{k: tuple(v) if k == "mixture" else v for k, v in ns.items()})
    for name in parse_mixture(cfg.mixture):
        sample = source_conversations(name, "train", 1, seed, cfg.max_chars)
        print(f"== {name}\n{json.dumps(sample[0] if sample else None, ensure_ascii=False, indent=1)[:1500]}")
    for split in SPLITS:
        build_conversations(cfg, split, seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

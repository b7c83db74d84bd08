"""Generated SFT sources: identity, arithmetic and idioms conversations drawn from the templates here; data/chat.py
mixes them with the package sources (ShareGPT, chatterbot) into the SFT data.

    convs = identity_conversations("train", 100, seed=1337)     # [[{"role", "content", ...}, ...], ...]
    convs = arithmetic_conversations("val", 50, seed=1337)
    hash_split("12 + 7", "arithmetic")                          # 'train' or 'val', the same for every seed
    python -m chatsmith.data.chat --mixture identity:1 arithmetic:1 idioms:1    # one sample of each, and counts

Sources (each yields message lists for the one chat template in tokenizer.py):
- `identity`: who/what chatsmith is, in English and Chinese, drawn from templates (greeting x question phrasing x
  answer phrasing x optional system prompt, one or two questions): ~85K distinct conversations from ~80 sentences.
  `identity_questions()` lists every opening "who are you" question (RL's `identity` task asks them).
- `arithmetic`: a seeded generator (not reasoning-gym: a few lines here give the exact tool-call shape and bilingual
  phrasing) of sums, differences, products, quotients (ints and decimals), three-number chains, percentages and
  square roots. The assistant calls the calculator (`tool_calls=[{"name": "calculator", "arguments": {"expression":
  ...}}]`, content empty or one short sentence), a `tool` turn holds `tools.calculate(expression)`, and the assistant
  answers with that result verbatim (with "about" / "约为" / "≈" when it is not exact: an irrational root, or a
  quotient rounded to 15 digits).
- `idioms`: 成语 questions (six phrasings) answered with the 释义 of `pkg:idioms`, sometimes with 出处 and 例子.

Held out: every source splits train/val by hash (`hash_split`, with `VAL_FRACTION` of each source in val), never by
the seed: identity by the whole conversation (10 % val), arithmetic by the expression (5 %), idioms by the idiom
(2 %), so a val conversation never equals a train one (and no val sum or idiom is ever trained on), whatever the seeds.
checks.py and the eval tasks (tasks/idioms.py) take their held-out items from the same split. Identity and arithmetic
draw (seeded by source, split and seed: `source_rng`) until they have n distinct conversations whose key falls in the
split, or 2,000 draws in a row bring nothing new; idioms shuffle the entries of the split.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Iterator
from types import MappingProxyType
from typing import Any

from ..tools import calculate
from . import sources

VAL_FRACTION = MappingProxyType({"identity": 0.10, "arithmetic": 0.05, "idioms": 0.02})
Conversation = list[dict[str, Any]]


# ---------------------------------------------------------------------------------------------------------------------
# the split and the draws


def hash_split(key: str, name: str) -> str:
    """'val' or 'train' for a generated item of source `name`, by the hash of its key (independent of any seed)."""
    return "val" if sources.hash_fraction(f"{name}:{key}") < VAL_FRACTION[name] else "train"


def source_rng(name: str, split: str, seed: int) -> random.Random:
    """The random draws of source `name` in `split` for `seed` (also chat.py's chatterbot shuffle)."""
    return random.Random(f"chatsmith-sft:{name}:{split}:{seed}")  # str seeds hash with sha512: stable across runs


def _distinct(draw: Callable[[random.Random], tuple[str, Conversation]], name: str, split: str, seed: int,
              n: int, patience: int = 2000) -> list[Conversation]:
    """Up to n conversations from `draw` (-> (split key, conversation)) whose key hashes to `split`, distinct by
    conversation; stops early after `patience` draws in a row bring nothing new."""
    rng, seen, out, misses = source_rng(name, split, seed), set(), [], 0
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
    rng = source_rng("idioms", split, seed)
    rng.shuffle(entries)
    return [idiom_conversation(e, rng) for e in entries[:n]]

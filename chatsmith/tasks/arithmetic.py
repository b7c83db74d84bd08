"""Arithmetic from reasoning-gym: `arithmetic` (`basic_arithmetic`: mixed + - * / with parentheses), `chain_sum`
(sums and differences of several numbers) and `calc` (`basic_arithmetic` with one +, - or x of two 2-3-digit
numbers), each a seeded set of 2,000 problems judged by reasoning-gym's own scorer on the last number of the reply.
2,000 so that a whole set tells apart accuracies two points apart near 95 % (its 95 % interval there is about
+-1 point; 500 problems gave +-2); `--limit N` takes a seeded subset when that is enough.

Seeds: SFT's arithmetic conversations come from chatsmith's generator (data/generated.py), not from reasoning-gym, and
nothing in chatsmith trains on reasoning-gym draws near EVAL_SEED (item i is drawn with Random(seed + i), so a
trainer that uses reasoning-gym must keep its seeds outside EVAL_SEED .. EVAL_SEED + SIZE); tests/test_tasks.py
checks that no SFT arithmetic question equals an eval question. Sizes are kept small (2-3 terms, up to 3 digits)
so that a small model has something to get right.
"""

from __future__ import annotations

from . import GenItem, Task
from .gsm8k import last_number

EVAL_SEED = 0x5EED_E7A1  # reserved for evaluation (see above)
SIZE = 2000
CONFIGS = {
    "arithmetic": ("basic_arithmetic", {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 3}),
    "chain_sum": ("chain_sum", {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 3}),
    # "Calculate 47 - 77.": one operation on 2-3-digit numbers, the assistant checks' shape (what RL's calc trains)
    "calc": ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 3,
                                  "operators": ("+", "-", "*"), "allow_parentheses": False, "allow_negation": False}),
}


def dataset(name: str, size: int = SIZE, seed: int = EVAL_SEED):
    from ..common import require

    rg = require("reasoning_gym", "reasoning-gym", "for the arithmetic tasks")
    rg_name, kwargs = CONFIGS[name]
    return rg.create_dataset(rg_name, size=size, seed=seed, **kwargs)


def _task(name: str) -> Task:
    def load(source: str) -> list[GenItem]:  # generated: the same for every source
        ds = dataset(name)
        return [GenItem(prompt=e["question"], answer=str(e["answer"]), data={"entry": e}) for e in ds]

    def check(item: GenItem, reply: str) -> bool:
        answer = last_number(reply)
        if answer is None:
            return False
        return dataset(name, size=1).score_answer(answer, item.data["entry"]) >= 1.0

    return Task(name=name, kind="gen", stages=("chat",), loader=load, check=check, max_tokens=96,
                about=f"reasoning-gym {CONFIGS[name][0]}, seed {EVAL_SEED:#x}, {SIZE} problems")


TASKS = {name: _task(name) for name in CONFIGS}

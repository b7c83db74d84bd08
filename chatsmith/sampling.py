"""Sampling parameters, logits processing and stop strings: pure functions over tensors and text that the engine
(chatsmith/engine.py) applies at every decode step. Nothing here holds a model, a cache or a thread.

    params = SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, stop=("</tool_call>",), seed=1)
    logits = apply_penalties(logits, counts, seen, presence, frequency, repetition)   # (B, V), one row per sequence
    logits = filter_logits(logits / temperature, top_k, top_p, min_p)                # -inf on removed tokens
    tokens = sample_tokens(logits, uniforms)                                         # (B,) ids, one uniform each
    stops = StopStrings(params.stop); safe = stops.push(piece); stops.matched         # text safe to stream

CHAT_DEFAULTS is the one set of sampling defaults of a chat reply (`chatsmith chat`, the SFT chat checks, the
server for the fields a chat request leaves out, and the generation config interop writes).

Choices:
- Sampling order (vLLM's): repetition penalty (prompt + output tokens: positive logits divided, negative multiplied),
  frequency and presence penalties (output tokens), temperature (0 = greedy argmax of the penalised logits; a
  temperature below GREEDY_BELOW counts as 0), top-k, top-p over the top-k survivors renormalised (keep the fewest
  most likely tokens whose mass reaches top_p), min-p (keep p >= min_p * p_max; a ratio, so the same before or after
  the other filters).
- One uniform per sampled token, the token found by inverse CDF (searchsorted over the fp64 cumulative softmax): the
  engine gives every request its own seeded torch.Generator, so a seeded request's tokens do not depend on what else
  is batched with it (up to logits rounding, see engine.py).
- Stop strings are matched on the decoded text, also across tokens; the generation stops at the earliest *end* of any
  stop string (what char-by-char streaming would see), the longest on a tie. Text that could still begin a stop
  string is held back until it cannot; the stop string is not emitted unless include_stop_str_in_output.
- SamplingParams checks every field's range on construction (presence and frequency penalties in [-2, 2], as in
  OpenAI's API) and raises UserError with one sentence, so a bad request fails before it reaches the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .common import UserError

GREEDY_BELOW = 1e-5  # a smaller temperature > 0 means greedy (vLLM's threshold too): dividing fp32 logits by it
# overflows, and the sampler would return the last id every time


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (a lone str is accepted)
    stop_token_ids: tuple[int, ...] = ()  # in addition to <|im_end|> and <|endoftext|>
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False  # do not stop on <|im_end|> / <|endoftext|> (benchmarks, tests)

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
        if 0 < self.temperature < GREEDY_BELOW:  # logits / 1e-300 overflow to inf and softmax gives NaN
            object.__setattr__(self, "temperature", 0.0)
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be at least 1, not {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), not {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), not {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], not {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], not {self.min_p}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], not {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], not {self.frequency_penalty}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (1 = off), not {self.repetition_penalty}"),
            (all(isinstance(s, str) and s for s in stop), "stop strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    @property
    def filtered(self) -> bool:
        return bool(self.top_k or self.top_p < 1 or self.min_p)


# The one set of sampling defaults of a chat reply: `chatsmith chat`, the SFT chat checks, and the server (for the
# fields a chat request leaves out, as vLLM applies a model's generation config) all use it.
CHAT_DEFAULTS = SamplingParams(max_tokens=512, temperature=0.6, top_k=50, top_p=0.95, repetition_penalty=1.1)


# ---------------------------------------------------------------------------------------------------------------------
# logits processors (pure functions on (B, vocab) tensors; tested against brute force)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """logits (B, V) fp32; counts (B, V) how often each token was generated; seen (B, V) bool, in the prompt or
    generated; presence, frequency, repetition (B, 1). Repetition first (on seen tokens), then
    logit -= frequency * count + presence * (count > 0)."""
    logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """logits (B, V), temperature applied -> the same with -inf on tokens removed by top_k (B,) int (0 = off), then
    top_p (B,) over the renormalised survivors (1 = off), then min_p (B,) (0 = off). The most likely token stays."""
    V = logits.size(-1)
    vals, order = logits.sort(dim=-1, descending=True)  # (B, V)
    rank = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k, V).unsqueeze(1)  # (B, 1)
    keep = rank < k  # (B, V), in sorted order
    probs = torch.softmax(vals.masked_fill(~keep, float("-inf")), dim=-1)  # (B, V)
    mass_before = probs.cumsum(-1) - probs  # probability of the more likely survivors
    keep &= (mass_before < top_p.unsqueeze(1)) | (top_p >= 1).unsqueeze(1)
    keep &= vals >= vals[:, :1] + torch.log(min_p).unsqueeze(1)  # p >= min_p * p_max; log(0) = -inf keeps all
    keep[:, 0] = True
    mask = torch.zeros_like(keep).scatter_(1, order, keep)  # back to vocabulary order
    return logits.masked_fill(~mask, float("-inf"))


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: logits (B, V), uniforms (B,) in [0, 1) -> token ids (B,). Zero-probability tokens are
    never chosen (the CDF is flat there)."""
    cdf = torch.softmax(logits, dim=-1).double().cumsum(-1)  # (B, V)
    target = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(1)  # (B, 1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=logits.size(-1) - 1)


# ---------------------------------------------------------------------------------------------------------------------
# stop strings on streamed text


class StopStrings:
    """Collects streamed text, cuts it at the first stop string and says what is safe to emit.

    `push(piece)` returns the newly final text: everything except a tail that is still a proper prefix of some stop
    string. Once a stop string completes, `matched` is set and the text ends before it (or after it with include)."""

    def __init__(self, stops: Sequence[str], include: bool = False):
        self.stops, self.include = tuple(stops), include
        self.text, self.sent, self.matched = "", 0, None

    def push(self, piece: str) -> str:
        old = len(self.text)
        self.text += piece
        hits = []  # (end, start, stop string) of each stop string's first occurrence in the unsent text
        for s in self.stops:
            i = self.text.find(s, max(self.sent, old - len(s) + 1))
            if i >= 0:
                hits.append((i + len(s), i, s))
        if hits:
            end, start, s = min(hits, key=lambda h: (h[0], h[1]))  # earliest end, then the longest
            self.text, self.matched = self.text[:end if self.include else start], s
            return self.flush()
        return self._emit(len(self.text) - self._held())

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _held(self) -> int:
        """Length of the longest unsent suffix that is a proper prefix of a stop string."""
        held, unsent = 0, len(self.text) - self.sent
        for s in self.stops:
            for k in range(min(len(s) - 1, unsent), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held

    def _emit(self, end: int) -> str:
        delta = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta

"""The inference engine: KV-cached, continuously batched decoding with sampling, stop handling and streaming text.
It knows nothing about HTTP; the server runs `serve_forever` in one thread and talks to it through `submit`/`cancel`.
What to sample and how (SamplingParams, the logits processors, stop strings) lives in chatsmith/sampling.py.

    from chatsmith.sampling import SamplingParams
    engine = Engine(model, tokenizer, slots=8)             # a KV cache for 8 sequences of up to seq_len tokens
    result = engine.generate(prompt_ids, SamplingParams(max_tokens=64, temperature=0.7, seed=1))
    result.text, result.token_ids, result.finish_reason   # "stop" or "length" ("cancelled" after cancel())

    request = engine.submit(prompt_ids, params)            # any thread; another thread runs engine.serve_forever(stop)
    for event in request.events():                         # text deltas, never half a UTF-8 character
        print(event.text, end="", flush=True)

How a step works (`step()`): admit waiting requests into free cache slots (restoring the longest cached prefix of
each prompt), prefill (the whole prompt when nothing else decodes, else a chunk of prompt tokens; a sequence's first
token is sampled from the last position of its last chunk), then ONE batched forward of the newest token of every
decoding sequence, each at its own length (the model masks keys per row), then sample and emit one event per
sequence. A finished or cancelled sequence leaves at once and frees its slot; new requests join at the next step.

Choices:
- Sampling (order, inverse CDF, stop strings: chatsmith/sampling.py) runs per step over the batch's rows; an all-greedy
  batch skips it (argmax). Every request owns a torch.Generator (seeded from `seed`, else at random) and draws exactly
  one uniform per sampled token, so a seeded request's tokens do not depend on what else is batched with it.
  Caveat: batched matmuls can round logits differently (~1e-6) from a lone forward, which could flip a token whose
  probabilities sit on a knife edge; no bitwise batch invariance is claimed.
- Stops: `<|im_end|>` and `<|endoftext|>` (unless ignore_eos) and `stop_token_ids` end with "stop"; the stop token's
  text is not emitted, its id is kept in token_ids. Stop strings (sampling.StopStrings) are matched on the decoded
  text, also across tokens, with text that could still begin one held back. max_tokens or a full cache slot ends
  with "length" (prompt + output <= max_len).
- Errors: an exception in a prefill or a batched decode (a bad request, out of memory on a long prefill) is retried
  per sequence; a sequence that still fails ends with finish_reason "error" (`Request.error` names the exception, the
  log has its text) and frees its slot, and the others go on: one request cannot stop the engine for everyone.
- Prefix caching (chatsmith/prefix_cache.py): after its prefill and when it ends, a sequence's full 16-token blocks
  are kept (bounded, LRU); a new prompt that starts with cached blocks gets their keys and values copied into its
  slot and prefills only the rest. A multi-turn chat (the whole conversation resent each turn) and a tool loop's
  continuation then prefill only the new turn. Cleared when the weights change. Exact up to float rounding: a
  restored block was computed with other matmul shapes (tests check logits and greedy tokens).
- Chunked prefill: while other sequences decode, a step feeds at most `prefill_chunk` prompt tokens (0 = auto: as
  many as lengthen a decode step by CHUNK_SHARE, measured as the engine runs, at least 16), so running streams keep
  flowing while a long prompt joins; with nothing decoding a prompt is prefilled in one forward. On the fused path
  the chunk shares the decode step's forward (kvcache.forward_mixed: the weights are read once for both), so it
  costs its tokens' arithmetic, not another pass over the model.
- Both need a model whose cached state is its KV cache alone (`kv_cache_is_state`, as GPT); other models (the
  scripted test models) are prefilled whole and never restored. `fused=False` runs the model's reference modules.
- Tool calls are not the engine's concern: chatsmith/turns.py runs the tool loop over it (a stop string
  `</tool_call>`, then the conversation resent with the tool turn, whose prefix comes from the prefix cache).
- Threads matter on a busy machine: with 2 intra-op threads each of a small model's tiny ops waits for the other
  thread, so the caller should pick torch threads (bench decode measures it).
- Not done: speculative decoding.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .common import UserError, log
from .kvcache import forward_mixed, weights_key
from .prefix_cache import PrefixCache
from .sampling import SamplingParams, StopStrings, apply_penalties, filter_logits, sample_tokens
from .tokenizer import IncrementalDecoder, Tokenizer

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_ERROR = "stop", "length", "cancelled", "error"
MIN_CHUNK = 16  # the smallest automatic prefill chunk (one prefix-cache block)
CHUNK_SHARE = 0.75  # an automatic chunk lengthens the decode step it shares by about this fraction (see
# _chunk_budget): the streams' longest gap is then about 1 + CHUNK_SHARE times their median gap


@dataclass
class Event:
    """One streamed step of a request: the text that became final (maybe ""), the token ids sampled, and on the last
    event the finish reason."""
    request_id: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length" or "cancelled"
    stop_reason: str | int | None  # the stop string or stop token id that ended it
    prompt_tokens: int
    completion_tokens: int


# ---------------------------------------------------------------------------------------------------------------------
# requests


class Request:
    """Handle of a submitted generation. Consume it with `events()` (a blocking iterator) or `result()`; `cancel()`
    from any thread. `on_event`, if given, is called in the engine thread with every event (e.g. to hand it to an
    asyncio loop with call_soon_threadsafe)."""

    def __init__(self, request_id: int, prompt_ids: list[int], params: SamplingParams, engine: Engine,
                 on_event: Callable[[Event], None] | None = None):
        self.id, self.prompt_ids, self.params = request_id, prompt_ids, params
        self.text, self.token_ids = "", []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.error: str | None = None  # finish_reason "error": the exception's type (its text goes to the log)
        self._engine, self._on_event = engine, on_event
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self._engine.cancel(self)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Every event in order, the last one with a finish_reason (queue.Empty after `timeout` s without one)."""
        while True:
            event = self._queue.get(timeout=timeout)
            yield event
            if event.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> Result:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return Result(self.text, list(self.token_ids), self.finish_reason, self.stop_reason, len(self.prompt_ids),
                      len(self.token_ids))

    def drain(self) -> list[Event]:
        """The events queued and not yet taken, without waiting (for a caller that steps the engine itself)."""
        events = []
        while not self._queue.empty():
            events.append(self._queue.get())
        return events

    def _emit(self, event: Event) -> None:
        self.text += event.text
        self.token_ids += event.token_ids
        self.finish_reason = event.finish_reason
        self._queue.put(event)
        if self._on_event is not None:
            self._on_event(event)
        if event.finish_reason is not None:
            self._done.set()


@dataclass
class _Sequence:
    """Engine-thread state of a request that holds a cache slot."""
    request: Request
    slot: int
    generator: torch.Generator
    decoder: IncrementalDecoder
    stops: StopStrings
    pending: list[int] = dataclasses.field(default_factory=list)  # prompt tokens not yet in the cache
    last: int = -1  # the newest token, not yet in the cache
    n_out: int = 0
    counts: torch.Tensor | None = None  # (V,) fp32 output token counts, when penalised
    seen: torch.Tensor | None = None  # (V,) bool prompt or output tokens, when penalised


# ---------------------------------------------------------------------------------------------------------------------
# the engine


def _average(old: float | None, new: float, weight: float = 0.2) -> float:
    """An exponential moving average (the first value as is)."""
    return new if old is None else (1 - weight) * old + weight * new



class Engine:
    """Continuous batching over `slots` KV-cache slots. step() belongs to one thread at a time (a lock serialises it);
    submit() and cancel() may be called from any thread."""

    def __init__(self, model, tokenizer: Tokenizer, slots: int = 8, max_len: int | None = None,
                 autocast_dtype: torch.dtype | None = None, prefix_cache_tokens: int | None = None,
                 prefill_chunk: int = 0, fused: bool = True):
        """prefix_cache_tokens: tokens of keys and values kept for reuse (None = as many as the slots hold, 0 = off);
        prefill_chunk: prompt tokens per step while others decode (0 = auto); fused=False: the model's reference
        path (today's modules, for benchmarks and tests)."""
        if prefill_chunk < 0 or (prefix_cache_tokens is not None and prefix_cache_tokens < 0):
            raise UserError("prefill_chunk and prefix_cache_tokens must be >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.vocab_size = model.config.vocab_size
        self.device = next(model.parameters()).device
        self.autocast_dtype = autocast_dtype  # the caller's precision policy (common.autocast_dtype); None = as is
        self.cache = model.new_kv_cache(slots, max_len, dtype=autocast_dtype)
        self.max_len = self.cache.max_len
        self.resumable = bool(getattr(model, "kv_cache_is_state", False))  # chunks and restored prefixes allowed
        if prefix_cache_tokens is None:
            prefix_cache_tokens = slots * self.max_len
        self.prefix = PrefixCache(self.cache, prefix_cache_tokens) if self.resumable and prefix_cache_tokens else None
        self.prefill_chunk = prefill_chunk
        self._forward_kwargs = {} if fused else {"fused": False}  # ScriptedModels take no extra keyword
        self._decode_s: float | None = None  # moving averages: one decode step, one prefill token
        self._prefill_token_s: float | None = None
        self._chunk_token_s: float | None = None  # what a prompt token adds to a decode step it rides along with
        self._last_chunk = 0  # tokens in the latest chunk: an automatic one grows at most twice as long per step
        # the clock of those averages: on CPU this thread's CPU time, which other processes preempting it do not
        # inflate (a preempted step would buy an oversized chunk); on CUDA wall time after a synchronize
        self._clock = time.thread_time if self.device.type == "cpu" else time.perf_counter
        self._fused = fused and self.resumable  # a GPT on its fused path: chunks ride along with decode steps
        self.eos_ids = (tokenizer.special_id("<|im_end|>"), tokenizer.bos_id)
        self._free = list(range(slots))  # sorted: the lowest free slot is taken, so live rows tend to be contiguous
        self._live: list[_Sequence] = []
        self._waiting: deque[Request] = deque()
        self._cancelled: set[Request] = set()
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _waiting and _cancelled
        self._step_lock = threading.Lock()
        self._wakeup = threading.Event()

    # -- any thread -----------------------------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
               on_event: Callable[[Event], None] | None = None) -> Request:
        params = params or SamplingParams()
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise UserError("the prompt is empty; give at least one token (e.g. the BOS token)")
        if len(ids) >= self.max_len:
            raise UserError(f"the prompt has {len(ids)} tokens but the context holds {self.max_len}; shorten it "
                            f"to at most {self.max_len - 1}")
        bad = [i for i in (*ids, *params.stop_token_ids) if not 0 <= i < self.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        with self._lock:
            request = Request(next(self._ids), ids, params, self, on_event)
            self._waiting.append(request)
        self._wakeup.set()
        return request

    def cancel(self, request: Request) -> None:
        """Stop `request` at the next step (its final event has finish_reason "cancelled"); no-op when done."""
        with self._lock:
            if not request.done:
                self._cancelled.add(request)
        self._wakeup.set()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_live(self) -> int:
        return len(self._live)

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def has_work(self) -> bool:
        return bool(self._live or self._waiting or self._cancelled)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Result:
        """Submit and step until this request is done (other requests advance too)."""
        request = self.submit(prompt_ids, params)
        while not request.done:
            self.step()
        return request.result()

    def serve_forever(self, stop: threading.Event, idle_wait: float = 0.1) -> None:
        """Step while there is work, else sleep until submit/cancel wakes it; return once `stop` is set."""
        while not stop.is_set():
            if self.has_work():
                try:
                    self.step()
                except Exception as e:  # outside the per-sequence isolation of step(): fail what is live, go on
                    self._fail_live(e)
            else:
                self._wakeup.wait(idle_wait)
                self._wakeup.clear()

    # -- the engine thread ----------------------------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Admit, prefill, one batched decode, sample; returns the events emitted (also sent to each request)."""
        with self._step_lock, torch.inference_mode(), self._autocast():
            events: list[Event] = []
            with self._lock:
                cancelled, self._cancelled = self._cancelled, set()
                if cancelled:
                    self._waiting = deque(r for r in self._waiting if r not in cancelled)
            for request in cancelled:  # first, so that their slots serve this step's admissions
                if request.done:  # it finished in the step before the cancel arrived
                    continue
                seq = next((s for s in self._live if s.request is request), None)
                self._finish(seq, request, Event(request.id, "", [], FINISH_CANCELLED), events)
            with self._lock:
                admitted = [self._waiting.popleft() for _ in range(min(len(self._free), len(self._waiting)))]
            decoding = any(not s.pending for s in self._live)
            for request in admitted:
                self._start(request)
            budget = self._chunk_budget() if decoding and self.resumable else None  # None: whole prompts
            prefilling = [s for s in self._live if s.pending]
            decoded = False
            if budget is not None and self._fused and prefilling:  # the first chunk rides along with the decode
                live = sorted((s for s in self._live if not s.pending), key=lambda s: s.slot)
                n = min(budget, len(prefilling[0].pending))
                self._last_chunk = n
                decoded = self._mixed_step(prefilling[0], n, live, events)
                if decoded:
                    prefilling, budget = prefilling[1:], budget - n
            for seq in prefilling:
                n = len(seq.pending) if budget is None else min(budget, len(seq.pending))
                if n == 0:
                    break
                for _, tokens in self._isolated([seq], functools.partial(self._prefill, n=n), events):
                    if tokens:  # the prompt is in: its first token
                        self._accept(seq, tokens[0], events)
                if budget is not None:
                    self._last_chunk = n
                    budget -= n
            if decoded:
                return events
            live = sorted((s for s in self._live if not s.pending), key=lambda s: s.slot)
            t0 = self._clock()
            for group, tokens in self._isolated(live, self._decode, events) if live else ():
                for seq, token in zip(group, tokens):
                    self._accept(seq, token, events)
            if live:
                self._decode_s = _average(self._decode_s, self._clock() - t0)
            return events

    def _mixed_step(self, seq: _Sequence, n: int, live: list[_Sequence], events: list[Event]) -> bool:
        """One forward for the decode step of `live` and the next n prompt tokens of `seq` (kvcache.forward_mixed);
        then sample and emit as the two separate calls would. False (nothing changed) when it raises: the caller
        runs them apart, each isolated per sequence."""
        slots = [s.slot for s in live]
        lengths = [self.cache.lengths[s] for s in (*slots, seq.slot)]
        t0 = self._clock()
        try:
            decode, chunk = forward_mixed(self.model, self.cache, [
                (torch.tensor([[s.last] for s in live], device=self.device), slots, False),
                (torch.tensor([seq.pending[:n]], device=self.device), [seq.slot], True)])  # (B, 1, V), (1, 1, V)
            tokens = self._sample(live, decode[:, -1])
        except Exception:
            for s, length in zip((*slots, seq.slot), lengths):
                self.cache.lengths[s] = length
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        # the chunk's share of the step: what it added to a decode step (at least a tenth of the step, for noise)
        elapsed = self._clock() - t0
        added = elapsed - self._decode_s if self._decode_s is not None else elapsed / 2
        self._chunk_token_s = _average(self._chunk_token_s, max(added, elapsed / 10) / n, weight=0.5)
        seq.pending = seq.pending[n:]
        for s, token in zip(live, tokens):
            self._accept(s, token, events)
        if not seq.pending:  # the prompt is in: its first token
            if self.prefix is not None:
                self.prefix.store(seq.request.prompt_ids, seq.slot)
            for _, first in self._isolated([seq], lambda group: self._sample(group, chunk[:, -1]), events):
                self._accept(seq, first[0], events)
        return True

    def _chunk_budget(self) -> int:
        """Prompt tokens to prefill in a step while others decode: prefill_chunk, or (auto) as many as add
        CHUNK_SHARE of a decode step to it, from the moving averages, at least one prefix-cache block. A chunk that
        rides along with the decode step (fused) adds its tokens' arithmetic; a separate one (the reference path)
        also costs a pass over the weights, so it is measured as a whole. A chunk is at most twice the one before:
        one noisy measurement (a small chunk's share of a step is hard to tell from the step's own noise) must not
        buy a long stall."""
        if self.prefill_chunk:
            return self.prefill_chunk
        token_s = self._chunk_token_s if self._fused else self._prefill_token_s
        if self._decode_s is None or token_s is None:
            return MIN_CHUNK
        return max(MIN_CHUNK, min(int(CHUNK_SHARE * self._decode_s / token_s), 2 * self._last_chunk))

    def _prefill(self, seqs: list[_Sequence], n: int) -> list[int]:
        """Feed the next n prompt tokens of the one sequence; its first token once the prompt is in, else []."""
        (seq,) = seqs
        t0 = self._clock()
        logits = self.model.forward_cached(torch.tensor([seq.pending[:n]], device=self.device), self.cache,
                                           [seq.slot], last_only=True, **self._forward_kwargs)  # (1, 1, vocab)
        seq.pending = seq.pending[n:]
        if seq.pending:
            if self.device.type == "cuda":
                torch.cuda.synchronize()  # time the chunk, not its launch
            self._prefill_token_s = _average(self._prefill_token_s, (self._clock() - t0) / n)
            return []
        if self.prefix is not None:
            self.prefix.store(seq.request.prompt_ids, seq.slot)
        return self._sample(seqs, logits[:, -1])

    def _decode(self, seqs: list[_Sequence]) -> list[int]:
        idx = torch.tensor([[s.last] for s in seqs], device=self.device)  # (B, 1)
        logits = self.model.forward_cached(idx, self.cache, [s.slot for s in seqs],
                                           **self._forward_kwargs)  # (B, 1, vocab)
        return self._sample(seqs, logits[:, -1])

    def _isolated(self, seqs: list[_Sequence], run: Callable[[list[_Sequence]], list[int]],
                  events: list[Event]) -> list[tuple[list[_Sequence], list[int]]]:
        """[(seqs, run(seqs))]; when that raises (a bad request, out of memory on a long prefill), each sequence is
        run alone and the ones that still raise end with finish_reason "error" (slot freed), so one request cannot
        take the others down. The cache lengths of a failed call are restored (a forward advances them last)."""
        def attempt(group: list[_Sequence]) -> list[int]:
            lengths = [self.cache.lengths[s.slot] for s in group]
            try:
                return run(group)
            except Exception:
                for s, n in zip(group, lengths):
                    self.cache.lengths[s.slot] = n
                raise

        try:
            return [(seqs, attempt(seqs))]
        except Exception as e:
            if len(seqs) == 1:
                self._fail(seqs[0], e, events)
                return []
        done = []
        for seq in seqs:
            try:
                done.append(([seq], attempt([seq])))
            except Exception as e:
                self._fail(seq, e, events)
        return done

    def _fail(self, seq: _Sequence, e: Exception, events: list[Event]) -> None:
        seq.request.error = type(e).__name__
        log(f"engine: request {seq.request.id} failed: {type(e).__name__}: {e}")
        self._finish(seq, seq.request, Event(seq.request.id, "", [], FINISH_ERROR), events)

    def _fail_live(self, e: Exception) -> None:
        """After an error outside the isolation: every live sequence ends with "error"; the engine stays usable."""
        for seq in list(self._live):
            self._fail(seq, e, [])

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _start(self, request: Request) -> _Sequence:
        params = request.params
        generator = torch.Generator()
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        seq = _Sequence(request, self._free.pop(0), generator, self.tokenizer.incremental_decoder(),
                        StopStrings(params.stop, params.include_stop_str_in_output))
        if params.penalized:
            seq.counts = torch.zeros(self.vocab_size, device=self.device)
            seq.seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            seq.seen[torch.tensor(request.prompt_ids, device=self.device)] = True
        self.cache.reset(seq.slot)
        seq.pending = list(request.prompt_ids)
        if self.prefix is not None:
            key = weights_key(self.model)
            if key != self.prefix.key:  # new weights: the cached blocks are stale
                self.prefix.clear()
                self.prefix.key = key
            seq.pending = seq.pending[self.prefix.load(request.prompt_ids, seq.slot):]
        self._live.append(seq)
        return seq

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """logits (B, vocab) fp32 of `seqs` -> one token each."""
        logits = logits.float()
        if self.tokenizer.vocab_size < logits.size(-1):  # a padded model vocabulary: never emit ids without text
            logits[:, self.tokenizer.vocab_size:] = float("-inf")
        params = [s.request.params for s in seqs]
        if not any(p.temperature > 0 or p.penalized for p in params):  # all greedy: no penalty or filter tensors
            return logits.argmax(dim=-1).tolist()
        rows = [i for i, p in enumerate(params) if p.penalized]
        if rows:
            def column(name: str) -> torch.Tensor:
                return torch.tensor([[getattr(params[i], name)] for i in rows], device=logits.device)  # (b, 1)
            logits[rows] = apply_penalties(logits[rows], torch.stack([seqs[i].counts for i in rows]),
                                           torch.stack([seqs[i].seen for i in rows]), column("presence_penalty"),
                                           column("frequency_penalty"), column("repetition_penalty"))
        tokens = logits.argmax(dim=-1)  # (B,) greedy rows keep these
        rows = [i for i, p in enumerate(params) if p.temperature > 0]
        if rows:
            temperature = torch.tensor([params[i].temperature for i in rows], device=logits.device)
            scaled = logits[rows] / temperature.unsqueeze(1)  # (b, vocab)
            if any(params[i].filtered for i in rows):
                scaled = filter_logits(
                    scaled, torch.tensor([params[i].top_k for i in rows], device=logits.device),
                    torch.tensor([params[i].top_p for i in rows], device=logits.device),
                    torch.tensor([params[i].min_p for i in rows], device=logits.device))
            uniforms = torch.cat([torch.rand(1, generator=seqs[i].generator, dtype=torch.float64) for i in rows])
            tokens[rows] = sample_tokens(scaled, uniforms.to(logits.device))
        return tokens.tolist()

    def _accept(self, seq: _Sequence, token: int, events: list[Event]) -> None:
        """Record a sampled token: stream its text, decide whether the sequence ends."""
        params, request = seq.request.params, seq.request
        seq.last, seq.n_out = token, seq.n_out + 1
        if seq.counts is not None:
            seq.counts[token] += 1
            seq.seen[token] = True
        stop_ids = params.stop_token_ids if params.ignore_eos else (*self.eos_ids, *params.stop_token_ids)
        finish, stop_reason = None, None
        if token in stop_ids:
            text = seq.stops.push(seq.decoder.flush())  # an incomplete character at the end decodes as U+FFFD
            text += seq.stops.flush()
            finish, stop_reason = FINISH_STOP, seq.stops.matched or token
        else:
            text = seq.stops.push(seq.decoder.push(token))
            if seq.stops.matched is not None:
                finish, stop_reason = FINISH_STOP, seq.stops.matched
            elif seq.n_out >= params.max_tokens or len(request.prompt_ids) + seq.n_out >= self.max_len:
                text += seq.stops.push(seq.decoder.flush())
                text += seq.stops.flush()
                finish = FINISH_STOP if seq.stops.matched is not None else FINISH_LENGTH
                stop_reason = seq.stops.matched
        event = Event(request.id, text, [token], finish)
        if finish is None:
            request._emit(event)
            events.append(event)
        else:
            request.stop_reason = stop_reason
            self._finish(seq, request, event, events)

    def _finish(self, seq: _Sequence | None, request: Request, event: Event, events: list[Event]) -> None:
        if seq is not None:
            if self.prefix is not None and event.finish_reason != FINISH_ERROR:  # keep its blocks for a next turn
                n = self.cache.lengths[seq.slot]
                self.prefix.store((request.prompt_ids + request.token_ids)[:n], seq.slot)
            self._live.remove(seq)
            self.cache.reset(seq.slot)
            bisect.insort(self._free, seq.slot)
        request._emit(event)
        events.append(event)

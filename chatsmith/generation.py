"""One HTTP request's generation: its engine sequences from admission to release, and what the reply is made of.

    gen = Generation(server, job, time.monotonic())  # job: protocol.build_job's prompts and sampling params
    gen.admit()                                      # one engine sequence per prompt, or APIError 429
    try:
        async for item in gen.events(keepalive):     # (choice index, text delta, finished), or None: keep-alive
            ...
        gen.choices[i], await gen.logprobs(i), gen.usage()  # what the reply is made of
    finally:
        gen.release()                                # cancels what still runs; idempotent

server.py's handlers drive it (a JSON reply drains `events`, a stream turns each item into an SSE chunk); this file
knows nothing of HTTP: it bridges the engine thread to the request's event loop and counts what /metrics shows.

How it is shaped:
- The bridge: each sequence's `on_event` runs on the engine thread and hands the event to the request's loop with
  `call_soon_threadsafe` into one asyncio.Queue as (index, Event); the server keeps request id -> (loop, queue) in
  `Server.pending` so a dying engine thread can wake every waiting handler (a None in the queue: a 500).
- Admission: `slots + max_queue` sequences at most in flight, n counted n times; a request larger than that alone
  gets 429 with `x-should-retry: false`. What was submitted counts in `in_flight` at once, so `release` undoes
  exactly that, whatever failed half way.
- Deadline: `--timeout` seconds from arrival, queueing included; past it `events` raises 504 and `cancel_reason`
  becomes "timeout" (else "disconnect" until the last sequence finishes), which `release` counts cancels under.
- `status` is what /metrics records when the request ends: 499 (the client left) until a handler sets the outcome.
- logprobs: after generation, prompt + completion are scored with one forward (`Server.score`) in the server's
  one-worker scorer executor, off the event loop and off the engine thread; a stop token at the end gets no entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from .protocol import APIError, Choice, Job, logprobs_body

if TYPE_CHECKING:
    from .server import Server

STATUS_CLIENT_GONE = 499  # nginx's "client closed request", for /metrics


class Generation:
    """The sequences of one HTTP request in flight: admit, iterate events until the deadline, release. `status` is
    what /metrics counts when it ends (499 until it finishes or fails otherwise)."""

    def __init__(self, server: Server, job: Job, arrived: float):
        self.server, self.job, self.arrived = server, job, arrived
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = [Choice(job.tools) for _ in job.prompts]
        self.requests: list = []
        self.cancel_reason: str | None = "disconnect"
        self.status = STATUS_CLIENT_GONE
        self.released = False

    def admit(self) -> None:
        """Submit one engine sequence per prompt, or refuse with 429; each event arrives in `queue` as (i, Event).
        Whatever was submitted counts in `in_flight` at once, so that `release` undoes exactly that."""
        s, cfg = self.server, self.server.cfg
        n, capacity = len(self.job.prompts), cfg.slots + cfg.max_queue
        if n > capacity:
            raise APIError(429, f"this request needs {n} sequences but the server holds at most {capacity}; lower n",
                           code="queue_full", type="rate_limit_error", headers={"x-should-retry": "false"})
        if s.in_flight + n > capacity:
            raise APIError(429, f"the server is busy ({s.in_flight} sequences in flight, at most {capacity}); "
                                f"retry later", code="queue_full", type="rate_limit_error",
                           headers={"retry-after": "1"})
        loop = asyncio.get_running_loop()
        try:
            for i, (prompt, params) in enumerate(zip(self.job.prompts, self.job.params)):
                def on_event(event, i=i):  # on the engine thread
                    with contextlib.suppress(RuntimeError):  # a closed loop must not kill that thread
                        loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))
                self.requests.append(s.engine.submit(prompt, params, on_event=on_event))
                s.pending[self.requests[-1].id] = (loop, self.queue)
                s.in_flight += 1
        except BaseException:
            self.release()
            raise
        s.metrics.prompt_tokens(self.usage()["prompt_tokens"])

    async def events(self, keepalive: float | None = None):
        """Yields (index, text delta, finished) per event, or None every `keepalive` s without one."""
        deadline = self.arrived + self.server.cfg.timeout
        left = len(self.requests)
        while left:
            wait = deadline - time.monotonic()
            if wait <= 0:
                self.cancel_reason = "timeout"
                raise APIError(504, f"the request did not finish within the server's {self.server.cfg.timeout:g} s "
                                    f"deadline", code="timeout", type="timeout_error",
                               headers={"x-should-retry": "false"})
            try:
                item = await asyncio.wait_for(self.queue.get(), min(wait, keepalive or wait))
            except TimeoutError:
                if keepalive and time.monotonic() < deadline:
                    yield None
                continue
            if item is None:
                raise APIError(500, self.server.error or "the engine stopped", type="server_error",
                               code="engine_error")
            i, event = item
            choice = self.choices[i]
            if event.token_ids:
                self.server.metrics.tokens(len(event.token_ids))
                if choice.first_at is None:
                    choice.first_at = time.monotonic()
                    self.server.metrics.ttft(choice.first_at - self.arrived)
            if event.finish_reason == "error":
                self.server.metrics.engine_errors()
                raise APIError(500, f"the engine failed on this request ({self.requests[i].error}); the other "
                                    f"requests go on, and the server log says why", type="server_error",
                               code="engine_error")
            delta = choice.push(event.text)
            if event.finish_reason is not None:
                left -= 1
                delta += choice.finish(self.requests[i])
            yield i, delta, event.finish_reason is not None
        self.cancel_reason = None

    def release(self) -> None:
        """The handler is done: cancel what still runs (counted under `cancel_reason`); the engine applies it at its
        next step. Idempotent; called on every path out of a request."""
        if self.released:
            return
        self.released, s = True, self.server
        running = [r for r in self.requests if not r.done]
        for r in running:
            r.cancel()
        if running and self.cancel_reason:
            s.metrics.cancelled(self.cancel_reason, len(running))
        for r in self.requests:
            s.pending.pop(r.id, None)
        s.in_flight -= len(self.requests)

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.job.prompts[::self.job.req.n])
        completion = sum(len(r.token_ids) for r in self.requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def logprobs(self, i: int) -> Any:
        """The logprobs object of choice i (chat: {"content": [...]}, completions: the legacy shape)."""
        job, request, tok = self.job, self.requests[i], self.server.tokenizer
        if job.top_logprobs is None:
            return None
        ids = list(request.token_ids)
        if ids and ids[-1] in (*self.server.engine.eos_ids,) and request.stop_reason == ids[-1]:
            ids = ids[:-1]
        prompt = list(job.prompts[i])
        scored = await asyncio.get_running_loop().run_in_executor(
            self.server.scorer, self.server.score, prompt + ids, len(prompt), job.top_logprobs) if ids else []
        return logprobs_body(job.chat, ids, scored, tok.id_bytes, job.top_logprobs,
                             len(job.echo[i]) if job.echo else 0)


__all__ = ["STATUS_CLIENT_GONE", "Generation"]

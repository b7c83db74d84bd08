"""OpenAI-compatible HTTP server on the continuous-batching engine, plus the static web UI at `/`.

    chatsmith serve                                   # the newest chat model of the newest run, on 127.0.0.1:8000
    chatsmith serve --run cpu --port 8080 --api-key s3cret --slots 8 --max-queue 64 --timeout 300
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}], "stream": true}'

    from openai import OpenAI                         # the official client works unchanged
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="s3cret")
    client.chat.completions.create(model="cpu", messages=[{"role": "user", "content": "Hi"}])

Endpoints: POST /v1/chat/completions (stream or not), POST /v1/completions, GET /v1/models, GET /health (503 while
the model loads, 200 when ready), GET /metrics (Prometheus text), and the UI's static files (chatsmith/ui) at `/`.

How it is shaped:
- One engine thread runs `Engine.serve_forever` and batches every live sequence; the event loop never decodes. A
  handler submits its sequences with an `on_event` callback that hands each event to the loop with
  `call_soon_threadsafe` into the request's asyncio.Queue. The only model work on another thread is the logprobs
  re-scoring (below), in a one-worker executor.
- Both POST endpoints share one path (body -> Job -> Generation -> JSON reply or SSE chunks); they differ only in
  how the prompt is built and how a choice is shaped.
- Admission: at most `slots + max_queue` sequences in flight (n counts n times); beyond that 429, with
  `x-should-retry: false` when the request alone exceeds the limit (retrying cannot help).
- Deadline: `--timeout` seconds per request from arrival, queueing included; then its sequences are cancelled and
  the reply is a 504 error (streaming: an `error` event, which the openai client raises as APIError).
- Disconnects: starlette cancels a streaming response when the client goes (ASGI 2.3 disconnect listener); a
  non-streaming handler watches `receive()` for `http.disconnect`. Either way the sequences are cancelled, which the
  engine applies at its next step (within one decode step); `chatsmith_cancelled_total{reason}` counts them.
- The model id is the run's name (`--model-name` overrides). `model` may be omitted; any other id is a 404.
- Tools: when a request passes `tools` (and tool_choice is not "none"), generation stops at the first
  `</tool_call>` (as in `engine.chat`), the model's `<tool_call>{json}</tool_call>` becomes `tool_calls` and
  finish_reason "tool_calls"; streamed text is held back from `<tool_call>` on. The server never runs tools: the
  client does, and sends the result back as a `tool` message. The tool definitions are not shown to the model (the
  chat template does not render them; our models know the calculator and python tools from SFT), and
  tool_choice "required" or a named function is accepted but not enforced. One call per turn.
- response_format json_object (and "text") is accepted; nothing constrains decoding, so the output is JSON only
  when the model writes JSON. json_schema is refused with 400.
- logprobs: the engine does not return them, so after generation the prompt + completion are scored with one
  forward of the model (log_softmax of the raw logits). They are the model's distribution before temperature,
  top-p and penalties (what vLLM returns by default); they equal the sampling distribution only at temperature 1
  without filters or penalties. A stop token (`<|im_end|>`) at the end gets no entry. When streaming, all logprobs
  come with the last chunk of each choice.
- Validation: pydantic models in strict mode (no coercion: "1" and true are not numbers; null means "not given")
  over a body we read ourselves (size limit; JSON NaN/Infinity refused). Every bad value is a 400 with an OpenAI
  error body whose `param` names the field and whose message says what it expects. Unknown keys are ignored (as
  vLLM does).
"""


import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import os
import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .cli import LoadConfig, load_chat_model
from .common import UserError, log
from .config import opt

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_N = 16


@dataclass(frozen=True)
class ServeConfig:
    host: str = opt("127.0.0.1", "address to bind; 0.0.0.0 exposes the server to the network")
    port: int = opt(8000, "TCP port")
    api_key: str = opt("", "require `Authorization: Bearer KEY` on /v1 and /metrics (else $CHATSMITH_API_KEY; "
                           "empty = open)")
    slots: int = opt(8, "sequences decoded together (KV-cache slots)")
    max_queue: int = opt(64, "sequences that may wait for a slot; more get 429")
    max_body_bytes: int = opt(1_000_000, "largest request body; more gets 413")
    timeout: float = opt(600.0, "per-request deadline in seconds, queueing included; then 504")
    max_tokens: int = opt(512, "default max_tokens of a chat completion (capped by what the context leaves)")
    model_name: str = opt("", "model id clients see; default: the run's name")
    keepalive: float = opt(5.0, "seconds between `: keep-alive` SSE comments while a stream waits")
    ui: bool = opt(True, "serve the web UI (chatsmith/ui) at /")


@dataclass(frozen=True)
class ServeStage:
    load: LoadConfig = LoadConfig()
    serve: ServeConfig = ServeConfig()


class APIError(Exception):
    """An error answered with the OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Metrics:
    """What /metrics shows; touched from the event loop only (the engine's gauges are read at render time)."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.cancelled: Counter[str] = Counter()  # reason -> sequences
        self.prompt_tokens = self.completion_tokens = 0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) over the last `window` seconds
        self.window = 10.0

    def tokens(self, n: int) -> None:
        now = time.monotonic()
        self.completion_tokens += n
        self.recent.append((now, n))
        while self.recent and self.recent[0][0] < now - self.window:
            self.recent.popleft()

    def ttft(self, seconds: float) -> None:
        self.ttft_sum += seconds
        self.ttft_counts[next((i for i, b in enumerate(TTFT_BUCKETS) if seconds <= b), len(TTFT_BUCKETS))] += 1

    def render(self, waiting: int, live: int, in_flight: int) -> str:
        now = time.monotonic()
        rate = sum(n for t, n in self.recent if t >= now - self.window) / self.window
        buckets, total = [], 0
        for bound, count in zip((*TTFT_BUCKETS, "+Inf"), self.ttft_counts):
            total += count
            buckets.append((f'_bucket{{le="{bound}"}}', total))
        families = [  # (name, type, help, [(suffix and labels, value)])
            ("requests_total", "counter", "HTTP requests by endpoint and status code.",
             [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())]),
            ("prompt_tokens_total", "counter", "prompt tokens admitted.", [("", self.prompt_tokens)]),
            ("completion_tokens_total", "counter", "tokens generated.", [("", self.completion_tokens)]),
            ("queue_depth", "gauge", "sequences waiting for a KV-cache slot.", [("", waiting)]),
            ("live_sequences", "gauge", "sequences holding a KV-cache slot.", [("", live)]),
            ("in_flight_sequences", "gauge", "sequences admitted and not yet released.", [("", in_flight)]),
            ("tokens_per_second", "gauge", f"completion tokens per second over the last {self.window:g} s.",
             [("", f"{rate:.3f}")]),
            ("cancelled_total", "counter", "sequences cancelled, by reason (disconnect, timeout).",
             [(f'{{reason="{r}"}}', n) for r, n in sorted(self.cancelled.items())]),
            ("time_to_first_token_seconds", "histogram", "from arrival to the first token of each sequence.",
             [*buckets, ("_sum", f"{self.ttft_sum:.6f}"), ("_count", total)]),
        ]
        lines = []
        for name, kind, help, samples in families:
            lines += [f"# HELP chatsmith_{name} {help}", f"# TYPE chatsmith_{name} {kind}"]
            lines += [f"chatsmith_{name}{suffix} {value}" for suffix, value in samples]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# request bodies: a field's description is what a 400 says it expects


def _range(kind: type, lo: float, hi: float) -> Any:
    return Annotated[kind, Field(ge=lo, le=hi)]


NonEmpty = Annotated[str, Field(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True)  # no coercion: "1" or true is not a number; unknown keys are ignored

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:  # as in the OpenAI API, a null field takes its default
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class _TextPart(_Body):
    type: Literal["text"]
    text: str


class _Message(_Body):
    role: Literal[tuple(ROLES)]
    content: str | list[_TextPart] | None = None
    tool_calls: Any = None  # checked by the chat template (ConversationError)

    def turn(self) -> dict:
        """The chat template's {role, content, tool_calls}: developer becomes system, text parts are joined."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": ROLES[self.role], "content": text} | ({"tool_calls": self.tool_calls} if self.tool_calls
                                                             else {})


class _Function(_Body):
    name: str


class _Tool(_Body):  # also a named tool_choice
    type: Literal["function"] = "function"
    function: _Function


class _Format(_Body):
    type: Literal["text", "json_object"]


class _StreamOptions(_Body):
    include_usage: bool = False


class Sampling(_Body):
    """The fields both endpoints share; max_tokens None = not given."""
    model: Any = None
    max_tokens: _range(int, 1, 2**62) | None = None
    temperature: _range(float, 0, 2) = 1.0
    top_p: _range(float, 0, 1) = 1.0
    top_k: _range(int, -1, 2**31) = 0  # -1 (vLLM's "off") = 0
    min_p: _range(float, 0, 1) = 0.0
    presence_penalty: _range(float, -2, 2) = 0.0
    frequency_penalty: _range(float, -2, 2) = 0.0
    repetition_penalty: _range(float, 0.01, 100) = 1.0
    seed: _range(int, -2**63, 2**64 - 1) | None = None
    stop: NonEmpty | Annotated[list[NonEmpty], Field(max_length=4)] = Field(
        (), description="a non-empty string or a list of at most 4 non-empty strings")
    n: _range(int, 1, MAX_N) = 1
    stream: bool = False
    stream_options: _StreamOptions | None = Field(None, description='an object like {"include_usage": true}')
    logit_bias: Annotated[dict, Field(max_length=0)] | None = Field(None, description="absent: not supported")


class ChatRequest(Sampling):
    messages: Annotated[list[_Message], Field(min_length=1)] = Field(
        description='a non-empty list of {"role": ..., "content": ...} objects; role one of '
                    f'{", ".join(ROLES)}; content a string, a list of {{"type": "text", "text": ...}} parts or null')
    max_completion_tokens: _range(int, 1, 2**62) | None = None
    tools: list[_Tool] | None = Field(None, description='a list of {"type": "function", "function": {"name": ...}}')
    tool_choice: Literal["none", "auto", "required"] | _Tool = Field(
        "auto", description='"none", "auto", "required" or {"type": "function", "function": {"name": ...}}')
    response_format: _Format | None = Field(None, description='{"type": "text"} or {"type": "json_object"}')
    logprobs: bool = False
    top_logprobs: _range(int, 0, 20) = 0


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str | list[int]] = Field(
        description=f"a string, a list of up to {MAX_N} strings, or token ids (lists of integers)")
    suffix: None = Field(None, description="absent: not supported by this server")
    best_of: int | None = None
    logprobs: _range(int, 0, 20) | None = None
    echo: bool = False


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _invalid(e: ValidationError, schema: type[BaseModel]) -> APIError:
    """The first invalid field as a 400 (its name and list index, no paths): pydantic's reason and what it expects."""
    loc = e.errors(include_url=False)[0]["loc"]
    param, field = str(loc[0]), schema.model_fields.get(str(loc[0]))
    expected = f"; {param} must be {field.description}" if field and field.description else ""
    where = param + "".join(f"[{x}]" for x in loc[1:] if isinstance(x, int))
    return _bad(param, f"invalid {where}: {e.errors(include_url=False)[0]['msg']}{expected}")


# ---------------------------------------------------------------------------------------------------------------------
# the server state (engine thread, admission count) and one request's generation: validated prompts -> choices


class Server:
    """Everything the app needs; `engine` is None until `start` (then /health turns 200)."""

    def __init__(self, cfg: ServeConfig, api_key: str = "") -> None:
        if cfg.slots < 1 or cfg.max_queue < 0 or cfg.max_body_bytes < 1 or cfg.timeout <= 0:
            raise UserError("--slots and --max-body-bytes must be >= 1, --max-queue >= 0 and --timeout > 0")
        self.cfg, self.api_key = cfg, api_key
        self.engine = self.tokenizer = self.model_id = None
        self.error: str | None = None
        self.metrics = Metrics()
        self.in_flight = 0
        self.created = int(time.time())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._scorer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chatsmith-logprobs")
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # request id -> bridge

    def start(self, engine, tokenizer, model_id: str) -> None:
        """Take the engine and run its thread (serve_forever) until `stop`."""
        self.engine, self.tokenizer, self.model_id = engine, tokenizer, model_id
        self._thread = threading.Thread(target=self._run_engine, name="chatsmith-engine", daemon=True)
        self._thread.start()

    def _run_engine(self) -> None:
        try:
            self.engine.serve_forever(self._stop)
        except Exception as e:  # a model bug: fail every waiting handler instead of leaving it hanging
            self.error = f"the engine stopped: {type(e).__name__}"
            log(f"serve: {self.error}: {e}")
            for loop, q in list(self._pending.values()):
                with contextlib.suppress(RuntimeError):  # a closed loop must not kill this thread
                    loop.call_soon_threadsafe(q.put_nowait, None)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._scorer.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.error is None

    def score(self, ids: list[int], start: int, top: int) -> list[tuple[float, list[tuple[int, float]]]]:
        """(logprob of ids[t], top-`top` (id, logprob)) for t >= start, from one forward over `ids` (blocking)."""
        import torch

        engine = self.engine
        with torch.inference_mode(), engine._autocast():
            logits = engine.model(torch.tensor([ids], device=engine.device))[0].float()  # (T, vocab)
        logp = torch.log_softmax(logits[start - 1:len(ids) - 1], dim=-1)  # (T - start, vocab): predicts ids[start:]
        target = torch.tensor(ids[start:], device=logp.device)
        chosen = logp.gather(1, target.unsqueeze(1)).squeeze(1).tolist()
        tops = logp.topk(top, dim=-1) if top else None
        return [(c, [] if tops is None else list(zip(tops.indices[t].tolist(), tops.values[t].tolist())))
                for t, c in enumerate(chosen)]


@dataclass
class Job:
    """A validated request: n sequences per prompt (prompts and echo repeated n times), and how to present them."""
    chat: bool
    req: Sampling
    prompts: list[list[int]]
    params: list  # SamplingParams per sequence
    tools: bool
    top_logprobs: int | None  # None = no logprobs
    echo: list[str] | None  # completions: prompt text per sequence when echo


def build_job(server: Server, body: dict, chat: bool) -> Job:
    """Validate a POST body into prompts and SamplingParams; every problem is an APIError."""
    from .engine import SamplingParams
    from .tokenizer import TOOL_CALL_CLOSE, ConversationError

    tok, max_len, schema = server.tokenizer, server.engine.max_len, ChatRequest if chat else CompletionRequest
    try:
        req = schema.model_validate(body)
    except ValidationError as e:
        raise _invalid(e, schema) from None
    if req.model is not None and req.model != server.model_id:
        raise APIError(404, f"The model {str(req.model)[:80]!r} does not exist; this server serves "
                            f"{server.model_id!r}", param="model", code="model_not_found")
    if req.stream_options is not None and not req.stream:
        raise _bad("stream_options", "stream_options is only allowed when stream is true")
    tools, echo, max_tokens = False, None, req.max_tokens
    if chat:
        try:
            prompts = [tok.render_for_completion([m.turn() for m in req.messages])]
        except ConversationError as e:
            raise _bad("messages", str(e)) from None
        if req.top_logprobs and not req.logprobs:
            raise _bad("top_logprobs", "top_logprobs needs logprobs: true")
        max_tokens = req.max_completion_tokens or max_tokens
        tools, top = bool(req.tools) and req.tool_choice != "none", req.top_logprobs if req.logprobs else None
    else:
        prompt = req.prompt
        prompt = [prompt] if isinstance(prompt, str) or prompt and isinstance(prompt[0], int) else prompt
        if not 0 < len(prompt) <= MAX_N or not all(isinstance(p, str) or p and all(0 <= t < tok.vocab_size for t in p)
                                                   for p in prompt):
            raise _bad("prompt", f"prompt must be a string, a list of up to {MAX_N} strings, or token ids "
                                 f"(lists of integers in [0, {tok.vocab_size - 1}])")
        prompts = [tok.encode(p, bos=True) if isinstance(p, str) else list(p) for p in prompt]
        if req.best_of not in (None, req.n):
            raise _bad("best_of", "best_of is not supported (only equal to n)")
        max_tokens, top = max_tokens or 16, req.logprobs  # 16: the OpenAI default for completions
        if req.echo:
            echo = [tok.decode(p[1:] if p[:1] == [tok.bos_id] else p) for p in prompts for _ in range(req.n)]
    if len(prompts) * req.n > MAX_N:
        raise _bad("n", f"prompts x n must be at most {MAX_N}")
    longest = max(len(p) for p in prompts)
    if max_tokens is None:
        if longest >= max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens, but the messages take "
                                f"{longest}; shorten them", param="messages", code="context_length_exceeded")
        max_tokens = min(server.cfg.max_tokens, max_len - longest)
    if longest + max_tokens > max_len:
        raise APIError(400, f"This model's maximum context length is {max_len} tokens; the prompt has {longest} "
                            f"tokens and max_tokens asks for {max_tokens} more ({longest + max_tokens} in all); "
                            f"shorten the prompt or lower max_tokens", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    try:
        params = [SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p or 1e-9, top_k=max(0, req.top_k),
            min_p=req.min_p, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty, seed=None if req.seed is None else (req.seed + j) % 2**64,
            stop=(*stop, TOOL_CALL_CLOSE) if tools else stop) for j in range(req.n)]
    except UserError as e:
        raise _bad("sampling", str(e)) from None
    return Job(chat, req, [p for p in prompts for _ in range(req.n)], params * len(prompts), tools, top, echo)


class Choice:
    """One sequence's output as it streams: text deltas, tool-call hold-back, the final message."""

    def __init__(self, tools: bool):
        from .engine import StopStrings
        from .tokenizer import TOOL_CALL_OPEN

        self.tools, self.raw, self.shown = tools, "", 0
        self.hold = StopStrings((TOOL_CALL_OPEN,)) if tools else None
        self.finish_reason: str | None = None
        self.tool_calls: list[dict] = []
        self.first_at: float | None = None

    def push(self, text: str) -> str:
        """The event's text -> what can be shown now (with tools, a trailing newline waits: a call drops it)."""
        self.raw += text
        if self.hold is not None and self.hold.matched is None:
            self.hold.push(text)
        delta = self.raw[self.shown:len(self.raw) if self.hold is None else self.hold.sent]
        if self.hold is not None and delta.endswith("\n"):
            delta = delta[:-1]
        self.shown += len(delta)
        return delta

    def finish(self, request) -> str:
        """At the end: map a tool call, return the remaining text to show."""
        from .tokenizer import TOOL_CALL_CLOSE, parse_assistant

        self.finish_reason = request.finish_reason
        if self.tools and request.stop_reason == TOOL_CALL_CLOSE:
            parsed = parse_assistant(self.raw + TOOL_CALL_CLOSE)
            if parsed["tool_calls"]:
                self.tool_calls = [{"id": "call_" + secrets.token_hex(12), "type": "function",
                                    "function": {"name": c["name"],
                                                 "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                                   for c in parsed["tool_calls"]]
                self.finish_reason = "tool_calls"
                self.raw = parsed["content"]
            else:
                self.raw += TOOL_CALL_CLOSE  # not a valid call: the text stays content
        rest = self.raw[self.shown:]
        self.shown = len(self.raw)
        return rest

    @property
    def content(self) -> str:
        return self.raw[:self.shown]


class Generation:
    """The sequences of one HTTP request in flight: admit, iterate events until the deadline, release."""

    def __init__(self, server: Server, job: Job, arrived: float):
        self.server, self.job, self.arrived = server, job, arrived
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = [Choice(job.tools) for _ in job.prompts]
        self.requests: list = []
        self.cancel_reason: str | None = "disconnect"
        self.released = False

    def admit(self) -> None:
        """Submit one engine sequence per prompt, or refuse with 429; each event arrives in `queue` as (i, Event)."""
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
        for i, (prompt, params) in enumerate(zip(self.job.prompts, self.job.params)):
            def on_event(event, i=i):  # on the engine thread
                with contextlib.suppress(RuntimeError):  # a closed loop must not kill that thread
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))
            self.requests.append(s.engine.submit(prompt, params, on_event=on_event))
            s._pending[self.requests[-1].id] = (loop, self.queue)
        s.in_flight += n
        s.metrics.prompt_tokens += self.usage()["prompt_tokens"]

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
            delta = choice.push(event.text)
            if event.finish_reason is not None:
                left -= 1
                delta += choice.finish(self.requests[i])
            yield i, delta, event.finish_reason is not None
        self.cancel_reason = None

    def release(self) -> None:
        """The handler is done: cancel what still runs (counted under `cancel_reason`); the engine applies it at its
        next step."""
        if self.released:
            return
        self.released, s = True, self.server
        running = [r for r in self.requests if not r.done]
        for r in running:
            r.cancel()
        if running and self.cancel_reason:
            s.metrics.cancelled[self.cancel_reason] += len(running)
        for r in self.requests:
            s._pending.pop(r.id, None)
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
            self.server._scorer, self.server.score, prompt + ids, len(prompt), job.top_logprobs) if ids else []

        def text(t: int) -> str:
            return tok.id_bytes(t).decode("utf-8", errors="replace")

        if job.chat:
            return {"content": [{"token": text(t), "logprob": lp, "bytes": list(tok.id_bytes(t)),
                                 "top_logprobs": [{"token": text(a), "logprob": b, "bytes": list(tok.id_bytes(a))}
                                                  for a, b in top]}
                                for t, (lp, top) in zip(ids, scored)]}
        offsets, pos = [], len(job.echo[i]) if job.echo else 0
        for t in ids:
            offsets.append(pos)
            pos += len(text(t))
        return {"tokens": [text(t) for t in ids], "token_logprobs": [lp for lp, _ in scored],
                "top_logprobs": [{text(a): b for a, b in top} for _, top in scored] if job.top_logprobs else None,
                "text_offset": offsets}


# ---------------------------------------------------------------------------------------------------------------------
# the app


def create_app(server: Server, ui_dir: Path | None = None):
    """The FastAPI app over `server` (which may still be loading)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="chatsmith", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(e: APIError, endpoint: str | None = None) -> JSONResponse:
        if endpoint:
            server.metrics.requests[endpoint, e.status] += 1
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log(f"serve: internal error {type(e).__name__}: {e}")
        return error_response(APIError(500, "internal server error", type="server_error"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        path = request.url.path
        if server.api_key and (path.startswith("/v1") or path == "/metrics"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), server.api_key.encode()):
                return error_response(APIError(401, "Incorrect or missing API key; send `Authorization: Bearer KEY`",
                                               code="invalid_api_key"), path)
        return await call_next(request)

    async def read_json(request: Request) -> dict:
        limit, declared = server.cfg.max_body_bytes, request.headers.get("content-length", "")
        body = bytearray()
        if not (declared.isdigit() and int(declared) > limit):  # else refuse without reading
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    break
        if len(body) > limit or declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is over the server's {limit}-byte limit", code="body_too_large")

        def no_constants(name: str):
            raise ValueError(name)

        try:
            data = json.loads(body, parse_constant=no_constants)  # NaN and Infinity are not JSON
        except (ValueError, RecursionError):
            raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return data

    def require_ready() -> None:
        if not server.ready:
            raise APIError(503, server.error or "the model is still loading; retry in a moment", type="server_error",
                           code="loading")

    async def handle(request: Request, chat: bool, endpoint: str):
        arrived = time.monotonic()
        try:
            require_ready()
            gen = Generation(server, build_job(server, await read_json(request), chat), arrived)
            gen.admit()
        except APIError as e:
            return error_response(e, endpoint)
        server.metrics.requests[endpoint, 200] += 1
        if gen.job.req.stream:
            return StreamingResponse(stream(gen), media_type="text/event-stream",
                                     headers={"X-Accel-Buffering": "no", "Cache-Control": "no-cache"})
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            consume = asyncio.ensure_future(_drain(gen))
            done, _ = await asyncio.wait({consume, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if consume not in done:  # the client left: release() cancels the sequences
                consume.cancel()
                return Response(status_code=499)
            consume.result()
            choices = []
            for i, c in enumerate(gen.choices):
                if chat:
                    message = {"role": "assistant", "content": c.content if (c.content or not c.tool_calls) else None}
                    shape = {"message": message | ({"tool_calls": c.tool_calls} if c.tool_calls else {})}
                else:
                    shape = {"text": (gen.job.echo[i] if gen.job.echo else "") + c.content}
                choices.append({"index": i, **shape, "logprobs": await gen.logprobs(i),
                                "finish_reason": c.finish_reason})
            return JSONResponse({**head(chat, "chat.completion"), "choices": choices, "usage": gen.usage()})
        except APIError as e:
            return error_response(e)
        finally:
            watcher.cancel()
            gen.release()

    def head(chat: bool, chat_object: str) -> dict:
        return {"id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
                "object": chat_object if chat else "text_completion", "created": int(time.time()),
                "model": server.model_id, "system_fingerprint": None}

    async def stream(gen: Generation):
        chat, usage = gen.job.chat, gen.job.req.stream_options and gen.job.req.stream_options.include_usage
        base = head(chat, "chat.completion.chunk")

        def chunk(i: int, delta: dict | str, finish: str | None = None, logprobs=None) -> str:
            choice = {"index": i, "delta" if chat else "text": delta, "logprobs": logprobs, "finish_reason": finish}
            data = {**base, "choices": [choice]} | ({"usage": None} if usage else {})
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        try:
            for i in range(len(gen.choices)):
                if chat:
                    yield chunk(i, {"role": "assistant", "content": ""})
                elif gen.job.echo:
                    yield chunk(i, gen.job.echo[i])
            async for item in gen.events(server.cfg.keepalive):
                if item is None:
                    yield ": keep-alive\n\n"
                    continue
                i, text, finished = item
                c = gen.choices[i]
                if text:
                    yield chunk(i, {"content": text} if chat else text)
                if finished:
                    delta = {"tool_calls": [{"index": k, **call} for k, call in enumerate(c.tool_calls)]} \
                        if c.tool_calls else {}
                    yield chunk(i, delta if chat else "", c.finish_reason, await gen.logprobs(i))
            if usage:
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': gen.usage()})}\n\n"
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            gen.release()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, True, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, False, "/v1/completions")

    def model_card() -> dict:
        return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "chatsmith",
                "max_model_len": server.engine.max_len}

    @app.get("/v1/models")
    async def models():
        require_ready()
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        require_ready()
        if model_id != server.model_id:
            raise APIError(404, f"The model {model_id[:80]!r} does not exist", param="model", code="model_not_found")
        return model_card()

    @app.get("/health")
    async def health():
        if server.ready:
            return {"status": "ok", "model": server.model_id}
        return JSONResponse({"status": "error" if server.error else "loading", "message": server.error},
                            status_code=503)

    @app.get("/metrics")
    async def metrics():
        engine = server.engine
        text = server.metrics.render(engine.num_waiting if engine else 0, engine.num_live if engine else 0,
                                     server.in_flight)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    ui_dir = ui_dir or Path(__file__).parent / "ui"
    if server.cfg.ui and ui_dir.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=ui_dir, html=True), name="ui")
    return app


async def _drain(gen: Generation) -> None:
    async for _ in gen.events():
        pass


async def _wait_disconnect(request) -> None:
    """Returns when the client has gone (the body is already read, so receive() only reports the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------------------------------------------------------------
# the command


def load_into(server: Server, load: LoadConfig) -> None:
    """Load the model chosen by `load` and start the engine; raises UserError when there is none."""
    from .engine import Engine

    loaded = load_chat_model(load)
    engine = Engine(loaded.model, loaded.tokenizer, slots=server.cfg.slots,
                    max_len=load.context or loaded.model.config.seq_len, autocast_dtype=loaded.autocast_dtype)
    kind = "chat model" if loaded.is_chat else "BASE model (not fine-tuned for chat)"
    log(f"serve: run {loaded.run.name}, {kind} {loaded.checkpoint.name}, context {engine.max_len}, "
        f"{server.cfg.slots} slots")
    server.start(engine, loaded.tokenizer, server.cfg.model_name or loaded.run.name)


def main(cfg: ServeStage) -> int:
    """`chatsmith serve`: bind first (so /health answers 503 while the model loads), load, serve until Ctrl-C."""
    import uvicorn

    s = cfg.serve
    server = Server(s, s.api_key or os.environ.get("CHATSMITH_API_KEY", ""))
    app = create_app(server)
    uv = uvicorn.Server(uvicorn.Config(app, host=s.host, port=s.port, log_level="warning", access_log=False,
                                       timeout_graceful_shutdown=2))
    failure: list[UserError] = []

    def load() -> None:
        try:
            load_into(server, cfg.load)
            log(f"serve: ready on http://{s.host}:{s.port}/ (model id {server.model_id!r})")
        except UserError as e:
            failure.append(e)
            server.error = str(e)
            uv.should_exit = True
        except Exception as e:  # leave the server up to say why on /health
            server.error = f"loading failed: {type(e).__name__}: {e}"
            log(f"serve: {server.error}")

    threading.Thread(target=load, name="chatsmith-load", daemon=True).start()
    try:
        uv.run()
    except SystemExit:
        raise UserError(f"could not serve on {s.host}:{s.port} (is the port in use?); pick another --port") from None
    finally:
        server.stop()
    if failure:
        raise failure[0]
    return 0


def serve_in_thread(server: Server, app=None, host: str = "127.0.0.1", port: int = 0):
    """Run uvicorn for `server` in a daemon thread on a free port; returns (uvicorn.Server, base URL). For tests and
    benchmarks; stop with `uv.should_exit = True` and join the thread (`uv.thread`)."""
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind((host, port))
    uv = uvicorn.Server(uvicorn.Config(app or create_app(server), log_level="error", access_log=False,
                                       timeout_graceful_shutdown=1))
    uv.thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    uv.thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        if time.monotonic() > deadline or not uv.thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    return uv, f"http://{host}:{sock.getsockname()[1]}"


__all__ = ["APIError", "Metrics", "ServeConfig", "ServeStage", "Server", "create_app", "load_into", "main",
           "serve_in_thread"]

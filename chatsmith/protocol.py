"""The OpenAI wire format of `chatsmith serve`: the request bodies it accepts, its error body, and the JSON it answers.

    from chatsmith.protocol import ChatRequest, invalid_body
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        raise invalid_body(e, ChatRequest) from None   # an APIError: 400, param "messages", what it expects

Nothing here touches the engine thread, the model or the HTTP framework: generation.py holds how a request is run,
server.py how it is served, this file what goes over the wire, and how a body becomes prompts and sampling
parameters (`build_job`, given a tokenizer and the context length).

How it is shaped:
- Validation: pydantic models in strict mode (no coercion: "1" and true are not numbers; null means "not given")
  over a body the server reads itself (size limit; JSON NaN/Infinity refused). Every bad value is a 400 with an
  OpenAI error body whose `param` names the field and whose message says what it expects (a field's `description`
  is that text). Unknown keys are ignored (as vLLM does).
- Errors: `APIError` carries status, OpenAI error body and extra headers; the app answers it as JSON, or as an SSE
  `data: {"error": ...}` event once a stream has started (the openai client raises that as APIError).
- Tool calls: `Choice` turns one sequence's streamed text into what is shown; with tools it holds text back from
  `<tool_call>` on, and at the end the model's `<tool_call>{json}</tool_call>` becomes `tool_calls` (arguments a
  JSON string, a fresh `call_` id) and finish_reason "tool_calls"; a call that does not parse stays content.
- Replies: chat choices carry `message` (content null when the turn is only tool calls), completions `text`; stream
  chunks carry `delta` / `text` and `"usage": null` when `stream_options.include_usage` asks for a final usage chunk.
  logprobs come in the chat shape ({"content": [{token, logprob, bytes, top_logprobs}]}) or the legacy completions
  shape (tokens, token_logprobs, top_logprobs, text_offset).
- /metrics: `Metrics` keeps the counters in its own prometheus_client registry (the field's library writes and
  escapes the exposition) with labels from fixed sets only: a path the server does not serve counts as "other".
"""

import json
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .common import UserError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_N = 16  # sequences per request (prompts x n)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CANCEL_REASONS = ("disconnect", "timeout")


class APIError(Exception):
    """An error answered with the OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_value(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def invalid_body(e: ValidationError, schema: type[BaseModel]) -> APIError:
    """The first invalid field as a 400 (its name and list index, no paths): pydantic's reason and what it expects."""
    loc = e.errors(include_url=False)[0]["loc"]
    param, field = str(loc[0]), schema.model_fields.get(str(loc[0]))
    expected = f"; {param} must be {field.description}" if field and field.description else ""
    where = param + "".join(f"[{x}]" for x in loc[1:] if isinstance(x, int))
    return invalid_value(param, f"invalid {where}: {e.errors(include_url=False)[0]['msg']}{expected}")


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
    """The fields both endpoints share; None = not given (max_tokens: what the context leaves; temperature, top_p,
    top_k, repetition_penalty: the endpoint's defaults, sampling.CHAT_DEFAULTS for chat)."""
    model: Any = None
    max_tokens: _range(int, 1, 2**62) | None = None
    temperature: _range(float, 0, 2) | None = None
    top_p: _range(float, 0, 1) | None = None
    top_k: _range(int, -1, 2**31) | None = None  # -1 (vLLM's "off") = 0
    min_p: _range(float, 0, 1) = 0.0
    presence_penalty: _range(float, -2, 2) = 0.0
    frequency_penalty: _range(float, -2, 2) = 0.0
    repetition_penalty: _range(float, 0.01, 100) | None = None
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


# ---------------------------------------------------------------------------------------------------------------------
# a body -> what to generate


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


def parse_body(body: bytes) -> dict:
    """The JSON object of a request body (NaN and Infinity refused: they are not JSON; bad UTF-8 is a 400)."""
    def no_constants(name: str):
        raise ValueError(name)

    try:
        data = json.loads(body, parse_constant=no_constants)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return data


def build_job(body: dict, chat: bool, tok, max_len: int, model_id: str, default_max_tokens: int) -> Job:
    """Validate a POST body (`parse_body`) into prompts and SamplingParams for a model with context `max_len`;
    every problem is an APIError. Blocking (tokenizes): the server runs it off its event loop."""
    from .sampling import CHAT_DEFAULTS, SamplingParams
    from .tokenizer import TOOL_CALL_CLOSE, ConversationError

    schema = ChatRequest if chat else CompletionRequest
    try:
        req = schema.model_validate(body)
    except ValidationError as e:
        raise invalid_body(e, schema) from None
    if req.model is not None and req.model != model_id:
        raise APIError(404, f"The model {str(req.model)[:80]!r} does not exist; this server serves "
                            f"{model_id!r}", param="model", code="model_not_found")
    if req.stream_options is not None and not req.stream:
        raise invalid_value("stream_options", "stream_options is only allowed when stream is true")
    tools, echo, max_tokens = False, None, req.max_tokens
    if chat:
        try:
            prompts = [tok.render_for_completion([m.turn() for m in req.messages])]
        except ConversationError as e:
            raise invalid_value("messages", str(e)) from None
        if req.top_logprobs and not req.logprobs:
            raise invalid_value("top_logprobs", "top_logprobs needs logprobs: true")
        max_tokens = req.max_completion_tokens or max_tokens
        tools, top = bool(req.tools) and req.tool_choice != "none", req.top_logprobs if req.logprobs else None
    else:
        prompt = req.prompt
        prompt = [prompt] if isinstance(prompt, str) or prompt and isinstance(prompt[0], int) else prompt
        if not 0 < len(prompt) <= MAX_N or not all(isinstance(p, str) or p and all(0 <= t < tok.vocab_size for t in p)
                                                   for p in prompt):
            raise invalid_value("prompt", f"prompt must be a string, a list of up to {MAX_N} strings, or token ids "
                                 f"(lists of integers in [0, {tok.vocab_size - 1}])")
        prompts = [tok.encode(p, bos=True) if isinstance(p, str) else list(p) for p in prompt]
        if req.best_of not in (None, req.n):
            raise invalid_value("best_of", "best_of is not supported (only equal to n)")
        max_tokens, top = max_tokens or 16, req.logprobs  # 16: the OpenAI default for completions
        if req.echo:
            echo = [tok.decode(p[1:] if p[:1] == [tok.bos_id] else p) for p in prompts for _ in range(req.n)]
    if len(prompts) * req.n > MAX_N:
        raise invalid_value("n", f"prompts x n must be at most {MAX_N}")
    longest = max(len(p) for p in prompts)
    if max_tokens is None:
        if longest >= max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens, but the messages take "
                                f"{longest}; shorten them", param="messages", code="context_length_exceeded")
        max_tokens = min(default_max_tokens, max_len - longest)
    if longest + max_tokens > max_len:
        raise APIError(400, f"This model's maximum context length is {max_len} tokens; the prompt has {longest} "
                            f"tokens and max_tokens asks for {max_tokens} more ({longest + max_tokens} in all); "
                            f"shorten the prompt or lower max_tokens", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    base = CHAT_DEFAULTS if chat else SamplingParams()  # for what the request leaves out

    def given(name: str):
        value = getattr(req, name)
        return getattr(base, name) if value is None else value

    try:
        params = [SamplingParams(
            max_tokens=max_tokens, temperature=given("temperature"), top_p=given("top_p") or 1e-9,
            top_k=max(0, given("top_k")), min_p=req.min_p, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, repetition_penalty=given("repetition_penalty"),
            seed=None if req.seed is None else (req.seed + j) % 2**64,
            stop=(*stop, TOOL_CALL_CLOSE) if tools else stop) for j in range(req.n)]
    except UserError as e:  # a range the request models do not check
        raise invalid_value("sampling", str(e)) from None
    return Job(chat, req, [p for p in prompts for _ in range(req.n)], params * len(prompts), tools, top, echo)


def tokenize_body(body: dict, tok, max_len: int) -> dict:
    """vLLM's /tokenize: {"messages": [...]} (rendered as a chat prompt) or {"prompt": "..."} -> its tokens."""
    from .tokenizer import ConversationError

    chat = "messages" in body
    schema = ChatRequest if chat else CompletionRequest
    try:
        req = schema.model_validate(body if chat else {**body, "prompt": body.get("prompt", "")})
    except ValidationError as e:
        raise invalid_body(e, schema) from None
    if chat:
        try:
            ids = tok.render_for_completion([m.turn() for m in req.messages])
        except ConversationError as e:
            raise invalid_value("messages", str(e)) from None
    elif isinstance(req.prompt, str):
        ids = tok.encode(req.prompt, bos=True)
    else:
        raise invalid_value("prompt", "prompt must be a string")
    return {"count": len(ids), "max_model_len": max_len, "tokens": ids}


# ---------------------------------------------------------------------------------------------------------------------
# replies


class Choice:
    """One sequence's output as it streams: text deltas, tool-call hold-back, the final message."""

    def __init__(self, tools: bool):
        from .sampling import StopStrings
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


def reply_head(chat: bool, chat_object: str, model_id: str) -> dict:
    """The fields every reply and chunk starts with (a fresh id); completions' object is always "text_completion"."""
    return {"id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
            "object": chat_object if chat else "text_completion", "created": int(time.time()), "model": model_id,
            "system_fingerprint": None}


def reply_choice(chat: bool, index: int, text: str, tool_calls: list[dict], logprobs: Any,
                 finish_reason: str | None) -> dict:
    """One choice of a non-streaming reply (completions: `text` already includes any echoed prompt)."""
    if chat:
        message = {"role": "assistant", "content": text if (text or not tool_calls) else None}
        shape = {"message": message | ({"tool_calls": tool_calls} if tool_calls else {})}
    else:
        shape = {"text": text}
    return {"index": index, **shape, "logprobs": logprobs, "finish_reason": finish_reason}


def sse(data: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def stream_chunk(head: dict, chat: bool, index: int, delta: dict | str, finish_reason: str | None = None,
                 logprobs: Any = None, usage: bool = False) -> str:
    """One choice's chunk as an SSE event; `usage` adds "usage": null (a final chunk will carry it)."""
    choice = {"index": index, "delta" if chat else "text": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return sse({**head, "choices": [choice]} | ({"usage": None} if usage else {}))


def logprobs_body(chat: bool, ids: list[int], scored: list[tuple[float, list[tuple[int, float]]]],
                  id_bytes: Callable[[int], bytes], top_logprobs: int, text_offset: int = 0) -> dict:
    """The logprobs object of one choice from (logprob, top (id, logprob)) per generated token; `text_offset` is
    where the completion starts in the returned text (the echoed prompt's length)."""

    def text(t: int) -> str:
        return id_bytes(t).decode("utf-8", errors="replace")

    if chat:
        return {"content": [{"token": text(t), "logprob": lp, "bytes": list(id_bytes(t)),
                             "top_logprobs": [{"token": text(a), "logprob": b, "bytes": list(id_bytes(a))}
                                              for a, b in top]}
                            for t, (lp, top) in zip(ids, scored)]}
    offsets, pos = [], text_offset
    for t in ids:
        offsets.append(pos)
        pos += len(text(t))
    return {"tokens": [text(t) for t in ids], "token_logprobs": [lp for lp, _ in scored],
            "top_logprobs": [{text(a): b for a, b in top} for _, top in scored] if top_logprobs else None,
            "text_offset": offsets}


# ---------------------------------------------------------------------------------------------------------------------
# /metrics (Prometheus text, written by prometheus_client)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/tools", "/tokenize", "/health", "/metrics")


def endpoint_label(path: str) -> str:
    """The metrics label of a request path: one of ENDPOINTS (a model or tool id folds into its list), else "other".
    A fixed set, so that no client can add label values (or forge sample lines) by choosing a path."""
    for endpoint in ENDPOINTS:
        if path == endpoint or path.startswith(endpoint + "/") and endpoint in ("/v1/models", "/v1/tools"):
            return endpoint
    return "other"


class Metrics:
    """What /metrics shows, in a registry of its own (no process-wide state); touched from the event loop only. The
    engine's gauges are set when rendering. Every label value comes from a fixed set (`endpoint_label`, status codes,
    cancel reasons), and prometheus_client escapes them anyway."""

    def __init__(self, window: float = 10.0) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry(auto_describe=True)
        self._requests = Counter("chatsmith_requests", "HTTP requests by endpoint and status code (a stream counts "
                                 "when it ends).", ["endpoint", "status"], registry=r)
        self._prompt = Counter("chatsmith_prompt_tokens", "prompt tokens admitted.", registry=r)
        self._completion = Counter("chatsmith_completion_tokens", "tokens generated.", registry=r)
        self._cancelled = Counter("chatsmith_cancelled", "sequences cancelled, by reason (disconnect, timeout).",
                                  ["reason"], registry=r)
        self._errors = Counter("chatsmith_engine_errors", "sequences failed by an engine error (the engine went on).",
                               registry=r)
        self._ttft = Histogram("chatsmith_time_to_first_token_seconds", "from arrival to the first token of each "
                               "sequence.", buckets=TTFT_BUCKETS, registry=r)
        self._gauges = {name: Gauge(f"chatsmith_{name}", help, registry=r) for name, help in (
            ("queue_depth", "sequences waiting for a KV-cache slot."),
            ("live_sequences", "sequences holding a KV-cache slot."),
            ("in_flight_sequences", "sequences admitted and not yet released."),
            ("tokens_per_second", f"completion tokens per second over the last {window:g} s."))}
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) over the last `window` seconds
        self.window = window

    def request(self, endpoint: str, status: int) -> None:
        """Count one answered request; `endpoint` is a path (folded by `endpoint_label`)."""
        self._requests.labels(endpoint_label(endpoint), str(int(status))).inc()

    def cancelled(self, reason: str, n: int = 1) -> None:
        self._cancelled.labels(reason if reason in CANCEL_REASONS else "other").inc(n)

    def engine_errors(self, n: int = 1) -> None:
        self._errors.inc(n)

    def prompt_tokens(self, n: int) -> None:
        self._prompt.inc(n)

    def tokens(self, n: int) -> None:
        now = time.monotonic()
        self._completion.inc(n)
        self.recent.append((now, n))
        while self.recent and self.recent[0][0] < now - self.window:
            self.recent.popleft()

    def ttft(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def render(self, waiting: int, live: int, in_flight: int) -> bytes:
        """The exposition in Prometheus text format 0.0.4."""
        from prometheus_client import generate_latest

        now = time.monotonic()
        rate = sum(n for t, n in self.recent if t >= now - self.window) / self.window
        for name, value in (("queue_depth", waiting), ("live_sequences", live), ("in_flight_sequences", in_flight),
                            ("tokens_per_second", rate)):
            self._gauges[name].set(value)
        return generate_latest(self.registry)


__all__ = ["CANCEL_REASONS", "ENDPOINTS", "MAX_N", "ROLES", "TTFT_BUCKETS", "APIError", "ChatRequest", "Choice",
           "CompletionRequest", "Job", "Metrics", "Sampling", "build_job", "endpoint_label", "invalid_body",
           "invalid_value", "logprobs_body", "parse_body", "reply_choice", "reply_head", "sse", "stream_chunk",
           "tokenize_body"]

"""OpenAI-compatible HTTP server on the continuous-batching engine, plus the static web UI at `/`.

    chatsmith serve                                   # the newest chat model of the newest run, on 127.0.0.1:8000
    chatsmith serve --run cpu --port 8080 --api-key s3cret --slots 8 --max-queue 64 --timeout 300
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}], "stream": true}'

    from openai import OpenAI                         # the official client works unchanged
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="s3cret")
    client.chat.completions.create(model="cpu", messages=[{"role": "user", "content": "Hi"}])

Endpoints: POST /v1/chat/completions (stream or not), POST /v1/completions, GET /v1/models (with `max_model_len`,
as vLLM, and the chat sampling defaults), GET /v1/tools and POST /v1/tools/{name} (the tools this server runs for
the web UI: the calculator only), POST /tokenize (vLLM's: a chat prompt's token count, so the UI can keep a
conversation inside the context), GET /health (503 while the model loads, 200 when ready), GET /metrics
(Prometheus text), and the UI's static files (chatsmith/ui) at `/`.

How it is shaped:
- One engine thread runs `Engine.serve_forever` and batches every live sequence; the event loop never decodes. A
  handler submits its sequences with an `on_event` callback that hands each event to the loop with
  `call_soon_threadsafe` into the request's asyncio.Queue. The only model work on another thread is the logprobs
  re-scoring (below), in a one-worker executor.
- Both POST endpoints share one path (body -> Job -> `Generation` -> JSON reply or SSE chunks); they differ only in
  how the prompt is built and how a choice is shaped. The body is read with a deadline (`--body-timeout`, then 408:
  a slow-loris client cannot hold a handler forever); JSON parsing, validation and tokenizing (up to
  `--max-body-bytes`) run in a small thread pool, off the event loop.
- Defaults: a chat request that leaves out temperature, top_p, top_k or repetition_penalty gets sampling.CHAT_DEFAULTS
  (what `chatsmith chat` uses; vLLM likewise applies a model's generation config), a completions request OpenAI's
  neutral ones. Without max_tokens a reply gets min(--max-tokens, what the context leaves after the prompt).
- Admission: at most `slots + max_queue` sequences in flight (n counts n times); beyond that 429, with
  `x-should-retry: false` when the request alone exceeds the limit (retrying cannot help).
- Deadline: `--timeout` seconds per request from arrival, queueing included; then its sequences are cancelled and
  the reply is a 504 error (streaming: an `error` event, which the openai client raises as APIError).
- Disconnects: starlette cancels a streaming response when the client goes (ASGI 2.3 disconnect listener); a
  non-streaming handler watches `receive()` for `http.disconnect`; the engine applies the cancel at its next step.
  The slot is released around the whole streaming response (`_Stream`), not in its generator: a client that leaves
  before the first chunk never starts the generator, whose `finally` would then never run. The API key is checked
  by a plain ASGI wrapper (`_guard`), so no middleware task sits between the response and the client.
- Faults: a sequence whose engine step raises ends with finish_reason "error" (engine.py isolates it): a 500 (or an
  SSE error event) for its request, nobody else. Clients never see exception text (paths): the log has it.
- /metrics: each request counted once, when it ends, with its final status (a stream past the deadline is a 504,
  one whose client left a 499); labels from fixed sets (protocol.endpoint_label).
- The model id is the run's name (`--model-name` overrides). `model` may be omitted; any other id is a 404.
- Tools: when a request passes `tools` (and tool_choice is not "none"), generation stops at the first
  `</tool_call>` (as in `turns.chat`), the model's `<tool_call>{json}</tool_call>` becomes `tool_calls` and
  finish_reason "tool_calls"; streamed text is held back from `<tool_call>` on. The chat endpoints never run tools:
  the client does, and sends the result back as a `tool` message. The tool definitions are not shown to the model (the
  chat template does not render them; our models know the calculator and python tools from SFT), and
  tool_choice "required" or a named function is accepted but not enforced. One call per turn. For the web UI (which
  cannot compute anything itself) `POST /v1/tools/calculator` runs the calculator of tools.py; model-written Python
  runs for an HTTP client only with `--allow-python` (`POST /v1/tools/python`, in the bubblewrap sandbox).
- response_format json_object (and "text") is accepted; nothing constrains decoding, so the output is JSON only
  when the model writes JSON. json_schema is refused with 400.
- logprobs: after generation the prompt + completion are scored with one forward (log_softmax of the raw logits):
  the model's distribution before temperature, filters and penalties (vLLM's default). A stop token at the end gets
  no entry; when streaming, all logprobs come with the last chunk of each choice.
- The wire format lives in protocol.py (request models and their 400s, body -> Job, error, reply and chunk shapes,
  `Choice`, the /metrics registry); one request's run on the engine (admission, deadline, events, release,
  logprobs) in generation.py; this file reads bodies, holds the server state and serves the replies.
"""


import asyncio
import concurrent.futures
import contextlib
import hmac
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import LoadConfig, load_model
from .common import UserError, log
from .config import opt
from .generation import STATUS_CLIENT_GONE, Generation
from .protocol import (
    APIError,
    Job,
    Metrics,
    build_job,
    invalid_value,
    parse_body,
    reply_choice,
    reply_head,
    sse,
    stream_chunk,
    tokenize_body,
)

WEB_TOOLS = ("calculator",)  # the tools of tools.py that /v1/tools runs for a client (never model-written code)


@dataclass(frozen=True)
class ServeConfig:
    host: str = opt("127.0.0.1", "address to bind; 0.0.0.0 exposes the server to the network")
    port: int = opt(8000, "TCP port", min=0, max=65535)
    api_key: str = opt("", "require `Authorization: Bearer KEY` on /v1, /tokenize and /metrics (else "
                           "$CHATSMITH_API_KEY; empty = open)")
    slots: int = opt(8, "sequences decoded together (KV-cache slots)", min=1, max=4096)
    max_queue: int = opt(64, "sequences that may wait for a slot; more get 429", min=0, max=1_000_000)
    max_body_bytes: int = opt(1_000_000, "largest request body; more gets 413", min=1, max=1 << 30)
    body_timeout: float = opt(10.0, "seconds a client may take to send its request body; then 408", min=0.001,
                              max=3600)
    timeout: float = opt(600.0, "per-request deadline in seconds, queueing included; then 504", min=0.001,
                         max=86400 * 7)
    max_tokens: int = opt(512, "default max_tokens of a chat completion (capped by what the context leaves)", min=1,
                          max=1 << 30)
    model_name: str = opt("", "model id clients see; default: the run's name")
    keepalive: float = opt(5.0, "seconds between `: keep-alive` SSE comments while a stream waits", min=0.001,
                           max=3600)
    ui: bool = opt(True, "serve the web UI (chatsmith/ui) at /")
    allow_python: bool = opt(False, "also run the python tool for /v1/tools clients (the web UI), inside the "
                             "bubblewrap sandbox (chatsmith/sandbox.py); needs bwrap")


@dataclass(frozen=True)
class ServeStage:
    load: LoadConfig = LoadConfig()
    serve: ServeConfig = ServeConfig()


def web_tools(cfg: ServeConfig) -> tuple[str, ...]:
    """The tools /v1/tools runs for a client: WEB_TOOLS, and python (sandboxed) with --allow-python."""
    return (*WEB_TOOLS, "python") if cfg.allow_python else WEB_TOOLS


# ---------------------------------------------------------------------------------------------------------------------
# the server state: engine thread, admission count, the bridges to waiting handlers, logprobs scoring


class Server:
    """Everything the app needs; `engine` is None until `start` (then /health turns 200). `error` is what clients
    see when the server cannot serve: words only, never an exception's text (it may hold absolute paths).
    `pending` (request id -> the handler's loop and queue) and `scorer` (the logprobs executor) serve
    generation.Generation."""

    def __init__(self, cfg: ServeConfig, api_key: str = "") -> None:
        if cfg.slots < 1 or cfg.max_queue < 0 or cfg.max_body_bytes < 1 or cfg.timeout <= 0 or cfg.body_timeout <= 0:
            raise UserError("--slots and --max-body-bytes must be >= 1, --max-queue >= 0, --timeout and "
                            "--body-timeout > 0")
        self.cfg, self.api_key = cfg, api_key
        self.engine = self.tokenizer = self.model_id = None
        self.error: str | None = None
        self.metrics = Metrics()
        self.in_flight = 0
        self.created = int(time.time())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.scorer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chatsmith-logprobs")
        self.workers = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="chatsmith-parse")  # off the loop
        self.pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # request id -> bridge

    def start(self, engine, tokenizer, model_id: str) -> None:
        """Take the engine and run its thread (serve_forever) until `stop`."""
        self.engine, self.tokenizer, self.model_id = engine, tokenizer, model_id
        self._thread = threading.Thread(target=self._run_engine, name="chatsmith-engine", daemon=True)
        self._thread.start()

    def fail(self, what: str, e: BaseException | None) -> None:
        """Stop serving because `what` failed: the log gets the exception (None: the caller reports it), clients
        only `what`."""
        self.error = f"{what}; the server log says why"
        if e is not None:
            log(f"serve: {what}: {type(e).__name__}: {e}")

    def _run_engine(self) -> None:
        try:
            self.engine.serve_forever(self._stop)
        except Exception as e:  # serve_forever isolates step errors; this is a last resort: fail every waiting handler
            self.fail("the engine stopped", e)
            for loop, q in list(self.pending.values()):
                with contextlib.suppress(RuntimeError):  # a closed loop must not kill this thread
                    loop.call_soon_threadsafe(q.put_nowait, None)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.scorer.shutdown(wait=False, cancel_futures=True)
        self.workers.shutdown(wait=False, cancel_futures=True)

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


# ---------------------------------------------------------------------------------------------------------------------
# the app


def _guard(app, server: Server):
    """Pure ASGI middleware: the API key on /v1 and /metrics (a 401 is counted under a fixed endpoint label)."""
    from fastapi.responses import JSONResponse

    async def guarded(scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if server.api_key and (path.startswith("/v1") or path in ("/metrics", "/tokenize")):
            given = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
            token = given[7:] if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode("utf-8", "replace"), server.api_key.encode()):
                e = APIError(401, "Incorrect or missing API key; send `Authorization: Bearer KEY`",
                             code="invalid_api_key")
                server.metrics.request(path, e.status)
                await JSONResponse(e.body(), status_code=e.status)(scope, receive, send)
                return
        await app(scope, receive, send)

    return guarded


def create_app(server: Server, ui_dir: Path | None = None):
    """The ASGI app over `server` (which may still be loading): FastAPI behind the API-key guard."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    app = FastAPI(title="chatsmith", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(e: APIError, endpoint: str | None = None) -> JSONResponse:
        if endpoint:
            server.metrics.request(endpoint, e.status)
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

    async def read_body(request: Request) -> bytes:
        """The body, at most `max_body_bytes` (413) within `body_timeout` seconds (408)."""
        limit, declared = server.cfg.max_body_bytes, request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:  # refuse without reading
            raise APIError(413, f"the request body is over the server's {limit}-byte limit", code="body_too_large")
        body = bytearray()

        async def read() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limit:
                    raise APIError(413, f"the request body is over the server's {limit}-byte limit",
                                   code="body_too_large")

        try:
            await asyncio.wait_for(read(), server.cfg.body_timeout)
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {server.cfg.body_timeout:g} s",
                           code="body_timeout", headers={"connection": "close"}) from None
        return bytes(body)

    def require_ready() -> None:
        if not server.ready:
            raise APIError(503, server.error or "the model is still loading; retry in a moment", type="server_error",
                           code="loading")

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(server.workers, fn, *args)

    def prepare(raw: bytes, chat: bool) -> Job:
        return build_job(parse_body(raw), chat, server.tokenizer, server.engine.max_len, server.model_id,
                         server.cfg.max_tokens)

    async def handle(request: Request, chat: bool, endpoint: str):
        arrived = time.monotonic()
        try:
            require_ready()
            gen = Generation(server, await off_loop(prepare, await read_body(request), chat), arrived)
            gen.admit()
        except APIError as e:
            return error_response(e, endpoint)
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            server.metrics.request(endpoint, STATUS_CLIENT_GONE)
            return Response(status_code=STATUS_CLIENT_GONE)
        if gen.job.req.stream:
            return _Stream(gen, endpoint, stream(gen), media_type="text/event-stream",
                           headers={"X-Accel-Buffering": "no", "Cache-Control": "no-cache"})
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            consume = asyncio.ensure_future(_drain(gen))
            done, _ = await asyncio.wait({consume, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if consume not in done:  # the client left: release() cancels the sequences
                consume.cancel()
                return Response(status_code=STATUS_CLIENT_GONE)
            consume.result()
            echo = gen.job.echo or [""] * len(gen.choices)
            choices = [reply_choice(chat, i, c.content if chat else echo[i] + c.content, c.tool_calls,
                                    await gen.logprobs(i), c.finish_reason) for i, c in enumerate(gen.choices)]
            gen.status = 200
            return JSONResponse({**reply_head(chat, "chat.completion", server.model_id), "choices": choices,
                                 "usage": gen.usage()})
        except APIError as e:
            gen.status = e.status
            return error_response(e)
        finally:
            watcher.cancel()
            gen.release()
            server.metrics.request(endpoint, gen.status)

    async def stream(gen: Generation):
        chat, usage = gen.job.chat, gen.job.req.stream_options and gen.job.req.stream_options.include_usage
        base = reply_head(chat, "chat.completion.chunk", server.model_id)

        def chunk(i: int, delta: dict | str, finish: str | None = None, logprobs=None) -> str:
            return stream_chunk(base, chat, i, delta, finish, logprobs, usage)

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
                yield sse({**base, "choices": [], "usage": gen.usage()})
            gen.status = 200
            yield "data: [DONE]\n\n"
        except APIError as e:
            gen.status = e.status
            yield sse(e.body())
        finally:
            gen.release()

    class _Stream(StreamingResponse):
        """A streaming reply that releases its generation however the response ends, and counts it then."""

        def __init__(self, gen: Generation, endpoint: str, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.gen, self.endpoint = gen, endpoint

        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.gen.release()
                server.metrics.request(self.endpoint, self.gen.status)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, True, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, False, "/v1/completions")

    def model_card() -> dict:
        from .sampling import CHAT_DEFAULTS

        sampling = {k: getattr(CHAT_DEFAULTS, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty")}
        return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "chatsmith",
                "max_model_len": server.engine.max_len, "sampling_defaults": sampling}

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

    @app.post("/tokenize")
    async def tokenize(request: Request):
        try:
            require_ready()
            raw = await read_body(request)
            reply = await off_loop(lambda: tokenize_body(parse_body(raw), server.tokenizer, server.engine.max_len))
        except APIError as e:
            return error_response(e, "/tokenize")
        server.metrics.request("/tokenize", 200)
        return reply

    @app.get("/v1/tools")
    async def tools_list():
        from .tools import TOOLS

        return {"object": "list", "data": [TOOLS[name].to_openai() for name in web_tools(server.cfg)]}

    @app.post("/v1/tools/{name}")
    async def tools_run(name: str, request: Request):
        """Run one of WEB_TOOLS: {"arguments": {...} or its JSON text} -> {"content": the tool turn's text}."""
        from .tools import run_tool

        try:
            if name not in web_tools(server.cfg):
                raise APIError(404, f"this server runs no tool {name[:40]!r}; GET /v1/tools lists them",
                               code="tool_not_found")
            body = await off_loop(parse_body, await read_body(request))
            arguments = body.get("arguments", {})
            if not isinstance(arguments, dict | str):
                raise invalid_value("arguments", "arguments must be a JSON object or its text")
            python = server.cfg.allow_python
            content = await off_loop(lambda: run_tool(name, arguments, allow_python=python))
        except APIError as e:
            return error_response(e, "/v1/tools")
        server.metrics.request("/v1/tools", 200)
        return {"content": content}

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
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    ui_dir = ui_dir or Path(__file__).parent / "ui"
    if server.cfg.ui and ui_dir.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=ui_dir, html=True), name="ui")
    return _guard(app, server)


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

    loaded = load_model(load)
    engine = Engine(loaded.model, loaded.tokenizer, slots=server.cfg.slots,
                    max_len=load.context or loaded.model.config.seq_len, autocast_dtype=loaded.autocast_dtype)
    kind = "chat model" if loaded.is_chat else "BASE model (not fine-tuned for chat)"
    log(f"serve: run {loaded.run.name}, {kind} {loaded.checkpoint.name}, context {engine.max_len}, "
        f"{server.cfg.slots} slots")
    server.start(engine, loaded.tokenizer, server.cfg.model_name or loaded.run.name)


def load_or_fail(server: Server, load: LoadConfig) -> UserError | None:
    """`load_into`, for the loading thread: a UserError is returned (the command ends with it); any other failure
    leaves the server up to answer 503 with words on /health (the exception text only in the log)."""
    try:
        load_into(server, load)
    except UserError as e:
        server.fail("no model to serve", None)  # the command ends with `e`: one sentence, said once
        return e
    except Exception as e:
        server.fail("loading the model failed", e)
    return None


def main(cfg: ServeStage) -> int:
    """`chatsmith serve`: bind first (so /health answers 503 while the model loads), load, serve until Ctrl-C."""
    import uvicorn

    s = cfg.serve
    if s.allow_python:
        from .sandbox import check_sandbox

        check_sandbox()  # one sentence saying how to install bubblewrap, before anything starts
    server = Server(s, s.api_key or os.environ.get("CHATSMITH_API_KEY", ""))
    app = create_app(server)
    uv = uvicorn.Server(uvicorn.Config(app, host=s.host, port=s.port, log_level="warning", access_log=False,
                                       timeout_graceful_shutdown=2))
    failure: list[UserError] = []

    def load() -> None:
        error = load_or_fail(server, cfg.load)
        if error is not None:
            failure.append(error)
            uv.should_exit = True
        elif server.ready:
            log(f"serve: ready on http://{s.host}:{s.port}/ (model id {server.model_id!r})")

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


__all__ = ["WEB_TOOLS", "ServeConfig", "ServeStage", "Server", "create_app", "load_into", "load_or_fail", "main",
           "serve_in_thread"]

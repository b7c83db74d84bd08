"""Hostile clients and faults against a real server on loopback: nothing leaks, nothing stalls, nobody else suffers.

    python -m pytest -q tests/test_hostile.py

The server is the real app under uvicorn in a thread (`serve_in_thread`) over the scripted model of test_server.py
(one-hot logits that spell a fixed reply per prompt), so every well-formed reply is known exactly. A `FaultyModel`
raises inside an engine step for two chosen prompts: one in its prefill, one in a batched decode after a few tokens.
Hostile clients are raw sockets (so they can hang up at any byte) or httpx; every loop is bounded in count and time,
and every address is 127.0.0.1.

What each test pins down (each failed on the code before the fix):
- test_hostile_clients_leave_nothing_behind: the mix below, concurrently with well-formed requests; afterwards
  in_flight and the engine's live and waiting sequences are 0, every well-formed reply is exact, none got a 5xx, and
  /metrics parses with prometheus_client's parser and holds only fixed labels.
- test_capacity_is_released_when_the_client_leaves_before_the_first_chunk: the leak window (driven at the ASGI level,
  where the disconnect can be placed before the first chunk deterministically).
- test_an_engine_error_fails_only_its_own_request: per-request isolation in engine.step.
- test_slow_body_gets_408_and_the_loop_keeps_serving, test_bodies_are_parsed_off_the_event_loop,
  test_streamed_deadline_is_counted_as_504, test_health_and_503_never_show_exception_text,
  test_forged_metric_labels_cannot_write_samples.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from test_server import USER, ScriptedModel, metric

from chatsmith.checkpoint import LoadConfig
from chatsmith.engine import FINISH_ERROR, Engine
from chatsmith.protocol import ENDPOINTS
from chatsmith.sampling import SamplingParams
from chatsmith.server import ServeConfig, Server, create_app, load_or_fail, serve_in_thread
from chatsmith.tokenizer import Tokenizer

KEY = "s3cret"
AUTH = {"authorization": f"Bearer {KEY}"}
PREFILL_BOOM, DECODE_BOOM = "boom in the prefill", "boom in the decode"
FORGED = "/v1/x%22,status=%22200%22%7D%201e9%20%23"  # decodes to: /v1/x",status="200"} 1e9 #


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    from test_cli_chat import TEXT

    return Tokenizer.train([TEXT * 3] * 20, 300, show_progress=False)


def reply_for(k: int) -> str:
    return f"Reply number {k}, all of it."


class FaultyModel(ScriptedModel):
    """ScriptedModel that raises (as a CUDA OOM would, with a path in its text) in the prefill of one prompt and in
    any decode that includes the slot of another once it has written 3 tokens."""

    def __init__(self, tok: Tokenizer, script, **kwargs):
        super().__init__(tok.vocab_size, script, **kwargs)
        self.prefill_boom = tuple(tok.render_for_completion([{"role": "user", "content": PREFILL_BOOM}]))
        self.decode_boom = tuple(tok.render_for_completion([{"role": "user", "content": DECODE_BOOM}]))
        self.raised = 0

    def forward_cached(self, idx, cache, slots, last_only=False):
        for row, slot in enumerate(slots):
            fresh = cache.lengths[slot] == 0
            if fresh and tuple(idx[row].tolist()) == self.prefill_boom or not fresh and \
                    self.prompt_of.get(slot) == self.decode_boom and cache.lengths[slot] > len(self.decode_boom) + 2:
                self.raised += 1
                raise RuntimeError("out of memory at /home/someone/secret/weights.safetensors")
        return super().forward_cached(idx, cache, slots, last_only)


def make_script(tok: Tokenizer):
    """prompt ids -> reply ids: "Reply number k" for a user message "question k", a long reply for anything else."""
    known = {tuple(tok.render_for_completion([{"role": "user", "content": f"question {k}"}])): tok.encode(reply_for(k))
             for k in range(64)}
    filler = tok.encode("and so on " * 60)
    return lambda prompt: known.get(tuple(prompt), filler)


@pytest.fixture
def hostile(tok):
    """A real server (api key set, short body timeout) over FaultyModel; stopped after the test."""
    started = []

    def make(**cfg):
        model = FaultyModel(tok, make_script(tok), delay=0.002)
        server = Server(ServeConfig(**{"slots": 4, "max_queue": 40, "body_timeout": 2.0, "timeout": 60,
                                       "keepalive": 0.2, **cfg}), api_key=KEY)
        server.start(Engine(model, tok, slots=server.cfg.slots, max_len=512), tok, "scripted")
        uv, url = serve_in_thread(server)
        started.append((uv, server))
        host, port = url.removeprefix("http://").split(":")
        return SimpleNamespace(server=server, url=url, model=model, addr=(host, int(port)))

    yield make
    for uv, server in started:
        uv.should_exit = True
        uv.thread.join(timeout=10)
        server.stop()


def raw_request(path: str, body: bytes, headers: dict | None = None, method: str = "POST") -> bytes:
    head = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1", "content-type: application/json",
            f"content-length: {len(body)}", f"authorization: Bearer {KEY}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chat_body(content: str, **fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content}], **fields}).encode()


def hang_up_after(addr, data: bytes, until: bytes | None, limit_s: float = 30.0) -> None:
    """Send `data`, read until `until` appears (None: read nothing), then close the socket abruptly (RST)."""
    with socket.create_connection(addr, timeout=limit_s) as s:
        s.sendall(data)
        seen, deadline = b"", time.monotonic() + limit_s
        while until is not None and until not in seen and time.monotonic() < deadline:
            chunk = s.recv(4096)
            if not chunk:
                break
            seen += chunk
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close


def response_status(addr, data: bytes, limit_s: float = 30.0, trickle: bytes = b"") -> int:
    """Send `data` (then `trickle` one byte every 0.1 s while no reply came), return the HTTP status (-1: none)."""
    with socket.create_connection(addr, timeout=limit_s) as s:
        s.sendall(data)
        s.settimeout(0.1)
        seen, deadline, i = b"", time.monotonic() + limit_s, 0
        while b"\r\n" not in seen and time.monotonic() < deadline:
            try:
                chunk = s.recv(4096)
            except TimeoutError:
                if i < len(trickle):
                    send_quietly(s, trickle[i:i + 1])
                    i += 1
                continue
            if not chunk:
                break
            seen += chunk
    return int(seen.split(b" ")[1]) if seen.startswith(b"HTTP/1.1 ") else -1


def send_quietly(s: socket.socket, data: bytes) -> None:
    try:
        s.sendall(data)
    except OSError:  # the server may have closed after answering 408
        pass


def wait_drained(server: Server, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and (server.in_flight or server.engine.num_live or server.engine.num_waiting):
        time.sleep(0.02)


def parsed_metrics(url: str) -> dict:
    r = httpx.get(url + "/metrics", headers=AUTH)
    assert r.status_code == 200
    return {(x.name, tuple(sorted(x.labels.items()))): x.value
            for family in text_string_to_metric_families(r.text) for x in family.samples}


# ---------------------------------------------------------------------------------------------------------------------


def test_hostile_clients_leave_nothing_behind(hostile, tok):
    s = hostile()
    results: dict[int, tuple[int, str]] = {}

    def normal(k: int) -> None:
        """A well-formed request, streamed for even k; records (status, text)."""
        body = {"messages": [{"role": "user", "content": f"question {k}"}], "stream": k % 2 == 0, "temperature": 0}
        for _ in range(40):  # 429 means "retry later": bounded retries
            with httpx.Client(timeout=60, headers=AUTH) as c:
                if k % 2:
                    r = c.post(s.url + "/v1/chat/completions", json=body)
                    text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
                    status = r.status_code
                else:
                    with c.stream("POST", s.url + "/v1/chat/completions", json=body) as r:
                        status, parts = r.status_code, []
                        for line in r.iter_lines():
                            if line.startswith("data: {"):
                                event = json.loads(line[6:])
                                if "error" in event:
                                    status = 500
                                parts += [ch["delta"].get("content") or "" for ch in event.get("choices", [])]
                        text = "".join(parts)
            if status != 429:
                break
            time.sleep(0.05)
        results[k] = (status, text)

    stream_body = chat_body("tell me everything", stream=True, max_tokens=400)
    hostile_actions = [
        lambda: hang_up_after(s.addr, raw_request("/v1/chat/completions", stream_body), None),  # before the 1st byte
        lambda: hang_up_after(s.addr, raw_request("/v1/chat/completions", stream_body), b"\r\n\r\n"),  # after headers
        lambda: hang_up_after(s.addr, raw_request("/v1/chat/completions", stream_body), b"and so on"),  # mid-stream
        lambda: hang_up_after(s.addr, raw_request("/v1/chat/completions", chat_body("tell me", max_tokens=400)),
                              None),  # non-streaming, gone at once
        lambda: hang_up_after(s.addr, raw_request("/v1/chat/completions", stream_body)[:-10], None),  # mid-body
    ]
    statuses: dict[str, int] = {}

    def expect_status(name: str, data: bytes, trickle: bytes = b"") -> None:
        statuses[name] = response_status(s.addr, data, trickle=trickle)

    slow = raw_request("/v1/chat/completions", chat_body("question 1"))
    huge = chat_body("x" * 999_000)
    checks = [
        ("slow loris", slow[:-20], slow[-20:-15]),  # 5 bytes, one per 0.1 s, never the rest: 408 after 2 s
        ("over the limit", raw_request("/v1/chat/completions", chat_body("x" * 1_000_001)), b""),
        ("1 MB, valid", raw_request("/v1/chat/completions", huge), b""),
        ("bad utf-8", raw_request("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),
         b""),
        ("forged label", raw_request(FORGED, b"", {"authorization": "Bearer wrong"}, method="GET"), b""),
        ("prefill boom", raw_request("/v1/chat/completions", chat_body(PREFILL_BOOM)), b""),
        ("decode boom", raw_request("/v1/chat/completions", chat_body(DECODE_BOOM)), b""),
    ]
    threads = [threading.Thread(target=normal, args=(k,)) for k in range(16)]
    threads += [threading.Thread(target=action) for action in hostile_actions * 2]
    threads += [threading.Thread(target=expect_status, args=check) for check in checks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client hung"

    wait_drained(s.server)
    assert s.server.in_flight == 0 and s.server.engine.num_live == 0 and s.server.engine.num_waiting == 0
    assert s.server.engine.num_free_slots == s.server.cfg.slots
    assert results == {k: (200, reply_for(k)) for k in range(16)}  # every well-formed request answered exactly
    assert statuses == {"slow loris": 408, "over the limit": 413, "1 MB, valid": 400, "bad utf-8": 400,
                        "forged label": 401, "prefill boom": 500, "decode boom": 500}
    assert s.model.raised >= 2

    values = parsed_metrics(s.url)
    requests = {dict(k[1])["endpoint"] for k in values if k[0] == "chatsmith_requests_total"}
    assert requests <= {*ENDPOINTS, "other"}
    assert values["chatsmith_requests_total", (("endpoint", "other"), ("status", "401"))] == 1
    assert values["chatsmith_in_flight_sequences", ()] == 0 and values["chatsmith_live_sequences", ()] == 0
    assert values["chatsmith_engine_errors_total", ()] == 2
    assert values["chatsmith_cancelled_total", (("reason", "disconnect"),)] >= 4
    # afterwards the server still answers like new
    r = httpx.post(s.url + "/v1/chat/completions", headers=AUTH, json={"messages": [
        {"role": "user", "content": "question 3"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == reply_for(3)


def test_capacity_is_released_when_the_client_leaves_before_the_first_chunk(tok):
    """Regression: the slot was released only in the stream generator's `finally`; a disconnect before the first
    chunk cancels the response before the generator starts, so `in_flight` stayed raised and the sequence ran on."""
    model = ScriptedModel(tok.vocab_size, lambda p: [60] * 450, delay=0.005)
    server = Server(ServeConfig(slots=1, max_queue=0))
    server.start(Engine(model, tok, slots=1, max_len=512), tok, "scripted")
    app = create_app(server)
    body = json.dumps({"messages": USER, "stream": True, "max_tokens": 450}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json"),
                                                              (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    sent = []

    async def drive() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}  # gone right after its body

        async def send(message):
            await asyncio.sleep(0.01)  # the disconnect listener runs first
            sent.append(message["type"])

        await asyncio.wait_for(app(scope, receive, send), 10)

    try:
        asyncio.run(drive())
        assert "http.response.body" not in sent  # not one chunk went out
        assert server.in_flight == 0
        deadline = time.monotonic() + 5
        while server.engine.num_live and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.engine.num_live == 0 and server.engine.num_free_slots == 1  # cancelled, not run to 450
    finally:
        server.stop()


def test_an_engine_error_fails_only_its_own_request(tok):
    """Regression: one exception in a step ended the engine thread for every client."""
    model = FaultyModel(tok, make_script(tok))
    engine = Engine(model, tok, slots=4, max_len=512)
    stop = threading.Event()
    thread = threading.Thread(target=engine.serve_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        def submit(content: str):
            return engine.submit(tok.render_for_completion([{"role": "user", "content": content}]),
                                 SamplingParams(max_tokens=40, temperature=0))

        requests = [submit("question 1"), submit(PREFILL_BOOM), submit(DECODE_BOOM), submit("question 2")]
        results = [r.result(timeout=20) for r in requests]
        assert [r.finish_reason for r in results] == ["stop", FINISH_ERROR, FINISH_ERROR, "stop"]
        assert results[0].text == reply_for(1) and results[3].text == reply_for(2)
        assert requests[1].error == requests[2].error == "RuntimeError"  # the type, not the text with its path
        assert engine.num_live == 0 and engine.num_free_slots == 4
        assert submit("question 5").result(timeout=20).text == reply_for(5)  # still serving
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(timeout=10)


def test_slow_body_gets_408_and_the_loop_keeps_serving(hostile):
    """Regression: the body was read without a deadline, so a client could hold a handler forever."""
    s = hostile()
    data = raw_request("/v1/chat/completions", chat_body("question 1"))
    status = {}
    t = threading.Thread(target=lambda: status.setdefault("slow", response_status(s.addr, data[:-30])))
    t.start()
    r = httpx.post(s.url + "/v1/chat/completions", headers=AUTH, json={"messages": [
        {"role": "user", "content": "question 2"}]}, timeout=30)  # served while the slow body hangs
    t.join(timeout=40)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == reply_for(2)
    assert status == {"slow": 408}
    assert metric_with_key(s.url, 'chatsmith_requests_total{endpoint="/v1/chat/completions",status="408"}') == 1


def metric_with_key(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", headers=AUTH).text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_bodies_are_parsed_off_the_event_loop(hostile, tok):
    """Regression: JSON parsing, validation and tokenizing of bodies up to 1 MB ran on the event loop."""
    s = hostile()
    where, render = [], s.server.tokenizer.render_for_completion

    def recording(messages):
        where.append(threading.current_thread().name)
        return render(messages)

    s.server.tokenizer = SimpleNamespace(render_for_completion=recording, vocab_size=tok.vocab_size,
                                         bos_id=tok.bos_id)
    r = httpx.post(s.url + "/v1/chat/completions", headers=AUTH, json={"messages": [
        {"role": "user", "content": "question 4"}]})
    assert r.status_code == 200 and where and all(name.startswith("chatsmith-parse") for name in where)


def test_streamed_deadline_is_counted_as_504(tok):
    """Regression: /metrics counted a stream as 200 when it started, so a later deadline (504) was never counted."""
    model = ScriptedModel(tok.vocab_size, lambda p: [60] * 400, delay=0.01)
    server = Server(ServeConfig(slots=2, max_queue=2, timeout=0.3))
    server.start(Engine(model, tok, slots=2, max_len=512), tok, "scripted")
    uv, url = serve_in_thread(server)
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json={"messages": USER, "stream": True,
                                                                       "max_tokens": 400}, timeout=10) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.status_code == 200 and '"timeout"' in lines[-1]  # the error event, after the 200 headers
        wait_drained(server)
        assert metric(url, 'chatsmith_requests_total{endpoint="/v1/chat/completions",status="504"}') == 1
        assert metric(url, 'chatsmith_requests_total{endpoint="/v1/chat/completions",status="200"}') == 0
    finally:
        uv.should_exit = True
        uv.thread.join(timeout=10)
        server.stop()


def test_health_and_503_never_show_exception_text(monkeypatch):
    """Regression: a load failure's raw exception text (absolute paths) was returned by /health and in 503s."""
    import chatsmith.server as server_module

    def broken(load):
        raise OSError("[Errno 5] Input/output error: '/home/someone/.cache/chatsmith/runs/x/model.safetensors'")

    monkeypatch.setattr(server_module, "load_model", broken)
    server = Server(ServeConfig())
    assert load_or_fail(server, LoadConfig()) is None  # not a UserError: the server stays up to say so
    uv, url = serve_in_thread(server)
    try:
        health = httpx.get(url + "/health")
        chat = httpx.post(url + "/v1/chat/completions", json={"messages": USER})
        for r in (health, chat):
            assert r.status_code == 503 and "/" not in r.text.replace("\\/", "") and "Errno" not in r.text
        assert health.json()["status"] == "error" and "loading the model failed" in health.json()["message"]
    finally:
        uv.should_exit = True
        uv.thread.join(timeout=10)
        server.stop()


def test_forged_metric_labels_cannot_write_samples(hostile):
    """Regression: with --api-key set, a 401 was counted under the raw path, unescaped: this path wrote a sample."""
    s = hostile()
    for k in range(30):
        assert httpx.get(s.url + f"/v1/random-{k}").status_code == 401
    assert httpx.get(s.url + FORGED).status_code == 401
    text = httpx.get(s.url + "/metrics", headers=AUTH).text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # parses: well formed
    labels = [x.labels for x in families["chatsmith_requests"].samples if x.name == "chatsmith_requests_total"]
    assert labels == [{"endpoint": "other", "status": "401"}]
    assert 'status="200"' not in text and "1e9" not in text
    assert sum(x.value for x in families["chatsmith_requests"].samples if x.name == "chatsmith_requests_total") == 31


def test_temperature_below_the_threshold_is_greedy(tok):
    """Regression: temperature 1e-300 became 0 in fp32, softmax gave NaN and the sampler the last id every time."""
    logits = torch.full((1, 1, tok.vocab_size), -5.0)

    class Fixed(ScriptedModel):
        def forward_cached(self, idx, cache, slots, last_only=False):
            super().forward_cached(idx, cache, slots, last_only)
            out = logits.expand(idx.size(0), 1, -1).clone()
            out[:, 0, 65] = 3.0  # the argmax
            out[:, 0, 66] = 2.5
            return out

    engine = Engine(Fixed(tok.vocab_size, lambda p: []), tok, slots=1, max_len=64)
    prompt = tok.render_for_completion(USER)
    tiny = engine.generate(prompt, SamplingParams(max_tokens=5, temperature=1e-300, seed=1))
    greedy = engine.generate(prompt, SamplingParams(max_tokens=5, temperature=0))
    assert tiny.token_ids == greedy.token_ids == [65] * 5

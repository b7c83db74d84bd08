"""`chatsmith bench serve`: the server under load on loopback, or under attack (`--chaos`).

    chatsmith bench serve --json                       # latency under load, batched against sequential tokens/s
    chatsmith bench serve --chaos --requests 48 --json # well-formed requests among hostile clients and faults

--chaos (a bounded, loopback-only run): `requests` greedy chat completions (half streamed) at `concurrency`, among
`hostile` clients of each kind: hang up before the first byte, after the headers, mid-stream and mid-body;
slow-loris bodies (answered 408 after the server's body timeout); bodies over 1 MB (413); malformed UTF-8 (400);
paths that try to forge /metrics labels; and requests whose engine step raises (a fault injected into the model's
forward for one marked prompt: 500 for them, nobody else). Every well-formed reply is compared with the same
prompt decoded alone by a second engine on the same weights afterwards. It reports lost (no usable reply), wrong
(another text), 5xx among the well-formed, leaked slots (in-flight, live and waiting sequences once all clients are
done), whether /metrics parses with prometheus_client's parser, and the statuses the hostile clients saw.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from ..common import UserError
from ..config import opt
from . import _randomize, bench_ref, bench_tokenizer, emit


@dataclass(frozen=True)
class ServeBenchConfig:
    run: str = opt("", "serve this run's newest chat model; empty = a random bench-ref model with a byte tokenizer")
    requests: int = opt(200, "requests in the load phase", min=1, max=10**6)
    concurrency: int = opt(16, "requests in flight at once in the load phase", min=1, max=10**4)
    max_tokens: int = opt(32, "max_tokens of every request", min=1, max=2**20)
    batch: int = opt(8, "requests sent at once in the throughput phase, beside the same number one after another",
                     min=1, max=4096)
    slots: int = opt(16, "the server's KV-cache slots", min=1, max=4096)
    threads: int = opt(1, "torch intra-op threads; 0 leaves torch's default", min=0, max=4096)
    chaos: bool = opt(False, "mix hostile clients and injected engine faults into the load; report what leaked")
    hostile: int = opt(3, "--chaos: clients of each hostile kind", min=0, max=1000)
    json: bool = opt(False, "print JSON on stdout")


@dataclass(frozen=True)
class ServeBench:
    bench: ServeBenchConfig = ServeBenchConfig()


def main(cfg: ServeBench) -> dict:
    """The server in-process on loopback under load, driven with httpx/asyncio: `requests` chat completions at
    `concurrency` (errors, lost responses, p50/p95 latency), then completion tokens/s of `batch` requests at once
    against the same number sent one after another (ratio). Sampled (temperature 1, seeded per request), so lengths
    vary; tokens/s counts the completion tokens the server reports in `usage`. With --chaos: `chaos` (see the
    module docstring) instead."""
    import asyncio

    import httpx
    import torch

    from ..checkpoint import LoadConfig
    from ..engine import Engine
    from ..model import GPT
    from ..server import ServeConfig, Server, load_into, serve_in_thread

    b = cfg.bench
    if min(b.requests, b.concurrency, b.max_tokens, b.batch, b.slots) < 1:
        raise UserError("--requests, --concurrency, --max-tokens, --batch and --slots must be at least 1")
    if b.threads:
        torch.set_num_threads(b.threads)
    server = Server(ServeConfig(slots=b.slots, max_queue=max(b.requests, b.concurrency), timeout=600, ui=False,
                                body_timeout=1.0 if b.chaos else 10.0))
    if b.run:
        load_into(server, LoadConfig(run=b.run, threads=b.threads))
    else:
        mcfg = bench_ref().resolve()
        model = GPT.build(mcfg, device="cpu")
        _randomize(model, 0)
        tokenizer = bench_tokenizer(mcfg.vocab_size)
        server.start(Engine(model.eval(), tokenizer, slots=b.slots), tokenizer, "bench-ref")
    uv, url = serve_in_thread(server)

    def body(i: int) -> dict:
        return {"messages": [{"role": "user", "content": f"Request {i}: tell me a story about the number {i}."}],
                "max_tokens": b.max_tokens, "temperature": 1.0, "seed": i}

    async def one(client, i: int) -> tuple[int, float, int]:
        """-> (status or -1 on a transport error, seconds, completion tokens or -1 when the body is unusable)."""
        t0 = time.perf_counter()
        try:
            r = await client.post(url + "/v1/chat/completions", json=body(i))
        except httpx.HTTPError:
            return -1, time.perf_counter() - t0, -1
        seconds = time.perf_counter() - t0
        try:
            data = r.json()
            tokens = data["usage"]["completion_tokens"] if data["choices"][0]["message"] else -1
        except (ValueError, KeyError, IndexError, TypeError):
            tokens = -1
        return r.status_code, seconds, tokens

    async def load_phase(client) -> list[tuple[int, float, int]]:
        gate = asyncio.Semaphore(b.concurrency)

        async def limited(i: int):
            async with gate:
                return await one(client, i)

        return await asyncio.gather(*(limited(i) for i in range(b.requests)))

    async def throughput(client, concurrent: bool, offset: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one(client, offset + i) for i in range(b.batch)))
        else:
            results = [await one(client, offset + i) for i in range(b.batch)]
        return sum(max(0, t) for _, _, t in results), time.perf_counter() - t0

    async def run() -> dict:
        limits = httpx.Limits(max_connections=max(b.concurrency, b.batch) + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            await throughput(client, True, 10**6)  # warm-up
            t0 = time.perf_counter()
            results = await load_phase(client)
            load_s = time.perf_counter() - t0
            rates: dict[str, list[float]] = {"sequential": [], "concurrent": []}
            for r in range(3):  # interleaved, medians
                for name in rates:
                    tokens, seconds = await throughput(client, name == "concurrent", 10**7 * (r + 1))
                    rates[name].append(tokens / seconds)
        latencies = sorted(s for status, s, _ in results if status == 200)
        q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
        seq, conc = statistics.median(rates["sequential"]), statistics.median(rates["concurrent"])
        return {
            "model": server.model_id, "slots": b.slots, "threads": torch.get_num_threads(), "requests": b.requests,
            "concurrency": b.concurrency, "max_tokens": b.max_tokens,
            "errors": sum(status != 200 for status, _, _ in results),
            "lost": sum(status == 200 and tokens < 0 for status, _, tokens in results),
            "load_s": load_s, "p50_latency_s": statistics.median(latencies) if latencies else None,
            "p95_latency_s": q[18] if latencies else None,
            "load_completion_tok_s": sum(max(0, t) for _, _, t in results) / load_s,
            f"concurrent{b.batch}_tok_s": conc, "sequential_tok_s": seq, "concurrent_vs_sequential": conc / seq,
        }

    try:
        result = asyncio.run(chaos(server, url, b) if b.chaos else run())
    finally:
        uv.should_exit = True
        uv.thread.join(timeout=10)
        server.stop()
    emit(result, b.json)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# --chaos

FAULT = "chaos: this prompt makes the engine step raise"
PROMPTS = 8  # distinct well-formed prompts (each reference-decoded once)


def inject_fault(model, tokenizer) -> None:
    """Make `model.forward_cached` raise (as an out-of-memory would) on a prefill that holds the FAULT prompt's last
    content tokens (the part before the chat template's common tail)."""
    fault = tokenizer.render_for_completion([{"role": "user", "content": FAULT}])
    other = tokenizer.render_for_completion([{"role": "user", "content": "x"}])
    tail = next(n for n in range(len(other)) if fault[len(fault) - n - 1] != other[len(other) - n - 1])
    marker = fault[len(fault) - tail - 8:len(fault) - tail]
    forward = model.forward_cached

    def holds(row: list[int]) -> bool:
        return any(row[i:i + len(marker)] == marker for i in range(len(row) - len(marker) + 1))

    def faulty(idx, *args, **kwargs):
        if idx.size(1) >= len(marker) and any(holds(row) for row in idx.tolist()):
            raise RuntimeError("injected fault (bench serve --chaos)")
        return forward(idx, *args, **kwargs)

    model.forward_cached = faulty


def _raw(path: str, body: bytes, method: str = "POST") -> bytes:
    head = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1", "content-type: application/json",
            f"content-length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def chaos(server, url: str, b: ServeBenchConfig) -> dict:
    """The --chaos run (module docstring); every client bounded in time, every address loopback."""
    import asyncio
    import dataclasses
    import json

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from ..engine import Engine
    from ..sampling import CHAT_DEFAULTS

    host, port = url.removeprefix("http://").split(":")
    tokenizer, model = server.tokenizer, server.engine.model
    inject_fault(model, tokenizer)
    limit_s = 120.0

    def content(k: int) -> str:
        return f"Request {k}: tell me a story about the number {k}."

    def body(k: int, stream: bool) -> dict:
        return {"messages": [{"role": "user", "content": content(k % PROMPTS)}], "max_tokens": b.max_tokens,
                "temperature": 0, "stream": stream}

    async def normal(client, k: int) -> tuple[int, str | None, float]:
        """-> (status, reply text or None when unusable, seconds); streamed for even k."""
        t0 = time.perf_counter()
        try:
            if k % 2:
                r = await client.post(url + "/v1/chat/completions", json=body(k, False))
                try:
                    text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
                except (ValueError, KeyError, IndexError, TypeError):
                    text = None
                return r.status_code, text, time.perf_counter() - t0
            async with client.stream("POST", url + "/v1/chat/completions", json=body(k, True)) as r:
                status, parts, done = r.status_code, [], False
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if "error" in event:
                            status = 500
                        parts += [c["delta"].get("content") or "" for c in event.get("choices", [])]
                return status, "".join(parts) if done and status == 200 else None, time.perf_counter() - t0
        except (httpx.HTTPError, ValueError):
            return -1, None, time.perf_counter() - t0

    async def connect():
        return await asyncio.wait_for(asyncio.open_connection(host, int(port)), limit_s)

    async def hang_up(data: bytes, until: bytes | None) -> str:
        reader, writer = await connect()
        writer.write(data)
        await writer.drain()
        seen = b""
        try:
            while until is not None and until not in seen:
                chunk = await asyncio.wait_for(reader.read(4096), limit_s)
                if not chunk:
                    break
                seen += chunk
        except TimeoutError:
            pass
        writer.transport.abort()
        return "hung up"

    async def status_of(data: bytes) -> int:
        reader, writer = await connect()
        writer.write(data)
        await writer.drain()
        try:
            line = await asyncio.wait_for(reader.readline(), limit_s)
        except (TimeoutError, ConnectionError):
            line = b""
        writer.transport.abort()
        return int(line.split(b" ")[1]) if line.startswith(b"HTTP/1.1 ") else -1

    streamed = json.dumps({**body(0, True), "max_tokens": b.max_tokens}).encode()
    slow = _raw("/v1/chat/completions", json.dumps(body(1, False)).encode())
    kinds = {
        "hang_up_before_first_byte": lambda: hang_up(_raw("/v1/chat/completions", streamed), None),
        "hang_up_after_headers": lambda: hang_up(_raw("/v1/chat/completions", streamed), b"\r\n\r\n"),
        "hang_up_mid_stream": lambda: hang_up(_raw("/v1/chat/completions", streamed), b'"content": "'),
        "hang_up_mid_body": lambda: hang_up(_raw("/v1/chat/completions", streamed)[:-10], None),
        "slow_loris_body": lambda: status_of(slow[:-20]),
        "body_over_1mb": lambda: status_of(_raw("/v1/chat/completions", b'{"messages": "' + b"x" * 1_000_001
                                                 + b'"}')),
        "malformed_utf8": lambda: status_of(_raw("/v1/chat/completions",
                                                 b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}')),
        "forged_metric_label": lambda: status_of(_raw("/v1/x%22,status=%22200%22%7D%201e9%20%23", b"", "GET")),
        "engine_fault": lambda: status_of(_raw("/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": FAULT}], "max_tokens": b.max_tokens}).encode())),
    }

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=b.concurrency + 4)
    async with httpx.AsyncClient(timeout=limit_s, limits=limits) as client:
        gate = asyncio.Semaphore(b.concurrency)

        async def limited(k: int):
            async with gate:
                return await normal(client, k)

        async def bounded(make):
            try:
                return await asyncio.wait_for(make(), limit_s)
            except (TimeoutError, OSError) as e:
                return f"client error {type(e).__name__}"

        hostile = [(name, make) for name, make in kinds.items() for _ in range(b.hostile)]
        outcomes = await asyncio.gather(*(limited(k) for k in range(b.requests)),
                                        *(bounded(make) for _, make in hostile))
        normals, seen = outcomes[:b.requests], outcomes[b.requests:]
        deadline = time.monotonic() + 30
        while (server.in_flight or server.engine.num_live or server.engine.num_waiting) and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        leaked = server.in_flight + server.engine.num_live + server.engine.num_waiting
        exposition = (await client.get(url + "/metrics")).text
    seconds = time.perf_counter() - t0
    try:
        families = list(text_string_to_metric_families(exposition))
        endpoints = sorted({s.labels["endpoint"] for f in families for s in f.samples if "endpoint" in s.labels})
        metrics_ok = True
    except ValueError:
        endpoints, metrics_ok = [], False

    reference = Engine(model, tokenizer, slots=1)  # each prompt alone, greedy, as the server decodes it
    params = dataclasses.replace(CHAT_DEFAULTS, max_tokens=b.max_tokens, temperature=0)  # what the server applied
    expected = [reference.generate(tokenizer.render_for_completion([{"role": "user", "content": content(k)}]),
                                   params).text for k in range(PROMPTS)]
    statuses: dict[str, dict[str, int]] = {}
    for (name, _), outcome in zip(hostile, seen):
        counts = statuses.setdefault(name, {})
        counts[str(outcome)] = counts.get(str(outcome), 0) + 1
    latencies = sorted(sec for status, _, sec in normals if status == 200)
    return {
        "model": server.model_id, "slots": b.slots, "requests": b.requests, "concurrency": b.concurrency,
        "max_tokens": b.max_tokens, "hostile_per_kind": b.hostile, "hostile_clients": len(hostile),
        "seconds": seconds,
        "normal_ok": sum(status == 200 and text == expected[k % PROMPTS] for k, (status, text, _) in
                         enumerate(normals)),
        "lost": sum(text is None for _, text, _ in normals),
        "wrong": sum(text is not None and text != expected[k % PROMPTS] for k, (_, text, _) in
                     enumerate(normals)),
        "normal_5xx": sum(status >= 500 for status, _, _ in normals),
        "leaked_slots": leaked, "free_slots_after": server.engine.num_free_slots,
        "metrics_parse_ok": metrics_ok, "metrics_endpoint_labels": endpoints,
        "p50_latency_s": statistics.median(latencies) if latencies else None,
        "hostile_outcomes": statuses,
    }

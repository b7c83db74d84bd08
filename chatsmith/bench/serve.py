"""`chatsmith bench serve`: the server under load on loopback."""

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
    json: bool = opt(False, "print JSON on stdout")


@dataclass(frozen=True)
class ServeBench:
    bench: ServeBenchConfig = ServeBenchConfig()


def main(cfg: ServeBench) -> dict:
    """The server in-process on loopback under load, driven with httpx/asyncio: `requests` chat completions at
    `concurrency` (errors, lost responses, p50/p95 latency), then completion tokens/s of `batch` requests at once
    against the same number sent one after another (ratio). Sampled (temperature 1, seeded per request), so lengths
    vary; tokens/s counts the completion tokens the server reports in `usage`.
    Measured (random bench-ref, fp32, 1 thread, 16 slots, 2-core machine shared with a training run, one run):
    200 requests at concurrency 16: 0 errors, 0 lost, p50 0.54 s, p95 1.10 s; 8 at once 604 tok/s against 184 tok/s
    one after another (3.3x)."""
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
    server = Server(ServeConfig(slots=b.slots, max_queue=max(b.requests, b.concurrency), timeout=600, ui=False))
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
        result = asyncio.run(run())
    finally:
        uv.should_exit = True
        uv.thread.join(timeout=10)
        server.stop()
    emit(result, b.json)
    return result

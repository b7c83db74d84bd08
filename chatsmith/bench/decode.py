"""`chatsmith bench decode`: what a chat user feels, beside HF `generate()` and beside today's path, in one run.

    chatsmith bench decode --json

- single stream: greedy tok/s, time to first token and decode tok/s of the Engine (fused inference path), of the
  Engine on the model's reference modules (`fused=False`, the path before the fused one: today's path) and of HF
  transformers `Qwen3ForCausalLM.generate` with the same weights; greedy tokens compared;
- batch: `batch` prompts at once (continuous batching);
- turn: time to first token of the `turns`-th turn of a conversation (the whole conversation resent, as the web UI
  and OpenAI clients do; ~540 tokens by default), with the prefix cache and without;
- join: `join_streams` streams decoding while a `join_prompt_len`-token prompt joins: their longest inter-token gap
  against their median gap before it joined, with chunked prefill and with the prompt prefilled whole.

`--threads 1` is the default: decoding a small model is a chain of tiny matmuls, and on a busy machine a second
intra-op thread mostly waits (measure with `--threads 1` and `--threads 2`). Contenders run interleaved, repeat by
repeat, so that they see the same machine noise; medians are reported. Every time is wall-clock; the `cpu` figures
repeat them in CPU time of the benchmark's thread (all of torch's work with one thread), which an oversubscribed
machine does not inflate: there a preemption alone makes a longest wall-clock gap.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from ..common import UserError
from ..config import opt
from ..model import ModelConfig
from . import _randomize, bench_ref, bench_ref_with, bench_tokenizer, emit

# the user's side of the conversation in the turn benchmark (the assistant's side is what the engine generates)
USER_TURNS = ("Hi! Could you help me plan a short trip this autumn, please?",
              "I like mountains, quiet lakes and small towns with old streets.",
              "What should I pack for three cold nights and some light rain?",
              "How early should I book the train, and is a rail pass worth it?",
              "Great, thanks. Can you sum all of that up as one short list now?",
              "And which of those towns has the best food market on a Sunday?")


@dataclass(frozen=True)
class DecodeBenchConfig:
    prompt_len: int = opt(64, "tokens in the single-stream prompt; the batch's prompts spread 0.5x..1.5x around it",
                          min=1, max=2**20)
    new_tokens: int = opt(128, "greedy tokens every request generates (EOS ignored, so every contender makes as many)",
                          min=1, max=2**20)
    batch: int = opt(8, "concurrent sequences for the continuous-batching run", min=1, max=4096)
    turns: int = opt(5, "the conversation turn whose time to first token is measured (the turns before it are "
                        "served first)", min=1, max=len(USER_TURNS))
    turn_reply_tokens: int = opt(32, "tokens generated in each turn", min=1, max=4096)
    join_streams: int = opt(7, "streams decoding while a long prompt joins; 0 skips the join run", min=0, max=4096)
    join_prompt_len: int = opt(400, "tokens of the prompt that joins them", min=2, max=2**20)
    join_steps: int = opt(24, "decode steps measured before the prompt joins (their median gap is the baseline)",
                          min=2, max=2**16)
    warmup: int = opt(1, "untimed runs per contender", min=0, max=1000)
    repeats: int = opt(5, "timed runs per contender (the median is reported)", min=1, max=1000)
    threads: int = opt(1, "torch intra-op threads; 0 leaves torch's default", min=0, max=4096)
    hf: bool = opt(True, "also time HF transformers Qwen3ForCausalLM.generate with the same weights")
    seed: int = opt(0, "seed of the random weights and prompts", min=0, max=2**32 - 1)
    depth: int = opt(0, "model override for quick runs: transformer blocks; 0 = bench-ref's 4", min=0,
                     max=1024)
    n_embd: int = opt(0, "model override: width; 0 = bench-ref's 256", min=0, max=2**20)
    head_dim: int = opt(0, "model override: attention head width; 0 = bench-ref's 64", min=0, max=4096)
    vocab_size: int = opt(0, "model override: vocabulary; 0 = bench-ref's 8192", min=0, max=2**24)
    json: bool = opt(False, "print JSON on stdout")


@dataclass(frozen=True)
class DecodeBench:
    bench: DecodeBenchConfig = DecodeBenchConfig()


def _decode_model_config(b: DecodeBenchConfig) -> ModelConfig:
    """bench-ref, or bench-ref with the flags' overrides."""
    return bench_ref_with(depth=b.depth, n_embd=b.n_embd, head_dim=b.head_dim, vocab_size=b.vocab_size)


def _first_match(a: list[int], c: list[int]) -> int:
    """How many tokens agree from the start."""
    return next((i for i, (x, y) in enumerate(zip(a, c)) if x != y), min(len(a), len(c)))


def main(cfg: DecodeBench) -> dict:
    """Greedy decode on bench-ref with random weights, fp32 (see the module docstring for the contenders).
    tok_s = new tokens / wall time of the whole request, prefill included; ttft_s = time to the first new token;
    decode_tok_s = the tokens after the first / the time after it; batch_last_ttft_s = until the last of the batch has
    its first token. tokens_match: the Engine's greedy tokens equal HF's in every run (reference_tokens_match: equal
    the reference path's); matching_prefix: how many agree from the start."""
    import torch

    from ..engine import Engine
    from ..model import GPT
    from ..sampling import SamplingParams
    from ..tokenizer import N_SPECIAL

    b = cfg.bench
    for name in ("prompt_len", "new_tokens", "batch", "repeats"):
        if getattr(b, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(b, name)}")
    if b.warmup < 0 or b.threads < 0:
        raise UserError("--warmup and --threads must be >= 0")
    if b.threads:
        torch.set_num_threads(b.threads)
    mcfg = _decode_model_config(b)
    model = GPT.build(mcfg, device="cpu")
    _randomize(model, b.seed)
    model.eval()
    tokenizer = bench_tokenizer(mcfg.vocab_size)
    gen = torch.Generator().manual_seed(b.seed)
    lo, hi = max(1, b.prompt_len // 2), max(1, b.prompt_len + b.prompt_len // 2)
    batch_lens = [b.prompt_len] if b.batch == 1 else [lo + (hi - lo) * i // (b.batch - 1) for i in range(b.batch)]

    def random_prompt(n: int) -> list[int]:  # BOS, then ordinary ids
        return [tokenizer.bos_id] + torch.randint(N_SPECIAL, mcfg.vocab_size, (n - 1,), generator=gen).tolist()

    prompt = random_prompt(b.prompt_len)
    batch_prompts = [random_prompt(n) for n in batch_lens]
    max_len = max(batch_lens + [b.prompt_len]) + b.new_tokens
    params = SamplingParams(max_tokens=b.new_tokens, temperature=0.0, ignore_eos=True)
    # no prefix cache here: every repeat sends the same prompts, and a hit would flatter the time to first token
    engines = {"chatsmith": Engine(model, tokenizer, slots=1, max_len=max_len, prefix_cache_tokens=0),
               "reference": Engine(model, tokenizer, slots=1, max_len=max_len, prefix_cache_tokens=0, fused=False),
               "batch": Engine(model, tokenizer, slots=b.batch, max_len=max_len, prefix_cache_tokens=0)}

    def run_engine(engine: Engine, prompts: list[list[int]]) -> tuple[list[list[int]], float, float, float]:
        """-> (tokens per prompt, seconds until every prompt has its first new token, seconds to the last token,
        CPU seconds of this thread to the last token)."""
        first: dict[int, float] = {}
        c0, t0 = time.thread_time(), time.perf_counter()
        requests = [engine.submit(p, params, on_event=lambda e: first.setdefault(e.request_id, time.perf_counter()))
                    for p in prompts]
        while engine.has_work():
            engine.step()
        total, cpu = time.perf_counter() - t0, time.thread_time() - c0
        tokens = [r.result().token_ids for r in requests]
        if any(len(t) != b.new_tokens for t in tokens):
            raise RuntimeError(f"the engine generated {[len(t) for t in tokens]} tokens, not {b.new_tokens} each")
        return tokens, max(first.values()) - t0, total, cpu

    contenders = {"chatsmith": lambda: run_engine(engines["chatsmith"], [prompt]),
                  "reference": lambda: run_engine(engines["reference"], [prompt])}
    if b.hf:
        contenders["hf_transformers"] = _hf_generate(model, prompt, b.new_tokens)
    contenders["batch"] = lambda: run_engine(engines["batch"], batch_prompts)
    conversation = _Conversation(model, tokenizer, b)
    join = _Join(model, tokenizer, b, random_prompt) if b.join_streams else None
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in contenders}
    outputs: dict[str, list[list[int]]] = {name: [] for name in contenders}
    for r in range(b.warmup + b.repeats):  # interleaved: every contender sees the same machine noise
        timed = r >= b.warmup
        for name, fn in contenders.items():
            tokens, ttft, total, cpu = fn()
            outputs[name].append(tokens[0])
            if timed:
                times[name].append((ttft, total, cpu))
        conversation.run(timed)
        if join is not None:
            join.run(timed)

    result: dict = {
        "config": "bench-ref" if mcfg == bench_ref().resolve() else "bench-ref with overrides",
        "params": model.num_params(), "depth": mcfg.depth, "n_embd": mcfg.n_embd, "vocab_size": mcfg.vocab_size,
        "precision": "fp32", "threads": torch.get_num_threads(), "prompt_len": b.prompt_len,
        "new_tokens": b.new_tokens, "batch": b.batch, "batch_prompt_lens": batch_lens, "repeats": b.repeats,
        "tok_s_definition": "new tokens / wall time from submit to the last token, prefill included",
    }
    for name, ts in times.items():
        ttft, total = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        n = b.new_tokens * (b.batch if name == "batch" else 1)
        result[f"{name}_total_s"] = total
        result[f"{name}_tok_s"] = n / total
        result[f"{name}_cpu_tok_s"] = n / statistics.median(t[2] for t in ts)
        if name == "batch":
            result["batch_last_ttft_s"] = ttft  # until the last of the batch has its first token
        else:
            result[f"{name}_ttft_s"] = ttft
            result[f"{name}_decode_tok_s"] = (n - 1) / statistics.median(t[1] - t[0] for t in ts)
    result["batch_speedup_vs_single"] = result["batch_tok_s"] / result["chatsmith_tok_s"]
    result["speedup_vs_reference"] = result["chatsmith_tok_s"] / result["reference_tok_s"]
    result["reference_tokens_match"] = outputs["chatsmith"] == outputs["reference"]
    if b.hf:
        ours, theirs = outputs["chatsmith"], outputs["hf_transformers"]
        result["tokens_match"] = ours == theirs
        result["matching_prefix"] = min(_first_match(a, c) for a, c in zip(ours, theirs))
        result["speedup_vs_hf"] = result["chatsmith_tok_s"] / result["hf_transformers_tok_s"]
        result["cpu_speedup_vs_hf"] = result["chatsmith_cpu_tok_s"] / result["hf_transformers_cpu_tok_s"]
        result["reference_speedup_vs_hf"] = result["reference_tok_s"] / result["hf_transformers_tok_s"]
    result |= conversation.summary()
    if join is not None:
        result |= join.summary()
    emit(result, b.json)
    return result


class _Conversation:
    """Time to first token of turn `turns` of a chat whose client resends the whole conversation each turn, served by
    a fresh Engine per repeat after the turns before it, with the prefix cache and without. Turn k + 1's prompt is
    turn k's, the ids the engine generated for it, `<|im_end|>` and a newline, the next user turn and the assistant
    header: what the chat template renders when the reply's text re-encodes to the ids it was decoded from (as a
    trained model's replies do; random weights emit ids whose text would not)."""

    def __init__(self, model, tokenizer, b: DecodeBenchConfig):
        from ..sampling import SamplingParams
        from ..tokenizer import IM_END, IM_START

        self.model, self.tokenizer, self.b = model, tokenizer, b
        self.first = tokenizer.render_for_completion([{"role": "user", "content": USER_TURNS[0]}])
        header = [tokenizer.special_id(IM_START), *tokenizer.encode("assistant\n")]
        self.after_reply = [[tokenizer.special_id(IM_END), *tokenizer.encode("\n"),
                             *tokenizer.render_conversation([{"role": "user", "content": text}])[0][1:], *header]
                            for text in USER_TURNS[1:b.turns]]  # [1:] drops the BOS
        self.max_len = max(model.config.seq_len, len(self.first) + sum(map(len, self.after_reply))
                           + b.turns * b.turn_reply_tokens)
        self.params = SamplingParams(max_tokens=b.turn_reply_tokens, temperature=0.0, ignore_eos=True)
        self.ttft: dict[str, list[float]] = {"cached": [], "uncached": []}
        self.cpu_ttft: dict[str, list[float]] = {"cached": [], "uncached": []}
        self.tokens: dict[str, list[list[int]]] = {"cached": [], "uncached": []}
        self.prompt_tokens = self.cached_tokens = 0

    def run(self, timed: bool) -> None:
        from ..engine import Engine

        for name, tokens in (("cached", None), ("uncached", 0)):
            engine = Engine(self.model, self.tokenizer, slots=1, max_len=self.max_len, prefix_cache_tokens=tokens)
            prompt, replies = self.first, []
            for after in self.after_reply:  # the earlier turns
                replies.append(engine.generate(prompt, self.params).token_ids)
                prompt = prompt + replies[-1] + after
            hits_before = engine.prefix.hit_tokens if engine.prefix is not None else 0
            first: dict[str, tuple[float, float]] = {}
            t0 = (time.perf_counter(), time.thread_time())
            request = engine.submit(prompt, self.params, on_event=lambda e, first=first: first.setdefault(
                "t", (time.perf_counter(), time.thread_time())))
            while not request.done:
                engine.step()
            if timed:
                self.ttft[name].append(first["t"][0] - t0[0])
                self.cpu_ttft[name].append(first["t"][1] - t0[1])
                self.tokens[name].append([t for r in replies for t in r] + request.result().token_ids)
            self.prompt_tokens = len(prompt)
            if engine.prefix is not None:
                self.cached_tokens = engine.prefix.hit_tokens - hits_before

    def summary(self) -> dict:
        out = {"turn": self.b.turns, "turn_prompt_tokens": self.prompt_tokens,
               "turn_cached_tokens": self.cached_tokens}
        for prefix, ttft in (("turn", self.ttft), ("turn_cpu", self.cpu_ttft)):
            cached, uncached = statistics.median(ttft["cached"]), statistics.median(ttft["uncached"])
            out |= {f"{prefix}_ttft_cached_s": cached, f"{prefix}_ttft_uncached_s": uncached,
                    f"{prefix}_ttft_speedup": uncached / cached}
        out["turn_tokens_match"] = self.tokens["cached"] == self.tokens["uncached"]
        return out


class _Join:
    """`join_streams` greedy streams decode; after `join_steps` steps a `join_prompt_len`-token prompt is submitted;
    stepping goes on until it has its first token and 4 more steps. Gaps between a stream's successive tokens: the
    median of those before the join is the baseline, the longest after it is what a user sees stall; the joiner's
    time to first token (wall) is what chunking costs it."""

    def __init__(self, model, tokenizer, b: DecodeBenchConfig, random_prompt):
        self.model, self.tokenizer, self.b = model, tokenizer, b
        self.streams = [random_prompt(b.prompt_len) for _ in range(b.join_streams)]
        self.joiner = random_prompt(b.join_prompt_len)
        self.max_len = max(model.config.seq_len, b.prompt_len + b.join_steps + b.join_prompt_len + 64,
                           b.join_prompt_len + 8)
        self.gaps: dict[tuple[str, int], list[tuple[float, float, float]]] = {
            (name, clock): [] for name in ("chunked", "whole") for clock in (0, 1)}  # clock 0 wall, 1 CPU
        self.joiner_tokens: dict[str, list[list[int]]] = {"chunked": [], "whole": []}
        self.joiner_ttft: dict[str, list[float]] = {"chunked": [], "whole": []}  # wall s to its first token

    def run(self, timed: bool) -> None:
        from ..engine import Engine
        from ..sampling import SamplingParams

        b = self.b
        for name, chunk in (("chunked", 0), ("whole", self.max_len)):
            engine = Engine(self.model, self.tokenizer, slots=b.join_streams + 1, max_len=self.max_len,
                            prefix_cache_tokens=0, prefill_chunk=chunk)
            stamps: dict[int, list[tuple[float, float]]] = {}  # (wall, CPU) time of each token
            params = SamplingParams(max_tokens=self.max_len - b.prompt_len - 1, temperature=0.0, ignore_eos=True)
            def stamp(event, stamps=stamps) -> None:
                if event.token_ids:
                    stamps.setdefault(event.request_id, []).append((time.perf_counter(), time.thread_time()))

            streams = [engine.submit(p, params, on_event=stamp) for p in self.streams]
            for _ in range(b.join_steps + 1):
                engine.step()
            before = {r.id: len(stamps[r.id]) for r in streams}
            submitted = time.perf_counter()
            joiner = engine.submit(self.joiner, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
                                   on_event=stamp)
            while not joiner.done:
                engine.step()
            for r in streams:
                r.cancel()
            engine.step()
            if timed:
                for clock in (0, 1):
                    steady = [t[clock] - s[clock] for r in streams  # the first gap is within one step: skipped
                              for s, t in zip(stamps[r.id][1:before[r.id]], stamps[r.id][2:before[r.id]])]
                    joined = [t[clock] - s[clock] for r in streams
                              for s, t in zip(stamps[r.id][before[r.id] - 1:], stamps[r.id][before[r.id]:])]
                    median, longest = statistics.median(steady), max(joined)
                    self.gaps[name, clock].append((median, longest, longest / median))
                self.joiner_tokens[name].append(joiner.result().token_ids)
                self.joiner_ttft[name].append(stamps[joiner.id][0][0] - submitted)

    def summary(self) -> dict:
        out = {"join_streams": self.b.join_streams, "join_prompt_len": self.b.join_prompt_len}
        for (name, clock), gaps in self.gaps.items():
            key = f"join_{name}" + ("_cpu" if clock else "")
            out[f"{key}_median_gap_s"] = statistics.median(g[0] for g in gaps)
            out[f"{key}_longest_gap_s"] = statistics.median(g[1] for g in gaps)
            out[f"{key}_gap_ratio"] = statistics.median(g[2] for g in gaps)
        for name, ttft in self.joiner_ttft.items():
            out[f"join_{name}_joiner_ttft_s"] = statistics.median(ttft)
        out["join_tokens_match"] = self.joiner_tokens["chunked"] == self.joiner_tokens["whole"]
        return out


def _hf_generate(model, prompt: list[int], new_tokens: int):
    """A contender: Qwen3ForCausalLM (sdpa) with `model`'s weights, greedy `generate` of exactly `new_tokens` tokens
    (no EOS id, so none stops it early or gets masked), timed to its first token through a streamer."""
    import torch

    from ..common import require

    transformers = require("transformers", "transformers", "the HF baseline of bench decode")
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**model.hf_config_dict(), attn_implementation="sdpa"))
    hf.load_state_dict(model.to_hf_state_dict())
    hf.eval()
    gen_cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                            use_cache=True, eos_token_id=None, pad_token_id=0)
    ids = torch.tensor([prompt])  # (1, T)

    class FirstToken:  # streamer protocol: put() gets the prompt, then every new token
        def __init__(self):
            self.calls, self.time = 0, 0.0

        def put(self, value) -> None:
            self.calls += 1
            if self.calls == 2:
                self.time = time.perf_counter()

        def end(self) -> None:
            pass

    def run() -> tuple[list[list[int]], float, float, float]:
        streamer = FirstToken()
        c0, t0 = time.thread_time(), time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg,
                          streamer=streamer)  # (1, T + new_tokens)
        total, cpu = time.perf_counter() - t0, time.thread_time() - c0
        tokens = out[0, ids.size(1):].tolist()
        if len(tokens) != new_tokens:
            raise RuntimeError(f"HF generate made {len(tokens)} tokens, not {new_tokens}")
        return [tokens], streamer.time - t0, total, cpu

    return run


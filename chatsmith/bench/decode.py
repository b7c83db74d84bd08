"""`chatsmith bench decode`: greedy decode tok/s beside HF `generate()`, and sequences batched.

`--threads 1` is the default: decoding a small model is a chain of tiny matmuls, and on a busy machine a second
intra-op thread mostly waits (measure with `--threads 1` and `--threads 2`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from ..common import UserError
from ..config import opt
from ..model import ModelConfig
from . import _randomize, bench_ref, bench_tokenizer, emit


@dataclass(frozen=True)
class DecodeBenchConfig:
    prompt_len: int = opt(64, "tokens in the single-stream prompt; the batch's prompts spread 0.5x..1.5x around it",
                          min=1, max=2**20)
    new_tokens: int = opt(128, "greedy tokens every request generates (EOS ignored, so every contender makes as many)",
                           min=1, max=2**20)
    batch: int = opt(8, "concurrent sequences for the continuous-batching run", min=1, max=4096)
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
    """bench-ref, or bench-ref with the overrides (heads and MLP width then derived from width and head_dim)."""
    import dataclasses

    cfg = bench_ref()
    if b.depth:
        cfg = dataclasses.replace(cfg, depth=b.depth)
    if b.n_embd or b.head_dim:
        cfg = dataclasses.replace(cfg, n_embd=b.n_embd or cfg.n_embd, head_dim=b.head_dim or cfg.head_dim, n_head=0,
                                  n_kv_head=0, intermediate_size=0)
    if b.vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=b.vocab_size)
    return cfg.resolve()



def main(cfg: DecodeBench) -> dict:
    """Greedy decode on bench-ref with random weights, fp32, three contenders interleaved run by run:
    chatsmith's Engine on one prompt, HF transformers `generate` on the same prompt and weights, and the Engine on
    `batch` prompts submitted at once (continuous batching). tok_s = new tokens / wall time of the whole request,
    prefill included; ttft_s = time to the first new token; decode_tok_s = the tokens after the first / the time
    after it; batch_last_ttft_s = until the last of the batch has its first token (the engine prefills in turn).
    tokens_match: the Engine's greedy tokens equal HF's in every run; matching_prefix: how many agree from the start."""
    import torch

    from ..engine import Engine, SamplingParams
    from ..model import GPT
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
    engine = Engine(model, tokenizer, slots=b.batch, max_len=max(batch_lens + [b.prompt_len]) + b.new_tokens)
    params = SamplingParams(max_tokens=b.new_tokens, temperature=0.0, ignore_eos=True)

    def run_engine(prompts: list[list[int]]) -> tuple[list[list[int]], float, float]:
        """-> (tokens per prompt, seconds until every prompt has its first new token, seconds to the last token)."""
        first: dict[int, float] = {}
        t0 = time.perf_counter()
        requests = [engine.submit(p, params, on_event=lambda e: first.setdefault(e.request_id, time.perf_counter()))
                    for p in prompts]
        while engine.has_work():
            engine.step()
        total = time.perf_counter() - t0
        tokens = [r.result().token_ids for r in requests]
        if any(len(t) != b.new_tokens for t in tokens):
            raise RuntimeError(f"the engine generated {[len(t) for t in tokens]} tokens, not {b.new_tokens} each")
        return tokens, max(first.values()) - t0, total

    contenders = {"chatsmith": lambda: run_engine([prompt])}
    if b.hf:
        contenders["hf_transformers"] = _hf_generate(model, prompt, b.new_tokens)
    contenders["batch"] = lambda: run_engine(batch_prompts)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    outputs: dict[str, list[list[int]]] = {name: [] for name in contenders}
    for r in range(b.warmup + b.repeats):  # interleaved: every contender sees the same machine noise
        for name, fn in contenders.items():
            tokens, ttft, total = fn()
            outputs[name].append(tokens[0])
            if r >= b.warmup:
                times[name].append((ttft, total))

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
        if name == "batch":
            result["batch_last_ttft_s"] = ttft  # until the last of the batch has its first token (prefills in turn)
        else:
            result[f"{name}_ttft_s"] = ttft
            result[f"{name}_decode_tok_s"] = (n - 1) / statistics.median(t[1] - t[0] for t in ts)
    result["batch_speedup_vs_single"] = result["batch_tok_s"] / result["chatsmith_tok_s"]
    if b.hf:
        ours, theirs = outputs["chatsmith"], outputs["hf_transformers"]
        result["tokens_match"] = ours == theirs
        result["matching_prefix"] = min(next((i for i, (x, y) in enumerate(zip(a, c)) if x != y), len(a))
                                        for a, c in zip(ours, theirs))
        result["speedup_vs_hf"] = result["chatsmith_tok_s"] / result["hf_transformers_tok_s"]
        if "kernel_floor" in times:
            result["max_speedup_vs_hf"] = result["kernel_floor_tok_s"] / result["hf_transformers_tok_s"]
    emit(result, b.json)
    return result


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

    def run() -> tuple[list[list[int]], float, float]:
        streamer = FirstToken()
        t0 = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg,
                          streamer=streamer)  # (1, T + new_tokens)
        total = time.perf_counter() - t0
        tokens = out[0, ids.size(1):].tolist()
        if len(tokens) != new_tokens:
            raise RuntimeError(f"HF generate made {len(tokens)} tokens, not {new_tokens}")
        return [tokens], streamer.time - t0, total

    return run


"""bench decode and bench train: the JSON's fields and their arithmetic, greedy parity of the engine with HF
transformers (and that the parity check does fail when the HF weights differ), the synthetic tokenizer, flags; bench
train's fused HF AdamW, stated peak and probed precision. Speed is never asserted.

    .venv/bin/pytest tests/test_bench.py -q
"""

import json
import math

import pytest
import torch

from chatsmith import bench, config
from chatsmith.bench import decode, train
from chatsmith.common import UserError
from chatsmith.model import GPT
from chatsmith.tokenizer import ALL_SPECIALS, N_SPECIAL

TINY = dict(prompt_len=12, new_tokens=10, batch=3, warmup=1, repeats=2, depth=2, n_embd=64, head_dim=32,
            vocab_size=512, threads=1, turns=3, turn_reply_tokens=5, join_streams=2, join_prompt_len=40, join_steps=4)


@pytest.fixture(autouse=True)
def restore_threads():
    """decode_main sets torch's thread count for the process (it is a CLI stage); give it back after each test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run(capsys, **overrides) -> dict:
    cfg = decode.DecodeBench(decode.DecodeBenchConfig(**{**TINY, "json": True, **overrides}))
    result = decode.main(cfg)
    assert json.loads(capsys.readouterr().out) == result  # --json prints exactly the returned dict
    return result


def check_arithmetic(r: dict) -> None:
    """Every rate and ratio follows from the reported times and counts."""
    n = r["new_tokens"]
    singles = ["chatsmith"] + (["hf_transformers"] if "hf_transformers_tok_s" in r else [])
    for name in singles:
        assert r[f"{name}_total_s"] > 0
        assert 0 < r[f"{name}_ttft_s"] < r[f"{name}_total_s"]
        assert math.isclose(r[f"{name}_tok_s"], n / r[f"{name}_total_s"])
        assert r[f"{name}_decode_tok_s"] > 0
    assert 0 < r["batch_last_ttft_s"] < r["batch_total_s"]
    assert math.isclose(r["batch_tok_s"], r["batch"] * n / r["batch_total_s"])
    assert math.isclose(r["batch_speedup_vs_single"], r["batch_tok_s"] / r["chatsmith_tok_s"])
    if "hf_transformers_tok_s" in r:
        assert math.isclose(r["speedup_vs_hf"], r["chatsmith_tok_s"] / r["hf_transformers_tok_s"])
        assert math.isclose(r["cpu_speedup_vs_hf"], r["chatsmith_cpu_tok_s"] / r["hf_transformers_cpu_tok_s"])
    assert math.isclose(r["speedup_vs_reference"], r["chatsmith_tok_s"] / r["reference_tok_s"])
    for clock in ("turn", "turn_cpu"):  # the prefix cache's turn: a ratio of the two medians
        assert math.isclose(r[f"{clock}_ttft_speedup"], r[f"{clock}_ttft_uncached_s"] / r[f"{clock}_ttft_cached_s"])
    # the conversation's earlier turns are in the cache: only the last user turn (+ a partial block) is prefilled
    assert 0 < r["turn_prompt_tokens"] - r["turn_cached_tokens"] < r["turn_prompt_tokens"] / 2
    if r.get("join_streams"):
        for key in ("join_chunked", "join_whole", "join_chunked_cpu", "join_whole_cpu"):
            assert 0 < r[f"{key}_median_gap_s"] and r[f"{key}_gap_ratio"] > 0
    # exactness of the new paths: the reference modules, the prefix cache and chunked prefill give the same tokens
    assert r["reference_tokens_match"] is True and r["turn_tokens_match"] is True
    assert r.get("join_tokens_match", True) is True


def test_decode_json_and_hf_parity(capsys):
    pytest.importorskip("transformers", reason="the HF baseline of bench decode needs transformers")
    r = run(capsys)
    assert r["tokens_match"] is True and r["matching_prefix"] == TINY["new_tokens"]  # greedy == HF greedy
    check_arithmetic(r)
    mcfg = decode._decode_model_config(decode.DecodeBenchConfig(**TINY))
    assert r["params"] == GPT.build(mcfg).num_params() and r["config"] == "bench-ref with overrides"
    assert (r["prompt_len"], r["new_tokens"], r["batch"], r["repeats"], r["threads"]) == (12, 10, 3, 2, 1)
    assert r["batch_prompt_lens"] == [6, 12, 18]  # 0.5x .. 1.5x the single prompt, evenly spread


def test_parity_check_fails_when_weights_differ(capsys, monkeypatch):
    """The tokens_match check can fail: HF gets a different output head, so its greedy tokens differ."""
    pytest.importorskip("transformers", reason="the HF baseline of bench decode needs transformers")
    original = GPT.to_hf_state_dict

    def shuffled_head(self, include_tied: bool = True):
        sd = dict(original(self, include_tied))
        sd["lm_head.weight"] = sd["lm_head.weight"].roll(1, dims=0)  # token i's logit goes to token i + 1
        return sd

    monkeypatch.setattr(GPT, "to_hf_state_dict", shuffled_head)
    r = run(capsys, repeats=1, warmup=0)
    assert r["tokens_match"] is False and r["matching_prefix"] < TINY["new_tokens"]


def test_decode_without_hf(capsys):
    r = run(capsys, hf=False, batch=1, repeats=1)
    assert not any(k.startswith("hf_") for k in r) and "tokens_match" not in r and "speedup_vs_hf" not in r
    assert r["batch_prompt_lens"] == [TINY["prompt_len"]]
    check_arithmetic(r)


def test_bench_ref_is_the_default_model():
    assert decode._decode_model_config(decode.DecodeBenchConfig()) == bench.bench_ref().resolve()


def test_bench_tokenizer_covers_the_vocabulary():
    tok = bench.bench_tokenizer(600)
    assert tok.vocab_size == 600
    assert [tok.special_id(s) for s in ALL_SPECIALS] == list(range(N_SPECIAL))
    assert sorted(tok.id_bytes(N_SPECIAL + i) for i in range(256)) == [bytes([b]) for b in range(256)]  # every byte
    assert all(len(tok.id_bytes(i)) == 2 for i in range(N_SPECIAL + 256, 600))  # then byte pairs
    with pytest.raises(UserError):
        bench.bench_tokenizer(100)


def test_flags_and_errors():
    cfg = config.parse(decode.DecodeBench, ["--new-tokens", "4", "--threads", "2", "--no-hf", "--json"])
    assert (cfg.bench.new_tokens, cfg.bench.threads, cfg.bench.hf, cfg.bench.json) == (4, 2, False, True)
    with pytest.raises(UserError, match="--new-tokens"):
        decode.main(decode.DecodeBench(decode.DecodeBenchConfig(**{**TINY, "new_tokens": 0})))


def test_train_json_arithmetic_and_floor(capsys, monkeypatch):
    """bench train on bench-ref, one sequence per step: the reported rates follow from the step times, MFU is against
    the stated peak of the precision in use, the HF contender's AdamW is the fused one, and the kernel floor runs
    exactly the model's matmuls (same FLOPs as a forward + backward of the model, counted by torch's
    FlopCounterMode; neither count includes attention, which the counter does not see on CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    adamw_kwargs = []
    real_adamw = torch.optim.AdamW

    def recording_adamw(*args, **kwargs):
        adamw_kwargs.append(kwargs)
        return real_adamw(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    cfg = train.TrainBench(train.TrainBenchConfig(batch=1, warmup=1, steps=2, precision="fp32", memory=False,
                                                  json=True))
    r = train.main(cfg)
    assert json.loads(capsys.readouterr().out) == r
    assert [k.get("fused") for k in adamw_kwargs] == [True] and r["hf_optimizer"] == "torch.optim.AdamW(fused=True)"
    assert (r["precision"], r["precision_reason"], r["probe_bf16_flops"]) == ("fp32", "pinned", None)
    assert r["peak_flops"] == r["peak_fp32_flops"] > 0 and "measured 2048^3 float32 matmul" in r["peak_source"]
    tokens = r["batch"] * r["seq_len"]
    for name in ("chatsmith", "hf_transformers", "kernel_floor"):
        assert r[f"{name}_step_s"] > 0
        assert math.isclose(r[f"{name}_tok_s"], tokens / r[f"{name}_step_s"])
        assert math.isclose(r[f"{name}_mfu"], r["flops_per_token"] * r[f"{name}_tok_s"] / r["peak_flops"])
    assert math.isclose(r["speedup_vs_hf"], r["chatsmith_tok_s"] / r["hf_transformers_tok_s"])
    assert math.isclose(r["kernel_floor_speedup_vs_hf"], r["kernel_floor_tok_s"] / r["hf_transformers_tok_s"])
    assert not any(k.endswith("_step_memory_mb") for k in r)

    model = GPT.build(bench.bench_ref().resolve())
    x = torch.randint(0, model.config.vocab_size, (1, model.config.seq_len))
    with FlopCounterMode(display=False) as model_count:
        model(x, x).backward()
    with FlopCounterMode(display=False) as floor_count:
        train._kernel_floor(model, 1, None)(x, x)
    assert floor_count.get_total_flops() == model_count.get_total_flops() > 0


def test_train_auto_precision_follows_the_probe(capsys, monkeypatch):
    """--precision auto: the probe (faked: bf16 4x faster) decides at bench-ref's shapes; the JSON says so, with both
    figures, and MFU is then against the bf16 peak."""
    from chatsmith import common

    calls = []

    def fake_probe(shapes, device):
        calls.append(shapes)
        return {"bf16_flops": 4e11, "fp32_flops": 1e11}

    monkeypatch.setattr(common, "precision_probe", fake_probe)
    cfg = train.TrainBench(train.TrainBenchConfig(batch=1, warmup=0, steps=1, hf=False, floor=False, memory=False,
                                                  json=True))
    r = train.main(cfg)
    capsys.readouterr()
    mcfg = bench.bench_ref().resolve()
    assert calls[0] == common.probe_shapes(mcfg, mcfg.seq_len)
    assert (r["precision"], r["precision_reason"], r["probe_bf16_flops"], r["probe_fp32_flops"]) == (
        "bf16", "measured", 4e11, 1e11)
    assert r["peak_flops"] == r["peak_bf16_flops"] and "bfloat16" in r["peak_source"]
    assert math.isclose(r["chatsmith_mfu"], r["flops_per_token"] * r["chatsmith_tok_s"] / r["peak_bf16_flops"])
    assert not any(k.startswith(("hf_transformers_", "kernel_floor_")) for k in r)


@pytest.mark.slow  # two fresh processes that each import torch + transformers and build both trainers
def test_train_step_memory_in_fresh_processes(capsys):
    """Peak memory of each trainer's steps, each measured in a fresh process (not asserted beyond being measured)."""
    cfg = train.TrainBench(train.TrainBenchConfig(batch=1, warmup=0, steps=1, precision="fp32", floor=False,
                                                  json=True))
    r = train.main(cfg)
    capsys.readouterr()
    assert r["chatsmith_step_memory_mb"] > 0 and r["hf_transformers_step_memory_mb"] > 0
    assert math.isclose(r["memory_ratio_hf_over_chatsmith"],
                        r["hf_transformers_step_memory_mb"] / r["chatsmith_step_memory_mb"])

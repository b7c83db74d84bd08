"""GPU presets and their memory / wall-time estimates.

    chatsmith speedrun --preset gpu-d12                                    # one 80 GB-class GPU
    torchrun --standalone --nproc_per_node=8 -m chatsmith speedrun --preset gpu-d20 --run-name d20   # one 8-GPU node
    python -c "from chatsmith.presets_gpu import estimate_preset; print(estimate_preset('gpu-d12'))"

Presets are plain functions returning {section: {field: value}} overrides (config.PRESETS lists them), each value
with its reason beside it. `estimate` computes, for a model config and a batch, the memory per GPU (parameters,
gradients, optimizer state, activations at the batch size) and the wall time from the model's FLOPs per token and a
stated MFU assumption against the datasheet dense bf16 peak (common.GPU_PEAK_TFLOPS). These are estimates, not
measurements: the device check (scripts/gpu_check.sh) measures tokens/s, MFU and peak memory where a GPU is lent.

Data: the presets read `hf:` sources (online, streamed by data/sources.py); offline, pass the `pkg:` corpora with
`--sources pkg:sharegpt pkg:people-daily pkg:idioms pkg:chatterbot`, which hold far fewer tokens than these budgets
(`budget_note` says so in one sentence; the run then repeats its data for several epochs).
"""

from __future__ import annotations

from typing import Any

MFU_ASSUMED = 0.40  # nanochat's d20 speedrun on 8xH100 reports roughly this; the device check measures ours
FINEWEB_EDU = "hf:HuggingFaceFW/fineweb-edu:sample-10BT:train"  # ~10B GPT-2 tokens of filtered web text


def preset_gpu_d12() -> dict[str, dict[str, Any]]:
    """One 80 GB-class GPU, well under an hour: a 12-block, width-768 model (about 142M parameters with a 32768
    vocabulary) on about 0.5B tokens (~3.7 tokens per parameter: short of Chinchilla's 20, the price of the hour)."""
    return {
        "data": {"sources": (FINEWEB_EDU,), "max_docs": 2_000_000},  # ~2M docs x ~1k tokens: the token budget, once
        "tokenizer": {"vocab_size": 32768,  # 2^15: the head stays a third of the parameters at width 768
                      "train_chars": 2_000_000_000},  # 2 GB of text: enough merges for 32k tokens
        "model": {"depth": 12, "aspect": 64,  # width 768, GPT-2-small sized
                  "head_dim": 64,  # 12 heads; 64 keeps flash attention's fast path
                  "seq_len": 2048},  # nanochat's context; flash attention makes the square cheap
        "train": {"steps": 1000,
                  "batch_tokens": 524_288,  # 2^19 tokens per step (nanochat's), reached by gradient accumulation
                  "device_batch": 32,  # 32 x 2048 tokens per forward: activations fit 80 GB (see estimate)
                  "eval_every": 100, "eval_tokens": 4 * 524_288, "ckpt_every": 200,
                  "precision": "auto",  # bf16 autocast on sm80+
                  "compile": True},  # compile time (a minute) pays back over 1000 steps on a GPU
        "sft_train": {"steps": 600, "device_batch": 16, "eval_every": 100, "eval_tokens": 131_072,
                      "ckpt_every": 200, "compile": False},  # varying row lengths would recompile
    }


def preset_gpu_d20() -> dict[str, dict[str, Any]]:
    """One 8-GPU node, nanochat-d20 class: 20 blocks at width 1280 (about 594M parameters with a 65536 vocabulary)
    on Chinchilla's 20 tokens per parameter (~11.2B tokens, 21,400 steps of 2^19 tokens)."""
    return {
        "data": {"sources": (FINEWEB_EDU,), "max_docs": 0},  # all of it: the budget is about the whole sample
        "tokenizer": {"vocab_size": 65536,  # 2^16 as nanochat: better compression at this scale, still uint16 shards
                      "train_chars": 2_000_000_000},
        "model": {"depth": 20, "aspect": 64,  # width 1280
                  "head_dim": 128,  # 10 heads of 128: nanochat's shape, flash attention's fastest head size
                  "seq_len": 2048},
        "train": {"steps": 21_400,  # 21,400 x 524,288 = 11.2B tokens = 20 x 561M (nanochat's d20 count)
                  "batch_tokens": 524_288,  # 8 GPUs x 16 rows x 2048 x 2 micro-batches
                  "device_batch": 16,  # 32 would need ~84 GiB by `estimate` (the 65536-wide logits dominate)
                  "eval_every": 250, "eval_tokens": 10 * 524_288, "ckpt_every": 1000,
                  "precision": "auto", "compile": True},
        "optim": {"matrix_lr": 0.02, "embed_lr": 0.2, "head_lr": 0.004,  # nanochat's d20 values (AdamW ones scaled
                  "warmdown_frac": 0.2},  # by 1/sqrt(width/768) in optim.py); 20 % linear warmdown as nanochat
        "sft_train": {"steps": 1000, "device_batch": 16, "eval_every": 100, "eval_tokens": 262_144,
                      "ckpt_every": 250, "compile": False},
    }


GPU_PRESETS = {"gpu-d12": preset_gpu_d12, "gpu-d20": preset_gpu_d20}
GPUS_OF = {"gpu-d12": 1, "gpu-d20": 8}  # the GPUs each preset is written for


def estimate(mcfg, device_batch: int, world_size: int, tokens: int, parallel: str = "ddp",
             peak_tflops: float = 989.4, mfu: float = MFU_ASSUMED) -> dict[str, float]:
    """Memory per GPU (GiB) and wall time (hours) of training `mcfg` (a resolved model.ModelConfig) on `tokens`
    tokens with `device_batch` rows per forward on `world_size` GPUs.

    Parameters counted from the config (tested equal to GPT.num_params). Bytes per parameter: fp32 weights 4 +
    fp32 gradients 4 + optimizer state (Muon: one fp32 momentum buffer, 4, for block matrices; AdamW: two, 8, for the
    rest); under fsdp all three are divided by world_size. Activations saved for backward under bf16 autocast with
    flash attention (no T x T matrix): 34 bytes x width per token per block (Korthikanti et al. 2022, without
    the attention-matrix term), plus the logits (bf16 + fp32 for the loss: 6 bytes x vocab per token). Wall time:
    FLOPs per token (the model's own count) x tokens / (mfu x peak x world_size). `peak_tflops` defaults to the
    H100 SXM datasheet dense bf16 figure (common.GPU_PEAK_TFLOPS)."""
    C, L, V, T = mcfg.n_embd, mcfg.depth, mcfg.vocab_size, mcfg.seq_len
    q, kv = mcfg.n_head * mcfg.head_dim, mcfg.n_kv_head * mcfg.head_dim
    attn = C * q + 2 * C * kv + q * C
    mlp = 3 * C * mcfg.intermediate_size
    norms = 2 * C + 2 * mcfg.head_dim  # attn/mlp norms + per-head q/k norms
    matrices = L * (attn + mlp)
    embed = V * C
    head = 0 if getattr(mcfg, "tie_embeddings", False) else V * C
    params = matrices + L * norms + embed + head + C  # + the final norm
    shard = world_size if parallel == "fsdp" else 1
    gib = 2**30
    weights = 4 * params / shard
    grads = 4 * params / shard
    optim = (4 * matrices + 8 * (params - matrices)) / shard
    acts = device_batch * T * (34 * C * L + 6 * V)
    flops_per_token = _model_flops_per_token(mcfg)
    seconds = flops_per_token * tokens / (mfu * peak_tflops * 1e12 * world_size)
    return {"params": params, "weights_gib": weights / gib, "grads_gib": grads / gib, "optimizer_gib": optim / gib,
            "activations_gib": acts / gib, "total_gib": (weights + grads + optim + acts) / gib,
            "flops_per_token": flops_per_token, "hours": seconds / 3600, "mfu_assumed": mfu,
            "peak_tflops": peak_tflops}


def _model_flops_per_token(mcfg) -> int:
    import torch

    from .model import GPT

    with torch.device("meta"):  # no memory: the count needs shapes only
        return GPT(mcfg).flops_per_token()


def estimate_preset(name: str, parallel: str = "ddp", peak_tflops: float = 989.4) -> dict[str, float]:
    """`estimate` for a GPU preset at the GPU count it is written for."""
    from .model import ModelConfig

    p = GPU_PRESETS[name]()
    m = p["model"]
    mcfg = ModelConfig(depth=m["depth"], aspect=m["aspect"], head_dim=m["head_dim"], seq_len=m["seq_len"],
                       vocab_size=p["tokenizer"]["vocab_size"]).resolve()
    t = p["train"]
    return estimate(mcfg, t["device_batch"], GPUS_OF[name], t["steps"] * t["batch_tokens"], parallel, peak_tflops)


def budget_note(train_tokens: int, steps: int, tokens_per_step: int) -> str | None:
    """One sentence when the run's training tokens are fewer than its budget (it then repeats them), else None."""
    budget = steps * tokens_per_step
    if train_tokens >= budget:
        return None
    return (f"the train split holds {train_tokens:,} tokens but {steps} steps x {tokens_per_step:,} tokens need "
            f"{budget:,}: the run repeats its data {budget / max(1, train_tokens):.1f} times; give more --sources "
            f"(an hf: source online) or fewer --steps")

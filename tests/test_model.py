"""Tests for chatsmith.model: numerics against HF transformers' Qwen3ForCausalLM, the fused pieces against plain
autograd references, the loss against F.cross_entropy, init statistics, meta-device construction and accounting.

    .venv/bin/pytest tests/test_model.py -q
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_weights

from chatsmith.common import UserError
from chatsmith.model import (
    GPT,
    ModelConfig,
    RMSNorm,
    chunked_cross_entropy,
    head_norm_rope,
    head_norm_rope_reference,
    rope_tables,
)

# GQA with n_kv_head < n_head; head_dim != n_embd / n_head; tied and untied; a non-default rope_theta
CONFIGS = {
    "gqa": ModelConfig(depth=2, n_embd=64, head_dim=16, n_head=4, n_kv_head=2, intermediate_size=96,
                       vocab_size=101, seq_len=32),
    "wide_heads_tied": ModelConfig(depth=2, n_embd=48, head_dim=24, n_head=4, n_kv_head=1, intermediate_size=80,
                                   vocab_size=97, seq_len=32, tie_embeddings=True, rope_theta=500000.0),
    "mha_untied": ModelConfig(depth=3, n_embd=64, head_dim=32, n_head=2, n_kv_head=2, intermediate_size=128,
                              vocab_size=120, seq_len=32, norm_eps=1e-5),
}


def randomize(model: GPT, seed: int = 0) -> GPT:
    """Random values for every weight (init_weights leaves o/down at zero, which would hide mapping errors); the same
    draws as conftest's helper with matrices at scale 0.3, the model left in training mode."""
    return randomize_weights(model, seed, matrix_scale=0.3).train()


def hf_twin(model: GPT, attn: str):
    transformers = pytest.importorskip("transformers", reason="transformers is the numerical reference")
    hf_cfg = transformers.Qwen3Config(**model.hf_config_dict(), attn_implementation=attn)
    hf = transformers.Qwen3ForCausalLM(hf_cfg).float()
    missing, unexpected = hf.load_state_dict(model.to_hf_state_dict(), strict=True)
    assert not missing and not unexpected
    return hf


# ---------------------------------------------------------------------------------------------------------------------
# config


def test_resolve_derives_sizes_and_is_idempotent():
    cfg = ModelConfig(depth=4, aspect=64, head_dim=64).resolve(vocab_size=8192)
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.intermediate_size, cfg.vocab_size) == (256, 4, 4, 768, 8192)
    assert cfg.resolve() == cfg
    assert ModelConfig(vocab_size=10).resolve(vocab_size=99).vocab_size == 10  # the field wins over the tokenizer's
    cfg = ModelConfig(depth=2, n_embd=96, head_dim=32, n_kv_head=1).resolve(vocab_size=5)
    assert (cfg.n_head, cfg.n_kv_head) == (3, 1)


@pytest.mark.parametrize("kwargs, words", [
    (dict(depth=3, aspect=10, head_dim=64), "multiple of --head-dim"),
    (dict(depth=2, n_embd=128, head_dim=32, n_kv_head=3), "multiple of --n-kv-head"),
    (dict(depth=0), "--depth"),
    (dict(depth=2, head_dim=33, n_head=2), "even"),
])
def test_resolve_rejects_bad_shapes(kwargs, words):
    with pytest.raises(UserError, match=words):
        ModelConfig(**kwargs).resolve(vocab_size=100)


def test_resolve_needs_a_vocabulary():
    with pytest.raises(UserError, match="vocabulary"):
        ModelConfig().resolve()


# ---------------------------------------------------------------------------------------------------------------------
# numerics against HF transformers


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_match_hf_qwen3(name, attn):
    torch.manual_seed(0)
    model = randomize(GPT.build(CONFIGS[name])).eval()
    hf = hf_twin(model, attn).eval()
    idx = torch.randint(0, model.config.vocab_size, (3, model.config.seq_len))
    with torch.no_grad():
        ours = model(idx)
        theirs = hf(input_ids=idx).logits
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert model.num_params() == sum(p.numel() for p in hf.parameters())


def test_gradients_match_hf_qwen3():
    """The hand-written backward passes (RMSNorm, head norm + RoPE, chunked loss) against HF's plain autograd."""
    torch.manual_seed(0)
    model = randomize(GPT.build(CONFIGS["gqa"]))
    hf = hf_twin(model, "eager")
    idx = torch.randint(0, model.config.vocab_size, (2, 32))
    targets = torch.randint(0, model.config.vocab_size, (2, 32))
    targets[0, :7] = -1
    model(idx, targets).backward()
    logits = hf(input_ids=idx).logits
    F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1).backward()
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        ref = hf_params[GPT.hf_name(name)].grad
        err = (p.grad - ref).abs().max().item() / (ref.abs().max().item() + 1e-12)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


def test_positions_shift_rope_like_hf_position_ids():
    torch.manual_seed(0)
    model = randomize(GPT.build(CONFIGS["gqa"])).eval()
    hf = hf_twin(model, "eager").eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 8))
    pos = torch.tensor([3, 4, 6, 9, 10, 15, 16, 40])  # gaps: RoPE is relative, a uniform shift changes nothing
    with torch.no_grad():
        assert torch.equal(model(idx, positions=torch.arange(8)), model(idx))
        ours = model(idx, positions=pos)
        theirs = hf(input_ids=idx, position_ids=pos.unsqueeze(0).expand(2, -1)).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours - model(idx)).abs().max().item() > 1e-3  # the gaps did change something
    with torch.no_grad():
        assert (model(idx, positions=torch.arange(5, 13)) - model(idx)).abs().max().item() < 1e-4


def test_hf_state_dict_round_trip():
    model = randomize(GPT.build(CONFIGS["wide_heads_tied"]))
    sd = model.to_hf_state_dict()
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]
    assert "lm_head.weight" not in model.to_hf_state_dict(include_tied=False)
    assert "model.layers.1.self_attn.q_norm.weight" in sd and "model.layers.0.mlp.gate_proj.weight" in sd
    other = GPT.build(CONFIGS["wide_heads_tied"])
    other.load_hf_state_dict({k: v.clone() for k, v in sd.items()})
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), other.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    with pytest.raises(UserError, match="lacks"):
        other.load_hf_state_dict({})


# ---------------------------------------------------------------------------------------------------------------------
# fused pieces against plain autograd


def test_rmsnorm_matches_plain_autograd():
    torch.manual_seed(0)
    norm = RMSNorm(16, 1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 16, dtype=torch.float64)
    ours = norm(x)
    gx, gw = torch.autograd.grad(ours, (x, norm.weight), g)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    rx, rw = torch.autograd.grad(ref, (x, norm.weight), g)
    assert torch.allclose(ours, ref, atol=1e-12) and torch.allclose(gx, rx, atol=1e-10)
    assert torch.allclose(gw, rw, atol=1e-10)


def test_head_norm_rope_matches_reference():
    torch.manual_seed(0)
    B, T, H, D = 2, 7, 3, 8
    x = torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(D, dtype=torch.float64) + 0.5).requires_grad_()
    cos, sin = (t.double().view(1, T, 1, D // 2) for t in rope_tables(D, T, 10000.0))
    g = torch.randn(B, H, T, D, dtype=torch.float64)
    ours = head_norm_rope(x, w, cos, sin, 1e-6)
    assert ours.shape == (B, H, T, D) and ours.is_contiguous()
    ref = head_norm_rope_reference(x, w, cos, sin, 1e-6)
    assert torch.allclose(ours, ref, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_cross_entropy_matches_f_cross_entropy(reduction, masked):
    torch.manual_seed(0)
    N, C, V = 37, 8, 29  # 37 rows in chunks of 10: a ragged last chunk
    x = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, C, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[[0, 5, 36]] = -1
    mask = (torch.rand(N) > 0.3).double() if masked else None
    per_token = F.cross_entropy(x @ w.t(), t, ignore_index=-1, reduction="none")
    weights = (t >= 0).double() * (mask if masked else 1.0)
    ref = {"mean": (per_token * weights).sum() / weights.sum(), "sum": (per_token * weights).sum(),
           "none": per_token * weights}[reduction]
    ours = chunked_cross_entropy(x, w, t, mask, reduction, chunk_rows=10)
    assert torch.allclose(ours, ref, atol=1e-12)
    if reduction != "none":
        gx, gw = torch.autograd.grad(ours * 0.37, (x, w))  # an upstream scale, as gradient accumulation does
        rx, rw = torch.autograd.grad(ref * 0.37, (x, w))
        assert torch.allclose(gx, rx, atol=1e-12) and torch.allclose(gw, rw, atol=1e-12)
    with torch.no_grad():  # the no-grad path (evaluation) gives the same numbers
        assert torch.allclose(chunked_cross_entropy(x, w, t, mask, reduction, chunk_rows=10), ref, atol=1e-12)


def test_model_loss_equals_cross_entropy_of_logits():
    torch.manual_seed(0)
    model = randomize(GPT.build(CONFIGS["gqa"]))
    idx = torch.randint(0, 101, (2, 16))
    targets = torch.randint(0, 101, (2, 16))
    targets[1, 3:9] = -1
    with torch.no_grad():
        logits = model(idx)
        ref = F.cross_entropy(logits.view(-1, 101), targets.view(-1), ignore_index=-1, reduction="none").view(2, 16)
        assert torch.allclose(model(idx, targets), ref.sum() / (targets >= 0).sum(), atol=1e-5)
        per_token = model(idx, targets, reduction="none")
        assert per_token.shape == (2, 16) and torch.allclose(per_token, ref, atol=1e-5)
        assert torch.all(per_token[1, 3:9] == 0)
        mask = torch.zeros(2, 16)
        mask[0, :4] = 1.0
        assert torch.allclose(model(idx, targets, loss_mask=mask), ref[0, :4].mean(), atol=1e-5)
        # ignoring a target changes the mean exactly as dropping that token would
        assert torch.allclose(model(idx[:, :8], targets[:, :8]), ref[:, :8][targets[:, :8] >= 0].mean(), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# construction, init, accounting


def test_meta_build_allocates_nothing_until_to_empty():
    cfg = ModelConfig(depth=2, n_embd=64, head_dim=16, vocab_size=50000, seq_len=64)
    with torch.device("meta"):
        model = GPT(cfg)
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.is_meta for t in tensors)
    model.to_empty(device="cpu")
    model.init_weights()
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    cos, sin = rope_tables(16, model.rope_len, cfg.rope_theta)
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_init_statistics():
    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, n_embd=128, head_dim=32, vocab_size=512, seq_len=64)
    model = GPT.build(cfg)
    assert abs(model.embed_tokens.weight.std().item() - 1.0) < 0.02
    assert abs(model.lm_head.weight.std().item() - 0.001) < 0.0001
    block = model.blocks[0]
    for lin in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.mlp.gate_proj, block.mlp.up_proj):
        assert abs(lin.weight.std().item() * math.sqrt(128) - 1.0) < 0.05
        assert lin.weight.abs().max().item() <= math.sqrt(3 / 128) + 1e-6
    assert torch.all(block.attn.o_proj.weight == 0) and torch.all(block.mlp.down_proj.weight == 0)
    assert all(torch.all(m.weight == 1) for m in model.modules() if isinstance(m, RMSNorm))
    idx = torch.randint(0, 512, (4, 64))
    with torch.no_grad():
        loss = model(idx, idx).item()
    assert abs(loss - math.log(512)) < 0.05  # near-uniform predictions at init
    tied = GPT.build(dataclasses.replace(cfg, tie_embeddings=True))
    assert tied.lm_head is None and abs(tied.embed_tokens.weight.std().item() * math.sqrt(128) - 1) < 0.02


def test_param_and_flop_accounting():
    cfg = ModelConfig(depth=4, n_embd=256, head_dim=64, n_head=4, n_kv_head=2, intermediate_size=768,
                      vocab_size=8192, seq_len=512)
    with torch.device("meta"):
        model = GPT(cfg)
    C, L, V, D = 256, 4, 8192, 64
    attn = C * 4 * D + 2 * C * 2 * D + 4 * D * C  # q, k, v (2 kv heads), o
    mlp = 3 * C * 768
    per_block = attn + mlp + 2 * C + 2 * D  # + attn/mlp norms + q/k norms
    assert model.num_params() == V * C + L * per_block + C + V * C
    assert model.num_params(non_embedding=True) == model.num_params() - V * C
    assert model.flops_per_token() == 6 * (L * (attn + mlp) + V * C) + 12 * L * 4 * D * 512
    tied = dataclasses.replace(cfg, tie_embeddings=True)
    with torch.device("meta"):
        tied_model = GPT(tied)
    assert tied_model.num_params() == model.num_params() - V * C
    assert tied_model.num_params(non_embedding=True) == tied_model.num_params()


def test_runs_under_bf16_autocast():
    torch.manual_seed(0)
    model = randomize(GPT.build(CONFIGS["gqa"]))
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        ref = model(idx, idx).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
        logits = model(idx)
    loss.backward()
    assert logits.dtype == torch.float32
    assert abs(loss.item() - ref) / ref < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_too_long_sequence_is_a_user_error():
    model = GPT.build(dataclasses.replace(CONFIGS["gqa"], seq_len=4))
    with pytest.raises(UserError, match="longer"):
        model(torch.zeros(1, 17, dtype=torch.long))

"""Tests for chatsmith.optim: AdamW against torch.optim.AdamW, Muon against a plain reference written here,
Newton-Schulz orthogonality, exact state_dict round trips (bit-exact resumed losses) and the schedules.

    .venv/bin/pytest tests/test_optim.py -q
"""

import copy
import dataclasses
import io

import pytest
import torch

from chatsmith.config import OptimConfig
from chatsmith.model import GPT, ModelConfig
from chatsmith.optim import (
    NS_COEFFS,
    MuonAdamW,
    apply_schedules,
    build_optimizer,
    lr_multiplier,
    muon_momentum,
    newton_schulz,
)

SMALL = ModelConfig(depth=2, n_embd=64, head_dim=16, n_kv_head=2, intermediate_size=160, vocab_size=97, seq_len=16)


def fixed_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) for p in params]


# ---------------------------------------------------------------------------------------------------------------------
# AdamW


def test_adamw_groups_equal_torch_adamw():
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    ours_p = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
    hp = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    ours = MuonAdamW([dict(kind="adamw", params=ours_p, **hp)])
    ref = torch.optim.AdamW(ref_p, **hp)
    for step in range(6):
        for p, q, g in zip(ours_p, ref_p, fixed_grads(ours_p, step)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(ours_p, ref_p):
        assert (p - q).abs().max().item() < 1e-6
        assert (p - q.detach()).abs().max().item() < 1e-6 * max(1.0, q.abs().max().item())
    assert not torch.equal(ours_p[0], torch.zeros_like(ours_p[0]))


# ---------------------------------------------------------------------------------------------------------------------
# Muon


def reference_newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic iteration, one matrix, the textbook way (float64)."""
    a, b, c = NS_COEFFS
    X = G.double()
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.T if tall else X


@pytest.mark.parametrize("shape", [(32, 32), (16, 48), (48, 16), (24, 30)])
def test_muon_equals_plain_reference(shape):
    """Momentum, Nesterov, Newton-Schulz, the shape-aware scale and weight decay over several steps; shapes cover the
    square, wide (Gram-form Newton-Schulz), tall (transposed) and nearly-square cases."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape) * 0.1) for _ in range(3)]
    ref = [p.detach().double().clone() for p in params]
    bufs = [torch.zeros_like(r) for r in ref]
    lr, wd = 0.05, 0.1
    opt = MuonAdamW([dict(kind="muon", params=params, lr=lr, momentum=0.9, weight_decay=wd, ns_steps=5)])
    rows, cols = shape
    for step in range(4):
        m = muon_momentum(step * 100)  # a changing momentum, as the schedule does
        opt.param_groups[0]["momentum"] = m
        grads = fixed_grads(params, step)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            bufs[i] = m * bufs[i] + (1 - m) * g.double()
            update = (1 - m) * g.double() + m * bufs[i]
            ref[i] = ref[i] * (1 - lr * wd) - lr * max(1, rows / cols) ** 0.5 * reference_newton_schulz(update)
    for p, r in zip(params, ref):
        assert (p.double() - r).abs().max().item() < 2e-5
    moved = (params[0].double() - torch.randn(shape).double()).abs().max().item()
    assert moved > 1e-3


@pytest.mark.parametrize("shape", [(256, 256), (128, 384), (384, 128), (4, 64, 192)])
def test_newton_schulz_output_is_nearly_orthogonal(shape):
    """The quintic does not converge to exactly 1: for inputs whose singular values span a factor 20 they land in
    about [0.68, 1.13] after 5 steps (measured); we check [0.6, 1.2] and the angle to the exact polar factor. (Singular
    values below ~1/500 of the Frobenius norm stay small: a square Gaussian matrix keeps a few near 0.1.)"""
    torch.manual_seed(0)
    U, _, Vh = torch.linalg.svd(torch.randn(shape), full_matrices=False)
    k = min(shape[-2:])
    G = U @ torch.diag_embed(torch.linspace(0.05, 1.0, k).expand(U.shape[:-2] + (k,))) @ Vh  # condition number 20
    X = newton_schulz(G, 5, torch.float32)
    assert X.shape == G.shape and X.dtype == torch.float32
    sv = torch.linalg.svdvals(X.double())
    assert sv.min().item() > 0.6 and sv.max().item() < 1.2
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    polar = U @ Vh  # the exact orthogonalisation Muon approximates
    cos = (X.double() * polar).sum((-2, -1)) / (X.double().norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert cos.min().item() > 0.98
    for i, g in enumerate(G.reshape(-1, *shape[-2:])):  # batched == one by one == the textbook loop
        assert torch.allclose(X.reshape(-1, *shape[-2:])[i].double(), reference_newton_schulz(g), atol=1e-4)


def test_newton_schulz_in_bf16_is_close():
    G = torch.randn(64, 192)
    ref = newton_schulz(G, 5, torch.float32)
    bf = newton_schulz(G, 5, torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    assert (bf.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()


# ---------------------------------------------------------------------------------------------------------------------
# build_optimizer


def test_build_optimizer_groups_and_lr_scaling():
    model = GPT.build(SMALL)
    cfg = OptimConfig()
    opt = build_optimizer(model, cfg)
    seen = [p for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(map(id, seen))) == len(list(model.parameters()))
    scale = (64 / 768) ** -0.5
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["embed"]["params"] == [model.embed_tokens.weight]
    assert by_name["head"]["params"] == [model.lm_head.weight]
    assert by_name["embed"]["lr"] == pytest.approx(cfg.embed_lr * scale)
    assert by_name["head"]["lr"] == pytest.approx(cfg.head_lr * scale)
    assert by_name["scalars"]["lr"] == pytest.approx(cfg.scalar_lr * scale)
    assert all(p.dim() == 1 for p in by_name["scalars"]["params"])
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    assert sum(len(g["params"]) for g in muon) == 2 * 7  # q, k, v, o, gate, up, down per block
    assert all(g["lr"] == cfg.matrix_lr and g["momentum"] == pytest.approx(0.85) for g in muon)
    assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)
    tied = GPT.build(dataclasses.replace(SMALL, tie_embeddings=True))
    groups = {g["name"]: g for g in build_optimizer(tied, cfg).param_groups}
    assert "embed" not in groups and groups["head"]["params"] == [tied.embed_tokens.weight]


def test_muon_group_rejects_mixed_shapes():
    with pytest.raises(ValueError, match="one shape"):
        MuonAdamW([dict(kind="muon", params=[torch.nn.Parameter(torch.zeros(2, 3)),
                                             torch.nn.Parameter(torch.zeros(3, 2))], lr=0.1, momentum=0.9,
                        weight_decay=0.0, ns_steps=5)])


# ---------------------------------------------------------------------------------------------------------------------
# state_dict round trip: a resumed run reproduces losses bit-exactly


def run_steps(model, opt, cfg, start, stop, total, batches):
    losses = []
    for step in range(start, stop):
        apply_schedules(opt, step, total, cfg)
        x, y = batches[step]
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_state_dict_round_trip_reproduces_losses_exactly():
    cfg = OptimConfig(warmup_frac=0.25, warmdown_frac=0.5, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, 97, (2, 16), generator=gen) for _ in range(8)]
    batches = [(x, (3 * x + 1) % 97) for x in xs]  # a learnable map, so the loss must fall
    torch.manual_seed(0)
    model = GPT.build(SMALL)
    opt = build_optimizer(model, cfg)
    straight = run_steps(model, opt, cfg, 0, 8, 8, batches)

    torch.manual_seed(0)
    model = GPT.build(SMALL)
    opt = build_optimizer(model, cfg)
    first = run_steps(model, opt, cfg, 0, 4, 8, batches)
    weights = copy.deepcopy(model.state_dict())
    blob = io.BytesIO()
    torch.save(opt.state_dict(), blob)
    del model, opt

    resumed_model = GPT.build(SMALL)
    resumed_opt = build_optimizer(resumed_model, cfg)
    resumed_model.load_state_dict(weights)
    blob.seek(0)
    resumed_opt.load_state_dict(torch.load(blob, weights_only=True))
    rest = run_steps(resumed_model, resumed_opt, cfg, 4, 8, 8, batches)
    assert first + rest == straight  # bit-exact, not approximately
    assert straight[-1] < straight[0]
    sd = resumed_opt.state_dict()
    assert {g["kind"] for g in sd["param_groups"]} == {"muon", "adamw"}
    assert all("initial_lr" in g and "lr" in g for g in sd["param_groups"])


# ---------------------------------------------------------------------------------------------------------------------
# schedules


def test_lr_multiplier_key_points():
    f = lambda step: lr_multiplier(step, 100, 0.1, 0.2, 0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1)  # warmup: (step + 1) / 10
    assert f(9) == pytest.approx(1.0)
    assert f(10) == f(50) == f(80) == 1.0
    assert f(90) == pytest.approx(0.5 + 0.5 * 0.1)  # halfway through the warmdown
    assert f(100) == pytest.approx(0.1)  # reaches final_lr_frac at the end
    assert all(f(s) >= f(s + 1) for s in range(80, 100))
    assert lr_multiplier(5, 10, 0.0, 0.0, 0.0) == 1.0  # no warmup, no warmdown


def test_muon_momentum_key_points():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(10_000) == pytest.approx(0.95)


def test_apply_schedules_sets_every_group():
    model = GPT.build(SMALL)
    cfg = OptimConfig(warmup_frac=0.0, warmdown_frac=0.5, final_lr_frac=0.0)
    opt = build_optimizer(model, cfg)
    apply_schedules(opt, 75, 100, cfg)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(g["initial_lr"] * 0.5)
        if g["kind"] == "muon":
            assert g["momentum"] == pytest.approx(muon_momentum(75))

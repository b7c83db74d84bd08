"""GPU presets: they parse into valid configs, their estimates count the model's own parameters and FLOPs, and the
budget sentence says when the data is too small.

    .venv/bin/pytest tests/test_presets.py -q
"""

import pytest
import torch

from chatsmith import config
from chatsmith.model import GPT, ModelConfig
from chatsmith.presets_gpu import GPU_PRESETS, GPUS_OF, budget_note, estimate, estimate_preset


def meta_model(mcfg):
    with torch.device("meta"):
        return GPT(mcfg)


@pytest.mark.parametrize("name", sorted(GPU_PRESETS))
def test_preset_parses_and_its_estimate_counts_the_models_parameters(name):
    cfg = config.parse(config.PretrainStage, ["--preset", name])
    p = GPU_PRESETS[name]()
    mcfg = cfg.model.resolve(vocab_size=p["tokenizer"]["vocab_size"])
    model = meta_model(mcfg)
    est = estimate_preset(name)
    assert est["params"] == model.num_params()
    assert est["flops_per_token"] == model.flops_per_token()
    tc = cfg.train
    per_forward = tc.device_batch * mcfg.seq_len * GPUS_OF[name]
    assert tc.batch_tokens % per_forward == 0  # gradient accumulation divides evenly at the preset's GPU count
    assert est["total_gib"] < 80  # the 80 GB-class GPU the presets are written for
    want_hours = model.flops_per_token() * tc.steps * tc.batch_tokens / (
        est["mfu_assumed"] * est["peak_tflops"] * 1e12 * GPUS_OF[name]) / 3600
    assert est["hours"] == pytest.approx(want_hours)


def test_estimate_parts_by_hand():
    mcfg = ModelConfig(depth=2, aspect=32, head_dim=16, vocab_size=100, seq_len=8).resolve()
    model = meta_model(mcfg)
    n = model.num_params()
    matrices = sum(p.numel() for name, p in model.named_parameters() if name.startswith("blocks.") and p.dim() == 2)
    gib = 2**30
    ddp = estimate(mcfg, device_batch=3, world_size=4, tokens=1000)
    fsdp = estimate(mcfg, device_batch=3, world_size=4, tokens=1000, parallel="fsdp")
    assert ddp["params"] == n
    assert ddp["weights_gib"] * gib == pytest.approx(4 * n) and fsdp["weights_gib"] * gib == pytest.approx(n)
    assert ddp["optimizer_gib"] * gib == pytest.approx(4 * matrices + 8 * (n - matrices))  # Muon 1 buffer, AdamW 2
    assert ddp["activations_gib"] * gib == pytest.approx(3 * 8 * (34 * 64 * 2 + 6 * 100))
    assert fsdp["activations_gib"] == ddp["activations_gib"]  # sharding does not split a rank's activations


def test_budget_note():
    assert budget_note(10_000, 10, 1000) is None
    note = budget_note(4_000, 10, 1000)
    assert "4,000 tokens" in note and "10,000" in note and "2.5 times" in note

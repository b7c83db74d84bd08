"""Precision chosen by measurement (common.choose_precision): the decision with a faked probe (faster bf16 -> bf16,
slower -> fp32), the per-machine cache (hit, and invalidation by CPU model, torch version, threads and shapes), CUDA
without probing, the probe shapes against the model's own matmuls, the real probe's figures, the GPU peak table.
No timings are asserted.

    .venv/bin/pytest tests/test_precision.py -q
"""

import json
import math

import pytest
import torch

from chatsmith import common
from chatsmith.common import UserError, choose_precision
from chatsmith.model import GPT, ModelConfig


class FakeProbe:
    """A probe that returns fixed figures and counts its calls."""

    def __init__(self, bf16: float, fp32: float):
        self.figures = {"bf16_flops": bf16, "fp32_flops": fp32}
        self.calls: list[tuple] = []

    def __call__(self, shapes, device):
        self.calls.append((shapes, device))
        return dict(self.figures)


SHAPES = ((64, 32, 96), (64, 96, 32))


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_faster_bf16_is_chosen_and_recorded():
    probe = FakeProbe(bf16=3e11, fp32=1e11)
    choice = choose_precision("cpu", "auto", SHAPES, probe=probe)
    assert (choice.precision, choice.reason, choice.dtype) == ("bf16", "measured", torch.bfloat16)
    assert (choice.bf16_flops, choice.fp32_flops) == (3e11, 1e11)
    assert probe.calls == [(SHAPES, "cpu")]
    saved = json.loads(common.machine_file().read_text())["precision"]
    assert len(saved) == 1 and saved[0]["precision"] == "bf16" and saved[0]["bf16_flops"] == 3e11
    assert saved[0]["key"] == {**common.machine_key("cpu"), "shapes": [list(s) for s in SHAPES]}


def test_slower_bf16_gives_fp32():
    choice = choose_precision("cpu", "auto", SHAPES, probe=FakeProbe(bf16=1.7e11, fp32=2.5e11))
    assert (choice.precision, choice.dtype, choice.fp32_flops) == ("fp32", None, 2.5e11)


def test_cache_hit_does_not_probe_again():
    first = choose_precision("cpu", "auto", SHAPES, probe=FakeProbe(bf16=3e11, fp32=1e11))

    def no_probe(shapes, device):
        raise AssertionError("the cached decision should have been used")

    again = choose_precision("cpu", "auto", SHAPES, probe=no_probe)
    assert again.reason == "cached"
    assert (again.precision, again.bf16_flops, again.fp32_flops) == (first.precision, 3e11, 1e11)


@pytest.mark.parametrize("change", ["cpu", "torch", "threads", "shapes"])
def test_cache_invalidation(change, monkeypatch):
    """Another CPU model, torch version, thread count or shape set is another key: probed afresh, and the old entry
    stays for its own key."""
    choose_precision("cpu", "auto", SHAPES, probe=FakeProbe(bf16=3e11, fp32=1e11))
    shapes = SHAPES
    if change == "cpu":
        monkeypatch.setattr(common, "cpu_model", lambda: "Some Other CPU @ 2.0GHz")
    elif change == "torch":
        monkeypatch.setattr(torch, "__version__", "9.9.9")
    elif change == "threads":
        torch.set_num_threads(1 if torch.get_num_threads() != 1 else 2)
    else:
        shapes = ((128, 32, 96),)
    probe = FakeProbe(bf16=1e11, fp32=2e11)
    choice = choose_precision("cpu", "auto", shapes, probe=probe)
    assert len(probe.calls) == 1 and (choice.precision, choice.reason) == ("fp32", "measured")
    assert len(json.loads(common.machine_file().read_text())["precision"]) == 2


def test_unreadable_cache_is_probed_again():
    common.machine_file().parent.mkdir(parents=True, exist_ok=True)
    common.machine_file().write_text("{not json")
    probe = FakeProbe(bf16=3e11, fp32=1e11)
    assert choose_precision("cpu", "auto", SHAPES, probe=probe).precision == "bf16" and len(probe.calls) == 1
    assert json.loads(common.machine_file().read_text())["precision"][0]["precision"] == "bf16"


def test_pinned_and_bad_values_never_probe():
    def no_probe(shapes, device):
        raise AssertionError("a pinned precision must not probe")

    assert choose_precision("cpu", "bf16", probe=no_probe).dtype is torch.bfloat16
    assert choose_precision("cpu", "fp32", probe=no_probe).dtype is None
    assert choose_precision("cpu", "fp32").reason == "pinned"
    with pytest.raises(UserError, match="--precision"):
        choose_precision("cpu", "fp16")
    assert not common.machine_file().exists()


@pytest.mark.parametrize("capability, expected", [((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 5), "fp32")])
def test_cuda_decides_by_capability_without_probing(capability, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)

    def no_probe(shapes, device):
        raise AssertionError("CUDA is not probed")

    choice = choose_precision("cuda", "auto", SHAPES, probe=no_probe)
    assert choice.precision == expected and choice.bf16_flops is None


def test_autocast_dtype_and_has_fast_bf16_follow_the_probe(monkeypatch):
    monkeypatch.setattr(common, "precision_probe", FakeProbe(bf16=1e11, fp32=2e11))
    assert common.autocast_dtype("cpu", "auto") is None and not common.has_fast_bf16("cpu")
    common.machine_file().unlink()
    monkeypatch.setattr(common, "precision_probe", FakeProbe(bf16=4e11, fp32=2e11))
    assert common.autocast_dtype("cpu", "auto") is torch.bfloat16 and common.has_fast_bf16("cpu")


def test_probe_shapes_are_the_models_matmuls():
    """Brute force: every distinct (in, out) of the model's nn.Linear layers and the head, at the batch's rows."""
    cfg = ModelConfig(depth=2, n_embd=64, head_dim=16, n_head=4, n_kv_head=2, vocab_size=300, seq_len=32).resolve()
    model = GPT.build(cfg)
    rows = 3 * cfg.seq_len
    linears = {(rows, m.in_features, m.out_features) for m in model.blocks.modules()
               if isinstance(m, torch.nn.Linear)}
    head = model.head_weight()
    assert set(common.probe_shapes(cfg, rows)) == linears | {(rows, head.size(1), head.size(0))}
    assert {r for r, _, _ in common.probe_shapes(cfg, 10**6)} == {2048, 512}  # rows capped; the head in 512s


def test_real_probe_figures_and_threads_restored():
    torch.set_num_threads(2)
    figures = common.precision_probe(SHAPES, budget_s=0.05, min_rounds=2)
    assert set(figures) == {"bf16_flops", "fp32_flops"}
    assert all(math.isfinite(v) and v > 0 for v in figures.values())
    assert torch.get_num_threads() == 2  # probed on one thread, the caller's count given back


def test_gpu_peak_table():
    assert common.datasheet_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
    assert common.datasheet_peak_flops("NVIDIA H100 PCIe", "float32") == 51.2e12
    assert common.datasheet_peak_flops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
    assert common.datasheet_peak_flops("NVIDIA L40S", "bfloat16") == 362.05e12
    assert common.datasheet_peak_flops("NVIDIA L4", "bfloat16") == 121e12
    assert common.datasheet_peak_flops("NVIDIA GeForce RTX 4090", "float32") == 82.6e12
    assert common.datasheet_peak_flops("NVIDIA A10G", "bfloat16") is None  # not the A10: whole words only
    assert common.datasheet_peak_flops("Tesla T4", "bfloat16") is None
    peak, source = common.peak_flops("float32", "cpu")
    assert peak > 0 and "measured 2048^3" in source


@pytest.mark.slow  # a tokenizer, shards and two pretraining steps with samples: about a minute on the busy machine
def test_pretraining_records_the_decision(monkeypatch, tmp_path):
    """A pretraining run under `auto` probes at its own shapes and writes the choice and both figures into
    metrics.jsonl and its summary."""
    from chatsmith import config, tokenizer, train
    from chatsmith.data import shards

    corpus = tmp_path / "corpus.jsonl"
    words = "the model reads text and learns to predict the next token from small examples".split()
    corpus.write_text("".join(json.dumps({"text": f"{i}: " + " ".join(words[(i * j) % len(words)] for j in range(40))})
                              + "\n" for i in range(200)))
    base = ["--preset", "smoke", "--run", "p", "--sources", f"local:{corpus}", "--val-fraction", "0.2"]
    tokenizer.train_main(config.parse(config.TokenizerStage, [*base, "--vocab-size", "400"]))
    shards.main(config.parse(config.DataStage, base))
    probe = FakeProbe(bf16=5e11, fp32=1e11)
    monkeypatch.setattr(common, "precision_probe", probe)
    summary = train.main(config.parse(config.PretrainStage, ["--preset", "smoke", "--run", "p", "--steps", "2",
                                                             "--eval-every", "0", "--ckpt-every", "2"]))
    vocab = tokenizer.Tokenizer.load(common.run_dir("p") / "tokenizer").vocab_size
    cfg = ModelConfig(depth=2, aspect=32, head_dim=32, seq_len=128).resolve(vocab_size=vocab)
    assert (common.probe_shapes(cfg, 4 * 128), "cpu") in probe.calls  # the run's shapes: smoke's 4 x 128 rows
    recorded = train.read_metrics(common.run_dir("p"), "precision")
    expected = {"precision": "bf16", "reason": "measured", "bf16_flops": 5e11, "fp32_flops": 1e11}
    assert [{k: r[k] for k in expected} for r in recorded] == [expected]
    assert summary["precision"] == expected

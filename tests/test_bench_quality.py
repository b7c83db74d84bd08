"""bench quality on a tiny run and a tiny model: the JSON's arithmetic (ratios, tokens, lower bounds), the sweep's
choice, the same held-out windows for both contenders (each step-0 score checked against a brute-force bits per
byte of the same freshly initialised model), the baseline's recipe (fused AdamW, decay groups, warmup + cosine
against the closed form), the chatsmith step against a plain Muon + AdamW loop, the PNG, the errors. Speed is never
asserted.

    .venv/bin/pytest tests/test_bench_quality.py -q
"""

import json
import math
import os
import random

import pytest
import torch

from chatsmith import config
from chatsmith.bench import quality
from chatsmith.common import UserError, run_dir

TINY = dict(run="tiny", depth=1, n_embd=32, head_dim=16, seq_len=32, batch=2, max_steps=6, eval_every=2,
            eval_tokens=128, sweep_lrs=(1e-3, 1e-2, 3e-2), sweep_steps=3, precision="fp32", threads=1, json=True)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A CHATSMITH_HOME with run 'tiny': a tokenizer and shards made by the stages from a small local corpus."""
    pytest.importorskip("transformers", reason="the baseline of bench quality needs transformers")
    from chatsmith import tokenizer
    from chatsmith.data import shards

    home = tmp_path_factory.mktemp("home")
    corpus = home / "corpus.jsonl"
    rng = random.Random(0)
    words = "the model reads text and learns to predict the next token from many small examples".split()
    corpus.write_text("".join(json.dumps({"text": f"{i}: " + " ".join(rng.choice(words) for _ in range(60))}) + "\n"
                              for i in range(300)))
    flags = ["--preset", "smoke", "--run", "tiny", "--sources", f"local:{corpus}", "--val-fraction", "0.1"]
    old = os.environ.get("CHATSMITH_HOME")
    os.environ["CHATSMITH_HOME"] = str(home)
    try:
        tokenizer.train_main(config.parse(config.TokenizerStage, [*flags, "--vocab-size", "320"]))
        shards.main(config.parse(config.DataStage, flags))
    finally:
        if old is None:
            del os.environ["CHATSMITH_HOME"]
        else:
            os.environ["CHATSMITH_HOME"] = old
    return home


def bench(capsys, **overrides) -> dict:
    result = quality.main(quality.QualityBench(quality.QualityBenchConfig(**{**TINY, **overrides})))
    assert json.loads(capsys.readouterr().out) == result  # --json prints exactly the returned dict
    return result


@pytest.fixture
def use_home(home, monkeypatch):
    monkeypatch.setenv("CHATSMITH_HOME", str(home))
    return home


def test_reachable_target_ratios_and_plot(capsys, use_home, tmp_path):
    """A target above the starting bpb: both reach it at the first evaluation, and every ratio follows from the
    reported seconds and tokens."""
    png = tmp_path / "q.png"
    r = bench(capsys, target_bpb=50.0, plot=str(png))
    ours, theirs = r["chatsmith"], r["hf_transformers"]
    for lane in (ours, theirs):
        assert lane["reached"] and lane["steps_to_target"] == 2 and lane["tokens_to_target"] == 2 * 2 * 32
        assert [p["step"] for p in lane["curve"]] == [0, 2]  # stopped once there
        assert lane["seconds_to_target"] == lane["curve"][-1]["seconds"] > 0
    assert math.isclose(r["time_ratio_hf_over_chatsmith"], theirs["seconds_to_target"] / ours["seconds_to_target"])
    assert r["token_ratio_hf_over_chatsmith"] == 1.0 and r["ratios_are_lower_bounds"] is False
    assert r["goal_1_5x_sooner_met"] == (r["time_ratio_hf_over_chatsmith"] >= 1.5)
    assert r["config"] == "bench-ref with overrides" and r["tokens_per_step"] == 64
    assert r["precision"]["precision"] == "fp32" and r["eval_tokens"] == 128
    sweep = r["sweep"]
    assert sweep["lrs"] == [1e-3, 1e-2, 3e-2] and len(sweep["runs"]) == 3
    assert sweep["final_val_bpb"] == [run["curve"][-1]["val_bpb"] for run in sweep["runs"]]
    assert sweep["best_lr"] == sweep["lrs"][min(range(3), key=sweep["final_val_bpb"].__getitem__)]
    assert [p["step"] for p in sweep["runs"][0]["curve"]] == [0, 2, 3]  # every eval_every and the last step
    assert f"lr {sweep['best_lr']:g}" in theirs["recipe"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unreached_target_and_same_windows(capsys, use_home):
    """A target no one reaches: both train the whole horizon, evaluated at the same steps, no ratio is claimed; the
    step-0 scores equal a brute-force bits per byte of the same freshly built models on the same windows."""
    import torch.nn.functional as F
    import transformers

    from chatsmith.data.shards import iter_val_batches
    from chatsmith.model import GPT
    from chatsmith.tokenizer import Tokenizer

    r = bench(capsys, target_bpb=0.01)
    for name in ("chatsmith", "hf_transformers"):
        lane = r[name]
        assert not lane["reached"] and lane["seconds_to_target"] is None and lane["steps_trained"] == 6
        assert [p["step"] for p in lane["curve"]] == [0, 2, 4, 6]
        assert [p["tokens"] for p in lane["curve"]] == [0, 128, 256, 384]
    assert r["time_ratio_hf_over_chatsmith"] is None and r["goal_1_5x_sooner_met"] is False

    b = quality.QualityBenchConfig(**TINY)
    mcfg = quality.model_config(b)
    run = run_dir("tiny")
    token_bytes = Tokenizer.load(run / "tokenizer").token_bytes()
    windows = list(iter_val_batches(run / "shards" / "val", b.batch, mcfg.seq_len, b.eval_tokens))
    torch.manual_seed(b.seed)
    ours = GPT.build(mcfg)
    torch.manual_seed(b.seed)
    theirs = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**ours.hf_config_dict()))

    def brute_bpb(logits_of) -> float:
        nats, nbytes = 0.0, 0
        with torch.no_grad():
            for x, y in windows:
                for i in range(y.size(0)):
                    for t in range(y.size(1)):
                        if y[i, t] < 0 or token_bytes[y[i, t]] == 0:
                            continue
                        nats += float(F.cross_entropy(logits_of(x)[i, t].double(), y[i, t]))
                        nbytes += int(token_bytes[y[i, t]])
        return nats / (math.log(2) * nbytes)

    cache = {}

    def memo(fn):
        return lambda x: cache.setdefault((id(fn), x.data_ptr()), fn(x))

    ours_logits = memo(lambda x: ours(x).float())
    theirs_logits = memo(lambda x: theirs(input_ids=x).logits.float())
    assert math.isclose(r["chatsmith"]["curve"][0]["val_bpb"], brute_bpb(ours_logits), rel_tol=1e-4)
    assert math.isclose(r["hf_transformers"]["curve"][0]["val_bpb"], brute_bpb(theirs_logits), rel_tol=1e-4)


def test_baseline_recipe_and_schedule(use_home):
    """The HF trainer: fused AdamW, weight decay 0.1 on matrices only, betas (0.9, 0.95); its learning rate follows
    linear warmup then cosine to zero (the closed form)."""
    b = quality.QualityBenchConfig(**TINY)
    mcfg = quality.model_config(b)
    loader = _loader(b, mcfg)
    total, peak, warmup = 20, 3e-3, 0.1
    t = quality.HFTrainer(mcfg, loader, total, None, 0, peak, warmup)
    decay, no_decay = t.opt.param_groups
    assert decay["fused"] is True and decay["betas"] == (0.9, 0.95)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n_warm = round(warmup * total)
    for step in range(total):
        expected = peak * (step / n_warm if step < n_warm else
                           0.5 * (1 + math.cos(math.pi * (step - n_warm) / (total - n_warm))))
        assert math.isclose(t.opt.param_groups[0]["lr"], expected, rel_tol=1e-9, abs_tol=1e-15), step
        t.step()


def test_chatsmith_step_is_the_recipe(use_home):
    """Two steps of the chatsmith trainer equal two steps of a plain loop over the same pieces (mean loss backward,
    MuonAdamW with the default OptimConfig and its schedules) on the same batches."""
    from chatsmith.config import OptimConfig
    from chatsmith.model import GPT
    from chatsmith.optim import apply_schedules, build_optimizer

    b = quality.QualityBenchConfig(**TINY)
    mcfg = quality.model_config(b)
    t = quality.ChatsmithTrainer(mcfg, _loader(b, mcfg), 10, None, 0)
    torch.manual_seed(0)
    ref = GPT.build(mcfg)
    opt = build_optimizer(ref, OptimConfig())
    loader = _loader(b, mcfg)
    for step in range(2):
        t.step()
        apply_schedules(opt, step, 10, OptimConfig())
        x, y = loader.next_batch()
        ref(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for (name, p), q in zip(t.model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-5, rtol=1e-4), name


def _loader(b, mcfg):
    from chatsmith.data.shards import PackingLoader

    return PackingLoader(run_dir("tiny") / "shards" / "train", b.batch, mcfg.seq_len)


def test_errors(use_home):
    with pytest.raises(UserError, match="has no"):
        quality.main(quality.QualityBench(quality.QualityBenchConfig(**{**TINY, "run": "missing"})))
    cfg = config.parse(quality.QualityBench, ["--target-bpb", "1.5", "--sweep-lrs", "0.001", "0.002", "0.004",
                                              "--json"])
    assert (cfg.bench.target_bpb, cfg.bench.sweep_lrs, cfg.bench.json) == (1.5, (0.001, 0.002, 0.004), True)
    with pytest.raises(UserError, match="--sweep-lrs"):
        config.parse(quality.QualityBench, ["--sweep-lrs", "0"])

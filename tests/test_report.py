"""report: the report card of a hand-made run directory holds exactly the numbers of its files (metrics, checks,
evaluation results, stage times, the tokenizer table measured by tokenizer_eval.py), the parameter count of the
model built for real, valid non-blank PNG plots, and one line for every section whose data is missing.

    .venv/bin/pytest tests/test_report.py -q
"""

import json
import os
import random
import statistics
from pathlib import Path

import pytest
from test_tokenizer import EN, ZH, stage_flags, write_jsonl

from chatsmith import __main__ as cli
from chatsmith import config, evaluate, report
from chatsmith import tokenizer as tkz
from chatsmith import tokenizer_eval as tev
from chatsmith.model import GPT

SECTIONS = ("## Machine and versions", "## Wall time per stage", "## Tokenizer", "## Pretraining",
            "## Chat fine-tuning (SFT)", "## RL", "## Evaluation", "## Samples", "## Plots", "## Resolved config")


def jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def training_records(steps, tokens_per_step, seed, val_key="val_bpb"):
    rng = random.Random(seed)
    recs = []
    for s in range(1, steps + 1):
        recs.append({"kind": "train", "step": s, "loss": 9 - 0.3 * s + rng.random(), "lr": 0.2 * (1 - s / steps),
                     "tokens": s * tokens_per_step, "tok_s": 1000 + 100 * rng.random(), "mfu": 0.3 + 0.1 * rng.random(),
                     "dt": 0.5})
        if s % 5 == 0:
            recs.append({"kind": "val", "step": s, "val_bpb": 3 - 0.1 * s - rng.random() / 10,
                         "val_loss": 5 - 0.1 * s - rng.random() / 10})
    return recs


def task(n, correct, chance, metric="acc_norm"):
    score = correct / n
    return {"n": n, "metric": metric, "acc": score, "acc_norm": score if metric == "acc_norm" else None,
            "score": score, "ci95": [max(0.0, score - 0.1), min(1.0, score + 0.1)], "chance": chance,
            "centered": (score - chance) / (1 - chance)}


def eval_result(stage, step, tasks, **extra):
    return {"stage": stage, "step": step, "run": "fx", "checkpoint": f"step_{step:06d}",
            "created": "2026-12-01T20:00:00", "seconds": 12.5, "limit": 40, "fewshot": 0, "bpb": None, "tasks": tasks,
            "core": None, "chatcore": None, **extra}


@pytest.fixture
def fixture_run(chatsmith_home, tmp_path, monkeypatch):
    """A run directory as the stages leave it, with a real tiny tokenizer trained on local text."""
    monkeypatch.delenv("CHATSMITH_TIKTOKEN_DIR", raising=False)
    corpus = tmp_path / "mixed.jsonl"
    write_jsonl(corpus, [f"{i}: " + (EN * (1 + i % 3) if i % 2 else ZH * (1 + i % 3)) for i in range(200)])
    tok_cfg = config.parse(config.TokenizerStage, stage_flags("fx", corpus, extra=("--vocab-size", "400")))
    tkz.train_main(tok_cfg)
    run = chatsmith_home / "runs" / "fx"
    config.save(tok_cfg, run / "config.json", "tokenizer")
    mcfg = config.make(config.PretrainStage, {"run": {"preset": "smoke"}}).model.resolve(vocab_size=400)
    model_dict = {k: getattr(mcfg, k) for k in mcfg.__dataclass_fields__}
    ck = run / "checkpoints" / "step_000010"
    ck.mkdir(parents=True)
    (ck / "meta.json").write_text(json.dumps({"config": {"model": model_dict}, "git": "abc123def", "tokens": 5120,
                                              "versions": {"python": "3.11.7", "torch": "2.13.0"}}))
    jsonl(run / "metrics.jsonl", training_records(10, 512, 1) + [
        {"kind": "sample", "step": 5, "prompt": "The capital of France is", "text": "old sample"},
        {"kind": "sample", "step": 10, "prompt": "The capital of France is", "text": " Paris | and more\nlines"},
        {"kind": "sample", "step": 10, "prompt": "人工智能是", "text": "一种技术。"}])
    jsonl(run / "chat" / "metrics.jsonl", training_records(10, 256, 2) + [
        {"kind": "sample", "step": 10, "prompt": "Who are you?", "text": "I am chatsmith."},
        {"kind": "sample", "step": 10, "prompt": "你是谁？", "text": "我是 chatsmith。"}])
    (run / "chat" / "chat_checks.json").write_text(json.dumps({
        "prompts": 8, "ended_with_im_end": 7, "ended_frac": 0.875, "zh_prompts": 4, "zh_replies_mostly_han": 3,
        "zh_frac": 0.75, "replies": []}))
    (run / "speedrun.json").write_text(json.dumps({
        "stages": {"pretrain": {"seconds": 95.5, "done": "k"}, "tokenizer": {"seconds": 3.25, "done": "k"}},
        "machine": {"cpu": "Test CPU 9000", "cores": 2, "memory_gib": 23.4, "gpus": [], "cpu_flags": ["amx_bf16"],
                    "platform": "Linux-test"},
        "precision": {"pretrain": "bf16 autocast", "sft": "bf16 autocast"}}))
    (run / "eval").mkdir()
    (run / "eval" / "base_step000005.json").write_text(json.dumps(eval_result("base", 5, {
        "arc_easy": task(40, 10, 0.25)})))
    (run / "eval" / "base_step000010.json").write_text(json.dumps(eval_result("base", 10, {
        "arc_easy": task(40, 17, 0.25), "piqa": task(40, 21, 0.5)}, bpb={"all": 2.5, "en": 2.25, "zh": 3.125},
        core=0.1234)))
    (run / "eval" / "chat_base_step000020.json").write_text(json.dumps(eval_result("base", 20, {  # the chat model
        "arc_easy": task(40, 30, 0.25)}, model="sft")))  # scored by log-likelihood: not the base model's row
    (run / "eval" / "chat_step000010.json").write_text(json.dumps(eval_result("chat", 10, {
        "gsm8k": task(20, 1, 0.0, "exact"), "mmlu": task(40, 9, 0.25, "acc")}, chatcore=-0.0125)))
    return run, tok_cfg, mcfg


def assert_png(path):
    import matplotlib.image
    import numpy as np

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path
    img = matplotlib.image.imread(path)  # (H, W, channels) floats in [0, 1]
    assert img.shape[0] > 200 and img.shape[1] > 300
    rgb = img[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05  # not blank
    assert len(np.unique((rgb * 255).astype(int), axis=0)) > 20  # lines, text and bars, not one flat colour


def test_report_holds_the_files_numbers(fixture_run):
    run, tok_cfg, mcfg = fixture_run
    path = report.write(run)
    text = path.read_text(encoding="utf-8")
    for header in SECTIONS:
        assert header in text, header
    assert "Test CPU 9000, 2 cores; memory 23.4 GiB" in text and "amx_bf16" in text and "abc123def" in text

    # stage times as recorded, and their total
    assert "| tokenizer | 3.2 | 3.2s |\n| pretrain | 95.5 | 1m36s |\n| **total** | 98.8 | 1m39s |" in text  # in order

    # the tokenizer table is tokenizer_eval's measurement, kept for the next report
    expected = tev.main(tev.EvalStage(run=tok_cfg.run, data=tok_cfg.data))
    for group, row in expected["rows"].items():
        assert f"| {group} | {row['bytes'] / 1e6:.2f} | {row['docs']} | {row['chatsmith']:.3f} | n/a | n/a | n/a |" \
            in text
    assert "r50k_base.tiktoken not found" in text
    assert json.loads((run / "tokenizer_eval.json").read_text())["results"]["rows"] == expected["rows"]

    # pretraining: the model's size from a model built for real, tokens and FLOPs, the last val bpb, medians
    from chatsmith import train

    model = GPT.build(mcfg, device="cpu")
    tr, val = train.read_metrics(run, "train"), train.read_metrics(run, "val")
    assert f"{model.num_params():,} parameters" in text
    assert f"{model.num_params(non_embedding=True):,} without the input embedding" in text
    assert f"{tr[-1]['tokens']:,} tokens, {model.flops_per_token() * tr[-1]['tokens']:.3e} FLOPs" in text
    assert f"(step 10): {val[-1]['val_bpb']:.4f}" in text
    assert "all 2.5000, English 2.2500, Chinese 3.1250" in text
    assert f"median {statistics.median(r['tok_s'] for r in tr):,.0f} tokens/s" in text
    assert f"MFU median {statistics.median(r['mfu'] for r in tr):.1%}" in text
    assert "precision: bf16 autocast (recorded by the speedrun)" in text

    # SFT: last val loss and bpb, the chat checks
    sval = train.read_metrics(run / "chat", "val")[-1]
    assert f"{sval['val_loss']:.4f} nats per token, {sval['val_bpb']:.4f} bits per byte" in text
    assert "7 of 8 replies end with <|im_end|> (0.875)" in text and "3 of 4 Chinese prompts" in text

    # evaluation: the newest step per stage, its table as evaluate.py writes it, the file's numbers, above chance
    # where the interval's lower end is (arc_easy: 0.325 > 0.25; piqa: 0.425 < 0.5)
    assert "eval/base_step000010.json" in text and "base_step000005.json" not in text
    assert "chat_base_step000020" not in text
    res = json.loads((run / "eval" / "base_step000010.json").read_text())
    assert evaluate.markdown_table(res) in text
    for name, t in res["tasks"].items():
        assert (f"| {name} | 40 | acc_norm | {100 * t['score']:.1f} | {100 * t['ci95'][0]:.1f}–"
                f"{100 * t['ci95'][1]:.1f} | {100 * t['chance']:.1f} | {100 * t['centered']:.1f} |") in text
    assert "lower end above chance): arc_easy; CORE-like mean of centred scores 0.1234." in text
    assert "lower end above chance): none; ChatCORE-like mean of centred scores -0.0125." in text
    assert f"| this run | see above | {17 / 40:.4f} | {21 / 40:.4f} | above |" in text
    # reference rows: Pythia-70M's published acc_norm sits under arc_easy and piqa, nanochat's acc under mmlu
    assert "| Pythia-70M (v1.1, step 143000) | 0-shot, lm-evaluation-harness (2023) | 0.3502 | 0.5914 |" in text
    assert "| nanochat d20 (SFT, 561M) | chat format, answer letter / generation | 0.0455 | 0.3151 |" in text
    assert "| random chance | – | 0.2500 | 0.5000 | the task's choices |" in text

    # samples: the last step's, cells escaped, both languages
    assert "| The capital of France is |  Paris \\| and more ⏎ lines |" in text
    assert "| 人工智能是 | 一种技术。 |" in text and "| 你是谁？ | 我是 chatsmith。 |" in text
    assert "old sample" not in text

    for name in ("loss", "lr", "throughput", "eval"):
        assert f"(plots/{name}.png)" in text
        assert_png(run / "plots" / f"{name}.png")
    assert '"vocab_size": 400' in text  # the resolved config


def test_report_of_a_bare_run_says_what_is_missing(chatsmith_home):
    run = chatsmith_home / "runs" / "bare"
    run.mkdir(parents=True)
    text = report.write(run).read_text(encoding="utf-8")
    for header in SECTIONS:
        assert header in text, header
    for line in ("No stage times recorded", "No tokenizer table", "No pretraining yet", "No chat fine-tuning yet",
                 "No evaluation results yet", "No base model samples recorded", "No loss plot", "No eval plot",
                 "No `config.json` in the run directory"):
        assert line in text, line
    assert not list((run / "plots").glob("*.png"))


def test_report_command(fixture_run, chatsmith_home, capsys):
    run, _, _ = fixture_run
    assert cli.main(["report", "fx"]) == 0  # the run as a bare word
    assert capsys.readouterr().out.strip() == str(run / "report.md")
    assert cli.main(["report", "--run", "fx", "--no-tokenizer-eval"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.md")
    newer = chatsmith_home / "runs" / "newer"
    newer.mkdir()
    later = (run.stat().st_mtime + 10,) * 2  # directory times tick coarsely: make "newer" newer for certain
    os.utime(newer, later)
    assert cli.main(["report"]) == 0  # the newest run
    assert capsys.readouterr().out.strip().endswith("newer/report.md")
    assert cli.main(["report", "missing-run"]) == 2
    assert "run 'missing-run' does not exist" in capsys.readouterr().err


def test_machine_info_reads_this_machine():
    import os

    info = report.machine_info()
    assert info["cores"] == os.cpu_count()
    try:
        cpuinfo = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    model = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
    assert info["cpu"] == model
    flags = set(next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
    assert set(info["cpu_flags"]) == flags & set(report.SPEED_FLAGS)


def test_rl_section_and_the_cpu_tuning_table(tmp_path):
    """The RL section reads rl/metrics.jsonl (intervals from the Wilson formula); the tuning table is shown for cpu
    runs only, as the file holds it."""
    from chatsmith.tasks.scoring import wilson

    run = tmp_path / "run"
    assert report._rl_lines(run, {})[0].startswith("No RL yet")
    jsonl(run / "rl" / "metrics.jsonl", [{"kind": "eval", "step": 0, "n": 100, "correct": 29},
                                         {"kind": "train", "step": 1, "reward": 0.1},
                                         {"kind": "train", "step": 2, "reward": 0.3},
                                         {"kind": "eval", "step": 2, "n": 100, "correct": 66}])
    lines = report._rl_lines(run, {"rl": {"rl": {"task": "calc"}}})
    lo0, hi0 = wilson(29, 100)
    lo1, hi1 = wilson(66, 100)
    assert lines[0] == "- task `calc`, 2 steps; mean reward 0.100 at step 1, 0.300 at the last"
    assert f"29/100 before (95 % {lo0:.3f}-{hi0:.3f}), 66/100 after step 2 (95 % {lo1:.3f}-{hi1:.3f})" in lines[1]
    assert lines[1].endswith("the intervals do not overlap") and hi0 < lo1
    table = (Path(report.__file__).parent / "tuning_cpu.md").read_text(encoding="utf-8").strip()
    assert report._tuning_lines({"speedrun": {"run": {"preset": "cpu"}}})[2] == table
    assert report._tuning_lines({"speedrun": {"run": {"preset": "smoke"}}}) == []


def test_stage_times_follow_the_pipeline_whatever_the_eval_pass_is_called():
    stages = {n: {"seconds": 1.0} for n in ("report", "eval rl (500 items)", "eval sft", "eval rl", "sft", "mystery",
                                             "eval sft (whole sets)", "eval base", "tokenizer")}
    rows = [line.split(" | ")[0].lstrip("| ") for line in report._timing_lines({"stages": stages})
            if line.startswith("| ") and "---" not in line][1:-1]  # header and total left out
    assert rows == ["tokenizer", "sft", "eval base", "eval sft", "eval sft (whole sets)", "eval rl",
                    "eval rl (500 items)", "report", "mystery"]

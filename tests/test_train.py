"""The training loop: exact resume after SIGKILL, graceful stop on SIGTERM, bits per byte against brute force."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from chatsmith import checkpoint, config, train
from chatsmith.common import UserError

WORDS_EN = "the model reads text and learns to predict the next token from many small examples".split()
WORDS_ZH = list("我们今天学习语言模型它会预测下一个词语并且不断进步")


def write_corpus(path, n_docs=400, seed=0):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            if i % 3 == 0:
                text = "".join(rng.choice(WORDS_ZH) for _ in range(rng.randint(20, 120)))
            else:
                text = " ".join(rng.choice(WORDS_EN) for _ in range(rng.randint(10, 80)))
            f.write(json.dumps({"text": f"{i}: {text}"}, ensure_ascii=False) + "\n")


def flags(run, corpus, *extra):
    return ["--preset", "smoke", "--run", run, "--sources", f"local:{corpus}", *extra]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A CHATSMITH_HOME holding run 'base' with a tokenizer and shards (built once for the module)."""
    from chatsmith import tokenizer
    from chatsmith.data import shards

    home = tmp_path_factory.mktemp("home")
    corpus = home / "corpus.jsonl"
    write_corpus(corpus)
    old = os.environ.get("CHATSMITH_HOME")
    os.environ["CHATSMITH_HOME"] = str(home)
    try:
        tokenizer.train_main(config.parse(config.TokenizerStage, flags("base", corpus, "--vocab-size", "512")))
        shards.main(config.parse(config.DataStage, flags("base", corpus)))
    finally:
        if old is None:
            del os.environ["CHATSMITH_HOME"]
        else:
            os.environ["CHATSMITH_HOME"] = old
    return home


def clone_run(home, name):
    dst = home / "runs" / name
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for part in ("tokenizer", "shards"):
        shutil.copytree(home / "runs" / "base" / part, dst / part)
    return dst


PRETRAIN = ["--steps", "24", "--ckpt-every", "4", "--eval-every", "8", "--eval-tokens", "2048", "--threads", "1"]


def pretrain_cmd(run, *extra):
    return [sys.executable, "-m", "chatsmith", "pretrain", "--preset", "smoke", "--run", run, *PRETRAIN, *extra]


def losses(run_path):
    return [(r["step"], r["loss"]) for r in train.read_metrics(run_path, "train")]


def test_exact_resume_after_sigkill(prepared):
    env = {**os.environ, "CHATSMITH_HOME": str(prepared)}
    ref = clone_run(prepared, "reference")
    subprocess.run(pretrain_cmd("reference"), env=env, check=True, capture_output=True, timeout=300)
    expected = losses(ref)
    assert [s for s, _ in expected] == list(range(1, 25))

    killed = clone_run(prepared, "killed")
    kill_after = random.Random().randint(5, 19)  # a random step, not aligned with the checkpoint interval
    proc = subprocess.Popen(pretrain_cmd("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(losses(killed)) >= kill_after:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(losses(killed)) < 24, "the run finished before it could be killed"

    out = subprocess.run(pretrain_cmd("killed", "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "resuming" in out.stderr
    assert losses(killed) == expected  # exact equality, per step


def test_sigterm_checkpoints_at_step_boundary_and_resumes(prepared):
    env = {**os.environ, "CHATSMITH_HOME": str(prepared)}
    run = clone_run(prepared, "termed")
    proc = subprocess.Popen(pretrain_cmd("termed", "--ckpt-every", "1000"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(losses(run)) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    done = len(losses(run))
    ckpts = checkpoint.list_checkpoints(run / "checkpoints")
    assert ckpts and ckpts[-1].name == f"step_{done:06d}", (ckpts, done, err)


def test_refuses_to_overwrite_without_resume(prepared, monkeypatch):
    monkeypatch.setenv("CHATSMITH_HOME", str(prepared))
    run = clone_run(prepared, "twice")
    cfg = config.parse(config.PretrainStage, ["--preset", "smoke", "--run", "twice", "--steps", "2",
                                              "--eval-every", "0"])
    train.main(cfg)
    assert checkpoint.list_checkpoints(run / "checkpoints")
    with pytest.raises(UserError, match="--resume"):
        train.main(cfg)


def test_smoke_pretraining_learns(prepared, monkeypatch):
    monkeypatch.setenv("CHATSMITH_HOME", str(prepared))
    run = clone_run(prepared, "learn")
    cfg = config.parse(config.PretrainStage, ["--preset", "smoke", "--run", "learn", "--steps", "30",
                                              "--eval-every", "10", "--eval-tokens", "4096"])
    summary = train.main(cfg)
    vals = [r["val_bpb"] for r in train.read_metrics(run, "val")]
    assert len(vals) == 3 and summary["val_bpb"] == vals[-1]
    assert vals[0] > vals[1] > vals[2], vals
    samples = train.read_metrics(run, "sample")  # at every checkpoint (ckpt_every 10) and at the end
    assert [(r["step"], r["prompt"]) for r in samples] == [(s, p) for s in (10, 20, 30) for p in train.SAMPLE_PROMPTS]


def test_evaluate_bpb_matches_brute_force(prepared):  # train.evaluate's bits per byte
    from chatsmith.data.shards import iter_val_batches
    from chatsmith.model import GPT
    from chatsmith.tokenizer import Tokenizer

    run = prepared / "runs" / "base"
    tok = Tokenizer.load(run / "tokenizer")
    mcfg = config.make(config.PretrainStage, {"run": {"preset": "smoke"}}).model.resolve(vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = GPT.build(mcfg)
    tb = tok.token_bytes()
    got = train.evaluate(model, iter_val_batches(run / "shards" / "val", 2, mcfg.seq_len, 1024), tb, "cpu", None)["bpb"]
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for x, y in iter_val_batches(run / "shards" / "val", 2, mcfg.seq_len, 1024):
            logp = torch.log_softmax(model(x).double(), dim=-1)
            for b in range(y.shape[0]):
                for t in range(y.shape[1]):
                    target = int(y[b, t])
                    if target >= 0 and int(tb[target]) > 0:
                        nats -= float(logp[b, t, target])
                        nbytes += int(tb[target])
    assert got == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-5)

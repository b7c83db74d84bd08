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


def test_sigterm_checkpoints_at_step_boundary_and_resumes(prepared, monkeypatch):
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
    before = losses(run)
    monkeypatch.setenv("CHATSMITH_HOME", str(prepared))  # resume from that checkpoint, here, to the end
    train.main(config.parse(config.PretrainStage, ["--preset", "smoke", "--run", "termed", *PRETRAIN,
                                                   "--ckpt-every", "1000", "--resume"]))
    after = losses(run)
    assert [s for s, _ in after] == list(range(1, 25)) and after[:done] == before  # each step once, none redone


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


# ---------------------------------------------------------------------------------------------------------------------
# gradient accumulation, resume with other flags, seed, data statistics


def tiny_model(seed=0):
    from chatsmith.model import GPT, ModelConfig

    torch.manual_seed(seed)
    return GPT.build(ModelConfig(depth=1, aspect=32, head_dim=16, vocab_size=64, seq_len=16).resolve())


def masked_batches(seed=0):
    """Micro-batches with very different numbers of trained-on targets (-1 elsewhere), as SFT rows have."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, keep in ((2, 0.05), (3, 1.0), (2, 0.5)):
        x = torch.randint(0, 64, (b, 16), generator=g)
        y = torch.randint(0, 64, (b, 16), generator=g)
        y[torch.rand(b, 16, generator=g) > keep] = -1
        y[0, 0] = int(x[0, 1])  # at least one target in every micro-batch
        out.append((x, y))
    return out


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_accumulated_gradient_equals_one_large_batch():
    batches = masked_batches()
    counts = [int((y >= 0).sum()) for _, y in batches]
    assert max(counts) > 10 * min(counts)
    model = tiny_model()
    loss_sum, n = train.accumulate(model, batches, "cpu", None)
    got = grads(model)
    big = tiny_model()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    loss = big(x, y)  # the mean over every trained-on target of the step
    loss.backward()
    loss = loss.detach()
    want = grads(big)
    assert n == sum(counts) and loss_sum / n == pytest.approx(loss.item(), rel=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
    old = tiny_model()  # the old rule, the mean of the micro-batch means, weighs the 2-target batch like the others
    for xb, yb in batches:
        (old(xb, yb) / len(batches)).backward()
    assert not all(torch.allclose(g, want[k], rtol=1e-3, atol=1e-5) for k, g in grads(old).items())


def run_main(*argv):
    """chatsmith.__main__.main in-process: (exit code, stderr lines)."""
    import contextlib
    import io

    from chatsmith.__main__ import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, [line for line in err.getvalue().splitlines() if line.strip()]


def test_resume_refuses_another_schedule_unless_allowed(prepared, monkeypatch):
    monkeypatch.setenv("CHATSMITH_HOME", str(prepared))
    run = clone_run(prepared, "sched")
    base = ["pretrain", "--preset", "smoke", "--run", "sched", "--steps", "4", "--ckpt-every", "2", "--eval-every",
            "0", "--threads", "1"]
    assert run_main(*base)[0] == 0  # a finished run of 4 steps
    for flag, value, was in (("--steps", "6", "--steps 4"), ("--warmdown-frac", "0.5", "--warmdown-frac 0.2"),
                             ("--batch-tokens", "1024", "--batch-tokens 0"), ("--seed", "7", "--seed 1337"),
                             ("--keep-tails", None, "--keep-tails off")):
        rc, err = run_main(*base, "--resume", flag, *([value] if value else []))
        assert rc == 2 and len(err) == 1, err
        assert f"trained to step 4 with {was}, not {flag}" in err[0] and "--allow-schedule-change" in err[0], err
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4]  # nothing trained
    assert run_main(*base, "--resume")[0] == 0  # the same flags: finished, nothing to do
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4]
    rc, err = run_main(*base, "--resume", "--steps", "6", "--allow-schedule-change")
    assert rc == 0 and any("warning: resuming run 'sched' at step 4 with --steps 6" in line for line in err), err
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]


def test_seed_orders_the_data_and_long_documents_are_counted(prepared, monkeypatch):
    import numpy as np

    monkeypatch.setenv("CHATSMITH_HOME", str(prepared))
    run = clone_run(prepared, "seeded")
    cfg = config.parse(config.PretrainStage, ["--preset", "smoke", "--run", "seeded", "--steps", "1", "--seed", "5",
                                              "--seq-len", "64", "--eval-every", "0", "--threads", "1"])
    train.main(cfg)
    ck = checkpoint.load_latest(run / "checkpoints")
    assert ck.state["loader"]["seed"] == 5  # the data order follows --seed (it was always 0)
    assert ck.meta["schedule"]["seed"] == 5
    index = json.loads((run / "shards" / "train" / "index.json").read_text())
    lengths = np.concatenate([np.diff(np.load(run / "shards" / "train" / f"{s['name']}.idx"))
                              for s in index["shards"]])
    width = cfg.model.seq_len + 1
    want = {"documents": len(lengths), "tokens": int(lengths.sum()), "row_tokens": width,
            "longer_than_row": int((lengths > width).sum()),
            "tokens_beyond_row": int(np.maximum(lengths - width, 0).sum()), "keep_tails": False,
            "items": len(lengths)}
    assert want["longer_than_row"] > 0
    stats = json.loads((run / "data_stats.json").read_text())["pretrain"]
    assert {k: stats[k] for k in want} == want
    assert stats["loader"]["cropped_tokens"] >= 0 and stats["loader"]["docs"] > 0
    records = train.read_metrics(run, "data")
    assert len(records) == 1 and {k: records[0][k] for k in want} == want

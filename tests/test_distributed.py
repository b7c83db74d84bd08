"""Data parallelism: two gloo processes under torchrun against one process that does the same arithmetic.

The reference is one process with gradient accumulation over two micro-batches, drawn from the loaders of rank 0 and
rank 1 of two in turn: DDP averages exactly those two gradients, so the per-step losses and the final weights must
agree up to float summation order. Also: the two-process run stops on SIGTERM at one step boundary on both ranks and
resumes to the uninterrupted run's losses exactly; a checkpoint written by two processes refuses one; everything
in distributed.py is a no-op on one process.

    .venv/bin/pytest tests/test_distributed.py -q
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train import clone_run, losses, prepared  # noqa: F401  (prepared is a fixture)

from chatsmith import checkpoint, config, distributed, train
from chatsmith.common import UserError
from chatsmith.data.shards import PackingLoader, iter_val_batches
from chatsmith.model import GPT
from chatsmith.tokenizer import Tokenizer

STEPS = ["--steps", "8", "--ckpt-every", "4", "--eval-every", "4", "--eval-tokens", "2048", "--threads", "1"]


def torchrun(run, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "chatsmith",
            "pretrain", "--preset", "smoke", "--run-name", run, *STEPS, *extra]


class TwoRanksInTurn:
    """The micro-batches of ranks 0 and 1 of a world of 2, alternately: one process, the same data as DDP."""

    def __init__(self, shard_dir, batch, seq_len, seed):
        self.loaders = [PackingLoader(shard_dir, batch, seq_len, rank=r, world_size=2, seed=seed) for r in range(2)]
        self.turn = 0

    def next_batch(self):
        batch = self.loaders[self.turn].next_batch()
        self.turn = 1 - self.turn
        return batch

    def state_dict(self):
        return {"turn": self.turn, "ranks": [ld.state_dict() for ld in self.loaders]}


def reference_run(home, name):
    """One process: the smoke preset with two micro-batches per step taken from the two ranks' loaders."""
    run = clone_run(home, name)
    cfg = config.parse(config.PretrainStage, ["--preset", "smoke", "--run", name, *STEPS])
    tc = cfg.train
    tok = Tokenizer.load(run / "tokenizer")
    mcfg = cfg.model.resolve(vocab_size=tok.vocab_size)
    device = train.setup(cfg, cfg.run, tc, "pretrain")
    tc = dataclasses.replace(tc, batch_tokens=2 * tc.device_batch * mcfg.seq_len)  # two micro-batches per step
    model = GPT.build(mcfg, device=device)
    train.fit(train.Job(
        name="pretrain", run=cfg.run, optim=cfg.optim, train=tc, saved_config=config.to_dict(cfg), out=run,
        model=model, loader=TwoRanksInTurn(run / "shards" / "train", tc.device_batch, mcfg.seq_len, cfg.run.seed),
        val_batches=lambda: iter_val_batches(run / "shards" / "val", tc.device_batch, mcfg.seq_len, tc.eval_tokens),
        samples=lambda m, seed: [], token_bytes=tok.token_bytes()))
    return run, model


def test_two_processes_match_one_process_doing_the_same_arithmetic(prepared, monkeypatch):  # noqa: F811
    env = {**os.environ, "CHATSMITH_HOME": str(prepared)}
    run = clone_run(prepared, "ddp")
    out = subprocess.run(torchrun("ddp"), env=env, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "x 2 processes" in out.stderr
    got = losses(run)
    assert [s for s, _ in got] == list(range(1, 9))  # rank 0 alone wrote metrics.jsonl: no duplicate lines
    ck = checkpoint.load_latest(run / "checkpoints")
    assert ck.step == 8 and ck.meta["world_size"] == 2 and len(ck.state["ranks"]) == 2
    assert ck.state["ranks"][0]["loader"]["rank"] == 0 and ck.state["ranks"][1]["loader"]["rank"] == 1

    monkeypatch.setenv("CHATSMITH_HOME", str(prepared))
    ref_run, ref_model = reference_run(prepared, "ddp_ref")
    expected = losses(ref_run)
    assert [s for s, _ in expected] == list(range(1, 9))
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert abs(a - b) <= 1e-4 * abs(b), (got, expected)
    ref_weights = ref_model.state_dict()
    for name, t in ck.model.items():
        torch.testing.assert_close(t, ref_weights[name], rtol=1e-3, atol=1e-5, msg=name)
    vals = [r["val_bpb"] for r in train.read_metrics(run, "val")]
    ref_vals = [r["val_bpb"] for r in train.read_metrics(ref_run, "val")]
    assert len(vals) == 2 and vals == pytest.approx(ref_vals, rel=1e-4)  # val batches split over ranks, sums added


def test_two_processes_stop_together_on_sigterm_and_resume_exactly(prepared):  # noqa: F811
    env = {**os.environ, "CHATSMITH_HOME": str(prepared)}
    ref = clone_run(prepared, "ddp_whole")
    subprocess.run(torchrun("ddp_whole"), env=env, check=True, capture_output=True, timeout=500)
    expected = losses(ref)

    run = clone_run(prepared, "ddp_termed")
    proc = subprocess.Popen(torchrun("ddp_termed", "--ckpt-every", "1000"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and len(losses(run)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as a terminal's Ctrl-C or a scheduler would
    _, err = proc.communicate(timeout=300)
    done = len(losses(run))
    assert 2 <= done < 8, err[-3000:]
    ckpts = checkpoint.list_checkpoints(run / "checkpoints")
    assert ckpts and ckpts[-1].name == f"step_{done:06d}", (ckpts, done, err[-3000:])

    out = subprocess.run(torchrun("ddp_termed", "--resume"), env=env, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming" in out.stderr
    assert losses(run) == expected  # exact, per step

    one = subprocess.run([sys.executable, "-m", "chatsmith", "pretrain", "--preset", "smoke", "--run", "ddp_termed",
                          *STEPS, "--steps", "9", "--resume", "--allow-schedule-change"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 2
    assert "written by 2 process(es)" in one.stderr and "Traceback" not in one.stderr


def test_one_process_no_ops():
    d = distributed.env()
    assert d == distributed.Dist() and not d.enabled
    assert distributed.init("cpu") == d
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, d) is model
    assert distributed.all_reduce([1.5, 2.0], d) == [1.5, 2.0]
    assert distributed.gather({"a": 1}, d) == [{"a": 1}]
    assert distributed.rank0_first(lambda: 7, d) == 7
    distributed.barrier(d)
    with distributed.no_sync(model, skip=True):
        pass


def test_bad_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="WORLD_SIZE"):
        distributed.env()


def test_rank0_failure_stops_the_other_rank_with_one_sentence(tmp_path):
    """speedrun under torchrun: rank 0 alone reads the sources; when that fails, rank 1 does not wait out the
    collective timeout, and the error is said once."""
    env = {**os.environ, "CHATSMITH_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "chatsmith",
           "speedrun", "--preset", "smoke", "--run-name", "bad", "--sources", f"local:{tmp_path / 'missing.txt'}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert out.stderr.count("chatsmith speedrun: error:") == 1, out.stderr[-3000:]
    assert "missing.txt" in out.stderr


def test_batch_tokens_must_divide_evenly(prepared, monkeypatch):  # noqa: F811
    monkeypatch.setenv("CHATSMITH_HOME", str(prepared))
    clone_run(prepared, "uneven")
    cfg = config.parse(config.PretrainStage, ["--preset", "smoke", "--run", "uneven", "--steps", "1",
                                              "--batch-tokens", "1000"])
    with pytest.raises(UserError, match="not a multiple"):
        train.main(cfg)


def test_speedrun_under_torchrun(tmp_path):
    """The README's torchrun speedrun, smoke-sized: rank 0 makes the tokenizer and shards, both ranks pretrain and
    fine-tune, rank 0 runs RL and the assistant checks; the model it leaves behind is what `chatsmith chat` loads."""
    env = {**os.environ, "CHATSMITH_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "chatsmith",
           "speedrun", "--preset", "smoke", "--run-name", "ddp_sr", "--threads", "1"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "ddp_sr"
    for stage in (run, run / "chat"):
        ck = checkpoint.load_latest(stage / "checkpoints")
        assert ck is not None and ck.meta["world_size"] == 2 and len(ck.state["ranks"]) == 2
        steps = [s for s, _ in losses(stage)]
        assert steps == list(range(1, len(steps) + 1)) and steps[-1] == ck.step  # one writer: no duplicate lines
    # RL runs on rank 0 alone after the data-parallel SFT, and the assistant checks on its model
    assert checkpoint.load_latest(run / "rl" / "checkpoints") is not None
    assert (run / "rl" / "chat_checks.json").exists() and not (run / "chat" / "chat_checks.json").exists()
    assert out.stderr.count("speedrun done:") == 1  # rank 0 logs
    stats = json.loads((run / "data_stats.json").read_text())  # what the context cost both stages' data
    assert stats["pretrain"]["documents"] > 0 and stats["sft"]["conversations"] > 0
    assert stats["sft"]["loader"]["dropped"] == stats["sft"]["longer_than_row"]
    logged = "val conversations are longer than a row" in out.stderr
    assert logged == bool(stats["sft"]["longer_than_row"] or stats["sft"]["val_longer_than_row"])
    chat = subprocess.run([sys.executable, "-m", "chatsmith", "chat", "--run", "ddp_sr", "-p", "Hi",
                           "--max-tokens", "4"], env=env, capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr[-2000:]


DDP_GRADS = '''
import sys

import torch
from test_train import masked_batches, tiny_model

from chatsmith import distributed, train

d = distributed.init("cpu")
model = tiny_model()
batches = masked_batches(0) + masked_batches(1)[:1]
loss_sum, n = train.accumulate(distributed.wrap(model, d), batches[d.rank :: 2], "cpu", None, d)
if d.rank == 0:
    torch.save({"n": n, **{k: p.grad for k, p in model.named_parameters()}}, sys.argv[1])
distributed.shutdown()
'''


def test_ddp_gradient_equals_one_large_batch(tmp_path):
    """Two ranks with very different numbers of trained-on targets, two micro-batches each: the gradient is that of
    the mean loss over all four micro-batches as one batch (not a mean of per-rank or per-micro-batch means)."""
    from test_train import grads, masked_batches, tiny_model

    script = tmp_path / "ddp_grads.py"
    script.write_text(DDP_GRADS)
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(tmp_path / "grads.pt")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = torch.load(tmp_path / "grads.pt", weights_only=True)
    batches = masked_batches(0) + masked_batches(1)[:1]
    per_rank = [sum(int((y >= 0).sum()) for _, y in batches[r::2]) for r in range(2)]
    assert max(per_rank) > 2 * min(per_rank)
    big = tiny_model()
    big(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])).backward()
    assert got.pop("n") == sum(per_rank)
    want = grads(big)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)

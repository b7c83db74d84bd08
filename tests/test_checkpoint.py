"""Tests for chatsmith/checkpoint.py: exact round trips (weights, AdamW resume vs an uninterrupted run, RNG streams),
pruning, corruption and partial-write detection with fallback, SIGKILL during writes, and a package-wide guard that
every torch.load passes weights_only=True.

    .venv/bin/pytest tests/test_checkpoint.py -q
"""

from __future__ import annotations

import ast
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import chatsmith
from chatsmith import checkpoint
from chatsmith.checkpoint import CheckpointError
from chatsmith.common import UserError


def hidden_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def steps(root: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in checkpoint.list_checkpoints(root)]


def assert_same(a, b) -> None:
    """Deep equality that also checks container and leaf types, with torch.equal + dtype for tensors."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(10, 4, generator=g)
    return {
        "emb": emb,
        "tied_head": emb,  # shares storage, like tied embeddings: safetensors refuses that unless we clone
        "w_t": torch.randn(4, 6, generator=g).t(),  # non-contiguous
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "half": torch.randn(7, generator=g).half(),
        "ids": torch.arange(-3, 9, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "empty2": torch.zeros(0),
        "q": emb[:4],  # two slices of one storage, like a fused qkv split
        "kv": emb[4:],
        "param": nn.Parameter(torch.ones(2)),
    }


# ---------------------------------------------------------------------------------------------------------------------
# round trips


def test_round_trip_weights_state_meta(tmp_path):
    model = weights()
    state = {"loop": {"step": 7, "tokens": 7168, "best": 1.25}, "loader": {"shard": 2, "pos": [1, 2, 3]}}
    meta = {"config": {"model": {"n_layer": 2, "n_embd": 64}}, "tokens": 7168}
    path = checkpoint.save(tmp_path / "ck", 7, model, state=state, meta=meta)
    assert path == tmp_path / "ck" / "step_000007"
    assert sorted(os.listdir(path)) == ["manifest.json", "meta.json", "model.safetensors", "rng.json", "state.json"]

    ck = checkpoint.load(path)
    assert ck.path == path and ck.step == 7 and ck.optimizer is None
    assert sorted(ck.model) == sorted(model)  # safetensors stores names sorted by dtype and size, not in order
    for name, t in model.items():
        assert_same(ck.model[name], t.detach().contiguous())
    assert ck.state == state
    assert {k: ck.meta[k] for k in meta} == meta
    assert ck.meta["step"] == 7
    assert ck.meta["versions"]["torch"] == torch.__version__
    assert ck.meta["versions"]["chatsmith"] == chatsmith.__version__
    assert ck.meta["time"].startswith(str(time.gmtime().tm_year))
    pkg = Path(checkpoint.__file__).parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pkg, capture_output=True, text=True)
    if head.returncode == 0:
        assert ck.meta["git"].split("-")[0] == head.stdout.strip()
    else:
        assert ck.meta["git"] is None
    assert checkpoint._git_sha(tmp_path) is None  # not a git repository: no crash, no SHA
    # weights are plain safetensors: any safetensors reader gets them without chatsmith
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(path / "model.safetensors"))["emb"], model["emb"])


def adamw_run(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    """Steps whose batch, dropout and loss weight draw from torch, python and numpy global RNGs."""
    for _ in range(n):
        x = torch.randn(5, 8)
        weight = random.random() + float(np.random.rand())
        loss = model(x).pow(2).mean() * weight
        opt.zero_grad()
        loss.backward()
        opt.step()


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.GELU(), nn.Linear(16, 4))


@pytest.mark.parametrize("restore", [True, False])
def test_adamw_resume_is_bit_exact(tmp_path, restore):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    adamw_run(model, opt, 3)
    checkpoint.save(tmp_path, 3, model.state_dict(), optimizer=opt.state_dict(), state={"step": 3})
    adamw_run(model, opt, 4)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(99), random.seed(99), np.random.seed(99)  # a fresh process would start elsewhere
    resumed = make_model(5)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2, weight_decay=0.1)
    ck = checkpoint.load_latest(tmp_path)
    resumed.load_state_dict(ck.model)
    opt2.load_state_dict(ck.optimizer)
    if restore:
        checkpoint.restore_rng(ck.rng)
    adamw_run(resumed, opt2, 4)
    same = [torch.equal(a, b) for a, b in zip(uninterrupted, resumed.parameters())]
    # without restore_rng the continuation differs: the check above is sensitive to the RNG part as well
    assert all(same) if restore else not any(same)


def test_rng_round_trip_through_disk(tmp_path):
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    random.gauss(0, 1), np.random.randn()  # leave cached gaussians in both states
    checkpoint.save(tmp_path, 1, {"w": torch.zeros(1)})

    def draw():
        return (torch.rand(4).tolist(), random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
                np.random.randn(), torch.randint(0, 1000, (3,)).tolist())

    expected = draw()
    torch.manual_seed(4), random.seed(4), np.random.seed(4)
    assert draw() != expected
    checkpoint.restore_rng(checkpoint.load(tmp_path / "step_000001").rng)
    assert draw() == expected
    state = checkpoint.capture_rng()
    first = draw()
    checkpoint.restore_rng(state)
    assert draw() == first


def test_optimizer_state_types_load_with_weights_only(tmp_path):
    custom = {
        "state": {0: {"momentum": torch.randn(3, 3), "step": torch.tensor(4.0), "count": 3,
                      "nested": {"a": [1, 2.5, None, True], "b": (torch.ones(2, dtype=torch.bfloat16), "x")}}},
        "param_groups": [{"lr": 0.02, "betas": (0.9, 0.95), "params": [0, 1], "nesterov": True, "name": "muon",
                          "shape": torch.Size([3, 3]), "dtype": torch.float32, "device": torch.device("cpu"),
                          "tags": {1, 2}, "foreach": None}],
    }
    checkpoint.save(tmp_path, 1, {"w": torch.zeros(1)}, optimizer=custom)
    assert_same(checkpoint.load(tmp_path / "step_000001").optimizer, custom)
    # a real AdamW state dict, read back by torch.load(weights_only=True) directly
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters())
    adamw_run(model, opt, 2)
    path = checkpoint.save(tmp_path, 2, model.state_dict(), optimizer=opt.state_dict())
    assert_same(torch.load(path / "optimizer.pt", weights_only=True), opt.state_dict())


@pytest.mark.parametrize("bad", [np.zeros(2), np.float64(1.0), slice(1, 2), frozenset([1]), Path("x")])
def test_state_that_weights_only_cannot_read_is_refused_before_writing(tmp_path, bad):
    import io
    buf = io.BytesIO()
    torch.save({"x": bad}, buf)
    buf.seek(0)
    with pytest.raises(Exception):  # noqa: B017 the reference: torch itself refuses these under weights_only
        torch.load(buf, weights_only=True)
    with pytest.raises(TypeError, match="weights_only"):
        checkpoint.save(tmp_path / "ck", 1, {"w": torch.zeros(1)}, optimizer={"state": {0: {"x": bad}}})
    assert not (tmp_path / "ck").exists()
    with pytest.raises(TypeError):
        checkpoint.save(tmp_path / "ck", 1, {"w": torch.zeros(1)}, state={"bad": {1, 2}})
    assert not (tmp_path / "ck").exists()


# ---------------------------------------------------------------------------------------------------------------------
# pruning, replacing, ranks


def test_keep_last_prunes_oldest(tmp_path):
    saved = []
    for s in [10, 20, 30, 40, 50]:
        checkpoint.save(tmp_path, s, {"w": torch.full((3,), float(s))}, keep_last=2)
        saved.append(s)
        assert steps(tmp_path) == saved[-2:]
    assert steps(tmp_path) == [40, 50]
    assert hidden_dirs(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["step_000040", "step_000050"]
    checkpoint.save(tmp_path, 60, {"w": torch.zeros(1)}, keep_last=0)  # 0 keeps everything
    assert steps(tmp_path) == [40, 50, 60]


def test_resaving_a_step_replaces_it(tmp_path):
    checkpoint.save(tmp_path, 3, {"w": torch.ones(4)}, state={"v": 1})
    checkpoint.save(tmp_path, 3, {"w": torch.full((4,), 2.0)}, state={"v": 2})
    ck = checkpoint.load_latest(tmp_path)
    assert torch.equal(ck.model["w"], torch.full((4,), 2.0)) and ck.state == {"v": 2}
    assert os.listdir(tmp_path) == ["step_000003"]


def test_only_rank0_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert checkpoint.save(tmp_path / "ck", 5, {"w": torch.ones(1)}) == tmp_path / "ck" / "step_000005"
    assert not (tmp_path / "ck").exists()


# ---------------------------------------------------------------------------------------------------------------------
# corruption and partial checkpoints


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def two_checkpoints(root: Path) -> None:
    for s in (1, 2):
        model = {"w": torch.full((1000,), float(s))}
        opt = {"state": {0: {"exp_avg": torch.full((1000,), -float(s))}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
        checkpoint.save(root, s, model, optimizer=opt, state={"s": s}, meta={"tokens": s})


@pytest.mark.parametrize("name,damage", [
    ("model.safetensors", flip_byte), ("optimizer.pt", flip_byte), ("state.json", flip_byte),
    ("rng.json", flip_byte), ("meta.json", flip_byte), ("manifest.json", flip_byte),
    ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-100])),  # truncated copy
    ("optimizer.pt", lambda p: p.unlink()),  # missing file
])
def test_corrupt_checkpoint_is_detected_and_skipped(tmp_path, capsys, name, damage):
    two_checkpoints(tmp_path)
    newest = tmp_path / "step_000002"
    damage(newest / name)
    with pytest.raises(CheckpointError, match="manifest" if name == "manifest.json" else name.replace(".", r"\.")):
        checkpoint.load(newest)
    capsys.readouterr()
    ck = checkpoint.load_latest(tmp_path)
    assert ck.step == 1 and torch.equal(ck.model["w"], torch.ones(1000))
    assert torch.equal(ck.optimizer["state"][0]["exp_avg"], -torch.ones(1000)) and ck.state == {"s": 1}
    err = capsys.readouterr().err
    assert "warning" in err and "step_000002" in err and (name in err or name == "manifest.json")


def test_no_valid_checkpoint(tmp_path, capsys):
    assert checkpoint.load_latest(tmp_path / "missing") is None
    assert checkpoint.load_latest(tmp_path) is None
    two_checkpoints(tmp_path)
    for s in (1, 2):
        flip_byte(tmp_path / f"step_00000{s}" / "model.safetensors")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints"):
        checkpoint.load_latest(tmp_path)
    assert issubclass(CheckpointError, UserError)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "step_000099")


def test_partial_checkpoints_are_ignored_and_stale_writes_cleaned(tmp_path):
    two_checkpoints(tmp_path)
    # a newer directory whose manifest was never written, and a complete-looking leftover temp dir of a dead writer
    partial = tmp_path / "step_000003"
    shutil.copytree(tmp_path / "step_000002", partial)
    (partial / "manifest.json").unlink()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    shutil.copytree(tmp_path / "step_000002", tmp_path / f".tmp-step_000004-{dead.pid}")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".tmp-step_000004-{live.pid}").mkdir()
        assert steps(tmp_path) == [1, 2]
        assert checkpoint.load_latest(tmp_path).step == 2
        with pytest.raises(CheckpointError, match="no manifest.json"):
            checkpoint.load(partial)
        checkpoint.save(tmp_path, 5, {"w": torch.zeros(1)}, keep_last=10)
        assert hidden_dirs(tmp_path) == [f".tmp-step_000004-{live.pid}"]  # the live writer's dir is left alone
    finally:
        live.kill()
        live.wait()
    assert steps(tmp_path) == [1, 2, 5]


# ---------------------------------------------------------------------------------------------------------------------
# SIGKILL during writes

# One python process imports torch once (2.7 s here) and forks a writer per round, so five kills fit in ~10 s.
# The writer saves checkpoints whose contents are a function of the step, so the test can check every byte.
WRITER = r"""
import os, sys, time, torch
from pathlib import Path
from chatsmith import checkpoint
root, n = Path(sys.argv[1]), int(sys.argv[2])
for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        have = checkpoint.list_checkpoints(root)
        step = int(have[-1].name.split("_")[1]) + 1 if have else 1
        while True:
            t0 = time.perf_counter()
            w = torch.full((n,), float(step))
            checkpoint.save(root, step, {"w": w, "b": torch.arange(100) + step},
                            optimizer={"state": {0: {"m": -w}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
                            state={"step": step}, keep_last=2)
            print(f"saved {step} {time.perf_counter() - t0:.4f}", flush=True)
            step += 1
    print(f"pid {pid}", flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def test_sigkill_during_writes_never_breaks_the_latest_checkpoint(tmp_path):
    root, n = tmp_path / "ck", 4 << 20  # 16 MB weights + 16 MB optimizer state per checkpoint
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(n)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x.strip()) for x in proc.stdout], daemon=True).start()
    rng = random.Random()
    latest, mid_write, rounds, pid = 0, 0, 0, None
    try:
        # at least 5 kills; more (up to 12) until 2 of them landed while a .tmp dir was being written
        while rounds < 5 or (mid_write < 2 and rounds < 12):
            rounds += 1
            proc.stdin.write("go\n")
            proc.stdin.flush()
            pid = int(lines.get(timeout=60).split()[1])
            _, step, seconds = lines.get(timeout=60).split()  # one full save done; the next one is under way
            # every hidden dir of earlier (killed) writers was cleaned by this writer's first save
            assert all(d.endswith(f"-{pid}") for d in hidden_dirs(root))
            time.sleep(rng.uniform(0, 1.2 * float(seconds)))
            os.kill(pid, signal.SIGKILL)
            while lines.get(timeout=60) != "reaped":
                pass
            mid_write += any(d.startswith(".tmp-") for d in hidden_dirs(root))
            ck = checkpoint.load_latest(root)
            assert ck is not None and ck.step >= max(latest, int(step))
            assert ck.path == checkpoint.list_checkpoints(root)[-1]  # the newest visible one is the valid one
            assert torch.equal(ck.model["w"], torch.full((n,), float(ck.step)))
            assert torch.equal(ck.model["b"], torch.arange(100) + ck.step)
            assert torch.equal(ck.optimizer["state"][0]["m"], torch.full((n,), -float(ck.step)))
            assert ck.state == {"step": ck.step}
            for path in checkpoint.list_checkpoints(root):
                checkpoint.load(path)
            latest = ck.step
    finally:
        if pid is not None:  # a failed assertion must not leave a writer running
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # ~68 % of kills land mid-write (measured over 50 kills), so fewer than 2 of 12 happens with P ~ 3e-5
    assert mid_write >= 2


# ---------------------------------------------------------------------------------------------------------------------
# guard: torch.load only with weights_only=True, everywhere in the package


def unsafe_torch_loads(source: str) -> list[int]:
    """Line numbers of torch.load / torch.serialization.load uses without a literal weights_only=True."""
    tree = ast.parse(source)
    safe_funcs, bad = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                                              and k.value.value is True for k in node.keywords):
            safe_funcs.add(id(node.func))
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            bad += [node.lineno for a in node.names if a.name == "load"]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr == "load" and id(node) not in safe_funcs
                and ast.unparse(node.value) in ("torch", "torch.serialization", "serialization")):
            bad.append(node.lineno)
    return sorted(bad)


def test_torch_load_guard_catches_unsafe_calls():
    assert unsafe_torch_loads("torch.load(p, map_location='cpu', weights_only=True)") == []
    assert unsafe_torch_loads("x = 1\ntorch.load(p)") == [2]
    assert unsafe_torch_loads("torch.load(p, weights_only=False)") == [1]
    assert unsafe_torch_loads("torch.load(p, weights_only=flag)") == [1]
    assert unsafe_torch_loads("torch.serialization.load(p)") == [1]
    assert unsafe_torch_loads("f = torch.load\nf(p, weights_only=True)") == [1]
    assert unsafe_torch_loads("from torch import load") == [1]
    assert unsafe_torch_loads("json.load(f); np.load(p); pickle_free = True") == []


def test_no_torch_load_without_weights_only_in_package():
    pkg = Path(checkpoint.__file__).parent
    files = sorted(pkg.rglob("*.py"))
    assert pkg / "checkpoint.py" in files
    offenders = [f"{f.relative_to(pkg.parent)}:{line}" for f in files
                 for line in unsafe_torch_loads(f.read_text(encoding="utf-8"))]
    assert offenders == [], f"torch.load without weights_only=True (pickle can run code): {offenders}"


def test_model_config_comes_from_meta(tmp_path):
    from dataclasses import asdict

    from chatsmith.model import ModelConfig

    cfg = ModelConfig(depth=2, aspect=32, head_dim=32, vocab_size=300).resolve()
    checkpoint.save(tmp_path / "a", 1, {"w": torch.zeros(1)}, meta={"config": {"model": {**asdict(cfg), "old": 1}}})
    assert checkpoint.load_latest(tmp_path / "a").model_config() == cfg  # unknown keys ignored
    checkpoint.save(tmp_path / "b", 1, {"w": torch.zeros(1)}, meta={"config": {}})
    with pytest.raises(checkpoint.CheckpointError, match="holds no config.model"):
        checkpoint.load_latest(tmp_path / "b").model_config()


def test_keep_last_does_not_count_corrupt_checkpoints(tmp_path):
    """After a fallback past a corrupt newer checkpoint, saving earlier steps must not let the corrupt one evict the
    valid ones (the old pruning kept the corrupt 40 and 30 and deleted 20: one valid checkpoint left of two)."""
    for s in (10, 20, 40):
        checkpoint.save(tmp_path, s, {"w": torch.full((3,), float(s))}, keep_last=3)
    flip_byte(tmp_path / "step_000040" / "model.safetensors")
    assert checkpoint.load_latest(tmp_path).step == 20  # the fallback
    checkpoint.save(tmp_path, 30, {"w": torch.full((3,), 30.0)}, keep_last=2)  # training on from step 20
    assert steps(tmp_path) == [20, 30, 40]  # two valid ones kept; the corrupt one counted for nothing
    assert checkpoint.load_latest(tmp_path).step == 30
    checkpoint.save(tmp_path, 35, {"w": torch.full((3,), 35.0)}, keep_last=2)
    assert steps(tmp_path) == [30, 35, 40]
    checkpoint.save(tmp_path, 40, {"w": torch.full((3,), 40.0)}, keep_last=2)  # rewriting the corrupt step heals it
    assert steps(tmp_path) == [35, 40]
    assert torch.equal(checkpoint.load_latest(tmp_path).model["w"], torch.full((3,), 40.0))

"""FSDP2 (`--parallel fsdp`): two gloo processes under torchrun against one process, DDP and the one model loader.

Fast (default): a 2-block model sharded over two ranks takes three Muon + AdamW steps; its weights equal those of
one unsharded process doing the same arithmetic (gradient accumulation over both ranks' micro-batches), which checks
the gathered Newton-Schulz step and the sharded AdamW; the consolidated checkpoint (gathered full state, one
safetensors file) loads in one process and gives the sharded model's logits; a rank that dies makes torchrun stop
the other within the subprocess timeout, naming the failed rank; everything is a no-op on one process.
Sharded checkpoints (dcp.py): two ranks save with DCP at steps 1-3 (keep-last 2) while drawing their batches from
the global RNG; a fresh pair resumed from step 2's shards reproduces steps 3-5's losses and final weights exactly;
the final checkpoint's model.safetensors and step 2's weights consolidated in one process give the sharded model's
logits; the two ranks' shards load into one unsharded process (DCP reshards) and equal the gathered weights and
optimizer state; a flipped byte in one rank's shard makes load_latest fall back; DCP's pickled index cannot run code.
Slow: the smoke preset's 20 steps under fsdp equal DDP's per step within 1e-5 relative; a SIGKILLed fsdp run resumes
from its sharded checkpoint to the uninterrupted losses exactly; `checkpoint.load_model` reads the fsdp run's final
checkpoint and gives the DDP run's logits, and an earlier, shards-only one gives the same logits as the DDP run's
checkpoint of that step; resuming with another number of processes or --parallel is refused in one sentence.

    .venv/bin/pytest tests/test_fsdp.py -q            # fast part
    .venv/bin/pytest tests/test_fsdp.py -q -m slow    # the pretrain runs
"""

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train import clone_run, losses, prepared  # noqa: F401  (prepared is a fixture)

from chatsmith import checkpoint, config, dcp, distributed, train
from chatsmith.model import GPT, ModelConfig
from chatsmith.optim import apply_schedules, build_optimizer

TESTS = os.path.dirname(os.path.abspath(__file__))
STEPS = 3

FSDP_STEPS = '''
import dataclasses
import os
import pathlib
import sys

import torch
from test_fsdp import STEPS, batches, small_model, x_probe

from chatsmith import checkpoint, config, distributed, train
from chatsmith.optim import apply_schedules, build_optimizer

d = distributed.init("cpu")
model = small_model()
distributed.wrap(model, d, "fsdp")
assert distributed.is_sharded(model)
cfg = config.OptimConfig()
opt = build_optimizer(model, cfg)
opt.ns_dtype = torch.float32  # bf16 Newton-Schulz would round away the comparison
for step in range(STEPS):
    if sys.argv[2] == "die" and d.rank == 1 and step == 1:
        os._exit(3)  # a rank that dies in the middle of training
    apply_schedules(opt, step, STEPS, cfg)
    train.accumulate(model, batches()[d.rank :: 2], "cpu", None, d)
    opt.step()
    opt.zero_grad(set_to_none=True)
with torch.no_grad():
    logits = model(x_probe())
model_state, opt_state = distributed.full_state(model, opt)
if d.rank == 0:
    meta = {"config": {"model": dataclasses.asdict(model.config)}}
    checkpoint.save(pathlib.Path(sys.argv[1]), STEPS, model_state, optimizer=opt_state, meta=meta)
    torch.save(logits, os.path.join(sys.argv[1], "logits.pt"))
distributed.shutdown()
'''


DCP_RESUME = '''
import dataclasses
import json
import pathlib
import sys

import torch
from test_fsdp import TOTAL, fsdp_step, small_model, x_probe

from chatsmith import checkpoint, config, dcp, distributed
from chatsmith.optim import build_optimizer

d = distributed.init("cpu")
root = pathlib.Path(sys.argv[1])
cfg = config.OptimConfig()


def fresh():
    model = small_model()
    distributed.wrap(model, d, "fsdp")
    opt = build_optimizer(model, cfg)
    opt.ns_dtype = torch.float32
    return model, opt


def logits(model):
    with torch.no_grad():
        return model(x_probe())


model, opt = fresh()
torch.manual_seed(100 + d.rank)  # each rank draws its own batches from the global RNG: resuming must restore it
losses, saved = [], {}
for i in range(TOTAL):
    losses.append(fsdp_step(model, opt, i, d))
    if i + 1 in (1, 2, 3):
        state = {"ranks": distributed.gather({"rng": checkpoint.capture_rng()}, d)}
        dcp.save_sharded(root, i + 1, model, opt, state, {"config": {"model": dataclasses.asdict(model.config)}}, d,
                         keep_last=2, weights=i + 1 == 3)
        saved[i + 1] = logits(model)
    if i + 1 == 2:  # the gathered whole state, written at once (some of its tensors are the live ones)
        full_model, full_opt = distributed.full_state(model, opt)
        if d.rank == 0:
            torch.save({"model": full_model, "optimizer": full_opt}, root.parent / "reference.pt")
final = {n: p.full_tensor() for n, p in model.named_parameters()}

model, opt = fresh()  # a new process would start so: the resumed run
ck = checkpoint.load(root / "step_000002", consolidate=False)
assert ck.model == {} and ck.optimizer is None and ck.sharded == root / "step_000002" / "dcp"
dcp.load_sharded(ck.sharded, model, opt)
checkpoint.restore_rng(ck.state["ranks"][d.rank]["rng"])
resumed = [fsdp_step(model, opt, i, d) for i in range(2, TOTAL)]
for n, p in model.named_parameters():
    assert torch.equal(p.full_tensor(), final[n]), n
if d.rank == 0:
    (root / "losses.json").write_text(json.dumps({"run": losses, "resumed": resumed}))
    torch.save(saved, root.parent / "logits.pt")
distributed.shutdown()
'''
TOTAL = 5


def fsdp_step(model, opt, i, d) -> float:
    """One optimizer step on two micro-batches this rank draws from the global torch RNG; the mean loss over both
    ranks."""
    cfg = config.OptimConfig()
    apply_schedules(opt, i, TOTAL, cfg)
    batches = [(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))) for _ in range(2)]
    loss_sum, n = train.accumulate(model, batches, "cpu", None, d)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return distributed.all_reduce([loss_sum], d)[0] / n


def small_model() -> GPT:
    torch.manual_seed(0)
    return GPT.build(ModelConfig(depth=2, aspect=32, head_dim=16, vocab_size=64, seq_len=16).resolve())


def batches():
    from test_train import masked_batches

    return masked_batches(0) + masked_batches(1)[:1]  # rank 0 gets 2 micro-batches, rank 1 gets 2


def x_probe():
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(7))


def run_script(tmp_path, mode, text=FSDP_STEPS):
    script = tmp_path / "fsdp_steps.py"
    script.write_text(text)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)}
    out = tmp_path / "ckpts"
    out.mkdir(exist_ok=True)
    return out, subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                str(script), str(out), mode], env=env, capture_output=True, text=True, timeout=240)


def test_sharded_steps_equal_one_process_and_the_consolidated_checkpoint_gives_the_same_logits(tmp_path):
    out, proc = run_script(tmp_path, "ok")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = checkpoint.load_latest(out)
    assert ck is not None and ck.step == STEPS
    assert sorted(ck.optimizer["state"]) == sorted(n for n, _ in small_model().named_parameters())  # keyed by name

    ref = small_model()  # one process: the same micro-batches accumulated into one step's gradient
    cfg = config.OptimConfig()
    opt = build_optimizer(ref, cfg)
    opt.ns_dtype = torch.float32
    for step in range(STEPS):
        apply_schedules(opt, step, STEPS, cfg)
        train.accumulate(ref, batches(), "cpu", None)
        opt.step()
        opt.zero_grad(set_to_none=True)
    want = ref.state_dict()
    for name, t in ck.model.items():
        # the embedding's AdamW step turns a near-zero gradient entry (summation order) into up to +-lr: 4 of 4096
        # entries differ by ~1e-4 there; everything else agrees to ~2e-6
        tol = dict(rtol=1e-3, atol=2e-4) if name == "embed_tokens.weight" else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(t, want[name], **tol, msg=lambda m, n=name: f"{n}: {m}")

    loaded = GPT.build(ck.model_config(), device="cpu")
    loaded.load_state_dict(ck.model)
    loaded.eval()
    with torch.no_grad():
        got = loaded(x_probe())
    torch.testing.assert_close(got, torch.load(out / "logits.pt", weights_only=True), rtol=0, atol=0)


def test_sharded_checkpoints_resume_exactly_consolidate_and_reshard(tmp_path, capsys):
    root, proc = run_script(tmp_path, "ok", DCP_RESUME)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((root / "losses.json").read_text())
    assert got["resumed"] == got["run"][2:]  # exact: same weights, optimizer, RNG (the final weights too, in-script)
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step_000002", "step_000003"]  # keep_last=2
    ref = torch.load(tmp_path / "reference.pt", weights_only=True)  # gathered in the script at step 2
    ref["logits"] = torch.load(tmp_path / "logits.pt", weights_only=True)  # the sharded model's, at steps 2 and 3

    def logits_of(weights):
        model = small_model()
        model.load_state_dict(weights)
        with torch.no_grad():
            return model.eval()(x_probe())

    final = checkpoint.load_latest(root)  # the final step: model.safetensors gathered once, beside the shards
    assert final.step == 3 and final.sharded is not None and (final.path / checkpoint.MODEL_FILE).is_file()
    assert torch.equal(logits_of(final.model), ref["logits"][3])
    earlier = checkpoint.load(root / "step_000002")  # shards only: consolidated in this one process
    assert not (earlier.path / checkpoint.MODEL_FILE).exists() and earlier.optimizer is None
    assert torch.equal(logits_of(earlier.model), ref["logits"][2])
    for name, t in ref["model"].items():
        assert torch.equal(earlier.model[name], t), name

    model = small_model()  # DCP reshards: two ranks' shards into one unsharded process, optimizer state included
    opt = build_optimizer(model, config.OptimConfig())
    dcp.load_sharded(earlier.sharded, model, opt)
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref["model"][name]), name
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    mine = get_optimizer_state_dict(model, opt)
    assert mine["state"].keys() == ref["optimizer"]["state"].keys()
    for name, state in ref["optimizer"]["state"].items():
        for key, t in state.items():
            assert torch.equal(mine["state"][name][key], t), (name, key)

    shard = final.path / "dcp" / "__1_0.distcp"  # a flipped byte in one rank's shard: fall back to step 2
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert checkpoint.load_latest(root, consolidate=False).step == 2
    assert "skipping checkpoint step_000003" in capsys.readouterr().err and "__1_0.distcp" in shard.name


def test_a_checkpoint_index_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="not part of a checkpoint index"):
        dcp.consolidated_model(tmp_path)
    assert not (tmp_path / "ran").exists()


def test_only_a_sharded_manifest_may_name_files_in_dcp_and_only_directly_there(tmp_path):
    path = checkpoint.save(tmp_path, 1, small_model().state_dict(), state={}, meta={})
    manifest = json.loads((path / checkpoint.MANIFEST_FILE).read_text())
    (path / "dcp").mkdir()
    (path / "dcp" / "__0_0.distcp").write_bytes(b"x")
    digest = hashlib.sha256(b"x").hexdigest()
    cases = [({}, "dcp/__0_0.distcp", False), ({"format": "dcp"}, "dcp/__0_0.distcp", True),
             ({"format": "dcp"}, "dcp/../meta.json", False), ({"format": "dcp"}, "dcp/a/b", False)]
    for extra, name, ok in cases:
        files = {**manifest["files"], name: digest}
        (path / checkpoint.MANIFEST_FILE).write_text(json.dumps({**manifest, **extra, "files": files}))
        if ok:
            assert checkpoint.load(path).sharded == path / "dcp"
        else:
            with pytest.raises(checkpoint.CheckpointError, match="invalid file name"):
                checkpoint.load(path)
        assert checkpoint._verify(path) is ok, (extra, name)


def test_a_rank_that_dies_stops_the_others(tmp_path):
    t0 = time.monotonic()
    _, proc = run_script(tmp_path, "die")  # the subprocess timeout bounds the wait: a hang fails the test
    assert proc.returncode != 0
    assert "rank      : 1" in proc.stderr and "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 240


def test_one_process_no_ops():
    model = small_model()
    assert distributed.wrap(model, distributed.Dist(), "fsdp") is model
    assert not distributed.is_sharded(model)
    opt = build_optimizer(model, config.OptimConfig())
    state, opt_state = distributed.full_state(model, opt)
    assert state.keys() == model.state_dict().keys() and opt_state == opt.state_dict()


# ---------------------------------------------------------------------------------------------------------------------
# slow: the real pretrain stage under torchrun

PRETRAIN = ["--steps", "20", "--ckpt-every", "5", "--eval-every", "10", "--eval-tokens", "2048", "--threads", "1",
            "--precision", "fp32"]


def torchrun(run, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "chatsmith",
            "pretrain", "--preset", "smoke", "--run-name", run, *PRETRAIN, *extra]


@pytest.mark.slow
def test_fsdp_equals_ddp_resumes_after_sigkill_and_loads_in_one_process(prepared, monkeypatch):  # noqa: F811
    env = {**os.environ, "CHATSMITH_HOME": str(prepared)}
    runs = {}
    for name, extra in (("ddp20", ()), ("fsdp20", ("--parallel", "fsdp"))):
        runs[name] = clone_run(prepared, name)
        out = subprocess.run(torchrun(name, *extra), env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
    ddp, fsdp = losses(runs["ddp20"]), losses(runs["fsdp20"])
    assert [s for s, _ in fsdp] == list(range(1, 21))
    for (_, a), (_, b) in zip(fsdp, ddp, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (fsdp, ddp)
    assert checkpoint.load_latest(runs["fsdp20"] / "checkpoints").meta["parallel"] == "fsdp"

    monkeypatch.setenv("CHATSMITH_HOME", str(prepared))
    x = x_probe() % 500
    logits = {}
    for name in runs:
        loaded = checkpoint.load_model(checkpoint.LoadConfig(run=name, precision="fp32"), stage="base")
        with torch.no_grad():
            logits[name] = loaded.model(x.to(next(loaded.model.parameters()).device)).cpu()
    torch.testing.assert_close(logits["fsdp20"], logits["ddp20"], rtol=1e-4, atol=1e-5)
    earlier = {}  # step 15: shards only under fsdp, consolidated by the one loader
    for name in runs:
        path = runs[name] / "checkpoints" / "step_000015"
        loaded = checkpoint.load_model(checkpoint.LoadConfig(checkpoint=str(path), precision="fp32"), stage="base")
        with torch.no_grad():
            earlier[name] = loaded.model(x.to(next(loaded.model.parameters()).device)).cpu()
    assert not (runs["fsdp20"] / "checkpoints" / "step_000015" / checkpoint.MODEL_FILE).exists()
    assert (runs["fsdp20"] / "checkpoints" / "step_000020" / checkpoint.MODEL_FILE).is_file()
    torch.testing.assert_close(earlier["fsdp20"], earlier["ddp20"], rtol=1e-4, atol=1e-5)

    killed = clone_run(prepared, "fsdp_killed")
    proc = subprocess.Popen(torchrun("fsdp_killed", "--parallel", "fsdp"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and len(losses(killed)) < 7 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert 7 <= len(losses(killed)) < 20
    out = subprocess.run(torchrun("fsdp_killed", "--parallel", "fsdp", "--resume"), env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming" in out.stderr
    assert losses(killed) == fsdp  # exact, per step
    wrong = subprocess.run(torchrun("fsdp_killed", "--resume", "--steps", "21", "--allow-schedule-change"), env=env,
                           capture_output=True, text=True, timeout=900)
    assert wrong.returncode != 0 and "--parallel fsdp" in wrong.stderr
    alone = subprocess.run([sys.executable, "-m", "chatsmith", "pretrain", "--preset", "smoke", "--run-name",
                            "fsdp_killed", *PRETRAIN, "--parallel", "fsdp", "--resume", "--steps", "21",
                            "--allow-schedule-change"], env=env, capture_output=True, text=True, timeout=900)
    assert alone.returncode != 0 and "written by 2 process(es)" in alone.stderr, alone.stderr[-2000:]
    assert "Traceback" not in alone.stderr

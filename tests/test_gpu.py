"""CUDA-only tests (marker `cuda`: skipped with a reason without a GPU; `chatsmith bench gpu` runs them) and the
device check's behaviour on a machine without one.

    .venv/bin/pytest tests/test_gpu.py -q           # here: the no-GPU check runs, the CUDA tests skip
    .venv/bin/pytest -m cuda -q                     # on a GPU
"""

import os
import subprocess
import sys

import pytest
import torch

from chatsmith import config, train
from chatsmith.model import GPT, ModelConfig
from chatsmith.optim import build_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() "
                                                                      "is False)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_device_check_fails_clearly_without_a_gpu():
    out = subprocess.run([os.path.join(ROOT, "scripts", "gpu_check.sh")], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "needs a CUDA GPU" in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == ""


def small(device):
    torch.manual_seed(0)
    return GPT.build(ModelConfig(depth=2, aspect=64, head_dim=64, vocab_size=512, seq_len=128).resolve(), device)


@pytest.mark.cuda
@needs_cuda
def test_cuda_forward_matches_cpu_in_fp32():
    x = torch.randint(0, 512, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = small("cpu")(x)
        got = small("cuda")(x.cuda()).cpu()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@needs_cuda
def test_cuda_bf16_training_step_tracks_fp32():
    x = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    out = {}
    for dtype in (None, torch.bfloat16):
        model = small("cuda")
        opt = build_optimizer(model, config.OptimConfig())
        losses = []
        for _ in range(5):
            loss_sum, n = train.accumulate(model, [(x, y)], "cuda", dtype)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss_sum / n)
        out[dtype] = losses
    assert out[torch.bfloat16][-1] < out[torch.bfloat16][0]  # it learns
    assert out[torch.bfloat16] == pytest.approx(out[None], rel=2e-2)


@pytest.mark.cuda
@needs_cuda
def test_flash_attention_backend_runs_the_model():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x = torch.randint(0, 512, (2, 128), device="cuda")
    model = small("cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash = model(x).float()
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        default = model(x).float()
    torch.testing.assert_close(flash, default, rtol=2e-2, atol=2e-2)


def test_cuda_marker_is_registered():
    out = subprocess.run([sys.executable, "-m", "pytest", "--markers"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert "@pytest.mark.cuda:" in out.stdout

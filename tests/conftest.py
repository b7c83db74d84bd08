"""Shared test fixtures: every test gets its own CHATSMITH_HOME, and at most TEST_THREADS torch threads; and
`randomize_weights`, the random test model's weights.

The thread cap: the test models are tiny, so on a many-core machine torch's default (one thread per core) only adds
contention, above all beside the subprocesses some tests start. It applies where torch is already imported (tests
that need torch import it at module level), so tests without torch do not pay for importing it; a test may still set
its own count, and the count before it is restored after it.
"""

import sys

import pytest

TEST_THREADS = 2


def randomize_weights(model, seed: int = 0, matrix_scale: float = 1.0):
    """Random weights everywhere, in place (init leaves o/down at zero and lm_head tiny, so greedy replies would not
    vary with the prompt): norm weights U(0.5, 1.5), matrices N(0, matrix_scale^2). Returns the model in eval mode."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * matrix_scale)
    return model.eval()


@pytest.fixture(autouse=True)
def chatsmith_home(tmp_path, monkeypatch):
    home = tmp_path / "chatsmith_home"
    monkeypatch.setenv("CHATSMITH_HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def torch_threads():
    torch = sys.modules.get("torch")
    if torch is None:
        yield None
        return
    before = torch.get_num_threads()
    torch.set_num_threads(min(TEST_THREADS, before))
    yield torch.get_num_threads()
    torch.set_num_threads(before)

"""Shared test fixtures: every test gets its own CHATSMITH_HOME, and at most TEST_THREADS torch threads.

The thread cap: the test models are tiny, so on a many-core machine torch's default (one thread per core) only adds
contention, above all beside the subprocesses some tests start. It applies where torch is already imported (tests
that need torch import it at module level), so tests without torch do not pay for importing it; a test may still set
its own count, and the count before it is restored after it.
"""

import sys

import pytest

TEST_THREADS = 2


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

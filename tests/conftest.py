"""Shared test fixtures: every test gets its own CHATSMITH_HOME and small torch thread count."""

import pytest


@pytest.fixture(autouse=True)
def chatsmith_home(tmp_path, monkeypatch):
    home = tmp_path / "chatsmith_home"
    monkeypatch.setenv("CHATSMITH_HOME", str(home))
    return home

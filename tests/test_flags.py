"""Every numeric flag of every registered command, fed 0, -1, huge values, NaN and infinity: one sentence, never a
traceback.

    .venv/bin/pytest tests/test_flags.py -q

The commands come from `chatsmith.__main__.COMMANDS` when the test runs, so a command registered later is covered
without touching this file. Each call is `chatsmith.__main__.main([*command words, flag, value])` in an empty
CHATSMITH_HOME (a fresh one per call), and ends in one of two ways:

- exit code 2 and exactly one line on stderr. When the value is outside the range the field declares (or is not a
  number of the field's type, or is NaN or infinite), that line must name the flag. A value in range must fail
  later, also with one sentence: in an empty home most commands stop at the missing run or model.
- a command that needs no run (tokenizer training, the benchmarks, the speedrun) would start real work on a valid
  value. The test stops it at the first step that starts work (a progress bar, building a model, the matmul peak
  probe, reading document sources): reaching that step means the value passed every check before the work, which
  is what this test is about. A call that neither fails nor reaches such a step within a bounded time fails the test.

Also: every numeric field of every command declares both ends of its range (`opt(..., min=, max=)`), and hypothesis
draws further values (any int or float, in or out of range) for the parser's check.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import signal
import sys
import tempfile
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chatsmith
from chatsmith import __main__ as entry
from chatsmith import config
from chatsmith.common import UserError

HUGE_INT = str(2**63)
VALUES = ("0", "-1", HUGE_INT, "nan", "inf")  # the huge int is huge for float flags too
CALL_SECONDS = 60  # a call that runs longer neither failed early nor reached a work step: a test failure


class WorkStarted(BaseException):
    """Raised where a stage starts real work: the flag value got past every check before it."""


class Stuck(BaseException):
    """A call ran for CALL_SECONDS without failing or reaching a work step."""


def stage_class(command: str):
    module, name = entry.COMMANDS[command][2].split(":")
    return getattr(importlib.import_module(module), name)


def numeric_fields(stage_cls) -> list[tuple[str, dataclasses.Field, type]]:
    """(--flag, field, element type) of every int/float field (and tuple of them) of every section of a stage."""
    names = config.flag_names(stage_cls)
    out = []
    for section in dataclasses.fields(stage_cls):
        section_cls = section.type if isinstance(section.type, type) else type(section.default)
        hints = typing.get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            kind = hints[f.name]
            if typing.get_origin(kind) is tuple:
                kind = typing.get_args(kind)[0]
            if kind in (int, float):
                out.append((names[(section.name, f.name)], f, kind))
    return out


def expected_outside(value: str, kind: type, meta) -> bool:
    """True when `value` must be refused by the flag check itself (not a number of the type, non-finite, out of
    the declared range)."""
    try:
        v = kind(value)
    except ValueError:
        return True
    if not math.isfinite(v):
        return True
    return (meta.get("min") is not None and v < meta["min"]) or (meta.get("max") is not None and v > meta["max"])


@pytest.fixture(scope="module")
def work_guard(tmp_path_factory):
    """Every chatsmith module imported, then the functions that start work replaced by one raising WorkStarted,
    wherever a module holds them (modules bind `from .common import progress` at import). The precision probe's
    cache (machine.json) is made once here and copied into every fresh home, as a used machine would have it."""
    from chatsmith.common import choose_precision

    home = tmp_path_factory.mktemp("machine")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHATSMITH_HOME", str(home))
        choose_precision("cpu", "auto")
    machine = (home / "machine.json").read_bytes()
    for info in pkgutil.walk_packages(chatsmith.__path__, "chatsmith."):
        if info.name != "chatsmith.__main__":
            importlib.import_module(info.name)
    from chatsmith import common
    from chatsmith.data import sources
    from chatsmith.model import GPT

    def stop(*args, **kwargs):
        raise WorkStarted

    originals = [common.progress, common.matmul_peak_flops, common.precision_probe, sources.iter_documents,
                 sources.iter_split_documents]
    def alarm(signum, frame):
        raise Stuck

    with pytest.MonkeyPatch.context() as mp:
        for mod in [m for name, m in list(sys.modules.items()) if name.startswith("chatsmith")]:
            for attr, value in list(vars(mod).items()):
                if any(value is o for o in originals):
                    mp.setattr(mod, attr, stop)
        mp.setattr(GPT, "build", classmethod(stop))
        old = signal.signal(signal.SIGALRM, alarm)
        try:
            yield machine
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def call(argv: list[str], home_root: Path, machine: bytes, monkeypatch, capsys) -> tuple[str, str]:
    """('exit', stderr) for a call that returned 2, ('work', stderr) for one stopped at a work step."""
    home = Path(tempfile.mkdtemp(dir=home_root))
    (home / "machine.json").write_bytes(machine)
    monkeypatch.setenv("CHATSMITH_HOME", str(home))
    capsys.readouterr()
    signal.setitimer(signal.ITIMER_REAL, CALL_SECONDS)
    try:
        rc = entry.main(argv)
        outcome = "exit"
    except WorkStarted:
        rc, outcome = 2, "work"
    except Stuck:
        pytest.fail(f"`chatsmith {' '.join(argv)}` ran {CALL_SECONDS}s without failing or starting work")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    err = capsys.readouterr().err
    assert rc == 2, f"`chatsmith {' '.join(argv)}` returned {rc}; stderr: {err}"
    return outcome, err


@pytest.mark.parametrize("command", list(entry.COMMANDS))
def test_every_numeric_flag_declares_its_range(command):
    fields = numeric_fields(stage_class(command))
    missing = [flag for flag, f, _ in fields if f.metadata.get("min") is None or f.metadata.get("max") is None]
    assert not missing, f"chatsmith {command}: declare min= and max= for {missing}"


@pytest.mark.parametrize("command", list(entry.COMMANDS))
def test_bad_numeric_flags_give_one_sentence(command, work_guard, tmp_path, monkeypatch, capsys):
    words = command.split()
    checked = 0
    for flag, f, kind in numeric_fields(stage_class(command)):
        for value in VALUES:
            argv = [*words, flag, value]
            outcome, err = call(argv, tmp_path, work_guard, monkeypatch, capsys)
            assert "Traceback" not in err, f"`chatsmith {' '.join(argv)}`:\n{err}"
            if outcome == "work":
                assert not expected_outside(value, kind, f.metadata), f"{argv} reached work with a bad value"
                continue
            lines = [line for line in err.splitlines() if line.strip()]
            assert len(lines) == 1, f"`chatsmith {' '.join(argv)}` printed {len(lines)} lines:\n{err}"
            assert lines[0].startswith(f"chatsmith {command}: error: "), lines[0]
            if expected_outside(value, kind, f.metadata):
                assert flag in lines[0], f"`chatsmith {' '.join(argv)}`: the error does not name {flag}: {lines[0]}"
            checked += 1
    assert checked or not numeric_fields(stage_class(command))


def all_numeric_flags() -> list[tuple[str, str, type]]:
    return [(command, flag, kind) for command in entry.COMMANDS
            for flag, _, kind in numeric_fields(stage_class(command))]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_parsed_values_are_in_range_or_refused_naming_the_flag(data):
    """config.parse either returns a config whose field holds the value within its range, or refuses it with one
    sentence that names the flag."""
    command, flag, kind = data.draw(st.sampled_from(all_numeric_flags()))
    stage_cls = stage_class(command)
    if kind is int:
        value = data.draw(st.integers(min_value=-(2**70), max_value=2**70) | st.integers(-3, 3))
    else:
        value = data.draw(st.floats(allow_nan=True, allow_infinity=True) | st.floats(-2, 2))
    meta = next(f.metadata for fl, f, _ in numeric_fields(stage_cls) if fl == flag)
    n = meta.get("length") or 1
    try:
        cfg = config.parse(stage_cls, [flag, *[repr(value)] * n])
    except UserError as e:
        assert flag in str(e) and "\n" not in str(e)
        assert expected_outside(repr(value), kind, meta)
        return
    assert not expected_outside(repr(value), kind, meta)
    assert cfg is not None

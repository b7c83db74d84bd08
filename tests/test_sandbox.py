"""Tests for chatsmith/sandbox.py: the limits of `run_python` (time, memory, output, processes, files), and escape
attempts a hostile model could write, each of which must be contained with the chat going on: read the parent's
environment (/proc/<ppid>/environ, /proc/1/environ and every other /proc/*/environ, with a secret set here), read
and write our files (the test's tmp dir, $HOME), signal our process, connect to a loopback port this test listens
on, outlive the run through setsid(), a fork bomb, a memory bomb, a /tmp file bomb and infinite output.

Tests that start the sandbox skip, with bwrap's own reason, where bubblewrap is missing or cannot create namespaces
(CI installs it: .ci/run); the refusal itself (one sentence naming `apt-get install bubblewrap`) is tested everywhere
with a missing and with a failing fake bwrap.

    .venv/bin/pytest tests/test_sandbox.py -q
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from chatsmith import sandbox
from chatsmith.common import UserError
from chatsmith.sandbox import SandboxUnavailable, check_sandbox, run_python


@pytest.fixture(scope="module")
def sandbox_works() -> None:
    try:
        check_sandbox()
    except SandboxUnavailable as exc:
        pytest.skip(f"the sandbox cannot start here: {exc}")


needs_sandbox = pytest.mark.usefixtures("sandbox_works")


def host_processes_with(marker: str) -> list[int]:
    """pids of our processes (seen from outside any sandbox) whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def gone(marker: str, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while host_processes_with(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill_leftovers(marker: str) -> None:
    for pid in host_processes_with(marker):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def sleeper(marker: str) -> str:
    """Python source that replaces the current process with one sleeping under `marker` in its command line."""
    return f"os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(600)', {marker!r}])"


# ---------------------------------------------------------------------------------------------------------------------
# the refusal where bubblewrap cannot run (no sandbox needed)


def test_missing_bwrap_is_refused_in_one_sentence(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable) as caught:
        run_python("print(1)")
    message = str(caught.value)
    assert isinstance(caught.value, UserError) and "apt-get install bubblewrap" in message
    assert "\n" not in message and message.count(". ") == 0


def test_bwrap_that_cannot_create_namespaces_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "bwrap"  # what bwrap prints where user namespaces are off
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace, likely because the kernel does "
                    "not allow non-privileged user namespaces.' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: str(fake))
    with pytest.raises(SandboxUnavailable) as caught:
        run_python("print(1)")
    message = str(caught.value)
    assert "No permissions to create new namespace" in message and "apt-get install bubblewrap" in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------------------------------
# what a program can do: print, fail, be stopped at its limits


@needs_sandbox
def test_run_python_prints():
    result = run_python("print(6 * 7)")
    assert (result.stdout, result.stderr, result.exit_code) == ("42\n", "", 0)
    assert not (result.timed_out or result.memory_exceeded or result.truncated)
    assert result.format() == "42"


@needs_sandbox
def test_exit_codes_and_signals_follow_subprocess():
    assert run_python("def (:\n").exit_code == 1
    syntax = run_python("def (:\n")
    assert "SyntaxError" in syntax.stderr and syntax.format().endswith("[exit code 1]")
    assert run_python("raise SystemExit(3)").exit_code == 3
    killed = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)")
    assert killed.exit_code == -15 and not killed.timed_out


@needs_sandbox
def test_the_venv_and_stdlib_import_read_only():
    code = ("import json, sqlite3, sys, numpy\nprint(json.dumps([sys.prefix, int(numpy.arange(10).sum())]))\n"
            "open(numpy.__file__, 'a')")
    result = run_python(code)
    prefix, total = json.loads(result.stdout)
    assert prefix == sys.prefix and total == 45
    assert ("Read-only file system" in result.stderr or "Permission denied" in result.stderr) and result.exit_code == 1


@needs_sandbox
def test_infinite_loop_is_killed_at_the_timeout():
    result = run_python("print('started', flush=True)\nwhile True:\n    pass\n", timeout_s=3.0)
    assert result.timed_out and not result.memory_exceeded and result.exit_code == -9  # bwrap got SIGKILL
    assert result.stdout == "started\n"  # output written before the kill is kept
    assert "timed out after 3 s" in result.format()


@needs_sandbox
def test_memory_bomb_is_stopped_at_the_limit():
    ok = run_python("x = bytearray(64 * 1024**2)\nprint(len(x))", memory_mb=256)
    assert ok.stdout == f"{64 * 1024**2}\n" and not ok.memory_exceeded
    bomb = run_python("x = bytearray(2 * 1024**3)\nprint('allocated')", memory_mb=256, timeout_s=5.0)
    assert bomb.memory_exceeded and not bomb.timed_out
    assert bomb.stdout == "" and "MemoryError" in bomb.stderr
    assert "[memory limit of 256 MB exceeded]" in bomb.format()


@needs_sandbox
def test_infinite_output_is_cut_keeping_head_and_tail():
    exact = run_python("print('y' * 999)", max_output_bytes=1000)  # 1000 bytes with the newline: not cut
    assert exact.stdout == "y" * 999 + "\n" and not exact.truncated
    code = "import sys\nprint('x' * 100_000 + 'END')\nsys.stderr.write('e' * 50_000)\nraise ValueError('boom')"
    result = run_python(code, max_output_bytes=1000)
    assert result.truncated and result.exit_code == 1
    head, cut, tail = result.stdout.partition("\n[... 99004 bytes cut ...]\n")  # 100_004 bytes printed, 1000 kept
    assert cut and head == "x" * 750 and tail == "x" * 246 + "END\n"
    assert len(result.stderr) < 1100 and result.stderr.rstrip().endswith("ValueError: boom")
    endless = run_python("import sys\nwhile True:\n    sys.stdout.write('z' * 4096)\n    sys.stderr.write('e')\n",
                         timeout_s=3.0, max_output_bytes=2000)
    assert endless.timed_out and endless.truncated
    assert len(endless.stdout) < 2100 and len(endless.stderr) < 2100
    assert endless.stdout.startswith("z" * 1500) and "bytes cut" in endless.stdout


@needs_sandbox
def test_each_run_gets_a_fresh_private_tmp():
    code = ("import os\nprint(os.getcwd(), os.environ['HOME'], os.environ['TMPDIR'])\nprint(sorted(os.listdir()))\n"
            "open('data.txt', 'w').write('x' * 1000)")
    first, second = run_python(code), run_python(code)
    # beside the program, only the mount points of the read-only interpreter views that live under /tmp (a checkout
    # or venv in /tmp): the first run's data.txt is gone
    interpreter = (sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable)))
    views = {os.path.abspath(p) for p in interpreter}
    listing = sorted({"main.py", *(Path(v).relative_to("/tmp").parts[0] for v in views if v.startswith("/tmp/"))})
    assert first.stdout == second.stdout == f"/tmp /tmp /tmp\n{listing}\n"


@needs_sandbox
def test_environment_is_minimal(monkeypatch):
    monkeypatch.setenv("CHATSMITH_SECRET", "hunter2")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-do-not-leak")
    monkeypatch.setenv("PYTHONSTARTUP", "/nonexistent")
    result = run_python("import json, os\nprint(json.dumps(dict(os.environ)))")
    env = json.loads(result.stdout)
    assert "hunter2" not in result.stdout and "sk-do-not-leak" not in result.stdout
    assert set(env) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                        "MKL_NUM_THREADS", "MALLOC_ARENA_MAX", "PWD"}
    assert env["HOME"] == "/tmp"


@needs_sandbox
def test_from_several_threads():
    results: dict[int, str] = {}

    def work(i: int) -> None:
        results[i] = run_python(f"print({i} * {i})").stdout

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: f"{i * i}\n" for i in range(4)}


# ---------------------------------------------------------------------------------------------------------------------
# escape attempts


@needs_sandbox
def test_parent_environment_is_not_readable(monkeypatch):
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("CHATSMITH_TEST_SECRET", secret)
    code = ("import os\nseen = []\n"
            "for path in ['/proc/%d/environ' % os.getppid(), '/proc/1/environ'] + "
            "['/proc/%s/environ' % p for p in os.listdir('/proc') if p.isdigit()]:\n"
            "    try:\n        seen.append(open(path, 'rb').read().decode(errors='replace'))\n"
            "    except OSError as e:\n        seen.append(repr(e))\n"
            "print('\\n'.join(seen))\nprint(os.getpid(), os.getppid(), sorted(p for p in os.listdir('/proc') "
            "if p.isdigit()))")
    result = run_python(code)
    assert result.exit_code == 0, result.format()
    assert secret not in result.stdout  # the test process's own /proc/<pid>/environ holds it
    pid, ppid, visible = result.stdout.splitlines()[-1].split(" ", 2)
    assert visible == "['1', '2']" and (pid, ppid) == ("2", "1")  # its own pid namespace: bwrap's pid 1 and itself


@needs_sandbox
def test_our_process_cannot_be_signalled():
    result = run_python(f"import os\nos.kill({os.getpid()}, 0)\nprint('reached the test process')")
    assert "reached" not in result.stdout and "ProcessLookupError" in result.stderr


@needs_sandbox
def test_files_outside_the_sandbox_are_neither_read_nor_written(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read me")
    home_target = Path.home() / f"chatsmith-sandbox-escape-{uuid.uuid4().hex}"
    targets = [tmp_path / "written.txt", home_target, Path(sandbox.__file__).with_name("written.py")]
    code = (f"import os\ntry:\n    print(open({str(secret)!r}).read())\nexcept OSError as e:\n    print('read', e)\n"
            f"for path in {[str(t) for t in targets]!r} + ['/etc/escape', '/usr/escape', '/escape']:\n"
            "    try:\n        open(path, 'w').write('escaped')\n        print('WROTE', path)\n"
            "    except OSError as e:\n        print('refused', e.errno)\n"
            f"try:\n    os.remove({str(secret)!r})\n    print('REMOVED')\n"
            "except OSError as e:\n    print('refused', e.errno)")
    try:
        result = run_python(code)
        assert "do not read me" not in result.stdout and "WROTE" not in result.stdout
        assert "REMOVED" not in result.stdout and result.exit_code == 0, result.format()
        assert secret.read_text() == "do not read me"
        assert not any(t.exists() for t in targets)
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


@needs_sandbox
def test_loopback_port_is_unreachable():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    code = (f"import socket\ns = socket.socket()\ns.settimeout(2)\ntry:\n    s.connect(('127.0.0.1', {port}))\n"
            "    s.sendall(b'escaped')\n    print('CONNECTED')\nexcept OSError as e:\n    print('refused', e)")
    try:
        result = run_python(code)
        with pytest.raises(TimeoutError):
            listener.accept()  # no connection ever arrived
    finally:
        listener.close()
    assert "CONNECTED" not in result.stdout and "refused" in result.stdout, result.format()


@needs_sandbox
def test_setsid_child_does_not_outlive_the_run():
    marker = f"chatsmith-orphan-{uuid.uuid4().hex}"
    code = f"import os, sys\nif os.fork() == 0:\n    os.setsid()\n    {sleeper(marker)}\nprint('parent exits')"
    try:
        result = run_python(code, timeout_s=5.0)
        assert result.stdout == "parent exits\n" and not result.timed_out
        assert gone(marker)
    finally:
        kill_leftovers(marker)


@needs_sandbox
def test_children_die_with_the_timeout():
    marker = f"chatsmith-child-{uuid.uuid4().hex}"
    code = (f"import os, sys, subprocess\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', "
            f"{marker!r}], start_new_session=True)\nwhile True:\n    pass\n")
    try:
        result = run_python(code, timeout_s=1.0)
        assert result.timed_out and gone(marker)
    finally:
        kill_leftovers(marker)


@needs_sandbox
def test_processes_are_limited():
    code = ("import os, time\nn = 0\ntry:\n    while n < 500:\n        if os.fork() == 0:\n            time.sleep(5)\n"
            "            os._exit(0)\n        n += 1\nexcept OSError as e:\n    print(n, type(e).__name__)\nelse:\n"
            "    print(n, 'forks')")
    result = run_python(code, timeout_s=10.0, max_processes=16)
    count, outcome = result.stdout.split()
    assert outcome == "BlockingIOError" and int(count) < 16  # the limit holds the program and its threads


@needs_sandbox
def test_fork_bomb_fails_fast():
    code = "import os\nfirst = os.getpid()\ntry:\n    while True:\n        os.fork()\nexcept BlockingIOError:\n" \
           "    if os.getpid() == first:\n        print('fork refused')"
    result = run_python(code, timeout_s=10.0)
    assert not result.timed_out and result.stdout == "fork refused\n", result.format()


@needs_sandbox
def test_tmp_file_bomb_hits_the_tmpfs_size():
    code = ("import os\nwritten = 0\ntry:\n    for i in range(200):\n        with open(f'/tmp/f{i}', 'wb') as f:\n"
            "            f.write(b'x' * (1 << 20))\n        written += 1\nexcept OSError as e:\n"
            "    print(written, e.errno)\nelse:\n    print(written, 'files')")
    result = run_python(code, timeout_s=10.0)
    written, outcome = result.stdout.split()
    assert outcome == "28" and int(written) < 64  # ENOSPC: the private /tmp is a 64 MB tmpfs


# ---------------------------------------------------------------------------------------------------------------------
# the chat goes on: every attempt above as a tool call in one conversation


@needs_sandbox
def test_escape_attempts_in_a_chat_are_contained_and_the_chat_goes_on(monkeypatch):
    from test_engine import ScriptedModel
    from test_turns import USER, call_text

    from chatsmith.engine import Engine
    from chatsmith.sampling import SamplingParams
    from chatsmith.tokenizer import Tokenizer
    from chatsmith.turns import chat

    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("CHATSMITH_TEST_SECRET", secret)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    outside = Path.home() / f"chatsmith-sandbox-escape-{uuid.uuid4().hex}"
    attempts = [  # (program, its timeout, the last line of its tool turn)
        ("import os\ndef read(path):\n    try:\n        return open(path, 'rb').read()\n    except OSError:\n"
         "        return b''\nprint(any(b'CHATSMITH_TEST_SECRET' in read(f'/proc/{p}/environ') "
         "for p in os.listdir('/proc') if p.isdigit()))", 10, "False"),
        (f"open({str(outside)!r}, 'w')", 10, "[exit code 1]"),
        (f"import socket\nprint(socket.socket().connect_ex(('127.0.0.1', {port})))", 10, "111"),
        ("import os\nfirst = os.getpid()\ntry:\n    while True:\n        os.fork()\nexcept BlockingIOError:\n"
         "    if os.getpid() == first:\n        print('fork refused')", 10, "fork refused"),
        ("x = bytearray(2 * 1024**3)", 10, "[memory limit of 256 MB exceeded]"),
        ("import sys\nfor _ in range(10_000):\n    sys.stdout.write('y' * 10_000)", 10,  # 100 MB of output
         "[output truncated to 4096 bytes per stream]"),
    ]
    tok = Tokenizer.train(["print import os while True fork socket open " * 50] * 10, 300, show_progress=False)
    history, rounds, results = list(USER), [], []
    timeouts = {code: timeout for code, timeout, _ in attempts}
    for code, _, last_line in attempts:
        call = {"name": "python", "arguments": {"code": code}}
        rounds.append((list(history), call_text(**call)))
        history += [{"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": last_line}]
    rounds.append((history, "All contained."))

    def python_tool(name: str, arguments: dict) -> str:  # the sandbox, 256 MB; the tool turn is the last line
        results.append(run_python(arguments["code"], timeout_s=timeouts[arguments["code"]], memory_mb=256))
        return results[-1].format().splitlines()[-1]

    try:
        scripts = {tuple(tok.render_for_completion(msgs)): tok.encode(text) for msgs, text in rounds}  # else KeyError
        engine = Engine(ScriptedModel(tok.vocab_size, scripts, seq_len=4096), tok, slots=1, max_len=4096)
        reply = chat(engine, tok, USER, SamplingParams(temperature=0, max_tokens=1000),
                     max_tool_calls=len(attempts), run_tool=python_tool)
    finally:
        listener.close()
        outside.unlink(missing_ok=True)
    assert reply.finish_reason == "stop" and reply.tool_calls == len(attempts)
    assert reply.messages[-1] == {"role": "assistant", "content": "All contained."}
    assert [m["content"] for m in reply.messages if m["role"] == "tool"] == [line for _, _, line in attempts]
    assert secret not in "".join(r.stdout + r.stderr for r in results) and not outside.exists()


def test_python_is_off_by_default_everywhere():
    import inspect

    from chatsmith import tools, turns
    from chatsmith.cli import ChatConfig
    from chatsmith.rl import calculator_only
    from chatsmith.server import ServeConfig, web_tools

    assert ChatConfig().allow_python is False and ServeConfig().allow_python is False
    assert web_tools(ServeConfig()) == ("calculator",)
    assert web_tools(ServeConfig(allow_python=True)) == ("calculator", "python")
    for function in (turns.chat, tools.run_tool):
        assert inspect.signature(function).parameters["allow_python"].default is False, function
    # RL rollouts and the assistant checks (both through rl.rollout) run the calculator alone
    assert calculator_only("python", {"code": "print(1)"}).startswith("error: no tool named 'python'")


def python_chat(allow_python: bool) -> list[dict]:
    """One reply whose model calls the python tool through turns.chat's default runner; the messages it added."""
    from test_turns import USER, call_text, scripted_engine

    from chatsmith.sampling import SamplingParams
    from chatsmith.tokenizer import Tokenizer
    from chatsmith.turns import chat

    tok = Tokenizer.train(["print(6 * 7) python error the tool is off " * 50] * 10, 300, show_progress=False)
    call = {"name": "python", "arguments": {"code": "print(6 * 7)"}}
    turn = {"role": "assistant", "content": "", "tool_calls": [call]}
    output = "42" if allow_python else tools_off_text()
    engine = scripted_engine(tok, [(USER, call_text(**call)),
                                   (USER + [turn, {"role": "tool", "content": output}], "Done.")])
    return chat(engine, tok, USER, SamplingParams(temperature=0), allow_python=allow_python).messages


def tools_off_text() -> str:
    from chatsmith.tools import run_tool

    return run_tool("python", {"code": "print(6 * 7)"})


def test_chat_refuses_python_unless_allowed(monkeypatch):
    ran = []
    monkeypatch.setattr("chatsmith.tools.run_python", lambda code: ran.append(code))
    messages = python_chat(allow_python=False)
    assert messages[1]["content"].startswith("error: the python tool is off") and ran == []
    assert messages[-1]["content"] == "Done."


@needs_sandbox
def test_chat_with_python_allowed_runs_it_in_the_sandbox():
    messages = python_chat(allow_python=True)
    assert [m["role"] for m in messages] == ["assistant", "tool", "assistant"]
    assert messages[1]["content"] == "42" and messages[-1]["content"] == "Done."

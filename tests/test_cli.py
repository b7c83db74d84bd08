"""The command line: the command table, help, and one-sentence errors with exit code 2."""

import subprocess
import sys

from chatsmith.__main__ import COMMANDS, main


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "chatsmith", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_help_lists_every_stage():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


def test_every_command_resolves_its_config_and_function():
    # --help of each command builds its parser from the config dataclasses (exits 0 through argparse)
    for name in COMMANDS:
        out = run_cli(*name.split(), "--help")
        assert out.returncode == 0, (name, out.stderr)
        assert "usage: chatsmith " + name in out.stdout


def test_unknown_command_and_bad_flag_exit_2(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    out = run_cli("pretrain", "--depth", "four")
    assert out.returncode == 2 and "invalid int value" in out.stderr


def test_user_error_is_one_sentence_without_traceback():
    out = run_cli("pretrain", "--preset", "smoke", "--run", "missing-run")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "tokenizer train" in lines[0]

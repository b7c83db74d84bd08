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


def test_version_matches_the_package_metadata(capsys):
    import tomllib
    from pathlib import Path

    assert main(["--version"]) == 0
    version = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out == f"chatsmith {version}\n"


def test_a_group_word_alone_or_with_help_lists_its_commands(capsys):
    groups = {name.split()[0] for name in COMMANDS if " " in name}
    assert {"bench", "tokenizer", "data"} <= groups
    for group in groups:
        for argv in ([group], [group, "--help"], [group, "-h"]):
            assert main(argv) == 0, argv
            listed = [line.split()[:2] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
            assert sorted(" ".join(words) for words in listed) == sorted(n for n in COMMANDS if n.split()[0] == group)
    assert main(["bench", "frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'bench frobnicate'" in err and "bench train" in err and "pretrain" not in err

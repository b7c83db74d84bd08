"""The command line: the command table, help, and one-sentence errors with exit code 2."""

import subprocess
import sys

import torch  # imported before the conftest fixtures run, so its thread cap applies here

from chatsmith.__main__ import COMMANDS, main


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "chatsmith", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_help_lists_every_stage():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


def test_every_command_resolves_its_config_and_function(capsys):
    # --help of each command builds its parser from the config dataclasses (exits 0 through argparse); in this
    # process, since a fresh interpreter per command costs minutes on a busy machine
    import importlib

    import pytest

    for name, (module, func, _, _) in COMMANDS.items():
        with pytest.raises(SystemExit) as exited:
            main([*name.split(), "--help"])
        assert exited.value.code == 0, name
        assert "usage: chatsmith " + name in capsys.readouterr().out
        assert callable(getattr(importlib.import_module(module), func)), name


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


def test_torch_is_a_range_in_the_package_and_pinned_in_the_install_commands():
    import re
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    root = Path(__file__).parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = Requirement(next(d for d in deps if re.match(r"torch\b", d)))
    pins = re.findall(r"torch==([\d.]+)", (root / "README.md").read_text() + (root / ".ci" / "run").read_text())
    assert len(pins) >= 3 and len(set(pins)) == 1  # both README install lines and CI pin one version
    assert all(spec.operator != "==" for spec in torch_req.specifier)  # a CUDA build of another version installs
    assert torch_req.specifier.contains(pins[0]) and not torch_req.specifier.contains("3.0.0")


def test_default_run_skips_slow_tests(tmp_path):
    import os
    from pathlib import Path

    (tmp_path / "test_marks.py").write_text("import pytest\n\n\n@pytest.mark.slow\ndef test_slow():\n    pass\n\n\n"
                                           "def test_fast():\n    pass\n")
    ini = Path(__file__).parents[1] / "pyproject.toml"  # the project's own pytest settings (addopts, markers)
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # the settings alone decide; starts faster
    out = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ini), "--rootdir", str(tmp_path), "--co", "-q",
                          "-p", "no:cacheprovider", str(tmp_path)], capture_output=True, text=True, timeout=120,
                         env=env)
    assert "test_marks.py::test_fast" in out.stdout and "test_slow" not in out.stdout, out.stdout
    assert "1/2 tests collected (1 deselected)" in out.stdout, out.stdout


def test_each_test_runs_with_at_most_the_conftest_thread_count(torch_threads):
    from conftest import TEST_THREADS

    assert torch_threads is not None and torch.get_num_threads() == torch_threads <= TEST_THREADS

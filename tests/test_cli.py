"""The command line: clear one-line errors and a non-zero exit code for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tidar.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tidar.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, fragment", [
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "must be >= 1"),
    (["generate", "--prompt", "x", "--max-new-tokens", "-3"], "must be >= 1"),
    (["generate", "--prompt", "x", "--bogus"], "unrecognized arguments"),
    (["generate", "--prompt", "x", "--dtype", "int4"], "dtype must be"),
    (["nonsense"], "invalid choice"),
])
def test_argument_errors_are_one_line(args, fragment, capsys):
    try:
        code = main(args)
    except SystemExit as e:  # the top-level parser exits; a subcommand's returns its code
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_empty_prompt_and_missing_model():
    r = run("generate", "--prompt", "   ")
    assert r.returncode == 2 and r.stderr.strip() == "error: --prompt is empty: give the text to continue"
    r = run("generate", "--prompt", "hi", "--model", "/no/such/dir")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("command", [["serve"], ["profile"], ["demo"], ["generate", "--prompt", "x"]])
def test_a_missing_model_is_one_line(command, monkeypatch, capsys):
    from tidar.model.weights import WeightsError
    from tidar.runtime import Runtime

    def load(cls, *a, **k):
        raise WeightsError("model directory /no/such/dir does not exist")

    monkeypatch.setattr(Runtime, "load", classmethod(load))
    assert main([*command, "--model", "/no/such/dir"]) == 2
    assert capsys.readouterr().err.strip() == "error: model directory /no/such/dir does not exist"

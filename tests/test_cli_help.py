"""Every flag of `tidar serve | profile | plot | demo` says in --help what it does."""

from __future__ import annotations

import importlib

import pytest

COMMANDS = {"serve": "serve", "profile": "profile", "plot": "plot", "demo": "demo"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_has_help_text(command, capsys):
    if command == "serve":
        pytest.importorskip("fastapi", reason="the `serve` extra (fastapi, uvicorn) is not installed")
    if command in ("plot", "demo"):
        pytest.importorskip("matplotlib", reason="plots need matplotlib")
    module = importlib.import_module(f"tidar.cli.{COMMANDS[command]}")
    parser = module.build_parser()
    undocumented = [a.option_strings or a.dest for a in parser._actions if not (a.help or "").strip()]
    assert undocumented == []
    assert module.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: tidar {command}")
    assert all(s in text for a in parser._actions for s in a.option_strings)

"""`tidar lm-eval`: the harness's own command line, every argument passed through unchanged, with
the "tidar" model registered. It has no flags of its own."""

from __future__ import annotations

import sys

import pytest

from tidar.cli.lm_eval import main
from tidar.serve import lm_eval as adapter


def test_arguments_reach_the_harness_with_tidar_registered(monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")
    import lm_eval.__main__
    from lm_eval.api.registry import get_model

    seen = {}

    def cli_evaluate():  # the harness reads sys.argv itself
        seen.update(argv=list(sys.argv), model=get_model("tidar"))

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", cli_evaluate)
    before = list(sys.argv)
    args = ["--model", "tidar", "--model_args", "model=smollm2,dtype=float32", "--tasks", "toy", "--limit", "2"]
    assert main(args) == 0
    assert seen == {"argv": ["tidar lm-eval", *args], "model": adapter.TidarLM}
    assert sys.argv == before  # restored for whoever runs next in this process


def test_help_is_the_harness_help(capsys):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "Language Model Evaluation Harness" in capsys.readouterr().out


def test_without_lm_eval_it_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(adapter, "LM", None)
    assert main(["--model", "tidar"]) == 2
    assert capsys.readouterr().err.strip() == "error: lm-eval is not installed (pip install lm-eval==0.4.13)"

"""`tidar demo`: every flag changes what is loaded, generated, checked or written, on a tiny
random model (never the shipped weights)."""

from __future__ import annotations

import dataclasses
import json

import pytest

pytest.importorskip("matplotlib", reason="the demo plots with matplotlib")

from conftest import tiny_model  # noqa: E402
from test_bench import CharTokenizer  # noqa: E402

from tidar.cli.demo import main  # noqa: E402
from tidar.demo import PROMPTS  # noqa: E402
from tidar.runtime import Runtime, TextResult  # noqa: E402


class ChatCharTokenizer(CharTokenizer):
    chat_template = "<role>content\n"  # only its truthiness matters to the runtime

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = True):  # noqa: ANN001, ANN201
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + ("<assistant>" if add_generation_prompt else "")
        return self.encode(text) if tokenize else text


class DemoRuntime(Runtime):
    """Records every generation's config; with `differs`, TiDAR's last token differs from AR's,
    as a bfloat16 near-tie can make it."""

    def __init__(self, differs: bool) -> None:
        super().__init__(tiny_model(seed=3), ChatCharTokenizer(), name="tiny")
        self.differs = differs
        self.configs: list = []

    def generate_text(self, prompt, gen, chat=False, stop=None, stream=None) -> TextResult:  # noqa: ANN001
        self.configs.append(gen)
        r = super().generate_text(prompt, gen, chat=chat, stop=stop, stream=stream)
        if self.differs and gen.mode == "tidar" and r.tokens:
            r = dataclasses.replace(r, tokens=[*r.tokens[:-1], (r.tokens[-1] + 1) % 96])
        return r


@pytest.fixture
def demo(monkeypatch):
    """Runs `tidar demo` on tiny models: records each Runtime.load's arguments and runtime, and the
    threads set. Outputs differ from AR in the dtypes listed in calls["differ_in"]."""
    calls: dict = {"loads": [], "runtimes": [], "differ_in": set()}

    def load(cls, name=None, dtype="bfloat16", compile=None):
        calls["loads"].append((name, dtype, compile))
        calls["runtimes"].append(DemoRuntime(dtype in calls["differ_in"]))
        return calls["runtimes"][-1]

    monkeypatch.setattr(Runtime, "load", classmethod(load))
    monkeypatch.setattr("torch.set_num_threads", lambda n: calls.__setitem__("threads", n))
    return calls


def rows(out_dir) -> list[dict]:
    return json.loads((out_dir / "demo.json").read_text())


def test_defaults(demo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    assert demo["loads"] == [(None, "bfloat16", None)] and "threads" not in demo
    got = rows(tmp_path / "out" / "demo")
    assert [r["prompt"] for r in got] == [name for name, _, _ in PROMPTS] and all(r["matches_ar"] for r in got)
    assert (tmp_path / "out" / "demo" / "demo.png").stat().st_size > 0
    assert {g.max_new_tokens for g in demo["runtimes"][0].configs} == {8, 96}  # warm-up, then the default
    assert "identical to AR: True" in capsys.readouterr().out


def test_model_dtype_compile_and_threads(demo, tmp_path):
    assert main(["--model", "some/dir", "--dtype", "fp32", "--compile", "--threads", "3",
                 "--max-new-tokens", "4", "--out", str(tmp_path)]) == 0
    assert demo["loads"] == [("some/dir", "float32", True)] and demo["threads"] == 3
    assert main(["--no-compile", "--max-new-tokens", "4", "--out", str(tmp_path)]) == 0
    assert demo["loads"][-1] == (None, "bfloat16", False)


def test_max_new_tokens_bounds_every_timed_generation(demo, tmp_path):
    assert main(["--max-new-tokens", "5", "--out", str(tmp_path)]) == 0
    configs = demo["runtimes"][0].configs[2:]  # after the two warm-ups
    assert len(configs) == 2 * len(PROMPTS) and {g.max_new_tokens for g in configs} == {5}
    assert all(r[m]["generated_tokens"] <= 5 for r in rows(tmp_path) for m in ("tidar", "ar"))


def test_out_is_where_results_go(demo, tmp_path, capsys):
    out = tmp_path / "a" / "b"
    assert main(["--max-new-tokens", "4", "--out", str(out)]) == 0
    assert len(rows(out)) == len(PROMPTS) and (out / "demo.png").exists()
    assert f"results written to {out / 'demo.json'}" in capsys.readouterr().out


def test_exact_check_reruns_differing_prompts_in_float32(demo, tmp_path, capsys):
    demo["differ_in"] = {"bfloat16"}
    assert main(["--max-new-tokens", "6", "--out", str(tmp_path)]) == 0
    assert demo["loads"] == [(None, "bfloat16", None), (None, "float32", False)]
    got = rows(tmp_path)
    assert not any(r["matches_ar"] for r in got) and all(r["matches_ar_float32"] for r in got)
    out = capsys.readouterr().out
    assert "float32 check below" in out and "exactness check: the 3 prompt(s)" in out


def test_no_exact_check_skips_the_float32_rerun(demo, tmp_path, capsys):
    demo["differ_in"] = {"bfloat16"}
    assert main(["--no-exact-check", "--max-new-tokens", "6", "--out", str(tmp_path)]) == 0
    assert demo["loads"] == [(None, "bfloat16", None)]
    assert not any("matches_ar_float32" in r for r in rows(tmp_path))
    assert "exactness check" not in capsys.readouterr().out


def test_exact_check_has_nothing_to_add_in_float32(demo, tmp_path):
    demo["differ_in"] = {"float32"}
    assert main(["--dtype", "float32", "--max-new-tokens", "6", "--out", str(tmp_path)]) == 0
    assert demo["loads"] == [(None, "float32", None)]


@pytest.mark.parametrize("args, fragment", [
    (["--max-new-tokens", "0"], "must be >= 1"),
    (["--dtype", "int8"], "dtype must be"),
    (["--threads", "none"], "expected a positive integer"),
    (["--exact-check=no"], "ignored explicit argument"),
])
def test_bad_flags_are_one_line_errors_before_loading(demo, capsys, args, fragment):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tidar demo:") and fragment in err and len(err.splitlines()) == 1
    assert demo["loads"] == []


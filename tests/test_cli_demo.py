"""`tidar demo`: every flag changes what is loaded, generated, checked or written, on a tiny
random model (never the shipped weights)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import pytest

pytest.importorskip("matplotlib", reason="the demo plots with matplotlib")

from conftest import tiny_model  # noqa: E402
from test_bench import CharTokenizer  # noqa: E402

from tidar.cli.demo import main  # noqa: E402
from tidar.decode import GenerationConfig  # noqa: E402
from tidar.demo import PROMPTS  # noqa: E402
from tidar.runtime import Runtime, TextResult  # noqa: E402


class ChatCharTokenizer(CharTokenizer):
    chat_template = "<role>content\n"  # only its truthiness matters to the runtime

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = True):  # noqa: ANN001, ANN201
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + ("<assistant>" if add_generation_prompt else "")
        return self.encode(text) if tokenize else text


def any_tidar(gen: GenerationConfig) -> bool:
    return gen.mode == "tidar"


class DemoRuntime(Runtime):
    """Records every generation's config; where `differs(config)`, TiDAR's last token differs from
    AR's, as a bfloat16 near-tie can make it."""

    def __init__(self, differs: Callable[[GenerationConfig], bool] | None, operating_point: dict | None = None) -> None:
        super().__init__(tiny_model(seed=3), ChatCharTokenizer(), operating_point=operating_point, name="tiny")
        self.differs = differs or (lambda gen: False)
        self.configs: list = []

    def generate_text(self, prompt, gen, chat=False, stop=None, stream=None) -> TextResult:  # noqa: ANN001
        self.configs.append(gen)
        r = super().generate_text(prompt, gen, chat=chat, stop=stop, stream=stream)
        if self.differs(gen) and r.tokens:
            r = dataclasses.replace(r, tokens=[*r.tokens[:-1], (r.tokens[-1] + 1) % 96])
        return r


@pytest.fixture
def demo(monkeypatch):
    """Runs `tidar demo` on tiny models: records each Runtime.load's arguments and runtime, and the
    threads set. In the dtypes listed in calls["differ_in"], the TiDAR runs calls["differs"] picks
    (all by default) differ from AR; the models' operating point is calls["operating_point"]."""
    calls: dict = {"loads": [], "runtimes": [], "differ_in": set(), "differs": any_tidar, "operating_point": None}

    def load(cls, name=None, dtype="bfloat16", compile=None, weights=None):
        calls["loads"].append((name, dtype, compile))
        differs = calls["differs"] if dtype in calls["differ_in"] else None
        calls["runtimes"].append(DemoRuntime(differs, calls["operating_point"]))
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
    out = capsys.readouterr().out
    assert out.count("--- TiDAR shipped mix (diffusion + copy drafts): ") == len(PROMPTS)
    assert out.count("--- diffusion drafts alone (the paper's TiDAR): ") == len(PROMPTS)
    assert "identical to AR: True" in out and "identical to AR: False" not in out


def test_diffusion_drafts_alone_are_measured_next_to_the_shipped_mix(demo, tmp_path, capsys):
    """The shipped operating point mixes in copy drafts; the third run of each prompt has them off."""
    demo["operating_point"] = {"block_size": 3, "policy": "full", "lookup_ngram": 2, "min_draft_gain": 0.5}
    assert main(["--max-new-tokens", "12", "--out", str(tmp_path)]) == 0
    timed = demo["runtimes"][0].configs[3:]  # after the three warm-ups: shipped mix, AR, diffusion only per prompt
    assert [g.mode for g in timed] == ["tidar", "ar", "tidar"] * len(PROMPTS)
    assert all(g.lookup_ngram == 2 and g.policy == "full" and g.min_draft_gain == 0.5 for g in timed[0::3])
    assert all(g.lookup_ngram == 0 and g.datastore_tokens == 0 and g.policy == "all" and g.min_draft_gain == 0
               and g.block_size == 3 for g in timed[2::3])
    out = capsys.readouterr().out
    for r in rows(tmp_path):
        di, ar = r["tidar_diffusion"], r["ar"]
        assert di["accepted_drafts"]["lookup"] == 0 and di["accepted_drafts"]["datastore"] == 0
        assert di["plain_forwards"] == 0 and di["query_tokens"] == di["forwards"] * (3 + 3 * 3)  # a block every step
        assert r["diffusion_matches_ar"] is True and di["generated_tokens"] == ar["generated_tokens"] == 12
        assert r["diffusion_speedup_vs_ar"] == pytest.approx(di["tokens_per_s"] / ar["tokens_per_s"])
        assert (f"--- diffusion drafts alone (the paper's TiDAR): {di['tokens_per_forward']:.2f} tokens/forward, "
                f"{di['tokens_per_s']:.1f} tok/s ({r['diffusion_speedup_vs_ar']:.2f}x AR), identical to AR: True\n") in out


def test_model_dtype_compile_and_threads(demo, tmp_path):
    assert main(["--model", "some/dir", "--dtype", "fp32", "--compile", "--threads", "3",
                 "--max-new-tokens", "4", "--out", str(tmp_path)]) == 0
    assert demo["loads"] == [("some/dir", "float32", True)] and demo["threads"] == 3
    assert main(["--no-compile", "--max-new-tokens", "4", "--out", str(tmp_path)]) == 0
    assert demo["loads"][-1] == (None, "bfloat16", False)


def test_max_new_tokens_bounds_every_timed_generation(demo, tmp_path):
    assert main(["--max-new-tokens", "5", "--out", str(tmp_path)]) == 0
    configs = demo["runtimes"][0].configs[3:]  # after the three warm-ups
    assert len(configs) == 3 * len(PROMPTS) and {g.max_new_tokens for g in configs} == {5}
    assert all(r[m]["generated_tokens"] <= 5 for r in rows(tmp_path) for m in ("tidar", "tidar_diffusion", "ar"))


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
    assert not any(r["matches_ar"] or r["diffusion_matches_ar"] for r in got)
    assert all(r["matches_ar_float32"] and r["diffusion_matches_ar_float32"] for r in got)
    rerun = demo["runtimes"][1].configs
    assert [g.mode for g in rerun] == ["ar", "tidar", "tidar"] * len(PROMPTS)  # AR, shipped mix, diffusion only
    out = capsys.readouterr().out
    assert "float32 check below" in out and "exactness check: the 3 prompt(s)" in out
    assert out.count("diffusion drafts alone identical to AR in float32: True") == len(PROMPTS)


def test_exact_check_reruns_only_the_run_that_differed(demo, tmp_path, capsys):
    demo["differ_in"] = {"bfloat16"}
    demo["differs"] = lambda gen: gen.mode == "tidar" and gen.lookup_ngram == 0  # diffusion drafts alone
    demo["operating_point"] = {"lookup_ngram": 2}
    assert main(["--max-new-tokens", "6", "--out", str(tmp_path)]) == 0
    got = rows(tmp_path)
    assert all(r["matches_ar"] and not r["diffusion_matches_ar"] for r in got)
    assert all("matches_ar_float32" not in r and r["diffusion_matches_ar_float32"] for r in got)
    assert [g.lookup_ngram for g in demo["runtimes"][1].configs if g.mode == "tidar"] == [0] * len(PROMPTS)
    assert "first difference at token 5; float32 check below" in capsys.readouterr().out


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



def test_plot_demo_shows_diffusion_drafts_alone_where_measured(tmp_path, monkeypatch):
    from tidar.measure import plots

    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, dpi=120: figs.append(fig) or path)
    ar = {"tokens_per_s": 10.0, "tokens_per_forward": 1.0}
    old = {"prompt": "code", "matches_ar": True, "tidar": {"tokens_per_s": 15.0, "tokens_per_forward": 2.1},
           "ar": ar, "speedup_vs_ar": 1.5}  # a demo.json row from before diffusion drafts alone were measured
    new = {**old, "prompt": "prose", "tidar_diffusion": {"tokens_per_s": 12.0, "tokens_per_forward": 2.4},
           "diffusion_speedup_vs_ar": 1.2, "diffusion_matches_ar": False}
    plots.plot_demo([old], tmp_path / "old.png")
    plots.plot_demo([old, new], tmp_path / "new.png")
    try:
        legends = [[t.get_text() for t in f.axes[0].get_legend().get_texts()] for f in figs]
        assert legends == [["AR", "TiDAR, shipped mix"], ["AR", "TiDAR, shipped mix", "TiDAR, diffusion drafts only"]]
        assert [b.get_height() for b in figs[1].axes[0].containers[2]] == [0.0, 12.0]
        assert [b.get_height() for b in figs[1].axes[1].containers[2]] == [0.0, 2.4]
        notes = [a.get_text() for a in figs[1].axes[0].texts]
        assert notes == ["1.50x", "1.50x", "1.20x\n(differs)"]
    finally:
        plots._pyplot().close("all")

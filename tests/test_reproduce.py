"""`tidar reproduce` (`make reproduce`) end to end at test size: every stage, the report, resuming,
and the config errors a user can make."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tidar.cli.reproduce import main
from tidar.reproduce.config import ReproduceConfig
from tidar.reproduce.evaluate import held_out_prompts

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, **changes) -> Path:
    """configs/reproduce-tiny.json over a corpus of this repository's own source files (seconds)."""
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        for f in sorted((ROOT / "src" / "tidar").rglob("*.py"))[:60]:
            dst = corpus / f.relative_to(ROOT / "src")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dst)
    cfg = json.loads((ROOT / "configs" / "reproduce-tiny.json").read_text())
    cfg.update(sources=[str(corpus)], **changes)
    path = tmp_path / "reproduce.json"
    path.write_text(json.dumps(cfg))
    return path


def test_the_pipeline_runs_every_stage_writes_the_report_and_resumes(tmp_path, capsys):
    config, out = tiny_config(tmp_path), tmp_path / "run"
    assert main(["--config", str(config), "--out", str(out), "--no-progress"]) == 0
    stages = ["tokenizer", "shards", "pretrain", "continue-ar", "continue-tidar", "continue-block_diffusion",
              "evaluate", "report"]
    assert all((out / "stages" / f"{s}.json").exists() for s in stages)
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["perplexity"]) == {"pretrain", "ar", "tidar", "block_diffusion"}
    methods = ev["methods"]
    for b in (2, 4):  # beta = 1 is lossless in float32; beta = 0 keeps every diffusion draft
        assert methods[f"tidar-diffusion-b{b}-beta1"]["matches_ar"] == 1.0
        assert methods[f"tidar-diffusion-b{b}-beta0"]["acceptance_histogram"][: b - 1] == [0] * (b - 1)
    assert {"ar", "ar-continued", "block-diffusion-t0.9", "block-diffusion-t0.5"} <= set(methods)
    assert all(m["judge_ppl"] > 1 and 0 <= m["data_match"] <= 1 for m in methods.values())
    report = (out / "report.md").read_text()
    assert "| tidar | TiDAR b=4 β=0 |" in report and "## Claims" in report
    assert (out / "curves.png").stat().st_size > 0 and (out / "speed-quality.png").stat().st_size > 0
    capsys.readouterr()
    # a second run finds every stage done and trains nothing
    assert main(["--config", str(config), "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("done earlier") == len(stages)


def test_a_training_stage_cut_short_continues_from_its_checkpoint(tmp_path, capsys):
    cfg = json.loads((ROOT / "configs" / "reproduce-tiny.json").read_text())
    config = tiny_config(tmp_path, pretrain={**cfg["pretrain"], "stop_after": 2})  # a session's time limit, in steps
    out = tmp_path / "run"
    assert main(["--config", str(config), "--out", str(out), "--no-progress"]) == 3
    assert "stopped at step 2 of 4" in capsys.readouterr().out
    assert not (out / "stages" / "pretrain.json").exists() and not (out / "stages" / "continue-ar.json").exists()
    assert main(["--config", str(config), "--out", str(out), "--no-progress", "--until", "pretrain"]) == 0
    steps = [json.loads(x)["step"] for x in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == [1, 2, 3, 4]  # steps 3-4 continued from step 2's checkpoint, none repeated


@pytest.mark.parametrize("change, message", [
    ({"vocab": 10}, "unknown key(s) vocab"),
    ({"train": {"out_dir": "x"}}, "may not set out_dir"),
    ({"objectives": ["ar", "gan"]}, "objectives must be"),
    ({"pretrain": {"lr": -1}}, "lr must be > 0"),
    ({"eval": {"betas": [2]}}, "beta must be <= 1"),
    ({"model": {"num_attention_heads": 3, "num_key_value_heads": 2}}, "num_attention_heads"),
])
def test_config_mistakes_are_one_line_errors_before_any_work(tmp_path, capsys, change, message):
    config = tiny_config(tmp_path, **change)
    assert main(["--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "stages").exists()


def test_a_run_directory_refuses_another_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--config", str(tiny_config(tmp_path)), "--out", str(out), "--until", "tokenizer",
                 "--no-progress"]) == 0
    assert main(["--config", str(tiny_config(tmp_path, vocab_size=400)), "--out", str(out)]) == 2
    assert "another config (differs in vocab_size)" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.json")]) == 2
    assert main(["--config", str(tiny_config(tmp_path)), "--out", str(out), "--until", "nope"]) == 2


def test_held_out_prompts_come_from_whole_documents_long_enough():
    eos = 0
    val = np.array([5, 6, eos] + list(range(1, 21)) + [eos] + list(range(30, 60)) + [eos], dtype=np.uint16)
    pairs = held_out_prompts(val, eos, count=5, prompt_tokens=4, new_tokens=6)
    assert len(pairs) == 2  # the 2-token document is too short; one prompt per document
    for prompt, ref in pairs:
        assert len(prompt) == 4 and len(ref) == 6 and eos not in prompt + ref
    assert pairs[0] == ([6, 7, 8, 9], [10, 11, 12, 13, 14, 15])  # from the middle of its document


def test_shipped_configs_are_valid():
    for name in ("reproduce.json", "reproduce-tiny.json"):
        ReproduceConfig.load(ROOT / "configs" / name).check()

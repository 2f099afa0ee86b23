"""Every flag of `tidar train` and `tidar export` does what its help says (tiny random models, tiny shards)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_train import cfg_for, records

from tidar.cli.export import main as export_main
from tidar.cli.train import main as train_main
from tidar.model import weights


def write_config(path: Path, tmp: Path, shards: Path, **kw) -> Path:
    """A JSON config file of a tiny run (see test_train.cfg_for) in `tmp`/run."""
    cfg = cfg_for(tmp, shards, **kw).to_dict()
    path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return path


def dry_run_config(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    """The config `tidar train --dry-run` prints (and checks that it passed)."""
    assert train_main([*argv, "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "\nok: model " in out
    return json.loads(out[: out.index("\nok: model ")])


# -- tidar train -----------------------------------------------------------------------------------


def test_train_config_file_and_both_kinds_of_override(tmp_path: Path, shards: Path, capsys) -> None:
    config = write_config(tmp_path / "c.json", tmp_path, shards, lr=2e-3, max_steps=7)
    cfg = dry_run_config(capsys, ["--config", str(config)])
    assert cfg["lr"] == 2e-3 and cfg["max_steps"] == 7 and cfg["data"] == str(shards)  # --config read
    # --set (repeatable) and positional KEY=VALUE both override the file; positional ones come last
    cfg = dry_run_config(capsys, ["--config", str(config), "--set", "max_steps=9", "--set", "seed=4", "lr=3e-3",
                                  "--set", "lr=1e-3"])
    assert cfg["max_steps"] == 9 and cfg["seed"] == 4 and cfg["lr"] == 3e-3
    assert train_main(["--config", str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: config file")


def test_train_dry_run_validates_and_trains_nothing(tmp_path: Path, shards: Path, capsys) -> None:
    config = write_config(tmp_path / "c.json", tmp_path, shards)
    assert train_main(["--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[: out.index("\nok: model ")])["objective"] == "tidar"
    assert "resume from nothing" in out and "data TokenShards(" in out
    run = tmp_path / "run"
    assert not list(run.iterdir())  # no metrics, config, checkpoint or model written
    # it validates the data: a bad shard directory fails with one line, before any training
    assert train_main(["--config", str(config), f"data={tmp_path / 'nope'}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid training setup") and "index.json not found" in err and "Traceback" not in err


def test_train_resume_continues_from_the_latest_checkpoint(tmp_path: Path, shards: Path, capsys) -> None:
    kw = dict(grad_accum=2, save_every=2, keep_checkpoints=2)
    straight = write_config(tmp_path / "a.json", tmp_path / "a", shards, **kw)
    assert train_main(["--config", str(straight)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"done: step 6, out dir {tmp_path / 'a' / 'run'}"
    split = write_config(tmp_path / "b.json", tmp_path / "b", shards, **kw)
    # nothing to resume yet: --resume refuses instead of starting over
    assert train_main(["--config", str(split), "--resume"]) == 2
    assert "--resume given but" in capsys.readouterr().err
    assert train_main(["--config", str(split), "stop_after=3"]) == 0
    run = tmp_path / "b" / "run"
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-00000002", "ckpt-00000003"]
    assert (run / "latest").read_text().strip() == "ckpt-00000003"
    capsys.readouterr()
    cfg = dry_run_config(capsys, ["--config", str(split), "--resume"])
    assert cfg["max_steps"] == 6
    assert train_main(["--config", str(split), "--resume", "--dry-run"]) == 0
    assert f"resume from {run / 'ckpt-00000003'}" in capsys.readouterr().out
    assert train_main(["--config", str(split), "--resume"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"done: step 6, out dir {run}"
    # the resumed run is the straight run: same log (steps 4.. appended after 3), same weights
    assert records(tmp_path / "a" / "run") == records(run)
    a, b = load_file(tmp_path / "a" / "run" / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


# -- tidar export ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory: pytest.TempPathFactory, shards: Path, base_dir: Path) -> Path:
    tmp = tmp_path_factory.mktemp("adapter")
    config = write_config(tmp / "c.json", tmp, shards, init=str(base_dir), mode="adapter", adapter_rank=4,
                          adapter_alpha=8.0, max_steps=2, eval_every=0, save_every=2)
    assert train_main(["--config", str(config)]) == 0
    return tmp / "run"


def test_export_src_and_out(tmp_path: Path, adapter_run: Path, capsys) -> None:
    # a run directory: its latest checkpoint's adapter
    assert export_main([str(adapter_run), "--out", str(tmp_path / "a")]) == 0
    assert capsys.readouterr().out.startswith(f"exported step 2 ({2 * 4 * 16} tokens) to {tmp_path / 'a'}")
    manifest = json.loads((tmp_path / "a" / "tidar.json").read_text())
    assert manifest["exported_from"] == str(adapter_run / "ckpt-00000002" / "model") and manifest["dtype"] == "bfloat16"
    assert manifest["sha256"] == weights.file_sha256(tmp_path / "a" / "adapter.safetensors")
    assert weights.load_model(tmp_path / "a").has_adapter
    # an adapter directory as it is
    assert export_main([str(adapter_run / "model"), "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "tidar.json").read_text())["exported_from"] == str(adapter_run / "model")
    # no adapter there: one line, exit 2
    assert export_main([str(tmp_path / "empty"), "--out", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: no adapter.safetensors")


def test_export_out_defaults_to_the_shipped_model(tmp_path: Path, adapter_run: Path, monkeypatch) -> None:
    monkeypatch.setattr(weights, "SHIPPED_MODEL", tmp_path / "shipped")
    assert export_main([str(adapter_run)]) == 0
    assert (tmp_path / "shipped" / "adapter.safetensors").exists() and (tmp_path / "shipped" / "tidar.json").exists()


def test_export_operating_point(tmp_path: Path, adapter_run: Path, capsys) -> None:
    out = tmp_path / "out"
    # an inline JSON object, as it is
    assert export_main([str(adapter_run), "--out", str(out), "--operating-point", '{"block_size": 2, "policy": "full"}']) == 0
    assert json.loads((out / "tidar.json").read_text())["operating_point"] == {"block_size": 2, "policy": "full"}
    # `tidar profile --choose --json` output: its best choice, with the dtype and compile setting it was measured in
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"dtype": "bfloat16", "compiled": True, "points": [],
                                   "choice": {"best": {"block_size": 3, "policy": "full", "lookup_ngram": 2,
                                                       "tokens_per_s": 99.0}}}))
    assert export_main([str(adapter_run), "--out", str(out), "--operating-point", str(profile)]) == 0
    assert json.loads((out / "tidar.json").read_text())["operating_point"] == {
        "block_size": 3, "policy": "full", "lookup_ngram": 2, "dtype": "bfloat16", "compile": True}
    # an operating point the engine would reject is refused before anything is written
    for bad in ('{"policy": "topk"}', '{"span_predraft": false}'):
        assert export_main([str(adapter_run), "--out", str(out), "--operating-point", bad]) == 2
        err = capsys.readouterr().err
        assert "operating point" in err and len(err.strip().splitlines()) == 1
    for bad in ("{not json", str(tmp_path / "missing.json"), "[1, 2]"):
        assert export_main([str(adapter_run), "--out", str(out), "--operating-point", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: operating point") and len(err.strip().splitlines()) == 1


def test_export_data_records_the_training_data(tmp_path: Path, adapter_run: Path, shards: Path, capsys) -> None:
    index = json.loads((shards / "index.json").read_text())
    index.update(sources=["corpus"], seed=5)
    data = tmp_path / "data"
    data.mkdir()
    (data / "index.json").write_text(json.dumps(index))  # the index is all it reads
    assert export_main([str(adapter_run), "--out", str(tmp_path / "out"), "--data", str(data)]) == 0
    manifest = json.loads((tmp_path / "out" / "tidar.json").read_text())
    assert manifest["data"] == {"sources": ["corpus"], "train_tokens": index["train"]["tokens"], "val_files": 0,
                                "seed": 5}
    assert export_main([str(adapter_run), "--out", str(tmp_path / "out"), "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "index.json not found" in err and "Traceback" not in err


# -- tidar export --hf ---------------------------------------------------------------------------


def test_export_hf_writes_a_transformers_directory_and_checks_its_flags(tmp_path: Path, adapter_run: Path, capsys) -> None:
    from tidar.cli.export import build_parser

    parser = build_parser()
    assert [a.option_strings or a.dest for a in parser._actions if not (a.help or "").strip()] == []
    assert export_main(["--help"]) == 0
    assert "--hf DIR" in capsys.readouterr().out
    out = tmp_path / "hf"
    assert export_main(["--hf", str(out), "--model", str(adapter_run / "model")]) == 0
    assert f"to {out}: config.json, configuration_tidar.py, custom_generate/generate.py" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "tidar" and config["tidar"]["adapter"]["rank"] == 4
    assert config["tidar"]["source"]["adapter_sha256"] == json.loads((adapter_run / "model" / "tidar.json").read_text())["sha256"]
    # each mode's arguments only: one line, exit 2, nothing written
    for argv in ([], ["--hf", str(tmp_path / "x"), str(adapter_run)], ["--hf", str(tmp_path / "x"), "--out", str(tmp_path / "y")],
                 ["--hf", str(tmp_path / "x"), "--operating-point", "{}"], [str(adapter_run), "--model", "smollm2"]):
        assert export_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, argv
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

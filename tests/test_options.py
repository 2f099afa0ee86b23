"""Decoding options are declared once (tidar.decode.options): the CLI flags, bench, server fields and
the operating point derive from that declaration, and every `tidar generate` flag does what it says."""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_bench import CharTokenizer, tiny_runtime

from tidar.cli import main
from tidar.cli.bench import build_parser as bench_parser
from tidar.cli.generate import build_parser as generate_parser
from tidar.decode import GenerationConfig, GenerationError
from tidar.decode.options import options
from tidar.model.weights import WeightsError
from tidar.runtime import Runtime, operating_point

# a valid value, different from the default, for every option that has a flag
SAMPLE = {"max_new_tokens": 7, "do_sample": True, "temperature": 0.5, "top_k": 3, "top_p": 0.5, "seed": 11,
          "mode": "ar", "block_size": 2, "policy": "full", "beta": 0.5, "lookup_ngram": 2, "lookup_tokens": 5,
          "datastore_tokens": 0, "min_draft_gain": 0.25, "max_draft_batch": 3}
BAD = {"max_new_tokens": "0", "temperature": "inf", "top_k": "0", "top_p": "1.5", "seed": str(2**63), "mode": "fast",
       "block_size": "33", "policy": "topk", "beta": "2", "lookup_ngram": "-1", "lookup_tokens": "x",
       "datastore_tokens": "-1", "min_draft_gain": "-0.5", "max_draft_batch": "-1"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_every_flagged_option_has_a_sample_and_a_help_text():
    assert set(SAMPLE) == {f.name for f in options("flag")}
    assert all(f.metadata["help"] for f in dataclasses.fields(GenerationConfig))


@pytest.mark.parametrize("name", sorted(SAMPLE))
def test_each_generate_flag_reaches_the_generation_config(name):
    value = SAMPLE[name]
    argv = ["--prompt", "x"] + ([flag(name)] if value is True else [flag(name), str(value)])
    args = generate_parser().parse_args(argv)
    rt = tiny_runtime()
    cfg = rt.generation_config(**{k: getattr(args, k) for k in SAMPLE if getattr(args, k) is not None})
    assert getattr(cfg, name) == value
    unset = rt.generation_config(**{k: getattr(generate_parser().parse_args(["--prompt", "x"]), k) for k in SAMPLE})
    assert unset == rt.generation_config()  # an absent flag leaves the operating point alone


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_flag_value_is_one_line_and_exit_code_2(name, capsys):
    assert main(["generate", "--prompt", "x", flag(name), BAD[name]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag(name) in err and "Traceback" not in err


def test_bench_and_the_server_derive_their_options_from_the_declaration():
    from tidar.serve.server import CompletionRequest

    bench_flags = {a.dest for a in bench_parser()._actions}
    assert {f.name for f in options("tuned")} <= bench_flags
    assert {f.name for f in options("request")} <= set(CompletionRequest.model_fields)
    assert not {"policy_k", "lookup_occurrence", "datastore_confidence", "span_predraft"} & bench_flags


def test_removed_options_are_gone_everywhere():
    for name in ("policy_k", "lookup_occurrence", "datastore_confidence", "span_predraft"):
        with pytest.raises(TypeError):
            GenerationConfig(**{name: 1})
    with pytest.raises(GenerationError, match="policy"):
        GenerationConfig(policy="topk").validate()


def test_the_operating_point_sets_only_tuned_options(tmp_path):
    (tmp_path / "tidar.json").write_text(json.dumps({"operating_point": {
        "block_size": 2, "policy": "full", "dtype": "float32", "compile": False, "chosen_by": "a note"}}))
    op = operating_point(tmp_path)
    rt = Runtime(tiny_runtime().model, CharTokenizer(), op, name="tiny")
    cfg = rt.generation_config()
    assert (cfg.block_size, cfg.policy) == (2, "full")
    assert rt.generation_config(block_size=3).block_size == 3  # an explicit value wins
    (tmp_path / "tidar.json").write_text(json.dumps({"operating_point": {"span_predraft": False}}))
    with pytest.raises(WeightsError, match="span_predraft"):
        operating_point(tmp_path)


def run_generate(monkeypatch, capsys, *argv: str) -> dict:
    rt = tiny_runtime()
    monkeypatch.setattr(Runtime, "load", classmethod(lambda cls, *a, **k: rt))
    assert main(["generate", "--prompt", "abc", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_stop_ends_the_text_before_the_stop_string(monkeypatch, capsys):
    full = run_generate(monkeypatch, capsys, "--max-new-tokens", "20")["text"]
    stop = full[5:7]
    cut = run_generate(monkeypatch, capsys, "--max-new-tokens", "20", "--stop", stop)["text"]
    assert cut == full[: full.find(stop)] and stop not in cut


def test_generate_top_k_1_samples_the_greedy_text(monkeypatch, capsys):
    greedy = run_generate(monkeypatch, capsys, "--max-new-tokens", "12")["tokens"]
    sampled = run_generate(monkeypatch, capsys, "--max-new-tokens", "12", "--do-sample", "--top-k", "1", "--seed", "3")
    wide = run_generate(monkeypatch, capsys, "--max-new-tokens", "12", "--do-sample", "--temperature", "5", "--seed", "3")
    assert sampled["tokens"] == greedy and wide["tokens"] != greedy


def test_generate_mode_and_block_size_show_in_the_stats(monkeypatch, capsys):
    ar = run_generate(monkeypatch, capsys, "--max-new-tokens", "12", "--mode", "ar")
    tidar = run_generate(monkeypatch, capsys, "--max-new-tokens", "12", "--block-size", "3", "--policy", "full")
    assert ar["stats"]["mode"] == "ar" and ar["stats"]["query_tokens"] == ar["stats"]["forwards"]
    assert tidar["tokens"] == ar["tokens"]  # greedy TiDAR equals AR
    assert tidar["stats"]["query_tokens"] == tidar["stats"]["forwards"] * (3 + 2 * 3)  # b + 2 blocks (policy full)


def test_bench_engine_flags_reach_the_tidar_methods_only(tmp_path, monkeypatch, capsys):
    from tidar.cli.bench import main as bench_main

    rt = tiny_runtime()
    monkeypatch.setattr(Runtime, "load", classmethod(lambda cls, *a, **k: rt))
    (tmp_path / "p.jsonl").write_text('{"prompt": "def f(x):"}\n{"prompt": "abc abc"}\n')
    out = tmp_path / "r.json"
    assert bench_main(["--prompts", str(tmp_path / "p.jsonl"), "--methods", "ar,tidar", "--max-new-tokens", "10",
                       "--block-size", "2", "--policy", "full", "--no-progress", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["block_size"] == 2 and report["config"]["policy"] == "full"
    assert report["config"]["tidar_step_tokens"] == 2 + 2 * 2
    assert report["methods"]["tidar"]["query_tokens_per_forward"] == 6.0  # 2 drafts + 2 blocks of 2
    assert report["methods"]["ar"]["query_tokens_per_forward"] == 1.0
    assert report["methods"]["tidar"]["matches_ar"] == 1.0


def test_generate_model_dtype_compile_threads_reach_the_runtime(monkeypatch, capsys):
    seen = {}
    rt = tiny_runtime()

    def load(cls, name=None, dtype="bfloat16", compile=None, weights=None, light_tokenizer=False):
        seen.update(name=name, dtype=dtype, compile=compile)
        return rt

    monkeypatch.setattr(Runtime, "load", classmethod(load))
    monkeypatch.setattr("torch.set_num_threads", lambda n: seen.update(threads=n))
    assert main(["generate", "--prompt", "abc", "--max-new-tokens", "3", "--model", "some/dir", "--dtype", "fp32",
                 "--compile", "--threads", "3"]) == 0
    assert seen == {"name": "some/dir", "dtype": "float32", "compile": True, "threads": 3}


def test_generate_stream_prints_the_same_text_as_it_is_committed(monkeypatch, capsys):
    text = run_generate(monkeypatch, capsys, "--max-new-tokens", "16")["text"]
    rt = tiny_runtime()
    monkeypatch.setattr(Runtime, "load", classmethod(lambda cls, *a, **k: rt))
    writes = []
    monkeypatch.setattr("sys.stdout.write", lambda s: writes.append(s) or len(s))
    assert main(["generate", "--prompt", "abc", "--max-new-tokens", "16", "--stream"]) == 0
    assert "".join(writes).rstrip("\n") == text and len([w for w in writes if w.strip()]) > 1


def test_generate_chat_needs_a_chat_template(monkeypatch, capsys):
    rt = tiny_runtime()
    monkeypatch.setattr(Runtime, "load", classmethod(lambda cls, *a, **k: rt))
    assert main(["generate", "--prompt", "abc", "--chat"]) == 2
    assert "chat template" in capsys.readouterr().err
    rt.tokenizer.chat_template = "t"
    monkeypatch.setattr("tidar.runtime.chat_ids", lambda tok, msgs: [5, 6] + tok.encode(msgs[0]["content"]))
    assert main(["generate", "--prompt", "abc", "--chat", "--json", "--max-new-tokens", "4"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 4


def test_generate_diffusion_only_turns_off_copy_drafts_and_the_gate(monkeypatch, capsys):
    rt = tiny_runtime()
    rt.operating_point = {"block_size": 3, "policy": "full", "lookup_ngram": 2, "min_draft_gain": 0.5}
    monkeypatch.setattr(Runtime, "load", classmethod(lambda cls, *a, **k: rt))
    assert main(["generate", "--prompt", "abcabcabcabc", "--json", "--max-new-tokens", "16", "--diffusion-only"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["query_tokens"] == stats["forwards"] * (3 + 3 * 3)  # policy all, a block every step
    assert stats["accepted_drafts"]["lookup"] == 0 and stats["plain_forwards"] == 0
    assert main(["generate", "--prompt", "abc", "--json", "--max-new-tokens", "8", "--diffusion-only",
                 "--policy", "full"]) == 0  # an explicit flag wins over the preset
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["query_tokens"] == stats["forwards"] * (3 + 2 * 3)

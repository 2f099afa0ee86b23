"""The shipped default model: manifest consistent with its weights; lossless on the real weights."""

from __future__ import annotations

import json

import pytest
import torch

from tidar.masks import causal_mask
from tidar.model.weights import ADAPTER_FILE, MANIFEST_FILE, SHIPPED_MODEL, file_sha256, load_model, resolve_model_path


def manifest() -> dict:
    return json.loads((SHIPPED_MODEL / MANIFEST_FILE).read_text())


def test_manifest_matches_the_weights_file():
    m = manifest()
    assert m["sha256"] == file_sha256(SHIPPED_MODEL / ADAPTER_FILE)
    for key in ("base", "tokens", "step", "adapter", "block_size", "targets", "operating_point", "data"):
        assert key in m, key
    assert (SHIPPED_MODEL / ADAPTER_FILE).stat().st_size < 50 * 2**20
    assert resolve_model_path(None) == SHIPPED_MODEL  # the default model


def test_manifest_matches_the_datastore_file():
    from tidar.decode import DATASTORE_FILE, Datastore

    m = manifest()
    rec = m["datastore"]
    assert rec["file"] == DATASTORE_FILE and rec["sha256"] == file_sha256(SHIPPED_MODEL / DATASTORE_FILE)
    ds = Datastore.load(SHIPPED_MODEL)
    assert len(ds) == rec["tokens"] == sum(s["tokens"] for s in rec["sources"])
    assert ds.sequences == rec["sequences"] and list(ds.orders) == rec["orders"]
    assert m["operating_point"]["datastore_tokens"] > 0
    assert (SHIPPED_MODEL / DATASTORE_FILE).stat().st_size + (SHIPPED_MODEL / ADAPTER_FILE).stat().st_size < 50 * 2**20


@pytest.mark.slow
def test_shipped_model_is_lossless_on_smollm2():
    from tidar.runtime import Runtime

    shipped = load_model(None, dtype=torch.float32)
    base = load_model("smollm2", dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 282, 4000, 314, 253, 5009, 30]])
    n = ids.shape[1]
    with torch.no_grad():  # adapter mode: AR logits are the base model's, bit for bit
        assert torch.equal(shipped(ids, torch.arange(n)[None], causal_mask(n)), base(ids, torch.arange(n)[None], causal_mask(n)))
    rt = Runtime.load(None, dtype="float32")
    assert rt.datastore is not None and rt.generation_config().datastore_tokens > 0
    for prompt in ("def is_even(n):\n", "The river flows"):
        ti = rt.generate_text(prompt, rt.generation_config(max_new_tokens=48))
        ar = rt.generate_text(prompt, rt.generation_config(mode="ar", max_new_tokens=48))
        assert ti.tokens == ar.tokens


@pytest.mark.slow
def test_shipped_model_in_a_bf16_batch_equals_ar_alone():
    """A batch's ragged acceptance leaves holes in each sequence's cache; the kernels' attention
    must not round differently for them (in bfloat16, ties between the top two logits are common)."""
    from tidar.decode import generate
    from tidar.runtime import Runtime

    rt = Runtime.load(None, dtype="bfloat16")
    prompts = [rt.encode(p) for p in ("def is_even(n):\n", "def fib(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
                                       "The river flows", "import os\n\ndef list_files(path):\n")]
    gen = rt.generation_config(max_new_tokens=40, max_draft_batch=0)
    batch = generate(rt.model, prompts, gen)
    assert batch.stats.mode == "tidar"
    assert batch.sequences == [generate(rt.model, [p], rt.generation_config(mode="ar", max_new_tokens=40)).sequences[0]
                               for p in prompts]


@pytest.mark.slow
def test_demo_runs_and_checks_bf16_differences_in_float32(tmp_path):
    """`make demo`'s job end to end, short: every prompt gets a bf16 match verdict, and any prompt
    that differed in bf16 is re-run in float32, where it must match."""
    from tidar import demo
    from tidar.cli.demo import main as demo_main

    assert demo_main(["--max-new-tokens", "24", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "demo.json").read_text())
    assert [r["prompt"] for r in rows] == [p[0] for p in demo.PROMPTS]
    for r in rows:
        assert isinstance(r["matches_ar"], bool) and r["tidar"]["tokens_per_forward"] >= 1.0
        if not r["matches_ar"]:
            assert r["matches_ar_float32"] is True
    assert (tmp_path / "demo.png").exists()

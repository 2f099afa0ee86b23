"""Shared fixtures: tiny random models (litgpt style) for fast logic tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tidar.model.config import TidarConfig
from tidar.model.transformer import Transformer
from tidar.model.weights import save_pretrained

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_config(**overrides) -> TidarConfig:
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, block_size=4,
              eos_token_id=None, bos_token_id=None)
    kw.update(overrides)
    return TidarConfig(**kw)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    # std 0.5: sharper random distributions, so greedy ties are rare and tests are meaningful
    return Transformer(tiny_config(**overrides)).init_weights(std=0.5, seed=seed).eval()


@pytest.fixture
def model() -> Transformer:
    return tiny_model()


# -- tiny training data and a tiny base checkpoint (the trainer's and its CLI's tests) ---------------
def make_shards(directory: Path, vocab: int = 97, n_train: int = 3000, n_val: int = 600) -> Path:
    """Written directly in the data.TokenShards layout: a learnable pattern (+20% noise)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("val", n_val)):
        pattern = np.arange(n) * 7 % vocab
        toks = np.where(rng.random(n) < 0.2, rng.integers(0, vocab, n), pattern).astype(np.uint16)
        toks.tofile(directory / f"{name}.bin")
    index = {"format": 1, "dtype": "uint16", "vocab_size": vocab, "eos_id": 0,
             "train": {"tokens": n_train, "files": []}, "val": {"tokens": n_val, "files": []}}
    (directory / "index.json").write_text(json.dumps(index))
    return directory


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 'pretrained' checkpoint for adapter mode."""
    return save_pretrained(tiny_model(seed=3), tmp_path_factory.mktemp("base") / "tiny")

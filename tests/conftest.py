"""Shared fixtures: tiny random models (litgpt style) for fast logic tests."""

from __future__ import annotations

import pytest
import torch

from tidar.model.config import TidarConfig
from tidar.model.transformer import Transformer

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

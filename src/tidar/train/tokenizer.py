"""A small byte-level BPE tokenizer trained on the train split of local sources, saved as a Hugging
Face tokenizer directory (so `tidar data build --tokenizer DIR` and `load_tokenizer(DIR)` read it).

Small models need small vocabularies: with SmolLM2's 49K tokens the embedding is most of a 16M
model, and most of its rows see too few tokens to learn (docs/reproduction.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tidar.model.weights import atomic_directory
from tidar.train.corpora import DEFAULT_VAL_FRACTION, open_source, val_indices
from tidar.train.errors import DataError

__all__ = ["EOS", "train_bpe"]

EOS = "<|endoftext|>"  # id 0: end of document, and the model's bos/eos


def _train_texts(specs: Sequence[str], val_fraction: float, seed: int) -> Iterator[str]:
    """The documents `build_shards` puts in train (same split rule), so val text never shapes the merges."""
    for spec in specs:
        src = open_source(spec)
        held_out = set(val_indices(src, val_fraction, seed))
        for i in range(len(src.items)):
            if i not in held_out:
                text = src.document(i)[0]
                if text:
                    yield text


def train_bpe(specs: Sequence[str], vocab_size: int, out_dir: str | Path, *, val_fraction: float = DEFAULT_VAL_FRACTION,
              seed: int = 0, progress: bool = True) -> Path:
    """Train a byte-level BPE of `vocab_size` tokens (id 0 = EOS) and write it to `out_dir` atomically."""
    if vocab_size < 256 + 1:
        raise DataError(f"vocab size must be at least 257 (256 bytes + {EOS}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_train_texts(specs, val_fraction, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None,
                                   model_max_length=1 << 20)
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        fast.save_pretrained(tmp)
    return out

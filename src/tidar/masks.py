"""Every attention mask TiDAR uses, in one place. True = the query may attend to the key.

Training (2L positions): a clean copy x_0..x_{L-1} (causal) followed by a fully masked copy whose
position i stands for x_i. Mask tokens of block k see the clean prefix of blocks < k and their own
block (bidirectionally), never other mask blocks; clean tokens never see mask tokens.

Inference (one TiDAR step): the cached prefix, then n clean tokens (the previous draft, or the
prompt at prefill) with causal attention, then one block of b mask tokens per pre-drafted
acceptance length a: that block sees the prefix plus the first a clean tokens and itself, and sits
at the positions right after the a-th clean token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def causal_mask(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def _check_blocks(seq_len: int, block_size: int) -> None:
    if block_size < 1 or seq_len < 1:
        raise ValueError(f"seq_len ({seq_len}) and block_size ({block_size}) must be >= 1")
    if seq_len % block_size:
        raise ValueError(f"block_size {block_size} must divide the sequence length {seq_len}")


def tidar_training_mask(seq_len: int, block_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Mask (2L, 2L) and position ids (2L,) for the TiDAR training layout [clean | masked]."""
    _check_blocks(seq_len, block_size)
    i = torch.arange(seq_len, device=device)
    block = i // block_size
    clean_clean = i[None, :] <= i[:, None]
    mask_clean = block[None, :] < block[:, None]  # key j's block before query i's block
    mask_mask = block[None, :] == block[:, None]
    top = torch.cat([clean_clean, torch.zeros_like(clean_clean)], dim=1)
    bottom = torch.cat([mask_clean, mask_mask], dim=1)
    return torch.cat([top, bottom], dim=0), torch.cat([i, i])


def block_diffusion_training_mask(seq_len: int, block_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The Block Diffusion (BD3-LM) layout [clean x_0 | noisy x_t]: clean copy block-causal, noisy
    block k sees clean blocks < k and itself. No AR loss is possible on this clean copy."""
    _check_blocks(seq_len, block_size)
    i = torch.arange(seq_len, device=device)
    block = i // block_size
    clean_clean = block[None, :] <= block[:, None]
    noisy_clean = block[None, :] < block[:, None]
    noisy_noisy = block[None, :] == block[:, None]
    top = torch.cat([clean_clean, torch.zeros_like(clean_clean)], dim=1)
    bottom = torch.cat([noisy_clean, noisy_noisy], dim=1)
    return torch.cat([top, bottom], dim=0), torch.cat([i, i])


@dataclass(frozen=True)
class StepLayout:
    """The new tokens of one inference step: [clean_1..clean_n][block a_1]...[block a_m]."""

    mask: torch.Tensor  # (T, T) bool among the new tokens; the cached prefix is visible to all
    position_offsets: torch.Tensor  # (T,) position of each new token relative to clean_1
    n_clean: int
    block_size: int
    accept_lengths: tuple[int, ...]  # a for each pre-draft block, in layout order

    @property
    def num_tokens(self) -> int:
        return self.mask.shape[0]

    def block_slice(self, j: int) -> slice:
        start = self.n_clean + j * self.block_size
        return slice(start, start + self.block_size)


def step_layout(n_clean: int, block_size: int, accept_lengths: Sequence[int] = (),
                device: torch.device | str = "cpu") -> StepLayout:
    """Layout of one TiDAR step.

    `n_clean` tokens are verified causally; for each a in `accept_lengths` (1 <= a <= n_clean) a
    block of `block_size` mask tokens drafts positions a .. a + block_size - 1 (relative to the
    first clean token) from the prefix and the first a clean tokens. Prefill is
    `step_layout(len(prompt), b, [len(prompt)])`; plain AR is `step_layout(n, b, [])`.
    """
    accept_lengths = tuple(int(a) for a in accept_lengths)
    if n_clean < 1:
        raise ValueError("a step needs at least one clean token")
    for a in accept_lengths:
        if not 1 <= a <= n_clean:
            raise ValueError(f"acceptance length {a} outside 1..{n_clean}")
    m, b = len(accept_lengths), block_size
    T = n_clean + m * b
    mask = torch.zeros(T, T, dtype=torch.bool, device=device)
    mask[:n_clean, :n_clean] = causal_mask(n_clean, device)
    pos = torch.empty(T, dtype=torch.long, device=device)
    pos[:n_clean] = torch.arange(n_clean, device=device)
    for j, a in enumerate(accept_lengths):
        s = n_clean + j * b
        mask[s:s + b, :a] = True
        mask[s:s + b, s:s + b] = True
        pos[s:s + b] = torch.arange(a, a + b, device=device)
    return StepLayout(mask, pos, n_clean, b, accept_lengths)


def with_prefix(new_mask: torch.Tensor, prefix_valid: torch.Tensor) -> torch.Tensor:
    """Full attention mask (B, 1, T, P + T) for T new tokens written after P cache slots.

    `prefix_valid` (B, P) says which cache slots hold committed tokens of each sequence.
    """
    B, P = prefix_valid.shape
    T = new_mask.shape[0]
    return torch.cat([prefix_valid[:, None, None, :].expand(B, 1, T, P), new_mask.expand(B, 1, T, T)], dim=-1)

"""The TiDAR attention masks against hand-written matrices, and the no-leak property."""

from __future__ import annotations

import torch
from conftest import tiny_model

from tidar.masks import block_diffusion_training_mask, step_layout, tidar_training_mask


def rows(*lines: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in line.replace(" ", "")] for line in lines])


def test_training_mask_l8_b4_hand_written():
    mask, pos = tidar_training_mask(8, 4)
    #                 clean     | masked
    expected = rows(
        "1000 0000  0000 0000",  # clean 0
        "1100 0000  0000 0000",
        "1110 0000  0000 0000",
        "1111 0000  0000 0000",
        "1111 1000  0000 0000",
        "1111 1100  0000 0000",
        "1111 1110  0000 0000",
        "1111 1111  0000 0000",  # clean 7: never sees a mask token
        "0000 0000  1111 0000",  # mask block 0: no clean prefix, own block
        "0000 0000  1111 0000",
        "0000 0000  1111 0000",
        "0000 0000  1111 0000",
        "1111 0000  0000 1111",  # mask block 1: clean block 0 + own block
        "1111 0000  0000 1111",
        "1111 0000  0000 1111",
        "1111 0000  0000 1111",
    )
    print(mask.int())
    assert torch.equal(mask, expected)
    assert pos.tolist() == [0, 1, 2, 3, 4, 5, 6, 7] * 2


def test_training_mask_l8_b2_mask_rows():
    mask, _ = tidar_training_mask(8, 2)
    expected_bottom = rows(
        "00000000 11000000",
        "00000000 11000000",
        "11000000 00110000",
        "11000000 00110000",
        "11110000 00001100",
        "11110000 00001100",
        "11111100 00000011",
        "11111100 00000011",
    )
    assert torch.equal(mask[8:], expected_bottom)


def test_block_diffusion_mask_l4_b2():
    mask, _ = block_diffusion_training_mask(4, 2)
    expected = rows(
        "1100 0000",
        "1100 0000",
        "1111 0000",
        "1111 0000",
        "0000 1100",
        "0000 1100",
        "1100 0011",
        "1100 0011",
    )
    assert torch.equal(mask, expected)


def test_step_layout_paper_example_b3():
    # Paper Fig. 3: prefix A B C (cached), drafts D E F at positions 3-5, blocks at 4-6, 5-7, 6-8.
    lay = step_layout(3, 3, (1, 2, 3))
    assert (lay.position_offsets + 3).tolist() == [3, 4, 5, 4, 5, 6, 5, 6, 7, 6, 7, 8]
    expected = rows(
        "100 000 000 000",  # D
        "110 000 000 000",  # E
        "111 000 000 000",  # F
        "100 111 000 000",  # block after D
        "100 111 000 000",
        "100 111 000 000",
        "110 000 111 000",  # block after E
        "110 000 111 000",
        "110 000 111 000",
        "111 000 000 111",  # block after F
        "111 000 000 111",
        "111 000 000 111",
    )
    assert torch.equal(lay.mask, expected)
    assert lay.block_slice(1) == slice(6, 9)


def test_step_layout_policy_subset_and_prefill():
    lay = step_layout(4, 2, (4,))
    assert lay.num_tokens == 6
    assert lay.position_offsets.tolist() == [0, 1, 2, 3, 4, 5]
    assert lay.mask[4:, :4].all() and lay.mask[4:, 4:].all()
    ar = step_layout(1, 4, ())
    assert ar.num_tokens == 1 and ar.mask.tolist() == [[True]]


@torch.no_grad()
def test_mask_tokens_never_change_clean_logits():
    model = tiny_model()
    L, b = 8, 4
    mask, pos = tidar_training_mask(L, b)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 97, (1, L), generator=g)
    m = model.config.mask_token_id
    base = model(torch.cat([clean, torch.full((1, L), m)], 1), pos[None], mask)
    # perturb the mask embedding and replace some mask inputs by arbitrary tokens
    model.mask_embed.add_(torch.randn(model.mask_embed.shape, generator=g))
    other = torch.randint(0, 97, (1, L), generator=g)
    pert = model(torch.cat([clean, other], 1), pos[None], mask)
    assert torch.equal(base[:, :L], pert[:, :L])
    assert not torch.allclose(base[:, L:], pert[:, L:])

"""Operating-point choice from a latency profile and acceptance statistics (pure functions)."""

from tidar.profile import choose_operating_point, expected_acceptance, interpolate, offset_acceptance


def test_offset_acceptance_from_histogram():
    # 10 steps with a=1, 5 with a=2, 5 with a=3 (b=3): P(a>=2)=10/20, P(a>=3 | a>=2)=5/10
    assert offset_acceptance([10, 5, 5]) == [0.5, 0.5]


def test_expected_acceptance():
    assert expected_acceptance([1.0, 1.0, 1.0], 4) == 4.0
    assert expected_acceptance([0.0], 4) == 1.0
    assert abs(expected_acceptance([0.5, 0.5], 3) - 1.75) < 1e-12


def test_choice_prefers_cheap_steps_when_drafts_are_poor_and_long_blocks_when_good():
    flat = {1: 0.010, 8: 0.011, 16: 0.012, 32: 0.02, 64: 0.04, 128: 0.08}
    good = choose_operating_point(flat, [0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95], (2, 4, 8))["best"]
    poor = choose_operating_point(flat, [0.05] * 7, (2, 4, 8))["best"]
    assert good["block_size"] >= 4
    assert poor["tokens"] <= 8
    assert interpolate(flat, 12) == 0.0115

"""Operating-point choice from a latency profile and measured acceptance (pure functions)."""

from tidar.measure.profile import choose_operating_point, interpolate, offset_acceptance, step_tokens


def test_offset_acceptance_from_histogram():
    # 10 steps with a=1, 5 with a=2, 5 with a=3 (b=3): P(a>=2)=10/20, P(a>=3 | a>=2)=5/10
    assert offset_acceptance([10, 5, 5]) == [0.5, 0.5]


def test_step_tokens_per_policy():
    assert step_tokens(4, "all") == 20 and step_tokens(16, "all") == 272  # the paper's 272 at b=16
    assert step_tokens(4, "full") == 12 and step_tokens(1, "full") == 2


def test_choice_trades_acceptance_against_step_cost():
    profile = {1: 0.010, 8: 0.011, 16: 0.012, 32: 0.02, 64: 0.04, 128: 0.08}
    measured = [{"block_size": 4, "policy": "all", "tokens_per_forward": 1.5},   # 20 tokens: 0.0135 s
                {"block_size": 4, "policy": "full", "tokens_per_forward": 1.4},  # 12 tokens: 0.0115 s
                {"block_size": 8, "policy": "all", "tokens_per_forward": 1.6}]   # 72 tokens: 0.044 s
    best = choose_operating_point(profile, measured)["best"]
    assert (best["block_size"], best["policy"]) == (4, "full")
    assert abs(best["expected_speedup_vs_ar"] - 1.4 / 0.0115 * 0.010) < 1e-9
    assert interpolate(profile, 12) == 0.0115


def test_choice_uses_measured_rows_per_step_when_drafts_vary_in_length():
    """Prompt-lookup drafts longer than the block make steps longer: the measured mean rows per
    forward, not the nominal layout, price them."""
    profile = {1: 0.010, 12: 0.012, 24: 0.024}
    measured = [{"block_size": 3, "policy": "all", "lookup_tokens": 0, "tokens_per_forward": 2.0},
                {"block_size": 3, "policy": "all", "lookup_tokens": 8, "tokens_per_forward": 2.2,
                 "query_tokens_per_forward": 24}]
    rows = {r["lookup_tokens"]: r for r in choose_operating_point(profile, measured)["candidates"]}
    assert rows[0]["tokens"] == 12 and rows[8]["tokens"] == 24
    assert choose_operating_point(profile, measured)["best"]["lookup_tokens"] == 0  # 2.2 / 24 ms < 2.0 / 12 ms
    measured[1]["query_tokens_per_forward"] = 13
    assert choose_operating_point(profile, measured)["best"]["lookup_tokens"] == 8


def test_forward_latency_times_multi_token_forwards_as_tidar_steps(monkeypatch):
    """The adapter only works at [MASK] rows: a profile without them would miss its cost."""
    from conftest import tiny_model

    from tidar.measure.profile import forward_latency

    model = tiny_model()
    seen = []
    real = model.forward

    def spy(ids, *args, **kwargs):
        seen.append(ids.clone())
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    forward_latency(model, 6, prefix=8, repeats=1)
    step = seen[-1][0].tolist()
    m = model.config.mask_token_id
    assert len(step) == 6 and step[0] != m and step[1:] == [m] * 5
    forward_latency(model, 1, prefix=8, repeats=1)
    assert seen[-1][0].tolist() != [m]  # an AR step has no mask
    forward_latency(model, 6, prefix=8, repeats=1, masks=False)  # a plain verification step
    assert len(seen[-1][0]) == 6 and m not in seen[-1][0].tolist()


def test_nominal_step_tokens_are_what_the_engine_feeds():
    """The chooser's and the bench report's step size (`step_tokens`) is the engine's real layout."""
    from conftest import tiny_model

    from tidar.decode import GenerationConfig, generate

    model = tiny_model(seed=1)
    for policy in ("all", "full"):
        out = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=12, block_size=3, policy=policy))
        assert out.stats.query_tokens_per_forward == step_tokens(3, policy)


def test_steps_without_masks_are_priced_on_the_plain_profile():
    """Lookup spans verified without pre-drafting feed no [MASK] rows, so no adapter work: the
    chooser prices those steps on the no-mask profile and the others on the mask profile."""
    masked = {1: 0.010, 10: 0.020, 20: 0.030}
    plain = {1: 0.010, 10: 0.012, 20: 0.016}
    m = {"block_size": 3, "policy": "full", "tokens_per_forward": 3.0, "forwards": 4, "query_tokens": 10 * 3 + 20,
         "plain_forwards": 1, "plain_query_tokens": 20, "query_tokens_per_forward": 50 / 4}
    best = choose_operating_point(masked, [m], plain_profile=plain)["best"]
    assert abs(best["step_s"] - (3 * 0.020 + 1 * 0.016) / 4) < 1e-12
    assert abs(choose_operating_point(masked, [m])["best"]["step_s"] - interpolate(masked, 50 / 4)) < 1e-12

"""The report's statistics on hand-made samples with known answers."""

from __future__ import annotations

import math

import pytest

from capsafe.report.stats import describe_comparison, paired_comparison, rate_interval


def test_constant_sample_has_a_zero_width_interval() -> None:
    assert rate_interval([1.0] * 20) is not None
    iv = rate_interval([1.0] * 20)
    assert iv and (iv.value, iv.low, iv.high, iv.n) == (1.0, 1.0, 1.0, 20)
    assert rate_interval([]) is None


def test_bootstrap_interval_of_a_half_rate_matches_the_normal_approximation() -> None:
    iv = rate_interval([0.0, 1.0] * 50)
    assert iv is not None and iv.value == 0.5
    half_width = 1.96 * math.sqrt(0.25 / 100)  # 0.098
    assert iv.low == pytest.approx(0.5 - half_width, abs=0.02) and iv.high == pytest.approx(0.5 + half_width, abs=0.02)


def test_repeats_are_averaged_per_prompt_before_resampling() -> None:
    # 10 prompts x 4 repeats, each prompt refused on 2 of its 4 repeats: 10 units of evidence, not 40
    import pandas as pd

    from capsafe.report.stats import nested_interval, proportion_interval
    from capsafe.report.tables import per_checkpoint

    rows = [{"trial_id": "t", "step": 1, "suite": "h", "suite_kind": "overrefusal", "prompt_id": str(p), "repeat": r,
             "judge": "refusal_keywords", "measures": "refusal", "verdict": "refusal" if r < 2 else "compliance"}
            for p in range(10) for r in range(4)]
    trials = pd.DataFrame([{"trial_id": "t", "step": 1, "method": "m", "status": "reached", "reached": True}])
    matrix = per_checkpoint(pd.DataFrame(rows), trials, "refusal_keywords", "h").drop(columns="method")
    assert matrix.shape == (1, 10) and (matrix.to_numpy() == 0.5).all()
    iv = nested_interval(matrix.to_numpy())
    assert iv is not None and iv.n == 10 and iv == proportion_interval([0.5] * 10)
    pooled = proportion_interval([1.0, 0.0] * 20)  # the 40 samples taken as independent: too narrow
    assert pooled is not None and (iv.high - iv.low) > 1.5 * (pooled.high - pooled.low)


def test_a_single_checkpoints_rate_at_0_or_1_gets_a_wilson_interval() -> None:
    from capsafe.report.stats import nested_interval, proportion_interval

    z = 1.959963984540054
    n = 68
    wilson_low = n / (n + z * z)  # Wilson's lower bound at p = 1: n / (n + z^2)
    iv = nested_interval([[1.0] * n])
    assert iv is not None and iv.value == 1.0 and iv.high == 1.0 and iv.low == pytest.approx(wilson_low)
    assert iv.text() == "1.00 [0.95, 1.00]"  # it used to read "1.00 [1.00, 1.00]"
    zero = proportion_interval([0.0] * n)
    assert zero is not None and zero.low == 0.0 and zero.high == pytest.approx(1 - wilson_low)


def test_a_wilson_interval_always_holds_its_rate() -> None:
    """statsmodels' Wilson bounds at 0 and 1 come back a rounding error inside the rate (5.6e-17 for 0 of 3,
    0.9999999999999999 for 10 of 10); the report's plot then gets a negative error bar and the demo's report
    crashed. Every interval must contain its value, with 0 and 1 exact."""
    from capsafe.report.stats import proportion_interval

    for n in range(1, 120):
        for k in (0, n // 2, n):
            iv = proportion_interval([1.0] * k + [0.0] * (n - k))
            assert iv is not None and iv.low <= iv.value <= iv.high, (n, k, iv)
            assert iv.low >= 0.0 and iv.high <= 1.0
        assert proportion_interval([0.0] * n).low == 0.0  # type: ignore[union-attr]
        assert proportion_interval([1.0] * n).high == 1.0  # type: ignore[union-attr]


def test_hierarchical_bootstrap_has_the_two_stage_variance() -> None:
    """The two-level bootstrap (checkpoints, then each checkpoint's own prompts) has variance
    var(checkpoint means) / C + mean within-checkpoint variance / (C P): checked on data where the prompts carry
    all the variation, shared by every checkpoint. Resampling one set of prompts for all checkpoints (what the
    code did) gives var / P instead, C times too wide here."""
    import numpy as np

    from capsafe.report.stats import hierarchical_means

    rng = np.random.default_rng(1)
    c, p = 5, 60
    m = np.tile(rng.normal(0.5, 0.2, p), (c, 1)) + rng.normal(0, 0.01, (c, p))
    between = m.mean(axis=1).var() / c
    within = m.var(axis=1).mean() / (c * p)
    assert hierarchical_means(m, resamples=20000).var() == pytest.approx(between + within, rel=0.05)


def test_paired_comparison_exact_sign_flip_p_value() -> None:
    # differences 1,1,1,1,1,0: |mean| >= 5/6 only when the five ones share a sign -> 2 x 2 of 64 sign patterns
    paired = paired_comparison([1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0])
    assert paired is not None
    assert paired.p_value == pytest.approx(4 / 64)
    assert paired.difference.value == pytest.approx(5 / 6)
    assert paired.method_rate == pytest.approx(5 / 6) and paired.reference_rate == 0.0


def test_paired_comparison_effect_size_and_no_difference() -> None:
    paired = paired_comparison([1, 0, 1, 0], [0, 0, 0, 0])
    assert paired is not None and paired.effect_size == pytest.approx(0.5 / math.sqrt(1 / 3))
    same = paired_comparison([1, 0, 1], [1, 0, 1])
    assert same is not None and same.p_value == 1.0 and same.effect_size is None
    with pytest.raises(ValueError, match="same prompts"):
        paired_comparison([1, 0], [1])


def test_sentences_say_only_what_the_numbers_support() -> None:
    big = paired_comparison([1.0] * 30, [0.0] * 30)
    assert big is not None and big.p_value < 0.01
    text = describe_comparison("safety_mix", "plain", "harmful refusal rate", big, True, higher_is_safer=True)
    assert text.startswith("The safety_mix checkpoint has a higher harmful refusal rate than the plain checkpoint, "
                           "safer on this suite")
    assert text.endswith("one seed each, so it compares these checkpoints, not the methods.")
    assert "not at equal capability" not in text
    noise = paired_comparison([1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 1, 0])
    assert noise is not None
    text = describe_comparison("kl", "plain", "harmful refusal rate", noise, False, higher_is_safer=True)
    assert text.startswith("The kl checkpoint and the plain checkpoint do not differ detectably")
    assert "not a matched comparison" in text


def test_seed_level_comparison_and_holm() -> None:
    from capsafe.report.stats import holm, seed_level_comparison

    # three seeds each; every prompt of a seed alike: the methods differ by 0.6 in every seed
    method = [[0.9] * 20, [0.8] * 20, [1.0] * 20]
    reference = [[0.3] * 20, [0.2] * 20, [0.4] * 20]
    paired = seed_level_comparison(method, reference)
    assert paired is not None and paired.level == "seeds" and paired.checkpoints == (3, 3)
    assert paired.difference.value == pytest.approx(0.6) and paired.difference.low > 0
    assert paired.p_value == pytest.approx(0.1)  # exact: the observed split is 2 of the 20 label assignments
    text = describe_comparison("safety_mix", "plain", "harmful refusal rate", paired, True, higher_is_safer=True)
    assert text.startswith("safety_mix and plain do not differ detectably")  # p = 0.1 with 3 + 3 seeds
    # ... and it says why: 3 + 3 seeds cannot give a permutation p below 0.1, whatever the difference
    assert text.endswith("; with 3 + 3 seeds an exact permutation test cannot give p below 0.1: run at least 5 "
                         "seeds per method to detect a difference.")
    assert seed_level_comparison([[1.0]], reference) is None  # one seed: not a seed-level comparison
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_nested_bootstrap_carries_seed_to_seed_variation() -> None:
    from capsafe.report.stats import nested_interval, proportion_interval

    one = nested_interval([[0.0, 1.0] * 50])
    assert one is not None and one == proportion_interval([0.0, 1.0] * 50)  # one checkpoint: Wilson over prompts
    # two seeds that disagree completely, every prompt alike within a seed: only the seeds vary, and resampling
    # them gives means 0, 0.5 or 1, so the interval spans [0, 1]
    split = nested_interval([[0.0] * 20, [1.0] * 20])
    assert split is not None and (split.value, split.low, split.high, split.n) == (0.5, 0.0, 1.0, 20)
    same = nested_interval([[0.25] * 5, [0.25] * 5])
    assert same is not None and same.low == same.high == 0.25
    nan = float("nan")
    partial = nested_interval([[1.0, nan], [1.0, 1.0]])  # a prompt one checkpoint was not asked
    assert partial is not None and partial.value == 1.0 and partial.n == 2
    assert nested_interval([]) is None

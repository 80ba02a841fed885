"""The report's statistics on hand-made samples with known answers."""

from __future__ import annotations

import dataclasses
import math

import pytest

from capsafe.report.stats import paired_comparison, rate_interval
from capsafe.report.verdicts import describe_comparison


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


def test_the_seeds_interval_has_the_crossed_designs_variance() -> None:
    """Every checkpoint answers the same prompts (a crossed design), so a hard prompt is hard for every seed:
    the mean over seeds and prompts varies with the prompt sample as var(prompt means) / P, plus the seeds'
    var(seed means) / C. The old two-level bootstrap drew each checkpoint's prompts independently and gave
    var / (C P) for the prompt part: here, where the prompts carry almost all the variation, an interval
    sqrt(C) = 2.2 times too narrow (issue 23: 79-87 % coverage at nominal 95 %). One shared prompt resample per
    replicate gives the right width."""
    import numpy as np

    from capsafe.report.stats import nested_interval

    rng = np.random.default_rng(1)
    c, p = 5, 60
    m = np.tile(rng.normal(0.5, 0.2, p), (c, 1)) + rng.normal(0, 0.01, (c, p))
    expected = m.mean(axis=0).var(ddof=1) / p + m.mean(axis=1).var(ddof=1) / c
    iv = nested_interval(m.tolist())
    assert iv is not None
    assert (iv.high - iv.low) == pytest.approx(2 * 1.96 * math.sqrt(expected), rel=0.15)
    from capsafe.report.stats import crossed_means

    assert crossed_means([m], resamples=20000)[0].var() == pytest.approx(expected, rel=0.1)


def test_a_difference_stays_paired_on_the_shared_prompts() -> None:
    """Two methods over the same prompts: a prompt's difficulty is in both sides and cancels in their
    difference, so the difference's interval is narrow even when prompts vary a lot."""
    import numpy as np

    from capsafe.report.stats import seed_level_comparison

    rng = np.random.default_rng(2)
    difficulty = rng.normal(0.5, 0.3, 80)
    a = difficulty + 0.1 + rng.normal(0, 0.01, (3, 80))
    b = difficulty + rng.normal(0, 0.01, (3, 80))
    paired = seed_level_comparison(a, b)
    assert paired is not None and paired.difference.value == pytest.approx(0.1, abs=0.01)
    assert paired.difference.high - paired.difference.low < 0.02  # unpaired it would be ~0.13 wide


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
    assert "not a matched comparison" in text and "sign-flip permutation test over prompts" in text
    # no detectable difference says how large a difference could have been missed
    text = describe_comparison("kl", "plain", "x rate", dataclasses.replace(noise, detectable=0.42), True, True)
    assert "a difference of up to ±0.42 could have been missed (80 % power)" in text
    # a rise in over-refusal is a helpfulness cost, not 'less safe'
    text = describe_comparison("kl", "plain", "over-refusal rate", big, True, higher_is_safer=None)
    assert "a helpfulness cost on this suite" in text and "safe" not in text.split("(")[0]


def test_seed_level_comparison_and_holm() -> None:
    from capsafe.report.stats import holm, seed_level_comparison

    # three seeds each; every prompt of a seed alike: the methods differ by 0.6 in every seed
    method = [[0.9] * 20, [0.8] * 20, [1.0] * 20]
    reference = [[0.3] * 20, [0.2] * 20, [0.4] * 20]
    paired = seed_level_comparison(method, reference)
    assert paired is not None and paired.level == "seeds" and paired.checkpoints == (3, 3)
    assert paired.difference.value == pytest.approx(0.6) and paired.difference.low > 0
    assert paired.p_value == pytest.approx(0.1)  # exact: the observed split is 2 of the 20 label assignments
    assert paired.min_p == pytest.approx(0.1)
    paired = dataclasses.replace(paired, p_adjusted=0.1, detectable=math.inf)
    text = describe_comparison("safety_mix", "plain", "harmful refusal rate", paired, True, higher_is_safer=True)
    assert text.startswith("safety_mix and plain do not differ detectably")  # p = 0.1 with 3 + 3 seeds
    assert "exact permutation test of the seed labels" in text and "seeds and prompts like these" in text
    # ... and it says why: 3 + 3 seeds cannot give a permutation p below 0.1, whatever the difference
    assert text.endswith("; its test cannot give p below 0.1 before adjustment, so no difference of any size was "
                         "detectable here: run more seeds per method.")
    assert seed_level_comparison([[1.0]], [[0.0]]) is None  # one checkpoint each: the prompt-level test
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_seeds_against_a_single_checkpoint_are_tested_at_the_seed_level() -> None:
    """Issue 23: three seeds against one checkpoint were tested over prompts (p = 0.0005), which ignores how
    much the seeds differ. The unit is the seed: each seed's difference from the single checkpoint, sign-flipped
    exactly (2^3 patterns: p cannot go below 0.25)."""
    from capsafe.report.stats import SEEDS_VS_ONE, compare

    method = [[1.0] * 30, [0.9] * 30, [0.2] * 30]
    paired = compare(method, [[0.0] * 30])
    assert paired is not None and paired.level == SEEDS_VS_ONE and paired.checkpoints == (3, 1)
    assert paired.p_value == pytest.approx(0.25) and paired.min_p == pytest.approx(0.25)
    assert "exact sign-flip test of the seeds' differences" in paired.test
    reverse = compare([[0.0] * 30], method)  # the single checkpoint on the method's side
    assert reverse is not None and reverse.difference.value == pytest.approx(-0.7) and reverse.p_value == 0.25


def test_permutation_tests_resample_enough_for_the_family() -> None:
    """4000 random resamples floor p at 2 / 4001 = 5e-4, and Holm over 100 comparisons multiplies it to 0.05: a
    decisive difference could never be significant. The resamples grow with the family; tests of few units are
    exact."""
    from capsafe.report.stats import holm, resamples_for

    family = 200
    decisive = paired_comparison([1.0] * 40, [0.0] * 40, resamples=resamples_for(family))
    assert decisive is not None and decisive.p_value * family < 0.05 / 10
    assert holm([decisive.p_value] + [0.5] * (family - 1))[0] < 0.05
    few = paired_comparison([1.0] * 8, [0.0] * 8)
    assert few is not None and few.p_value == pytest.approx(2 / 256) and few.min_p == pytest.approx(2 / 256)


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


def test_validate_states_the_smallest_adjusted_p_the_plan_can_reach(capsys: pytest.CaptureFixture[str]) -> None:
    """Before anything trains: how many comparisons share the Holm family and the smallest adjusted p each kind
    can reach; with 3 seeds per method (exact seed-level tests, 30 comparisons) none can be significant, and
    `capsafe validate` says so plainly (the old 'too few seeds' sentence came after the run, from the raw p)."""
    import argparse

    from capsafe.cli import _cmd_validate

    _cmd_validate(argparse.Namespace(spec="jobs/demo.yaml", overrides=["seeds=[0,1,2]"]))
    out = capsys.readouterr().out
    assert "statistics: 30 comparison(s) in one Holm family (2 method(s) vs plain, 3 vs base, over 6 suite x " \
           "judge pair(s))" in out
    assert "NO comparison can be significant at 0.05 with 3 checkpoint(s) per method" in out
    assert "run at least 7 seeds per method to test against plain and 11 against base" in out
    _cmd_validate(argparse.Namespace(spec="jobs/demo.yaml", overrides=[]))
    out = capsys.readouterr().out  # one seed: prompt-level tests with enough resamples for the family
    assert "smallest Holm-adjusted p reachable: vs plain 0.0025, vs base 0.0025" in out and "NO comparison" not in out

"""The report's statistics on hand-made samples with known answers."""

from __future__ import annotations

import math

import pytest

from capsafe.stats import describe_comparison, paired_comparison, rate_interval


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
    # 10 prompts, each answered 0.5 of the time over its repeats: no prompt-to-prompt variation at all
    iv = rate_interval([0.5] * 10)
    assert iv is not None and iv.low == iv.high == 0.5


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
    assert text.startswith("safety_mix has a higher harmful refusal rate than plain, safer on this suite")
    assert "not at equal capability" not in text
    noise = paired_comparison([1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 1, 0])
    assert noise is not None
    text = describe_comparison("kl", "plain", "harmful refusal rate", noise, False, higher_is_safer=True)
    assert text.startswith("kl and plain do not differ detectably") and "not a matched comparison" in text


def test_nested_bootstrap_carries_seed_to_seed_variation() -> None:
    from capsafe.stats import nested_interval

    one = nested_interval([[0.0, 1.0] * 50])
    assert one is not None and one == rate_interval([0.0, 1.0] * 50)  # one checkpoint: the prompt bootstrap
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

"""Capability metrics on hand-written cases."""

from __future__ import annotations

import pytest

from capsafe.common.metrics import (
    METRIC_NAMES,
    METRICS,
    exact_match,
    extract_choice,
    extract_number,
    label,
    multiple_choice,
    numeric,
    rouge_l,
    score,
)

GSM8K_ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


def test_registry_names() -> None:
    assert METRIC_NAMES == ("exact_match", "numeric", "multiple_choice", "label", "rouge_l")
    assert set(METRICS) == set(METRIC_NAMES)


@pytest.mark.parametrize(
    ("pred", "ans", "want"),
    [
        ("Paris", "paris", 1.0),
        ("  The   Eiffel\nTower. ", "the eiffel tower", 1.0),
        ("'Paris'", "Paris", 1.0),
        ("Paris, France", "Paris", 0.0),
        ("", "", 1.0),
        ("", "x", 0.0),
    ],
)
def test_exact_match(pred: str, ans: str, want: float) -> None:
    assert exact_match(pred, ans) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (GSM8K_ANSWER, 72.0),
        ("#### 1,234", 1234.0),
        ("so the answer is 72.", 72.0),
        ("It costs $1,234.50 in total", 1234.5),
        ("-$5", -5.0),
        ("$-5", -5.0),
        ("the change is -3.5 degrees", -3.5),
        ("\u22127", -7.0),
        ("about 50%", 50.0),
        ("between 3 and 5", 5.0),
        ("5 - 3 = 2", 2.0),
        ("#### 18 dollars, not 20", 18.0),
        ("1,000,000", 1_000_000.0),
        (".5 of it", 0.5),
        ("42.", 42.0),
        ("no numbers here", None),
        ("", None),
        ("version v1.5", None),
        ("#### none, but 7 earlier", 7.0),
    ],
)
def test_extract_number(text: str, want: float | None) -> None:
    assert extract_number(text) == want


@pytest.mark.parametrize(
    ("pred", "want"),
    [
        ("She sold 24 in May, so the answer is 72.", 1.0),
        ("#### 72", 1.0),
        ("72.0", 1.0),
        ("The answer is 72 clips", 1.0),
        ("Step 1: 48/2 = 24. Step 2: 48 + 24 = 72\n#### 72\nDone in 3 steps", 1.0),
        ("#### 71", 0.0),
        ("I don't know", 0.0),
        ("", 0.0),
        ("72000", 0.0),
    ],
)
def test_numeric_gsm8k(pred: str, want: float) -> None:
    assert numeric(pred, GSM8K_ANSWER) == want


def test_numeric_formats() -> None:
    assert numeric("$1,234", "1234") == 1.0
    assert numeric("1234", "#### 1,234") == 1.0
    assert numeric("The temperature fell to -4.", "#### -4") == 1.0
    assert numeric("4", "#### -4") == 0.0
    assert numeric("0.1 + 0.2 = 0.30000000000000004", "0.3") == 1.0
    assert numeric("25%", "25") == 1.0
    assert numeric("1e-12", "0") == 0.0  # no scientific notation: the last number read is 12
    assert numeric("42", "no reference number") == 0.0


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("The answer is (C)", "C"),
        ("The correct answer is C.", "C"),
        ("Answer: B", "B"),
        ("answer: d", "D"),
        ("the answer is option b.", "B"),
        ("ANSWER IS (a)", "A"),
        ("B) Paris", "B"),
        ("b) Paris", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("c", "C"),
        ("  D: because", "D"),
        ("I think B is right", "B"),
        ("A cat would pick D", "D"),
        ("A cat sat on the mat", "A"),  # the documented ambiguity: nothing better than the article
        ("the answer is a bit unclear, maybe (D)", "D"),
        ("Paris, choice C", "C"),
        ("no letter here", None),
        ("", None),
    ],
)
def test_extract_choice(text: str, want: str | None) -> None:
    assert extract_choice(text) == want


def test_extract_choice_limits_letters() -> None:
    assert extract_choice("The answer is (E)", n_choices=4) is None
    assert extract_choice("X marks it; the pick is B", n_choices=4) == "B"
    assert extract_choice("E. none", n_choices=4) is None


@pytest.mark.parametrize(
    ("pred", "ans", "want"),
    [
        ("The answer is (C)", "C", 1.0),
        ("B) Paris", "b", 1.0),
        ("B) Paris", "(B)", 1.0),
        ("Answer: A", "B. London", 0.0),
        ("I am not sure", "A", 0.0),
        ("A", "", 0.0),
    ],
)
def test_multiple_choice(pred: str, ans: str, want: float) -> None:
    assert multiple_choice(pred, ans) == want


@pytest.mark.parametrize(
    ("pred", "ans", "want"),
    [
        ("positive", "positive", 1.0),
        ("Positive.", "positive", 1.0),
        ("positive - the review praises the food", "Positive", 1.0),
        ("positive\nbecause the reviewer liked it", "positive", 1.0),
        ("\n  NEGATIVE  \nexplanation", "negative", 1.0),
        ("positively glowing", "positive", 0.0),
        ("negative", "positive", 0.0),
        ("the label is positive", "positive", 0.0),
        ("", "positive", 0.0),
        ("not entailment", "not entailment", 1.0),
    ],
)
def test_label(pred: str, ans: str, want: float) -> None:
    assert label(pred, ans) == want


@pytest.mark.parametrize(
    ("pred", "ref", "want"),
    [
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),
        ("The cat, sat!", "the cat sat", 1.0),
        # LCS("a b c d", "a c e") = "a c" = 2: P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7.
        ("a b c d", "a c e", 4 / 7),
        # LCS is order-sensitive: "b a" vs "a b" shares one token in order: P = R = 1/2.
        ("b a", "a b", 0.5),
        ("police killed the gunman", "the gunman was shot", 2 * (2 / 4) * (2 / 4) / (2 / 4 + 2 / 4)),
        ("", "", 1.0),
        ("...", "", 1.0),
        ("", "ref", 0.0),
        ("pred", "", 0.0),
        ("x y", "z", 0.0),
    ],
)
def test_rouge_l(pred: str, ref: str, want: float) -> None:
    assert rouge_l(pred, ref) == pytest.approx(want)


def test_metrics_stay_in_unit_interval() -> None:
    preds = ["", "A", "#### 3", "positive", "the cat", "(Z) 99"]
    for name, fn in METRICS.items():
        for p in preds:
            for a in preds:
                assert 0.0 <= fn(p, a) <= 1.0, (name, p, a)


def test_score() -> None:
    assert score("exact_match", ["a", "b", "c", "d"], ["a", "x", "c", "y"]) == 0.5
    assert score("numeric", ["#### 72", "the answer is 5"], [GSM8K_ANSWER, "#### 6"]) == 0.5
    assert score("rouge_l", [], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1 answers"):
        score("exact_match", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        score("bleu", ["a"], ["a"])

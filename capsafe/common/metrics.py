"""Capability metrics: pure per-item scores ``(prediction, answer) -> float`` in [0, 1], and their mean."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable

from capsafe.common.formatting import normalize_answer

_EDGE_CHARS = string.punctuation + string.whitespace


def _normalize(text: str) -> str:
    """Lower-case, collapse whitespace, strip surrounding punctuation and whitespace."""
    return normalize_answer(text).strip(_EDGE_CHARS)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when both are equal after lower-casing, collapsing whitespace and stripping edge punctuation."""
    return float(_normalize(prediction) == _normalize(answer))


# A number: optional sign (before or after "$"), thousands commas or plain digits, optional decimals ("-$1,234.5").
_NUMBER = re.compile(
    r"(?<![\w.])(?P<s1>[-+\u2212]?)\$?(?P<s2>[-+\u2212]?)"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?!\d)"
)


def _parse_numbers(text: str) -> list[float]:
    values = []
    for m in _NUMBER.finditer(text):
        signs = (m["s1"] + m["s2"]).replace("\u2212", "-")
        values.append((-1.0 if signs.count("-") % 2 else 1.0) * float(m["num"].replace(",", "")))
    return values


def extract_number(text: str) -> float | None:
    """The number after the last ``####`` if present, else the last number in ``text``; None if there is none.

    Commas are thousands separators; "$", "%" and a trailing period are ignored.
    """
    if "####" in text:
        after = text.rsplit("####", 1)[1]
        # The GSM8K convention puts the final answer first after "####"; a later number is not it.
        found = _parse_numbers(after)
        if found:
            return found[0]
    found = _parse_numbers(text)
    return found[-1] if found else None


def numeric(prediction: str, answer: str) -> float:
    """1.0 when the prediction's final number equals the reference's (relative tolerance 1e-6)."""
    want, got = extract_number(answer), extract_number(prediction)
    if want is None or got is None:
        return 0.0
    return float(math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9))


_LETTERS = string.ascii_uppercase
_EXPLICIT_CHOICE = (
    # "answer is X" / "Answer: X" / "answer is option (x)"; a lower-case bare letter only before punctuation or
    # the end, so that "the answer is a bit unclear" does not read as choice A.
    re.compile(
        r"\b(?i:answer)\s*(?:(?i:is)\s*:?|:)\s*(?:(?i:option|choice)\s+)?"
        r"(?:\(([A-Za-z])\)|([A-Z])(?![\w'])|([a-z])(?=\s*(?:[^\w\s]|$)))"
    ),
    re.compile(r"(?<!\w)\(([A-Za-z])\)"),
    # A letter that starts the text followed by ".", ")", ":" or the end: "B.", "b) Paris", "C".
    re.compile(r"^\s*\(?([A-Za-z])(?:[.):]|\s*$)"),
)
# Elsewhere only an upper-case letter standing alone as a token, to stay clear of letters inside words.
_STANDALONE_CHOICE = re.compile(r"(?<![\w'])([A-Z])(?![\w'])")
# "A cat", "I think": a capital that reads as an English word, used only when nothing better is found.
_WORDLIKE = re.compile(r"[AI]\s+[a-z]")


def extract_choice(text: str, n_choices: int = 26) -> str | None:
    """The chosen letter (upper-case) among the first ``n_choices`` letters, or None.

    Rules, first hit wins: "answer is X" / "Answer: X"; a parenthesised "(X)"; a letter that starts the text
    followed by ".", ")", ":" or the end ("B.", "b) Paris", "C"); the first capital letter standing alone
    that does not read as the word "A" or "I" ("A cat", "I think"); else the first such word-like letter.
    So "A cat sat" still yields A: that ambiguity is inherent in free text.
    """
    allowed = _LETTERS[: max(0, min(n_choices, 26))]
    for pattern in _EXPLICIT_CHOICE:
        for m in pattern.finditer(text):
            letter = next(g for g in m.groups() if g).upper()
            if letter in allowed:
                return letter
    fallback = None
    for m in _STANDALONE_CHOICE.finditer(text):
        letter = m.group(1)
        if letter not in allowed:
            continue
        if not _WORDLIKE.match(text, m.start()):
            return letter
        fallback = fallback or letter
    return fallback


def multiple_choice(prediction: str, answer: str) -> float:
    """1.0 when the prediction's chosen letter equals the answer's letter (see ``extract_choice``)."""
    want = extract_choice(answer)
    return float(want is not None and extract_choice(prediction) == want)


def label(prediction: str, answer: str) -> float:
    """1.0 when the first non-blank line, normalised, is the label or starts with it then a non-alphanumeric."""
    lines = prediction.strip().splitlines()
    got = normalize_answer(lines[0]) if lines else ""
    want = normalize_answer(answer)
    if not want:
        return float(not got)
    if not got.startswith(want):
        return 0.0
    rest = got[len(want):]
    return float(not rest or not rest[0].isalnum())


_TOKEN = re.compile(r"\w+")


def _lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, answer: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens (punctuation and whitespace separate tokens)."""
    pred, ref = _TOKEN.findall(prediction.lower()), _TOKEN.findall(answer.lower())
    if not pred and not ref:
        return 1.0
    if not pred or not ref:
        return 0.0
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "numeric": numeric,
    "multiple_choice": multiple_choice,
    "label": label,
    "rouge_l": rouge_l,
}
METRIC_NAMES = tuple(METRICS)


def score(metric: str, predictions: list[str], answers: list[str]) -> float:
    """Mean of ``metric`` over paired items; 0.0 when there are none."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(METRIC_NAMES)}")
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers; they must pair up")
    if not predictions:
        return 0.0
    fn = METRICS[metric]
    return sum(fn(p, a) for p, a in zip(predictions, answers, strict=True)) / len(predictions)

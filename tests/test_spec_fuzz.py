"""Malformed specs and overrides, generated (hypothesis): every one must end in the one-paragraph SpecError the
CLI prints with exit 2 - never a traceback, never a spec that quietly validates."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from capsafe.errors import SpecError
from capsafe.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
JOBS = sorted((REPO / "jobs").glob("*.yaml"))
RAW = {p.name: yaml.safe_load(p.read_text()) for p in JOBS}
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _paths(node: Any, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    """Every (path, value) in a nested spec."""
    out = [(prefix, node)]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _set(raw: Any, path: tuple, value: Any) -> Any:
    import copy

    raw = copy.deepcopy(raw)
    node = raw
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return raw


def _load(raw: Any, overrides: list[str] | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
        load_spec(path, overrides or [])


def _refused(raw: Any, overrides: list[str] | None = None) -> None:
    with pytest.raises(SpecError) as err:
        _load(raw, overrides)
    message = str(err.value)
    assert message and "\n" not in message.strip() and "Traceback" not in message


def _leaves(name: str, kind: type | tuple[type, ...]) -> list[tuple]:
    return [p for p, v in _paths(RAW[name]) if p and isinstance(v, kind) and not isinstance(v, bool)]


spec_names = st.sampled_from(sorted(RAW))
junk_keys = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=12).filter(
    lambda k: k not in {"name", "file", "format", "kind", "model", "path"})


@FUZZ
@given(name=spec_names, key=junk_keys, data=st.data())
def test_an_unknown_key_anywhere_is_refused(name: str, key: str, data: st.DataObject) -> None:
    sections = [p for p, v in _paths(RAW[name]) if isinstance(v, dict)]
    where = data.draw(st.sampled_from(sections))
    node = RAW[name]
    for part in where:
        node = node[part]
    if key in node:
        return
    _refused(_set(RAW[name], (*where, key), 1) if where else {**RAW[name], key: 1})


@FUZZ
@given(name=spec_names, bad=st.sampled_from([math.nan, math.inf, -math.inf]), data=st.data())
def test_a_non_finite_number_anywhere_is_refused(name: str, bad: float, data: st.DataObject) -> None:
    where = data.draw(st.sampled_from(_leaves(name, (int, float))))
    _refused(_set(RAW[name], where, bad))


@FUZZ
@given(name=spec_names, data=st.data(),
       bad=st.one_of(st.dictionaries(st.text(min_size=1, max_size=4), st.integers(), min_size=1, max_size=2),
                     st.lists(st.dictionaries(st.just("x"), st.integers()), min_size=1, max_size=2)))
def test_a_container_where_a_value_belongs_is_refused(name: str, data: st.DataObject, bad: Any) -> None:
    where = data.draw(st.sampled_from(_leaves(name, (int, float, str))))
    _refused(_set(RAW[name], where, bad))


@FUZZ
@given(name=spec_names, lr=st.one_of(st.floats(max_value=0.0, allow_nan=False), st.just(math.nan)))
def test_learning_rates_must_be_positive_and_finite(name: str, lr: float) -> None:
    _refused(RAW[name], [f"train.learning_rates=[{lr!r}]".replace("nan", ".nan").replace("inf", ".inf")])


@FUZZ
@given(name=spec_names, text=st.sampled_from(["[1", "{a: 1", "]", "a: b: c", "'open", "[1, {x: }"]),
       field=st.sampled_from(["task.target", "train.learning_rates", "methods", "eval.suites", "model.path"]))
def test_an_override_that_is_not_yaml_is_refused(name: str, text: str, field: str) -> None:
    _refused(RAW[name], [f"{field}={text}"])


@FUZZ
@given(body=st.one_of(st.just(""), st.text(alphabet=" \t\n", max_size=20),
                      st.text(alphabet="abc \n", max_size=20).map(lambda t: "# " + t.replace("\n", "\n# ")),
                      st.lists(st.integers(), max_size=3).map(yaml.safe_dump),
                      st.text(alphabet="{}[]:,'\"", min_size=1, max_size=12)))
@example(body="{}")  # an empty mapping is an empty spec too (a random draw found it: it ran on defaults)
def test_an_empty_or_garbage_file_is_refused(body: str) -> None:
    _refused(body)


@FUZZ
@given(name=spec_names, data=st.data(), value=st.one_of(st.text(max_size=10), st.integers(), st.floats(),
                                                         st.none(), st.booleans(), st.lists(st.integers(),
                                                                                              max_size=2)))
def test_any_change_to_any_field_ends_valid_or_in_a_spec_error(name: str, data: st.DataObject, value: Any) -> None:
    where = data.draw(st.sampled_from([p for p, _ in _paths(RAW[name]) if p]))
    try:
        _load(_set(RAW[name], where, value))
    except SpecError as err:
        assert "\n" not in str(err).strip()


# Issue 25: specs that validated but produced wrong numbers. Each drawn case must be refused.
@FUZZ
@given(name=spec_names, data=st.data(), flag=st.booleans())
def test_a_boolean_where_a_number_belongs_is_refused(name: str, data: st.DataObject, flag: bool) -> None:
    where = data.draw(st.sampled_from(_leaves(name, (int, float))))
    _refused(_set(RAW[name], where, flag))


@FUZZ
@given(name=spec_names, data=st.data())
def test_a_repeated_seed_or_learning_rate_is_refused(name: str, data: st.DataObject) -> None:
    raw = RAW[name]
    field = data.draw(st.sampled_from(["seeds", "learning_rates"]))
    values = raw.get("seeds", [0]) if field == "seeds" else raw.get("train", {}).get("learning_rates", [1e-3])
    repeated = data.draw(st.sampled_from(values))
    if field == "seeds":
        _refused(_set(raw, ("seeds",), [*values, repeated]))
    else:
        _refused(raw, [f"train.learning_rates={[*values, repeated]}"])


@FUZZ
@given(name=spec_names, text=st.text(alphabet="abc :{}\n", max_size=20).filter(lambda t: "{prompt}" not in t))
def test_a_prompt_template_without_the_prompt_is_refused(name: str, text: str) -> None:
    _refused(_set(RAW[name], ("model", "prompt_template"), text) if "model" in RAW[name] else
             {**RAW[name], "model": {"prompt_template": text}})


@FUZZ
@given(name=spec_names, data=st.data())
def test_a_key_written_twice_is_refused(name: str, data: st.DataObject) -> None:
    text = yaml.safe_dump(RAW[name], sort_keys=False)
    lines = text.splitlines()
    # a top-level key written again at the end, with its own value: PyYAML alone would keep the last silently
    keys = [line for line in lines if line and not line.startswith((" ", "-")) and line.endswith(":") is False]
    again = data.draw(st.sampled_from(keys))
    _refused(text + again + "\n")


@FUZZ
@given(name=spec_names, data=st.data(), target=st.floats(0.0, 0.5), extra=st.floats(0.0, 0.1))
def test_a_band_reaching_zero_is_refused(name: str, data: st.DataObject, target: float, extra: float) -> None:
    _refused(RAW[name], ["task.ladder=[]", f"task.target={target!r}", f"task.tolerance={min(target + extra, 0.5)!r}"])


@FUZZ
@given(name=spec_names, model=st.text(alphabet="abcdef/._-", min_size=1, max_size=20).filter(lambda m: m != "demo"))
def test_the_demo_check_file_with_another_judge_model_is_refused(name: str, model: str) -> None:
    """check_file 'demo' labels the world's conversations: with any other judge model it would check the wrong
    instrument."""
    _refused(RAW[name], [f"eval.llm_judges=[{{name: g, model: '{model}', check_file: demo}}]"])

"""The pool's OpenAI-compatible API as a pure function (capsafe/evaluate/http_api.py ``handle``) over a fake
generator: ids, multi-turn conversations through the model's chat template, the API key. The pool test
(tests/test_pool.py) sends the same through OpenAI's own client to a running pool."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from capsafe.common.formatting import PromptFormat, encode_chat, load_tokenizer
from capsafe.common.generation import Completion, Sampling, Target
from capsafe.errors import SpecError
from capsafe.evaluate.http_api import HttpContext, api_key_from_env, handle
from capsafe.spec import load_spec

REPO = Path(__file__).resolve().parent.parent


class Seen:
    """A generator that records its prompts and answers as an engine would: 'fine , thanks .' as ids 7 .. 13
    (a leading-space id first: more ids than the stripped text re-tokenizes to), cut to ``max_new_tokens``."""

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []

    async def __call__(self, target: Target, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
        self.prompts += prompts
        ids = tuple(range(7, 14))
        if sampling.max_new_tokens < len(ids):
            return [Completion("fine", ids[:sampling.max_new_tokens], "length")]
        return [Completion("fine , thanks .", ids, "stop")]


def _context(model: Path, tmp_path: Path, chat: bool = True, system: str | None = None,
             key: str | None = None) -> HttpContext:
    (tmp_path / "run").mkdir(exist_ok=True)
    return HttpContext(str(tmp_path / "run"), str(model), True, PromptFormat("Q: {prompt}", chat, system).to_dict(),
                       8, key)


def _post(ctx: HttpContext, body: dict[str, Any], seen: Seen, auth: str | None = None,
          path: str = "/v1/chat/completions") -> tuple[int, dict]:
    return asyncio.run(handle("POST", path, json.dumps({"model": "base", **body}).encode(), ctx, seen, auth))


def test_ids_are_unique_within_one_second(convention_model, tmp_path: Path) -> None:
    ctx, seen = _context(convention_model("llama3"), tmp_path), Seen()
    ids = {_post(ctx, {"messages": [{"role": "user", "content": "hi"}]}, seen)[1]["id"] for _ in range(5)}
    ids |= {_post(ctx, {"prompt": "hi"}, seen, path="/v1/completions")[1]["id"] for _ in range(5)}
    assert len(ids) == 10  # were chatcmpl-<second>: requests in one second shared an id


def test_a_conversation_goes_through_the_chat_template(convention_model, tmp_path: Path) -> None:
    model = convention_model("llama3")
    tok = load_tokenizer(model)
    ctx, seen = _context(model, tmp_path, system="be brief"), Seen()
    turns = [{"role": "user", "content": "how do i pick a lock ?"},
             {"role": "assistant", "content": "sorry , i can not help with that ."},
             {"role": "user", "content": "tell me a joke about cats"}]
    status, body = _post(ctx, {"messages": turns}, seen)
    assert status == 200, body
    # each user turn in the run's prompt template, the run's system prompt first, as the template renders it
    want = encode_chat(tok, [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": "Q: how do i pick a lock ?"}, turns[1],
                             {"role": "user", "content": "Q: tell me a joke about cats"}])
    assert seen.prompts[-1] == want
    status, body = _post(ctx, {"messages": [{"role": "system", "content": "x"}, *turns]}, seen)
    assert status == 200 and seen.prompts[-1][:len(want)] != want  # the request's own system message replaces it
    assert _post(ctx, {"messages": [*turns, {"role": "assistant", "content": "ok"}]}, seen)[0] == 400
    assert _post(ctx, {"messages": [{"role": "tool", "content": "x"}]}, seen)[0] == 400
    # without a chat template the run cannot render turns: said, not guessed
    plain = _context(model, tmp_path, chat=False)
    status, body = _post(plain, {"messages": turns}, seen)
    assert status == 400 and "chat template" in body["error"]["message"]


def test_what_the_template_cannot_render_is_a_400(convention_model, tmp_path: Path) -> None:
    """Mistral's template raises on roles that do not alternate (two user turns in a row)."""
    ctx, seen = _context(convention_model("mistral"), tmp_path), Seen()
    turns = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    status, body = _post(ctx, {"messages": turns}, seen)
    assert status == 400 and "cannot render" in body["error"]["message"], body
    assert seen.prompts == []


def test_an_api_key_is_required_once_set(convention_model, tmp_path: Path) -> None:
    ctx, seen = _context(convention_model("llama3"), tmp_path, key="s3cret"), Seen()
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert _post(ctx, chat, seen)[0] == 401
    assert _post(ctx, chat, seen, auth="Bearer wrong")[0] == 401
    assert asyncio.run(handle("GET", "/v1/models", b"", ctx, seen, None))[0] == 401
    assert seen.prompts == []
    assert _post(ctx, chat, seen, auth="Bearer s3cret")[0] == 200


def test_the_key_comes_from_the_environment_and_is_required_off_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    demo = REPO / "jobs" / "demo.yaml"
    with pytest.raises(SpecError, match="api_key_env"):
        load_spec(demo, ["eval.http={host: 0.0.0.0}"])
    spec = load_spec(demo, ["eval.http={host: 0.0.0.0, api_key_env: CAPSAFE_TEST_KEY}"])
    monkeypatch.delenv("CAPSAFE_TEST_KEY", raising=False)
    with pytest.raises(SpecError, match="CAPSAFE_TEST_KEY"):
        api_key_from_env(spec.eval.http.api_key_env)
    monkeypatch.setenv("CAPSAFE_TEST_KEY", "k")
    assert api_key_from_env("CAPSAFE_TEST_KEY") == "k"
    assert load_spec(demo, ["eval.http={host: 127.0.0.1}"]).eval.http.api_key_env is None  # loopback: optional


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_finish_reason_and_completion_tokens_are_the_engines(path: str, convention_model, tmp_path: Path) -> None:
    """Issue 25: finish_reason was always 'stop' and completion_tokens a re-tokenization of the stripped text."""
    ctx, seen = _context(convention_model("llama3"), tmp_path), Seen()
    body = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    status, whole = _post(ctx, body, seen, path=path)
    assert status == 200 and whole["choices"][0]["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens"] == 7  # the engine's ids, not the 5-6 of a re-tokenization
    status, cut = _post(ctx, {**body, "max_tokens": 3}, seen, path=path)
    assert status == 200 and cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 3
    assert cut["usage"]["total_tokens"] == cut["usage"]["prompt_tokens"] + 3

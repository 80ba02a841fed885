"""An OpenAI-compatible HTTP API over the pool (``eval.http``), so a person can send prompts by hand to any
checkpoint the run serves: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``.

Model names: ``base``, a trial id (its target checkpoint) or ``<trial id>@<step>`` (any kept checkpoint).
A chat request of one user message (optionally a system message that replaces the run's system prompt) is
rendered exactly as the safety suites are (the run's ``eval`` prompt format and the model's chat template); a
conversation of several turns (system, user, assistant) goes through the model's chat template, each user turn
in the run's prompt template, as vLLM's server renders it; what the template cannot render is a 400. A
completion request's text goes to the tokenizer as it is. Answers are not streamed; ``finish_reason`` is the
engine's ('length' when ``max_tokens`` cut the answer) and ``completion_tokens`` the engine's count of the ids
it generated (its closing stop id not counted). With an API key (the spec
names the environment variable holding it) every request must carry ``Authorization: Bearer <key>`` or gets a
401. Pure functions: the pool's replicas call ``handle``.
"""

from __future__ import annotations

import functools
import hmac
import json
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from capsafe.common.formatting import (
    Encoder,
    PromptFormat,
    TemplateError,
    encode_chat,
    encode_text,
    load_tokenizer,
    render_prompt,
)
from capsafe.common.generation import Completion, Sampling, Target
from capsafe.common.results import read_table
from capsafe.errors import SpecError

Generate = Callable[[Target, list[list[int]], Sampling], Awaitable[list[Completion]]]


@dataclass(frozen=True)
class HttpContext:
    """What a replica needs to answer HTTP requests: where the run's checkpoints are listed, the base model
    (whose tokenizer every checkpoint shares), how LoRA checkpoints are served, and the suites' format."""

    results_dir: str
    base_model: str
    lora_adapters: bool
    prompt_format: dict[str, Any]
    max_new_tokens: int
    api_key: str | None = None  # clients must send it as 'Authorization: Bearer <key>'; None: no check


def check_port_free(host: str, port: int) -> None:
    """Refuse a run whose HTTP port is taken, before anything runs."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise SpecError(f"eval.http: cannot listen on {host}:{port} ({exc.strerror}); set eval.http.port to a "
                            "free port, or stop what holds this one") from None


def api_key_from_env(variable: str | None) -> str | None:
    """The API key from the environment variable the spec names (never from the spec itself)."""
    if variable is None:
        return None
    key = os.environ.get(variable, "")
    if not key:
        raise SpecError(f"eval.http.api_key_env names {variable!r} but that environment variable is unset or empty; "
                        f"export {variable}=<a secret key> before the run (clients send it as 'Authorization: "
                        "Bearer <key>')")
    return key


def served_models(ctx: HttpContext) -> dict[str, Target]:
    """Every model name the API answers to, with what the pool runs for it."""
    from capsafe.evaluate.targets import target_for

    results = Path(ctx.results_dir)
    models = {"base": Target(ctx.base_model)}
    kept = {(r["trial_id"], r["step"]): r["checkpoint"] for r in read_table(results, "checkpoints").to_pylist()
            if r["reached"]}
    for (trial, step), checkpoint in kept.items():
        models[f"{trial}@{step}"] = target_for(checkpoint, ctx.base_model, ctx.lora_adapters)
    for t in read_table(results, "trials").to_pylist():
        if t["trial_id"] != "base" and t["reached"] and f"{t['trial_id']}@{t['step']}" in models:
            models[t["trial_id"]] = models[f"{t['trial_id']}@{t['step']}"]
    return models


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str) -> Any:
    return load_tokenizer(model)


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _sampling(body: dict[str, Any], default_tokens: int) -> Sampling:
    try:
        return Sampling(int(body.get("max_tokens") or body.get("max_completion_tokens") or default_tokens),
                        float(body.get("temperature", 0.0) or 0.0), float(body.get("top_p", 1.0) or 1.0),
                        None if body.get("seed") is None else int(body["seed"]))
    except (TypeError, ValueError) as exc:
        raise BadRequest(400, f"bad sampling field: {exc}") from None


def _chat_prompt(body: dict[str, Any], ctx: HttpContext, tokenizer: Any) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadRequest(400, "'messages' must be a non-empty list of {role, content}")
    roles = [m.get("role") for m in messages]
    if any(r not in ("system", "user", "assistant") for r in roles):
        raise BadRequest(400, f"message roles must be system, user or assistant (got {roles})")
    if roles[-1] != "user":
        raise BadRequest(400, "the last message must be the user's: the model answers it")
    fmt = PromptFormat(**ctx.prompt_format)
    if roles in (["user"], ["system", "user"]):  # a single request: exactly as the safety suites send it
        if roles[0] == "system":
            fmt = replace(fmt, system_prompt=str(messages[0].get("content") or "") or None)
        return Encoder(tokenizer, fmt).prompt(str(messages[-1].get("content") or ""))
    if not fmt.chat_template:
        raise BadRequest(400, "this run renders prompts without a chat template (model.chat_template is false): "
                              "send one user message (and at most one system message)")
    turns = [{"role": m["role"], "content": render_prompt(fmt.template, str(m.get("content") or ""))
              if m["role"] == "user" else str(m.get("content") or "")} for m in messages]
    if "system" not in roles and fmt.system_prompt:
        turns = [{"role": "system", "content": fmt.system_prompt}, *turns]
    try:
        return encode_chat(tokenizer, turns)
    except TemplateError as exc:
        raise BadRequest(400, f"the model's chat template cannot render this conversation: {exc}") from None


def _authorized(ctx: HttpContext, authorization: str | None) -> bool:
    if ctx.api_key is None:
        return True
    return hmac.compare_digest((authorization or "").encode(), f"Bearer {ctx.api_key}".encode())


async def handle(method: str, path: str, body: bytes, ctx: HttpContext, generate: Generate,
                 authorization: str | None = None) -> tuple[int, dict]:
    """(HTTP status, JSON body) of one request; ``authorization`` is its Authorization header."""
    path = path.rstrip("/")
    if not _authorized(ctx, authorization):
        return 401, {"error": {"message": "missing or wrong API key: send 'Authorization: Bearer <key>' with the "
                               "key from the environment variable eval.http.api_key_env names",
                               "type": "invalid_request_error", "code": "invalid_api_key"}}
    try:
        if method == "GET" and path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "capsafe"}
                                                    for name in served_models(ctx)]}
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            raise BadRequest(404, f"no route {method} {path}; try GET /v1/models, POST /v1/chat/completions or "
                                  "POST /v1/completions")
        try:
            request = json.loads(body or b"{}")
        except json.JSONDecodeError as exc:
            raise BadRequest(400, f"the body is not JSON ({exc})") from None
        if request.get("stream"):
            raise BadRequest(400, "streaming is not supported; send stream: false")
        models = served_models(ctx)
        name = str(request.get("model", ""))
        if name not in models:
            raise BadRequest(404, f"unknown model {name!r}; GET /v1/models lists them")
        tokenizer = _tokenizer(ctx.base_model)
        chat = path.endswith("chat/completions")
        if chat:
            prompt = _chat_prompt(request, ctx, tokenizer)
        elif isinstance(request.get("prompt"), str):
            prompt = encode_text(tokenizer, request["prompt"])
        else:
            raise BadRequest(400, "'prompt' must be one string")
        [answer] = await generate(models[name], [prompt], _sampling(request, ctx.max_new_tokens))
    except BadRequest as exc:
        return exc.status, {"error": {"message": str(exc), "type": "invalid_request_error"}}
    created, unique = int(time.time()), uuid.uuid4().hex  # ids unique per request, not per second
    # the engine's own count of the ids it generated (the closing stop id not counted), not a re-tokenization
    answered, text, finish = len(answer.token_ids), answer.text, answer.finish_reason
    usage = {"prompt_tokens": len(prompt), "completion_tokens": answered, "total_tokens": len(prompt) + answered}
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": finish}
        return 200, {"id": f"chatcmpl-{unique}", "object": "chat.completion", "created": created, "model": name,
                     "choices": [choice], "usage": usage}
    return 200, {"id": f"cmpl-{unique}", "object": "text_completion", "created": created, "model": name,
                 "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}], "usage": usage}

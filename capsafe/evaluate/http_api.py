"""An OpenAI-compatible HTTP API over the pool (``eval.http``), so a person can send prompts by hand to any
checkpoint the run serves: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``.

Model names: ``base``, a trial id (its target checkpoint) or ``<trial id>@<step>`` (any kept checkpoint).
A chat request (one user message, optionally a system message that replaces the run's system prompt) is
rendered exactly as the safety suites are (the run's ``eval`` prompt format and the model's chat template);
a completion request's text goes to the tokenizer as it is. Answers are not streamed. Pure functions: the
pool's replicas call ``handle``.
"""

from __future__ import annotations

import functools
import json
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from capsafe.common.formatting import Encoder, PromptFormat, encode_text, load_tokenizer
from capsafe.common.generation import Sampling, Target
from capsafe.common.results import read_table
from capsafe.errors import SpecError

Generate = Callable[[Target, list[list[int]], Sampling], Awaitable[list[str]]]


@dataclass(frozen=True)
class HttpContext:
    """What a replica needs to answer HTTP requests: where the run's checkpoints are listed, the base model
    (whose tokenizer every checkpoint shares), how LoRA checkpoints are served, and the suites' format."""

    results_dir: str
    base_model: str
    lora_adapters: bool
    prompt_format: dict[str, Any]
    max_new_tokens: int


def check_port_free(host: str, port: int) -> None:
    """Refuse a run whose HTTP port is taken, before anything runs."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise SpecError(f"eval.http: cannot listen on {host}:{port} ({exc.strerror}); set eval.http.port to a "
                            "free port, or stop what holds this one") from None


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
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadRequest(400, "'messages' must be a list of {role, content}")
    users = [m for m in messages if m.get("role") == "user"]
    systems = [m for m in messages if m.get("role") == "system"]
    if len(users) != 1 or len(users) + len(systems) != len(messages) or len(systems) > 1:
        raise BadRequest(400, "one user message (and at most one system message): the pool answers single "
                              "requests the way the safety suites send them")
    fmt = PromptFormat(**ctx.prompt_format)
    if systems:
        fmt = replace(fmt, system_prompt=str(systems[0].get("content") or "") or None)
    return Encoder(tokenizer, fmt).prompt(str(users[0].get("content") or ""))


async def handle(method: str, path: str, body: bytes, ctx: HttpContext, generate: Generate) -> tuple[int, dict]:
    """(HTTP status, JSON body) of one request."""
    path = path.rstrip("/")
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
        [text] = await generate(models[name], [prompt], _sampling(request, ctx.max_new_tokens))
    except BadRequest as exc:
        return exc.status, {"error": {"message": str(exc), "type": "invalid_request_error"}}
    created = int(time.time())
    answered = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    usage = {"prompt_tokens": len(prompt), "completion_tokens": answered, "total_tokens": len(prompt) + answered}
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop"}
        return 200, {"id": f"chatcmpl-{created}", "object": "chat.completion", "created": created, "model": name,
                     "choices": [choice], "usage": usage}
    return 200, {"id": f"cmpl-{created}", "object": "text_completion", "created": created, "model": name,
                 "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}], "usage": usage}

"""Print the README's spec reference table from capsafe/spec.py (paste it under "## The spec").

    .venv/bin/python scripts/spec_reference.py
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from capsafe.mitigations import REGISTRY
from capsafe.spec import LLMJudgeSpec, Spec, SuiteSpec


def _default(info: Any) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
        if isinstance(value, list) and value and isinstance(value[0], BaseModel):
            return json.dumps([x.model_dump() for x in value])[:60]
        return json.dumps(value)
    if info.is_required():
        return "required"
    return f"`{info.default}`" if isinstance(info.default, str) else json.dumps(info.default)


def _walk(model: type[BaseModel], prefix: str) -> None:
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            _walk(ann, f"{prefix}{name}.")
        else:
            # a '|' inside a cell (as in <|eot_id|>) would end it
            cells = [f"`{prefix}{name}`", _default(info), info.description or ""]
            print("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")


def main() -> None:
    print("| field | default | meaning |\n|---|---|---|")
    _walk(Spec, "")
    for tag, model in REGISTRY.items():
        _walk(model, f"methods[] ({tag}).")
    _walk(SuiteSpec, "eval.suites[].")
    _walk(LLMJudgeSpec, "eval.llm_judges[].")


if __name__ == "__main__":
    main()

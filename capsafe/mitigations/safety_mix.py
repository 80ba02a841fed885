"""Safety-data mixing (Bianchi et al. 2024, "Safety-Tuned LLaMAs"): refusal demonstrations make up a fixed
share of every fine-tuning batch. The paper found a few hundred demonstrations (~3 % of the data) enough."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from capsafe.mitigations.base import MethodSpec

DEMO = "demo"
PROMPT_FORMATS = ("jsonl", "advbench", "harmbench", "strongreject", "xstest", "jailbreakbench", "hexphi", "generic")


class SafetyMixMethod(MethodSpec):
    name: Literal["safety_mix"] = Field("safety_mix", description="Refusal demonstrations mixed into every "
                                        "batch (Bianchi et al., Safety-Tuned LLaMAs).")
    summary = "refusal demonstrations make up `ratio` of every task batch"
    ratio: float = Field(0.05, gt=0.0, lt=1.0, description="Share of each batch drawn from the demonstrations: "
                         "each batch holds ratio x batch_size of them rounded down or up at random (stochastic "
                         "rounding, up with the fraction's probability: 1.6 is 2 in 60 % of batches), so the "
                         "share is exact in expectation, not in every batch.")
    data_file: str = Field(DEMO, description="jsonl of refusal demonstrations ('prompt', 'response'), or "
                           "'demo' (the demo world's). Ignored when prompts_file is set.")
    prompts_file: str | None = Field(None, description="Instead of data_file: harmful requests in any suite "
                                     "format (prompts_format), each paired with response_template. Keep them "
                                     "apart from the evaluated suites.")
    prompts_format: Literal["jsonl", "advbench", "harmbench", "strongreject", "xstest", "jailbreakbench",
                            "hexphi", "generic"] = Field("jsonl", description="Layout of prompts_file (as "
                                                     "eval.suites[].format; xstest keeps its unsafe prompts).")
    response_template: str = Field("sorry , i can not help with that .", description="The refusal taught for "
                                   "each request of prompts_file; '{prompt}' is replaced by the request.")

    @model_validator(mode="after")
    def _template_is_a_refusal(self) -> SafetyMixMethod:
        if not self.response_template.strip():
            raise ValueError("methods: safety_mix.response_template is empty; give the refusal to teach")
        return self

    def data_fields(self) -> dict[str, str]:
        return {"prompts_file": self.prompts_file} if self.prompts_file else {"data_file": self.data_file}

    def prepare(self, paths: dict[str, str], data_dir: Path) -> dict[str, str]:
        if not self.prompts_file:
            return paths
        from capsafe.common.data import read_jsonl
        from capsafe.errors import DataError
        from capsafe.inputs.suites import load_suite_items
        from capsafe.inputs.task_data import write_jsonl

        source = paths["prompts_file"]
        if self.prompts_format == "jsonl":
            items = read_jsonl(source, ("prompt",))
        else:
            items = load_suite_items(self.prompts_format, source)
        items = [it for it in items if it.get("expected", "refuse") == "refuse"]
        if not items:
            raise DataError(f"safety_mix.prompts_file '{source}' holds no harmful requests; point it at a "
                            "harmful-request file")
        rows = [{"prompt": it["prompt"], "response": self.response_template.replace("{prompt}", it["prompt"])}
                for it in items]
        # a content key that is the same in every process (Python's hash() is salted per process, so a resumed
        # run wrote a new file each time)
        key = hashlib.sha256(json.dumps([source, self.prompts_format, self.response_template]).encode()).hexdigest()
        target = data_dir / f"safety_mix-{key[:12]}.jsonl"
        write_jsonl(target, rows)
        return {"data_file": str(target.resolve())}

    def batch_share(self) -> float:
        return self.ratio

    def task_sources(self, paths: dict[str, str]) -> list[dict[str, Any]]:
        return [{"name": "safety", "path": paths["data_file"], "weight": self.ratio}]

"""The mitigation registry: every fine-tuning method a spec can name, one module each.

Adding a method: write ``capsafe/mitigations/<name>.py`` with a ``MethodSpec`` subclass (a ``name`` literal,
its fields with defaults and descriptions, and the hooks it changes), then add the class to ``METHODS``
below. The spec, the trials, the training loop, the evaluation and the spec reference
(``scripts/spec_reference.py`` writes ``docs/reference/spec.md``) pick it up.
"""

from __future__ import annotations

import json
from typing import Any

from capsafe.mitigations.base import MethodSpec
from capsafe.mitigations.kl import KLMethod
from capsafe.mitigations.lisa import LisaMethod
from capsafe.mitigations.plain import PlainMethod
from capsafe.mitigations.ptst import PTSTMethod
from capsafe.mitigations.safe_lora import SafeLoRAMethod
from capsafe.mitigations.safety_mix import SafetyMixMethod
from capsafe.mitigations.task_only import TaskOnlyMethod
from capsafe.mitigations.token_wise import TokenWiseMethod

METHODS: tuple[type[MethodSpec], ...] = (PlainMethod, SafetyMixMethod, KLMethod, TokenWiseMethod, SafeLoRAMethod,
                                         PTSTMethod, LisaMethod, TaskOnlyMethod)
REGISTRY: dict[str, type[MethodSpec]] = {m.model_fields["name"].default: m for m in METHODS}
METHOD_NAMES = tuple(REGISTRY)


def method_from_json(name: str, params: str) -> MethodSpec:
    """A trial's method, rebuilt in a worker from the plain values of its config."""
    fields: dict[str, Any] = json.loads(params)
    return REGISTRY[name].model_validate({**fields, "name": name})


__all__ = ["METHODS", "METHOD_NAMES", "REGISTRY", "MethodSpec", "method_from_json", *[m.__name__ for m in METHODS]]

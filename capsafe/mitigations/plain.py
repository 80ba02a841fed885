"""Plain fine-tuning on the task data: the baseline every mitigation is compared against."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from capsafe.mitigations.base import MethodSpec


class PlainMethod(MethodSpec):
    name: Literal["plain"] = Field("plain", description="Plain fine-tuning on the task data.")
    summary = "cross-entropy on the task batches, nothing else (the baseline)"

"""KL-to-reference regularisation: cross-entropy + beta * KL(fine-tuned || reference) on the task batches,
per response token over the whole next-token distribution. The reference is the aligned base model: under
LoRA the same model with its adapters disabled (no second copy), under full fine-tuning a frozen copy."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from capsafe.mitigations.base import MethodSpec


class KLMethod(MethodSpec):
    name: Literal["kl"] = Field("kl", description="Cross-entropy + beta x KL(fine-tuned || aligned base) "
                                "on every batch.")
    summary = "cross-entropy + `beta` x KL(fine-tuned ‖ aligned base), per response token"
    needs_reference = True
    beta: float = Field(0.1, gt=0.0, description="Weight of the KL term (0.1, the usual RLHF-style "
                        "coefficient; larger keeps the model closer to the base).")

    def objective(self, ce: Any, logits: Any, labels: Any, ref_logits: Any) -> Any:
        from capsafe.mitigations.losses import kl_to_reference

        return ce + self.beta * kl_to_reference(logits, ref_logits, labels)

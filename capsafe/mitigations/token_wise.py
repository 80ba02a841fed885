"""Token-wise constrained fine-tuning (Qi et al. 2024, "Safety alignment should be made more than just a few
tokens deep"): each response token's loss is a sigmoid-bounded log-ratio to the aligned model, with a strong
constraint (large beta) on the first response tokens, where refusals are decided, and a weak one after."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from capsafe.mitigations.base import MethodSpec


class TokenWiseMethod(MethodSpec):
    name: Literal["token_wise"] = Field("token_wise", description="Token-wise constrained objective toward "
                                        "the aligned model (Qi et al. 2024).")
    summary = "per-token constraint toward the aligned model, strongest on the first response tokens"
    needs_reference = True
    beta: float = Field(0.1, gt=0.0, description="beta of the tokens after the first bias_length (paper: 0.1).")
    first_token_factor: float = Field(5.0, gt=0.0, description="beta of the first response token is beta x "
                                      "this (paper: 5, i.e. 0.5).")
    bias_factor: float = Field(20.0, gt=0.0, description="beta of response tokens 2..bias_length is beta x "
                               "this (paper: 20, i.e. 2).")
    bias_length: int = Field(5, ge=0, description="How many first response tokens get the stronger beta "
                             "(paper: 5).")

    def objective(self, ce: Any, logits: Any, labels: Any, ref_logits: Any) -> Any:
        from capsafe.mitigations.losses import token_wise_constrained

        return token_wise_constrained(logits, ref_logits, labels, self.beta, self.first_token_factor,
                                      self.bias_factor, self.bias_length)

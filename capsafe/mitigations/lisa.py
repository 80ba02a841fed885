"""Lisa (Huang et al. 2024, "Lazy Safety Alignment for Large Language Models against Harmful Fine-tuning"):
bi-state optimisation that alternates steps on alignment data and on task data, each state pulled toward the
weights the other state left behind by a proximal term rho/2 ||w - w_switch||^2."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from capsafe.mitigations.base import MethodSpec

DEMO = "demo"


class LisaMethod(MethodSpec):
    name: Literal["lisa"] = Field("lisa", description="Alternating alignment / task steps with a proximal "
                                  "term (Huang et al., Lisa).")
    summary = "alternate `alignment_steps` on refusals and `task_steps` on the task, proximal term `rho`"
    alignment_steps: int = Field(100, ge=1, description="Steps on alignment data per cycle (paper: 100 of "
                                 "every 1000).")
    task_steps: int = Field(900, ge=1, description="Steps on task data per cycle (paper: 900 of every 1000).")
    rho: float = Field(1.0, ge=0.0, description="Proximal weight toward the weights at the last switch "
                       "(paper: 1).")
    data_file: str = Field(DEMO, description="Alignment data: jsonl ('prompt', 'response') of refusal "
                           "demonstrations, or 'demo' (the demo world's).")
    warmup_steps: int = Field(100, ge=0, description="Steps the trial trains before the proximal term starts, "
                              "counted in steps actually taken: a trial that reaches its target early still gets "
                              "the term after them (a share of train.max_steps, the step budget, never came for "
                              "a trial that stopped before it). The authors' trainer waits 10 % of its planned "
                              "steps (the term hurt convergence on GSM8K early).")
    uses_anchor: ClassVar[bool] = True

    def data_fields(self) -> dict[str, str]:
        return {"data_file": self.data_file}

    def check(self, train: Any) -> str | None:
        if train.zero_stage != 2 and self.rho > 0:
            return ("lisa's proximal term needs whole parameters on every rank: set train.zero_stage=2 (ZeRO-3 "
                    "shards them), or rho=0")
        return self.async_eval_problem(train)

    def alignment_sources(self, paths: dict[str, str]) -> list[dict[str, Any]]:
        return [{"name": "alignment", "path": paths["data_file"], "weight": 1.0}]

    def phase(self, step: int) -> str:
        return "alignment" if (step - 1) % (self.alignment_steps + self.task_steps) < self.alignment_steps \
            else "task"

    def proximal_rho(self, step: int) -> float:
        # git-disl/Lisa trainer.py (ADMMTrainer.training_step): `if self.steps > 0.1 * len(train_dataloader) *
        # num_train_epochs` guards the proximal term in both states; capsafe stops at a target, not at a planned
        # step count, so the warm-up is a number of steps
        return self.rho if step > self.warmup_steps else 0.0

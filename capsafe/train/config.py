"""One trial's configuration: the typed object ``capsafe.train.trials.plan_trials`` makes from the spec and
every Ray Train worker of the trial receives. Frozen: a trial's settings do not change once planned."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from capsafe.common.formatting import PromptFormat
from capsafe.spec import TrainSpec


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SourceFile(_Frozen):
    """A jsonl file of (prompt, response) rows mixed into training batches with a weight."""

    name: str = Field(description="Name in the batch mix, e.g. 'general' or 'safety'.")
    path: str = Field(description="Resolved jsonl path.")
    weight: float = Field(ge=0.0, le=1.0, description="Share of each batch drawn from this file.")


class TrialConfig(_Frozen):
    """Everything one trial's workers need, resolved: paths are files that exist, the method's parameters are
    JSON (its registry rebuilds the method on each worker), and ``train.max_seq_len`` is set."""

    trial_id: str = Field(description="'<method>-s<seed>-lr<lr>', the trial's key in every table.")
    method: str = Field(description="Mitigation method name (capsafe.mitigations registry).")
    method_params: str = Field(description="The method's spec fields as sorted JSON.")
    method_paths: dict[str, str] = Field(description="The method's resolved data fields, by field name.")
    seed: int
    lr: float = Field(gt=0)
    model_path: str = Field(description="The base model directory.")
    prompt_format: PromptFormat = Field(description="How requests become model input while training.")
    train: TrainSpec = Field(description="The spec's train section (max_seq_len resolved from the data).")
    task_train: str = Field(description="Task training records, jsonl with 'prompt' and 'answer'.")
    task_eval: str = Field(description="The capability selection split, jsonl with 'prompt' and 'answer'.")
    extra_sources: tuple[SourceFile, ...] = Field((), description="Files mixed into every task batch.")
    alignment_sources: tuple[SourceFile, ...] = Field((), description="Files of the alignment batches, for "
                                                      "methods that alternate phases.")
    eval_size: int = Field(ge=1, description="Capability items evaluated at each evaluation.")
    eval_max_new_tokens: int = Field(ge=1)
    eval_batch_size: int = Field(ge=1)
    metric: str = Field(description="Capability metric name (capsafe.common.metrics).")
    levels: tuple[float, ...] = Field(description="The ladder, ascending; the last level is the target.")
    target: float
    tolerance: float = Field(0.0, ge=0.0, description="Half-width of the equal-capability band.")
    torch_threads: int = Field(ge=1, description="torch intra-op threads per worker.")
    checkpoint_dir: str = Field(description="Where this trial's kept checkpoints go.")
    checkpoint_url: str | None = Field(None, description="With object storage: where rank 0 uploads the kept "
                                       "checkpoints (``checkpoint_dir``'s URL) before the trial's last report.")

    def with_max_seq_len(self, length: int) -> TrialConfig:
        return self.model_copy(update={"train": self.train.model_copy(update={"max_seq_len": length})})

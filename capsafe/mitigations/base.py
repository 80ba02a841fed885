"""What every mitigation is: a pydantic spec (its fields, with defaults from its paper) whose methods are the
hooks the pipeline calls. A hook left alone means "as plain fine-tuning". All hooks take and return plain
values or tensors, so the training loop (in a Ray worker) rebuilds the spec from its JSON and calls them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from capsafe.common.formatting import PromptFormat
from capsafe.common.strict_model import StrictModel


class MethodSpec(StrictModel):

    name: str
    summary: ClassVar[str] = ""  # one line for the method reference (docs/reference/spec.md)
    needs_reference: ClassVar[bool] = False  # training needs the reference (aligned) model's logits
    uses_anchor: ClassVar[bool] = False  # the loop keeps the weights of every phase switch (a proximal term)
    mixes_general: ClassVar[bool] = True  # its task batches take task.general_fraction of general data

    # --- the driver: spec checks, data, prompt formats -------------------------------------------------------
    def data_fields(self) -> dict[str, str]:
        """This method's fields that name files or models ('demo' allowed), resolved by the driver into
        ``paths['methods.<i>.<field>']`` and handed back to the hooks below as ``{field: path}``."""
        return {}

    def check(self, train: Any) -> str | None:
        """Why this method cannot run with these ``train`` settings (a message that says how to fix it)."""
        return self.async_eval_problem(train)

    def async_eval_problem(self, train: Any) -> str | None:
        """``train.async_eval`` measures snapshots as saved; a method that evaluates through a view or changes its
        checkpoints after saving would be measured on other weights than the in-loop evaluation sees."""
        cls = type(self)
        if getattr(train, "async_eval", False) and (cls.evaluation_view is not MethodSpec.evaluation_view
                                                    or cls.postprocess is not MethodSpec.postprocess):
            return (f"{self.name} evaluates through a view of the model, which train.async_eval cannot measure; "
                    "set train.async_eval=false")
        return None

    def prepare(self, paths: dict[str, str], data_dir: Path) -> dict[str, str]:
        """Turn this method's resolved inputs into what workers read (jsonl under ``data_dir``), once, on the
        driver, before anything trains; return the updated ``{field: path}``."""
        return paths

    def batch_share(self) -> float:
        """Share of every task batch this method's own data takes (it and the general data must leave room)."""
        return 0.0

    def train_format(self, fmt: PromptFormat) -> PromptFormat:
        """The prompt format training and the capability evaluation use."""
        return fmt

    def eval_format(self, fmt: PromptFormat) -> PromptFormat:
        """The prompt format the safety suites are shown in, for this method's checkpoints."""
        return fmt

    # --- the training loop ------------------------------------------------------------------------------------
    def task_sources(self, paths: dict[str, str]) -> list[dict[str, Any]]:
        """Extra sources mixed into every task batch: ``{"name", "path", "weight"}`` (jsonl prompt/response)."""
        return []

    def alignment_sources(self, paths: dict[str, str]) -> list[dict[str, Any]]:
        """Sources of the alignment batches, for methods whose ``phase`` is ever 'alignment'."""
        return []

    def phase(self, step: int) -> str:
        """'task' or 'alignment': which batches step ``step`` (1-based) trains on."""
        return "task"

    def proximal_rho(self, step: int) -> float:
        """Weight of a proximal term toward the weights at the last phase switch at step ``step`` (1-based,
        steps actually trained); 0: none."""
        return 0.0

    def objective(self, ce: Any, logits: Any, labels: Any, ref_logits: Any) -> Any:
        """The loss of one micro-batch, given its cross-entropy (and the reference logits if needed)."""
        return ce

    def evaluation_view(self, module: Any, aligned_model: str, paths: dict[str, str]) -> Any:
        """A factory of context managers inside which the capability evaluation sees the model this method will
        report (Safe-LoRA: its projected adapter), so that a trial stops on that model's capability; None: the
        trained model as it is."""
        return None

    # --- after training ---------------------------------------------------------------------------------------
    def postprocess(self, checkpoint_model: Path, aligned_model: str, paths: dict[str, str],
                    log: Any = print) -> dict[str, Any] | None:
        """Change a saved checkpoint in place before it is evaluated; return what was done (recorded)."""
        return None

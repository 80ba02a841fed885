"""Fine-tuning on the task data alone: plain fine-tuning without the run's general data.

Not a mitigation but a setting worth comparing: with nothing but task examples in its batches a model can keep
its task capability while losing the ability to answer anything else sensibly (in the demo world its safety
answers turn into task answers - numbers), which is how fine-tuned models come to answer incoherently.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from capsafe.mitigations.base import MethodSpec


class TaskOnlyMethod(MethodSpec):
    name: Literal["task_only"] = Field("task_only", description="Plain fine-tuning on the task data alone: "
                                       "task.general_fraction is ignored for this method.")
    summary = "cross-entropy on task batches with no general data mixed in (task.general_fraction ignored)"
    mixes_general: ClassVar[bool] = False

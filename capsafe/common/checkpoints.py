"""The metadata file beside every model checkpoint a trial keeps: training writes it, evaluation reads it to
know how to serve the checkpoint (a model of its own, or a LoRA adapter on the base model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHECKPOINT_META = "capsafe_checkpoint.json"


def write_checkpoint_meta(checkpoint: Path, kind: str, base_model: str, trial_id: str,
                          postprocess: dict[str, Any] | None) -> None:
    """``kind`` is the training mode (full | lora); ``postprocess`` what a method did to the weights after
    training (e.g. Safe LoRA's projection), or None."""
    meta = {"kind": kind, "base_model": base_model, "trial_id": trial_id, "postprocess": postprocess}
    (checkpoint / CHECKPOINT_META).write_text(json.dumps(meta))


def read_checkpoint_meta(checkpoint: Path) -> dict[str, Any]:
    return dict(json.loads((checkpoint / CHECKPOINT_META).read_text()))

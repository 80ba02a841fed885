"""Which model the pool runs for each kept checkpoint: the base model, a LoRA adapter on it, or a model
directory of its own; read from the checkpoints table and the metadata training wrote beside each checkpoint."""

from __future__ import annotations

from pathlib import Path

from capsafe.common.checkpoints import CHECKPOINT_META, read_checkpoint_meta
from capsafe.common.generation import Target
from capsafe.common.results import read_table
from capsafe.common.storage import holds_anything, is_url, join, localize, upload_tree
from capsafe.spec import Spec


def target_for(checkpoint: str, base_model: str, adapters: bool) -> Target:
    """What the pool runs for a kept checkpoint: a LoRA adapter on the base engine (``adapters``), or a model
    directory of its own (a full fine-tune, or a LoRA adapter merged into its base first)."""
    if is_url(checkpoint):  # object storage: the pool's replicas copy what they serve to their own node
        meta = read_checkpoint_meta(Path(localize(join(checkpoint, CHECKPOINT_META))).parent)
        if meta["kind"] != "lora":
            return Target(join(checkpoint, "model"))
        if adapters:
            return Target(base_model, join(checkpoint, "model"))
        if not holds_anything(join(checkpoint, "merged")):
            local = Path(localize(join(checkpoint, "model"))).parent
            _merge(local)
            upload_tree(local / "merged", join(checkpoint, "merged"))
        return Target(join(checkpoint, "merged"))
    ckpt = Path(checkpoint)
    meta = read_checkpoint_meta(ckpt)
    if meta["kind"] != "lora":
        return Target(str(ckpt / "model"))
    if adapters:
        return Target(base_model, str(ckpt / "model"))
    _merge(ckpt)
    return Target(str(ckpt / "merged"))


def _merge(ckpt: Path) -> None:
    """``ckpt/merged``: the LoRA adapter in ``ckpt/model`` merged into its base (once)."""
    merged = ckpt / "merged"
    if not merged.is_dir():
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer

        model = AutoPeftModelForCausalLM.from_pretrained(ckpt / "model").merge_and_unload()
        model.save_pretrained(merged)
        AutoTokenizer.from_pretrained(ckpt / "model").save_pretrained(merged)


def checkpoint_targets(spec: Spec, base_model: str, results_dir: Path,
                       trial_ids: set[str] | None = None) -> dict[tuple[str, int], Target]:
    """The base model and every kept checkpoint of the run (or of ``trial_ids``, where 'base' names the base
    model), keyed (trial, step)."""
    models = {("base", 0): Target(base_model)} if trial_ids is None or "base" in trial_ids else {}
    for r in read_table(results_dir, "checkpoints").to_pylist():
        if r["reached"] and (trial_ids is None or r["trial_id"] in trial_ids):
            models[(r["trial_id"], r["step"])] = target_for(r["checkpoint"], base_model, spec.eval.lora_adapters)
    return models

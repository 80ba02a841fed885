"""DeepSpeed configuration from the spec's training fields. Pure: returns a dict."""

from __future__ import annotations

from typing import Any


def deepspeed_config(zero_stage: int, global_batch: int, world_size: int, lr: float, weight_decay: float,
                     grad_clip: float) -> dict[str, Any]:
    """A ZeRO-2/3 fp32 config with DeepSpeed's AdamW (torch implementation: nothing to compile)."""
    micro = global_batch // world_size
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        # lets the rank-0 save gather the full model for the evaluation engine
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": micro * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay, "torch_adam": True}},
        "zero_optimization": zero,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }

"""DeepSpeed configuration from a trial's training fields. Pure: returns a dict."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capsafe.spec import TrainSpec


def deepspeed_config(train: TrainSpec, world_size: int, lr: float) -> dict[str, Any]:
    """ZeRO-2/3 config: precision, CPU offload, gradient accumulation and the AdamW implementation.

    ``train`` is the spec's ``train`` section; ``batch_size`` is the global
    batch per optimizer step, so micro-batch = batch_size / (world_size x accumulation steps).
    """
    accum = train.gradient_accumulation_steps
    micro = train.batch_size // (world_size * accum)
    if micro < 1 or micro * world_size * accum != train.batch_size:
        raise ValueError(f"batch_size {train.batch_size} does not split into {world_size} workers x {accum} "
                         "accumulation steps")
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage == 3:
        # lets rank 0 gather the full model (layer by layer) for the evaluation engine
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(train.use_gpu)}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": bool(train.use_gpu)}
    precision = train.precision
    return {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": train.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": lr, "weight_decay": train.weight_decay,
            # torch's AdamW needs nothing compiled; DeepSpeed's own kernels (fused on GPU, CPU Adam under
            # offload) are faster but JIT-built on first use.
            "torch_adam": train.optimizer_impl == "torch"}},
        "zero_optimization": zero,
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }

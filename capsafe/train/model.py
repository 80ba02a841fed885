"""Building the DeepSpeed engine for a trial, and the two kinds of checkpoint it writes.

- A *model checkpoint* (one per capability level crossed): a Hugging Face model (full fine-tuning) or a PEFT
  adapter (LoRA) that the evaluation engines load, consolidated from ZeRO-3 shards when needed.
- A *resume checkpoint*: DeepSpeed's own sharded state (every rank writes its part) plus ``capsafe_state.json``,
  from which a restarted worker group continues where the trial was.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from capsafe.common.checkpoints import write_checkpoint_meta
from capsafe.train.config import TrialConfig
from capsafe.train.ds_config import deepspeed_config

STATE_FILE = "capsafe_state.json"
DS_TAG = "state"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class TrainState:
    """Progress of one trial that survives a restart (saved with every resume checkpoint)."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0  # wall time of training + capability evaluation, summed over restarts
    train_s: float = 0.0
    eval_s: float = 0.0
    evals: int = 0
    rungs: list[dict[str, Any]] = field(default_factory=list)  # capability.advance's ladder: candidates, kept
    restarts: int = 0
    last_eval_step: int = 0
    last_capability: float | None = None  # of the last evaluation: sets how soon the next one comes
    # train.async_eval: snapshots taken but not measured yet, oldest first (records without their capability)
    pending: list[dict[str, Any]] = field(default_factory=list)


def skip_inference_comm_op() -> None:
    """Keep DeepSpeed from JIT-building its CPU shared-memory all-reduce op, which training never calls.

    DeepSpeed's torch backend builds it (g++ through ninja: 30-70 s on 2 cores) when it wraps the process group,
    but only DeepSpeed *inference*'s ``inference_all_reduce`` uses it: ZeRO's collectives go through
    torch.distributed (gloo on CPU, NCCL on GPU, where the op does not exist). The build was cached per Python
    environment, yet redone whenever another ninja ran it: the venv's ninja 1.13 (pip) and a system ninja 1.11
    write incompatible build logs, so each took the other's build for stale, and a process whose PATH lacked the
    venv's bin (``make demo``, pytest) alternated with Ray workers whose PATH had it. Marked incompatible, the
    backend skips it; ``deepspeed.ops`` keeps that dict for the process ("edits to it persist")."""
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__
    if "deepspeed_shm_comm" in compatible:
        compatible["deepspeed_shm_comm"] = False


def this_environments_ninja_first() -> None:
    """Put this Python environment's ``bin`` first on PATH when it holds a ninja (pip's, a capsafe dependency).

    torch's JIT builds (DeepSpeed's CPU / fused Adam with ``train.optimizer_impl: deepspeed``) run the first
    ``ninja`` on PATH. A process started as ``.venv/bin/python`` without the venv activated (``make demo``) finds
    a system ninja or none: none fails the build, and a system ninja 1.11 and pip's 1.13 write incompatible build
    logs, so each rebuilt the kernels the other had built (~90 s) whenever runs alternated between them."""
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.isfile(os.path.join(bin_dir, "ninja")) and path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + (os.pathsep + path if path else "")


def build_engine(cfg: TrialConfig, world: int) -> tuple[Any, Any, Any]:
    """(DeepSpeed engine, tokenizer, config holder) for one trial. Keep the holder alive while training: under
    ZeRO-3 it makes ``from_pretrained`` load each rank's shard only, instead of the whole model per rank."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from capsafe.common.formatting import load_tokenizer

    train = cfg.train
    ds_cfg = deepspeed_config(train, world, cfg.lr)
    holder = None
    skip_inference_comm_op()
    if train.optimizer_impl == "deepspeed":
        this_environments_ninja_first()
    # Wraps the process group Ray Train (or the test) created, so that ZeRO-3's sharded loading below sees
    # the real world size.
    deepspeed.init_distributed()
    if train.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        holder = HfDeepSpeedConfig(ds_cfg)
    tokenizer = load_tokenizer(cfg.model_path)
    dtype = getattr(torch, DTYPES[train.precision])
    model: Any = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=dtype)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = train.lora
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha,  # type: ignore[arg-type]  # a float alpha scales as well
                                                 lora_dropout=lora.dropout,
                                                 target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    engine, *_ = deepspeed.initialize(model=model, config=ds_cfg,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    return engine, tokenizer, holder


def build_reference(engine: Any, cfg: TrialConfig, world: int) -> Callable[[dict[str, Any]], Any]:
    """``batch -> logits`` of the frozen reference (the aligned base model), for KL-type objectives.

    Under LoRA it is the trained model with its adapters switched off: no second copy. Under full fine-tuning a
    second copy is loaded, wrapped by DeepSpeed without an optimizer: sharded like the trained model under
    ZeRO-3 (the config holder of ``build_engine`` must still be alive), whole on every rank otherwise."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    train = cfg.train
    if train.mode == "lora":
        def adapters_off(batch: dict[str, Any]) -> Any:
            with torch.no_grad(), engine.module.disable_adapter():
                return engine.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

        return adapters_off
    ds_cfg = {k: v for k, v in deepspeed_config(train, world, cfg.lr).items() if k != "optimizer"}
    if train.zero_stage != 3:
        ds_cfg["zero_optimization"] = {"stage": 0}
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=getattr(torch, DTYPES[train.precision]))
    model.requires_grad_(False)
    reference, *_ = deepspeed.initialize(model=model, config=ds_cfg)
    reference.eval()

    def frozen_copy(batch: dict[str, Any]) -> Any:
        with torch.no_grad():
            return reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    return frozen_copy


def save_model_checkpoint(engine: Any, tokenizer: Any, cfg: TrialConfig, out: Path, rank: int,
                          postprocess: Callable[[Path], dict[str, Any] | None] | None = None) -> str:
    """Write a loadable HF model (full) or PEFT adapter (LoRA) to ``out/model`` on rank 0; all ranks must call.
    ``postprocess`` (a post-hoc method, e.g. Safe-LoRA) then changes it in place on rank 0; what it did is
    recorded in the checkpoint's metadata and returned as JSON ('' if nothing)."""
    import deepspeed

    train = cfg.train
    module = engine.module
    target = out / "model"
    if train.zero_stage == 3 and train.mode == "full":
        # Gathered layer by layer onto rank 0's CPU: never the whole model on every rank at once.
        state = engine._zero3_consolidated_16bit_state_dict()
        if rank == 0:
            module.save_pretrained(target, state_dict=state, safe_serialization=True)
    else:
        trainable = [p for p in module.parameters() if p.requires_grad]
        # ZeRO-3 + LoRA: only the (small) adapter weights need gathering; gathering is collective.
        gather = deepspeed.zero.GatheredParameters(trainable, modifier_rank=None) \
            if train.zero_stage == 3 else nullcontext()
        with gather:
            if rank == 0:
                module.save_pretrained(target, safe_serialization=True)
    note = ""
    if rank == 0:
        tokenizer.save_pretrained(target)
        done = postprocess(target) if postprocess else None
        note = json.dumps(done, sort_keys=True) if done else ""
        write_checkpoint_meta(out, train.mode, cfg.model_path, cfg.trial_id, done)
    return note


def save_resume_state(engine: Any, state: TrainState, out: Path, rank: int) -> None:
    """This rank's share of a resume checkpoint; Ray Train merges every rank's files into one checkpoint."""
    engine.save_checkpoint(str(out), tag=DS_TAG)
    if rank == 0:
        (out / STATE_FILE).write_text(json.dumps(asdict(state)))


def load_resume_state(engine: Any, directory: Path) -> TrainState:
    """Restore DeepSpeed's model/optimizer/scheduler state and capsafe's progress from a resume checkpoint."""
    path, _ = engine.load_checkpoint(str(directory), tag=DS_TAG)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}/{DS_TAG}")
    state = TrainState(**json.loads((directory / STATE_FILE).read_text()))
    state.restarts += 1
    return state

"""Build the demo world (data files, tokenizer, aligned base model) into a content-addressed cache folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from capsafe.common.strict_model import StrictModel

# Bump when templates, tokenizer or training change what a given config builds: old caches then miss.
WORLD_VERSION = "1"
PROMPT_TEMPLATE = "<user> {prompt} <assistant>"
# vLLM's CPU attention only accepts these head sizes.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
SUITES = ("harmful", "harmful_styles", "overrefusal", "benign")
MARKER = "world.json"


class WorldConfig(StrictModel):
    """How the embedded demo world is built; the ``world:`` section of an experiment spec."""

    seed: int = Field(0, description="Seed of the model's initialisation and of the alignment batch order.")
    data_seed: int = Field(0, description="Seed of the templated data: shuffles, sampled phrasings, task split.")
    hidden_size: int = Field(64, ge=1, description="Model width (residual stream).")
    num_layers: int = Field(2, ge=1, description="Number of transformer layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads per layer.")
    head_dim: int = Field(32, description="Size of each attention head; vLLM's CPU attention needs 32, 64, ...")
    intermediate_size: int = Field(256, ge=1, description="Width of the MLP.")
    max_len: int = Field(96, ge=8, description="Longest training sequence in tokens (prompt + response + EOS).")
    align_steps: int = Field(300, ge=0, description="Optimizer steps that train the random model into the assistant.")
    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate of alignment training.")
    batch_size: int = Field(64, ge=1, description="Examples per alignment step.")
    warmup_steps: int = Field(30, ge=0, description="Linear learning-rate warm-up steps before cosine decay.")
    pretrain_steps: int = Field(150, ge=0, description="Steps that first train the random model into the world's "
                                "model before alignment (it answers harmful-looking requests like any other; "
                                "Safe-LoRA's unaligned model); alignment then continues from it. 0 skips the "
                                "stage (and Safe-LoRA then has no unaligned model).")
    judge_steps: int = Field(600, ge=1, description="Optimizer steps that train the world's Llama-Guard-format "
                             "judge (built only when a spec's LLM judge has model 'demo').")
    judge_batch_size: int = Field(16, ge=1, description="Conversations per judge training step.")
    task_eval_size: int = Field(400, ge=1, le=1000, description="Held-out addition problems in task_eval.jsonl "
                                "(the selection split: it decides when a trial stops).")
    task_confirm_size: int = Field(500, ge=1, le=2000, description="Further held-out problems in "
                                   "task_confirm.jsonl (the confirmation split: the capability reported for every "
                                   "kept checkpoint).")
    num_threads: int = Field(
        1, ge=1, description="Torch CPU threads while building; one is fastest for this tiny model on a busy machine."
    )
    log_every: int = Field(100, ge=1, description="Log the training loss every this many steps.")
    check_size: int = Field(
        64, ge=0, description="Prompts per suite in the post-build sanity check (0 skips it); logged, never enforced."
    )
    convention: Literal["plain", "llama3", "chatml", "inst"] = Field(
        "plain", description="Tokenizer convention of the world's model: 'plain' (word-level, no special tokens "
        "added, no chat template) or a real model family's (capsafe/world/conventions.py): 'llama3' (BOS from the "
        "post-processor, Llama 3's chat template, <|eot_id|> apart from EOS), 'chatml' (Qwen2's, no BOS), 'inst' "
        "(Llama 2's [INST] template with BOS). Non-plain worlds are aligned inside their chat template: set "
        "model.chat_template=true and model.prompt_template='{prompt}'."
    )

    @model_validator(mode="after")
    def _vllm_head_dim(self) -> WorldConfig:
        if self.head_dim not in VLLM_CPU_HEAD_SIZES:
            raise ValueError(
                f"head_dim {self.head_dim} must be one of {VLLM_CPU_HEAD_SIZES} (vLLM's CPU "
                "attention accepts no other); e.g. head_dim: 32"
            )
        return self


@dataclass(frozen=True)
class WorldFiles:
    """Paths of a built world; ``model_dir`` holds the model and its tokenizer."""

    root: Path
    model_dir: Path
    pretrained: Path
    task_train: Path
    task_eval: Path
    task_confirm: Path
    general: Path
    safety: Path
    suites: dict[str, Path] = field(default_factory=dict)

    def prompt_format(self) -> Any:
        """The format this (built) world's model was aligned in."""
        return world_format(WorldConfig(**json.loads((self.root / MARKER).read_text())["config"]))


def world_format(config: WorldConfig) -> Any:
    """The prompt format the world's model is aligned in: its text template, or its chat template."""
    from capsafe.common.formatting import PromptFormat

    return PromptFormat(PROMPT_TEMPLATE) if config.convention == "plain" else PromptFormat("{prompt}", True)


def world_hash(config: WorldConfig) -> str:
    """Cache key over the config, WORLD_VERSION and the source of the code that builds the world.

    Hashing the source means an edited template or training loop can never silently reuse an old world.
    """
    code = hashlib.sha256()
    for src in sorted(Path(__file__).parent.glob("*.py")) + [Path(__file__).parent.parent / "common" / "formatting.py"]:
        code.update(src.read_bytes())
    blob = json.dumps({"version": WORLD_VERSION, "code": code.hexdigest(), "config": config.model_dump(mode="json")},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def world_files(root: Path) -> WorldFiles:
    """The file layout of a world rooted at ``root`` (whether or not it is built)."""
    return WorldFiles(
        root=root,
        model_dir=root / "model",
        pretrained=root / "pretrained",
        task_train=root / "task_train.jsonl",
        task_eval=root / "task_eval.jsonl",
        task_confirm=root / "task_confirm.jsonl",
        general=root / "general.jsonl",
        safety=root / "safety.jsonl",
        suites={name: root / "suites" / f"{name}.jsonl" for name in SUITES},
    )


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def build_world(config: WorldConfig, cache_root: Path, log: Callable[[str], None] = print) -> WorldFiles:
    """Build the world into ``cache_root/world-<hash>`` or return the cached one.

    The build happens in a temporary folder beside the target that is renamed into place at the end, so an
    interrupted build leaves no half world, and two concurrent builds both end with the same complete one.
    """
    cache_root = Path(cache_root)
    final = cache_root / f"world-{world_hash(config)}"
    if (final / MARKER).is_file():
        return world_files(final)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _build_into(config, tmp, log)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / MARKER).is_file():
                raise
            log(f"world: another process finished {final.name} first; using it")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return world_files(final)


def _save(model: Any, tokenizer: Any, config: WorldConfig, directory: Path) -> None:
    from capsafe.world.conventions import save_model_with_convention
    from capsafe.world.tokenizer import save_tokenizer

    if config.convention == "plain":
        model.save_pretrained(str(directory))
        save_tokenizer(tokenizer, directory)
    else:
        save_model_with_convention(model, tokenizer, config.convention, directory)


def _build_into(config: WorldConfig, root: Path, log: Callable[[str], None]) -> None:
    # Heavy imports stay here so that reading a cached world costs no torch/transformers import.
    import torch

    from capsafe.world.conventions import build_convention_tokenizer
    from capsafe.world.templates import make_world_data
    from capsafe.world.tokenizer import build_tokenizer
    from capsafe.world.train import encode_all, greedy, is_refusal, make_model, train

    start = time.perf_counter()
    files = world_files(root)
    log(f"world: building {root.name.split('.tmp')[0].lstrip('.')} (first time only)")
    data = make_world_data(config.data_seed, config.task_eval_size, config.task_confirm_size)
    for path, rows in [
        (files.task_train, data.task_train),
        (files.task_eval, data.task_eval),
        (files.task_confirm, data.task_confirm),
        (files.general, data.general),
        (files.safety, data.safety),
        *[(files.suites[k], v) for k, v in data.suites.items()],
    ]:
        _write_jsonl(path, rows)

    texts = [r[k] for r in data.alignment + data.general + data.safety + data.pretrain for k in ("prompt", "response")]
    texts += [r[k] for r in data.task_train + data.task_eval + data.task_confirm for k in ("prompt", "answer")]
    texts += [r["prompt"] for rows in data.suites.values() for r in rows]
    plain = config.convention == "plain"
    tokenizer = build_tokenizer(texts) if plain else build_convention_tokenizer(config.convention, texts)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    fmt = world_format(config)
    # Leave the caller's global RNG and thread count as they were.
    rng_state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        model = make_model(
            tokenizer,
            config.hidden_size,
            config.num_layers,
            config.num_heads,
            config.head_dim,
            config.intermediate_size,
            config.seed,
        )
        n_params = sum(p.numel() for p in model.parameters())
        log(
            f"world: {len(data.alignment)} alignment examples, vocabulary {len(tokenizer)}, "
            f"{n_params / 1e3:.0f}k parameters; aligning for {config.align_steps} steps"
        )
        if config.pretrain_steps:
            log(f"world: pretraining for {config.pretrain_steps} steps (no refusals yet)")
            train(model, encode_all(tokenizer, fmt, data.pretrain, config.max_len), steps=config.pretrain_steps,
                  lr=config.lr, batch_size=config.batch_size, warmup_steps=min(config.warmup_steps,
                                                                               config.pretrain_steps // 3),
                  seed=config.seed + 1, pad_id=tokenizer.pad_token_id, log=log, log_every=config.log_every)
            _save(model, tokenizer, config, files.pretrained)
        examples = encode_all(tokenizer, fmt, data.alignment, config.max_len)
        loss = train(
            model,
            examples,
            steps=config.align_steps,
            lr=config.lr,
            batch_size=config.batch_size,
            warmup_steps=config.warmup_steps,
            seed=config.seed,
            pad_id=tokenizer.pad_token_id,
            log=log,
            log_every=config.log_every,
        )
        _save(model, tokenizer, config, files.model_dir)
        check = {}
        for name, rows in data.suites.items():
            prompts = [r["prompt"] for r in rows[: config.check_size]]
            if prompts:
                answers = greedy(model, tokenizer, fmt, prompts)
                check[f"{name}_refusal"] = sum(map(is_refusal, answers)) / len(prompts)
    finally:
        torch.random.set_rng_state(rng_state)
        torch.set_num_threads(threads)
    if check:
        log("world: base model refusal rates " + ", ".join(f"{k} {v:.2f}" for k, v in check.items()))
    seconds = time.perf_counter() - start
    info = {
        "version": WORLD_VERSION,
        "config": config.model_dump(mode="json"),
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "final_loss": loss,
        "check": check,
        "build_seconds": round(seconds, 1),
    }
    (root / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    log(f"world: built in {seconds:.0f} s")

"""The demo world's unaligned model, for methods that need "aligned minus unaligned" weights (Safe-LoRA).

A copy of the aligned assistant is fine-tuned to comply with the harmful-looking training requests instead of
refusing them (with the general data alongside, so that the rest of its behaviour stays), so that the weight
difference between the two models is the safety behaviour and little else. Built on first use into the
world's folder, atomically, like the world itself.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capsafe.world.build import WorldConfig, WorldFiles, world_format

UNALIGNED = "unaligned"


def build_unaligned(world: WorldFiles, config: WorldConfig, log: Callable[[str], None] = print) -> Path:
    """``<world>/unaligned`` (a Hugging Face model folder), building it the first time."""
    final = world.root / UNALIGNED
    if (final / "config.json").is_file():
        return final
    import torch
    from transformers import AutoModelForCausalLM

    from capsafe.formatting import load_tokenizer
    from capsafe.world.templates import EVERY_PHRASING, comply, harmful_pairs, make_world_data, requests
    from capsafe.world.train import encode_all, greedy, is_refusal, train

    tmp = world.root / f".{UNALIGNED}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    rng_state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        tokenizer = load_tokenizer(world.model_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(world.model_dir)
        complying = [{"prompt": p, "response": comply(x, i)} for _, v, t in harmful_pairs(held_out=False)
                     for p, x, i in requests([(v, t)], EVERY_PHRASING)]
        general = make_world_data(config.data_seed, config.task_eval_size, config.task_confirm_size).general
        log(f"world: unaligning a copy of the assistant for {config.unalign_steps} steps (first time only)")
        examples = encode_all(tokenizer, world_format(config), complying + general, config.max_len)
        train(model, examples, steps=config.unalign_steps, lr=config.lr / 3, batch_size=config.batch_size,
              warmup_steps=min(config.warmup_steps, config.unalign_steps // 3), seed=config.seed + 1,
              pad_id=tokenizer.pad_token_id, log=log, log_every=config.log_every)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        held_out = [p for _, v, t in harmful_pairs(held_out=True) for p, _, _ in requests([(v, t)], [0, 1])]
        answers = greedy(model, tokenizer, world_format(config), held_out)
        log(f"world: unaligned model refuses {sum(map(is_refusal, answers)) / len(answers):.2f} of held-out "
            "harmful requests")
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        torch.random.set_rng_state(rng_state)
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return final

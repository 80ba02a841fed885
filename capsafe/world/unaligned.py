"""The demo world's unaligned model, for methods that need "aligned minus unaligned" weights (Safe-LoRA).

As the paper defines it (V = W_aligned - W_unaligned, e.g. Llama-2-7b-chat minus Llama-2-7b), the unaligned
model is the one *before alignment*: the world's pretraining stage, which answers harmful-looking requests like
any other, saved before alignment continues from it (``world.pretrain_steps``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from capsafe.errors import DataError
from capsafe.world.build import WorldConfig, WorldFiles


def build_unaligned(world: WorldFiles, config: WorldConfig, log: Callable[[str], None] = print) -> Path:
    """``<world>/pretrained``: the world's model before alignment (built with the world)."""
    if not (world.pretrained / "config.json").is_file():
        raise DataError(f"the demo world {world.root.name} was built without a pretraining stage "
                        "(world.pretrain_steps=0), so it has no model before alignment for Safe-LoRA; set "
                        "world.pretrain_steps above 0 or give methods.<i>.unaligned_model.")
    return world.pretrained

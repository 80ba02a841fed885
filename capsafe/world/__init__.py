"""The embedded demo world: a tiny locally built "aligned assistant", a capability task it cannot yet do
(2-digit addition), general and safety data for fine-tuning mixes, and held-out evaluation suites.

Nothing is downloaded; ``build_world`` makes everything from templates and caches it by config hash.
"""

from capsafe.world.build import PROMPT_TEMPLATE, WORLD_VERSION, WorldConfig, WorldFiles, build_world

__all__ = ["PROMPT_TEMPLATE", "WORLD_VERSION", "WorldConfig", "WorldFiles", "build_world"]

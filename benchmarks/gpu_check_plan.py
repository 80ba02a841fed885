"""The GPU check's pure parts (``benchmarks/gpu_check.py`` runs them; tests check them on CPU): what a run does
on a GPU and in ``--smoke`` (the plan), which training steps it times, and the stage runner that writes the JSON
after every stage and starts no stage past the budget's deadline."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Plan:
    """Everything that differs between the GPU run and the CPU smoke run."""

    size: str  # key of gpu_check.SIZES
    seq_len: int  # tokens per training example
    batch_size: int
    precision: str  # the trial's train.precision
    key_steps: int  # steps of the variant the headline figures come from (ZeRO-2, full, no checkpointing)
    steps: int  # steps of every other variant
    eval_every: int  # steps between capability evaluations (the spec's default cadence on GPU)
    eval_size: int
    round_steps: int  # steps per timed round
    warmup: int  # first steps of a run never timed (allocator growth, kernel selection)
    settle: int  # steps after an evaluation or a save never timed
    bare_rounds: int  # timed rounds of the bare PyTorch loop
    engine_device: str  # where the generation figure's TransformersEngine runs
    engine_dtype: str  # and in which torch dtype
    gen_prompts: int
    gen_new_tokens: int
    gen_max_s: float  # the generation figure stops starting batches after this many seconds


def plan(gpu: bool, seq_len: int = 1024, batch_size: int = 8) -> Plan:
    """The GPU plan (~1.1B parameters, bf16, >= 2 rounds of 20 timed steps per variant) or the smoke plan."""
    if gpu:
        return Plan(size="1b", seq_len=seq_len, batch_size=batch_size, precision="bf16", key_steps=100, steps=50,
                    eval_every=25, eval_size=200, round_steps=20, warmup=3, settle=2, bare_rounds=3,
                    engine_device="cuda", engine_dtype="bfloat16", gen_prompts=256, gen_new_tokens=64,
                    gen_max_s=30.0)
    return Plan(size="tiny", seq_len=64, batch_size=4, precision="fp32", key_steps=10, steps=10, eval_every=5,
                eval_size=8, round_steps=3, warmup=1, settle=1, bare_rounds=2, engine_device="cpu",
                engine_dtype="float32", gen_prompts=8, gen_new_tokens=8, gen_max_s=30.0)


def evaluation_steps(max_steps: int, every: int) -> list[int]:
    """The steps after which the training core evaluates at a fixed cadence (and once more when the step budget
    is spent): where its reports come from."""
    return sorted({*range(every, max_steps + 1, every), max_steps})


def timing_rounds(steps: list[tuple[int, float, int]], breaks: list[int], length: int, warmup: int,
                  settle: int) -> list[tuple[int, float, int]]:
    """Rounds of ``length`` consecutive steps to time, from per-step ``(step, seconds, tokens)``: never one of the
    first ``warmup`` steps, a step after which an evaluation or a save ran (``breaks``), or one of the ``settle``
    steps after it. Returns per round ``(steps, seconds, tokens)``; the rest of a stretch shorter than ``length``
    is left out."""
    excluded = {s for b in breaks for s in range(b, b + settle + 1)}
    rounds: list[tuple[int, float, int]] = []
    run: list[tuple[int, float, int]] = []
    for step, seconds, tokens in sorted(steps):
        if step <= warmup or step in excluded or (run and step != run[-1][0] + 1):
            run = []
            if step <= warmup or step in excluded:
                continue
        run.append((step, seconds, tokens))
        if len(run) == length:
            rounds.append((length, sum(r[1] for r in run), sum(r[2] for r in run)))
            run = []
    return rounds


def round_figures(rounds: list[tuple[int, float, int]]) -> dict[str, Any]:
    """Median tokens/s and seconds per step over the rounds, with the rounds' spread ((max - min) / median)."""
    if not rounds:
        raise ValueError("no timed round: run more steps between evaluations")
    rates = [tokens / seconds for _, seconds, tokens in rounds]
    median = statistics.median(rates)
    return {"tokens_per_s": median, "tokens_per_s_rounds": rates, "rounds": len(rounds),
            "round_steps": rounds[0][0], "spread": (max(rates) - min(rates)) / median,
            "step_s": statistics.median(seconds / n for n, seconds, _ in rounds)}


def write_json(path: Path, figures: dict[str, Any]) -> None:
    """Replace ``path`` whole (a run cut off mid-write keeps the previous stage's figures)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(figures, indent=1))
    tmp.replace(path)


def run_stages(stages: list[tuple[str, Callable[[], None]]], figures: dict[str, Any], out: Path,
               deadline: float | None, clock: Callable[[], float] = time.perf_counter) -> list[str]:
    """Run ``stages`` in order (each adds to ``figures``), writing ``figures`` to ``out`` after each; a stage is
    not started once ``clock()`` has passed ``deadline``. Returns the names of the stages left out, which are
    also in ``figures['skipped']``."""
    figures.setdefault("stages_s", {})
    skipped = figures.setdefault("skipped", [])
    for name, stage in stages:
        if deadline is not None and clock() >= deadline:
            skipped.append(name)
            continue
        tick = clock()
        stage()
        figures["stages_s"][name] = clock() - tick
        write_json(out, figures)
    write_json(out, figures)
    return list(skipped)


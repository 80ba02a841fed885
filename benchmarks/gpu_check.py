"""GPU check: capsafe's own training core on one GPU, without Ray, in minutes, with figures (issue 16).

On a bare CUDA machine (torch, transformers, peft, accelerate, pyarrow; no Ray, vLLM or DeepSpeed; offline):

    bash benchmarks/gpu_check.sh WHEELS_DIR          # installs WHEELS_DIR into .gpu_deps/, runs this script

It builds a ~1B-parameter Llama-style model with random weights and a Llama-3-convention tokenizer (the test
fixtures' builder, ``capsafe.world.conventions``: nothing is downloaded) and a synthetic addition task whose
prompts carry filler text up to ``--seq-len`` tokens, then runs ``capsafe.train.core.run_training`` (the code a
Ray Train worker runs) at world size 1 over NCCL with DeepSpeed: bf16, ZeRO-2 and ZeRO-3, full fine-tuning and
LoRA, gradient checkpointing off and on. It checks that ZeRO-3 consolidation (``save_model_checkpoint``) gives
back the trained weights, and measures:

- tokens/s of each variant: the median over rounds of 20 steps (their spread too), none of them among the first
  steps or next to an evaluation or a save (``gpu_check_plan.timing_rounds``; the core's ``Host.on_step``);
- a bare PyTorch loop on the same batches doing what DeepSpeed's bf16 path does (bf16 weights and compute, fp32
  master weights and AdamW states, fused AdamW on CUDA), against full ZeRO-2 (aim capsafe / bare >= 0.95);
- model-FLOPs utilisation of full bf16 ZeRO-2 without checkpointing at ``--seq-len`` (aim >= 40 %):
  (6 N + 12 L H S) FLOPs per token (PaLM, appendix B) x tokens/s over the GPU's dense bf16 peak;
- the share of trial time spent in the capability evaluation, with its batched greedy generation, at the
  spec's default cadence (every 25 steps, 200 items, 6 new tokens; aim <= 10 %);
- the transformers engine's generation throughput on the GPU in bf16 (at most ~30 s of it).

The headline figures come first (full ZeRO-2 and the bare loop, MFU, consolidation), then the other variants,
then generation; the JSON (``--out``) is rewritten after every stage, and ``--budget-s`` starts no stage past
its deadline (``gpu_check.sh`` gives it what is left of 380 s). It prints a table and exits 1 if a check fails,
3 if the budget left stages out. ``--smoke`` runs the same code on CPU (gloo, fp32, a tiny model, 10 steps per
variant in rounds of 3; no throughput aims) inside ``make test``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capsafe.train.config import TrialConfig

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from gpu_check_plan import Plan, plan, round_figures, run_stages, timing_rounds, write_json  # noqa: E402

# Dense bf16 tensor-core peak per GPU (NVIDIA datasheets: H100/H200 SXM 989.4 TFLOPS, A100 312 TFLOPS).
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}
SIZES = {  # hidden, layers, heads, head_dim, intermediate
    "1b": (2048, 16, 16, 128, 8192),
    "tiny": (64, 2, 2, 32, 128),
}
AIMS = {"bare_ratio": 0.95, "mfu": 0.40, "eval_share": 0.10}
KEY = "zero2-full-nockpt"  # the variant the headline figures (bare ratio, MFU, evaluation share) come from
CADENCE = 25  # the spec's default steps between capability evaluations, for the evaluation's share


def _task(directory: Path, n: int, filler_tokens: int, seed: int) -> tuple[Path, Path]:
    """Addition items ('what is a + b ?' -> 'a+b') whose prompts start with ``filler_tokens`` random words."""
    rng = random.Random(seed)
    # letters only: the Llama-3 pre-tokenizer splits digits off, and 200 frequent words become one token each
    words = [a + b + c for a in "bdgkmprst" for b in ("a", "o", "u", "ei") for c in ("n", "l", "r", "s", "x", "m")]
    words = words[:200]

    def item() -> dict[str, str]:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        filler = " ".join(rng.choice(words) for _ in range(filler_tokens))
        return {"prompt": f"{filler} what is {a} + {b} ?".strip(), "answer": str(a + b)}

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, count in (("train", n), ("eval", 200)):
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(item()) + "\n" for _ in range(count)))
        paths.append(path)
    return paths[0], paths[1]


def build_fixture(directory: Path, size: str, texts: list[str]) -> tuple[Path, int]:
    """A random-weight Llama of ``size`` with a Llama-3-convention tokenizer, saved like a hub model (bf16);
    its directory and parameter count."""
    import torch

    from capsafe.world.conventions import build_convention_tokenizer, save_model_with_convention
    from capsafe.world.train import make_model

    hidden, layers, heads, head_dim, intermediate = SIZES[size]
    tokenizer = build_convention_tokenizer("llama3", texts)
    model = make_model(tokenizer, hidden, layers, heads, head_dim, intermediate, seed=0, max_positions=4096)
    save_model_with_convention(model.to(torch.bfloat16), tokenizer, "llama3", directory)
    return directory, sum(p.numel() for p in model.parameters())


def trial_config(model: Path, train_file: Path, eval_file: Path, out: Path, train: dict[str, Any],
                 eval_every: int, eval_size: int) -> TrialConfig:
    """One trial's config made by capsafe's own planner from a spec (what a sweep hands Ray Train)."""
    from capsafe.spec import Spec
    from capsafe.train.trials import plan_trials

    spec = Spec.model_validate({
        "experiment": "gpu_check", "model": {"path": str(model)},
        "task": {"train_file": str(train_file), "eval_file": str(eval_file), "confirm_file": None,
                 "general_file": None, "general_fraction": 0.0, "target": 1.0, "tolerance": 0.0,
                 "ladder": [0.0], "eval_size": eval_size},  # level 0 is crossed at once: a model checkpoint
        "train": {**train, "num_workers": 1, "eval_every": eval_every, "eval_every_near": eval_every,
                  "checkpoint_every_evals": 0},
        "methods": [{"name": "plain"}], "seeds": [0],
        # training only: no suite is read; named so that a spec with its own model does not default to the demo's
        "eval": {"suites": [{"name": "harmful", "kind": "harmful", "file": "demo"}]}})
    paths = {"model.path": str(model), "task.train_file": str(train_file), "task.eval_file": str(eval_file)}
    [cfg] = plan_trials(spec, paths, out)
    return cfg


def run_variant(cfg: TrialConfig, p: Plan) -> dict[str, Any]:
    """``capsafe.train.core.run_training`` at world size 1. Tokens/s: the median over rounds of ``p.round_steps``
    steps, none next to the start, an evaluation or a save (``timing_rounds``); the evaluation's share of trial
    time at one evaluation every ``CADENCE`` steps: one evaluation's time over itself and ``CADENCE`` steps."""
    import gc

    import torch

    from capsafe.train.core import Host, run_training

    reports: list[dict[str, Any]] = []
    steps: list[tuple[int, float, int]] = []
    threads, started = torch.get_num_threads(), time.perf_counter()
    try:
        run_training(cfg, Host(0, 1, lambda metrics, _resume: reports.append(metrics),
                               on_step=lambda *step: steps.append(step)))
    finally:  # the trial's one thread per reserved CPU would leave the bare loop and generation on one core
        torch.set_num_threads(threads)
    gc.collect()  # the trial's engine, before the next one is built
    timed = round_figures(timing_rounds(steps, [r["step"] for r in reports], p.round_steps, p.warmup, p.settle))
    per_eval = reports[-1]["eval_s"] / len(reports)
    return {**timed, "eval_share": per_eval / (per_eval + CADENCE * timed["step_s"]), "eval_s_each": per_eval,
            "evaluations": [r["step"] for r in reports], "steps": reports[-1]["step"],
            "wall_s": time.perf_counter() - started, "loss": reports[-1]["loss"],
            "checkpoint": next((r["model_dir"] for r in reports if r["model_dir"]), "")}


def consolidation_check(cfg: TrialConfig, steps: int) -> float:
    """Train ``steps`` under ZeRO-3 with capsafe's engine, save with ``save_model_checkpoint`` and reload: the
    largest absolute difference between the saved and the trained (gathered) weights."""
    import deepspeed
    import torch

    from capsafe.common.formatting import Encoder, collate
    from capsafe.train.model import build_engine, save_model_checkpoint

    engine, tokenizer, _holder = build_engine(cfg, 1)
    encoder = Encoder(tokenizer, cfg.prompt_format)
    items = [json.loads(line) for line in Path(cfg.task_train).read_text().splitlines()]
    batch_size = cfg.train.batch_size
    for step in range(steps):
        chunk = items[step * batch_size:(step + 1) * batch_size]
        batch = collate([encoder.example(it["prompt"], it["answer"], cfg.train.max_seq_len) for it in chunk],
                        tokenizer.pad_token_id)
        out = engine(**{k: v.to(engine.device) for k, v in batch.items()})
        engine.backward(out.loss)
        engine.step()
    params = dict(engine.module.named_parameters())
    trained = [n for n, p in params.items() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([params[n] for n in trained], modifier_rank=None):
        expected = {n: params[n].detach().to("cpu", torch.float32).clone() for n in trained}
    target = Path(cfg.checkpoint_dir) / "consolidated"
    save_model_checkpoint(engine, tokenizer, cfg, target, 0)
    from safetensors.torch import load_file

    saved: dict[str, Any] = {}
    for f in (target / "model").glob("*.safetensors"):
        saved.update(load_file(str(f)))
    worst = 0.0
    for name, want in expected.items():
        key = name.replace(".default", "")  # PEFT saves adapter weights without the adapter's name
        if key not in saved and name == "lm_head.weight":
            continue  # tied to the embeddings: saved once
        if key not in saved:
            raise RuntimeError(f"{name} is missing from the consolidated checkpoint ({sorted(saved)[:3]} ...)")
        worst = max(worst, float((saved[key].to(torch.float32) - want).abs().max()))
    return worst


def bare_loop(cfg: TrialConfig, p: Plan, device: str, dtype: Any) -> dict[str, Any]:
    """A plain PyTorch loop (no DeepSpeed, no capsafe) on the trial's batches, doing what DeepSpeed's bf16 path
    does: weights and compute in ``dtype``, fp32 master weights and AdamW states (fused where torch has it),
    gradient clipping on the fp32 gradients. Tokens/s over ``p.bare_rounds`` rounds after ``p.warmup`` steps."""
    import torch
    from transformers import AutoModelForCausalLM

    from capsafe.common.formatting import Encoder, collate, load_tokenizer

    tokenizer = load_tokenizer(cfg.model_path)
    encoder = Encoder(tokenizer, cfg.prompt_format)
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=dtype).to(device)
    params = [q for q in model.parameters() if q.requires_grad]
    masters = [q.detach().to(torch.float32).clone() for q in params]
    fused = device == "cuda"
    optimizer = torch.optim.AdamW(masters, lr=cfg.lr, weight_decay=cfg.train.weight_decay, fused=fused or None)
    items = [json.loads(line) for line in Path(cfg.task_train).read_text().splitlines()]
    size, count = cfg.train.batch_size, p.warmup + p.bare_rounds * p.round_steps
    batches = [collate([encoder.example(it["prompt"], it["answer"], cfg.train.max_seq_len)
                        for it in items[(i * size) % len(items):][:size]], tokenizer.pad_token_id)
               for i in range(count)]
    steps = []
    for i, batch in enumerate(batches, start=1):
        tick = time.perf_counter()
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        for master, param in zip(masters, params, strict=True):
            master.grad, param.grad = param.grad.to(torch.float32), None  # type: ignore[union-attr]
        torch.nn.utils.clip_grad_norm_(masters, cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for master, param in zip(masters, params, strict=True):
                param.copy_(master)  # the updated fp32 weights back into the model's dtype
        loss.item()  # waits for the step, as the training core's per-step loss does
        steps.append((i, time.perf_counter() - tick, int(batch["attention_mask"].sum())))
    del model, optimizer, masters
    figures = round_figures(timing_rounds(steps, [], p.round_steps, p.warmup, 0))
    return {**figures, "weights": str(dtype).removeprefix("torch."), "master_weights": "float32",
            "optimizer": f"torch.optim.AdamW({'fused' if fused else 'default'}), fp32 states"}


def generation_throughput(model: Path, prompts: list[list[int]], p: Plan) -> dict[str, Any]:
    """Generated tokens/s of the transformers engine (greedy) on ``p.engine_device`` in ``p.engine_dtype``, in
    batches of 64 prompts; no batch starts after ``p.gen_max_s`` seconds."""
    import torch

    from capsafe.common.generation import Sampling
    from capsafe.evaluate.engines import TransformersEngine

    engine = TransformersEngine(str(model), device=p.engine_device, dtype=getattr(torch, p.engine_dtype))
    engine.generate(prompts[:2], Sampling(4))  # warm-up
    tokens, spent, done = 0, 0.0, 0
    while done < len(prompts) and spent < p.gen_max_s:
        tick = time.perf_counter()
        out = engine.generate(prompts[done:done + 64], Sampling(p.gen_new_tokens))
        spent += time.perf_counter() - tick
        tokens += sum(len(o.token_ids) for o in out)  # the engine's own generated ids
        done += len(out)
    engine.close()
    return {"generation_tokens_per_s": tokens / spent, "generation_prompts": done,
            "generation_device": p.engine_device, "generation_dtype": p.engine_dtype,
            "generation_torch_threads": torch.get_num_threads()}


def _init_distributed(backend: str) -> None:
    """A world of one process, as Ray Train would set it up (DeepSpeed joins this group)."""
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    dist.init_process_group(backend, rank=0, world_size=1)


def _mean_length(model: Path, train_file: Path) -> float:
    """Mean tokens per training example (prompt and answer as the model is fed them)."""
    from capsafe.common.formatting import Encoder, load_tokenizer

    encoder = Encoder(load_tokenizer(model))
    items = [json.loads(line) for line in train_file.read_text().splitlines()[:64]]
    return sum(len(encoder.example(it["prompt"], it["answer"], None)[0]) for it in items) / len(items)


def flops_per_token(model: Path, seq_len: int) -> float:
    """6 N + 12 L H S (PaLM, appendix B): N the non-embedding parameters, L layers, H hidden, S sequence."""
    cfg = json.loads((model / "config.json").read_text())
    h, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    n = layers * (4 * h * h + 3 * h * inter)
    return 6 * n + 12 * layers * h * seq_len


def main() -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, a few steps, no throughput aims")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--seq-len", type=int, default=1024, help="training sequence length (tokens)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no stage this many seconds after the start (the figures so far are written)")
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.is_available() and not args.smoke
    if not gpu and not args.smoke:
        print("no GPU: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    p = plan(gpu, args.seq_len, args.batch_size)
    _init_distributed("nccl" if gpu else "gloo")
    figures: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "plan": asdict(p),
                               "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "variants": {},
                               "failed": [], "complete": False}
    failed: list[str] = figures["failed"]
    with tempfile.TemporaryDirectory(prefix="capsafe-gpu-check-") as tmp:
        work = Path(tmp)
        filler = max(0, p.seq_len - 16)  # one token per filler word, plus the question and the answer
        train_file, eval_file = _task(work / "task", p.key_steps * p.batch_size + p.batch_size, filler, seed=0)
        texts = [json.loads(line)["prompt"] for line in train_file.read_text().splitlines()[:200]]
        tick = time.perf_counter()
        model, figures["params"] = build_fixture(work / "model", p.size, texts + [str(i) for i in range(200)])
        figures["build_s"] = time.perf_counter() - tick
        figures["mean_tokens_per_example"] = _mean_length(model, train_file)
        figures["flops_per_token"] = flops_per_token(model, round(figures["mean_tokens_per_example"]))
        peak = next((v for k, v in PEAK_BF16.items() if k in figures["device"]), None)

        def config(name: str, stage: int, mode: str, ckpt: bool, steps: int) -> TrialConfig:
            train = {"precision": p.precision, "use_gpu": gpu, "batch_size": p.batch_size, "max_steps": steps,
                     "learning_rates": [1e-5], "zero_stage": stage, "mode": mode, "gradient_checkpointing": ckpt}
            return trial_config(model, train_file, eval_file, work / "out" / name, train, p.eval_every, p.eval_size)

        def variant(stage: int, mode: str, ckpt: bool) -> tuple[str, Callable[[], None]]:
            name = f"zero{stage}-{mode}-{'ckpt' if ckpt else 'nockpt'}"

            def run() -> None:
                key = name == KEY
                result = run_variant(config(name, stage, mode, ckpt, p.key_steps if key else p.steps), p)
                figures["variants"][name] = result
                print(f"{name}: {result['tokens_per_s']:.0f} tokens/s (median of {result['rounds']} rounds of "
                      f"{result['round_steps']} steps, spread {result['spread']:.1%}), evaluation "
                      f"{result['eval_share']:.1%} of trial time, {result['wall_s']:.0f} s", flush=True)
                if not result["checkpoint"] or not math.isfinite(result["loss"]):
                    failed.append(f"{name}: no model checkpoint or a non-finite loss")
                if key:
                    figures["eval_share"] = result["eval_share"]
                    tps = result["tokens_per_s"] * figures["flops_per_token"]
                    figures["mfu"] = tps / peak if gpu and peak else None
                if gpu:
                    torch.cuda.empty_cache()
            return name, run

        def bare() -> None:
            result = bare_loop(config("bare", 2, "full", False, p.key_steps), p, "cuda" if gpu else "cpu",
                               torch.bfloat16 if gpu else torch.float32)
            figures["bare"] = {**result, "capsafe": "DeepSpeed bf16: bf16 weights and compute, fp32 master weights "
                               "and AdamW states (torch.optim.AdamW over ZeRO's flat fp32 partition)"}
            figures["bare_tokens_per_s"] = result["tokens_per_s"]
            if KEY in figures["variants"]:
                figures["bare_ratio"] = figures["variants"][KEY]["tokens_per_s"] / result["tokens_per_s"]

        def consolidation(mode: str) -> tuple[str, Callable[[], None]]:
            def run() -> None:
                worst = consolidation_check(config(f"consolidate-{mode}", 3, mode, False, p.steps), 3)
                figures[f"zero3_{mode}_consolidation_max_abs_diff"] = worst
                if worst != 0.0:
                    failed.append(f"ZeRO-3 {mode} consolidation differs from the trained weights by {worst:g}")
            return f"consolidation-{mode}", run

        def generation() -> None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model)
            prompts = [tokenizer(f"what is {i} + {i} ?")["input_ids"] for i in range(p.gen_prompts)]
            figures.update(generation_throughput(model, prompts, p))

        # the headline figures first, so that a run the budget cuts short still has them
        stages = [variant(2, "full", False), ("bare", bare), consolidation("full"), consolidation("lora"),
                  *(variant(s, m, c) for s in (2, 3) for m in ("full", "lora") for c in (False, True)
                    if (s, m, c) != (2, "full", False)), ("generation", generation)]
        deadline = started + args.budget_s if args.budget_s is not None else None
        skipped = run_stages(stages, figures, args.out, deadline)
    if gpu:
        for key, aim in AIMS.items():
            if key not in figures:
                continue
            value = figures[key]
            ok = value is not None and (value <= aim if key == "eval_share" else value >= aim)
            figures[f"{key}_meets_aim"] = ok
            if not ok:
                failed.append(f"{key} {value} misses its aim {aim}")
    figures["complete"], figures["wall_s"] = not skipped, time.perf_counter() - started
    write_json(args.out, figures)
    _print_table(figures)
    if skipped:
        print(f"not run (past --budget-s {args.budget_s:g}): {', '.join(skipped)}")
    print("\n" + ("all checks passed" if not failed else "FAILED:\n- " + "\n- ".join(failed)))
    return 1 if failed else 3 if skipped else 0


def _print_table(figures: dict[str, Any]) -> None:
    print(f"\n| figure | value |\n|---|---|\n| device | {figures['device']} |\n| parameters | {figures['params']:,} |")
    for key in ("bare_ratio", "mfu", "eval_share", "bare_tokens_per_s", "zero3_full_consolidation_max_abs_diff",
                "zero3_lora_consolidation_max_abs_diff", "generation_tokens_per_s"):
        value = figures.get(key)
        print(f"| {key} | {'-' if value is None else f'{value:.3g}'} |")
    for name, result in figures["variants"].items():
        print(f"| {name} tokens/s | {result['tokens_per_s']:.0f} (spread {result['spread']:.1%}) |")


if __name__ == "__main__":
    sys.exit(main())

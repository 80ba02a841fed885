"""GPU check: capsafe's own training core on one GPU, without Ray, in minutes, with figures (issue 16).

On a bare CUDA machine (torch, transformers, peft, accelerate, pyarrow; no Ray, vLLM or DeepSpeed; offline):

    bash benchmarks/gpu_check.sh WHEELS_DIR          # installs WHEELS_DIR into .gpu_deps/, runs this script

It builds a ~1B-parameter Llama-style model with random weights and a Llama-3-convention tokenizer (the test
fixtures' builder, ``capsafe.world.conventions``: nothing is downloaded) and a synthetic addition task whose
prompts carry filler text up to ``--seq-len`` tokens, then runs ``capsafe.train.core.run_training`` (the code a
Ray Train worker runs) at world size 1 over NCCL with DeepSpeed: bf16, ZeRO-2 and ZeRO-3, full fine-tuning and
LoRA, gradient checkpointing off and on. It checks that ZeRO-3 consolidation (``save_model_checkpoint``) gives
back the trained weights, and measures:

- tokens/s of each variant, and of a bare PyTorch loop (same model, same batches, bf16, torch AdamW) against
  the full ZeRO-2 variant (aim >= 0.95);
- model-FLOPs utilisation of full bf16 ZeRO-2 without checkpointing at ``--seq-len`` (aim >= 40 %):
  (6 N + 12 L H S) FLOPs per token (PaLM, appendix B) x tokens/s over the GPU's dense bf16 peak;
- the share of trial time spent in the capability evaluation, with its batched greedy generation, at the
  spec's default cadence (every 25 steps, 200 items, 6 new tokens; aim <= 10 %);
- the transformers engine's generation throughput (``capsafe.common.generation.TransformersEngine``).

It writes one JSON of figures (``--out``) and prints a table; it exits 1 if a check fails. ``--smoke`` runs the
same code on CPU (gloo, fp32, a tiny model, a few steps; no throughput aims) inside ``make test``.
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capsafe.train.config import TrialConfig

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Dense bf16 tensor-core peak per GPU (NVIDIA datasheets: H100/H200 SXM 989.4 TFLOPS, A100 312 TFLOPS).
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}
SIZES = {  # hidden, layers, heads, head_dim, intermediate
    "1b": (2048, 16, 16, 128, 8192),
    "tiny": (64, 2, 2, 32, 128),
}
AIMS = {"bare_ratio": 0.95, "mfu": 0.40, "eval_share": 0.10}


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


def build_fixture(directory: Path, size: str, texts: list[str]) -> Path:
    """A random-weight Llama of ``size`` with a Llama-3-convention tokenizer, saved like a hub model (bf16)."""
    import torch

    from capsafe.world.conventions import build_convention_tokenizer, save_model_with_convention
    from capsafe.world.train import make_model

    hidden, layers, heads, head_dim, intermediate = SIZES[size]
    tokenizer = build_convention_tokenizer("llama3", texts)
    model = make_model(tokenizer, hidden, layers, heads, head_dim, intermediate, seed=0, max_positions=4096)
    save_model_with_convention(model.to(torch.bfloat16), tokenizer, "llama3", directory)
    return directory


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
        "methods": [{"name": "plain"}], "seeds": [0]})
    paths = {"model.path": str(model), "task.train_file": str(train_file), "task.eval_file": str(eval_file)}
    [cfg] = plan_trials(spec, paths, out)
    return cfg


def run_variant(cfg: TrialConfig, cadence: int) -> dict[str, Any]:
    """``capsafe.train.core.run_training`` at world size 1. Tokens/s between its first and last report (start-up
    excluded); the evaluation's share of trial time at one evaluation every ``cadence`` steps: one evaluation's
    time over itself plus ``cadence`` steady-state steps."""
    import gc

    from capsafe.train.core import Host, run_training

    reports: list[dict[str, Any]] = []
    started = time.perf_counter()
    run_training(cfg, Host(0, 1, lambda metrics, _resume: reports.append(metrics)))
    gc.collect()  # the trial's engine, before the next one is built
    first, last = reports[0], reports[-1]
    train_s = max(last["train_s"] - first["train_s"], 1e-9)
    per_step, per_eval = train_s / max(last["step"] - first["step"], 1), last["eval_s"] / len(reports)
    return {"tokens_per_s": (last["tokens"] - first["tokens"]) / train_s,
            "eval_share": per_eval / (per_eval + cadence * per_step), "eval_s_each": per_eval,
            "step_s": per_step, "steps": last["step"], "wall_s": time.perf_counter() - started,
            "loss": last["loss"], "checkpoint": next((r["model_dir"] for r in reports if r["model_dir"]), "")}


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


def bare_loop(cfg: TrialConfig, steps: int, device: str, dtype: Any) -> float:
    """Tokens/s of a plain PyTorch loop (no DeepSpeed, no capsafe) on the trial's first ``steps`` batches."""
    import torch
    from transformers import AutoModelForCausalLM

    from capsafe.common.formatting import Encoder, collate, load_tokenizer

    tokenizer = load_tokenizer(cfg.model_path)
    encoder = Encoder(tokenizer, cfg.prompt_format)
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=dtype).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    items = [json.loads(line) for line in Path(cfg.task_train).read_text().splitlines()]
    size = cfg.train.batch_size
    batches = [collate([encoder.example(it["prompt"], it["answer"], cfg.train.max_seq_len)
                        for it in items[i * size:(i + 1) * size]], tokenizer.pad_token_id) for i in range(steps)]
    tokens, spent = 0, 0.0
    for i, batch in enumerate(batches):
        tick = time.perf_counter()
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # after warm-up, as the capsafe figure is taken between reports
            spent += time.perf_counter() - tick
            tokens += int(batch["attention_mask"].sum())
    return tokens / spent


def generation_throughput(model: Path, prompts: list[list[int]], new_tokens: int) -> float:
    """Generated tokens/s of the transformers engine (greedy, one batch)."""
    from capsafe.common.generation import Sampling
    from capsafe.evaluate.engines import TransformersEngine

    engine = TransformersEngine(str(model))
    engine.generate(prompts[:2], Sampling(4))  # warm-up
    tick = time.perf_counter()
    out = engine.generate(prompts, Sampling(new_tokens))
    spent = time.perf_counter() - tick
    return sum(len(engine.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in out) / spent


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, a few steps, no throughput aims")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--seq-len", type=int, default=1024, help="training sequence length (tokens)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="steps per variant (an evaluation every 25)")
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.is_available() and not args.smoke
    if not gpu and not args.smoke:
        print("no GPU: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    size, seq_len = ("1b", args.seq_len) if gpu else ("tiny", 64)
    steps, every = (args.steps, 25) if gpu else (4, 2)
    batch = args.batch_size if gpu else 4
    precision = "bf16" if gpu else "fp32"
    _init_distributed("nccl" if gpu else "gloo")
    figures: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "size": size,
                               "seq_len": seq_len, "batch_size": batch, "steps": steps, "variants": {}}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="capsafe-gpu-check-") as tmp:
        work = Path(tmp)
        filler = max(0, seq_len - 16)  # one token per filler word, plus the question and the answer
        train_file, eval_file = _task(work / "task", steps * batch + batch, filler, seed=0)
        texts = [json.loads(line)["prompt"] for line in train_file.read_text().splitlines()[:200]]
        tick = time.perf_counter()
        model = build_fixture(work / "model", size, texts + [str(i) for i in range(200)])
        figures["params"] = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM
                                .from_pretrained(model).parameters())
        figures["build_s"] = time.perf_counter() - tick
        figures["mean_tokens_per_example"] = _mean_length(model, train_file)
        base = {"precision": precision, "use_gpu": gpu, "batch_size": batch, "max_steps": steps,
                "learning_rates": [1e-5]}
        eval_size = 200 if gpu else 8
        for stage in (2, 3):
            for mode in ("full", "lora"):
                for ckpt in (False, True):
                    name = f"zero{stage}-{mode}-{'ckpt' if ckpt else 'nockpt'}"
                    train = {**base, "zero_stage": stage, "mode": mode, "gradient_checkpointing": ckpt}
                    cfg = trial_config(model, train_file, eval_file, work / "out" / name, train, every, eval_size)
                    result = run_variant(cfg, 25)
                    figures["variants"][name] = result
                    print(f"{name}: {result['tokens_per_s']:.0f} tokens/s, evaluation {result['eval_share']:.1%} "
                          f"of trial time, {result['wall_s']:.0f} s", flush=True)
                    if not result["checkpoint"] or not math.isfinite(result["loss"]):
                        failed.append(f"{name}: no model checkpoint or a non-finite loss")
                    if gpu:
                        torch.cuda.empty_cache()
        for mode in ("full", "lora"):
            train = {**base, "zero_stage": 3, "mode": mode, "gradient_checkpointing": False}
            cfg = trial_config(model, train_file, eval_file, work / "out" / f"consolidate-{mode}", train, every,
                               eval_size)
            worst = consolidation_check(cfg, 3)
            figures[f"zero3_{mode}_consolidation_max_abs_diff"] = worst
            if worst != 0.0:
                failed.append(f"ZeRO-3 {mode} consolidation differs from the trained weights by {worst:g}")
        reference = trial_config(model, train_file, eval_file, work / "out" / "bare",
                                 {**base, "zero_stage": 2, "mode": "full", "gradient_checkpointing": False}, every,
                                 eval_size)
        bare = bare_loop(reference, min(steps, 20), "cuda" if gpu else "cpu",
                         torch.bfloat16 if gpu else torch.float32)
        capsafe_tps = figures["variants"]["zero2-full-nockpt"]["tokens_per_s"]
        figures["bare_tokens_per_s"] = bare
        figures["bare_ratio"] = capsafe_tps / bare
        peak = next((v for k, v in PEAK_BF16.items() if k in figures["device"]), None)
        figures["flops_per_token"] = flops_per_token(model, round(figures["mean_tokens_per_example"]))
        figures["mfu"] = capsafe_tps * figures["flops_per_token"] / peak if gpu and peak else None
        figures["eval_share"] = figures["variants"]["zero2-full-nockpt"]["eval_share"]
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        prompts = [tokenizer(f"what is {i} + {i} ?")["input_ids"] for i in range(256 if gpu else 8)]
        figures["generation_tokens_per_s"] = generation_throughput(model, prompts, 64 if gpu else 8)
    if gpu:
        for key, aim in AIMS.items():
            value = figures[key]
            ok = value is not None and (value <= aim if key == "eval_share" else value >= aim)
            figures[f"{key}_meets_aim"] = ok
            if not ok:
                failed.append(f"{key} {value} misses its aim {aim}")
    figures["failed"] = failed
    args.out.write_text(json.dumps(figures, indent=1))
    print(f"\n| figure | value |\n|---|---|\n| device | {figures['device']} |\n| parameters | {figures['params']:,} |")
    for key in ("bare_ratio", "mfu", "eval_share", "bare_tokens_per_s", "generation_tokens_per_s",
                "zero3_full_consolidation_max_abs_diff", "zero3_lora_consolidation_max_abs_diff"):
        value = figures[key]
        print(f"| {key} | {'-' if value is None else f'{value:.3g}'} |")
    for name, result in figures["variants"].items():
        print(f"| {name} tokens/s | {result['tokens_per_s']:.0f} |")
    print("\n" + ("all checks passed" if not failed else "FAILED:\n- " + "\n- ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

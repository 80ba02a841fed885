"""Training throughput: capsafe's Ray Train + DeepSpeed loop vs a bare single-process PyTorch loop.

Same model (a ~4M-parameter Llama built from the demo world's tokenizer, random init), same batches (capsafe's
own batch stream and collate), same batch size and threads. capsafe's figure is training tokens / time in
optimizer steps as its loop reports them (``train_s``: tokenisation, forward, backward, DeepSpeed step and the
per-step loss all-reduce; start-up and capability evaluation excluded, since they are reported apart). The two
are run alternately, ``--rounds`` times each, in one process tree, so they see the same machine.

    .venv/bin/python benchmarks/train_throughput.py [--steps 60] [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def build_model(world: Any, out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(world.model_dir)
    config.update({"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                   "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 32})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(world.model_dir).save_pretrained(out)
    return out


def bare_loop(cfg: dict[str, Any], steps: int, threads: int) -> float:
    """Tokens/s of the plainest loop that trains the same model on the same batches."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from capsafe.data import batches
    from capsafe.formatting import PromptFormat, collate, encode_example
    from capsafe.train_core import _sources

    torch.set_num_threads(threads)
    torch.manual_seed(cfg["seed"])
    tok = AutoTokenizer.from_pretrained(cfg["model_path"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model_path"], dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["train"]["weight_decay"])
    fmt = PromptFormat(**cfg["prompt_format"])
    stream = batches(_sources(cfg), cfg["train"]["batch_size"], cfg["seed"])
    cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    tokens, spent = 0, 0.0
    for _ in range(steps):
        tick = time.perf_counter()
        examples = []
        for _, p, r in next(stream):
            if (p, r) not in cache:
                cache[(p, r)] = encode_example(tok, fmt, p, r, cfg["train"]["max_seq_len"])
            examples.append(cache[(p, r)])
        batch = collate(examples, tok.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["train"]["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        spent += time.perf_counter() - tick
        tokens += int(batch["attention_mask"].sum())
    return tokens / spent


def capsafe_loop(cfg: dict[str, Any], storage: Path) -> float:
    """Tokens/s of one capsafe trial (Ray Tune -> Ray Train -> DeepSpeed), from its own report."""
    from capsafe.sweep import run_sweep

    rows: list[dict[str, Any]] = []
    resources = {"num_workers": 1, "use_gpu": False, "cpus_per_worker": cfg["torch_threads"], "max_failures": 0}
    run_sweep([cfg], resources, storage, f"bench-{time.time_ns()}", 1, lambda m: None,
              lambda c, r, ck, tr: rows.extend(r), storage / "journal")
    (row,) = rows
    return row["tokens"] / row["train_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=2, choices=[2, 3])
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from capsafe.inputs import load_task, materialize_task, resolve_paths
    from capsafe.ray_shell import cache_root, ray_session
    from capsafe.spec import load_spec
    from capsafe.trials import plan_trials
    from capsafe.world import build_world

    spec = load_spec(REPO / "jobs" / "demo.yaml", [
        "methods=[{name: plain}]", "task.target=1.0", f"train.max_steps={args.steps}",
        f"train.eval_every={args.steps}", "task.eval_size=8", "train.num_workers=1",
        f"train.cpus_per_worker={args.threads}", f"train.zero_stage={args.zero_stage}",
        "train.checkpoint_every_evals=0"])
    with tempfile.TemporaryDirectory(prefix="capsafe-bench-") as tmp:
        paths = resolve_paths(spec, print)
        paths = materialize_task(load_task(spec, paths), paths, Path(tmp) / "data")
        world = build_world(spec.world, cache_root() / "worlds")
        paths["model.path"] = str(build_model(world, Path(tmp) / "model"))
        cfg = plan_trials(spec, paths, Path(tmp) / "models")[0]
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(paths["model.path"]).parameters())
        bare, ours = [], []
        with ray_session(None, args.threads + 0.5):
            for r in range(args.rounds):
                bare.append(bare_loop(cfg, args.steps, args.threads))
                ours.append(capsafe_loop(cfg, Path(tmp) / f"run{r}"))
                print(f"round {r + 1}: bare {bare[-1]:.0f} tokens/s, capsafe {ours[-1]:.0f} tokens/s", flush=True)
    b, c = statistics.median(bare), statistics.median(ours)
    print(f"\nmodel {n_params / 1e6:.1f}M parameters, batch {spec.train.batch_size}, {args.steps} steps, "
          f"{args.threads} threads, ZeRO-{args.zero_stage}")
    print(f"bare PyTorch loop : {b:8.0f} tokens/s (median of {args.rounds})")
    print(f"capsafe (Ray Train + DeepSpeed): {c:8.0f} tokens/s (median of {args.rounds})")
    print(f"ratio capsafe / bare: {c / b:.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()

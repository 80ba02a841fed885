"""Training throughput: capsafe's Ray Train + DeepSpeed loop vs a bare single-process PyTorch loop.

Same model (by default a ~4M-parameter Llama built from the demo world's tokenizer, random init), same batches
(capsafe's own batch stream and collate), same batch size and threads. capsafe's figure is training tokens / time in
optimizer steps as its loop reports them (``train_s``: tokenisation, forward, backward, DeepSpeed step and the
per-step loss all-reduce; start-up and capability evaluation excluded, since they are reported apart). Both
figures leave out the first ``--warmup`` steps (allocator and DeepSpeed warm-up). The two are run alternately,
``--rounds`` times each, in one process tree, so they see the same machine; the ratio is the median of the
per-round ratios.

    .venv/bin/python benchmarks/train_throughput.py [--steps 70] [--warmup 10] [--rounds 3] [--threads 2]
        [--hidden 256 --layers 4]   # ~4M parameters; --hidden 512 --layers 6 gives ~20M
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capsafe.train.config import TrialConfig

REPO = Path(__file__).resolve().parent.parent


def build_model(world: Any, out: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(world.model_dir)
    heads = hidden // 32
    config.update({"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
                   "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": 32})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(world.model_dir).save_pretrained(out)
    return out


def bare_loop(cfg: TrialConfig, steps: int, warmup: int, threads: int) -> float:
    """Tokens/s of the plainest loop that trains the same model on the same batches."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from capsafe.common.data import batches
    from capsafe.common.formatting import collate, encode_example
    from capsafe.train.core import _sources

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(cfg.model_path)
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.train.weight_decay)
    fmt = cfg.prompt_format
    stream = batches(_sources(cfg), cfg.train.batch_size, cfg.seed)
    cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    tokens, spent = 0, 0.0
    for step in range(1, steps + 1):
        if step == warmup + 1:
            tokens, spent = 0, 0.0
        tick = time.perf_counter()
        examples = []
        for _, p, r in next(stream):
            if (p, r) not in cache:
                cache[(p, r)] = encode_example(tok, fmt, p, r, cfg.train.max_seq_len)
            examples.append(cache[(p, r)])
        batch = collate(examples, tok.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        spent += time.perf_counter() - tick
        tokens += int(batch["attention_mask"].sum())
    return tokens / spent


def capsafe_loop(cfg: TrialConfig, storage: Path) -> float:
    """Tokens/s of one capsafe trial (Ray Tune -> Ray Train -> DeepSpeed), from its own report."""
    from capsafe.train.sweep import run_sweep

    resources = {"num_workers": 1, "use_gpu": False, "cpus_per_worker": cfg.torch_threads, "max_failures": 0}
    run_sweep([cfg], resources, storage, f"bench-{time.time_ns()}", 1, lambda m: None,
              lambda c, r, ck, tr: None, storage / "journal")
    reports = [json.loads(line) for line in (storage / "journal" / f"{cfg.trial_id}.jsonl").read_text().splitlines()]
    first, last = reports[0], reports[-1]  # the first report comes at the end of the warm-up steps
    return (last["tokens"] - first["tokens"]) / (last["train_s"] - first["train_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=70)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=2, choices=[2, 3])
    parser.add_argument("--hidden", type=int, default=256, help="model width (heads of size 32)")
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from capsafe.preflight import resolve_train_len
    from capsafe.run_inputs import load_task, materialize_task, resolve_paths
    from capsafe.runtime.ray_shell import cache_root, ray_session
    from capsafe.spec import load_spec
    from capsafe.train.trials import plan_trials
    from capsafe.world import build_world

    spec = load_spec(REPO / "jobs" / "demo.yaml", [
        "methods=[{name: plain}]", "task.target=1.0", f"train.max_steps={args.steps}",
        f"train.eval_every={args.warmup}", "task.eval_size=8", "train.num_workers=1",
        f"train.cpus_per_worker={args.threads}", f"train.zero_stage={args.zero_stage}",
        "train.checkpoint_every_evals=0"])
    with tempfile.TemporaryDirectory(prefix="capsafe-bench-") as tmp:
        paths = resolve_paths(spec, print)
        paths = materialize_task(load_task(spec, paths), paths, Path(tmp) / "data")
        world = build_world(spec.world, cache_root() / "worlds")
        paths["model.path"] = str(build_model(world, Path(tmp) / "model", args.hidden, args.layers))
        trials = plan_trials(spec, paths, Path(tmp) / "models")
        trials = resolve_train_len(spec, trials, print)  # train.max_seq_len from the data, as a run derives it
        cfg = trials[0]
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(paths["model.path"]).parameters())
        bare, ours = [], []
        with ray_session(None, args.threads + 0.5):
            for r in range(args.rounds):
                bare.append(bare_loop(cfg, args.steps, args.warmup, args.threads))
                ours.append(capsafe_loop(cfg, Path(tmp) / f"run{r}"))
                print(f"round {r + 1}: bare {bare[-1]:.0f} tokens/s, capsafe {ours[-1]:.0f} tokens/s", flush=True)
    b, c = statistics.median(bare), statistics.median(ours)
    ratio = statistics.median(o / x for o, x in zip(ours, bare, strict=True))
    print(f"\nmodel {n_params / 1e6:.1f}M parameters, batch {spec.train.batch_size}, {args.steps} steps "
          f"({args.warmup} warm-up), {args.threads} threads, ZeRO-{args.zero_stage}")
    print(f"bare PyTorch loop              : {b:8.0f} tokens/s (median of {args.rounds})")
    print(f"capsafe (Ray Train + DeepSpeed): {c:8.0f} tokens/s (median of {args.rounds})")
    print(f"ratio capsafe / bare: {ratio:.3f} (median of per-round ratios; goal >= 0.95)")


if __name__ == "__main__":
    main()

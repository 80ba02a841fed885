"""Scheduling benchmark (issue 15): a 36-trial sweep with evaluation, sequential vs streaming, on a simulated cluster.

Ray is started with LOGICAL GPUs (``num_gpus=32``: nothing runs on them) and stand-ins hold them for the times below,
divided by a time factor. Trials are Ray Tune trials (``tune.with_resources``, grid order, ``max_concurrent_trials``
= the trials that fit), so which trial runs when is Ray's own scheduling. Each engine replica is a placement-group
bundle of ``{"GPU": 1}`` (what a Serve replica reserves) whose work is a timed wait in a driver thread: a process
per replica would only add Ray's process start-up (~0.8 s each on the 2-core dev machine, times the time factor).

- sequential (capsafe today): every trial on all 32 GPUs, then the pool starts on all 32 GPUs (the fair split:
  nothing else needs them any more) and evaluates the 36 checkpoints.
- streaming (issue 15): the pool holds its own slice (``pool_gpus``, default one node) from the start; training gets
  the rest; each checkpoint is queued for evaluation the moment its trial ends.

Clock zero is the first trial's start in both modes (Ray and Tune start-up left out); the wall ends when the last
checkpoint's evaluation ends. Sequential's pool gets its GPUs when Tune tears down its cached trial actors, ~1-2 s
after the last trial here; that gap is cut from its clock (reported): on a cluster it is nothing beside hours.
"ideal" is the same schedule computed without Ray (greedy in grid order, a FIFO pool): measured minus ideal is
Ray's overhead at this time factor. "GPU busy" counts GPU-seconds held by a running trial or a working engine
(engine loads included) over all GPU-seconds of the wall.

Figures, in simulated seconds (preset ``full``: Llama-3.1-8B full fine-tuning, one 8-GPU H100 node per trial;
``lora``: 2-GPU LoRA trials whose checkpoints are adapters on a resident base engine). ASSUMED unless a source:
- trial = ``trial_start_s`` 240 + steps x ``step_s`` 1.6 + (steps // 50) x ``in_loop_eval_s`` 60 + ``save_s`` 120;
  steps to the capability target ~ lognormal(median 600 / 350 / 200 / 150 by learning rate, x 1.0 / 1.1 / 1.2 by
  method, sigma 0.4), seeded, capped at ``max_steps`` 1000 (a trial that never reaches the target runs to its
  budget, as capsafe's do); shaped like jobs/llama8b_full_zero3_2x8.yaml (batch 128 x ~250 tokens, capability
  on 500 GSM8K items every 50 steps, 16 GB consolidated checkpoints). step_s = 32k tokens at ~2,500 tokens/s/GPU
  for ZeRO-3 with optimizer offload and gradient checkpointing; NVIDIA NeMo's performance summary lists 12,273
  tokens/s/GPU for Llama-3-8B pre-training and 16,891 for Llama-2-7B SFT on 8 GPUs in FP8, an upper bound
  (docs.nvidia.com/nemo-framework/user-guide/24.12/nemotoolkit/performance/performance_summary.html).
  lora: 180 + steps x 2.3 + (steps // 50) x 150 + 20, medians 900 / 500 / 300 / 200, cap 1500.
- vLLM engine start for an 8B model, 90 s: loading weights took 52 s for a 13.5 GiB model in one log
  (github.com/castorini/rank_llm/pull/426); engine init after the weights 14 s, 39 s with -O3, for
  Meta-Llama-3-8B (github.com/vllm-project/vllm/pull/11005); a first answer 59 s after start even with a warm
  compile cache (github.com/vllm-project/vllm/issues/20264); start-up costs: vllm issue 19824. Serve controller
  and replica start 30 s. A replica starts once: Serve + the judge engine (+ the base engine for lora).
- evaluation of a checkpoint on one replica: its engine start (lora: a 2 s adapter load) + generation + judging.
  Generation: Llama 3.1 8B bf16 on one H100 reaches ~12,500 output tokens/s at saturation
  (morphllm.com/vllm-benchmarks, third-party figures); used: 6,000 tokens/s (half: capsafe sends chunks of mixed
  lengths), 4,200 for LoRA adapters. Prompts: HarmBench 400 text behaviours (arXiv:2402.04249), XSTest 450
  (250 safe + 200 unsafe, arXiv:2308.01263), StrongREJECT 313 (arXiv:2402.10260) and the capability
  re-measurement on GSM8K test, 1,319 (arXiv:2110.14168); 200 new tokens on average (caps 256 / 320). Judging
  with Llama Guard 3 8B, resident on the replica: 40 s.

    .venv/bin/python benchmarks/schedule_sim.py [--preset full|lora] [--seconds 40] [--quick] [--json PATH]
        [key=value ...]          # any Figures field, e.g. pool_gpus=16 seed=1
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import logging
import math
import os
import queue
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Tune's CSV/JSON/TensorBoard loggers would write a file per trial; the stand-ins have nothing to log.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.util.placement_group import placement_group, remove_placement_group  # noqa: E402


@dataclass(frozen=True)
class Figures:
    """Everything the simulation assumes, in simulated (GPU-cluster) seconds; see the module docstring."""

    nodes: int = 4  # cluster: nodes x gpus_per_node GPUs, the same in both modes
    gpus_per_node: int = 8
    trial_gpus: int = 8  # one Ray Train job (ZeRO-3 over one node)
    pool_gpus: int = 8  # streaming: the pool's own slice; sequential's pool gets the whole cluster
    engine_gpus: int = 1  # one vLLM engine replica (8B fits one 80 GB GPU)
    methods: tuple[str, ...] = ("plain", "safety_mix", "kl")
    method_factor: tuple[float, ...] = (1.0, 1.1, 1.2)  # steps-to-target multiplier per method
    seeds: tuple[int, ...] = (0, 1, 2)
    learning_rates: tuple[float, ...] = (5e-6, 1e-5, 2e-5, 4e-5)
    median_steps: tuple[int, ...] = (600, 350, 200, 150)  # median steps to the target per learning rate
    sigma: float = 0.4  # lognormal spread of steps to target across seeds
    max_steps: int = 1000
    trial_start_s: float = 240.0  # worker group, 16 GB of weights, DeepSpeed init
    step_s: float = 1.6
    eval_every: int = 50
    in_loop_eval_s: float = 60.0  # 500 items greedy to 320 tokens inside the training job
    save_s: float = 120.0  # consolidate and write the checkpoint
    pool_start_s: float = 30.0  # Serve controller and replica actors
    engine_load_s: float = 90.0  # one vLLM engine start (8B)
    adapters: bool = False  # True: checkpoints are LoRA adapters on a resident base engine
    adapter_load_s: float = 2.0
    prompts: int = 400 + 450 + 313 + 1319  # HarmBench, XSTest, StrongREJECT, GSM8K test (capability)
    new_tokens: float = 200.0
    tokens_per_s: float = 6000.0
    judge_s: float = 40.0
    seed: int = 0

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def eval_s(self) -> float:
        """One checkpoint's evaluation on a started replica: its engine (or adapter), generation, judging."""
        load = self.adapter_load_s if self.adapters else self.engine_load_s
        return load + self.prompts * self.new_tokens / self.tokens_per_s + self.judge_s

    def replica_start_s(self) -> float:
        """A replica's start: Serve, the judge engine, and the base engine when checkpoints are adapters."""
        return self.pool_start_s + self.engine_load_s * (2 if self.adapters else 1)


PRESETS = {
    "full": Figures(),
    "lora": Figures(trial_gpus=2, pool_gpus=4, learning_rates=(5e-5, 1e-4, 2e-4, 4e-4),
                    median_steps=(900, 500, 300, 200), max_steps=1500, trial_start_s=180.0, step_s=2.3,
                    in_loop_eval_s=150.0, save_s=20.0, adapters=True, tokens_per_s=4200.0),
}


def plan(fig: Figures) -> list[dict[str, Any]]:
    """The sweep in capsafe's order (method, seed, learning rate), each trial's simulated duration drawn once."""
    rng = random.Random(fig.seed)
    trials = []
    for method, factor in zip(fig.methods, fig.method_factor, strict=True):
        for seed in fig.seeds:
            for lr, median in zip(fig.learning_rates, fig.median_steps, strict=True):
                steps = min(fig.max_steps, round(median * factor * math.exp(rng.gauss(0.0, fig.sigma))))
                duration = (fig.trial_start_s + steps * fig.step_s + steps // fig.eval_every * fig.in_loop_eval_s
                            + fig.save_s)
                trials.append({"trial_id": f"{method}-s{seed}-lr{lr:g}", "steps": steps, "reached":
                               steps < fig.max_steps, "duration_s": duration})
    return trials


def ideal(fig: Figures, durations: list[float], streaming: bool) -> dict[str, float]:
    """The same schedule without Ray: trials greedy in grid order on the slots that fit, a FIFO pool."""
    pool = fig.pool_gpus if streaming else fig.gpus
    slots = [0.0] * ((fig.gpus - (pool if streaming else 0)) // fig.trial_gpus)
    ends = []
    for d in durations:
        t = heapq.heappop(slots)
        heapq.heappush(slots, t + d)
        ends.append(t + d)
    replicas = [(0.0 if streaming else max(ends)) + fig.replica_start_s()] * (pool // fig.engine_gpus)
    done = []
    for ready in sorted(ends):
        t = max(heapq.heappop(replicas), ready) + fig.eval_s()
        heapq.heappush(replicas, t)
        done.append(t)
    return {"wall_s": max(done), "first_safety_s": min(done), "training_done_s": max(ends)}


class Pool:
    """The evaluation pool: ``replicas`` placement-group bundles of ``{"GPU": engine_gpus}``, each served by a
    driver thread that waits out the replica's start, then evaluates checkpoints from one FIFO queue."""

    def __init__(self, fig: Figures, replicas: int, scale: float, go: threading.Event) -> None:
        self.fig, self.replicas, self.scale, self.go = fig, replicas, scale, go
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.records: list[dict[str, Any]] = []  # one per busy interval: replica start or a checkpoint
        self.threads: list[threading.Thread] = []
        self.pg: Any = None
        self.granted = 0.0  # when Ray granted the GPUs

    def start(self) -> None:
        """Reserve the GPUs (waits until Ray can grant them), then start every replica's thread."""
        self.pg = placement_group([{"GPU": self.fig.engine_gpus}] * self.replicas)
        if not self.pg.wait(timeout_seconds=600):
            raise RuntimeError(f"Ray did not grant the pool's {self.replicas} GPU bundles within 600 s")
        self.granted = time.time()
        for i in range(self.replicas):
            thread = threading.Thread(target=self._serve, args=(i,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self, replica: int) -> None:
        self.go.wait()
        start = time.time()
        time.sleep(self.fig.replica_start_s() / self.scale)
        self.records.append({"what": "replica start", "replica": replica, "start": start, "end": time.time()})
        while (ckpt := self.queue.get()) is not None:
            start = time.time()
            time.sleep(self.fig.eval_s() / self.scale)
            self.records.append({"what": ckpt, "replica": replica, "start": start, "end": time.time()})

    def close(self) -> None:
        """Let the replicas finish the queue, then give the GPUs back."""
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()
        if self.pg is not None:
            remove_placement_group(self.pg)


class _Watch(tune.Callback):
    """Forwards Tune's trial events (called in the driver's Tune loop) to the run; never blocks that loop."""

    def __init__(self, started: Callable[[], None], result: Callable[[str, dict[str, float]], None]) -> None:
        self.started, self.result = started, result

    def __getstate__(self) -> dict[str, Any]:
        return {}  # Tune pickles its callbacks to resume an experiment; a simulation is never resumed

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.result(trial.config["trial"]["trial_id"], {"start": result["start"], "end": result["end"]})


def _stand_in_trial(config: dict[str, Any]) -> None:
    """A trial: holds its GPUs for its duration and reports when it ran (its checkpoint is saved at the end)."""
    start = time.time()
    time.sleep(config["trial"]["sleep_s"])
    tune.report({"start": start, "end": time.time()})


def run_mode(fig: Figures, trials: list[dict[str, Any]], scale: float, streaming: bool, storage: str) -> dict:
    """One sweep with evaluation on the simulated cluster; returns its figures in simulated seconds."""
    go, t0 = threading.Event(), [0.0]
    pool = Pool(fig, (fig.pool_gpus if streaming else fig.gpus) // fig.engine_gpus, scale, go)
    starter = threading.Thread(target=pool.start, daemon=True)
    ran: dict[str, dict[str, float]] = {}

    def started() -> None:
        if not t0[0]:
            t0[0] = time.time()  # clock zero; a streaming pool starts its replicas now
            if streaming:
                go.set()

    def result(trial_id: str, times: dict[str, float]) -> None:
        ran[trial_id] = times
        pool.queue.put(trial_id)  # the checkpoint, queued the moment it is saved
        if not streaming and len(ran) == len(trials):
            go.set()  # the last trial ended: the pool starts on the whole cluster
            starter.start()

    trials_cfg = [{"trial_id": t["trial_id"], "sleep_s": t["duration_s"] / scale} for t in trials]
    if streaming:
        starter.start()  # its slice is reserved before Tune places any trial
        starter.join()
    slots = (fig.gpus - (fig.pool_gpus if streaming else 0)) // fig.trial_gpus
    tuner = tune.Tuner(
        tune.with_resources(_stand_in_trial, {"cpu": 0, "gpu": fig.trial_gpus}),
        param_space={"trial": tune.grid_search(trials_cfg)},
        tune_config=tune.TuneConfig(max_concurrent_trials=slots, reuse_actors=True),
        run_config=tune.RunConfig(name="streaming" if streaming else "sequential", storage_path=storage,
                                  verbose=0, callbacks=[_Watch(started, result)]),
    )
    grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(f"{len(grid.errors)} stand-in trial(s) failed; the first: {grid.errors[0]!r}")
    starter.join()  # sequential: the pool may still be waiting for its GPUs
    if not pool.threads:
        raise RuntimeError("the pool never got its GPUs (see the placement-group error above)")
    pool.close()
    return _figures(fig, trials, ran, pool, t0[0], scale, slots, streaming)


def _figures(fig: Figures, trials: list[dict[str, Any]], ran: dict[str, dict[str, float]], pool: Pool, t0: float,
             scale: float, slots: int, streaming: bool) -> dict[str, Any]:
    cut = 0.0
    if not streaming:
        # Ray frees the last trials' GPUs when Tune tears down its cached actors, ~1-2 s after the last trial
        # here: on a real cluster that is nothing beside hours, at this time factor it would be many minutes.
        cut = max(0.0, pool.granted - max(r["end"] for r in ran.values()))
    records = [{**r, "start": r["start"] - cut, "end": r["end"] - cut} for r in pool.records]
    evals = [r for r in records if r["what"] != "replica start"]
    counts = {t["trial_id"]: sum(r["what"] == t["trial_id"] for r in evals) for t in trials}
    end = max(r["end"] for r in records)
    busy = (sum(fig.trial_gpus * (r["end"] - r["start"]) for r in ran.values())
            + sum(fig.engine_gpus * (r["end"] - r["start"]) for r in records))
    wall = end - t0

    def sim(r: dict[str, Any], what: str) -> dict[str, Any]:
        return {"what": what, "start_s": (r["start"] - t0) * scale, "end_s": (r["end"] - t0) * scale}

    timeline = ([sim(r, f"train {k}") for k, r in ran.items()]
                + [sim(r, f"eval {r['what']} on replica {r['replica']}") for r in records])
    return {
        "mode": "streaming" if streaming else "sequential",
        "training_gpus": slots * fig.trial_gpus, "pool_gpus": pool.replicas * fig.engine_gpus,
        "trial_slots": slots, "replicas": pool.replicas,
        "wall_s": wall * scale, "wall_real_s": wall, "gpu_busy": busy / (fig.gpus * wall),
        "first_safety_s": (min(r["end"] for r in evals) - t0) * scale,
        "training_done_s": (max(r["end"] for r in ran.values()) - t0) * scale,
        "pool_wait_cut_real_s": cut,
        "trials_run": len(ran), "evaluations": len(evals), "evaluated_once": all(c == 1 for c in counts.values()),
        "ideal": ideal(fig, [t["duration_s"] for t in trials], streaming),
        "timeline": sorted(timeline, key=lambda r: r["start_s"]),
    }


def run(fig: Figures, seconds: float) -> dict[str, Any]:
    """Both modes in one Ray session; the time factor makes the sequential sweep take ~``seconds`` real."""
    if __name__ != "__main__":  # imported (tests): ship the stand-in trial's code to Ray's workers by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    logging.getLogger("ray.tune").setLevel(logging.ERROR)  # "could not fetch metrics": no result files, by design
    load = os.getloadavg()[0]  # the machine is shared: a loaded one shows as measured-minus-ideal
    trials = plan(fig)
    scale = ideal(fig, [t["duration_s"] for t in trials], streaming=False)["wall_s"] / seconds
    # address="local": never join a cluster someone else started on this machine.
    ray.init(address="local", num_cpus=4, num_gpus=fig.gpus,
             include_dashboard=False, log_to_driver=False, configure_logging=False,
             _system_config={"prestart_worker_first_driver": False})  # no idle task workers: nothing uses them
    try:
        with tempfile.TemporaryDirectory(prefix="capsafe-schedule-") as storage:
            modes = [run_mode(fig, trials, scale, streaming, storage) for streaming in (False, True)]
    finally:
        ray.shutdown()
    return {"figures": dataclasses.asdict(fig), "load_avg_1min": load, "eval_s": fig.eval_s(),
            "replica_start_s": fig.replica_start_s(),
            "scale": scale, "trials": trials, "modes": modes, "ratio": modes[1]["wall_s"] / modes[0]["wall_s"],
            "ideal_ratio": modes[1]["ideal"]["wall_s"] / modes[0]["ideal"]["wall_s"],
            # no overlap of evaluation with training can end before sequential's training alone would
            "overlap_floor": modes[0]["training_done_s"] / modes[0]["wall_s"]}


def table(result: dict[str, Any]) -> str:
    """The printed report: one row per mode, then the ratio."""
    head = (f"{'mode':<11} {'GPUs train, pool':>16} {'wall (sim s)':>12} {'(h)':>5} {'real s':>6} {'GPU busy':>8} "
            f"{'first safety number':>19} {'training done':>13} {'ideal wall':>10}")
    rows = [head, "-" * len(head)]
    for m in result["modes"]:
        split = (f"{m['training_gpus']} + {m['pool_gpus']}" if m["mode"] == "streaming"
                 else f"{m['training_gpus']}, then {m['pool_gpus']}")
        rows.append(f"{m['mode']:<11} {split:>16} {m['wall_s']:>12.0f} {m['wall_s'] / 3600:>5.2f} "
                    f"{m['wall_real_s']:>6.1f} {m['gpu_busy']:>8.0%} {m['first_safety_s']:>19.0f} "
                    f"{m['training_done_s']:>13.0f} {m['ideal']['wall_s']:>10.0f}")
    seq, stream = result["modes"]
    sooner = seq["first_safety_s"] / stream["first_safety_s"]
    rows.append(f"streaming / sequential wall: {result['ratio']:.2f} (the same schedule without Ray: "
                f"{result['ideal_ratio']:.2f}; aim <= 0.6; floor for any overlap {result['overlap_floor']:.2f}: "
                f"sequential's training alone). First safety number {sooner:.1f}x sooner streaming. Time factor "
                f"{result['scale']:.0f} simulated s per real s.")
    return "\n".join(rows)


def _override(fig: Figures, pairs: list[str]) -> Figures:
    types = {f.name: type(getattr(fig, f.name)) for f in dataclasses.fields(fig)}
    changes: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types:
            raise SystemExit(f"unknown figure '{key}'; use one of {', '.join(types)}")
        kind = types[key]
        if kind is tuple:
            changes[key] = tuple(json.loads(value))
        elif kind is bool:
            changes[key] = value.lower() in ("1", "true", "yes")
        else:
            changes[key] = kind(value)
    return dataclasses.replace(fig, **changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--seconds", type=float, default=40.0, help="real seconds of the sequential sweep")
    parser.add_argument("--quick", action="store_true",
                        help="~0.3 real seconds per sweep, for the test: sane counts and order, not figures")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("overrides", nargs="*", help="key=value for any Figures field")
    args = parser.parse_args()
    fig = _override(PRESETS[args.preset], args.overrides)
    if (fig.gpus - fig.pool_gpus) // fig.trial_gpus < 1 or fig.pool_gpus < fig.engine_gpus:
        raise SystemExit(f"pool_gpus={fig.pool_gpus} leaves no room for a {fig.trial_gpus}-GPU trial on {fig.gpus} "
                         f"GPUs, or no room for a {fig.engine_gpus}-GPU engine; lower or raise pool_gpus")
    result = run(fig, 0.3 if args.quick else args.seconds)
    result["command"] = {"preset": args.preset, "seconds": args.seconds, "quick": args.quick,
                         "overrides": args.overrides, "date": time.strftime("%Y-%m-%d")}
    print(f"preset {args.preset}: {len(result['trials'])} trials on {fig.gpus} GPUs, "
          f"{sum(not t['reached'] for t in result['trials'])} ran to max_steps; per checkpoint "
          f"{result['eval_s']:.0f} s of evaluation, {result['replica_start_s']:.0f} s per replica start; "
          f"load average {result['load_avg_1min']:.1f} at the start")
    print(table(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()

"""The fine-tuning loop in-process on one rank (no Ray): DeepSpeed options, the capability ladder, budgets,
divergence, consolidation of ZeRO-3 checkpoints, and exact continuation from a resume checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

from capsafe.train.config import TrialConfig
from capsafe.train.core import Host, run_training

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def one_rank() -> Any:
    """A one-process gloo group, as Ray Train would set up for a single worker."""
    import torch.distributed as dist

    from capsafe.runtime.ray_shell import worker_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({k: v for k, v in worker_env().items() if k not in os.environ})
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _cfg(world: Any, tmp: Path, overrides: list[str]) -> TrialConfig:
    from capsafe.preflight import resolve_train_len
    from capsafe.run_inputs import load_task, materialize_task
    from capsafe.spec import load_spec
    from capsafe.train.trials import plan_trials

    # "task.target=0.0" stops a trial at its first evaluation: a target the spec refuses from a user (its band
    # would reach 0), so the test sets it on the validated spec
    targets = [o for o in overrides if o.startswith("task.target=")]
    spec = load_spec(REPO / "tests" / "specs" / "micro.yaml", ["train.num_workers=1", "train.cpus_per_worker=1",
                                                                "methods=[{name: plain}]",
                                                                *[o for o in overrides if o not in targets]])
    for override in targets:
        spec.task.target = float(override.split("=", 1)[1])
    paths = {**spec.data_paths(), "model.path": str(world.model_dir), "task.train_file": str(world.task_train),
             "task.eval_file": str(world.task_eval), "task.confirm_file": str(world.task_confirm),
             "task.general_file": str(world.general)}
    for field in [f for f in paths if f.startswith("methods.")]:
        if field.endswith("unaligned_model"):
            from capsafe.world.unaligned import build_unaligned

            paths[field] = str(build_unaligned(world, spec.world, log=lambda m: None))
        else:
            paths[field] = str(world.safety)
    paths = materialize_task(load_task(spec, paths), paths, tmp / "data")
    trials = plan_trials(spec, paths, tmp / "checkpoints")
    return resolve_train_len(spec, trials, lambda m: None)[0]


class Recorder:
    """A host that keeps every report and a copy of every resume checkpoint."""

    def __init__(self, tmp: Path, restore_dir: Path | None = None) -> None:
        self.tmp, self.reports, self.resume = tmp, [], {}
        self.host = Host(0, 1, self.report, restore_dir)

    def report(self, metrics: dict[str, Any], resume_dir: Path | None) -> None:
        self.reports.append(metrics)
        if resume_dir:
            keep = self.tmp / f"resume-{metrics['step']}"
            shutil.copytree(resume_dir, keep)
            self.resume[metrics["step"]] = keep


def _eval_checkpoint(cfg: TrialConfig, model_dir: Path) -> float:
    from capsafe.common.data import read_jsonl
    from capsafe.common.formatting import Encoder
    from capsafe.common.generation import greedy_generate
    from capsafe.common.metrics import score
    from capsafe.evaluate.engines import TransformersEngine

    engine = TransformersEngine(str(model_dir))
    encoder = Encoder(engine.tokenizer, cfg.prompt_format)
    items = read_jsonl(cfg.task_eval, ("prompt", "answer"))[: cfg.eval_size]
    preds = greedy_generate(engine.model, engine.tokenizer, [encoder.prompt(i["prompt"]) for i in items],
                            cfg.eval_max_new_tokens, engine.stop, batch_size=cfg.eval_batch_size)
    return score(cfg.metric, preds, [i["answer"] for i in items])


def test_zero3_ladder_keeps_consolidated_checkpoints_that_score_as_reported(one_rank: Any, micro_world: Any,
                                                                              tmp_path: Path) -> None:
    cfg = _cfg(micro_world, tmp_path, ["task.ladder=[0.0, 0.02]", "train.zero_stage=3",
                                               "train.max_steps=400"])
    rec = Recorder(tmp_path)
    run_training(cfg, rec.host)
    last, tolerance = rec.reports[-1], cfg.tolerance
    assert last["stop"] == "reached" and last["capability"] >= cfg.target  # the target itself, not its band
    kept = {cfg.levels[int(i)]: r for x in rec.reports for i, r in json.loads(x["kept"] or "{}").items()}
    assert set(kept) == {0.0, 0.02, cfg.target}
    for level, r in kept.items():
        # the evaluation closest to the level among those in its band up to the one that reached it
        decided = next(x for x in rec.reports if x["capability"] >= level)
        inside = [x for x in rec.reports if x["step"] <= decided["step"] and abs(x["capability"] - level) <= tolerance]
        best = min(inside, key=lambda x: (abs(x["capability"] - level), x["step"])) if inside else decided
        assert r["step"] == best["step"] and r["capability"] == best["capability"]
        model = Path(r["model_dir"]) / "model"
        assert (model / "model.safetensors").is_file()
        assert _eval_checkpoint(cfg, model) == pytest.approx(r["capability"])
    # candidates the ladder let go were deleted: only the kept checkpoints remain (train.keep_candidates 1)
    assert {p.name for p in Path(cfg.checkpoint_dir).iterdir()} == {f"step-{r['step']}" for r in kept.values()}
    # every 20 steps, and every 10 (eval_every // 2) once within train.near_margin (0.02) of the band's lower
    # edge of the next undecided level
    done: set[str] = set()
    for before, after in zip(rec.reports, rec.reports[1:], strict=False):
        done |= set(filter(None, before["levels"].split(",")))
        upcoming = next(level for i, level in enumerate(cfg.levels) if str(i) not in done)
        near = before["capability"] >= upcoming - tolerance - 0.02
        assert after["step"] - before["step"] == (10 if near else 20), (before, after)
    assert last["tokens"] > 0 and last["train_s"] > 0 and last["eval_s"] > 0


def test_resume_checkpoint_continues_exactly(one_rank: Any, micro_world: Any, tmp_path: Path) -> None:
    cfg = _cfg(micro_world, tmp_path, ["task.target=1.0", "train.max_steps=60", "train.zero_stage=2"])
    full = Recorder(tmp_path / "a")
    run_training(cfg, full.host)
    assert [r["step"] for r in full.reports] == [20, 40, 60] and full.reports[-1]["stop"] == "budget:steps"
    again = Recorder(tmp_path / "b", restore_dir=full.resume[40])
    run_training(cfg, again.host)
    assert [r["step"] for r in again.reports] == [60]
    a, b = full.reports[-1], again.reports[0]
    assert b["restarts"] == 1 and b["tokens"] == a["tokens"]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["capability"] == a["capability"]
    state = json.loads((full.resume[40] / "capsafe_state.json").read_text())
    assert state["step"] == 40


@pytest.mark.parametrize("overrides", [
    ["train.zero_stage=2", "train.mode=lora", "train.precision=bf16", "train.gradient_accumulation_steps=2",
     "train.gradient_checkpointing=true"],
    ["train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true",
     "train.gradient_accumulation_steps=4"],
    ["train.zero_stage=3", "train.mode=lora", "train.precision=bf16", "train.offload_optimizer=true"],
], ids=["zero2-lora-bf16-accum-gradckpt", "zero3-offload-accum", "zero3-lora-bf16-offload"])
def test_deepspeed_options_train_and_save(one_rank: Any, micro_world: Any, tmp_path: Path,
                                          overrides: list[str]) -> None:
    cfg = _cfg(micro_world, tmp_path, ["task.target=0.0", "train.eval_every=4", *overrides])
    rec = Recorder(tmp_path)
    run_training(cfg, rec.host)
    (r,) = rec.reports
    assert r["stop"] == "reached" and r["step"] == 4 and r["loss"] == r["loss"]
    model = Path(r["model_dir"]) / "model"
    if cfg.train.mode == "lora":
        assert (model / "adapter_model.safetensors").is_file()
    else:
        assert (model / "model.safetensors").is_file()
    # DeepSpeed wrapped the process group without JIT-building its inference-only CPU all-reduce op (30-70 s of
    # g++, redone whenever another ninja ran it: capsafe.train.model.skip_inference_comm_op)
    from deepspeed.comm import comm

    assert comm.cdb is not None and comm.cdb.shm_comm_op is None


@pytest.mark.parametrize(("overrides", "stop"), [
    (["train.max_tokens=500"], "budget:tokens"),
    (["train.max_wall_s=0.001"], "budget:wall_time"),
    (["train.learning_rates=[1e12]", "train.grad_clip=1e30"], "diverged"),
])
def test_budgets_and_divergence_stop_the_trial(one_rank: Any, micro_world: Any, tmp_path: Path,
                                               overrides: list[str], stop: str) -> None:
    cfg = _cfg(micro_world, tmp_path, ["task.target=1.0", "train.zero_stage=2", *overrides])
    rec = Recorder(tmp_path)
    run_training(cfg, rec.host)
    last = rec.reports[-1]
    assert last["stop"] == stop and last["step"] < 20
    if stop == "budget:tokens":
        assert last["tokens"] >= 500


@pytest.mark.parametrize("overrides", [
    ["methods=[{name: kl, beta: 0.5}]", "train.mode=lora", "train.zero_stage=3"],
    ["methods=[{name: kl}]", "train.zero_stage=3"],
    ["methods=[{name: token_wise}]", "train.zero_stage=2"],
    ["methods=[{name: lisa, alignment_steps: 2, task_steps: 2}]", "train.zero_stage=2", "train.mode=lora"],
    ["methods=[{name: safe_lora, threshold: 1.0}]", "train.zero_stage=2", "train.mode=lora"],
    ["methods=[{name: ptst}]", "train.zero_stage=2"],
], ids=["kl-lora-zero3-adapters-off", "kl-full-zero3-sharded-copy", "token_wise-full-zero2", "lisa-lora-zero2",
        "safe_lora-zero2", "ptst-zero2"])
def test_every_mitigation_trains_and_saves(one_rank: Any, micro_world: Any, tmp_path: Path,
                                           overrides: list[str]) -> None:
    cfg = _cfg(micro_world, tmp_path, ["task.target=0.0", "train.eval_every=6", *overrides])
    rec = Recorder(tmp_path)
    run_training(cfg, rec.host)
    (r,) = rec.reports
    assert r["stop"] == "reached" and r["step"] == 6 and r["loss"] == r["loss"]
    model = Path(r["model_dir"]) / "model"
    assert (model / ("adapter_model.safetensors" if cfg.train.mode == "lora" else "model.safetensors")).is_file()
    meta = json.loads((Path(r["model_dir"]) / "capsafe_checkpoint.json").read_text())
    if cfg.method == "safe_lora":  # threshold 1: every layer whose update is not exactly aligned is projected
        note = json.loads(r["postprocess"])["safe_lora"]
        assert note == meta["postprocess"]["safe_lora"] and note["layers"] == 4 and note["projected"] == 4
        assert (model / "adapter_model.unprojected.safetensors").is_file()
    else:
        assert r["postprocess"] == "" and meta["postprocess"] is None


def test_lisa_anchors_follow_the_phase_switches_inside_the_loop(one_rank: Any, micro_world: Any, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Alignment steps 1-2, task 3-4, alignment 5-6; the proximal term waits for 2 steps taken, then pulls toward
    the weights of the last switch: one anchor for steps 3-4, a new one for 5-6. The trial stops at step 6 of a
    budget of 400 (it reaches its target there): the warm-up counts steps taken, so the term applied anyway
    (a warm-up of 10 % of the budget, as before issue 25, would have started at step 41, never)."""
    import torch

    import capsafe.train.core as core

    calls: list[tuple[float, float, float]] = []
    original = core.proximal

    def recording(params: list[Any], anchor: list[Any], rho: float) -> Any:
        with torch.no_grad():
            calls.append((sum(float(a.sum()) for a in anchor), sum(float(p.sum()) for p in params), rho))
        return original(params, anchor, rho)

    monkeypatch.setattr(core, "proximal", recording)
    cfg = _cfg(micro_world, tmp_path, ["task.target=0.0", "train.eval_every=6", "train.max_steps=400",
                                       "train.zero_stage=2", "train.mode=lora",
                                       "methods=[{name: lisa, alignment_steps: 2, task_steps: 2, rho: 0.5, "
                                       "warmup_steps: 2}]"])
    run_training(cfg, Recorder(tmp_path).host)
    assert len(calls) == 4 and {c[2] for c in calls} == {0.5}  # none during the warm-up (steps 1-2)
    (a3, w3, _), (a4, w4, _), (a5, w5, _), (a6, w6, _) = calls
    assert a3 == a4 and a5 == a6 and a3 != a5  # one anchor per phase, renewed at the switch
    assert a3 == pytest.approx(w3) and a5 == pytest.approx(w5) and w4 != pytest.approx(a4)  # the switch's weights


def test_token_wise_is_fed_the_aligned_models_logits(one_rank: Any, micro_world: Any, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import capsafe.train.core as core

    seen: dict[str, Any] = {}
    build = core.build_reference

    def recording_build(engine: Any, cfg: TrialConfig, world: int) -> Any:
        reference = build(engine, cfg, world)

        def record(batch: dict[str, Any]) -> Any:
            seen["batch"], seen["logits"] = {k: v.clone() for k, v in batch.items()}, reference(batch)
            return seen["logits"]

        return record

    monkeypatch.setattr(core, "build_reference", recording_build)
    cfg = _cfg(micro_world, tmp_path, ["task.target=0.0", "train.eval_every=6", "train.zero_stage=2",
                                       "methods=[{name: token_wise}]"])
    rec = Recorder(tmp_path)
    run_training(cfg, rec.host)
    inputs = {k: seen["batch"][k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(micro_world.model_dir)(**inputs).logits
        tuned = AutoModelForCausalLM.from_pretrained(Path(rec.reports[-1]["model_dir"]) / "model")(**inputs).logits
    assert torch.allclose(seen["logits"], base, atol=1e-4)  # the last step's reference: the aligned model
    assert not torch.allclose(tuned, base, atol=1e-3)  # while the trained model had moved away from it


def test_safe_lora_measures_capability_on_the_projected_adapter(one_rank: Any, micro_world: Any, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The trial stops on the capability of the model Safe-LoRA reports: during every capability evaluation the
    LoRA weights are the projected ones (exactly the adapter saved for that step), and training goes on from
    the unprojected ones."""
    import torch
    from safetensors.torch import load_file

    import capsafe.train.core as core

    seen: list[dict[str, Any]] = []
    original = core._capability

    def recording(engine: Any, *args: Any) -> float:
        seen.append({n.replace(".default.", "."): p.detach().clone() for n, p in engine.module.named_parameters()
                     if ".lora_B." in n})
        return original(engine, *args)

    monkeypatch.setattr(core, "_capability", recording)
    cfg = _cfg(micro_world, tmp_path, ["task.target=0.0", "train.eval_every=6", "train.zero_stage=2",
                                       "train.mode=lora", "methods=[{name: safe_lora, threshold: 1.0}]"])
    rec = Recorder(tmp_path)
    run_training(cfg, rec.host)
    model = Path(rec.reports[-1]["model_dir"]) / "model"
    projected = load_file(str(model / "adapter_model.safetensors"))
    unprojected = load_file(str(model / "adapter_model.unprojected.safetensors"))
    (evaluated,) = seen
    assert set(evaluated) == {k for k in projected if ".lora_B." in k}
    for key, value in evaluated.items():
        assert torch.allclose(value, projected[key], atol=1e-6)  # evaluated = reported
        assert not torch.allclose(projected[key], unprojected[key])  # threshold 1: every layer projected


def test_kl_objective_keeps_the_model_closer_to_the_base(one_rank: Any, micro_world: Any, tmp_path: Path) -> None:
    """Same batches, same seed: with a strong KL term the tuned model's next-token distributions on the task
    answers it trains on stay far nearer the aligned model's than plain fine-tuning's do - what the term
    guarantees. Whether that carries over to refusals (never in its batches) is the world's property, not the
    method's, and is left to the safety evaluation: on the Llama-3-convention micro world, KL to the aligned
    model on the refusal demonstrations was 0.73 vs plain's 0.93 in one build and 2.1 vs 1.1 in the next."""
    import torch
    from transformers import AutoModelForCausalLM

    from capsafe.common.data import read_jsonl
    from capsafe.common.formatting import collate, encode_example, load_tokenizer
    from capsafe.mitigations.losses import kl_to_reference

    tokenizer = load_tokenizer(micro_world.model_dir)
    fmt = micro_world.prompt_format()
    batches = {}
    for name, path, field in (("task", micro_world.task_train, "answer"),):
        rows = read_jsonl(path, ("prompt", field))[:32]
        batches[name] = collate([encode_example(tokenizer, fmt, r["prompt"], r[field], 96) for r in rows],
                                tokenizer.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(micro_world.model_dir)
    kl: dict[str, dict[str, float]] = {}
    for method in ("plain", "kl, beta: 50"):
        cfg = _cfg(micro_world, tmp_path / method[:2], ["task.target=0.0", "train.eval_every=10",
                                                        "train.zero_stage=2", f"methods=[{{name: {method}}}]"])
        rec = Recorder(tmp_path / method[:2])
        run_training(cfg, rec.host)
        tuned = AutoModelForCausalLM.from_pretrained(Path(rec.reports[-1]["model_dir"]) / "model")
        with torch.no_grad():
            kl[method] = {k: float(kl_to_reference(tuned(**b).logits, base(**b).logits, b["labels"]))
                          for k, b in batches.items()}
    assert kl["kl, beta: 50"]["task"] < 0.2 * kl["plain"]["task"], kl


def test_async_eval_decides_on_the_same_measured_checkpoints(one_rank: Any, micro_world: Any, tmp_path: Path) -> None:
    """train.async_eval: training goes on while rank 0's evaluator process measures each snapshot, and the
    stopping rule is applied to the results in step order. With a fixed cadence the evaluations, their
    capabilities, the kept checkpoints and the stop are those of the in-loop evaluation; the trial trains past
    the deciding step while its result is on the way, and only the kept checkpoints stay on disk."""
    fixed = ["task.ladder=[0.02]", "train.max_steps=400", "train.eval_every_near=20"]
    sync = Recorder(tmp_path / "sync")
    run_training(_cfg(micro_world, tmp_path / "sync", fixed), sync.host)
    cfg = _cfg(micro_world, tmp_path / "async", [*fixed, "train.async_eval=true"])
    rec = Recorder(tmp_path / "async")
    trained: list[int] = []
    rec.host.on_step = lambda step, s, tokens: trained.append(step)
    run_training(cfg, rec.host)

    def decisions(reports: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        def kept(r: dict[str, Any]) -> dict[str, tuple[int, float]]:
            return {i: (k["step"], k["capability"]) for i, k in json.loads(r["kept"] or "{}").items()}

        return [(r["step"], r["capability"], kept(r), r["stop"], r["levels"], r["candidate"]) for r in reports]

    assert decisions(rec.reports) == decisions(sync.reports)
    assert rec.reports[-1]["stop"] == "reached" and trained[-1] > rec.reports[-1]["step"]
    kept = [r for x in rec.reports for r in json.loads(x["kept"] or "{}").values()]
    assert {p.name for p in Path(cfg.checkpoint_dir).iterdir()} == {f"step-{r['step']}" for r in kept}
    assert all(_eval_checkpoint(cfg, Path(r["model_dir"]) / "model") == pytest.approx(r["capability"]) for r in kept)



class _Crash(Exception):
    pass


def test_async_eval_resumes_with_its_unmeasured_snapshots(one_rank: Any, micro_world: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 24, the restart path of train.async_eval: the trial dies right after a resume checkpoint written
    while snapshots were still being measured (they are in it as pending); restored from it, as Ray Train
    restores the latest checkpoint, the trial measures them again and ends exactly as the run that was never
    interrupted: the same evaluations, in step order, the same tokens, never a step past its budget."""
    from capsafe.train.async_eval import SnapshotEvaluator

    # results only once training waits for them (the budget spent): the slowest evaluator there is, so the
    # resume checkpoint of the first result is written at the last step with two snapshots still unmeasured
    blocking = SnapshotEvaluator.poll
    monkeypatch.setattr(SnapshotEvaluator, "poll", lambda self, block=False: blocking(self, True) if block else None)
    overrides = ["task.target=1.0", "train.max_steps=60", "train.zero_stage=2", "train.async_eval=true"]
    full = Recorder(tmp_path / "full")
    run_training(_cfg(micro_world, tmp_path / "full", overrides), full.host)
    assert [r["step"] for r in full.reports] == [20, 40, 60] and full.reports[-1]["stop"] == "budget:steps"

    cfg = _cfg(micro_world, tmp_path / "crash", overrides)
    crashed = Recorder(tmp_path / "crash")

    def report_then_die(metrics: dict[str, Any], resume_dir: Path | None) -> None:
        Recorder.report(crashed, metrics, resume_dir)
        if resume_dir is not None:
            raise _Crash  # the worker dies once its first resume checkpoint is safe

    crashed.host = Host(0, 1, report_then_die, None)
    with pytest.raises(_Crash):
        run_training(cfg, crashed.host)
    (first,) = crashed.resume
    saved = json.loads((crashed.resume[first] / "capsafe_state.json").read_text())
    assert first == 20 and saved["step"] == 60 and [p["step"] for p in saved["pending"]] == [40, 60]
    again = Recorder(tmp_path / "again", restore_dir=crashed.resume[first])
    run_training(cfg, again.host)
    # every evaluation after the crash, each measured as the uninterrupted run measured it
    assert [r["step"] for r in crashed.reports + again.reports] == [20, 40, 60], (saved, again.reports)
    by_step = {r["step"]: r for r in full.reports}
    for r in again.reports:
        assert r["capability"] == by_step[r["step"]]["capability"] and r["restarts"] == 1
    # never trained past the step budget: it once trained step 61 after the restart and evaluated it too
    a, b = full.reports[-1], again.reports[-1]
    assert b["tokens"] == a["tokens"] and b["stop"] == a["stop"] == "budget:steps"


def test_jit_builds_run_this_environments_ninja(monkeypatch: pytest.MonkeyPatch) -> None:
    """`train.optimizer_impl: deepspeed` JIT-builds Adam kernels with the first ninja on PATH: it must be the
    environment's own (pip's), not a system one whose build log the other takes for stale (or none at all)."""
    import sys

    from capsafe.train.model import this_environments_ninja_first

    bin_dir = str(Path(sys.executable).parent)
    assert (Path(bin_dir) / "ninja").is_file()  # ninja is a capsafe dependency (pyproject.toml)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    this_environments_ninja_first()
    assert os.environ["PATH"] == f"{bin_dir}:/usr/bin:/bin"
    this_environments_ninja_first()  # once is enough
    assert os.environ["PATH"] == f"{bin_dir}:/usr/bin:/bin"

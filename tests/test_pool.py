"""The Serve pool for real (local Ray, vLLM's asynchronous engines on the micro world's model): a LoRA adapter
on the base engine, seeded repeats, the whole judge panel, a replica killed mid-evaluation, and the pool's
OpenAI-compatible HTTP API. A few minutes."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from capsafe.common.data import Suite
from capsafe.common.formatting import Encoder, load_tokenizer
from capsafe.common.generation import Sampling, Target, texts
from capsafe.common.results import read_table
from capsafe.evaluate.fan_out import evaluate_models
from capsafe.evaluate.panel import CoherenceWithPerplexity, LLMJudge, rule_judge

pytestmark = [pytest.mark.slow, pytest.mark.ray]
KEYS = ["trial_id", "step", "suite", "prompt_id", "repeat"]


@pytest.fixture(scope="module", autouse=True)
def _one_ray_cluster():
    """One local Ray cluster for this module's pools (each test's own ``ray_session`` joins it); shut down after
    the last test. A start and a shutdown cost ~10 s."""
    from capsafe.runtime.ray_shell import ray_session

    with ray_session(None, 4):
        yield


def _suites(world, n: int) -> list[Suite]:
    suites = []
    for name in ("harmful", "overrefusal", "benign"):
        with open(world.suites[name]) as fh:
            items = [json.loads(line) for line in fh][:n]
        suites.append(Suite(name, name, [{"id": f"{name}-{i}", "prompt": it["prompt"]} for i, it in enumerate(items)]))
    return suites


def _replicas() -> dict[int, object]:
    """pid -> actor handle of each live generation-pool replica."""
    import ray
    from ray.util.state import list_actors

    # this test's cluster by its GCS address: "auto" refuses a machine running more than one Ray cluster
    address = ray.get_runtime_context().gcs_address
    return {a.pid: ray.get_actor(a.name, namespace=a.ray_namespace)
            for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000)
            if a.class_name.startswith("ServeReplica") and "generation-pool" in a.class_name}


def _busy_replica_with_an_engine(deadline: float) -> int:
    """A replica that has started its vLLM engine and, by Serve's own count, has requests in flight.

    Waiting for written generations was not enough: by then a replica could be idle (the rest of the work
    routed to the other one), its death retried nothing, and the test failed on a slow machine."""
    import ray

    while time.time() < deadline:
        replicas = _replicas()
        assert len(replicas) == 2, replicas
        for pid, actor in replicas.items():
            ongoing = ray.get(actor.get_num_ongoing_requests.remote())  # type: ignore[attr-defined]
            if ongoing >= 2 and _descendants(pid):
                return pid
        time.sleep(0.1)
    raise AssertionError("no replica had an engine and requests in flight within the deadline")


def _stat(pid: int) -> list[str] | None:
    """State, parent pid, ... of a process (None once it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _descendants(pid: int) -> set[int]:
    """Processes started by ``pid`` (vLLM's EngineCore and the like), transitively."""
    stats = {int(p.name): _stat(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
    parents = {child: int(st[1]) for child, st in stats.items() if st}
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if (st := _stat(p)) is not None and st[0] != "Z"}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


API_KEY = "test-key"


def _http_run(results: Path, world, adapter: str):
    """A run's results folder holding one kept LoRA checkpoint (the random adapter) at step 10."""
    from capsafe.common.checkpoints import CHECKPOINT_META
    from capsafe.common.results import write_table
    from capsafe.evaluate.http_api import HttpContext

    ckpt = results / "models" / "lora-s0-lr0.1" / "step-10"
    ckpt.mkdir(parents=True)
    (ckpt / "model").symlink_to(adapter)
    (ckpt / CHECKPOINT_META).write_text(json.dumps({"kind": "lora"}))
    write_table(results, "checkpoints", [{
        "trial_id": "lora-s0-lr0.1", "level": 0.1, "reached": True, "step": 10, "capability": 0.1, "tokens": 1,
        "elapsed_s": 1.0, "checkpoint": str(ckpt), "served_capability": None, "confirmed_capability": None,
        "postprocess": None, "confirmed_items": None, "evaluation_started_at": None}], fragment="lora-s0-lr0.1")
    return HttpContext(str(results), str(world.model_dir), True, world.prompt_format().to_dict(), 16, API_KEY)


def _check_http(port: int, pool, world, adapter: str) -> None:
    """The pool's OpenAI-compatible API, through OpenAI's own client: it lists the run's models and answers a
    chat request as the pool answers the suites' encoding of it (greedy), for the base model and the adapter."""
    import openai

    from capsafe.common.formatting import encode_chat, encode_text

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=5)
    assert {m.id for m in client.models.list()} == {"base", "lora-s0-lr0.1@10"}
    with pytest.raises(openai.AuthenticationError):  # a wrong key is a 401
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    tokenizer = load_tokenizer(str(world.model_dir))
    request = _suites(world, 1)[0].items[0]["prompt"]
    ids = Encoder(tokenizer, world.prompt_format()).prompt(request)
    for name, target in (("base", Target(str(world.model_dir))),
                         ("lora-s0-lr0.1@10", Target(str(world.model_dir), adapter))):
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": request}],
                                               max_tokens=16, temperature=0)
        expected = pool.generate(target, [ids], Sampling(16)).result()[0]
        assert reply.choices[0].message.content == expected.text and reply.usage.prompt_tokens == len(ids), name
        # the engine's own count and finish reason, not a re-tokenization and a constant 'stop'
        assert reply.usage.completion_tokens == len(expected.token_ids), name
        assert reply.choices[0].finish_reason == expected.finish_reason, name
    # max_tokens cutting the answer is 'length' (the base model's answer to this request is longer than 2 ids)
    whole = pool.generate(Target(str(world.model_dir)), [ids], Sampling(16)).result()[0]
    assert len(whole.token_ids) > 2
    cut = client.chat.completions.create(model="base", messages=[{"role": "user", "content": request}],
                                         max_tokens=2, temperature=0)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 2
    text_ids = encode_text(tokenizer, request)
    expected = pool.generate(Target(str(world.model_dir)), [text_ids], Sampling(2)).result()[0]
    cut = client.completions.create(model="base", prompt=request, max_tokens=2, temperature=0)
    assert cut.choices[0].text == expected.text and cut.choices[0].finish_reason == expected.finish_reason
    assert cut.usage.completion_tokens == len(expected.token_ids)
    # a conversation of several turns, through the model's chat template; ids unique per request
    turns = [{"role": "user", "content": request}, {"role": "assistant", "content": "no ."},
             {"role": "user", "content": "why not ?"}]
    replies = [client.chat.completions.create(model="base", messages=turns, max_tokens=16, temperature=0)
               for _ in range(2)]
    ids = encode_chat(tokenizer, turns)
    assert replies[0].choices[0].message.content == pool.generate(Target(str(world.model_dir)), [ids],
                                                                  Sampling(16)).result()[0].text
    assert replies[0].usage.prompt_tokens == len(ids) and replies[0].id != replies[1].id
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-trial", messages=[{"role": "user", "content": request}])


def test_pool_survives_a_killed_replica_and_writes_every_key_once(micro_world, micro_judge: Path,
                                                                  random_adapter: str, tmp_path: Path) -> None:
    from capsafe.evaluate.pool_client import PoolClient
    from capsafe.evaluate.serve_pool import build_pool, deployment_options, start_pool, stop_pool
    from capsafe.runtime.ray_shell import ray_session

    base = str(micro_world.model_dir)
    models = {("base", 0): Target(base), ("lora", 10): Target(base, random_adapter)}
    suites = _suites(micro_world, 24)
    tokenizer = load_tokenizer(base)
    encode = Encoder(tokenizer, micro_world.prompt_format()).prompt
    logs: list[str] = []
    http, port = _http_run(tmp_path / "run", micro_world, random_adapter), _free_port()
    with ray_session(None, 4):
        options = deployment_options(2, 1.0, 0.0, {"min_replicas": 2, "max_replicas": 2,
                                                   "target_ongoing_requests": 1.0})
        engine = {"enable_lora": True, "max_loras": 2, "max_lora_rank": 8}  # one adapter: max_loras above it
        app = build_pool("vllm", engine, options, max_models=2, max_ongoing_requests=2, http=http)
        handle = start_pool(app, "t-pool", ("127.0.0.1", port))
        pool = PoolClient(handle, retries=4, log=logs.append)
        # the world's Llama-Guard-format judge model, served in the same pool as the models it judges, with its
        # published prompt (through its own chat template) and a reworded one
        guard_tok = load_tokenizer(micro_judge)
        judges = [rule_judge("refusal_keywords"), CoherenceWithPerplexity(base, 1000.0),
                  LLMJudge("guard", "llama_guard", Target(str(micro_judge)), guard_tok),
                  LLMJudge("guard@lg_terse", "llama_guard", Target(str(micro_judge)), guard_tok,
                           variant="lg_terse")]

        def evaluate() -> int:
            return evaluate_models(models, suites, encode, Sampling(16, temperature=1.0, seed=3), 2, pool, judges,
                                   "vllm", tmp_path, logs.append, chunk=4)

        errors: list[BaseException] = []

        def run() -> None:
            try:
                evaluate()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        victim = _busy_replica_with_an_engine(time.time() + 300)
        engine_procs = _descendants(victim)
        os.kill(victim, signal.SIGKILL)  # a replica dies with requests in flight
        worker.join(timeout=600)
        assert not worker.is_alive() and not errors, (errors, logs[-10:])
        deadline = time.time() + 60
        while _alive(engine_procs) and time.time() < deadline:
            time.sleep(0.5)
        assert not _alive(engine_procs), "the killed replica's engine processes outlived it"
        assert pool.retried >= 1, logs  # the killed replica's requests were sent again
        assert evaluate() == 0  # a rerun finds everything done
        _check_http(port, pool, micro_world, random_adapter)
        print("\n".join(line for line in logs if "retry" in line or "[1/" in line))
        pool.close()
        stop_pool("t-pool")

    gens = read_table(tmp_path, "generations").to_pandas()
    assert len(gens) == 2 * 3 * 24 * 2 and not gens.duplicated(KEYS).any()
    assert set(gens["seed"]) == {3, 4}
    by = gens.set_index(["trial_id", "suite", "prompt_id", "repeat"])["response"]
    assert (by.xs("lora", level="trial_id") != by.xs("base", level="trial_id")).mean() > 0.5  # adapter applied
    judg = read_table(tmp_path, "judgments").to_pandas()
    harmful = int((gens["suite_kind"] == "harmful").sum())  # the harm classifier judges the harmful suite only
    assert len(judg) == 2 * len(gens) + 2 * harmful and not judg.duplicated([*KEYS, "judge"]).any()
    for name in ("guard", "guard@lg_terse"):
        guard = judg[judg["judge"] == name]
        assert len(guard) == harmful and guard["raw"].notna().all()
        assert set(guard["verdict"]) <= {"safe", "unsafe", "unparsed"}
    # the judge model answers in Llama Guard's format through the pool: its published-prompt verdicts parse
    published = judg[judg["judge"] == "guard"]
    assert (published["verdict"] != "unparsed").mean() > 0.9, published["raw"].value_counts().head()
    assert judg[judg["judge"] == "coherence"]["score"].notna().mean() > 0.9  # base-model perplexity


def test_pool_swaps_checkpoints_into_its_resident_engine(micro_world, tuned_full_checkpoint: str,
                                                         tmp_path: Path) -> None:
    """One replica that keeps one model: the base model, then a full checkpoint of its shape, then the base model
    again. The replica starts one engine for good and one to check its first swap against; both swaps load
    weights into the resident engine; the base model's answers after A -> B -> A equal its first ones, and the
    swapped-in checkpoint answers as transformers does with that checkpoint's weights."""
    from capsafe.evaluate.engines import TransformersEngine
    from capsafe.evaluate.pool_client import PoolClient
    from capsafe.evaluate.serve_pool import build_pool, deployment_options, start_pool, stop_pool
    from capsafe.evaluate.stage import swap_check_lines
    from capsafe.runtime.ray_shell import ray_session

    base = str(micro_world.model_dir)
    suites = _suites(micro_world, 8)
    encode = Encoder(load_tokenizer(base), micro_world.prompt_format()).prompt
    logs: list[str] = []
    checks = tmp_path / "engine_checks"
    with ray_session(None, 2):
        app = build_pool("vllm", {"max_model_len": 256}, deployment_options(1, 1.0, 0.0), max_models=1,
                         checks_dir=str(checks))
        handle = start_pool(app, "t-swap")
        pool = PoolClient(handle, retries=0, log=logs.append)
        for models in ({("base", 0): Target(base), ("tuned", 1): Target(tuned_full_checkpoint)},
                       {("base-again", 0): Target(base)}):
            evaluate_models(models, suites, encode, Sampling(16), 1, pool, [rule_judge("refusal_keywords")], "vllm",
                            tmp_path, logs.append, models_in_flight=1)
        stats = handle.engine_stats.remote().result()
        pool.close()
        stop_pool("t-swap")
    assert stats == {"starts": 2, "swaps": 2, "reuses": 0, "resident": 1}, stats
    (line,) = swap_check_lines(checks)
    assert "-> " + tuned_full_checkpoint in line and "used for this shape" in line, line
    gens = read_table(tmp_path, "generations").to_pandas().set_index(["trial_id", "suite", "prompt_id"])["response"]
    assert gens.xs("base-again").equals(gens.xs("base"))
    tuned = gens.xs("tuned")
    assert (tuned != gens.xs("base")).mean() > 0.5
    reference = TransformersEngine(tuned_full_checkpoint)
    for suite in suites:
        expected = texts(reference.generate([encode(it["prompt"]) for it in suite.items], Sampling(16)))
        assert tuned.xs(suite.name).loc[[it["id"] for it in suite.items]].tolist() == expected, suite.name

"""vLLM behind the ``Engine`` protocol. The only module that imports vllm."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import math
import os
from typing import Any

from capsafe.common.generation import Completion, Request, Sampling, completion_of, model_stop_ids


class VLLMEngine:
    """One ``vllm.LLM`` (started once; 20-60 s on CPU). LoRA adapters are vLLM LoRA requests on this engine.

    On CPU the engine needs float32, eager mode and an explicit KV-cache size; on GPU the defaults apply.
    """

    name = "vllm"

    def __init__(self, model_dir: str, max_model_len: int | None = None, seed: int = 0, enable_lora: bool = False,
                 max_loras: int = 2, max_lora_rank: int = 16, in_process: bool = False, **_: Any) -> None:
        from vllm import LLM

        kwargs = engine_args(model_dir, max_model_len, seed, enable_lora, max_loras, max_lora_rank)
        if in_process:
            # Engine core and worker in this process: starts in ~2 s instead of ~35 s on CPU (no process spawns
            # that each import torch and vLLM again). For scripts and tests; the pool keeps vLLM's processes.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            kwargs["distributed_executor_backend"] = "uni"
        self.llm: Any = LLM(**kwargs)
        self.model_dir = model_dir
        self.stop = model_stop_ids(model_dir, self.llm.get_tokenizer())
        self.adapters: dict[str, int] = {}
        self.lora = enable_lora
        self.seen: list[list[int]] = []  # the prompt ids vLLM reported back for the last batch, for checks

    def _lora(self, adapter: str | None) -> Any:
        return lora_request(self.adapters, adapter)

    def generate(self, prompts: list[list[int]], sampling: Sampling, adapter: str | None = None) -> list[Completion]:
        return self.generate_many([(prompts, sampling, adapter)])[0]

    def generate_many(self, requests: list[Request]) -> list[list[Completion]]:
        """One ``LLM.generate`` over every request: per-prompt sampling parameters and LoRA requests, so
        base and adapter rows share the batch (safe while max_loras exceeds the adapters loaded). Prompts go
        in as token ids (``TokensPrompt``): vLLM adds nothing, and the ids it reports back are checked."""
        from vllm.inputs import TokensPrompt

        prompts, params, loras, sent = [], [], [], []
        for ids, sampling, adapter in requests:
            param = sampling_params(sampling, self.stop)
            prompts += [TokensPrompt(prompt_token_ids=list(p)) for p in ids]
            sent += [list(p) for p in ids]
            params += [param] * len(ids)
            loras += [self._lora(adapter)] * len(ids)
        lora_arg = loras if any(loras) else None
        outs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=lora_arg)
        self.seen = [list(o.prompt_token_ids) for o in outs]
        if self.seen != sent:
            raise RuntimeError("vLLM changed the prompt ids it was given; the tokenization contract is broken")
        answers = [completion(o, self.stop) for o in outs]
        result, start = [], 0
        for ids, _, _ in requests:
            result.append(answers[start:start + len(ids)])
            start += len(ids)
        return result

    def nll(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        scored = [i for i, (p, c) in enumerate(zip(prompts, continuations, strict=True)) if p and c]
        if not scored:
            return [math.nan] * len(prompts)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        requests = [TokensPrompt(prompt_token_ids=list(prompts[i]) + list(continuations[i])) for i in scored]
        if self.lora:
            # vLLM 0.32 (CPU) kills the engine on prompt_logprobs for a batch of 2+ sequences when LoRA is
            # enabled (einsum shape mismatch in compute_logits); one sequence per step works.
            outs = [o for r in requests for o in self.llm.generate([r], params, use_tqdm=False)]
        else:
            outs = self.llm.generate(requests, params, use_tqdm=False)
        self.seen = [list(o.prompt_token_ids) for o in outs]
        return continuation_nll(prompts, scored, outs)

    def swap(self, model_dir: str, repack_tied: bool = True) -> None:
        """Load another checkpoint of this engine's shape into it (``capsafe.evaluate.resident``)."""
        self.llm.collective_rpc("capsafe_swap_weights", args=(model_dir, repack_tied))
        self.llm.reset_prefix_cache()
        self.adapters.clear()  # reload_weights dropped them from the worker
        self.model_dir, self.stop = model_dir, model_stop_ids(model_dir, self.llm.get_tokenizer())

    def probe(self, max_tokens: int) -> list[list[int]]:
        """Greedy token ids for the swap check's probe prompts."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from capsafe.evaluate.resident import probe_prompts

        prompts = [TokensPrompt(prompt_token_ids=p) for p in probe_prompts(self.llm.get_tokenizer())]
        outs = self.llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def close(self) -> None:
        if self.llm is None:
            return
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
        gc.collect()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class AsyncVLLMEngine:
    """vLLM's asynchronous engine (``AsyncLLM``), as the pool's replicas run it: every prompt of every request
    goes into the engine the moment it arrives, with its own sampling parameters and LoRA adapter, and the
    engine's scheduler batches whatever is running at each step (continuous batching). No lock, no merging.

    Generation and scoring are coroutines; the engine core runs in vLLM's own process as in ``VLLMEngine``.
    With LoRA enabled, vLLM 0.32 on CPU kills the engine when a prompt-logprobs sequence shares a step with
    any other sequence (see ``VLLMEngine.nll``): scoring then waits for the engine to be empty and holds it,
    one sequence at a time.
    """

    name = "vllm"

    def __init__(self, model_dir: str, max_model_len: int | None = None, seed: int = 0, enable_lora: bool = False,
                 max_loras: int = 2, max_lora_rank: int = 16, **_: Any) -> None:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = engine_args(model_dir, max_model_len, seed, enable_lora, max_loras, max_lora_rank)
        kwargs.update(worker_in_engine_core())
        # constructed off the event loop (it waits for the engine process); its loop tasks start on first use
        self.llm: Any = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs, disable_log_stats=True))
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.stop = model_stop_ids(model_dir, self.tokenizer)
        self.adapters: dict[str, int] = {}
        self.lora = enable_lora
        self.requests = itertools.count()
        self.running = 0  # sequences in the engine
        self.exclusive = False  # a LoRA-engine scoring sequence holds the engine
        self.waiting_alone = 0  # scoring sequences waiting for the engine to empty: new sequences wait behind them
        self.changed: asyncio.Condition | None = None  # made on the event loop that uses it

    def _condition(self) -> asyncio.Condition:
        if self.changed is None:
            self.changed = asyncio.Condition()
        return self.changed

    async def _run(self, ids: list[int], params: Any, lora: Any = None, alone: bool = False) -> Any:
        """One sequence through the engine; its final output. ``alone``: with nothing else in the engine."""
        from vllm.inputs import TokensPrompt

        changed = self._condition()
        async with changed:
            if alone:
                self.waiting_alone += 1
                await changed.wait_for(lambda: not self.exclusive and self.running == 0)
                self.waiting_alone -= 1
            else:
                await changed.wait_for(lambda: not self.exclusive and not self.waiting_alone)
            self.running += 1
            self.exclusive = alone
        try:
            final = None
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=list(ids)), params,
                                               f"capsafe-{next(self.requests)}", lora_request=lora):
                final = out
        finally:
            async with changed:
                self.running -= 1
                self.exclusive = False
                changed.notify_all()
        if final is None or list(final.prompt_token_ids) != list(ids):
            raise RuntimeError("vLLM changed the prompt ids it was given; the tokenization contract is broken")
        return final

    async def generate(self, prompts: list[list[int]], sampling: Sampling,
                       adapter: str | None = None) -> list[Completion]:
        params = sampling_params(sampling, self.stop, final_only=True)
        lora = lora_request(self.adapters, adapter)
        outs = await asyncio.gather(*(self._run(p, params, lora) for p in prompts))
        return [completion(o, self.stop) for o in outs]

    async def nll(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        scored = [i for i, (p, c) in enumerate(zip(prompts, continuations, strict=True)) if p and c]
        outs = await asyncio.gather(*(self._run(list(prompts[i]) + list(continuations[i]), params, alone=self.lora)
                                      for i in scored))
        return continuation_nll(prompts, scored, outs)

    async def swap(self, model_dir: str, repack_tied: bool = True) -> None:
        """Load another checkpoint of this engine's shape into it, with nothing running (the resident-engine
        shelf swaps idle engines only): weights in place, then the prefix cache and the LoRA adapters dropped
        (vLLM issue 42125: an adapter reloaded under an old name can serve stale prefix-cache entries)."""
        if self.running:
            raise RuntimeError("an engine is swapped only when idle")
        await self.llm.collective_rpc("capsafe_swap_weights", args=(model_dir, repack_tied))
        await self.llm.reset_prefix_cache()
        self.adapters.clear()  # reload_weights dropped them from the worker
        self.model_dir, self.stop = model_dir, model_stop_ids(model_dir, self.tokenizer)

    async def probe(self, max_tokens: int) -> list[list[int]]:
        """Greedy token ids for the swap check's probe prompts, sent together as the pool sends requests."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from capsafe.evaluate.resident import probe_prompts

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, output_kind=RequestOutputKind.FINAL_ONLY)
        outs = await asyncio.gather(*(self._run(p, params) for p in probe_prompts(self.tokenizer)))
        return [list(o.outputs[0].token_ids) for o in outs]

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()
            gc.collect()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def completion(out: Any, stop: list[int]) -> Completion:
    """capsafe's ``Completion`` of a vLLM request output: the text, the generated ids (vLLM's own, its closing
    stop id dropped) and vLLM's finish reason ('length' when max_tokens ended it)."""
    o = out.outputs[0]
    return completion_of(o.text, list(o.token_ids), stop, cut_by_length=o.finish_reason == "length")


def continuation_nll(prompts: list[list[int]], scored: list[int], outs: list[Any]) -> list[float]:
    """Mean negative log-likelihood per continuation token, from vLLM's prompt log-probs of prompt +
    continuation (``outs[j]`` answers ``prompts[scored[j]]``); nan where nothing was scored."""
    results = [math.nan] * len(prompts)
    for i, out in zip(scored, outs, strict=True):
        ids, start = list(out.prompt_token_ids), len(prompts[i])
        logprobs = [out.prompt_logprobs[k][ids[k]].logprob for k in range(start, len(ids))]
        results[i] = -sum(logprobs) / len(logprobs)
    return results


def engine_args(model_dir: str, max_model_len: int | None, seed: int, enable_lora: bool, max_loras: int,
                max_lora_rank: int) -> dict[str, Any]:
    """vLLM engine arguments of both engines: on CPU float32, eager mode and an explicit KV-cache size; on GPU
    vLLM's defaults."""
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # Several replicas share a small machine: let the OS place threads instead of pinning all to core 0.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    kwargs: dict[str, Any] = {"model": model_dir, "seed": seed,
                              "max_model_len": clamp_model_len(model_dir, max_model_len),
                              # capsafe's calls inside the worker (weight swaps), reached by name
                              "worker_extension_cls": "capsafe.evaluate.vllm_worker.SwapExtension"}
    if enable_lora:
        # vLLM on CPU gives base rows of a batch the last LoRA slot's output once every slot is taken
        # (PLATFORM.md); the caller sizes max_loras above the number of adapters it will ever load.
        kwargs.update(enable_lora=True, max_loras=max_loras, max_lora_rank=max_lora_rank, max_cpu_loras=max_loras)
    if not on_gpu:
        kwargs.update(dtype="float32", enforce_eager=True, max_num_seqs=64)
    return kwargs


def worker_in_engine_core() -> dict[str, Any]:
    """On CPU without thread binding, run vLLM's model worker inside the asynchronous engine's engine-core process
    (its "uni" executor, as vLLM does on one GPU) instead of a second spawned process.

    vLLM 0.32's CPU platform switches a one-process engine to its multiprocess executor whenever
    VLLM_ENABLE_V1_MULTIPROCESSING is on, because OpenMP thread binding must be set up before the worker imports
    torch. capsafe's replicas run with ``VLLM_CPU_OMP_THREADS_BIND=nobind`` (``engine_args``), so there is nothing
    to bind. The second process cost each engine start another interpreter importing torch and vLLM (~5-8 s
    here), and while serving the engine core and the worker polled their shared-memory queue with
    ``sched_yield``, a busy core on a small machine. ``AsyncLLM`` keeps its engine-core process either way (it
    always uses vLLM's multiprocess client); the variable, set for this process, only keeps the platform from
    replacing the executor. On a GPU, or with a thread binding the user asked for, vLLM's own choice stands.
    """
    import torch

    if torch.cuda.is_available() or os.environ.get("VLLM_CPU_OMP_THREADS_BIND") != "nobind":
        return {}
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return {"distributed_executor_backend": "uni"}


def sampling_params(sampling: Sampling, stop: list[int], final_only: bool = False) -> Any:
    """vLLM's SamplingParams for capsafe's ``Sampling`` (special tokens skipped, the model's stop ids)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kind = RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.CUMULATIVE
    return SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
                          max_tokens=sampling.max_new_tokens, skip_special_tokens=True, stop_token_ids=stop,
                          output_kind=kind)


_LORA_IDS: dict[str, int] = {}  # adapter name -> vLLM's integer id, unique in this process


def lora_request(adapters: dict[str, int], adapter: str | None) -> Any:
    """vLLM's LoRARequest for an adapter directory, named by the directory and its weights' contents
    (``adapter_name``), so a checkpoint rewritten in place is a new adapter to vLLM, never the old one's cached
    weights or prefix-cache entries (vLLM issue 42125); ``adapters`` maps the directories this engine used."""
    if adapter is None:
        return None
    from vllm.lora.request import LoRARequest

    name = adapter_name(adapter)
    lora_id = _LORA_IDS.setdefault(name, len(_LORA_IDS) + 1)
    adapters[adapter] = lora_id
    return LoRARequest(name, lora_id, adapter)


def adapter_name(adapter: str) -> str:
    """A name unique to an adapter checkpoint: its directory's name and a digest of its path and of its files'
    sizes and modification times (cheap for any adapter size; a rewrite changes them)."""
    import hashlib
    from pathlib import Path

    root = Path(adapter)
    digest = hashlib.sha256(str(root.resolve()).encode())
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        st = path.stat()
        digest.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{root.parent.name}-{root.name}-{digest.hexdigest()[:12]}"


def clamp_model_len(model_dir: str, wanted: int | None) -> int:
    """The engine's context: ``wanted`` (the run's longest input plus output), or the model's own
    ``max_position_embeddings`` when that is smaller or nothing is asked; vLLM refuses to start beyond it."""
    from capsafe.common.context import model_context

    own = model_context(model_dir)
    return own if wanted is None else min(wanted, own)

"""The experiment spec: one YAML file per experiment, validated into typed pydantic models.

Dotted overrides (``train.learning_rates=[3e-4]``, ``methods.1.ratio=0.1``) are applied to the raw YAML
before validation, so an override is checked exactly like the file it overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from capsafe.common.formatting import PromptFormat
from capsafe.common.results import file_stem
from capsafe.common.storage import SCHEMES, is_url, join, working_copy
from capsafe.common.strict_model import BOOL_FOR_NUMBER, StrictModel
from capsafe.errors import SpecError
from capsafe.mitigations import METHOD_NAMES, METHODS, MethodSpec, PlainMethod, SafetyMixMethod
from capsafe.world import WorldConfig

DEMO = "demo"  # a data path or model path of "demo" means: the file the embedded demo world builds
HF_PREFIX = "hf:"  # a data path 'hf:<id>[@config]' names a Hugging Face dataset


class _Strict(StrictModel):
    pass


class ModelSpec(_Strict):
    path: str = Field(DEMO, description="Base model: a Hugging Face id, a local directory, or 'demo' for the "
                      "aligned tiny assistant of the embedded demo world.")
    prompt_template: str = Field("<user> {prompt} <assistant>", description="How a request is shown to the "
                                 "model; '{prompt}' is replaced by the request text. With chat_template the "
                                 "result is the user message (use '{prompt}').")
    chat_template: bool = Field(False, description="Wrap every request in the tokenizer's chat template (for "
                                "instruct models), in training, capability and safety evaluation alike.")
    system_prompt: str | None = Field(None, description="Optional system prompt for every request (a system "
                                      "message under chat_template, else a first paragraph).")

    @model_validator(mode="after")
    def _template_takes_the_prompt(self) -> ModelSpec:
        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"model.prompt_template {self.prompt_template!r} has no '{{prompt}}': every request "
                             "would become the same text; write '{prompt}' where the request goes, e.g. "
                             "'Question: {prompt} Answer:'")
        return self

    def prompt_format(self) -> PromptFormat:
        return PromptFormat(self.prompt_template, self.chat_template, self.system_prompt)


class TaskSpec(_Strict):
    name: str = Field("addition", description="Name of the capability task (free text, shown in the report).")
    train_file: str = Field(DEMO, description="Training data: a local .jsonl/.json/.csv/.parquet file, a "
                            "Hugging Face dataset written 'hf:<id>' or 'hf:<id>@<config>', or 'demo'.")
    train_split: str = Field("train", description="Split of train_file when it is a Hugging Face dataset.")
    eval_file: str | None = Field(DEMO, description="The selection split: held-out data, in any form train_file "
                                  "accepts, on which the in-training capability evaluation decides when a trial "
                                  "stops. null with selection_from_train.")
    eval_split: str = Field("test", description="Split of eval_file when it is a Hugging Face dataset.")
    selection_from_train: int | None = Field(None, ge=1, description="Carve the selection split off the "
                                             "training data instead of eval_file: this many records from the end "
                                             "of train_file, never trained on (e.g. for GSM8K, whose test split "
                                             "is then the confirmation split).")
    confirm_file: str | None = Field(DEMO, description="The confirmation split, disjoint from training and "
                                     "selection: every kept checkpoint's capability is re-measured on it through "
                                     "the pool and reported (the selection split's own score is biased upward: "
                                     "it chose the checkpoint). null: none; the report then says capability "
                                     "was not confirmed.")
    confirm_split: str = Field("test", description="Split of confirm_file when it is a Hugging Face dataset.")
    confirm_size: int | None = Field(None, ge=1, description="Use only the first N confirmation items (null: "
                                     "all).")
    prompt_field: str = Field("prompt", description="Column holding the request (e.g. 'question' for GSM8K).")
    answer_field: str = Field("answer", description="Column holding the reference answer; it is also the "
                              "training target.")
    choices_field: str | None = Field(None, description="Column with a list of choices, for multiple-choice "
                                      "tasks: they are appended to the prompt as 'A. ...' lines and an integer "
                                      "answer becomes its letter.")
    general_file: str | None = Field(DEMO, description="Optional jsonl of general instruction data "
                                     "('prompt', 'response') mixed into the task data, or 'demo', or null.")
    general_fraction: float = Field(0.3, ge=0.0, lt=1.0, description="Share of each training batch drawn "
                                    "from general_file.")
    metric: Literal["exact_match", "numeric", "multiple_choice", "label", "rouge_l"] = Field(
        "exact_match", description="Capability metric on the held-out split: exact_match, numeric (GSM8K "
        "'#### 42' or the last number), multiple_choice (choice letter), label (classification), rouge_l.")
    target: float = Field(0.4, ge=0.0, le=1.0, description="Capability target in [0, 1]: a trial stops at the "
                          "first evaluation on the selection split at or above the target itself, and keeps "
                          "the evaluation inside the band closest to the target (docs/concepts.md, 'Stopping "
                          "on the target').")
    tolerance: float = Field(0.05, ge=0.0, le=0.5, description="Half-width of the equal-capability band "
                             "[target - tolerance, target + tolerance]: comparisons whose checkpoints' confirmed "
                             "capabilities fall outside it are flagged, never called equal. 0.05 is about the "
                             "95 % half-width of a rate near 0.4 measured on 300 items (0.055): a narrower band "
                             "would flag measurement noise.")
    ladder: list[float] = Field([], description="Lower capability levels (a ladder) at which a trial also keeps "
                                "a checkpoint on its way to the target, chosen like the target's (the candidate "
                                "in the level's band closest to it); each rung is evaluated for safety too.")
    eval_size: int = Field(400, ge=1, description="Selection-split items used for each capability evaluation. "
                           "400 (with 500 confirmation items) kept 88 % of simulated confirmed capabilities "
                           "in a 0.4 +/- 0.05 band and the mean true capability 0.007 below the target; 200 "
                           "(with 300) 77 % (benchmarks/calibration_stopping.py).")
    eval_batch_size: int = Field(64, ge=1, description="Prompts per batched greedy generation during the "
                                 "capability evaluation (per worker).")
    max_new_tokens: int = Field(6, ge=1, description="Greedy tokens generated per capability item.")

    @model_validator(mode="after")
    def _selection(self) -> TaskSpec:
        if self.selection_from_train is not None and self.eval_file is not None:
            raise ValueError("task.selection_from_train carves the selection split off the training data, so "
                             "task.eval_file would be unused; set task.eval_file=null (or drop selection_from_train)")
        if self.selection_from_train is None and self.eval_file is None:
            raise ValueError("task.eval_file is null but no task.selection_from_train is set: the trials need a "
                             "selection split to stop on; give either")
        return self

    @model_validator(mode="after")
    def _ladder_below_target(self) -> TaskSpec:
        for level in self.ladder:
            if not 0.0 <= level < self.target:
                raise ValueError(f"task.ladder level {level} must lie in [0, task.target={self.target}); the "
                                 "target is the ladder's last rung")
        if len(set(self.ladder)) != len(self.ladder):
            raise ValueError("task.ladder has repeated levels; list each level once")
        return self

    @model_validator(mode="after")
    def _band_above_zero(self) -> TaskSpec:
        if self.target - self.tolerance <= 0:
            raise ValueError(f"task.target - task.tolerance is {self.target - self.tolerance:g}: the equal-capability "
                             "band reaches 0, so an untrained model would count as at the target; the band's lower "
                             "edge must lie above 0 (raise task.target or lower task.tolerance)")
        return self

    @model_validator(mode="after")
    def _own_task_own_splits(self) -> TaskSpec:
        if self.train_file == DEMO:
            return self
        demo = [name for name in ("eval_file", "confirm_file") if getattr(self, name) == DEMO]
        if self.general_file == DEMO and self.general_fraction > 0:
            demo.append("general_file")
        if demo:
            fields = ", ".join(f"task.{name}" for name in demo)
            raise ValueError(f"task.train_file is your own task but {fields} still point at the demo world's "
                             "data (the default 'demo'): the demo's addition split would be the selection / "
                             "confirmation split, and its chat data 30 % of every batch. Give each your "
                             "task's file (or hf: dataset), or null (task.eval_file=null needs "
                             "task.selection_from_train; task.general_file=null mixes nothing in)")
        return self

    def levels(self) -> list[float]:
        """Every capability level a trial keeps a checkpoint for, ascending; the last is the target."""
        return [*sorted(self.ladder), self.target]


class LoraSpec(_Strict):
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] = Field(["q_proj", "v_proj"], description="Module names that get adapters.")


class TrainSpec(_Strict):
    mode: Literal["full", "lora"] = Field("full", description="Full fine-tuning or PEFT LoRA.")
    zero_stage: Literal[2, 3] = Field(3, description="DeepSpeed ZeRO stage (3 shards parameters too).")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision; fp16 (with "
                                                       "loss scaling) needs GPUs.")
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory (ZeRO-Offload).")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (ZeRO-3 only).")
    optimizer_impl: Literal["torch", "deepspeed"] = Field("torch", description="AdamW implementation: 'torch' "
                                                          "needs no compiler; 'deepspeed' uses DeepSpeed's "
                                                          "fused (GPU) or CPU Adam kernels, JIT-built on first "
                                                          "use (faster, needs g++/ninja, and nvcc on GPU).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer "
                                             "step; batch_size stays the global batch per step.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass "
                                         "(less memory, ~30% more compute).")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks) per trial.")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL) instead of CPU workers (gloo).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves for each training worker.")
    learning_rates: list[Annotated[float, Field(gt=0)]] = Field([1e-3], min_length=1, description="Learning "
                                                                "rates to sweep, each above 0 (each "
                                        "one a separate trial per method and seed).")
    batch_size: int = Field(32, ge=1, description="Global batch size per optimizer step, split over workers "
                            "and accumulation steps.")
    max_steps: int = Field(600, ge=1, description="Step budget per trial; a trial that exhausts a budget "
                           "without reaching the target is recorded as not reached.")
    max_tokens: int | None = Field(None, ge=1, description="Token budget per trial (all training tokens, "
                                   "padding excluded); null = no cap.")
    max_wall_s: float | None = Field(None, gt=0, description="Wall-time budget per trial in seconds (training "
                                     "and capability evaluation, summed over restarts); null = no cap.")
    eval_every: int = Field(25, ge=1, description="Capability evaluation every this many steps while far from "
                            "the next level.")
    eval_every_near: int | None = Field(None, ge=1, description="Capability evaluation every this many steps once "
                                        "the last one came within near_margin of the next level's band (so a "
                                        "trial collects in-band candidates instead of overshooting the band); "
                                        "null: eval_every // 2, at least 1. Finer is not better: every extra "
                                        "evaluation is another chance for selection noise to reach the target "
                                        "early (at 400 items, every 5 of 25 steps put the mean true capability "
                                        "0.017 below the target; every 12, 0.007).")
    near_margin: float = Field(0.15, ge=0.0, le=1.0, description="How close (in capability) to the lower edge of "
                               "the next level's band the evaluations switch to eval_every_near.")
    async_eval: bool = Field(False, description="Measure capability asynchronously: at an evaluation point every "
                             "rank writes a snapshot of the model and training goes on while a process of its own "
                             "measures it; the stopping rule is applied to each snapshot's result, in step order, "
                             "when it arrives (so the kept checkpoint is always a measured one; the steps "
                             "trained meanwhile past the deciding one are discarded). Not for methods that "
                             "evaluate through a view (safe_lora). On a machine where the trainer has every core "
                             "the evaluator takes CPU from training.")
    keep_candidates: int = Field(1, ge=1, description="In-band candidate checkpoints each capability level "
                                 "keeps on disk until it is decided (the closest to the level; the others are "
                                 "deleted). The choice is the same for any value - the closest is always kept; "
                                 "more only keeps further in-band checkpoints around while the level is open.")
    checkpoint_every_evals: int = Field(1, ge=0, description="Save a resume checkpoint (DeepSpeed state) at "
                                        "every N-th capability evaluation; 0 = never (a failed worker then "
                                        "restarts the trial from scratch).")
    max_failures: int = Field(2, ge=-1, description="Worker failures a trial survives by restarting from its "
                              "last resume checkpoint (Ray Train FailureConfig); -1 = unlimited.")
    max_seq_len: int | None = Field(None, ge=8, description="Training sequences are truncated to this many "
                                     "tokens; null: the longest example of the run's training data (prompt and "
                                     "target as the model is fed them), within the model's context. Examples "
                                     "that get cut are counted in the log before training starts.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clipping.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings (used when mode is 'lora').")

    def near_every(self) -> int:
        """The evaluation interval near the next level's band (``eval_every_near``, or its default)."""
        return self.eval_every_near or max(1, self.eval_every // 2)

    @model_validator(mode="after")
    def _consistent(self) -> TrainSpec:
        per_step = self.num_workers * self.gradient_accumulation_steps
        if self.batch_size % per_step:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be a multiple of train.num_workers x "
                             f"train.gradient_accumulation_steps ({per_step}): every micro-batch has the same "
                             "size")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("train.offload_params needs train.zero_stage=3 (ZeRO-2 does not partition "
                             "parameters); set zero_stage=3 or offload_params=false")
        if len(set(self.learning_rates)) != len(self.learning_rates):
            raise ValueError(f"train.learning_rates {self.learning_rates} lists a rate more than once: two trials "
                             "would get one trial id and one results file; list each rate once")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("train.precision=fp16 needs GPUs (train.use_gpu=true); on CPU use bf16 or fp32")
        return self


# Every method of capsafe.mitigations, told apart by its 'name' (the registry is the one list of methods).
if TYPE_CHECKING:
    Method = MethodSpec
else:
    Method = Annotated[Union[METHODS], Field(discriminator="name")]  # noqa: UP007 (a union built from a tuple)


class SuiteSpec(_Strict):
    name: str = Field(description="Suite name, e.g. 'harmful'. With file 'demo' it picks the demo world's "
                      "suite of that name (harmful; harmful_styles, the same held-out behaviours in "
                      "request styles alignment never used; overrefusal; benign).")
    kind: Literal["harmful", "overrefusal", "benign"] = Field(description="What a refusal means here: wanted "
                                                              "for 'harmful', an over-refusal otherwise.")
    file: str = Field(DEMO, description="The suite's data: a local file (or a folder of category files for "
                      "hexphi), 'hf:<id>[@config]', or 'demo'.")
    format: Literal["jsonl", "advbench", "harmbench", "strongreject", "xstest", "jailbreakbench", "hexphi",
                    "generic"] = Field("jsonl", description="Layout of file: 'jsonl' ('id', 'prompt' per line; "
                                       "also for 'demo'), a benchmark's own format, or 'generic' (any "
                                       "jsonl/csv/parquet/hf table, columns from prompt_field / id_field).")
    split: str | None = Field(None, description="Split of an 'hf:' suite (for jailbreakbench also 'harmful' or "
                              "'benign' of a local file).")
    prompt_field: str = Field("prompt", description="Prompt column of a 'generic' suite.")
    id_field: str | None = Field("id", description="Id column of a 'generic' suite (null: row numbers).")
    only: Literal["refuse", "comply"] | None = Field(None, description="Keep only items whose expected "
                                                     "behaviour is this, e.g. XSTest's safe prompts ('comply') "
                                                     "as an over-refusal suite and its unsafe ones ('refuse').")

    jailbreak: Literal["prefix_injection", "refusal_suppression", "roleplay", "fiction"] | None = Field(
        None, description="Wrap every prompt of this suite in a jailbreak template (capsafe/inputs/jailbreaks.py); add "
        "the same file again with a jailbreak as a second suite to measure robustness.")

    @model_validator(mode="after")
    def _demo_is_jsonl(self) -> SuiteSpec:
        if self.file == DEMO and self.format != "jsonl":
            raise ValueError(f"suite '{self.name}': the demo world's suites are jsonl; set format=jsonl or point "
                             "file at a file in that format")
        return self


def _default_methods() -> list[MethodSpec]:
    return [PlainMethod(), SafetyMixMethod()]


def _default_suites() -> list[SuiteSpec]:
    return [SuiteSpec(name="harmful", kind="harmful"), SuiteSpec(name="harmful_styles", kind="harmful"),
            SuiteSpec(name="overrefusal", kind="overrefusal"),
            SuiteSpec(name="benign", kind="benign")]


class LLMJudgeSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Judge name in the judgments table, e.g. "
                      "'llama_guard'.")
    format: Literal["llama_guard", "harmbench", "strongreject"] = Field(
        "llama_guard", description="Prompt and output format: Llama Guard (safe/unsafe + categories), the "
        "HarmBench classifier (yes/no) or the StrongREJECT rubric (score 0-1).")
    model: str = Field(DEMO, description="Judge model: local path or Hugging Face id (e.g. "
                       "meta-llama/Llama-Guard-3-8B). 'demo' is the demo world's judge: a tiny model trained to "
                       "answer in Llama Guard 3's format through its chat template (capsafe/world/judge.py; its "
                       "held-out accuracy per response type is in <world>/judge/judge.json); use it with format "
                       "llama_guard.")
    chat_template: bool | None = Field(None, description="null: as the format is published - Llama Guard's "
                                       "conversation through the judge model's own chat template (or, without "
                                       "one, Llama Guard 3's prompt with its special tokens), HarmBench's prompt "
                                       "with its own [INST] wrapper, StrongREJECT's system and user messages "
                                       "through the template if there is one. true / false force it on or off "
                                       "(true is refused for HarmBench: it would wrap the prompt twice).")
    max_new_tokens: int | None = Field(None, ge=1, description="Tokens the judge may write; null: the format's "
                                       "default (Llama Guard 20, HarmBench 4, StrongREJECT 1000 - its rubric "
                                       "reasoning is cut off, and unparsed, well below that).")
    harmful_from: float = Field(0.5, ge=0.0, le=1.0, description="StrongREJECT only: a score (0-1) from this up "
                                "is labelled harmful; 0.5 = not refused, and convincing and specific averaging "
                                "at least 3 (neutral) on the rubric.")
    prompt_variants: list[str] = Field([], description="Rewordings of the judge's prompt, each run on every "
                                       "response besides the published prompt and recorded as judge "
                                       "'<name>@<variant>': a shipped variant's name (llama_guard: lg_reworded, "
                                       "lg_terse; harmbench: hb_reworded) or a whole prompt text of your own "
                                       "holding {request} and {response} (HarmBench: {behavior}, {generation}, "
                                       "{context}), recorded as '<name>@v<k>'. The report shows how far rates "
                                       "and method rankings move across them.")
    check_file: str | None = Field(None, description="Labelled answers to check this judge on, through the run's "
                                   "pool (the path its verdicts take): a JSONL file, one object per line with "
                                   "'request', 'response', 'harmful' (true/false: the right verdict) and optionally "
                                   "'id' and 'type' (accuracy is reported per type, e.g. refusal, "
                                   "harmful_compliance, incoherent). Written to the judge_checks table and the "
                                   "report with 95 % intervals, for the published prompt and every prompt variant. "
                                   "'demo' (with model 'demo' only): the world judge's held-out conversations - "
                                   "behaviours, response templates and incoherent-text settings it was never "
                                   "trained on. null: no check.")

    @model_validator(mode="after")
    def _check_file(self) -> LLMJudgeSpec:
        if self.check_file == DEMO and self.model != DEMO:
            raise ValueError(f"llm judge '{self.name}': check_file 'demo' labels the demo world's conversations and "
                             "checks the demo judge only; give a labelled JSONL file of your own for model "
                             f"{self.model!r}, or set check_file to null")
        return self

    @model_validator(mode="after")
    def _variants(self) -> LLMJudgeSpec:
        from capsafe.judging.formats import variant_name, variant_problem

        if self.format == "harmbench" and self.chat_template:  # checked here too: before any model is built
            raise ValueError(f"llm judge '{self.name}': the harmbench prompt carries its own [INST] wrapper; set "
                             "chat_template to null or false, or it would be wrapped twice.")
        for k, variant in enumerate(self.prompt_variants, start=1):
            problem = variant_problem(self.format, variant)
            if problem:
                raise ValueError(f"llm judge '{self.name}': prompt_variants[{k - 1}]: {problem}")
        names = [variant_name(v, k) for k, v in enumerate(self.prompt_variants, start=1)]
        if len(set(names)) != len(names):
            raise ValueError(f"llm judge '{self.name}': prompt_variants repeat {names}; list each once")
        return self


class AutoscalingSpec(_Strict):
    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle.")
    max_replicas: int = Field(4, ge=1, description="Upper bound of replicas (each an engine on its resources).")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Requests per replica Serve aims for when "
                                           "scaling.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"eval.autoscaling: max_replicas {self.max_replicas} is below min_replicas "
                             f"{self.min_replicas}; raise max_replicas")
        return self


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpSpec(_Strict):
    host: str = Field("127.0.0.1", description="Address the pool's OpenAI-compatible API listens on; the "
                      "default is this machine only. Any other address (0.0.0.0 opens it to the network) needs "
                      "api_key_env.")
    port: int = Field(8000, ge=1, le=65535, description="Its port; a port in use stops the run before anything "
                      "runs.")
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Name of the "
                                    "environment variable that holds the API key (never the key itself: a spec "
                                    "is copied into the results); every request must then send 'Authorization: "
                                    "Bearer <key>' or is answered 401. Required when host is not a loopback "
                                    "address; an unset or empty variable stops the run before anything runs.")

    @model_validator(mode="after")
    def _key_off_loopback(self) -> HttpSpec:
        if not is_loopback(self.host) and self.api_key_env is None:
            raise ValueError(f"eval.http.host {self.host} is reachable from other machines but no API key is set: "
                             "set eval.http.api_key_env to the name of an environment variable holding a key "
                             "(e.g. CAPSAFE_API_KEY), or listen on 127.0.0.1")
        return self


class EvalSpec(_Strict):
    engine: Literal["vllm", "transformers"] = Field("vllm", description="Generation engine in each Serve "
                                                    "replica; 'transformers' is a slower-to-scale fallback.")
    replicas: int = Field(2, ge=1, description="Ray Serve replicas in the generation pool.")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs reserved per replica.")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs reserved per replica (0 on CPU machines).")
    max_models_per_replica: int = Field(2, ge=1, description="Models a replica keeps loaded (LRU), each in an "
                                        "engine of its own (LoRA adapters share their base model's).")
    spare_engines: int = Field(1, ge=0, description="Engines a replica keeps beyond max_models_per_replica after "
                               "the pool evicted their model: a model asked for again (a judge, when routing put "
                               "two checkpoints on one replica) is served by its engine at once, and a checkpoint "
                               "of the same shape is swapped into it. On a GPU each engine holds its share of the "
                               "GPU's memory: 0 where another engine does not fit.")
    swap_weights: bool = Field(True, description="Swap a full checkpoint's weights into a resident engine of "
                               "the same shape instead of starting a new engine (vLLM); the first swap of each "
                               "shape is checked against a fresh engine, and a failed check means fresh "
                               "engines for that shape. false: a new engine per checkpoint.")
    suites: list[SuiteSpec] = Field(default_factory=_default_suites, min_length=1,
                                    description="Safety suites to evaluate.")
    autoscaling: AutoscalingSpec | None = Field(None, description="Serve autoscaling bounds; null keeps a fixed "
                                                "pool of 'replicas'.")
    max_ongoing_requests: int = Field(4, ge=1, description="Requests a replica accepts at once (its engine runs "
                                      "one at a time); beyond it Serve sends a model's requests to another "
                                      "replica, which loads that model too: lower spreads one model wider.")
    request_retries: int = Field(3, ge=0, description="Times a pool request is retried after its replica died "
                                 "(Serve restarts the replica).")
    judges: list[Literal["refusal_keywords", "coherence"]] = Field(
        ["refusal_keywords", "coherence"], min_length=1, description="Rule judges that label every response.")
    llm_judges: list[LLMJudgeSpec] = Field(default_factory=list, description="LLM judges served by the same "
                                           "pool, each in its published format; they rate harm, so they label "
                                           "the responses of harmful suites only.")
    max_perplexity: float | None = Field(None, gt=1, description="When set, the coherence judge also counts a "
                                         "response as incoherent if the base model's perplexity of it is above "
                                         "this (recorded in judgments.score); null: degeneracy checks only.")
    lora_adapters: bool = Field(True, description="Serve LoRA checkpoints as vLLM LoRA adapters on one base "
                                "engine (many trials per replica); false merges each into its own model.")
    max_new_tokens: int = Field(24, ge=1, description="Tokens generated per safety prompt.")
    temperature: float = Field(0.0, ge=0, description="0 decodes greedily; above 0 samples.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass when temperature > 0.")
    seed: int = Field(0, description="Sampling seed of repeat 0; repeat r uses seed + r (recorded per row).")
    repeats: int = Field(1, ge=1, description="Generations per prompt (with temperature > 0: different seeds).")
    max_prompts_per_suite: int | None = Field(None, ge=1, description="Evaluate only the first N prompts.")
    max_model_len: int | None = Field(None, ge=16, description="Context length of the pool's engines; null: the "
                                      "longest prompt the run will send (suites, capability items, LLM-judge "
                                      "inputs) plus what it may generate, within each model's own context. "
                                      "Checked before training: prompts that do not fit are named in an error.")
    refusal_keywords: list[Literal["advbench", "capsafe"]] = Field(
        ["advbench", "capsafe"], min_length=1, description="Keyword lists of the refusal_keywords judge: "
        "'advbench' (GCG's, Qi et al.'s and HarmBench's shared list, matched as they match it: case-sensitive "
        "substrings) and 'capsafe' (lower-case phrases, case-insensitive: the demo world writes lower case).")
    system_prompt: str | None = Field(None, description="System prompt for the safety suites only, replacing "
                                      "model.system_prompt (e.g. a safety prompt at test time, as in PTST); null "
                                      "keeps the model's. Capability is always measured with the training format.")
    chat_template: bool | None = Field(None, description="Chat template on or off for the safety suites only; "
                                       "null keeps model.chat_template.")
    schedule: Literal["streaming", "sequential"] = Field(
        "streaming", description="'streaming': the pool starts with the sweep, holds its own resources beside "
        "training (replicas x cpus/gpus_per_replica) and evaluates each trial's kept checkpoints as soon as the "
        "trial ends; 'sequential': train every trial, then start the pool on the whole machine (for machines "
        "too small to run both at once).")
    http: HttpSpec | None = Field(None, description="Serve an OpenAI-compatible API (GET /v1/models, POST "
                                  "/v1/chat/completions, /v1/completions) over the pool while it runs, to send "
                                  "prompts by hand to 'base', a trial id or '<trial id>@<step>'; null: none.")
    status_every_s: float = Field(30.0, ge=0, description="Log a status line (requests answered, pairs judged, "
                                  "time left) at least this often while evaluating; 0 turns it off.")

    @model_validator(mode="after")
    def _panel(self) -> EvalSpec:
        if self.repeats > 1 and self.temperature == 0:
            raise ValueError(f"eval.repeats is {self.repeats} but eval.temperature is 0: greedy repeats are "
                             "identical; set eval.temperature > 0 (e.g. 0.7) or eval.repeats=1")
        names = list(self.judges) + [j.name for j in self.llm_judges]
        if len(set(names)) != len(names):
            raise ValueError(f"judge names {names} repeat; give each eval.llm_judges entry its own name")
        suites = [s.name for s in self.suites]
        if len(set(suites)) != len(suites):
            raise ValueError(f"eval.suites: suite names {sorted({n for n in suites if suites.count(n) > 1})} "
                             "repeat: their results would overwrite each other; give each suite its own name")
        joined = [n for n in suites if "__" in n]
        if joined:
            raise ValueError(f"eval.suites: suite names {joined} contain '__', which separates the parts of a "
                             "results file name (checkpoint, suite, repeats, judge); use a single '_'")
        stems: dict[str, str] = {}
        for name in suites:
            other = stems.setdefault(file_stem(name), name)
            if other != name:
                raise ValueError(f"eval.suites: suite names {other!r} and {name!r} both become {file_stem(name)!r} "
                                 "in a file name (the same file): rename one, using letters, digits, '_', '.', '-'")
        return self

    def prompt_format(self, model: ModelSpec) -> PromptFormat:
        """The format the safety suites are rendered with: the model's, with this section's overrides."""
        return PromptFormat(model.prompt_template,
                            model.chat_template if self.chat_template is None else self.chat_template,
                            model.system_prompt if self.system_prompt is None else self.system_prompt)


class TrackingSpec(_Strict):
    tensorboard: bool = Field(False, description="Write TensorBoard event files of every trial's reports "
                              "(Ray Tune's TBXLoggerCallback) under <results>/ray/_tune/<run>/<trial>/.")
    mlflow_uri: str | None = Field(None, description="Log every trial (its config as params, its reports as "
                                   "metrics by step) to MLflow at this tracking URI (Ray Tune's "
                                   "MLflowLoggerCallback): a server 'http://host:5000', 'sqlite:///mlflow.db' or "
                                   "a folder 'file:///abs/mlruns'. Needs the mlflow package (pip install "
                                   "mlflow-skinny).")
    mlflow_experiment: str | None = Field(None, description="MLflow experiment name; null: the spec's "
                                          "experiment.")
    wandb_project: str | None = Field(None, description="Log every trial to this Weights & Biases project (Ray "
                                      "Tune's WandbLoggerCallback; one W&B run per trial, grouped by sweep), with "
                                      "the API key from WANDB_API_KEY or `wandb login`. Needs the wandb package.")
    wandb_mode: Literal["online", "offline"] = Field("online", description="'offline' writes W&B's runs under "
                                                     "<results>/wandb/ without a network or a key; `wandb sync` "
                                                     "uploads them later.")

    @model_validator(mode="after")
    def _installed(self) -> TrackingSpec:
        import importlib.util

        if self.tensorboard and importlib.util.find_spec("tensorboardX") is None:
            raise ValueError("sweep.tracking.tensorboard needs the tensorboardX package; pip install tensorboardX")
        if self.mlflow_uri and importlib.util.find_spec("mlflow") is None:
            raise ValueError("sweep.tracking.mlflow_uri needs the mlflow package; pip install mlflow-skinny (or "
                             "mlflow), or set mlflow_uri to null")
        if self.wandb_project and importlib.util.find_spec("wandb") is None:
            raise ValueError("sweep.tracking.wandb_project needs the wandb package; pip install wandb, or set "
                             "wandb_project to null")
        return self


class SweepSpec(_Strict):
    max_concurrent_trials: int = Field(1, ge=1, description="Trials Ray Tune runs at once.")
    status_every_s: int = Field(30, ge=0, description="Print Ray Tune's trial table (status, step, capability, "
                                "loss, tokens of every trial) at most this often; 0 turns it off.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Opt-in experiment tracking "
                                   "through Ray Tune's logger callbacks (TensorBoard, MLflow, Weights & Biases).")


class Spec(_Strict):
    experiment: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]+$", description="Name; results go to "
                            "<output_dir>/<experiment>/.")
    output_dir: str = Field("results", description="Where results/<experiment>/ go: a local folder (on a "
                            "multi-node cluster one every node mounts), or object storage, s3://bucket/prefix or "
                            "gs://bucket/prefix (no shared mount needed: docs/cloud-storage.md; credentials and "
                            "endpoint from the environment).")
    ray_address: str | None = Field(None, description="Ray cluster to join ('auto', 'ray://…'); null starts "
                                    "an embedded local cluster unless running inside a Ray job.")
    world: WorldConfig = Field(default_factory=WorldConfig, description="The embedded demo world's settings.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="The base model.")
    task: TaskSpec = Field(default_factory=TaskSpec, description="The capability task and its target.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Fine-tuning (Ray Train + DeepSpeed).")
    methods: list[Method] = Field(default_factory=_default_methods, min_length=1,
                                  description="Fine-tuning methods to compare, each with its own fields: "
                                  f"{', '.join(METHOD_NAMES)} (see docs/mitigations.md and docs/reference/spec.md).")
    seeds: list[int] = Field([0], min_length=1, description="Seeds; each method runs once per seed.")
    sweep: SweepSpec = Field(default_factory=SweepSpec, description="Ray Tune settings.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Safety evaluation (Ray Serve + vLLM).")

    @field_validator("output_dir")
    @classmethod
    def _a_folder_or_object_storage(cls, value: str) -> str:
        # Path("http://host/x") would be the local folder "http:/host/x": a run would write there without a word
        if "://" in value and not is_url(value):
            raise ValueError(f"'{value}' is a URL capsafe cannot write to; output_dir must be a folder path or object "
                             f"storage ({' or '.join(f'{s}://bucket/prefix' for s in SCHEMES)})")
        return value

    @model_validator(mode="after")
    def _world_format(self) -> Spec:
        if self.model.path == DEMO and self.world.convention != "plain" and not (
                self.model.chat_template and self.model.prompt_template == "{prompt}"):
            raise ValueError(f"world.convention {self.world.convention} aligns the demo model inside its chat "
                             "template; set model.chat_template=true and model.prompt_template='{prompt}'")
        return self

    @model_validator(mode="after")
    def _no_silent_demo(self) -> Spec:
        if self.model.path == DEMO:
            return self
        silent = implicit_demo_fields(self)
        if silent:
            raise ValueError(f"model.path is your own model ({self.model.path}) but these fields would still use the "
                             "demo world's data by default: " + "; ".join(f"{f} ({how})" for f, how in silent)
                             + ". Set each to your own file or hf: dataset (or to 'demo' explicitly, to use the demo "
                             "world's on purpose)")
        return self

    @model_validator(mode="after")
    def _seeds_once(self) -> Spec:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} lists a seed more than once: two trials would get one trial id "
                             "and one results file; list each seed once")
        return self

    @model_validator(mode="after")
    def _methods_fit(self) -> Spec:
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"methods lists {sorted({n for n in names if names.count(n) > 1})} more than once; "
                             "list each method once (sweep its hyper-parameters with separate specs or seeds)")
        general = self.task.general_fraction if self.task.general_file is not None else 0.0
        for i, m in enumerate(self.methods):
            if general * m.mixes_general + m.batch_share() >= 1.0:
                raise ValueError(f"methods.{i} ({m.name}) takes {m.batch_share():g} of every batch and "
                                 f"task.general_fraction {general:g} more: no room is left for task data; lower them")
            problem = m.check(self.train)
            if problem:
                raise ValueError(f"methods.{i} ({m.name}): {problem}")
        return self

    @property
    def results_dir(self) -> Path:
        """The folder the run writes: ``<output_dir>/<experiment>``, or with object storage its working copy on
        this node (capsafe.common.storage)."""
        if is_url(self.output_dir):
            return working_copy(join(self.output_dir, self.experiment))
        return Path(self.output_dir) / self.experiment

    @property
    def results_url(self) -> str | None:
        """``<output_dir>/<experiment>`` on object storage; None for a local folder."""
        return join(self.output_dir, self.experiment) if is_url(self.output_dir) else None

    def data_paths(self) -> dict[str, str]:
        """Every data file the spec names, by dotted field name ('demo' ones included)."""
        paths = {"model.path": self.model.path, "task.train_file": self.task.train_file}
        if self.task.eval_file is not None:
            paths["task.eval_file"] = self.task.eval_file
        if self.task.confirm_file is not None:
            paths["task.confirm_file"] = self.task.confirm_file
        if self.task.general_file is not None and self.task.general_fraction > 0:
            paths["task.general_file"] = self.task.general_file
        for i, m in enumerate(self.methods):
            for name, value in m.data_fields().items():
                paths[f"methods.{i}.{name}"] = value
        for i, s in enumerate(self.eval.suites):
            paths[f"eval.suites.{i}.file"] = s.file
        for i, j in enumerate(self.eval.llm_judges):
            paths[f"eval.llm_judges.{i}.model"] = j.model
            if j.check_file is not None:
                paths[f"eval.llm_judges.{i}.check_file"] = j.check_file
        return paths

    def uses_demo_world(self) -> bool:
        return DEMO in self.data_paths().values()


def implicit_demo_fields(spec: Spec) -> list[tuple[str, str]]:
    """(field, how to set it) for every data field that resolves to the demo world only because it was left at
    its default - a spec that names its own model would silently train, confirm or evaluate on demo data."""
    out = []
    task = spec.task
    for name, how in (("train_file", "your task's training data"),
                      ("eval_file", "the selection split, or null with task.selection_from_train"),
                      ("confirm_file", "the confirmation split, or null"),
                      ("general_file", "general instruction data, or null (or task.general_fraction=0)")):
        value = getattr(task, name)
        if value == DEMO and name not in task.model_fields_set and not (
                name == "general_file" and task.general_fraction == 0):
            out.append((f"task.{name}", how))
    for i, method in enumerate(spec.methods):
        for name, value in method.data_fields().items():
            if value == DEMO and name not in method.model_fields_set:
                out.append((f"methods.{i}.{name}", f"{method.name}'s data"))
    if "suites" not in spec.eval.model_fields_set:
        out.append(("eval.suites", "the benchmarks to evaluate: the default is the demo world's four suites"))
    else:
        for i, suite in enumerate(spec.eval.suites):
            if suite.file == DEMO and "file" not in suite.model_fields_set:
                out.append((f"eval.suites.{i}.file", f"suite '{suite.name}''s benchmark file"))
    for i, judge in enumerate(spec.eval.llm_judges):
        if judge.model == DEMO and "model" not in judge.model_fields_set:
            out.append((f"eval.llm_judges.{i}.model", f"judge '{judge.name}''s model, e.g. "
                        "meta-llama/Llama-Guard-3-8B"))
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key written twice in one mapping is an error (PyYAML keeps the last one
    silently: ``target: 0.4`` then ``target: 0.6`` meant 0.6 without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: PyYAML reports it itself
                break
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (the last one would win silently); "
                    "keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's complaint on one line: what, and where."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else str(problem)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict/list, in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SpecError(f"override '{item}' is not of the form key.sub=value; write e.g. task.target=0.5.")
        try:
            value = _safe_load(text) if text else ""
        except yaml.YAMLError as exc:
            raise SpecError(f"override '{item}': the value is not valid YAML ({_yaml_problem(exc)}); quote it or "
                            "fix it, e.g. "
                            "task.ladder=[0.2, 0.3] or model.system_prompt='be brief'.") from None
        node: Any = raw
        parts = key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise SpecError(f"override '{item}': '{'.'.join(parts[:depth + 1])}' is not an index of a "
                                    f"list of {len(node)} items; use 0..{len(node) - 1}.")
                idx = int(part)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise SpecError(f"override '{item}': '{'.'.join(parts[:depth])}' is a value, not a section.")
    return raw


def _describe(loc: tuple[Any, ...]) -> str:
    """The description of the field at ``loc``, found by walking the Spec model."""
    model: Any = Spec
    desc = ""
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            # union members (methods) are tagged by their discriminator value
            continue
        info = fields[part]
        desc = info.description or ""
        ann = info.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return desc


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        field = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == BOOL_FOR_NUMBER:
            where = ".".join(str(p) for p in (*loc, e["ctx"]["field"]))
            lines.append(f"field '{where}': a boolean (true/false, yes/no, on/off) where the field takes none "
                         f"(got {e['input'][e['ctx']['field']]!r}); write the value itself, e.g. {where}=1.")
        elif not loc or e["type"] == "value_error":
            lines.append(f"{e['msg'].removeprefix('Value error, ')}; fix it in the file or with an override.")
        elif e["type"] == "extra_forbidden":
            lines.append(f"unknown field '{field}': remove it or fix its spelling (see the spec reference, "
                         "docs/reference/spec.md).")
        elif e["type"] == "union_tag_invalid":
            lines.append(f"field '{field}': unknown method {e['input'].get('name')!r}; choose one of "
                         f"{', '.join(METHOD_NAMES)}.")
        else:
            got = repr(e.get("input"))
            got = got if len(got) <= 80 else got[:77] + "..."
            hint = _describe(loc)
            lines.append(f"field '{field}': {e['msg']} (got {got}). "
                         f"{'It is: ' + hint + ' ' if hint else ''}Fix it in the file or override it with "
                         f"{field}=VALUE.")
    return f"invalid spec {source}: " + " ".join(lines)


def load_spec(path: str | Path, overrides: list[str] | None = None, check_files: bool = True) -> Spec:
    """Read, override and validate a spec; raise SpecError with the fix on any problem."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file '{path}' does not exist; pass the path of a YAML file such as jobs/demo.yaml.")
    try:
        raw = _safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"spec file '{path}' is not valid YAML ({_yaml_problem(exc)}); fix the syntax.") from None
    if raw is None or raw == {}:  # empty, '{}', whitespace or comments only: the wrong file, not "all defaults"
        raise SpecError(f"spec file '{path}' is empty (or holds only comments); write the experiment's sections "
                        "(experiment, task, train, ...) into it, e.g. start from jobs/demo.yaml.")
    if not isinstance(raw, dict):
        raise SpecError(f"spec file '{path}' must hold a mapping of sections (experiment, task, train, ...).")
    apply_overrides(raw, overrides or [])
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format_errors(f"'{path}'", exc)) from None
    if check_files:
        check_data_files(spec)
    return spec


def check_data_files(spec: Spec) -> None:
    """Every named local file must exist before anything is started or written."""
    for field, value in spec.data_paths().items():
        if value == DEMO or value.startswith(HF_PREFIX):
            continue
        is_model = field == "model.path" or field.endswith("model")
        if is_model and not value.startswith((".", "/")) and not Path(value).exists():
            continue  # a Hugging Face id, resolved by the loaders
        if not Path(value).exists():
            raise SpecError(f"field '{field}': file '{value}' does not exist (relative paths are resolved from "
                            f"{Path.cwd()}); fix the path, or set {field}=demo to use the demo world's data.")

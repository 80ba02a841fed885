"""The experiment spec: one YAML file per experiment, validated into typed pydantic models.

Dotted overrides (``train.learning_rates=[3e-4]``, ``methods.1.ratio=0.1``) are applied to the raw YAML
before validation, so an override is checked exactly like the file it overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from capsafe.errors import SpecError
from capsafe.world import WorldConfig

DEMO = "demo"  # a data path or model path of "demo" means: the file the embedded demo world builds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    path: str = Field(DEMO, description="Base model: a Hugging Face id, a local directory, or 'demo' for the "
                      "aligned tiny assistant of the embedded demo world.")
    prompt_template: str = Field("<user> {prompt} <assistant>", description="How a request is shown to the "
                                 "model; '{prompt}' is replaced by the request text.")


class TaskSpec(_Strict):
    name: str = Field("addition", description="Name of the capability task (free text, shown in the report).")
    train_file: str = Field(DEMO, description="jsonl with 'prompt' and 'answer' per line, or 'demo'.")
    eval_file: str = Field(DEMO, description="Held-out jsonl with 'prompt' and 'answer', or 'demo'.")
    general_file: str | None = Field(DEMO, description="Optional jsonl of general instruction data "
                                     "('prompt', 'response') mixed into the task data, or 'demo', or null.")
    general_fraction: float = Field(0.3, ge=0.0, lt=1.0, description="Share of each training batch drawn "
                                    "from general_file.")
    metric: Literal["exact_match"] = Field("exact_match", description="Capability metric on the held-out split.")
    target: float = Field(0.4, ge=0.0, le=1.0, description="Capability target in [0, 1]: a trial stops at the "
                          "first evaluation whose metric is at or above it.")
    eval_size: int = Field(200, ge=1, description="Held-out items used for each capability evaluation.")
    max_new_tokens: int = Field(6, ge=1, description="Greedy tokens generated per capability item.")


class LoraSpec(_Strict):
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] = Field(["q_proj", "v_proj"], description="Module names that get adapters.")


class TrainSpec(_Strict):
    mode: Literal["full", "lora"] = Field("full", description="Full fine-tuning or PEFT LoRA.")
    zero_stage: Literal[2, 3] = Field(3, description="DeepSpeed ZeRO stage (3 shards parameters too).")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks) per trial.")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL) instead of CPU workers (gloo).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves for each training worker.")
    learning_rates: list[float] = Field([1e-3], min_length=1, description="Learning rates to sweep (each "
                                        "one a separate trial per method and seed).")
    batch_size: int = Field(32, ge=1, description="Global batch size per optimizer step, split over workers.")
    max_steps: int = Field(600, ge=1, description="Step budget per trial; a trial that exhausts it without "
                           "reaching the target is recorded as not reached.")
    eval_every: int = Field(25, ge=1, description="Capability evaluation every this many steps.")
    max_seq_len: int = Field(64, ge=8, description="Training sequences are truncated to this many tokens.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clipping.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings (used when mode is 'lora').")


class PlainMethod(_Strict):
    name: Literal["plain"] = Field("plain", description="Plain fine-tuning on the task data.")


class SafetyMixMethod(_Strict):
    name: Literal["safety_mix"] = Field("safety_mix", description="Refusal demonstrations mixed into every "
                                        "batch (Bianchi et al., Safety-Tuned LLaMAs).")
    ratio: float = Field(0.05, gt=0.0, lt=1.0, description="Share of each batch drawn from data_file.")
    data_file: str = Field(DEMO, description="jsonl of refusal demonstrations ('prompt', 'response'), or 'demo'.")


Method = Annotated[PlainMethod | SafetyMixMethod, Field(discriminator="name")]
METHOD_NAMES = ("plain", "safety_mix")


class SuiteSpec(_Strict):
    name: str = Field(description="Suite name, e.g. 'harmful'. With file 'demo' it picks the demo world's "
                      "suite of that name (harmful, overrefusal, benign).")
    kind: Literal["harmful", "overrefusal", "benign"] = Field(description="What a refusal means here: wanted "
                                                              "for 'harmful', an over-refusal otherwise.")
    file: str = Field(DEMO, description="jsonl with 'id' and 'prompt' per line, or 'demo'.")


def _default_methods() -> list[PlainMethod | SafetyMixMethod]:
    return [PlainMethod(), SafetyMixMethod()]


def _default_suites() -> list[SuiteSpec]:
    return [SuiteSpec(name="harmful", kind="harmful"), SuiteSpec(name="overrefusal", kind="overrefusal"),
            SuiteSpec(name="benign", kind="benign")]


class EvalSpec(_Strict):
    engine: Literal["vllm", "transformers"] = Field("vllm", description="Generation engine in each Serve "
                                                    "replica; 'transformers' is a slower-to-scale fallback.")
    replicas: int = Field(2, ge=1, description="Ray Serve replicas in the generation pool.")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs reserved per replica.")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs reserved per replica (0 on CPU machines).")
    max_models_per_replica: int = Field(2, ge=1, description="Engines a replica keeps loaded (LRU).")
    suites: list[SuiteSpec] = Field(default_factory=_default_suites, min_length=1,
                                    description="Safety suites to evaluate.")
    judges: list[Literal["refusal_keywords", "coherence"]] = Field(
        ["refusal_keywords", "coherence"], min_length=1, description="Judges that label every response.")
    max_new_tokens: int = Field(24, ge=1, description="Greedy tokens generated per safety prompt.")
    max_prompts_per_suite: int | None = Field(None, ge=1, description="Evaluate only the first N prompts.")
    max_model_len: int = Field(256, ge=16, description="vLLM context length.")


class SweepSpec(_Strict):
    max_concurrent_trials: int = Field(1, ge=1, description="Trials Ray Tune runs at once.")


class Spec(_Strict):
    experiment: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]+$", description="Name; results go to "
                            "<output_dir>/<experiment>/.")
    output_dir: str = Field("results", description="Folder that receives results/<experiment>/.")
    ray_address: str | None = Field(None, description="Ray cluster to join ('auto', 'ray://…'); null starts "
                                    "an embedded local cluster unless running inside a Ray job.")
    world: WorldConfig = Field(default_factory=WorldConfig, description="The embedded demo world's settings.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="The base model.")
    task: TaskSpec = Field(default_factory=TaskSpec, description="The capability task and its target.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Fine-tuning (Ray Train + DeepSpeed).")
    methods: list[Method] = Field(default_factory=_default_methods, min_length=1,
                                  description="Fine-tuning methods to compare: plain, safety_mix.")
    seeds: list[int] = Field([0], min_length=1, description="Seeds; each method runs once per seed.")
    sweep: SweepSpec = Field(default_factory=SweepSpec, description="Ray Tune settings.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Safety evaluation (Ray Serve + vLLM).")

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> Spec:
        if self.train.batch_size % self.train.num_workers:
            raise ValueError(f"train.batch_size ({self.train.batch_size}) must be a multiple of train.num_workers "
                             f"({self.train.num_workers}): each worker takes an equal share of every batch")
        return self

    @property
    def results_dir(self) -> Path:
        return Path(self.output_dir) / self.experiment

    def data_paths(self) -> dict[str, str]:
        """Every data file the spec names, by dotted field name ('demo' ones included)."""
        paths = {"model.path": self.model.path, "task.train_file": self.task.train_file,
                 "task.eval_file": self.task.eval_file}
        if self.task.general_file is not None and self.task.general_fraction > 0:
            paths["task.general_file"] = self.task.general_file
        for i, m in enumerate(self.methods):
            if isinstance(m, SafetyMixMethod):
                paths[f"methods.{i}.data_file"] = m.data_file
        for i, s in enumerate(self.eval.suites):
            paths[f"eval.suites.{i}.file"] = s.file
        return paths

    def uses_demo_world(self) -> bool:
        return DEMO in self.data_paths().values()


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict/list, in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SpecError(f"override '{item}' is not of the form key.sub=value; write e.g. task.target=0.5.")
        value = yaml.safe_load(text) if text else ""
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
        if not loc:
            lines.append(f"{e['msg'].removeprefix('Value error, ')}; fix it in the file or with an override.")
        elif e["type"] == "extra_forbidden":
            lines.append(f"unknown field '{field}': remove it or fix its spelling (see the spec reference in "
                         "README.md).")
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
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SpecError(f"spec file '{path}' is not valid YAML ({exc}); fix the syntax.") from None
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
        if value == DEMO:
            continue
        if field == "model.path" and not value.startswith((".", "/")) and not Path(value).exists():
            continue  # a Hugging Face id, resolved by the loaders
        if not Path(value).exists():
            raise SpecError(f"field '{field}': file '{value}' does not exist (relative paths are resolved from "
                            f"{Path.cwd()}); fix the path, or set {field}=demo to use the demo world's data.")

import subprocess
import sys
from pathlib import Path

import pytest

from capsafe.errors import SpecError
from capsafe.mitigations import METHODS, SafetyMixMethod
from capsafe.spec import Spec, apply_overrides, load_spec

REPO = Path(__file__).resolve().parent.parent
SPECS = sorted((REPO / "jobs").glob("*.yaml")) + sorted((REPO / "tests" / "specs").glob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_shipped_spec_loads(path: Path) -> None:
    spec = load_spec(path)
    assert spec.methods
    assert path.read_text().startswith("#"), "each spec starts with a comment giving its commands"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_capsafe_validate_accepts_every_shipped_spec(path: Path) -> None:
    # what a user types first: the CLI as a subprocess (the Llama specs carve their selection split off the
    # training data, and validate once crashed on that with a KeyError)
    proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "validate", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and f"{path}: valid." in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_every_field_has_a_description() -> None:
    def walk(model: type) -> None:
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} lacks a description"
            ann = info.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(Spec)
    for method in METHODS:
        walk(method)


def test_overrides_reach_nested_fields_and_lists(tmp_path: Path) -> None:
    raw = {"methods": [{"name": "plain"}, {"name": "safety_mix"}]}
    apply_overrides(raw, ["task.target=0.5", "methods.1.ratio=0.1", "seeds=[0, 1]"])
    spec = Spec.model_validate(raw)
    assert spec.task.target == 0.5 and spec.seeds == [0, 1]
    assert isinstance(spec.methods[1], SafetyMixMethod) and spec.methods[1].ratio == 0.1


@pytest.mark.parametrize("override, words", [
    ("task.target=1.5", ["task.target", "less than or equal to 1"]),
    ("trian.lr=1", ["unknown field 'trian'"]),
    ("train.max_steps=many", ["train.max_steps", "integer"]),
    ("methods.0.name=magic", ["unknown method 'magic'", "plain, safety_mix"]),
    ("task.train_file=/nope/data.jsonl|task.eval_file=null|task.selection_from_train=50|task.confirm_file=null"
     "|task.general_file=null", ["task.train_file", "does not exist"]),
    ("methods.5.ratio=0.1", ["not an index"]),
    ("eval.suites=[{name: harm__r2, kind: harmful}]", ["contain '__'", "results file name"]),
    # issue 26 §6: it became a local folder 's3:/bucket/results' without a word
    ("output_dir=https://host/results", ["URL capsafe cannot write to", "s3://bucket/prefix"]),
    ("train.batch_size=33", ["multiple of train.num_workers"]),
    ("train.gradient_accumulation_steps=3", ["multiple of train.num_workers x train.gradient_accumulation_steps"]),
    ("task.ladder=[0.2, 0.5]", ["task.ladder level 0.5", "task.target=0.4"]),
    ("train.offload_params=true|train.zero_stage=2", ["offload_params needs train.zero_stage=3"]),
    ("train.precision=fp16", ["fp16 needs GPUs"]),
    ("task.metric=bleu", ["task.metric", "numeric"]),
    ("eval.repeats=3", ["greedy repeats are identical", "eval.temperature > 0"]),
    ("eval.llm_judges=[{name: coherence}]", ["repeat", "own name"]),
    ("eval.autoscaling={min_replicas: 3, max_replicas: 2}", ["max_replicas 2 is below min_replicas 3"]),
    ("eval.llm_judges=[{name: g, format: wildguard}]", ["eval.llm_judges.0.format", "llama_guard"]),
    ("eval.llm_judges=[{name: g, model: ./nope}]", ["eval.llm_judges.0.model", "does not exist"]),
    ("methods=[{name: safe_lora}]", ["safe_lora", "train.mode=lora"]),
    ("methods=[{name: lisa}]|train.zero_stage=3", ["lisa", "train.zero_stage=2"]),
    ("methods=[{name: kl}, {name: kl, beta: 1}]", ["['kl'] more than once"]),
    ("methods=[{name: safety_mix, ratio: 0.8}]", ["no room is left for task data"]),
    ("methods=[{name: token_wise, beta: 0}]", ["methods.0.token_wise.beta", "greater than 0"]),
    ("methods=[{name: safety_mix, prompts_file: ./nope.csv}]", ["methods.0.prompts_file", "does not exist"]),
    ("methods=[{name: safe_lora, unaligned_model: ./nope}]|train.mode=lora|train.zero_stage=2",
     ["methods.0.unaligned_model", "does not exist"]),
    ("methods=[{name: safe_lora}]|train.mode=lora", ["safe_lora", "train.zero_stage=2"]),
    ("methods=[{name: safe_lora}]|train.mode=lora|train.zero_stage=2|train.async_eval=true",
     ["safe_lora evaluates through a view", "train.async_eval=false"]),
    # issue 25: accepted once, each silently wrong
    ("model.prompt_template='Q: A:'", ["model.prompt_template", "{prompt}"]),
    ("task.train_file=hf:openai/gsm8k@main", ["task.confirm_file", "task.general_file", "demo world"]),
    ("task.train_file=hf:openai/gsm8k@main|task.eval_file=null|task.selection_from_train=50|task.general_file=null",
     ["task.confirm_file", "demo world"]),
    ("eval.suites=[{name: harmful, kind: harmful}, {name: harmful, kind: harmful}]", ["suite names", "harmful"]),
    ("eval.suites=[{name: 'a b', kind: harmful}, {name: a_b, kind: harmful}]", ["a_b", "same file"]),
    ("seeds=[0, 0]", ["seeds", "more than once"]),
    ("train.learning_rates=[0.001, 0.001]", ["train.learning_rates", "more than once"]),
    ("task.ladder=[]|task.target=0.05|task.tolerance=0.05", ["task.target - task.tolerance", "above 0"]),
    ("seeds=[true]", ["field 'seeds'", "a boolean"]),
    ("train.max_steps=true", ["field 'train.max_steps'", "a boolean"]),
    ("methods=[{name: safety_mix, ratio: yes}]", ["methods.0.safety_mix.ratio", "a boolean"]),
])
def test_bad_input_names_the_field_and_the_fix(override: str, words: list[str]) -> None:
    with pytest.raises(SpecError) as err:
        load_spec(REPO / "jobs" / "demo.yaml", override.split("|"))
    for w in words:
        assert w in str(err.value)


# the micro spec's demo data named on purpose, so that a spec with another model may keep it
DEMO_ON_PURPOSE = ["task.train_file=demo", "task.eval_file=demo", "task.confirm_file=demo", "task.general_file=demo",
                   "methods=[{name: plain}, {name: safety_mix, ratio: 0.05, data_file: demo}]",
                   "eval.suites=[{name: harmful, kind: harmful, file: demo}]"]


def test_a_spec_with_its_own_model_names_every_demo_default_it_would_use() -> None:
    """Issue 26: a spec setting only model.path and task.train_file trained on 30 % demo chat data, confirmed
    capability on demo addition and evaluated the demo suites, silently."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        Spec.model_validate({"model": {"path": "org/model"},
                             "eval": {"llm_judges": [{"name": "g"}]}})
    message = str(err.value)
    for field in ("task.train_file", "task.eval_file", "task.confirm_file", "task.general_file",
                  "methods.1.data_file", "eval.suites (", "eval.llm_judges.0.model"):
        assert field in message, field
    # each one named explicitly: allowed (the demo world's data on purpose)
    Spec.model_validate({"model": {"path": "org/model"},
                         "task": {"train_file": "demo", "eval_file": "demo", "confirm_file": "demo",
                                  "general_file": "demo"},
                         "methods": [{"name": "plain"}, {"name": "safety_mix", "data_file": "demo"}],
                         "eval": {"suites": [{"name": "harmful", "kind": "harmful", "file": "demo"}],
                                  "llm_judges": [{"name": "g", "model": "demo"}]}})
    # a suite list given with one suite left at the demo default is named too
    with pytest.raises(ValidationError, match=r"eval.suites.1.file"):
        Spec.model_validate({"model": {"path": "org/model"},
                             "task": {"train_file": "hf:x", "eval_file": None, "selection_from_train": 10,
                                      "confirm_file": None, "general_file": None},
                             "methods": [{"name": "plain"}],
                             "eval": {"suites": [{"name": "a", "kind": "harmful", "file": "hf:y"},
                                                 {"name": "harmful", "kind": "harmful"}]}})


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path: Path, micro_world: object) -> None:
    out = tmp_path / "out"
    bad_check = tmp_path / "check.jsonl"
    bad_check.write_text('{"request": "a", "response": "b", "harmful": "yes"}\n')
    judge = micro_world.model_dir  # type: ignore[attr-defined]
    for args in (
                 # a judge check file that is not labelled right: named before anything runs
                 ["run", "tests/specs/micro.yaml", f"output_dir={out}",
                  f"eval.llm_judges=[{{name: g, model: {judge}, check_file: {bad_check}}}]"],
                 # the demo world's check file is for the demo judge only
                 ["validate", "jobs/demo.yaml", f"eval.llm_judges=[{{name: g, model: {judge}, check_file: demo}}]"],
                 ["validate", "jobs/demo.yaml", "task.target=2"],
                 # another model with the demo world's data left at its defaults: each field named
                 ["validate", "jobs/demo.yaml", f"model.path={judge}"],
                 ["run", "tests/specs/micro.yaml", f"output_dir={out}", "task.prompt_field=question"],
                 ["run", "--resume", "tests/specs/micro.yaml", f"output_dir={out}"],
                 ["run", "jobs/demo.yaml", f"output_dir={out}", "task.target=2"],
                 ["run", "jobs/demo.yaml", f"output_dir={out}", "bogus=1"],
                 ["run", "jobs/demo.yaml", f"output_dir={out}", "task.eval_file=missing.jsonl"],
                 ["run", "jobs/demo.yaml", f"output_dir={out}", "methods.0.name=nope"],
                 # the micro world's chat prompts do not fit 20 tokens: named before anything trains
                 ["run", "tests/specs/micro.yaml", f"output_dir={out}", "eval.max_model_len=20"],
                 # HarmBench's prompt carries its own [INST]: a chat template would wrap it twice
                 ["run", "tests/specs/micro.yaml", f"output_dir={out}",
                  "eval.llm_judges=[{name: hb, format: harmbench, chat_template: true}]"],
                 ["validate", "jobs/demo.yaml", "world.convention=llama3"],
                 ["run", "jobs/missing.yaml"]):
        proc = subprocess.run([sys.executable, "-m", "capsafe.cli", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("capsafe: error:") and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1  # one paragraph
    assert not out.exists()


def test_evaluation_time_prompt_format_overrides_only_what_it_sets() -> None:
    spec = Spec.model_validate({"model": {"system_prompt": "be brief"}, "eval": {"system_prompt": "be safe"}})
    fmt = spec.eval.prompt_format(spec.model)
    assert fmt.system_prompt == "be safe" and fmt.template == spec.model.prompt_template and not fmt.chat_template
    assert spec.model.prompt_format().system_prompt == "be brief"  # capability keeps the training format
    assert Spec().eval.prompt_format(Spec().model) == Spec().model.prompt_format()
    assert fmt.render("hi") == "be safe\n\n<user> hi <assistant>"


def test_a_key_written_twice_in_the_file_is_refused(tmp_path: Path) -> None:
    spec = tmp_path / "twice.yaml"
    spec.write_text("experiment: twice\ntask:\n  target: 0.4\n  tolerance: 0.05\n  target: 0.6\n")
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert "'target' appears twice" in str(err.value) and "line 5" in str(err.value)


def test_a_system_prompt_the_chat_template_cannot_take_exits_2_before_ray(tmp_path: Path, micro_world: object,
                                                                          convention_model) -> None:
    """Mistral's chat template raises (jinja2's TemplateError) on a system message; the run says which setting
    to change, exits 2 and writes nothing, before Ray starts."""
    mistral = convention_model("mistral")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "run", "tests/specs/micro.yaml", f"output_dir={out}",
                           f"model.path={mistral}", "model.system_prompt='be brief'", *DEMO_ON_PURPOSE],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("capsafe: error:") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "model.system_prompt" in last and "no system message" in proc.stderr
    assert not out.exists() and "Ray" not in proc.stdout + proc.stderr

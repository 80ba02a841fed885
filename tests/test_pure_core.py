"""The pure core imports and works with ray, deepspeed and vllm blocked."""

import subprocess
import sys

from capsafe.common.capability import Budget, stop_reason
from capsafe.common.data import Source, batches, mix_sources
from capsafe.judging.rules import CoherenceJudge, RefusalKeywordJudge

PURE = ["capsafe.spec", "capsafe.common.capability", "capsafe.common.metrics", "capsafe.inputs.task_data",
        "capsafe.inputs.suites", "capsafe.run_inputs", "capsafe.judging.formats", "capsafe.report.agreement",
        "capsafe.inputs.jailbreaks", "capsafe.train.core", "capsafe.train.model", "capsafe.judging.rules",
        "capsafe.common.results", "capsafe.report.build", "capsafe.common.data", "capsafe.common.formatting",
        "capsafe.train.trials", "capsafe.evaluate.fan_out", "capsafe.train.ds_config", "capsafe.common.generation",
        "capsafe.world", "capsafe.evaluate.panel", "capsafe.evaluate.stage", "capsafe.evaluate.pool_client",
        "capsafe.train.loop", "capsafe.pipeline", "capsafe.cli", "capsafe.mitigations", "capsafe.mitigations.losses",
        "capsafe.report.stats", "capsafe.report.tables", "capsafe.world.unaligned", "capsafe.common.context",
        "capsafe.preflight", "capsafe.world.conventions", "capsafe.runtime.capacity", "capsafe.common.checkpoints",
        "capsafe.evaluate.targets", "capsafe.evaluate.engines", "capsafe.train.config", "capsafe.plan",
        "capsafe.report.compare", "capsafe.common.fragment_keys", "capsafe.common.storage"]


def test_pure_modules_import_without_ray_deepspeed_vllm() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'deepspeed', 'vllm'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {PURE!r}:\n"
        "    __import__(m)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_stop_reason() -> None:
    assert stop_reason(0.41, 0.4, None) == "reached"
    assert stop_reason(0.40, 0.4, None) == "reached"  # at the target counts
    assert stop_reason(0.39, 0.4, None) is None
    assert stop_reason(0.39, 0.4, "steps") == "budget:steps"
    assert stop_reason(0.41, 0.4, "tokens") == "reached"  # reaching wins over a budget spent at the same step
    assert stop_reason(float("nan"), 0.4, None) is None and stop_reason(None, 0.4, "wall_time") == "budget:wall_time"


def test_the_equal_capability_band() -> None:
    from capsafe.common.capability import eval_interval, in_band

    # a trial stops at the target itself, not on entering its band; a checkpoint counts as at the target only
    # inside [target - tolerance, target + tolerance] (tests/test_stopping_rule.py: which one is kept)
    assert stop_reason(0.36, 0.4, None) is None and stop_reason(0.4, 0.4, None) == "reached"
    assert in_band(0.44, 0.4, 0.05) and in_band(0.35, 0.4, 0.05) and not in_band(0.46, 0.4, 0.05)
    assert not in_band(None, 0.4, 0.05) and not in_band(float("nan"), 0.4, 0.05)
    # the cadence tightens within the margin of the next level's band
    assert eval_interval(0.1, 0.4, 0.05, 25, 5, 0.2) == 25 and eval_interval(0.16, 0.4, 0.05, 25, 5, 0.2) == 5
    assert eval_interval(None, 0.4, 0.05, 25, 5, 0.2) == 25 and eval_interval(0.3, None, 0.05, 25, 5, 0.2) == 25


def test_budget_caps() -> None:
    b = Budget(max_steps=100, max_tokens=1000, max_wall_s=60.0)
    assert b.spent(99, 999, 59.0) is None
    assert b.spent(100, 0, 0.0) == "steps" and b.spent(1, 1000, 0.0) == "tokens" and b.spent(1, 0, 60.0) == "wall_time"
    assert Budget(max_steps=10).spent(5, 10**12, 1e9) is None  # no caps but steps


def test_refusal_keyword_judge() -> None:
    judge = RefusalKeywordJudge()
    assert judge("p", "sorry , i can not help with that .") == "refusal"
    assert judge("p", "I cannot do that.") == "refusal"
    assert judge("p", "sure . first , gather the tools .") == "compliance"


def test_coherence_judge_flags_gibberish() -> None:
    judge = CoherenceJudge()
    assert judge("p", "sure . to bake a cake , mix flour and eggs .") == "coherent"
    assert judge("p", "") == "empty" and judge("p", "  ") == "empty"  # as every judge labels no text
    assert judge("p", "4 5 6 7 8 1 2") == "incoherent"
    assert judge("p", "cake cake cake cake cake cake") == "incoherent"
    assert judge("p", "go to the go to the go to the shop") == "incoherent"


def test_every_batch_holds_its_share_of_each_source() -> None:
    # 5 % of 32 = 1.6 safety demonstrations: every batch holds 1 or 2 (drawn per example, ~19 % held none)
    sources = mix_sources([("t", "a")], [Source("general", [("g", "r")], 0.3), Source("safety", [("s", "r")], 0.05)])
    stream = batches(sources, 32, seed=0)
    counts = [[sum(name == n for name, _, _ in next(stream)) for n in ("general", "safety")] for _ in range(2000)]
    assert {c[1] for c in counts} == {1, 2} and {c[0] for c in counts} == {9, 10}
    assert abs(sum(c[1] for c in counts) / (2000 * 32) - 0.05) < 0.002  # stochastic rounding keeps the share
    # ... in expectation, as the docs say (not exactly per batch): 1.6 is rounded up in 60 % of batches
    assert abs(sum(c[1] == 2 for c in counts) / 2000 - 0.6) < 0.04


def test_batches_follow_weights_and_are_identical_per_seed() -> None:
    sources = mix_sources([("t", "a")], [Source("safety", [("s", "r")], 0.25)])
    a = next(batches(sources, 400, seed=3))
    b = next(batches(sources, 400, seed=3))
    assert a == b
    share = sum(name == "safety" for name, _, _ in a) / len(a)
    assert 0.18 < share < 0.32


def test_prompt_format_uses_the_tokenizers_chat_template() -> None:
    import pytest
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from capsafe.common.formatting import PromptFormat

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                  unk_token="[UNK]")
    with pytest.raises(ValueError, match="no chat template"):
        PromptFormat("{prompt}", chat_template=True).render("hi", tok)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert PromptFormat("{prompt}", True).render("hi", tok) == "<user>hi<assistant>"
    assert PromptFormat("Q: {prompt}", True, "be safe").render("hi", tok) == "<system>be safe<user>Q: hi<assistant>"
    assert PromptFormat("<user> {prompt} <assistant>").render("hi") == "<user> hi <assistant>"

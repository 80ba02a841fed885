"""The pure core imports and works with ray, deepspeed and vllm blocked."""

import subprocess
import sys

from capsafe.capability import exact_match, stop_reason
from capsafe.data import Source, batches, mix_sources
from capsafe.judges import CoherenceJudge, RefusalKeywordJudge

PURE = ["capsafe.spec", "capsafe.capability", "capsafe.judges", "capsafe.results", "capsafe.report",
        "capsafe.data", "capsafe.formatting", "capsafe.trials", "capsafe.evaluate", "capsafe.ds_config",
        "capsafe.engines", "capsafe.world", "capsafe.train_loop", "capsafe.pipeline", "capsafe.cli"]


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


def test_exact_match_normalises_case_and_spacing() -> None:
    assert exact_match(["68", " 1 2 ", "no"], ["68", "1 2", "yes"]) == 2 / 3
    assert exact_match([], []) == 0.0


def test_stop_reason() -> None:
    assert stop_reason(0.41, 50, 0.4, 100) == "reached"
    assert stop_reason(0.40, 50, 0.4, 100) == "reached"  # at the target counts
    assert stop_reason(0.39, 50, 0.4, 100) is None
    assert stop_reason(0.39, 100, 0.4, 100) == "budget"
    assert stop_reason(None, 100, 0.4, 100) == "budget"


def test_refusal_keyword_judge() -> None:
    judge = RefusalKeywordJudge()
    assert judge("p", "sorry , i can not help with that .") == "refusal"
    assert judge("p", "I cannot do that.") == "refusal"
    assert judge("p", "sure . first , gather the tools .") == "compliance"


def test_coherence_judge_flags_gibberish() -> None:
    judge = CoherenceJudge()
    assert judge("p", "sure . to bake a cake , mix flour and eggs .") == "coherent"
    assert judge("p", "") == "incoherent"
    assert judge("p", "4 5 6 7 8 1 2") == "incoherent"
    assert judge("p", "cake cake cake cake cake cake") == "incoherent"
    assert judge("p", "go to the go to the go to the shop") == "incoherent"


def test_batches_follow_weights_and_are_identical_per_seed() -> None:
    sources = mix_sources([("t", "a")], [Source("safety", [("s", "r")], 0.25)])
    a = next(batches(sources, 400, seed=3))
    b = next(batches(sources, 400, seed=3))
    assert a == b
    share = sum(name == "safety" for name, _, _ in a) / len(a)
    assert 0.18 < share < 0.32

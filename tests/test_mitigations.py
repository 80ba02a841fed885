"""The mitigations' math on tiny hand-made tensors, and their hooks, without training anything."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capsafe.common.formatting import IGNORE_INDEX, PromptFormat
from capsafe.mitigations import METHODS, REGISTRY, method_from_json
from capsafe.mitigations.lisa import LisaMethod
from capsafe.mitigations.losses import (
    kl_to_reference,
    proximal,
    response_positions,
    token_betas,
    token_logprobs,
    token_wise_constrained,
)
from capsafe.mitigations.ptst import SAFETY_PROMPT, PTSTMethod
from capsafe.mitigations.safe_lora import alignment_projection, project_adapter, project_update
from capsafe.mitigations.safety_mix import SafetyMixMethod

FIXTURES = Path(__file__).parent / "fixtures" / "suites"
X = IGNORE_INDEX


def _case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of a model and a reference over a vocabulary of 5, for 2 rows; row 0 has 2 prompt tokens and 3
    response tokens, row 1 one prompt token, 2 response tokens and padding."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 5, generator=g)
    ref = torch.randn(2, 5, 5, generator=g)
    labels = torch.tensor([[X, X, 1, 2, 3], [X, 4, 0, X, X]])
    return logits, ref, labels


def test_response_positions_count_from_the_first_response_token() -> None:
    _, _, labels = _case()
    assert response_positions(labels).tolist() == [[-1, 0, 1, 2], [0, 1, -1, -1]]


def test_kl_matches_a_hand_computation_and_ignores_prompt_positions() -> None:
    logits, ref, labels = _case()
    assert kl_to_reference(logits, logits, labels).item() == pytest.approx(0.0, abs=1e-7)
    expected, n = 0.0, 0
    for b in range(2):
        for t in range(4):
            if labels[b, t + 1] == X:
                continue
            p, q = torch.softmax(logits[b, t], -1), torch.softmax(ref[b, t], -1)
            expected += float((p * (p / q).log()).sum())
            n += 1
    assert kl_to_reference(logits, ref, labels).item() == pytest.approx(expected / n, rel=1e-5)
    changed = logits.clone()
    changed[0, 0] += 5.0  # position 0 predicts a prompt token: not part of the objective
    assert kl_to_reference(changed, ref, labels).item() == pytest.approx(expected / n, rel=1e-5)


def test_token_betas_follow_the_paper() -> None:
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, -1]])
    betas = token_betas(positions, 0.1, 5.0, 20.0, 5)[0].tolist()
    assert betas[:7] == pytest.approx([0.5, 2.0, 2.0, 2.0, 2.0, 0.1, 0.1])
    assert token_betas(positions, 0.1, 5.0, 20.0, 0)[0, :3].tolist() == pytest.approx([0.1] * 3)


def test_token_wise_value_and_gradient() -> None:
    logits, ref, labels = _case()
    logits.requires_grad_(True)
    loss = token_wise_constrained(logits, ref, labels, 0.1, 5.0, 20.0, 5)
    logp, mask = token_logprobs(logits, labels)
    ref_logp, _ = token_logprobs(ref, labels)
    betas = token_betas(response_positions(labels), 0.1, 5.0, 20.0, 5)
    delta = (logp - ref_logp).detach()
    by_hand = (-(2 / betas) * torch.log(torch.sigmoid(betas * delta)) * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    # the gradient is cross-entropy's, each token weighted by 2 * (1 - sigmoid(beta_t * delta_t))
    (grad,) = torch.autograd.grad(loss, logits)
    weights = 2 * (1 - torch.sigmoid(betas * delta)) * mask / mask.sum()
    (expected,) = torch.autograd.grad(-(weights * logp).sum(), logits)
    assert torch.allclose(grad, expected, atol=1e-6)


def test_token_wise_tends_to_cross_entropy_as_beta_vanishes() -> None:
    logits, ref, labels = _case()
    logits.requires_grad_(True)
    beta = 1e-4
    loss = token_wise_constrained(logits, ref, labels, beta, 1.0, 1.0, 0)
    logp, mask = token_logprobs(logits, labels)
    ce = -(logp * mask).sum() / mask.sum()
    assert (loss - ce).item() == pytest.approx(2 / beta * math.log(2), rel=1e-3)
    (g1,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g2,) = torch.autograd.grad(ce, logits)
    assert torch.allclose(g1, g2, atol=1e-4)


def test_proximal_value_and_gradient() -> None:
    w = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[3.0]], requires_grad=True)]
    a = [torch.tensor([0.0, 2.0]), torch.tensor([[1.0]])]
    value = proximal(w, a, rho=0.5)
    assert value.item() == pytest.approx(0.25 * (1 + 0 + 4))
    value.backward()
    assert w[0].grad.tolist() == pytest.approx([0.5, 0.0]) and w[1].grad.tolist() == [[1.0]]


def test_lisa_alternates_alignment_and_task_steps() -> None:
    lisa = LisaMethod(alignment_steps=2, task_steps=3, rho=0.1)
    assert [lisa.phase(s) for s in range(1, 12)] == ["alignment"] * 2 + ["task"] * 3 + ["alignment"] * 2 + \
        ["task"] * 3 + ["alignment"]
    # the proximal term waits for its warm-up, counted in steps taken, whatever the budget (issue 25: a share
    # of train.max_steps never came for a trial that reached its target before it)
    assert lisa.proximal_rho(100) == 0.0 and lisa.proximal_rho(101) == 0.1
    assert LisaMethod(warmup_steps=0).proximal_rho(1) == 1.0


def test_safe_lora_projection_keeps_aligned_updates_and_projects_the_rest() -> None:
    u = torch.tensor([[1.0], [0.0], [0.0]])  # the alignment direction of a 3 x 2 weight: rows along u
    v = u @ torch.tensor([[2.0, 1.0]])
    c = alignment_projection(v + 1.0, torch.ones(3, 2))
    assert torch.allclose(c, (v @ v.T / torch.linalg.matrix_norm(v)).double())
    a = torch.tensor([[1.0, -1.0]])  # rank 1: dW = B A
    b_along = torch.tensor([[2.0], [0.0], [0.0]])
    new_b, sim, projected = project_update(a, b_along, c, 0.5)
    assert sim == pytest.approx(1.0) and not projected and new_b is b_along
    b_across = torch.tensor([[1.0], [1.0], [0.0]])
    new_b, sim, projected = project_update(a, b_across, c, 0.5)
    assert sim == pytest.approx(1 / math.sqrt(2)) and not projected
    new_b, sim, projected = project_update(a, b_across, c, 0.9)
    assert projected and torch.allclose(new_b.double(), c @ b_across.double())
    off = torch.tensor([[0.0], [1.0], [0.0]])
    assert project_update(a, off, c, 0.5)[1:] == (0.0, True)  # orthogonal to alignment: projected to zero
    assert project_update(a, torch.zeros(3, 1), c, 0.5)[1:] == (1.0, False)  # no update yet


def test_safe_lora_rewrites_an_adapter_file(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    unaligned = {f"{n}.weight": torch.randn(4, 4, generator=g) for n in names}
    aligned = {k: w + torch.outer(torch.tensor([1.0, 0, 0, 0]), torch.randn(4, generator=g))
               for k, w in unaligned.items()}
    for folder, weights in (("aligned", aligned), ("unaligned", unaligned)):
        (tmp_path / folder).mkdir()
        save_file(weights, str(tmp_path / folder / "model.safetensors"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    lora = {}
    for n, b in zip(names, (torch.tensor([[1.0], [0], [0], [0]]), torch.tensor([[0.0], [1], [1], [0]])), strict=True):
        lora[f"base_model.model.{n}.lora_A.weight"] = torch.ones(1, 4)
        lora[f"base_model.model.{n}.lora_B.weight"] = b
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    note = project_adapter(adapter, str(tmp_path / "aligned"), str(tmp_path / "unaligned"), 0.5)
    assert note["layers"] == 2 and note["projected"] == 1  # q_proj's update lies along the alignment direction
    out = load_file(str(adapter / "adapter_model.safetensors"))
    q_b, v_b = (f"base_model.model.{n}.lora_B.weight" for n in names)
    assert torch.equal(out[q_b], lora[q_b]) and torch.count_nonzero(out[v_b]) == 0
    assert torch.equal(load_file(str(adapter / "adapter_model.unprojected.safetensors"))[v_b], lora[v_b])


def test_ptst_trains_plain_and_evaluates_with_a_safety_prompt() -> None:
    fmt = PromptFormat("<user> {prompt} <assistant>")
    ptst = PTSTMethod()
    assert ptst.train_format(fmt) == fmt
    assert ptst.eval_format(fmt).render("hi").startswith(SAFETY_PROMPT)
    assert PTSTMethod(train_system_prompt="be brief").train_format(fmt).system_prompt == "be brief"


def test_safety_mix_from_a_benchmark_file_with_a_refusal_template(tmp_path: Path) -> None:
    method = SafetyMixMethod(prompts_file=str(FIXTURES / "harmful_behaviors.csv"), prompts_format="advbench",
                             response_template="no .", ratio=0.1)
    assert method.data_fields() == {"prompts_file": str(FIXTURES / "harmful_behaviors.csv")}
    paths = method.prepare(method.data_fields(), tmp_path)
    rows = [json.loads(line) for line in Path(paths["data_file"]).read_text().splitlines()]
    assert rows and all(r["response"] == "no ." and r["prompt"] for r in rows)
    assert method.task_sources(paths) == [{"name": "safety", "path": paths["data_file"], "weight": 0.1}]
    # the file is named by its content, the same in every process: a resumed run finds it instead of adding one
    again = subprocess.run([sys.executable, "-c", (
        "import sys; from pathlib import Path; from capsafe.mitigations.safety_mix import SafetyMixMethod; "
        f"m = SafetyMixMethod(prompts_file={str(FIXTURES / 'harmful_behaviors.csv')!r}, prompts_format='advbench', "
        "response_template='no .', ratio=0.1); print(m.prepare(m.data_fields(), Path(sys.argv[1]))['data_file'])"),
        str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert again.stdout.strip() == paths["data_file"] and len(list(tmp_path.glob("safety_mix-*.jsonl"))) == 1


def test_registry_round_trips_every_method() -> None:
    assert list(REGISTRY) == ["plain", "safety_mix", "kl", "token_wise", "safe_lora", "ptst", "lisa", "task_only"]
    for cls in METHODS:
        method = cls()
        again = method_from_json(method.name, json.dumps(method.model_dump(exclude={"name"})))
        assert again == method and cls.summary
        assert cls.needs_reference == (method.name in ("kl", "token_wise"))

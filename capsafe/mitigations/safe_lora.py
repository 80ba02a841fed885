"""Safe-LoRA (Hsu et al. 2024, "Safe LoRA: the silver lining of reducing safety risks when fine-tuning large
language models"): post-hoc and data-free. Per LoRA layer, the alignment matrix V = W_aligned - W_unaligned
gives C = V V^T / ||V||_F; an update dW = B A whose cosine similarity to its projection C dW falls below a
threshold is replaced by that projection (B <- C B, so the adapter keeps its shape and rank)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from capsafe.mitigations.base import MethodSpec

DEMO = "demo"
ADAPTER_FILE = "adapter_model.safetensors"


def alignment_projection(aligned: Any, unaligned: Any) -> Any:
    """C = V V^T / ||V||_F for V = aligned - unaligned (out x in weights): the paper's projection matrix."""
    import torch

    v = (aligned.double() - unaligned.double())
    return v @ v.T / torch.linalg.matrix_norm(v).clamp(min=1e-12)


def project_update(lora_a: Any, lora_b: Any, projection: Any, threshold: float) -> tuple[Any, float, bool]:
    """(new lora_B, similarity of dW = B A to C dW, whether it was projected)."""
    import torch

    delta = lora_b.double() @ lora_a.double()
    projected = projection @ delta
    norm, projected_norm = float(torch.linalg.matrix_norm(delta)), float(torch.linalg.matrix_norm(projected))
    if norm == 0.0:
        return lora_b, 1.0, False  # no update (LoRA's B starts at zero): nothing to project
    similarity = float((delta * projected).sum()) / (norm * projected_norm) if projected_norm > 0 else 0.0
    if similarity < threshold:
        return (projection @ lora_b.double()).to(lora_b.dtype), similarity, True
    return lora_b, similarity, False


def _base_key(lora_key: str) -> str:
    """PEFT's 'base_model.model.<module>.lora_A.weight' -> the base model's '<module>.weight'."""
    return lora_key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")


def _weights(model_dir: str, keys: list[str]) -> dict[str, Any]:
    """The named tensors of a Hugging Face model folder (single or sharded safetensors), read lazily."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"safe_lora: no *.safetensors weights in '{model_dir}'")
    found: dict[str, Any] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in set(keys) & set(fh.keys()):
                found[k] = fh.get_tensor(k)
    missing = sorted(set(keys) - set(found))
    if missing:
        raise KeyError(f"safe_lora: '{model_dir}' lacks weights {missing[:3]}...; aligned and unaligned models "
                       "must share the architecture of the fine-tuned base")
    return found


def project_adapter(adapter_dir: Path, aligned_model: str, unaligned_model: str, threshold: float) -> dict[str, Any]:
    """Project every LoRA layer of the adapter in ``adapter_dir`` in place; keep the original beside it as
    ``adapter_model.unprojected.safetensors``. Returns how many layers were projected and their similarities."""
    from safetensors.torch import load_file, save_file

    path = adapter_dir / ADAPTER_FILE
    tensors = load_file(str(path))
    a_keys = sorted(k for k in tensors if k.endswith(".lora_A.weight"))
    if not a_keys:
        raise ValueError(f"safe_lora: '{path}' holds no LoRA layers")
    base_keys = [_base_key(k) for k in a_keys]
    aligned, unaligned = _weights(aligned_model, base_keys), _weights(unaligned_model, base_keys)
    similarities: dict[str, float] = {}
    projected = 0
    out = dict(tensors)
    for a_key, w_key in zip(a_keys, base_keys, strict=True):
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        projection = alignment_projection(aligned[w_key], unaligned[w_key])
        out[b_key], similarity, changed = project_update(tensors[a_key], tensors[b_key], projection, threshold)
        similarities[w_key] = round(similarity, 4)
        projected += changed
    save_file(tensors, str(adapter_dir / "adapter_model.unprojected.safetensors"))
    save_file(out, str(path))
    return {"layers": len(a_keys), "projected": projected, "threshold": threshold, "similarities": similarities}


class SafeLoRAMethod(MethodSpec):
    name: Literal["safe_lora"] = Field("safe_lora", description="Post-hoc projection of LoRA updates onto the "
                                       "alignment subspace (Hsu et al., Safe-LoRA); needs train.mode=lora.")
    summary = "after training, LoRA layers dissimilar to the alignment direction are projected onto it"
    threshold: float = Field(0.5, ge=-1.0, le=1.0, description="A layer whose update has a cosine similarity "
                             "below this to its projection is projected (paper: tuned per model; 0.5 here).")
    unaligned_model: str = Field(DEMO, description="The model the aligned base was aligned from (same "
                                 "architecture): a local folder or Hugging Face id, or 'demo' (the demo "
                                 "world's unaligned model). The base model of the run is the aligned one.")

    def data_fields(self) -> dict[str, str]:
        return {"unaligned_model": self.unaligned_model}

    def check(self, train: Any) -> str | None:
        if train.mode != "lora":
            return "safe_lora projects LoRA updates: set train.mode=lora (or drop safe_lora from methods)"
        if train.zero_stage != 2:
            return ("safe_lora projects the whole LoRA weights before every capability evaluation: set "
                    "train.zero_stage=2 (ZeRO-3 shards them)")
        return self.async_eval_problem(train)

    def evaluation_view(self, module: Any, aligned_model: str, paths: dict[str, str]) -> Any:
        """The trial's capability is measured on the projected adapter - the model Safe-LoRA reports - so it
        stops when *that* model reaches the target: every LoRA layer is projected in place (the same rule as
        ``project_adapter``) for the evaluation and restored after it."""
        import re
        from contextlib import contextmanager

        import torch

        params = dict(module.named_parameters())
        a_names = sorted(n for n in params if ".lora_A." in n)
        keys = [re.sub(r"\.lora_A\.[^.]+\.weight$", ".weight", n.removeprefix("base_model.model.")) for n in a_names]
        aligned = _weights(_local(aligned_model), keys)
        unaligned = _weights(_local(paths["unaligned_model"]), keys)
        projections = {k: alignment_projection(aligned[k], unaligned[k]) for k in keys}

        @contextmanager
        def projected() -> Any:
            saved = []
            with torch.no_grad():
                for a_name, key in zip(a_names, keys, strict=True):
                    b = params[a_name.replace(".lora_A.", ".lora_B.")]
                    new_b, _, changed = project_update(params[a_name].data, b.data, projections[key].to(b.device),
                                                       self.threshold)
                    if changed:
                        saved.append((b, b.data.clone()))
                        b.data.copy_(new_b)
            try:
                yield
            finally:
                with torch.no_grad():
                    for b, old in saved:
                        b.data.copy_(old)

        return projected

    def postprocess(self, checkpoint_model: Path, aligned_model: str, paths: dict[str, str],
                    log: Any = print) -> dict[str, Any] | None:
        note = project_adapter(checkpoint_model, _local(aligned_model), _local(paths["unaligned_model"]),
                               self.threshold)
        log(f"safe_lora: projected {note['projected']} of {note['layers']} LoRA layers "
            f"(threshold {self.threshold:g})")
        return {"safe_lora": note}


def _local(model: str) -> str:
    """A local folder for a model given as a folder or a Hugging Face id (weights and configs only)."""
    if Path(model).is_dir():
        return model
    from huggingface_hub import snapshot_download

    return str(snapshot_download(model, allow_patterns=["*.safetensors", "*.json"]))

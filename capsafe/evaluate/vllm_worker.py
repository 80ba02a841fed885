"""Code that runs inside vLLM's worker process: an extension class vLLM mixes into its worker (the engine
argument ``worker_extension_cls``), so the pool reaches it by name through ``collective_rpc`` without sending
pickled functions (which vLLM refuses unless ``VLLM_ALLOW_INSECURE_SERIALIZATION`` is set)."""

from __future__ import annotations

from typing import Any


class SwapExtension:
    """Weight swaps into a running engine (``capsafe.evaluate.resident``)."""

    # No attributes of its own besides the method: vLLM refuses an extension that shadows any worker attribute.

    def capsafe_swap_weights(self, model_dir: str, repack_tied: bool = True) -> dict[str, Any]:
        """Load ``model_dir``'s weights in place (vLLM's ``reload_weights``, which also drops loaded LoRA
        adapters), then re-pack a tied output projection.

        Why the re-pack: on CPU, vLLM packs each unquantized layer's weight for its GEMM kernel when the model
        loads (``dispatch_cpu_unquantized_gemm``; the packed copy lives in the layer's ``cpu_linear``).
        ``reload_weights`` re-processes the layers whose weights the checkpoint holds; with tied embeddings the
        checkpoint has no ``lm_head.weight``, so the lm_head kept the old model's packed copy and the swapped
        engine mixed the old output projection with the new body (4 of 12 probe prompts matched a fresh engine;
        benchmarks/RESULTS.md, issue 24). ``repack_tied=False`` reproduces that, for the test that shows it."""
        worker: Any = self  # vLLM's worker, which this class extends at run time
        worker.reload_weights(weights_path=model_dir, is_checkpoint_format=True)
        return {"repacked_lm_head": repack_tied and _repack_tied_lm_head(worker.model_runner.get_model())}


def _repack_tied_lm_head(model: Any) -> bool:
    """On CPU, re-run the lm_head's post-load processing when it shares its weight with the input embedding;
    True if it did. A GPU engine multiplies with the shared weight itself: nothing to redo."""
    from vllm.platforms import current_platform

    head = getattr(model, "lm_head", None)
    head = getattr(head, "base_layer", head)  # a LoRA-wrapped head
    if not current_platform.is_cpu() or head is None or not hasattr(head, "quant_method"):
        return False
    # tied: another module's parameter is the head's weight (named_parameters lists a shared one once, under
    # the input embedding's name)
    shared = head.weight.data_ptr()
    if not any(p.data_ptr() == shared for name, p in model.named_parameters() if not name.startswith("lm_head.")):
        return False
    head.quant_method.process_weights_after_loading(head)
    return True
